"""LoRA fine-tuning through peft: add adapters to a transformer, read them back, save or merge them.

A LoRA on a linear layer W [out, in] adds ``delta W = (alpha / r) * B @ A`` with A [r, in], B [out, r]. peft
wraps each targeted ``nn.Linear`` of our model (SD3 or Flux; fused ``qkv`` and Flux's ``linear1`` included)
in place; the file format (diffusers' names, a fused layer written as separate q / k / v (/ mlp) adapters,
alpha folded into B; or any naming of ``mmdit_flow.weights.lora_formats``) is ``mmdit_flow.weights.lora``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmdit_flow.weights.lora import LoraLayer, write_lora

ADAPTER = "default"


def add_lora(model: nn.Module, lora: Any) -> nn.Module:
    """Add peft LoRA layers to the modules in ``lora.target_modules`` (suffix match); freeze the rest."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in lora.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            example = ", ".join(_example_targets(names))
            raise ValueError(f"lora.target_modules: no linear layer is named {target!r}; e.g. {example}")
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
        target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout,
        init_lora_weights=True,  # B = 0: training starts from the base model
    )
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def _example_targets(names: list[str], per_kind: int = 8) -> list[str]:
    """Target names in the first block of each block list (SD3 ``blocks.0.``; Flux ``double_blocks.0.``
    and ``single_blocks.0.``), at most ``per_kind`` of each, sorted."""
    kinds: dict[str, set[str]] = {}
    for n in names:
        parts = n.split(".", 2)
        if len(parts) == 3 and parts[1] == "0":
            kinds.setdefault(parts[0], set()).add(parts[2])
    return [t for kind in kinds.values() for t in sorted(kind)[:per_kind]]


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Our module name -> (A [r, in], B [out, r], scale) for every peft LoRA layer of ``model``."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {}):
            A = module.lora_A[ADAPTER].weight.detach()
            B = module.lora_B[ADAPTER].weight.detach()
            out[name] = LoraLayer(A, B, float(module.scaling[ADAPTER]))
    return out


def save_lora(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's LoRA as a file (safetensors, diffusers' names) that diffusers'
    ``StableDiffusion3Pipeline`` / ``FluxPipeline.load_lora_weights`` reads."""
    return write_lora(model, lora_layers(model), path)


@torch.no_grad()
def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without LoRA layers, each base weight plus its scaled ``B @ A``."""
    merged = copy.deepcopy(model)
    for name, (A, B, scale) in lora_layers(merged).items():
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        lora_module = getattr(parent, child)
        base = lora_module.base_layer
        base.weight.add_((B.float() @ A.float() * scale).to(base.weight))
        setattr(parent, child, base)
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged
