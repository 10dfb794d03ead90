"""LoRA files: find, read and write them; turn them into each layer's factors; merge them into a model.

A LoRA on a linear layer W [out, in] adds ``delta W = scale * B @ A`` with A [r, in], B [out, r]. A file
names each adapted layer's factors in some format's module names (``lora_formats.py``: diffusers / peft,
ai-toolkit, kohya sd-scripts, ComfyUI), for the transformer and, in whole-pipeline files, the text encoders.

A layer's factors follow the key-map rule of the layer's ``.weight`` (``keymap.module_rules`` of the family's
table). Our attention projects q, k and v with one fused ``qkv`` layer where diffusers has ``to_q``, ``to_k``,
``to_v`` (Flux's single-block ``linear1`` is those three plus ``proj_mlp``); a LoRA on the fused layer is
exactly LoRAs on the parts with the same A and B split by rows:

    delta [W_q; W_k; W_v] = s * [B_q; B_k; B_v] @ A   =>   delta W_q = s * B_q @ A, ...

so writing gives A to each part and B in row blocks (``keymap.split``; a ``swap`` rule exchanges B's halves),
with the scale folded into B, so every written adapter has scale 1 whatever alpha a reader assumes. Reading
goes the other way for any such file (separate A per part included): the parts' A stacked, their scaled B as
the blocks of a block-diagonal B (zero rows for parts the file leaves out), joined by the rule
(``keymap.join``): one exact low-rank factor pair for our layer.

Several LoRAs at once, each with a weight, and unloading: ``lora_adapters.py``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from mmdit_flow.weights.formats import KeyFormat, StateDict
from mmdit_flow.weights.io import (
    PICKLE_SUFFIXES,
    Checkpoint,
    CheckpointError,
    _names,
    read_checkpoint,
    save_file,
)
from mmdit_flow.weights.keymap import Rule, join, split
from mmdit_flow.weights.lora_formats import (
    DIFFUSERS,
    NAMINGS,
    LoraNaming,
    Scales,
    format_of,
    linear_rules,
    looks_like,
    transformer_rules,
)
from mmdit_flow.weights.transformer import family_of_model

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name
LORA_WEIGHT_NAME_PICKLE = "pytorch_lora_weights.bin"
FAMILIES = ("sd3", "flux")  # model families whose LoRA files this version reads and writes
TRANSFORMER = "transformer"


class LoraLayer(NamedTuple):
    """One adapted linear layer: delta W = scale * B @ A."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float


def _family(model: nn.Module) -> tuple[KeyFormat, nn.Module]:
    """The family and the bare model (inside compile / DDP wrappers) of a transformer we have LoRAs for."""
    fam, inner = family_of_model(model)
    if fam.name not in FAMILIES:
        raise ValueError(
            f"LoRA files for {fam.name} transformers are not supported; this version reads and writes "
            f"LoRAs of {', '.join(FAMILIES)} transformers"
        )
    return fam, inner


# ---------------------------------------------------------------------------------------------------- writing


def lora_state_dict(
    model: nn.Module, layers: dict[str, LoraLayer], naming: LoraNaming = DIFFUSERS
) -> StateDict:
    """``layers`` (our module name -> its LoRA) as the tensors of a transformer LoRA file in ``naming``."""
    fam, inner = _family(model)
    rules = transformer_rules(fam, inner.config, naming)
    prefix = naming.prefix(fam.name, TRANSFORMER) or ""
    out: StateDict = {}
    for name, (A, B, scale) in layers.items():
        if name not in rules:
            raise ValueError(f"{name} has a LoRA but no {naming.name} name; adapt its linear layers only")
        rule = rules[name]
        for module, b in zip(rule.theirs, split(rule, B * scale), strict=True):
            out[naming.key(prefix, module, "A")] = A.clone().contiguous()
            out[naming.key(prefix, module, "B")] = b.contiguous()
    return out


def write_lora(
    model: nn.Module, layers: dict[str, LoraLayer], path: str | os.PathLike, naming: LoraNaming = DIFFUSERS
) -> Path:
    """Write ``layers`` as a safetensors LoRA file (atomically); in diffusers' naming, diffusers'
    ``load_lora_weights`` reads it (SD3 and Flux)."""
    return save_file(lora_state_dict(model, layers, naming), path)


# ---------------------------------------------------------------------------------------------------- reading


def find_lora_file(
    path: str | os.PathLike, *, weight_name: str | None = None, allow_pickle: bool = False
) -> Path:
    """The LoRA file at ``path``: the file itself, or in a folder (as diffusers looks) ``weight_name``,
    else ``pytorch_lora_weights.safetensors``, else its one ``.safetensors`` file; pickle files
    (``pytorch_lora_weights.bin`` or a single ``.bin``) only with ``allow_pickle=True``."""
    path = Path(path)
    if weight_name is not None:
        path = path / weight_name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass a LoRA .safetensors file or a folder holding one"
        )
    if path.is_file():
        return path
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    for pickle, suffixes, default in (
        (False, (".safetensors",), LORA_WEIGHT_NAME),
        (True, PICKLE_SUFFIXES, LORA_WEIGHT_NAME_PICKLE),
    ):
        found = [p for p in files if p.name.endswith(suffixes)]
        if not found:
            continue
        if pickle and not allow_pickle:
            raise CheckpointError(
                f"{path} holds only pickle weight files ({_names([p.name for p in found])}), which can run "
                "arbitrary code when loaded; if you trust them pass allow_pickle=True (read with "
                "torch.load(weights_only=True)), or pass a .safetensors LoRA"
            )
        if (path / default).is_file():
            return path / default
        if len(found) == 1:
            return found[0]
        raise CheckpointError(
            f"{path} holds several weight files ({_names([p.name for p in found])}) and no {default}; "
            "pass weight_name= or the path of the LoRA file"
        )
    listing = f"it holds {_names([p.name for p in files])}" if files else "it is empty"
    raise CheckpointError(f"{path} has no LoRA file ({LORA_WEIGHT_NAME} or one .safetensors file): {listing}")


def read_lora(
    path: str | os.PathLike, *, weight_name: str | None = None, allow_pickle: bool = False
) -> StateDict:
    """The tensors of a LoRA file, or of the LoRA file in a folder (see ``find_lora_file``)."""
    return read_lora_checkpoint(path, weight_name=weight_name, allow_pickle=allow_pickle).state_dict


def read_lora_checkpoint(
    path: str | os.PathLike, *, weight_name: str | None = None, allow_pickle: bool = False
) -> Checkpoint:
    """The tensors and the metadata (diffusers' ``lora_adapter_metadata``) of a LoRA file or folder."""
    file = find_lora_file(path, weight_name=weight_name, allow_pickle=allow_pickle)
    return read_checkpoint(file, allow_pickle=allow_pickle)


Targets = dict[str, nn.Module]  # "transformer" / "text_encoder" / ... -> the model a file may adapt
Layers = dict[tuple[str, str], LoraLayer]  # (target, our module) -> its LoRA


def _lookups(naming: LoraNaming, fam: KeyFormat, targets: Targets) -> tuple[dict, dict, dict]:
    """The keys ``naming`` gives every factor and alpha of the targets' layers, and each target's rules."""
    factors: dict[str, tuple[str, str, str, str]] = {}  # key -> (target, prefix, their module, factor)
    alphas: dict[str, tuple[str, str]] = {}
    rules: dict[str, dict[str, Rule]] = {}
    for target, model in targets.items():
        prefix = naming.prefix(fam.name, target)
        if prefix is None:
            continue
        if target == TRANSFORMER:
            rules[target] = transformer_rules(fam, model.config, naming)
        else:
            rules[target] = linear_rules(model)
        for rule in rules[target].values():
            for module in rule.theirs:
                for factor in ("A", "B"):
                    factors[naming.key(prefix, module, factor)] = (target, prefix, module, factor)
                alphas[naming.alpha_key(prefix, module)] = (target, module)
    return factors, alphas, rules


def _no_match(keys: list[str], fam: KeyFormat, targets: Targets, naming: LoraNaming | None) -> ValueError:
    """The error for keys that match no layer: name a few, their format and the family they look like."""
    shown = _names(sorted(keys), 4)
    family = looks_like(keys)
    where = f" in the {naming.name} format" if naming is not None else " in any format we read"
    msg = f"LoRA keys {shown} match no layer of this {fam.name} model{where}"
    if family is not None and family != fam.name:
        names = {"flux": "Flux", "sd3": "SD3"}
        return ValueError(
            f"this is a {names[family]} LoRA ({format_of(keys)} keys) and the model is {names[fam.name]}: "
            f"{msg}; load it into a {names[family]} model"
        )
    encoders = [k for k in keys if k.split(".")[0] in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    encoders += [k for k in keys if k.startswith("lora_te")]
    if encoders and not any(t != TRANSFORMER for t in targets):
        return ValueError(
            f"{msg}: {_names(encoders, 2)} adapt the text encoders; load the file into a pipeline "
            "(pipe.load_lora) to adapt them too"
        )
    return ValueError(
        f"{msg} ({format_of(keys)} keys): is the LoRA for another model family, for text encoders this "
        "pipeline does not have, or for other layers (norms, embeddings)?"
    )


def _mixed(
    sd: StateDict, unknown: list[str], naming: LoraNaming, fam: KeyFormat, targets: Targets
) -> ValueError | None:
    """The error for a file whose keys outside ``naming`` are another format's (half of it would load)."""
    for other in NAMINGS:
        if other.name == naming.name:
            continue
        factors, alphas, _ = _lookups(other, fam, targets)
        theirs = [k for k in unknown if k in factors or k in alphas]
        if theirs:
            ours, theirs = sorted(set(sd) - set(unknown)), sorted(theirs)
            return ValueError(
                f"the LoRA mixes two formats: {len(ours)} keys in the {naming.name} format "
                f"({_names(ours, 3)}) and {len(theirs)} in the {other.name} format ({_names(theirs, 3)}); "
                "a file holds one format: write each part to its own file and load both (two pipe.load_lora "
                "calls, or --lora twice)"
            )
    return None


def _naming_of(sd: StateDict, fam: KeyFormat, targets: Targets) -> tuple[LoraNaming, dict, dict, dict]:
    """The format whose generated keys match most of the file's, with its lookups and rules."""
    best = None
    for naming in NAMINGS:
        factors, alphas, rules = _lookups(naming, fam, targets)
        n = sum(k in factors for k in sd)
        if n and (best is None or n > best[0]):
            best = (n, naming, factors, alphas, rules)
    if best is None:
        raise _no_match(list(sd), fam, targets, None)
    return best[1:]


def _scaled_parts(found: dict, prefixes: dict[str, str], naming: LoraNaming, scales: Scales) -> dict:
    """{(target, their module): (A, B, scale)}, each module's factors checked to be both there and to fit."""
    parts: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    for (target, module), ab in found.items():
        prefix = prefixes[target]
        if ab.keys() != {"A", "B"}:
            (have,) = ab
            missing = naming.key(prefix, module, "B" if have == "A" else "A")
            raise ValueError(
                f"the LoRA has {naming.key(prefix, module, have)} but not {missing}; the file is incomplete"
            )
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            a_key, b_key = naming.key(prefix, module, "A"), naming.key(prefix, module, "B")
            raise ValueError(
                f"{a_key} has rank {A.shape[0]} but {b_key} has rank {B.shape[-1]} (shapes {list(A.shape)} "
                f"and {list(B.shape)}); the file is damaged"
            )
        parts[(target, module)] = (A, B, scales.scale(target, prefix, module, A.shape[0]))
    return parts


def parse_lora(targets: Targets, sd: StateDict, metadata: dict[str, str] | None = None) -> Layers:
    """A LoRA file's tensors (and metadata) -> the LoRA of each adapted layer of ``targets`` (one must be
    ``"transformer"``), alpha folded into B as diffusers would scale it; the format is the one whose
    generated keys match the file's."""
    fam, inner = _family(targets[TRANSFORMER])
    targets = {**targets, TRANSFORMER: inner}
    if not sd:
        raise ValueError("the LoRA holds no tensors; is it the right file?")
    naming, factor_keys, alpha_keys, rules = _naming_of(sd, fam, targets)
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    prefixes: dict[str, str] = {}
    alpha_values, unknown = {}, []
    for key, value in sd.items():
        if key in factor_keys:
            target, prefix, module, factor = factor_keys[key]
            found.setdefault((target, module), {})[factor] = value.float()
            prefixes[target] = prefix
        elif key in alpha_keys:
            alpha_values[key] = float(value)
        else:
            unknown.append(key)
    if unknown:
        raise _mixed(sd, unknown, naming, fam, targets) or _no_match(unknown, fam, targets, naming)
    parts = _scaled_parts(found, prefixes, naming, Scales.of(naming, alpha_values, metadata or {}))
    layers: Layers = {}
    for target, table in rules.items():
        for ours, rule in table.items():
            present = [parts.get((target, m)) for m in rule.theirs]
            if any(p is not None for p in present):
                weight = targets[target].get_parameter(f"{ours}.weight")
                layers[(target, ours)] = _layer(rule, present, weight, target)
    return layers


def _layer(rule: Rule, parts: list, weight: torch.Tensor, target: str) -> LoraLayer:
    """Our layer's LoRA from its parts' (A, B, scale): A stacked, scaled B block-diagonal, joined by rule."""
    if weight.ndim != 2:
        raise ValueError(f"the LoRA adapts {', '.join(rule.theirs)}, which is not a linear layer")
    n = len(rule.theirs)
    rows = rule.sizes or (weight.shape[0] // n,) * n
    rank = sum(p[0].shape[0] for p in parts if p is not None)
    As, Bs, at = [], [], 0
    for module, r, part in zip(rule.theirs, rows, parts, strict=True):
        block = torch.zeros(r, rank)
        if part is not None:
            A, B, scale = part
            if (B.shape[0], A.shape[1]) != (r, weight.shape[1]):
                raise ValueError(
                    f"the LoRA of {target} layer {module} is {B.shape[0]} x {A.shape[1]} (B {list(B.shape)}, "
                    f"A {list(A.shape)}) but that layer's weight is {r} x {weight.shape[1]}: the LoRA is for "
                    "a model of other sizes"
                )
            block[:, at : at + A.shape[0]] = B * scale
            As.append(A)
            at += A.shape[0]
        Bs.append(block)
    return LoraLayer(torch.cat(As), join(rule, Bs), 1.0)


def lora_deltas(model: nn.Module, sd: StateDict, metadata: dict[str, str] | None = None) -> StateDict:
    """The tensors of a transformer LoRA file -> {our parameter name: delta W = scale * B @ A}."""
    return {
        f"{name}.weight": layer.scale * layer.B @ layer.A
        for (_, name), layer in parse_lora({TRANSFORMER: model}, sd, metadata).items()
    }


def lora_source(
    lora: str | os.PathLike | StateDict, weight_name: str | None, allow_pickle: bool
) -> tuple[StateDict, dict[str, str]]:
    """The tensors and file metadata of a LoRA given as a path or as its tensors."""
    if isinstance(lora, dict):
        return lora, {}
    checkpoint = read_lora_checkpoint(lora, weight_name=weight_name, allow_pickle=allow_pickle)
    return checkpoint.state_dict, checkpoint.metadata


@torch.no_grad()
def load_lora(
    model: nn.Module,
    lora: str | os.PathLike | StateDict,
    scale: float = 1.0,
    *,
    weight_name: str | None = None,
    allow_pickle: bool = False,
) -> nn.Module:
    """Merge a transformer LoRA (a file in any format of ``lora_formats``, a folder holding one, or its
    tensors) into ``model``: W <- W + scale * B @ A. Merging again adds again; reload the model to remove a
    LoRA (or use ``lora_adapters.LoraAdapters``, as a pipeline does)."""
    sd, metadata = lora_source(lora, weight_name, allow_pickle)
    _, inner = _family(model)
    for (_, name), layer in parse_lora({TRANSFORMER: model}, sd, metadata).items():
        p = inner.get_parameter(f"{name}.weight")
        p.add_((layer.B @ layer.A * (layer.scale * scale)).to(p))
    return model
