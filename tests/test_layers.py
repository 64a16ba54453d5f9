"""The package's import order, checked by parsing (never importing) every file of dino_dist/.

The rule. LAYERS lists the rooms of the package, lowest first; a module may import from its
own row or a lower one, never a higher one, so a low room can be read, tested and reused
without anything above it. Rooms in one SIBLINGS group may not import each other at all, and
FORBIDDEN names arrows refused whatever the rows say. No import may close a cycle, inside one
row too. A file no row claims fails, so that a new file gets a place on the map.

An arrow is every `import` / `from ... import`, at module level or inside a function (a lazy
import still runs), except under `if TYPE_CHECKING:` (never runs). Imports from outside
dino_dist are ignored. `import a.b.c` and `from a.b import c` point at module a.b.c when that
file exists, else at a.b (its package __init__).

Editing the map: one line per row, so moving a room is moving its line (e.g. "observe" above
"training" to let the loop log through it). Siblings get a row each, side by side; the sibling
rule makes their relative order irrelevant.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dino_dist"

# Lowest first; the row index is the layer. The order follows the calls: the training loop
# writes its metrics and the run calls its evaluations, so observe and eval sit below
# training (data still flows training -> checkpoint / observe / eval); the SLURM submitter
# and the benchmark build on training; the commands sit on top of everything.
LAYERS: list[tuple[str, list[str]]] = [
    ("leaves", ["dino_dist/__init__.py", "dino_dist/config.py", "dino_dist/errors.py",
                "dino_dist/atomic_file.py",
                "dino_dist/delays.py"]),
    ("distributed", ["dino_dist/distributed/"]),
    ("data", ["dino_dist/data/"]),
    ("models", ["dino_dist/models/"]),
    ("checkpoint", ["dino_dist/checkpoint/"]),
    # Export reads checkpoints and names the architectures the weights fit; eval reads exports.
    ("export", ["dino_dist/export/"]),
    ("observe", ["dino_dist/observe/"]),
    ("eval", ["dino_dist/eval/"]),
    ("training", ["dino_dist/training/"]),
    ("cluster", ["dino_dist/cluster/"]),
    ("bench", ["dino_dist/bench/"]),
    # dino_dist/train.py keeps `python -m dino_dist.train` (torchrun and the docs; the sbatch
    # script runs `python -m dino_dist.cli.slurm_entry`).
    ("cli", ["dino_dist/cli/", "dino_dist/train.py"]),
]
# Rooms (first folder or file under dino_dist/) that must not import each other either way.
SIBLINGS: list[set[str]] = [{"data", "models"}, {"checkpoint", "observe"}, {"cluster", "bench"}]
# Arrows refused wherever the rows put the rooms, so that no edit of the map allows them. The
# checkpoint layer is bytes on disk: it never builds a model, nor knows how one is trained.
FORBIDDEN: dict[str, set[str]] = {"checkpoint": {"models", "training"}}


class Import(NamedTuple):
    path: str    # the importing file, e.g. dino_dist/data/folder.py
    lineno: int
    target: str  # dotted module it reaches for
    text: str    # the statement, for the failure message


def module_name(relpath: str) -> str:
    parts = relpath[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files(root: Path) -> dict[str, str]:
    """module name -> file path relative to root's parent, for every .py under root."""
    rel = [p.relative_to(root.parent).as_posix() for p in sorted(root.rglob("*.py"))]
    return {module_name(r): r for r in rel}


def _is_type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in (getattr(test, "id", None),
                                                            getattr(test, "attr", None))


def _import_nodes(nodes):
    """Every import statement at any depth (functions included), minus TYPE_CHECKING bodies."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif _is_type_checking(node):
            yield from _import_nodes(node.orelse)  # only the else branch runs
        else:
            yield from _import_nodes(ast.iter_child_nodes(node))


def _from_base(node: ast.ImportFrom, relpath: str) -> str:
    """The absolute module of `from X import ...`, resolving leading dots against relpath."""
    if not node.level:
        return node.module or ""
    here = module_name(relpath).split(".")
    package = here if relpath.endswith("/__init__.py") else here[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def collect_imports(path: Path, top: Path) -> list[Import]:
    """(lineno, target) of every runtime import in one file; top is the package's parent."""
    relpath = path.relative_to(top).as_posix()
    found = []
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8")).body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:  # `from a.b import c` may name module a.b.c; resolution falls back to a.b
            base = _from_base(node, relpath)
            targets = [f"{base}.{a.name}" if a.name != "*" else base for a in node.names]
        found += [Import(relpath, node.lineno, t, ast.unparse(node)) for t in targets]
    return found


def _resolve(dotted: str, modules) -> str | None:
    """Longest prefix of dotted that is a module of the package; None when outside it."""
    parts = dotted.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or None


def module_graph(root: Path) -> dict[str, list[Import]]:
    """module -> its imports of other package modules, each target resolved to a real file."""
    files = package_files(root)
    graph = {}
    for module, relpath in files.items():
        imports = (i._replace(target=_resolve(i.target, files))
                   for i in collect_imports(root.parent / relpath, root.parent))
        # dict.fromkeys: `from a import b, c` is one arrow when b and c are names in a
        graph[module] = list(dict.fromkeys(i for i in imports if i.target not in (None, module)))
    return graph


def _reachable(graph: dict[str, list[Import]], start: str) -> set[str]:
    seen, todo = set(), [i.target for i in graph.get(start, [])]
    while todo:
        if (m := todo.pop()) not in seen:
            seen.add(m)
            todo += [i.target for i in graph.get(m, [])]
    return seen


def find_cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Groups of modules that all reach each other (each holds a cycle); 50 files: brute force."""
    reach = {m: _reachable(graph, m) for m in graph}
    groups = {frozenset(n for n in reach[m] if m in reach[n]) for m in graph if m in reach[m]}
    return sorted(sorted(group) for group in groups)


def layer_of(relpath: str) -> int | None:
    """Row of LAYERS that claims the file, or None."""
    return next((n for n, (_, prefixes) in enumerate(LAYERS)
                 if any(relpath.startswith(p) for p in prefixes)), None)


def room_of(relpath: str) -> str:
    parts = relpath.split("/")
    return parts[0] if parts[1:] == ["__init__.py"] else parts[1].removesuffix(".py")


def layer_failure(imp: Import, target_file: str) -> str | None:
    src, dst = layer_of(imp.path), layer_of(target_file)
    if src is None or dst is None:
        return None  # already reported once as "not in any layer"
    a, b = room_of(imp.path), room_of(target_file)
    if b in FORBIDDEN.get(a, ()):
        why = f"{a} may never import {b}"
    elif a != b and any({a, b} <= group for group in SIBLINGS):
        why = f"{a} may not import {b}: they are siblings"
    elif dst > src:
        why = f"{a} may not import {b}: {b} is a higher layer"
    else:
        return None
    return f"{imp.path}:{imp.lineno} imports {imp.target} via `{imp.text}` ({why})"


def check(root: Path) -> list[str]:
    """Every failure of the package at root: files off the map, upward imports, cycles."""
    files, graph = package_files(root), module_graph(root)
    failures = [f"{f}: not in any layer: put it in a folder of the map"
                for f in files.values() if layer_of(f) is None]
    failures += [m for imps in graph.values() for i in imps
                 if (m := layer_failure(i, files[i.target]))]
    for group in find_cycles(graph):
        arrows = [f"  {i.path}:{i.lineno} `{i.text}`" for m in group for i in graph[m]
                  if i.target in group]
        failures.append("import cycle between " + ", ".join(files[m] for m in group)
                        + ":\n" + "\n".join(arrows))
    return failures


def test_package_respects_the_layer_order():
    failures = check(PACKAGE)
    if failures:
        pytest.fail(f"{len(failures)} layer failures:\n" + "\n".join(failures), pytrace=False)


def test_checkpoint_imports_neither_models_nor_training():
    files, graph = package_files(PACKAGE), module_graph(PACKAGE)
    arrows = [f"{i.path}:{i.lineno} `{i.text}`" for imps in graph.values() for i in imps
              if room_of(i.path) == "checkpoint"
              and room_of(files[i.target]) in FORBIDDEN["checkpoint"]]
    assert arrows == []


# The checker itself, on small synthetic packages, so it cannot pass by finding nothing.

def make_package(tmp_path: Path, files: dict[str, str]) -> Path:
    """Writes files under tmp_path/dino_dist/, with an empty __init__.py in each folder."""
    root = tmp_path / "dino_dist"
    for relpath, text in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_text(text)
    for folder in [root, *(d for d in root.rglob("*") if d.is_dir())]:
        (folder / "__init__.py").touch()
    return root


def test_a_cycle_is_found(tmp_path):
    root = make_package(tmp_path, {"data/a.py": "from . import b\n",
                                   "data/b.py": "import os\nfrom .a import f, g\n"})
    assert find_cycles(module_graph(root)) == [["dino_dist.data.a", "dino_dist.data.b"]]
    [failure] = check(root)
    assert failure.startswith("import cycle between dino_dist/data/a.py, dino_dist/data/b.py")
    assert failure.count("dino_dist/data/b.py:2 `from .a import f, g`") == 1  # one arrow


def test_an_upward_import_is_found(tmp_path):
    upward = "import os\nfrom ..training import build\n"
    root = make_package(tmp_path, {"training/build.py": "", "observe/console.py": upward})
    assert check(root) == [
        "dino_dist/observe/console.py:2 imports dino_dist.training.build via "
        "`from ..training import build` (observe may not import training: "
        "training is a higher layer)"]


def test_a_forbidden_import_is_found_even_where_the_rows_allow_it(tmp_path):
    root = make_package(tmp_path, {
        "models/vit.py": "", "training/loop.py": "",
        "checkpoint/reader.py": "from dino_dist.models import vit\n",
        "checkpoint/writer.py": "def save():\n    import dino_dist.training.loop\n"})
    assert layer_of("dino_dist/checkpoint/reader.py") > layer_of("dino_dist/models/vit.py")
    assert check(root) == [
        "dino_dist/checkpoint/reader.py:1 imports dino_dist.models.vit via "
        "`from dino_dist.models import vit` (checkpoint may never import models)",
        "dino_dist/checkpoint/writer.py:2 imports dino_dist.training.loop via "
        "`import dino_dist.training.loop` (checkpoint may never import training)"]


def test_siblings_may_not_import_each_other(tmp_path):
    root = make_package(tmp_path, {"models/__init__.py": "from dino_dist import data\n",
                                   "data/__init__.py": ""})
    assert [f.split("(")[1] for f in check(root)] == [
        "models may not import data: they are siblings)"]


def test_a_type_checking_import_is_ignored(tmp_path):
    root = make_package(tmp_path, {"training/loop.py": "", "config.py": (
        "import typing\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .training import loop\n"
        "if typing.TYPE_CHECKING:\n    import dino_dist.training\n")})
    assert module_graph(root)["dino_dist.config"] == [] and check(root) == []


def test_a_lazy_import_in_a_function_is_found(tmp_path):
    root = make_package(tmp_path, {"config.py": (
        "def load():\n    if True:\n        from dino_dist.training import build\n")})
    [imp] = collect_imports(root / "config.py", tmp_path)
    assert (imp.lineno, imp.target) == (3, "dino_dist.training.build")


def test_relative_imports_resolve(tmp_path):
    root = make_package(tmp_path, {
        "config.py": "", "models/vit.py": "", "training/build.py": "",
        "training/__init__.py": "from .build import make\nfrom . import *\n",
        "training/loop.py": ("import torch\nfrom . import build\nfrom .. import config, version\n"
                             "from ..models.vit import ViT\nimport dino_dist.models.vit\n")})
    graph = module_graph(root)
    assert [i.target for i in graph["dino_dist.training.loop"]] == [
        "dino_dist.training.build", "dino_dist.config", "dino_dist",
        "dino_dist.models.vit", "dino_dist.models.vit"]
    assert [i.target for i in graph["dino_dist.training"]] == ["dino_dist.training.build"]
    assert check(root) == []  # all of it is allowed: the checker does not fail everything


def test_a_file_off_the_map_fails(tmp_path):
    assert check(make_package(tmp_path, {"loop.py": ""})) == [
        "dino_dist/loop.py: not in any layer: put it in a folder of the map"]
