"""``python -m mmdit_flow.training.recipes.tiny_emoji COMMAND``: the tiny-emoji recipe's commands.

install     install the font and Unicode's emoji list (Debian packages, with apt-get)
data OUT    write captioned emoji as an image folder (--n, --split, --seed, --size)
judge       validate the judge: fresh renders, noise and shuffled pairs (JSON)
common      print the 300 common object and animal emoji (--write: rewrite common300.txt)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["components"]:
        from mmdit_flow.training.recipes.tiny_emoji import components

        components.main(argv[1:])
        return 0
    if argv[:1] and argv[0] in ("prepare", "config", "assemble"):
        from mmdit_flow.training.recipes.tiny_emoji import ship

        ship.main(argv)
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m mmdit_flow.training.recipes.tiny_emoji", description="The tiny-emoji recipe."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="install fonts-noto-color-emoji and unicode-data with apt-get")
    data = sub.add_parser("data", help="write captioned emoji as an image folder (PNGs + metadata.jsonl)")
    data.add_argument("out")
    data.add_argument("--n", type=int, default=1870, help="samples (default: one per emoji)")
    data.add_argument("--split", default="train", choices=["train", "validation", "heldout"])
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--size", type=int, default=64)
    judge = sub.add_parser("judge", help="validate the judge where the answer is known")
    judge.add_argument("--per-emoji", type=int, default=2)
    judge.add_argument("--noise", type=int, default=500, help="uniform-noise images")
    common = sub.add_parser("common", help="the 300 common object and animal emoji")
    common.add_argument("--write", action="store_true", help="rewrite common300.txt (needs wordfreq)")
    for name, text in (
        ("components", "tokenizers, text encoders, VAE"),
        ("prepare", "training data + staging"),
        ("config", "the training config's path"),
        ("assemble", "the shippable folder"),
    ):
        sub.add_parser(name, help=f"{text} (COMMAND --help)", add_help=False)
    args = parser.parse_args(argv)

    from mmdit_flow.training.recipes.tiny_emoji import emoji_set

    try:
        if args.command == "install":
            emoji_set.install()
            print(f"font: {emoji_set.font_path()}\nemoji list: {emoji_set.test_file_path()}")
            return 0
        missing = emoji_set.available()
        if missing is not None:
            print(f"error: {missing}", file=sys.stderr)
            return 2
        if args.command == "data":
            if args.n < 1:
                parser.error(f"--n must be >= 1, got {args.n}")
            out = emoji_set.write_dataset(args.out, args.n, seed=args.seed, split=args.split, size=args.size)
            print(f"wrote {args.n} images and metadata.jsonl to {out}")
        elif args.command == "judge":
            from mmdit_flow.training.recipes.tiny_emoji.judge import validate

            print(json.dumps(validate(per_emoji=args.per_emoji, noise_images=args.noise), indent=1))
        else:
            from mmdit_flow.training.recipes.tiny_emoji import common as c

            if args.write:
                print(f"wrote {c.write_common()}")
            for e in c.committed_common():
                print(f"{e.char}\t{e.name}")
    except emoji_set.EmojiDataMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
