"""Resume runs no code from the checkpoint folder, and a kill at any moment of a save keeps a complete one."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from mmdit_flow.training import checkpoint as ckpt
from mmdit_flow.training.trainer import train
from mmdit_flow.weights.io import CheckpointError
from tests.train_helpers import make_cache, tiny_config, tiny_model

# ------------------------------------------------------------------------------------- planted pickles


class Payload:
    """Unpickling this creates the file ``path``: what an attacker's code would do, made visible."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _two_step_run(tmp_path: Path):
    cache = make_cache(tmp_path / "cache")
    cfg = tiny_config(cache, tmp_path / "run", schedule={"max_steps": 2})
    assert train(cfg, model=tiny_model(0)) == 0
    return cfg, tmp_path / "run/checkpoints/step-00000002"


def _plant(folder: Path, name: str, ran: Path) -> None:
    torch.save(Payload(ran), folder / name)
    marker = json.loads((folder / ckpt.MARKER).read_text())
    marker["files"][name] = (folder / name).stat().st_size  # as if planted before the marker was written
    (folder / ckpt.MARKER).write_text(json.dumps(marker))


def test_the_payload_runs_when_fully_unpickled(tmp_path):
    """The control: a full unpickler (what accelerate uses for custom state) does run the planted code."""
    torch.save(Payload(tmp_path / "ran"), tmp_path / "evil.pkl")
    torch.load(tmp_path / "evil.pkl", weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    "name, message",
    [
        ("custom_checkpoint_0.pkl", "custom_checkpoint_0.pkl: pickles .* refused and never opened"),
        (
            "random_states_0.pkl",
            "random_states_0.pkl could not be read with torch.load\\(weights_only=True\\)",
        ),
        ("optimizer.bin", "Weights only load failed"),  # accelerate's own load, weights_only=True
    ],
)
def test_resume_runs_no_planted_pickle(tmp_path, name, message):
    cfg, folder = _two_step_run(tmp_path)
    ran = tmp_path / "ran"
    _plant(folder, name, ran)
    cfg = tiny_config(tmp_path / "cache", tmp_path / "run", schedule={"max_steps": 3})
    with pytest.raises(Exception, match=message):
        train(cfg, model=tiny_model(0))
    assert not ran.exists()


def test_ship_refuses_pickled_state(tmp_path):
    from mmdit_flow.training.recipes.tiny_shapes import ship

    cfg, folder = _two_step_run(tmp_path)
    ran = tmp_path / "ran"
    _plant(folder, "custom_checkpoint_2.pkl", ran)
    with pytest.raises(CheckpointError, match="custom_checkpoint_2.pkl"):
        ship.checkpoint_transformer(folder, cfg, tmp_path / "out")
    assert not ran.exists()


# ------------------------------------------------------------------------------- a kill at every moment


class Counters:
    def __init__(self, step: int):
        self.step = step

    def state_dict(self):
        return {"step": self.step}


class FakeAccelerator:
    """The part of accelerate that ``save_checkpoint`` uses: one process writing a small state."""

    is_main_process, num_processes = True, 1

    def wait_for_everyone(self):
        pass

    def save_state(self, output_dir):
        out = Path(output_dir)
        (out / "model.safetensors").write_bytes(b"w" * 64)
        torch.save({"state": {}, "param_groups": []}, out / "optimizer.bin")
        torch.save({"random_state": 0}, out / "random_states_0.pkl")


class Crash(BaseException):
    """A kill: nothing after it runs."""


def _save(root: Path, step: int, keep: int = 2) -> Path:
    return ckpt.save_checkpoint(FakeAccelerator(), root, step, keep=keep, state={"counters": Counters(step)})


def _crash_at(monkeypatch, k: int) -> dict[str, int]:
    """Make the ``k``-th file-system change (rename, replace, unlink, each file rmtree deletes) a kill."""
    count = {"n": 0}
    real = {"rename": os.rename, "replace": os.replace, "unlink": os.unlink}

    def tick():
        count["n"] += 1
        if count["n"] == k:
            raise Crash

    def wrap(name):
        def op(*args, **kw):
            tick()
            return real[name](*args, **kw)

        return op

    def rmtree(path, *args, **kw):  # file by file, so that a kill can land midway
        for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
            tick()
            real["unlink"](f)
        real_rmtree(path)

    real_rmtree = shutil.rmtree
    for name in real:
        monkeypatch.setattr(os, name, wrap(name))
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return count


def _newest(root: Path) -> int:
    folder = ckpt.latest_checkpoint(root)
    assert folder is not None, sorted(p.name for p in root.iterdir())
    info = ckpt.verify_checkpoint(folder)  # every listed file present with its size
    assert json.loads((folder / ckpt.STATE_FILE).read_text())["counters"]["step"] == info["step"]
    return info["step"]


def _half_delete(folder: Path) -> None:
    """What a deletion without the marker first, killed midway, leaves."""
    (folder / ckpt.MARKER).unlink()
    (folder / "optimizer.bin").unlink()


SCENARIOS = {
    # name: (prepare the root, step to save, steps kept after a clean save)
    "new step, rotation": (lambda r: [_save(r, 1), _save(r, 2)], 3, ["step-00000002", "step-00000003"]),
    "same step again": (lambda r: [_save(r, 1), _save(r, 2)], 2, ["step-00000001", "step-00000002"]),
    "after a kill between the renames": (
        lambda r: [
            _save(r, 2),
            os.rename(r / "step-00000002", r / "step-00000002.old"),
            shutil.copytree(r / "step-00000002.old", r / "step-00000002.tmp"),
        ],
        2,
        ["step-00000002"],
    ),
    "complete .tmp only": (
        lambda r: [_save(r, 1), _save(r, 2), os.rename(r / "step-00000002", r / "step-00000002.tmp")],
        2,
        ["step-00000001", "step-00000002"],
    ),
    "half-deleted old folder": (
        lambda r: [_save(r, 1), _save(r, 2), _half_delete(r / "step-00000001")],
        3,
        ["step-00000002", "step-00000003"],
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_kill_anywhere_in_a_save_keeps_a_complete_checkpoint(tmp_path, monkeypatch, scenario):
    prepare, step, kept = SCENARIOS[scenario]
    before_step = None
    k = 1
    while True:
        root = tmp_path / f"k{k}"
        root.mkdir()
        prepare(root)
        before_step = _newest(root) if ckpt.latest_checkpoint(root) else None
        with monkeypatch.context() as m:
            count = _crash_at(m, k)
            try:
                _save(root, step)
                finished = True
            except Crash:
                finished = False
        newest = _newest(root)  # a complete checkpoint survives every kill...
        assert before_step is None or newest >= before_step  # ... and never an older one than before
        _save(root, step)  # the next run saves again: it cleans up what the kill left
        assert sorted(p.name for p in root.iterdir()) == kept, k
        if finished:
            break
        k += 1
    assert count["n"] >= 4  # the kill points covered the renames and deletions, not just one


def test_rotation_cleans_a_half_deleted_folder_once(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "ckpts"
    _half_delete(_save(root, 1))
    _save(root, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    assert "step-00000001, left incomplete" in caplog.text
    caplog.clear()
    _save(root, 3)
    assert "step-00000001" not in caplog.text  # removed once, not warned about on every save


def test_rerun_killed_between_the_renames_resumes_the_finished_run(tmp_path, monkeypatch):
    """A finished run rerun saves its last step again; a kill between the two renames must not reset it."""
    cache = make_cache(tmp_path / "cache")
    cfg = tiny_config(cache, tmp_path / "run", output={"checkpoint_every": 3})
    first = tiny_model(0)
    assert train(cfg, model=first) == 0  # saves steps 3 and 4
    real_rename = os.rename

    def killed_before_second_rename(src, dst):
        if str(src).endswith(".tmp"):
            raise Crash
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_before_second_rename)
    with pytest.raises(Crash):
        train(cfg, model=tiny_model(1))  # resumes at 4, trains nothing, saves step 4 again
    monkeypatch.setattr(os, "rename", real_rename)
    root = tmp_path / "run/checkpoints"
    assert {"step-00000004.old", "step-00000004.tmp"} <= {p.name for p in root.iterdir()}
    losses, resumed = [], tiny_model(2)
    assert train(cfg, model=resumed, on_step=lambda s, r: losses.append(r.loss)) == 0
    assert losses == []  # resumed at step 4, not restarted from 0
    for (name, a), b in zip(first.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]


def test_signal_checkpoint_lists_our_state_files(tmp_path):
    cache = make_cache(tmp_path / "cache")
    cfg = tiny_config(cache, tmp_path / "run", output={"checkpoint_every": 100})

    def stop(step, result):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train(cfg, model=tiny_model(0), on_step=stop) == 128 + signal.SIGTERM
    marker = json.loads((tmp_path / "run/checkpoints/step-00000001" / ckpt.MARKER).read_text())
    assert {ckpt.STATE_FILE, ckpt.EMA_FILE} <= set(marker["files"])  # the marker covers our own files
    assert not [f for f in marker["files"] if f.startswith("custom_checkpoint")]
