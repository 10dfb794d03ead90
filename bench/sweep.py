"""Train recipe variants of the tiny-shapes model side by side on one GPU and score each on the same captions.

A small model's training step on a GPU should cost mostly launch overhead (expected, not yet measured: a
batch-1 step of the tiny-shapes model takes 37 ms on this project's CPU), so one process would leave most of
the device idle. So this runs every variant as its own training process at once (``python -m
mmdit_flow.training`` with the variant's overrides on ``training/recipes/tiny_shapes/config.yaml``), on
prepared data caches
(one per training-set size), then ships each run with ``ship assemble`` and scores it with the classical
evaluator on the validation captions (``bench/select_sampling.py``'s: training-split scenes just past the
training data, which choose between variants) and on the held-out captions (reported, never used to choose).
Each variant is compared with the first one by a paired bootstrap over the validation images.

    python bench/sweep.py --work /tmp/sweep --json sweep.json \\
        --variant base "data.batch_size=256 optimizer.lr=2e-3 schedule.max_steps=3000" \\
        --variant shift5 "data.batch_size=256 optimizer.lr=2e-3 schedule.max_steps=3000 objective.shift=5"

A variant's ``images=N`` (not a config key) trains on the first N training-split scenes instead of the
recipe's 10 000; the validation scenes then start after the largest N of the sweep. ``--end-by`` (Unix time)
bounds the whole run: training stops ``--eval-reserve`` seconds before it (each unfinished run is sent
SIGTERM, saves a checkpoint and is scored from its newest checkpoint's EMA weights; the report says how many
steps each one reached). Each variant is sampled at the shift it trained with
(``objective.shift``). ``--smoke`` runs the whole flow on the CPU at toy sizes (a few steps, 8 captions).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from quality import encode_with_empty, generate

RECIPE = "mmdit_flow.training.recipes.tiny_shapes"  # python -m RECIPE prepare | assemble


def run(cmd: list[str], cwd: Path, log: Path | None = None) -> None:
    out = open(log, "a") if log else None  # noqa: SIM115 - closed below
    try:
        subprocess.run(cmd, cwd=cwd, check=True, stdout=out, stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()


def newest_step(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if "." not in p.name]
    return max(steps, default=0)


def images_of(pairs: dict[str, str], smoke: bool = False) -> int:
    """Training scenes of a variant: its ``images=N`` (not a config key: the sweep prepares that data)."""
    n = int(pairs.get("images", 10_000))
    return min(n // 25, 800) if smoke else n


def overrides_of(text: str) -> dict[str, str]:
    pairs = dict(item.split("=", 1) for item in shlex.split(text))
    for key in ("output.dir", "data.path", "data.cache_dir", "model.components"):
        if key in pairs:
            raise SystemExit(f"variant overrides may not set {key}: the sweep sets it")
    return pairs


def main() -> None:
    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.training.config import load_config
    from mmdit_flow.training.recipes.tiny_shapes import evaluator, shapes, ship

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (data, cache, runs, models)")
    parser.add_argument("--components", type=Path, default=Path("weights/tiny-shapes"))
    parser.add_argument(
        "--variant", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), required=True,
        help="a name and its config overrides ('key=value key=value'); the first is the reference",
    )  # fmt: skip
    parser.add_argument("--end-by", type=float, default=None, help="Unix time by which everything ends")
    parser.add_argument("--eval-reserve", type=float, default=90.0, help="seconds kept for scoring")
    parser.add_argument("--n", type=int, default=200, help="validation and held-out captions each")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-device", default=None, help="`mmdit-flow cache` device (default: --device)")
    parser.add_argument("--prepare-only", action="store_true", help="write the data and caches, then stop")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: checks the flow")
    args = parser.parse_args()
    names = [n for n, _ in args.variant]
    if len(set(names)) != len(names):
        raise SystemExit(f"variant names must differ, got {names}")
    variants = {n: overrides_of(o) for n, o in args.variant}
    work = args.work.resolve()
    # one scratch folder per training-set size: the config's paths are relative to it
    roots = {n: work / f"d{images_of(p, args.smoke)}" for n, p in variants.items()}
    work.mkdir(parents=True, exist_ok=True)
    components = args.components.resolve()
    config = str(ship.CONFIG)
    recipe_shift = load_config(ship.CONFIG).objective.shift  # sampled at the shift it trained with
    start = time.time()
    report: dict = {"variants": {}, "device": args.device, "started": start}

    def save() -> None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    sizes = sorted({images_of(p, args.smoke) for p in variants.values()})
    for size in sizes:
        root = work / f"d{size}"
        root.mkdir(exist_ok=True)
        if not (root / "runs/tiny-shapes/data/train/metadata.jsonl").is_file():
            run([sys.executable, "-m", RECIPE, "prepare", "--components", str(components),
                 "--images", str(size)], root)  # fmt: skip
    log(f"data ready: {', '.join(map(str, sizes))} scenes")
    for size in sizes:
        root = work / f"d{size}"
        if not (root / "runs/tiny-shapes/cache").exists():
            run([sys.executable, "-m", "mmdit_flow.pipelines.cli", "cache", config, "--batch-size", "256",
                 "--device", args.cache_device or args.device], root)  # fmt: skip
    log("caches ready")
    if args.prepare_only:
        return

    smoke = ["schedule.max_steps=4", "data.batch_size=4", "model.overrides.depth=1"] if args.smoke else []
    procs, logs = {}, {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name, pairs in variants.items():
        cmd = [sys.executable, "-m", "mmdit_flow.training", config, *smoke,
               *[f"{k}={v}" for k, v in pairs.items() if k != "images"], f"output.dir=runs/{name}",
               "output.checkpoint_every=250", "output.keep_checkpoints=1",
               "output.progress=false"]  # fmt: skip
        logs[name] = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed when the runs end
        out = logs[name]
        procs[name] = subprocess.Popen(cmd, cwd=roots[name], env=env, stdout=out, stderr=subprocess.STDOUT)
        report["variants"][name] = {"overrides": pairs, "command": shlex.join(cmd[1:])}
    log(f"training {len(procs)} variants: {', '.join(procs)}")
    train_start = time.time()
    deadline = (args.end_by - args.eval_reserve) if args.end_by else None
    ended: dict[str, float] = {}
    while any(p.poll() is None for p in procs.values()):
        ended.update({n: time.time() for n, p in procs.items() if p.poll() is not None and n not in ended})
        if deadline and time.time() > deadline:
            log("deadline: stopping the unfinished runs (each saves a checkpoint)")
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
            break
        time.sleep(2)
    for f in logs.values():
        f.close()
    for name, p in procs.items():
        entry = report["variants"][name]
        run_dir = roots[name] / "runs" / name
        entry.update(returncode=p.returncode, steps=newest_step(run_dir), run_dir=str(run_dir))
        entry["finished"] = (run_dir / "final").exists()
        entry["train_seconds"] = ended.get(name, time.time()) - train_start
        if p.returncode not in (0, 128 + signal.SIGTERM):
            entry["log_tail"] = (work / f"{name}.log").read_text()[-1500:]
        log(f"{name}: return code {p.returncode}, {entry['steps']} steps, finished {entry['finished']}")
    save()

    n = 8 if args.smoke else args.n
    offset = max(sizes)  # validation scenes come after every variant's training scenes
    report["validation_scenes"] = [offset, offset + n - 1]
    val = [shapes.scene_at(offset + i, split="train") for i in range(n)]
    held = shapes.heldout_scenes(n)
    sets = {
        "validation": ([shapes.caption(s) for s in val], [2000 + i for i in range(n)]),
        "heldout": ([shapes.caption(s) for s in held], [1000 + i for i in range(n)]),
    }
    results: dict[str, dict[str, evaluator.EvalResult]] = {}
    for name, pairs in variants.items():
        entry = report["variants"][name]
        if entry["steps"] == 0 and not entry["finished"]:
            entry["error"] = f"no checkpoint; see {name}.log"
            continue
        shift = float(pairs.get("objective.shift", recipe_shift))
        folder = work / "models" / name
        try:
            latest = [] if entry["finished"] else ["--checkpoint", "latest"]
            assemble = [sys.executable, "-m", RECIPE, "assemble", entry["run_dir"],
                        str(folder), "--components", str(components), "--shift", str(shift),
                        *latest]  # fmt: skip
            run(assemble, work, work / f"{name}.log")
            pipe = TextToImagePipeline.from_pretrained(folder, device=args.device, dtype=torch.float32)
            results[name] = {}
            for split, (captions, seeds) in sets.items():
                cond, uncond = encode_with_empty(pipe, captions)
                imgs = generate(pipe, cond, uncond, args.steps, args.guidance, seeds, 100)
                r = evaluator.evaluate(imgs, captions)
                results[name][split] = r
                entry[split] = {"overall": r.overall, "all_correct": r.all_correct, **r.per_attribute}
            entry["sampling_shift"] = shift
        except Exception as err:  # one broken variant must not hide the others' results
            entry["error"] = f"{type(err).__name__}: {err}"
        log(f"{name}: {entry.get('validation', entry.get('error'))}")
        save()
    ref = names[0]
    for name in names[1:]:
        if name in results and ref in results:
            d, lo, hi = evaluator.bootstrap_difference(
                results[name]["validation"], results[ref]["validation"]
            )
            report["variants"][name]["validation_minus_" + ref] = [d, lo, hi]
    report["seconds"] = time.time() - start
    save()
    pct = "{:.1%}".format
    print(f"\n| variant | steps | validation | all right | held-out | minus {ref} (validation, 95% CI) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        e = report["variants"][name]
        if "validation" not in e:
            print(f"| {name} | {e.get('steps')} | {e.get('error')} | | | |")
            continue
        diff = e.get("validation_minus_" + ref)
        dtext = f"{100 * diff[0]:+.1f} [{100 * diff[1]:+.1f}, {100 * diff[2]:+.1f}]" if diff else "-"
        val, held = e["validation"], e["heldout"]
        print(f"| {name} | {e['steps']} | {pct(val['overall'])} | {pct(val['all_correct'])} | "
              f"{pct(held['overall'])} | {dtext} |")  # fmt: skip


if __name__ == "__main__":
    main()
