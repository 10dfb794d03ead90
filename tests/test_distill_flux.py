"""Guidance distillation of a guidance-embedded Flux student (FLUX.1-dev's way): the loss against the
teacher's CFG velocity computed by hand with the model's own forward, a short run that closes the gap at
several scales, the exported folder's defaults in our pipeline and diffusers' ``FluxPipeline``, and the
kinds that stay refused."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdit_flow.sampling import cfg
from mmdit_flow.training.config import ConfigError, config_from_dict
from tests.test_train_flux import FLUX_TINY, make_flux_cache, tiny_flux
from tests.train_helpers import captioned_noise_folder

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

    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.training.trainer import train
    from tests.components import flux_components, save_diffusers_folder

    base = save_diffusers_folder(flux_components(), tmp_path / "base")
    teacher = tmp_path / "teacher"  # no guidance embedding: a model trained for CFG, the base's text sizes
    flux_components(guidance_embeds=False)["transformer"].save_pretrained(teacher / "transformer")
    images = captioned_noise_folder(tmp_path / "images")
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


# ------------------------------------------------------------------ a student that starts as its teacher


def _from_folder(folder: Path, overrides: dict, model: dict | None = None, **sections):
    """A config that fine-tunes ``folder`` with ``model.overrides``."""
    return config_from_dict({
        "model": {"pretrained": str(folder), "overrides": overrides, **(model or {})},
        "data": {"cache_dir": str(folder)},
        **sections,
    })  # fmt: skip


def test_an_added_guidance_embedding_leaves_the_teacher_unchanged(tmp_path, caplog):
    """``model.overrides: {guidance_embed: true}`` on a Flux folder without guidance embedding: the built
    student has the teacher's every tensor plus a guidance embedder whose output layer is zero, and gives the
    teacher's velocity exactly at any guidance input; saved, diffusers' ``FluxTransformer2DModel`` (with
    guidance_embeds) equals diffusers' own forward of the teacher folder (no guidance) too."""
    from diffusers import FluxTransformer2DModel

    from mmdit_flow.training.resolve import transformer_config
    from mmdit_flow.training.trainer import build_model
    from mmdit_flow.weights import load_transformer, save_transformer
    from tests.components import flux_components
    from tests.test_flux import diffusers_velocity, inputs

    folder = tmp_path / "teacher"
    flux_components(guidance_embeds=False)["transformer"].save_pretrained(folder / "transformer")
    config = _from_folder(folder, {"guidance_embed": True})
    teacher = load_transformer(folder / "transformer", device="cpu", dtype=torch.float32)
    assert not teacher.config.guidance_embed
    with caplog.at_level("INFO", logger="mmdit_flow.training.trainer"):
        student = build_model(config)
    assert "added a guidance embedding" in caplog.text and "starts as the folder's" in caplog.text
    assert student.config == dataclasses.replace(teacher.config, guidance_embed=True)
    assert transformer_config(config) == student.config  # what the run resolves and checks the objective on
    theirs, ours = teacher.state_dict(), student.state_dict()
    assert set(ours) - set(theirs) == {f"guidance_in.{k}" for k in student.guidance_in.state_dict()}
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    assert not student.guidance_in.out_layer.weight.any() and not student.guidance_in.out_layer.bias.any()
    assert student.guidance_in.in_layer.weight.std() > 0.01  # learnable from the first step
    assert all(p.requires_grad for p in student.parameters()) and student.training

    kw = inputs(teacher.config, 2, 8, 6)
    with torch.no_grad():
        want = teacher(**kw)
        for g in (0.0, 1.0, 3.5, 100.0, torch.tensor([0.5, 7.0])):
            torch.testing.assert_close(student(**kw, guidance=g), want, rtol=0, atol=0)
    save_transformer(student, tmp_path / "student", format="diffusers")
    ref_student = FluxTransformer2DModel.from_pretrained(tmp_path / "student").eval()
    ref_teacher = FluxTransformer2DModel.from_pretrained(folder / "transformer").eval()
    assert ref_student.config.guidance_embeds and not ref_teacher.config.guidance_embeds
    with torch.no_grad():
        ref_want = diffusers_velocity(ref_teacher, **kw)
        for g in (1.0, torch.tensor([0.5, 7.0])):
            ref_got = diffusers_velocity(ref_student, **kw, guidance=torch.as_tensor(g).expand(2))
            torch.testing.assert_close(ref_got, ref_want, rtol=0, atol=1e-6)
        torch.testing.assert_close(want, ref_want, rtol=1e-4, atol=1e-5)  # ours is diffusers'


def test_a_student_from_its_teacher_trains_and_loads_in_diffusers(tmp_path):
    """Guidance distillation whose student starts as the teacher (a schnell-like pipeline folder, CFG scale
    2.5): a few steps run, the exported transformer has guidance_embeds true, diffusers' ``FluxPipeline``
    loads the folder and gives our image at its recorded guidance (1e-3), and the guidance input acts."""
    from diffusers import FluxPipeline

    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.training.trainer import train
    from tests.components import flux_components, save_diffusers_folder

    teacher = save_diffusers_folder(flux_components(guidance_embeds=False), tmp_path / "teacher")
    images = captioned_noise_folder(tmp_path / "images")
    config = _from_folder(
        teacher,
        {"guidance_embed": True},
        model={"max_sequence_length": 16},
        data={"path": str(images), "resolution": 16, "bucket_step": 16, "batch_size": 2},
        objective={"kind": "guidance", "teacher": str(teacher), "guidance": 2.5},
        optimizer={"lr": 1e-2},
        schedule={"max_steps": 20},
        output={"dir": str(tmp_path / "run"), "trackers": [], "progress": False, "checkpoint_every": 20},
    )
    assert train(config) == 0
    final = tmp_path / "run" / "final"
    assert json.loads((final / "transformer" / "config.json").read_text())["guidance_embeds"] is True
    assert json.loads((final / "mmdit_flow.json").read_text())["defaults"]["guidance"] == 2.5
    ref = FluxPipeline.from_pretrained(final)
    ref.set_progress_bar_config(disable=True)
    assert ref.transformer.config.guidance_embeds
    a = ref("a red square", num_inference_steps=28, guidance_scale=2.5, output_type="np", height=16,
            width=16, max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    ours = TextToImagePipeline.from_pretrained(final, device="cpu", dtype=torch.float32)
    b = ours("a red square", seed=0, output="np", progress=False)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-3
    c = ours("a red square", seed=0, guidance=1.0, output="np", progress=False)
    assert np.abs(np.asarray(c) - np.asarray(b)).max() > 1e-3  # the added embedding learned to act


def test_guidance_embed_on_a_folder_that_has_one_changes_nothing(tmp_path):
    """``guidance_embed: true`` on a guidance-embedded folder is a no-op: its trained embedding is kept."""
    from mmdit_flow.training.trainer import build_model
    from mmdit_flow.weights import load_transformer

    folder = _teacher(tmp_path / "dev", guidance_embed=True)
    saved = load_transformer(folder / "transformer", device="cpu", dtype=torch.float32).state_dict()
    built = build_model(_from_folder(folder, {"guidance_embed": True})).state_dict()
    assert built.keys() == saved.keys() and all(torch.equal(built[k], v) for k, v in saved.items())
    assert built["guidance_in.out_layer.weight"].abs().min() > 0  # not re-initialised


@pytest.mark.parametrize(
    "folder, overrides, sections, message",
    [
        ("sd3", {"guidance_embed": True}, {}, "is an SD3 model; a guidance embedding .* Flux models only"),
        ("schnell", {"guidance_embed": True, "depth": 2}, {},
         "overrides \\['depth'\\] with model.pretrained .* keeps the shapes of its weights"),
        ("schnell", {"guidance_embeds": True}, {}, "\\['guidance_embeds'\\] .* guidance_embed: true"),
        ("schnell", {"guidance_embed": "yes"}, {}, "must be true or false, got 'yes'"),
        ("dev", {"guidance_embed": False}, {}, "has a guidance embedding, and removing it"),
        ("schnell", {"guidance_embed": True}, {"lora": {"rank": 4}}, "LoRA would keep it frozen"),
    ],
    ids=["sd3", "other-field", "diffusers-name", "not-bool", "remove", "lora"],
)  # fmt: skip
def test_adding_a_guidance_embedding_where_it_cannot_be_says_why(
    tmp_path, folder, overrides, sections, message
):
    from mmdit_flow.training.resolve import transformer_config
    from mmdit_flow.training.trainer import build_model

    shipped = Path(__file__).resolve().parents[1] / "weights" / "tiny-shapes"  # an SD3 pipeline folder
    path = shipped if folder == "sd3" else _teacher(tmp_path / folder, guidance_embed=folder == "dev")
    config = _from_folder(path, overrides, **sections)
    with pytest.raises(ConfigError, match=message):
        transformer_config(config)
    with pytest.raises(ConfigError, match=message):
        build_model(config)


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


def test_the_documented_student_from_its_teacher_config_loads():
    import re

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(model:\n  pretrained: path/to/cfg-teacher.*?)```", text, re.S).group(1)
    c = config_from_dict(yaml.safe_load(block))
    assert c.model.overrides == {"guidance_embed": True} and c.model.pretrained == c.objective.teacher
    assert (c.objective.kind, c.objective.guidance) == ("guidance", [1.0, 5.0])
