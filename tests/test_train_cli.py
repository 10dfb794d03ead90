"""The `train` and `cache` command lines: help, config errors with exit code 2, --print-config."""

from __future__ import annotations

import subprocess
import sys

import yaml

from mmdit_flow.training import cache, cli


def test_print_config_and_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "sd3_medium"}, "data": {"path": "imgs"}}))
    assert cli.main([str(path), "optimizer.lr=0.5", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optimizer"]["lr"] == 0.5 and printed["model"]["preset"] == "sd3_medium"
    assert cli.main([str(path), "objective.scheme=bogus"]) == 2
    assert "objective.scheme: 'bogus' is not a valid choice" in capsys.readouterr().err


def test_entry_points_are_light_and_answer_help():
    import argparse

    for mod in (cli, cache):
        parser = argparse.ArgumentParser()
        mod.add_arguments(parser)
        assert mod.HELP and callable(mod.run)
    heavy = ("torch", "accelerate", "diffusers", "transformers", "PIL")
    code = "import sys, mmdit_flow.training.cli, mmdit_flow.training.cache\n"
    code += f"print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    proc = subprocess.run(
        [sys.executable, "-m", "mmdit_flow.training", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "key=value" in proc.stdout
