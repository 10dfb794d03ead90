"""The training loop's speed with ``model.compile`` on and off: alternating runs of the same config.

Run in a folder prepared for the tiny-shapes recipe
(``python -m mmdit_flow.training.recipes.tiny_shapes prepare`` and
``mmdit-flow cache``, docs/quality.md), so that the loop is the real one (cached latents, caption dropout,
AdamW, EMA, checkpoints). Each round trains ``--steps`` steps eager and compiled, from scratch, in the order
bench/timing.py's protocol gives (reversed every other round); a run's sample is the median time between
consecutive steps after ``--skip`` steps (compilation and warm-up); the result is the median over rounds per
mode and the speed-up with a 95% interval:

    OMP_NUM_THREADS=2 python /path/to/bench/train_compile.py --rounds 2 --steps 500
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time

from timing import Timings, round_order

from mmdit_flow.training.config import TrainConfig, load_config
from mmdit_flow.training.recipes.tiny_shapes.ship import CONFIG
from mmdit_flow.training.trainer import train


def timed_run(cfg: TrainConfig) -> list[float]:
    """``train(cfg)`` with the clock read at every step."""
    stamps: list[float] = []
    train(cfg, on_step=lambda step, result: stamps.append(time.perf_counter()))
    return stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--skip", type=int, default=150, help="steps left out of the timing (compilation)")
    parser.add_argument("overrides", nargs="*", help="extra key=value training overrides")
    args = parser.parse_args()
    if args.skip + 2 > args.steps:
        parser.error(f"--steps ({args.steps}) must exceed --skip ({args.skip}) by at least 2")

    timings = Timings(wall={"eager": [], "compiled": []})
    for r in range(args.rounds):
        for mode in round_order(list(timings.wall), r):
            out = tempfile.mkdtemp(prefix="train_compile_")
            cfg = load_config(CONFIG, [*args.overrides, f"schedule.max_steps={args.steps}",
                                     f"output.dir={out}", "output.save_final=false", "output.progress=false",
                                     f"model.compile={str(mode == 'compiled').lower()}"])  # fmt: skip
            try:
                stamps = timed_run(cfg)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            gaps = [b - a for a, b in itertools.pairwise(stamps[args.skip :])]
            timings.wall[mode].append(statistics.median(gaps))
            print(f"round {r}: {mode} {1000 * timings.wall[mode][-1]:.1f} ms/step")
    eager, compiled = (1000 * timings.median(mode) for mode in ("eager", "compiled"))
    print(
        f"eager {eager:.1f} ms/step ({1000 / eager:.2f} steps/s), compiled {compiled:.1f} ms/step "
        f"({1000 / compiled:.2f} steps/s): {timings.ratio('eager', 'compiled')}"
    )


if __name__ == "__main__":
    main()
