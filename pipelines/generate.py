"""Batch generation: one PNG per line of a prompts file, across as many processes as are launched.

    accelerate launch -m mmdit_flow.pipelines.generate --prompts prompts.txt --out DIR   # any process count
    mmdit-flow generate --prompts prompts.txt --out DIR                                  # one process

Line i of the file (counted from 0; blank lines are skipped but keep their number) becomes ``DIR/0000i.png``
(five digits, more for longer files), drawn with seed ``--seed + i`` (``--seed`` defaults to 0), so an image
depends on its line alone, not on how many processes run or which one made it. The lines are cut into batches
of ``--batch-size`` in file order and the batches dealt to the processes in turn (batch j to process
j mod N): an image is always made in the same batch, so the files are bit-identical for any process count.

A stopped run continues where it left off: a line whose PNG is there and complete is kept (files are written
atomically, so a stop leaves none half-written), a damaged one is made again, and one made with other settings
is an error before any work (use another ``--out``, or delete the old files). Each PNG carries its
parameters (``parameters.py``); at the end the main process reads them back from every file and writes
``DIR/metadata.jsonl`` in line order, one JSON object per image: ``file_name`` and ``text`` (the prompt; the
Hugging Face imagefolder convention that ``mmdit-flow eval DIR`` reads) and ``line``, ``seed``,
``negative``, ``steps``, ``guidance``, ``sampler``, ``model``, ``height``, ``width`` and
``max_sequence_length``. The manifest is rebuilt on every run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mmdit_flow.pipelines.generate_cli import METADATA, check_device, save_image
from mmdit_flow.pipelines.parameters import GenerationParameters, NoParametersError, resolved_settings

SEED_LIMIT = 2**64  # checks.SEED_LIMIT (that module imports torch)


@dataclass(frozen=True)
class Job:
    """One line of the prompts file: its number, the file it becomes and how that file is made."""

    line: int
    name: str
    params: GenerationParameters


@dataclass
class Tally:
    written: int = 0
    kept: int = 0


def read_prompts(path: str) -> list[tuple[int, str]]:
    """(line number from 0, prompt) for every non-blank line, stripped; ValueError naming ``--prompts``."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"--prompts {path} is a folder; pass a text file with one prompt a line")
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ValueError(f"--prompts {path}: no such file") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompts {path} is not UTF-8 text ({err}); save it as UTF-8") from err
    prompts = [(i, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt (it is empty or blank); write one prompt a line")
    return prompts


def check_out(out: str) -> Path:
    """The output folder (made if missing); ValueError when ``--out`` is a file."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {out} is a file; --out names a folder for the images (made if missing)")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def plan(prompts: list[tuple[int, str]], base: GenerationParameters, seed: int) -> list[Job]:
    """One job per prompt line: seed ``seed + line``, file ``<line>.png`` with at least five digits."""
    last = prompts[-1][0]
    if not 0 <= seed or seed + last >= SEED_LIMIT:
        raise ValueError(f"--seed {seed}: seed + line number must stay in [0, 2**64 - 1] (last line {last})")
    digits = max(5, len(str(last)))
    return [
        Job(line, f"{line:0{digits}d}.png", replace(base, prompt=prompt, seed=seed + line))
        for line, prompt in prompts
    ]


def batches(jobs: list[Job], batch_size: int, rank: int = 0, world: int = 1) -> list[list[Job]]:
    """The batches of process ``rank`` of ``world``: the jobs cut into batches in file order, batch j to
    process j mod world (the same batches whatever the process count)."""
    cut = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    return cut[rank::world]


def recorded(path: Path) -> GenerationParameters | None:
    """The parameters ``path`` carries; None when it is missing or unreadable (a damaged file is remade);
    ValueError when it is an image without them (not ours: never overwritten)."""
    if not path.exists():
        return None
    try:
        return GenerationParameters.from_png(path)
    except NoParametersError as err:
        raise ValueError(f"{err}; move it away or use another --out") from err
    except ValueError:
        return None


def check_existing(out: Path, jobs: list[Job]) -> None:
    """ValueError, before any work, for an image in ``out`` made with other settings than this run's."""
    for job in jobs:
        old = recorded(out / job.name)
        if old is not None and old != job.params:
            there, now = old.to_dict(), job.params.to_dict()
            key = next(k for k in [*now, *there] if there.get(k) != now.get(k))
            raise ValueError(
                f"{out / job.name} was made with other settings ({key}: {there.get(key)!r} there, "
                f"{now.get(key)!r} now); use another --out, or delete the old images to remake them"
            )


def is_done(path: Path, params: GenerationParameters) -> bool:
    """The file is there, complete (its pixels decode) and made with ``params``."""
    from PIL import Image

    if recorded(path) != params:
        return False
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, SyntaxError):  # truncated or corrupt
        return False
    return True


def generate_part(
    pipe: Any, jobs: list[Job], out: Path, *, batch_size: int, rank: int = 0, world: int = 1, progress=False
) -> Tally:
    """Make the missing images of process ``rank``'s batches (all of ``jobs`` for ``world=1``).

    A batch with a missing image is generated whole (the others of it are not rewritten), so that every image
    comes from the same batch as in an uninterrupted run."""
    from tqdm.auto import tqdm

    tally = Tally()
    mine = batches(jobs, batch_size, rank, world)
    with tqdm(total=sum(map(len, mine)), disable=not progress, desc="images", unit="img") as bar:
        for batch in mine:
            todo = [not is_done(out / job.name, job.params) for job in batch]
            if any(todo):
                images = pipe(
                    [job.params.prompt for job in batch],
                    seed=[job.params.seed for job in batch],
                    progress=False,
                    **batch[0].params.call_arguments(),
                )
                for job, image, needed in zip(batch, images, todo, strict=True):
                    if needed:
                        save_image(image, out / job.name, job.params)
            tally.written += sum(todo)
            tally.kept += len(batch) - sum(todo)
            bar.update(len(batch))
    return tally


def write_manifest(out: Path, jobs: list[Job]) -> Path:
    """``out/metadata.jsonl`` from the parameters each file carries, in line order; ValueError if an image is
    missing (a process that stopped early: run again to finish)."""
    from mmdit_flow.weights.io import atomic_path

    missing = [job.name for job in jobs if recorded(out / job.name) is None]
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) missing in {out} ({', '.join(missing[:5])}...); run again to finish"
        )
    rows = []
    for job in jobs:
        params = recorded(out / job.name)
        fields = params.to_dict()
        row = {"file_name": job.name, "text": fields.pop("prompt"), "line": job.line}
        rows.append(json.dumps({**row, **fields}, ensure_ascii=False))
    path = out / METADATA
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def check_arguments(args: argparse.Namespace) -> tuple[list[tuple[int, str]], Path]:
    """Everything about a batch call that can be checked before loading a model."""
    for flag, value in (("--image", args.image), ("--mask", args.mask), ("--strength", args.strength)):
        if value is not None:
            raise ValueError(f"{flag} does not go with --prompts (text to image); edit one image at a time")
    if args.num_images != 1:
        raise ValueError("--num-images does not go with --prompts (one image a line); repeat a line for more")
    if args.output is not None:
        raise ValueError("-o names one image file; with --prompts name the folder with --out")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.device is not None:
        check_device(args.device)
    return read_prompts(args.prompts), check_out(args.out)


def _on_cpu(device: str | None) -> bool:
    """Whether the processes meet over gloo on CPUs: ``accelerate launch --cpu`` (ACCELERATE_USE_CPU), or
    ``--device cpu``, or no device given on a machine without CUDA (as under ``torchrun`` there)."""
    import torch
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU") or (device is not None and device.startswith("cpu")):
        return True
    return device is None and not torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    """Generate the prompts file's images in this process's share; the main process writes the manifest."""
    from mmdit_flow.pipelines.generate_cli import DTYPES, check_step_cache, load_loras, lora_arguments

    prompts, out = check_arguments(args)
    check_step_cache(args.step_cache)
    loras = lora_arguments(args.lora)
    import torch
    from accelerate import PartialState

    from mmdit_flow.pipelines import TextToImagePipeline

    state = PartialState(cpu=_on_cpu(args.device))
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    device = args.device if args.device is not None else state.device
    pipe = TextToImagePipeline.from_pretrained(args.model, device=device, dtype=dtype, offload=args.offload)
    load_loras(pipe, loras)
    if args.step_cache is not None:
        pipe.enable_step_cache(args.step_cache)
    settings = resolved_settings(
        pipe,
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        max_sequence_length=args.max_sequence_length,
    )
    base = GenerationParameters(
        prompt="",
        negative=args.negative,
        seed=0,
        sampler=args.sampler or "euler",
        model=GenerationParameters.model_name(args.model),
        step_cache=args.step_cache,
        lora=tuple(loras),
        **settings,
    )
    jobs = plan(prompts, base, 0 if args.seed is None else args.seed)
    check_existing(out, jobs)
    rank, world = state.process_index, state.num_processes
    progress = not args.no_progress and state.is_main_process
    tally = generate_part(
        pipe, jobs, out, batch_size=args.batch_size, rank=rank, world=world, progress=progress
    )
    who = f"process {rank} of {world}: " if world > 1 else ""
    print(f"{who}wrote {tally.written} image(s), kept {tally.kept} already in {out}")
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"{write_manifest(out, jobs)}: {len(jobs)} images")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmdit_flow.pipelines.generate`` (under ``accelerate launch``): the batch form of
    ``mmdit-flow generate``, with the same options; --prompts and --out are required."""
    from mmdit_flow.pipelines import generate_cli

    parser = argparse.ArgumentParser(prog="mmdit_flow.pipelines.generate", description=__doc__.split("\n")[0])
    generate_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.prompts is None or args.prompt is not None or args.from_png is not None:
        parser.error("pass --prompts FILE and --out DIR (for one prompt use `mmdit-flow generate PROMPT`)")
    return generate_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
