"""The tiny-emoji model's components: tokenizers and text encoders from the caption corpus, and the VAE.

The builders are tiny-shapes' (:mod:`mmdit_flow.training.recipes.tiny_shapes.components`), given this data:

* the tokenizers learn the words of :func:`caption_corpus` (every name and alias of every emoji in every
  training phrasing, and every stated background); the held-out phrasings bring two words they never
  saw, "drawing" and "image" (the validation phrasing none);
* the CLIP encoders are random (seeds ``seed``, ``seed + 1``) and so is the T5 (``seed + 2``). A T5
  trained as a caption tagger (``t5="tagger"``, :mod:`~mmdit_flow.training.recipes.tiny_emoji.tagger`)
  learns the training phrasings so well that it keeps a name's identity worse under new ones than the
  random T5 does (docs/tiny-emoji.md, ``bench/emoji_t5.py``), so the recipe keeps it random;
* the VAE (16 latent channels, downsampling 4, as tiny-shapes') trains on rendered training-split samples
  and is judged by :func:`evaluate_vae`: PSNR, and the emoji judge's top-1 on its reconstructions of
  validation-split samples (a VAE that loses which emoji it was caps every model built on it).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmdit_flow.training.recipes.tiny_emoji import emoji_set as E
from mmdit_flow.training.recipes.tiny_emoji import tagger
from mmdit_flow.training.recipes.tiny_shapes import components as shapes_components
from mmdit_flow.training.recipes.tiny_shapes import vae_train

PROMPT_TOKENS = 32  # the longest caption of every split is 19 CLIP and 23 T5 tokens
VAE_ARCH = vae_train.VAEArch(block_out_channels=(32, 64, 64))
VAE_STEPS = 4000
VAE_BATCH = 8
# Unweighted loss: tiny-shapes' extra weight on object pixels (4) left a tinted background and 22.2 dB,
# 83 % judge top-1 after 3000 steps; weight 0 and 4000 steps: 27.5 dB, 94.7 % (docs/tiny-emoji.md).
VAE_FOREGROUND_WEIGHT = 0.0
T5_CHOICES = ("random", "tagger")


def caption_corpus() -> list[str]:
    """Every name and alias of every emoji in every training phrasing, then each stated background once."""
    texts = [E.phrase(n, t) for e in E.catalogue() for n in e.names for t in E.TEMPLATES["train"]]
    return texts + [E.phrase("cat", "{a} {name}", bg) for bg in E.BACKGROUNDS]


def images(start: int, n: int, *, seed: int = 0, split: str = "train") -> torch.Tensor:
    """Samples ``start .. start + n - 1`` of a split, rendered: float32 [n, 3, 64, 64] in [-1, 1]."""
    x = np.stack([E.render(E.sample_at(i, seed=seed, split=split)) for i in range(start, start + n)])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def build_text_encoders(
    out_dir: str | Path,
    seed: int = 0,
    *,
    t5: str = "random",
    tagger_cfg: tagger.TaggerConfig | None = None,
) -> dict[str, Any]:
    """The tokenizers and the three text encoders, written into ``out_dir`` (SD3 layout): random CLIPs and
    a random T5, or with ``t5="tagger"`` the T5 trained as the caption tagger (``tagger_cfg``, seeded
    with ``seed``); ``"t5"`` of the result is then what the tagger's training measured."""
    if t5 not in T5_CHOICES:
        raise ValueError(f"t5 must be one of {', '.join(T5_CHOICES)}, got {t5!r}")
    paths = shapes_components.build_text_encoders(
        out_dir, seed, texts=caption_corpus(), prompt_tokens=PROMPT_TOKENS, train_t5=False
    )
    if t5 == "tagger":
        from transformers import T5EncoderModel, T5TokenizerFast

        tokenizer = T5TokenizerFast.from_pretrained(paths["tokenizer_3"])
        model = T5EncoderModel.from_pretrained(paths["text_encoder_3"])
        paths["t5"] = tagger.train_tagger(model, tokenizer, tagger_cfg or tagger.TaggerConfig(seed=seed))
        model.save_pretrained(paths["text_encoder_3"], safe_serialization=True)
    return paths


def evaluate_vae(vae: Any, n: int = 300, seed: int = 0) -> dict:
    """PSNR and the judge's top-1 / top-5 on reconstructions of ``n`` validation-split samples (against
    those of the originals), and the latents' statistics after the config's normalisation."""
    from mmdit_flow.training.recipes.tiny_emoji import judge

    x = images(0, n, seed=seed, split="validation")
    recon = vae_train.reconstruct(vae, x)
    targets = [E.sample_at(i, seed=seed, split="validation").emoji for i in range(n)]
    result = judge.score(judge.retrieve(list(vae_train.to_uint8(recon))), targets)
    z = (vae_train.encode_means(vae, x) - vae.config.shift_factor) * vae.config.scaling_factor
    return {
        "psnr_db": vae_train.psnr(x, recon),
        "judge_top1": result.top1,
        "judge_top5": result.top5,
        "judge_per_category_top1": {k: v[1] for k, v in result.per_category.items()},
        "latent_mean": float(z.mean()),
        "latent_std": float(z.std()),
        "n_images": n,
    }


def train_vae(
    out_dir: str | Path,
    steps: int = VAE_STEPS,
    seed: int = 0,
    *,
    arch: vae_train.VAEArch = VAE_ARCH,
    eval_images: int = 300,
    **train_kw: Any,
) -> dict:
    """Build, train (on rendered training samples) and evaluate the VAE; save it to ``out_dir/vae``."""
    train_kw.setdefault("batch_size", VAE_BATCH)
    train_kw.setdefault("foreground_weight", VAE_FOREGROUND_WEIGHT)
    cfg = vae_train.VAETrainConfig(steps=steps, seed=seed, **train_kw)
    vae = vae_train.build_vae(arch, seed=seed)
    metrics = vae_train.train_vae_model(vae, cfg, images=images).to_dict()
    metrics.update(evaluate_vae(vae, eval_images, seed=seed))
    vae.save_pretrained(Path(out_dir) / "vae", safe_serialization=True)
    return metrics


def build_components(
    out_dir: str | Path, *, seed: int = 0, vae_steps: int = VAE_STEPS, t5: str = "random"
) -> dict:
    """Tokenizers, text encoders (``t5``: see :func:`build_text_encoders`) and the VAE into ``out_dir``;
    returns what was measured."""
    report: dict[str, Any] = {"seed": seed}
    start = time.perf_counter()
    tagged = build_text_encoders(out_dir, seed, t5=t5).get("t5")
    if tagged is not None:
        report["t5_tagger"] = tagged.to_dict()
    report["text_encoders_s"] = time.perf_counter() - start
    report["vae"] = train_vae(out_dir, vae_steps, seed)
    (Path(out_dir) / "LICENSE-emoji.txt").write_text(E.LICENSE + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tiny-emoji components: tokenizers, text encoders, VAE")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    parser.add_argument("--t5", choices=T5_CHOICES, default="random", help="random (the recipe) or a tagger")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    parser.add_argument("--report", type=Path, default=None, help="also write the measurements here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    report = build_components(args.out, seed=args.seed, vae_steps=args.vae_steps, t5=args.t5)
    text = json.dumps(report, indent=1)
    print(text)
    if args.report is not None:
        args.report.write_text(text)
