"""``mmdit-flow couplings``: (noise, teacher sample) pairs for reflow, written as a training cache.

Reflow (``mmdit_flow.reflow``) trains a new flow on pairs (noise, x0 = ODE(noise)) of a teacher, so that
its paths are straight and few steps suffice. For an image model a pair is: the starting noise of one
image, the latent the teacher's guided ODE ends at (``pipe(prompt, latents=noise, output="latent")`` with
the teacher's own steps, guidance and sampler, all recorded), and the per-encoder text embeddings of its
prompt. Prompts come from a text file (one per line) or from the captions of an image folder (the trainer's
``.txt`` sidecars or ``metadata.jsonl``). Record ``i`` takes prompt ``i mod len(prompts)`` and seed
``seed * 2^32 + i``, so a record is the same whatever the batch size or how often the run was resumed, and
``pipe(prompt, seed=that seed)`` draws the same image.

The folder is a training cache (``mmdit_flow.training.cache``; ``data.cache_dir`` reads it) with the noise
beside each latent::

    couplings.json          the fingerprint: teacher files, settings, prompts (written first)
    empty.safetensors       each encoder's embedding of the empty prompt
    shard-00000.safetensors "<i>.latents", "<i>.noise", "<i>.<encoder>.<kind>"; its metadata holds the
                            fingerprint's digest
    index.json              records and shards, written last: a folder without it is unfinished

A killed run continues where it stopped (finished shards are kept, each written atomically) and writes
nothing twice. A folder made by another teacher or other settings is refused, as is a shard that is
truncated or carries another fingerprint (``check_shards``), naming the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

HELP = (
    "reflow couplings: (noise, teacher sample, text embeddings) from a teacher pipeline, as a training cache"
)
FINGERPRINT = "couplings.json"
VERSION = 1
SEED_STRIDE = 2**32  # record i of a run with seed s draws its noise from seed s * 2^32 + i


class CouplingsError(ValueError):
    """A couplings folder that does not fit this run or is damaged; the message names the file."""


def record_seed(seed: int, index: int) -> int:
    return seed * SEED_STRIDE + index


def folder_digest(folder: str | Path) -> str:
    """A hash of every file of a pipeline folder (small files by content, weights by size and mtime)."""
    from mmdit_flow.training.cache import SMALL_FILE

    root = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}|{st.st_size}|".encode())
        h.update(path.read_bytes() if st.st_size < SMALL_FILE else str(st.st_mtime_ns).encode())
    return h.hexdigest()


def read_prompts(prompts: str | None = None, captions: str | None = None) -> list[str]:
    """The prompt list: lines of a text file (blank lines skipped), or the captions of an image folder."""
    if (prompts is None) == (captions is None):
        raise ValueError("give exactly one prompt source: --prompts FILE or --captions IMAGE_FOLDER")
    if prompts is not None:
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        found = [line for line in lines if line]
        source = str(path)
    else:
        from mmdit_flow.training.config import DataConfig
        from mmdit_flow.training.data import scan_folder

        records, bad = scan_folder(captions, DataConfig(path=captions))
        bad.check()
        found, source = [r.caption for r in records], captions
    if not found:
        raise ValueError(f"{source} holds no prompts")
    return found


def fingerprint(teacher: str | Path, prompts: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    """What the couplings depend on: the teacher's files, the prompts and every sampling setting."""
    return {
        "version": VERSION,
        "teacher": str(Path(teacher).resolve()),
        "teacher_files": folder_digest(teacher),
        "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        **settings,
    }


def digest(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:32]


def _describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def check_shards(folder: str | Path, index: dict[str, Any]) -> None:
    """Refuse a couplings folder whose shards are missing, truncated or of another fingerprint."""
    from mmdit_flow.weights.io import CheckpointError, read_safetensors_header

    folder = Path(folder)
    want = digest(index["fingerprint"])
    for name in index["shards"]:
        path = folder / name
        try:
            header = read_safetensors_header(path)
        except (FileNotFoundError, CheckpointError) as err:
            raise CouplingsError(
                f"coupling shard {path} cannot be used: {err}; rerun `mmdit-flow couplings`"
            ) from err
        got = (header.get("__metadata__") or {}).get("couplings")
        if got != want:
            raise CouplingsError(
                f"coupling shard {path} was written by another teacher or with other settings "
                f"(its fingerprint {got} is not this folder's {want}); "
                "delete it and rerun `mmdit-flow couplings`"
            )


def make_couplings(
    pipe: Any,
    teacher: str | Path,
    prompts: list[str],
    out: str | Path,
    *,
    num: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    sampler: str = "euler",
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
    batch_size: int = 32,
    shard_size: int = 256,
    progress: bool = True,
) -> Path:
    """Write ``num`` couplings of the teacher pipeline ``pipe`` (loaded from ``teacher``) into ``out``.

    Unset sampling settings take the teacher's defaults (``pipe.defaults``); what was used is recorded in
    ``couplings.json`` and ``index.json``. Returns ``out``.
    """
    import torch
    from tqdm.auto import tqdm

    from mmdit_flow.training.cache import EMPTY, INDEX, Conditioner, _flatten
    from mmdit_flow.weights.io import read_json, save_file, write_json

    d = pipe.defaults
    num = len(prompts) if num is None else num
    if num < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError("num, batch_size and shard_size must be >= 1")
    settings = {
        "num": num,
        "steps": d.steps if steps is None else steps,
        "guidance": float(d.guidance if guidance is None else guidance),
        "sampler": sampler,
        "seed": seed,
        "height": d.height if height is None else height,
        "width": d.width if width is None else width,
        "max_sequence_length": d.max_sequence_length if max_sequence_length is None else max_sequence_length,
        "shard_size": shard_size,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "resolution": d.height if height is None else height,  # read by the trainer (training/resolve.py)
    }
    fp = fingerprint(teacher, prompts, settings)
    out = Path(out)
    if (out / FINGERPRINT).is_file():
        old = read_json(out / FINGERPRINT)
        if old != fp:
            raise CouplingsError(
                f"{out / FINGERPRINT}: this folder holds couplings of another teacher or other settings "
                f"({_describe_change(old, fp)}); use a new --out folder, or delete this one to start over"
            )
    else:
        write_json(fp, out / FINGERPRINT)
    if (out / INDEX).is_file():
        logger.info("couplings in %s are complete; nothing to do", out)
        return out
    tag = {"couplings": digest(fp)}
    conditioner = Conditioner(pipe, settings["max_sequence_length"])
    empty = {n: {k: v[0] for k, v in kinds.items()} for n, kinds in conditioner.encode_text([""]).items()}
    save_file(_flatten(empty), out / EMPTY, metadata=tag)
    h, w = settings["height"], settings["width"]
    shards, records = [], []
    starts = range(0, num, shard_size)
    for start in tqdm(starts, desc="couplings", unit="shard", disable=not progress):
        name = f"shard-{start // shard_size:05d}.safetensors"
        shards.append(name)
        chunk = list(range(start, min(start + shard_size, num)))
        records += [
            {"shard": name, "key": str(i), "size": [h, w], "caption": prompts[i % len(prompts)]}
            for i in chunk
        ]
        if (out / name).is_file():
            check_shards(out, {"fingerprint": fp, "shards": [name]})  # a finished shard of this run
            continue
        tensors: dict[str, torch.Tensor] = {}
        for b in range(0, len(chunk), batch_size):
            ids = chunk[b : b + batch_size]
            batch_prompts = [prompts[i % len(prompts)] for i in ids]
            noise = torch.cat([teacher_noise(pipe, record_seed(seed, i), h, w) for i in ids])
            with torch.no_grad():
                x0 = pipe(
                    batch_prompts, latents=noise, steps=settings["steps"], guidance=settings["guidance"],
                    sampler=sampler, height=h, width=w, output="latent", progress=False,
                    max_sequence_length=settings["max_sequence_length"],
                )  # fmt: skip
                parts = conditioner.encode_text(batch_prompts)
            for j, i in enumerate(ids):
                tensors[f"{i}.latents"] = x0[j].float().cpu()
                tensors[f"{i}.noise"] = noise[j].float().cpu()
                sample = {n: {k: v[j].cpu() for k, v in kinds.items()} for n, kinds in parts.items()}
                tensors.update(_flatten(sample, f"{i}."))
        save_file(tensors, out / name, metadata=tag)
    index = {
        "fingerprint": fp,
        "couplings": settings,
        "layout": conditioner.layout,
        "encoders": list(conditioner.names),
        "shards": shards,
        "records": records,
        "bad_files": {},
    }
    write_json(index, out / INDEX)
    logger.info("wrote %d couplings of %s in %s", num, teacher, out)
    return out


def teacher_noise(pipe: Any, seed: int, height: int, width: int) -> torch.Tensor:
    """The starting latents [1, C, h, w] that ``pipe(prompt, seed=seed)`` draws (CPU generator, fp32)."""
    import torch

    scale = pipe.codec.scale_factor
    shape = (1, pipe.codec.channels, height // scale, width // scale)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="the teacher's diffusers folder (or shipped:NAME)")
    parser.add_argument("--prompts", help="a text file of prompts, one per line")
    parser.add_argument("--captions", help="an image folder whose captions are the prompts")
    parser.add_argument(
        "--out", required=True, help="the couplings folder (a training cache: data.cache_dir)"
    )
    parser.add_argument("--num", type=int, default=None, help="couplings to write (default: one per prompt)")
    parser.add_argument("--steps", type=int, default=None, help="teacher steps (default: the teacher's)")
    parser.add_argument(
        "--guidance", type=float, default=None, help="teacher CFG scale (default: the teacher's)"
    )
    parser.add_argument("--sampler", default="euler", help="ODE solver: euler, midpoint, heun, rk4")
    parser.add_argument("--seed", type=int, default=0, help="record i draws its noise from seed * 2^32 + i")
    parser.add_argument("--batch-size", type=int, default=32, help="images sampled at once")
    parser.add_argument("--shard-size", type=int, default=256, help="couplings per safetensors shard")
    parser.add_argument("--device", default=None, help="default: cuda if available")


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.training.config import model_folder

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        teacher = model_folder(args.teacher, "--teacher")
        prompts = read_prompts(args.prompts, args.captions)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = TextToImagePipeline.from_pretrained(teacher, device=device, dtype=torch.float32)
        make_couplings(
            pipe, teacher, prompts, args.out, num=args.num, steps=args.steps, guidance=args.guidance,
            sampler=args.sampler, seed=args.seed, batch_size=args.batch_size, shard_size=args.shard_size,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        print(f"mmdit-flow couplings: {err}", file=sys.stderr)
        return 2
    return 0
