"""The layout of the tree: no import cycles between the top-level files, the algorithm files load without the
model code (model.py, data.py, calibrate.py), and no top-level file grows past what one reader holds in mind.

    python -m pytest -q tests/test_layout.py
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = ["hessian", "ecs", "gptq", "gptq_batched", "methods", "macs"]  # tensors in, tensors out
MAX_LINES = 650


def module_imports() -> dict[str, set[str]]:
    """Top-level file -> the top-level files it imports when it is loaded (imports inside functions excluded)."""
    local = {n[:-3] for n in os.listdir(ROOT) if n.endswith(".py")}
    graph = {}
    for name in local:
        with open(os.path.join(ROOT, name + ".py")) as f:
            body = ast.parse(f.read()).body
        found = set()
        for node in body:
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = found & local - {name}
    return graph


def test_no_import_cycles():
    graph, state, cycles = module_imports(), {}, []

    def visit(name, path):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert graph["layerwise"] and cycles == []


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_files_import_no_model_code(name):
    code = f"import {name}, sys; print(sorted(m for m in ('model', 'data', 'calibrate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {name}.py loads {out.stdout.strip()}"


def test_no_top_level_file_is_too_long():
    lengths = {}
    for name in sorted(os.listdir(ROOT)):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, name)) as f:
                lengths[name] = sum(1 for _ in f)
    assert lengths and {n: k for n, k in lengths.items() if k > MAX_LINES} == {}, lengths
