"""How the measuring tools record a result: named by date and commit, written as JSON (every figure)
and Markdown (the table a README quotes), never half-written."""
import json
import os
import subprocess


def commit(directory):
    """The short commit hash of the git checkout holding ``directory``, or "unknown" outside one."""
    try:
        return subprocess.run(["git", "-C", directory, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
