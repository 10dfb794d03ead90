"""``accelerate launch -m mmdit_flow.training CONFIG.yaml [key=value ...]``; ``python -m`` for one process."""

from __future__ import annotations

import sys

from mmdit_flow.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
