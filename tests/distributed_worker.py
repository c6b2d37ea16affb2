"""Run by tests/test_distributed.py under `python -m torch.distributed.run --nproc-per-node 2`: several gptq.py
runs, one after another, in one process group (the ranks import torch once for all of them).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py RUNS.json
RUNS.json: a list of gptq.py argument lists.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import gptq  # noqa: E402
from quant import distributed  # noqa: E402


def main(path: str):
    torch.set_num_threads(1)  # the one-process oracle runs with one thread too (summation order)
    with open(path) as f:
        runs = json.load(f)
    group = distributed.init("cpu")
    try:
        for argv in runs:
            gptq.main(argv)  # finds the group initialized above, and leaves it to us
    finally:
        distributed.close(group)


if __name__ == "__main__":
    main(sys.argv[1])
