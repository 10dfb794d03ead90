"""LoRA files of both families in every format we read, against diffusers (or, where diffusers cannot read a
format, against the LoRA merged by hand into the original-format weights, then converted to ours).

Every comparison is of values in fp32: transformer outputs, merged weights, prompt embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmdit_flow.training.config import LoRAConfig
from mmdit_flow.training.lora import add_lora, save_lora
from mmdit_flow.weights import load_transformer
from mmdit_flow.weights.io import save_file
from mmdit_flow.weights.lora import load_lora
from tests.components import diffusers_pipeline, flux_components
from tests.test_flux import diffusers_velocity

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _flux_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, 4, 4, 6, generator=g),
        "t": torch.tensor([0.3, 0.8]),
        "txt": torch.randn(2, 5, 32, generator=g),
        "vec": torch.randn(2, 16, generator=g),
        "guidance": torch.tensor([2.0, 4.5]),
    }


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny random Flux pipeline folder, its components and our transformer read from it."""
    folder = tmp_path_factory.mktemp("flux") / "base"
    components = flux_components()
    diffusers_pipeline(components).save_pretrained(folder)
    return folder, components


def _ours(folder):
    return load_transformer(folder / "transformer", dtype=torch.float32).eval()


def _theirs(components, lora_path, **kw):
    """diffusers' FluxPipeline transformer after load_lora_weights."""
    import copy

    pipe = diffusers_pipeline({**components, "transformer": copy.deepcopy(components["transformer"])})
    pipe.load_lora_weights(str(lora_path), **kw)
    return pipe.transformer


def _random_(model, seed, scale=0.3, only="lora_"):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@torch.no_grad()
def test_flux_lora_export_loads_in_diffusers_with_the_same_output(flux, tmp_path):
    folder, components = flux
    targets = [
        "img_attn.qkv",
        "txt_attn.qkv",
        "linear1",
        "linear2",
        "img_mod.lin",
        "final_layer.modulation.lin",
    ]
    model = _random_(add_lora(_ours(folder), LoRAConfig(rank=2, alpha=6.0, target_modules=targets)), 1).eval()
    path = save_lora(model, tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    inputs = _flux_inputs()
    ours = model(**inputs)
    before = diffusers_velocity(components["transformer"], **inputs)
    theirs = diffusers_velocity(_theirs(components, path.parent), **inputs)
    assert (theirs - before).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, **TOL)
    torch.testing.assert_close(load_lora(_ours(folder), path)(**inputs), ours, **TOL)


def _diffusers_flux_lora(components, tmp_path, *, alpha, rank=2, targets=None, rslora=False):
    """A LoRA trained (here: randomized) on diffusers' Flux transformer and saved as diffusers' Flux script
    saves it: peft names and the LoraConfig (lora_alpha != rank) in the file's metadata."""
    import copy

    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(components["transformer"])
    targets = targets or [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_k_proj",
        "proj_mlp",
        "proj_out",
        "norm.linear",
    ]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora)
    model.add_adapter(config)
    _random_(model, 3)
    FluxPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    return tmp_path / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("rslora", [False, True])
@torch.no_grad()
def test_lora_alpha_in_the_metadata_is_honoured_as_diffusers_does(flux, tmp_path, rslora):
    folder, components = flux
    path = _diffusers_flux_lora(components, tmp_path, alpha=8, rslora=rslora)
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.lora_alpha"] == 8
    inputs = _flux_inputs()
    theirs = diffusers_velocity(_theirs(components, path), **inputs)
    ours = load_lora(_ours(folder), path)(**inputs)
    torch.testing.assert_close(ours, theirs, **TOL)
    # ignoring alpha (scale 1 instead of 4, or 8 / sqrt(2)) would give other outputs
    plain = load_lora(_ours(folder), load_file(path))  # the tensors without the metadata
    assert (plain(**inputs) - theirs).abs().max() > 1e-2


@torch.no_grad()
def test_alpha_entries_are_honoured_as_diffusers_network_alphas(flux, tmp_path):
    """.alpha keys beside peft factors (diffusers' network_alphas): per-module alpha / rank, the most common
    alpha for modules without an entry."""
    folder, components = flux
    path = _diffusers_flux_lora(components, tmp_path, alpha=2)
    sd = load_file(path)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    alphas = {f"{m}.alpha": torch.tensor(a) for m, a in zip(modules, [4.0, 4.0, 4.0, 1.0, 0.5], strict=False)}
    file = save_file({**sd, **alphas}, tmp_path / "alphas" / "lora.safetensors")
    inputs = _flux_inputs()
    theirs = diffusers_velocity(_theirs(components, file), **inputs)
    torch.testing.assert_close(load_lora(_ours(folder), file)(**inputs), theirs, **TOL)
