"""Everything this project reads and writes on disk, each folder safe and declared:

  * output folders (calib/, quantized/, its .partial/ and fake-quant/) are built under a temporary name, get a
    marker file saying what they are, and are renamed into place. An existing folder is replaced only if it is
    empty or carries the marker of the same kind (a previous output of the same command); anything else (the
    float model, `.`, a user's folder) is refused unless the user passes --overwrite. Input folders (the model,
    the calibration set) are never written into or replaced, even then (check_output_dir, publish_output_dir);
  * calib/ (CalibSet): the encoded calibration samples and the routing and gradient statistics, with a declared
    schema, written by calibrate.py and read by gptq.py;
  * OUT.partial/ (Partial): one safetensors file per finished decoder layer, what --resume continues from;
  * OUT/ (write_output): the packed weights in compressed-tensors `pack-quantized` naming, one shard per decoder
    layer, its `quantization_config` (quantization_config, ignored_modules: what stays float, by exact checkpoint
    name, as vLLM and llm-compressor read it), and report.json; OUT/fake-quant/ (export_fake_quant): the
    dequantized weights in the original float layout.
This is the last file of the reader's path (README "Reading order"). Tests: tests/test_output_folders.py,
tests/test_calibrate.py, tests/test_vllm_format.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import json
import os
import shutil
import sys
import tempfile
import time

from safetensors import safe_open
from safetensors.torch import load_file, save_file
import torch
import torch.nn as nn

from arch.blocks import layer_structure
from arch.checkpoint import checkpoint_state_dict
import model as model_lib
from quant import distributed
from quant.grid import QuantLinear


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
    real = check_output_dir(out, kind, inputs, overwrite, flag, container)
    if os.path.isdir(real):
        old = tmp + ".old"
        os.rename(real, old)
        os.rename(tmp, real)
        shutil.rmtree(old)
    else:
        os.rename(tmp, real)


# ----------------------------------------------------------------------------------------------------------
# The quantized output


def quantization_config(args: dict, solver: str, ignore: list[str]) -> dict:
    """compressed-tensors `pack-quantized` description of what was done (vLLM / llm-compressor read it); args: the
    run's settings (gptq.Settings.args()), solver: "gptq" or "rtn"."""
    bits, sym, group_size, abits = args["bits"], args["sym"], args["group_size"], args["abits"]
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False, "observer": "minmax",
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size,
               "actorder": "static" if args["act_order"] and solver == "gptq" else None}
    acts = None if abits >= 16 else {"num_bits": abits, "type": "int", "symmetric": True, "dynamic": True,
                                      "strategy": "token"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ignore, "moe_vlm_quant": args}


def ignored_modules(m) -> list[str]:
    """Module names that stay float: every nn.Linear outside the decoder layers, and the routers, each by its
    exact checkpoint name (as llm-compressor writes them). Exact dotted names, not `re:` patterns: vLLM renames
    exact entries with the model's checkpoint-to-vLLM prefix map before matching them against its own module
    names, but leaves `re:` entries as they are (compressed_tensors.py, CompressedTensorsConfig.apply_vllm_mapper),
    so a regex over checkpoint names misses e.g. Qwen3-VL's `language_model.model.layers.N.mlp.gate`; and vLLM's
    Qwen3-MoE router is a GateLinear built with the quantization config (qwen3_moe.py), which a `Linear` target
    then quantizes unless the ignore list matches it."""
    in_layers = {id(mod) for layer in m.layers for mod in layer.modules()}
    names = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and id(mod) not in in_layers]
    routers = [m.layer_prefix(i) + s.router for i, s in enumerate(map(layer_structure, m.layers))
               if s.router is not None]
    return names + routers


def write_output(m, model_dir: str, out: str, args: dict, solver: str, partial: str, report: dict, inputs=(),
                 overwrite: bool = False):
    """Assemble out/: config.json with quantization_config, the weights as shards (the float non-layer tensors,
    then one shard per decoder layer: the finished per-layer files, hard-linked, so nothing is copied or held
    in memory at any depth) with model.safetensors.index.json, the tokenizer / preprocessor files, report.json.
    Written to a temporary folder and renamed (`model.publish_output_dir`: only a previous output is replaced,
    unless `overwrite`); the per-layer partial results are removed only after that."""
    tmp = temporary_output_dir(out, "quantized")
    n = len(m.layers)
    shards = [f"model-{j + 1:05d}-of-{n + 1:05d}.safetensors" for j in range(n + 1)]
    prefixes = tuple(m.layer_prefix(i) for i in range(n))
    tensors = checkpoint_state_dict(m, keys=[k for k in m.state_dict() if not k.startswith(prefixes)])
    save_atomic(tensors, os.path.join(tmp, shards[0]), metadata={"format": "pt"})
    for i in range(n):
        os.link(os.path.join(partial, f"layer_{i:04d}.safetensors"), os.path.join(tmp, shards[i + 1]))
    write_index(tmp, shards)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = quantization_config(args, solver, ignored_modules(m))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(model_dir):  # tokenizer, preprocessor, generation config, chat template, remote code
        copied = name.endswith((".json", ".jinja", ".model", ".txt", ".py")) and not name.startswith("model.safetensors")
        if copied and name not in ("config.json", OUTPUT_MARKER):
            shutil.copy(os.path.join(model_dir, name), tmp)
    with open(os.path.join(tmp, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    publish_output_dir(tmp, out, "quantized", inputs, overwrite)
    shutil.rmtree(partial)


def write_index(folder: str, shards: list[str]):
    """model.safetensors.index.json: every tensor name -> its shard, and the tensors' total bytes (each file's
    size less its 8-byte length prefix and JSON header)."""
    weight_map, total = {}, 0
    for name in shards:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            total += os.path.getsize(path) - 8 - int.from_bytes(f.read(8), "little")
        with safe_open(path, framework="pt") as f:
            weight_map.update({k: name for k in f.keys()})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def export_fake_quant(quantized: str, dst: str, inputs=(), overwrite: bool = False):
    """Write the dequantized weights of a packed checkpoint in the original float layout (Hub names, fused
    Qwen experts, no quantization_config), so any harness that reads the float model (lmms-eval,
    transformers, SGLang) evaluates the quantized one unchanged. Written to a temporary folder, then renamed
    (only over a previous fake-quant export, unless `overwrite`; never into `quantized` itself or `inputs`)."""
    check_output_dir(dst, "fake-quant", inputs, overwrite, "--fake-quant output", container=quantized)
    m = model_lib.load_model(quantized, dtype=torch.float32)
    for layer in list(m.layers) + m.vision_modules():
        for name, ql in [(n, mod) for n, mod in layer.named_modules() if isinstance(mod, QuantLinear)]:
            lin = nn.Linear(ql.in_features, ql.out_features, bias=ql.bias is not None)
            lin.weight = nn.Parameter(ql.dequantize().float(), requires_grad=False)
            if ql.bias is not None:
                lin.bias = nn.Parameter(ql.bias.float(), requires_grad=False)
            layer.set_submodule(name, lin)
    tmp = temporary_output_dir(dst, "fake-quant")
    sd = {k: v.contiguous() for k, v in checkpoint_state_dict(m).items()}
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(quantized, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(quantized):  # tokenizer, preprocessor ...; not the packed shards or their index
        weights = name.endswith(".safetensors") or name == "model.safetensors.index.json"
        if not weights and name not in ("config.json", "report.json", OUTPUT_MARKER) \
                and os.path.isfile(os.path.join(quantized, name)):
            shutil.copy(os.path.join(quantized, name), tmp)
    publish_output_dir(tmp, dst, "fake-quant", inputs, overwrite, "--fake-quant output", container=quantized)


# ----------------------------------------------------------------------------------------------------------
# calib/: the calibration set as data


CALIB_SCHEMA = "moe-vlm-quant calib 2"  # calib.json's "schema"; a calib/ of another schema is refused
SAMPLE_KEYS = ("input_ids", "is_vis", "labels", "pixel_values", "image_grid_thw", "image_grid_hws")
STAT_TENSORS = ("n_text", "n_vis", "mean_prob")


class CalibError(ValueError):
    """A calib/ folder that cannot be read; the message says which file and what to run."""


@dataclass
class CalibSet:
    """calib/, written by calibrate.py and read by gptq.py: the encoded samples (prompt + gold answer, teacher
    forced, batch 1) and the statistics the methods need. Files: calib.json (the fields below but tensors),
    stats.safetensors (n_text, n_vis, mean_prob), samples.safetensors (sample j's tensors as `j.<name>`).
    The pixels are kept as the processor made them (float32), so gptq.py sees exactly the calibrated inputs:
    9.8 MB for the bundled model's 128 samples; at real size a 448 x 448 image is 4.8 MB (Qwen3-VL's 784
    patches of 1536 values), about 0.6 GB for 128 image samples."""

    model: str  # the float checkpoint it was made with
    data: str  # --data: "shapes" or a data file
    split: str
    seed: int
    selection: str  # "random" or "macs"
    indices: list[int]  # which samples of the seeded stream of `data` were chosen (all of the first n for random)
    samples: list[dict] = field(repr=False)  # per sample: input_ids (1, T), is_vis (1, T), labels (1, T), and
    #                                          pixel_values + image_grid_thw (Qwen) / image_grid_hws (Kimi) if any
    moe_layers: list[int] = field(default_factory=list)  # decoder layers with a router
    n_text: torch.Tensor | None = None  # (L, E) text tokens routed to expert e of MoE layer l (top-k membership)
    n_vis: torch.Tensor | None = None  # (L, E) image tokens likewise
    mean_prob: torch.Tensor | None = None  # (L, E) mean router probability of e over all tokens
    T_text: int = 0  # text tokens in the set
    T_vis: int = 0  # image tokens in the set
    gamma: float | None = None  # VEQ's γ: mean over image samples of mean|dL/dx| text / image (None: not computed)
    gamma_median: float | None = None
    gamma_per_sample: list = field(default_factory=list)
    gamma_grad_x_input: float | None = None  # the scale-free variant, |x ⊙ dL/dx|
    mbq: dict | None = None  # MBQ's sensitivities per decoder layer (calibrate.Sensitivity), None: not computed
    info: dict = field(default_factory=dict)  # how it was made: command, seconds, dtype, MACS report, pool size

    def layer_counts(self, i: int):
        """(n_text (E,), n_vis (E,), T_text, T_vis, mean_prob (E,)) of decoder layer i, or None if it has no router."""
        if i not in self.moe_layers:
            return None
        j = self.moe_layers.index(i)
        return self.n_text[j], self.n_vis[j], self.T_text, self.T_vis, self.mean_prob[j]

    def save(self, out: str, inputs=(), overwrite: bool = False):
        """Write the folder atomically (temporary sibling, then renamed; a folder that is not a previous calib/
        is never replaced without `overwrite`)."""
        tmp = temporary_output_dir(out, "calib")
        save_file({k: getattr(self, k).contiguous() for k in STAT_TENSORS}, os.path.join(tmp, "stats.safetensors"))
        save_file({f"{j}.{k}": v.contiguous() for j, s in enumerate(self.samples) for k, v in s.items()},
                  os.path.join(tmp, "samples.safetensors"))
        doc = {k: v for k, v in self.__dict__.items() if k not in STAT_TENSORS + ("samples",)}
        with open(os.path.join(tmp, "calib.json"), "w") as f:
            json.dump({"schema": CALIB_SCHEMA, "n": len(self.samples), **doc}, f, indent=2)
        publish_output_dir(tmp, out, "calib", inputs, overwrite)

    @staticmethod
    def read_json(folder: str) -> dict:
        """calib.json alone (no tensors read), its schema checked."""
        path = os.path.join(folder, "calib.json")
        if not os.path.isfile(path):
            raise CalibError(f"{path}: not found; run `python calibrate.py --out {folder}` first (or pass --calib DIR)")
        with open(path) as f:
            doc = json.load(f)
        if doc.get("schema") != CALIB_SCHEMA:
            raise CalibError(f"{path}: written by another version of calibrate.py (schema {doc.get('schema')!r}, "
                             f"expected {CALIB_SCHEMA!r}); re-run `python calibrate.py --out {folder}` with the "
                             "same flags")
        return doc

    @classmethod
    def load(cls, folder: str) -> "CalibSet":
        doc = cls.read_json(folder)
        n = doc.pop("n")
        doc.pop("schema")
        flat = load_file(os.path.join(folder, "samples.safetensors"))
        samples = [{} for _ in range(n)]
        for key, t in flat.items():
            j, name = key.split(".", 1)
            samples[int(j)][name] = t
        return cls(**doc, samples=samples, **load_file(os.path.join(folder, "stats.safetensors")))


# ----------------------------------------------------------------------------------------------------------
# OUT.partial/: the finished layers of a run, what --resume continues from


def save_atomic(tensors: dict, path: str, metadata: dict | None = None):
    """save_file to path.tmp, then rename: a crash never leaves a half-written path."""
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def print_layer(i: int, n_layers: int, rep: dict, t0: float, t_layer: float):
    lin = rep["linears"]
    errs = [r["rel_error"] for r in lin.values()]
    pooled = [n for n, r in lin.items() if r["pooled_hessian"]]
    retries = sum(r["cholesky_retries"] for r in lin.values())
    done = i + 1
    eta = (time.time() - t0) / done * (n_layers - done)
    print(f"layer {i:3d}/{n_layers}: {len(lin)} linears, rel. output error mean {sum(errs) / len(errs):.2e} "
          f"max {max(errs):.2e}, pooled-Hessian linears {len(pooled)}, Cholesky retries {retries}, "
          f"{t_layer:.1f}s, elapsed {time.time() - t0:.0f}s, ETA {eta:.0f}s", flush=True)


class Partial:
    """OUT.partial/: layer i's packed tensors (layer_NNNN.safetensors, under their checkpoint names) and its
    report (layer_NNNN.json), each written atomically by rank 0 as soon as the layer is done. Both folders are
    checked when this is made (before any work); start() clears a previous run's partial/ unless resuming."""

    def __init__(self, out: str, inputs, resume: bool, overwrite: bool, command: str | None,
                 group: distributed.Group):
        self.path, self.resume, self.command, self.group = out.rstrip("/") + ".partial", resume, command, group
        check_output_dir(out, "quantized", inputs, overwrite)
        check_output_dir(self.path, "partial", inputs, overwrite, flag="--out's partial folder")
        distributed.barrier(group)  # every rank has checked the folders before rank 0 touches OUT.partial/
        self.t0 = self.t_layer = time.time()

    def start(self):
        if self.group.rank == 0 and os.path.isdir(self.path) and not self.resume:
            shutil.rmtree(self.path)  # a previous run's partial/ (checked above), or --overwrite
        if self.group.rank == 0 and not os.path.isdir(self.path):
            make_output_dir(self.path, "partial", self.command)

    def file(self, i: int, ext: str = "safetensors") -> str:
        """Layer i's tensors (ext "safetensors") or report (ext "json")."""
        return os.path.join(self.path, f"layer_{i:04d}.{ext}")

    def done(self, i: int) -> bool:
        """--resume and layer i is in partial/ (rank 0 decides for every rank)."""
        self.t_layer = time.time()
        return distributed.agree(self.group, self.resume and os.path.exists(self.file(i)))

    def restore(self, m, i: int, q) -> dict:
        """Rebuild layer i from its saved tensors (QuantLinear shells, then the tensors); returns its report."""
        layer = m.load_layer(i)
        model_lib.to_quant_shells(layer, bits=q.bits, group_size=q.group_size, sym=q.sym,
                                  abits=q.abits if q.abits < 16 else None)
        prefix = m.layer_prefix(i)
        layer.load_state_dict({k[len(prefix):]: v for k, v in load_file(self.file(i)).items()}, strict=True)
        self.group.log(f"layer {i:3d}/{len(m.layers)}: restored from {self.file(i)}")
        with open(self.file(i, "json")) as f:
            return json.load(f)

    def save(self, m, i: int, rep: dict) -> dict:
        """Rank 0 writes layer i's tensors and report; every rank returns the report."""
        if self.group.rank == 0:
            prefix = m.layer_prefix(i)
            save_atomic({prefix + k: v.detach().contiguous() for k, v in m.layers[i].state_dict().items()},
                        self.file(i), metadata={"format": "pt"})
            report = self.file(i, "json")
            with open(report + ".tmp", "w") as f:
                json.dump(rep, f)
            os.replace(report + ".tmp", report)
            print_layer(i, len(m.layers), rep, self.t0, time.time() - self.t_layer)
        return rep
