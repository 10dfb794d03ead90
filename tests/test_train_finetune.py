"""Fine-tuning the shipped model as documented: the model's size and T5 length when the config leaves them
unset, a size the model cannot take refused before anything is encoded, ``shipped:`` names, the example
configs, and a final folder whose ``mmdit_flow.json`` samples as trained."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from mmdit_flow.training.cache import Conditioner
from mmdit_flow.training.config import ConfigError, config_from_dict, example_configs, load_config
from mmdit_flow.training.recipes.tiny_shapes.shapes import write_dataset
from mmdit_flow.training.resolve import resolve_config
from mmdit_flow.training.trainer import build_model, train

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "tiny-shapes"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("shapes") / "train", 4)


def _config(shapes: Path, out: Path, **sections):
    base = {
        "model": {"pretrained": "shipped:tiny-shapes", "attention_backend": "math"},
        "data": {"path": str(shapes), "batch_size": 2},
        "schedule": {"max_steps": 2},
        "output": {"dir": str(out), "trackers": [], "progress": False, "save_final": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return config_from_dict(base)


def test_unset_resolution_and_length_are_the_shipped_models(shapes, tmp_path):
    cfg = _config(shapes, tmp_path / "run")
    assert (cfg.data.resolution, cfg.model.max_sequence_length) == (None, None)
    model = build_model(cfg)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((tuple(args[0].shape), args[2].shape[1])))
    assert train(cfg, model=model) == 0
    # 64 px through the VAE (scale 4) -> 16 x 16 latents; txt = 32 CLIP (its tokenizer's length) + 32 T5
    assert seen == [((2, 16, 16, 16), 32 + 32)] * 2
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["resolution"] == 64 and saved["model"]["max_sequence_length"] == 32
    assert saved["model"]["pretrained"] == str(SHIPPED)  # the shipped name, resolved


def test_resolution_too_large_fails_before_encoding(shapes, tmp_path, monkeypatch):
    def no_encoders(*args, **kwargs):
        raise AssertionError("the encoders were loaded before the size check")

    monkeypatch.setattr(Conditioner, "from_pretrained", no_encoders)
    cfg = _config(shapes, tmp_path / "run", data={"resolution": 512})
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert "data.resolution is 512 px" in message
    assert "at most 128 px" in message and "made for 64 px" in message
    assert not (tmp_path / "run").exists()  # nothing written either


def test_largest_bucket_is_checked(shapes, tmp_path):
    # 128 px is allowed, but its buckets reach 96 x 192
    cfg = _config(shapes, tmp_path / "run", data={"resolution": 128, "buckets": True, "bucket_step": 32})
    with pytest.raises(ConfigError, match="data.buckets gives buckets up to 192 px a side.*at most 128 px"):
        train(cfg)


def test_side_must_be_a_multiple_of_patch_times_vae_scale(shapes, tmp_path):
    cfg = _config(shapes, tmp_path / "run", data={"resolution": 36, "bucket_step": 4})
    with pytest.raises(ConfigError, match="multiples of 8 px"):
        train(cfg)


def _folder_without_defaults(tmp_path: Path, model_max_length: int) -> Path:
    """The shipped folder without mmdit_flow.json, its T5 tokenizer set to ``model_max_length``."""
    folder = tmp_path / "model"
    folder.mkdir()
    for child in SHIPPED.iterdir():
        if child.name not in ("mmdit_flow.json", "tokenizer_3"):
            os.symlink(child, folder / child.name)
    (folder / "tokenizer_3").mkdir()
    for f in (SHIPPED / "tokenizer_3").iterdir():
        os.symlink(f, folder / "tokenizer_3" / f.name)
    tok = json.loads((SHIPPED / "tokenizer_3" / "tokenizer_config.json").read_text())
    (folder / "tokenizer_3" / "tokenizer_config.json").unlink()
    (folder / "tokenizer_3" / "tokenizer_config.json").write_text(
        json.dumps(tok | {"model_max_length": model_max_length})
    )
    return folder


@pytest.mark.parametrize(("model_max_length", "expected"), [(100, 100), (1000, 256)])
def test_without_mmdit_flow_json_native_size_and_t5_default(tmp_path, shapes, model_max_length, expected):
    folder = _folder_without_defaults(tmp_path, model_max_length)
    cfg = config_from_dict({"model": {"pretrained": str(folder)}, "data": {"path": str(shapes)}})
    resolved, size = resolve_config(cfg)
    # sample_size 16 x VAE scale 4; SD3's 256 T5 tokens, at most the tokenizer's model_max_length
    assert (resolved.data.resolution, resolved.model.max_sequence_length) == (64, expected)
    assert (size.native, size.largest, size.multiple) == (64, 128, 8)


def test_values_the_config_sets_are_kept(shapes):
    cfg = _config(shapes, Path("unused"), data={"resolution": 128}, model={"max_sequence_length": 16})
    resolved, _ = resolve_config(cfg)
    assert (resolved.data.resolution, resolved.model.max_sequence_length) == (128, 16)


def test_shipped_names_unknown_are_listed():
    with pytest.raises(ValueError, match="'shipped:nope' names no shipped model; .*shipped:tiny-shapes"):
        config_from_dict({"model": {"pretrained": "shipped:nope"}, "data": {"path": "x"}})
    with pytest.raises(ValueError, match="shipped:finetune_tiny_shapes, shipped:lora_tiny_shapes"):
        load_config("shipped:nope")


@pytest.mark.parametrize("name", ["finetune_tiny_shapes", "lora_tiny_shapes"])
def test_example_config_trains_and_exports(name, shapes, tmp_path):
    assert set(example_configs()) == {"finetune_tiny_shapes", "lora_tiny_shapes"}
    out = tmp_path / "run"
    overrides = [f"data.path={shapes}", f"output.dir={out}", "schedule.max_steps=2", "data.batch_size=2"]
    cfg = load_config(f"shipped:{name}", overrides + ["output.progress=false"])
    assert train(cfg) == 0
    defaults = json.loads((out / "final" / "mmdit_flow.json").read_text())
    assert defaults["defaults"] | {"trained_sizes": defaults["trained_sizes"]} == {
        "steps": 28, "guidance": 4.0, "height": 64, "width": 64, "max_sequence_length": 32,
        "trained_sizes": [64, 64],
    }  # fmt: skip
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() == name.startswith("lora")


def test_export_records_the_training_size_and_length(shapes, tmp_path):
    from mmdit_flow.pipelines.defaults import read_defaults

    out = tmp_path / "run"
    cfg = _config(shapes, out, data={"resolution": 128}, model={"max_sequence_length": 16},
                  output={"save_final": True})  # fmt: skip
    assert train(cfg) == 0
    d = read_defaults(out / "final")
    assert (d.height, d.width, d.max_sequence_length, d.trained_sizes) == (128, 128, 16, (64, 128))
    assert d.vocabulary == read_defaults(SHIPPED).vocabulary  # the frozen text encoders' words


def test_cache_command_uses_the_models_size_and_length(shapes, tmp_path):
    import argparse

    from mmdit_flow.training import cache

    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{pretrained: 'shipped:tiny-shapes'}}\ndata: {{path: '{shapes}'}}\n")
    args = argparse.Namespace(config=str(path), overrides=[f"data.cache_dir={tmp_path / 'cache'}"],
                              batch_size=4, shard_size=256, device="cpu", overwrite=False)  # fmt: skip
    assert cache.run(args) == 0
    fingerprint = json.loads((tmp_path / "cache" / "index.json").read_text())["fingerprint"]
    assert (fingerprint["resolution"], fingerprint["max_sequence_length"]) == (64, 32)
    cfg = config_from_dict({"model": {"pretrained": "shipped:tiny-shapes"},
                            "data": {"cache_dir": str(tmp_path / "cache")}})  # fmt: skip
    resolved, _ = resolve_config(cfg)
    assert (resolved.data.resolution, resolved.model.max_sequence_length) == (64, 32)
