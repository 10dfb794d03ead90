"""The shipped few-step student, weights/tiny-shapes-turbo: a complete diffusers SD3 folder that samples in
1-4 steps without CFG (4 by default), the same images through diffusers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mmdit_flow.weights
from tests.test_shipped_model import MIN_ACCURACY, PROMPTS, SIMPLE, T5_TOKENS  # the teacher's checks and bar

FOLDER = Path(mmdit_flow.weights.__file__).parent / "tiny-shapes-turbo"
TEACHER = FOLDER.parent / "tiny-shapes"


@pytest.fixture(scope="module")
def pipe():
    from mmdit_flow.pipelines import TextToImagePipeline

    return TextToImagePipeline.from_pretrained("shipped:tiny-shapes-turbo", device="cpu", dtype=torch.float32)


def test_folder_is_small_complete_and_shares_the_teachers_encoders():
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index == json.loads((TEACHER / "model_index.json").read_text())
    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert size < 50 * 2**20, f"{FOLDER} is {size / 2**20:.1f} MiB; the budget is 50 MiB"
    assert not list(FOLDER.rglob("*.bin")), "pickle weights in the shipped folder"
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):  # only the transformer is new
        for f in (TEACHER / part).iterdir():
            assert (FOLDER / part / f.name).read_bytes() == f.read_bytes(), f"{part}/{f.name}"


def test_it_samples_in_few_steps_without_cfg_by_default(pipe):
    d = pipe.defaults
    # a 2-RF flow: any step count is valid (none is singled out by distillation), 4 by default, no CFG
    assert (d.steps, d.guidance, d.distilled_steps) == (4, 1.0, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = pipe(PROMPTS[0], seed=0, output="latent", progress=False)
        explicit = pipe(PROMPTS[0], seed=0, steps=4, guidance=1.0, output="latent", progress=False)
        for steps in (1, 3):
            pipe(PROMPTS[0], seed=0, steps=steps, output="latent", progress=False)
    assert torch.equal(default, explicit)


def test_diffusers_loads_the_folder_and_makes_the_same_images(pipe):
    from diffusers import StableDiffusion3Pipeline

    ref = StableDiffusion3Pipeline.from_pretrained(FOLDER, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = {"max_sequence_length": T5_TOKENS, "latents": latents}
    ours = pipe(PROMPTS, output="np", progress=False, **kw)  # its defaults: 4 steps, guidance 1
    theirs = ref(PROMPTS, num_inference_steps=4, guidance_scale=1.0, output_type="np", **kw).images
    assert np.abs(ours - theirs).max() <= 1e-3
    assert ours.std() > 0.05  # not a blank image


@pytest.mark.parametrize("steps", [1, 4])
def test_simple_captions_pass_the_evaluator_in_one_and_four_steps(pipe, steps):
    from mmdit_flow.training.recipes.tiny_shapes import evaluator

    images = pipe(SIMPLE, steps=steps, seed=list(range(len(SIMPLE))), progress=False)
    result = evaluator.evaluate(images, SIMPLE)
    assert result.overall >= MIN_ACCURACY, result.per_attribute


def test_the_recipe_assembles_the_shipped_folder_from_a_finished_run(tmp_path, monkeypatch):
    """`tiny_shapes turbo OUT` skips the stages that are done and writes the shipped folder's files."""
    import shutil

    from mmdit_flow.training.config import load_config
    from mmdit_flow.training.recipes.tiny_shapes import turbo

    monkeypatch.chdir(tmp_path)
    config = load_config(turbo.CONFIG)
    assert (config.objective.kind, config.model.pretrained) == ("reflow", "shipped:tiny-shapes")
    root = Path(turbo.ROOT)
    (root / "data" / "train").mkdir(parents=True)
    (root / "data" / "train" / "metadata.jsonl").write_text("")
    Path(config.data.cache_dir).mkdir(parents=True)
    (Path(config.data.cache_dir) / "index.json").write_text("{}")
    final = Path(config.output.dir) / "final"
    shutil.copytree(FOLDER, final)  # as the run's export
    saved = json.loads((final / "mmdit_flow.json").read_text())
    saved["defaults"]["steps"] = 28  # the export keeps the teacher's steps; the recipe sets STEPS
    (final / "mmdit_flow.json").write_text(json.dumps(saved))
    out = turbo.build(tmp_path / "out")
    for f in FOLDER.rglob("*"):
        if f.is_file():
            assert (out / f.relative_to(FOLDER)).read_bytes() == f.read_bytes(), f.relative_to(FOLDER)
