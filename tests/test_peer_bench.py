"""bench/peer.py's handling of a peer interpreter that lacks the peer: a skipped row naming the flag, not a crash
and not a silently missing row (no peer toolkit needed: this interpreter has none of them)."""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import peer  # noqa: E402


def test_missing_peer_is_reported_as_skipped(tmp_path):
    a = argparse.Namespace(peers="gptqmodel,autoround", llmc_python=sys.executable, gptqmodel_python=sys.executable,
                           autoround_python=sys.executable, autoround_iters=200, no_gptqmodel_variant=False,
                           model=os.path.join(ROOT, "models", "tiny-qwen3-vl-moe"), group_size=32, threads=1,
                           repeats=1)
    jobs = peer.peer_jobs(a)
    assert [j["key"] for j in jobs] == ["gptqmodel", "gptqmodel-d01-act", "autoround"]
    res = peer.run_peer(jobs[2], a, str(tmp_path / "calib"), 4, str(tmp_path / "out"))
    assert res["status"] == "skipped"
    assert "auto-round" in res["why"] and "--autoround-python" in res["why"]
