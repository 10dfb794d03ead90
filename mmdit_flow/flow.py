"""Rectified-flow mathematics: the linear path, its training loss, time sampling and shifts, conversions.

Convention (stated once): t = 1 is noise, t = 0 is data.

    x_t = (1 - t) * x0 + t * noise          (the linear / rectified-flow path)
    v   = d x_t / d t = noise - x0          (the velocity a model predicts)

Glossary: ``x0`` data (or latents), ``noise`` a standard normal draw, ``t`` the flow time in [0, 1]
(diffusers calls it sigma), ``v`` the velocity, ``score`` the gradient of log p_t at x_t.

``t`` is a float or a tensor [B] and is broadcast over the other dimensions of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

# a velocity field: velocity_fn(x, t, **cond) -> v with the shape of x, t a float or a tensor [B]
VelocityFn = Callable[..., torch.Tensor]

SCHEMES = ("uniform", "logit_normal", "mode", "cosmap")
WEIGHTINGS = ("none", "cosmap", "sigma_sqrt")


# ----------------------------------------------------------------------------------------------------
# broadcasting and checks


def _check_t(t: float | torch.Tensor, batch: int | None = None) -> None:
    """Raise ValueError when t is outside [0, 1] or its batch does not match."""
    if isinstance(t, torch.Tensor):
        if t.ndim > 1:
            raise ValueError(f"t must be a float, a 0-dim tensor or a tensor [B]; got shape {tuple(t.shape)}")
        if batch is not None and t.ndim == 1 and t.shape[0] not in (1, batch):
            raise ValueError(f"t has {t.shape[0]} entries but the batch has {batch}; pass t [{batch}]")
        if t.numel() and (bool((t < 0).any()) or bool((t > 1).any()) or bool(t.isnan().any())):
            raise ValueError("t must lie in [0, 1] (t = 1 is noise, t = 0 is data)")
    elif not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"t must lie in [0, 1] (t = 1 is noise, t = 0 is data); got {t}")


def _bcast(t: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A float stays a float; a tensor [B] becomes [B, 1, ..., 1] to broadcast against ``like``."""
    if not isinstance(t, torch.Tensor):
        return float(t)
    t = t.to(like.device)
    if t.ndim == 1:
        t = t.reshape(-1, *([1] * (like.ndim - 1)))  # [B] -> [B, 1, ..., 1]
    return t


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")


# ----------------------------------------------------------------------------------------------------
# the path


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) * x0 + t * noise."""
    _check_same_shape(x0, noise, "x0 and noise")
    _check_t(t, x0.shape[0])
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = noise - x0, the (constant) velocity of the straight path from x0 to noise."""
    _check_same_shape(x0, noise, "x0 and noise")
    return noise - x0


# ----------------------------------------------------------------------------------------------------
# time sampling, shifts


def sample_t(
    n: int,
    scheme: str = "logit_normal",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    scale: float = 1.29,
    **kw: Any,
) -> torch.Tensor:
    """Draw n training times in [0, 1] (fp32) from one of the SD3 paper's densities (sec. 3.1).

    - ``uniform``: t ~ U(0, 1).
    - ``logit_normal``: t = sigmoid(u), u ~ N(mean, std^2)  (SD3 default: mean 0, std 1).
    - ``mode``: t = 1 - u - scale * (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1)  (SD3: scale 1.29; needs
      -1 <= scale <= 2 / (pi - 2) for a monotone map).
    - ``cosmap``: t = 1 - 1 / (tan(pi u / 2) + 1), u ~ U(0, 1), whose density is 2 / (pi (1 - 2t + 2t^2)).

    With the same generator, ``uniform``, ``logit_normal`` and ``mode`` draw exactly what diffusers'
    ``compute_density_for_timestep_sampling`` draws (diffusers has no ``cosmap``
    sampler and falls back to uniform).
    """
    if kw:
        raise ValueError(f"unknown options {sorted(kw)}; valid: mean, std (logit_normal), scale (mode)")
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    if scheme == "logit_normal":
        if std <= 0:
            raise ValueError(f"logit_normal std must be > 0; got {std}")
        u = torch.normal(mean=mean, std=std, size=(n,), generator=generator, device=device)
        return torch.sigmoid(u)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown time-sampling scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    u = torch.rand((n,), generator=generator, device=device)
    if scheme == "uniform":
        return u
    if scheme == "mode":
        if not -1.0 <= scale <= 2.0 / (math.pi - 2.0):
            raise ValueError(f"mode scale must be in [-1, 2 / (pi - 2) ~ 1.752]; got {scale}")
        return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)  # cosmap


def shift_t(t: float | torch.Tensor, shift: float) -> float | torch.Tensor:
    """t' = shift * t / (1 + (shift - 1) * t): more time near noise when shift > 1 (SD3: 3)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0; got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent shift: mu linear in the image token count through
    (base_seq_len, base_shift) and (max_seq_len, max_shift); used as t' = e^mu / (e^mu + 1/t - 1)."""
    if max_seq_len == base_seq_len:
        raise ValueError("max_seq_len must differ from base_seq_len")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


# ----------------------------------------------------------------------------------------------------
# loss


def loss_weight(t: torch.Tensor, weighting: str | None = "none") -> torch.Tensor:
    """Per-sample loss weight w(t) as in diffusers' ``compute_loss_weighting_for_sd3``.

    - ``none``: 1.
    - ``sigma_sqrt``: t^-2 (diffusers' name; infinite at t = 0).
    - ``cosmap``: 2 / (pi (1 - 2t + 2t^2)).
    """
    weighting = "none" if weighting is None else weighting
    t = t.float()
    if weighting == "none":
        return torch.ones_like(t)
    if weighting == "sigma_sqrt":
        return t**-2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    raise ValueError(f"unknown loss weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


def cfm_loss(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    scheme: str = "logit_normal",
    weighting: str | None = None,
    **cond: Any,
) -> torch.Tensor:
    """Conditional flow-matching loss, a scalar in fp32:

        L = mean_b [ w(t_b) * mean_i (v_theta(x_t, t)_{b,i} - (noise - x0)_{b,i})^2 ]
        x_t = (1 - t) x0 + t noise

    noise defaults to a standard normal draw, then t [B] to ``sample_t(B, scheme, generator=generator)``,
    both from ``generator`` on its device (in that order, as diffusers' SD3 training script draws them).
    velocity_fn gets x_t in x0's dtype and t in fp32; ``cond`` is passed through. ``weighting``: see
    ``loss_weight``.
    """
    batch = x0.shape[0]
    device = generator.device if generator is not None else x0.device
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
    _check_same_shape(x0, noise, "x0 and noise")
    if t is None:
        t = sample_t(batch, scheme, generator=generator, device=device)
    elif not isinstance(t, torch.Tensor) or t.shape != (batch,):
        raise ValueError(f"t must be a tensor of shape [{batch}] (one time per sample)")
    _check_t(t, batch)
    t = t.to(x0.device, torch.float32)
    x_t = interpolate(x0.float(), noise.float(), t).to(x0.dtype)
    pred = velocity_fn(x_t, t, **cond)
    _check_same_shape(pred, x0, "velocity_fn output and x0")
    err = (pred.float() - velocity_target(x0.float(), noise.float())) ** 2
    per_sample = err.reshape(batch, -1).mean(dim=1)  # [B, ...] -> [B]
    return (loss_weight(t, weighting) * per_sample).mean()


# ----------------------------------------------------------------------------------------------------
# conversions between parameterisations (Tweedie)


def to_x0(x_t: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """x0_hat = x_t - t * v."""
    _check_same_shape(x_t, v, "x_t and v")
    _check_t(t, x_t.shape[0])
    return x_t - _bcast(t, x_t) * v


def to_noise(x_t: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """noise_hat = x_t + (1 - t) * v."""
    _check_same_shape(x_t, v, "x_t and v")
    _check_t(t, x_t.shape[0])
    return x_t + (1 - _bcast(t, x_t)) * v


def to_score(x_t: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Score of the marginal p_t from the velocity (Tweedie), t in (0, 1]:

    x_t | x0 ~ N((1 - t) x0, t^2 I)  =>  grad log p_t(x_t) = -(x_t - (1 - t) E[x0 | x_t]) / t^2
                                                         = -E[noise | x_t] / t = -(x_t + (1 - t) v) / t
    """
    _check_open(t, lower=True)
    return -to_noise(x_t, v, t) / _bcast(t, x_t)


def from_score(x_t: torch.Tensor, score: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Velocity from the score, t in [0, 1): noise_hat = -t * score, v = (noise_hat - x_t) / (1 - t)."""
    _check_same_shape(x_t, score, "x_t and score")
    _check_t(t, x_t.shape[0])
    _check_open(t, lower=False)
    tb = _bcast(t, x_t)
    return (-tb * score - x_t) / (1 - tb)


def _check_open(t: float | torch.Tensor, *, lower: bool) -> None:
    bad = 0.0 if lower else 1.0
    hit = bool((t == bad).any()) if isinstance(t, torch.Tensor) else float(t) == bad
    if hit:
        where = "(0, 1]" if lower else "[0, 1)"
        raise ValueError(f"this conversion divides by {'t' if lower else '1 - t'}: t must lie in {where}")


# ----------------------------------------------------------------------------------------------------
# an analytic reference: Gaussian data


class GaussianPath:
    """The linear path for Gaussian data x0 ~ N(m, C), C = Q diag(lam) Q^T, noise ~ N(0, I), in closed form:

        x_t ~ N(mu_t, C_t),  mu_t = (1 - t) m,  C_t = (1 - t)^2 C + t^2 I
        v(x, t)    = -m + (t I - (1 - t) C) C_t^-1 (x - mu_t)    (the marginal E[noise - x0 | x_t = x])
        score(x,t) = -C_t^-1 (x - mu_t)
        flow map   : x_s = mu_s + C_s^(1/2) C_t^(-1/2) (x_t - mu_t)  (all matrices commute)

    Used as the oracle for solvers, conversions and likelihoods; x is [B, D], any float dtype.
    """

    def __init__(self, mean: torch.Tensor, eigvals: torch.Tensor, eigvecs: torch.Tensor | None = None):
        if mean.ndim != 1 or eigvals.shape != mean.shape:
            raise ValueError("mean and eigvals must both be vectors [D]")
        if bool((eigvals <= 0).any()):
            raise ValueError("eigvals must be > 0 (a covariance)")
        d = mean.shape[0]
        self.mean = mean
        self.lam = eigvals
        self.q = torch.eye(d, dtype=mean.dtype, device=mean.device) if eigvecs is None else eigvecs

    def _rot(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.q.to(x.dtype)  # rows into the eigenbasis: [B, D]

    def _unrot(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.q.to(z.dtype).T

    def _var(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        t = _bcast(t, x)
        return (1 - t) ** 2 * self.lam.to(x.dtype) + t**2  # eigenvalues of C_t: [B, D] or [D]

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        tb = _bcast(t, x)
        lam = self.lam.to(x.dtype)
        m = self.mean.to(x.dtype)
        z = self._rot(x - (1 - tb) * m)
        return -m + self._unrot((tb - (1 - tb) * lam) / self._var(t, x) * z)

    def score(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        tb = _bcast(t, x)
        z = self._rot(x - (1 - tb) * self.mean.to(x.dtype))
        return -self._unrot(z / self._var(t, x))

    def log_prob(self, x: torch.Tensor, t: torch.Tensor | float = 0.0) -> torch.Tensor:
        """log p_t(x) [B] in nats."""
        tb = _bcast(t, x)
        var = self._var(t, x).expand_as(x)
        z = self._rot(x - (1 - tb) * self.mean.to(x.dtype))
        return -0.5 * (z**2 / var + var.log() + math.log(2 * math.pi)).sum(-1)

    def flow(self, x: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
        """Transport x from time t_from to t_to along the exact ODE solution."""
        m = self.mean.to(x.dtype)
        ratio = (self._var(t_to, x) / self._var(t_from, x)).sqrt()
        return (1 - t_to) * m + self._unrot(ratio * self._rot(x - (1 - t_from) * m))

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x0 ~ N(m, C): [n, D]."""
        eps = torch.randn(n, self.mean.shape[0], generator=generator, dtype=self.mean.dtype)
        return self.mean + self._unrot(eps * self.lam.sqrt())
