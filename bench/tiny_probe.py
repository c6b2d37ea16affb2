"""Where does a tiny model lose what its vision tower sees? Linear probes on frozen features of a checkpoint:

  * the vision tower's last block output, per patch (the 19 labels of train_tiny.patch_labels: background or
    shape x colour under the patch centre);
  * the image embeddings handed to the decoder (Kimi's projector / Qwen's merger output, RMS-normalized as the
    decoder's first norm sees them), per merged 2x2 token whose 4 patches hold at most one object class.

Each probe is a logistic regression fitted on 2000 train-split samples (Adam, 300 full-batch steps, standardized
features) and scored on 600 held-out ones; "shape" is the share of object patches / tokens whose predicted class
has the right shape. Also checks that the patch labels line up with the pixels (non-grey centre pixel <=> label
> 0), prints the RMS of the text and image embeddings, and how sharp each decoder layer's attention is from the
position that predicts the answer and how much of it lands on the object the answer is read from.

    python bench/tiny_probe.py models/tiny-kimi-vl
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import processor  # noqa: E402
from data import samples as data_samples  # noqa: E402
import model  # noqa: E402
from tools import train_tiny  # noqa: E402


def fmt(t) -> str:
    return "[" + " ".join(f"{v:.2f}" for v in t.tolist()) + "]"


@torch.no_grad()
def attention_report(m, proc, n: int = 200, seed: int = 5):
    """Per decoder layer, per head, averaged over held-out image questions: the largest attention probability
    from the position that predicts the first answer token, the entropy of that row (nats), its mass on image
    tokens, and (over the questions that have one) its mass on the image tokens of the object the answer is read
    from (train_tiny.look_targets), as a share of the image mass; also that share under uniform attention. A
    saturated softmax (max prob near 1, entropy near 0) passes almost no gradient to the logits of the keys it
    ignores."""
    samples = [s for s in data_samples.shapes_benchmark(n, seed=seed, split="test") if s.image is not None]
    b = processor.encode_qa_batch(proc, samples)
    probs = []
    for layer in m.layers:
        layer.self_attn.probs_hook = probs.append
    m(b["input_ids"], attention_mask=b["attention_mask"], **processor.vision_inputs(b))
    for layer in m.layers:
        del layer.self_attn.probs_hook
    rows = torch.arange(len(samples))
    answer_pos, image_pos = train_tiny.answer_and_image_positions(b, proc.image_token_id)
    target = train_tiny.look_targets(samples)
    has = target.any(-1)
    out = []
    for p in probs:
        a = p[rows, :, answer_pos]  # (B, nh, T)
        ent = -(a * a.clamp_min(1e-12).log()).sum(-1)
        img = a.gather(2, image_pos[:, None].expand(-1, a.shape[1], -1))  # (B, nh, 16)
        share = (img * target[:, None]).sum(-1)[has] / img.sum(-1)[has].clamp_min(1e-12)
        out.append((a.max(-1).values.mean(0), ent.mean(0), img.sum(-1).mean(0), share.mean(0)))
    return out, target[has].float().mean().item()


def features(m, proc, family: str, n: int, split: str, seed: int):
    """(tower features (P, D), image embeddings (P/4, H), patch labels (P,), merged labels (P/4, 4))."""
    order = train_tiny.FAMILIES[family]["patch_order"]
    keep = {}
    h1 = m.vision_blocks()[-1].register_forward_hook(lambda mod, i, o: keep.__setitem__("tower", o))
    h2 = train_tiny.image_feature_module(m).register_forward_hook(lambda mod, i, o: keep.__setitem__("emb", o))
    samples = [s for s in data_samples.shapes_benchmark(n, seed=seed, split=split) if s.image is not None]
    T, E, L, ML, aligned = [], [], [], [], []
    for i in range(0, len(samples), 100):
        chunk = samples[i:i + 100]
        b = processor.encode_qa_batch(proc, chunk)
        with torch.no_grad():
            m(b["input_ids"], attention_mask=b["attention_mask"], **processor.vision_inputs(b))
        labels = train_tiny.patch_labels(chunk, order)
        T.append(keep["tower"].float()), E.append(keep["emb"].float()), L.append(labels)
        ML.append(train_tiny.merged_labels(chunk))
        pv = processor.vision_inputs(b)["pixel_values"].float()
        centre = pv[:, :, 4, 4] if family == "kimi_vl" else pv.view(pv.shape[0], 3, 2, 8, 8)[:, :, 0, 4, 4]
        aligned.append(((centre.abs() > 0.02).any(-1) == (labels > 0)).float())  # grey is 0 after normalization
    h1.remove(), h2.remove()
    return torch.cat(T), torch.cat(E), torch.cat(L), torch.cat(ML), torch.cat(aligned).mean().item()


def probe(X, y, Xt, yt, n_classes: int) -> dict:
    mu, sd = X.mean(0), X.std(0) + 1e-6
    X, Xt = (X - mu) / sd, (Xt - mu) / sd
    lin = nn.Linear(X.shape[1], n_classes)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(lin(X), y).backward()
        opt.step()
    with torch.no_grad():
        pred = lin(Xt).argmax(-1)
    obj, C = yt > 0, len(data_samples.COLORS)
    return {"all": (pred == yt).float().mean().item(),
            "shape": ((pred > 0) & ((pred - 1) // C == (yt - 1) // C))[obj].float().mean().item(),
            "colour": ((pred > 0) & ((pred - 1) % C == (yt - 1) % C))[obj].float().mean().item()}


def single_class(ML):
    """Merged tokens whose 4 patches hold at most one object class, with that class (0 if none)."""
    ok = torch.tensor([len(r[r > 0].unique()) <= 1 for r in ML])
    return ok, ML.max(-1).values


def gradient_norms(m, proc, n: int = 64, seed: int = 3) -> dict:
    """Norm of the answer loss's gradient per part (vision tower, projector / merger, decoder) on one training
    batch of image questions: how much of the answer signal reaches the parts that must learn to pass shape on."""
    samples = [s for s in data_samples.shapes_benchmark(4 * n, seed=seed, split="train") if s.image is not None][:n]
    b = processor.encode_qa_batch(proc, samples)
    m.requires_grad_(True).zero_grad(set_to_none=True)
    with torch.enable_grad():
        train_tiny.answer_loss(m(b["input_ids"], attention_mask=b["attention_mask"], **processor.vision_inputs(b)),
                               b["labels"]).backward()
    proj = train_tiny.image_feature_module(m)
    parts = {"tower": [p for mod in m.vision_blocks() for p in mod.parameters()],
             "projector": list(proj.parameters()), "decoder": [p for mod in m.layers for p in mod.parameters()]}
    out = {k: torch.sqrt(sum(p.grad.float().pow(2).sum() for p in v if p.grad is not None)).item()
           for k, v in parts.items()}
    m.zero_grad(set_to_none=True)
    return out


def main(path: str):
    torch.manual_seed(0)
    t0 = time.time()
    m = model.load_model(path).float().eval()
    proc = processor.load_processor(path)
    family = m.family
    n_classes = 1 + len(data_samples.SHAPES) * len(data_samples.COLORS)
    Tt, Et, Lt, MLt, a1 = features(m, proc, family, 2000, "train", 7)
    Tv, Ev, Lv, MLv, a2 = features(m, proc, family, 600, "test", 0)
    print(f"{path}: patch labels line up with the pixels on {100 * min(a1, a2):.1f}% of patches")
    r = probe(Tt, Lt, Tv, Lv, n_classes)
    print(f"  tower last block, per patch:        all {r['all']:.3f}  object shape {r['shape']:.3f}  "
          f"object colour {r['colour']:.3f}")
    norm = lambda e: e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    okt, yt = single_class(MLt)
    okv, yv = single_class(MLv)
    r = probe(norm(Et)[okt], yt[okt], norm(Ev)[okv], yv[okv], n_classes)
    print(f"  image embeddings, per merged token: all {r['all']:.3f}  object shape {r['shape']:.3f}  "
          f"object colour {r['colour']:.3f}")
    emb = (m.language_model.model.embed_tokens.weight if family == "kimi_vl"
           else m.model.language_model.embed_tokens.weight)
    print(f"  RMS: text embeddings {emb.float().pow(2).mean().sqrt():.4f}, image embeddings "
          f"{Ev.pow(2).mean().sqrt():.4f}")
    layers, uniform = attention_report(m, proc)
    print(f"  attention (looked-at object share under uniform attention over the image: {uniform:.2f}):")
    for i, (top, ent, image, share) in enumerate(layers):
        print(f"    decoder layer {i}, from the answer position, per head: max prob {fmt(top)}  entropy {fmt(ent)} nats"
              f"  image mass {fmt(image)}  on the looked-at object {fmt(share)}")
    g = gradient_norms(m, proc)
    print("  answer-loss gradient norm: " + ", ".join(f"{k} {v:.2e}" for k, v in g.items()) +
          f"  ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for p in sys.argv[1:] or ["models/tiny-kimi-vl"]:
        main(p)
