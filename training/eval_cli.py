"""``mmdit-flow eval IMAGE_DIR``: score images against their captions, with one of two judges.

``--task shapes`` (the default) checks captioned shapes attribute by attribute (tiny-shapes' evaluator);
``--task emoji`` asks which emoji each image shows (retrieval against the rendered Noto Color Emoji set) and
reports top-1 and top-5 of the emoji its caption names, overall and per category.

The captions come from a ``metadata.jsonl`` (Hugging Face imagefolder convention: one JSON object per line
with ``file_name`` relative to the image folder and ``text``), by default the one inside IMAGE_DIR, which is
what ``mmdit-flow generate`` writes beside its images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "check images against their captions: captioned shapes (per attribute) or emoji (retrieval)"
TASKS = ("shapes", "emoji")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image_dir", type=Path, help="folder of images")
    parser.add_argument(
        "--captions",
        type=Path,
        default=None,
        help="metadata.jsonl with 'file_name' and 'text' per line (default: IMAGE_DIR/metadata.jsonl, "
        "which `mmdit-flow generate` writes)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results, per image too, here")
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="shapes",
        help="shapes: captioned-shapes attributes (default); emoji: which emoji is it (needs the Noto Color "
        "Emoji font: python -m mmdit_flow.training.recipes.tiny_emoji install)",
    )


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from mmdit_flow.pipelines.generate_cli import read_metadata

    captions_path = args.captions or args.image_dir / "metadata.jsonl"
    if not captions_path.is_file():
        print(f"error: no captions file at {captions_path}; pass --captions metadata.jsonl", file=sys.stderr)
        return 2
    try:
        pairs = read_metadata(captions_path)
        if not pairs:
            raise ValueError(f"{captions_path} has no captions")
        images = []
        for name, _ in pairs:
            path = args.image_dir / name
            if not path.is_file():
                raise ValueError(f"image {path} named in {captions_path} does not exist")
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        captions = [text for _, text in pairs]
        if args.task == "emoji":
            return _emoji(images, captions, [name for name, _ in pairs], args.json)
        from mmdit_flow.training.recipes.tiny_shapes.evaluator import ATTRIBUTES, evaluate

        result = evaluate(images, captions)
    except ValueError as err:
        hint = "" if args.task == "emoji" else " (for emoji captions pass --task emoji)"
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    print(f"{result.n_images} images")
    for name in ATTRIBUTES:
        if name in result.per_attribute:
            print(f"  {name:<11s} {result.per_attribute[name]:7.2%}")
    print(f"  {'overall':<11s} {result.overall:7.2%}   (mean over all attribute checks)")
    print(f"  {'all correct':<11s} {result.all_correct:7.2%}   (images with every attribute right)")
    if args.json is not None:
        out = result.to_dict()
        out["files"] = [name for name, _ in pairs]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


def _emoji(images: list, captions: list[str], files: list[str], json_path: Path | None) -> int:
    from mmdit_flow.training.recipes.tiny_emoji import emoji_set

    missing = emoji_set.available()
    if missing is not None:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    from mmdit_flow.training.recipes.tiny_emoji.judge import evaluate

    result = evaluate(images, captions)
    print(
        f"{result.n_images} images: the emoji its caption names retrieved first (top-1) or in the first five"
    )
    print(f"  {'category':<11s} {'images':>6s} {'top-1':>7s} {'top-5':>7s}")
    for name, (n, top1, top5) in result.per_category.items():
        print(f"  {name:<11s} {n:6d} {top1:7.2%} {top5:7.2%}")
    print(f"  {'all':<11s} {result.n_images:6d} {result.top1:7.2%} {result.top5:7.2%}")
    if json_path is not None:
        out = result.to_dict()
        out["files"] = files
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(out, indent=1))
        print(f"wrote {json_path}")
    return 0
