"""Checkpoints that a crash cannot lose and a resume that runs no code from the folder.

A checkpoint is a folder ``<root>/step-00000100``::

    model.safetensors          the trained weights                         (accelerate)
    optimizer.bin              AdamW state                                 (accelerate; torch.save)
    random_states_<rank>.pkl   each process's RNG states                   (accelerate; torch.save)
    scaler.pt                  fp16 loss scaler, with fp16 only            (accelerate; torch.save)
    train_state.json           ours: {"format": 1, "counters": TrainState, "lr_scheduler": LambdaLR state,
                                      "run": what trained it (training/run_info.py), read before resuming}
    ema.safetensors            ours, with EMA only: the EMA weights, ``decay`` in the file's metadata
    COMPLETE.json              the marker: step, every other file with its size, num_processes

accelerate's ``load_state`` reads its files with ``torch.load(weights_only=True)``
(``accelerate.utils.load``), but it unpickles the state of objects registered with
``register_for_checkpointing`` with ``weights_only=False``: a checkpoint folder from someone else could run
their code. So nothing is registered; our own state is JSON and safetensors, written here and read here.
A folder that holds one of accelerate's ``custom_checkpoint_*.pkl`` files (an older mmdit-flow wrote them,
or someone planted one) is refused with a ``CheckpointError`` naming the file; it is never opened.

A save (called on every process, as accelerate's ``save_state`` requires):

1. the main process finishes any earlier save of the same step that a crash interrupted (``_settle``);
2. every process writes its part with ``accelerator.save_state`` into ``<root>/step-00000100.tmp``;
3. the main process writes ``train_state.json`` and ``ema.safetensors``, fsyncs every file and writes the
   marker, which therefore covers them;
4. it renames the folder to ``step-00000100`` (atomic on one file system); when that step exists already,
   the old folder is first renamed to ``step-00000100.old`` and deleted after the new one is in place;
5. only now does ``rotate`` delete the oldest complete checkpoints beyond ``keep`` (marker first, so that a
   deletion cut short leaves a plainly incomplete folder) and what interrupted saves and deletions left.

accelerate and the diffusers training scripts delete the old checkpoint first; a crash between that and the
end of the new save leaves nothing. Here a crash at any point leaves a complete checkpoint: a folder with a
marker counts under each of its three names, ``step-N.tmp`` (the newest save of that step) before ``step-N``
before ``step-N.old``, so the moment between the two renames of step 4 is covered too, and the next save
of that step first renames the preferred copy to ``step-N``.

Resume takes the newest complete checkpoint and checks that every file its marker lists is there with its
size, and that this process's RNG file (readable with ``weights_only=True``), the optimizer file and our state
files exist: a missing file raises ``CheckpointError`` naming it (accelerate's own ``load_state`` only logs
that it "could not load random states" and carries on).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from mmdit_flow.weights.io import CheckpointError, atomic_path, read_json, write_json

logger = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
STATE_FILE = "train_state.json"
EMA_FILE = "ema.safetensors"
STATE_FORMAT = 1
RECORD = "run"  # the entry of train_state.json that says what kind of run wrote the checkpoint
_PICKLED_STATE = "custom_checkpoint_*.pkl"  # accelerate's register_for_checkpointing files
_NAME = re.compile(r"^step-(\d{8,})(\.tmp|\.old)?$")
_RANK = {".tmp": 0, "": 1, ".old": 2}  # which copy of one step a resume prefers: the newest save first


def checkpoint_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def _spare(final: Path, suffix: str) -> Path:
    return final.with_name(final.name + suffix)


def _complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _step_folders(root: Path) -> list[tuple[int, str, Path]]:
    """(step, suffix, folder) of every ``step-N``, ``step-N.tmp`` and ``step-N.old`` folder under ``root``."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), m.group(2) or "", child))
    return found


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step with a complete copy, oldest first; the preferred copy of each step."""
    best: dict[int, tuple[int, Path]] = {}
    for step, suffix, folder in _step_folders(Path(root)):
        if _complete(folder) and (step not in best or _RANK[suffix] < best[step][0]):
            best[step] = (_RANK[suffix], folder)
    return sorted((step, folder) for step, (_, folder) in best.items())


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None when there is none."""
    found = complete_checkpoints(root)
    if not found:
        return None
    step, folder = found[-1]
    for s, suffix, other in _step_folders(Path(root)):
        if s > step and not suffix:
            logger.warning(
                "ignoring checkpoint %s: it has no %s (an interrupted save or deletion)", other, MARKER
            )
    return folder


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder, its marker first (durably): a deletion cut short is plainly incomplete."""
    marker = folder / MARKER
    if marker.is_file():
        marker.unlink()
        _fsync(folder)
    shutil.rmtree(folder)


def _write_marker(folder: Path, step: int, extra: dict[str, Any]) -> None:
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync(f)
        files[str(f.relative_to(folder))] = f.stat().st_size
    with atomic_path(folder / MARKER) as tmp:
        tmp.write_text(json.dumps({"step": step, "files": files, **extra}, indent=1))
        _fsync(tmp)


def _write_own_state(folder: Path, state: dict[str, Any], ema: Any, record: dict[str, Any] | None) -> None:
    """train_state.json (each object's JSON state dict, the run record) and, with EMA, ema.safetensors."""
    own = {"format": STATE_FORMAT, **{name: obj.state_dict() for name, obj in state.items()}}
    write_json(own if record is None else {**own, RECORD: record}, folder / STATE_FILE)
    if ema is not None:
        ema.save(folder / EMA_FILE)


def rotate(root: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; delete the rest and what interrupted saves left.

    Deleted: complete checkpoints beyond ``keep``, the other copies (``.tmp`` / ``.old``) of kept steps,
    incomplete ``.tmp`` / ``.old`` folders, and incomplete ``step-N`` folders older than the newest complete
    checkpoint (a deletion cut short). Call only while no other save is running (the main process, after its
    own save).
    """
    root = Path(root)
    found = complete_checkpoints(root)
    kept = {folder for _, folder in found[-keep:]}
    newest = found[-1][0] if found else -1
    for step, suffix, folder in _step_folders(root):
        if folder in kept:
            continue
        if _complete(folder) or suffix or step < newest:
            if not _complete(folder):
                logger.info("removing %s, left incomplete by an interrupted save or deletion", folder)
            _remove(folder)


def _settle(final: Path) -> None:
    """Finish a save of ``final``'s step that a crash interrupted, so that its complete copy is ``final``."""
    for spare in (_spare(final, ".tmp"), _spare(final, ".old")):
        if not spare.exists():
            continue
        if _complete(spare) and (spare.suffix == ".tmp" or not _complete(final)):  # .tmp: the newest save
            if final.exists():
                _remove(final)
            os.rename(spare, final)
        else:
            _remove(spare)


def save_checkpoint(
    accelerator: Any,
    root: str | Path,
    step: int,
    *,
    keep: int = 3,
    state: dict[str, Any] | None = None,
    ema: Any = None,
    record: dict[str, Any] | None = None,
) -> Path:
    """Save ``step`` crash-safely (module docstring); call on every process.

    ``state``: objects whose ``state_dict()`` is JSON (counters, the LR scheduler), saved by name in
    ``train_state.json``; ``ema``: an ``EMA``, saved as ``ema.safetensors``; ``record``: plain JSON saying
    what kind of run this is, read back by ``saved_record`` before a resume.
    """
    final = checkpoint_path(root, step)
    tmp, old = _spare(final, ".tmp"), _spare(final, ".old")
    if accelerator.is_main_process:
        _settle(final)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_own_state(tmp, state or {}, ema, record)
        _write_marker(tmp, step, {"num_processes": accelerator.num_processes})
        if final.exists():  # this step was saved before (a rerun of a finished run, a signal after a save)
            os.rename(final, old)
            os.rename(tmp, final)  # a crash before this line leaves two complete copies, .tmp preferred
            _remove(old)
        else:
            os.rename(tmp, final)
        _fsync(final.parent)
        rotate(root, keep)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def saved_record(folder: str | Path) -> dict[str, Any] | None:
    """The run record a checkpoint was saved with (``save_checkpoint(record=...)``), None when it has none."""
    path = Path(folder) / STATE_FILE
    return read_json(path).get(RECORD) if path.is_file() else None


def refuse_pickled_state(folder: str | Path) -> None:
    """Raise if ``folder`` holds accelerate's pickled custom state, which we never open."""
    found = sorted(p.name for p in Path(folder).glob(_PICKLED_STATE))
    if found:
        raise CheckpointError(
            f"checkpoint {folder} holds {', '.join(found)}: pickles (accelerate's custom-state files), which "
            "can run code when loaded, so they are refused and never opened. mmdit-flow saves its own state "
            f"as {STATE_FILE} and {EMA_FILE}; this folder was written by an older mmdit-flow or altered by "
            "someone. Delete the folder to resume from the checkpoint before it (or from scratch)."
        )


def verify_checkpoint(
    folder: str | Path, *, process_index: int = 0, optimizers: int = 1, ema: bool = False
) -> dict[str, Any]:
    """The marker's contents, after checking that every file a resume needs is present and whole."""
    folder = Path(folder)
    refuse_pickled_state(folder)
    marker = folder / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint: {MARKER} is missing")
    info = read_json(marker)
    for name, size in info["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}; cannot resume exactly")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {folder}: {name} has {path.stat().st_size} bytes, the marker says {size}"
            )
    required = {f"random_states_{process_index}.pkl": "random number generator state", STATE_FILE: "counters"}
    required |= {
        ("optimizer.bin" if i == 0 else f"optimizer_{i}.bin"): "optimizer state" for i in range(optimizers)
    }
    if ema:
        required[EMA_FILE] = "EMA weights; set ema.decay: 0 to resume without EMA"
    for name, what in required.items():
        if not (folder / name).is_file():
            raise CheckpointError(
                f"checkpoint {folder} has no {name} ({what}); resuming without it would not be exact"
            )
    return info


def _check_rng_file(path: Path) -> None:
    """accelerate's ``load_state`` swallows any error reading the RNG file; read it first, loudly."""
    from accelerate.utils import load

    try:
        load(path)  # torch.load(weights_only=True) with numpy's array types allowed
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(
            f"{path} could not be read with torch.load(weights_only=True) ({type(err).__name__}: {err}); "
            "it is damaged or holds objects other than RNG states"
        ) from err


def load_checkpoint(
    accelerator: Any,
    folder: str | Path,
    *,
    check_optimizer: bool = True,
    state: dict[str, Any] | None = None,
    ema: Any = None,
) -> int:
    """Verify, ``accelerator.load_state``, then load our own ``state`` and ``ema``; returns the step."""
    from accelerate.utils import DistributedType

    if accelerator._custom_objects:  # load_state would unpickle their files with weights_only=False
        raise RuntimeError(
            "objects are registered with accelerator.register_for_checkpointing; pass them to "
            "save_checkpoint / load_checkpoint as `state` instead, which saves them as JSON"
        )
    folder = Path(folder)
    plain = accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    optimizers = len(accelerator._optimizers) if (plain and check_optimizer) else 0
    info = verify_checkpoint(
        folder, process_index=accelerator.process_index, optimizers=optimizers, ema=ema is not None
    )
    _check_rng_file(folder / f"random_states_{accelerator.process_index}.pkl")
    if info.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
        logger.warning(
            "checkpoint %s was saved by %d processes, resuming with %d: the data order is unchanged "
            "but dropout-style random draws will differ",
            folder,
            info["num_processes"],
            accelerator.num_processes,
        )
    accelerator.load_state(str(folder))
    saved = read_json(folder / STATE_FILE)
    if saved.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{folder / STATE_FILE}: unknown format {saved.get('format')!r}, expected 1")
    for name, obj in (state or {}).items():
        if name not in saved:
            raise CheckpointError(f"{folder / STATE_FILE} has no {name!r} state; cannot resume exactly")
        obj.load_state_dict(saved[name])
    if ema is not None:
        ema.load(folder / EMA_FILE)
    elif (folder / EMA_FILE).is_file():
        logger.warning("%s holds EMA weights but ema.decay is 0: resuming without EMA", folder)
    return int(info["step"])
