"""Flows on SO(3), checked against facts that do not come from mmdit_flow.so3:

- torch.linalg.matrix_exp of the skew matrix is the exponential map;
- the Haar volume of SO(3) under the rotation-angle metric is 8 pi^2, so the uniform density is 1 / (8 pi^2),
  a geodesic ball of radius r holds the share (r - sin r) / pi of it, the angle has density (1 - cos w) / pi;
- IGSO(3)(sigma) is the law of Brownian motion at time sigma^2 (simulated by many small random exp steps);
- the heat equation d p / d s = Laplace p / 2 has the probability-flow field v = -(ds/dt) grad log p / 2, so a
  flow along the IGSO(3) family has an exactly known density at every time;
- dR/dt = hat(a) R + R hat(b) (body velocity R^T a + b) moves R to exp(t a) R exp(t b);
- a hand computation: the field v(R) = vee(R) (the skew part of R) has divergence tr R.

Statistical tests use fixed seeds; a Kolmogorov-Smirnov distance is compared with 1.63 / sqrt(n), its 1%
critical value, and a binomial share with 4 standard errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmdit_flow import so3

F64 = torch.float64
KS_1PC = 1.63  # Kolmogorov-Smirnov: P(sqrt(n) D_n > 1.63) = 1%


def _axes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, 3, generator=g, dtype=F64)
    return v / v.norm(dim=-1, keepdim=True)


def _ks(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the empirical law of samples [n] and a CDF (a function)."""
    x, _ = samples.to(F64).sort()
    n = x.numel()
    f = cdf(x)
    hi = torch.arange(1, n + 1, dtype=F64) / n - f
    lo = f - torch.arange(n, dtype=F64) / n
    return max(hi.max().item(), lo.max().item())


def _igso3_cdf(sigma: float):
    """The angle CDF of IGSO(3) by Gauss-Legendre quadrature of the angle density, interpolated on a grid."""
    grid = torch.linspace(0, math.pi, 2001, dtype=F64)
    nodes, weights = np.polynomial.legendre.leggauss(40)
    a, b = grid[:-1, None], grid[1:, None]
    x = (a + b) / 2 + (b - a) / 2 * torch.from_numpy(nodes)[None]  # [cells, 40]
    cells = (so3.igso3_angle_pdf(x, sigma) * torch.from_numpy(weights)).sum(1) * (b - a)[:, 0] / 2
    table = torch.cat([torch.zeros(1, dtype=F64), cells.cumsum(0)])

    def cdf(w: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.interp(w.numpy(), grid.numpy(), table.numpy()))

    return cdf


# ----------------------------------------------------------------------------------------------------
# exp and log


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_exp_equals_the_matrix_exponential(dtype, tol):
    w = _axes(500, 0) * torch.linspace(0, math.pi, 500, dtype=F64)[:, None]
    w = torch.cat([w, _axes(4, 1) * torch.tensor([0.0, 1e-12, 1e-7, 1e-3], dtype=F64)[:, None]])
    r = so3.exp(w.to(dtype))
    assert r.dtype == dtype
    assert (r - torch.linalg.matrix_exp(so3.hat(w)).to(dtype)).abs().max() < tol
    assert (r.transpose(-1, -2) @ r - torch.eye(3, dtype=dtype)).abs().max() < tol


@pytest.mark.parametrize(
    "norm", [0.0, 1e-12, 1e-8, 1e-5, 1e-3, 0.5, 2.0, 2.2, 2.5, 3.0, math.pi - 1e-4, math.pi - 1e-7]
)
def test_log_inverts_exp_below_pi(norm):
    w = _axes(200, 2) * norm
    assert (so3.log(so3.exp(w)) - w).abs().max() < 1e-12 * max(1.0, 1e-7 / (math.pi - norm))
    assert (so3.angle(so3.exp(w)) - norm).abs().max() < 1e-12


def test_log_float32_near_zero_and_pi():
    for norm, tol in ((1e-6, 1e-9), (1e-3, 1e-7), (1.0, 1e-6), (math.pi - 1e-3, 1e-3)):
        w = (_axes(200, 3) * norm).float()
        assert (so3.log(so3.exp(w)) - w).abs().max() < tol, norm


def test_exp_of_log_is_the_rotation_also_at_pi():
    r = so3.uniform(2000, generator=torch.Generator().manual_seed(4), dtype=F64)
    at_pi = so3.exp(_axes(50, 5) * math.pi)  # log is two-valued here: either value must map back
    for rot in (r, at_pi):
        assert (so3.exp(so3.log(rot)) - rot).abs().max() < 1e-13
        assert (so3.log(rot).norm(dim=-1) <= math.pi + 1e-12).all()


def test_gradients_at_the_identity_are_finite_and_exact():
    """d exp(w) / d w_i = hat(e_i) at w = 0, and log(exp(w)) has the identity Jacobian there."""
    zero = torch.zeros(3, dtype=F64)
    jac = torch.autograd.functional.jacobian(so3.exp, zero)  # [3, 3, 3]
    assert torch.equal(jac.permute(2, 0, 1), so3.hat(torch.eye(3, dtype=F64)))
    jac = torch.autograd.functional.jacobian(lambda w: so3.log(so3.exp(w)), zero)
    assert torch.equal(jac, torch.eye(3, dtype=F64))


def test_dexp_is_the_derivative_of_exp():
    """J_r(psi) u = vee(exp(psi)^T d/ds exp(psi + s u)) by central differences of the matrix exponential."""
    psi = _axes(50, 6) * torch.linspace(0.01, 3.0, 50, dtype=F64)[:, None]
    u = torch.randn(50, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
    h = 1e-6
    d = (torch.linalg.matrix_exp(so3.hat(psi + h * u)) - torch.linalg.matrix_exp(so3.hat(psi - h * u))) / (
        2 * h
    )
    body = so3.vee(torch.linalg.matrix_exp(so3.hat(psi)).transpose(-1, -2) @ d)
    assert (so3.dexp(psi, u) - body).abs().max() < 1e-8
    assert (so3.dexp_inv(psi, so3.dexp(psi, u)) - u).abs().max() < 1e-12


# ----------------------------------------------------------------------------------------------------
# geodesics


def test_geodesic_has_constant_speed_equal_to_the_angle():
    g = torch.Generator().manual_seed(8)
    r0, r1 = so3.uniform(100, generator=g, dtype=F64), so3.uniform(100, generator=g, dtype=F64)
    theta = so3.distance(r0, r1)
    assert (so3.interpolate(r0, r1, 0.0) - r0).abs().max() < 1e-14
    assert (so3.interpolate(r0, r1, 1.0) - r1).abs().max() < 1e-13
    h = 1e-5
    for t in (0.1, 0.37, 0.5, 0.9):
        ahead, behind = so3.interpolate(r0, r1, t + h), so3.interpolate(r0, r1, t - h)
        speed = so3.distance(behind, ahead) / (2 * h)  # the metric speed, from distances alone
        assert (speed - theta).abs().max() < 1e-6
        assert (so3.distance(r0, so3.interpolate(r0, r1, t)) - t * theta).abs().max() < 1e-12
    # the velocity target is the body velocity R_t^T dR_t/dt, the same at every t
    t = torch.full((100,), 0.3, dtype=F64)
    d = (so3.interpolate(r0, r1, t + h) - so3.interpolate(r0, r1, t - h)) / (2 * h)
    body = so3.vee(so3.interpolate(r0, r1, t).transpose(-1, -2) @ d)
    assert (body - so3.velocity_target(r0, r1)).abs().max() < 1e-8


# ----------------------------------------------------------------------------------------------------
# the uniform distribution


def test_haar_volume_is_8_pi_squared():
    """The volume element of the exp chart is det J_r(w) d^3w; integrated over the ball |w| < pi: 8 pi^2."""
    nodes, weights = np.polynomial.legendre.leggauss(64)
    theta = torch.from_numpy((nodes + 1) * math.pi / 2)
    w = theta[:, None] * torch.tensor([0.3, -0.5, 0.81], dtype=F64) / math.sqrt(0.09 + 0.25 + 0.6561)
    jac = torch.stack([so3.dexp(w, e.expand_as(w)) for e in torch.eye(3, dtype=F64)], -1)  # [n, 3, 3]
    shell = 4 * math.pi * theta**2 * torch.linalg.det(jac)
    volume = (shell * torch.from_numpy(weights)).sum() * math.pi / 2
    assert abs(volume.item() - 8 * math.pi**2) < 1e-10
    assert math.isclose(so3.uniform_log_prob(so3.exp(w[:2])).exp()[0].item(), 1 / (8 * math.pi**2))


def test_uniform_angle_marginal_and_left_invariance():
    n = 20000
    r = so3.uniform(n, generator=torch.Generator().manual_seed(9), dtype=F64)
    q = so3.exp(torch.tensor([0.4, -1.2, 2.0], dtype=F64))

    def cdf(w: torch.Tensor) -> torch.Tensor:
        return (w - torch.sin(w)) / math.pi  # of the density (1 - cos w) / pi

    for rot in (r, q @ r, r @ q):
        assert _ks(so3.angle(rot), cdf) < KS_1PC / math.sqrt(n)


@pytest.mark.parametrize("radius", [0.5, 1.5, 2.5])
def test_uniform_density_is_one_over_8_pi_squared(radius):
    """The share of draws in a geodesic ball is its volume 8 pi (r - sin r) times 1 / (8 pi^2)."""
    n = 40000
    r = so3.uniform(n, generator=torch.Generator().manual_seed(10), dtype=F64)
    center = so3.exp(torch.tensor([1.0, 2.0, -0.5], dtype=F64))
    share = (so3.distance(center.expand_as(r), r) < radius).double().mean().item()
    p = 8 * math.pi * (radius - math.sin(radius)) / (8 * math.pi**2)
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n)


# ----------------------------------------------------------------------------------------------------
# IGSO(3)


@pytest.mark.parametrize("sigma", [0.05, 0.2, 0.5, 1.0, 2.0, 5.0])
def test_igso3_density_integrates_to_one(sigma):
    """integral over SO(3) of f / (8 pi^2) d vol = integral_0^pi f(w) 8 pi (1 - cos w) / (8 pi^2) dw."""
    nodes, weights = np.polynomial.legendre.leggauss(400)
    w = torch.from_numpy((nodes + 1) * math.pi / 2)
    density = so3.igso3_log_prob(so3.exp(w[:, None] * torch.tensor([0.0, 0.6, 0.8], dtype=F64)), sigma).exp()
    total = (density * 8 * math.pi * (1 - torch.cos(w)) * torch.from_numpy(weights)).sum() * math.pi / 2
    assert abs(total.item() - 1) < 1e-9


@pytest.mark.parametrize("sigma", [0.3, 0.8, 1.6])
def test_igso3_is_brownian_motion_at_time_sigma_squared(sigma):
    n, steps = 20000, 100
    g = torch.Generator().manual_seed(11)
    r = torch.eye(3, dtype=F64).expand(n, 3, 3)
    for _ in range(steps):
        r = r @ so3.exp(math.sqrt(sigma**2 / steps) * torch.randn(n, 3, generator=g, dtype=F64))
    assert _ks(so3.angle(r), _igso3_cdf(sigma)) < KS_1PC / math.sqrt(n)
    # and its samples are too: the same law
    mean = so3.exp(torch.tensor([0.2, 0.1, -0.3], dtype=F64))
    draws = so3.igso3(n, sigma, mean=mean, generator=g, dtype=F64)
    assert _ks(so3.distance(mean.expand_as(draws), draws), _igso3_cdf(sigma)) < KS_1PC / math.sqrt(n)


def test_igso3_becomes_uniform_for_large_sigma():
    r = so3.uniform(10, generator=torch.Generator().manual_seed(12), dtype=F64)
    assert (so3.igso3_log_prob(r, 6.0) - so3.uniform_log_prob(r)).abs().max() < 1e-6


def test_igso3_score_is_the_gradient_of_the_log_density():
    sigma, mean = 0.6, so3.exp(torch.tensor([0.5, 0.0, 1.0], dtype=F64))
    r = so3.igso3(20, sigma, mean=mean, generator=torch.Generator().manual_seed(13), dtype=F64)
    h = 1e-6
    for i, e in enumerate(torch.eye(3, dtype=F64)):
        up = so3.igso3_log_prob(r @ so3.exp(h * e), sigma, mean=mean)
        down = so3.igso3_log_prob(r @ so3.exp(-h * e), sigma, mean=mean)
        assert ((up - down) / (2 * h) - so3.igso3_score(r, sigma, mean=mean)[:, i]).abs().max() < 1e-6


def test_igso3_rejects_bad_sigma():
    with pytest.raises(ValueError, match="sigma must be"):
        so3.igso3(3, 0.0)
    with pytest.raises(ValueError, match="sigma must be"):
        so3.igso3_log_prob(torch.eye(3)[None], float("nan"))


# ----------------------------------------------------------------------------------------------------
# solvers


def _spinning(a: torch.Tensor, b: torch.Tensor | None = None):
    """Body velocity R^T a + b: dR/dt = hat(a) R + R hat(b), solved by R(t) = exp(dt a) R(t0) exp(dt b)."""
    b = torch.zeros_like(a) if b is None else b

    def velocity_fn(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return r.transpose(-1, -2) @ a + b

    return velocity_fn


A, B = torch.tensor([1.0, -2.0, 0.5], dtype=F64), torch.tensor([0.3, 0.8, -1.1], dtype=F64)


@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_fixed_step_solvers_converge_at_their_order(method, order):
    r = so3.uniform(8, generator=torch.Generator().manual_seed(14), dtype=F64)
    exact = so3.exp(-A) @ r @ so3.exp(-B)  # from t = 1 to t = 0
    errors = []
    for steps in (16, 32):
        out = so3.solve(_spinning(A, B), r, torch.linspace(1, 0, steps + 1, dtype=F64), method=method)
        errors.append(so3.distance(out, exact).max().item())
        assert (out.transpose(-1, -2) @ out - torch.eye(3, dtype=F64)).abs().max() < 1e-12
    assert 2 ** (order - 0.3) < errors[0] / errors[1] < 2 ** (order + 0.5)


def test_adaptive_solver_meets_its_tolerance():
    r = so3.uniform(8, generator=torch.Generator().manual_seed(15), dtype=F64)
    exact = so3.exp(-A) @ r @ so3.exp(-B)
    loose = so3.solve_adaptive(_spinning(A, B), r, rtol=1e-5, atol=1e-5)
    tight = so3.solve_adaptive(_spinning(A, B), r, rtol=1e-9, atol=1e-9)
    assert so3.distance(loose.x, exact).max() < 1e-4
    assert so3.distance(tight.x, exact).max() < 1e-8
    assert loose.nfe < tight.nfe < 600


def test_solvers_reject_bad_input():
    r = torch.eye(3)[None]
    with pytest.raises(ValueError, match="unknown solver method"):
        so3.solve(_spinning(torch.ones(3)), r, [1.0, 0.0], method="rk45")
    with pytest.raises(ValueError, match=r"velocity_fn must return body velocities \[1, 3\]"):
        so3.solve(lambda r, t: r, r, [1.0, 0.0])
    with pytest.raises(ValueError, match="rotation matrices"):
        so3.solve(_spinning(torch.ones(3)), torch.eye(4)[None], [1.0, 0.0])
    with pytest.raises(ValueError, match="t0 must lie in"):
        so3.solve_adaptive(_spinning(torch.ones(3)), r, t0=2.0)


# ----------------------------------------------------------------------------------------------------
# likelihood: the exact heat flow between two IGSO(3) laws

S0, S1 = 0.4, 2.0  # data at t = 0 is IGSO(3)(S0), noise at t = 1 is IGSO(3)(S1)


def _heat_flow(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """p_t = IGSO(3)(sigma_t), sigma_t^2 = S0^2 + t (S1^2 - S0^2), solves dp/dt = (S1^2 - S0^2) Laplace p / 2,
    whose probability-flow velocity is -(S1^2 - S0^2) grad log p_t / 2."""
    sigma = math.sqrt(S0**2 + float(t[0]) * (S1**2 - S0**2))
    return -(S1**2 - S0**2) / 2 * so3.igso3_score(r, sigma)


def test_heat_flow_samples_the_data_law():
    n = 4000
    noise = so3.igso3(n, S1, generator=torch.Generator().manual_seed(16), dtype=F64)
    out = so3.solve(_heat_flow, noise, torch.linspace(1, 0, 21, dtype=F64), method="rk4")
    assert _ks(so3.angle(out), _igso3_cdf(S0)) < KS_1PC / math.sqrt(n)


def test_log_likelihood_of_the_heat_flow_is_the_igso3_density():
    r0 = so3.igso3(64, S0, generator=torch.Generator().manual_seed(17), dtype=F64)
    tails = so3.uniform(16, generator=torch.Generator().manual_seed(18), dtype=F64)  # down to log p = -28

    def prior(r: torch.Tensor) -> torch.Tensor:
        return so3.igso3_log_prob(r, S1)

    both = torch.cat([r0, tails])
    ll = so3.log_likelihood(_heat_flow, both, prior=prior, adaptive=True, rtol=1e-7, atol=1e-7)
    assert ll.dtype == F64
    assert (ll - so3.igso3_log_prob(both, S0)).abs().max() < 1e-4
    # rk4 on a fixed grid converges at 4th order (the stiff tails need the adaptive solve)
    errors = [
        (so3.log_likelihood(_heat_flow, r0, prior=prior, steps=steps) - so3.igso3_log_prob(r0, S0))
        .abs()
        .max()
        for steps in (32, 64)
    ]
    assert errors[1] < 3e-4 and errors[0] / errors[1] > 8


def test_divergence_by_hand():
    """v(R) = vee(R): d/ds vee(R exp(s hat e_i))_i summed over i is sum_i (tr R - R_ii) / 2 = tr R."""
    r = so3.uniform(30, generator=torch.Generator().manual_seed(19), dtype=F64)
    div = so3.divergence(lambda x, t: so3.vee(x), r, torch.zeros(30, dtype=F64))
    assert (div - r.diagonal(dim1=-2, dim2=-1).sum(-1)).abs().max() < 1e-12
    # a rigid spin is a Killing field: no volume change, the uniform density stays uniform
    ll = so3.log_likelihood(_spinning(torch.tensor([1.0, 2.0, 3.0], dtype=F64)), r, steps=4)
    assert (ll + math.log(8 * math.pi**2)).abs().max() < 1e-12


def test_cfm_loss_is_zero_for_the_true_conditional_velocity():
    g = torch.Generator().manual_seed(20)
    r0, r1 = so3.uniform(32, generator=g, dtype=F64), so3.uniform(32, generator=g, dtype=F64)
    target = so3.velocity_target(r0, r1)
    exact = so3.cfm_loss(lambda r, t: target, r0, noise=r1)
    off = so3.cfm_loss(lambda r, t: target + torch.tensor([0.1, 0.0, -0.2], dtype=F64), r0, noise=r1)
    assert exact.item() < 1e-24 and math.isclose(off.item(), 0.05, rel_tol=1e-12)
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \[32\]"):
        so3.cfm_loss(lambda r, t: target, r0, t=torch.zeros(3))


# ----------------------------------------------------------------------------------------------------
# a trained flow: uniform noise -> IGSO(3) data


class _TinyField(torch.nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(10, width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 3),
        )  # fmt: skip

    def forward(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([r.reshape(-1, 9), t[:, None]], dim=1).to(self.net[0].weight.dtype)).to(
            r.dtype
        )


def test_trained_flow_recovers_the_igso3_log_likelihood():
    torch.manual_seed(21)
    sigma, mean = 0.5, so3.exp(torch.tensor([0.3, -0.7, 1.1]))
    g = torch.Generator().manual_seed(22)
    model = _TinyField()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1500)
    for _ in range(1500):
        loss = so3.cfm_loss(model, so3.igso3(256, sigma, mean=mean, generator=g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.requires_grad_(False)
    test = so3.igso3(200, sigma, mean=mean, generator=torch.Generator().manual_seed(23), dtype=F64)
    ll = so3.log_likelihood(model, test, adaptive=True, rtol=1e-5, atol=1e-5)
    truth = so3.igso3_log_prob(test, sigma, mean=mean)
    # truth: mean log-density -2.11 nats (uniform: -4.37); the gap E[truth - ll] is KL(target || flow) >= 0:
    # measured 0.045 nats (its standard error ~0.015), asserted within 0.1
    assert abs((truth - ll).mean().item()) < 0.1
    assert torch.corrcoef(torch.stack([ll, truth]))[0, 1] > 0.9
