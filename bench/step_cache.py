"""What step caching buys and costs on a captioned-shapes model: seconds per image against accuracy.

For every setting (the first-block cache at each of ``--thresholds``; TaylorSeer-style extrapolation at each
``INTERVAL:ORDER:WARMUP`` of ``--taylor``) and for the uncached pipeline, one run measures:

* accuracy on ``--n`` **validation** captions (training-split scenes past the training data, seeds 2000 + i,
  as ``bench/select_sampling.py``) and on ``--n`` **held-out** captions (every scene holds a colour-shape pair
  never seen in training, seeds 1000 + i, as ``bench/quality.py``), each setting's paired difference to the
  uncached images with a 95 % bootstrap interval over images (``evaluator.bootstrap_difference``);
* the share of block evaluations skipped over all those images;
* seconds per image on the first ``--batch`` held-out captions, every setting and the uncached pipeline
  timed in the same interleaved rounds (``timing.interleaved``), with the speed-up's 95 % interval over
  rounds. Images are made ``--batch`` captions per call, in the accuracy runs too: the first-block rule
  decides once per batch (by its largest change), so its skips depend on the batch size.

The recommended setting is chosen on validation alone: the one that skips the most blocks among those whose
validation accuracy is at most ``--budget`` points below the uncached one. The held-out rows only measure.

    python bench/step_cache.py                             # the shipped tiny-shapes, 28 steps, CFG 4
    python bench/step_cache.py --model shipped:tiny-shapes-turbo --steps 4 --guidance 1 --taylor 2:1:2

Markdown to stdout (docs/quality.md holds a run); ``--json`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from quality import encode_with_empty, generate
from timing import interleaved


def settings(thresholds: str, taylor: str) -> dict[str, object]:
    """Name -> cache config, in the order given (first-block ones first)."""
    from mmdit_flow.step_cache import FirstBlockCacheConfig, TaylorSeerCacheConfig

    out: dict[str, object] = {}
    for value in filter(None, thresholds.split(",")):
        out[f"first-block {float(value):g}"] = FirstBlockCacheConfig(float(value))
    for spec in filter(None, taylor.split(",")):
        parts = spec.split(":")
        if len(parts) != 3:
            raise SystemExit(f"--taylor takes INTERVAL:ORDER:WARMUP items, got {spec!r}")
        interval, order, warmup = map(int, parts)
        out[f"TaylorSeer {interval}/{order}/{warmup}"] = TaylorSeerCacheConfig(interval, order, warmup)
    return out


def main() -> None:
    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.pipelines.text import PromptEmbeds
    from mmdit_flow.step_cache import CacheStats
    from mmdit_flow.training.recipes.tiny_shapes import evaluator, shapes, ship

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="diffusers SD3 folder (default: the shipped tiny-shapes)"
    )
    parser.add_argument("--n", type=int, default=200, help="validation and held-out captions (each)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--thresholds", default="0.05,0.1,0.15,0.2,0.3", help="first-block thresholds")
    parser.add_argument(
        "--taylor",
        default="2:0:2,3:0:2,4:0:2,5:0:2,2:1:2,3:1:2,4:1:2,3:2:3",
        help="TaylorSeer INTERVAL:ORDER:WARMUP settings",
    )
    parser.add_argument("--budget", type=float, default=1.0, help="validation points a setting may lose")
    parser.add_argument("--batch", type=int, default=8, help="captions per pipeline call (and timed)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (0: no timing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.n < 1 or args.batch < 1 or args.rounds < 0:
        raise SystemExit(
            f"need --n >= 1, --batch >= 1, --rounds >= 0; got {args.n}, {args.batch}, {args.rounds}"
        )
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    configs = settings(args.thresholds, args.taylor)
    pipe = TextToImagePipeline.from_pretrained(args.model, device="cpu", dtype=torch.float32)

    scenes = {
        "validation": [shapes.scene_at(ship.TRAIN_IMAGES + i, split="train") for i in range(args.n)],
        "held-out": shapes.heldout_scenes(args.n),
    }
    first_seed = {"validation": 2000, "held-out": 1000}
    captions = {k: [shapes.caption(s) for s in v] for k, v in scenes.items()}
    embeds = {k: encode_with_empty(pipe, v) for k, v in captions.items()}

    def run(split: str, config) -> tuple[object, CacheStats]:
        """Scores of the split's images with ``config`` (None: uncached) and the summed cache counts."""
        cond, uncond = embeds[split]
        total, images = CacheStats(), []
        if config is None:
            pipe.disable_step_cache()
        else:
            pipe.enable_step_cache(config=config)
        for s in range(0, args.n, args.batch):
            part = slice(s, s + args.batch)
            seeds = [first_seed[split] + i for i in range(args.n)][part]
            c, u = (
                PromptEmbeds(cond.txt[part], cond.vec[part]),
                PromptEmbeds(uncond.txt[part], uncond.vec[part]),
            )
            images += generate(pipe, c, u, args.steps, args.guidance, seeds, args.batch)
            stats = pipe.transformer.step_cache.stats if config is not None else None
            if stats is not None:
                for name in ("forwards", "full", "blocks_run", "blocks_skipped"):
                    setattr(total, name, getattr(total, name) + getattr(stats, name))
        pipe.disable_step_cache()
        return evaluator.evaluate(images, captions[split]), total

    results = {
        name: {split: run(split, cfg) for split in scenes}
        for name, cfg in {"uncached": None, **configs}.items()
    }

    timings = None
    if args.rounds:
        cond, uncond = embeds["held-out"]
        first = PromptEmbeds(cond.txt[: args.batch], cond.vec[: args.batch])
        first_u = PromptEmbeds(uncond.txt[: args.batch], uncond.vec[: args.batch])
        seeds = [1000 + i for i in range(min(args.batch, args.n))]

        def timed(config):
            def call() -> None:
                if config is None:
                    pipe.disable_step_cache()
                else:
                    pipe.enable_step_cache(config=config)
                generate(pipe, first, first_u, args.steps, args.guidance, seeds, args.batch)

            return call

        fns = {name: timed(cfg) for name, cfg in {"uncached": None, **configs}.items()}
        timings = interleaved(fns, rounds=args.rounds, warmup=1, order="random")
        pipe.disable_step_cache()

    base = results["uncached"]
    rows = []
    for name in results:
        row = {"setting": name}
        stats = results[name]["held-out"][1]
        runs = results[name]["validation"][1].blocks_run + stats.blocks_run
        skipped = results[name]["validation"][1].blocks_skipped + stats.blocks_skipped
        row["skipped"] = skipped / (runs + skipped) if runs + skipped else 0.0
        for split in scenes:
            r = results[name][split][0]
            diff, low, high = evaluator.bootstrap_difference(r, base[split][0])
            row[split] = {
                "overall": r.overall,
                "all_correct": r.all_correct,
                "diff": diff,
                "ci95": [low, high],
            }
        if timings is not None:
            ratio = timings.ratio("uncached", name)
            row["seconds_per_image"] = timings.median(name) / len(seeds)
            row["speedup"] = [ratio.value, ratio.low, ratio.high]
        rows.append(row)
    allowed = [r for r in rows[1:] if 100 * r["validation"]["diff"] >= -args.budget]
    chosen = max(allowed, key=lambda r: r["skipped"])["setting"] if allowed else None
    seconds = time.perf_counter() - start

    pct, pts = "{:.1%}".format, "{:+.1f}".format
    print(
        f"model {args.model or 'weights/tiny-shapes'}: {args.steps} Euler steps, guidance {args.guidance:g}, "
        f"{args.n} validation and {args.n} held-out captions, {args.batch} per call; seconds per image over "
        f"{args.rounds} interleaved rounds of {args.batch} images, {args.threads} threads\n"
    )
    print(
        "| setting | blocks skipped | s / image | speed-up | validation | vs uncached, points | held-out "
        "| vs uncached, points |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["setting"] + (" (chosen)" if r["setting"] == chosen else ""), pct(r["skipped"])]
        if timings is not None and r["setting"] == "uncached":
            cells += [f"{r['seconds_per_image']:.4f}", "-"]
        elif timings is not None:
            speed = r["speedup"]
            cells += [f"{r['seconds_per_image']:.4f}", f"{speed[0]:.2f}x [{speed[1]:.2f}, {speed[2]:.2f}]"]
        else:
            cells += ["-", "-"]
        for split in scenes:
            s = r[split]
            interval = f"{pts(100 * s['diff'])} [{pts(100 * s['ci95'][0])}, {pts(100 * s['ci95'][1])}]"
            cells += [pct(s["overall"]), "-" if r["setting"] == "uncached" else interval]
        print("| " + " | ".join(cells) + " |")
    print(
        f"\nchosen on validation (most blocks skipped within {args.budget:g} point(s) of uncached): "
        f"{chosen or 'none'}"
    )
    print(f"wall time {seconds:.0f} s ({args.threads} threads)")
    if args.json is not None:
        report = {
            "model": str(args.model or "weights/tiny-shapes"), "steps": args.steps, "guidance": args.guidance,
            "n": args.n, "batch": args.batch, "rounds": args.rounds, "budget": args.budget, "rows": rows,
            "chosen": chosen, "seconds": seconds,
        }  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
