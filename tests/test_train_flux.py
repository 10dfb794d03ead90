"""Training Flux transformers: presets and Flux keys in the config, the guidance input, the
resolution-dependent shift, one step's loss against diffusers' ``train_dreambooth_flux.py`` /
``train_dreambooth_lora_flux.py``, exact resume, accumulation, and the exported folder in diffusers'
``FluxPipeline``."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mmdit_flow.training.config import ConfigError, config_from_dict
from mmdit_flow.training.resolve import FLUX_LORA_TARGETS
from mmdit_flow.training.trainer import (
    DEFAULT_GUIDANCE,
    flux_shift,
    sample_guidance,
    train,
)
from tests.components import flux_components, save_diffusers_folder
from tests.train_helpers import captioned_noise_folder

# our FluxConfig fields; latents [4, H, W] (16 channels after 2x2 packing), t5 [5, 16], pooled CLIP-L [8]
FLUX_TINY = {
    "in_channels": 4,
    "out_channels": 4,
    "hidden_size": 32,
    "num_heads": 2,
    "depth": 1,
    "depth_single": 1,
    "context_dim": 16,
    "vec_dim": 8,
    "axes_dim": [4, 6, 6],
}
SHAPES = ((8, 8), (8, 12))  # latent sides of the two buckets: 16 and 24 image tokens


def tiny_flux(seed: int = 0, guidance_embed: bool = True):
    """The tiny Flux transformer with every weight random (the zero init would hide most gradients)."""
    from mmdit_flow.models.flux import FluxConfig, FluxTransformer

    model = FluxTransformer(FluxConfig(**FLUX_TINY, guidance_embed=guidance_embed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _text(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"clip_l.pooled": torch.randn(8, generator=g), "t5.hidden": torch.randn(5, 16, generator=g)}


def make_flux_cache(folder: Path, n: int = 12, seed: int = 0, shapes=SHAPES) -> Path:
    """A Flux-layout cache as ``mmdit-flow cache`` writes it; the records alternate between ``shapes``."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file(_text(g), str(folder / "empty.safetensors"))
    tensors, records = {}, []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        tensors[f"{i}.latents"] = torch.randn(4, h, w, generator=g)
        tensors.update({f"{i}.{k}": v for k, v in _text(g).items()})
        records.append(
            {"shard": "shard-00000.safetensors", "key": str(i), "size": [w * 8, h * 8], "caption": f"c{i}"}
        )
    save_file(tensors, str(folder / "shard-00000.safetensors"))
    index = {"fingerprint": {}, "layout": "flux", "encoders": ["clip_l", "t5"],
             "shards": ["shard-00000.safetensors"], "records": records, "bad_files": {}}  # fmt: skip
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def flux_config(cache: Path, out: Path, **sections):
    base = {
        "model": {"preset": "flux_dev", "overrides": dict(FLUX_TINY)},
        "data": {"cache_dir": str(cache), "batch_size": 2},
        "objective": {
            "caption_dropout": {"t5": 0.3, "clip_l": 0.2, "joint": 0.1},
            "weighting": "cosmap",
            "guidance": [1.0, 5.0],
            "dynamic_shift": True,
            "base_seq_len": 16,
            "max_seq_len": 64,
        },
        "optimizer": {"lr": 1e-3, "grad_clip": 1.0},
        "schedule": {"max_steps": 4, "warmup_steps": 2, "lr_schedule": "cosine"},
        "ema": {"decay": 0.9},
        "output": {"dir": str(out), "checkpoint_every": 2, "trackers": [], "progress": False,
                   "save_final": False},
    }  # fmt: skip
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values} if isinstance(values, dict) else values
    return config_from_dict(base)


# ------------------------------------------------------------------------------------------------ config


def test_flux_presets_and_overrides(tmp_path):
    from mmdit_flow.models.flux import FLUX_DEV, FLUX_SCHNELL
    from mmdit_flow.training.resolve import resolve_config, transformer_config
    from mmdit_flow.training.trainer import build_model

    cache = make_flux_cache(tmp_path / "cache")
    assert transformer_config(flux_config(cache, tmp_path, model={"overrides": {}})) == FLUX_DEV
    schnell = flux_config(cache, tmp_path, model={"preset": "flux_schnell", "overrides": {}})
    assert transformer_config(schnell) == FLUX_SCHNELL and not FLUX_SCHNELL.guidance_embed
    tiny = build_model(flux_config(cache, tmp_path))
    assert type(tiny).__name__ == "FluxTransformer" and tiny.config.hidden_size == 32
    assert tiny.config.axes_dim == (4, 6, 6) and tiny.config.guidance_embed
    resolved, size = resolve_config(flux_config(cache, tmp_path, lora={"rank": 2}))
    assert resolved.lora.target_modules == list(FLUX_LORA_TARGETS)  # the default, in Flux's names
    assert size.multiple == 16 and size.largest is None  # 2x2 packing x VAE scale 8; RoPE has no table
    with pytest.raises(ValueError, match="unknown FluxConfig fields \\['patch_size'\\]"):
        transformer_config(flux_config(cache, tmp_path, model={"overrides": {"patch_size": 2}}))
    with pytest.raises(ValueError, match="model.preset: unknown preset 'flux'.*flux_dev, flux_schnell"):
        transformer_config(flux_config(cache, tmp_path, model={"preset": "flux"}))


@pytest.mark.parametrize(
    "objective, message",
    [
        ({"guidance": [1.0, 2.0, 3.0]}, "objective.guidance must be one number"),
        ({"guidance": [5.0, 1.0]}, "needs low <= high"),
        ({"guidance": -1.0}, "objective.guidance\\[0\\] must be a finite number >= 0"),
        ({"shift": 3.0}, "objective.dynamic_shift replaces objective.shift"),
        ({"max_seq_len": 16}, "objective.max_seq_len must be a finite number > 16"),
    ],
)
def test_flux_objective_keys_are_checked(tmp_path, objective, message):
    with pytest.raises(ValueError, match=message):
        flux_config(tmp_path, tmp_path, objective=objective)


def test_flux_keys_on_a_model_that_does_not_take_them(tmp_path):
    from tests.train_helpers import make_cache, tiny_config, tiny_model

    cache = make_flux_cache(tmp_path / "cache")
    with pytest.raises(ConfigError, match="objective.guidance .* without guidance embedding"):
        train(flux_config(cache, tmp_path / "a"), model=tiny_flux(guidance_embed=False))
    sd3_cache = make_cache(tmp_path / "sd3")
    for key, value in [("guidance", [3.5]), ("dynamic_shift", True)]:
        cfg = tiny_config(sd3_cache, tmp_path / key, objective={"shift": 1.0, key: value})
        with pytest.raises(ConfigError, match=f"objective.{key} .* SD3 model"):
            train(cfg, model=tiny_model())


# ------------------------------------------------------------------------------------- guidance and shift


def test_guidance_input_constant_or_drawn_per_sample(tmp_path):
    from mmdit_flow.training.data import sample_seed

    seeds = torch.tensor([3, 11, 12, 2**62])
    default = flux_config(tmp_path, tmp_path, objective={"guidance": None}).objective
    assert DEFAULT_GUIDANCE == 3.5  # train_dreambooth_flux.py --guidance_scale default
    assert torch.equal(sample_guidance(seeds, default), torch.full((4,), 3.5))
    one = flux_config(tmp_path, tmp_path, objective={"guidance": 2.0}).objective
    assert torch.equal(sample_guidance(seeds, one), torch.full((4,), 2.0))
    ranged = flux_config(tmp_path, tmp_path).objective  # [1, 5]
    got = sample_guidance(seeds, ranged)
    want = [1 + 4 * torch.rand(1, generator=torch.Generator().manual_seed(sample_seed(s, "guidance"))).item()
            for s in seeds.tolist()]  # fmt: skip
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-6)
    assert got.min() >= 1 and got.max() <= 5 and len(set(got.tolist())) == 4
    assert torch.equal(sample_guidance(seeds[1:2], ranged), got[1:2])  # a sample's value is its own


@pytest.mark.parametrize("tokens", [16, 24, 256, 4096])
def test_dynamic_shift_is_diffusers_calculate_shift(tmp_path, tokens):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    o = flux_config(tmp_path, tmp_path, objective={"base_seq_len": 256, "max_seq_len": 4096}).objective
    t = torch.linspace(0.01, 0.99, 7, dtype=torch.float64)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    want = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).time_shift(mu, 1.0, t)
    torch.testing.assert_close(flux_shift(t, tokens, o), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------ parity with diffusers' scripts


def _their_loss(transformer, scheduler, x0, noise, prompt, pooled, u, weighting, guidance_scale=3.5):
    """One step's loss as train_dreambooth_flux.py computes it (from reading the script, not copied)."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    B, C, H, W = x0.shape
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]  # their get_sigmas
    sigmas = scheduler.sigmas[step].flatten().view(B, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, B, C, H, W)
    img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x0.device, x0.dtype)
    txt_ids = torch.zeros(prompt.shape[1], 3)
    guidance = torch.tensor([guidance_scale]).expand(B) if transformer.config.guidance_embeds else None
    pred = transformer(
        hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled,
        encoder_hidden_states=prompt, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
    )[0]  # fmt: skip
    vae_scale = 8  # their vae_scale_factor; _unpack_latents only needs H * it / (2 * it) = H / 2
    pred = FluxPipeline._unpack_latents(pred, H * vae_scale, W * vae_scale, vae_scale)
    w = compute_loss_weighting_for_sd3(weighting_scheme=weighting, sigmas=sigmas)
    target = noise - x0
    loss = torch.mean((w.float() * (pred.float() - target.float()) ** 2).reshape(B, -1), 1).mean()
    return loss, sigmas.flatten()


def _ctx(model, config, tmp_path):
    from accelerate import Accelerator

    from mmdit_flow.training.trainer import Context, TrainState

    empty = {"clip_l": {"pooled": torch.zeros(1, 16)}, "t5": {"hidden": torch.zeros(1, 7, 32)}}
    return Context(Accelerator(cpu=True), model, None, None, config, TrainState(), "flux", ("clip_l", "t5"),
                   empty)  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "guidance_embeds, weighting, lora",
    [(True, "logit_normal", 0), (True, "cosmap", 0), (False, "logit_normal", 0), (True, "logit_normal", 4)],
)
def test_one_step_loss_equals_diffusers_dreambooth_flux(tmp_path, monkeypatch, shape, guidance_embeds,
                                                        weighting, lora):  # fmt: skip
    """Their transformer, packing, ids, guidance (3.5), t from the scheduler's timesteps, weighting and
    target against our trainer's ``micro_loss`` (our transformer loaded from their folder) for the same
    batch, noise and t. ``lora``: adapters at their start (B = 0) on both sides, as the LoRA script begins."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from mmdit_flow.training import trainer
    from mmdit_flow.weights import load_transformer

    parts = flux_components(guidance_embeds=guidance_embeds)
    theirs, scheduler = parts["transformer"].float().eval(), parts["scheduler"]
    theirs.save_pretrained(tmp_path / "transformer")
    ours = load_transformer(tmp_path / "transformer", device="cpu", dtype=torch.float32)
    ours_weighting = {"logit_normal": "none", "cosmap": "cosmap"}[weighting]
    lora_cfg = {"rank": lora, "alpha": 2.0 * lora, "target_modules": list(FLUX_LORA_TARGETS)} if lora else {}
    cfg = config_from_dict({
        "model": {"pretrained": str(tmp_path / "transformer")},
        "lora": lora_cfg or {"rank": 0},
        "data": {"cache_dir": str(tmp_path)},
        "objective": {"weighting": ours_weighting},
    })  # fmt: skip
    if lora:
        from peft import LoraConfig

        from mmdit_flow.training.lora import add_lora

        ours = add_lora(ours, cfg.lora)
        targets = [
            "attn.to_k",
            "attn.to_q",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_k_proj",
            "attn.add_q_proj",
            "attn.add_v_proj",
            "attn.to_add_out",
        ]  # the script's default, less its ff layers
        theirs.add_adapter(LoraConfig(r=lora, lora_alpha=2 * lora, init_lora_weights="gaussian",
                                      target_modules=targets))  # fmt: skip
    g = torch.Generator().manual_seed(7)
    B, (H, W) = 3, shape
    x0, noise = torch.randn(B, 4, H, W, generator=g), torch.randn(B, 4, H, W, generator=g)
    prompt, pooled = torch.randn(B, 7, 32, generator=g), torch.randn(B, 16, generator=g)
    torch.manual_seed(0)
    u = compute_density_for_timestep_sampling(weighting, B, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    with torch.no_grad():
        want, sigmas = _their_loss(theirs, scheduler, x0, noise, prompt, pooled, u, weighting)
    no_drop = {n: torch.zeros(B, dtype=torch.bool) for n in ("clip_l", "t5")}
    monkeypatch.setattr(trainer, "sample_draws", lambda *a, **k: (sigmas.float(), noise, no_drop))
    batch = {"latents": x0, "text": {"clip_l": {"pooled": pooled}, "t5": {"hidden": prompt}},
             "seed": torch.arange(B)}  # fmt: skip
    with torch.no_grad():
        got = trainer.micro_loss(_ctx(ours, cfg, tmp_path), batch)
    assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item())), (got.item(), want.item())
    # their t is 1 - floor(1000 u) / 1000: the scheduler's training grid read from the top (t = 1 is noise)
    torch.testing.assert_close(sigmas, 1 - torch.floor(1000 * u) / 1000, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ guarantees of the loop


def _run(config, stop_at=None, model_seed=0):
    model, losses = tiny_flux(model_seed), []

    def on_step(step, result):
        losses.append(result.loss)
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    code = train(config, model=model, on_step=on_step)
    return code, model, losses


def test_flux_resume_is_exact(tmp_path):
    cache = make_flux_cache(tmp_path / "cache")
    code, whole, losses = _run(flux_config(cache, tmp_path / "a"))
    assert code == 0 and len(losses) == 4 and all(np.isfinite(losses))
    cfg = flux_config(cache, tmp_path / "b", output={"checkpoint_every": 100})
    code, _, first = _run(cfg, stop_at=2)
    assert code == 128 + signal.SIGTERM and len(first) == 2
    code, resumed, second = _run(cfg, model_seed=1)  # other initial weights: all from the checkpoint
    assert code == 0 and first + second == losses
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_flux_gradient_accumulation_equals_the_combined_batch(tmp_path):
    cache = make_flux_cache(tmp_path / "cache")
    sgd_like = {"lr": 1.0, "eps": 1000.0, "weight_decay": 0.0}  # see test_train_loop's twin
    common = {"schedule": {"max_steps": 3}, "ema": {"decay": 0.0}}
    _, big, big_losses = _run(
        flux_config(cache, tmp_path / "big", data={"batch_size": 4}, optimizer=sgd_like, **common)
    )
    acc = flux_config(
        cache, tmp_path / "acc", data={"batch_size": 1}, optimizer={**sgd_like, "grad_accum": 4}, **common
    )
    _, small, small_losses = _run(acc)
    torch.testing.assert_close(torch.tensor(small_losses), torch.tensor(big_losses), rtol=1e-5, atol=0)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(big.state_dict()["final_layer.linear.weight"],
                           tiny_flux(0).state_dict()["final_layer.linear.weight"])  # fmt: skip


# ------------------------------------------------------------------------------------------ the export


def _images(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from diffusers import FluxPipeline

    from mmdit_flow.pipelines import TextToImagePipeline

    ref = FluxPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ours = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    kw = {"height": 16, "width": 16, "max_sequence_length": 16}
    a = ref("a red square", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
            guidance_scale=3.5, output_type="np", **kw).images  # fmt: skip
    b = ours("a red square", steps=3, guidance=3.5, seed=0, output="np", progress=False, **kw)
    return np.asarray(a), np.asarray(b)


@pytest.mark.parametrize("lora", [0, 4])
def test_fine_tuned_flux_folder_loads_in_diffusers_with_our_images(tmp_path, lora):
    from PIL import Image

    base = save_diffusers_folder(flux_components(), tmp_path / "base")
    images = captioned_noise_folder(tmp_path / "images")
    targets = ["img_attn.qkv", "txt_attn.proj", "linear1"]
    cfg = config_from_dict({
        "model": {"pretrained": str(base), "max_sequence_length": 16},
        "lora": {"rank": lora, "target_modules": targets} if lora else {},
        "data": {"path": str(images), "resolution": 16, "bucket_step": 16, "batch_size": 2},
        "objective": {"caption_dropout": {"t5": 0.2}, "guidance": [1.0, 5.0], "dynamic_shift": True},
        "optimizer": {"lr": 1e-2},
        "schedule": {"max_steps": 2},
        "output": {"dir": str(tmp_path / "run"), "trackers": [], "progress": False, "checkpoint_every": 100,
                   "validation_every": 2, "validation_prompts": ["a red square"], "validation_steps": 3,
                   "validation_guidance": 3.5},
    })  # fmt: skip
    assert train(cfg) == 0
    final = tmp_path / "run" / "final"
    a, b = _images(final)
    assert np.abs(a - b).max() <= 1e-3
    # the validation grid of the last step is the final model's image (same prompt, seed, steps, guidance)
    grid = np.asarray(Image.open(tmp_path / "run" / "validation" / "step-00000002.png"), dtype=np.float64)
    assert np.abs(grid / 255 - b[0]).max() <= 1 / 255 + 1e-3
    before, _ = _images(base)
    assert np.abs(a - before).max() > 1e-3  # the training changed the images


def test_flux_cached_equals_uncached_with_buckets(tmp_path):
    """A Flux folder fine-tuned from images of two aspect ratios (buckets 16x16 and 16x32 px, latents 8x8
    and 8x16 with their own ids and shift) gives the same losses from its cache."""
    from PIL import Image

    from mmdit_flow.training.cache import Conditioner, build_cache

    base = save_diffusers_folder(flux_components(), tmp_path / "base")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        shape = (16, 32, 3) if i % 2 else (16, 16, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(["a red cat", "a blue dog"][i % 2])

    def config(name, **data):
        return config_from_dict({
            "model": {"pretrained": str(base), "max_sequence_length": 8},
            "data": {"path": str(images), "resolution": 16, "bucket_step": 16, "buckets": True,
                     "batch_size": 2, **data},
            "objective": {"caption_dropout": {"clip_l": 0.3, "t5": 0.3}, "guidance": [1.0, 5.0],
                          "dynamic_shift": True, "base_seq_len": 16, "max_seq_len": 64},
            "schedule": {"max_steps": 4},
            "output": {"dir": str(tmp_path / name), "trackers": [], "progress": False, "save_final": False},
        })  # fmt: skip

    def losses(cfg):
        out = []
        assert train(cfg, on_step=lambda step, r: out.append(r.loss)) == 0
        return out

    uncached = losses(config("uncached"))
    cached_cfg = config("cached", cache_dir=str(tmp_path / "cache"))
    conditioner = Conditioner.from_pretrained(base, max_sequence_length=8)
    build_cache(cached_cfg, conditioner, progress=False)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["layout"] == "flux" and index["encoders"] == ["clip_l", "t5"]
    assert {tuple(r["size"]) for r in index["records"]} == {(16, 16), (16, 32)}
    cached = losses(cached_cfg)
    assert all(np.isfinite(uncached)) and len(set(uncached)) == 4
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(uncached), rtol=1e-5, atol=0)


TWO_PROCESSES = """
import os, sys
from safetensors.torch import save_file
from mmdit_flow.training.config import load_config
from mmdit_flow.training.trainer import train
from tests.test_train_flux import tiny_flux

config = load_config(sys.argv[1])
model = tiny_flux(0)
code = train(config, model=model)
weights = {k: v.contiguous() for k, v in model.state_dict().items()}
save_file(weights, f"{config.output.dir}/rank{os.environ['RANK']}.st")
sys.exit(code)
"""


def test_flux_two_processes_match_one(tmp_path):
    """Two CPU processes (gloo DDP, as tests/test_train_distributed.py) equal one with the combined batch."""
    import sys

    from safetensors.torch import load_file

    from mmdit_flow.training.config import save_config
    from tests.train_helpers import free_port, run_launcher

    root = Path(__file__).resolve().parents[1]
    cache = make_flux_cache(tmp_path / "cache", n=16)
    common = {"schedule": {"max_steps": 3}, "optimizer": {"lr": 10.0, "eps": 1000.0, "weight_decay": 0.0},
              "ema": {"decay": 0.0}}  # fmt: skip
    two = flux_config(cache, tmp_path / "two", data={"batch_size": 2}, **common)
    (tmp_path / "two").mkdir()
    save_config(two, tmp_path / "two.yaml")
    (tmp_path / "run.py").write_text(TWO_PROCESSES)
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(tmp_path / "run.py"), str(tmp_path / "two.yaml")]  # fmt: skip
    proc = run_launcher(cmd, 300, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / "two" / f"rank{r}.st")) for r in range(2)]
    model = tiny_flux(0)
    assert train(flux_config(cache, tmp_path / "one", data={"batch_size": 4}, **common), model=model) == 0
    moved = False
    for name, value in model.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=name)
        moved |= bool((value - tiny_flux(0).state_dict()[name]).abs().max() > 1e-3)
    assert moved


def test_the_documented_flux_config_loads():
    import re

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(model:\n  pretrained: path/to/FLUX.1-dev.*?)```", text, re.S).group(1)
    cfg = config_from_dict(yaml.safe_load(block))
    assert cfg.objective.guidance == [1.0, 5.0] and cfg.objective.dynamic_shift and cfg.lora.rank == 16
