"""Few-step students against their teacher: accuracy at 1, 2, 4 and 8 steps, forwards and seconds per image.

Every model draws the same captions with the same seeds (``--seed + i``) and is scored by the recipe's
evaluator (``mmdit_flow.training.recipes.tiny_shapes.evaluator``). The reference is the teacher at its
headline setting (``--ref-steps`` Euler steps with CFG ``--guidance``); each row gives a model at a step
count, its guidance (a student's recorded default, normally 1: one forward per step), its accuracy, the
share of the reference's accuracy it keeps, and its paired difference to the reference with a 95 % bootstrap
interval over images (``evaluator.bootstrap_difference``). Forwards per image count transformer calls: a
CFG step is two (the pipeline batches them as one call of twice the batch).

Seconds per image: the reference and each model at ``--time-steps`` steps (those of them a student was
distilled for, when it records ``distilled_steps``; so for the accuracy rows) are timed side by side
(``timing.interleaved``, alternating rounds, medians, ratio with a bootstrap interval over rounds), a batch
of ``--time-batch`` images per call, on the CPU with ``--threads`` threads.

``--split heldout`` (the default) measures on the held-out captions (every scene holds a colour-shape pair
never seen in training); ``--split validation`` on training-split scenes just past the training data,
where settings and checkpoints are chosen.

    python bench/few_steps.py --model turbo=weights/tiny-shapes-turbo
    python bench/few_steps.py --model 2rf=runs/2rf --model turbo=runs/turbo --split validation --n 100

Markdown tables go to stdout (docs/quality.md holds a run); ``--json`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from quality import EXAMPLES, encode_with_empty, generate
from timing import interleaved


def named_folder(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"--model takes NAME=FOLDER, got {text!r}")
    return name, folder


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def flow_straightness(pipe, cond, uncond, guidance: float, seeds: list[int], steps: int) -> float:
    """``reflow.straightness`` of a model's (guided) ODE from these seeds' noise, per latent dimension."""
    from mmdit_flow.reflow import straightness
    from mmdit_flow.sampling import cfg

    n, d = len(seeds), pipe.defaults
    h, w = d.height // pipe.codec.scale_factor, d.width // pipe.codec.scale_factor
    shape = (pipe.codec.channels, h, w)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    fn = pipe._velocity
    if guidance > 1:
        fn = cfg(fn, guidance, txt=uncond.txt[:n], vec=uncond.vec[:n])
    ts = pipe._grid(steps, h, w)
    return straightness(fn, noise, ts, txt=cond.txt[:n], vec=cond.vec[:n]) / noise[0].numel()


def usable(pipe, steps_list: list[int]) -> list[int]:
    """The step counts of ``steps_list`` a model is made for: all of them, or those it was distilled for."""
    made_for = pipe.defaults.distilled_steps
    return [s for s in steps_list if made_for is None or s in made_for]


def save_examples(teacher, pipes: dict, args: argparse.Namespace, path: Path) -> None:
    """One PNG, upscaled 4x: a row per model and step count (the teacher at --ref-steps with CFG first), a
    column per prompt of ``quality.EXAMPLES`` with seed = its index; the rows are listed in ``path`` .txt."""
    import numpy as np
    from PIL import Image

    seeds = list(range(len(EXAMPLES)))
    rows = [("teacher", teacher, args.ref_steps, args.guidance)]
    rows += [
        (n, p, s, p.defaults.guidance) for n, p in pipes.items() if n != "teacher" for s in args.example_steps
    ]
    strips, lines = [], []
    for name, pipe, steps, guidance in rows:
        images = pipe(EXAMPLES, steps=steps, guidance=guidance, seed=seeds, output="np", progress=False)
        strips.append(np.concatenate(list(images), axis=1))
        forwards = steps * (2 if guidance > 1 else 1)
        lines.append(
            f"row {len(lines) + 1}: {name}, {steps} steps, guidance {guidance:g} ({forwards} forwards)"
        )
    grid = (np.clip(np.concatenate(strips, axis=0), 0, 1) * 255).round().astype(np.uint8)
    image = Image.fromarray(grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * 4, image.height * 4), Image.NEAREST).save(path)
    prompts = [f"column {i + 1}: {p}" for i, p in enumerate(EXAMPLES)]
    path.with_suffix(".txt").write_text("\n".join(lines + prompts) + "\n")


def main() -> None:
    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.training.recipes.tiny_shapes import evaluator, shapes, ship

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=None, help="the teacher's folder (default: shipped tiny-shapes)")
    parser.add_argument(
        "--model", type=named_folder, action="append", default=[], help="NAME=FOLDER, a student (repeatable)"
    )
    parser.add_argument("--split", choices=("heldout", "validation"), default="heldout")
    parser.add_argument("--n", type=int, default=200, help="captions")
    parser.add_argument("--steps-list", type=ints, default=ints("1,2,4,8"))
    parser.add_argument("--ref-steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=4.0, help="the teacher's CFG scale")
    parser.add_argument("--teacher-sweep", action="store_true", help="also the teacher at --steps-list")
    parser.add_argument(
        "--straightness", type=int, default=0, help="captions for the straightness of each ODE (0: skip)"
    )
    parser.add_argument("--time-steps", type=ints, default=ints("4,1"), help="students' steps in the timing")
    parser.add_argument("--time-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds (0: no timing)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--examples", type=Path, default=None,
        help="also save a PNG: quality.EXAMPLES (seeds 0-5) by the teacher and each model at --example-steps",
    )  # fmt: skip
    parser.add_argument("--example-steps", type=ints, default=ints("4,1"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    if args.split == "heldout":
        scenes = shapes.heldout_scenes(args.n)
    else:
        scenes = [shapes.scene_at(ship.TRAIN_IMAGES + i, split="train") for i in range(args.n)]
    captions = [shapes.caption(s) for s in scenes]
    seeds = [args.seed + i for i in range(args.n)]

    def load(folder: str | None) -> TextToImagePipeline:
        return TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)

    teacher = load(args.teacher)
    cond, uncond = encode_with_empty(teacher, captions)  # every model here shares the teacher's encoders

    def score(pipe, steps: int, guidance: float):
        images = generate(pipe, cond, uncond, steps, guidance, seeds, args.batch)
        return evaluator.evaluate(images, captions)

    reference = score(teacher, args.ref_steps, args.guidance)
    pipes = {"teacher": teacher} | {name: load(folder) for name, folder in args.model}
    rows = [("teacher", args.ref_steps, args.guidance, reference)]
    for name, pipe in pipes.items():
        if name == "teacher" and not args.teacher_sweep:
            continue
        guidance = args.guidance if name == "teacher" else pipe.defaults.guidance
        for steps in usable(pipe, args.steps_list):
            rows.append((name, steps, guidance, score(pipe, steps, guidance)))

    report: dict = {
        "teacher": str(args.teacher or "weights/tiny-shapes"),
        "models": dict(args.model),
        "split": args.split,
        "n": args.n,
        "rows": [],
    }
    pct = "{:.1%}".format
    print(
        f"{args.n} {args.split} captions, seeds {args.seed}-{args.seed + args.n - 1}; reference: the "
        f"teacher, {args.ref_steps} steps, guidance {args.guidance:g}\n"
    )
    print("| model | steps | guidance | forwards / image | overall | all right | of reference | "
          "vs reference (points, 95% CI) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, steps, guidance, result in rows:
        forwards = steps * (2 if guidance > 1 else 1)
        diff, low, high = evaluator.bootstrap_difference(result, reference)
        share = result.overall / reference.overall
        report["rows"].append({
            "model": name, "steps": steps, "guidance": guidance, "forwards": forwards,
            "overall": result.overall, "all_correct": result.all_correct, "of_reference": share,
            "minus_reference": diff, "ci95": [low, high],
        })  # fmt: skip
        print(
            f"| {name} | {steps} | {guidance:g} | {forwards} | {pct(result.overall)} | "
            f"{pct(result.all_correct)} | {pct(share)} | "
            f"{100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] |"
        )

    students = [name for name, _ in args.model]
    by_key = {(name, steps): result for name, steps, _, result in rows}
    pairs = [
        (n, s)
        for n in students[1:]
        for s in args.steps_list
        if (n, s) in by_key and (students[0], s) in by_key
    ]
    if pairs:
        print(f"\nagainst {students[0]} at the same steps (points, paired 95% CI):\n")
        print(f"| model | steps | minus {students[0]} |")
        print("|---|---|---|")
        report["vs_first_model"] = []
        for name, steps in pairs:
            diff, low, high = evaluator.bootstrap_difference(by_key[name, steps], by_key[students[0], steps])
            report["vs_first_model"].append(
                {"model": name, "steps": steps, "diff": diff, "ci95": [low, high]}
            )
            print(f"| {name} | {steps} | {100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] |")

    if args.straightness:
        k = min(args.straightness, args.n)
        print(f"\nstraightness (reflow.straightness per latent dimension, {args.ref_steps}-step grid, {k} "
              "captions; 0 is a straight flow):\n")  # fmt: skip
        print("| model | guidance | straightness |")
        print("|---|---|---|")
        report["straightness"] = {}
        for name, pipe in pipes.items():
            guidance = args.guidance if name == "teacher" else pipe.defaults.guidance
            with torch.no_grad():
                value = flow_straightness(pipe, cond, uncond, guidance, seeds[:k], args.ref_steps)
            report["straightness"][name] = value
            print(f"| {name} | {guidance:g} | {value:.4f} |")

    if args.rounds and len(pipes) > 1:
        batch_cond = cond.txt[: args.time_batch], cond.vec[: args.time_batch]
        batch_uncond = uncond.txt[: args.time_batch], uncond.vec[: args.time_batch]

        def sampler(pipe, steps: int, guidance: float):
            kw = {"prompt_embeds": batch_cond[0], "pooled_prompt_embeds": batch_cond[1]}
            if guidance > 1:
                kw["negative_prompt_embeds"], kw["negative_pooled_prompt_embeds"] = batch_uncond
            seed = seeds[: args.time_batch]

            def run() -> None:
                pipe(steps=steps, guidance=guidance, seed=seed, output="latent", progress=False, **kw)

            return run

        entries, steps_of = {"teacher": sampler(teacher, args.ref_steps, args.guidance)}, {}
        for name, pipe in pipes.items():
            for steps in usable(pipe, args.time_steps) if name != "teacher" else ():
                key = f"{name} @ {steps}"
                entries[key], steps_of[key] = sampler(pipe, steps, pipe.defaults.guidance), steps
        timings = interleaved(entries, rounds=args.rounds, warmup=1)
        print(
            f"\nseconds per image (batch {args.time_batch}, {args.threads} threads, {args.rounds} "
            "interleaved rounds, medians):\n"
        )
        print("| model | steps | s / image | teacher / model |")
        print("|---|---|---|---|")
        report["seconds_per_image"] = {}
        for name in entries:
            per_image = timings.median(name) / args.time_batch
            steps = args.ref_steps if name == "teacher" else steps_of[name]
            speedup = "1" if name == "teacher" else str(timings.ratio("teacher", name))
            report["seconds_per_image"][name] = {"steps": steps, "seconds": per_image, "speedup": speedup}
            print(f"| {name} | {steps} | {per_image:.4f} | {speedup} |")
    if args.examples is not None:
        save_examples(teacher, pipes, args, args.examples)
    seconds = time.perf_counter() - start
    report["seconds"] = seconds
    print(f"\nwall time {seconds:.0f} s ({args.threads} threads)")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
