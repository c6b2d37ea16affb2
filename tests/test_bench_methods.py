"""bench/methods.py: its summary statistics on synthetic runs (brute-force means, a known shift from GPTQ
is significant, GPTQ's own copy is not) and one configuration end to end on the bundled tiny Qwen.

    python -m pytest -q tests/test_bench_methods.py
"""

import numpy as np
import pytest

from bench import methods as bench


def synthetic_runs(shift: dict, seeds=(0, 1, 2), n=60):
    rng = np.random.default_rng(0)
    runs, arrays = [], {}
    base = {s: {m: rng.exponential(1e-3, n) for m in bench.METRICS} for s in seeds}
    for label, d in shift.items():
        for s in seeds:
            arrays[len(arrays)] = {m: v + d for m, v in base[s].items()}
            runs.append(dict(index=len(arrays) - 1, section="main", setting="W3A16", label=label, seed=s,
                             args={}, n_calib=32, seconds=1.0, eval_seconds=2.0))
    return runs, arrays


def test_summary_against_brute_force_and_known_shifts():
    runs, arrays = synthetic_runs({"gptq": 0.0, "copy": 0.0, "shifted": 2e-3})
    rows = {r["label"]: r for r in bench.summarize(runs, arrays)}
    gptq_kl = np.stack([arrays[r["index"]]["kl"] for r in runs if r["label"] == "gptq"])
    assert rows["gptq"]["metrics"]["kl"]["mean"] == pytest.approx(gptq_kl.mean())
    assert rows["gptq"]["delta"] == {} and set(rows["copy"]["delta"]) == set(bench.DELTAS["main"])
    same = rows["copy"]["delta"]["kl"]
    assert same["mean"] == 0 and same["ci95"] == [0, 0] and not same["significant"]
    shifted = rows["shifted"]["delta"]["kl"]
    assert shifted["mean"] == pytest.approx(2e-3) and shifted["ci95"] == pytest.approx([2e-3, 2e-3])
    assert shifted["significant"]
    lines = bench.table(list(rows.values()), "main").splitlines()
    assert [("*" in line) for line in lines[2:]] == [False, False, True]


def test_summary_refuses_mismatched_seeds():
    runs, arrays = synthetic_runs({"gptq": 0.0, "other": 0.0})
    runs = [r for r in runs if not (r["label"] == "gptq" and r["seed"] == 2)]
    with pytest.raises(ValueError, match="other W3A16: seeds"):
        bench.summarize(runs, arrays)


@pytest.mark.slow
def test_one_configuration_end_to_end(tmp_path):
    """RTN W4 on two seeds: the second seed reuses the first's run (RTN reads no calibration data). Slow (about
    10 s on an idle machine); calibrate, quantize_model and evaluate have their own fast tests."""
    cfg = [c for c in bench.CONFIGS if c.label == "rtn" and c.setting == "W4A16"]
    res = bench.run_model(bench.os.path.join(bench.ROOT, "models", "tiny-qwen3-vl-moe"), cfg, [0, 1], n_calib=4,
                          n_eval=6, random_tokens=2, work=str(tmp_path))
    assert [r.get("reused", False) for r in res["runs"]] == [False, True]
    row, = bench.summarize(res["runs"], res["arrays"])
    assert row["metrics"]["kl"]["seed_half"] == 0 and row["metrics"]["kl"]["mean"] > 0
    assert row["metrics"]["random_kl"]["mean"] > 0 and res["runs"][0]["generated"] <= 6


def test_summarize_files_merges_settings_in_order(tmp_path):
    """Two result files of one model (written as bench/methods.py writes them) give one compact table, W4 rows
    before W3 whatever the file order, each row's shift from GPTQ marked significant, each command listed."""
    import json

    paths = []
    for setting, d in (("W3A16", 2e-3), ("W4A16", 1e-3)):
        runs, arrays = synthetic_runs({"gptq": 0.0, "rtn": d})
        for r in runs:
            r["setting"] = setting
        path = tmp_path / f"methods-m-{setting}.json"
        path.write_text(json.dumps({"model": "m", "command": f"cmd {setting}", "smoke": False,
                                    "float_accuracy": {"all": 0.5, "image": 0.4, "text": 1.0},
                                    "rows": bench.summarize(runs, arrays)}))
        paths.append(str(path))
    out = bench.summarize_files(paths).splitlines()
    body = [line for line in out if line.startswith("| W")]
    assert [line.split(" | ")[:2] for line in body] == [["| W4A16", "gptq"], ["| W4A16", "rtn"],
                                                       ["| W3A16", "gptq"], ["| W3A16", "rtn"]]
    assert ["*" in line for line in body] == [False, True, False, True]
    assert "`cmd W3A16`" in out and "`cmd W4A16`" in out


def test_pairs_from_saved_files_equal_the_delta_column(tmp_path):
    """--pairs recomputes a paired difference from the saved per-sample arrays: against GPTQ it must print what
    the table's Δ column holds; a row against itself is exactly 0."""
    import json

    runs, arrays = synthetic_runs({"gptq": 0.0, "rtn": 2e-3})
    rows = bench.summarize(runs, arrays)
    path = tmp_path / "methods-m-W3A16.json"
    path.write_text(json.dumps({"model": "m", "runs": runs, "rows": rows}))
    np.savez_compressed(tmp_path / "methods-m-W3A16.npz",
                        **{f"{k}/{m}": v for k, a in arrays.items() for m, v in a.items()})
    out = bench.paired_from_files([str(path)], ["W3A16:rtn:gptq", "W3A16:rtn:rtn"], metrics=("kl",)).splitlines()
    delta = next(r for r in rows if r["label"] == "rtn")["delta"]["kl"]
    assert out[2].endswith("| " + bench.ci_cell(delta, "{:+.1e}", mark=True) + " |")
    assert out[3].endswith("| +0.0e+00 [+0.0e+00, +0.0e+00] |")
