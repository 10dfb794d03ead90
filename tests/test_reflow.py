"""mmdit_flow.reflow: couplings, straightness against a quadrature, OT pairing against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mmdit_flow import flow, reflow, sampling
from mmdit_flow.flow import GaussianPath


def _straight_field(m: torch.Tensor, s: float):
    """Data x0 = s * noise + m coupled one-to-one with its noise: straight paths, v = (1 - s) noise - m."""

    def v(x, t):
        tb = t[:, None].to(x.dtype)
        return (1 - s) * (x - (1 - tb) * m) / ((1 - tb) * s + tb) - m

    return v


def _noise(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_make_couplings_are_ode_end_points():
    m = torch.tensor([2.0, -1.0], dtype=torch.float64)
    noise = _noise()
    pairs = reflow.make_couplings(_straight_field(m, 0.5), noise, [1.0, 0.0])
    assert torch.equal(pairs.noise, noise)
    torch.testing.assert_close(pairs.x0, 0.5 * noise + m)
    path = GaussianPath(m, torch.tensor([0.25, 4.0], dtype=torch.float64))
    pairs = reflow.make_couplings(path.velocity, noise, sampling.timesteps(64), method="rk4")
    torch.testing.assert_close(pairs.x0, path.flow(noise, 1.0, 0.0), atol=1e-5, rtol=0)


def test_straightness_zero_for_straight_flow():
    field = _straight_field(torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5)
    for ts in ([1.0, 0.0], sampling.timesteps(10, shift=3.0)):
        assert reflow.straightness(field, _noise(), ts) == pytest.approx(0.0, abs=1e-12)


def test_straightness_of_curved_gaussian_flow_matches_quadrature():
    """Diagonal Gaussian data N(m, diag(lam)): x_t = (1 - t) m + sigma_t z, sigma_t^2 = (1 - t)^2 lam + t^2,
    so (noise - x0) - v(x_t, t) = (1 - sqrt(lam) - sigma_t') z and
    S = mean_b sum_d z_d^2 int_0^1 (1 - sqrt(lam_d) - sigma_t')^2 dt, integrated by scipy's quad here."""
    from scipy.integrate import quad

    lam = torch.tensor([0.25, 4.0], dtype=torch.float64)
    path = GaussianPath(torch.tensor([1.0, -0.5], dtype=torch.float64), lam)
    z = _noise(256)

    def integrand(t: float, lam_d: float) -> float:
        sigma = math.sqrt((1 - t) ** 2 * lam_d + t**2)
        return (1 - math.sqrt(lam_d) - (t - (1 - t) * lam_d) / sigma) ** 2

    per_dim = torch.tensor([quad(integrand, 0, 1, args=(l,))[0] for l in lam.tolist()], dtype=torch.float64)
    expected = (z**2 * per_dim).sum(1).mean().item()
    measured = reflow.straightness(path.velocity, z, torch.linspace(1, 0, 401), method="rk4")
    # first-order Riemann sum: measured 0.5% high at 200 steps, 0.13% at 800
    assert measured == pytest.approx(expected, rel=0.01)
    assert expected > 0.5


def _brute_force_cost(x0: torch.Tensor, noise: torch.Tensor) -> float:
    return min(
        sum(((x0[i] - noise[p[i]]) ** 2).sum().item() for i in range(len(p)))
        for p in itertools.permutations(range(x0.shape[0]))
    )


def _cost(x0: torch.Tensor, noise: torch.Tensor) -> float:
    return ((x0 - noise) ** 2).sum().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ot_coupling_is_the_optimal_assignment(seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    paired = reflow.ot_coupling(x0, noise)
    rows = lambda a: sorted(map(tuple, a.reshape(6, -1).tolist()))  # noqa: E731
    assert rows(paired) == rows(noise)  # a permutation of the noise
    assert _cost(x0, paired) == pytest.approx(_brute_force_cost(x0, noise), abs=1e-9)


def test_ot_coupling_never_increases_cost():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        x0 = torch.randn(128, 2, generator=g) * 0.5 + torch.tensor([3.0, 0.0])
        noise = torch.randn(128, 2, generator=g)
        paired = reflow.ot_coupling(x0, noise)
        assert _cost(x0, paired) <= _cost(x0, noise)
        assert _cost(x0, paired[torch.randperm(128, generator=g)]) >= _cost(x0, paired)
    # the pairing feeds the usual loss
    loss = flow.cfm_loss(lambda x, t: torch.zeros_like(x), x0, t=torch.full((128,), 0.5), noise=paired)
    torch.testing.assert_close(loss, ((paired - x0) ** 2).mean())
    with pytest.raises(ValueError, match="shape"):
        reflow.ot_coupling(x0, noise[:4])
