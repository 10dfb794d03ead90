"""Ours vs diffusers: forward and forward+backward time and peak memory of the transformer, CPU, fp32.

    python bench/transformer.py                      # SD3, sizes tiny and small, 7 repeats
    python bench/transformer.py --sizes small --repeats 11 --threads 2
    python bench/transformer.py --family flux        # Flux, sizes tiny and small
    python bench/transformer.py --sizes shipped      # the shipped tiny-shapes transformer, its own weights

The models and inputs are bench/cases.py's (sizes there): both hold the same weights and get the same inputs;
outputs are checked equal before timing. Times follow bench/timing.py: medians over ``--repeats`` rounds, ours
and diffusers interleaved (which goes first alternates), so that machine noise hits both alike; the speed-up
carries a 95% bootstrap interval over rounds.

Peak memory: tracemalloc does not see torch's allocations, so each (model, mode) case runs once in a fresh
subprocess with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``: large buffers are mmapped and given
back on free, so RSS follows live tensors); the peak RSS during the step (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) minus the RSS before it is the step's peak memory: activations, the attention
scratch, and, for forward+backward, the gradients (the same for both models). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch
from cases import SIDES, SIZES, Case, build_case
from timing import interleaved

MODES = ("fwd", "fwd+bwd")


def step(model: torch.nn.Module, run: Callable[[], torch.Tensor], mode: str) -> None:
    """One forward (no grad) or one forward + backward of mean(v^2), gradients freed first."""
    if mode == "fwd":
        model.eval()
        with torch.no_grad():
            run()
        return
    model.train()
    model.zero_grad(set_to_none=True)
    run().square().mean().backward()


def steps(case: Case, mode: str) -> dict[str, Callable[[], None]]:
    """One ``step`` of each side, as the timing protocol's entries."""
    return {side: (lambda side=side: step(case.model(side), lambda: case.run(side), mode)) for side in SIDES}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_here(family: str, size: str, side: str, mode: str) -> int:
    """Peak RSS growth in bytes during one step (run inside a fresh subprocess)."""
    case = build_case(family, size)
    model = case.model(side)
    case.model("diffusers" if side == "ours" else "ours").to("meta")  # free the other model's weights
    model.train(mode != "fwd")
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    step(model, lambda: case.run(side), mode)
    return (_rss_kib("VmHWM") - before) * 1024


def measure_memory(family: str, size: str, side: str, mode: str, threads: int) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--_memory", family, size, side, mode]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def bench_size(family: str, size: str, args: argparse.Namespace) -> list[dict]:
    """The rows of one size: per mode the median times, the speed-up with its interval, the memory."""
    case = build_case(family, size)
    err = case.relative_error()
    if err > 1e-4:
        raise RuntimeError(f"ours and diffusers disagree at size {size}: relative error {err:.2e}")
    rows = []
    for mode in MODES:
        timings = interleaved(steps(case, mode), rounds=args.repeats, warmup=2)
        row = {"size": size, "mode": mode, "relative_error": err}
        for clock in ("cpu", "wall"):
            row.update({f"{side}_{clock}_ms": 1e3 * timings.median(side, clock) for side in SIDES})
            speedup = timings.ratio("diffusers", "ours", clock)
            row[f"speedup_{clock}"], row[f"speedup_{clock}_ci95"] = speedup.value, [speedup.low, speedup.high]
        if not args.no_memory:
            for side in SIDES:
                row[f"{side}_mib"] = measure_memory(family, size, side, mode, args.threads) / 2**20
        low, high = row["speedup_cpu_ci95"]
        print(
            f"{size:7} {mode:8} "
            f"{row['ours_cpu_ms']:8.1f} ({row['ours_wall_ms']:6.1f}) "
            f"{row['diffusers_cpu_ms']:8.1f} ({row['diffusers_wall_ms']:6.1f}) "
            f"{row['speedup_cpu']:5.2f}x [{low:4.2f}, {high:4.2f}] ({row['speedup_wall']:4.2f}x) "
            f"{row.get('ours_mib', float('nan')):9.1f} {row.get('diffusers_mib', float('nan')):9.1f}",
            flush=True,
        )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(SIZES), default="sd3")
    parser.add_argument(
        "--sizes", default="tiny,small", help="comma-separated: bench/cases.py's sizes of the family"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is exact)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--_memory", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory:
        print(measure_memory_here(*args._memory))
        return
    sizes = args.sizes.split(",")
    if unknown := [s for s in sizes if s not in SIZES[args.family]]:
        parser.error(
            f"unknown --sizes {unknown} for {args.family}; choose from {', '.join(SIZES[args.family])}"
        )
    torch.set_num_threads(args.threads)
    setting = f"{args.threads} thread(s), median of {args.repeats}, torch {torch.__version__}"
    print(f"{args.family}, CPU fp32, {setting}")
    print(
        "times in ms: CPU time of the process (wall clock in brackets); speed-up with its 95% interval; "
        "memory: peak RSS growth in MiB"
    )
    columns = {"ours": 17, "diffusers": 17, "speedup": 26, "ours MiB": 9, "diff MiB": 9}
    print(f"{'size':7} {'mode':8} " + " ".join(f"{c:>{w}}" for c, w in columns.items()))
    results = [row for size in sizes for row in bench_size(args.family, size, args)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
