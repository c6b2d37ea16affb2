"""The layout of the tree, as the README's "Reading order" promises it: the card's seven files at the top and
nothing else, no import cycle between any of the project's files (imports inside functions counted too), no
re-exports (every project name is imported from the file that defines it), the algorithm files free of the
model code, the reader's path of at most six files each pointing at the next, and nothing installed under a
generic module name.

    python -m pytest -q tests/test_layout.py
"""

import ast
import os
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = {"model", "calibrate", "hessian", "gptq", "ecs", "macs", "eval"}  # the user's card
FOLDERS = ("arch", "quant", "data", "tools")  # the code that is not one of the seven
ALGORITHMS = ["hessian", "ecs", "macs", "quant.grid", "quant.batched"]  # tensors in, tensors out
READING_ORDER = ["gptq.py", "model.py", "arch/blocks.py", "hessian.py", "quant/grid.py", "quant/folders.py"]
MAX_LINES = 650


def project_modules() -> dict[str, str]:
    """Dotted module name -> path, for the seven and every file in the folders."""
    mods = {n[:-3]: os.path.join(ROOT, n) for n in os.listdir(ROOT) if n.endswith(".py")}
    for folder in FOLDERS:
        for n in os.listdir(os.path.join(ROOT, folder)):
            if n.endswith(".py") and n != "__init__.py":
                mods[f"{folder}.{n[:-3]}"] = os.path.join(ROOT, folder, n)
    return mods


def imports(path: str, mods) -> list[tuple[str, list[str]]]:
    """(project module, names taken from it) for every import in the file, at any depth."""
    out = []
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in mods]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in mods:  # `from quant import grid`
                    out.append((f"{node.module}.{a.name}", []))
                elif node.module in mods:
                    out.append((node.module, [a.name]))
    return out


def defined_names(path: str) -> set[str]:
    with open(path) as f:
        body = ast.parse(f.read()).body
    names = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_the_top_level_python_files_are_the_cards_seven():
    assert {n[:-3] for n in os.listdir(ROOT) if n.endswith(".py")} == TOP


def test_no_import_cycles_counting_imports_inside_functions():
    mods = project_modules()
    graph = {m: {dep for dep, _ in imports(p, mods)} - {m} for m, p in mods.items()}
    state, cycles = {}, []

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
    assert graph["gptq"] and cycles == []


def test_every_name_is_imported_from_the_file_that_defines_it():
    mods = project_modules()
    where = {m: defined_names(p) for m, p in mods.items()}
    bad = [(m, dep, n) for m, p in mods.items() for dep, names in imports(p, mods) for n in names
           if n not in where[dep]]
    assert bad == []
    shims = [m for m, p in mods.items() if "__getattr__" in where[m]]
    assert shims == []


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_files_import_no_model_code(name):
    code = (f"import {name}, sys; print(sorted(m for m in ('model', 'data.processor', 'calibrate', 'gptq') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {name} loads {out.stdout.strip()}"


def test_the_reading_order_is_six_files_each_naming_the_next():
    assert len(READING_ORDER) <= 6
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    listed = re.findall(r"^\d\. `([\w/]+\.py)`", readme, re.M)
    assert listed == READING_ORDER
    for here, nxt in zip(READING_ORDER, READING_ORDER[1:]):
        with open(os.path.join(ROOT, here)) as f:
            doc = ast.get_docstring(ast.parse(f.read()))
        assert nxt in doc.split("Read next")[-1], f"{here}'s docstring does not point at {nxt}"


def test_no_file_is_too_long():
    lengths = {}
    for p in project_modules().values():
        with open(p) as f:
            lengths[os.path.relpath(p, ROOT)] = sum(1 for _ in f)
    assert {n: k for n, k in lengths.items() if k > MAX_LINES} == {}, lengths


def test_installing_puts_no_module_on_the_import_path():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f).get("tool", {}).get("setuptools", {})
    assert tool.get("py-modules") == [] and tool.get("packages") == []
