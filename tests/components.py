"""Offline builders for tiny random SD3 and Flux component sets, reusable by any test.

Nothing is downloaded: the tokenizers are built from small local vocabularies, the text encoders, VAE and
transformer are random and tiny (a pipeline call takes well under a second on one CPU core). Every model is
returned in eval mode (T5 and CLIP have dropout).

``sd3_components()`` / ``flux_components()`` return the keyword arguments of diffusers'
``StableDiffusion3Pipeline`` / ``FluxPipeline``; ``save_diffusers_folder`` writes them as a diffusers folder
that both diffusers and ``mmdit_flow.pipelines.TextToImagePipeline.from_pretrained`` read.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

CLIP_MAX_LENGTH = 77  # the CLIP tokenizers' model_max_length (as in the real checkpoints)
T5_MAX_LENGTH = 512  # the T5 tokenizer's model_max_length
# words with a token of their own in the T5 vocabulary (everything else falls back to characters)
T5_WORDS = [
    "a",
    "cat",
    "dog",
    "photo",
    "of",
    "the",
    "red",
    "blue",
    "on",
    "in",
    "and",
    "with",
    "bad",
    "blurry",
]


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: one printable character per byte value (256 characters)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer over all 256 byte characters and their ``</w>`` forms, plus a few word merges."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in ["cat", "dog", "the", "photo"]:  # merge left to right: c a t</w> -> ca t</w> -> cat</w>
        piece = word[0]
        for i, c in enumerate(word[1:], start=1):
            right = c + "</w>" if i == len(word) - 1 else c
            merges.append((piece, right))
            piece = piece + right
            vocab.setdefault(piece, len(vocab))
    if pad_token not in vocab:
        vocab[pad_token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    """A T5 (Unigram) tokenizer built from a sentencepiece ``(piece, score)`` list."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in T5_WORDS]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + c, -4.0) for c in string.ascii_letters + string.digits if c not in T5_WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def clip_encoder(tokenizer, hidden: int, projection: int | None, seed: int):
    """A tiny random CLIP text encoder; ``projection=None`` gives Flux's ``CLIPTextModel``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection or hidden,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def t5_encoder(tokenizer, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def vae(
    latent_channels: int, seed: int, shift_factor: float | None, scaling_factor: float, force_upcast=True
):
    """A two-level AutoencoderKL: the latent is half the image size (``vae_scale_factor`` 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=force_upcast,
    ).eval()


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Fill every parameter with random values: diffusers zero-initialises the output layers and the adaLN
    modulations, which would make every velocity zero and the parity tests vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def sd3_components(*, t5: bool = True, sd35: bool = False, shift: float = 3.0, dynamic: bool = False) -> dict:
    """Tiny SD3 (or SD3.5 with ``sd35=True``: qk RMSNorm and dual attention) components for
    ``diffusers.StableDiffusion3Pipeline(**components)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tok_l, tok_g, tok_t5 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    extra: dict[str, Any] = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        caption_projection_dim=16,
        pooled_projection_dim=24,  # CLIP-L projection (8) + CLIP-G projection (16)
        pos_embed_max_size=16,
        **extra,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=shift,
        use_dynamic_shifting=dynamic,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=16,
        max_image_seq_len=256,
    )
    return {
        "transformer": _randomize(transformer, 1, scale=0.12),
        "scheduler": scheduler,
        "vae": vae(4, seed=2, shift_factor=0.0609, scaling_factor=1.5035),
        "text_encoder": clip_encoder(tok_l, hidden=16, projection=8, seed=3),
        "text_encoder_2": clip_encoder(tok_g, hidden=24, projection=16, seed=4),
        "text_encoder_3": t5_encoder(tok_t5, d_model=48, seed=5) if t5 else None,
        "tokenizer": tok_l,
        "tokenizer_2": tok_g,
        "tokenizer_3": tok_t5 if t5 else None,
    }


def flux_components(*, guidance_embeds: bool = True) -> dict:
    """Tiny Flux components (dev-like with ``guidance_embeds=True``, schnell-like without) for
    ``diffusers.FluxPipeline(**components)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tok_clip, tok_t5 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=16,
        max_image_seq_len=256,
    )
    return {
        "transformer": _randomize(transformer, 1, scale=0.2),
        "scheduler": scheduler,
        "vae": vae(4, seed=2, shift_factor=0.1159, scaling_factor=0.3611),
        "text_encoder": clip_encoder(tok_clip, hidden=16, projection=None, seed=3),
        "text_encoder_2": t5_encoder(tok_t5, d_model=32, seed=5),
        "tokenizer": tok_clip,
        "tokenizer_2": tok_t5,
    }


def diffusers_pipeline(components: dict):
    """The diffusers pipeline (``StableDiffusion3Pipeline`` or ``FluxPipeline``) for a component set."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Pipeline if "tokenizer_3" in components else FluxPipeline
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_diffusers_folder(components: dict, path: str | Path) -> Path:
    """Write the components as a diffusers pipeline folder (safetensors) and return its path."""
    diffusers_pipeline(components).save_pretrained(str(path))
    return Path(path)
