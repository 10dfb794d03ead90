"""``mmdit-flow generate`` writes the pipeline's images in the format the suffix names, prints their paths and
records their prompts for ``mmdit-flow eval``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from components import flux_components, save_diffusers_folder
from PIL import Image

from mmdit_flow.pipelines.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_diffusers_folder(flux_components(), tmp_path_factory.mktemp("flux"))


def test_generate_writes_the_pipeline_images(folder, tmp_path, capsys):
    from mmdit_flow.pipelines import TextToImagePipeline

    out = tmp_path / "img" / "out.png"
    argv = [
        "generate",
        "a photo of a cat",
        "--model",
        str(folder),
        "--steps",
        "3",
        "--guidance",
        "5",
        "--seed",
        "0",
        "--height",
        "16",
        "--width",
        "24",
        "--num-images",
        "2",
        "--sampler",
        "heun",
        "--max-sequence-length",
        "16",
        "-o",
        str(out),
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--no-progress",
    ]
    assert main(argv) == 0
    paths = [tmp_path / "img" / "out-0.png", tmp_path / "img" / "out-1.png"]
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    expected = pipe(
        "a photo of a cat",
        steps=3,
        guidance=5.0,
        seed=0,
        height=16,
        width=24,
        num_images=2,
        sampler="heun",
        max_sequence_length=16,
        progress=False,
    )
    for path, image in zip(paths, expected, strict=True):
        written = np.asarray(Image.open(path))
        assert written.shape == (16, 24, 3)
        np.testing.assert_array_equal(written, np.asarray(image))


def test_single_image_path_and_errors(folder, tmp_path, capsys):
    out = tmp_path / "one.png"
    assert (
        main(
            [
                "generate",
                "a dog",
                "--model",
                str(folder),
                "--steps",
                "1",
                "--height",
                "16",
                "--width",
                "16",
                "--max-sequence-length",
                "8",
                "-o",
                str(out),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out) and out.is_file()
    bad = ["generate", "a dog", "--model", str(folder), "--height", "17", "--device", "cpu", "-o", str(out)]
    assert main(bad) == 2
    assert "height must be a positive multiple of 4" in capsys.readouterr().err


def _tiny_args(folder, out, *extra):
    size = ["--height", "16", "--width", "16", "--max-sequence-length", "8"]
    return ["generate", "a dog", "--model", str(folder), "--steps", "1", *size, "-o", str(out)] + [
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize(
    ("name", "fmt"), [("x.jpg", "JPEG"), ("x.JPEG", "JPEG"), ("x.webp", "WEBP"), ("x", "PNG")]
)
def test_output_format_follows_the_suffix(folder, tmp_path, capsys, name, fmt):
    assert main(_tiny_args(folder, tmp_path / name)) == 0
    path = tmp_path / (name if "." in name else name + ".png")
    assert capsys.readouterr().out.strip() == str(path)
    with Image.open(path) as image:
        assert (image.format, image.size) == (fmt, (16, 16))
    # nothing else: no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "metadata.jsonl"])


def test_unknown_suffix_fails_before_loading_a_model(tmp_path, capsys):
    missing = tmp_path / "no-such-model"  # not read: the output name is checked first
    assert main(["generate", "a dog", "--model", str(missing), "-o", str(tmp_path / "x.gif")]) == 2
    err = capsys.readouterr().err
    assert "unknown image format '.gif'" in err and ".png, .jpg, .jpeg, .webp" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_mode_of_the_umask(folder, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert main(_tiny_args(folder, tmp_path / "x.png")) == 0
    finally:
        os.umask(old)
    for name in ("x.png", "metadata.jsonl"):  # not mkstemp's 0600
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "mmdit_flow.pipelines.cli", "generate", "a dog", "--device", "cuda"]
        + ["-o", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "mmdit-flow generate: error: --device cuda: this torch is built without CUDA; use --device cpu"
        if torch.version.cuda is None
        else "mmdit-flow generate: error: --device cuda: no CUDA GPU is visible; use --device cpu"
    ]


def test_bad_device_name_is_an_error(tmp_path, capsys):
    assert main(["generate", "a dog", "--device", "cuda:x", "-o", str(tmp_path / "x.png")]) == 2
    assert "--device 'cuda:x' is not a device name" in capsys.readouterr().err


def test_only_the_arguments_given_reach_the_pipeline(folder, tmp_path, monkeypatch):
    from mmdit_flow.pipelines import TextToImagePipeline

    seen = []
    original = TextToImagePipeline.__call__

    def spy(self, prompt, **kwargs):
        seen.append(kwargs)
        return original(self, prompt, **kwargs)

    monkeypatch.setattr(TextToImagePipeline, "__call__", spy)
    assert main(_tiny_args(folder, tmp_path / "x.png")) == 0
    argv = ["generate", "a dog", "--model", str(folder), "--guidance", "2", "-o", str(tmp_path / "y.png")]
    assert main([*argv, "--device", "cpu", "--no-progress", "--height", "16", "--width", "16"]) == 0
    model_defaults = {"steps", "guidance", "height", "width", "max_sequence_length"}
    assert model_defaults & set(seen[0]) == {"steps", "height", "width", "max_sequence_length"}
    assert seen[0]["steps"] == 1 and seen[0]["max_sequence_length"] == 8
    assert model_defaults & set(seen[1]) == {"guidance", "height", "width"} and seen[1]["guidance"] == 2.0


def test_captions_file_adds_and_replaces_lines(folder, tmp_path):
    assert main(_tiny_args(folder, tmp_path / "a.png")) == 0
    argv = _tiny_args(folder, tmp_path / "b.jpg", "--num-images", "2")
    argv[1] = "a cat"
    assert main(argv) == 0
    argv = _tiny_args(folder, tmp_path / "a.png")
    argv[1] = "a bird"
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert rows == [
        {"file_name": "a.png", "text": "a bird"},
        {"file_name": "b-0.jpg", "text": "a cat"},
        {"file_name": "b-1.jpg", "text": "a cat"},
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b'{"file_name": "a.png"}\n', "metadata.jsonl:1: expected"), (b"\xff\xfe\n", "is not UTF-8")],
)
def test_a_broken_captions_file_is_named_before_generating(tmp_path, capsys, content, message):
    (tmp_path / "metadata.jsonl").write_bytes(content)
    assert main(["generate", "a dog", "--model", str(tmp_path / "none"), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(tmp_path / "metadata.jsonl") in err and "fix or delete" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.jsonl"]


def test_an_empty_captions_file_is_extended(folder, tmp_path):
    (tmp_path / "metadata.jsonl").write_text("\n")
    assert main(_tiny_args(folder, tmp_path / "a.png")) == 0
    assert (tmp_path / "metadata.jsonl").read_text() == '{"file_name": "a.png", "text": "a dog"}\n'


def test_eval_scores_what_generate_wrote_with_the_shipped_model(tmp_path, capsys):
    """The demo model at 64x64 and 4 steps: `generate -o out/x.png` then `eval out/` end to end."""
    from mmdit_flow.training.recipes.tiny_shapes.evaluator import evaluate

    prompts = {"red.jpg": "a large red circle in the center", "blue.png": "a large blue square on the left"}
    for name, prompt in prompts.items():
        argv = ["generate", prompt, "--steps", "4", "--height", "64", "--width", "64", "--seed", "0"]
        assert main([*argv, "--device", "cpu", "--no-progress", "-o", str(tmp_path / "out" / name)]) == 0
    report = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "out"), "--json", str(report)]) == 0
    assert "2 images" in capsys.readouterr().out
    result = json.loads(report.read_text())
    assert result["files"] == list(prompts)
    images = [Image.open(tmp_path / "out" / name).convert("RGB") for name in prompts]
    assert result["overall"] == evaluate(images, list(prompts.values())).overall


def test_help_lists_generate():
    result = subprocess.run(
        [sys.executable, "-m", "mmdit_flow.pipelines.cli", "generate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--num-images" in result.stdout and "--negative" in result.stdout


def test_help_quotes_the_demo_models_recorded_defaults(capsys):
    from mmdit_flow.pipelines import generate_cli, loading
    from mmdit_flow.pipelines.defaults import FILE

    assert generate_cli.DEMO_FOLDER == loading.DEMO_FOLDER
    recorded = json.loads((loading.demo_folder() / FILE).read_text())["defaults"]
    assert generate_cli.demo_defaults() == recorded
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for option, key in [("--steps", "steps"), ("--guidance", "guidance"), ("--height", "height")]:
        assert f"{option} " in help_text and f"the demo model: {recorded[key]})" in help_text, key


def test_sampler_choices_are_the_solvers(capsys):
    """The pipeline's and --help's sampler lists are the solvers of sampling.METHODS (--help stays torch-free,
    so it repeats them)."""
    from mmdit_flow import sampling
    from mmdit_flow.pipelines import checks

    assert checks.SAMPLERS == sampling.METHODS
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"--sampler SAMPLER {' | '.join(sampling.METHODS)}" in help_text
