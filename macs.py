"""MACS, modality-affinity consensus selection: which calibration samples to quantize on (ECMFQ, reconstructed
from its abstract; docs/methods.md §4.3). Used by `python calibrate.py --select macs`.

Random calibration sets starve rare experts: an expert that few samples route to gets a Hessian from a handful
of tokens (or none, and then the layer's pooled one). MACS draws a candidate pool (default 4x the calibration
size), runs the float model once per candidate (calibrate.macs_profile: the only part that needs the model),
and picks samples that are important, cross-modal and typical, while keeping every expert fed. This file is the
scoring and the selection, on the pass's counts (Profile): torch and numpy only. Per candidate i, MoE layer l,
expert e:
    u_i[l, e]          routed slots (tokens x top-k) to e, per modality (usage_text, usage_vis), and their
                       per-layer histograms ū (normalized to sum 1 per layer);
    importance_i     = Σ_l Σ_e g[l, e] ū_i[l, e],  g = the pool's mean router probability (global importance);
    affinity_i       = mean over layers of the attention mass the sample's text tokens (those after its first
                       image token) pay to its image tokens (0 for a text-only sample);
    representative_i = −mean over its modalities of Σ_l KL(ū_i^mod[l] || pool mean ū^mod[l]);
    score_i          = z(importance) + z(affinity) + z(representative)      (z: standardized over the pool).
Greedy selection: with C (L, E) the cumulative routed slots of the samples chosen so far, each step takes
    argmax_i  score_i − μ · z_i( imbalance(C + u_i) ),    imbalance(C) = mean_l std(C[l]) / mean(C[l]),
over the samples not yet chosen (z over those candidates, so the penalty keeps its weight as C grows). μ is
`penalty` (calibrate.py --macs-penalty, default 1); μ = 0 selects by score alone. No sample is chosen twice.

`coverage` counts the experts that get zero (or few) routed tokens from a selection; calibrate.py reports it for
MACS and for a random selection of the same size from the same pool.
Read next: calibrate.py (macs_profile, select_macs: the pass over the pool and the calib/ it writes).
Run the tests:  python -m pytest -q tests/test_macs.py
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EPS = 1e-6  # histogram smoothing inside the KL divergence (an unused expert must not give an infinite KL)


@dataclass
class Profile:
    """One float forward per pool sample, summarized (calibrate.macs_profile runs it). P samples, L MoE layers,
    E experts."""
    usage_text: torch.Tensor  # (P, L, E) routed slots of text tokens
    usage_vis: torch.Tensor  # (P, L, E) routed slots of image tokens
    affinity: torch.Tensor  # (P,) mean text -> image attention mass
    importance: torch.Tensor  # (L, E) pool mean router probability g

    @property
    def usage(self) -> torch.Tensor:
        return self.usage_text + self.usage_vis


def zscore(v: torch.Tensor) -> torch.Tensor:
    """(v − mean) / std over the entries; all-equal entries give 0."""
    v = v.double()
    std = v.std() if v.numel() > 1 else v.new_zeros(())
    return (v - v.mean()) / std if float(std) > 0 else torch.zeros_like(v)


def _hist(u: torch.Tensor) -> torch.Tensor:
    """(..., L, E) counts -> per-layer histograms (sum 1 over E; all-zero rows stay zero)."""
    return u / u.sum(-1, keepdim=True).clamp(min=1e-12)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_l KL(p[l] || q[l]) for histograms (..., L, E), smoothed by EPS."""
    p, q = _hist(p.double() + EPS), _hist(q.double() + EPS)
    return (p * (p / q).log()).sum(dim=(-1, -2))


def scores(p: Profile) -> dict[str, torch.Tensor]:
    """The three standardized parts of the MACS score and their sum, each (P,)."""
    importance = (p.importance.double() * _hist(p.usage.double())).sum(dim=(-1, -2))
    rep = torch.zeros(p.usage.shape[0], dtype=torch.float64, device=p.usage.device)
    n_mod = torch.zeros_like(rep)
    for u in (p.usage_text, p.usage_vis):
        present = u.sum(dim=(-1, -2)) > 0  # (P,)
        if bool(present.any()):
            mean = _hist(u[present].double()).mean(0)  # pool mean histogram of this modality
            rep[present] -= _kl(u[present], mean)
            n_mod += present.double()
    parts = {"importance": zscore(importance), "affinity": zscore(p.affinity),
             "representative": zscore(rep / n_mod.clamp(min=1))}
    parts["score"] = parts["importance"] + parts["affinity"] + parts["representative"]
    return parts


def imbalance(C: torch.Tensor) -> torch.Tensor:
    """mean_l std(C[l]) / mean(C[l]) of cumulative counts C (..., L, E): 0 when every expert got the same."""
    C = C.double()
    return (C.std(dim=-1) / C.mean(dim=-1).clamp(min=1e-12)).mean(dim=-1)


def select(usage: torch.Tensor, score: torch.Tensor, n: int, penalty: float = 1.0) -> list[int]:
    """Greedy MACS selection of n distinct pool indices (in the order picked). usage (P, L, E) routed slots per
    candidate, score (P,) its MACS score (module docstring)."""
    P = usage.shape[0]
    if not 1 <= n <= P:
        raise ValueError(f"select: n={n} samples from a pool of {P}; the pool must hold at least n candidates")
    C = torch.zeros(usage.shape[1:], dtype=torch.float64, device=usage.device)
    free = torch.ones(P, dtype=torch.bool, device=usage.device)
    chosen = []
    for _ in range(n):
        idx = torch.where(free)[0]
        total = score[idx].double() - penalty * zscore(imbalance(C + usage[idx].double()))
        pick = int(idx[int(total.argmax())])
        chosen.append(pick)
        free[pick] = False
        C += usage[pick].double()
    return chosen


def random_selection(P: int, n: int, seed: int) -> list[int]:
    """The baseline: n distinct pool indices drawn uniformly with `seed`."""
    return sorted(np.random.default_rng(seed).choice(P, size=n, replace=False).tolist())


def coverage(usage: torch.Tensor, chosen: list[int], few: int) -> dict:
    """Experts (over all MoE layers) that the chosen samples route zero tokens to, and fewer than `few`."""
    counts = usage[chosen].sum(0)  # (L, E) routed slots = tokens (an expert appears once per token's top-k)
    return {"zero": int((counts == 0).sum()), f"under_{few}": int((counts < few).sum()),
            "min": int(counts.min()), "imbalance": float(imbalance(counts))}
