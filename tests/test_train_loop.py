"""The training loop: exact resume, crash-safe checkpoints, accumulation, non-finite losses."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from mmdit_flow.training.checkpoint import complete_checkpoints, latest_checkpoint
from mmdit_flow.training.config import ConfigError
from mmdit_flow.training.trainer import NonFiniteLossError, lr_factor, train
from mmdit_flow.weights.io import CheckpointError
from tests.train_helpers import TINY, make_cache, tiny_config, tiny_model


def _run(config, stop_at=None, model_seed=0):
    model, losses = tiny_model(model_seed), []

    def on_step(step, result):
        losses.append(result.loss)
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    code = train(config, model=model, on_step=on_step)
    return code, model, losses


def _optimizer_state(folder):
    return torch.load(folder / "optimizer.bin", weights_only=True)["state"]


def test_resume_is_exact(tmp_path):
    cache = make_cache(tmp_path / "cache")
    code, whole, losses = _run(tiny_config(cache, tmp_path / "a"))
    assert code == 0 and len(losses) == 4
    # the same run, stopped by SIGTERM after step 2 (a checkpoint is saved), then resumed in a new "process"
    cfg = tiny_config(cache, tmp_path / "b", output={"checkpoint_every": 100})
    code, _, first = _run(cfg, stop_at=2)
    assert code == 128 + signal.SIGTERM and len(first) == 2
    assert [s for s, _ in complete_checkpoints(tmp_path / "b" / "checkpoints")] == [2]
    # other initial weights: everything must come from the checkpoint
    code, resumed, second = _run(cfg, model_seed=1)
    assert code == 0
    assert first + second == losses  # data order, random draws and weights reproduce the losses exactly
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ckpt_a, ckpt_b = tmp_path / "a/checkpoints/step-00000004", tmp_path / "b/checkpoints/step-00000004"
    sa, sb = _optimizer_state(ckpt_a), _optimizer_state(ckpt_b)
    for k in sa:
        assert all(torch.equal(sa[k][n], sb[k][n]) for n in ("exp_avg", "exp_avg_sq", "step"))
    # our own state: counters and LR schedule as JSON, the EMA weights as safetensors; no pickle of ours
    assert json.loads((ckpt_a / "train_state.json").read_text()) == json.loads(
        (ckpt_b / "train_state.json").read_text()
    )
    ema_a, ema_b = load_file(ckpt_a / "ema.safetensors"), load_file(ckpt_b / "ema.safetensors")
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert not list(ckpt_b.glob("custom_checkpoint_*"))


def test_attention_backend_from_the_config(tmp_path):
    """model.attention_backend reaches the model: "math" trains like the fp32 reference, to rounding."""
    cache = make_cache(tmp_path / "cache")
    runs = {}
    for backend in ("reference", "math"):
        cfg = tiny_config(cache, tmp_path / backend, model={"attention_backend": backend})
        code, model, runs[backend] = _run(cfg)
        assert code == 0 and model.attention_backend == backend
    assert runs["math"] == pytest.approx(runs["reference"], rel=1e-5)
    assert len(set(runs["math"])) == 4  # four different losses: the weights moved


def test_compile_trains_like_eager(tmp_path):
    """model.compile=true: torch.compile in place, the same losses to rounding, the same checkpoint keys."""
    cache = make_cache(tmp_path / "cache")
    runs, keys = {}, {}
    for compiled in (False, True):
        cfg = tiny_config(cache, tmp_path / str(compiled), model={"compile": compiled})
        code, model, runs[compiled] = _run(cfg)
        assert code == 0
        assert (model._compiled_call_impl is not None) == compiled
        weights = load_file(tmp_path / str(compiled) / "checkpoints/step-00000004/model.safetensors")
        keys[compiled] = sorted(weights)
    # step 1 is the same forward to fp32 rounding; later steps differ by rounding that Adam's normalisation
    # amplifies in near-zero gradient entries (measured 6e-5), while the losses change by 50 % per step
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert runs[True] == pytest.approx(runs[False], rel=1e-3)
    assert len(set(runs[True])) == 4  # the weights moved
    assert keys[True] == keys[False]  # no "_orig_mod." prefix: compiled checkpoints load into eager models


def test_crash_during_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from accelerate import Accelerator

    cache = make_cache(tmp_path / "cache")
    cfg = tiny_config(cache, tmp_path / "run", output={"checkpoint_every": 1, "keep_checkpoints": 1})
    real_save = Accelerator.save_state

    def crashing_save(self, output_dir=None, **kw):
        if output_dir.endswith("step-00000003.tmp"):
            real_save(self, output_dir, **kw)
            os.remove(os.path.join(output_dir, "optimizer.bin"))  # half written
            raise KeyboardInterrupt("power cut")
        return real_save(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg)
    root = tmp_path / "run/checkpoints"
    assert [s for s, _ in complete_checkpoints(root)] == [2]  # step 1 rotated away only after 2 was complete
    assert (root / "step-00000003.tmp").is_dir() and latest_checkpoint(root).name == "step-00000002"
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    code, _, losses = _run(cfg)  # resumes at 2, finishes, removes the stale .tmp
    assert code == 0 and len(losses) == 2
    assert [s for s, _ in complete_checkpoints(root)] == [4] and not (root / "step-00000003.tmp").exists()
    # a complete checkpoint whose RNG file is gone fails loudly
    (root / "step-00000004" / "random_states_0.pkl").unlink()
    with pytest.raises(CheckpointError, match="random_states_0.pkl"):
        _run(tiny_config(cache, tmp_path / "run", schedule={"max_steps": 6}))


def test_gradient_accumulation_equals_the_combined_batch(tmp_path):
    cache = make_cache(tmp_path / "cache")
    # AdamW with eps >> sqrt(v) steps by ~ lr * m / eps, linear in the gradients; with the usual eps it steps
    # by ~ lr * sign(g), which turns fp32 rounding of near-zero gradients into lr-sized differences
    sgd_like = {"lr": 1.0, "eps": 1000.0, "weight_decay": 0.0}
    common = {"schedule": {"max_steps": 3}, "ema": {"decay": 0.0}}
    big_cfg = tiny_config(cache, tmp_path / "big", data={"batch_size": 4}, optimizer=sgd_like, **common)
    _, big, big_losses = _run(big_cfg)
    acc = tiny_config(
        cache, tmp_path / "acc", data={"batch_size": 1}, optimizer={**sgd_like, "grad_accum": 4}, **common
    )
    _, small, small_losses = _run(acc)
    # equal up to fp32 summation order (a wrong sample or draw would differ by O(1))
    torch.testing.assert_close(torch.tensor(small_losses), torch.tensor(big_losses), rtol=1e-5, atol=0)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(
        big.state_dict()["final.linear.weight"], tiny_model(0).state_dict()["final.linear.weight"]
    )


class Poisoned(torch.nn.Module):
    """Returns NaN velocities on the steps listed in ``bad`` (counted by calls to forward)."""

    def __init__(self, bad):
        super().__init__()
        self.inner, self.bad, self.calls = tiny_model(0), set(bad), 0

    def forward(self, x, t, txt, vec, guidance=None):
        self.calls += 1
        v = self.inner(x, t, txt, vec)
        return v * float("nan") if self.calls in self.bad else v


def test_nonfinite_loss_skips_then_aborts(tmp_path, caplog):
    cache = make_cache(tmp_path / "cache")
    cfg = tiny_config(cache, tmp_path / "a", schedule={"max_steps": 3}, ema={"decay": 0.0})
    model, losses = Poisoned({2}), []
    before = {}

    def on_step(step, result):
        losses.append(result)
        if step == 1:
            before.update({k: v.clone() for k, v in model.state_dict().items()})
        if step == 2:
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k]), k  # the skipped step changed nothing

    assert train(cfg, model=model, on_step=on_step) == 0
    assert [r.skipped for r in losses] == [False, True, False]
    assert "step 2: non-finite loss" in caplog.text
    cfg = tiny_config(cache, tmp_path / "b", schedule={"max_steps": 10}, max_nonfinite=3)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row .* at step 4"):
        train(cfg, model=Poisoned({2, 3, 4}))


def test_lr_schedule_counts_optimizer_steps():
    from mmdit_flow.training.config import ScheduleConfig

    s = ScheduleConfig(max_steps=10, warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.1)
    assert [round(lr_factor(i, s), 4) for i in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.55, 0.1]
    c = ScheduleConfig(max_steps=4, lr_schedule="cosine")
    assert [round(lr_factor(i, c), 4) for i in range(5)] == [1.0, 0.8536, 0.5, 0.1464, 0.0]


def test_lora_run_trains_only_adapters_and_exports(tmp_path):
    from mmdit_flow.weights import load_transformer

    cache = make_cache(tmp_path / "cache")
    cfg = tiny_config(
        cache, tmp_path / "run", lora={"rank": 2, "target_modules": ["attn.qkv", "mlp.fc1"]},
        output={"save_final": True}, schedule={"max_steps": 2},
    )  # fmt: skip
    model = tiny_model(0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    assert train(cfg, model=model) == 0
    lora = load_file(str(tmp_path / "run/lora/pytorch_lora_weights.safetensors"))
    assert "transformer.transformer_blocks.0.attn.to_k.lora_B.weight" in lora
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # B moved away from its zero init
    final = load_transformer(tmp_path / "run/final/transformer")
    for name, value in final.state_dict().items():
        changed = not torch.equal(value, base[name])
        assert changed == (name.endswith(("attn.qkv.weight", "mlp.fc1.weight"))), name  # merged LoRA only


# ------------------------------------------------------------------------------ what a run tells its user


def _messages(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records if r.levelno >= level and r.name.startswith("mmdit_flow")]


def test_plan_before_the_first_step_and_where_it_wrote(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cache, out = make_cache(tmp_path / "cache"), tmp_path / "run"
    cfg = tiny_config(cache, out, optimizer={"grad_accum": 2}, ema={"decay": 0.0})
    n = sum(p.numel() for p in tiny_model(0).parameters())
    plans_at_first_step = []

    def on_step(step, result):
        if step == 1:
            plans_at_first_step.extend(m for m in _messages(caplog) if m.startswith("training "))

    assert train(cfg, model=tiny_model(0), on_step=on_step) == 0
    assert plans_at_first_step == [
        "training full training of preset sd3_medium from scratch\n"
        f"  parameters  {n / 1e3:.2f}K trainable of {n / 1e3:.2f}K ({n} of {n})\n"
        f"  data        12 cached images in {cache}, 64 px, 5 T5 tokens\n"
        "  steps       4 (from step 0), 4 images a step (batch 2 x 1 process x 2 accumulation), "
        "lr 0.001 cosine\n"
        "  precision   fp32\n"
        f"  writes      config in {out}/config.yaml; checkpoints every 2 steps in {out}/checkpoints"
    ]
    assert _messages(caplog)[-1] == (
        f"done: config in {out}/config.yaml; last checkpoint {out}/checkpoints/step-00000004"
    )


def test_lora_plan_names_rank_targets_and_trainable_share(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = tiny_config(make_cache(tmp_path / "cache"), tmp_path / "run", lora={"rank": 4},
                      schedule={"max_steps": 1, "warmup_steps": 0})  # fmt: skip
    assert train(cfg, model=tiny_model(0)) == 0
    (plan,) = [m for m in _messages(caplog) if m.startswith("training ")]
    head, params = plan.splitlines()[:2]
    assert head == "training LoRA rank 4 (alpha 4, on attn.qkv, attn.proj) of preset sd3_medium"
    trainable, total = (int(x) for x in params.split("(")[1].rstrip(")").split(" of "))
    # rank 4 on qkv (32 -> 96) and proj (32 -> 32) of both streams of 2 blocks, but the last block's text
    # stream has no proj (SD3's context_pre_only)
    qkv, proj = 4 * (32 + 96), 4 * (32 + 32)
    assert trainable == 3 * (qkv + proj) + qkv
    assert total == trainable + sum(p.numel() for p in tiny_model(0).parameters())


def test_one_signal_one_message_and_how_to_resume(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    cfg = tiny_config(make_cache(tmp_path / "cache"), out, output={"checkpoint_every": 100})

    def twice(step, result):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a launcher and a shell may both send one

    assert train(cfg, model=tiny_model(0), on_step=twice) == 128 + signal.SIGTERM
    warnings = _messages(caplog, logging.WARNING)
    assert warnings == [
        "received SIGTERM: saving a checkpoint after this step",
        f"stopped by SIGTERM after step 1; checkpoint {out}/checkpoints/step-00000001. Run the same command "
        f"again to resume from it (a run resumes from the newest checkpoint in {out}/checkpoints)",
    ]


def _full_then(tmp_path, second, first=None):
    cache = make_cache(tmp_path / "cache")
    short = {"max_steps": 2, "warmup_steps": 0}
    assert train(tiny_config(cache, tmp_path / "run", schedule=short, **(first or {}))) == 0
    with pytest.raises(ConfigError) as err:
        train(tiny_config(cache, tmp_path / "run", schedule=short, **second))
    return str(err.value)


def test_resume_refuses_lora_on_full_checkpoints(tmp_path):
    message = _full_then(tmp_path, {"lora": {"rank": 4}})
    assert message == (
        f"the checkpoints in {tmp_path}/run/checkpoints were written by full training of preset sd3_medium "
        "from scratch; this config trains LoRA rank 4 (alpha 4, on attn.qkv, attn.proj) of preset "
        "sd3_medium: "
        f"use another output.dir, or remove the checkpoints in {tmp_path}/run/checkpoints to start over"
    )


def test_resume_refuses_full_on_lora_checkpoints_and_another_rank(tmp_path):
    message = _full_then(tmp_path, {}, first={"lora": {"rank": 4}})
    assert "were written by LoRA rank 4 (alpha 4, on attn.qkv, attn.proj) of preset sd3_medium; " in message
    assert (
        "this config trains full training of preset sd3_medium from scratch: use another output.dir"
        in message
    )
    with pytest.raises(ConfigError, match="written by LoRA rank 4 .*; this config trains LoRA rank 8"):
        train(tiny_config(tmp_path / "cache", tmp_path / "run", lora={"rank": 8}))


def test_resume_refuses_another_model_shape(tmp_path):
    message = _full_then(tmp_path, {"model": {"overrides": {**TINY, "depth": 3}}})
    assert "written for a model with 76368 trainable parameters in" in message
    assert "the model changed (model.preset, model.overrides or model.pretrained)" in message
