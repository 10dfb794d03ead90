"""Guidance distillation of a guidance-embedded Flux student (FLUX.1-dev's way): the loss against the
teacher's CFG velocity computed by hand with the model's own forward, a short run that closes the gap at
several scales, the exported folder's defaults in our pipeline and diffusers' ``FluxPipeline``, and the
kinds that stay refused."""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdit_flow.sampling import cfg
from mmdit_flow.training.config import ConfigError, config_from_dict
from tests.test_train_flux import FLUX_TINY, make_flux_cache, tiny_flux

SQUARE = ((8, 8),)  # one latent shape: any records form a batch


def _teacher(folder: Path, *, guidance_embed: bool = False, seed: int = 1) -> Path:
    from mmdit_flow.weights import save_transformer

    save_transformer(
        tiny_flux(seed, guidance_embed=guidance_embed), folder / "transformer", format="diffusers"
    )
    return folder


def _config(cache: Path, out: Path, teacher: Path | None, **objective):
    teacher_key = {"teacher": str(teacher)} if teacher is not None else {}
    return config_from_dict({
        "model": {"preset": "flux_dev", "overrides": dict(FLUX_TINY)},
        "data": {"cache_dir": str(cache), "batch_size": 4},
        "objective": {"kind": "guidance", **teacher_key, **objective},
        "optimizer": {"lr": 3e-3, "grad_clip": 1.0, "weight_decay": 0.0},
        "schedule": {"max_steps": 600, "lr_schedule": "cosine"},
        "output": {"dir": str(out), "trackers": [], "progress": False, "save_final": False,
                   "checkpoint_every": 1000},
    })  # fmt: skip


def _batch(dataset, seeds):
    from mmdit_flow.training.data import SampleKey, collate

    return collate([dataset[SampleKey(i, s)] for i, s in enumerate(seeds)])


def _cfg_target(teacher, x_t, t, txt, vec, empty, scale):
    """v_u + s (v_c - v_u), each velocity one plain forward of the teacher (guidance input 1 if it has
    one)."""
    from mmdit_flow.training.cache import combine

    g = 1.0 if teacher.config.guidance_embed else None
    e_txt, e_vec = combine(empty, "flux")
    v_c = teacher(x_t, t, txt, vec, guidance=g)
    v_u = teacher(x_t, t, e_txt.expand(len(x_t), -1, -1), e_vec.expand(len(x_t), -1), guidance=g)
    return v_u + scale.view(-1, 1, 1, 1) * (v_c - v_u)


# ------------------------------------------------------------------------------------------------ math


def test_cfg_takes_one_scale_per_sample():
    def net(x, t, c):
        return x * c.view(-1, 1) + t.view(-1, 1)

    x, t = torch.randn(3, 4), torch.tensor([0.2, 0.5, 0.9])
    c, u, s = torch.tensor([2.0, -1.0, 0.5]), torch.zeros(3), torch.tensor([1.0, 3.0, 0.0])
    got = cfg(net, s, c=u)(x, t, c=c)
    for i in range(3):
        want = cfg(net, float(s[i]), c=u[i : i + 1])(x[i : i + 1], t[i : i + 1], c=c[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="per-sample guidance scale must be"):
        cfg(net, torch.tensor([1.0, -2.0, 3.0]), c=u)
    with pytest.raises(ValueError, match="2 per-sample guidance scales for a batch of 3"):
        cfg(net, torch.tensor([1.0, 2.0]), c=u)(x, t, c=c)


@pytest.mark.parametrize(
    "guidance, dynamic_shift, teacher_embedded, student_embedded",
    [(3.0, False, False, True), ([1.0, 5.0], True, False, True), ([1.0, 5.0], False, True, True),
     (None, True, False, False)],
    ids=["fixed", "range-shifted", "embedded-teacher", "schnell-student"],
)  # fmt: skip
def test_loss_is_the_teachers_cfg_velocity_by_hand(
    tmp_path, guidance, dynamic_shift, teacher_embedded, student_embedded
):
    """Our trainer's ``micro_loss`` against the target built from the forwards: the teacher's cond and
    uncond (empty prompt) velocities at x_t, combined at each sample's scale s, and the student at x_t with
    guidance input s. A student without guidance embedding learns one scale, ``objective.teacher_guidance``
    (3 here), with no guidance input."""
    from mmdit_flow.training import objectives
    from mmdit_flow.training.cache import CachedDataset, combine
    from mmdit_flow.training.resolve import check_family
    from mmdit_flow.training.trainer import (
        Context,
        TrainState,
        flux_shift,
        micro_loss,
        sample_draws,
        sample_guidance,
    )

    cache = make_flux_cache(tmp_path / "cache", n=4, shapes=SQUARE)
    teacher_dir = _teacher(tmp_path / "teacher", guidance_embed=teacher_embedded)
    shift = {"dynamic_shift": True, "base_seq_len": 8, "max_seq_len": 64} if dynamic_shift else {}
    scale = {"guidance": guidance} if student_embedded else {"teacher_guidance": 3.0}
    config = _config(cache, tmp_path / "run", teacher_dir, **scale, **shift)
    student = tiny_flux(0, guidance_embed=student_embedded)
    check_family(config, student.config)  # what train() checks first: this objective is accepted
    ds = CachedDataset(cache)
    acc = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    teacher, grid = objectives.prepare(config, ds, acc.device)
    ctx = Context(acc, student, None, None, config, TrainState(), "flux", tuple(ds.encoders), ds.empty,
                  teacher=teacher, grid=grid)  # fmt: skip
    batch = _batch(ds, [3, 11, 12, 40])
    o = config.objective
    t, noise, _ = sample_draws(batch["seed"], (4, 8, 8), o, ctx.encoders)
    if dynamic_shift:
        t = flux_shift(t, 16, o)
    s = sample_guidance(batch["seed"], o) if student_embedded else torch.full((4,), 3.0)
    assert len(set(s.tolist())) == (4 if isinstance(guidance, list) else 1)
    given = s if student_embedded else None  # the student's guidance input
    x0 = batch["latents"]
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    txt, vec = combine(batch["text"], "flux")
    with torch.no_grad():
        target = _cfg_target(teacher.model, x_t, t, txt, vec, ds.empty, s)
        want = (student(x_t, t, txt, vec, guidance=given) - target).pow(2).mean()
        got = micro_loss(ctx, batch)
    assert abs(got.item() - want.item()) <= 1e-5 * want.item(), (got.item(), want.item())
    # the target moves with s: the loss is not that of another scale
    with torch.no_grad():
        shifted = _cfg_target(teacher.model, x_t, t, txt, vec, ds.empty, s + 1.0)
        other = (student(x_t, t, txt, vec, guidance=given) - shifted).pow(2).mean()
    assert abs(other.item() - want.item()) > 1e-3 * want.item()


# ------------------------------------------------------------------------------------------- training


def test_a_short_run_closes_the_gap_at_several_scales(tmp_path):
    """600 steps on scales drawn from [1, 5] (a tiny student from random weights, 4 s on one thread): the
    mean squared gap between student(guidance = s) and the teacher's CFG velocity at s falls at s = 1.5, 3
    and 4.5 on held-out noise and times (measured: to 0.21, 0.41 and 0.29 of its start), and the student
    follows its input: at each end of the range it is nearer the target of its own scale than of the other."""
    from mmdit_flow.training.cache import CachedDataset, combine
    from mmdit_flow.training.trainer import train
    from mmdit_flow.weights import load_transformer

    cache = make_flux_cache(tmp_path / "cache", n=4, shapes=SQUARE)
    teacher_dir = _teacher(tmp_path / "teacher")
    config = _config(cache, tmp_path / "run", teacher_dir, guidance=[1.0, 5.0])
    ds = CachedDataset(cache)
    batch = _batch(ds, range(4))
    x0, (txt, vec) = batch["latents"], combine(batch["text"], "flux")
    g = torch.Generator().manual_seed(123)
    noise, t = torch.randn(x0.shape, generator=g), torch.rand(4, generator=g) * 0.9 + 0.05
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    teacher = load_transformer(teacher_dir / "transformer", device="cpu", dtype=torch.float32)

    def gap(student, s_student: float, s_target: float) -> float:
        with torch.no_grad():
            target = _cfg_target(teacher, x_t, t, txt, vec, ds.empty, torch.full((4,), s_target))
            pred = student(x_t, t, txt, vec, guidance=torch.full((4,), s_student))
            return (pred - target).pow(2).mean().item()

    scales = (1.5, 3.0, 4.5)
    student = tiny_flux(0)
    before = [gap(student, s, s) for s in scales]
    assert train(config, model=student) == 0
    after = [gap(student, s, s) for s in scales]
    for s, b, a in zip(scales, before, after, strict=True):
        assert a < 0.6 * b, f"scale {s}: gap {b:.3f} -> {a:.3f}"
    assert gap(student, 1.5, 1.5) < gap(student, 4.5, 1.5)
    assert gap(student, 4.5, 4.5) < gap(student, 1.5, 4.5)


# ------------------------------------------------------------------------------------------ the export


def test_the_student_folder_samples_at_its_guidance_in_both_pipelines(tmp_path):
    """A guidance student trained from images at scale 2.5: its ``mmdit_flow.json`` records guidance 2.5
    (its guidance input) and the base model's 28 steps; ours with no arguments equals diffusers'
    ``FluxPipeline`` at ``guidance_scale=2.5, num_inference_steps=28`` (which feeds 2.5 to the embedding, no
    CFG), and differs from guidance 1."""
    from diffusers import FluxPipeline
    from PIL import Image

    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.training.trainer import train
    from tests.components import flux_components, save_diffusers_folder

    base = save_diffusers_folder(flux_components(), tmp_path / "base")
    teacher = tmp_path / "teacher"  # no guidance embedding: a model trained for CFG, the base's text sizes
    flux_components(guidance_embeds=False)["transformer"].save_pretrained(teacher / "transformer")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a shape number {i}")
    cfg_ = config_from_dict({
        "model": {"pretrained": str(base), "max_sequence_length": 16},
        "data": {"path": str(images), "resolution": 16, "bucket_step": 16, "batch_size": 2},
        "objective": {"kind": "guidance", "teacher": str(teacher), "guidance": 2.5, "dynamic_shift": True},
        "optimizer": {"lr": 1e-2},
        "schedule": {"max_steps": 100},
        "output": {"dir": str(tmp_path / "run"), "trackers": [], "progress": False, "checkpoint_every": 100},
    })  # fmt: skip
    assert train(cfg_) == 0
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "mmdit_flow.json").read_text())["defaults"]
    assert saved["guidance"] == 2.5 and saved["steps"] == 28
    assert "distilled_steps" not in json.loads((final / "mmdit_flow.json").read_text())
    ref = FluxPipeline.from_pretrained(final)
    ref.set_progress_bar_config(disable=True)
    kw = {"height": 16, "width": 16, "max_sequence_length": 16}
    a = ref("a red square", num_inference_steps=28, guidance_scale=2.5, output_type="np",
            generator=torch.Generator().manual_seed(0), **kw).images  # fmt: skip
    ours = TextToImagePipeline.from_pretrained(final, device="cpu", dtype=torch.float32)
    b = ours("a red square", seed=0, output="np", progress=False)  # every setting from the folder
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-3
    c = ours("a red square", seed=0, guidance=1.0, output="np", progress=False)
    assert np.abs(np.asarray(c) - np.asarray(b)).max() > 1e-3  # the recorded guidance is what is used


def test_a_range_student_records_flux_default_inside_its_range(tmp_path):
    from mmdit_flow.training.objectives import embedded_guidance, student_defaults

    assert embedded_guidance([2.0]) == 2.0
    assert embedded_guidance([1.0, 5.0]) == 3.5  # Flux's default, inside the range
    assert embedded_guidance([4.0, 8.0]) == 4.0 and embedded_guidance([1.0, 3.0]) == 3.0
    config = _config(tmp_path, tmp_path / "run", tmp_path, guidance=[4.0, 8.0])
    assert student_defaults(config, None) == {"guidance": 4.0}


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "objective, embedded, message",
    [
        ({"guidance": None}, True, "needs objective.guidance: the CFG scale"),
        ({"guidance": None, "teacher_guidance": 4.0}, True,
         "teacher's CFG scale is objective.guidance.*set objective.guidance: 4"),
        ({"guidance": 3.0, "caption_dropout": {"t5": 0.1}}, True, "no unconditional counterpart"),
        ({"guidance": 3.0}, False, "remove objective.guidance \\(its guidance student learns one CFG scale"),
        ({"kind": "progressive", "student_steps": 2}, True,
         "progressive is not supported for a guidance-embedded Flux model.*objective.kind guidance"),
        ({"kind": "reflow"}, True, "reflow is not supported for a guidance-embedded Flux"),
        ({"kind": "progressive", "student_steps": 2, "dynamic_shift": True, "guidance": None}, False,
         "progressive does not support objective.dynamic_shift yet.*static shift"),
    ],
)  # fmt: skip
def test_what_stays_refused_says_why(tmp_path, objective, embedded, message):
    from mmdit_flow.training.resolve import check_family

    teacher = _teacher(tmp_path / "teacher") if objective.get("kind") != "reflow" else None
    config = _config(tmp_path, tmp_path / "run", teacher, **{"guidance": 3.0, **objective})
    with pytest.raises(ConfigError, match=message):
        check_family(config, tiny_flux(0, guidance_embed=embedded).config)


def test_a_teacher_of_another_family_is_refused(tmp_path):
    from mmdit_flow.training.resolve import check_family

    shipped = Path(__file__).resolve().parents[1] / "weights" / "tiny-shapes"  # an SD3 pipeline folder
    config = _config(tmp_path, tmp_path / "run", shipped, guidance=3.0)
    with pytest.raises(ConfigError, match="is an SD3 model and the student .* a Flux one"):
        check_family(config, tiny_flux(0).config)


def test_the_documented_config_loads():
    import re

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(model:\n  pretrained: path/to/student.*?)```", text, re.S).group(1)
    o = config_from_dict(yaml.safe_load(block)).objective
    assert (o.kind, o.guidance, o.teacher_guidance, o.dynamic_shift) == ("guidance", [1.0, 5.0], 1.0, True)
