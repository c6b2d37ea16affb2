"""Statistics the results tables need beyond eval.py's: an interval over calibration seeds x eval samples
(seeds_samples_interval, used by bench/methods.py) and the Student-t quantile it takes (no scipy at run time).
Tests: tests/test_stats.py.
"""

import functools
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import bootstrap_ci  # noqa: E402


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with df degrees of freedom, p in [0.5, 1): bisection on the CDF, whose density
    c (1 + x²/df)^(-(df+1)/2) is integrated from 0 with Simpson's rule (no scipy at run time)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x):
        t = torch.linspace(0, x, 4001, dtype=torch.float64)
        f = c * (1 + t * t / df) ** (-(df + 1) / 2)
        return 0.5 + (x / 4000) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()).item()

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        lo, hi = ((lo + hi) / 2, hi) if cdf((lo + hi) / 2) < p else (lo, (lo + hi) / 2)
    return (lo + hi) / 2


def seeds_samples_interval(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                           bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict:
    """Mean and interval of a per-sample metric measured for S calibration seeds on the same n eval samples,
    values (S, n) (e.g. the per-sample KL difference of a method and GPTQ, each quantized from seed s's set).

    Two sources of error, treated as independent: which eval samples were drawn, and which calibration seeds.
      * samples: the percentile bootstrap of the seed-averaged per-sample values x̄_i = mean_s x_si (one resample
        of the eval samples serves every seed, so the pairing with GPTQ and across seeds is kept): [lo_e, hi_e];
      * seeds: the t-interval half-width h_s = t_{0.975, S-1} · sd_s(mean_i x_si) / √S of the per-seed means.
    Each side's half-width is the root sum of squares: lo = x̄ - √((x̄ - lo_e)² + h_s²), hi likewise. Both terms
    contain the seed x sample interaction once (a crossed design's σ²_e / nS), so the interval errs on the wide
    side. With one seed h_s is unknown: the interval is the eval-sample one alone (`seed_half` None).
    bounds: the metric's range (KL >= 0, a rate in [0, 1]), which the symmetric seed term may overshoot."""
    v = torch.as_tensor(values, dtype=torch.float64)
    S, n = v.shape
    mean = v.mean().item()
    lo_e, hi_e = bootstrap_ci(v.mean(0), n_boot, seed, level) or (mean, mean)
    seed_means = v.mean(1)
    h_s = t_quantile((1 + level) / 2, S - 1) * seed_means.std().item() / math.sqrt(S) if S > 1 else None
    lo = max(bounds[0], mean - math.hypot(max(0.0, mean - lo_e), h_s or 0.0))
    hi = min(bounds[1], mean + math.hypot(max(0.0, hi_e - mean), h_s or 0.0))
    return {"mean": mean, "ci95": [lo, hi], "significant": lo > 0 or hi < 0, "samples_ci95": [lo_e, hi_e],
            "seed_half": h_s, "seed_means": seed_means.tolist(), "n_seeds": S, "n": n}
