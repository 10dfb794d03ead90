"""Reflow and couplings: k-rectified-flow data, the straightness of a flow, minibatch optimal transport.

- Reflow (Liu et al. 2022, "Flow Straight and Fast"): sample pairs (noise, x0 = ODE(noise)) from a trained
  field and train a new field on them with the usual ``flow.cfm_loss(..., noise=noise)``. Each round makes the
  paths straighter, so fewer steps are needed; a straight flow is exact in one Euler step.
- Straightness (their eq. for S(Z), in our convention t = 1 noise, t = 0 data): how far the velocity along a
  generated trajectory strays from the chord between its ends; 0 exactly when every path is straight.
- OT-CFM (Tong et al. 2023): pair each data point of a minibatch with noise by the optimal assignment for
  the squared Euclidean cost, instead of independently; the conditional paths then cross less.

scipy is imported inside ``ot_assignment`` only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from mmdit_flow import sampling
from mmdit_flow.flow import VelocityFn


class Coupling(NamedTuple):
    """A batch of (noise, x0) pairs, row i of one matched with row i of the other."""

    noise: torch.Tensor
    x0: torch.Tensor


@torch.no_grad()
def make_couplings(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    ts: torch.Tensor | list[float],
    *,
    method: str = "euler",
    **cond: Any,
) -> Coupling:
    """Pairs (noise, x0 = ODE_{1 -> 0}(noise)) to train the next rectified flow (``sampling.solve`` on ts)."""
    x0 = sampling.solve(velocity_fn, noise, ts, method=method, **cond)
    return Coupling(noise=noise, x0=x0.to(noise.dtype))


@torch.no_grad()
def straightness(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    ts: torch.Tensor | list[float],
    *,
    method: str = "euler",
    **cond: Any,
) -> float:
    """Straightness of the flow from this noise (Liu et al. 2022), in our convention:

        S = integral_0^1 E || (noise - x0_gen) - v(x_t, t) ||^2 dt

    along the generated trajectory x_t (solved on ts with ``method``, x0_gen its end). The velocity of a
    straight path equals its chord noise - x0_gen at every t, so S = 0 exactly for straight flows. The
    squared norm sums over all dimensions of a sample, E averages over the batch, and the integral is the
    Riemann sum sum_i |t_{i+1} - t_i| * (integrand at t_i) over the grid's steps (the integrand is never
    evaluated at t = 0, where fields of point-like data are singular).
    """
    traj = sampling.solve(velocity_fn, noise, ts, method=method, trajectory=True, **cond)
    chord = noise.to(traj.x.dtype) - traj.x  # noise - x0_gen: [B, ...]
    batch = noise.shape[0]
    total = 0.0
    times = traj.ts.tolist()
    for i in range(len(times) - 1):
        t = torch.full((batch,), times[i], dtype=torch.float32, device=noise.device)
        v = velocity_fn(traj.xs[i].to(noise.dtype), t, **cond).to(chord.dtype)
        gap = (chord - v).reshape(batch, -1).pow(2).sum(1).mean()  # E ||.||^2
        total += abs(times[i + 1] - times[i]) * gap.item()
    return total


def ot_assignment(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """perm [B] minimising sum_i ||x0_i - noise_perm[i]||^2 over permutations (exact, Hungarian algorithm
    via scipy's ``linear_sum_assignment``; the cost matrix is computed in fp64)."""
    from scipy.optimize import linear_sum_assignment

    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have one shape; got {tuple(x0.shape)} and {tuple(noise.shape)}")
    a = x0.detach().reshape(x0.shape[0], -1).double().cpu()  # [B, D]
    b = noise.detach().reshape(noise.shape[0], -1).double().cpu()
    cost = torch.cdist(a, b).pow(2).numpy()  # [B, B] squared Euclidean
    rows, cols = linear_sum_assignment(cost)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm.to(noise.device)


def ot_coupling(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The noise reordered so that (x0_i, noise_i) is the minibatch optimal-transport pairing (OT-CFM):
    pass it as ``flow.cfm_loss(fn, x0, noise=ot_coupling(x0, noise))``."""
    return noise[ot_assignment(x0, noise)]
