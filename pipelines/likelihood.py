"""Exact log-likelihoods of latents under a pipeline's transformer, in bits per dimension.

The transformer's conditional velocity field v(x, t | prompt) is a flow from the latent data (t = 0) to
N(0, I) (t = 1), so ``mmdit_flow.likelihood`` gives log p(z | prompt) by the instantaneous change of
variables, solved with the adaptive Dormand-Prince solver (``sampling.solve_adaptive``):

    log p(z) = log N(z_1; 0, I) + integral_0^1 div v(z_t, t) dt,    bits/dim = -log p(z) / (D ln 2)

with D = C * h * w the latent's dimensions (z as the transformer sees it: the VAE latent shifted and scaled,
``LatentCodec.encode``). Only guidance 1 is a density: classifier-free guidance mixes two fields into one
that is no flow of any distribution, so other guidance is refused. A fixed few-step grid is refused too:
Euler on a few steps gives values far from (mostly below) the true density, so the solve is always adaptive
with tolerances ``rtol`` / ``atol``. The divergence is exact for D <= ``EXACT_MAX_DIM`` (D backward passes
per evaluation) and otherwise a Hutchinson estimate with K probes (K backward passes) and its standard error.

Images are scored two ways. ``encode_images`` + ``latent_likelihood``: the exact bits/dim of the latent of
the VAE posterior mean (a number about latents, not pixels). ``image_bound``: an upper bound on the bits/dim
of the 8-bit image itself, -log2 P(x) / (3 H W), from the evidence lower bound (ELBO) with the VAE posterior
q(z | x) = N(mu, diag s^2) (in the transformer's scaled latent coordinates) as the variational distribution:

    log P(x) >= E_q [ log P(x | z) + log p(z | prompt) - log q(z | x) ]

P(x | z) is a discretized Gaussian around the decoded image D(z) in [0, 1]: each channel value k / 255 gets
the N(D(z), sigma^2) mass of [(k - 0.5) / 255, (k + 0.5) / 255], the end bins extended to -inf and +inf (a
proper distribution over the 256 levels; the bound holds for any ``pixel_sigma``, and is tightest near the
VAE's RMS reconstruction error). p(z | prompt) is the flow's exact log-density (Hutchinson-estimated,
unbiased). The expectation is a Monte Carlo mean over ``samples`` posterior draws, with its standard error.
The bound is loose by the KL from q to the true posterior, and the VAE decoder carries no likelihood of its
own (this Gaussian is our choice), so it is an upper bound on the bits/dim of that model, not an exact value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mmdit_flow.likelihood import PROBES, LikelihoodResult, log_likelihood_adaptive
from mmdit_flow.pipelines import checks

if TYPE_CHECKING:  # pragma: no cover
    from mmdit_flow.pipelines.pipeline import TextToImagePipeline

DIVERGENCES = ("auto", "exact", "hutchinson")
EXACT_MAX_DIM = 64  # "auto" takes the exact divergence up to this many latent dimensions


def encode_images(pipe: TextToImagePipeline, images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> the latents [B, C, H / s, W / s] of the VAE posterior mean (fp32)."""
    checks._check_tensor(images, "images", "[B, 3, H, W] in [0, 1]")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}")
    with pipe._on_device(pipe.codec.vae):
        return pipe.codec.encode(images.float())


def _check_options(guidance: Any, steps: Any, divergence: str, probe: str, rtol: Any, atol: Any) -> None:
    if guidance is not None and guidance != 1:
        raise ValueError(
            f"guidance must be 1 for a likelihood, got {guidance!r}: classifier-free guidance combines two "
            "velocity fields into one that is not the flow of any density; leave guidance unset"
        )
    if steps is not None:
        raise ValueError(
            f"steps={steps!r}: a likelihood needs the adaptive solve, not a fixed grid (few-step Euler gives "
            "values far from the true density); leave steps unset and set the accuracy with rtol / atol"
        )
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    checks._check_number(rtol, "rtol", 1e-12, "e.g. rtol=1e-5")
    checks._check_number(atol, "atol", 0.0, "e.g. atol=1e-5")


def latent_likelihood(
    pipe: TextToImagePipeline,
    latents: torch.Tensor,
    prompt: str | list[str],
    *,
    guidance: float | None = None,
    steps: int | None = None,
    divergence: str = "auto",
    probes: int = 4,
    probe: str = "rademacher",
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_sequence_length: int | None = None,
) -> LikelihoodResult:
    """log p(latents | prompt) under ``pipe.transformer`` (guidance 1), with bits/dim, NFE and, for the
    Hutchinson estimate, its standard error (``result.bits_per_dim()``, ``result.bits_stderr()``).

    ``latents`` [B, C, h, w] as the transformer sees them (``encode_images`` for images); ``prompt`` one
    string for all or one per latent. ``divergence``: "exact", "hutchinson" (``probes`` >= 2 of kind
    ``probe`` from ``seed``) or "auto" (exact up to ``EXACT_MAX_DIM`` dimensions). ``guidance`` other than 1
    and ``steps`` (a fixed grid) are refused; see the module docstring.
    """
    _check_options(guidance, steps, divergence, probe, rtol, atol)
    prompts = checks._prompt_list(prompt, "prompt", allow_empty=True)
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise ValueError(f"latents must be a tensor [B, C, h, w]; got {getattr(latents, 'shape', latents)!r}")
    n, _, h, w = latents.shape
    if len(prompts) == 1:
        prompts = prompts * n
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} latents; pass one prompt or one per latent")
    checks.check_latents(latents, (n, pipe.codec.channels, h, w))
    if h % pipe.patch or w % pipe.patch:
        raise ValueError(f"latent height and width must be multiples of {pipe.patch}; got {h}x{w}")
    dim = latents[0].numel()
    exact = divergence == "exact" or (divergence == "auto" and dim <= EXACT_MAX_DIM)
    if not exact:
        checks._check_int(probes, "probes", 2, hint="the standard error needs at least 2 probes")
    max_len = pipe.defaults.max_sequence_length if max_sequence_length is None else max_sequence_length
    cond = pipe.encode_prompt(prompts, max_len).to(pipe.device, pipe.dtype)
    kwargs: dict[str, Any] = {"txt": cond.txt, "vec": cond.vec}
    if pipe.family == "flux" and pipe.guidance_embeds:
        kwargs["guidance"] = torch.ones(n, device=pipe.device)
    generator = torch.Generator().manual_seed(checks._check_seed(seed))

    def velocity(x: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        return pipe._velocity(x.to(pipe.dtype), t, **kw)  # the state stays fp32, the network in its dtype

    with pipe._on_device(pipe.transformer):
        return log_likelihood_adaptive(
            velocity,
            latents.to(pipe.device, torch.float32),
            exact=exact,
            rtol=rtol,
            atol=atol,
            probes=probes,
            probe=probe,
            generator=generator,
            **kwargs,
        )


def discretized_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """log P(x) elementwise for 8-bit values x = k / 255 in [0, 1] under N(mean, sigma^2) integrated over
    the bin [(k - 0.5) / 255, (k + 0.5) / 255] (the end bins open to -inf / +inf), in fp64, stable in the
    tails: log(Phi(b) - Phi(a)) is taken on the side of the smaller tail."""
    k = torch.round(x.double() * 255)
    centre, half = mean.double(), 0.5 / 255
    a = torch.where(k <= 0, -math.inf, (k / 255 - half - centre) / sigma)
    b = torch.where(k >= 255, math.inf, (k / 255 + half - centre) / sigma)
    flip = a > 0  # both ends in the upper tail: Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


@dataclass(frozen=True)
class ImageBound:
    """An upper bound on the bits/dim of 8-bit images: -ELBO / (3 H W ln 2); see the module docstring."""

    bits_per_dim: torch.Tensor  # [B] mean over the posterior samples
    stderr: torch.Tensor | None  # [B] over the samples (None for one sample)
    reconstruction_bits: torch.Tensor  # [B] -E log2 P(x | z) / D_x
    latent_bits: torch.Tensor  # [B] -E log2 p(z) / D_x (the flow)
    entropy_bits: torch.Tensor  # [B] -E log2 q(z | x) / D_x, subtracted: bits = rec + latent - entropy
    nfe: int
    dim: int  # D_x = 3 H W
    pixel_sigma: float


def image_bound(
    pipe: TextToImagePipeline,
    images: torch.Tensor,
    prompt: str | list[str],
    *,
    samples: int = 2,
    pixel_sigma: float = 0.03,
    seed: int = 0,
    **likelihood: Any,
) -> ImageBound:
    """Upper bound on the bits/dim of 8-bit ``images`` [B, 3, H, W] in [0, 1] under the VAE decoder (a
    discretized Gaussian of std ``pixel_sigma``) and the flow prior for ``prompt``, from ``samples``
    posterior draws per image (seeded by ``seed``). ``likelihood`` goes to ``latent_likelihood`` (rtol, atol,
    probes, ...; the divergence is Hutchinson or exact as there)."""
    checks._check_tensor(images, "images", "[B, 3, H, W] in [0, 1]")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}")
    samples = checks._check_int(samples, "samples", 1, hint="posterior draws per image")
    sigma = checks._check_number(pixel_sigma, "pixel_sigma", 1e-4, "e.g. the VAE's RMS reconstruction error")
    prompts = checks._prompt_list(prompt, "prompt", allow_empty=True)
    n = images.shape[0]
    prompts = prompts * n if len(prompts) == 1 else prompts
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} images; pass one prompt or one per image")
    codec, gen = pipe.codec, torch.Generator().manual_seed(checks._check_seed(seed))
    x = images.float().repeat_interleave(samples, 0)  # [B * S, 3, H, W], the S draws of an image together
    with pipe._on_device(codec.vae), torch.no_grad():
        post = codec.vae.encode((2 * x - 1).to(codec.device, codec.dtype)).latent_dist
        mu, std = post.mean.float().cpu(), post.std.float().cpu()
        eps = torch.randn(mu.shape, generator=gen)
        z = (mu + std * eps - codec.shift_factor) * codec.scaling_factor  # the transformer's coordinates
        decoded = codec.decode(z)
    d_z = z[0].numel()
    # q over z = (l - shift) * scaling: the density of l divided by scaling^D
    log_q = (-0.5 * eps.pow(2) - std.log() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    log_q = log_q.double() - d_z * math.log(codec.scaling_factor)
    log_rec = discretized_gaussian_log_prob(x, decoded.cpu(), sigma).flatten(1).sum(1)
    prior = latent_likelihood(pipe, z, [p for p in prompts for _ in range(samples)], **likelihood)
    log_p = prior.log_prob.double().cpu()
    d_x, nats = x[0].numel(), math.log(2)

    def per_image(v: torch.Tensor) -> torch.Tensor:  # [B * S] -> [B, S] bits/dim
        return (v / (d_x * nats)).reshape(n, samples).float()

    bits = per_image(-(log_rec + log_p - log_q))
    return ImageBound(
        bits_per_dim=bits.mean(1),
        stderr=bits.std(1) / math.sqrt(samples) if samples > 1 else None,
        reconstruction_bits=per_image(-log_rec).mean(1),
        latent_bits=per_image(-log_p).mean(1),
        entropy_bits=per_image(-log_q).mean(1),
        nfe=prior.nfe,
        dim=d_x,
        pixel_sigma=sigma,
    )
