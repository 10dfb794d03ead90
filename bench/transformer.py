"""Ours vs diffusers: forward and forward+backward time and peak memory of the transformer, CPU, fp32.

    python bench/transformer.py                      # SD3, sizes tiny and small, 7 repeats
    python bench/transformer.py --sizes small --repeats 11 --threads 2
    python bench/transformer.py --family flux        # Flux: the sizes of bench/flux_transformer_case.py

Both models hold the same random weights (ours loaded from diffusers' state dict through the key map) and get
the same inputs; outputs are checked equal before timing. Times are medians over ``--repeats`` runs, with ours
and diffusers interleaved (alternating which goes first) so that machine noise hits both alike.

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
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling bench modules, also when imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_transformer_case import SIZES as FLUX_SIZES  # noqa: E402
from flux_transformer_case import build_case  # noqa: E402

SD3_SIZES = {
    # overhead-dominated: 2 blocks, 64 image + 16 text tokens, batch 2
    "tiny": dict(
        diffusers=dict(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=64,
            caption_projection_dim=64,
            pooled_projection_dim=32,
            out_channels=16,
            pos_embed_max_size=16,
        ),
        batch=2,
        latent=16,
        txt_len=16,
    ),
    # a small real size: 4 blocks, hidden 512, 64x64 latents (1024 image tokens) + 154 text tokens, batch 1
    "small": dict(
        diffusers=dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=4,
            attention_head_dim=64,
            num_attention_heads=8,
            joint_attention_dim=4096,
            caption_projection_dim=512,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=96,
        ),
        batch=1,
        latent=64,
        txt_len=154,
    ),
}
# the same with SD3.5's QK RMS-norm and MMDiT-X dual attention in half the blocks
SD3_SIZES["small35"] = {
    **SD3_SIZES["small"],
    "diffusers": {**SD3_SIZES["small"]["diffusers"], "qk_norm": "rms_norm", "dual_attention_layers": (0, 1)},
}


@dataclass
class Case:
    """Two models with the same weights and a closure running each on the same inputs."""

    ours: torch.nn.Module
    theirs: torch.nn.Module
    run_ours: Callable[[], torch.Tensor]
    run_theirs: Callable[[], torch.Tensor]


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def sd3_case(size: str) -> Case:
    from diffusers import SD3Transformer2DModel

    from mmdit_flow.models.sd3 import SD3Transformer
    from mmdit_flow.weights.sd3_keys import config_from_diffusers, from_diffusers

    spec = SD3_SIZES[size]
    theirs = SD3Transformer2DModel(**spec["diffusers"])
    randomize(theirs)
    config = config_from_diffusers(dict(theirs.config))
    ours = SD3Transformer(config)
    ours.load_state_dict(from_diffusers(theirs.state_dict(), config))
    gen = torch.Generator().manual_seed(1)
    B, n = spec["batch"], spec["latent"]
    x = torch.randn(B, config.in_channels, n, n, generator=gen)
    t = torch.rand(B, generator=gen)
    txt = torch.randn(B, spec["txt_len"], config.context_dim, generator=gen)
    vec = torch.randn(B, config.vec_dim, generator=gen)
    return Case(
        ours,
        theirs,
        lambda: ours(x, t, txt, vec),
        lambda: (
            theirs(
                hidden_states=x, encoder_hidden_states=txt, pooled_projections=vec, timestep=1000 * t
            ).sample
        ),
    )


def flux_case(size: str) -> Case:
    """Our FluxTransformer and diffusers' FluxTransformer2DModel, same weights and inputs (CPU, fp32)."""
    case = build_case(size)  # a flux_transformer_case.Case: these four fields plus config and flops
    return Case(case.ours, case.theirs, case.run_ours, case.run_theirs)


FAMILIES = {"sd3": (sd3_case, SD3_SIZES), "flux": (flux_case, FLUX_SIZES)}


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


def time_case(case: Case, mode: str, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Interleaved wall-clock and CPU times (seconds) of ours and diffusers; which runs first alternates."""
    pairs = {"ours": (case.ours, case.run_ours), "diffusers": (case.theirs, case.run_theirs)}
    for _ in range(warmup):
        for model, run in pairs.values():
            step(model, run, mode)
    times: dict[str, list[float]] = {f"{name}_{clock}": [] for name in pairs for clock in ("wall", "cpu")}
    for r in range(repeats):
        for name in list(pairs)[:: 1 if r % 2 == 0 else -1]:
            wall, cpu = time.perf_counter(), time.process_time()
            step(*pairs[name], mode)
            times[f"{name}_cpu"].append(time.process_time() - cpu)
            times[f"{name}_wall"].append(time.perf_counter() - wall)
    return times


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_here(family: str, size: str, which: str, mode: str) -> int:
    """Peak RSS growth in bytes during one step (run inside a fresh subprocess)."""
    case = FAMILIES[family][0](size)
    model, run = (case.ours, case.run_ours) if which == "ours" else (case.theirs, case.run_theirs)
    other = case.theirs if which == "ours" else case.ours
    del case
    other.to("meta")  # free the other model's weights
    model.train(mode != "fwd")
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    step(model, run, mode)
    return (_rss_kib("VmHWM") - before) * 1024


def measure_memory(family: str, size: str, which: str, mode: str, threads: int) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--_memory", family, size, which, mode]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def check_parity(case: Case) -> float:
    case.ours.eval(), case.theirs.eval()
    with torch.no_grad():
        a, b = case.run_ours(), case.run_theirs()
    return ((a - b).norm() / b.norm()).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd3")
    parser.add_argument("--sizes", default="tiny,small", help="comma-separated: tiny, small")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is exact)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--_memory", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory:
        print(measure_memory_here(*args._memory))
        return
    torch.set_num_threads(args.threads)
    make_case, sizes = FAMILIES[args.family]
    results = []
    setting = f"{args.threads} thread(s), median of {args.repeats}, torch {torch.__version__}"
    print(f"{args.family}, CPU fp32, {setting}")
    print("times in ms: CPU time of the process (wall clock in brackets); memory: peak RSS growth in MiB")
    columns = {"ours": 17, "diffusers": 17, "speedup": 15, "ours MiB": 9, "diff MiB": 9}
    print(f"{'size':7} {'mode':8} " + " ".join(f"{c:>{w}}" for c, w in columns.items()))
    for size in args.sizes.split(","):
        if size not in sizes:
            raise ValueError(f"unknown size {size!r} for {args.family}; choose from {', '.join(sizes)}")
        case = make_case(size)
        err = check_parity(case)
        if err > 1e-4:
            raise RuntimeError(f"ours and diffusers disagree at size {size}: relative error {err:.2e}")
        for mode in ("fwd", "fwd+bwd"):
            times = time_case(case, mode, args.repeats)
            row = {"size": size, "mode": mode, "relative_error": err}
            row.update({f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()})
            row["speedup_cpu"] = row["diffusers_cpu_ms"] / row["ours_cpu_ms"]
            row["speedup_wall"] = row["diffusers_wall_ms"] / row["ours_wall_ms"]
            if not args.no_memory:
                for which in ("ours", "diffusers"):
                    row[f"{which}_mib"] = measure_memory(args.family, size, which, mode, args.threads) / 2**20
            print(
                f"{size:7} {mode:8} "
                f"{row['ours_cpu_ms']:8.1f} ({row['ours_wall_ms']:6.1f}) "
                f"{row['diffusers_cpu_ms']:8.1f} ({row['diffusers_wall_ms']:6.1f}) "
                f"{row['speedup_cpu']:6.2f}x ({row['speedup_wall']:4.2f}x) "
                f"{row.get('ours_mib', float('nan')):9.1f} {row.get('diffusers_mib', float('nan')):9.1f}",
                flush=True,
            )
            results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
