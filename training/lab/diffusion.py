"""The diffusion baseline: the lab's network as a DDPM noise predictor, sampled with diffusers' schedulers.

Training (Ho et al. 2020): k ~ U{0, ..., K-1}, eps ~ N(0, I),
    x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps   (``DDPMScheduler.add_noise``),
    L = E |eps_theta(x_k, k / K) - eps|^2.
The network sees t = k / K in [0, 1], so the project's timestep embedding (which multiplies by 1000) sees k.

Sampling uses diffusers' ``DDPMScheduler`` (ancestral, stochastic) and ``DDIMScheduler`` (eta = 0, the
deterministic probability-flow discretisation), both with ``timestep_spacing="trailing"`` so that n steps
start at k = K - 1 (pure noise) and take exactly n network evaluations, and ``clip_sample=False`` because the
2-D data do not live in [-1, 1]. The schedule is DDPM's linear betas 1e-4 .. 0.02 over K = 1000 steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

SAMPLERS = ("ddpm", "ddim")
TRAIN_STEPS = 1000


def make_scheduler(sampler: str = "ddpm", train_steps: int = TRAIN_STEPS) -> Any:
    """A diffusers ``DDPMScheduler`` or ``DDIMScheduler`` with the lab's settings (see the module doc)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(
        num_train_timesteps=train_steps,
        beta_schedule="linear",
        clip_sample=False,
        prediction_type="epsilon",
        timestep_spacing="trailing",
    )
    if sampler == "ddpm":
        return DDPMScheduler(**common)
    if sampler == "ddim":
        return DDIMScheduler(**common)
    raise ValueError(f"unknown diffusion sampler {sampler!r}; choose from {SAMPLERS}")


def ddpm_loss(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    scheduler: Any,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """E |eps_theta(x_k, k / K) - eps|^2, x_k from ``scheduler.add_noise``; k and eps from ``generator``."""
    steps = scheduler.config.num_train_timesteps
    k = torch.randint(0, steps, (x0.shape[0],), generator=generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_k = scheduler.add_noise(x0, eps, k)
    return F.mse_loss(eps_fn(x_k, k.float() / steps), eps)


@torch.no_grad()
def sample(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    steps: int,
    *,
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
    trajectory: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``steps`` scheduler steps (= network evaluations) from ``noise``; returns (x0, states).

    ``generator`` feeds DDPM's ancestral noise (DDIM with eta = 0 draws none). The trajectory holds the
    states x_K, ..., x_0 in data space, ``steps + 1`` tensors.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler = make_scheduler(sampler)
    scheduler.set_timesteps(steps)
    total = scheduler.config.num_train_timesteps
    x = noise.clone()
    states = [x.clone()] if trajectory else []
    for k in scheduler.timesteps:
        t = torch.full((x.shape[0],), float(k) / total, dtype=x.dtype, device=x.device)
        eps = eps_fn(x, t)
        x = scheduler.step(eps, int(k), x, generator=generator).prev_sample
        if trajectory:
            states.append(x.clone())
    return x, states
