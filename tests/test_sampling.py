"""mmdit_flow.sampling: grids against diffusers, solvers against analytic flows, guidance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmdit_flow import sampling
from mmdit_flow.flow import GaussianPath


def _gaussian() -> GaussianPath:
    c, s = math.cos(0.6), math.sin(0.6)
    q = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return GaussianPath(torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.25, 4.0]).double(), q)


def _x1(n: int = 64, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# grids


@pytest.mark.parametrize("steps", [1, 2, 4, 7, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.7])
def test_timesteps_equal_diffusers_static_shift(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    torch.testing.assert_close(sampling.timesteps(steps, shift=shift), sched.sigmas, rtol=0, atol=1e-7)
    # the Flux pipeline's own grid, through the same scheduler
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    ours = sampling.timesteps(steps, shift=shift, grid="linear")
    torch.testing.assert_close(ours, sched.sigmas, rtol=0, atol=1e-7)


@pytest.mark.parametrize("steps", [1, 4, 7, 28, 50])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
def test_timesteps_equal_diffusers_dynamic_mu(steps, image_seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(image_seq_len)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(steps, mu=mu)
    torch.testing.assert_close(sampling.timesteps(steps, mu=mu), sched.sigmas, rtol=0, atol=1e-7)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # what FluxPipeline passes
    torch.testing.assert_close(
        sampling.timesteps(steps, mu=mu, grid="linear"), sched.sigmas, rtol=0, atol=1e-7
    )


def test_timesteps_shape_ends_and_bad_input():
    ts = sampling.timesteps(10, shift=3.0)
    assert ts.shape == (11,) and ts.dtype == torch.float32 and ts[0] == 1 and ts[-1] == 0
    assert bool((ts[1:] < ts[:-1]).all())
    with pytest.raises(ValueError, match="scheduler, linear"):
        sampling.timesteps(4, grid="karras")
    for bad in (0, True, 2.0, sampling.MAX_STEPS + 1, 10**12):  # 10^12 would allocate 8 TB before failing
        with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 100000\]"):
            sampling.timesteps(bad)
    with pytest.raises(ValueError, match="steps=100000 is too fine for an fp32 time grid"):
        sampling.timesteps(sampling.MAX_STEPS, shift=1000.0)  # t' ~ t / 1000 near t = 1: times coincide
    for shift in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="shift must be a finite number > 0"):
            sampling.timesteps(4, shift=shift)
    with pytest.raises(ValueError, match="mu must be a finite number"):
        sampling.timesteps(4, mu=float("nan"))
    with pytest.raises(ValueError, match="not both"):
        sampling.timesteps(4, shift=3.0, mu=0.5)


# ----------------------------------------------------------------------------------------------------
# fixed-step solvers


def _order(fn, x1, ref, method, n):
    """log2 of the error ratio when the number of uniform steps doubles from n to 2n."""
    errs = [
        (sampling.solve(fn, x1, torch.linspace(1, 0, k + 1), method=method) - ref).abs().max()
        for k in (n, 2 * n)
    ]
    return math.log2(errs[0] / errs[1])


@pytest.mark.parametrize("method, order, n", [("euler", 1, 32), ("heun", 2, 32), ("rk4", 4, 32)])
def test_solver_order_on_gaussian_flow(method, order, n):
    """Anisotropic, rotated Gaussian data: the marginal field is curved in t and the exact x_0 is known."""
    path = _gaussian()
    x1 = _x1()
    measured = _order(path.velocity, x1, path.flow(x1, 1.0, 0.0), method, n)
    assert abs(measured - order) < 0.3, measured


def test_midpoint_order_on_gaussian_and_riccati_flows():
    # On the Gaussian flows midpoint superconverges (measured 3.0: the leading error term cancels for fields
    # linear in x with this t-dependence), so it is only held to at least 2 there ...
    path = _gaussian()
    x1 = _x1()
    assert _order(path.velocity, x1, path.flow(x1, 1.0, 0.0), "midpoint", 32) > 2 - 0.3
    # ... and to its order 2 on a nonlinear field: v = 1 + x^2, x(t) = tan(t - 1 + atan(x(1))).
    x1 = torch.linspace(0, 1, 16, dtype=torch.float64)[:, None]
    ref = torch.tan(torch.atan(x1) - 1)
    riccati = lambda x, t: 1 + x**2  # noqa: E731
    assert abs(_order(riccati, x1, ref, "midpoint", 64) - 2) < 0.3
    assert abs(_order(riccati, x1, ref, "heun", 128) - 2) < 0.3
    assert abs(_order(riccati, x1, ref, "euler", 128) - 1) < 0.3


def _straight_field(m: torch.Tensor, s: float):
    """Data x0 = s * noise + m, coupled one-to-one with its noise: every path is straight and v is constant
    along it: noise = (x - (1 - t) m) / ((1 - t) s + t), v = (1 - s) noise - m."""

    def v(x, t):
        tb = t[:, None].to(x.dtype)
        return (1 - s) * (x - (1 - tb) * m) / ((1 - tb) * s + tb) - m

    return v


@pytest.mark.parametrize("method", sampling.METHODS)
def test_one_step_exact_when_paths_are_straight(method):
    m, s = torch.tensor([2.0, -1.0]), 0.5
    noise = _x1(32, torch.float32)
    field = _straight_field(m, s)
    exact = s * noise + m
    torch.testing.assert_close(sampling.solve(field, noise, [1.0, 0.0], method=method), exact)
    # and on any grid
    out = sampling.solve(field, noise, sampling.timesteps(5, shift=3.0), method=method)
    torch.testing.assert_close(out, exact)
    # a curved field is not integrated exactly in one Euler step
    path = _gaussian()
    one = sampling.solve(path.velocity, noise.double(), [1.0, 0.0])
    assert (one - path.flow(noise.double(), 1.0, 0.0)).abs().max() > 0.1


def test_euler_step_on_point_data_is_exact():
    """Data a single point m: v(x, t) = (x - m) / t; one Euler step from t = 1 lands on m exactly."""
    m = torch.tensor([0.3, -2.0])
    out = sampling.solve(lambda x, t: (x - m) / t[:, None], _x1(8, torch.float32), [1.0, 0.0])
    torch.testing.assert_close(out, m.expand(8, 2))


def test_evaluation_counts_callback_trajectory_and_determinism():
    calls = []

    def field(x, t):
        calls.append(t)
        return torch.sin(3 * x) * t[:, None]

    x = _x1(4, torch.float32)
    ts = sampling.timesteps(6)
    seen = []
    expected = {"euler": 6, "midpoint": 12, "heun": 11, "rk4": 24}  # heun's last step to 0 is Euler
    for method, nfe in expected.items():
        calls.clear()
        seen.clear()
        res = sampling.solve(
            field, x, ts, method=method, trajectory=True, callback=lambda i, t, s: seen.append((i, t, s))
        )
        assert len(calls) == nfe and all(c.shape == (4,) and c.dtype == torch.float32 for c in calls)
        assert [i for i, _, _ in seen] == list(range(6)) and [t for _, t, _ in seen] == ts[1:].tolist()
        assert res.xs.shape == (7, 4, 2) and torch.equal(res.xs[0], x) and torch.equal(res.xs[-1], res.x)
        assert all(torch.equal(s, res.xs[i + 1]) for i, _, s in seen)
        again = sampling.solve(field, x.clone(), ts, method=method)
        assert torch.equal(again, res.x)


def test_state_stays_fp32_with_a_bf16_network():
    seen = []

    def bf16_field(x, t):
        seen.append(x.dtype)
        return (x * 0.37 + 0.1).to(torch.bfloat16)

    x = _x1(4, torch.float32).to(torch.bfloat16)
    out = sampling.solve(bf16_field, x, sampling.timesteps(8), method="heun")
    assert out.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    # exactly what a fp32 state with the network's output upcast gives; a bf16 state would round each step
    upcast = lambda y, t: bf16_field(y.to(torch.bfloat16), t).float()  # noqa: E731
    assert torch.equal(out, sampling.solve(upcast, x.float(), sampling.timesteps(8), method="heun"))


def test_solve_bad_input_raises():
    field = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="euler, midpoint, heun, rk4"):
        sampling.solve(field, torch.zeros(2, 2), [1.0, 0.0], method="dopri")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sampling.solve(field, torch.zeros(2, 2), [1.5, 0.0])
    with pytest.raises(ValueError, match="monotone"):
        sampling.solve(field, torch.zeros(2, 2), [1.0, 0.2, 0.5, 0.0])
    with pytest.raises(ValueError, match="shape"):
        sampling.solve(lambda x, t: x[:, :1], torch.zeros(2, 2), [1.0, 0.0])


# ----------------------------------------------------------------------------------------------------
# adaptive


@pytest.mark.parametrize("tol", [1e-3, 1e-5, 1e-7])
def test_adaptive_meets_tolerance_and_counts_evaluations(tol):
    path = _gaussian()
    x1 = _x1()
    calls = []

    def field(x, t):
        calls.append(1)
        return path.velocity(x, t)

    res = sampling.solve_adaptive(field, x1, rtol=tol, atol=tol)
    err = (res.x - path.flow(x1, 1.0, 0.0)).abs().max().item()
    # local error control: the global error stays within a small multiple of the tolerance
    # (measured: 1.4e-3, 1.1e-4, 4.9e-8 for tol 1e-3, 1e-5, 1e-7)
    assert err < 20 * tol
    assert res.nfe == len(calls) == 2 + 6 * (res.steps + res.rejected)


def test_adaptive_work_grows_as_tolerance_tightens_and_forward_time():
    path = _gaussian()
    x1 = _x1()
    nfes = [sampling.solve_adaptive(path.velocity, x1, rtol=tol, atol=tol).nfe for tol in (1e-3, 1e-6, 1e-9)]
    assert nfes[0] < nfes[1] < nfes[2]
    # integrating data -> noise (t0 = 0, t1 = 1) inverts sampling
    x0 = path.flow(x1, 1.0, 0.0)
    back = sampling.solve_adaptive(path.velocity, x0, rtol=1e-8, atol=1e-8, t0=0.0, t1=1.0)
    torch.testing.assert_close(back.x, x1, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sampling.solve_adaptive(path.velocity, x1, rtol=1e-3, atol=1e-3, t1=-0.5)


# ----------------------------------------------------------------------------------------------------
# guidance


class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(2 + 1 + 3, 2)
        self.batches = []

    def forward(self, x, t, txt, flag=True):
        self.batches.append(x.shape[0])
        return self.net(torch.cat([x, t[:, None], txt], 1))


def test_cfg_equals_formula_in_one_forward():
    model = _Counting()
    x, t = _x1(5, torch.float32), torch.full((5,), 0.7)
    txt, null = torch.randn(5, 3), torch.zeros(5, 3)
    guided = sampling.cfg(model, 4.5, txt=null)
    with torch.no_grad():
        v = guided(x, t, txt=txt, flag=False)
        assert model.batches == [10]
        v_c, v_u = model(x, t, txt), model(x, t, null)
        torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u))
        assert torch.equal(v, guided(x, t, txt=txt, flag=False))  # same input, bit-identical output
        model.batches.clear()
        assert torch.equal(sampling.cfg(model, 1.0, txt=null)(x, t, txt=txt), model(x, t, txt))
        assert model.batches == [5, 5]  # scale 1: the cond forward only (then our reference call)


def test_cfg_bad_input_raises():
    model = _Counting()
    with pytest.raises(ValueError, match=">= 0"):
        sampling.cfg(model, -1.0, txt=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="uncond value for 'txt'"):
        sampling.cfg(model, 2.0)(torch.zeros(1, 2), torch.zeros(1), txt=torch.zeros(1, 3))


def test_cfg_keeps_an_fp64_solve_in_fp64():
    """cfg combines in the wider of fp32 and the state dtype: an fp64 solve with guidance stays fp64."""
    cond_path, uncond_path = (
        _gaussian(),
        GaussianPath(torch.zeros(2, dtype=torch.float64), torch.ones(2).double()),
    )

    def field(x, t, which):  # which [B]: 1 for the cond rows, 0 for the uncond ones
        pick = which[:, None].bool()
        return torch.where(pick, cond_path.velocity(x, t), uncond_path.velocity(x, t))

    x1, t = _x1(8), torch.full((8,), 0.6, dtype=torch.float64)
    ones, zeros = torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    v = sampling.cfg(field, 3.0, which=zeros)(x1, t, which=ones)
    v_u, v_c = uncond_path.velocity(x1, t), cond_path.velocity(x1, t)
    assert v.dtype == torch.float64
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u), rtol=0, atol=1e-14)
    # guiding a field towards itself leaves it unchanged, so the fp64 solve meets the exact flow map
    same = sampling.cfg(field, 3.0, which=ones)
    out = sampling.solve(same, x1, sampling.timesteps(128), method="rk4", which=ones)
    assert out.dtype == torch.float64
    assert (out - cond_path.flow(x1, 1.0, 0.0)).abs().max() < 1e-9  # an fp32 round trip alone is ~1e-7


def test_one_velocity_fn_type():
    from mmdit_flow import flow, likelihood, reflow

    assert sampling.VelocityFn is flow.VelocityFn is likelihood.VelocityFn is reflow.VelocityFn
