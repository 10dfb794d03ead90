"""Bad input raises a ValueError (or FileNotFoundError) that says how to fix it, before any model runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from components import save_diffusers_folder, sd3_components


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_diffusers_folder(sd3_components(), tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def pipe(folder):
    from mmdit_flow.pipelines import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


OK = {"steps": 1, "height": 16, "width": 16, "progress": False, "max_sequence_length": 8}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"height": 18}, r"height must be a positive multiple of 4 px .* got 18 px; use 16 or 20"),
        ({"width": 30}, r"width must be a positive multiple of 4 px .* got 30 px; use 28 or 32"),
        ({"height": 0}, r"height must be a positive multiple of 4 px .* got 0 px; use 4$"),
        ({"width": 0}, r"width must be a positive multiple of 4 px .* got 0 px; use 4$"),
        ({"height": -16}, r"height must be a positive multiple of 4 px .* got -16 px; use 4$"),
        ({"height": True}, r"height must be an integer number of pixels, a multiple of 4"),
        ({"width": 16.0}, r"width must be an integer number of pixels, a multiple of 4"),
        ({"height": 68}, r"height is 68 px, but this transformer's position table covers at most 64 px"),
        ({"steps": 0}, r"steps must be an integer in \[1, 100000\], got 0"),
        ({"steps": 2.5}, r"steps must be an integer in \[1, 100000\], got 2.5"),
        ({"steps": True}, r"steps must be an integer in \[1, 100000\], got True"),
        ({"steps": 10**9}, r"steps must be an integer in \[1, 100000\], got 1000000000"),
        ({"guidance": -1.0}, r"guidance must be a number >= 0"),
        ({"guidance": float("nan")}, r"guidance must be a number >= 0"),
        ({"guidance": float("inf")}, r"guidance must be a number >= 0"),
        ({"guidance": True}, r"guidance must be a number >= 0, got True"),
        ({"guidance": "7"}, r"guidance must be a number >= 0, got '7'"),
        ({"true_cfg_scale": float("nan")}, r"true_cfg_scale must be a number >= 0"),
        ({"sampler": "dpm"}, r"unknown sampler 'dpm'; choose one of euler, midpoint, heun, rk4"),
        ({"sampler": ["euler"]}, r"unknown sampler \['euler'\]"),
        ({"output": "jpg"}, r"unknown output 'jpg'; choose one of pil, np, pt, latent"),
        ({"num_images": 0}, r"num_images must be an integer >= 1"),
        ({"num_images": True}, r"num_images must be an integer >= 1, got True"),
        ({"negative_prompt": ["a", "b", "c"]}, r"negative_prompt has 3 entries for 2 prompts"),
        ({"negative_prompt": 5}, r"negative_prompt must be a str or a list of str"),
        ({"generator": [torch.Generator()] * 3}, r"got 3 generators for 4 images"),
        ({"generator": "cpu"}, r"generator must be a torch.Generator or a list of them, got 'cpu'"),
        ({"seed": 1, "generator": torch.Generator()}, r"pass seed or generator, not both"),
        ({"seed": [1, 2, 3]}, r"got 3 seeds for 4 images"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*64 - 1\] .*; got -1"),
        ({"seed": 2**64}, r"seed must be an integer in \[0, 2\*\*64 - 1\] .*; got 18446744073709551616"),
        ({"seed": [1, True, 2, 3]}, r"seed must be an integer in \[0, 2\*\*64 - 1\] .*; got True"),
        ({"seed": 1.5}, r"seed must be an integer in \[0, 2\*\*64 - 1\]"),
        ({"seed": []}, r"seed is an empty list"),
        ({"latents": torch.zeros(4, 4, 8, 9)}, r"latents must be a tensor of shape \(4, 4, 8, 8\)"),
        ({"latents": torch.zeros(4, 4, 8, 8, dtype=torch.long)}, r"latents must be a floating-point tensor"),
        ({"latents": torch.zeros(4, 4, 8, 8, device="meta")}, r"latents is on the meta device"),
        (
            {"latents": torch.full((4, 4, 8, 8), float("nan"))},
            r"latents of image\(s\) \[0, 1, 2, 3\] hold NaN or inf \(1024 values\)",
        ),
        ({"latents": [[0.0]]}, r"latents must be a torch.Tensor \(of shape \(4, 4, 8, 8\)\), got list"),
        ({"max_sequence_length": 600}, r"max_sequence_length must be an integer in \[1, 512\]"),
        ({"max_sequence_length": True}, r"max_sequence_length must be an integer in \[1, 512\]"),
        ({"progress": "yes"}, r"progress must be True or False"),
        ({"callback": 5}, r"callback must be a function callback\(i, t, latents\)"),
        ({"true_cfg_scale": 3.0}, r"true_cfg_scale is for Flux"),
    ],
)
def test_bad_arguments(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(["a cat", "a dog"], **{**OK, "num_images": 2, **kwargs})


@pytest.mark.parametrize(
    "prompt, match",
    [
        (123, r"prompt must be a str or a list of str, got int"),
        ([], r"prompt is an empty list"),
        (["a", 3], r"prompt must be a str or a list of str"),
        ("", r"prompt contains an empty prompt"),
        ("   ", r"prompt contains an empty prompt"),
        (None, r"pass a prompt"),
    ],
)
def test_bad_prompts(pipe, prompt, match):
    with pytest.raises(ValueError, match=match):
        pipe(prompt, **OK)


def test_prompt_and_embeddings(pipe):
    e = pipe.encode_prompt(["a cat"], 8)
    with pytest.raises(ValueError, match="pass prompt or prompt_embeds"):
        pipe("a cat", prompt_embeds=e.txt, pooled_prompt_embeds=e.vec, **OK)
    with pytest.raises(ValueError, match="pass prompt_embeds .* and pooled_prompt_embeds"):
        pipe(prompt_embeds=e.txt, **OK)
    with pytest.raises(ValueError, match="pass negative_prompt or negative_prompt_embeds"):
        pipe(
            prompt_embeds=e.txt,
            pooled_prompt_embeds=e.vec,
            negative_prompt="x",
            negative_prompt_embeds=e.txt,
            negative_pooled_prompt_embeds=e.vec,
            **OK,
        )
    # embeddings instead of a prompt give the prompt's image
    kw = {**OK, "steps": 2, "seed": 0, "output": "np"}
    neg = pipe.encode_prompt([""], 8)
    a = pipe("a cat", **kw)
    b = pipe(prompt_embeds=e.txt, pooled_prompt_embeds=e.vec, **kw)
    c = pipe(
        prompt_embeds=e.txt,
        pooled_prompt_embeds=e.vec,
        negative_prompt_embeds=neg.txt,
        negative_pooled_prompt_embeds=neg.vec,
        **kw,
    )
    assert abs(a - b).max() <= 1e-6 and abs(a - c).max() <= 1e-6


def test_missing_component_folder_is_named(folder, tmp_path):
    from mmdit_flow.pipelines import TextToImagePipeline

    broken = shutil.copytree(folder, tmp_path / "broken")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="lacks the component folder.*text_encoder_2"):
        TextToImagePipeline.from_pretrained(broken, device="cpu")
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        TextToImagePipeline.from_pretrained(folder / "vae", device="cpu")


def test_pickle_only_folder_is_refused(folder, pipe, tmp_path):
    from safetensors.torch import load_file

    from mmdit_flow.pipelines import TextToImagePipeline

    pickled = shutil.copytree(folder, tmp_path / "pickled")
    weights = pickled / "text_encoder" / "model.safetensors"
    torch.save(load_file(weights), pickled / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ValueError, match=r"text_encoder holds only pickle weights \(pytorch_model.bin\)"):
        TextToImagePipeline.from_pretrained(pickled, device="cpu")
    from_pickle = TextToImagePipeline.from_pretrained(pickled, device="cpu", allow_pickle=True)
    kw = {**OK, "seed": 0, "output": "np"}
    image = from_pickle("a cat", **kw)
    assert image.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(image, pipe("a cat", **kw))  # the same weights, so the same image


def test_unsupported_folders(folder, tmp_path):
    from mmdit_flow.pipelines import TextToImagePipeline

    other = shutil.copytree(folder, tmp_path / "other")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="supported pipelines are FluxPipeline, StableDiffusion3Pipeline"):
        TextToImagePipeline.from_pretrained(other, device="cpu")
    (other / "model_index.json").write_text(json.dumps(index))
    config_path = other / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_karras_sigmas": True}))
    with pytest.raises(ValueError, match="use_karras_sigmas=True, which this pipeline does not implement"):
        TextToImagePipeline.from_pretrained(other, device="cpu")


def test_demo_model_not_shipped_yet():
    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.pipelines.loading import demo_folder

    try:
        demo_folder()
    except FileNotFoundError:
        with pytest.raises(FileNotFoundError, match="demo model .* is not shipped yet"):
            TextToImagePipeline.from_pretrained(device="cpu")
    else:  # shipped: it loads from no path what the folder's path loads, and generates at its default size
        kw = {"steps": 2, "seed": 0, "output": "np", "progress": False}
        image = TextToImagePipeline.from_pretrained(device="cpu")("a large red circle", **kw)
        by_path = TextToImagePipeline.from_pretrained(demo_folder(), device="cpu")("a large red circle", **kw)
        assert image.shape == (1, 64, 64, 3) and image.std() > 0.05
        np.testing.assert_array_equal(image, by_path)
