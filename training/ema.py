"""EMA weights: an exponential moving average of the trainable parameters, kept in fp32.

    ema <- decay * ema + (1 - decay) * w        (after every ``ema.every`` optimizer steps)

Saved as a safetensors file (the shadow tensors, named like the model's parameters, with ``decay`` in the
file's metadata), never as a pickle: a checkpoint folder must not be able to run code when resumed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from mmdit_flow.weights.io import CheckpointError, read_checkpoint, save_file


class EMA:
    """Exponential moving average of the trainable weights: ema <- decay * ema + (1 - decay) * w (fp32)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable weights with the EMA weights."""
        params = dict(model.named_parameters())
        for n, w in self.shadow.items():
            params[n].copy_(w)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the EMA weights for the duration of the block (validation, export)."""
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    params[n].copy_(w)

    def save(self, path: str | Path) -> Path:
        """Write the shadow weights to a safetensors file, the decay in its metadata (exact, as ``repr``)."""
        return save_file(self.shadow, path, metadata={"decay": repr(self.decay)})

    def load(self, path: str | Path) -> None:
        """Read what ``save`` wrote; the parameter names and shapes must be those of this EMA exactly."""
        ckpt = read_checkpoint(path)
        missing = sorted(self.shadow.keys() - ckpt.state_dict.keys())
        unexpected = sorted(ckpt.state_dict.keys() - self.shadow.keys())
        shapes = [n for n in self.shadow.keys() & ckpt.state_dict.keys()
                  if ckpt.state_dict[n].shape != self.shadow[n].shape]  # fmt: skip
        if missing or unexpected or shapes:
            raise CheckpointError(
                f"{path} does not match the trained parameters (missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, other shapes {sorted(shapes)[:5]}): it was saved with another model "
                "or LoRA config; resume with the config it was trained with"
            )
        try:
            decay = float(ckpt.metadata["decay"])
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: its metadata has no valid 'decay' ({err})") from err
        if not math.isfinite(decay) or not 0 <= decay < 1:
            raise CheckpointError(f"{path}: decay {decay} in its metadata is not in [0, 1)")
        self.decay = decay
        with torch.no_grad():
            for n, w in ckpt.state_dict.items():
                self.shadow[n].copy_(w)
