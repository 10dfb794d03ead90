"""Family-agnostic checkpoint I/O: read and write state dicts, load them into a model.

Reading accepts a ``.safetensors`` file, a folder holding one weights file, or a sharded folder with a
``*.safetensors.index.json`` (the diffusers / transformers ``weight_map`` layout). Every failure names the
file and says what to do: a missing path, a Git LFS pointer instead of the weights, a truncated file, a
corrupt header, an index naming missing shards, a folder without weights. Pickle files (``.bin .pt .pth
.ckpt``) are refused unless the caller passes ``allow_pickle=True``; they are then read with
``torch.load(weights_only=True)``.

Writing is safetensors only, atomic per file (a temporary name in the same folder, then ``os.replace``), with
string metadata and optional sharding into ``<stem>-00001-of-0000N.safetensors`` plus ``<name>.index.json``.

``load_into`` loads a state dict into a model strictly by default, with ``assign=True`` for a model built on
the meta device, and checks that nothing is left on the meta device afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mmdit_flow.weights.formats import StateDict

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_SUFFIX = ".index.json"
# file names a folder's weights usually have; preferred when a folder holds several candidates
STANDARD_NAMES = ("diffusion_pytorch_model", "model")
_LFS_MAGIC = b"version https://git-lfs"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header size
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}\.")
_SHOW = 20  # how many names an error lists before "... and N more"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or loaded; the message names the file and the fix."""


@dataclass
class Checkpoint:
    """A state dict with the string metadata of its file(s) and the files it came from."""

    state_dict: StateDict
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def _names(items: list[str], show: int = _SHOW) -> str:
    """'a, b, c' for a short list, 'a, b, ... and 12 more' for a long one."""
    head = ", ".join(items[:show])
    return head if len(items) <= show else f"{head}, ... and {len(items) - show} more"


# ---------------------------------------------------------------------------------------------------- reading


def check_not_lfs_pointer(path: str | os.PathLike) -> None:
    """Raise if ``path`` is a Git LFS pointer (a small text file) instead of the real content."""
    path = Path(path)
    if path.stat().st_size > 1024:
        return
    head = path.read_bytes()
    if head.startswith(_LFS_MAGIC):
        size = re.search(rb"size (\d+)", head)
        real = f" of {int(size.group(1)):,} bytes" if size else ""
        raise CheckpointError(
            f"{path} is a Git LFS pointer file, not the real file{real}: run `git lfs pull` in its "
            "repository (or `git lfs install` and clone again), or download the file itself"
        )


_check_not_lfs_pointer = check_not_lfs_pointer  # the name it had before it was shared with the pipelines


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object from ``path``; LFS pointers and invalid JSON raise an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    check_not_lfs_pointer(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-download or re-create it") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """Parse and check the header of a safetensors file without reading the tensors.

    Layout: 8 bytes little-endian header size N, N bytes of JSON ``{name: {dtype, shape, data_offsets},
    "__metadata__": {str: str}}``, then the data, whose size must equal the largest end offset.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    check_not_lfs_pointer(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is {size} bytes, too small for a safetensors file: re-download it")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER and (prefix.startswith(b"PK\x03\x04") or prefix[:1] == b"\x80"):
            raise CheckpointError(
                f"{path} is a PyTorch pickle/zip file with a .safetensors name; rename it to .bin or .pt "
                "and load it with allow_pickle=True if you trust it"
            )
        if n > _MAX_HEADER:
            raise CheckpointError(
                f"{path} has a corrupt safetensors header (declared header size {n:,} bytes): "
                "it is not a safetensors file or is damaged; re-download it"
            )
        if n > size - 8:
            raise CheckpointError(
                f"{path} is truncated: its header alone needs {n + 8:,} bytes but the file has {size:,}; "
                "re-download it (an interrupted download or copy leaves such files)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} has a corrupt safetensors header ({err}); re-download or re-create the file"
        ) from err
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__"]
    need, have = max(ends, default=0), size - 8 - n
    if need > have:
        raise CheckpointError(
            f"{path} is truncated: its header describes {need + 8 + n:,} bytes but the file has {size:,}; "
            "re-download it (an interrupted download or copy leaves such files)"
        )
    return header


def _read_safetensors(path: Path, device: str | torch.device) -> tuple[StateDict, dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = read_safetensors_header(path)
    try:
        sd = load_file(path, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path} could not be read as safetensors ({err}); re-download it") from err
    return sd, dict(header.get("__metadata__") or {})


def _read_pickle(path: Path, allow_pickle: bool, device: str | torch.device) -> StateDict:
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a pickle checkpoint, which can run arbitrary code when loaded, so it is refused by "
            "default. If you trust it, pass allow_pickle=True (it is then read with "
            "torch.load(weights_only=True)), or convert it once to safetensors: "
            f"`mmdit-flow convert {path} OUT --to diffusers --allow-pickle`"
        )
    check_not_lfs_pointer(path)
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(
            f"{path} could not be loaded with torch.load(weights_only=True) ({type(err).__name__}: {err}); "
            "it is damaged or holds objects other than tensors"
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning / original SD .ckpt
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if dropped := sorted(str(k) for k in obj if k not in sd):
        logger.info("%s: ignored non-tensor entries %s", path, _names(dropped))
    return sd


def _read_file(path: Path, allow_pickle: bool, device: str | torch.device) -> Checkpoint:
    if path.name.endswith(".safetensors"):
        sd, meta = _read_safetensors(path, device)
        return Checkpoint(sd, meta, [path])
    if path.suffix in PICKLE_SUFFIXES:
        return Checkpoint(_read_pickle(path, allow_pickle, device), {}, [path])
    raise CheckpointError(
        f"{path} has an unknown weights format ({path.suffix or 'no suffix'}); expected .safetensors "
        f"(or, with allow_pickle=True, one of {' '.join(PICKLE_SUFFIXES)})"
    )


def read_shard_index(index_path: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of a sharded-checkpoint index, each shard a plain file
    name present beside the index."""
    index_path = Path(index_path)
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no 'weight_map': it is not a sharded-checkpoint index")
    shards = sorted({str(s) for s in weight_map.values()})
    # a shard is a file beside the index: a path ("../x", "/abs") would read a file from elsewhere
    if outside := [s for s in shards if Path(s).name != s or s in (".", "..")]:
        raise CheckpointError(
            f"{index_path} names shards that are not plain file names in its folder: {_names(outside)}; "
            "re-download the index"
        )
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path} names shard files that are not in {index_path.parent}: {_names(missing)}; "
            "download the missing shards"
        )
    return weight_map


def _read_sharded(index_path: Path, allow_pickle: bool, device: str | torch.device) -> Checkpoint:
    weight_map = read_shard_index(index_path)
    shards = sorted(set(weight_map.values()))
    out = Checkpoint({}, {}, [index_path])
    for shard in shards:
        part = _read_file(index_path.parent / shard, allow_pickle, device)
        expected = {k for k, v in weight_map.items() if v == shard}
        if absent := sorted(expected - part.state_dict.keys()):
            raise CheckpointError(
                f"{part.files[0]} lacks tensors that {index_path.name} places in it: {_names(absent)}; "
                "the shard and the index do not match, re-download them"
            )
        out.state_dict.update({k: part.state_dict[k] for k in expected})
        out.metadata = out.metadata or part.metadata
        out.files += part.files
    return out


def _pick(candidates: list[Path], kind: str, folder: Path) -> Path | None:
    """The one candidate, else the one named ``<standard name><kind>``; anything else is ambiguous."""
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    plain = [p for p in candidates if p.name in {n + kind for n in STANDARD_NAMES}]
    if len(plain) == 1:
        return plain[0]
    raise CheckpointError(
        f"{folder} holds several {kind} weight files ({_names([p.name for p in candidates])}); "
        "pass the path of the one to load"
    )


def _weights_in(folder: Path) -> tuple[str, Path]:
    """Find the weights of a folder: ("index" | "file", path)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for suffix in (".safetensors", *PICKLE_SUFFIXES):
        indexes = [p for p in files if p.name.endswith(suffix + INDEX_SUFFIX)]
        if found := _pick(indexes, suffix + INDEX_SUFFIX, folder):
            return "index", found
        singles = [p for p in files if p.name.endswith(suffix)]
        if any(_SHARD_RE.search(p.name) for p in singles) and not [
            p for p in singles if not _SHARD_RE.search(p.name)
        ]:
            raise CheckpointError(
                f"{folder} holds shard files ({_names([p.name for p in singles])}) but no "
                f"*{suffix}{INDEX_SUFFIX} index that lists them; download the index file too"
            )
        singles = [p for p in singles if not _SHARD_RE.search(p.name)]
        if found := _pick(singles, suffix, folder):
            return "file", found
    listing = f"it holds {_names([p.name for p in files])}" if files else "it is empty"
    raise CheckpointError(f"{folder} has no weights file (*.safetensors): {listing}")


def read_checkpoint(
    path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
) -> Checkpoint:
    """Read every tensor of a checkpoint, with its metadata.

    ``path`` is a weights file, a folder holding one, or a sharded folder with an index; ``subfolder`` (for
    example ``"transformer"`` in a diffusers pipeline folder) is joined to it first.
    """
    path = Path(path)
    if subfolder:
        path = path / subfolder
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a .safetensors file or a folder holding one")
    if path.is_file():
        if path.name.endswith(INDEX_SUFFIX):
            return _read_sharded(path, allow_pickle, device)
        return _read_file(path, allow_pickle, device)
    kind, found = _weights_in(path)
    if kind == "index":
        return _read_sharded(found, allow_pickle, device)
    return _read_file(found, allow_pickle, device)


def read_state_dict(
    path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
) -> StateDict:
    """The tensors of a checkpoint file or folder; see ``read_checkpoint``."""
    return read_checkpoint(path, subfolder=subfolder, allow_pickle=allow_pickle, device=device).state_dict


# ---------------------------------------------------------------------------------------------------- writing


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"`` (10^9), ``"500MiB"`` (2^20 each) or ``"2000"``."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot read the size {size!r}; write it like 5GB, 500MB, 200MiB or 1000000")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def _umask() -> int:
    mask = os.umask(0o022)  # the umask can only be read by setting it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(path)


def _prepare(sd: StateDict) -> StateDict:
    """Contiguous CPU tensors, with storage shared between entries (tied weights, views) copied apart."""
    bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor) or v.is_meta)
    if bad:
        raise ValueError(f"cannot save entries that are not real tensors (meta or non-tensor): {_names(bad)}")
    out, seen = {}, set()
    for name, t in sd.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def save_file(sd: StateDict, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Write one safetensors file atomically; ``metadata`` values must be strings."""
    from safetensors.torch import save_file as st_save

    meta = {"format": "pt", **(metadata or {})}
    if bad := [k for k, v in meta.items() if not isinstance(v, str)]:
        raise ValueError(f"safetensors metadata values must be strings; json.dumps {', '.join(bad)}")
    with atomic_path(path) as tmp:
        st_save(_prepare(sd), str(tmp), metadata=meta)
    return Path(path)


def _split(sd: StateDict, max_bytes: int) -> list[list[str]]:
    """Greedy shards in key order, each at most ``max_bytes`` unless one tensor alone is larger."""
    shards, current, size = [], [], 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return [*shards, current] if current else shards


def save_folder(
    sd: StateDict,
    folder: str | os.PathLike,
    *,
    weights_name: str = "diffusion_pytorch_model.safetensors",
    metadata: dict[str, str] | None = None,
    max_shard_size: int | str | None = None,
) -> list[Path]:
    """Write ``sd`` into ``folder`` as ``weights_name``, or as shards plus an index when it exceeds
    ``max_shard_size``. Shards are ``<stem>-00001-of-00003.safetensors``; the index
    ``<weights_name>.index.json`` (diffusers / transformers layout) is written last. Weight files of the other
    layout left from an earlier save under the same name are removed afterwards. Returns the files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not weights_name.endswith(".safetensors"):
        raise ValueError(f"weights_name must end with .safetensors, got {weights_name!r}")
    stem = weights_name.removesuffix(".safetensors")
    sd = _prepare(sd)
    groups = _split(sd, parse_size(max_shard_size)) if max_shard_size is not None else [list(sd)]
    if len(groups) <= 1:
        written = [save_file(sd, folder / weights_name, metadata=metadata)]
    else:
        written, weight_map = [], {}
        for i, names in enumerate(groups, start=1):
            shard = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
            written.append(save_file({k: sd[k] for k in names}, folder / shard, metadata=metadata))
            weight_map.update(dict.fromkeys(names, shard))
        total = sum(t.numel() * t.element_size() for t in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        written.append(write_json(index, folder / (weights_name + INDEX_SUFFIX)))
    _remove_stale(folder, stem, keep={p.name for p in written})
    return written


def _remove_stale(folder: Path, stem: str, keep: set[str]) -> None:
    stale = re.compile(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
    for p in folder.iterdir():
        if p.name not in keep and stale.fullmatch(p.name):
            p.unlink()


# ---------------------------------------------------------------------------------------------------- loading


@dataclass
class LoadResult:
    """What ``load_into`` did not load (only non-empty with ``strict=False``)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: checkpoint [a, b] vs model [c, d]"


def _problems(result: LoadResult) -> list[tuple[str, list[str]]]:
    """("3 missing keys", [names]) for each non-empty kind of mismatch."""
    kinds = (
        ("missing keys", result.missing),
        ("unexpected keys", result.unexpected),
        ("shape mismatches", result.mismatched),
    )
    return [(f"{len(items)} {what}", items) for what, items in kinds if items]


def mismatch_error(
    result: LoadResult, model_name: str, source: str | os.PathLike | None = None
) -> CheckpointError:
    """The error for a checkpoint whose keys do not match the model: each kind of mismatch, with names."""
    where = f" from {source}" if source else ""
    lines = "\n".join(f"  {head}: {_names(items, 10)}" for head, items in _problems(result))
    return CheckpointError(
        f"the checkpoint{where} does not match {model_name}:\n{lines}\n"
        "check that the checkpoint and the model config are the same architecture"
    )


def _on_meta(model: nn.Module) -> list[str]:
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return sorted(name for name, t in tensors if t.is_meta)


def load_into(
    model: nn.Module,
    state_dict: StateDict,
    *,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    source: str | os.PathLike | None = None,
) -> LoadResult:
    """Load ``state_dict`` into ``model`` in place.

    A model with any tensor on the meta device is loaded with ``assign=True`` (the checkpoint tensors become
    the parameters, keeping their dtype); otherwise values are copied into the existing tensors. ``dtype``
    casts the floating-point checkpoint tensors first. With ``strict`` (the default) missing keys, unexpected
    keys and shape mismatches raise one error listing them all; ``source`` names the checkpoint in messages.
    Afterwards no parameter or buffer may be left on the meta device.
    """
    where = f" from {source}" if source else ""
    expected = model.state_dict(keep_vars=True)
    result = LoadResult(
        missing=sorted(expected.keys() - state_dict.keys()),
        unexpected=sorted(state_dict.keys() - expected.keys()),
        mismatched=[
            f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(expected[k].shape)}"
            for k in sorted(expected.keys() & state_dict.keys())
            if state_dict[k].shape != expected[k].shape
        ],
    )
    problems = _problems(result)
    if problems and strict:
        raise mismatch_error(result, type(model).__name__, source)
    if problems:
        summary = "; ".join(head for head, _ in problems)
        logger.warning("loading%s into %s: %s", where, type(model).__name__, summary)
    skip = {k.split(":")[0] for k in result.mismatched} | set(result.unexpected)
    sd = {k: v for k, v in state_dict.items() if k not in skip}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    assign = bool(_on_meta(model))
    model.load_state_dict(sd, strict=False, assign=assign)
    if left := _on_meta(model):
        raise CheckpointError(
            f"after loading{where}, these tensors of {type(model).__name__} are still on the meta device "
            f"(not in the checkpoint and not computed at construction): {_names(left)}"
        )
    return result


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device but real buffers.

    Inside the block every parameter a module registers is moved to the meta device at once (its CPU
    ``torch.empty`` storage is freed and initialisers then run on meta, at no cost), while buffers computed in
    ``__init__`` (position tables, frequencies) stay real, so non-persistent buffers need no re-computation
    after loading. Not thread-safe: it patches ``nn.Module.register_parameter`` for the duration.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original
