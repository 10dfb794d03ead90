"""The package itself: a light, side-effect-free import, the public names, the console script."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys

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
