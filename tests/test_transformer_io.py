"""load_transformer / save_transformer end to end: diffusers folders, pipelines, original single files,
shards, ``mmdit-flow convert``, strict errors. Tiny random diffusers transformers give the references."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmdit_flow.weights import io, load_transformer, save_transformer, transformer
from mmdit_flow.weights.formats import KeyFormat
from mmdit_flow.weights.io import CheckpointError

TINY_SD3 = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=64,  # every SD3 release's: an original file without qk-norm does not store it
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=128,
    pooled_projection_dim=20,
    out_channels=4,
    pos_embed_max_size=12,
)
TINY_FLUX = dict(
    patch_size=1,
    in_channels=16,  # 2x2-packed: 4 latent channels
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 14, 14),
)
# case -> (family, diffusers constructor arguments)
CASES = {
    "sd3": ("sd3", TINY_SD3),
    "sd3_qk_norm": ("sd3", {**TINY_SD3, "qk_norm": "rms_norm"}),
    "sd35_dual": ("sd3", {**TINY_SD3, "qk_norm": "rms_norm", "dual_attention_layers": (0, 2)}),
    "flux_dev": ("flux", {**TINY_FLUX, "guidance_embeds": True}),
    "flux_schnell": ("flux", {**TINY_FLUX, "guidance_embeds": False}),
}
DIFFUSERS_CLASS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}


def _needs_family(name: str) -> None:
    pytest.importorskip(f"mmdit_flow.weights.{name}_keys")


def diffusers_model(case: str, seed: int = 0) -> nn.Module:
    """A tiny diffusers transformer with every parameter random and non-zero (norm scales near 1)."""
    import diffusers

    fam, kwargs = CASES[case]
    _needs_family(fam)
    model = getattr(diffusers, DIFFUSERS_CLASS[fam])(**kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(noise + 1.0 if "norm" in name else noise + 0.02)
    return model


def inputs(case: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Our model's inputs: non-square latents, batch 2."""
    fam, kw = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    txt_dim, vec_dim = kw["joint_attention_dim"], kw["pooled_projection_dim"]
    channels = 4
    out = {
        "x": torch.randn(2, channels, 6, 10, generator=gen),
        "t": torch.rand(2, generator=gen),
        "txt": torch.randn(2, 5, txt_dim, generator=gen),
        "vec": torch.randn(2, vec_dim, generator=gen),
    }
    if kw.get("guidance_embeds"):
        out["guidance"] = 1.0 + 4.0 * torch.rand(2, generator=gen)
    return out


@torch.no_grad()
def diffusers_velocity(case: str, model: nn.Module, x, t, txt, vec, guidance=None) -> torch.Tensor:
    """The diffusers model's output in our interface (for Flux: what FluxPipeline does around it)."""
    fam, _ = CASES[case]
    if fam == "sd3":
        return model(
            hidden_states=x, encoder_hidden_states=txt, pooled_projections=vec, timestep=1000 * t
        ).sample
    from diffusers import FluxPipeline

    B, C, H, W = x.shape
    out = model(
        hidden_states=FluxPipeline._pack_latents(x, B, C, H, W),
        encoder_hidden_states=txt,
        pooled_projections=vec,
        timestep=t,  # FluxPipeline passes sigma; the model multiplies by 1000
        guidance=guidance,
        img_ids=FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x.device, x.dtype),
        txt_ids=torch.zeros(txt.shape[1], 3),
    ).sample
    return FluxPipeline._unpack_latents(out, H * 8, W * 8, vae_scale_factor=8)


@torch.no_grad()
def ours(model: nn.Module, case: str) -> torch.Tensor:
    return model(**inputs(case))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (diffusers model, its save_pretrained folder, its reference output); built once per case."""
    cache = {}

    def get(case: str):
        if case not in cache:
            ref = diffusers_model(case)
            folder = tmp_path_factory.mktemp(case)
            ref.save_pretrained(folder)
            cache[case] = (ref, folder, diffusers_velocity(case, ref, **inputs(case)))
        return cache[case]

    return get


# ---------------------------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize("case", CASES)
def test_diffusers_folder_equals_diffusers(case, saved):
    _, folder, expected = saved(case)
    model = load_transformer(folder)
    assert type(model).__name__ == {"sd3": "SD3Transformer", "flux": "FluxTransformer"}[CASES[case][0]]
    assert not model.training
    assert expected.abs().mean() > 0.1  # a real signal
    assert rel_err(ours(model, case), expected) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_save_diffusers_loads_in_diffusers_with_same_outputs(case, saved, tmp_path):
    import diffusers

    fam, _ = CASES[case]
    _, folder, expected = saved(case)
    model = load_transformer(folder)
    out = save_transformer(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == DIFFUSERS_CLASS[fam] and config["_diffusers_version"]
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    theirs = getattr(diffusers, DIFFUSERS_CLASS[fam]).from_pretrained(out).eval()
    got = diffusers_velocity(case, theirs, **inputs(case))
    assert rel_err(got, expected) < 1e-5
    assert torch.equal(ours(load_transformer(out), case), ours(model, case))


def test_pipeline_folder_uses_its_transformer(saved, tmp_path):
    ref, _, expected = saved("sd3")
    ref.save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert rel_err(ours(load_transformer(tmp_path), "sd3"), expected) < 1e-5
    (tmp_path / "empty_pipe").mkdir()
    (tmp_path / "empty_pipe" / "model_index.json").write_text(
        json.dumps({"vae": ["diffusers", "AutoencoderKL"]})
    )
    with pytest.raises(CheckpointError, match="without a transformer/ folder"):
        load_transformer(tmp_path / "empty_pipe")


@pytest.mark.parametrize("case", ["sd35_dual", "flux_dev"])
def test_sharded_save_and_load(case, saved, tmp_path):
    import diffusers

    fam, _ = CASES[case]
    _, folder, expected = saved(case)
    model = load_transformer(folder)
    out = save_transformer(model, tmp_path / "out", max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert not (out / "diffusion_pytorch_model.safetensors").exists()
    assert torch.equal(ours(load_transformer(out), case), ours(model, case))
    theirs = getattr(diffusers, DIFFUSERS_CLASS[fam]).from_pretrained(out).eval()
    assert rel_err(diffusers_velocity(case, theirs, **inputs(case)), expected) < 1e-5


def test_diffusers_sharded_folder_loads(saved, tmp_path):
    ref, _, expected = saved("flux_schnell")
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert len(list(tmp_path.glob("*.safetensors"))) >= 2
    assert rel_err(ours(load_transformer(tmp_path), "flux_schnell"), expected) < 1e-5


# ---------------------------------------------------------------------------------------------- original


@pytest.mark.parametrize("case", CASES)
def test_original_round_trip(case, saved, tmp_path):
    fam, _ = CASES[case]
    _, folder, expected = saved(case)
    model = load_transformer(folder)
    path = save_transformer(model, tmp_path / "model.safetensors", format="original")
    keys = load_file(path).keys()
    if fam == "sd3":
        assert all(k.startswith("model.diffusion_model.") for k in keys)
        assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in keys
    else:
        assert "double_blocks.0.img_attn.qkv.weight" in keys
    back = load_transformer(path)
    assert back.config == model.config
    assert torch.equal(ours(back, case), ours(model, case))
    assert rel_err(ours(back, case), expected) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_original_file_without_our_metadata(case, saved, tmp_path):
    """A released checkpoint has no mmdit_flow metadata: the family and config come from the keys."""
    _, folder, expected = saved(case)
    ours_file = save_transformer(load_transformer(folder), tmp_path / "ours.safetensors", format="original")
    save_file(load_file(ours_file), tmp_path / "release.safetensors")  # no metadata
    assert "mmdit_flow.family" not in io.read_checkpoint(tmp_path / "release.safetensors").metadata
    assert rel_err(ours(load_transformer(tmp_path / "release.safetensors"), case), expected) < 1e-5


@pytest.mark.parametrize("case", ["sd3", "sd35_dual"])
def test_original_sd3_file_loads_in_diffusers_from_single_file(case, saved, tmp_path):
    """Our format="original" is the released layout: diffusers' own single-file loader reads it."""
    from diffusers import SD3Transformer2DModel

    ref, folder, expected = saved(case)
    ref.save_pretrained(tmp_path / "config" / "transformer")  # the config diffusers needs besides the file
    path = save_transformer(load_transformer(folder), tmp_path / "sd3.safetensors", format="original")
    theirs = SD3Transformer2DModel.from_single_file(
        str(path), config=str(tmp_path / "config"), subfolder="transformer", local_files_only=True
    ).eval()
    assert rel_err(diffusers_velocity(case, theirs, **inputs(case)), expected) < 1e-5


def test_flux_file_under_a_prefix_loads(saved, tmp_path):
    """ComfyUI-style Flux files keep the BFL names under model.diffusion_model."""
    _, folder, expected = saved("flux_dev")
    path = save_transformer(load_transformer(folder), tmp_path / "m.safetensors", format="original")
    prefixed = {"model.diffusion_model." + k: v for k, v in load_file(path).items()}
    save_file(prefixed, tmp_path / "c.safetensors")
    assert rel_err(ours(load_transformer(tmp_path / "c.safetensors"), "flux_dev"), expected) < 1e-5


def test_all_in_one_file_skips_other_components(saved, tmp_path, caplog):
    _, folder, expected = saved("sd3_qk_norm")
    path = save_transformer(load_transformer(folder), tmp_path / "m.safetensors", format="original")
    sd = load_file(path)
    sd["first_stage_model.decoder.conv_in.weight"] = torch.randn(3, 3)
    sd["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.randn(4)
    save_file(sd, tmp_path / "all_in_one.safetensors")
    with caplog.at_level(logging.INFO, logger="mmdit_flow.weights"):
        model = load_transformer(tmp_path / "all_in_one.safetensors")
    assert "first_stage_model.*: 1" in caplog.text and "text_encoders.*: 1" in caplog.text
    assert rel_err(ours(model, "sd3_qk_norm"), expected) < 1e-5


def test_dtype_preserved_through_save_and_load(saved, tmp_path):
    _, folder, _ = saved("flux_dev")
    model = load_transformer(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for fmt, path in (("original", tmp_path / "m.safetensors"), ("diffusers", tmp_path / "d")):
        back = load_transformer(save_transformer(model, path, format=fmt))
        assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
        for (name, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    kept = load_transformer(folder)  # dtype=None keeps the checkpoint's
    assert {p.dtype for p in kept.parameters()} == {torch.float32}


def test_attention_backend_and_device_options(saved):
    _, folder, expected = saved("sd3")
    model = load_transformer(folder, device="cpu", attention_backend="reference")
    assert model.attention_backend == "reference"
    assert rel_err(ours(model, "sd3"), expected) < 1e-5
    _, folder, _ = saved("flux_schnell")
    assert load_transformer(folder, attention_backend="reference").attention_backend == "reference"
    with pytest.raises(ValueError, match="sdpa"):
        load_transformer(folder, attention_backend="flash")


# ---------------------------------------------------------------------------------------------- convert


def test_convert_cli_both_ways(saved, tmp_path, capsys):
    from mmdit_flow.pipelines.cli import main

    _, folder, expected = saved("sd35_dual")
    single = tmp_path / "sd35.safetensors"
    assert main(["convert", str(folder), str(single), "--to", "original"]) == 0
    assert capsys.readouterr().out.strip() == str(single)
    out = tmp_path / "diffusers"
    assert main(["convert", str(single), str(out), "--to", "diffusers", "--max-shard-size", "100KB"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert rel_err(ours(load_transformer(out), "sd35_dual"), expected) < 1e-5
    half = tmp_path / "half"
    assert main(["convert", str(out), str(half), "--to", "diffusers", "--dtype", "bf16"]) == 0
    assert {p.dtype for p in load_transformer(half).parameters()} == {torch.bfloat16}


def test_convert_refuses_pickle_without_opt_in(saved, tmp_path):
    from mmdit_flow.pipelines.cli import main

    ref, _, expected = saved("sd3")
    pickled = tmp_path / "pickled"
    ref.save_pretrained(pickled, safe_serialization=False)
    assert (pickled / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        main(["convert", str(pickled), str(tmp_path / "o"), "--to", "diffusers"])
    assert main(["convert", str(pickled), str(tmp_path / "o"), "--to", "diffusers", "--allow-pickle"]) == 0
    assert rel_err(ours(load_transformer(tmp_path / "o"), "sd3"), expected) < 1e-5


# ---------------------------------------------------------------------------------------------- errors


def _tamper(folder, tmp_path, edit) -> str:
    import shutil

    out = tmp_path / "tampered"
    shutil.copytree(folder, out)
    path = out / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    edit(sd)
    save_file(sd, path)
    return str(path)


def test_strict_errors_on_tampered_file(saved, tmp_path):
    _, folder, _ = saved("sd3")

    def edit(sd):
        del sd["transformer_blocks.1.ff.net.2.bias"]
        sd["transformer_blocks.9.extra.weight"] = torch.zeros(2)
        sd["context_embedder.weight"] = torch.zeros(128, 25)

    path = _tamper(folder, tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_transformer(tmp_path / "tampered")
    msg = str(err.value)
    assert path in msg
    assert "missing keys: blocks.1.img.mlp" in msg
    assert "unexpected keys: transformer_blocks.9.extra.weight" in msg
    assert "context_embedder.weight: checkpoint [128, 25] vs model [128, 24]" in msg


def test_unknown_files_and_configs_name_the_file(saved, tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "foo.safetensors")
    with pytest.raises(CheckpointError, match="not a checkpoint of a known family") as err:
        load_transformer(tmp_path / "foo.safetensors")
    assert str(tmp_path / "foo.safetensors") in str(err.value) and "foo.weight" in str(err.value)

    ref, folder, _ = saved("sd3")
    lone = tmp_path / "lone.safetensors"
    save_file(load_file(folder / "diffusion_pytorch_model.safetensors"), lone)
    with pytest.raises(CheckpointError, match="config.json"):
        load_transformer(lone)

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="UNet2DConditionModel") as err:
        load_transformer(tmp_path / "unet")
    assert "config.json" in str(err.value) and "SD3Transformer2DModel" in str(err.value)

    ours_file = save_transformer(load_transformer(folder), tmp_path / "ours.safetensors", format="original")
    bad_metadata = [({"mmdit_flow.family": "unet"}, "'unet' model"), ({"mmdit_flow.config": "{"}, "JSON")]
    for meta, match in bad_metadata:
        changed = tmp_path / "changed.safetensors"
        save_file(load_file(ours_file), changed, metadata={**io.read_checkpoint(ours_file).metadata, **meta})
        with pytest.raises(CheckpointError, match=match) as err:
            load_transformer(changed)
        assert str(changed) in str(err.value)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_transformer(tmp_path / "nowhere")


def test_save_argument_errors(saved, tmp_path):
    _, folder, _ = saved("sd3")
    model = load_transformer(folder)
    with pytest.raises(ValueError, match="diffusers, original"):
        save_transformer(model, tmp_path / "x", format="ckpt")
    with pytest.raises(ValueError, match=".safetensors"):
        save_transformer(model, tmp_path / "x", format="original")
    with pytest.raises(ValueError, match="max_shard_size"):
        save_transformer(model, tmp_path / "x.safetensors", format="original", max_shard_size="1GB")
    with pytest.raises(ValueError, match="SD3Transformer"):
        save_transformer(nn.Linear(2, 2), tmp_path / "x")


def test_compiled_model_is_saved_as_its_inner_model(saved, tmp_path):
    _, folder, _ = saved("flux_schnell")
    model = load_transformer(folder)
    wrapped = torch.compile(model)  # not run: only the wrapper's _orig_mod matters
    back = load_transformer(save_transformer(wrapped, tmp_path / "m.safetensors", format="original"))
    assert torch.equal(ours(back, "flux_schnell"), ours(model, "flux_schnell"))


# ---------------------------------------------------------------------------------------------- meta build


class _ToyConfig:
    def __init__(self, width: int = 3):
        self.width = width


class _Toy(nn.Module):
    """A model with a buffer computed in __init__ and never saved, as a family might have."""

    def __init__(self, config: _ToyConfig):
        super().__init__()
        self.config = config
        self.lin = nn.Linear(config.width, config.width)
        self.register_buffer("freqs", torch.linspace(0.5, 2.0, config.width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.freqs


TOY = KeyFormat(
    name="toy",
    config_cls=_ToyConfig,
    model_cls=_Toy,
    diffusers_class_name="ToyModel",
    config_from_diffusers=lambda d: _ToyConfig(d["width"]),
    config_to_diffusers=lambda c: {"width": c.width},
    config_from_original=lambda sd: _ToyConfig(sd["lin.weight"].shape[0]),
    is_original=lambda sd: "lin.weight" in sd,
    diffusers_rules=lambda c: [],  # same names in every format: an empty table
    original_rules=lambda c: [],
)


def test_non_persistent_buffers_are_rebuilt_after_a_meta_build(tmp_path, monkeypatch):
    monkeypatch.setattr(transformer, "FAMILIES", {"toy": TOY})
    torch.manual_seed(0)
    src = _Toy(_ToyConfig(3))
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "config.json").write_text(json.dumps({"_class_name": "ToyModel", "width": 3}))
    io.save_folder(src.state_dict(), tmp_path / "toy")
    model = load_transformer(tmp_path / "toy")
    assert not model.lin.weight.is_meta and not model.freqs.is_meta
    assert torch.equal(model.freqs, src.freqs)
    x = torch.randn(4, 3)
    assert torch.equal(model(x), src(x))
