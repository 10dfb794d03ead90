"""Fine-tuning a tiny diffusers SD3 folder from images end to end: uncached == cached losses, validation
grid, tensorboard logs, and a final folder that diffusers and our pipeline both load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmdit_flow.training.cache import Conditioner, build_cache
from mmdit_flow.training.config import config_from_dict
from mmdit_flow.training.trainer import train
from tests.components import save_diffusers_folder, sd3_components


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    base = save_diffusers_folder(sd3_components(), tmp / "base")
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        arr = rng.integers(0, 255, (24, 20 + 4 * (i % 3), 3), dtype=np.uint8)
        Image.fromarray(arr).save(images / f"{i}.png")
        rows.append(
            {"file_name": f"{i}.png", "text": ["a red cat", "a blue dog", "a photo of the cat"][i % 3]}
        )
    (images / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp, base, images


def _config(tmp, base, images, name, **extra):
    cfg = {
        "model": {"pretrained": str(base), "max_sequence_length": 8},
        "data": {"path": str(images), "resolution": 16, "bucket_step": 16, "batch_size": 2},
        "objective": {"shift": 3.0, "caption_dropout": {"all": 0.3}},
        "optimizer": {"lr": 1e-3},
        "schedule": {"max_steps": 2},
        "output": {"dir": str(tmp / name), "trackers": [], "progress": False, "save_final": False},
    }
    for section, values in extra.items():
        cfg[section] = {**cfg[section], **values}
    return config_from_dict(cfg)


def _losses(config):
    losses = []
    assert train(config, on_step=lambda step, r: losses.append(r.loss)) == 0
    return losses


def test_finetune_cached_equals_uncached_and_exports(setup):
    tmp, base, images = setup
    out = {"trackers": ["tensorboard"], "save_final": True, "validation_every": 2}
    out |= {"validation_prompts": ["a red cat", "a dog"], "validation_seeds": [0, 1], "validation_steps": 2}
    uncached = _losses(_config(tmp, base, images, "uncached", output=out))
    run = tmp / "uncached"
    grid = Image.open(run / "validation" / "step-00000002.png")
    assert grid.size == (2 * 16, 2 * 16)  # seeds across, prompts down
    assert any((run / "logs").rglob("events.out.tfevents.*"))

    cached_cfg = _config(tmp, base, images, "cached", data={"cache_dir": str(tmp / "cache")})
    conditioner = Conditioner.from_pretrained(base, max_sequence_length=8)
    build_cache(cached_cfg, conditioner, batch_size=3, shard_size=5, progress=False)
    shards = sorted(p.name for p in (tmp / "cache").glob("shard-*"))
    assert shards == ["shard-00000.safetensors", "shard-00001.safetensors"]
    build_cache(cached_cfg, conditioner, progress=False)  # reused, not rebuilt
    cached = _losses(cached_cfg)
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(uncached), rtol=1e-5, atol=0)

    # the final folder loads in diffusers and in our pipeline, with the same trained transformer
    from diffusers import StableDiffusion3Pipeline

    from mmdit_flow.pipelines import TextToImagePipeline

    theirs = StableDiffusion3Pipeline.from_pretrained(run / "final").transformer.eval()
    ours = TextToImagePipeline.from_pretrained(run / "final", device="cpu", dtype=torch.float32).transformer
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 85, 48, generator=g)
    vec = torch.randn(1, 24, generator=g)
    t = torch.tensor([0.5])
    with torch.no_grad():
        a = theirs(
            hidden_states=x, encoder_hidden_states=txt, pooled_projections=vec, timestep=1000 * t
        ).sample
        b = ours(x, t, txt, vec)
        start = TextToImagePipeline.from_pretrained(base, device="cpu", dtype=torch.float32).transformer
        original = start(x, t, txt, vec)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (b - original).abs().max() > 1e-4  # the export holds the fine-tuned weights


def test_cache_fingerprint_follows_the_component_files(tmp_path):
    """A cache is rebuilt when a tokenizer or encoder changes in place, not when the transformer does."""
    from mmdit_flow.training.cache import fingerprint
    from mmdit_flow.training.config import config_from_dict

    folder = tmp_path / "pipe"
    for name, text in {"tokenizer/tokenizer_config.json": '{"model_max_length": 77}',
                       "vae/diffusion_pytorch_model.safetensors": "x" * 100,
                       "transformer/diffusion_pytorch_model.safetensors": "y" * 100}.items():  # fmt: skip
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    cfg = config_from_dict({"model": {"preset": "tiny"}, "data": {"path": "imgs"}})
    before = fingerprint(cfg, [], str(folder))
    (folder / "transformer/diffusion_pytorch_model.safetensors").write_text("z" * 200)
    assert fingerprint(cfg, [], str(folder)) == before
    (folder / "tokenizer/tokenizer_config.json").write_text('{"model_max_length": 32}')
    changed = fingerprint(cfg, [], str(folder))
    assert changed != before
    (folder / "vae/diffusion_pytorch_model.safetensors").write_text("x" * 101)
    assert fingerprint(cfg, [], str(folder)) != changed
