"""The 2-D lab: data sets, W2, NFE accounting, the diffusion baseline and a quick end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmdit_flow.training.lab import data, diffusion, experiment, metrics, train


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_datasets_deterministic_per_seed(name):
    a = data.sample(name, 500, seed=3)
    b = data.sample(name, 500, generator=torch.Generator().manual_seed(3))
    c = data.sample(name, 500, seed=4)
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.abs().max() < 3.5  # all sets live roughly in [-3, 3]^2


def test_eight_gaussians_modes_on_the_circle():
    x = data.sample("8gaussians", 8000, seed=0)
    modes = 2 * torch.stack(
        [torch.cos(torch.arange(8) * math.pi / 4), torch.sin(torch.arange(8) * math.pi / 4)], 1
    )
    dist, which = torch.cdist(x, modes).min(dim=1)
    assert dist.max() < 0.15 * 5  # every point within 5 std of its mode
    assert abs(x.norm(dim=1).mean() - 2.0) < 0.02
    share = torch.bincount(which, minlength=8).float() / len(x)
    assert torch.allclose(share, torch.full((8,), 1 / 8), atol=0.015)
    assert torch.allclose(x[which == 0].mean(0), modes[0], atol=0.02)


def test_other_datasets_have_their_shape():
    board = data.sample("checkerboard", 4000, seed=0)
    assert ((torch.floor(board[:, 0]) + torch.floor(board[:, 1])) % 2 == 0).all()  # only the black squares
    clusters = data.sample("two_clusters", 4000, seed=0)
    right = clusters[:, 0] > 0
    assert abs(right.float().mean() - 0.5) < 0.03
    assert torch.allclose(clusters[right].mean(0), torch.tensor([2.0, 0.0]), atol=0.03)
    assert torch.allclose(clusters[right].std(0), torch.tensor([0.3, 0.3]), atol=0.02)
    moons = data.sample("moons", 4000, seed=0)
    assert torch.allclose(moons.mean(0), torch.zeros(2), atol=0.05)  # centred
    radius = data.sample("spirals", 4000, seed=0).norm(dim=1)
    assert radius.max() < 3.2 and radius.min() > 0.4


def test_unknown_dataset_names_raise_with_the_valid_ones():
    with pytest.raises(ValueError, match="moons.*two_clusters|8gaussians"):
        data.sample("mooons", 10)
    from mmdit_flow.pipelines.cli import main

    with pytest.raises(ValueError, match="'mooons'.*checkerboard"):
        main(["lab", "--quick", "--datasets", "moons,mooons"])


def test_w2_is_zero_for_identical_sets_and_the_shift_for_shifted_ones():
    x = data.sample("moons", 400, seed=1)
    assert metrics.w2(x, x) == pytest.approx(0.0, abs=1e-6)
    # for any point cloud, W2(P, P + c) = |c| exactly: sum_i c . (x_i - x_sigma(i)) = 0 for every permutation
    shift = torch.tensor([0.3, -0.4])
    assert metrics.w2(x, x[torch.randperm(400)] + shift) == pytest.approx(0.5, abs=1e-6)
    assert metrics.w2(x, torch.full_like(x, math.nan)) == math.inf
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        metrics.w2(x, x[:, :1])


@pytest.mark.parametrize(
    ("method", "budget", "used"), [("euler", 8, 8), ("midpoint", 8, 8), ("heun", 8, 7), ("rk4", 8, 8)]
)
def test_evaluations_are_counted(method, budget, used):
    net = train.LabTrainConfig(hidden=16, depth=1).make_net()
    steps = experiment.steps_for_budget(method, budget)
    _, calls = experiment.sample_flow(net, torch.randn(5, 2), method, steps)
    assert calls == used


def test_diffusion_samplers_with_the_exact_noise_predictor_recover_gaussian_data():
    """Data N(0, s^2 I): E[eps | x_k] = sqrt(1 - abar_k) x_k / (abar_k s^2 + 1 - abar_k) in closed form.

    The probability-flow ODE is then linear, x0 = s x_K / sqrt(abar_K s^2 + 1 - abar_K), which DDIM with all
    1000 steps must reproduce; DDPM's ancestral chain must end with standard deviation s.
    """
    s = 0.5
    abar = diffusion.make_scheduler("ddim").alphas_cumprod

    def eps_fn(x, t):
        a = abar[(t * diffusion.TRAIN_STEPS).round().long()][:, None]  # t = k / K -> abar_k
        return (1 - a).sqrt() * x / (a * s**2 + 1 - a)

    noise = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    x, states = diffusion.sample(eps_fn, noise[:1000], 1000, sampler="ddim", trajectory=True)
    assert len(states) == 1001 and torch.equal(states[-1], x) and torch.equal(states[0], noise[:1000])
    gain = s / math.sqrt(abar[-1] * s**2 + 1 - abar[-1])
    assert torch.allclose(x, gain * noise[:1000], rtol=1e-2)  # measured: 0.3 % discretisation error
    x, _ = diffusion.sample(eps_fn, noise, 1000, sampler="ddpm", generator=torch.Generator().manual_seed(1))
    assert x.std(0).tolist() == pytest.approx([s, s], abs=0.01)
    assert x.mean(0).tolist() == pytest.approx([0, 0], abs=0.01)
    with pytest.raises(ValueError, match="ddpm"):
        diffusion.make_scheduler("euler")


def test_a_small_trained_flow_beats_an_untrained_one():
    def blob(n, g):  # trivially easy data: one Gaussian away from the origin
        return torch.tensor([1.5, -1.0]) + 0.3 * torch.randn(n, 2, generator=g)

    cfg = train.LabTrainConfig(steps=300, batch=256, hidden=64, depth=2, lr=3e-3)
    torch.manual_seed(0)
    untrained = cfg.make_net()
    trained = train.train_rectified_flow(
        blob, cfg, generator=torch.Generator().manual_seed(0), progress=False
    )
    test = blob(1000, torch.Generator().manual_seed(1))
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(2))
    w_untrained = metrics.w2(experiment.sample_flow(untrained, noise, "euler", 8)[0], test)
    w_trained = metrics.w2(experiment.sample_flow(trained, noise, "euler", 8)[0], test)
    assert w_untrained > 1.0
    assert w_trained < 0.15


def test_quick_lab_run_writes_figures_and_tables(tmp_path):
    from mmdit_flow.pipelines.cli import main

    assert main(["lab", "--quick", "--datasets", "8gaussians", "--out", str(tmp_path), "--no-progress"]) == 0
    folder = tmp_path / "8gaussians"
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert {
        "particles.png",
        "velocity_field.png",
        "paths_fm_vs_diffusion.png",
        "paths_reflow.png",
        "quality_vs_nfe.png",
        "paths_progressive.png",
    } <= set(pngs)
    assert (folder / "flow.gif").read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    md = (tmp_path / "results.md").read_text()
    assert "## Summary" in md and "**Smoke run (`--quick`)**" in md
    # the summary's heads name the budgets --quick ran (up to 8), not the full run's 100
    assert "| 1-RF rk4@8 | DDIM@8 | DDPM@8 | 1-RF euler@8 |" in md and "@100" not in md

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["smoke"] is True and "stopped" not in results
    res = results["datasets"]["8gaussians"]
    rows = {(r["model"], r["sampler"], r["grid"]): r for r in res["rows"]}
    for model in ("1-RF", "2-RF", "OT-CFM"):
        for method in ("euler", "midpoint", "heun", "rk4"):
            assert (model, method, "linear") in rows
        assert (model, "euler", "scheduler") in rows
    assert ("DDPM", "ddim", None) in rows and ("DDPM", "ddpm", None) in rows
    values = [w for r in res["rows"] for w in r["w2"].values()]
    values += list(res["straightness"].values()) + [res["floor_w2"]]
    assert values and all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in values)
    assert rows[("1-RF", "euler", "linear")]["nfe_used"] == {str(n): n for n in results["config"]["nfes"]}
    assert "2" not in rows[("1-RF", "rk4", "linear")]["w2"]  # rk4 cannot run in 2 evaluations
    assert set(res["targets"]) == {"reflow_one_step", "fm_beats_ddim", "rk4_reaches_euler"}
    assert rows[("PD", "euler", "linear")]["nfe_used"] == {"1": 1, "2": 2, "4": 4}  # one student per NFE


def _fake_result(name, config, **kw):
    return {
        "floor_w2": 0.1,
        "rows": [],
        "straightness": {"1-RF": 0.2, "2-RF": 0.01, "OT-CFM": 0.1},
        "targets": {},
        "seconds": {"total": 1.0},
        "figures": [],
    }


def test_ctrl_c_keeps_the_finished_data_sets(tmp_path, monkeypatch, capsys):
    from mmdit_flow.pipelines.cli import main

    def stop_at_moons(name, config, **kw):
        if name == "moons":
            raise KeyboardInterrupt
        return _fake_result(name, config, **kw)

    monkeypatch.setattr(experiment, "run_dataset", stop_at_moons)
    argv = ["lab", "--quick", "--datasets", "8gaussians,moons,spirals", "--out", str(tmp_path)]
    assert main(argv) == 130
    printed = capsys.readouterr()
    assert "lab: --quick is a smoke run (100 training steps" in printed.out
    assert "lab: stopped" in printed.err
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["datasets"]) == ["8gaussians"]
    assert results["stopped"] == ["moons", "spirals"]
    md = (tmp_path / "results.md").read_text()
    assert "**Stopped** after 1 data set(s) (8gaussians); not run: moons, spirals." in md
    assert "| 8gaussians |" in md
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_ctrl_c_before_any_data_set_leaves_earlier_tables_alone(tmp_path, monkeypatch):
    from mmdit_flow.pipelines.cli import main

    monkeypatch.setattr(experiment, "run_dataset", _fake_result)
    assert main(["lab", "--datasets", "moons", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "results.md").read_text()
    assert "Smoke run" not in before and "DDPM@100" in before

    def stop(name, config, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run_dataset", stop)
    assert main(["lab", "--datasets", "moons", "--out", str(tmp_path)]) == 130
    assert (tmp_path / "results.md").read_text() == before


def test_readme_lab_command_names_real_data_sets():
    """README's lab command parses and its data sets exist (its time was measured with this command)."""
    import re
    import shlex
    from pathlib import Path

    from mmdit_flow.pipelines.cli import build_parser
    from mmdit_flow.training.lab.data import check_names

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    command = shlex.split(re.search(r"`OMP_NUM_THREADS=1 mmdit-flow (lab [^`]+)`", readme).group(1))
    args = build_parser().parse_args(command)
    assert check_names(args.datasets.split(",")) == ["moons", "8gaussians"] and not args.quick


def test_a_progressive_student_in_n_steps_lands_where_its_teacher_does_in_2n():
    """Distillation moves the student's N-step samples to the teacher's 2N-step ones: its endpoints sit much
    closer to them (mean squared distance from the same noise) than the teacher's own N-step endpoints."""
    import torch

    from mmdit_flow.sampling import solve, timesteps

    g = torch.Generator().manual_seed(0)
    cfg = train.LabTrainConfig(steps=300, batch=256, hidden=64, depth=2)
    teacher = train.train_rectified_flow(data.DATASETS["8gaussians"], cfg, generator=g, progress=False)
    student = train.train_progressive(
        teacher, data.DATASETS["8gaussians"], cfg, 2, generator=g, steps=300, progress=False
    )
    noise = torch.randn(2000, 2, generator=g)
    with torch.no_grad():
        target = solve(teacher, noise, timesteps(4, grid="linear"))
        own = solve(teacher, noise, timesteps(2, grid="linear"))
        distilled = solve(student, noise, timesteps(2, grid="linear"))
    before = (own - target).pow(2).sum(1).mean()
    after = (distilled - target).pow(2).sum(1).mean()
    assert after < 0.3 * before, (float(before), float(after))
