"""Flow matching on the rotation group SO(3): exp / log maps, geodesics, uniform and IGSO(3) distributions,
the Riemannian CFM loss, manifold ODE solvers and exact log-likelihoods.

Conventions (the same as the Euclidean core, ``mmdit_flow.flow``): t = 1 is noise, t = 0 is data.

    R_t = R0 exp(t log(R0^T R1))             (the geodesic from data R0 to noise R1)
    v   = R_t^T dR_t/dt = log(R0^T R1)       (the body-frame velocity, constant along the geodesic)

Glossary: rotations ``R`` are matrices [..., 3, 3]; tangent vectors are axis-angle vectors ``w`` [..., 3] in
the Lie algebra so(3) (``hat(w)`` is the skew matrix with hat(w) x = w x x). A velocity is always given in the
body frame: dR/dt = R hat(v). The metric is the bi-invariant one with |hat(w)| = |w|, so the geodesic distance
between R0 and R1 is the rotation angle of R0^T R1, in [0, pi], and the volume of SO(3) is 8 pi^2.

Densities are with respect to that Riemannian volume: the uniform one is 1 / (8 pi^2), and its rotation-angle
marginal is (1 - cos w) / pi. IGSO(3) with parameter sigma is the law of a Brownian motion on SO(3) at time
sigma^2 (generator Laplace / 2; small steps R <- R exp(sqrt(dt) eps), eps ~ N(0, I_3)), so sigma is the
per-axis standard deviation of the axis-angle vector when sigma is small. Its density (the heat-kernel series)

    p(R) = f(w; sigma) / (8 pi^2),
    f(w; sigma) = sum_l (2l + 1) exp(-l (l + 1) sigma^2 / 2) sin((l + 1/2) w) / sin(w / 2)

depends only on the angle w of mean^T R. A velocity function is ``velocity_fn(R, t, **cond) -> v`` with R
[B, 3, 3], t a tensor [B] and v [B, 3] in the body frame; solvers integrate in the Lie algebra
(Runge-Kutta-Munthe-Kaas) and retract with exp.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from mmdit_flow import sampling
from mmdit_flow.flow import VelocityFn, _check_t, sample_t
from mmdit_flow.sampling import AdaptiveResult

LOG_VOLUME = math.log(8 * math.pi**2)  # log of the volume of SO(3) under the rotation-angle metric
SIGMA_MIN = 0.01  # below this the heat-kernel series needs more than ~1200 terms
PRIORS = ("uniform",)


# ----------------------------------------------------------------------------------------------------
# the Lie algebra and the exp / log maps


def hat(w: torch.Tensor) -> torch.Tensor:
    """The skew matrix [..., 3, 3] of w [..., 3]: hat(w) x = w x x."""
    if w.shape[-1] != 3:
        raise ValueError(f"w must have a last dimension of 3 (an axis-angle vector); got {tuple(w.shape)}")
    x, y, z = w.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(*w.shape[:-1], 3, 3)


def vee(m: torch.Tensor) -> torch.Tensor:
    """The vector [..., 3] of the skew part of m [..., 3, 3] (the inverse of ``hat`` on skew matrices)."""
    _check_matrix(m, "m")
    return (
        torch.stack(
            [m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1
        )
        / 2
    )


def _check_matrix(r: torch.Tensor, name: str) -> None:
    if r.ndim < 2 or r.shape[-2:] != (3, 3):
        raise ValueError(f"{name} must be rotation matrices [..., 3, 3]; got shape {tuple(r.shape)}")


def exp(w: torch.Tensor) -> torch.Tensor:
    """Rodrigues: exp(hat(w)) = I + sin(a)/a hat(w) + (1 - cos a)/a^2 hat(w)^2, a = |w|; w [..., 3].

    Taylor series near a = 0 (and 2 sin^2(a/2) for 1 - cos a), so values and gradients are exact at w = 0.
    """
    a2 = (w * w).sum(-1)[..., None, None]
    small = a2 < 1e-4
    a = torch.sqrt(torch.where(small, torch.ones_like(a2), a2))  # a safe value where the series is used
    sin_a = torch.where(small, 1 - a2 / 6 + a2**2 / 120, torch.sin(a) / a)
    cos_a = torch.where(small, 0.5 - a2 / 24 + a2**2 / 720, 2 * torch.sin(a / 2) ** 2 / a2.where(~small, 1.0))
    k = hat(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device)
    return eye + sin_a * k + cos_a * (k @ k)


def log(r: torch.Tensor) -> torch.Tensor:
    """The axis-angle vector w [..., 3] with exp(w) = r and |w| in [0, pi]; r [..., 3, 3].

    The angle is atan2(|skew|, (tr r - 1) / 2), accurate at both ends. Below ~2.2 rad the axis comes from the
    skew part of r (a series for a / sin a near 0); above it, where sin a vanishes, from the symmetric part
    (r + r^T) / 2 = cos a I + (1 - cos a) n n^T, with the sign of n taken from the skew part. At exactly pi
    either of the two logs may be returned.
    """
    _check_matrix(r, "r")
    s_vec = vee(r)  # sin(a) n
    c = ((r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1.0, 1.0)  # cos(a)
    s2 = (s_vec * s_vec).sum(-1)
    tiny = (s2 < 1e-6) & (c > 0)
    s = torch.sqrt(torch.where(tiny, torch.ones_like(s2), s2))
    a = torch.atan2(s, c)  # only used where not tiny
    # a / sin(a) as a series in sin^2(a) near 0 (asin(s) / s = 1 + s^2/6 + 3 s^4/40 + ...)
    ratio = torch.where(tiny, 1 + s2 / 6 + 3 * s2**2 / 40, a / s)
    w_skew = ratio[..., None] * s_vec
    # large angles: the column of n n^T with the largest diagonal, normalised, signed by the skew part
    sym = (r + r.transpose(-1, -2)) / 2
    eye = torch.eye(3, dtype=r.dtype, device=r.device)
    nn = (sym - c[..., None, None] * eye) / (1 - c).clamp_min(0.5)[..., None, None]
    j = nn.diagonal(dim1=-2, dim2=-1).argmax(-1)  # [...]
    col = torch.take_along_dim(nn, j[..., None, None].expand(*j.shape, 3, 1), dim=-1)[..., 0]  # [..., 3]
    n = col / torch.take_along_dim(nn.diagonal(dim1=-2, dim2=-1), j[..., None], -1).clamp_min(1e-12).sqrt()
    sign = torch.where((n * s_vec).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(r.dtype)
    w_sym = a[..., None] * sign * n
    return torch.where((c < -0.6)[..., None], w_sym, w_skew)


def angle(r: torch.Tensor) -> torch.Tensor:
    """The rotation angle [...] in [0, pi] of r [..., 3, 3] (its geodesic distance to the identity)."""
    _check_matrix(r, "r")
    c = (r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.atan2(vee(r).norm(dim=-1), c)


def distance(r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """The geodesic distance |log(r0^T r1)| [...] in [0, pi]."""
    return angle(r0.transpose(-1, -2) @ r1)


def dexp_inv(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """psi' for a body velocity u at exp(psi), psi = w: the inverse right Jacobian of exp applied to u,

    J_r(w)^-1 u = u + w x u / 2 + (1 / a^2 - (1 + cos a) / (2 a sin a)) w x (w x u),  a = |w| < pi,
    so that d/dt exp(psi(t)) = exp(psi) hat(u) when psi' = J_r(psi)^-1 u.
    """
    a2 = (w * w).sum(-1, keepdim=True)
    small = a2 < 1e-4
    a = torch.sqrt(torch.where(small, torch.ones_like(a2), a2))
    coef = torch.where(small, 1 / 12 + a2 / 720 + a2**2 / 30240, 1 / a**2 - 1 / (2 * a * torch.tan(a / 2)))
    wxu = torch.linalg.cross(w, u, dim=-1)
    return u + wxu / 2 + coef * torch.linalg.cross(w, wxu, dim=-1)


def dexp(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The right Jacobian of exp: the body velocity J_r(w) u of exp(psi) moving at psi' = u, psi = w."""
    a2 = (w * w).sum(-1, keepdim=True)
    small = a2 < 1e-4
    a = torch.sqrt(torch.where(small, torch.ones_like(a2), a2))
    c1 = torch.where(small, 0.5 - a2 / 24 + a2**2 / 720, 2 * torch.sin(a / 2) ** 2 / a**2)
    c2 = torch.where(small, 1 / 6 - a2 / 120 + a2**2 / 5040, (a - torch.sin(a)) / a**3)
    wxu = torch.linalg.cross(w, u, dim=-1)
    return u - c1 * wxu + c2 * torch.linalg.cross(w, wxu, dim=-1)


# ----------------------------------------------------------------------------------------------------
# the path


def interpolate(r0: torch.Tensor, r1: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """The geodesic R_t = r0 exp(t log(r0^T r1)): r0 at t = 0 (data), r1 at t = 1 (noise); t float or [B]."""
    _check_pair(r0, r1)
    _check_t(t, r0.shape[0] if r0.ndim == 3 else None)
    t = torch.as_tensor(t, dtype=r0.dtype, device=r0.device)
    if t.ndim == 1:
        t = t.reshape(-1, *([1] * (r0.ndim - 2)))  # [B] -> [B, 1, ..., 1]
    return r0 @ exp(t[..., None] * velocity_target(r0, r1))


def velocity_target(r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """v = log(r0^T r1) [..., 3], the body-frame velocity of the geodesic from r0 to r1 (constant in t)."""
    _check_pair(r0, r1)
    return log(r0.transpose(-1, -2) @ r1)


def _check_pair(r0: torch.Tensor, r1: torch.Tensor) -> None:
    _check_matrix(r0, "r0")
    if r0.shape != r1.shape:
        raise ValueError(f"r0 and r1 must have the same shape; got {tuple(r0.shape)} and {tuple(r1.shape)}")


def cfm_loss(
    velocity_fn: VelocityFn,
    r0: torch.Tensor,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    scheme: str = "uniform",
    **cond: Any,
) -> torch.Tensor:
    """Riemannian conditional flow matching on SO(3), a scalar:

        L = mean_b |v_theta(R_t, t) - log(r0^T noise)|^2,   R_t = r0 exp(t log(r0^T noise))

    the squared Riemannian norm of the error in the body frame. noise defaults to uniform rotations, then t
    [B] to ``flow.sample_t(B, scheme)``, both drawn from ``generator`` in that order.
    """
    _check_matrix(r0, "r0")
    batch = r0.shape[0]
    if noise is None:
        noise = uniform(batch, generator=generator, dtype=r0.dtype).to(r0.device)
    if t is None:
        device = generator.device if generator is not None else None
        t = sample_t(batch, scheme, generator=generator, device=device)
    if not isinstance(t, torch.Tensor) or t.shape != (batch,):
        raise ValueError(f"t must be a tensor of shape [{batch}] (one time per sample)")
    _check_t(t, batch)
    t = t.to(r0.device, r0.dtype)
    target = velocity_target(r0, noise)  # [B, 3]
    r_t = r0 @ exp(t[:, None] * target)
    pred = velocity_fn(r_t, t, **cond)
    if pred.shape != target.shape:
        raise ValueError(f"velocity_fn must return body velocities [{batch}, 3]; got {tuple(pred.shape)}")
    return (pred - target).pow(2).sum(-1).mean()


# ----------------------------------------------------------------------------------------------------
# distributions


def uniform(
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n rotations [n, 3, 3] from the uniform (Haar) distribution: normalised Gaussian quaternions."""
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    device = device if device is not None else (generator.device if generator is not None else None)
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64, device=device)
    return quaternion_to_matrix(q / q.norm(dim=-1, keepdim=True)).to(dtype)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """The rotation [..., 3, 3] of unit quaternions q = (w, x, y, z) [..., 4]."""
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, -1).reshape(*q.shape[:-1], 3, 3)


def uniform_log_prob(r: torch.Tensor) -> torch.Tensor:
    """log(1 / (8 pi^2)) for each rotation of r [..., 3, 3]."""
    _check_matrix(r, "r")
    return torch.full(r.shape[:-2], -LOG_VOLUME, dtype=r.dtype, device=r.device)


def _check_sigma(sigma: float) -> None:
    if not (math.isfinite(sigma) and sigma >= SIGMA_MIN):
        raise ValueError(f"sigma must be a finite number >= {SIGMA_MIN} (IGSO(3) scale); got {sigma}")


def _igso3_terms(w: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(w; sigma), f'(w; sigma) / w) in fp64 at angles w [...]: the series and its radial derivative."""
    _check_sigma(sigma)
    l_max = math.ceil(12 / sigma) + 5
    flat = w.to(torch.float64).reshape(-1)
    chunk = max(1, 2**20 // (l_max + 1))  # bounds the [chunk, L] temporaries at a few MiB each
    parts = [_igso3_chunk(flat[i : i + chunk], sigma, l_max) for i in range(0, flat.numel(), chunk)]
    f = torch.cat([p[0] for p in parts]) if parts else flat
    df_over_w = torch.cat([p[1] for p in parts]) if parts else flat
    return f.reshape(w.shape), df_over_w.reshape(w.shape)


def _igso3_chunk(w64: torch.Tensor, sigma: float, l_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    ls = torch.arange(l_max + 1, dtype=torch.float64, device=w64.device)  # [L]
    weight = (2 * ls + 1) * torch.exp(-ls * (ls + 1) * sigma**2 / 2)  # [L]
    half = (w64 / 2)[..., None]  # [..., 1]
    m, ll = 2 * ls + 1, ls * (ls + 1)
    # the character chi_l(w) = sin(m w/2) / sin(w/2) of the irreducible representation l (m = 2l + 1) and
    # chi_l'(w) / w; where m w / 2 < 1e-3 their series m (1 - l(l+1) w^2/6) and -m l(l+1)/3 (1 - (3l(l+1)-1)
    # w^2/30), which are exact there to 1e-13 (the closed forms lose (m w)^-2 digits to cancellation)
    near0 = (m * half).abs() < 1e-3  # [..., L]
    sin_h = torch.sin(half).where(~near0, 1.0)
    w2 = w64[..., None] ** 2
    chi = torch.where(near0, m * (1 - ll * w2 / 6), torch.sin(m * half) / sin_h)
    dchi = (m / 2 * torch.cos(m * half) * sin_h - torch.sin(m * half) * torch.cos(half) / 2) / sin_h**2
    dchi_over_w = torch.where(
        near0, -m * ll / 3 * (1 - (3 * ll - 1) * w2 / 30), dchi / (2 * half).where(~near0, 1.0)
    )
    return (chi * weight).sum(-1), (dchi_over_w * weight).sum(-1)


def igso3_series(w: torch.Tensor, sigma: float) -> torch.Tensor:
    """f(w; sigma) = sum_l (2l+1) exp(-l(l+1) sigma^2/2) sin((l+1/2) w) / sin(w/2): the IGSO(3) density
    relative to the uniform one, at rotation angles w [...] in [0, pi] (computed in fp64, clamped at 0).

    Terms up to l = 12 / sigma + 5, after which they are below exp(-70) times the leading ones. Far in the
    tail (f below ~1e-13 f(0)) the sum is rounding noise.
    """
    return _igso3_terms(w, sigma)[0].clamp_min(0.0).to(w.dtype)


def igso3_score(r: torch.Tensor, sigma: float, *, mean: torch.Tensor | None = None) -> torch.Tensor:
    """The Riemannian gradient of log IGSO(3)(sigma) at r [..., 3, 3] in the body frame [..., 3]:
    f'(w) / f(w) * log(mean^T r) / w with w the angle (the gradient of the angle is the unit axis)."""
    _check_matrix(r, "r")
    rel = r if mean is None else mean.to(r).transpose(-1, -2) @ r
    omega = log(rel)
    f, df_over_w = _igso3_terms(omega.norm(dim=-1), sigma)
    return ((df_over_w / f).to(r.dtype))[..., None] * omega


def igso3_angle_pdf(w: torch.Tensor, sigma: float) -> torch.Tensor:
    """The density on [0, pi] of the angle of an IGSO(3)(sigma) draw: f(w; sigma) (1 - cos w) / pi."""
    return igso3_series(w, sigma) * (1 - torch.cos(w)) / math.pi


def igso3_log_prob(r: torch.Tensor, sigma: float, *, mean: torch.Tensor | None = None) -> torch.Tensor:
    """log IGSO(3) density [...] of r [..., 3, 3] around ``mean`` (default identity), in the volume measure:
    log f(angle(mean^T r); sigma) - log(8 pi^2)."""
    _check_matrix(r, "r")
    rel = r if mean is None else mean.to(r).transpose(-1, -2) @ r
    return torch.log(igso3_series(angle(rel), sigma)) - LOG_VOLUME


def igso3(
    n: int,
    sigma: float,
    *,
    mean: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    grid: int = 8192,
) -> torch.Tensor:
    """n draws [n, 3, 3] from IGSO(3)(sigma) around ``mean`` [3, 3]: mean exp(w n) with a uniform axis n and
    the angle w by inverse-CDF sampling of ``igso3_angle_pdf`` on ``grid`` points (trapezoid CDF, linear
    interpolation) over [0, min(pi, 12 sigma)]."""
    _check_sigma(sigma)
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    device = device if device is not None else (generator.device if generator is not None else None)
    ws = torch.linspace(0.0, min(math.pi, 12 * sigma), grid, dtype=torch.float64, device=device)
    pdf = igso3_angle_pdf(ws, sigma)
    cdf = torch.cat([pdf.new_zeros(1), torch.cumsum((pdf[1:] + pdf[:-1]) / 2 * (ws[1:] - ws[:-1]), 0)])
    cdf = cdf / cdf[-1]
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    axis = torch.randn(n, 3, generator=generator, dtype=torch.float64, device=device)
    i = torch.searchsorted(cdf, u).clamp(1, grid - 1)
    frac = (u - cdf[i - 1]) / (cdf[i] - cdf[i - 1]).clamp_min(1e-300)
    w = ws[i - 1] + frac * (ws[i] - ws[i - 1])
    r = exp(w[:, None] * axis / axis.norm(dim=-1, keepdim=True))
    if mean is not None:
        if mean.shape != (3, 3):
            raise ValueError(f"mean must be one rotation matrix [3, 3]; got shape {tuple(mean.shape)}")
        r = mean.to(r) @ r
    return r.to(dtype)


# ----------------------------------------------------------------------------------------------------
# solvers: Runge-Kutta-Munthe-Kaas in the Lie algebra, retraction by exp

# a field on the product of SO(3)^B with R^k: (R [B, 3, 3], t float) -> (v [B, 3], g [B, k])
_ProductField = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


class _Local:
    """The field in exponential coordinates around a base point: z = (psi, a) [B, 3 + k] stands for
    (r exp(psi), a0 + a), and dz/dt = (J_r(psi)^-1 v, g). Counts evaluations."""

    def __init__(self, field: _ProductField, r: torch.Tensor):
        self.field, self.r, self.nfe = field, r, 0

    def __call__(self, z: torch.Tensor, t: float) -> torch.Tensor:
        self.nfe += 1
        psi = z[:, :3]
        v, g = self.field(self.r @ exp(psi), t)
        return torch.cat([dexp_inv(psi, v), g], dim=1)


def _velocity_field(velocity_fn: VelocityFn, r: torch.Tensor, cond: dict[str, Any]) -> _ProductField:
    dtype = torch.promote_types(r.dtype, torch.float32)

    def field(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        tt = torch.full((x.shape[0],), t, dtype=dtype, device=x.device)
        v = velocity_fn(x.to(r.dtype), tt, **cond)
        if v.shape != (x.shape[0], 3):
            raise ValueError(
                f"velocity_fn must return body velocities [{x.shape[0]}, 3]; got {tuple(v.shape)}"
            )
        return v.to(dtype), v.new_zeros(x.shape[0], 0, dtype=dtype)

    return field


def _solve_product(
    field: _ProductField, r: torch.Tensor, a: torch.Tensor, ts: torch.Tensor | list[float], method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if method not in sampling.METHODS:
        raise ValueError(f"unknown solver method {method!r}; valid: {', '.join(sampling.METHODS)}")
    grid = sampling._as_grid(ts)
    times, dts = grid.tolist(), (grid[1:] - grid[:-1]).tolist()
    z0 = r.new_zeros(r.shape[0], 3 + a.shape[1])
    for i, dt in enumerate(dts):
        z = sampling._step(_Local(field, r), method, z0, times[i], dt, times[i + 1])
        r, a = r @ exp(z[:, :3]), a + z[:, 3:]
    return r, a


def solve(
    velocity_fn: VelocityFn,
    r: torch.Tensor,
    ts: torch.Tensor | list[float],
    *,
    method: str = "euler",
    **cond: Any,
) -> torch.Tensor:
    """Integrate dR/dt = R hat(v(R, t)) over the grid ts (from 1 to 0 to sample) with a fixed-step method.

    Each step solves psi' = J_r(psi)^-1 v(R_n exp(psi), t), psi(t_n) = 0, in the Lie algebra with the Runge-
    Kutta method (``euler`` | ``midpoint`` | ``heun`` | ``rk4``, the tableaus of ``sampling.solve``) and
    retracts: R_{n+1} = R_n exp(psi_{n+1}) (Munthe-Kaas 1998; keeps the method's order). Euler is
    R <- R exp(dt v). Returns rotations in fp32 (fp64 from an fp64 start).
    """
    _check_matrix(r, "r")
    r = r.to(torch.promote_types(r.dtype, torch.float32))
    field = _velocity_field(velocity_fn, r, cond)
    return _solve_product(field, r, r.new_zeros(r.shape[0], 0), ts, method)[0]


def _solve_product_adaptive(
    field: _ProductField, r: torch.Tensor, a: torch.Tensor, *, rtol: float, atol: float, t0: float, t1: float,
    max_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:  # fmt: skip
    """Dormand-Prince 5(4) in exponential coordinates around each accepted point (the controller of
    ``sampling.solve_adaptive``); the error is scaled by atol + rtol * |(R, a) increment|."""
    if rtol <= 0 or atol < 0:
        raise ValueError(f"need rtol > 0 and atol >= 0; got rtol={rtol}, atol={atol}")
    for name, t in (("t0", t0), ("t1", t1)):
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1] (t = 1 is noise, t = 0 is data); got {t}")
    if t0 == t1:
        raise ValueError("t0 and t1 must differ")
    span, t, nfe = t1 - t0, t0, 0
    direction = math.copysign(1.0, span)
    z0 = r.new_zeros(r.shape[0], 3 + a.shape[1])
    local = _Local(field, r)
    k1 = local(z0, t)
    h = 0.05 * abs(span)
    accepted = rejected = 0
    just_rejected = False
    while direction * (t1 - t) > 0:
        if accepted + rejected >= max_steps:
            raise RuntimeError(f"solve_adaptive took {max_steps} steps; loosen rtol/atol or raise max_steps")
        last = abs(t1 - t) <= h * (1 + 1e-12)
        step = (t1 - t) if last else direction * h
        z_new, err, k_new = sampling._dp_step(local, z0, t, step, k1)
        err_norm = sampling._rms(err / (atol + rtol * z_new.abs()))
        if not math.isfinite(err_norm):
            raise FloatingPointError(f"non-finite error estimate at t={t:.6g}: the velocity field diverged")
        if err_norm <= 1.0:
            t = t1 if last else t + step
            r, a = r @ exp(z_new[:, :3]), a + z_new[:, 3:]
            nfe += local.nfe
            # FSAL: the last stage is J_r(psi)^-1 v at the new point; the new base point wants v itself
            k1 = torch.cat([dexp(z_new[:, :3], k_new[:, :3]), k_new[:, 3:]], dim=1)
            local = _Local(field, r)
            accepted += 1
        else:
            rejected += 1
        factor = 0.9 * err_norm ** (-1 / 5) if err_norm > 0 else 10.0
        factor = min(10.0, max(0.2, factor))
        if err_norm > 1.0 or just_rejected:
            factor = min(1.0, factor)
        just_rejected = err_norm > 1.0
        h = abs(step) * factor
    return r, a, nfe + local.nfe, accepted, rejected


def solve_adaptive(
    velocity_fn: VelocityFn,
    r: torch.Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t0: float = 1.0,
    t1: float = 0.0,
    max_steps: int = 10_000,
    **cond: Any,
) -> AdaptiveResult:
    """Integrate dR/dt = R hat(v(R, t)) from t0 to t1 with Dormand-Prince 5(4) in the Lie algebra (RKMK) and
    the step-size control of ``sampling.solve_adaptive``; returns a ``sampling.AdaptiveResult``."""
    _check_matrix(r, "r")
    r = r.to(torch.promote_types(r.dtype, torch.float32))
    field = _velocity_field(velocity_fn, r, cond)
    out = _solve_product_adaptive(
        field, r, r.new_zeros(r.shape[0], 0), rtol=rtol, atol=atol, t0=t0, t1=t1, max_steps=max_steps
    )
    return AdaptiveResult(x=out[0], nfe=out[2], steps=out[3], rejected=out[4])


# ----------------------------------------------------------------------------------------------------
# likelihood


def divergence(velocity_fn: VelocityFn, r: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
    """Riemannian divergence [B] of the field R hat(v(R, t)): sum_i d/ds v_i(R exp(s e_i), t) at s = 0.

    Exact (three backward passes): the left-invariant frame R hat(e_i) is orthonormal and divergence-free
    (SO(3) is unimodular), so div (sum_i v_i E_i) = sum_i E_i(v_i).
    """
    return _value_and_divergence(velocity_fn, r, t, cond)[1]


def _value_and_divergence(
    velocity_fn: VelocityFn, r: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        xi = torch.zeros(r.shape[0], 3, dtype=r.dtype, device=r.device, requires_grad=True)
        v = velocity_fn(r.detach() @ exp(xi), t, **cond)  # [B, 3]
        if v.shape != (r.shape[0], 3):
            raise ValueError(
                f"velocity_fn must return body velocities [{r.shape[0]}, 3]; got {tuple(v.shape)}"
            )
        div = torch.zeros(r.shape[0], dtype=v.dtype, device=v.device)
        for i in range(3):
            (grad,) = torch.autograd.grad(v[:, i].sum(), xi, retain_graph=i < 2)
            div = div + grad[:, i]
    return v.detach(), div.detach()


def log_likelihood(
    velocity_fn: VelocityFn,
    r0: torch.Tensor,
    *,
    prior: str | Callable[[torch.Tensor], torch.Tensor] = "uniform",
    steps: int = 32,
    method: str = "rk4",
    adaptive: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    **cond: Any,
) -> torch.Tensor:
    """log p_0(r0) [B] in nats (density in the Riemannian volume, uniform = -log(8 pi^2)) under the flow:

        log p_0(R_0) = log p_1(R_1) + integral_0^1 div v(R_t, t) dt

    integrating data (t = 0) to noise (t = 1) on SO(3) with the exact Riemannian divergence. ``prior`` is
    "uniform" or a function R [B, 3, 3] -> log-density [B] (e.g. ``lambda r: igso3_log_prob(r, 2.0)``).
    Fixed grid of ``steps`` steps with ``method`` (default rk4), or Dormand-Prince with ``rtol``/``atol``
    when ``adaptive``. Computed in fp32 (fp64 for fp64 inputs).
    """
    _check_matrix(r0, "r0")
    if isinstance(prior, str):
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; valid: {', '.join(PRIORS)} or a log-density function")
        prior = uniform_log_prob
    r = r0.to(torch.promote_types(r0.dtype, torch.float32))

    def field(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        v, div = _value_and_divergence(velocity_fn, x, tt, cond)
        return v.to(x.dtype), div.to(x.dtype)[:, None]

    a = r.new_zeros(r.shape[0], 1)
    if adaptive:
        r1, integral = _solve_product_adaptive(
            field, r, a, rtol=rtol, atol=atol, t0=0.0, t1=1.0, max_steps=10_000
        )[:2]
    else:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
        r1, integral = _solve_product(field, r, a, torch.linspace(0.0, 1.0, steps + 1), method)
    return prior(r1).to(r1.dtype) + integral[:, 0]
