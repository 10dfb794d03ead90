"""``mmdit-flow generate`` writes the pipeline's images as PNGs and prints their paths."""

from __future__ import annotations

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


def test_help_lists_generate():
    result = subprocess.run(
        [sys.executable, "-m", "mmdit_flow.pipelines.cli", "generate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--num-images" in result.stdout and "--negative" in result.stdout
