"""The package itself: a light, side-effect-free import, the public names, the console script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mmdit_flow
from mmdit_flow.pipelines.cli import COMMANDS, main

HEAVY = ("transformers", "diffusers", "accelerate", "PIL", "matplotlib", "scipy", "ot", "peft")


@pytest.mark.parametrize(
    "module",
    ["mmdit_flow", "mmdit_flow.flow", "mmdit_flow.sampling", "mmdit_flow.models.sd3", "mmdit_flow.pipelines"],
)
def test_import_is_light(module):
    code = f"import sys, json, {module}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    loaded = set(json.loads(run.stdout))
    assert not loaded & set(HEAVY), f"import {module} pulled in {sorted(loaded & set(HEAVY))}"


def test_public_names_resolve():
    assert set(mmdit_flow.__all__) == {*mmdit_flow._LAZY, *mmdit_flow._SUBMODULES, "__version__"}
    for name in mmdit_flow.__all__:
        assert getattr(mmdit_flow, name) is not None, name
    assert mmdit_flow.TextToImagePipeline.__name__ == "TextToImagePipeline"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mmdit_flow.nope  # noqa: B018


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: mmdit-flow " + command in capsys.readouterr().out
