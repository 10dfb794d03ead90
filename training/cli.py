"""``mmdit-flow train CONFIG.yaml [key=value ...]``: train or fine-tune with accelerate.

One process: ``mmdit-flow train CONFIG``. Several processes or GPUs:
``accelerate launch -m mmdit_flow.training CONFIG`` (see docs/training.md).
Light at import: torch and accelerate load inside ``run``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

HELP = "train or fine-tune a transformer from a YAML config (key=value overrides)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config YAML; see docs/training.md")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optimizer.lr=3e-4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from mmdit_flow.training.config import config_to_dict, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ValueError as err:
        print(f"mmdit-flow train: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmdit_flow.training.config import ConfigError
    from mmdit_flow.training.trainer import train

    try:
        return train(config)
    except ConfigError as err:  # the config does not fit the model or the checkpoints: no traceback
        print(f"mmdit-flow train: {err}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmdit_flow.training", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))
