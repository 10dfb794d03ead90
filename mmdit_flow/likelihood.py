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
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from mmdit_flow import sampling
from mmdit_flow.flow import VelocityFn

PROBES = ("rademacher", "gaussian")
FEW_STEPS = 8  # log_likelihood warns on fixed grids with fewer steps than this


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
    return divergence_per_probe(v, x, probes).mean(1)


def divergence_per_probe(v: torch.Tensor, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """eps_k^T (dv/dx) eps_k [B, K], one vector-Jacobian product per probe; probes [K, *x.shape]."""
    columns = []
    for eps in probes:
        (vjp,) = torch.autograd.grad(v, x, grad_outputs=eps, retain_graph=True)  # eps^T dv/dx
        columns.append((vjp * eps).reshape(v.shape[0], -1).sum(1))
    return torch.stack(columns, 1)


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

    field = _augmented(velocity_fn, shape, x0.dtype, dtype, probes, average=True)
    z0 = torch.cat([x0.reshape(batch, dim).to(dtype), x0.new_zeros(batch, 1, dtype=dtype)], dim=1)
    if adaptive:
        z1 = sampling.solve_adaptive(field, z0, rtol=rtol, atol=atol, t0=0.0, t1=1.0, **cond).x
    else:
        if steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        if steps < FEW_STEPS:
            warnings.warn(
                f"log_likelihood on a fixed grid of {steps} step(s): few-step solves give values far from "
                f"the true log-density; use adaptive=True (or at least {FEW_STEPS} rk4 steps, checked for "
                "convergence)",
                UserWarning,
                stacklevel=2,
            )
        z1 = sampling.solve(field, z0, torch.linspace(0.0, 1.0, steps + 1), method=method, **cond)
    return _log_normal(z1[:, :dim]) + z1[:, dim]


def _log_normal(x1: torch.Tensor) -> torch.Tensor:
    """log N(x1; 0, I) per row of x1 [B, D]."""
    return -0.5 * (x1.pow(2).sum(1) + x1.shape[1] * math.log(2 * math.pi))


def _augmented(
    velocity_fn: VelocityFn,
    shape: torch.Size,
    dtype: torch.dtype,
    state_dtype: torch.dtype,
    probes: torch.Tensor | None,
    *,
    average: bool,
) -> VelocityFn:
    """The field of the augmented state z [B, D + K] = (x_t flattened, K running integrals of div v): K = 1
    for the exact divergence (``probes`` None; one column averaging the probes when ``average``), else one
    column per probe, the probes [K, *shape] kept fixed along the solve."""
    batch, dim = shape[0], math.prod(shape[1:])

    def field(z: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        with torch.enable_grad():
            x = z[:, :dim].reshape(shape).detach().requires_grad_(True)  # [B, D] -> [B, ...]
            v = velocity_fn(x.to(dtype), t, **kw).to(state_dtype)
            if probes is None:
                div = divergence_exact(v, x)[:, None]  # [B, 1]
            elif average:
                div = divergence_hutchinson(v, x, probes)[:, None]  # [B, 1]
            else:
                div = divergence_per_probe(v, x, probes)  # [B, K]
        return torch.cat([v.detach().reshape(batch, dim), div.detach()], dim=1)

    return field


@dataclass(frozen=True)
class LikelihoodResult:
    """log p_0(x0) of an adaptive solve, with what it cost and (Hutchinson) its standard error."""

    log_prob: torch.Tensor  # [B] nats
    stderr: torch.Tensor | None  # [B] nats: std over the probes / sqrt(K); None for the exact divergence
    nfe: int  # evaluations of the velocity field (each with 1 forward and K or D backward passes)
    steps: int  # accepted Dormand-Prince steps
    rejected: int
    dim: int  # D, the dimensions of one x0

    def bits_per_dim(self) -> torch.Tensor:
        """-log2 p_0(x0) / D [B]."""
        return -self.log_prob / (self.dim * math.log(2))

    def bits_stderr(self) -> torch.Tensor | None:
        """The standard error of ``bits_per_dim`` [B] (None for the exact divergence)."""
        return None if self.stderr is None else self.stderr / (self.dim * math.log(2))


def log_likelihood_adaptive(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    *,
    exact: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    probes: int = 4,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    max_steps: int = 10_000,
    **cond: Any,
) -> LikelihoodResult:
    """log p_0(x0) [B] by ``sampling.solve_adaptive`` from data (t = 0) to noise (t = 1), with its cost.

    ``exact`` integrates the exact divergence (D backward passes per evaluation). Otherwise ``probes`` (>= 2)
    Hutchinson probes of kind ``probe``, drawn once from ``generator``, each get their own running integral
    along the one shared trajectory: the estimate is their mean and its standard error their std / sqrt(K)
    (the spread of the probes only; the solver's error is set by ``rtol``/``atol``).
    """
    if x0.ndim < 2:
        raise ValueError(f"x0 must be a batch [B, ...]; got shape {tuple(x0.shape)}")
    if not exact and probes < 2:
        raise ValueError(f"probes must be >= 2 for a standard error; got {probes}")
    shape, batch, dim = x0.shape, x0.shape[0], x0[0].numel()
    dtype = torch.promote_types(x0.dtype, torch.float32)
    eps = None if exact else draw_probes(probes, shape, kind=probe, generator=generator).to(x0.device, dtype)
    columns = 1 if exact else probes
    field = _augmented(velocity_fn, shape, x0.dtype, dtype, eps, average=False)
    z0 = torch.cat([x0.reshape(batch, dim).to(dtype), x0.new_zeros(batch, columns, dtype=dtype)], dim=1)
    solved = sampling.solve_adaptive(
        field, z0, rtol=rtol, atol=atol, t0=0.0, t1=1.0, max_steps=max_steps, **cond
    )
    z1 = solved.x
    integrals = z1[:, dim:]  # [B, K]
    log_normal = _log_normal(z1[:, :dim])
    stderr = None if exact else integrals.std(1) / math.sqrt(columns)
    return LikelihoodResult(
        log_prob=log_normal + integrals.mean(1),
        stderr=stderr,
        nfe=solved.nfe,
        steps=solved.steps,
        rejected=solved.rejected,
        dim=dim,
    )
