"""Training images: decoding that never crashes a run, aspect-ratio buckets, and a resumable data order.

Sources: an image folder with captions (a sidecar ``.txt`` per image, or ``metadata.jsonl`` rows
``{"file_name": ..., "text": ...}``, the Hugging Face imagefolder convention) and webdataset tar shards.

Decoding (``load_image``): EXIF orientation applied; RGBA, LA and palette transparency composited on a
background colour; 16-bit and 32-bit greyscale scaled to [0, 1] by their bit depth (PIL's own ``convert``
clips them to 255); images with more than ``max_pixels`` pixels refused before they are decoded.
Unreadable files (corrupt, truncated, zero-byte, refused) raise ``BadImage``; the datasets skip them,
count them in ``BadFiles``, and the run stops once their share passes ``data.max_bad_fraction``. An image
whose caption is not UTF-8 is skipped and counted the same way, its caption file named in the tally.

Data order: an optimizer step consumes one *step batch* of ``batch_size * num_processes * grad_accum``
samples. Step batches are drawn per epoch from a permutation seeded by ``(seed, epoch)`` (one bucket per
step batch), so step ``s`` always sees the same samples whatever the process count or accumulation, and a
resumed run continues at step ``s`` without replaying anything. Within a step batch, process ``r`` and
micro-step ``m`` take positions ``[(m * W + r) * b, (m * W + r + 1) * b)``. Every sample carries a seed
derived from ``(seed, step, position)``; random crops, flips, timesteps and noise are drawn from it, which
is what makes resume, accumulation and multi-process runs equal to the plain single-process run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_EXIF_ORIENTATION = 0x0112


class BadImage(ValueError):
    """A sample that cannot be used: an image corrupt, truncated, empty or over the pixel limit, or a caption
    that is not UTF-8."""


class TooManyBadFiles(RuntimeError):
    """More than ``data.max_bad_fraction`` of the data could not be read."""


def sample_seed(*parts: int | str) -> int:
    """A 63-bit seed mixing ``parts`` (e.g. run seed, step, position); nearby inputs give unrelated seeds."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --------------------------------------------------------------------------------------------- decoding


def _open(source: str | Path | bytes, max_pixels: int):
    """Open lazily (header only), refusing empty files and images over ``max_pixels``."""
    from PIL import Image

    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        if not source:
            raise BadImage(f"{name}: empty image data")
        fp: Any = io.BytesIO(source)
    else:
        if Path(source).stat().st_size == 0:
            raise BadImage(f"{name}: zero-byte file")
        fp = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"{name}: refused as a decompression bomb ({err})") from err
    except Exception as err:  # PIL raises many types for bad headers
        raise BadImage(f"{name}: cannot identify the image ({type(err).__name__}: {err})") from err
    if img.width * img.height > max_pixels:
        raise BadImage(
            f"{name}: {img.width}x{img.height} pixels exceeds data.max_image_pixels ({max_pixels}); "
            "refused as a possible decompression bomb"
        )
    return img


def image_size(source: str | Path | bytes, *, max_pixels: int = 89_478_485) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    img = _open(source, max_pixels)
    try:
        w, h = img.size
        if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            w, h = h, w
    except Exception as err:
        raise BadImage(f"{source if not isinstance(source, bytes) else '<bytes>'}: bad EXIF ({err})") from err
    finally:
        img.close()
    return w, h


def _to_rgb(img, background: Sequence[int]):
    """Any PIL mode -> 8-bit RGB: alpha composited on ``background``, high bit depths scaled, not clipped."""
    import numpy as np
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        elif img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            scale = 65535.0  # 16-bit data (PNG 16-bit greyscale loads as "I" or "I;16")
        else:
            scale = 255.0
        arr = np.clip(np.round(arr / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*[int(v) for v in background], 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(
    source: str | Path | bytes, *, background: Sequence[int] = (255, 255, 255), max_pixels: int = 89_478_485
):
    """Decode to an 8-bit RGB PIL image with EXIF orientation applied; raises ``BadImage`` on any failure."""
    from PIL import ImageOps

    img = _open(source, max_pixels)
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        img.load()  # truncated and corrupt data fail here
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img, background)
    except BadImage:
        raise
    except Exception as err:
        raise BadImage(f"{name}: cannot decode the image ({type(err).__name__}: {err})") from err


def decode(source: str | Path | bytes, data: Any):
    """``load_image`` with a ``DataConfig``'s background and pixel limit."""
    return load_image(source, background=data.background, max_pixels=data.max_image_pixels)


# ------------------------------------------------------------------------------------- resize and buckets


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) pairs, multiples of ``step``, of about resolution^2 pixels, aspect <= max_aspect."""
    area = resolution * resolution
    buckets = set()
    w = step
    while w <= resolution * max_aspect:
        h = max(step, round(area / w / step) * step)
        if max(w / h, h / w) <= max_aspect + 1e-9:
            buckets.add((h, w))
        w += step
    buckets.add((resolution, resolution))
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def bucket_list(data: Any) -> list[tuple[int, int]] | None:
    """The buckets for a ``DataConfig``, or None when buckets are off (every image cropped square)."""
    return make_buckets(data.resolution, data.bucket_step, data.max_aspect) if data.buckets else None


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width / height in log space."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - ratio))


def resize_crop(img, size: tuple[int, int], *, crop: str = "center", rng: random.Random | None = None):
    """Scale so that the image covers ``size`` = (height, width), then crop to it (centre or random)."""
    from PIL import Image

    h, w = size
    scale = max(w / img.width, h / img.height)
    new_w, new_h = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if crop == "random":
        rng = rng or random.Random(0)
        left, top = rng.randint(0, new_w - w), rng.randint(0, new_h - h)
    else:
        left, top = (new_w - w) // 2, (new_h - h) // 2
    return img.crop((left, top, left + w, top + h))


def to_tensor(img) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    import numpy as np

    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # [H, W, 3]
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------------- bad files


@dataclass
class BadFiles:
    """Unreadable files seen so far, and the rule that stops a run when there are too many."""

    total: int  # files in the data set (or seen so far, for streams)
    max_fraction: float
    paths: dict[str, str] = field(default_factory=dict)  # path -> reason

    def add(self, path: str, reason: str) -> None:
        if path not in self.paths:
            logger.warning("skipping unreadable image %s", reason)
        self.paths[path] = reason

    @property
    def fraction(self) -> float:
        return len(self.paths) / max(self.total, 1)

    def check(self) -> None:
        if self.paths and self.fraction > self.max_fraction:
            examples = "; ".join(list(self.paths.values())[:3])
            raise TooManyBadFiles(
                f"{len(self.paths)} of {self.total} images ({self.fraction:.1%}) could not be read, more "
                f"than data.max_bad_fraction = {self.max_fraction:.1%}. First ones: {examples}. Fix or "
                "remove them, or raise data.max_bad_fraction."
            )

    def summary(self) -> str:
        return f"{len(self.paths)} of {self.total} images skipped as unreadable ({self.fraction:.1%})"


# ---------------------------------------------------------------------------------------- image folder


@dataclass(frozen=True)
class Record:
    path: str
    caption: str
    size: tuple[int, int]  # bucket (height, width)


def read_captions(root: Path, column: str = "text") -> dict[Path, str]:
    """Captions from every ``metadata.jsonl`` under ``root`` (file_name relative to the jsonl's folder)."""
    captions: dict[Path, str] = {}
    for meta in sorted(root.rglob("metadata.jsonl")):
        for n, raw in enumerate(meta.read_bytes().splitlines(), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{meta}:{n}: the line is not UTF-8 text ({err}); save the file as UTF-8"
                ) from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[(meta.parent / row["file_name"]).resolve()] = str(row.get(column, ""))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{meta}:{n}: each line must be a JSON object with 'file_name' and {column!r} ({err})"
                ) from err
    return captions


def scan_folder(root: str | Path, data: Any, bad: BadFiles | None = None) -> tuple[list[Record], BadFiles]:
    """Every image under ``root`` with its caption and bucket; unreadable headers are counted in ``bad``."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data.path {str(root)!r} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"data.path {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    meta = read_captions(root, data.caption_column)
    buckets = bucket_list(data)
    bad = bad or BadFiles(total=len(files), max_fraction=data.max_bad_fraction)
    records, uncaptioned = [], 0
    for path in files:
        try:
            w, h = image_size(path, max_pixels=data.max_image_pixels)
        except (BadImage, OSError) as err:
            bad.add(str(path), str(err))
            continue
        caption = meta.get(path.resolve())
        sidecar = path.with_suffix(".txt")
        if caption is None and sidecar.is_file():
            try:
                caption = sidecar.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as err:  # the image without its caption would train on the wrong text
                bad.add(str(path), f"{sidecar}: the caption is not UTF-8 text ({err}); save it as UTF-8")
                continue
        if caption is None:
            uncaptioned += 1
        size = nearest_bucket(w, h, buckets) if buckets else (data.resolution, data.resolution)
        records.append(Record(str(path), caption or "", size))
    if uncaptioned:
        logger.warning("%d images under %s have no caption: they train with ''", uncaptioned, root)
    return records, bad


class ImageFolderDataset(torch.utils.data.Dataset):
    """Map-style dataset over ``scan_folder`` records; items are fetched by ``SampleKey``."""

    def __init__(self, records: list[Record], data: Any):
        self.records, self.data = records, data
        self.groups = [r.size for r in records]  # one bucket per step batch
        self._members: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(self.groups):
            self._members.setdefault(g, []).append(i)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        """The image at ``key.index``, or when unreadable the next readable one of its bucket."""
        bad: list[tuple[str, str]] = []
        rec = self.records[key.index]
        same = self._members[rec.size]
        start = same.index(key.index)
        for k in range(len(same)):
            rec = self.records[same[(start + k) % len(same)]]
            try:
                img = decode(rec.path, self.data)
                break
            except (BadImage, OSError) as err:
                bad.append((rec.path, str(err)))
        else:
            raise TooManyBadFiles(f"no readable image is left in the {rec.size} bucket")
        return transform(img, rec.caption, rec.size, key, self.data) | {"bad": bad}


def transform(img, caption: str, size: tuple[int, int], key: SampleKey, data: Any) -> dict[str, Any]:
    """Resize, crop and flip with the sample's own random stream; pixels in [-1, 1]."""
    from PIL import Image

    rng = random.Random(sample_seed(key.seed, "augment"))
    img = resize_crop(img, size, crop=data.crop, rng=rng)
    if data.flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return {"pixels": to_tensor(img), "caption": caption, "index": key.index, "seed": key.seed}


# ------------------------------------------------------------------------------------------ data order


@dataclass(frozen=True)
class SampleKey:
    index: int  # into the dataset
    seed: int  # this sample's random stream at this step


@dataclass(frozen=True)
class Layout:
    """How one optimizer step's samples split over processes and micro-steps."""

    batch_size: int  # per process and micro-step
    num_processes: int = 1
    rank: int = 0
    grad_accum: int = 1

    @property
    def step_batch(self) -> int:
        return self.batch_size * self.num_processes * self.grad_accum

    def positions(self, micro: int) -> range:
        start = (micro * self.num_processes + self.rank) * self.batch_size
        return range(start, start + self.batch_size)


def epoch_batches(groups: Sequence[Any], step_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's step batches: indices shuffled within each group, chunked, incomplete chunks dropped."""
    g = torch.Generator().manual_seed(sample_seed(seed, "epoch", epoch))
    by_group: dict[Any, list[int]] = {}
    for i, grp in enumerate(groups):
        by_group.setdefault(grp, []).append(i)
    batches = []
    for grp in sorted(by_group):
        idx = by_group[grp]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        batches += [perm[k : k + step_batch] for k in range(0, len(perm) - step_batch + 1, step_batch)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[j] for j in order]


class StepSampler(torch.utils.data.Sampler):
    """Yields, for each optimizer step from ``start_step`` on, this process's keys for all its micro-steps."""

    def __init__(self, groups: Sequence[Any], layout: Layout, seed: int, start_step: int = 0, max_steps=None):
        self.groups, self.layout, self.seed = list(groups), layout, seed
        self.start_step, self.max_steps = start_step, max_steps
        self._epoch: int | None = None
        self._batches: list[list[int]] = []
        self.steps_per_epoch = len(epoch_batches(self.groups, layout.step_batch, seed, 0))
        if self.steps_per_epoch == 0:
            largest = max((self.groups.count(g) for g in set(self.groups)), default=0)
            raise ValueError(
                f"one optimizer step needs {layout.step_batch} images of one bucket (data.batch_size x "
                f"processes x optimizer.grad_accum) but the largest bucket holds {largest}; lower "
                "data.batch_size or optimizer.grad_accum, or turn data.buckets off"
            )

    def keys(self, step: int) -> list[SampleKey]:
        """This process's keys for every micro-step of optimizer step ``step``."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # one permutation per epoch, computed once
            self._batches = epoch_batches(self.groups, self.layout.step_batch, self.seed, epoch)
            self._epoch = epoch
        batch = self._batches[j]
        return [
            SampleKey(batch[p], sample_seed(self.seed, step, p))
            for m in range(self.layout.grad_accum)
            for p in self.layout.positions(m)
        ]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        step = self.start_step
        while self.max_steps is None or step < self.max_steps:
            yield self.keys(step)
            step += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("an endless StepSampler has no length")
        return max(0, self.max_steps - self.start_step)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings as lists, concatenate the lists of bad files."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "bad":
            out[key] = [b for v in values for b in v]
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], dict):
            out[key] = collate(values)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values, dtype=torch.int64)
        else:
            out[key] = values
    return out


# ------------------------------------------------------------------------------------------- webdataset


class ShardStream(torch.utils.data.IterableDataset):
    """webdataset tar shards read in a seeded per-epoch shard order, grouped into step batches.

    Each item is one optimizer step for this process (``grad_accum * batch_size`` samples). With
    ``num_workers`` > 0 worker ``w`` decodes steps ``w, w + n, ...`` and the DataLoader's round robin
    restores the order. Every process reads every shard and decodes only its own samples.
    """

    def __init__(self, urls: Sequence[str], data: Any, layout: Layout, seed: int, start_step: int = 0):
        from webdataset.shardlists import expand_urls

        self.urls = [u for pattern in urls for u in expand_urls(pattern)]
        if not self.urls:
            raise ValueError(f"data.shards {list(urls)} matches no tar files")
        self.data, self.layout, self.seed, self.start_step = data, layout, seed, start_step
        self.buckets = bucket_list(data)

    def _samples(self, epoch: int) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import tarfile_samples

        g = torch.Generator().manual_seed(sample_seed(self.seed, "shards", epoch))
        urls = [self.urls[i] for i in torch.randperm(len(self.urls), generator=g).tolist()]

        def skip_broken_tar(err: Exception) -> bool:
            logger.warning("skipping unreadable data in a webdataset shard: %s", err)
            return True

        yield from tarfile_samples([{"url": u} for u in urls], handler=skip_broken_tar)

    def _image_bytes(self, sample: dict[str, Any], name: str) -> tuple[bytes | None, str]:
        """The sample's image bytes and caption; a caption that is not UTF-8 raises ``BadImage``."""
        image = next((sample[k] for k in ("jpg", "jpeg", "png", "webp", "bmp") if k in sample), None)
        caption = sample.get("txt", b"")
        try:
            if "json" in sample and not caption:
                try:
                    caption = json.loads(sample["json"]).get(self.data.caption_column, "")
                except (json.JSONDecodeError, AttributeError):
                    caption = ""
            caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        except UnicodeDecodeError as err:
            raise BadImage(f"{name}: the caption is not UTF-8 text ({err})") from err
        return image, caption.strip()

    def _steps(self) -> Iterator[tuple[int, list[tuple[str, bytes, str, tuple[int, int]]], list]]:
        """(step, samples of the whole step batch, bad files met while filling it)."""
        step_batch, step, epoch, bad = self.layout.step_batch, 0, 0, []
        while True:
            pending: dict[tuple[int, int], list] = {}
            seen = 0
            for sample in self._samples(epoch):
                seen += 1
                name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
                try:
                    image, caption = self._image_bytes(sample, name)
                    if image is None:
                        raise BadImage(f"{name}: no image (jpg, png, webp) in the sample")
                    w, h = image_size(image, max_pixels=self.data.max_image_pixels)
                except (BadImage, OSError) as err:
                    bad.append((name, str(err)))
                    continue
                size = nearest_bucket(w, h, self.buckets) if self.buckets else (self.data.resolution,) * 2
                group = pending.setdefault(size, [])
                group.append((name, image, caption, size))
                if len(group) == step_batch:
                    yield step, pending.pop(size), bad
                    step, bad = step + 1, []
            if seen == 0:
                raise ValueError(f"the webdataset shards {self.urls[:3]}... hold no samples")
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for step, batch, bad in self._steps():
            if step < self.start_step or step % workers != worker:
                continue
            items = []
            for m in range(self.layout.grad_accum):
                for p in self.layout.positions(m):
                    key = SampleKey(p, sample_seed(self.seed, step, p))
                    img, caption, size = self._decode(batch, p, bad)
                    items.append(transform(img, caption, size, key, self.data) | {"bad": []})
            out = collate(items)
            out["bad"], out["seen"] = bad, self.layout.step_batch + len(bad)
            yield out

    def _decode(self, batch: list, p: int, bad: list) -> tuple[Any, str, tuple[int, int]]:
        """Decode position ``p``; when its data is truncated, the next decodable sample of the step batch."""
        for k in range(len(batch)):
            name, image, caption, size = batch[(p + k) % len(batch)]
            try:
                return decode(image, self.data), caption, size
            except BadImage as err:
                bad.append((name, str(err)))
        raise TooManyBadFiles(f"no sample of step batch {[b[0] for b in batch[:3]]}... could be decoded")
