"""Generation quality of a captioned-shapes model, measured by the classical evaluator.

Images are generated from captions of the held-out split (every scene holds a colour-shape pair that never
occurs in training) and scored by the recipe's evaluator
(``mmdit_flow.training.recipes.tiny_shapes.evaluator``) against their captions: the overall
attribute accuracy (share of all stated attributes that hold) and the share of images with every attribute
right. Reported:

* the headline: ``--steps`` Euler steps with classifier-free guidance ``--guidance``, per attribute;
* accuracy against the number of steps (at ``--guidance``) and against the guidance scale (at ``--steps``);
* the headline split by scenes of one and of two objects (the two-object ones are the hard part);
* the same headline on training-split captions (the first images the model was trained on);
* the gain of each guidance scale over none (guidance 1) with a paired 95% bootstrap interval over images;
* two references: the evaluator on the ground-truth renders of the same captions (its ceiling) and on
  mismatched captions (chance);
* with ``--compare FOLDER``, another model's headline on the same captions and seeds, and the paired
  difference with a 95% bootstrap interval over images.

Every image has its own seed (``--seed + i``), so rows differ only by the setting they name.

    python bench/quality.py                                # the shipped weights/tiny-shapes/, 200 captions
    python bench/quality.py --model runs/tiny-shapes/final --n 100 --json out.json
    python bench/quality.py --model NEW --compare weights/tiny-shapes --steps-list '' --guidance-list ''

Markdown tables go to stdout (docs/quality.md holds a run); ``--json`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def encode_with_empty(pipe, captions: list[str], max_sequence_length: int | None = None):
    """(captions' prompt embeddings, the empty prompt's expanded to as many): CFG's two branches."""
    from mmdit_flow.pipelines.text import PromptEmbeds

    cond = pipe.encode_prompt(captions, max_sequence_length)
    empty = pipe.encode_prompt([""], max_sequence_length)
    n = len(captions)
    return cond, PromptEmbeds(empty.txt.expand(n, -1, -1), empty.vec.expand(n, -1))


def generate(
    pipe, cond, uncond, steps: int, guidance: float, seeds: list[int], batch: int
) -> list[np.ndarray]:
    """uint8 images [H, W, 3] for precomputed prompt embeddings, ``batch`` prompts per pipeline call."""
    images = []
    for s in range(0, len(seeds), batch):
        part = slice(s, s + batch)
        kw = {}
        if guidance > 1:
            kw = {
                "negative_prompt_embeds": uncond.txt[part],
                "negative_pooled_prompt_embeds": uncond.vec[part],
            }
        out = pipe(
            prompt_embeds=cond.txt[part],
            pooled_prompt_embeds=cond.vec[part],
            steps=steps,
            guidance=guidance,
            seed=seeds[part],
            output="np",
            progress=False,
            **kw,
        )
        images.extend(list((np.clip(out, 0, 1) * 255).round().astype(np.uint8)))
    return images


# README examples: training-split pairs, then held-out pairs (blue circle, red triangle) in new scenes.
EXAMPLES = [
    "a large red circle on the left and a small blue square on the right",
    "a small yellow triangle above a large green square on a black background",
    "a large purple triangle in the center on a white background",
    "a large blue circle at the bottom on a gray background",
    "a small red triangle to the left of a large cyan square",
    "a large orange square at the top on a black background",
]


def save_examples(pipe, folder: Path, steps: int, guidance: float, max_sequence_length: int | None) -> None:
    """Each of :data:`EXAMPLES` as ``folder/tiny-shapes-<i>.png`` (seed i, upscaled 4x, nearest) and the
    prompts in ``folder/tiny-shapes.txt``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = pipe(
        EXAMPLES, steps=steps, guidance=guidance, seed=list(range(len(EXAMPLES))), progress=False,
        max_sequence_length=max_sequence_length,
    )  # fmt: skip
    for i, image in enumerate(images):
        image.resize((256, 256), Image.NEAREST).save(folder / f"tiny-shapes-{i}.png")
    lines = [f"tiny-shapes-{i}.png\t{p}" for i, p in enumerate(EXAMPLES)]
    (folder / "tiny-shapes.txt").write_text("\n".join(lines) + "\n")


def row(result, **setting) -> dict:
    return {**setting, "overall": result.overall, "all_correct": result.all_correct, "n": result.n_images}


def main() -> None:
    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.training.recipes.tiny_shapes import evaluator, shapes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="diffusers SD3 folder (default: the shipped tiny-shapes)"
    )
    parser.add_argument("--n", type=int, default=200, help="held-out captions")
    parser.add_argument(
        "--n-sweep", type=int, default=100, help="held-out captions of the sweeps (first ones)"
    )
    parser.add_argument("--n-train", type=int, default=100, help="training-split captions (0: skip)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--steps-list", default="1,2,4,8,16,28", help="'' skips the sweep")
    parser.add_argument("--guidance-list", default="1,2,4,7", help="'' skips the sweep")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (pipeline default)")
    parser.add_argument(
        "--shift", type=float, default=None, help="sampling shift instead of the scheduler config's"
    )
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--examples", type=Path, default=None, help="also save EXAMPLES as PNGs here")
    parser.add_argument(
        "--compare", default=None, help="another model folder: its headline, paired against --model's"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def load(folder: str | None):
        pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
        if args.shift is not None:
            pipe.components.scheduler_config["shift"] = args.shift
        return pipe

    pipe = load(args.model)
    held = shapes.heldout_scenes(args.n)
    n_sweep = min(args.n_sweep, args.n)
    sets = {"heldout": held, "sweep": held[:n_sweep]}
    if args.n_train:
        sets["train"] = shapes.train_scenes(args.n_train)
    captions = {k: [shapes.caption(s) for s in v] for k, v in sets.items()}
    embeds, uncond = {}, {}
    for k, v in captions.items():
        embeds[k], uncond[k] = encode_with_empty(pipe, v, args.max_sequence_length)
    seeds = {k: [args.seed + i for i in range(len(v))] for k, v in captions.items()}
    cache: dict[tuple, object] = {}

    def accuracy(split: str, steps: int, guidance: float):
        key = (split, steps, guidance)
        head_key = ("heldout", steps, guidance)
        if split == "sweep" and head_key in cache:  # the first n_sweep images of a held-out run
            cache[key] = evaluator.summarize(cache[head_key].per_image[:n_sweep])
        if key not in cache:
            images = generate(pipe, embeds[split], uncond[split], steps, guidance, seeds[split], args.batch)
            cache[key] = evaluator.evaluate(images, captions[split])
        return cache[key]

    report: dict = {
        "model": str(args.model or "weights/tiny-shapes"),
        "n": args.n,
        "n_sweep": n_sweep,
        "n_train": args.n_train,
        "max_sequence_length": args.max_sequence_length,
        "shift": pipe.components.scheduler_config.get("shift", 1.0),
    }
    report["reference"] = {
        "ground_truth_renders": evaluator.evaluate(
            [shapes.render(s) for s in held], captions["heldout"]
        ).overall,
        "chance": evaluator.chance_level(held).overall,
    }
    head = accuracy("heldout", args.steps, args.guidance)
    report["headline"] = row(head, steps=args.steps, guidance=args.guidance)
    report["per_attribute"] = head.per_attribute
    report["by_objects"] = {}
    for k in (1, 2):
        part = [c for c, scene in zip(head.per_image, held, strict=True) if len(scene.objects) == k]
        if part:
            r = evaluator.summarize(part)
            report["by_objects"][k] = {**row(r), "per_attribute": r.per_attribute}
    report["vs_steps"] = [
        row(accuracy("sweep", s, args.guidance), steps=s, guidance=args.guidance)
        for s in map(int, filter(None, args.steps_list.split(",")))
    ]
    report["vs_guidance"] = [
        row(accuracy("sweep", args.steps, g), steps=args.steps, guidance=g)
        for g in map(float, filter(None, args.guidance_list.split(",")))
    ]
    # Paired bootstrap (same captions and seeds): is guidance g measurably better than none (g = 1)?
    report["guidance_gain"] = []
    if report["vs_guidance"]:
        none = accuracy("sweep", args.steps, 1.0)
        for g in (r["guidance"] for r in report["vs_guidance"] if r["guidance"] != 1.0):
            diff, low, high = evaluator.bootstrap_difference(accuracy("sweep", args.steps, g), none)
            report["guidance_gain"].append({"guidance": g, "gain": diff, "ci95": [low, high]})
    report["train_split"] = None
    if args.n_train:
        result = accuracy("train", args.steps, args.guidance)
        report["train_split"] = row(result, steps=args.steps, guidance=args.guidance)
    report["compare"] = None
    if args.compare is not None:
        other = load(args.compare)
        cond, unc = encode_with_empty(other, captions["heldout"], args.max_sequence_length)
        images = generate(other, cond, unc, args.steps, args.guidance, seeds["heldout"], args.batch)
        theirs = evaluator.evaluate(images, captions["heldout"])
        diff, low, high = evaluator.bootstrap_difference(head, theirs)
        report["compare"] = {
            "model": args.compare, **row(theirs), "per_attribute": theirs.per_attribute,
            "gain": diff, "ci95": [low, high],
        }  # fmt: skip
    report["seconds"] = time.perf_counter() - start

    if args.examples is not None:
        save_examples(pipe, args.examples, args.steps, args.guidance, args.max_sequence_length)
    pct = "{:.1%}".format
    print(
        f"model {report['model']}: {args.n} held-out captions ({n_sweep} in the sweeps), "
        f"{args.n_train} training captions, T5 tokens {args.max_sequence_length or 'default'}\n"
    )
    print("| captions | steps | guidance | overall attribute accuracy | all attributes right |")
    print("|---|---|---|---|---|")
    for name, r in (("held-out", report["headline"]), ("training split", report["train_split"])):
        if r is None:
            continue
        print(
            f"| {name} | {r['steps']} | {r['guidance']:g} | {pct(r['overall'])} | {pct(r['all_correct'])} |"
        )
    ref = report["reference"]
    print(f"| held-out, ground-truth renders | - | - | {pct(ref['ground_truth_renders'])} | - |")
    print(f"| held-out, mismatched captions (chance) | - | - | {pct(ref['chance'])} | - |\n")
    print("| attribute | " + " | ".join(head.per_attribute) + " |")
    print("|---|" + "---|" * len(head.per_attribute))
    print("| accuracy | " + " | ".join(pct(v) for v in head.per_attribute.values()) + " |\n")
    print("| held-out scenes | images | overall | all right | " + " | ".join(head.per_attribute) + " |")
    print("|---|---|---|---|" + "---|" * len(head.per_attribute))
    for k, r in report["by_objects"].items():
        cells = [pct(r["per_attribute"][a]) if a in r["per_attribute"] else "-" for a in head.per_attribute]
        name = "one object" if k == 1 else "two objects"
        head_cells = [name, str(r["n"]), pct(r["overall"]), pct(r["all_correct"])]
        print("| " + " | ".join(head_cells + cells) + " |")
    print()
    if report["compare"] is not None:
        c = report["compare"]
        gain, low, high = (100 * v for v in (c["gain"], *c["ci95"]))
        print("| held-out, same captions and seeds | overall | all right |\n|---|---|---|")
        print(f"| {report['model']} | {pct(head.overall)} | {pct(head.all_correct)} |")
        print(f"| {c['model']} | {pct(c['overall'])} | {pct(c['all_correct'])} |")
        interval = f"{gain:+.1f} points [{low:+.1f}, {high:+.1f}]"
        print(f"| difference (paired, 95% bootstrap interval) | {interval} | - |\n")
    for title, key, col in (("steps", "vs_steps", "steps"), ("guidance", "vs_guidance", "guidance")):
        rows = report[key]
        if not rows:
            continue
        print(f"| {title} | " + " | ".join(f"{r[col]:g}" for r in rows) + " |")
        print("|---|" + "---|" * len(rows))
        print("| overall | " + " | ".join(pct(r["overall"]) for r in rows) + " |")
        print("| all right | " + " | ".join(pct(r["all_correct"]) for r in rows) + " |\n")
    if report["guidance_gain"]:
        print("| guidance vs none (paired, 95% bootstrap interval) | gain in overall accuracy |")
        print("|---|---|")
        for r in report["guidance_gain"]:
            gain, low, high = (100 * v for v in (r["gain"], *r["ci95"]))
            print(f"| {r['guidance']:g} vs 1 | {gain:+.1f} points [{low:+.1f}, {high:+.1f}] |")
        print()
    print(f"wall time {report['seconds']:.0f} s ({args.threads} threads)")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
