"""Output folders. Every folder this project writes (calib/, quantized/, its .partial/ and fake-quant/) is built
under a temporary name, gets a marker file saying what it is, and is then renamed into place. An existing
folder is replaced only if it is empty or carries the marker of the same kind (a previous output of the same
command); anything else (the float model, `.`, a user's folder) is refused unless the user passes
--overwrite. Input folders (the model, the calibration set) are never written into or replaced, even then.
Used by calibrate.py, gptq.py (export.py, layerwise.py) and train_tiny.py; tests/test_output_folders.py.
"""

from __future__ import annotations

import json
import os
import sys


OUTPUT_MARKER = ".moe-vlm-quant.json"


class OutputError(ValueError):
    """An output folder that may not be written; the message says which flag or folder to change."""


def output_kind(folder: str) -> str | None:
    """The kind written in `folder`'s marker ("calib", "quantized", "partial", "fake-quant"), or None."""
    path = os.path.join(folder, OUTPUT_MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f).get("kind")
    except (json.JSONDecodeError, AttributeError, OSError) as e:
        raise OutputError(f"{path}: unreadable output marker ({e}); remove the folder by hand") from e


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (both resolved, symlinks followed)."""
    return os.path.commonpath([path, folder]) == folder


def check_output_dir(out: str, kind: str, inputs=(), overwrite: bool = False, flag: str = "--out",
                     container=None):
    """Refuse an output folder that writing `kind` there could destroy; returns its resolved path.

    Always refused: a folder that is or contains the working directory, or that is, contains or lies inside
    one of `inputs` (the model folder, calib/), or that is or contains `container` (an input the output may
    live in, as OUT/fake-quant lives in the quantized folder it is exported from). Refused without
    `overwrite`: an existing non-empty folder whose marker is not `kind`, and an existing file."""
    real = os.path.realpath(out)
    for src in inputs:
        src_real = os.path.realpath(src)
        if _inside(real, src_real) or _inside(src_real, real):
            raise OutputError(f"{flag} {out}: would write into or replace the input folder {src}; "
                              f"choose an output folder outside it")
    if container is not None and _inside(os.path.realpath(container), real):
        raise OutputError(f"{flag} {out}: would replace the folder {container} it reads; choose a folder inside "
                          "it or elsewhere")
    if _inside(os.getcwd(), real):
        raise OutputError(f"{flag} {out}: is the working directory or one of its parents; choose a new folder")
    if os.path.isfile(real):
        raise OutputError(f"{flag} {out}: is a file; choose a folder name")
    found = output_kind(real) if os.path.isdir(real) else None
    if os.path.isdir(real) and os.listdir(real) and found != kind and not overwrite:
        what = f"a {found} folder of this tool" if found else "not written by this tool"
        raise OutputError(f"{flag} {out}: exists and is {what} (no {OUTPUT_MARKER} of kind {kind!r}); "
                          f"choose another folder, or pass --overwrite to replace it")
    return real


def make_output_dir(folder: str, kind: str, command: str | None = None, exist_ok: bool = False):
    """Create `folder` (new unless exist_ok) and write its marker."""
    os.makedirs(folder, exist_ok=exist_ok)
    with open(os.path.join(folder, OUTPUT_MARKER), "w") as f:
        json.dump({"kind": kind, "tool": "moe-vlm-quant", "command": command or " ".join(sys.argv)}, f)


def temporary_output_dir(out: str, kind: str) -> str:
    """A new, uniquely named, hidden sibling of `out` with its marker, to be published with
    `publish_output_dir`."""
    import tempfile

    parent = os.path.dirname(os.path.realpath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.realpath(out))}.tmp-", dir=parent)
    make_output_dir(tmp, kind, exist_ok=True)
    return tmp


def publish_output_dir(tmp: str, out: str, kind: str, inputs=(), overwrite: bool = False, flag: str = "--out",
                       container=None):
    """Rename the finished `tmp` to `out`. The checks of `check_output_dir` are repeated (the folder may have
    appeared while we worked); an old `out` is first renamed aside, so a failure leaves either the old folder
    or the new one in place, never neither."""
    import shutil

    real = check_output_dir(out, kind, inputs, overwrite, flag, container)
    if os.path.isdir(real):
        old = tmp + ".old"
        os.rename(real, old)
        os.rename(tmp, real)
        shutil.rmtree(old)
    else:
        os.rename(tmp, real)
