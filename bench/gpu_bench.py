"""GPU benchmark: ours vs diffusers in bf16 on one CUDA device; ``bash bench/gpu.sh`` runs every case.

    python bench/gpu_bench.py --family sd3       # SD3-medium shape: 24 blocks, hidden 1536, 4096 + 333 tokens
    python bench/gpu_bench.py --family flux      # FLUX.1-dev shape: 19 + 38 blocks, hidden 3072, 4096 + 512
    python bench/gpu_bench.py --family pipeline  # end to end, 512^2, 28 steps, mid-size random SD3 folder
    python bench/gpu_bench.py --family flux --smoke   # CPU, fp32, a tiny size: checks the script itself
    python bench/gpu_bench.py --summary --out DIR     # gpu_bench_*.json of DIR -> summary.md + summary.json

Transformers (sd3, flux): milliseconds per forward (one sampling step at batch 1, 1024^2 images) and the
achieved TFLOP/s: the matmul and attention FLOPs of one forward, counted from the config (bench/flops.py;
``--smoke`` checks both against torch's FlopCounterMode), over the measured time, also as a
share of the H200's 989 TFLOP/s dense bf16 peak. Both models hold the same random weights (ours loaded from
diffusers' state dict) and their outputs are compared before timing (fp32: relative error < 1e-4 or stop;
bf16: < 5e-2, else a warning and a mark in the results). Timings are medians of ``--steps`` forwards, ours
and diffusers interleaved. ``--compile regional`` (default) compiles each block separately (identical blocks
share one compiled graph); ``--compile full`` compiles the whole model.

Pipeline: seconds per image of our TextToImagePipeline and diffusers' StableDiffusion3Pipeline on the same
folder (bench/pipeline_cases.py's "sd3-mid", 512^2, 28 steps, CFG 7; the smoke run its "sd3-tiny"), median of
``--repeats`` interleaved calls after a warm-up that also compares the images; eager ("end-to-end") and each
side's best lossless path ("best": ours ``pipe.compile()`` with its prompt cache, diffusers the regional
compile of its transformer blocks, both bf16; ``--compile none`` leaves it out). Progress lines carry the UTC
time and the seconds since start; with ``--out`` (default $OUT) the results go to
gpu_bench_<family>[_smoke].json.

The models are bench/cases.py's (SD3 "medium", Flux "dev"; "tiny" with ``--smoke``), the FLOP formulas
bench/flops.py's, the timing bench/timing.py's protocol (CUDA synchronised around every timed call).

Estimated full run on an H200 (not yet measured): per transformer case well under a minute of timing plus
the regional compile of two block types for each model; the pipeline case about half a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
from cases import SIDES, Case, build_case
from flops import counted_flops, forward_flops
from pipeline_cases import compile_diffusers, load_pair
from timing import interleaved

PEAK_TFLOPS = 989.0  # H200 / H100 SXM dense bf16
GPU_SIZES = {"sd3": "medium", "flux": "dev"}  # bench/cases.py's sizes of the full run
_START = time.perf_counter()


def log(message: str) -> None:
    """A progress line with the UTC time and the seconds since the script started."""
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    print(f"[{stamp} +{time.perf_counter() - _START:5.0f}s] {message}", flush=True)


def compiled(case: Case, side: str, how: str, smoke: bool) -> torch.nn.Module:
    """``side``'s model with torch.compile applied to the whole model or to each block ("regional")."""
    backend = "eager" if smoke else "inductor"  # eager: checks tracing on the CPU without codegen
    model = case.model(side)
    if how == "full":
        return torch.compile(model, backend=backend)
    for block in case.blocks(side):
        block.compile(backend=backend)
    return model


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def pipeline_bench(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """End-to-end seconds per image (encode, sample with CFG, decode): our TextToImagePipeline vs diffusers'
    StableDiffusion3Pipeline loading the same folder; interleaved calls, median, after one warm-up each.
    Two modes: "end-to-end" (eager, ours encoding every call as diffusers does) and "best" (each side's
    lossless options: ours ``pipe.compile()`` and its prompt cache, diffusers the regional compile of its
    transformer blocks; both in ``dtype``), with each side's images against ours eager."""
    name = "sd3-tiny" if args.smoke else "sd3-mid"
    log(f"building and loading the {name} pipelines ({device}, {dtype})")
    pair = load_pair(name, device, dtype)
    steps = args.pipeline_steps or (2 if args.smoke else 28)
    repeats = min(args.repeats, 2) if args.smoke else args.repeats
    runs = {side: (lambda side=side: pair.run(side, steps=steps)) for side in SIDES}
    size, guidance = pair.case.image_size, pair.case.guidance
    log(f"warm-up and image check: {size}^2, {steps} steps, CFG {guidance:g}")
    with torch.no_grad():
        reference = runs["ours"]()
        diff = float(abs(reference - runs["diffusers"]()).max())
        if dtype == torch.float32 and diff > 1e-3:
            raise SystemExit(f"our images and diffusers' differ by {diff:.2e} in fp32")
        timings = {"end-to-end": interleaved(runs, rounds=repeats, warmup=0, device=device)}
    results = {
        "family": "pipeline",
        "case": name,
        "device": device_name(device),
        "dtype": str(dtype),
        "image_size": size,
        "steps": steps,
        "cfg": guidance,
        "max_image_diff": diff,
        "runs": [],
        "speedup": {},
    }
    if args.compile != "none":
        backend = "eager" if args.smoke else "inductor"  # eager: checks tracing on the CPU without codegen
        start = time.perf_counter()
        report = pair.ours.compile(backend=backend)
        log(f"best: ours {report}")
        compile_diffusers(pair.theirs, pair.case.family, backend)
        best = {
            "ours": lambda: pair.run("ours", steps=steps, prompt_cache=True),
            "diffusers": lambda: pair.run("diffusers", steps=steps),
        }
        with torch.no_grad():
            diffs = {side: float(abs(best[side]() - reference).max()) for side in SIDES}  # diffusers compiles
            log(f"best: compiled and warmed up in {time.perf_counter() - start:.0f} s; max |image - ours "
                f"eager|: ours {diffs['ours']:.1e}, diffusers {diffs['diffusers']:.1e}")  # fmt: skip
            timings["best"] = interleaved(best, rounds=repeats, warmup=0, device=device)
        results.update(best_image_diff=diffs, compile_s=report.seconds, compile_graphs=report.graphs)
    for mode, t in timings.items():
        o, d = t.median("ours"), t.median("diffusers")
        speedup = t.ratio("diffusers", "ours")
        results["runs"] += [
            {"mode": mode, "impl": "ours", "s_per_image": o},
            {"mode": mode, "impl": "diffusers", "s_per_image": d},
        ]
        results["speedup"][mode] = {"value": speedup.value, "ci95": [speedup.low, speedup.high]}
        log(
            f"pipeline {mode} {size}^2 {steps} steps: ours {o:.3f} s/img, diffusers {d:.3f} s/img, "
            f"speed-up {speedup}, max |image diff| {diff:.1e} (median of {repeats})"
        )
    return results


def check_flops(case: Case, flops: float, family: str) -> None:
    """The FLOP formula against torch's count (norms and pointwise ops are not counted there)."""
    counted = counted_flops(case)
    log(f"FLOPs per forward: formula {flops:.6g}, FlopCounterMode {counted:.6g}")
    if abs(flops - counted) > 1e-3 * counted:
        raise SystemExit(f"the {family} FLOP formula is off: {flops:.6g} vs counted {counted:.6g}")


def transformer_bench(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """ms per forward and TFLOP/s, eager and compiled, ours vs diffusers, for ``args.family``."""
    size = "tiny" if args.smoke else GPU_SIZES[args.family]
    log(f"building the {args.family} {size} models ({device}, {dtype})")
    case = build_case(args.family, size, device=device, dtype=dtype, depth=args.depth)
    err = case.relative_error()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if not err < tolerance:
        message = f"ours and diffusers disagree: relative error {err:.3e} > {tolerance}"
        if dtype == torch.float32:
            raise SystemExit(message)
        log(f"WARNING: {message} (bf16; timing anyway, the result is marked)")
    flops = forward_flops(case)
    if args.smoke:
        check_flops(case, flops, args.family)
    name = device_name(device)
    shape = f"{args.family} depth {case.config.depth} hidden {case.config.hidden_size}"
    log(f"{shape}, {dtype}, {name}, torch {torch.__version__}")
    log(f"forward: {flops / 1e12:.2f} TFLOP; ours vs diffusers relative error {err:.2e}")
    results = {
        "family": args.family,
        "device": name,
        "dtype": str(dtype),
        "config": dataclasses.asdict(case.config),
    }
    results.update(tflop_per_forward=flops / 1e12, relative_error=err, parity_ok=err < tolerance)
    results.update(runs=[], speedup={})
    modes = ["eager"] + ([] if args.compile == "none" else [f"compile-{args.compile}"])
    for mode in modes:
        log(f"timing {mode}: {args.warmup} warm-up + {args.steps} forwards each")
        start = time.perf_counter()
        models = {side: case.model(side) for side in SIDES}
        if mode != "eager":
            models = {side: compiled(case, side, args.compile, args.smoke) for side in SIDES}
        runs = {side: (lambda side=side, m=models[side]: case.run(side, m)) for side in SIDES}
        with torch.no_grad():
            timings = interleaved(runs, rounds=args.steps, warmup=args.warmup, device=device)
        setup_s = time.perf_counter() - start
        for impl in SIDES:
            ms = 1e3 * timings.median(impl)
            tflops = flops / ms / 1e9
            share = tflops / PEAK_TFLOPS
            results["runs"].append(dict(mode=mode, impl=impl, ms=ms, tflops=tflops, peak_share=share))
            log(f"{mode:16} {impl:9} {ms:9.2f} ms  {tflops:7.1f} TFLOP/s  {100 * share:5.1f}% of peak")
        speedup = timings.ratio("diffusers", "ours")
        results["speedup"][mode] = {"value": speedup.value, "ci95": [speedup.low, speedup.high]}
        log(f"{mode:16} speedup ours/diffusers {speedup}  ({setup_s:.0f} s incl. compile and warmup)")
    return results


def summarize(folder: str) -> str:
    """Collect the gpu_bench_*.json files of ``folder`` into summary.json and a markdown table summary.md."""
    import glob

    results = []
    for path in sorted(glob.glob(os.path.join(folder, "gpu_bench_*.json"))):
        with open(path) as f:
            results.append(json.load(f))
    lines = ["| case | mode | ours | diffusers | speed-up | ours TFLOP/s (% peak) | diffusers TFLOP/s |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in results:
        by_mode: dict[str, dict[str, dict]] = {}
        for row in r["runs"]:
            by_mode.setdefault(row["mode"], {})[row["impl"]] = row
        for mode, rows in by_mode.items():
            o, d = rows["ours"], rows["diffusers"]
            case = f"{r['family']} ({r['dtype'].replace('torch.', '')}, {r['device']})"
            if "ms" in o:
                lines.append(
                    f"| {case} | {mode} | {o['ms']:.1f} ms | {d['ms']:.1f} ms | {d['ms'] / o['ms']:.2f}x | "
                    f"{o['tflops']:.0f} ({100 * o['peak_share']:.0f}%) | {d['tflops']:.0f} |"
                )
            else:
                o_s, d_s = o["s_per_image"], d["s_per_image"]
                lines.append(
                    f"| {case}, {r['image_size']}^2, {r['steps']} steps | {mode} | {o_s:.3f} s/img"
                    f" | {d_s:.3f} s/img | {d_s / o_s:.2f}x | | |"
                )
        if "relative_error" in r:
            ok = "" if r.get("parity_ok", True) else " (ABOVE TOLERANCE)"
            lines.append(f"| {r['family']} parity | | relative error {r['relative_error']:.2e}{ok} | | | | |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(f"GPU benchmark, peak = {PEAK_TFLOPS:.0f} TFLOP/s dense bf16\n\n" + table)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(GPU_SIZES) + ["pipeline"], default="sd3")
    parser.add_argument("--smoke", action="store_true", help="tiny size, CPU, fp32: checks the script only")
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    parser.add_argument("--steps", type=int, default=10, help="timed forwards per model and mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", choices=("regional", "full", "none"), default="regional")
    parser.add_argument("--pipeline-steps", type=int, default=None, help="sampling steps (default 28)")
    parser.add_argument("--repeats", type=int, default=5, help="timed images per pipeline")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON results ($OUT)")
    parser.add_argument("--summary", action="store_true", help="only collect --out's JSON files into a table")
    args = parser.parse_args(argv)
    if args.summary:
        if not args.out:
            raise SystemExit("--summary needs --out (or $OUT): the folder holding the gpu_bench_*.json files")
        print(summarize(args.out), end="")
        return
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.steps, args.warmup = min(args.steps, 3), 1
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        raise SystemExit("no CUDA device: run with --smoke to check the script on the CPU")

    if args.family == "pipeline":
        results = pipeline_bench(args, device, dtype)
    else:
        results = transformer_bench(args, device, dtype)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"gpu_bench_{args.family}{'_smoke' if args.smoke else ''}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
