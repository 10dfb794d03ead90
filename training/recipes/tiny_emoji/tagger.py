"""Train the tiny-emoji T5 encoder as a caption tagger: every token learns which picture its caption names.

Why. A random T5's token outputs are nearly context-free (tiny-shapes' measurement, in
:mod:`mmdit_flow.training.recipes.tiny_shapes.text_train`), so the transformer must learn for itself that
the tokens "red" and "apple" together mean one of 1870 pictures. Trained as a tagger, the T5 hands it
tokens that already say which picture and which background the caption asks for.

Objective. A ``T5EncoderModel`` with linear heads on its last hidden state. Every token of a caption is
tagged with ``picture`` (the emoji's picture class, :func:`judge.picture_classes`: names of one glyph are
one class), ``background`` (the stated colour, or "unstated") and ``word`` (its own id, so a token keeps
saying which word it is). The loss is the sum of the heads' cross-entropies; the heads are discarded.

Only training-split captions are used. The held-out phrasings bring words the tokenizer never saw
("drawing", "image"), which reach the T5 as the unknown token; so that they do not throw it, ``unk_rate``
of the caption tokens are replaced by the unknown token during training. :func:`tagging_accuracy`
measures how the tags carry over to the validation and held-out phrasings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mmdit_flow.training.recipes.tiny_emoji import emoji_set as E
from mmdit_flow.training.recipes.tiny_shapes.text_train import IGNORE, fit_heads, tagging_accuracy

TAGS = ("picture", "background", "word")
BACKGROUND_CLASSES = ("unstated", *E.BACKGROUNDS)


@dataclass(frozen=True)
class TaggerConfig:
    """``steps`` AdamW steps of ``batch_size`` captions from the first ``captions`` training samples of
    ``seed``, learning rate ``lr`` with a cosine decay to 0, ``unk_rate`` of the caption tokens replaced
    by the unknown token, sequences padded to ``length`` tokens (the pipelines' 32)."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    captions: int = 37_400  # 20 per emoji
    length: int = 32
    unk_rate: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "captions", "length"):
            if getattr(self, name) < 1:
                raise ValueError(f"TaggerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TaggerConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.unk_rate < 1:
            raise ValueError(f"TaggerConfig.unk_rate must be in [0, 1), got {self.unk_rate}")


def token_tags(
    tokenizer: Any, samples: list[E.Sample], length: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token ids [N, length] of the samples' captions (padded as the pipelines pad them) and each tag per
    token [N, length]: every token of a caption (not the padding) carries its picture, its background and
    its own id."""
    from mmdit_flow.training.recipes.tiny_emoji import judge

    pictures = judge.picture_classes()
    enc = tokenizer(
        [E.caption(s) for s in samples],
        padding="max_length",
        max_length=length,
        truncation=True,
        return_tensors="pt",
    )
    ids = enc.input_ids
    real = enc.attention_mask.bool()
    picture = torch.tensor([int(pictures[s.emoji]) for s in samples])
    background = torch.tensor(
        [BACKGROUND_CLASSES.index(s.background) if s.show_background else 0 for s in samples]
    )
    tags = {
        "picture": torch.where(real, picture[:, None], IGNORE),
        "background": torch.where(real, background[:, None], IGNORE),
        "word": torch.where(real, ids, IGNORE),
    }
    return ids, tags


def _heads(width: int, vocab_size: int) -> torch.nn.ModuleDict:
    sizes = {"picture": len(E.catalogue()), "background": len(BACKGROUND_CLASSES), "word": vocab_size}
    return torch.nn.ModuleDict({name: torch.nn.Linear(width, n) for name, n in sizes.items()})


@dataclass
class EmojiTaggerResult:
    """What :func:`train_tagger` measured: the last step's loss, wall time, and the tag accuracy per
    split's phrasings (``train``: the first training captions; ``validation``, ``heldout``: one caption
    per emoji in those phrasings)."""

    steps: int
    final_loss: float
    seconds: float
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def train_tagger(
    model: torch.nn.Module, tokenizer: Any, cfg: TaggerConfig | None = None, eval_captions: int | None = None
) -> EmojiTaggerResult:
    """Train ``model`` (a ``T5EncoderModel``) in place as the emoji caption tagger and leave it in eval
    mode; the accuracy is measured on ``eval_captions`` captions of each split (default: one per emoji).
    Deterministic for a config on a given machine and thread count."""
    cfg = cfg or TaggerConfig()
    torch.manual_seed(cfg.seed)
    heads = _heads(model.config.d_model, model.config.vocab_size)
    ids, tags = token_tags(tokenizer, E.samples(cfg.captions, seed=cfg.seed), cfg.length)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def unknown_words(batch: torch.Tensor, batch_tags: dict, gen: torch.Generator) -> tuple:
        drop = (torch.rand(batch.shape, generator=gen) < cfg.unk_rate) & ~torch.isin(batch, special)
        word = torch.where(drop, tokenizer.unk_token_id, batch_tags["word"])
        return torch.where(drop, tokenizer.unk_token_id, batch), {**batch_tags, "word": word}

    loss, seconds = fit_heads(model, heads, ids, tags, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                              seed=cfg.seed, corrupt=unknown_words)  # fmt: skip
    model.eval()
    n = len(E.catalogue()) if eval_captions is None else eval_captions
    accuracy = {"train": tagging_accuracy(model, heads, ids[:n], {k: v[:n] for k, v in tags.items()})}
    for split in ("validation", "heldout"):
        split_ids, split_tags = token_tags(tokenizer, E.samples(n, seed=cfg.seed, split=split), cfg.length)
        accuracy[split] = tagging_accuracy(model, heads, split_ids, split_tags)
    return EmojiTaggerResult(
        steps=cfg.steps, final_loss=float(loss.detach()), seconds=seconds, accuracy=accuracy
    )
