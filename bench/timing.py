"""Wall-clock helpers shared by the benchmark scripts."""

import ctypes
import time

import torch


def _sync():
    """Wait for the GPU's queued kernels, so that a wall time covers the work it launched (nothing on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_time(fn, repeats: int) -> float:
    """min wall time of `repeats` calls of fn, after one untimed warm-up call."""
    fn()
    return min(timed(fn)[1] for _ in range(repeats))


def timed(fn):
    """(fn(), its wall time in seconds) of one call, queued GPU work included."""
    _sync()
    t0 = time.perf_counter()
    r = fn()
    _sync()
    return r, time.perf_counter() - t0


def keep_freed_memory() -> bool:
    """Make glibc serve every allocation from its heap and never hand freed memory back to the OS (mallopt:
    M_MMAP_MAX = 0, M_TRIM_THRESHOLD = -1), so memory touched once is reused, already mapped, by later
    allocations. By default glibc maps each allocation above 32 MB afresh and unmaps it on free, so every large
    tensor pays the first touch of its pages again: about 3.5 s per GB on this VM, more than some of the timed
    solves themselves. Returns False, changing nothing, where the C library is not glibc
    (then the timings include those first touches)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


class LayerPhases:
    """gptq.quantize_model's `timer`: wall seconds per phase of each decoder layer (`layers[i][phase]`; a layer
    starts at its "load" phase, nested phases count in both). On a GPU each boundary synchronizes, so the
    seconds are the device's. bench/streaming.py prints them."""

    def __init__(self):
        self.layers: list[dict[str, float]] = []

    def __call__(self, name: str):
        return _Phase(self, name)


class _Phase:
    def __init__(self, owner: LayerPhases, name: str):
        self.owner, self.name = owner, name

    def __enter__(self):
        if self.name == "load":
            self.owner.layers.append({})
        _sync()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        _sync()
        d = self.owner.layers[-1]
        d[self.name] = d.get(self.name, 0.0) + time.perf_counter() - self.t0
        return False
