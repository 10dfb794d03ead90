"""Distillation targets for few-step sampling: progressive distillation and guidance distillation.

Both train a student velocity field ``v_s`` against a frozen teacher ``v_T`` at points ``x_t`` of the
straight path (``x_t = (1 - t) x0 + t noise``, data x0, fresh noise), in the velocity parameterization:

- **Guidance distillation** (Meng et al. 2023, "On Distillation of Guided Diffusion Models"; the way
  FLUX.1-dev is made): the target is the CFG-guided teacher velocity
  ``v* = v_T(x_t, t, uncond) + w (v_T(x_t, t, cond) - v_T(x_t, t, uncond))``, so that one student forward
  replaces the two of guidance. A student with a guidance-embedding input (Flux layout) is given w, which
  may differ per sample (``sampling.cfg`` takes a tensor [B] of scales), so that one student learns a range
  of scales; an SD3 layout student learns one fixed w.
- **Progressive distillation** (Salimans & Ho 2022), for velocities: the student takes one Euler step where
  the teacher takes two. On the student's N-step grid ``t_0 = 1 > t_1 > ... > t_N = 0`` (the sampling grid
  the pipeline uses, ``sampling.timesteps``), at a grid time t_i the teacher steps t_i -> m_i -> t_(i+1)
  through the midpoint m_i of the interval (taken before the static time shift, so that a grid shifted by s
  is refined by the same shift), and the student's target is the velocity of one Euler step that lands
  where the teacher's two land::

      x_m  = x_t + (m - t) v_T(x_t, t)          x' = x_m + (t' - m) v_T(x_m, m)
      v*   = (x' - x_t) / (t' - t)

  With ``v_s = v*`` at every grid point, N student Euler steps equal 2N teacher steps. Each round's student is
  the next round's teacher (N -> N / 2). The loss is the plain mean squared velocity error (our ``cfm_loss``
  weighting "none"), which for velocities is Salimans & Ho's "SNR+1" weighting of the x0 error up to the
  factor 1 / t^2 in x0 space.

Teachers are any ``VelocityFn``: wrap a guided teacher with ``sampling.cfg`` before passing it. Every target
is computed without gradients and in fp32.
"""

from __future__ import annotations

from typing import Any

import torch

from mmdit_flow.flow import VelocityFn, interpolate, shift_t


def unshift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of ``flow.shift_t``: u with shift u / (1 + (shift - 1) u) = t."""
    return t / (shift - (shift - 1.0) * t)


def grid_midpoints(ts: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """Midpoints [N] of the N intervals of a descending grid ``ts`` [N + 1], taken in the unshifted time
    (``unshift_t``) and shifted back: for a grid ``shift_t(u_i, s)``, ``shift_t((u_i + u_(i+1)) / 2, s)``."""
    if ts.ndim != 1 or ts.numel() < 2 or not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("ts must be a descending 1-D grid of at least 2 times (sampling.timesteps)")
    u = unshift_t(ts.double(), shift)
    return shift_t((u[:-1] + u[1:]) / 2, shift).to(ts.dtype)


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.device, torch.float32).view(-1, *([1] * (x.dim() - 1)))


@torch.no_grad()
def two_step_target(
    teacher: VelocityFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_mid: torch.Tensor,
    t_next: torch.Tensor,
    **cond: Any,
) -> torch.Tensor:
    """v* = (x' - x_t) / (t' - t) for two teacher Euler steps t -> t_mid -> t' (each a tensor [B]); fp32."""
    if not (bool((t_mid < t).all()) and bool((t_next < t_mid).all())):
        raise ValueError("two_step_target needs t > t_mid > t_next for every sample")
    x = x_t.float()
    dtype = x_t.dtype
    v1 = teacher(x.to(dtype), t.to(x.device, torch.float32), **cond).float()
    x_mid = x + (_per_sample(t_mid, x) - _per_sample(t, x)) * v1
    v2 = teacher(x_mid.to(dtype), t_mid.to(x.device, torch.float32), **cond).float()
    x_next = x_mid + (_per_sample(t_next, x) - _per_sample(t_mid, x)) * v2
    return (x_next - x) / (_per_sample(t_next, x) - _per_sample(t, x))


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"student output {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return ((pred.float() - target) ** 2).reshape(pred.shape[0], -1).mean(dim=1).mean()


def progressive_loss(
    student: VelocityFn,
    teacher: VelocityFn,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    t_mid: torch.Tensor,
    t_next: torch.Tensor,
    **cond: Any,
) -> torch.Tensor:
    """mean_b mean_i (v_s(x_t, t) - v*)^2 with v* of ``two_step_target`` at x_t = (1 - t) x0 + t noise."""
    x_t = interpolate(x0.float(), noise.float(), t.to(x0.device, torch.float32)).to(x0.dtype)
    target = two_step_target(teacher, x_t, t, t_mid, t_next, **cond)
    return _mse(student(x_t, t.to(x0.device, torch.float32), **cond), target)


def guidance_loss(
    student: VelocityFn,
    guided_teacher: VelocityFn,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    *,
    student_cond: dict[str, Any] | None = None,
    **cond: Any,
) -> torch.Tensor:
    """mean_b mean_i (v_s(x_t, t) - v_guided(x_t, t))^2, the teacher wrapped in ``sampling.cfg``.

    ``student_cond`` adds inputs only the student sees (a Flux student's ``guidance`` [B], the scale it is
    taught to follow)."""
    t32 = t.to(x0.device, torch.float32)
    x_t = interpolate(x0.float(), noise.float(), t32).to(x0.dtype)
    with torch.no_grad():
        target = guided_teacher(x_t, t32, **cond).float()
    return _mse(student(x_t, t32, **cond, **(student_cond or {})), target)
