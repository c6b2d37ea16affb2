"""Routing statistics of calibration sets written by calibrate.py: tokens per expert by modality, how strongly
experts specialize by modality, and how many experts receive fewer than 2 x input-width tokens (too few for a
full-rank GPTQ Hessian of the gate/up projections, whose input width is the hidden size).

    python calibrate.py --model models/tiny-qwen3-vl-moe-64e --n 32 --out calib-64e-n32 --no-gamma
    python bench/routing_stats.py calib-64e-n32 [calib-64e-n128 ...] [--per-expert]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import calibrate  # noqa: E402


def hidden_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["text_config"]["hidden_size"]


def report(calib_dir: str, per_expert: bool = False) -> dict:
    c = calibrate.load(calib_dir)
    H = hidden_size(c["model"])
    n_text, n_vis = c["n_text"], c["n_vis"]  # (moe layers, E) top-k slots per modality
    L, E = n_text.shape
    tot = n_text + n_vis
    share_vis = c["T_vis"] / max(1, c["T_vis"] + c["T_text"])  # image share of all tokens
    print(f"{calib_dir}: model {c['model']}, {c['n']} samples ({c['selection']}), {c['T_text']} text + "
          f"{c['T_vis']} image tokens, {E} experts x {L} MoE layers, input width {H} (threshold {2 * H} tokens)")
    print("layer  image-tok/expert min/med/max  text-tok/expert min/med/max  image-mostly  text-mostly  "
          f"zero  <{2 * H}  <{2 * H} image  <{2 * H} text")
    out = []
    for j, layer in enumerate(c["moe_layers"]):
        v, t, a = n_vis[j], n_text[j], tot[j]
        frac_vis = v / a.clamp(min=1)
        # an expert is image-mostly when >= 90% of its tokens are image tokens, text-mostly when <= 10% are
        img_mostly, txt_mostly = int(((frac_vis >= 0.9) & (a > 0)).sum()), int(((frac_vis <= 0.1) & (a > 0)).sum())
        row = dict(layer=layer, zero=int((a == 0).sum()), few=int((a < 2 * H).sum()),
                   few_vis=int((v < 2 * H).sum()), few_text=int((t < 2 * H).sum()),
                   image_mostly=img_mostly, text_mostly=txt_mostly)
        out.append(row)
        print(f"{layer:5d}  {int(v.min()):7d} {int(v.median()):6d} {int(v.max()):6d}        "
              f"{int(t.min()):7d} {int(t.median()):6d} {int(t.max()):6d}      {img_mostly:8d}  {txt_mostly:10d}  "
              f"{row['zero']:4d}  {row['few']:5d}  {row['few_vis']:11d}  {row['few_text']:10d}")
        if per_expert:
            print("       tokens per expert (image/text): " +
                  " ".join(f"{e}:{int(v[e])}/{int(t[e])}" for e in range(E)))
    few = sum(r["few"] for r in out)
    print(f"all layers: {few} of {L * E} experts get fewer than {2 * H} tokens; image tokens are "
          f"{100 * share_vis:.1f}% of all tokens")
    return {"calib": calib_dir, "layers": out, "few_total": few, "experts_total": L * E}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("calib", nargs="+", help="calib/ folders written by calibrate.py")
    p.add_argument("--per-expert", action="store_true", help="also print every expert's image/text token count")
    args = p.parse_args(argv)
    for d in args.calib:
        report(d, args.per_expert)
        print()


if __name__ == "__main__":
    main()
