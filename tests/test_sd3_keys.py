"""SD3 key maps and configs: ours <-> diffusers <-> original single file, checked with diffusers."""

from __future__ import annotations

import pytest
import torch

from mmdit_flow.models.sd3 import PRESETS, SD3Config, SD3Transformer
from mmdit_flow.weights import sd3_keys
from mmdit_flow.weights.sd3_keys import (
    FAMILY,
    config_from_diffusers,
    config_from_original,
    config_to_diffusers,
    from_diffusers,
    from_original,
    is_original,
    to_diffusers,
    to_original,
)

# head dim 64 and sample size 128, as in every release: what an original file's shapes cannot tell
TINY = dict(
    sample_size=128,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=128,
    pooled_projection_dim=20,
    out_channels=8,
    pos_embed_max_size=12,
)
VARIANTS = {
    "sd3": {},
    "sd3_qk_norm": {"qk_norm": "rms_norm"},
    "sd35_dual": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 2)},
}


def random_diffusers(**overrides):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**{**TINY, **overrides}).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + 0.01)
    return model


def run_both(theirs, ours: SD3Transformer) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    c = ours.config
    x = torch.randn(2, c.in_channels, 8, 6, generator=gen)
    t, txt = torch.rand(2, generator=gen), torch.randn(2, 7, c.context_dim, generator=gen)
    vec = torch.randn(2, c.vec_dim, generator=gen)
    with torch.no_grad():
        ref = theirs(
            hidden_states=x, encoder_hidden_states=txt, pooled_projections=vec, timestep=1000 * t
        ).sample
        return ours(x, t, txt, vec), ref


def same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_round_trip_exact(variant):
    theirs = random_diffusers(**VARIANTS[variant])
    config = config_from_diffusers(dict(theirs.config))
    ours_sd = from_diffusers(theirs.state_dict(), config)
    model = SD3Transformer(config)
    model.load_state_dict(ours_sd, strict=True)
    same_state(to_diffusers(ours_sd, config), theirs.state_dict())
    same_state(from_diffusers(to_diffusers(model.state_dict(), config), config), model.state_dict())


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_through_diffusers_converter(variant):
    """ours -> original -> diffusers' own single-file converter -> diffusers model: the same output."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    theirs = random_diffusers(**VARIANTS[variant])
    config = config_from_diffusers(dict(theirs.config))
    ours = SD3Transformer(config).eval()
    ours.load_state_dict(from_diffusers(theirs.state_dict(), config))
    original = {f"model.diffusion_model.{k}": v for k, v in to_original(ours.state_dict(), config).items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    rebuilt = SD3Transformer2DModel.from_config(config_to_diffusers(config)).eval()
    rebuilt.load_state_dict(converted, strict=True)
    out, ref = run_both(rebuilt, ours)
    assert ref.abs().mean() > 0.01
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_original_ours_diffusers_round_trip(variant):
    theirs = random_diffusers(**VARIANTS[variant])
    config = config_from_diffusers(dict(theirs.config))
    original = to_original(from_diffusers(theirs.state_dict(), config), config)
    assert is_original(original) and not is_original(theirs.state_dict())
    assert config_from_original(original) == config
    ours = SD3Transformer(config).eval()
    ours.load_state_dict(from_original(original, config), strict=True)
    same_state(to_diffusers(ours.state_dict(), config), theirs.state_dict())
    out, ref = run_both(theirs, ours)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("name", PRESETS)
def test_presets_have_diffusers_shapes(name):
    """Each preset, built on the meta device, maps key for key and shape for shape onto diffusers' model."""
    from diffusers import SD3Transformer2DModel

    config = PRESETS[name]
    with torch.device("meta"):
        ours = SD3Transformer(config)
        theirs = SD3Transformer2DModel.from_config(config_to_diffusers(config))
    mapped = to_diffusers(ours.state_dict(), config)
    expected = theirs.state_dict()
    assert mapped.keys() == expected.keys()
    assert all(mapped[k].shape == expected[k].shape for k in expected)
    assert config_from_diffusers(dict(theirs.config)) == config
    assert config_from_original(to_original(ours.state_dict(), config)) == config


def test_real_config_json_and_preset_values():
    # SD3.5-medium's transformer/config.json as published
    published = {
        "_class_name": "SD3Transformer2DModel",
        "_diffusers_version": "0.31.0.dev0",
        "attention_head_dim": 64,
        "caption_projection_dim": 1536,
        "dual_attention_layers": list(range(13)),
        "in_channels": 16,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 24,
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 384,
        "qk_norm": "rms_norm",
        "sample_size": 128,
    }
    assert config_from_diffusers(published) == SD3Config.preset("sd35_medium")
    assert FAMILY.config_cls is SD3Config and FAMILY.model_cls is SD3Transformer
    assert FAMILY.diffusers_class_name == published["_class_name"]


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"_class_name": "FluxTransformer2DModel"}, "FluxTransformer2DModel"),
        ({"use_magic": True}, "use_magic"),
        ({"caption_projection_dim": 100}, "caption_projection_dim"),
        ({"pos_embed_max_size": None}, "pos_embed_max_size"),
        ({"qk_norm": "layer_norm"}, "qk_norm"),
    ],
)
def test_bad_diffusers_config_raises(changes, match):
    with pytest.raises(ValueError, match=match):
        config_from_diffusers({**TINY, **changes})


def test_missing_and_extra_keys_are_left_for_the_strict_loader():
    theirs = random_diffusers()
    config = config_from_diffusers(dict(theirs.config))
    sd = dict(theirs.state_dict())
    del sd["transformer_blocks.0.attn.to_k.weight"]
    sd["some.extra"] = torch.zeros(1)
    ours = from_diffusers(sd, config)
    missing, unexpected = SD3Transformer(config).load_state_dict(ours, strict=False)
    assert missing == ["blocks.0.img.attn.qkv.weight"]
    assert sorted(unexpected) == [
        "some.extra",
        "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.0.attn.to_v.weight",
    ]


def test_modulation_halves_swap_only_for_diffusers():
    """(shift, scale) in ours and the original; diffusers' AdaLayerNormContinuous stores (scale, shift)."""
    config = config_from_diffusers(TINY)
    sd = SD3Transformer(config).state_dict()
    sd["final.mod.lin.bias"] = torch.arange(2 * config.hidden_size, dtype=torch.float32)
    D = config.hidden_size
    assert torch.equal(
        to_original(sd, config)["final_layer.adaLN_modulation.1.bias"], sd["final.mod.lin.bias"]
    )
    swapped = to_diffusers(sd, config)["norm_out.linear.bias"]
    assert torch.equal(swapped[:D], sd["final.mod.lin.bias"][D:])
    rules = {r.ours: r.op for r in sd3_keys.diffusers_rules(config)}
    last = config.depth - 1
    assert rules[f"blocks.{last}.txt.mod.lin.weight"] == "swap"
    assert rules["blocks.0.txt.mod.lin.weight"] == "copy"
