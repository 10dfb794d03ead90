"""Flux pipeline parity: our Flux transformer (loaded by load_transformer) in our pipeline against diffusers'
FluxPipeline on the same tiny random components, CPU fp32: max |difference| <= 1e-3 on [0, 1] images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from components import flux_components, save_diffusers_folder

TOL = 1e-3
SMALL = {"max_sequence_length": 16}


def _load(folder):
    from diffusers import FluxPipeline

    from mmdit_flow.pipelines import TextToImagePipeline

    ours = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    ref = FluxPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return _load(save_diffusers_folder(flux_components(), tmp_path_factory.mktemp("flux-dev")))


def _pair(ours, ref, prompt, *, seed=0, steps=3, n=1, guidance=None, negative=None, true_cfg=1.0, **kw):
    gen = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    ref_kw = {"guidance_scale": guidance} if guidance is not None else {}
    a = ref(
        prompt,
        num_inference_steps=steps,
        generator=gen,
        num_images_per_prompt=n,
        negative_prompt=negative,
        true_cfg_scale=true_cfg,
        output_type="np",
        **ref_kw,
        **SMALL,
        **kw,
    ).images
    b = ours(
        prompt,
        steps=steps,
        guidance=guidance,
        seed=seed,
        num_images=n,
        negative_prompt=negative,
        true_cfg_scale=true_cfg,
        output="np",
        progress=False,
        **SMALL,
        **kw,
    )
    return a, b


@pytest.mark.parametrize(
    "prompt, kw",
    [
        ("a photo of a cat", {"height": 16, "width": 16}),
        (["a photo of a cat", "the red dog"], {"height": 16, "width": 24, "n": 2, "guidance": 5.0}),
        (["a cat", "blue"], {"height": 24, "width": 8, "negative": ["blurry", "bad dog"], "true_cfg": 4.0}),
        ("a dog", {"height": 32, "width": 16, "steps": 5, "seed": [11]}),
    ],
)
def test_dev_images_equal_diffusers(dev, prompt, kw):
    ours, ref = dev
    a, b = _pair(ours, ref, prompt, **kw)
    assert a.shape == b.shape and np.abs(a - b).max() <= TOL
    assert a.std() > 0.05


def test_guidance_embedding_is_used(dev):
    ours, _ = dev
    kw = dict(steps=2, seed=0, height=16, width=16, output="np", progress=False, **SMALL)
    assert np.abs(ours("a cat", guidance=1.0, **kw) - ours("a cat", guidance=6.0, **kw)).max() > 1e-2


def test_schnell_equals_diffusers_and_rejects_guidance(tmp_path):
    ours, ref = _load(save_diffusers_folder(flux_components(guidance_embeds=False), tmp_path))
    a, b = _pair(ours, ref, ["a cat", "a red dog"], height=16, width=24, n=2, seed=[1, 2, 3, 4])
    assert np.abs(a - b).max() <= TOL
    with pytest.raises(ValueError, match="no guidance embedding"):
        ours("a cat", guidance=3.5, steps=1, height=16, width=16, progress=False)


def test_batch_item_equals_single_run(dev):
    ours, _ = dev
    kw = dict(steps=3, height=16, width=16, output="np", progress=False, **SMALL)
    batch = ours(["a cat", "the blue dog"], seed=[5, 6], **kw)
    for i, (p, s) in enumerate([("a cat", 5), ("the blue dog", 6)]):
        np.testing.assert_allclose(batch[i], ours(p, seed=s, **kw)[0], atol=1e-5)


def test_latents_are_unpacked_and_accepted(dev):
    """Our Flux latents are [N, C, h, w]; diffusers takes them packed [N, h/2 * w/2, 4C]."""
    from diffusers import FluxPipeline

    ours, ref = dev
    latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    packed = FluxPipeline._pack_latents(latents, 1, 4, 8, 12)
    a = ref(
        "a cat", num_inference_steps=3, latents=packed, height=16, width=24, output_type="np", **SMALL
    ).images
    b = ours("a cat", steps=3, latents=latents, height=16, width=24, output="np", progress=False, **SMALL)
    assert np.abs(a - b).max() <= TOL
    z = ours("a cat", steps=3, latents=latents, height=16, width=24, output="latent", progress=False, **SMALL)
    assert z.shape == (1, 4, 8, 12)


def test_save_pretrained_loads_in_diffusers(dev, tmp_path):
    ours, _ = dev
    ours.save_pretrained(tmp_path / "saved")
    again, ref = _load(tmp_path / "saved")
    a, b = _pair(again, ref, "a photo of a cat", height=16, width=24)
    c = ours("a photo of a cat", steps=3, seed=0, height=16, width=24, output="np", progress=False, **SMALL)
    assert np.abs(a - b).max() <= TOL and np.abs(b - c).max() <= 1e-6  # the same weights
