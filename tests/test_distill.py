"""Few-step students: the distillation math against hand-computed values, reflow couplings from a teacher
pipeline (exact, resumable, refused when they do not fit), and the trainer objectives wired to them."""

from __future__ import annotations

import contextlib
import json
import os
import types
import warnings
from pathlib import Path

import pytest
import torch

from mmdit_flow import distill
from mmdit_flow.flow import cfm_loss, interpolate, shift_t
from mmdit_flow.sampling import cfg, solve, timesteps

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "tiny-shapes"


# ------------------------------------------------------------------------------------------------ math


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_grid_midpoints_are_midpoints_before_the_shift(shift):
    ts = timesteps(4, shift=shift)
    u = ts.double() / (shift - (shift - 1) * ts.double())  # unshifted
    assert torch.allclose(shift_t(u, shift), ts.double(), atol=1e-6)
    want = shift_t((u[:-1] + u[1:]) / 2, shift).float()
    assert torch.allclose(distill.grid_midpoints(ts, shift), want, atol=1e-7)
    if shift == 1.0:
        assert torch.allclose(distill.grid_midpoints(ts), (ts[:-1] + ts[1:]) / 2)


def _linear_field(a: float, b: float):
    return lambda x, t: a * x + b * t.view(-1, 1)


def test_two_step_target_is_two_euler_steps_by_hand():
    v = _linear_field(0.5, 2.0)
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    t, m, n = torch.tensor([1.0, 0.6]), torch.tensor([0.7, 0.4]), torch.tensor([0.2, 0.1])
    # by hand for sample 0: x_m = x + (m - t)(a x + b t); x' = x_m + (n - m)(a x_m + b m)
    out = distill.two_step_target(v, x, t, m, n)
    for i in range(2):
        xm = x[i] + (m[i] - t[i]) * (0.5 * x[i] + 2.0 * t[i])
        xn = xm + (n[i] - m[i]) * (0.5 * xm + 2.0 * m[i])
        assert torch.allclose(out[i], (xn - x[i]) / (n[i] - t[i]), atol=1e-6)
    with pytest.raises(ValueError, match="t > t_mid > t_next"):
        distill.two_step_target(v, x, t, n, m)


def test_ideal_student_in_n_steps_equals_teacher_in_2n():
    """A student equal to its target everywhere on its grid samples in N steps what the teacher does in 2N."""
    teacher = _linear_field(-0.8, 1.5)
    shift, n = 3.0, 4
    ts = timesteps(n, shift=shift)
    mids = distill.grid_midpoints(ts, shift)
    lookup = {float(t): (float(m), float(nx)) for t, m, nx in zip(ts[:-1], mids, ts[1:], strict=True)}

    def student(x, t):
        m, nx = lookup[float(t[0])]
        return distill.two_step_target(teacher, x, t, torch.full_like(t, m), torch.full_like(t, nx))

    noise = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    fine = torch.stack([ts[:-1], mids], 1).flatten().tolist() + [0.0]  # t_0, m_0, t_1, m_1, ..., 0
    assert torch.allclose(solve(student, noise, ts), solve(teacher, noise, fine), atol=1e-5)


def test_progressive_and_guidance_losses_by_hand():
    g = torch.Generator().manual_seed(1)
    x0, noise, c, u = (torch.randn(4, 6, generator=g) for _ in range(4))
    t = torch.tensor([0.9, 0.5, 0.3, 1.0])

    def net(x, t, c):
        return 0.3 * x - c * t.view(-1, 1)

    guided = cfg(net, 4.0, c=u)
    x_t = interpolate(x0, noise, t)
    want = (net(x_t, t, c) - (net(x_t, t, u) + 4.0 * (net(x_t, t, c) - net(x_t, t, u)))).pow(2).mean()
    got = distill.guidance_loss(net, guided, x0, noise, t, c=c)
    assert torch.allclose(got, want, atol=1e-6)

    m, n = t * 0.7, t * 0.4
    target = distill.two_step_target(guided, x_t, t, m, n, c=c)
    want = (net(x_t, t, c) - target).pow(2).mean()
    assert torch.allclose(distill.progressive_loss(net, guided, x0, noise, t, m, n, c=c), want, atol=1e-6)
    # a straight (constant) teacher field: the two-step target is the field itself
    const = torch.randn(4, 6, generator=g)
    target = distill.two_step_target(lambda x, t: const, x_t, t, m, n)
    assert torch.allclose(target, const, atol=1e-6)


# ------------------------------------------------------------------------------------------ couplings


@pytest.fixture(scope="module")
def pipe():
    from mmdit_flow.pipelines import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(SHIPPED, device="cpu", dtype=torch.float32)


PROMPTS = ["a red circle", "a blue square on a white background", "a small green triangle"]


@pytest.fixture(scope="module")
def couplings(pipe, tmp_path_factory) -> Path:
    from mmdit_flow.training.couplings import make_couplings

    out = tmp_path_factory.mktemp("couplings") / "c"
    return make_couplings(
        pipe, SHIPPED, PROMPTS, out, num=5, steps=2, guidance=3.0, batch_size=2, shard_size=2, progress=False
    )


def test_couplings_are_the_teachers_samples_from_their_noise(pipe, couplings):
    from mmdit_flow.training.cache import CachedDataset
    from mmdit_flow.training.couplings import record_seed, teacher_noise
    from mmdit_flow.training.data import SampleKey

    ds = CachedDataset(couplings)
    assert len(ds) == 5 and ds.couplings["steps"] == 2 and ds.couplings["guidance"] == 3.0
    for i in (0, 4):
        item = ds[SampleKey(i, 0)]
        seed = record_seed(0, i)
        assert item["caption"] == PROMPTS[i % 3]
        assert torch.equal(item["noise"], teacher_noise(pipe, seed, 64, 64)[0])
        z = pipe(PROMPTS[i % 3], seed=seed, steps=2, guidance=3.0, output="latent", progress=False)
        assert torch.allclose(item["latents"], z[0], atol=1e-5)  # pipe(prompt, seed) draws this pair
    index = json.loads((couplings / "index.json").read_text())
    assert index["shards"] == [f"shard-0000{k}.safetensors" for k in range(3)]


def test_couplings_resume_writes_nothing_twice(pipe, couplings, tmp_path):
    import shutil

    from mmdit_flow.training.couplings import make_couplings

    work = tmp_path / "c"
    shutil.copytree(couplings, work)
    os.remove(work / "index.json")  # as if killed after the second shard
    os.remove(work / "shard-00002.safetensors")
    kept = {n: (work / n).stat().st_mtime_ns for n in ("shard-00000.safetensors", "shard-00001.safetensors")}
    make_couplings(pipe, SHIPPED, PROMPTS, work, num=5, steps=2, guidance=3.0, batch_size=1, shard_size=2,
                   progress=False)  # fmt: skip
    assert {n: (work / n).stat().st_mtime_ns for n in kept} == kept
    assert (work / "index.json").read_bytes() == (couplings / "index.json").read_bytes()
    # the rewritten shard holds the same tensors and metadata (safetensors orders metadata keys by a hash map
    # seeded per process, so its bytes may differ)
    from safetensors import safe_open

    with (
        safe_open(work / "shard-00002.safetensors", "pt") as a,
        safe_open(couplings / "shard-00002.safetensors", "pt") as b,
    ):
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_couplings_of_another_teacher_or_damaged_are_refused(pipe, couplings, tmp_path):
    import shutil

    from mmdit_flow.training.cache import CachedDataset
    from mmdit_flow.training.couplings import CouplingsError, make_couplings

    with pytest.raises(CouplingsError, match=r"couplings.json.*steps: 2 -> 3"):
        make_couplings(pipe, SHIPPED, PROMPTS, couplings, num=5, steps=3, guidance=3.0, shard_size=2)
    work = tmp_path / "c"
    shutil.copytree(couplings, work)
    shard = work / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CouplingsError, match=r"shard-00001.safetensors cannot be used.*truncated"):
        CachedDataset(work)
    other = make_couplings(pipe, SHIPPED, PROMPTS, tmp_path / "other", num=2, steps=2, guidance=3.0,
                           seed=1, shard_size=2, progress=False)  # fmt: skip
    shutil.copy(other / "shard-00000.safetensors", shard)
    with pytest.raises(CouplingsError, match=r"shard-00001.safetensors was written by another teacher"):
        CachedDataset(work)


def test_prompt_sources(tmp_path):
    from mmdit_flow.training.couplings import read_prompts

    (tmp_path / "p.txt").write_text("a red circle\n\n a blue square \n")
    assert read_prompts(prompts=str(tmp_path / "p.txt")) == ["a red circle", "a blue square"]
    from mmdit_flow.training.recipes.tiny_shapes.shapes import write_dataset

    folder = write_dataset(tmp_path / "shapes", 3)
    captions = read_prompts(captions=str(folder))
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    with pytest.raises(ValueError, match="exactly one prompt source"):
        read_prompts()


# ------------------------------------------------------------------------------------------ objectives


def _config(tmp_path: Path, data: dict, **objective):
    from mmdit_flow.training.config import config_from_dict

    return config_from_dict({
        "model": {"pretrained": str(SHIPPED), "attention_backend": "math"},
        "data": {**data, "batch_size": 2},
        "objective": objective,
        "schedule": {"max_steps": 2},
        "output": {"dir": str(tmp_path / "run"), "trackers": [], "progress": False, "save_final": False},
    })  # fmt: skip


def _context(config, dataset, model):
    from mmdit_flow.training import objectives
    from mmdit_flow.training.trainer import Context, TrainState

    acc = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    teacher, grid = objectives.prepare(config, dataset, acc.device)
    empty = dataset.empty
    return Context(acc, model, None, None, config, TrainState(), dataset.layout, tuple(dataset.encoders),
                   empty, None, None, None, teacher, grid)  # fmt: skip


def _batch(dataset, seeds):
    from mmdit_flow.training.data import SampleKey, collate

    return collate([dataset[SampleKey(i, s)] for i, s in enumerate(seeds)])


def test_reflow_loss_uses_the_couplings_noise(couplings, tmp_path):
    from mmdit_flow.training.cache import CachedDataset, combine
    from mmdit_flow.training.trainer import build_model, micro_loss, sample_draws

    ds = CachedDataset(couplings)
    for steps in (0, 2):
        config = _config(tmp_path, {"cache_dir": str(couplings)}, kind="reflow", student_steps=steps)
        model = build_model(config)
        ctx = _context(config, ds, model)
        batch = _batch(ds, [11, 12])
        t, _, _ = sample_draws(batch["seed"], (16, 16, 16), config.objective, ctx.encoders, grid=steps)
        if steps:
            grid = timesteps(2, shift=3.0)
            assert ctx.grid.ts.tolist() == grid.tolist()
            t = grid[t]
        txt, vec = combine(batch["text"], "sd3")
        want = cfm_loss(model, batch["latents"], t=t,
                        noise=batch["noise"], txt=txt, vec=vec)  # fmt: skip
        assert torch.allclose(micro_loss(ctx, batch), want, rtol=1e-5)


def test_progressive_and_guidance_losses_in_the_trainer(couplings, tmp_path):
    from mmdit_flow.training.cache import CachedDataset, combine
    from mmdit_flow.training.trainer import build_model, micro_loss, sample_draws

    ds = CachedDataset(couplings)
    data = {"cache_dir": str(couplings)}
    batch = _batch(ds, [5, 6])
    txt, vec = combine(batch["text"], "sd3")
    e_txt, e_vec = combine(ds.empty, "sd3")
    x0 = batch["latents"]
    for kind, extra in [("progressive", {"student_steps": 4}), ("guidance", {})]:
        config = _config(tmp_path, data, kind=kind, teacher=str(SHIPPED), teacher_guidance=4.0, **extra)
        student = build_model(config)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01)  # a student that is not the teacher
        ctx = _context(config, ds, student)
        draw, noise, _ = sample_draws(batch["seed"], (16, 16, 16), config.objective, ctx.encoders,
                                      grid=extra.get("student_steps", 0))  # fmt: skip
        teacher = cfg(ctx.teacher.model, 4.0,
                      txt=e_txt.expand(2, -1, -1), vec=e_vec.expand(2, -1))  # fmt: skip
        net = student
        if kind == "progressive":
            ts = timesteps(4, shift=3.0)
            mids = distill.grid_midpoints(ts, 3.0)
            want = distill.progressive_loss(net, teacher, x0, noise, ts[draw], mids[draw], ts[draw + 1],
                                            txt=txt, vec=vec)  # fmt: skip
        else:
            want = distill.guidance_loss(net, teacher, x0, noise, draw, txt=txt, vec=vec)
        got = micro_loss(ctx, batch)
        assert torch.allclose(got, want, rtol=1e-5) and got > 0


def test_objective_config_errors(tmp_path, couplings):
    from mmdit_flow.training.cache import CachedDataset
    from mmdit_flow.training.config import ConfigError
    from mmdit_flow.training.objectives import prepare
    from mmdit_flow.training.recipes.tiny_shapes.shapes import write_dataset

    data = {"cache_dir": str(couplings)}
    with pytest.raises(ValueError, match="set objective.teacher"):
        _config(tmp_path, data, kind="progressive", student_steps=2)
    with pytest.raises(ValueError, match="needs objective.student_steps"):
        _config(tmp_path, data, kind="progressive", teacher=str(SHIPPED))
    with pytest.raises(ValueError, match="not by flow"):
        _config(tmp_path, data, teacher=str(SHIPPED))
    with pytest.raises(ValueError, match="no unconditional counterpart"):
        _config(tmp_path, data, kind="guidance", teacher=str(SHIPPED), teacher_guidance=4.0,
                caption_dropout={"joint": 0.1})  # fmt: skip
    missing = tmp_path / "round-4" / "final"
    config = _config(tmp_path, data, kind="progressive", teacher=str(missing), student_steps=2)
    with pytest.raises(ConfigError, match=r"round-4/final' does not exist.*previous round"):
        prepare(config, CachedDataset(couplings), torch.device("cpu"))
    images = write_dataset(tmp_path / "shapes", 2)
    config = _config(tmp_path, {"path": str(images)}, kind="reflow")
    with pytest.raises(ConfigError, match="reflow trains on couplings"):
        prepare(config, None, torch.device("cpu"))


def test_progressive_round_exports_a_student_that_samples_as_made(tmp_path):
    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.training.config import ConfigError, config_from_dict
    from mmdit_flow.training.recipes.tiny_shapes.shapes import write_dataset
    from mmdit_flow.training.trainer import train

    images = write_dataset(tmp_path / "shapes", 4)
    base = {
        "model": {"pretrained": str(SHIPPED), "attention_backend": "math"},
        "data": {"path": str(images), "batch_size": 2},
        "objective": {"kind": "progressive", "teacher": str(SHIPPED), "teacher_guidance": 4.0,
                      "student_steps": 2},
        "schedule": {"max_steps": 2},
        "output": {"dir": str(tmp_path / "run"), "trackers": [], "progress": False, "checkpoint_every": 1},
    }  # fmt: skip
    assert train(config_from_dict(base)) == 0
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "mmdit_flow.json").read_text())
    assert saved["defaults"]["steps"] == 2 and saved["defaults"]["guidance"] == 1.0
    assert saved["distilled_steps"] == [2]
    student = TextToImagePipeline.from_pretrained(final, device="cpu", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        student("a red circle", seed=0, output="latent", progress=False)  # its own 2 steps: no warning
    with pytest.warns(UserWarning, match="distilled to sample in 2 steps; 3 steps"):
        student("a red circle", seed=0, steps=3, output="latent", progress=False)
    # resuming these checkpoints with another objective says so
    other = {**base, "objective": {**base["objective"], "student_steps": 1}, "schedule": {"max_steps": 3}}
    with pytest.raises(ConfigError, match="written with objective.*student_steps"):
        train(config_from_dict(other))


def test_distill_rounds_chain_teachers_and_skip_finished_rounds(tmp_path):
    import argparse

    import yaml

    from mmdit_flow.training import distill_cli
    from mmdit_flow.training.recipes.tiny_shapes.shapes import write_dataset

    images = write_dataset(tmp_path / "shapes", 4)
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"pretrained": str(SHIPPED), "attention_backend": "math"},
        "data": {"path": str(images), "batch_size": 2},
        "objective": {"kind": "progressive", "teacher": str(SHIPPED), "teacher_guidance": 4.0,
                      "student_steps": 1},
        "schedule": {"max_steps": 1},
        "output": {"dir": str(tmp_path / "run"), "trackers": [], "progress": False},
    }))  # fmt: skip
    assert distill_cli.main([str(config), "--rounds", "4,2"]) == 0
    first, second = (tmp_path / "run" / f"round-{s}" for s in (4, 2))
    ran = [yaml.safe_load((r / "config.yaml").read_text())["objective"] for r in (first, second)]
    assert (ran[0]["teacher"], ran[0]["teacher_guidance"], ran[0]["student_steps"]) == (str(SHIPPED), 4.0, 4)
    assert ran[1]["teacher"] == str(first / "final") and ran[1]["teacher_guidance"] == 1.0
    assert ran[1]["student_steps"] == 2
    assert json.loads((second / "final" / "mmdit_flow.json").read_text())["distilled_steps"] == [2]
    stamp = (second / "final" / "model_index.json").stat().st_mtime_ns
    assert distill_cli.main([str(config), "--rounds", "4,2"]) == 0  # both complete: nothing retrained
    assert (second / "final" / "model_index.json").stat().st_mtime_ns == stamp
    for bad in ("4,4", "2,4", "0", "four"):
        with pytest.raises(argparse.ArgumentTypeError, match="--rounds"):
            distill_cli.rounds(bad)
    flow = tmp_path / "flow.yaml"
    flow.write_text(config.read_text().replace("kind: progressive", "kind: flow"))
    assert distill_cli.main([str(flow), "--rounds", "2"]) == 2


def test_a_reflow_student_records_every_grid_inside_its_own(couplings, tmp_path):
    from mmdit_flow.training.cache import CachedDataset
    from mmdit_flow.training.objectives import Grid, student_defaults

    grid = Grid.for_scheduler(4, 3.0)
    trained = {round(t, 6) for t in grid.ts[:-1].tolist()}
    for n in range(1, 5):
        inside = {round(t, 6) for t in timesteps(n, shift=3.0)[:-1].tolist()} <= trained
        assert (n in grid.sub_grids()) == inside
    assert grid.sub_grids() == (1, 2, 4)  # the scheduler's grids end at sigma_min: 2 steps = {1, 0.0089}
    ds = CachedDataset(couplings)
    reflow = _config(tmp_path, {"cache_dir": str(couplings)}, kind="reflow", student_steps=4)
    assert student_defaults(reflow, ds, grid) == {"steps": 4, "distilled_steps": (1, 2, 4), "guidance": 1.0}
    progressive = _config(tmp_path, {"cache_dir": str(couplings)}, kind="progressive", student_steps=4,
                          teacher=str(SHIPPED))  # fmt: skip
    assert student_defaults(progressive, ds, grid) == {"steps": 4, "distilled_steps": (4,)}


@pytest.mark.parametrize(
    "objective",
    [{"kind": "reflow", "student_steps": 4},
     {"kind": "progressive", "student_steps": 2, "teacher": str(SHIPPED), "teacher_guidance": 3.0}],
    ids=["reflow", "progressive"],
)  # fmt: skip
def test_a_student_run_resumes_exactly_with_accumulation_and_ema(couplings, tmp_path, objective):
    import signal

    from mmdit_flow.training.config import config_from_dict
    from mmdit_flow.training.trainer import train

    def config(name):
        return config_from_dict({
            "model": {"pretrained": str(SHIPPED), "attention_backend": "math"},
            "data": {"cache_dir": str(couplings), "batch_size": 1},
            "objective": {**objective, "shift": 3.0},
            "optimizer": {"grad_accum": 2},
            "schedule": {"max_steps": 4},
            "ema": {"decay": 0.9},
            "output": {"dir": str(tmp_path / name), "trackers": [], "progress": False, "save_final": False,
                       "checkpoint_every": 100},
        })  # fmt: skip

    def run(cfg, stop_at=None):
        from mmdit_flow.training.trainer import build_model

        model, losses = build_model(cfg), []

        def on_step(step, result):
            losses.append(result.loss)
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)

        return train(cfg, model=model, on_step=on_step), model, losses

    code, whole, losses = run(config("a"))
    assert code == 0 and len(losses) == 4
    code, _, first = run(config("b"), stop_at=2)
    assert code == 128 + signal.SIGTERM
    code, resumed, second = run(config("b"))
    assert code == 0 and first + second == losses
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_with_another_flux_guidance_range_is_refused(tmp_path):
    from mmdit_flow.training.config import ConfigError
    from mmdit_flow.training.run_info import check_resume

    record = {"training": "full", "lora": None, "model": {"preset": "flux_dev"},
              "trainable": {"tensors": 1, "parameters": 4, "digest": "x"}}  # fmt: skip
    flow = {"kind": "flow", "teacher_guidance": 1.0, "student_steps": 0}
    saved = {**record, "objective": {**flow, "guidance": [1.0, 5.0]}}
    check_resume(saved, {**record, "objective": {**flow, "guidance": [1.0, 5.0]}}, tmp_path)
    with pytest.raises(ConfigError, match="written with objective.*guidance"):
        check_resume(saved, {**record, "objective": {**flow, "guidance": [2.0, 5.0]}}, tmp_path)
    check_resume({**record, "objective": flow}, {**record, "objective": flow}, tmp_path)  # SD3: no key
    # the record the trainer writes holds the range
    from mmdit_flow.training.config import config_from_dict
    from mmdit_flow.training.run_info import run_record

    base = {"model": {"preset": "flux_dev"}, "data": {"path": str(tmp_path)}}
    config = config_from_dict({**base, "objective": {"guidance": [1, 5]}})
    assert run_record(config, torch.nn.Linear(2, 2))["objective"]["guidance"] == [1.0, 5.0]
    assert "guidance" not in run_record(config_from_dict(base), torch.nn.Linear(2, 2))["objective"]
