"""Exact log-likelihoods of a flow model by the instantaneous change of variables (Chen et al. 2018).

Along dx/dt = v(x, t) the log-density changes as d log p_t(x_t) / dt = -div v(x_t, t). Integrating the data
point x0 forward to noise (t: 0 -> 1), where p_1 = N(0, I):

    log p_0(x0) = log N(x_1; 0, I) + integral_0^1 div v(x_t, t) dt

The divergence is exact (one backward pass per dimension: for low dimensions) or the Hutchinson estimate
div v ~ eps^T (dv/dx) eps with E[eps eps^T] = I (Rademacher or Gaussian probes, fixed along one solve as in
FFJORD, Grathwohl et al. 2019): unbiased, one backward pass per probe, for images.

Both treat the batch rows as independent (gradients of a row's output are read off the summed output), so the
network must not mix samples (no batch norm in training mode).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mmdit_flow import sampling
from mmdit_flow.flow import VelocityFn

PROBES = ("rademacher", "gaussian")


def divergence_exact(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_i d v_i / d x_i per row, one backward pass per dimension; v, x [B, ...], x requiring grad."""
    v_flat = v.reshape(v.shape[0], -1)  # [B, D]
    div = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    for i in range(v_flat.shape[1]):
        (grad,) = torch.autograd.grad(v_flat[:, i].sum(), x, retain_graph=True)
        div = div + grad.reshape(v.shape[0], -1)[:, i]
    return div


def divergence_hutchinson(v: torch.Tensor, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """mean_k eps_k^T (dv/dx) eps_k per row, from vector-Jacobian products; probes [K, *x.shape]."""
    div = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    for eps in probes:
        (vjp,) = torch.autograd.grad(v, x, grad_outputs=eps, retain_graph=True)  # eps^T dv/dx
        div = div + (vjp * eps).reshape(v.shape[0], -1).sum(1)
    return div / probes.shape[0]


def draw_probes(
    k: int, shape: torch.Size, *, kind: str = "rademacher", generator: torch.Generator | None = None
) -> torch.Tensor:
    """k Hutchinson probes [k, *shape] with E[eps eps^T] = I: Rademacher (+-1) or standard Gaussian (fp32, CPU
    when no generator is given, else on the generator's device)."""
    device = generator.device if generator is not None else None
    if kind == "gaussian":
        return torch.randn((k, *shape), generator=generator, device=device)
    if kind == "rademacher":
        return torch.randint(0, 2, (k, *shape), generator=generator, device=device).float() * 2 - 1
    raise ValueError(f"unknown probe kind {kind!r}; valid: {', '.join(PROBES)}")


def log_likelihood(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    *,
    exact: bool = True,
    steps: int = 32,
    method: str = "rk4",
    adaptive: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    hutchinson_samples: int = 1,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    **cond: Any,
) -> torch.Tensor:
    """log p_0(x0) [B] in nats under the flow, by integrating data (t = 0) to noise (t = 1):

        log p_0(x0) = log N(x_1; 0, I) + integral_0^1 div v(x_t, t) dt

    The ODE for the augmented state (x_t, integral of div) is solved by ``sampling.solve`` on a uniform grid
    of ``steps`` steps with ``method`` (default rk4), or by ``sampling.solve_adaptive`` (Dormand-Prince with
    ``rtol``/``atol``) when ``adaptive``. ``exact`` uses one backward per dimension; otherwise the Hutchinson
    estimate with ``hutchinson_samples`` probes of kind ``probe`` ("rademacher" | "gaussian") drawn once from
    ``generator`` and kept along the solve, which makes the result an unbiased estimate of the exact one.
    Computed in fp32 (fp64 for fp64 inputs). Divide by D * log(2) and add log2(128) per dim for bits/dim of
    8-bit images in [-1, 1].
    """
    if x0.ndim < 2:
        raise ValueError(f"x0 must be a batch [B, ...]; got shape {tuple(x0.shape)}")
    if hutchinson_samples < 1:
        raise ValueError(f"hutchinson_samples must be >= 1; got {hutchinson_samples}")
    shape, batch = x0.shape, x0.shape[0]
    dim = x0[0].numel()
    dtype = torch.promote_types(x0.dtype, torch.float32)
    probes = None
    if not exact:
        probes = draw_probes(hutchinson_samples, shape, kind=probe, generator=generator).to(x0.device, dtype)

    def augmented(z: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        # z [B, D + 1] = (x_t flattened, running integral of div v)
        with torch.enable_grad():
            x = z[:, :dim].reshape(shape).detach().requires_grad_(True)  # [B, D] -> [B, ...]
            v = velocity_fn(x.to(x0.dtype), t, **kw).to(dtype)
            div = divergence_exact(v, x) if probes is None else divergence_hutchinson(v, x, probes)
        return torch.cat([v.detach().reshape(batch, dim), div.detach()[:, None]], dim=1)

    z0 = torch.cat([x0.reshape(batch, dim).to(dtype), x0.new_zeros(batch, 1, dtype=dtype)], dim=1)
    if adaptive:
        z1 = sampling.solve_adaptive(augmented, z0, rtol=rtol, atol=atol, t0=0.0, t1=1.0, **cond).x
    else:
        if steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        z1 = sampling.solve(augmented, z0, torch.linspace(0.0, 1.0, steps + 1), method=method, **cond)
    x1, integral = z1[:, :dim], z1[:, dim]
    log_normal = -0.5 * (x1.pow(2).sum(1) + dim * math.log(2 * math.pi))
    return log_normal + integral
