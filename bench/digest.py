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


def _replace(obj, old: str, new: str):
    if isinstance(obj, dict):
        return {k: _replace(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace(v, old, new) for v in obj]
    return obj.replace(old, new) if isinstance(obj, str) else obj


def json_diff(a, b) -> str:
    """The top-level keys of two JSON documents that differ: old-only, new-only, and changed values."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return f"\n  old {a}\n  new {b}"
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    return f"\n  keys only in old {only_a}; only in new {only_b}; changed {changed}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", action="store_true", help="compare two digest files")
    p.add_argument("--roots", nargs=2, metavar=("OLD", "NEW"), default=None,
                   help="with --compare: the two runs' output folders, replaced by one name in the JSON files' "
                        "strings (a path to calib/ or the output differs between the runs, not their results)")
    p.add_argument("paths", nargs="+")
    a = p.parse_args()
    if a.compare:
        old, new = (json.load(open(x)) for x in a.paths[:2])
        if a.roots:  # JSON files compared by content, their paths under the two roots made equal
            for d, root in ((old, a.roots[0]), (new, a.roots[1])):
                for run in d.values():
                    for k in [k for k in run if k.endswith("#doc")]:
                        run[k] = _replace(run[k], root.rstrip("/"), "$OUT")
                        run[k[:-4]] = hashlib.sha256(json.dumps(run[k], sort_keys=True).encode()).hexdigest()
        n_tensors = n_json = 0
        bad, added = [], []
        for run in sorted(set(old) | set(new)):
            o, n = old.get(run), new.get(run)
            if o is None or n is None:
                bad.append(f"{run}: only in {'new' if o is None else 'old'}")
                continue
            for k in sorted(set(o) | set(n)):
                if k.endswith("#doc"):
                    continue
                if k not in o:  # a file or tensor the new version writes in addition: listed, not a difference
                    added.append(f"{run}: {k}")
                elif o.get(k) != n.get(k):
                    bad.append(f"{run}: {k} differs" + (json_diff(o.get(k + "#doc"), n.get(k + "#doc"))
                                                        if k + "#doc" in o else ""))
                elif "::" in k:
                    n_tensors += 1
                else:
                    n_json += 1
        print(f"{len(set(old) & set(new))} runs, {n_tensors} tensors and {n_json} JSON files equal; "
              f"{len(bad)} differences; {len(added)} tensors or files only in the new version "
              f"({', '.join(sorted({a.split(': ', 1)[1].split('::')[0] for a in added})) or 'none'})")
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
