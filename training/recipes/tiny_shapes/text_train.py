"""Train the tiny-shapes T5 encoder as a caption tagger: every token learns what its object is and where.

Why. SD3's transformer sees the text tokens as a set: its text stream has no position embedding, so the
order of the words reaches it only through the encoders' outputs. A random T5 passes on almost none: at
the default initialisation its token outputs are nearly context-free (the "red" of "a small red square to
the left of a large blue circle" and of "a large blue circle to the left of a small red square" come out
with cosine similarity 1.000), so to the transformer the T5 tokens are a bag of words, and which colour,
shape and place belong together must be recovered from the CLIP tokens' absolute positions. Two-object
scenes then fail by swapping places and attributes between the objects (docs/quality.md). Real T5 and CLIP
encoders are trained; here the T5 is trained on the caption grammar.

Objective. A ``T5EncoderModel`` with linear heads on its last hidden state (the states SD3 hands the
transformer). Every token of a caption is tagged (:data:`TAGS`) with ``object``: whether it belongs to the
first object's phrase, the second's or neither (:func:`shapes.caption_parts`), with ``word``, its own id,
and, inside an object's phrase, with that object's ``color``, ``shape``, ``size`` and ``place``
(:func:`shapes.object_places`: for two objects the place the relation gives each one, so the tokens of
"a blue square" in "a red circle to the left of a blue square" learn "right"). The loss is the sum of the
heads' cross-entropies; the heads are discarded after training. Only training-split captions are used:
the held-out colour-shape pairs are never seen, and :func:`tagging_accuracy` on held-out captions measures
how the tags carry over to them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mmdit_flow.training.recipes.tiny_shapes import shapes

# Tag name -> class names. Tokens outside an object's phrase (relation words, "and", the background phrase)
# have only the ``object`` and ``word`` tags; padding and the end-of-sequence token have none. ``word`` is
# the token's own id (its classes are the vocabulary): it keeps each token saying which word it is.
TAGS: dict[str, tuple[str, ...]] = {
    "object": ("none", "first", "second"),
    "color": tuple(shapes.COLORS),
    "shape": shapes.SHAPES,
    "size": shapes.SIZES,
    "place": shapes.POSITIONS,
}
WORD = "word"
IGNORE = -100  # cross-entropy's ignore_index: no tag here
# The recipe's tags: all of them. Measured at 5000 transformer steps (docs/quality.md): the five attribute
# tags without ``word`` placed the objects best but blurred the background words (the background check fell
# to 94 %); ``object``, ``place`` and ``word`` alone kept every word but placed worse. With ``word`` a token
# keeps saying which word it is while it learns its object's attributes and place.
DEFAULT_TAGS = (*TAGS, WORD)


@dataclass(frozen=True)
class T5TrainConfig:
    """Tagger training: ``steps`` AdamW steps of ``batch_size`` captions drawn from the first ``captions``
    training-split scenes of ``seed``, learning rate ``lr`` with a cosine decay to 0, sequences padded to
    ``length`` tokens (the pipelines' 32), heads for ``tags`` (names from :data:`TAGS` and ``"word"``)."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    captions: int = 20_000
    length: int = 32
    seed: int = 0
    tags: tuple[str, ...] = DEFAULT_TAGS

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "captions", "length"):
            if getattr(self, name) < 1:
                raise ValueError(f"T5TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"T5TrainConfig.lr must be > 0, got {self.lr}")
        unknown = sorted(set(self.tags) - {*TAGS, WORD})
        if unknown or not self.tags:
            raise ValueError(
                f"T5TrainConfig.tags must be a non-empty subset of {[*TAGS, WORD]}, got {self.tags}"
            )


def word_tags(scene: shapes.Scene) -> dict[str, list[int]]:
    """Per word of ``shapes.caption(scene)``: the class index of each tag (:data:`IGNORE` where none)."""
    places = shapes.object_places(scene)
    tags: dict[str, list[int]] = {name: [] for name in TAGS}
    for text, k in shapes.caption_parts(scene):
        for _ in text.split():
            tags["object"].append(0 if k is None else k + 1)
            obj = None if k is None else scene.objects[k]
            for name in ("color", "shape", "size", "place"):
                if obj is None:
                    tags[name].append(IGNORE)
                else:
                    value = places[k] if name == "place" else getattr(obj, name)
                    tags[name].append(TAGS[name].index(value))
    return tags


def token_tags(
    tokenizer: Any, scenes: Sequence[shapes.Scene], length: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token ids [N, length] of the scenes' captions (padded as the pipelines pad them) and each tag per
    token [N, length]; a token takes the tags of the word it comes from (the fast tokenizer's word ids),
    and its own id as the ``word`` tag."""
    captions = [shapes.caption(s) for s in scenes]
    enc = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    tags = {name: torch.full((len(scenes), length), IGNORE, dtype=torch.long) for name in (*TAGS, WORD)}
    for i, scene in enumerate(scenes):
        words = word_tags(scene)
        for j, w in enumerate(enc.word_ids(i)):
            if w is not None:
                for name in TAGS:
                    tags[name][i, j] = words[name][w]
                tags[WORD][i, j] = enc.input_ids[i, j]
    return enc.input_ids, tags


def tag_heads(width: int, tags: Sequence[str], vocab_size: int) -> torch.nn.ModuleDict:
    """One linear classifier per tag on ``width``-wide token states (``word``: over ``vocab_size`` ids)."""
    return torch.nn.ModuleDict(
        {name: torch.nn.Linear(width, vocab_size if name == WORD else len(TAGS[name])) for name in tags}
    )


def tagging_loss(
    states: torch.Tensor, heads: torch.nn.ModuleDict, tags: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Sum over the heads' tags of the mean cross-entropy over the tokens that carry the tag."""
    ce = torch.nn.functional.cross_entropy
    return sum(
        ce(head(states).flatten(0, 1), tags[name].flatten(), ignore_index=IGNORE)
        for name, head in heads.items()
    )


@torch.no_grad()
def tagging_accuracy(
    model: torch.nn.Module, heads: torch.nn.ModuleDict, ids: torch.Tensor, tags: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Share of tagged tokens whose tag the heads predict, per head."""
    states = model(ids).last_hidden_state
    out = {}
    for name, head in heads.items():
        mask = tags[name] != IGNORE
        out[name] = float((head(states).argmax(-1)[mask] == tags[name][mask]).float().mean())
    return out


Corrupt = Callable[[torch.Tensor, dict[str, torch.Tensor], torch.Generator], tuple[torch.Tensor, dict]]


def fit_heads(
    model: torch.nn.Module,
    heads: torch.nn.ModuleDict,
    ids: torch.Tensor,
    tags: dict[str, torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    corrupt: Corrupt | None = None,
) -> tuple[torch.Tensor, float]:
    """Train ``model`` and ``heads`` together on :func:`tagging_loss`: ``steps`` AdamW steps of
    ``batch_size`` rows of ``ids`` / ``tags`` drawn from a generator of ``seed``, learning rate ``lr`` with a
    cosine decay to 0; ``corrupt(ids, tags, generator)`` may change each batch first. Returns the last
    step's loss and the seconds it took; ``model`` is left in train mode."""
    params = [*model.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    loss = torch.zeros(())
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = torch.randint(0, len(ids), (batch_size,), generator=gen)
        batch, batch_tags = ids[pick], {k: v[pick] for k, v in tags.items()}
        if corrupt is not None:
            batch, batch_tags = corrupt(batch, batch_tags, gen)
        loss = tagging_loss(model(batch).last_hidden_state, heads, batch_tags)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss, time.perf_counter() - start


@dataclass
class TaggerResult:
    """What :func:`train_t5_tagger` measured: the last step's loss, wall time, and the tag accuracy on
    training-split and held-out captions (per tag)."""

    steps: int
    final_loss: float
    seconds: float
    train_accuracy: dict[str, float] = field(default_factory=dict)
    heldout_accuracy: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def train_t5_tagger(
    model: torch.nn.Module, tokenizer: Any, cfg: T5TrainConfig | None = None, eval_captions: int = 500
) -> TaggerResult:
    """Train ``model`` (a ``T5EncoderModel``) in place as a caption tagger and leave it in eval mode;
    returns what the training measured.

    Deterministic for a config on a given machine and thread count: the heads are seeded with
    ``cfg.seed`` and the batches drawn from a generator of that seed.
    """
    cfg = cfg or T5TrainConfig()
    torch.manual_seed(cfg.seed)
    heads = tag_heads(model.config.d_model, cfg.tags, model.config.vocab_size)
    ids, tags = token_tags(tokenizer, shapes.train_scenes(cfg.captions, seed=cfg.seed), cfg.length)
    loss, seconds = fit_heads(model, heads, ids, tags, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                              seed=cfg.seed)  # fmt: skip
    model.eval()
    n = min(eval_captions, cfg.captions)
    heldout = shapes.heldout_scenes(eval_captions, seed=cfg.seed)
    heldout_ids, heldout_tags = token_tags(tokenizer, heldout, cfg.length)
    return TaggerResult(
        steps=cfg.steps,
        final_loss=float(loss.detach()),
        seconds=seconds,
        train_accuracy=tagging_accuracy(model, heads, ids[:n], {k: v[:n] for k, v in tags.items()}),
        heldout_accuracy=tagging_accuracy(model, heads, heldout_ids, heldout_tags),
    )
