"""Flux key maps and configs: ours <-> diffusers <-> original BFL, checked with diffusers' own converter."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from test_flux import TINY, diffusers_pair, diffusers_velocity, inputs, randomize_

from mmdit_flow.models.flux import FLUX_DEV, FluxConfig, FluxTransformer
from mmdit_flow.weights.flux_keys import (
    FAMILY,
    config_from_diffusers,
    config_from_original,
    config_to_diffusers,
    default_axes_dim,
    from_diffusers,
    from_original,
    is_original,
    to_diffusers,
    to_original,
)

SCHNELL_TINY = dataclasses.replace(TINY, guidance_embed=False, depth=1, depth_single=3)


def diffusers_converter(hidden_size: int):
    """diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``, with its hard-coded FLUX.1 width
    (``inner_dim = 3072``, used to split the single blocks' linear1) set to ``hidden_size``."""
    from diffusers.loaders import single_file_utils

    fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    source = inspect.getsource(fn)
    if "inner_dim = 3072" not in source:
        return fn
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {hidden_size}"), namespace)
    return namespace[fn.__name__]


def assert_same_state_dict(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("config", [TINY, SCHNELL_TINY])
def test_ours_diffusers_round_trip_is_exact(config):
    from diffusers import FluxTransformer2DModel

    ours = randomize_(FluxTransformer(config)).state_dict()
    theirs = to_diffusers(ours, config)
    ref = FluxTransformer2DModel.from_config(config_to_diffusers(config))
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert_same_state_dict(from_diffusers(theirs, config), ours)


@pytest.mark.parametrize("config", [TINY, SCHNELL_TINY])
def test_original_through_diffusers_converter_gives_same_outputs(config):
    from diffusers import FluxTransformer2DModel

    ours = randomize_(FluxTransformer(config), seed=3).eval()
    original = to_original(ours.state_dict(), config)
    converted = diffusers_converter(config.hidden_size)(dict(original))
    ref = FluxTransformer2DModel.from_config(config_to_diffusers(config)).eval()
    ref.load_state_dict(converted, strict=True)
    kw = inputs(config, 2, 4, 6)
    with torch.no_grad():
        expected = diffusers_velocity(ref, **kw)
        got = ours(**kw)
    assert expected.abs().max() > 1.0
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize("config", [TINY, SCHNELL_TINY])
def test_diffusers_original_ours_diffusers_round_trip(config):
    ref, _ = diffusers_pair(config, seed=5)
    theirs = ref.state_dict()
    original = to_original(from_diffusers(theirs, config), config)
    assert is_original(original)
    # diffusers' own converter agrees with our original -> diffusers path, tensor for tensor
    assert_same_state_dict(diffusers_converter(config.hidden_size)(dict(original)), theirs)
    assert_same_state_dict(to_diffusers(from_original(original, config), config), theirs)


@pytest.mark.parametrize("config", [TINY, SCHNELL_TINY, dataclasses.replace(TINY, in_channels=6, depth=0)])
def test_config_from_original_recovers_config(config):
    original = to_original(FluxTransformer(config).state_dict(), config)
    assert config_from_original(original) == config


def test_original_detection_matches_diffusers():
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    for config, kind in [(TINY, "flux-dev"), (SCHNELL_TINY, "flux-schnell")]:
        ours = FluxTransformer(config).state_dict()
        original = to_original(ours, config)
        assert is_original(original)
        assert infer_diffusers_model_type(original) == kind
        assert not is_original(ours)
        assert not is_original(to_diffusers(ours, config))


def test_default_axes_dim():
    assert default_axes_dim(128) == (16, 56, 56)
    for head_dim in range(6, 257, 2):
        axes = default_axes_dim(head_dim)
        assert sum(axes) == head_dim and all(d >= 2 and d % 2 == 0 for d in axes), head_dim


def test_config_from_original_rejects_other_mlp_ratios():
    original = to_original(FluxTransformer(TINY).state_dict(), TINY)
    original["single_blocks.0.linear2.weight"] = torch.zeros(64, 64 + 3 * 64)
    with pytest.raises(ValueError, match="MLP ratio"):
        config_from_original(original)


@pytest.mark.parametrize("config", [TINY, SCHNELL_TINY, dataclasses.replace(TINY, in_channels=6), FLUX_DEV])
def test_diffusers_config_round_trip(config):
    from diffusers import FluxTransformer2DModel

    d = config_to_diffusers(config)
    assert config_from_diffusers(d) == config
    if config.hidden_size <= 64:  # the diffusers class accepts our dict and reads it back the same
        model = FluxTransformer2DModel.from_config(d)
        assert config_from_diffusers(dict(model.config)) == config


def test_config_from_diffusers_defaults_and_errors():
    assert config_from_diffusers({"guidance_embeds": True}) == FLUX_DEV
    with pytest.raises(ValueError, match="patch_size"):
        config_from_diffusers({"patch_size": 2})
    with pytest.raises(ValueError, match="multiples of 4"):
        config_from_diffusers({"in_channels": 66})


def test_unknown_keys_pass_through_missing_keys_stay_missing():
    sd = FluxTransformer(TINY).state_dict()
    del sd["double_blocks.0.img_attn.qkv.bias"]
    sd["lora.extra"] = torch.ones(1)
    theirs = to_diffusers(sd, TINY)
    assert "lora.extra" in theirs
    assert "transformer_blocks.0.attn.to_q.bias" not in theirs
    assert "transformer_blocks.0.attn.to_q.weight" in theirs


def test_family_contract():
    assert FAMILY.name == "flux"
    assert FAMILY.config_cls is FluxConfig and FAMILY.model_cls is FluxTransformer
    assert FAMILY.diffusers_class_name == "FluxTransformer2DModel"
