"""mmdit_flow.likelihood against the analytic log-density of Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from mmdit_flow.flow import GaussianPath
from mmdit_flow.likelihood import divergence_exact, divergence_hutchinson, draw_probes, log_likelihood


def _gaussian(d: int = 2) -> GaussianPath:
    """N(m, C) with a rotated, anisotropic C: the Jacobian of v is not diagonal (Hutchinson has variance)."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    lam = torch.linspace(0.25, 4.0, d, dtype=torch.float64)
    return GaussianPath(torch.linspace(1.0, -0.5, d, dtype=torch.float64), lam, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("adaptive", [False, True])
def test_exact_log_likelihood_matches_analytic(dtype, adaptive):
    path = _gaussian(2)
    x0 = path.sample(16, generator=torch.Generator().manual_seed(0))
    lp = log_likelihood(path.velocity, x0.to(dtype), steps=32, adaptive=adaptive)
    # measured max error: ~1e-6 nats/dim (rk4, 32 steps), ~6e-5 (adaptive at 1e-5)
    assert lp.shape == (16,)
    assert (lp.double() - path.log_prob(x0)).abs().max() / 2 < 0.01
    # a wrong field gives a wrong density: the check has power
    wrong = log_likelihood(lambda x, t: 1.1 * path.velocity(x, t), x0.to(dtype), steps=32)
    assert (wrong.double() - path.log_prob(x0)).abs().max() / 2 > 0.05


def test_image_shaped_input():
    path = _gaussian(4)
    x0 = path.sample(6, generator=torch.Generator().manual_seed(1))

    def image_field(x, t):  # x [B, 1, 2, 2]
        return path.velocity(x.reshape(-1, 4), t).reshape(x.shape)

    lp = log_likelihood(image_field, x0.reshape(6, 1, 2, 2), steps=16)
    assert (lp - path.log_prob(x0)).abs().max() / 4 < 0.01


def test_divergences_equal_the_jacobian_trace_of_a_network():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    v = net(x)
    traces = torch.stack([torch.autograd.functional.jacobian(net, x[i].detach()).trace() for i in range(5)])
    torch.testing.assert_close(divergence_exact(v, x), traces)
    # Hutchinson with the full basis of probes sums the diagonal exactly: eps = sqrt(3) e_i, averaged over i
    basis = math.sqrt(3) * torch.eye(3, dtype=torch.float64)[:, None, :].expand(3, 5, 3)
    torch.testing.assert_close(divergence_hutchinson(v, x, basis), traces)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    """n = 4000 independent estimates of one point's log p (one probe each, the point repeated in the batch).

    The trajectory does not depend on the probe and the estimate is linear in eps eps^T with E[eps eps^T] = I,
    so its mean is the exact-divergence result on the same grid. Their mean is within 4 standard errors of it
    (a false failure has probability ~6e-5 under the CLT); the per-estimate std is measured, not assumed.
    """
    path = _gaussian(2)
    x0 = path.sample(1, generator=torch.Generator().manual_seed(0))
    n = 4000
    estimates = log_likelihood(
        path.velocity,
        x0.repeat(n, 1),
        exact=False,
        steps=16,
        probe=probe,
        generator=torch.Generator().manual_seed(0),
    )
    exact = log_likelihood(path.velocity, x0, steps=16)
    std = estimates.std().item()
    assert std > 0.1  # the Jacobian is not diagonal: single estimates really vary (measured ~1.3 nats)
    assert abs(estimates.mean().item() - exact.item()) < 4 * std / math.sqrt(n)
    torch.testing.assert_close(exact.double(), path.log_prob(x0), atol=0.02, rtol=0)


def test_more_probes_shrink_the_variance_and_bad_input():
    path = _gaussian(2)
    x0 = path.sample(1, generator=torch.Generator().manual_seed(0)).repeat(500, 1)
    g = torch.Generator().manual_seed(1)
    one = log_likelihood(path.velocity, x0, exact=False, steps=8, generator=g).std()
    eight = log_likelihood(path.velocity, x0, exact=False, steps=8, hutchinson_samples=8, generator=g).std()
    # variance falls as 1/K: std ratio sqrt(8) ~ 2.8, allow sampling noise of the std estimates (n = 500)
    assert 2.2 < one / eight < 3.6
    with pytest.raises(ValueError, match="rademacher, gaussian"):
        draw_probes(1, torch.Size([2, 2]), kind="sphere")
    with pytest.raises(ValueError, match="euler, midpoint, heun, rk4"):
        log_likelihood(path.velocity, x0[:2], method="dopri")
