"""The package itself: a light, side-effect-free import, the public names, the console script."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mmdit_flow
from mmdit_flow.pipelines.cli import COMMANDS, main

HEAVY = ("transformers", "diffusers", "accelerate", "PIL", "matplotlib", "scipy", "ot", "peft")
# the command line's parser and every --help stay free of torch too: `mmdit-flow --help` is instant
CLI_HEAVY = ("torch", *HEAVY)


def _loaded_after(code: str) -> set[str]:
    """Top-level modules imported by running ``code`` in a fresh interpreter."""
    code += "\nimport json, sys; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(run.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "module",
    ["mmdit_flow", "mmdit_flow.flow", "mmdit_flow.sampling", "mmdit_flow.models.sd3", "mmdit_flow.pipelines"],
)
def test_import_is_light(module):
    loaded = _loaded_after(f"import {module}")
    assert not loaded & set(HEAVY), f"import {module} pulled in {sorted(loaded & set(HEAVY))}"


@pytest.mark.parametrize("module", ["mmdit_flow.weights", "mmdit_flow.weights.cli"])
def test_weights_import_is_torch_free(module):
    loaded = _loaded_after(f"import {module}")
    assert not loaded & set(CLI_HEAVY), f"import {module} pulled in {sorted(loaded & set(CLI_HEAVY))}"


def test_cli_parser_is_light():
    loaded = _loaded_after("from mmdit_flow.pipelines.cli import build_parser\nbuild_parser()")
    assert not loaded & set(CLI_HEAVY), f"build_parser() pulled in {sorted(loaded & set(CLI_HEAVY))}"


@pytest.mark.parametrize("argv", [["--help"], *([command, "--help"] for command in sorted(COMMANDS))])
def test_command_help_is_light(argv):
    code = (
        "from mmdit_flow.pipelines.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
    )
    loaded = _loaded_after(code)
    assert not loaded & set(CLI_HEAVY), f"{' '.join(argv)} pulled in {sorted(loaded & set(CLI_HEAVY))}"


def test_console_script_lists_every_command():
    """The installed ``mmdit-flow`` script (pyproject's scripts) answers --help with every command."""
    script = shutil.which("mmdit-flow") or pytest.skip("no mmdit-flow script on PATH (pip install -e .)")
    run = subprocess.run([script, "--help"], capture_output=True, text=True, check=True, timeout=60)
    assert sorted(re.findall(r"^    (\w+)", run.stdout, flags=re.M)) == sorted(COMMANDS)


def test_public_names_resolve():
    assert set(mmdit_flow.__all__) == {*mmdit_flow._LAZY, *mmdit_flow._SUBMODULES, "__version__"}
    for name, module in mmdit_flow._LAZY.items():  # each public name is the object its module defines
        assert getattr(mmdit_flow, name) is getattr(importlib.import_module(module), name), name
    for name in mmdit_flow._SUBMODULES:
        assert getattr(mmdit_flow, name).__name__ == f"mmdit_flow.{name}"
    assert mmdit_flow.TextToImagePipeline.__name__ == "TextToImagePipeline"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mmdit_flow.nope  # noqa: B018


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: mmdit-flow " + command in capsys.readouterr().out


ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])


def _resolve(dotted: str) -> object:
    """The module or attribute a dotted ``mmdit_flow.`` name in the docs stands for."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            continue
    for part in parts[i:]:
        obj = getattr(obj, part)
    return obj


def test_docs_name_what_exists():
    """Every ``mmdit_flow.x.y`` name and every source path README and docs/ mention exists (a file that moved
    leaves no stale name behind)."""
    with pytest.raises(AttributeError):
        _resolve("mmdit_flow.training.lora.load_lora")  # moved to mmdit_flow.weights.lora
    names, paths = set(), set()
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        names |= {m for m in re.findall(r"\bmmdit_flow(?:\.\w+)+", text) if not m.endswith(".json")}
        paths |= set(
            re.findall(
                r"\b(?:mmdit_flow|bench|training|pipelines|weights|tests|docs)/[\w./-]+\.(?:py|md|yaml|sh)",
                text,
            )
        )
    assert len(names) > 10 and len(paths) > 10
    bad = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (AttributeError, ImportError):
            bad.append(name)
    assert bad == []
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []
