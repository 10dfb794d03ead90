"""LoRA fine-tuning through peft, and LoRA files in diffusers' naming.

A LoRA on a linear layer W [out, in] adds ``delta W = (alpha / r) * B @ A`` with A [r, in], B [out, r].

Our names differ from diffusers' (``weights/sd3_keys.py`` holds the map), and our attention projects q, k
and v with one fused ``qkv`` layer where diffusers has ``to_q``, ``to_k``, ``to_v``. A LoRA on the fused layer
is exactly three LoRAs with the same A and B split by rows:

    delta [W_q; W_k; W_v] = s * [B_q; B_k; B_v] @ A   =>   delta W_q = s * B_q @ A, ...

so the export writes A three times and B in three row blocks (and exchanges B's halves where the map swaps
the rows of a modulation layer). The scale ``alpha / r`` is folded into B, so every exported adapter has
scale 1 whatever alpha diffusers assumes. ``load_lora`` goes the other way for any diffusers SD3 LoRA file
(separate A per q, k, v included) and merges ``scale * delta W`` into our weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER = "default"
PREFIX = "transformer."  # diffusers' prefix for the transformer's LoRA keys in a pipeline LoRA file


def add_lora(model: nn.Module, lora: Any) -> nn.Module:
    """Add peft LoRA layers to the modules in ``lora.target_modules`` (suffix match); freeze the rest."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in lora.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            example = ", ".join(sorted({n.split(".", 2)[-1] for n in names if n.startswith("blocks.0.")})[:8])
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


def lora_layers(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Our module name -> (A [r, in], B [out, r], scale) for every peft LoRA layer of ``model``."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {}):
            A = module.lora_A[ADAPTER].weight.detach()
            B = module.lora_B[ADAPTER].weight.detach()
            out[name] = (A, B, float(module.scaling[ADAPTER]))
    return out


def _rules(model: nn.Module) -> dict[str, Any]:
    from mmdit_flow.models.sd3 import SD3Transformer
    from mmdit_flow.weights.sd3_keys import diffusers_rules

    base = model
    if not isinstance(base, SD3Transformer):
        raise ValueError(f"LoRA export supports SD3 transformers, got {type(model).__name__}")
    return {r.ours[: -len(".weight")]: r for r in diffusers_rules(base.config) if r.ours.endswith(".weight")}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's LoRA as diffusers names it: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``."""
    rules, out = _rules(model), {}
    for name, (A, B, scale) in lora_layers(model).items():
        rule = rules[name]
        theirs = [t[: -len(".weight")] for t in rule.theirs]
        B = B * scale
        if rule.op == "cat":  # fused qkv -> to_q / to_k / to_v: shared A, B in row blocks
            blocks = B.chunk(len(theirs), dim=0)
        elif rule.op == "swap":  # rows (shift, scale) stored as (scale, shift)
            top, bottom = B.chunk(2, dim=0)
            blocks = (torch.cat([bottom, top], dim=0),)
        else:
            blocks = (B,)
        for module, b in zip(theirs, blocks, strict=True):
            out[f"{PREFIX}{module}.lora_A.weight"] = A.clone().contiguous()
            out[f"{PREFIX}{module}.lora_B.weight"] = b.clone().contiguous()
    return out


def save_lora(model: nn.Module, path: str | Path) -> Path:
    """Write a LoRA file (safetensors) that diffusers' ``load_lora_weights`` reads."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(lora_state_dict(model), str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


def _deltas_from_file(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """diffusers-named LoRA tensors -> {our parameter name: delta W = B @ A} (alpha folded into B)."""
    rules = _rules(model)
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name = key.removeprefix(PREFIX)
        for kind in ("lora_A", "lora_B"):
            if name.endswith(f".{kind}.weight"):
                per_module.setdefault(name[: -len(f".{kind}.weight")], {})[kind] = value.float()
                break
        else:
            if not name.endswith(".alpha"):
                raise ValueError(f"{key!r} is not a LoRA weight (lora_A / lora_B) in diffusers' SD3 naming")
    deltas: dict[str, torch.Tensor] = {}
    for ours, rule in rules.items():
        theirs = [t[: -len(".weight")] for t in rule.theirs]
        if not any(t in per_module for t in theirs):
            continue
        parts = []
        for t in theirs:
            ab = per_module.pop(t, None)
            shape = model.get_parameter(f"{ours}.weight").shape
            rows = shape[0] // len(theirs)
            parts.append(ab["lora_B"] @ ab["lora_A"] if ab else torch.zeros(rows, shape[1]))
        delta = torch.cat(parts, dim=0)
        if rule.op == "swap":
            top, bottom = delta.chunk(2, dim=0)
            delta = torch.cat([bottom, top], dim=0)
        deltas[f"{ours}.weight"] = delta
    if per_module:
        unknown = sorted(per_module)[:5]
        raise ValueError(f"LoRA modules {unknown} match no layer of this transformer (wrong model family?)")
    return deltas


@torch.no_grad()
def load_lora(model: nn.Module, path: str | Path | dict[str, torch.Tensor], scale: float = 1.0) -> nn.Module:
    """Merge a diffusers-format SD3 LoRA (file or state dict) into ``model``: W <- W + scale * B @ A."""
    from safetensors.torch import load_file

    sd = load_file(str(path)) if not isinstance(path, dict) else path
    for name, delta in _deltas_from_file(sd, model).items():
        p = model.get_parameter(name)
        p.add_(delta.to(p) * scale)
    return model


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
