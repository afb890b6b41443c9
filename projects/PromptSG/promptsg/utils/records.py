"""How the measuring tools record a result: named by date, commit and machine (``run_record``, the
one place that record is built), written as JSON (every figure) and Markdown (the table a README
quotes), never half-written."""
import datetime
import json
import os
import platform
import subprocess

import torch

# the repository: promptsg/utils/records.py lies in projects/PromptSG/ under it
REPOSITORY = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))


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


def machine():
    """The machine of a measurement: platform, CPU model and cores, torch's threads and version, and
    the GPU when there is one."""
    info = {"platform": platform.platform(), "arch": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_record(command, changes=""):
    """The record of one measurement: ``date`` and ``time`` (UTC), ``commit`` of this checkout
    (``changes`` appended when tracked files differ from it), ``machine`` and ``command``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H:%M UTC"),
            "commit": commit(REPOSITORY, changes), "machine": machine(), "command": command}


def tool_command(script, argv):
    """How a tool was run: ``python <script relative to the repository> <argv>``."""
    return " ".join(["python", os.path.relpath(os.path.abspath(script), REPOSITORY), *argv])


def machine_words(record):
    """The record's machine in words: "2-CPU x86_64 machine (Intel Xeon ...)"."""
    m = record["machine"]
    words = f"{m['cpus']}-CPU {m.get('arch') or m.get('processor')} machine"   # records before 2026-12-07: no arch, cpu
    return words + (f" ({m['cpu']})" if "cpu" in m else "") + (f", {m['gpu']}" if "gpu" in m else "")


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


def print_figures(figures, as_json=False):
    """A probe's figures on standard output: one JSON object, or a line per key with floats to 4
    places, the keys in a column."""
    if as_json:
        print(json.dumps(figures))
        return
    width = max(map(len, figures), default=0) + 2
    for key, value in figures.items():
        print(f"{key:{width}s}{value:.4f}" if isinstance(value, float) else f"{key:{width}s}{value}")
