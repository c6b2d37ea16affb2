"""Digest every tensor and the report of output folders, to prove a refactor changed no output bitwise.

    python bench/digest.py DIGESTS.json FOLDER...      write one digest per folder (calib/ or quantized/)
    python bench/digest.py --compare OLD.json NEW.json  compare two digest files; exit 1 on any difference

A folder's digest: sha256 of every tensor (name, dtype, shape, bytes) of every *.safetensors in it and below,
and of its JSON files with wall-clock and path fields dropped (`seconds`, `command`, timings), so two runs of
the same computation at different times digest equally. Imports safetensors and json only: it reads the outputs
of any version of the project.
"""

import argparse
import hashlib
import json
import os
import sys

from safetensors import safe_open

VOLATILE = {"seconds", "command", "elapsed", "time", "wall_s", "created"}  # fields that differ between equal runs


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def folder_digest(folder: str) -> dict:
    """{relative path or path::tensor: sha256} for every tensor and JSON file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if name.endswith(".safetensors"):
                with safe_open(path, framework="pt") as f:
                    for k in f.keys():
                        t = f.get_tensor(k).contiguous()
                        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
                        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
                        out[f"{rel}::{k}"] = h.hexdigest()
            elif name.endswith(".json") and not name.startswith(".moe-vlm-quant"):
                with open(path) as f:
                    doc = _strip(json.load(f))
                out[rel] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
                out[rel + "#doc"] = doc
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", action="store_true", help="compare two digest files")
    p.add_argument("paths", nargs="+")
    a = p.parse_args()
    if a.compare:
        old, new = (json.load(open(x)) for x in a.paths[:2])
        n_tensors = n_json = 0
        bad = []
        for run in sorted(set(old) | set(new)):
            o, n = old.get(run), new.get(run)
            if o is None or n is None:
                bad.append(f"{run}: only in {'new' if o is None else 'old'}")
                continue
            for k in sorted(set(o) | set(n)):
                if k.endswith("#doc"):
                    continue
                if o.get(k) != n.get(k):
                    bad.append(f"{run}: {k} differs" + (f"\n  old {o.get(k + '#doc')}\n  new {n.get(k + '#doc')}"
                                                        if k + "#doc" in o or k + "#doc" in n else ""))
                elif "::" in k:
                    n_tensors += 1
                else:
                    n_json += 1
        print(f"{len(set(old) & set(new))} runs, {n_tensors} tensors and {n_json} JSON files equal; "
              f"{len(bad)} differences")
        for b in bad[:50]:
            print(b[:3000])
        sys.exit(1 if bad else 0)
    out = {}
    for folder in a.paths[1:]:
        out[os.path.basename(os.path.normpath(folder))] = folder_digest(folder)
    with open(a.paths[0], "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    print(f"{a.paths[0]}: {len(out)} folders, {sum(len([k for k in d if '::' in k]) for d in out.values())} tensors")


if __name__ == "__main__":
    main()
