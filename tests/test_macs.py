"""macs.py: greedy selection never repeats a sample and feeds a rare expert that random selection starves; the
score parts against their definitions; calibrate.py --select macs end to end (indices round-trip)."""

import pytest
import torch

import calibrate
from data import processor
from data import samples as data_samples
import macs
from quant import folders


def pool_with_a_rare_expert(P=40, L=2, E=8, rare=23, seed=0):
    """Routed slots (P, L, E): experts 0..6 of layer 0 used by everyone, expert 7 only by sample `rare`."""
    g = torch.Generator().manual_seed(seed)
    usage = torch.randint(5, 30, (P, L, E), generator=g).float()
    usage[:, 0, 7] = 0
    usage[rare, 0, 7] = 6
    return usage


def test_select_never_repeats_and_takes_everything_when_n_equals_the_pool():
    usage = pool_with_a_rare_expert()
    score = torch.randn(40, generator=torch.Generator().manual_seed(1))
    for n in (1, 10, 40):
        chosen = macs.select(usage, score, n, penalty=1.0)
        assert len(chosen) == n == len(set(chosen)) and all(0 <= i < 40 for i in chosen)
    with pytest.raises(ValueError, match="pool"):
        macs.select(usage, score, 41)


def test_macs_covers_a_rare_expert_that_random_selection_misses():
    rare, n = 23, 10
    usage = pool_with_a_rare_expert(rare=rare)
    score = torch.zeros(40, dtype=torch.float64)
    score[rare] = -1.0  # a below-average sample by score: only the imbalance penalty can bring it in
    assert rare not in macs.select(usage, score, n, penalty=0.0)
    chosen = macs.select(usage, score, n, penalty=1.0)
    assert rare in chosen and macs.coverage(usage, chosen, few=1)["zero"] == 0
    # random draws of 10 from 40 include one given sample with probability 1/4
    hits = [rare in macs.random_selection(40, n, seed) for seed in range(400)]
    assert 0.15 < sum(hits) / len(hits) < 0.35
    missed = next(seed for seed, h in enumerate(hits) if not h)
    assert macs.coverage(usage, macs.random_selection(40, n, missed), few=1)["zero"] == 1
    assert macs.imbalance(usage[chosen].sum(0)) < macs.imbalance(usage[macs.random_selection(40, n, missed)].sum(0))


def test_score_parts_follow_their_definitions():
    P, L, E = 6, 2, 4
    g = torch.Generator().manual_seed(0)
    u_text, u_vis = torch.randint(1, 9, (P, L, E), generator=g).float(), torch.randint(1, 9, (P, L, E), generator=g).float()
    u_vis[0] = 0  # a text-only sample
    prof = macs.Profile(u_text, u_vis, torch.tensor([0.0, 0.2, 0.4, 0.1, 0.3, 0.5]), torch.rand(L, E, generator=g))
    parts = macs.scores(prof)
    for k in ("importance", "affinity", "representative"):  # standardized over the pool
        assert abs(float(parts[k].mean())) < 1e-12 and abs(float(parts[k].std()) - 1) < 1e-12
    assert torch.allclose(parts["score"], parts["importance"] + parts["affinity"] + parts["representative"])
    # importance = Σ_l g[l] · histogram, written out
    imp = [sum(float((prof.importance[l].double() * prof.usage[i, l].double() / prof.usage[i, l].sum()).sum())
               for l in range(L)) for i in range(P)]
    assert torch.allclose(parts["importance"], macs.zscore(torch.tensor(imp)))
    # a sample whose histograms equal the pool means is the most representative
    u_text[3], u_vis[3] = (u_text / u_text.sum(-1, keepdim=True)).mean(0) * 100, \
        (u_vis[1:] / u_vis[1:].sum(-1, keepdim=True)).mean(0) * 100
    assert int(macs.scores(prof)["representative"].argmax()) == 3


def test_calibrate_select_macs_round_trip(tiny_qwen, tmp_path):
    out = str(tmp_path / "calib")
    calibrate.calibrate(tiny_qwen, n=4, seed=0, out=out, gamma=False, command="test", select="macs", pool_factor=3)
    cal = folders.CalibSet.load(out)
    assert cal.selection == "macs" and cal.info["pool"] == 12 and len(cal.indices) == len(set(cal.indices)) == 4
    rep = cal.info["macs"]
    assert set(rep["macs"]) == set(rep["random"]) == {"zero", f"under_{rep['few']}", "min", "imbalance"}
    pool = data_samples.load_samples("shapes", n=12, seed=0, split="train")
    proc = processor.load_processor(tiny_qwen)
    assert all(torch.equal(s["input_ids"], calibrate.encode(proc, pool[i])["input_ids"])
               for s, i in zip(cal.samples, cal.indices))
    # the stats were collected on exactly these samples: routed slots = tokens x top-k
    k = 2
    assert int((cal.n_text + cal.n_vis)[0].sum()) == k * (cal.T_text + cal.T_vis)
