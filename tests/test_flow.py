"""mmdit_flow.flow against closed forms and diffusers."""

from __future__ import annotations

import math

import pytest
import torch

from mmdit_flow import flow
from mmdit_flow.flow import GaussianPath


def _rotation(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def _gaussian() -> GaussianPath:
    mean = torch.tensor([1.0, -0.5], dtype=torch.float64)
    return GaussianPath(mean, torch.tensor([0.25, 4.0], dtype=torch.float64), _rotation(0.6))


def _mlp(d: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d + 1, 16), torch.nn.SiLU(), torch.nn.Linear(16, d))


def _field(net: torch.nn.Module):
    return lambda x, t: net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


# ----------------------------------------------------------------------------------------------------
# path


def test_interpolate_and_velocity_closed_form():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = flow.interpolate(x0, noise, t)
    for i in range(4):
        torch.testing.assert_close(x_t[i], (1 - t[i]) * x0[i] + t[i] * noise[i])
    torch.testing.assert_close(flow.interpolate(x0, noise, 0.0), x0)
    torch.testing.assert_close(flow.interpolate(x0, noise, 1.0), noise)
    # v is d x_t / dt
    h = 1e-3
    fd = (
        flow.interpolate(x0.double(), noise.double(), 0.3 + h)
        - flow.interpolate(x0.double(), noise.double(), 0.3)
    ) / h
    torch.testing.assert_close(fd, flow.velocity_target(x0, noise).double())


@pytest.mark.parametrize("bad_t", [1.5, -0.1, torch.tensor([0.5, 2.0])])
def test_t_outside_unit_interval_raises(bad_t):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        flow.interpolate(x, x, bad_t)


def test_shape_mismatches_raise():
    with pytest.raises(ValueError, match="same shape"):
        flow.interpolate(torch.zeros(2, 3), torch.zeros(2, 4), 0.5)
    with pytest.raises(ValueError, match="batch"):
        flow.interpolate(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="shape"):
        flow.cfm_loss(lambda x, t: x, torch.zeros(2, 3), t=torch.tensor([0.5]))


# ----------------------------------------------------------------------------------------------------
# time sampling


@pytest.mark.parametrize(
    "scheme, kw, diffusers_kw",
    [
        ("uniform", {}, {}),
        ("logit_normal", {"mean": 0.3, "std": 0.8}, {"logit_mean": 0.3, "logit_std": 0.8}),
        ("mode", {"scale": 1.29}, {"mode_scale": 1.29}),
    ],
)
def test_sample_t_equals_diffusers_draws(scheme, kw, diffusers_kw):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = flow.sample_t(257, scheme, generator=torch.Generator().manual_seed(3), **kw)
    ref = compute_density_for_timestep_sampling(
        scheme, 257, generator=torch.Generator().manual_seed(3), **diffusers_kw
    )
    assert torch.equal(ours, ref)


def _mode_cdf(x, scale):
    """P(t <= x) for t = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), f decreasing: 1 - f^-1(x)."""
    import numpy as np

    lo, hi = np.zeros_like(x), np.ones_like(x)
    for _ in range(60):
        mid = (lo + hi) / 2
        f = 1 - mid - scale * (np.cos(np.pi * mid / 2) ** 2 - 1 + mid)
        lo, hi = np.where(f > x, mid, lo), np.where(f > x, hi, mid)
    return 1 - (lo + hi) / 2


CDFS = {
    "uniform": lambda x: x,
    "logit_normal": None,  # filled in the test (needs scipy)
    "mode": lambda x: _mode_cdf(x, 1.29),
    "cosmap": lambda x: 2 / math.pi * __import__("numpy").arctan(x / (1 - x)),
}


@pytest.mark.parametrize("scheme", flow.SCHEMES)
def test_sample_t_matches_its_density_ks(scheme):
    from scipy import stats

    cdfs = dict(CDFS, logit_normal=lambda x: stats.norm.cdf(stats.logistic.ppf(x), loc=0.3, scale=0.8))
    kw = {"mean": 0.3, "std": 0.8} if scheme == "logit_normal" else {}
    t = flow.sample_t(20_000, scheme, generator=torch.Generator().manual_seed(1), **kw).double().numpy()
    assert t.min() >= 0 and t.max() <= 1
    assert stats.kstest(t, cdfs[scheme]).pvalue > 1e-3
    # the test has power: the uniform CDF is rejected for every other scheme
    if scheme != "uniform":
        assert stats.kstest(t, cdfs["uniform"]).pvalue < 1e-6


def test_sample_t_bad_names_raise():
    with pytest.raises(ValueError, match="uniform, logit_normal, mode, cosmap"):
        flow.sample_t(4, "lognormal")
    with pytest.raises(ValueError, match="mean, std"):
        flow.sample_t(4, "logit_normal", sigma=1.0)
    with pytest.raises(ValueError, match="none, cosmap, sigma_sqrt"):
        flow.loss_weight(torch.rand(3), "snr")


def test_shift_t_and_flux_mu_equal_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(flow.shift_t(t, 3.0), 3 * t / (1 + 2 * t))
    assert flow.shift_t(0.5, 1.0) == 0.5
    for n in (256, 1024, 4096, 1000):
        assert flow.flux_mu(n) == pytest.approx(calculate_shift(n), abs=1e-12)
    assert flow.flux_mu(4096) == pytest.approx(1.15)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)  # its training sigmas are shift_t of the 1000-grid
    grid = torch.linspace(1, 1000, 1000).flip(0) / 1000
    torch.testing.assert_close(sched.sigmas, flow.shift_t(grid, 3.0))


# ----------------------------------------------------------------------------------------------------
# loss


def test_cfm_loss_equals_closed_form_and_diffusers_weighting():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    net = _mlp()
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g), torch.rand(8, generator=g)
    for weighting in flow.WEIGHTINGS:
        loss = flow.cfm_loss(_field(net), x0, t=t, noise=noise, weighting=weighting)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
        pred = _field(net)(x_t, t)
        w = compute_loss_weighting_for_sd3(weighting, sigmas=t)  # diffusers: [B] weights
        ref = (w * ((pred - (noise - x0)) ** 2).mean(1)).mean()
        torch.testing.assert_close(loss, ref)


def _tutorial_loss(v_prime, x1, x0_prime, t_prime):
    """The seed tutorial's notation: x1 data, x0' noise, x_t' = t' x1 + (1 - t') x0', target x1 - x0'."""
    x_t = t_prime[:, None] * x1 + (1 - t_prime[:, None]) * x0_prime
    return ((v_prime(x_t, t_prime) - (x1 - x0_prime)) ** 2).mean()


def test_tutorial_notation_loss_equals_cfm_loss():
    net = _mlp()
    velocity = _field(net)
    # a tutorial-notation model is ours with time reversed and sign flipped: v'(x, t') = -v(x, 1 - t')
    v_prime = lambda x, tp: -velocity(x, 1 - tp)  # noqa: E731
    g = torch.Generator().manual_seed(5)
    x0, noise, t = (
        torch.randn(16, 3, generator=g),
        torch.randn(16, 3, generator=g),
        torch.rand(16, generator=g),
    )
    ours = flow.cfm_loss(velocity, x0, t=t, noise=noise)
    theirs = _tutorial_loss(v_prime, x1=x0, x0_prime=noise, t_prime=1 - t)
    torch.testing.assert_close(ours, theirs)
    assert ours > 0


def test_cfm_loss_draws_are_seeded_and_in_fp32():
    net = _mlp().to(torch.bfloat16)
    velocity = _field(net)
    x0 = torch.randn(8, 3).to(torch.bfloat16)
    a = flow.cfm_loss(velocity, x0, generator=torch.Generator().manual_seed(1))
    b = flow.cfm_loss(velocity, x0, generator=torch.Generator().manual_seed(1))
    c = flow.cfm_loss(velocity, x0, generator=torch.Generator().manual_seed(2))
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    # defaults: noise first, then t from sample_t, from the same generator
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    t = flow.sample_t(8, "logit_normal", generator=g)
    assert torch.equal(a, flow.cfm_loss(velocity, x0, t=t, noise=noise))


# ----------------------------------------------------------------------------------------------------
# conversions and the Gaussian oracle


def test_conversions_recover_x0_and_noise():
    g = torch.Generator().manual_seed(0)
    x0, noise = (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    x_t, v = flow.interpolate(x0, noise, t), flow.velocity_target(x0, noise)
    torch.testing.assert_close(flow.to_x0(x_t, v, t), x0)
    torch.testing.assert_close(flow.to_noise(x_t, v, t), noise)
    score = flow.to_score(x_t, v, t)
    torch.testing.assert_close(flow.from_score(x_t, score, t), v)
    # the brief's form: score = -(x_t - (1 - t) x0_hat) / t^2
    torch.testing.assert_close(score, -(x_t - (1 - t[:, None]) * x0) / t[:, None] ** 2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        flow.to_score(x_t, v, 0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        flow.from_score(x_t, score, torch.ones(5, dtype=torch.float64))


def _independent_log_pt(path: GaussianPath, x: torch.Tensor, t: float) -> torch.Tensor:
    """log N(x; (1 - t) m, (1 - t)^2 C + t^2 I) built from the full covariance matrix, not the eigenbasis."""
    cov = path.q @ torch.diag(path.lam) @ path.q.T
    cov_t = (1 - t) ** 2 * cov + t**2 * torch.eye(2, dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal((1 - t) * path.mean, covariance_matrix=cov_t)
    return dist.log_prob(x)


@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 1.0])
def test_to_score_of_analytic_velocity_is_analytic_score(t):
    path = _gaussian()
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()
    (score_ref,) = torch.autograd.grad(_independent_log_pt(path, x, t).sum(), x)
    x = x.detach()
    torch.testing.assert_close(flow.to_score(x, path.velocity(x, t), t), score_ref)
    torch.testing.assert_close(path.score(x, t), score_ref)
    torch.testing.assert_close(path.log_prob(x, t), _independent_log_pt(path, x, t))


def test_analytic_velocity_solves_the_continuity_equation():
    """d/dt log p_t(x) + div v(x, t) + v . grad log p_t(x) = 0, with p_t the exact Gaussian marginals."""
    path = _gaussian()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    t, h = 0.4, 1e-5
    v = path.velocity(x, t)
    div = sum(torch.autograd.grad(v[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(2))
    (score,) = torch.autograd.grad(_independent_log_pt(path, x, t).sum(), x)
    with torch.no_grad():
        dlogp_dt = (_independent_log_pt(path, x, t + h) - _independent_log_pt(path, x, t - h)) / (2 * h)
    residual = dlogp_dt + div + (v * score).sum(1)
    assert residual.abs().max() < 1e-7
    # and the velocity is the conditional mean of noise - x0: a perturbed field violates the equation
    v_bad = v * 1.01
    assert (dlogp_dt + 1.01 * div + (v_bad * score).sum(1)).abs().max() > 1e-3


def test_gaussian_flow_map_is_the_ode_solution():
    path = _gaussian()
    x1 = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t, h = 0.35, 1e-6
    x_t = path.flow(x1, 1.0, t)
    dxdt = (path.flow(x1, 1.0, t + h) - path.flow(x1, 1.0, t - h)) / (2 * h)
    torch.testing.assert_close(dxdt, path.velocity(x_t, t), atol=1e-7, rtol=1e-7)
    # x_0 is distributed as the data: pushes N(0, I) to N(m, C) (checked through the log-density identity)
    x0 = path.flow(x1, 1.0, 0.0)
    log_det = -0.5 * path.lam.log().sum()
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(x1).sum(1)
    torch.testing.assert_close(path.log_prob(x0), normal + log_det)
