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

Images are scored through the VAE posterior mean (``encode_images``): the number is the bits/dim of that
latent, not a likelihood of the pixels (which would need a decoder likelihood that these VAEs do not have).
"""

from __future__ import annotations

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
