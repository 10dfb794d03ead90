"""Generation quality of a tiny-emoji model, measured by the emoji judge (retrieval of the prompted emoji).

Captions come from a split's phrasings (``--split validation`` to choose settings, ``heldout`` for the final
numbers: phrasings never seen in training) for a set of emoji: ``common`` (the committed 300 most common
object and animal emoji, ``training/recipes/tiny_emoji/common300.txt``), ``all`` (every emoji once) or both.
Caption k of emoji e is ``caption(sample_at(k, split=..., emoji=e))``: its phrasing, name or alias and
background come from the split's stream, so the set is the same on every machine. Each image has its own
seed (``--seed + i``), so rows differ only by the setting they name.

Reported per guidance scale (``--guidance-list``): top-1 and top-5 of the prompted emoji, overall and per
category, with a 95% bootstrap interval, and each scale's paired difference to the first; and the judge on
the ground-truth renders of the same captions (its ceiling on them).

    python bench/emoji_quality.py --model runs/tiny-emoji/train/final --split validation --set common \\
        --guidance-list 1,2,3,4,5,6        # choose the guidance on validation phrasings
    python bench/emoji_quality.py --model weights/tiny-emoji --split heldout --set both --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from quality import encode_with_empty, generate


def interval(hits: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    idx = np.random.default_rng(seed).integers(0, len(hits), size=(n_boot, len(hits)))
    low, high = np.quantile(hits[idx].mean(1), [0.025, 0.975])
    return float(low), float(high)


def paired(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b) for hits of the same captions, with a paired bootstrap 95% interval."""
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    boots = a[idx].mean(1) - b[idx].mean(1)
    low, high = np.quantile(boots, [0.025, 0.975])
    return float(a.mean() - b.mean()), float(low), float(high)


# README's grid, fixed before the model was trained: the six prompts of the issue, then six more everyday ones
EXAMPLES = [
    "a cat", "a dog", "a pizza", "a red apple", "a rocket", "a house",
    "a banana", "a car", "a bicycle", "a guitar", "a christmas tree", "a birthday cake",
]  # fmt: skip


def save_examples(pipe, folder: Path, steps: int, guidance: float) -> list[dict]:
    """Each of :data:`EXAMPLES` as ``folder/tiny-emoji-<i>.png`` (seed i, upscaled 4x, nearest), and what
    the judge sees in each; returns the rows (also in ``folder/tiny-emoji.json``)."""
    from PIL import Image

    from mmdit_flow.training.recipes.tiny_emoji import emoji_set as E
    from mmdit_flow.training.recipes.tiny_emoji import judge

    folder.mkdir(parents=True, exist_ok=True)
    seeds = list(range(len(EXAMPLES)))
    images = pipe(EXAMPLES, steps=steps, guidance=guidance, seed=seeds, output="np", progress=False)
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    ranked = judge.retrieve(list(images))
    same, names = judge.picture_classes(), E.catalogue()
    rows = []
    for i, (prompt, image, r) in enumerate(zip(EXAMPLES, images, ranked, strict=True)):
        Image.fromarray(image).resize((256, 256), Image.NEAREST).save(folder / f"tiny-emoji-{i}.png")
        wanted = judge.parse_caption(prompt)
        rows.append({
            "file": f"tiny-emoji-{i}.png", "prompt": prompt, "seed": i,
            "judge_top1": names[r[0]].name, "hit": bool(same[r[0]] == same[wanted]),
        })  # fmt: skip
    (folder / "tiny-emoji.json").write_text(json.dumps(rows, indent=1))
    return rows


def captions_for(emoji: list[int], split: str, seed: int) -> tuple[list[str], list]:
    from mmdit_flow.training.recipes.tiny_emoji import emoji_set as E

    samples = [E.sample_at(k, seed=seed, split=split, emoji=e) for k, e in enumerate(emoji)]
    return [E.caption(s) for s in samples], samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--examples", type=Path, default=None, help="only draw README's grid here")
    parser.add_argument("--split", default="heldout", choices=["validation", "heldout"])
    parser.add_argument("--set", default="common", choices=["common", "all", "both"])
    parser.add_argument("--n", type=int, default=None, help="only the first N emoji of each set")
    parser.add_argument(
        "--stride", type=int, default=1, help="every K-th emoji of each set (a sample across categories)"
    )
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance-list", default="4", help="comma-separated guidance scales")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.training.recipes.tiny_emoji import common, judge
    from mmdit_flow.training.recipes.tiny_emoji import emoji_set as E

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = TextToImagePipeline.from_pretrained(args.model)
    if args.examples is not None:
        d = pipe.defaults
        rows = save_examples(pipe, args.examples, d.steps, d.guidance)
        print(f"{d.steps} steps, guidance {d.guidance:g}\n\n| prompt | judge's top-1 | hit |\n|---|---|---|")
        for r in rows:
            print(f"| {r['prompt']} | {r['judge_top1']} | {'yes' if r['hit'] else 'no'} |")
        return
    scales = [float(g) for g in args.guidance_list.split(",") if g.strip()]
    sets = {"common": [e.index for e in common.committed_common()], "all": [e.index for e in E.catalogue()]}
    chosen = ["common", "all"] if args.set == "both" else [args.set]
    if args.stride < 1:
        parser.error(f"--stride must be >= 1, got {args.stride}")
    report: dict = {"model": args.model, "split": args.split, "steps": args.steps, "sets": {}}
    report["stride"] = args.stride
    print(
        f"{args.model}: {args.split} phrasings, {args.steps} steps, torch threads {torch.get_num_threads()}"
    )
    for name in chosen:
        emoji = sets[name][:: args.stride][: args.n]
        texts, samples = captions_for(emoji, args.split, args.seed)
        seeds = [args.seed + i for i in range(len(texts))]
        truth = judge.score(judge.retrieve([E.render(s) for s in samples]), emoji)
        print(f"\n### {name}: {len(texts)} emoji\n")
        print(f"judge on the ground-truth renders: top-1 {truth.top1:.1%}, top-5 {truth.top5:.1%}\n")
        print("| guidance | top-1 [95% CI] | top-5 | vs first scale (top-1, paired) | s/image |")
        print("|---:|---|---:|---|---:|")
        cond, uncond = encode_with_empty(pipe, texts, pipe.defaults.max_sequence_length)
        rows, first = [], None
        for g in scales:
            start = time.perf_counter()
            images = generate(pipe, cond, uncond, args.steps, g, seeds, args.batch)
            per_image = (time.perf_counter() - start) / len(images)
            result = judge.score(judge.retrieve(images), emoji)
            hits = np.array([h for h, _ in result.hits], dtype=float)
            first = hits if first is None else first
            lo, hi = interval(hits)
            d = paired(hits, first)
            print(
                f"| {g:g} | {result.top1:.1%} [{lo:.1%}, {hi:.1%}] | {result.top5:.1%} | "
                f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] | {per_image:.3f} |",
                flush=True,
            )
            rows.append({"guidance": g, **result.to_dict(), "ci_top1": [lo, hi], "s_per_image": per_image})
        best = max(rows, key=lambda r: r["top1"])
        print(f"\nper category at guidance {best['guidance']:g} (top-1, images):")
        for cat, v in best["per_category"].items():
            print(f"  {cat:<11s} {v['top1']:6.1%}  ({v['n']})")
        report["sets"][name] = {"captions": texts, "truth_top1": truth.top1, "rows": rows}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
