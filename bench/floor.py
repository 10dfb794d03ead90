"""The kernel floor: the share of the transformer's CPU forward in GEMM and attention kernels, ours vs theirs.

    python bench/floor.py                        # SD3 and Flux at the small real size, fp32, 1 thread
    python bench/floor.py --family sd3 --forwards 5 --top 12

For each side, torch.profiler records ``--forwards`` forwards (no grad, after two untimed ones) of
bench/cases.py's model and inputs (same weights on both sides, outputs checked equal first), and sums the
self CPU time of every op (time inside the op, not in the ops it calls). Ops fall in three groups:

- GEMM: aten::mm / addmm / bmm / baddbmm (MKL / oneDNN matmuls, what ``F.linear`` and ``@`` end in) and the
  convolution kernels (SD3's patch embedding, a strided 2x2 convolution: a GEMM in disguise);
- attention: the SDPA kernels (aten::_scaled_dot_product_flash_attention_for_cpu and its relatives);
- the rest, listed by op: norms, pointwise ops, copies, concatenations and the dispatcher's bookkeeping.

The floor is the GEMM + attention share: what is left to win at fp32 parity without changing kernels. The
profiler itself adds a little time to every op call, which weighs most on the small ops of "the rest".
``--compile`` profiles both sides with their blocks compiled (inductor, regional; compiled before timing):
inductor's fused pointwise code then shows as the self time of "## Call CompiledFxGraph" entries.
"""

from __future__ import annotations

import argparse
import collections

import torch
from cases import SIDES, build_case

GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkl_linear", "aten::mkldnn_linear")
CONV = ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::_slow_conv2d_forward")
ATTENTION = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    "aten::_flash_attention_forward",
)


def group(op: str) -> str:
    if op in GEMM or op in CONV:
        return "GEMM"
    if op in ATTENTION:
        return "attention"
    return "rest"


def self_times(run, forwards: int) -> dict[str, float]:
    """Self CPU milliseconds per op name, summed over ``forwards`` profiled forwards."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(2):
            run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                run()
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages() if e.self_cpu_time_total > 0}


def report(family: str, size: str, forwards: int, top: int, compile: bool) -> dict[str, dict[str, float]]:
    case = build_case(family, size)
    err = case.relative_error()
    if err > 1e-4:
        raise RuntimeError(f"ours and diffusers disagree: relative error {err:.2e}")
    if compile:
        for side in SIDES:
            for block in case.blocks(side):
                block.compile()
    threads = torch.get_num_threads()
    mode = "compiled blocks" if compile else "eager"
    print(f"\n{family} {size}, {mode}: {forwards} forwards, fp32, {threads} thread(s), rel. error {err:.1e}")
    shares = {}
    for side in SIDES:
        times = self_times(lambda side=side: case.run(side), forwards)
        total = sum(times.values())
        groups = collections.Counter()
        for op, ms in times.items():
            groups[group(op)] += ms
        shares[side] = {g: groups[g] / total for g in ("GEMM", "attention", "rest")}
        gemm, attention = shares[side]["GEMM"], shares[side]["attention"]
        print(
            f"  {side:9s} {total / forwards:8.1f} ms/forward self CPU: GEMM {100 * gemm:.1f}%, "
            f"attention {100 * attention:.1f}%, together {100 * (gemm + attention):.1f}%; the rest "
            f"{groups['rest'] / forwards:.1f} ms:"
        )
        rest = sorted(((ms, op) for op, ms in times.items() if group(op) == "rest"), reverse=True)
        for ms, op in rest[:top]:
            print(f"      {op[:44]:44s} {ms / forwards:7.2f} ms  {100 * ms / total:5.2f}%")
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd3", "flux", "both"), default="both")
    parser.add_argument(
        "--size", default="small", help="a bench/cases.py size (default: small, the real one)"
    )
    parser.add_argument("--forwards", type=int, default=3)
    parser.add_argument("--top", type=int, default=10, help="ops of the rest to list")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="compile each side's blocks first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for family in ("sd3", "flux") if args.family == "both" else (args.family,):
        report(family, args.size, args.forwards, args.top, args.compile)


if __name__ == "__main__":
    main()
