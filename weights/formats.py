"""The contract between a model family (SD3, Flux) and the checkpoint I/O in ``mmdit_flow.weights``.

Each family module (``sd3_keys.py``, ``flux_keys.py``) builds one ``KeyFormat``; the loader and saver only
talk to families through it. State dicts are plain ``{name: tensor}`` dicts; "ours" means the names of our
``nn.Module``; "diffusers" the names of diffusers' transformer class; "original" the single-file checkpoint
names (SD3 ``model.diffusion_model.*`` stripped of that prefix, or BFL Flux names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class KeyFormat:
    name: str  # "sd3" | "flux"
    config_cls: type  # our config dataclass
    model_cls: type[nn.Module]  # built as model_cls(config)
    diffusers_class_name: str  # "_class_name" in a diffusers config.json
    config_from_diffusers: Callable[[dict[str, Any]], Any]  # diffusers config.json dict -> our config
    config_to_diffusers: Callable[[Any], dict[str, Any]]  # our config -> diffusers config.json dict
    config_from_original: Callable[[StateDict], Any]  # original single-file state dict -> our config
    # do these (prefix-stripped) keys look like this family's original checkpoint?
    is_original: Callable[[StateDict], bool]
    from_diffusers: Callable[[StateDict, Any], StateDict]  # (diffusers sd, our config) -> our sd
    to_diffusers: Callable[[StateDict, Any], StateDict]  # (our sd, our config) -> diffusers sd
    from_original: Callable[[StateDict, Any], StateDict]  # (original sd, our config) -> our sd
    to_original: Callable[[StateDict, Any], StateDict]  # (our sd, our config) -> original sd
