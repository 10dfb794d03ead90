"""The ``mmdit-flow`` command line.

Each subcommand lives in its own light module that defines ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run`` so that ``mmdit-flow --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> module implementing it
COMMANDS = {
    "generate": "mmdit_flow.pipelines.generate_cli",
    "train": "mmdit_flow.training.cli",
    "cache": "mmdit_flow.training.cache",
    "couplings": "mmdit_flow.training.couplings",
    "distill": "mmdit_flow.training.distill_cli",
    "convert": "mmdit_flow.weights.cli",
    "lab": "mmdit_flow.training.lab.cli",
    "eval": "mmdit_flow.training.eval_cli",
    "serve": "mmdit_flow.pipelines.serve",
    "likelihood": "mmdit_flow.pipelines.likelihood_cli",
}


def _available() -> dict[str, object]:
    mods = {}
    for name, module in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # the module exists but something it imports is missing: say so
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdit-flow", description="Rectified-flow text-to-image toolkit.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, mod in _available().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
