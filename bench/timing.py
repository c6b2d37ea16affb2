"""Wall-clock helpers shared by the benchmark scripts."""

import time


def best_time(fn, repeats: int) -> float:
    """min wall time of `repeats` calls of fn, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def timed(fn):
    """(fn(), its wall time in seconds) of one call."""
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0
