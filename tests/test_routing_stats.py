"""bench/routing_stats.modality_information against entropies computed by hand and a simulated null."""

import math
import os

import torch

from bench import routing_stats


def entropy(counts):
    n = sum(counts)
    return -sum(c / n * math.log2(c / n) for c in counts if c)


def test_information_equals_entropy_difference():
    v, t = [30, 0, 5, 12, 1], [2, 9, 5, 0, 40]
    mi, share, _ = routing_stats.modality_information(v, t)
    N = sum(v) + sum(t)
    h_m = entropy([sum(v), sum(t)])
    h_m_given_e = sum((a + b) / N * entropy([a, b]) for a, b in zip(v, t))
    assert abs(mi - (h_m - h_m_given_e)) < 1e-12 and abs(share - mi / h_m) < 1e-12


def test_separated_and_independent_routing():
    assert routing_stats.modality_information([10, 0, 7], [0, 5, 0])[1] == 1.0
    mi, share, _ = routing_stats.modality_information([10, 20, 30], [20, 40, 60])
    assert abs(mi) < 1e-12 and abs(share) < 1e-12


def test_null_matches_simulated_modality_blind_routing():
    g = torch.Generator().manual_seed(0)
    E, n_vis, n_text = 64, 700, 1000
    p = torch.rand(E, generator=g) + 0.1  # uneven experts, same for both modalities
    sims = []
    for _ in range(300):
        v = torch.bincount(torch.multinomial(p, n_vis, True, generator=g), minlength=E)
        t = torch.bincount(torch.multinomial(p, n_text, True, generator=g), minlength=E)
        mi, _, null = routing_stats.modality_information(v, t)
        sims.append((mi, null))
    mean_mi = sum(m for m, _ in sims) / len(sims)
    mean_null = sum(n for _, n in sims) / len(sims)
    assert 0.8 * mean_null < mean_mi < 1.2 * mean_null, (mean_mi, mean_null)


def test_coverage_against_a_loop_over_experts(tmp_path):
    import calibrate
    from quant import folders

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    calibrate.calibrate(os.path.join(root, "models", "tiny-qwen3-vl-moe"), n=4, seed=0, out=str(tmp_path / "c"),
                        gamma=False, command="test")
    r = routing_stats.coverage(str(tmp_path / "c"), least=3)
    c = folders.CalibSet.load(str(tmp_path / "c"))
    counts = [[int(a) + int(b) for a, b in zip(t, v)] for t, v in zip(c.n_text, c.n_vis)]
    assert r["zero"] == sum(x == 0 for layer in counts for x in layer)
    assert r["few"] == sum(x < 2 * 128 for layer in counts for x in layer)
    assert abs(r["least_fed"] - sum(sum(sorted(layer)[:3]) for layer in counts) / len(counts)) < 1e-9
    imb = [torch.tensor(layer, dtype=torch.float64) for layer in counts]
    assert abs(r["imbalance"] - sum(float(x.std() / x.mean()) for x in imb) / len(imb)) < 1e-12
