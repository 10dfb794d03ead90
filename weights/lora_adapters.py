"""Several LoRAs on a pipeline's models at once, each with a weight; unloading to the base weights.

Mechanism: the base value W0 of every adapted weight is kept, and whenever the adapters or their weights
change each adapted weight is recomputed, in place, as

    W = W0 + sum over active adapters i of  w_i * s_i * B_i @ A_i      (fp32, then the weight's dtype)

Why this and not peft's forward hooks: the models hold plain merged weights, so generating costs what it
costs without LoRAs, compiled blocks see the new values without compiling again, and ``unload`` copies W0
back bit for bit (subtracting the deltas again would leave rounding). The price is one copy of the adapted
layers' weights, which ``fuse`` frees by making the current weights the base.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from mmdit_flow.weights.formats import StateDict
from mmdit_flow.weights.lora import TRANSFORMER, Layers, Targets, lora_source, parse_lora
from mmdit_flow.weights.transformer import family_of_model


class LoraAdapters:
    """Named LoRAs on a set of models (a pipeline's transformer and text encoders), each active with a
    weight; see the module docstring for how."""

    def __init__(self, targets: Targets):
        self.targets = {k: v for k, v in targets.items() if v is not None}
        self.adapters: dict[str, Layers] = {}
        self.weights: dict[str, float] = {}  # the active adapters and their weights, in load order
        self._base: dict[tuple[str, str], torch.Tensor] = {}

    def _param(self, target: str, module: str) -> nn.Parameter:
        model = self.targets[target]
        if target == TRANSFORMER:
            model = family_of_model(model)[1]
        return model.get_parameter(f"{module}.weight")

    def load(
        self,
        lora: str | os.PathLike | StateDict,
        scale: float = 1.0,
        *,
        adapter_name: str | None = None,
        weight_name: str | None = None,
        allow_pickle: bool = False,
    ) -> str:
        """Add a LoRA as an adapter active at ``scale``; returns its name (``default_<n>`` when not given)."""
        name = adapter_name if adapter_name is not None else f"default_{len(self.adapters)}"
        if name in self.adapters:
            raise ValueError(
                f"adapter_name {name!r} is already loaded ({', '.join(self.adapters)}); choose another name "
                "or pipe.unload_lora() first"
            )
        _check_weight("scale", scale)
        sd, metadata = lora_source(lora, weight_name, allow_pickle)
        layers = parse_lora(self.targets, sd, metadata)
        for key in layers:
            if key not in self._base:
                self._base[key] = self._param(*key).detach().clone()
        self.adapters[name] = layers
        self.weights[name] = float(scale)
        self._apply()
        return name

    def set_adapters(self, names: str | list[str], weights: float | list[float] | None = None) -> None:
        """Make exactly ``names`` active, with ``weights`` (one each, or one for all; default 1)."""
        names = [names] if isinstance(names, str) else list(names)
        if unknown := [n for n in names if n not in self.adapters]:
            loaded = ", ".join(self.adapters) or "none"
            raise ValueError(f"adapter(s) {', '.join(map(repr, unknown))} are not loaded (loaded: {loaded})")
        if weights is None:
            weights = [1.0] * len(names)
        elif isinstance(weights, int | float):
            weights = [float(weights)] * len(names)
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(f"set_adapters got {len(names)} names but {len(weights)} weights; give one each")
        for w in weights:
            _check_weight("weights", w)
        self.weights = {n: float(w) for n, w in zip(names, weights, strict=True)}
        self._apply()

    def unload(self) -> None:
        """Remove every adapter: each adapted weight back to its base value, bit for bit."""
        self.weights = {}
        self._apply()
        self.adapters, self._base = {}, {}

    def fuse(self) -> None:
        """Keep the current weights as the base and drop the adapters (and the base copies they need)."""
        self.adapters, self.weights, self._base = {}, {}, {}

    @torch.no_grad()
    def _apply(self) -> None:
        for key, base in self._base.items():
            p = self._param(*key)
            terms = [
                (w, self.adapters[n][key]) for n, w in self.weights.items() if key in self.adapters[n] and w
            ]
            if not terms:
                p.copy_(base)
                continue
            w = base.to(p.device, torch.float32)
            for weight, layer in terms:
                A, B = layer.A.to(p.device), layer.B.to(p.device)
                w = w + (weight * layer.scale) * (B @ A)
            p.copy_(w.to(p.dtype))


def _check_weight(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (a LoRA's weight), not {value!r}")
