"""Peak memory of a block on top of what was held when it started: CUDA's allocator statistics,
or on the CPU the peak resident set size with its high-water mark reset where Linux allows it."""
import ctypes
import platform
import resource

import torch


class PeakMemory:
    """Peak bytes allocated on top of what was held when the block started.

    CUDA: torch.cuda.max_memory_allocated. CPU: the peak resident set size (getrusage), after
    handing freed heap memory back to the OS (malloc_trim) and resetting the high-water mark
    (/proc/self/clear_refs); where that reset is refused the peak is process-wide and
    ``exact`` is False.
    """

    def __init__(self, device):
        self.device = device
        self.exact = True
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "getrusage.ru_maxrss"
        self.bytes = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.exact = _reset_peak_rss()
            self.base = _max_rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.bytes = _max_rss_bytes() - self.base
        return False


def _max_rss_bytes():
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak_rss():
    """Make the peak resident set size equal the current one; False where the OS refuses."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
