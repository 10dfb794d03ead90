"""A pipeline folder is read, never obeyed: no code from it runs, each component slot takes only its own
classes, every component loads strictly, and every bad file or config value is named before a library
reads it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from components import flux_components, save_diffusers_folder, sd3_components
from safetensors.torch import load_file, save_file

from mmdit_flow.weights.io import CheckpointError

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 123456789\n"
OK = {"steps": 1, "height": 16, "width": 16, "progress": False, "max_sequence_length": 8, "output": "np"}


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return save_diffusers_folder(sd3_components(), tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return save_diffusers_folder(flux_components(), tmp_path_factory.mktemp("flux"))


@pytest.fixture
def sd3(sd3_folder, tmp_path):
    """A fresh copy of the tiny SD3 folder, to break."""
    return Path(shutil.copytree(sd3_folder, tmp_path / "sd3"))


@pytest.fixture
def shipped(tmp_path):
    """A copy of the shipped demo model (a real SD3 layout: vocab.json, merges.txt, spiece.model ...)."""
    from mmdit_flow.pipelines.loading import demo_folder

    return Path(shutil.copytree(demo_folder(), tmp_path / "shipped"))


def load(folder: Path):
    from mmdit_flow.pipelines import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, drop: str | None = None, add: str | None = None) -> None:
    sd = load_file(path)
    if drop:
        del sd[drop]
    if add:
        sd[add] = torch.zeros(3)
    save_file(sd, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------- code execution


def tiny_bert(folder: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=600, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    shutil.rmtree(folder)
    BertModel(config).save_pretrained(folder)


def test_foreign_class_in_a_slot_is_refused(sd3):
    tiny_bert(sd3 / "text_encoder")
    edit_json(sd3 / "model_index.json", text_encoder=["transformers", "BertModel"])
    with pytest.raises(
        ValueError,
        match=r"text_encoder is a transformers.BertModel, but the text_encoder of a StableDiffusion3Pipeline "
        r"can only be transformers.CLIPTextModelWithProjection",
    ):
        load(sd3)
    # the same folder declared as a CLIP: its config.json gives it away
    edit_json(sd3 / "model_index.json", text_encoder=["transformers", "CLIPTextModelWithProjection"])
    with pytest.raises(ValueError, match=r"text_encoder/config.json: model_type is 'bert'"):
        load(sd3)


def test_custom_code_never_runs(sd3, tmp_path):
    marker = tmp_path / "code-ran"
    evil = f"open({str(marker)!r}, 'w').write('ran')\n"
    for where in (sd3, sd3 / "text_encoder"):
        (where / "evil.py").write_text(evil)
    edit_json(sd3 / "text_encoder" / "config.json", auto_map={"AutoModel": "evil.EvilModel"})
    edit_json(sd3 / "model_index.json", text_encoder=["transformers", "AutoModel"])
    with pytest.raises(ValueError, match=r"text_encoder is a transformers.AutoModel"):
        load(sd3)
    edit_json(sd3 / "model_index.json", text_encoder=["evil", "EvilModel"])
    with pytest.raises(ValueError, match=r"text_encoder is a evil.EvilModel"):
        load(sd3)
    # the right class name does not make a config's custom code acceptable
    edit_json(sd3 / "model_index.json", text_encoder=["transformers", "CLIPTextModelWithProjection"])
    with pytest.raises(ValueError, match=r"text_encoder/config.json sets auto_map"):
        load(sd3)
    assert not marker.exists()


def test_custom_tokenizer_code_is_refused(sd3):
    edit_json(sd3 / "tokenizer_3" / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.Tok", None]})
    with pytest.raises(ValueError, match=r"tokenizer_3/tokenizer_config.json sets auto_map"):
        load(sd3)


@pytest.mark.parametrize(
    "name, entry, match",
    [
        (
            "vae",
            ["diffusers", "AutoencoderTiny"],
            r"vae is a diffusers.AutoencoderTiny.*diffusers.AutoencoderKL",
        ),
        ("scheduler", ["diffusers", "DDIMScheduler"], r"scheduler is a diffusers.DDIMScheduler"),
        ("tokenizer", ["transformers", "T5TokenizerFast"], r"tokenizer is a transformers.T5TokenizerFast.*"),
        ("text_encoder_3", ["transformers", "UMT5EncoderModel"], r"transformers.T5EncoderModel"),
        ("tokenizer_3", ["transformers", "AutoTokenizer"], r"tokenizer_3 is a transformers.AutoTokenizer"),
        (
            "text_encoder",
            "CLIPTextModel",
            r"text_encoder is 'CLIPTextModel', expected \[library, class name\]",
        ),
    ],
)
def test_each_slot_takes_only_its_classes(sd3, name, entry, match):
    edit_json(sd3 / "model_index.json", **{name: entry})
    with pytest.raises(ValueError, match=match):
        load(sd3)


def test_flux_pipeline_on_an_sd3_folder(sd3):
    edit_json(sd3 / "model_index.json", _class_name="FluxPipeline")
    with pytest.raises(
        ValueError,
        match=r"transformer is a diffusers.SD3Transformer2DModel, but the transformer "
        r"of a FluxPipeline can only be diffusers.FluxTransformer2DModel",
    ):
        load(sd3)
    # model_index edited to match, the component configs still tell
    edit_json(sd3 / "model_index.json", _class_name="StableDiffusion3Pipeline")
    edit_json(sd3 / "model_index.json", transformer=["diffusers", "SD3Transformer2DModel"])
    edit_json(sd3 / "transformer" / "config.json", _class_name="FluxTransformer2DModel")
    with pytest.raises(ValueError, match=r"transformer/config.json: _class_name is 'FluxTransformer2DModel'"):
        load(sd3)
    edit_json(sd3 / "model_index.json", _class_name=["my_module", "MyPipeline"])
    with pytest.raises(ValueError, match=r"describes a \['my_module', 'MyPipeline'\]; supported pipelines"):
        load(sd3)


# -------------------------------------------------------------------------------------------- strictness


@pytest.mark.parametrize(
    "component, file, drop",
    [
        ("text_encoder", "model.safetensors", "text_model.encoder.layers.0.layer_norm1.weight"),
        (
            "text_encoder_3",
            "model.safetensors",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        ),
        ("vae", "diffusion_pytorch_model.safetensors", "decoder.conv_norm_out.weight"),
    ],
)
def test_missing_and_unexpected_keys_raise(sd3, component, file, drop):
    edit_tensors(sd3 / component / file, drop=drop)
    with pytest.raises(CheckpointError, match=rf"{component} does not match .*\n  1 missing keys: {drop}\n"):
        load(sd3)
    edit_tensors(sd3 / component / file, add=drop)  # back, but wrongly shaped
    with pytest.raises(CheckpointError, match=rf"1 shape mismatches: {drop}: checkpoint \[3\] vs model"):
        load(sd3)


def test_unexpected_key_raises(sd3, flux_folder, tmp_path):
    edit_tensors(sd3 / "text_encoder_2" / "model.safetensors", add="extra.weight")
    with pytest.raises(
        CheckpointError, match=r"text_encoder_2 does not match .*\n  1 unexpected keys: extra.weight"
    ):
        load(sd3)
    flux = Path(shutil.copytree(flux_folder, tmp_path / "flux"))
    edit_tensors(flux / "vae" / "diffusion_pytorch_model.safetensors", add="encoder.extra")
    with pytest.raises(
        CheckpointError, match=r"vae does not match AutoencoderKL.*\n  1 unexpected keys: encoder.extra"
    ):
        load(flux)


# ------------------------------------------------------------------------------------- declared components


def test_declared_t5_must_be_there(sd3):
    shutil.rmtree(sd3 / "text_encoder_3")
    with pytest.raises(FileNotFoundError, match=r"lacks the component folder\(s\) text_encoder_3 that its"):
        load(sd3)
    edit_json(sd3 / "model_index.json", text_encoder_3=[None, None])
    with pytest.raises(ValueError, match=r"declares tokenizer_3 but not text_encoder_3"):
        load(sd3)


def test_folder_declared_null_is_ignored_and_said(sd3, caplog):
    edit_json(sd3 / "model_index.json", text_encoder_3=[None, None], tokenizer_3=[None, None])
    with caplog.at_level(logging.INFO, logger="mmdit_flow.pipelines.loading"):
        pipe = load(sd3)
    assert "text_encoder_3" not in pipe.components.text_encoders
    said = [r.getMessage() for r in caplog.records if "[null, null]" in r.getMessage()]
    assert [m.split(": ")[1] for m in said] == [
        "text_encoder_3 is [null, null] in model_index.json, so its folder is ignored",
        "tokenizer_3 is [null, null] in model_index.json, so its folder is ignored",
    ]


def test_required_component_declared_null(sd3):
    edit_json(sd3 / "model_index.json", vae=[None, None])
    with pytest.raises(
        ValueError, match=r"model_index.json declares no vae, which a StableDiffusion3Pipeline"
    ):
        load(sd3)


# ------------------------------------------------------------------------------------------ files named


@pytest.mark.parametrize(
    "file",
    [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_3/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer_2/tokenizer.json",
        "tokenizer_3/tokenizer.json",
        "tokenizer_3/spiece.model",
    ],
)
def test_lfs_pointer_is_named(shipped, file):
    assert (shipped / file).is_file()
    (shipped / file).write_bytes(LFS_POINTER)
    with pytest.raises(
        CheckpointError, match=rf"{file} is a Git LFS pointer file.*of 123,456,789 bytes.*lfs pull"
    ):
        load(shipped)


@pytest.mark.parametrize(
    "file",
    [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "vae/config.json",
        "text_encoder_3/config.json",
        "tokenizer/tokenizer_config.json",
    ],
)
def test_broken_json_is_named(sd3, file):
    (sd3 / file).write_text('{"_class_name": "x",')
    with pytest.raises(CheckpointError, match=rf"{file} is not valid JSON"):
        load(sd3)


def test_truncated_encoder_weights_are_named(sd3):
    path = sd3 / "text_encoder_2" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"text_encoder_2/model.safetensors is truncated"):
        load(sd3)


def test_dangling_link_is_named(sd3):
    path = sd3 / "tokenizer" / "tokenizer.json"
    path.unlink()
    path.symlink_to(sd3 / "blobs" / "gone")
    with pytest.raises(
        FileNotFoundError, match=r"tokenizer/tokenizer.json is a link to .*blobs/gone, which does not"
    ):
        load(sd3)


def test_links_into_a_cache_load(sd3_folder, tmp_path):
    """The huggingface_hub cache layout: every file a link to a blob elsewhere."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    for i, path in enumerate(sorted(p for p in sd3_folder.rglob("*") if p.is_file())):
        link = snapshot / path.relative_to(sd3_folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        blobs.mkdir(exist_ok=True)
        shutil.copy(path, blobs / str(i))
        link.symlink_to(blobs / str(i))
    a, b = load(snapshot)("a cat", seed=0, **OK), load(sd3_folder)("a cat", seed=0, **OK)
    assert abs(a - b).max() == 0


def test_shard_outside_the_folder_is_refused(sd3, tmp_path):
    weights = sd3 / "text_encoder" / "model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(weights, outside)
    index = {"metadata": {}, "weight_map": dict.fromkeys(load_file(outside), "../../elsewhere.safetensors")}
    (sd3 / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"names shards that are not plain file names in its folder"):
        load(sd3)


# ---------------------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"shift": "3.0"}, r"shift must be a finite number > 0, got '3.0'"),
        ({"shift": 0}, r"shift must be a finite number > 0, got 0"),
        ({"shift": math.nan}, r"shift must be a finite number > 0, got nan"),
        ({"shift": True}, r"shift must be a finite number > 0, got True"),
        ({"base_shift": "low"}, r"base_shift must be a finite number, got 'low'"),
        ({"max_shift": math.inf}, r"max_shift must be a finite number, got inf"),
        ({"base_image_seq_len": 0}, r"base_image_seq_len must be an integer >= 1, got 0"),
        ({"max_image_seq_len": 64.5}, r"max_image_seq_len must be an integer >= 1, got 64.5"),
        ({"base_image_seq_len": 512, "max_image_seq_len": 256}, r"max_image_seq_len \(256\) must be greater"),
        ({"use_dynamic_shifting": "false"}, r"use_dynamic_shifting must be true or false, got 'false'"),
        ({"_class_name": "DDIMScheduler"}, r"_class_name is 'DDIMScheduler'"),
    ],
)
def test_scheduler_values_are_checked_at_load(sd3, changes, match):
    edit_json(sd3 / "scheduler" / "scheduler_config.json", **changes)
    with pytest.raises(ValueError, match=r"scheduler/scheduler_config.json: " + match):
        load(sd3)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"force_upcast": "false"}, r"force_upcast must be true or false"),
        ({"scaling_factor": 0}, r"scaling_factor must be a finite number other than 0, got 0"),
        ({"shift_factor": "0.1"}, r"shift_factor must be a finite number, got '0.1'"),
        ({"_class_name": "AutoencoderTiny"}, r"_class_name is 'AutoencoderTiny'"),
    ],
)
def test_vae_values_are_checked_at_load(sd3, changes, match):
    edit_json(sd3 / "vae" / "config.json", **changes)
    with pytest.raises(ValueError, match=r"vae/config.json: " + match):
        load(sd3)


def test_tokenizer_must_fit_its_encoder(sd3):
    config = sd3 / "tokenizer" / "tokenizer_config.json"
    edit_json(config, model_max_length=100)
    with pytest.raises(
        ValueError, match=r"tokenizer: model_max_length is 100 but .*text_encoder has 77 positions"
    ):
        load(sd3)
    edit_json(config, model_max_length=77)
    # five new tokens whose ids T5's embedding (173 rows, as many as the tokenizer had) does not have
    edit_json(
        sd3 / "tokenizer_3" / "tokenizer_config.json", extra_special_tokens=[f"<x{i}>" for i in range(5)]
    )
    with pytest.raises(ValueError, match=r"tokenizer_3 has 178 tokens but .*text_encoder_3 embeds only 173"):
        load(sd3)
