"""Samplers: time grids, fixed-step and adaptive ODE solvers, classifier-free guidance.

Sampling integrates dx/dt = v(x, t) from t = 1 (noise) down to t = 0 (data). Every solver is a stateless
function of one signature, ``velocity_fn(x, t, **cond) -> v`` with t a tensor [B]; guidance wraps the
velocity function (``cfg``) instead of living inside a solver.

Numerics: the ODE state is kept in fp32 (fp64 when started from fp64) whatever dtype the network returns;
the network sees the state cast to the dtype of the ``x`` it was started from (a bf16 start runs a bf16
network). Solvers return the state in its fp32 (or fp64) dtype; t is passed to the network in the state
dtype (fp32, or fp64 in an fp64 solve).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from mmdit_flow.flow import VelocityFn, shift_t

Callback = Callable[[int, float, torch.Tensor], None]

GRIDS = ("scheduler", "linear")
# An upper bound for ``timesteps``: far more than any sampler needs (the error of a 2nd-order solver at 1000
# steps is below fp32 rounding) and far below where neighbouring fp32 times coincide (~10^7 at shift 3).
MAX_STEPS = 100_000
METHODS = ("euler", "midpoint", "heun", "rk4")


# ----------------------------------------------------------------------------------------------------
# time grids


def _exp_time_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """Flux's resolution shift t' = e^mu / (e^mu + (1 / t - 1)), in the dtype of t."""
    # explicit tensors: torch computes ``scalar / tensor`` as a reciprocal times the scalar, one ulp off numpy
    e_mu = torch.full_like(t, math.exp(mu))
    return e_mu / (e_mu + (torch.ones_like(t) / t - 1))


def timesteps(
    steps: int,
    *,
    shift: float = 1.0,
    mu: float | None = None,
    grid: str = "scheduler",
    num_train_timesteps: int = 1000,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sampling times [steps + 1] (fp32), from 1 down to a final 0, as diffusers builds them.

    - ``grid="scheduler"`` (SD3): the sigmas of
      ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)``, or with ``mu``: of
      ``FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(steps, mu=mu)``.
      The base grid is linspace(1, t_min, steps) with t_min = 1 / num_train_timesteps, shifted as below. Like
      diffusers, a static shift is applied to t_min once before building the grid and then to the whole grid,
      so the last nonzero time is shift_t(shift_t(t_min)).
    - ``grid="linear"`` (Flux pipeline): the sigmas FluxPipeline passes, linspace(1, 1 / steps, steps)
      in fp32, then shifted.

    Shift: with ``mu`` the exponential shift t' = e^mu / (e^mu + 1/t - 1) (see ``flow.flux_mu``), otherwise
    the static t' = shift * t / (1 + (shift - 1) * t). A final 0 is appended. ``steps`` is at most
    ``MAX_STEPS`` (100 000).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer in [1, {MAX_STEPS}]; got {steps!r}")
    if mu is not None and shift != 1.0:
        raise ValueError("pass either a static shift or a dynamic mu, not both (mu replaces shift)")
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0; got {shift}")
    if mu is not None and not math.isfinite(mu):
        raise ValueError(f"mu must be a finite number; got {mu}")
    if grid == "scheduler":
        # diffusers computes the scheduler's training sigmas in fp32 (shifted when static), takes the last
        # as t_min, and spaces the inference grid in float64.
        t_min = torch.tensor(1.0, dtype=torch.float32) / num_train_timesteps
        t_max = torch.tensor(1.0, dtype=torch.float32)
        if mu is None:
            t_min, t_max = shift_t(t_min, shift), shift_t(t_max, shift)
        ts = torch.linspace(t_max.item(), t_min.item(), steps, dtype=torch.float64)
    elif grid == "linear":
        ts = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).float()
    else:
        raise ValueError(f"unknown grid {grid!r}; valid: {', '.join(GRIDS)}")
    ts = _exp_time_shift(ts, mu) if mu is not None else shift_t(ts, shift)
    ts = torch.cat([ts.float(), ts.new_zeros(1, dtype=torch.float32)])
    if not bool((ts[1:] < ts[:-1]).all()):  # neighbouring times rounded to one fp32 value
        raise ValueError(
            f"steps={steps} is too fine for an fp32 time grid with these settings (shift={shift}, mu={mu}): "
            "neighbouring times coincide; use fewer steps"
        )
    return ts.to(device)


# ----------------------------------------------------------------------------------------------------
# fixed-step solvers


class Trajectory(NamedTuple):
    """Result of ``solve(..., trajectory=True)``: final state, all states [N + 1, B, ...], times."""

    x: torch.Tensor
    xs: torch.Tensor
    ts: torch.Tensor


def _as_grid(ts: torch.Tensor | list[float]) -> torch.Tensor:
    ts = torch.as_tensor(ts, dtype=torch.float32).detach().cpu()
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError("ts must be a 1-D grid of at least 2 times, e.g. sampling.timesteps(steps)")
    if bool((ts < 0).any()) or bool((ts > 1).any()):
        raise ValueError("times in ts must lie in [0, 1] (t = 1 is noise, t = 0 is data)")
    diffs = ts[1:] - ts[:-1]
    if not (bool((diffs < 0).all()) or bool((diffs > 0).all())):
        raise ValueError("ts must be strictly monotone (descending from noise to data, or ascending)")
    return ts


class _Field:
    """velocity_fn with a fixed batch, input dtype and cond; v comes back in the state dtype; counts calls."""

    def __init__(self, velocity_fn: VelocityFn, x: torch.Tensor, cond: dict[str, Any]):
        self.fn, self.cond, self.dtype = velocity_fn, cond, x.dtype
        self.batch, self.device, self.nfe = x.shape[0], x.device, 0
        self.state_dtype = torch.promote_types(x.dtype, torch.float32)

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.nfe += 1
        # t in the state dtype: fp32 for networks, fp64 in an fp64 solve (fp32 midpoints would cost 1e-8)
        tt = torch.full((self.batch,), t, dtype=self.state_dtype, device=self.device)
        v = self.fn(x.to(self.dtype), tt, **self.cond)
        if v.shape != x.shape:
            raise ValueError(f"velocity_fn returned shape {tuple(v.shape)} for a state {tuple(x.shape)}")
        return v.to(self.state_dtype)


def _step(f: _Field, method: str, x: torch.Tensor, t: float, dt: float, t_next: float) -> torch.Tensor:
    """One step of size dt from t to t_next (= t + dt) with the given Runge-Kutta method."""
    if method == "euler":
        return x + dt * f(x, t)
    if method == "midpoint":
        k1 = f(x, t)
        return x + dt * f(x + 0.5 * dt * k1, t + 0.5 * dt)
    if method == "heun":
        k1 = f(x, t)
        x_euler = x + dt * k1
        if t_next == 0.0:
            return x_euler
        return x + 0.5 * dt * (k1 + f(x_euler, t_next))
    # rk4
    k1 = f(x, t)
    k2 = f(x + 0.5 * dt * k1, t + 0.5 * dt)
    k3 = f(x + 0.5 * dt * k2, t + 0.5 * dt)
    k4 = f(x + dt * k3, t_next)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def solve(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    ts: torch.Tensor | list[float],
    *,
    method: str = "euler",
    callback: Callback | None = None,
    trajectory: bool = False,
    **cond: Any,
) -> torch.Tensor | Trajectory:
    """Integrate dx/dt = v(x, t) over the grid ts (usually descending from 1 to 0) with a fixed-step method.

    Step i goes from t = ts[i] to ts[i + 1] with dt = ts[i + 1] - ts[i] (negative when sampling):

    - ``euler``:    x + dt k1                                  (1 evaluation, order 1)
    - ``midpoint``: x + dt v(x + dt/2 k1, t + dt/2)            (2 evaluations, order 2)
    - ``heun``:     x + dt/2 (k1 + v(x + dt k1, t + dt))       (2 evaluations, order 2)
    - ``rk4``:      classic Runge-Kutta                         (4 evaluations, order 4)

    Heun's last step onto t = 0 is a plain Euler step, as in Karras et al. (2022): it saves an evaluation at
    t = 0, where fields of data on a point or a low-dimensional set are singular (v = (x - x0) / t) and models
    trained with logit-normal times are rarely queried; one first-order step costs O(dt^2), so the global
    error stays second order. rk4 evaluates at t = 0 like the textbook method.

    ``callback(i, t_next, x)`` is called after step i with the time reached and the state there.
    Returns the final state (fp32, or fp64 from an fp64 start), or with ``trajectory`` a ``Trajectory``
    (x, xs [N + 1, *x.shape], ts).
    """
    if method not in METHODS:
        raise ValueError(f"unknown solver method {method!r}; valid: {', '.join(METHODS)}")
    grid = _as_grid(ts)
    times = grid.tolist()
    # dt in fp32 exactly as diffusers' scheduler computes sigma_next - sigma
    dts = (grid[1:] - grid[:-1]).tolist()
    f = _Field(velocity_fn, x, cond)
    state = x.to(f.state_dtype)
    states = [state] if trajectory else None
    for i, dt in enumerate(dts):
        state = _step(f, method, state, times[i], dt, times[i + 1])
        if states is not None:
            states.append(state)
        if callback is not None:
            callback(i, times[i + 1], state)
    if states is not None:
        return Trajectory(x=state, xs=torch.stack(states), ts=grid)
    return state


# ----------------------------------------------------------------------------------------------------
# adaptive Dormand-Prince 5(4)


class AdaptiveResult(NamedTuple):
    """Result of ``solve_adaptive``: the final state, evaluations used, accepted and rejected steps."""

    x: torch.Tensor
    nfe: int
    steps: int
    rejected: int


# Dormand & Prince (1980) tableau: nodes c, stages a, 5th-order weights b5 (= last row of a, FSAL),
# and e = b5 - b4, the embedded error weights.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _dp_step(
    f: _Field, x: torch.Tensor, t: float, h: float, k1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Dormand-Prince step: (5th-order solution, error estimate, v at the new point for FSAL)."""
    ks = [k1]
    for c, a in zip(_DP_C[1:], _DP_A[1:], strict=True):
        xi = x + h * sum(aj * kj for aj, kj in zip(a, ks, strict=False) if aj != 0.0)
        if len(ks) == 6:  # the 7th stage is the new point itself (FSAL)
            x_new = xi
        ks.append(f(xi, t + c * h))
    err = h * sum(ej * kj for ej, kj in zip(_DP_E, ks, strict=True) if ej != 0.0)
    return x_new, err, ks[-1]


def _initial_step(f: _Field, x: torch.Tensor, t0: float, k1: torch.Tensor, span: float, tol) -> float:
    """Hairer, Norsett & Wanner (1993), II.4: first step from |x| and |v| (one evaluation)."""
    d0 = _rms(x / tol(x, x))
    d1 = _rms(k1 / tol(x, x))
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, abs(span))
    direction = math.copysign(1.0, span)
    k2 = f(x + direction * h0 * k1, t0 + direction * h0)
    d2 = _rms((k2 - k1) / tol(x, x)) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1, abs(span))


def _rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def solve_adaptive(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t0: float = 1.0,
    t1: float = 0.0,
    max_steps: int = 10_000,
    **cond: Any,
) -> AdaptiveResult:
    """Integrate dx/dt = v(x, t) from t0 to t1 with Dormand-Prince 5(4) and step-size control.

    A step of size h is accepted when err = rms(e / (atol + rtol * max(|x|, |x_new|))) <= 1, with e the
    embedded 5th-minus-4th-order error estimate and the rms over the whole batch (one step size for all).
    The next step is h * clamp(0.9 * err^(-1/5), 0.2, 10) (no growth right after a rejection). The 5th-order
    solution is propagated (local extrapolation) and the last stage is reused (FSAL): 6 evaluations per step.
    """
    if rtol <= 0 or atol < 0:
        raise ValueError(f"need rtol > 0 and atol >= 0; got rtol={rtol}, atol={atol}")
    for name, t in (("t0", t0), ("t1", t1)):
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1] (t = 1 is noise, t = 0 is data); got {t}")
    if t0 == t1:
        raise ValueError("t0 and t1 must differ")

    def tol(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return atol + rtol * torch.maximum(a.abs(), b.abs())

    f = _Field(velocity_fn, x, cond)
    state = x.to(f.state_dtype)
    span = t1 - t0
    direction = math.copysign(1.0, span)
    t = t0
    k1 = f(state, t)
    h = _initial_step(f, state, t, k1, span, tol)
    accepted = rejected = 0
    just_rejected = False
    while direction * (t1 - t) > 0:
        if accepted + rejected >= max_steps:
            raise RuntimeError(f"solve_adaptive took {max_steps} steps; loosen rtol/atol or raise max_steps")
        last = abs(t1 - t) <= h * (1 + 1e-12)
        step = (t1 - t) if last else direction * h
        x_new, err, k_new = _dp_step(f, state, t, step, k1)
        err_norm = _rms(err / tol(state, x_new))
        if not math.isfinite(err_norm):
            raise FloatingPointError(f"non-finite error estimate at t={t:.6g}: the velocity field diverged")
        if err_norm <= 1.0:
            t = t1 if last else t + step
            state, k1 = x_new, k_new
            accepted += 1
        else:
            rejected += 1
        factor = 0.9 * err_norm ** (-1 / 5) if err_norm > 0 else 10.0
        factor = min(10.0, max(0.2, factor))
        if err_norm > 1.0 or just_rejected:
            factor = min(1.0, factor)
        just_rejected = err_norm > 1.0
        h = abs(step) * factor
    return AdaptiveResult(x=state, nfe=f.nfe, steps=accepted, rejected=rejected)


# ----------------------------------------------------------------------------------------------------
# classifier-free guidance


def cfg(velocity_fn: VelocityFn, scale: float | torch.Tensor, **uncond: Any) -> VelocityFn:
    """Classifier-free guidance: a velocity function computing v = v_u + scale * (v_c - v_u).

    The returned ``fn(x, t, **cond)`` runs uncond and cond in one batched forward: x and t are repeated and
    each tensor kwarg is concatenated as [uncond, cond] along dim 0 (diffusers' order); non-tensor kwargs are
    passed through. Every tensor in cond needs its counterpart in ``uncond``. scale = 1 runs only the cond
    forward, scale = 0 only the uncond one. ``scale`` may also be a tensor [B], one scale per sample
    (guidance distillation over a range of scales); that always runs both. The combination is done in fp32,
    or in the wider dtype of the network's output or of x (fp64 in an fp64 solve).
    """
    per_sample = isinstance(scale, torch.Tensor)
    if per_sample:
        if scale.ndim != 1 or not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise ValueError(
                f"a per-sample guidance scale must be a tensor [B] of finite values >= 0; got {scale}"
            )
    elif not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance scale must be >= 0 (1 = no guidance); got {scale}")

    def guided(x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if not per_sample and scale == 1.0:
            return velocity_fn(x, t, **cond)
        extra = sorted(set(uncond) - set(cond))
        if extra:
            raise ValueError(f"uncond kwargs {extra} have no cond counterpart; pass them to the guided fn")
        if not per_sample and scale == 0.0:
            return velocity_fn(x, t, **{**cond, **uncond})
        if per_sample and len(scale) != len(x):
            raise ValueError(f"{len(scale)} per-sample guidance scales for a batch of {len(x)}")
        both = {}
        for name, value in cond.items():
            if not isinstance(value, torch.Tensor):
                both[name] = value
                continue
            if name not in uncond:
                raise ValueError(f"cfg needs an uncond value for {name!r}: cfg(fn, scale, {name}=...)")
            if uncond[name].shape != value.shape:
                raise ValueError(
                    f"uncond {name!r} has shape {tuple(uncond[name].shape)}, cond has {tuple(value.shape)}"
                )
            both[name] = torch.cat([uncond[name], value])  # [2B, ...]
        v = velocity_fn(torch.cat([x, x]), torch.cat([t, t]), **both)  # [2B, ...]
        # at least fp32 (a bf16 network's output), never narrower than the state (an fp64 solve stays fp64)
        wide = torch.promote_types(torch.promote_types(v.dtype, x.dtype), torch.float32)
        v_u, v_c = v.to(wide).chunk(2)
        if per_sample:  # [B] -> [B, 1, ...]
            return v_u + scale.to(v_u.device, wide).view(-1, *([1] * (v_u.dim() - 1))) * (v_c - v_u)
        return v_u + scale * (v_c - v_u)

    return guided
