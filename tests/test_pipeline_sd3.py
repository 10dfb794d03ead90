"""SD3 / SD3.5 pipeline parity: our transformer (loaded by load_transformer) in our pipeline against
diffusers' StableDiffusion3Pipeline on the same tiny random components, CPU fp32: max |difference| <= 1e-3
on [0, 1] images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from components import save_diffusers_folder, sd3_components

TOL = 1e-3
SMALL = {"max_sequence_length": 16}


def _load(folder, **ref_kwargs):
    from diffusers import StableDiffusion3Pipeline

    from mmdit_flow.pipelines import TextToImagePipeline

    ours = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    ref = StableDiffusion3Pipeline.from_pretrained(folder, **ref_kwargs)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return _load(save_diffusers_folder(sd3_components(), tmp_path_factory.mktemp("sd3")))


def _ref(ref, prompt, *, seed=0, steps=3, guidance=7.0, n=1, **kw):
    gen = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    return ref(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=gen,
        num_images_per_prompt=n,
        output_type="np",
        **SMALL,
        **kw,
    ).images


def _ours(ours, prompt, *, seed=0, steps=3, guidance=7.0, n=1, **kw):
    return ours(
        prompt,
        steps=steps,
        guidance=guidance,
        seed=seed,
        num_images=n,
        output="np",
        progress=False,
        **SMALL,
        **kw,
    )


@pytest.mark.parametrize(
    "prompt, kw",
    [
        ("a photo of a cat", {"height": 16, "width": 16}),
        (["a photo of a cat", "the red dog"], {"height": 16, "width": 24, "n": 2}),  # non-square, batch x 2
        (["a cat", "blue"], {"height": 24, "width": 8, "negative_prompt": ["blurry", "bad dog"]}),
        ("a dog", {"height": 16, "width": 16, "guidance": 1.0}),  # no CFG: one forward
        ("a dog", {"height": 16, "width": 16, "guidance": 3.0, "steps": 6, "negative_prompt": "bad"}),
    ],
)
def test_images_equal_diffusers(sd3, prompt, kw):
    ours, ref = sd3
    a, b = _ref(ref, prompt, **kw), _ours(ours, prompt, **kw)
    assert a.shape == b.shape and b.dtype == np.float32
    assert np.abs(a - b).max() <= TOL
    assert a.std() > 0.05  # the images are not flat: the comparison means something


def test_batch_item_equals_single_run(sd3):
    ours, _ = sd3
    prompts = ["a photo of a cat", "the blue dog", "red"]
    batch = _ours(ours, prompts, seed=[3, 4, 5], height=16, width=16, negative_prompt=["bad", "", "blurry"])
    for i, (p, s, neg) in enumerate(zip(prompts, [3, 4, 5], ["bad", "", "blurry"], strict=True)):
        single = _ours(ours, p, seed=s, height=16, width=16, negative_prompt=neg)
        np.testing.assert_allclose(batch[i], single[0], atol=1e-5)


def test_generator_list_and_latents_input_equal_diffusers(sd3):
    ours, ref = sd3
    a = _ref(ref, ["a cat", "a dog"], seed=[7, 8], height=16, width=16)
    b = _ours(ours, ["a cat", "a dog"], seed=[7, 8], height=16, width=16)
    assert np.abs(a - b).max() <= TOL
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a = ref(
        ["a cat", "a dog"],
        num_inference_steps=3,
        latents=latents,
        output_type="np",
        height=16,
        width=16,
        **SMALL,
    ).images
    b = ours(
        ["a cat", "a dog"],
        steps=3,
        latents=latents,
        output="np",
        height=16,
        width=16,
        progress=False,
        **SMALL,
    )
    assert np.abs(a - b).max() <= TOL


@pytest.mark.parametrize("variant", [{"t5": False}, {"sd35": True, "dynamic": True}])
def test_variants_equal_diffusers(tmp_path, variant):
    """SD3 without T5 (zeros in its place) and SD3.5 (qk-norm, dual attention) with a dynamic shift."""
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if not variant.get("t5", True) else {}
    ours, ref = _load(save_diffusers_folder(sd3_components(**variant), tmp_path), **no_t5)
    if not variant.get("t5", True):
        assert "text_encoder_3" not in ours.components.text_encoders
    a = _ref(ref, ["a cat", "red dog"], height=16, width=24, n=2)
    b = _ours(ours, ["a cat", "red dog"], height=16, width=24, n=2)
    assert np.abs(a - b).max() <= TOL


def test_save_pretrained_loads_in_diffusers(sd3, tmp_path):
    ours, _ = sd3
    ours.save_pretrained(tmp_path / "saved")
    again, ref = _load(tmp_path / "saved")
    a = _ref(ref, "a photo of a cat", height=16, width=24, negative_prompt="bad")
    b = _ours(ours, "a photo of a cat", height=16, width=24, negative_prompt="bad")
    c = _ours(again, "a photo of a cat", height=16, width=24, negative_prompt="bad")
    assert np.abs(a - b).max() <= TOL and np.abs(b - c).max() <= 1e-6  # the same weights


def test_outputs_and_return_types(sd3):
    ours, _ = sd3
    kw = dict(steps=2, seed=1, height=16, width=16, progress=False, **SMALL)
    pil = ours("a cat", **kw)
    assert not isinstance(pil, list) and pil.size == (16, 16)
    arr = ours("a cat", output="np", **kw)
    pt = ours("a cat", output="pt", **kw)
    np.testing.assert_array_equal(np.asarray(pil), (arr[0] * 255).round().astype(np.uint8))
    np.testing.assert_array_equal(pt.permute(0, 2, 3, 1).numpy(), arr)
    listed = ours(["a cat"], **kw)
    assert isinstance(listed, list) and len(listed) == 1
    assert len(ours("a cat", num_images=3, **kw)) == 3
    latent = ours("a cat", output="latent", **kw)
    assert latent.shape == (1, 4, 8, 8) and latent.dtype == torch.float32
    np.testing.assert_allclose(ours.codec.decode(latent).numpy(), pt.numpy(), atol=1e-6)


def test_batched_cfg_one_forward_per_step_and_callback(sd3):
    ours, _ = sd3
    calls, seen = [], []
    hook = ours.transformer.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        z = ours(
            "a cat",
            steps=4,
            seed=0,
            height=16,
            width=16,
            output="latent",
            progress=False,
            callback=lambda i, t, x: seen.append((i, t, x.clone())),
            num_images=2,
            **SMALL,
        )
        assert calls == [4] * 4  # cond + uncond of 2 images in one forward, once per step
        calls.clear()
        ours(
            "a cat",
            steps=4,
            seed=0,
            height=16,
            width=16,
            output="latent",
            progress=False,
            sampler="heun",
            **SMALL,
        )
        assert calls == [2] * 7  # heun: 2 evaluations per step, plain Euler onto t = 0
    finally:
        hook.remove()
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    ts = [t for _, t, _ in seen]
    assert ts == sorted(ts, reverse=True) and ts[-1] == 0.0
    torch.testing.assert_close(seen[-1][2], z)


def test_bf16_network_keeps_fp32_state(tmp_path):
    from mmdit_flow.pipelines import TextToImagePipeline

    folder = save_diffusers_folder(sd3_components(), tmp_path)
    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.bfloat16)
    assert next(pipe.transformer.parameters()).dtype == torch.bfloat16
    assert pipe.codec.dtype == torch.float32  # force_upcast: the VAE decodes in fp32
    states = []
    out = pipe(
        "a cat",
        steps=2,
        seed=0,
        height=16,
        width=16,
        output="np",
        progress=False,
        callback=lambda i, t, x: states.append(x.dtype),
        **SMALL,
    )
    assert states == [torch.float32] * 2 and np.isfinite(out).all()
    fp16 = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float16)
    assert (
        next(fp16.components.text_encoders["text_encoder_3"].parameters()).dtype == torch.float32
    )  # T5 never fp16


def test_offload_gives_same_images(tmp_path, sd3):
    from mmdit_flow.pipelines import TextToImagePipeline

    ours, _ = sd3
    folder = save_diffusers_folder(sd3_components(), tmp_path)
    off = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, offload=True)
    np.testing.assert_array_equal(
        _ours(off, "a cat", height=16, width=16), _ours(ours, "a cat", height=16, width=16)
    )


def test_non_finite_latents_raise_before_decoding(sd3):
    from mmdit_flow.pipelines.vae import NonFiniteLatentsError

    ours, _ = sd3
    latents = torch.zeros(2, 4, 8, 8)
    latents[1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLatentsError, match=r"image\(s\) \[1\]"):
        ours(["a", "b"], steps=2, latents=latents, height=16, width=16, progress=False, **SMALL)
