"""``python -m mmdit_flow.training.recipes.tiny_shapes COMMAND [...]``: the recipe's commands.

Each command belongs to the module that implements it, whose own parser reads the arguments (so
``COMMAND --help`` is that module's help); this file only picks the module.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

PROG = "python -m mmdit_flow.training.recipes.tiny_shapes"
# command -> (module of this package that implements it, one line of help)
COMMANDS = {
    "data": ("shapes", "write captioned shapes as an image folder (for fine-tuning)"),
    "components": ("components", "tokenizers, text encoders (T5 trained) and the VAE of the model"),
    "probe": ("components", "linear probe of the text encoders of a model folder"),
    "prepare": ("ship", "training images + staging pipeline folder for `mmdit-flow cache`"),
    "config": ("ship", "print the path of the recipe's training config"),
    "assemble": ("ship", "trained transformer + components -> the shippable SD3 folder"),
    "turbo": (
        "turbo",
        "the few-step student: couplings, reflow, distillation (resumable)",
    ),
}


def usage() -> str:
    lines = [f"usage: {PROG} COMMAND [-h] ...", "", "Build and ship the tiny-shapes demo model."]
    lines += ["", "commands:"]
    lines += [f"  {name:<11s} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"{usage()}\n\nerror: unknown command {argv[0]!r}; pick one of the above", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__package__}.{COMMANDS[argv[0]][0]}")
    module.main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
