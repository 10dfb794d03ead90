"""``mmdit-flow lab``: train 2-D flows and a diffusion baseline, write plots, a GIF and the results tables."""

from __future__ import annotations

import argparse
import shlex
import sys

HELP = "2-D lab: rectified flow, reflow, OT-CFM, distillation, DDPM/DDIM on toy data (and SO(3)); W2 tables"
DEFAULT_DATASETS = "two_clusters,8gaussians,moons,checkerboard,spirals"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--datasets",
        default=DEFAULT_DATASETS,
        help=f"comma-separated data sets (default: {DEFAULT_DATASETS}); also so3_mixture: flows on the "
        "rotation group SO(3) from uniform rotations to a mixture of IGSO(3) components (docs/so3.md)",
    )
    parser.add_argument("--out", default="lab-out", help="output folder (default: lab-out)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny models, seconds per data set; its numbers are not the lab's results",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for data, training and sampling (default: 0)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmdit_flow.training.lab.data import check_names
    from mmdit_flow.training.lab.experiment import LabConfig, run_lab

    datasets = check_names([name.strip() for name in args.datasets.split(",") if name.strip()])
    config = LabConfig.quick() if args.quick else LabConfig()
    out = Path(args.out)
    command = shlex.join(
        ["mmdit-flow", "lab", "--datasets", ",".join(datasets), "--out", str(out), "--seed", str(args.seed)]
        + (["--quick"] if args.quick else [])
    )
    if config.smoke:
        print(
            f"lab: --quick is a smoke run ({config.train.steps} training steps, tiny models, NFE up to "
            f"{max(config.nfes)}): it checks that the lab runs; its numbers are not the lab's results"
        )
    try:
        results = run_lab(
            datasets, out, config, seed=args.seed, progress=not args.no_progress, command=command
        )
    except KeyboardInterrupt:
        print(
            f"\nlab: stopped; the data sets finished before the stop are in {out / 'results.md'} "
            f"(rerun with --datasets NAMES for the others)",
            file=sys.stderr,
        )
        return 130
    print(
        f"lab: {len(datasets)} data set(s) in {results['seconds']:.0f} s; "
        f"figures, results.md and results.json in {out}"
    )
    return 0
