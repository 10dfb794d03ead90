"""Prompt encoding for SD3 / SD3.5 and Flux, numerically equal to diffusers' pipelines.

Glossary: ``txt`` the text tokens the transformer attends to, [B, L, D]; ``vec`` the pooled text vector,
[B, P].

- SD3: ``txt`` = [pad_D(CLIP-L penultimate ++ CLIP-G penultimate) ; T5], the two CLIPs concatenated on the
  feature axis, zero-padded to the T5 width D, then the T5 tokens appended on the sequence axis
  (77 + max_sequence_length tokens); ``vec`` = CLIP-L pooled ++ CLIP-G pooled. Without T5 its tokens are
  zeros.
- Flux: ``txt`` = T5 tokens (max_sequence_length); ``vec`` = CLIP-L pooled output.

CLIP pads to its tokenizer's ``model_max_length`` (77 in the released checkpoints). ``max_sequence_length``
defaults to 256 (SD3) / 512 (Flux), or to the T5 tokenizer's ``model_max_length`` where that is smaller: a
model trained on short prompts (the shipped tiny-shapes model: 32) records its length there.

Every encoder pads to its fixed length and runs without an attention mask, exactly as the reference does, so a
prompt's embedding does not depend on the other prompts of its batch. Over-long prompts are truncated with one
warning per encoder and call that names the text actually dropped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# T5 v1.1 was trained on 512-token inputs; diffusers refuses longer max_sequence_length as well.
T5_MAX_LENGTH = 512


@dataclass
class PromptEmbeds:
    """What the transformer is conditioned on: ``txt`` [B, L, D] and ``vec`` [B, P]."""

    txt: torch.Tensor
    vec: torch.Tensor

    def __len__(self) -> int:
        return self.txt.shape[0]

    def repeat(self, n: int) -> PromptEmbeds:
        """Each row repeated ``n`` times in place: [a, b] -> [a, a, b, b] (several images per prompt)."""
        return PromptEmbeds(self.txt.repeat_interleave(n, dim=0), self.vec.repeat_interleave(n, dim=0))

    def to(self, device=None, dtype=None) -> PromptEmbeds:
        return PromptEmbeds(self.txt.to(device=device, dtype=dtype), self.vec.to(device=device, dtype=dtype))

    @staticmethod
    def cat(parts: list[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(torch.cat([p.txt for p in parts]), torch.cat([p.vec for p in parts]))


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def tokenize(tokenizer: Any, prompts: list[str], max_length: int, encoder_name: str) -> torch.Tensor:
    """Token ids [B, max_length], padded and truncated as diffusers does; warns once if any prompt was cut.

    The dropped text is taken from the prompt's own token list: a tokenizer keeps the first
    ``max_length - (number of special tokens it adds)`` content tokens, so the dropped ones are the rest.
    (diffusers slices the T5 ids at CLIP's length, so its T5 warning names the wrong words.)
    """
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    content = tokenizer(prompts, add_special_tokens=False, verbose=False).input_ids
    keep = max_length - tokenizer.num_special_tokens_to_add()
    dropped = [tokenizer.decode(row[keep:]).strip() for row in content if len(row) > keep]
    if dropped:
        listing = "; ".join(repr(d) for d in dropped)
        warnings.warn(
            f"{encoder_name} keeps {max_length} tokens, so this part of your prompt was dropped: {listing}. "
            "Shorten the prompt"
            + (" or raise max_sequence_length." if encoder_name.startswith("T5") else "."),
            UserWarning,
            stacklevel=3,
        )
    return ids


class ClipEncoder:
    """CLIP: ``encode`` -> (penultimate hidden states [B, 77, W], pooled [B, P])."""

    def __init__(self, tokenizer: Any, model: torch.nn.Module, name: str):
        self.tokenizer, self.model, self.name = tokenizer, model, name
        self.max_length = int(tokenizer.model_max_length)

    @torch.no_grad()
    def encode(self, prompts: list[str], hidden: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        ids = tokenize(self.tokenizer, prompts, self.max_length, self.name)
        out = self.model(ids.to(_module_device(self.model)), output_hidden_states=hidden)
        # CLIPTextModelWithProjection (SD3) returns text_embeds first; CLIPTextModel (Flux) its pooler_output
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return (out.hidden_states[-2] if hidden else None), pooled


class T5Encoder:
    """A T5 tokenizer and encoder. ``encode`` -> last hidden states [B, max_sequence_length, D]."""

    def __init__(self, tokenizer: Any, model: torch.nn.Module):
        self.tokenizer, self.model = tokenizer, model
        self.width = int(model.config.d_model)
        self.limit = min(T5_MAX_LENGTH, int(tokenizer.model_max_length))

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        ids = tokenize(self.tokenizer, prompts, max_sequence_length, "T5")
        return self.model(ids.to(_module_device(self.model)))[0]


def check_max_sequence_length(max_sequence_length: int, limit: int) -> None:
    if type(max_sequence_length) is not int or not 1 <= max_sequence_length <= limit:  # bool is no int here
        raise ValueError(
            f"max_sequence_length must be an integer in [1, {limit}] (the T5 tokenizer's model_max_length, "
            f"at most {T5_MAX_LENGTH}), "
            f"got {max_sequence_length!r}; pass a value such as {min(256, limit)}, or none for the default."
        )


def sequence_length(requested: int | None, default: int, limit: int) -> int:
    """The T5 length to encode: ``requested`` (checked against ``limit``), or ``default`` capped at it."""
    n = min(default, limit) if requested is None else requested
    check_max_sequence_length(n, limit)
    return n


class SD3TextEncoder:
    """CLIP-L + CLIP-G (+ optional T5) as SD3 / SD3.5 use them."""

    default_max_sequence_length = 256

    def __init__(self, clip_l: ClipEncoder, clip_g: ClipEncoder, t5: T5Encoder | None, t5_width: int):
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.t5_width = t5.width if t5 is not None else t5_width
        self.limit = t5.limit if t5 is not None else T5_MAX_LENGTH

    def encode(self, prompts: list[str], max_sequence_length: int | None = None) -> PromptEmbeds:
        """txt = [pad_D(L_hidden ++ G_hidden) ; T5] [B, 77 + n, D]; vec = L_pooled ++ G_pooled [B, P]."""
        n = sequence_length(max_sequence_length, self.default_max_sequence_length, self.limit)
        hidden_l, pooled_l = self.clip_l.encode(prompts)
        hidden_g, pooled_g = self.clip_g.encode(prompts)
        hidden_g = hidden_g.to(hidden_l)
        clip = torch.cat([hidden_l, hidden_g], dim=-1)  # [B, 77, W_l + W_g]
        if self.t5 is not None:
            t5 = self.t5.encode(prompts, n)
        else:  # without T5 its tokens are zeros, as in diffusers
            t5 = torch.zeros(len(prompts), n, self.t5_width, device=clip.device, dtype=clip.dtype)
        clip = F.pad(clip, (0, self.t5_width - clip.shape[-1]))  # [B, 77, D]
        txt = torch.cat([clip.to(t5), t5], dim=1)  # [B, 77 + n, D]
        vec = torch.cat([pooled_l, pooled_g.to(pooled_l)], dim=-1)
        return PromptEmbeds(txt, vec)


class FluxTextEncoder:
    """CLIP-L pooled + T5 tokens as Flux uses them."""

    default_max_sequence_length = 512

    def __init__(self, clip: ClipEncoder, t5: T5Encoder):
        self.clip, self.t5 = clip, t5
        self.limit = t5.limit

    def encode(self, prompts: list[str], max_sequence_length: int | None = None) -> PromptEmbeds:
        """txt = T5 [B, max_sequence_length, D]; vec = CLIP pooled [B, P]."""
        n = sequence_length(max_sequence_length, self.default_max_sequence_length, self.limit)
        _, pooled = self.clip.encode(prompts, hidden=False)
        return PromptEmbeds(self.t5.encode(prompts, n), pooled)
