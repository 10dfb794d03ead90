"""Train and assemble the tiny-emoji model in the diffusers SD3 layout.

The recipe, run from a scratch folder (docs/tiny-emoji.md has the wall times)::

    python -m mmdit_flow.training.recipes.tiny_emoji install
    python -m mmdit_flow.training.recipes.tiny_emoji components PARTS
    python -m mmdit_flow.training.recipes.tiny_emoji prepare --components PARTS
    mmdit-flow cache TINY_EMOJI_YAML
    accelerate launch --num_processes 1 --cpu -m mmdit_flow.training TINY_EMOJI_YAML
    python -m mmdit_flow.training.recipes.tiny_emoji assemble runs/tiny-emoji/train OUT --components PARTS

``TINY_EMOJI_YAML`` is ``training/recipes/tiny_emoji/config.yaml`` (``... tiny_emoji config`` prints its
path). ``prepare`` writes :data:`TRAIN_IMAGES` training-split samples as an image folder and the staging
pipeline folder (tiny-shapes' :func:`~mmdit_flow.training.recipes.tiny_shapes.ship.stage`) with its
``mmdit_flow.json``: the sampling defaults and the vocabulary (every word of the caption corpus), which
the trained folder inherits, so that a prompt word the model never saw is named in a warning.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from mmdit_flow.training.recipes.tiny_emoji import emoji_set as E

logger = logging.getLogger(__name__)

CONFIG = Path(__file__).with_name("config.yaml")
IMAGES_PER_EMOJI = 16
SHIFT = 3.0  # the training shift (config.yaml), also the scheduler's
DEFAULTS = {"steps": 28, "guidance": 4.0, "height": 64, "width": 64, "max_sequence_length": 32}


def vocabulary() -> list[str]:
    """Every word of the caption corpus (what the tokenizers were trained on), sorted; words as the
    pipeline splits a prompt into them (``defaults.WORD``: "t-shirt" is "t" and "shirt")."""
    from mmdit_flow.pipelines.defaults import WORD
    from mmdit_flow.training.recipes.tiny_emoji.components import caption_corpus

    return sorted({w for text in caption_corpus() for w in WORD.findall(text.lower())})


def write_defaults(folder: str | Path, defaults: dict | None = None) -> Path:
    """``<folder>/mmdit_flow.json``: sampling defaults, the trained size and the vocabulary."""
    from mmdit_flow.pipelines.defaults import FILE
    from mmdit_flow.weights.io import write_json

    data = {
        "defaults": {**DEFAULTS, **(defaults or {})},
        "trained_sizes": [64, 64],
        "vocabulary": vocabulary(),
    }
    return write_json(data, Path(folder) / FILE)


def prepare(root: str | Path, components: str | Path, *, images_per_emoji: int = IMAGES_PER_EMOJI) -> None:
    """``<root>/data/train`` (training samples as an image folder; an existing one is kept) and
    ``<root>/components`` (the staging folder ``mmdit-flow cache`` loads its encoders from)."""
    from mmdit_flow.training.config import load_config
    from mmdit_flow.training.recipes.tiny_shapes.ship import stage

    root = Path(root)
    data = root / "data" / "train"
    if not (data / "metadata.jsonl").is_file():
        E.write_dataset(data, images_per_emoji * len(E.catalogue()), split="train")
    staged = stage(components, root / "components", load_config(CONFIG), SHIFT)
    write_defaults(staged)
    (staged / "LICENSE-emoji.txt").write_text(E.LICENSE + "\n")


def assemble(
    run_dir: str | Path,
    out: str | Path,
    *,
    components: str | Path | None = None,
    checkpoint: str | None = None,
    guidance: float | None = None,
) -> Path:
    """The trained transformer next to the components in ``out``, with the scheduler, the defaults
    (``guidance``: the scale picked on validation captions), the pictures' licence and, last,
    ``model_index.json``."""
    from mmdit_flow.training.recipes.tiny_shapes.ship import assemble as assemble_sd3

    out = Path(out)
    index = assemble_sd3(run_dir, out, components=components, checkpoint=checkpoint, shift=SHIFT)
    index.unlink()  # complete again once the defaults are written
    write_defaults(out, None if guidance is None else {"guidance": guidance})
    (out / "LICENSE-emoji.txt").write_text(E.LICENSE + "\n")
    from mmdit_flow.training.recipes.tiny_shapes.ship import write_model_index

    return write_model_index(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mmdit_flow.training.recipes.tiny_emoji", description="Train and ship tiny-emoji."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("config", help="print the path of the recipe's training config")
    prep = sub.add_parser("prepare", help="training images + staging pipeline folder for `mmdit-flow cache`")
    prep.add_argument("--root", type=Path, default=Path("runs/tiny-emoji"))
    prep.add_argument("--components", type=Path, required=True, help="folder with vae/, text_encoder*/ ...")
    prep.add_argument("--images-per-emoji", type=int, default=IMAGES_PER_EMOJI)
    asm = sub.add_parser("assemble", help="trained transformer + components -> a shippable SD3 folder")
    asm.add_argument("run_dir", type=Path)
    asm.add_argument("out", type=Path)
    asm.add_argument("--components", type=Path, default=None, help="default: out already holds them")
    asm.add_argument("--checkpoint", default=None, help="a checkpoint folder or 'latest' (default: final/)")
    asm.add_argument("--guidance", type=float, default=None, help=f"default {DEFAULTS['guidance']}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "config":
        print(CONFIG)
    elif args.command == "prepare":
        if args.images_per_emoji < 1:
            parser.error(f"--images-per-emoji must be >= 1, got {args.images_per_emoji}")
        prepare(args.root, args.components, images_per_emoji=args.images_per_emoji)
    else:
        path = assemble(
            args.run_dir,
            args.out,
            components=args.components,
            checkpoint=args.checkpoint,
            guidance=args.guidance,
        )
        print(path.parent)
