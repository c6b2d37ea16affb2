"""eval.py's statistics (bootstrap, paired differences, the seeds x samples interval, Student's t) against
brute-force oracles, and its fast greedy answers against generating every answer.

    python -m pytest -q tests/test_stats.py
"""

import itertools
import os

import pytest
import torch

from data import processor
from data import samples as data_samples
import model
import eval as evaluation
from bench import stats

QWEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "tiny-qwen3-vl-moe")


def test_bootstrap_ci_against_the_exact_bootstrap_distribution():
    """n = 5 values: all 5^5 equally likely resamples enumerated; the Monte Carlo percentile interval must sit
    at the exact distribution's 2.5% and 97.5% points (up to Monte Carlo error and the atoms' mass)."""
    v = torch.tensor([0.0, 1.0, 3.0, 7.0, 15.0])
    exact = torch.tensor([sum(r) / 5 for r in itertools.product(v.tolist(), repeat=5)])
    lo, hi = evaluation.bootstrap_ci(v, n_boot=40000, seed=0)
    assert (exact < lo).double().mean() <= 0.035 and (exact <= lo).double().mean() >= 0.015
    assert (exact > hi).double().mean() <= 0.035 and (exact >= hi).double().mean() >= 0.015
    assert evaluation.bootstrap_ci(v, seed=3) == evaluation.bootstrap_ci(v, seed=3)  # fixed seed: same interval
    assert evaluation.bootstrap_ci([1.0]) is None


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    a = torch.rand(50, generator=torch.Generator().manual_seed(0)) ** 4
    d = evaluation.paired_difference(a, a)
    assert d["mean"] == 0 and d["ci95"] == [0, 0] and not d["significant"] and d["median"] == 0


def test_paired_difference_recovers_a_known_shift():
    g = torch.Generator().manual_seed(1)
    b = torch.rand(200, generator=g)
    d = evaluation.paired_difference(b + 0.25, b)  # every sample shifted by 0.25: zero-width interval at 0.25
    assert d["mean"] == pytest.approx(0.25) and d["ci95"] == pytest.approx([0.25, 0.25]) and d["significant"]
    noise = torch.randn(2000, generator=g, dtype=torch.float64)  # shift 0.1 plus N(0, 1) noise: the normal CI
    d = evaluation.paired_difference(b.double().repeat(10) + 0.1 + noise, b.double().repeat(10))
    half = 1.96 * noise.std().item() / 2000 ** 0.5
    assert d["ci95"] == pytest.approx([d["mean"] - half, d["mean"] + half], abs=0.1 * half)
    assert d["significant"] and abs(d["mean"] - 0.1) < 3 * half


@pytest.mark.parametrize("df, t", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423),
                                   (1000, 1.9623)])
def test_t_quantile_against_tables(df, t):
    assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=2e-4)


def test_seeds_samples_interval_reduces_to_each_component():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(300, generator=g, dtype=torch.float64) ** 3
    same = stats.seeds_samples_interval(x.repeat(5, 1))  # no seed variance: the eval-sample bootstrap
    assert same["seed_half"] < 1e-15 and same["ci95"] == pytest.approx(evaluation.bootstrap_ci(x))
    c = torch.tensor([0.1, 0.4, 0.2, 0.3, 0.5], dtype=torch.float64)  # no sample variance: the t-interval
    only_seeds = stats.seeds_samples_interval(c[:, None].repeat(1, 40))
    half = 2.7764451 * c.std().item() / 5 ** 0.5
    assert only_seeds["ci95"] == pytest.approx([0.3 - half, 0.3 + half], rel=1e-5)
    one_seed = stats.seeds_samples_interval(x[None])
    assert one_seed["seed_half"] is None and one_seed["ci95"] == pytest.approx(evaluation.bootstrap_ci(x))


def test_seeds_samples_interval_covers_the_true_mean():
    """Simulated crossed designs x_si = μ + a_s + b_i + e_si (5 seeds, 60 samples, skewed b_i): the interval
    covers μ (+ E b) in at least 93% of 300 draws (nominal 95%, built to err on the wide side)."""
    g = torch.Generator().manual_seed(3)
    hits = 0
    for _ in range(300):
        a = 0.3 * torch.randn(5, 1, generator=g, dtype=torch.float64)
        b = torch.empty(1, 60, dtype=torch.float64).exponential_(1.0, generator=g)  # E b = 1
        e = 0.5 * torch.randn(5, 60, generator=g, dtype=torch.float64)
        lo, hi = stats.seeds_samples_interval(2.0 + a + b + e, n_boot=400)["ci95"]
        hits += lo <= 3.0 <= hi
    assert hits >= 0.93 * 300


def test_intervals_per_modality_are_bootstraps_of_that_modality():
    per = {"modality": ["image", "text", "image", "image", "text"], "kl": [0.1, 0.0, 0.3, 0.2, 0.05],
           "random_kl": [1.0, 2.0, 4.0]}
    ci = evaluation.intervals(per)
    assert ci["kl"]["image"] == evaluation.bootstrap_ci([0.1, 0.3, 0.2])
    assert ci["kl"]["text"] == evaluation.bootstrap_ci([0.0, 0.05]) and list(ci["random_kl"]) == ["all"]


def test_random_tokens_are_plain_vocabulary():
    proc = processor.load_processor(QWEN)
    ids = evaluation.random_token_ids(proc, 64, 32, seed=0)
    special = set(proc.tokenizer.tok.get_added_tokens_decoder())
    assert ids.shape == (64, 32) and not set(ids.flatten().tolist()) & special
    assert len(set(ids.flatten().tolist())) > 400  # uniform over the 498 plain ids: nearly all drawn
    assert torch.equal(ids, evaluation.random_token_ids(proc, 64, 32, seed=0))


@pytest.mark.parametrize("reuse_gold", [False, True])
def test_fast_answers_equal_generated_answers(reuse_gold):
    """answers_via_reference on a perturbed model equals generating every answer; most samples are skipped
    (also when the forward on the gold answers serves the samples whose reference answer is the gold one)."""
    proc = processor.load_processor(QWEN)
    samples = data_samples.load_samples("shapes", n=32, seed=5)
    ref_m = model.load_model(QWEN)
    ids = evaluation.greedy_ids(ref_m, proc, samples, 8)
    ref = evaluation.Reference([proc.tokenizer.decode(i) for i in ids], ids, [])
    m = model.load_model(QWEN)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.add_(p.std() * torch.randn(p.shape, generator=g))
    golds = evaluation.gold_ids(proc, samples)
    gold = (golds, evaluation.answer_logprobs(m, proc, samples)) if reuse_gold else None
    fast, generated = evaluation.answers_via_reference(m, proc, samples, ref, 8, gold=gold)
    slow = evaluation.greedy_answers(m, proc, samples, 8)
    assert fast == slow
    assert 0 < sum(a != b for a, b in zip(slow, ref.answers)) and generated < len(samples) // 2


def test_compare_cli_model_with_itself(tmp_path):
    """--compare: a model against itself differs by exactly 0 on every metric, with a zero-width interval."""
    out = evaluation.main(["--model", QWEN, "--compare", QWEN, "--reference", QWEN, "--n", "8", "--max-new-tokens",
                           "4", "--random-tokens", "4", "--random-length", "8", "--fast-flips",
                           "--json", str(tmp_path / "c.json")])
    assert set(out["difference"]) == {"kl", "top1", "flips", "accuracy", "ce_delta", "random_kl"}
    for metric in out["difference"].values():
        for d in metric.values():
            assert d["mean"] == 0 and d["ci95"] == ([0, 0] if d["n"] > 1 else None) and not d["significant"]
    assert out["a"]["ci95"]["kl"]["all"] == [0, 0] and out["a"]["generated"] == 0
    assert (tmp_path / "c.json").exists()


@pytest.mark.parametrize("name", ["tiny-qwen3-vl-moe", "tiny-kimi-vl"])
def test_vision_cache_gives_the_same_logits(name):
    """Logits through a VisionCache equal the uncached ones bitwise, on a miss and on a hit; a model whose
    vision tower differs misses instead of reading the first model's features."""
    path = os.path.join(os.path.dirname(QWEN), name)
    proc = processor.load_processor(path)
    b = processor.encode_qa_batch(proc, [s for s in data_samples.load_samples("shapes", n=12, seed=1) if s.image is not None])
    args = dict(attention_mask=b["attention_mask"], **processor.vision_inputs(b))
    m = model.load_model(path)
    with torch.no_grad():
        plain = m(b["input_ids"], **args)
        cache = evaluation.VisionCache()
        with cache.on(m):
            miss, hit = m(b["input_ids"], **args), m(b["input_ids"], **args)
        assert torch.equal(plain, miss) and torch.equal(plain, hit) and cache.hits > 0
        assert "forward" not in vars(m.vision_modules()[0])  # the class's forward is back
        other = model.load_model(path)
        next(other.vision_modules()[0].parameters()).mul_(1.5)
        other_plain, misses = other(b["input_ids"], **args), cache.misses
        with cache.on(other):
            assert torch.equal(other(b["input_ids"], **args), other_plain)
        assert cache.misses > misses and not torch.equal(other_plain, plain)
