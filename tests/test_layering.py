"""The layers import downwards only: core (``mmdit_flow/``) <- weights <- pipelines <- training; and no two
classes share a name.

Every module's imports are read with ``ast`` (function-level and ``importlib.import_module("...")`` ones too)
and each is checked against the layer of the file that makes it.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

import mmdit_flow

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "weights": 1, "pipelines": 2, "training": 3}
FOLDERS = {"mmdit_flow": "core", "weights": "weights", "pipelines": "pipelines", "training": "training"}
# the package's front door re-exports names of every layer, lazily and by design (DESIGN.md: public API)
FACADE = {"mmdit_flow/__init__.py"}


def _package(path: Path) -> str:
    """The dotted package a source file belongs to, as installed (``weights/io.py`` -> mmdit_flow.weights)."""
    rel = path.relative_to(ROOT)
    parts = list(rel.parent.parts)
    if parts[0] != "mmdit_flow":
        parts = ["mmdit_flow", *parts]
    return ".".join(parts)


def _layer_of(module: str) -> str | None:
    """The layer of an imported dotted name, None outside the project."""
    parts = module.split(".")
    if parts[0] != "mmdit_flow":
        return None
    if len(parts) == 1:
        return "core"
    return parts[1] if parts[1] in LAYERS else "core"


def _imports(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """(line, dotted name) of everything ``path`` imports; relative imports resolved against ``package``
    (by default the one ``path`` belongs to)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = package or _package(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "mmdit_flow":  # `from mmdit_flow import weights` / a lazily re-exported name
                for alias in node.names:
                    target = mmdit_flow._LAZY.get(alias.name, f"mmdit_flow.{alias.name}")
                    found.append((node.lineno, target))
            else:
                found.append((node.lineno, base))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


# training is the top layer: it may import everything
SOURCES = sorted(
    p
    for folder in ("mmdit_flow", "weights", "pipelines")
    for p in (ROOT / folder).rglob("*.py")
    if str(p.relative_to(ROOT)) not in FACADE
)


def _violations(path: Path, own: str, package: str) -> list[str]:
    bad = []
    for line, name in _imports(path, package):
        layer = _layer_of(name)
        if layer is not None and LAYERS[layer] > LAYERS[own]:
            bad.append(f"{path.name}:{line} ({own}) imports {name} ({layer})")
    return bad


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_higher_layer(path):
    own = FOLDERS[path.relative_to(ROOT).parts[0]]
    assert _violations(path, own, _package(path)) == []


def test_the_checker_sees_arrows_back(tmp_path):
    """The parser resolves plain, relative, function-level and import_module imports (of a probe file
    placed, for relative imports, in the weights package)."""
    assert _layer_of("mmdit_flow.training.lora") == "training" and _layer_of("torch") is None
    assert _layer_of("mmdit_flow.models.sd3") == "core" and _layer_of("mmdit_flow") == "core"
    probe = tmp_path / "probe.py"
    source = (
        "from ..pipelines import text\n"
        "def f():\n    from mmdit_flow.training.lora import add_lora\n"
        "import importlib\nimportlib.import_module('mmdit_flow.training.cli')\n"
        "from mmdit_flow import TextToImagePipeline\n"
        "from . import io\n"
    )
    probe.write_text(source)
    assert [name for _, name in _imports(probe, "mmdit_flow.weights")] == [
        "mmdit_flow.pipelines",
        "importlib",
        "mmdit_flow.pipelines",
        "mmdit_flow.weights",
        "mmdit_flow.training.lora",
        "mmdit_flow.training.cli",
    ]
    assert len(_violations(probe, "weights", "mmdit_flow.weights")) == 4
    assert _violations(probe, "training", "mmdit_flow.training") == []


def _type_names(path: Path) -> list[str]:
    """Classes (any depth) and module-level CamelCase aliases (``VelocityFn = Callable[...]``) in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names += [t.id for t in targets if isinstance(t, ast.Name) and re.fullmatch(r"[A-Z][a-z]\w*", t.id)]
    return names


def test_no_two_types_share_a_name(tmp_path):
    """One name, one class or type alias, across the package and bench/ (two ``SelfAttention``,
    ``CheckpointError`` or ``VelocityFn`` mislead)."""
    probe = tmp_path / "probe.py"
    probe.write_text("VelocityFn = Callable[..., Tensor]\nSIDES = ()\nclass A:\n    class B: ...\n")
    assert _type_names(probe) == ["A", "B", "VelocityFn"]
    where = defaultdict(list)
    for folder in (*FOLDERS, "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in _type_names(path):
                where[name].append(str(path.relative_to(ROOT)))
    assert {name: files for name, files in where.items() if len(files) > 1} == {}


# The one atomic writer (weights/io.py: atomic_path, write_json, save_file) and the checkpoint folders, which
# are renamed whole (training/checkpoint.py, step-N.tmp -> step-N), are the only places that move files.
ATOMIC_WRITERS = {"weights/io.py", "training/checkpoint.py"}


def _hand_rolled_moves(path: Path) -> list[str]:
    """Lines of ``path`` that write a fixed ``.tmp`` name or move a file into place themselves
    (``os.replace`` / ``os.rename`` / ``shutil.move``, ``Path.replace`` / ``Path.rename``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".tmp"):
            found.append(f"{path.name}:{node.lineno} {node.value!r}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            if owner == "dataclasses":
                continue
            moves = node.func.attr in ("replace", "rename") and (
                owner in ("os", "shutil") or len(node.args) == 1
            )
            if moves or (owner == "shutil" and node.func.attr == "move"):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    return sorted(found)


def test_one_atomic_writer(tmp_path):
    """Files are written through weights/io.py (a hand-rolled ``x.json.tmp`` write collides between two
    writers and leaves the temporary behind on an error)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "tmp = path.with_suffix('.json.tmp')\ntmp.write_text(text)\ntmp.replace(path)\n"
        "os.rename(a, b)\ns = s.replace('a', 'b')\nc = dataclasses.replace(c, x=1)\n"
    )
    assert _hand_rolled_moves(probe) == [
        "probe.py:1 '.json.tmp'",
        "probe.py:3 tmp.replace(path)",
        "probe.py:4 os.rename(a, b)",
    ]
    found = {
        str(path.relative_to(ROOT)): moves
        for folder in (*FOLDERS, "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (moves := _hand_rolled_moves(path)) and str(path.relative_to(ROOT)) not in ATOMIC_WRITERS
    }
    assert found == {}


def test_bench_imports_nothing_from_tests():
    """bench/ builds its own cases (cases.py, pipeline_cases.py): no ``sys.path`` edits, no test module."""
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")}
    found = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "path"
                and getattr(node.value, "id", "") == "sys"
            ):
                found.append(f"{path.name}:{node.lineno} sys.path")
        found += [
            f"{path.name}:{line} imports {name}"
            for line, name in _imports(path, "bench")
            if name.split(".")[0] in {"tests", *test_modules}
        ]
    assert found == []
