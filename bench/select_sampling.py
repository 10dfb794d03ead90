"""Choose the sampling shift and guidance scale of a captioned-shapes model on validation captions.

The validation captions are training-split scenes *after* the ones the model was trained on
(``ship.TRAIN_IMAGES`` onwards by default): the training distribution, but images the model never saw, and
none of the held-out colour-shape pairs. So the settings chosen here can be shipped and then measured once
on the held-out split by ``bench/quality.py`` without the held-out captions having chosen them.

For every (shift, guidance) pair it generates the same captions with the same seeds, scores them with
``mmdit_flow.training.recipes.tiny_shapes.evaluator``, and prints the overall attribute accuracy; then the
best pair and its paired bootstrap difference to the reference pair (``--reference``, the shipped settings by
default).

    python bench/select_sampling.py                       # the shipped weights/tiny-shapes/
    python bench/select_sampling.py --model FOLDER --shifts 1,2,3 --guidances 2,4,7 --json out.json

Ties (within 0.1 point) go to the smaller shift, then the smaller guidance: the simpler setting.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from quality import encode_with_empty, generate


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main() -> None:
    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.training.recipes.tiny_shapes import evaluator, shapes, ship

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="diffusers SD3 folder (default: shipped tiny-shapes)")
    parser.add_argument("--n", type=int, default=200, help="validation captions")
    parser.add_argument(
        "--offset", type=int, default=ship.TRAIN_IMAGES,
        help="first validation scene's index in the training split (default: just past the training data)",
    )  # fmt: skip
    parser.add_argument("--shifts", type=floats, default=floats("1,2,3"))
    parser.add_argument("--guidances", type=floats, default=floats("2,4,7"))
    parser.add_argument(
        "--reference", type=floats, default=None,
        help="SHIFT,GUIDANCE to compare the best against (default: the scheduler's shift, guidance 4)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.n < 1 or args.offset < 0:
        raise SystemExit(f"--n must be >= 1 and --offset >= 0, got {args.n} and {args.offset}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    pipe = TextToImagePipeline.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    shipped_shift = float(pipe.components.scheduler_config.get("shift", 1.0))
    reference = tuple(args.reference or (shipped_shift, 4.0))
    if len(reference) != 2:
        raise SystemExit(f"--reference takes SHIFT,GUIDANCE, got {args.reference}")
    captions = [shapes.caption(shapes.scene_at(args.offset + i, split="train")) for i in range(args.n)]
    cond, uncond = encode_with_empty(pipe, captions)
    seeds = [args.seed + i for i in range(args.n)]

    results = {}
    for shift in sorted(set(args.shifts) | {reference[0]}):
        pipe.components.scheduler_config["shift"] = shift
        for guidance in sorted(set(args.guidances) | ({reference[1]} if shift == reference[0] else set())):
            images = generate(pipe, cond, uncond, args.steps, guidance, seeds, args.batch)
            results[shift, guidance] = evaluator.evaluate(images, captions)
    pipe.components.scheduler_config["shift"] = shipped_shift

    best = max(results, key=lambda k: (round(results[k].overall, 3), -k[0], -k[1]))
    diff, low, high = evaluator.bootstrap_difference(results[best], results[reference])
    seconds = time.perf_counter() - start

    pct = "{:.1%}".format
    print(
        f"model {args.model or 'weights/tiny-shapes'}: {args.n} validation captions (training split, scenes "
        f"{args.offset}-{args.offset + args.n - 1}), {args.steps} Euler steps\n"
    )
    guidances = sorted({g for _, g in results})
    print("| shift \\ guidance | " + " | ".join(f"{g:g}" for g in guidances) + " |")
    print("|---|" + "---|" * len(guidances))
    for shift in sorted({s for s, _ in results}):
        cells = [pct(results[shift, g].overall) if (shift, g) in results else "-" for g in guidances]
        print(f"| {shift:g} | " + " | ".join(cells) + " |")
    print(
        f"\nbest: shift {best[0]:g}, guidance {best[1]:g} ({pct(results[best].overall)}); against shift "
        f"{reference[0]:g}, guidance {reference[1]:g}: {100 * diff:+.1f} points [{100 * low:+.1f}, "
        f"{100 * high:+.1f}] (paired, 95% bootstrap interval)"
    )
    print(f"wall time {seconds:.0f} s ({args.threads} threads)")
    if args.json is not None:
        report = {
            "model": str(args.model or "weights/tiny-shapes"),
            "n": args.n,
            "offset": args.offset,
            "steps": args.steps,
            "grid": [
                {"shift": s, "guidance": g, "overall": r.overall, "all_correct": r.all_correct}
                for (s, g), r in sorted(results.items())
            ],
            "best": {"shift": best[0], "guidance": best[1], "overall": results[best].overall},
            "reference": {"shift": reference[0], "guidance": reference[1]},
            "best_minus_reference": {"gain": diff, "ci95": [low, high]},
            "seconds": seconds,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
