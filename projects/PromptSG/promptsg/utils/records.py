"""How the measuring tools record a result: named by date, commit and machine, written as JSON
(every figure) and Markdown (the table a README quotes), never half-written."""
import json
import os
import platform
import subprocess


def commit(directory, changes=""):
    """The short commit hash of the git checkout holding ``directory``, or "unknown" outside one;
    ``changes`` is appended when its tracked files have uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + (changes if changes and git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows of the processor."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return model


def write_record(stem, results, text):
    """``stem``.json (``results``) and ``stem``.md (``text``), each through a temporary file that is
    renamed into place; returns the two paths."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    paths = (stem + ".json", stem + ".md")
    for path, write in zip(paths, (lambda f: json.dump(results, f, indent=1), lambda f: f.write(text + "\n"))):
        with open(path + ".tmp", "w") as f:
            write(f)
        os.replace(path + ".tmp", path)
    return paths
