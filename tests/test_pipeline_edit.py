"""Image-to-image and inpainting (pipelines/edit.py) against diffusers' StableDiffusion3Img2ImgPipeline,
FluxImg2ImgPipeline, StableDiffusion3InpaintPipeline and FluxInpaintPipeline on the same tiny random
components, CPU fp32: max |difference| <= 1e-3 on [0, 1] images, for the same seed and settings."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from components import _randomize, flux_components, save_diffusers_folder, sd3_components, vae
from PIL import Image

from mmdit_flow.pipelines.edit import start_index

TOL = 1e-3
SMALL = {"max_sequence_length": 16}


def _rand_image(h: int, w: int, seed: int = 9, n: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _mask(h: int, w: int, n: int = 1) -> torch.Tensor:
    m = torch.zeros(n, 1, h, w)
    m[..., h // 4 : 3 * h // 4, w // 3 : w - 2] = 1
    return m


def _gens(seed):
    if isinstance(seed, list):
        return [torch.Generator().manual_seed(s) for s in seed]
    return torch.Generator().manual_seed(seed)


def _load(folder, *classes):
    from mmdit_flow.pipelines import TextToImagePipeline

    ours = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    refs = []
    for cls in classes:
        ref = cls.from_pretrained(folder)
        ref.set_progress_bar_config(disable=True)
        refs.append(ref)
    return ours, *refs


def sd3_inpaint_components(shift_factor: float = 0.0) -> dict:
    """Tiny SD3 components with 16 latent channels: diffusers' SD3 inpaint pipeline takes only
    transformers of 16 (or 33) input channels."""
    from diffusers import SD3Transformer2DModel

    components = sd3_components()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        caption_projection_dim=16,
        pooled_projection_dim=24,
        pos_embed_max_size=16,
    )
    components["transformer"] = _randomize(transformer, 1, scale=0.12)
    components["vae"] = vae(16, seed=2, shift_factor=shift_factor, scaling_factor=1.5035)
    return components


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from diffusers import StableDiffusion3Img2ImgPipeline

    return _load(
        save_diffusers_folder(sd3_components(), tmp_path_factory.mktemp("sd3")),
        StableDiffusion3Img2ImgPipeline,
    )


@pytest.fixture(scope="module")
def sd3_16(tmp_path_factory):
    from diffusers import StableDiffusion3InpaintPipeline

    folder = save_diffusers_folder(sd3_inpaint_components(), tmp_path_factory.mktemp("sd3-16"))
    return _load(folder, StableDiffusion3InpaintPipeline)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

    folder = save_diffusers_folder(flux_components(), tmp_path_factory.mktemp("flux"))
    return _load(folder, FluxImg2ImgPipeline, FluxInpaintPipeline)


def _pair(ours, ref, prompt, *, seed=0, steps=5, n=1, guidance=None, negative=None, **kw):
    """(diffusers' images, ours) for the same arguments; ``guidance`` given to both (diffusers' Flux editing
    pipelines default to 7, FluxPipeline and ours to 3.5)."""
    ref_kw = {"guidance_scale": guidance} if guidance is not None else {}
    a = ref(
        prompt,
        num_inference_steps=steps,
        generator=_gens(seed),
        num_images_per_prompt=n,
        negative_prompt=negative,
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
        output="np",
        progress=False,
        **SMALL,
        **kw,
    )
    return a, b


def _close(a, b):
    assert a.shape == b.shape and b.dtype == np.float32
    assert np.abs(a - b).max() <= TOL
    assert a.std() > 0.05  # not flat images: the comparison means something


# ------------------------------------------------------------------------------------------ image-to-image

IMG2IMG_CASES = [
    ("a photo of a cat", {"strength": 0.6}),
    ("a cat", {"strength": 0.3, "steps": 7}),
    ("a cat", {"strength": 0.95, "steps": 4}),  # rounds to all 4 steps, from t = 1 after the posterior draw
    (["a cat", "the red dog"], {"strength": 0.5, "n": 2}),  # one image for 4, one generator
    (["a cat", "a dog"], {"strength": 0.7, "seed": [3, 4], "batch": 2}),  # image i with generator i
    ("a dog", {"strength": 0.8, "negative": "blurry", "pil": True}),
]


def _img2img_kwargs(kw: dict, h=16, w=24) -> dict:
    kw = dict(kw)
    image = _rand_image(h, w, n=kw.pop("batch", 1))
    if kw.pop("pil", False):
        image = _pil(image[0])
    return {"image": image, "height": h, "width": w, **kw}


@pytest.mark.parametrize("prompt, kw", IMG2IMG_CASES)
def test_sd3_img2img_equals_diffusers(sd3, prompt, kw):
    ours, ref = sd3
    _close(*_pair(ours, ref, prompt, **_img2img_kwargs(kw)))


@pytest.mark.parametrize("prompt, kw", IMG2IMG_CASES)
def test_flux_img2img_equals_diffusers(flux, prompt, kw):
    ours, ref, _ = flux
    guidance = 5.0 if "negative" not in kw else 3.5
    _close(*_pair(ours, ref, prompt, guidance=guidance, **_img2img_kwargs(kw)))


def test_flux_true_cfg_img2img_equals_diffusers(flux):
    ours, ref, _ = flux
    kw = _img2img_kwargs({"strength": 0.6})
    _close(*_pair(ours, ref, "a cat", guidance=3.5, negative="bad dog", true_cfg_scale=4.0, **kw))


def test_strength_rounds_to_a_step_as_diffusers(sd3, flux):
    """The first time and the steps left equal diffusers' get_timesteps on its own schedules."""
    for (ours, ref), h, w in ((sd3, 16, 24), (flux[:2], 32, 16)):
        full = ours._grid(10, h // 2, w // 2)
        for steps, strength in [(10, 0.6), (10, 0.55), (10, 0.05), (10, 1.0), (7, 0.3), (3, 0.5), (28, 0.33)]:
            grid = full if steps == 10 else ours._grid(steps, h // 2, w // 2)
            kwargs = {}
            if ours.family == "flux" or ref.scheduler.config.use_dynamic_shifting:
                from diffusers.pipelines.flux.pipeline_flux import calculate_shift

                seq = (h // 4) * (w // 4)
                c = ref.scheduler.config
                mu = calculate_shift(
                    seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift
                )
                kwargs = {"mu": mu, "sigmas": np.linspace(1.0, 1 / steps, steps)}
            ref.scheduler.set_timesteps(steps, **kwargs)
            times, left = ref.get_timesteps(steps, strength, "cpu")
            skip = start_index(steps, strength)
            assert steps - skip == left
            np.testing.assert_allclose(grid[skip:-1].numpy(), times.numpy() / 1000, rtol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_strength_one_equals_text_to_image(sd3, flux, family):
    ours = sd3[0] if family == "sd3" else flux[0]
    kw = dict(steps=4, seed=[5, 6], output="np", progress=False, **SMALL)
    edited = ours(["a cat", "a red dog"], image=_rand_image(16, 24), strength=1.0, **kw)
    plain = ours(["a cat", "a red dog"], height=16, width=24, **kw)
    np.testing.assert_array_equal(edited, plain)
    partial = ours(["a cat", "a red dog"], image=_rand_image(16, 24), strength=0.5, **kw)
    assert np.abs(partial - plain).max() > 0.05  # below 1 the image shows


def test_image_formats_give_the_same_images(sd3):
    ours, ref = sd3
    t = _rand_image(16, 24)
    kw = dict(strength=0.6, steps=3, seed=1, output="np", progress=False, **SMALL)
    u8 = (t[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    base = ours("a cat", image=_pil(t[0]), **kw)
    for image in (u8, u8[None], u8.astype(np.float32) / 255, torch.from_numpy(u8).permute(2, 0, 1)):
        np.testing.assert_allclose(ours("a cat", image=image, **kw), base, atol=1e-6)
    ref_out = ref(
        "a cat",
        image=_pil(t[0]),
        strength=0.6,
        num_inference_steps=3,
        generator=_gens(1),
        output_type="np",
        height=16,
        width=24,
        **SMALL,
    ).images
    assert np.abs(ref_out - base).max() <= TOL


def test_images_are_resized_as_diffusers_resizes_them(sd3):
    """A PIL image of another size is resized with Lanczos, a tensor by nearest neighbour; an unset size
    is the image's own rounded down to a multiple of 4 px (VAE scale 2 x patch 2)."""
    ours, ref = sd3
    big = _rand_image(27, 42, seed=3)
    for image in (_pil(big[0]), big):
        _close(*_pair(ours, ref, "a cat", image=image, strength=0.7, steps=4, height=16, width=24))
    out = ours("a cat", image=big, strength=0.7, steps=4, seed=0, output="np", progress=False, **SMALL)
    assert out.shape == (1, 24, 40, 3)
    a, _ = _pair(ours, ref, "a cat", image=big, strength=0.7, steps=4, height=24, width=40)
    assert np.abs(a - out).max() <= TOL


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"strength": 0}, r"strength must be a number in \(0, 1\].*at 0 nothing would be generated"),
        ({"strength": -0.5}, r"strength must be a number in \(0, 1\]"),
        ({"strength": 1.5}, r"strength must be a number in \(0, 1\]"),
        ({"strength": float("nan")}, r"strength must be a number in \(0, 1\]"),
        ({"strength": True}, r"strength must be a number in \(0, 1\]"),
        ({"strength": "0.5"}, r"strength must be a number in \(0, 1\]"),
        ({"strength": 1e-20}, "leaves no step to run"),
        ({"image": None, "strength": 0.5}, "strength is for image-to-image and inpainting"),
        ({"image": None, "mask_image": torch.ones(16, 24)}, "mask_image needs the image"),
        ({"latents": torch.zeros(1, 4, 8, 12)}, "pass image or latents, not both"),
        ({"image": "cat.png"}, "image must be a PIL image"),
        ({"image": torch.rand(1, 4, 16, 24)}, "image must be RGB"),
        ({"image": np.random.rand(16, 24, 1)}, "image must be RGB"),
        ({"image": torch.rand(16, 24)}, "image must have 3 or 4 dimensions"),
        ({"image": torch.rand(1, 3, 16, 24) * 2 - 1}, r"in \[0, 1\].*\(x \+ 1\) / 2"),
        ({"image": torch.rand(1, 3, 16, 24) * 255}, r"in \[0, 1\].*x / 255"),
        ({"image": torch.full((1, 3, 16, 24), float("nan"))}, "image holds NaN"),
        ({"image": torch.zeros(1, 3, 16, 24, dtype=torch.int32)}, "must hold float"),
        ({"image": torch.rand(3, 3, 16, 24)}, "got 3 images for 2 images"),
        ({"image": torch.rand(1, 3, 3, 24), "height": None}, "image is 3x24 px, smaller than 4 px"),
        ({"image": torch.rand(1, 3, 0, 24), "height": 16}, "image is empty"),
    ],
)
def test_bad_edit_arguments(sd3, kw, match):
    ours, _ = sd3
    args = {"image": _rand_image(16, 24), "height": 16, "width": 24, "steps": 4, "progress": False, **kw}
    args = {k: v for k, v in args.items() if not (k == "height" and v is None)}
    with pytest.raises(ValueError, match=match):
        ours(["a cat", "a dog"], **args)


# ---------------------------------------------------------------------------------------------- inpainting

INPAINT_CASES = [
    ("a photo of a cat", {"strength": 0.6}),
    ("a cat", {"strength": 1.0, "steps": 4}),
    (["a cat", "the red dog"], {"strength": 0.8, "n": 2}),
    (["a cat", "a dog"], {"strength": 0.7, "seed": [3, 4], "batch": 2}),
    ("a dog", {"strength": 0.9, "pil": True, "negative": "blurry"}),  # PIL mask of another size
]


def _inpaint_kwargs(kw: dict, h=16, w=24) -> dict:
    kw = dict(kw)
    batch = kw.pop("batch", 1)
    image, mask = _rand_image(h, w, n=batch), _mask(h, w, n=batch)
    if kw.pop("pil", False):
        image = _pil(image[0])
        mask = Image.fromarray((_mask(2 * h, 3 * w)[0, 0].numpy() * 255).astype(np.uint8))
    return {"image": image, "mask_image": mask, "height": h, "width": w, **kw}


@pytest.mark.parametrize("prompt, kw", INPAINT_CASES)
def test_sd3_inpaint_equals_diffusers(sd3_16, prompt, kw):
    ours, ref = sd3_16
    _close(*_pair(ours, ref, prompt, **_inpaint_kwargs(kw)))


@pytest.mark.parametrize("prompt, kw", INPAINT_CASES)
def test_flux_inpaint_equals_diffusers(flux, prompt, kw):
    ours, _, ref = flux
    _close(*_pair(ours, ref, prompt, guidance=4.0, **_inpaint_kwargs(kw)))


def test_sd3_inpaint_latents_equal_diffusers_with_a_shift_factor(tmp_path):
    """diffusers' SD3 inpaint pipeline decodes without the VAE's shift factor; its latents equal ours."""
    from diffusers import StableDiffusion3InpaintPipeline

    folder = save_diffusers_folder(sd3_inpaint_components(shift_factor=0.0609), tmp_path)
    ours, ref = _load(folder, StableDiffusion3InpaintPipeline)
    kw = _inpaint_kwargs({"strength": 0.7})
    a = ref("a cat", num_inference_steps=4, generator=_gens(0), output_type="latent", **SMALL, **kw).images
    b = ours("a cat", steps=4, seed=0, output="latent", progress=False, **SMALL, **kw)
    assert a.shape == b.shape and torch.abs(a - b).max() <= TOL
    images = ours("a cat", steps=4, seed=0, output="pt", progress=False, **SMALL, **kw)
    torch.testing.assert_close(images, ours.codec.decode(b))  # decoded with the shift, as text-to-image


def test_inpaint_keeps_the_unmasked_region(flux):
    """At t = 0 the latent outside the mask is the image's own latent (the posterior sample, drawn first
    from the seed's generator), and the callback sees every step, ending on that state."""
    ours, _, _ = flux
    image, mask = _rand_image(16, 24), _mask(16, 24)
    seen = []
    z = ours(
        "a cat",
        image=image,
        mask_image=mask,
        strength=0.8,
        steps=5,
        seed=2,
        output="latent",
        progress=False,
        callback=lambda i, t, x: seen.append((i, t, x.clone())),
        **SMALL,
    )
    x0 = ours.codec.encode(image, torch.Generator().manual_seed(2))
    keep = torch.nn.functional.interpolate(mask, size=(8, 12)) == 0
    keep = keep.expand_as(z)
    torch.testing.assert_close(z[keep], x0[keep], rtol=0, atol=1e-6)
    assert (z[~keep] - x0[~keep]).abs().max() > 0.1  # the masked region was generated
    assert [i for i, _, _ in seen] == [0, 1, 2, 3] and seen[-1][1] == 0.0  # int(5 - 4) = 1 step skipped
    torch.testing.assert_close(seen[-1][2], z)


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.zeros(16, 24), r"mask_image \[0\] marks nothing to regenerate"),
        (torch.full((16, 24), 0.4), r"marks nothing to regenerate: white \(values >= 0.5\)"),
        (torch.zeros(1, 1, 16, 24).index_fill_(2, torch.tensor([1]), 1.0), "once shrunk to the latent size"),
        (torch.ones(3, 16, 24), "got 3 mask_images for 2 images"),
        (torch.ones(1, 3, 16, 24), "mask_image must be one channel"),
        (np.ones((16, 24, 3)), "looks like an RGB"),
        (np.ones((1, 16, 24, 3)), "mask_image must be one channel"),
        (torch.full((16, 24), 2.0), r"mask_image values must lie in \[0, 1\]"),
        (np.ones((16, 24), dtype=np.int64), "must hold float"),
        (torch.ones(0, 24), "mask_image is empty"),
        ([1, 0], "mask_image must be a PIL image"),
    ],
)
def test_bad_masks(flux, mask, match):
    ours = flux[0]
    with pytest.raises(ValueError, match=match):
        ours(["a cat", "a dog"], image=_rand_image(16, 24), mask_image=mask, steps=3, progress=False)


def test_mask_formats_give_the_same_images(flux):
    ours = flux[0]
    m = _mask(16, 24)[0, 0]
    kw = dict(image=_rand_image(16, 24), strength=0.9, steps=3, seed=4, output="np", progress=False, **SMALL)
    base = ours("a cat", mask_image=Image.fromarray((m.numpy() * 255).astype(np.uint8)), **kw)
    for mask in (m.numpy() > 0.5, m.numpy()[..., None], m[None].numpy(), m[None], m[None, None], m):
        np.testing.assert_array_equal(ours("a cat", mask_image=mask, **kw), base)


# ------------------------------------------------------------------------------------------ command line


def test_generate_cli_edits_an_image(flux, tmp_path, capsys):
    from mmdit_flow.pipelines.cli import main

    ours = flux[0]
    folder = tmp_path / "model"
    ours.save_pretrained(folder)
    source = _pil(_rand_image(16, 24)[0])
    source.save(tmp_path / "in.png")
    mask = Image.fromarray((_mask(16, 24)[0, 0].numpy() * 255).astype(np.uint8))
    mask.save(tmp_path / "mask.png")
    base = ["generate", "a cat", "--model", str(folder), "--steps", "4", "--seed", "3"]
    base += [
        "--max-sequence-length",
        "16",
        "--device",
        "cpu",
        "--no-progress",
        "--image",
        str(tmp_path / "in.png"),
    ]
    kw = dict(image=source, steps=4, seed=3, progress=False, **SMALL)
    for extra, call in (
        (["--strength", "0.5"], {"strength": 0.5}),
        (["--mask", str(tmp_path / "mask.png")], {"mask_image": mask}),
    ):
        out = tmp_path / "out.png"
        assert main([*base, *extra, "-o", str(out)]) == 0
        assert capsys.readouterr().out.strip() == str(out)
        written = np.asarray(Image.open(out))
        assert written.shape == (16, 24, 3)  # the image's size
        np.testing.assert_array_equal(written, np.asarray(ours("a cat", **call, **kw)))


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--strength", "0.5"], "--strength needs --image"),
        (["--mask", "m.png"], "--mask needs --image"),
        (["--image", "missing.png"], "--image missing.png: no such file"),
        (["--image", "{in}", "--strength", "0"], r"--strength must be a number in \(0, 1\]"),
        (["--image", "{in}", "--mask", "{bad}"], "--mask .*bad.png: cannot read the image"),
    ],
)
def test_generate_cli_edit_errors_before_loading_a_model(tmp_path, capsys, extra, match):
    from mmdit_flow.pipelines.cli import main

    _pil(_rand_image(16, 24)[0]).save(tmp_path / "in.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    extra = [e.format(**{"in": tmp_path / "in.png", "bad": tmp_path / "bad.png"}) for e in extra]
    missing = tmp_path / "no-such-model"  # never read: the arguments are checked first
    argv = ["generate", "a cat", "--model", str(missing), "-o", str(tmp_path / "o.png"), *extra]
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)
