"""``mmdit-flow cache``: VAE latents and text embeddings computed once into safetensors shards, then reused.

Text embeddings are kept *per encoder* (``clip_l``, ``clip_g``, ``t5`` for SD3; ``clip_l``, ``t5`` for Flux),
together with each encoder's embedding of the empty prompt, so that caption dropout can still drop each
encoder independently at training time; ``combine`` then builds the transformer's ``txt`` and ``vec``
exactly as ``mmdit_flow.pipelines.text`` does. Latents are the VAE posterior mean, scaled:
``z = (mean - shift_factor) * scaling_factor``, the same that an uncached run computes, so a cached run
gives the same losses.

Layout of a cache folder::

    index.json              fingerprint (data files, resolution, buckets, components), records, shards
    empty.safetensors       "<encoder>.hidden" / "<encoder>.pooled" of the empty prompt
    shard-00000.safetensors "<i>.latents", "<i>.<encoder>.hidden", "<i>.<encoder>.pooled" for its records

Shards are written atomically and a rerun skips the finished ones; ``index.json`` is written last, so a
folder without it is an unfinished cache. A cache is reused only when its fingerprint matches the config.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mmdit_flow.training.config import TrainConfig
    from mmdit_flow.training.data import SampleKey

logger = logging.getLogger(__name__)

HELP = "precompute VAE latents and text embeddings for a training config (reused by `train`)"
INDEX = "index.json"
EMPTY = "empty.safetensors"
VERSION = 2  # 2: the fingerprint also hashes the component files

TextParts = dict[str, dict[str, "torch.Tensor"]]  # encoder name -> {"hidden": [B, L, W], "pooled": [B, P]}


# --------------------------------------------------------------------------------------- conditioning


def combine(parts: TextParts, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-encoder embeddings -> (txt [B, L, D], vec [B, P]), as ``mmdit_flow.pipelines.text`` builds them.

    sd3:  txt = [pad_D(clip_l.hidden ++ clip_g.hidden) ; t5.hidden], vec = clip_l.pooled ++ clip_g.pooled
    flux: txt = t5.hidden, vec = clip_l.pooled
    """
    import torch
    import torch.nn.functional as F

    if layout == "flux":
        return parts["t5"]["hidden"], parts["clip_l"]["pooled"]
    if layout != "sd3":
        raise ValueError(f"unknown text layout {layout!r}; choose 'sd3' or 'flux'")
    t5 = parts["t5"]["hidden"]
    clip = torch.cat([parts["clip_l"]["hidden"], parts["clip_g"]["hidden"].to(parts["clip_l"]["hidden"])], -1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # [B, 77, W_l + W_g] -> [B, 77, D]
    txt = torch.cat([clip.to(t5), t5], dim=1)  # [B, 77 + n, D]
    vec = torch.cat([parts["clip_l"]["pooled"], parts["clip_g"]["pooled"]], dim=-1)
    return txt, vec


def drop_captions(parts: TextParts, empty: TextParts, drop: dict[str, torch.Tensor]) -> TextParts:
    """Replace encoder ``e``'s embedding of sample ``b`` by its empty-prompt embedding where drop[e][b]."""
    out: TextParts = {}
    for name, tensors in parts.items():
        mask = drop.get(name)
        out[name] = {}
        for kind, value in tensors.items():
            if mask is None or not bool(mask.any()):
                out[name][kind] = value
                continue
            m = mask.to(value.device).view(-1, *([1] * (value.dim() - 1)))  # [B] -> [B, 1, ...]
            out[name][kind] = value.where(~m, empty[name][kind].to(value).expand_as(value))
    return out


class Conditioner:
    """The VAE and text encoders of a diffusers folder, with per-encoder outputs (for dropout and caching).

    ``encode_text(captions)`` -> ``TextParts``; ``encode_images(pixels in [-1, 1])`` -> scaled latents fp32.
    """

    def __init__(self, pipe: Any, max_sequence_length: int = 256):
        self.pipe, self.max_sequence_length = pipe, max_sequence_length
        self.layout = pipe.family
        text = pipe.text
        if self.layout == "sd3":
            self.names = ("clip_l", "clip_g", "t5")
        else:
            self.names = ("clip_l", "t5")
        self._text = text

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, max_sequence_length: int = 256) -> Conditioner:
        import torch

        from mmdit_flow.pipelines import TextToImagePipeline

        pipe = TextToImagePipeline.from_pretrained(path, device=device or "cpu", dtype=torch.float32)
        pipe.transformer.to("meta")  # only the encoders are needed here
        return cls(pipe, max_sequence_length)

    @property
    def device(self) -> torch.device:
        return self.pipe.codec.device

    def encode_text(self, captions: list[str]) -> TextParts:
        import torch

        text, n = self._text, self.max_sequence_length
        if self.layout == "flux":
            _, pooled = text.clip.encode(captions, hidden=False)
            return {
                "clip_l": {"pooled": pooled.float()},
                "t5": {"hidden": text.t5.encode(captions, n).float()},
            }
        hidden_l, pooled_l = text.clip_l.encode(captions)
        hidden_g, pooled_g = text.clip_g.encode(captions)
        if text.t5 is not None:
            t5 = text.t5.encode(captions, n)
        else:  # without T5 its tokens are zeros, as in diffusers
            t5 = torch.zeros(len(captions), n, text.t5_width, device=hidden_l.device)
        return {
            "clip_l": {"hidden": hidden_l.float(), "pooled": pooled_l.float()},
            "clip_g": {"hidden": hidden_g.float(), "pooled": pooled_g.float()},
            "t5": {"hidden": t5.float()},
        }

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> z [B, C, H / s, W / s] (posterior mean, shifted and scaled)."""
        return self.pipe.codec.encode((pixels.float() + 1) / 2)


# ---------------------------------------------------------------------------------------- cache files


def fingerprint(config: TrainConfig, records: list[Any], components: str) -> dict[str, Any]:
    """What the cached tensors depend on; a cache is reused only when this matches."""
    d = config.data
    h = hashlib.sha256()
    for r in records:
        st = os.stat(r.path)
        h.update(f"{r.path}|{st.st_size}|{st.st_mtime_ns}|{r.caption}|{r.size}\n".encode())
    return {
        "version": VERSION,
        "data": h.hexdigest(),
        "resolution": d.resolution,
        "buckets": d.buckets,
        "bucket_step": d.bucket_step,
        "max_aspect": d.max_aspect,
        "background": list(d.background),
        "components": str(Path(components).resolve()),
        "component_files": components_digest(components),
        "max_sequence_length": config.model.max_sequence_length,
    }


SMALL_FILE = 1 << 20  # hashed by content below this size; larger ones (weights) by size and mtime


def components_digest(folder: str | Path) -> str:
    """A hash of what the encoders and the VAE of a pipeline folder compute from: every file outside
    ``transformer/`` (configs and tokenizers by content, weights by size and modification time), so that a
    cache is rebuilt when, say, a tokenizer's ``model_max_length`` or a VAE changes at the same path."""
    root = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if rel.parts[0] == "transformer":
            continue
        st = path.stat()
        h.update(f"{rel.as_posix()}|{st.st_size}|".encode())
        h.update(path.read_bytes() if st.st_size < SMALL_FILE else str(st.st_mtime_ns).encode())
    return h.hexdigest()


def _flatten(parts: TextParts, prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}{name}.{kind}": v for name, kinds in parts.items() for kind, v in kinds.items()}


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from mmdit_flow.weights.io import save_file

    save_file(tensors, path)


def build_cache(
    config: TrainConfig,
    conditioner: Conditioner,
    *,
    batch_size: int = 8,
    shard_size: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Encode every readable image of ``config.data.path`` into ``config.data.cache_dir``; returns it."""
    import torch
    from tqdm.auto import tqdm

    from mmdit_flow.training.data import ImageFolderDataset, SampleKey, scan_folder

    d = config.data
    if not d.path or not d.cache_dir:
        raise ValueError("caching needs data.path (the image folder) and data.cache_dir (where to write)")
    if d.crop != "center" or d.flip:
        raise ValueError(
            "a cache stores one crop per image: set data.crop=center and data.flip=false to cache, "
            "or train uncached"
        )
    out = Path(d.cache_dir)
    records, bad = scan_folder(d.path, d)
    bad.check()
    components = config.model.components or config.model.pretrained
    fp = fingerprint(config, records, components)
    if (out / INDEX).is_file():
        old = json.loads((out / INDEX).read_text())
        if old["fingerprint"] == fp and not overwrite:
            logger.info("cache %s is up to date; reusing it", out)
            return out
        if not overwrite:
            raise ValueError(
                f"the cache in {out} was built from other data or settings; pass --overwrite (or a new "
                "data.cache_dir) to rebuild it"
            )
    out.mkdir(parents=True, exist_ok=True)
    empty = {n: {k: v[0] for k, v in kinds.items()} for n, kinds in conditioner.encode_text([""]).items()}
    _save_atomic(_flatten(empty), out / EMPTY)
    dataset = ImageFolderDataset(records, d)
    shards, kept = [], []
    for start in tqdm(range(0, len(records), shard_size), desc="cache", unit="shard", disable=not progress):
        name = f"shard-{start // shard_size:05d}.safetensors"
        shards.append(name)
        chunk = list(range(start, min(start + shard_size, len(records))))
        if (out / name).is_file() and not overwrite:  # finished by an earlier, interrupted run
            kept += [(i, name) for i in chunk]
            continue
        tensors: dict[str, torch.Tensor] = {}
        for b in range(0, len(chunk), batch_size):
            items = [dataset[SampleKey(i, 0)] for i in chunk[b : b + batch_size]]
            for item in items:
                for path, reason in item["bad"]:
                    bad.add(path, reason)
            bad.check()
            by_size: dict[tuple, list[dict]] = {}
            for i, item in zip(chunk[b : b + batch_size], items, strict=True):
                by_size.setdefault(tuple(item["pixels"].shape), []).append(item | {"i": i})
            for group in by_size.values():
                pixels = torch.stack([g["pixels"] for g in group]).to(conditioner.device)
                with torch.no_grad():
                    latents = conditioner.encode_images(pixels).cpu()
                    parts = conditioner.encode_text([g["caption"] for g in group])
                for j, g in enumerate(group):
                    tensors[f"{g['i']}.latents"] = latents[j]
                    sample = {n: {k: v[j] for k, v in kinds.items()} for n, kinds in parts.items()}
                    tensors.update(_flatten(sample, f"{g['i']}."))
        _save_atomic(tensors, out / name)
        kept += [(i, name) for i in chunk]
    index = {
        "fingerprint": fp,
        "layout": conditioner.layout,
        "encoders": list(conditioner.names),
        "shards": shards,
        "records": [
            {"shard": name, "key": str(i), "size": list(records[i].size), "caption": records[i].caption}
            for i, name in kept
        ],
        "bad_files": bad.paths,
    }
    from mmdit_flow.weights.io import write_json

    write_json(index, out / INDEX)
    logger.info("cached %d images in %s (%s)", len(kept), out, bad.summary())
    return out


class CachedDataset:
    """Map-style dataset over a cache folder, fetched by ``SampleKey`` like ``ImageFolderDataset``.

    A couplings folder (``mmdit_flow.training.couplings``) is a cache whose samples also hold their
    ``noise``; its shards are checked when it is opened (``couplings.check_shards``).
    """

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        if not (self.folder / INDEX).is_file():
            raise ValueError(
                f"{self.folder} holds no finished cache ({INDEX} is missing); run `mmdit-flow cache CONFIG`"
            )
        index = json.loads((self.folder / INDEX).read_text())
        self.layout, self.encoders, self.records = index["layout"], index["encoders"], index["records"]
        self.couplings = index.get("couplings")  # the teacher's settings, for a couplings folder
        if self.couplings is not None:
            from mmdit_flow.training.couplings import check_shards

            check_shards(self.folder, index)
        self.groups = [tuple(r["size"]) for r in self.records]
        flat = load_file(str(self.folder / EMPTY))
        self.empty = _unflatten(flat, add_batch=True)
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _get(self, shard: str, key: str):
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        rec = self.records[key.index]
        text = {
            name: {kind: self._get(rec["shard"], f"{rec['key']}.{name}.{kind}") for kind in self._kinds(name)}
            for name in self.encoders
        }
        latents = self._get(rec["shard"], f"{rec['key']}.latents")
        item = {"latents": latents, "text": text, "caption": rec["caption"], "index": key.index,
                "seed": key.seed, "bad": []}  # fmt: skip
        if self.couplings is not None:
            item["noise"] = self._get(rec["shard"], f"{rec['key']}.noise")
        return item

    def _kinds(self, name: str) -> list[str]:
        return list(self.empty[name])


def _unflatten(flat: dict[str, torch.Tensor], add_batch: bool = False) -> TextParts:
    out: TextParts = {}
    for key, value in flat.items():
        name, kind = key.rsplit(".", 1)
        out.setdefault(name, {})[kind] = value[None] if add_batch else value
    return out


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config YAML (data.path, data.cache_dir, model.components)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.resolution=256")
    parser.add_argument("--batch-size", type=int, default=8, help="images encoded at once")
    parser.add_argument("--shard-size", type=int, default=256, help="images per safetensors shard")
    parser.add_argument("--device", default=None, help="device for the encoders (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild a cache made from other settings")


def run(args: argparse.Namespace) -> int:
    import torch

    from mmdit_flow.training.config import load_config
    from mmdit_flow.training.resolve import check_size, resolve_config

    config, size = resolve_config(load_config(args.config, args.overrides))  # the model's size, T5 length
    check_size(config, size)
    components = config.model.components or config.model.pretrained
    if components is None:
        raise ValueError("caching needs the VAE and text encoders: set model.components (a diffusers folder)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    conditioner = Conditioner.from_pretrained(
        components, device=device, max_sequence_length=config.model.max_sequence_length
    )
    build_cache(
        config, conditioner, batch_size=args.batch_size, shard_size=args.shard_size, overwrite=args.overwrite
    )
    return 0
