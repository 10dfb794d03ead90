"""Checkpoints that a crash cannot lose: write aside, mark complete, rename, and only then rotate.

A save (called on every process, as accelerate's ``save_state`` requires):

1. every process writes its part with ``accelerator.save_state`` into ``<root>/step-00000100.tmp``;
2. the main process fsyncs every file and writes ``COMPLETE.json`` (step, file names and sizes);
3. it renames the folder to ``<root>/step-00000100`` (atomic on one file system);
4. only now are the oldest complete checkpoints beyond ``keep`` deleted, with any stale ``.tmp`` folder.

accelerate and the diffusers training scripts delete the old checkpoint first; a crash between that and the
end of the new save leaves nothing. Here a crash at any point leaves the previous complete checkpoint.

Resume takes the newest folder whose ``COMPLETE.json`` exists and checks that every file it lists is there
with its size, and that this process's RNG file and the optimizer file exist: a missing file raises
``CheckpointError`` naming it (accelerate's own ``load_state`` only logs that it "could not load random
states" and carries on).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from exactly: a file is missing or truncated."""


def checkpoint_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint with a completeness marker, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir():
            if (child / MARKER).is_file():
                found.append((int(m.group(1)), child))
            else:
                logger.warning("ignoring checkpoint %s: it has no %s (an interrupted save)", child, MARKER)
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None when there is none."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(folder: Path, step: int, extra: dict[str, Any]) -> None:
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync(f)
        files[str(f.relative_to(folder))] = f.stat().st_size
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files, **extra}, indent=1))
    _fsync(tmp)
    os.replace(tmp, folder / MARKER)


def rotate(root: str | Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep``, and stale ``.tmp`` folders."""
    root = Path(root)
    for _, old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(accelerator: Any, root: str | Path, step: int, *, keep: int = 3) -> Path:
    """Save the accelerate state of ``step`` crash-safely (module docstring); call on every process."""
    final = checkpoint_path(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_marker(tmp, step, {"num_processes": accelerator.num_processes})
        if final.exists():  # this step was saved before (a signal right after a periodic save)
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync(final.parent)
        rotate(root, keep)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(folder: str | Path, *, process_index: int = 0, optimizers: int = 1) -> dict[str, Any]:
    """The marker's contents, after checking that every file a resume needs is present and whole."""
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint: {MARKER} is missing")
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{marker} is unreadable ({err})") from err
    for name, size in info["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}; cannot resume exactly")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {folder}: {name} has {path.stat().st_size} bytes, the marker says {size}"
            )
    required = [f"random_states_{process_index}.pkl"]
    required += ["optimizer.bin" if i == 0 else f"optimizer_{i}.bin" for i in range(optimizers)]
    for name in required:
        if not (folder / name).is_file():
            what = "random number generator state" if name.startswith("random") else "optimizer state"
            raise CheckpointError(
                f"checkpoint {folder} has no {name} ({what}); resuming without it would not be exact"
            )
    return info


def load_checkpoint(accelerator: Any, folder: str | Path, *, check_optimizer: bool = True) -> int:
    """Verify then ``accelerator.load_state`` a checkpoint; returns its step."""
    from accelerate.utils import DistributedType

    plain = accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    optimizers = len(accelerator._optimizers) if (plain and check_optimizer) else 0
    info = verify_checkpoint(folder, process_index=accelerator.process_index, optimizers=optimizers)
    if info.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
        logger.warning(
            "checkpoint %s was saved by %d processes, resuming with %d: the data order is unchanged "
            "but dropout-style random draws will differ",
            folder,
            info["num_processes"],
            accelerator.num_processes,
        )
    accelerator.load_state(str(folder))
    return int(info["step"])
