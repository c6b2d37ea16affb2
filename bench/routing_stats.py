"""Routing statistics of calibration sets written by calibrate.py: tokens per expert by modality, how strongly
experts specialize by modality, and how many experts receive fewer than 2 x input-width tokens (too few for a
full-rank GPTQ Hessian of the gate/up projections, whose input width is the hidden size).

    python calibrate.py --model models/tiny-qwen3-vl-moe-64e --n 32 --out calib-64e-n32 --no-gamma
    python bench/routing_stats.py calib-64e-n32 [calib-64e-n128 ...] [--per-expert]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quant import folders  # noqa: E402
import torch  # noqa: E402


def hidden_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["text_config"]["hidden_size"]


def modality_information(n_vis, n_text) -> tuple[float, float, float]:
    """How much knowing the expert tells about the token's modality, over one layer's top-k slots.

    With n[e, m] the slots of modality m routed to expert e and N = sum n, the plug-in mutual information
    I(E; M) = sum_{e,m} n[e,m]/N * log2(n[e,m] N / (n[e,.] n[.,m])) in bits, its share of H(M) (0: routing
    ignores modality, 1: every expert sees one modality only), and the value I would take on average from
    routing that ignores modality, given the counts (approximately: the plug-in bias (E' - 1)(2 - 1) / (2 N ln 2), E' the experts
    that got a slot): a specialization is visible only well above it.
    """
    n = torch.stack([torch.as_tensor(n_vis), torch.as_tensor(n_text)], 1).double()  # (E, 2)
    N = float(n.sum())
    if N == 0:
        return 0.0, 0.0, 0.0
    pe, pm = n.sum(1, keepdim=True) / N, n.sum(0, keepdim=True) / N
    p = n / N
    nz = p > 0
    mi = float((p[nz] * torch.log2(p[nz] / (pe * pm).expand_as(p)[nz])).sum())
    hm = float(-(pm[pm > 0] * torch.log2(pm[pm > 0])).sum())
    bias = (int((n.sum(1) > 0).sum()) - 1) / (2 * N * math.log(2))
    return mi, (mi / hm if hm > 0 else 0.0), bias


def report(calib_dir: str, per_expert: bool = False) -> dict:
    c = folders.CalibSet.load(calib_dir)
    H = hidden_size(c.model)
    n_text, n_vis = c.n_text, c.n_vis  # (moe layers, E) top-k slots per modality
    L, E = n_text.shape
    tot = n_text + n_vis
    share_vis = c.T_vis / max(1, c.T_vis + c.T_text)  # image share of all tokens
    print(f"{calib_dir}: model {c.model}, {len(c.samples)} samples ({c.selection}), {c.T_text} text + "
          f"{c.T_vis} image tokens, {E} experts x {L} MoE layers, input width {H} (threshold {2 * H} tokens)")
    print("layer  image-tok/expert min/med/max  text-tok/expert min/med/max  image-mostly  text-mostly  "
          f"zero  <{2 * H}  <{2 * H} image  <{2 * H} text  I(E;M) bits [share of H(M); null]")
    out = []
    for j, layer in enumerate(c.moe_layers):
        v, t, a = n_vis[j], n_text[j], tot[j]
        frac_vis = v / a.clamp(min=1)
        # an expert is image-mostly when >= 90% of its tokens are image tokens, text-mostly when <= 10% are
        img_mostly, txt_mostly = int(((frac_vis >= 0.9) & (a > 0)).sum()), int(((frac_vis <= 0.1) & (a > 0)).sum())
        mi, mi_share, mi_null = modality_information(v, t)
        row = dict(layer=layer, zero=int((a == 0).sum()), few=int((a < 2 * H).sum()),
                   few_vis=int((v < 2 * H).sum()), few_text=int((t < 2 * H).sum()),
                   image_mostly=img_mostly, text_mostly=txt_mostly, mi_bits=mi, mi_share=mi_share, mi_null=mi_null)
        out.append(row)
        print(f"{layer:5d}  {int(v.min()):7d} {int(v.median()):6d} {int(v.max()):6d}        "
              f"{int(t.min()):7d} {int(t.median()):6d} {int(t.max()):6d}      {img_mostly:8d}  {txt_mostly:10d}  "
              f"{row['zero']:4d}  {row['few']:5d}  {row['few_vis']:11d}  {row['few_text']:10d}  "
              f"{mi:.3f} [{mi_share:.2f}; {mi_null:.3f}]")
        if per_expert:
            print("       tokens per expert (image/text): " +
                  " ".join(f"{e}:{int(v[e])}/{int(t[e])}" for e in range(E)))
    few = sum(r["few"] for r in out)
    print(f"all layers: {few} of {L * E} experts get fewer than {2 * H} tokens; image tokens are "
          f"{100 * share_vis:.1f}% of all tokens")
    return {"calib": calib_dir, "layers": out, "few_total": few, "experts_total": L * E}


def coverage(calib_dir: str, least: int = 8) -> dict:
    """One line per calibration set, to compare selections (random vs MACS): experts with no tokens and with fewer
    than 2 x input width, summed over the MoE layers; the imbalance std/mean of the experts' slot counts and the
    slots of the `least` least-fed experts, averaged over the layers; the set's image and text tokens."""
    c = folders.CalibSet.load(calib_dir)
    tot = (c.n_text + c.n_vis).double()  # (moe layers, E) top-k slots
    H = hidden_size(c.model)
    return dict(calib=calib_dir, selection=c.selection, zero=int((tot == 0).sum()), few=int((tot < 2 * H).sum()),
                imbalance=float((tot.std(1) / tot.mean(1)).mean()),
                least_fed=float(tot.sort(1).values[:, :least].sum(1).mean()), image=c.T_vis, text=c.T_text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("calib", nargs="+", help="calib/ folders written by calibrate.py")
    p.add_argument("--per-expert", action="store_true", help="also print every expert's image/text token count")
    p.add_argument("--coverage", action="store_true", help="one line per calibration set instead (to compare "
                   "selections): zero-token and < 2x-width experts, imbalance, slots of the 8 least-fed experts")
    args = p.parse_args(argv)
    if args.coverage:
        print("| calib | selection | image + text tokens | experts with 0 tokens | < 2 x width | imbalance (std/mean) "
              "| slots of the 8 least-fed experts per layer |\n|---|---|---|---|---|---|---|")
        for d in args.calib:
            r = coverage(d)
            print(f"| {d} | {r['selection']} | {r['image']} + {r['text']} | {r['zero']} | {r['few']} | "
                  f"{r['imbalance']:.2f} | {r['least_fed']:.1f} |")
        return
    for d in args.calib:
        report(d, args.per_expert)
        print()


if __name__ == "__main__":
    main()
