"""The contract between a model family (SD3, Flux) and the checkpoint I/O in ``mmdit_flow.weights``.

Each family module (``sd3_keys.py``, ``flux_keys.py``) builds one ``KeyFormat``; the loader and saver only
talk to families through it. State dicts are plain ``{name: tensor}`` dicts; "ours" means the names of our
``nn.Module``; "diffusers" the names of diffusers' transformer class; "original" the single-file checkpoint
names (SD3 ``model.diffusion_model.*`` stripped of that prefix, or BFL Flux names). A family states each
format as a table of ``keymap.Rule``; the engine in ``keymap.py`` applies it either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from mmdit_flow.weights.keymap import Rule, StateDict, to_ours, to_theirs

__all__ = ["KeyFormat", "StateDict"]


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
    diffusers_rules: Callable[[Any], list[Rule]]  # our config -> ours <-> diffusers rules
    original_rules: Callable[[Any], list[Rule]]  # our config -> ours <-> original rules

    def from_diffusers(self, sd: StateDict, config: Any) -> StateDict:
        return to_ours(sd, self.diffusers_rules(config))

    def to_diffusers(self, sd: StateDict, config: Any) -> StateDict:
        return to_theirs(sd, self.diffusers_rules(config))

    def from_original(self, sd: StateDict, config: Any) -> StateDict:
        return to_ours(sd, self.original_rules(config))

    def to_original(self, sd: StateDict, config: Any) -> StateDict:
        return to_theirs(sd, self.original_rules(config))
