"""The SO(3) lab: the rotation mixture, W2 on SO(3), straightness on the manifold, the likelihood table and a
quick end-to-end run (``mmdit-flow lab --quick --datasets so3_mixture``)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from mmdit_flow import so3
from mmdit_flow.training.lab import metrics, report
from mmdit_flow.training.lab import so3 as lab_so3
from mmdit_flow.training.lab.train import LabTrainConfig

MIX = lab_so3.MIXTURE


def _octahedral_group() -> torch.Tensor:
    """The 24 rotations of the cube (signed permutation matrices of determinant 1), in fp64: any two differ
    by a non-trivial element of the group, whose angle is pi/2, 2 pi/3 or pi."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = torch.zeros(3, 3, dtype=torch.float64)
            for row, (col, sign) in enumerate(zip(perm, signs, strict=True)):
                m[row, col] = sign
            if torch.linalg.det(m) > 0:
                out.append(m)
    return torch.stack(out)


def test_mixture_is_deterministic_per_seed_and_draws_rotations():
    a = lab_so3.sample("so3_mixture", 500, seed=3)
    b = lab_so3.sample("so3_mixture", 500, generator=torch.Generator().manual_seed(3))
    c = lab_so3.sample("so3_mixture", 500, seed=4)
    assert a.shape == (500, 3, 3) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.allclose(a, c)
    eye = torch.eye(3).expand(500, 3, 3)
    assert torch.allclose(a.transpose(1, 2) @ a, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(a), torch.ones(500), atol=1e-5)
    with pytest.raises(ValueError, match="so3_mixture"):
        lab_so3.sample("so3_mixtur", 10)


def test_mixture_components_sit_at_their_means_with_their_igso3_angle_law():
    """Every draw is nearest to the mean of the component it came from; the shares are the weights; the angles
    to each mean follow so3.igso3_angle_pdf(sigma_k) (Kolmogorov-Smirnov at 1 %) and have its mean."""
    n = 8000
    r, labels = MIX.sample(n, torch.Generator().manual_seed(0), labels=True)
    angle, nearest = MIX.nearest(r)
    assert torch.equal(nearest, labels)
    means = MIX.mean_rotations()
    assert so3.distance(means[:, None], means[None]).min() == 0  # the diagonal
    assert min(so3.distance(means[i], means[j]) for i, j in itertools.combinations(range(3), 2)) > 2.2
    ws = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    for k, (weight, sigma) in enumerate(zip(MIX.weights, MIX.sigmas, strict=True)):
        mine = angle[labels == k].sort().values
        share = len(mine) / n
        assert abs(share - weight) < 4 * math.sqrt(weight * (1 - weight) / n)
        pdf = so3.igso3_angle_pdf(ws, sigma)
        cdf = torch.cat([pdf.new_zeros(1), torch.cumsum((pdf[1:] + pdf[:-1]) / 2 * ws.diff(), 0)])
        assert cdf[-1] == pytest.approx(1.0, abs=1e-6)
        model = torch.from_numpy(__import__("numpy").interp(mine.numpy(), ws.numpy(), cdf.numpy()))
        m = len(mine)
        steps = torch.arange(1, m + 1, dtype=torch.float64) / m
        ks = torch.maximum((steps - model).abs(), (model - (steps - 1 / m)).abs()).max().item()
        assert ks < 1.63 / math.sqrt(m), (k, ks)
        expected = torch.trapezoid(ws * pdf, ws).item()
        spread = torch.trapezoid((ws - expected) ** 2 * pdf, ws).sqrt().item()
        assert abs(mine.mean().item() - expected) < 4 * spread / math.sqrt(m)
        # small sigma: the angle of IGSO(3) is about sigma times a chi with 3 degrees of freedom
        assert expected == pytest.approx(sigma * math.sqrt(8 / math.pi), rel=0.05)


def test_mixture_log_prob_is_the_weighted_component_density():
    r, labels = MIX.sample(300, torch.Generator().manual_seed(1), labels=True)
    logp = MIX.log_prob(r)
    means = MIX.mean_rotations()
    for k in range(3):  # the other components are > 7 sigma away: they add nothing visible
        own = math.log(MIX.weights[k]) + so3.igso3_log_prob(
            r[labels == k].double(), MIX.sigmas[k], mean=means[k]
        )
        assert torch.allclose(logp[labels == k], own, atol=1e-6)
    # an exact mixture value where every component counts: far from all means the densities are close
    far = so3.exp(torch.tensor([[0.0, -2.9, 0.9]], dtype=torch.float64))
    total = sum(
        w * so3.igso3_series(so3.distance(m, far[0]), s)
        for w, s, m in zip(MIX.weights, MIX.sigmas, means, strict=True)
    )
    assert MIX.log_prob(far).item() == pytest.approx(math.log(total) - so3.LOG_VOLUME, abs=1e-9)
    with pytest.raises(ValueError, match="weights"):
        lab_so3.Mixture(means=((0.0, 0.0, 0.0),), sigmas=(0.2,), weights=(0.5,))


def test_w2_on_so3_is_zero_for_identical_sets_and_the_angle_of_a_common_shift():
    g = torch.Generator().manual_seed(0)
    r = so3.uniform(200, generator=g, dtype=torch.float64)
    assert metrics.w2_so3(r, r) == pytest.approx(0.0, abs=1e-6)
    assert metrics.w2_so3(r, r[torch.randperm(200, generator=g)]) == pytest.approx(0.0, abs=1e-6)
    # the cube group: points pi/2 or more apart. Multiplying each by q (angle a = 0.5) on either side moves it
    # by exactly a (the metric is bi-invariant), and every other pairing costs more than a^2 (the triangle
    # inequality: d(r_j, r_i q) >= pi/2 - a > a), so the optimal plan is the identity and W2 = a exactly
    cube = _octahedral_group()
    q = so3.exp(torch.tensor([0.3, -0.4, 0.0], dtype=torch.float64))  # angle 0.5
    assert metrics.w2_so3(cube, cube @ q) == pytest.approx(0.5, abs=1e-6)
    assert metrics.w2_so3(cube, q @ cube[torch.randperm(24, generator=g)]) == pytest.approx(0.5, abs=1e-6)
    # for a dense set the shift is an upper bound, and W2 is invariant under the isometry r -> q r
    s = so3.uniform(150, generator=g, dtype=torch.float64)
    assert metrics.w2_so3(r, r @ q) <= 0.5 + 1e-6
    assert metrics.w2_so3(q @ r, q @ s) == pytest.approx(metrics.w2_so3(r, s), abs=1e-6)
    assert 0 < metrics.w2_so3(r, s) <= math.pi
    assert metrics.w2_so3(r, torch.full_like(r, math.nan)) == math.inf
    with pytest.raises(ValueError, match=r"b must be a set of rotations \[N, 3, 3\]"):
        metrics.w2_so3(r, r[:, :2])


def test_straightness_on_so3_is_zero_for_geodesics_and_the_speed_variance_otherwise():
    """Constant body velocity xi: the paths are geodesics, S = 0. Velocity t xi: the same curves at a varying
    speed; the chord is xi times the mean of t over the grid, and S = |xi|^2 times the variance of t over
    the grid (about 1/12), as in the Euclidean definition."""
    from mmdit_flow.sampling import timesteps

    xi = torch.tensor([0.4, -0.8, 0.6])

    def constant(r, t):
        return xi.expand(r.shape[0], 3)

    def growing(r, t):
        return t[:, None] * xi

    noise = so3.uniform(64, generator=torch.Generator().manual_seed(0))
    assert lab_so3.straightness(constant, noise, 50) == pytest.approx(0.0, abs=1e-9)
    n = 100
    ts = timesteps(n, grid="linear")[:-1].double()  # left points of the Euler steps, each 1/n wide
    variance = (ts**2).mean() - ts.mean() ** 2
    assert lab_so3.straightness(growing, noise, n) == pytest.approx(
        float(xi.norm() ** 2 * variance), rel=1e-4
    )
    assert float(variance) == pytest.approx(1 / 12, rel=1e-3)


def test_likelihood_table_of_a_zero_field_is_the_uniform_density():
    net = lab_so3.RotationVelocity(hidden=16, depth=1)
    torch.nn.init.zeros_(net.net.body[-1].weight)
    torch.nn.init.zeros_(net.net.body[-1].bias)
    test = MIX.sample(50, torch.Generator().manual_seed(2))
    ll = lab_so3.log_likelihoods({"zero": net}, test, MIX, (2,))
    entry = ll["models"]["zero"]["2"]
    assert entry["mean"] == pytest.approx(-math.log(8 * math.pi**2), abs=1e-9) and entry["nfe"] == 8
    assert entry["kl"] == pytest.approx(ll["exact"] + math.log(8 * math.pi**2), abs=1e-9)
    assert ll["exact"] == pytest.approx(MIX.log_prob(test).mean().item(), abs=1e-12)


def test_a_small_trained_flow_beats_an_untrained_one_in_so3_w2():
    cfg = LabTrainConfig(steps=250, batch=256, hidden=64, depth=2, lr=3e-3)
    torch.manual_seed(0)
    untrained = lab_so3.make_net(cfg)
    trained = lab_so3.train_rectified_flow(
        MIX, cfg, generator=torch.Generator().manual_seed(0), progress=False
    )
    test = MIX.sample(400, torch.Generator().manual_seed(1))
    noise = so3.uniform(400, generator=torch.Generator().manual_seed(2))
    w_untrained = metrics.w2_so3(lab_so3.sample_flow(untrained, noise, "rk4", 2)[0], test)
    w_trained, used = lab_so3.sample_flow(trained, noise, "rk4", 2)
    w_trained = metrics.w2_so3(w_trained, test)
    assert used == 8
    assert w_untrained > 1.2, w_untrained
    assert w_trained < 0.6 * w_untrained, (w_trained, w_untrained)


def test_quick_so3_lab_run_writes_its_figures_and_tables(tmp_path):
    from mmdit_flow.pipelines.cli import main

    assert main(["lab", "--quick", "--datasets", "so3_mixture", "--out", str(tmp_path), "--no-progress"]) == 0
    folder = tmp_path / "so3_mixture"
    for png in ("axes_on_sphere.png", "angles.png", "quality_vs_nfe.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    res = results["datasets"]["so3_mixture"]
    assert res["kind"] == "so3" and results["config"]["so3"]["smoke"] is True
    rows = {(r["model"], r["sampler"]): r for r in res["rows"]}
    assert set(rows) == {(m, s) for m in ("1-RF", "2-RF") for s in ("euler", "midpoint", "heun", "rk4")}
    nfes = results["config"]["so3"]["nfes"]
    assert rows[("2-RF", "euler")]["nfe_used"] == {str(n): n for n in nfes}
    assert "2" not in rows[("1-RF", "rk4")]["w2"]  # rk4 cannot run in 2 evaluations
    values = [w for r in res["rows"] for w in r["w2"].values()] + [res["floor_w2"]]
    assert all(isinstance(v, float) and 0 < v <= math.pi for v in values)
    ll = res["log_likelihood"]
    assert ll["uniform"] == pytest.approx(-math.log(8 * math.pi**2))
    assert ll["exact"] > ll["uniform"] + 2  # the mixture is concentrated
    for by_steps in ll["models"].values():
        assert set(by_steps) == {"4", "8"}
        # even a 150-step model beats the uniform density it starts from, and stays below the exact one
        assert all(ll["uniform"] < v["mean"] < ll["exact"] + 3 * v["kl_se"] for v in by_steps.values())
    assert set(res["targets"]) == {"reflow_one_step", "reflow_straighter"}
    # reflow straightens even this short run: 2-RF / 1-RF straightness was 0.44-0.48 for seeds 0-3
    assert res["straightness"]["2-RF"] < 0.7 * res["straightness"]["1-RF"], res["straightness"]
    md = (tmp_path / "results.md").read_text()
    assert "### so3_mixture (rotations, SO(3))" in md and "| 2-RF | rk4 |" in md
    assert "gap to exact (KL)" in md and "## Summary" not in md  # no 2-D set ran: no 2-D summary

    # beside a 2-D set: the 2-D summary lists only the 2-D set, the SO(3) set keeps its own section
    fake = {"floor_w2": 0.1, "rows": [], "straightness": {"1-RF": 0.2, "2-RF": 0.01, "OT-CFM": 0.1}}
    results["datasets"] = {"moons": {**fake, "targets": {}, "seconds": {"total": 1.0}}, "so3_mixture": res}
    report.write(results, tmp_path / "both")
    both = (tmp_path / "both" / "results.md").read_text()
    summary = both.split("## Summary")[1].split("## Per data set")[0]
    assert "| moons |" in summary and "so3_mixture" not in summary
    assert "### moons" in both and "### so3_mixture (rotations, SO(3))" in both


def test_unknown_dataset_names_list_the_so3_set():
    from mmdit_flow.pipelines.cli import main
    from mmdit_flow.training.lab import data

    with pytest.raises(ValueError, match=r"'so3_mix'.*so3_mixture"):
        main(["lab", "--quick", "--datasets", "so3_mix"])
    with pytest.raises(ValueError, match="unknown dataset"):
        data.sample("so3_mixture", 10)  # rotations are not 2-D points


def test_training_is_fixed_by_the_generator_not_by_the_global_rng():
    """torch seeds its global RNG at random per process: the lab's initial weights come from the training
    generator, so one --seed gives one model (SO(3) and 2-D alike)."""
    from mmdit_flow.training.lab import train

    cfg = LabTrainConfig(steps=5, batch=32, hidden=16, depth=1)

    def weights(global_seed: int, fn):
        torch.manual_seed(global_seed)
        net = fn(torch.Generator().manual_seed(7))
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    def so3_flow(g):
        return lab_so3.train_rectified_flow(MIX, cfg, generator=g, progress=False)

    def plane_flow(g):
        return train.train_rectified_flow(
            lambda n, g: torch.randn(n, 2, generator=g), cfg, generator=g, progress=False
        )

    for fn in (so3_flow, plane_flow):
        assert torch.equal(weights(1, fn), weights(2, fn))
    before = torch.random.get_rng_state()
    cfg.make_net(torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone
    assert not torch.equal(weights(1, so3_flow), weights(1, lambda g: so3_flow(g.manual_seed(8))))
