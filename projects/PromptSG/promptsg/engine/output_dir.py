"""One run per OUTPUT_DIR: a live run holds its folder, and a new run never trains over a finished one.

FastReID writes checkpoints, ``metrics.json``, ``log.txt`` and the tensorboard events of a run
into ``OUTPUT_DIR`` without looking at what is there. Two runs started into one folder both exit 0:
their logs interleave and one run's checkpoints and results silently replace the other's. Here:

* ``OutputDirLock``: the launcher process holds an exclusive ``flock`` on ``OUTPUT_DIR/.promptsg-run.lock``
  for the whole run, with its process, machine, start time and command written in the file. A
  second run into the folder stops at start-up naming the folder and that process. The kernel
  drops the lock when its process ends, however it ends, so a lock left by a crashed run is
  stale by construction: it is taken over, with one log line naming the run that left it.
* ``check_new_run``: a new training run (no ``--resume``) into a folder that holds a run's
  checkpoints or results stops with one line saying how to go on: ``--resume``, another
  ``OUTPUT_DIR``, or ``--overwrite``, which removes the previous run's files (only the names
  ``tools/train_net.py`` writes, after every start-up check has passed) before training.
"""
import datetime
import glob
import json
import logging
import os
import socket
import sys

from .preflight import InputError

try:
    import fcntl
except ImportError:   # not a POSIX system: runs are not locked (a warning says so)
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".promptsg-run.lock"
# What makes a folder hold a run: FastReID's checkpoints and the final results.
TRAINED = ("last_checkpoint", "model_*.pth", "results.json", "clip_reid_stage1.pth")
# Every file tools/train_net.py writes into OUTPUT_DIR (removed by --overwrite).
RUN_FILES = TRAINED + ("model_*.pth.tmp", "clip_reid_stage1.pth.tmp", "eval_results.json", "metrics.json",
                       "config.yaml", "log.txt",
                       "log.txt.rank*", "events.out.tfevents.*")


def _matches(path, patterns):
    found = set()
    for pattern in patterns:
        found.update(p for p in glob.glob(os.path.join(glob.escape(path), pattern)) if os.path.isfile(p))
    return sorted(found)


def _names(paths, n=3):
    names = [os.path.basename(p) for p in paths]
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_new_run(path, resume, overwrite):
    """A training run into ``path``: refuse a folder holding another run's checkpoints or results,
    unless ``resume`` (continue it) or ``overwrite`` (replace it). Returns the files ``overwrite``
    will remove (empty when there is nothing to replace)."""
    if resume and overwrite:
        raise InputError("--resume continues the run in OUTPUT_DIR and --overwrite replaces it: choose one")
    found = _matches(path, TRAINED)
    if not found or resume:
        return []
    if not overwrite:
        raise InputError(f"OUTPUT_DIR {path} already holds a run ({_names(found)}): continue it with --resume, "
                         f"set another OUTPUT_DIR, or replace it with --overwrite")
    return _matches(path, RUN_FILES)


def remove_previous_run(path, files):
    """Remove the previous run's ``files`` (from ``check_new_run``), once every check has passed."""
    for f in files:
        try:
            os.remove(f)
        except FileNotFoundError:
            pass
    if files:
        logger.info("--overwrite: removed %d files of the previous run in %s (%s)", len(files), path, _names(files))


class OutputDirLock:
    """An exclusive lock on ``OUTPUT_DIR`` held from ``acquire()`` until ``release()`` or the
    process's end. The lock file keeps its holder's description for the message a second run gets."""

    def __init__(self, path):
        self.path = path
        self.lock_path = os.path.join(path, LOCK_NAME)
        self._fd = None

    def acquire(self):
        if fcntl is None:
            logger.warning("no fcntl on this platform: OUTPUT_DIR %s is not locked against a second run", self.path)
            return self
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read(fd)
            os.close(fd)
            raise InputError(f"OUTPUT_DIR {self.path} is in use by another run ({describe(holder)}); wait for it "
                             f"to end or set another OUTPUT_DIR") from None
        previous = self._read(fd)
        if previous:   # written by a holder that never released it: its process is gone
            logger.warning("OUTPUT_DIR %s: a stale lock of a run that ended without releasing it (%s) was taken over",
                           self.path, describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError as exc:   # a full disk: the lock holds all the same, undescribed
            logger.warning("OUTPUT_DIR %s: the run lock is held but its holder cannot be written (%s)",
                           self.path, exc.strerror)
        self._fd = fd
        return self

    def release(self):
        """Clear the holder's description and drop the lock (a clean end leaves no stale lock)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)   # closing the descriptor drops the flock
            self._fd = None

    @staticmethod
    def _read(fd):
        try:
            text = os.pread(fd, 65536, 0).decode(errors="replace")
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {"unreadable": True}

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def describe(holder):
    """A lock holder's description, one line: process, machine, start time, command."""
    if not holder or holder.get("unreadable"):
        return "its lock file does not say which"
    return (f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}")
