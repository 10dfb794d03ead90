"""Likelihoods of image latents: log_likelihood_adaptive, pipelines.likelihood, `mmdit-flow likelihood`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from mmdit_flow.flow import GaussianPath
from mmdit_flow.likelihood import divergence_exact, divergence_per_probe, draw_probes, log_likelihood_adaptive
from mmdit_flow.pipelines.cli import main
from mmdit_flow.pipelines.likelihood import (
    discretized_gaussian_log_prob,
    encode_images,
    image_bound,
    latent_likelihood,
)


def _gaussian(shape: tuple[int, ...], seed: int = 0) -> GaussianPath:
    """N(m, C) over prod(shape) dims, randomly rotated, eigenvalues 0.1 .. 3 (a non-diagonal Jacobian)."""
    d = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.1, 3.0, d, dtype=torch.float64)
    return GaussianPath(0.3 * torch.randn(d, generator=g, dtype=torch.float64), lam, q)


def _image_field(path: GaussianPath):
    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # x [B, C, h, w]
        return path.velocity(x.reshape(x.shape[0], -1), t).reshape(x.shape)

    return field


def test_closed_form_in_latent_dimensions_and_convergence_with_tolerance():
    """16 x 4 x 4 = 256 dims of Gaussian data: the exact-divergence solve equals log N(x; m, C), and its
    error falls as rtol / atol tighten (while the solve takes more evaluations)."""
    shape = (16, 4, 4)
    path = _gaussian(shape)
    x0 = path.sample(3, generator=torch.Generator().manual_seed(1))
    truth = path.log_prob(x0)
    errors, nfes = [], []
    for tol in (1e-2, 1e-4, 1e-6):
        r = log_likelihood_adaptive(_image_field(path), x0.reshape(3, *shape), rtol=tol, atol=tol)
        errors.append((r.log_prob - truth).abs().max().item() / r.dim)  # nats per dim
        nfes.append(r.nfe)
    # measured: 2e-4, 4e-5, 9e-8 nats/dim at 20, 26, 44 evaluations
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6
    assert nfes[0] < nfes[1] < nfes[2]


def test_hutchinson_closed_form_within_its_standard_error():
    shape = (16, 4, 4)
    path = _gaussian(shape, seed=2)
    x0 = path.sample(4, generator=torch.Generator().manual_seed(3))
    r = log_likelihood_adaptive(
        _image_field(path),
        x0.reshape(4, *shape),
        exact=False,
        probes=32,
        probe="gaussian",
        rtol=1e-6,
        atol=1e-6,
        generator=torch.Generator().manual_seed(0),
    )
    z = (r.log_prob - path.log_prob(x0)) / r.stderr
    assert (r.stderr > 0.05).all()  # the probes really vary (measured ~0.5 nats)
    assert z.abs().max() < 4


@pytest.fixture(scope="module")
def pipe():
    from mmdit_flow.pipelines import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(None, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def latents(pipe):
    from mmdit_flow.training.recipes.tiny_shapes import shapes

    scenes = shapes.heldout_scenes(2)
    images = torch.stack([torch.from_numpy(shapes.render(s)) for s in scenes]).permute(0, 3, 1, 2) / 255
    return encode_images(pipe, images), [shapes.caption(s) for s in scenes]


def test_hutchinson_equals_exact_on_the_shipped_transformer(pipe, latents):
    """On a 16 x 2 x 2 crop of noised latents (64 dims: the exact divergence is cheap) at several t, the mean
    of 256 Rademacher probes is within 4 standard errors of the shipped transformer's exact divergence."""
    z, prompts = latents
    e = pipe.encode_prompt(prompts, 32)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    for t in (0.1, 0.5, 0.9):
        x = ((1 - t) * z + t * noise)[:, :, 6:8, 6:8].detach().requires_grad_(True)
        v = pipe.transformer(x, torch.full((2,), t), e.txt, e.vec)
        exact = divergence_exact(v, x)
        probes = draw_probes(256, x.shape, generator=torch.Generator().manual_seed(1))
        per = divergence_per_probe(v, x, probes)  # [B, 256]
        se = per.std(1) / 16
        assert (se > 0.05).all()  # the probes really vary (measured 0.1 .. 0.3)
        assert ((per.mean(1) - exact).abs() < 4 * se).all()


def test_hutchinson_solve_equals_exact_solve_on_a_small_network():
    """A small random conv net as the field on 4 x 4 x 4 latents: the Hutchinson solve (16 probes) is within
    4 of its standard errors of the exact-divergence solve."""
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(5, 32, 3, padding=1), nn.Tanh(), nn.Conv2d(32, 4, 1))

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # x [B, 4, 4, 4]
        tt = t[:, None, None, None].expand(-1, 1, *x.shape[2:])
        return net(torch.cat([x, tt], 1))

    x0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        exact = log_likelihood_adaptive(field, x0, rtol=1e-6, atol=1e-6)
        hutch = log_likelihood_adaptive(field, x0, exact=False, probes=16, rtol=1e-6, atol=1e-6, generator=g)
    assert (hutch.stderr > 0.01).all()
    assert ((hutch.log_prob - exact.log_prob).abs() < 4 * hutch.stderr).all()


def test_cli_on_the_shipped_model(pipe, latents, tmp_path, capsys):
    z, prompts = latents
    save_file({"latents": z.contiguous()}, str(tmp_path / "z.safetensors"))
    out = tmp_path / "r.json"
    argv = ["likelihood", "--latents", str(tmp_path / "z.safetensors"), "--rtol", "1e-2", "--atol", "1e-2"]
    argv += [x for p in prompts for x in ("--prompt", p)] + ["--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    api = latent_likelihood(pipe, z, prompts, rtol=1e-2, atol=1e-2, seed=0)
    bits = [item["bits_per_dim"] for item in got["items"]]
    torch.testing.assert_close(torch.tensor(bits), api.bits_per_dim(), rtol=0, atol=1e-5)
    assert got["nfe"] == api.nfe > 0 and got["dim"] == 16 * 16 * 16 and got["divergence"] == "hutchinson"
    lp = torch.tensor([item["log_prob_nats"] for item in got["items"]])
    torch.testing.assert_close(torch.tensor(bits), -lp / (4096 * math.log(2)), rtol=0, atol=1e-5)
    assert "function evaluations" in printed and f"{bits[0]:.4f}" in printed


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"guidance": 4.0}, "guidance must be 1"),
        ({"steps": 4}, "adaptive solve"),
        ({"divergence": "trace"}, "unknown divergence"),
        ({"rtol": 0.0}, "rtol"),
    ],
)
def test_bad_options_raise_before_any_work(kwargs, words):
    with pytest.raises(ValueError, match=words):
        latent_likelihood(None, torch.zeros(1, 16, 2, 2), "a", **kwargs)  # type: ignore[arg-type]


def test_cli_refuses_guidance(tmp_path, capsys):
    argv = ["likelihood", "--latents", str(tmp_path / "none.safetensors"), "--prompt", "a", "--guidance", "4"]
    assert main(argv) == 2
    assert "guidance must be 1" in capsys.readouterr().err


def test_discretized_gaussian_is_a_distribution_over_256_levels():
    levels = torch.arange(256, dtype=torch.float64) / 255
    for mean, sigma in ((-0.2, 0.01), (0.5, 0.03), (0.37, 0.001), (1.1, 0.5), (0.9, 0.004)):
        lp = discretized_gaussian_log_prob(levels, torch.full((256,), mean), sigma)
        assert torch.isfinite(lp).all()
        torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-9)
    # a middle bin: the plain difference of the normal CDF; a far tail bin: log_ndtr of its upper edge
    normal = torch.distributions.Normal(torch.tensor(0.5, dtype=torch.float64), 0.03)
    k = torch.tensor([130.0], dtype=torch.float64)
    mass = normal.cdf((k + 0.5) / 255) - normal.cdf((k - 0.5) / 255)
    torch.testing.assert_close(discretized_gaussian_log_prob(k / 255, torch.tensor([0.5]), 0.03), mass.log())
    far = discretized_gaussian_log_prob(torch.tensor([0.0]), torch.tensor([0.9]), 0.01)
    edge = torch.special.log_ndtr(torch.tensor([(0.5 / 255 - 0.9) / 0.01], dtype=torch.float64))
    torch.testing.assert_close(far, edge)  # ~ -4000 nats, finite


def test_image_bound_on_the_shipped_model(pipe):
    """The bound on 8-bit images is a bound on -log2 of a probability, so >= 0 bits/dim (dropping the
    entropy or the latent scaling's Jacobian breaks that); its entropy term equals the closed-form entropy
    of the VAE posterior in the transformer's coordinates."""
    from mmdit_flow.training.recipes.tiny_shapes import shapes

    scenes = shapes.heldout_scenes(2)
    images = torch.stack([torch.from_numpy(shapes.render(s)) for s in scenes]).permute(0, 3, 1, 2) / 255
    r = image_bound(pipe, images, [shapes.caption(s) for s in scenes], samples=3, rtol=1e-2, atol=1e-2)
    assert (r.bits_per_dim > 0).all() and (r.stderr > 0).all()
    torch.testing.assert_close(r.bits_per_dim, r.reconstruction_bits + r.latent_bits - r.entropy_bits)
    with torch.no_grad():
        std = pipe.codec.vae.encode(2 * images - 1).latent_dist.std
    d_z = std[0].numel()
    entropy = std.log().flatten(1).sum(1) + d_z * (0.5 * math.log(2 * math.pi * math.e))
    entropy = entropy + d_z * math.log(pipe.codec.scaling_factor)
    torch.testing.assert_close(r.entropy_bits, entropy / (r.dim * math.log(2)), rtol=0, atol=5e-3)
    # measured: about 5.5 bits/dim at pixel_sigma 0.03, nearly all of it the reconstruction term
    assert (r.reconstruction_bits > 4).all() and (r.bits_per_dim < 8).all()


def test_cli_image_bound_equals_the_api(pipe, tmp_path, capsys):
    from PIL import Image

    from mmdit_flow.training.recipes.tiny_shapes import shapes

    scenes = shapes.heldout_scenes(2)
    files = [str(tmp_path / f"{i}.png") for i in range(2)]
    for f, s in zip(files, scenes, strict=True):
        Image.fromarray(shapes.render(s)).save(f)
    out = tmp_path / "r.json"
    argv = ["likelihood", "--image", *files, "--bound", "--rtol", "1e-2", "--atol", "1e-2"]
    argv += ["--json", str(out)]
    argv += [x for s in scenes for x in ("--prompt", shapes.caption(s))]
    assert main(argv) == 0
    assert "upper bound" in capsys.readouterr().out
    got = json.loads(out.read_text())["image_bound"]
    images = torch.stack([torch.from_numpy(shapes.render(s)) for s in scenes]).permute(0, 3, 1, 2) / 255
    api = image_bound(pipe, images, [shapes.caption(s) for s in scenes], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(torch.tensor(got["bits_per_dim"]), api.bits_per_dim, rtol=0, atol=1e-5)
    assert got["pixel_sigma"] == 0.03 and got["samples"] == 2


def test_a_few_step_grid_warns_and_is_far_off():
    from mmdit_flow.likelihood import log_likelihood

    path = _gaussian((4,), seed=4)
    x0 = path.sample(8, generator=torch.Generator().manual_seed(5))
    with pytest.warns(UserWarning, match="few-step"):
        one = log_likelihood(path.velocity, x0, steps=1, method="euler")
    adaptive = log_likelihood_adaptive(path.velocity, x0, rtol=1e-6, atol=1e-6).log_prob
    torch.testing.assert_close(adaptive, path.log_prob(x0), rtol=0, atol=1e-3)
    assert (one - path.log_prob(x0)).abs().mean() > 0.1  # measured: far off at 1 Euler step
