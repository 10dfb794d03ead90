"""Shared builders for the training tests: a tiny SD3 transformer and a hand-made latent cache."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmdit_flow.training.config import TrainConfig, config_from_dict

# text parts as the cache stores them: clip_l / clip_g hidden [6, 4], pooled [4]; t5 hidden [5, 16]
# combine -> txt [11, 16], vec [8]
TINY = {
    "hidden_size": 32,
    "num_heads": 2,
    "depth": 2,
    "context_dim": 16,
    "vec_dim": 8,
    "in_channels": 4,
    "out_channels": 4,
    "pos_embed_max_size": 8,
    "sample_size": 8,
}


def tiny_model(seed: int = 0):
    """The tiny SD3 transformer with every weight random (the adaLN-Zero init would hide most gradients)."""
    from mmdit_flow.models.sd3 import SD3Config, SD3Transformer

    torch.manual_seed(seed)
    model = SD3Transformer(SD3Config(**TINY))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def text_parts(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "clip_l.hidden": torch.randn(6, 4, generator=g),
        "clip_l.pooled": torch.randn(4, generator=g),
        "clip_g.hidden": torch.randn(6, 4, generator=g),
        "clip_g.pooled": torch.randn(4, generator=g),
        "t5.hidden": torch.randn(5, 16, generator=g),
    }


def make_cache(folder: Path, n: int = 12, seed: int = 0) -> Path:
    """A cache folder as ``mmdit-flow cache`` writes it, with random latents [4, 8, 8] and text embeddings."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file(text_parts(g), str(folder / "empty.safetensors"))
    tensors, records = {}, []
    for i in range(n):
        tensors[f"{i}.latents"] = torch.randn(4, 8, 8, generator=g)
        tensors.update({f"{i}.{k}": v for k, v in text_parts(g).items()})
        records.append(
            {"shard": "shard-00000.safetensors", "key": str(i), "size": [64, 64], "caption": f"c{i}"}
        )
    save_file(tensors, str(folder / "shard-00000.safetensors"))
    index = {"fingerprint": {}, "layout": "sd3", "encoders": ["clip_l", "clip_g", "t5"],
             "shards": ["shard-00000.safetensors"], "records": records, "bad_files": {}}  # fmt: skip
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def tiny_config(cache: Path, out: Path, **sections) -> TrainConfig:
    base = {
        "model": {"preset": "sd3_medium", "overrides": dict(TINY)},
        "data": {"cache_dir": str(cache), "batch_size": 2},
        "objective": {"shift": 3.0, "caption_dropout": {"t5": 0.3, "clip_g": 0.2}, "weighting": "cosmap"},
        "optimizer": {"lr": 1e-3, "grad_clip": 1.0},
        "schedule": {"max_steps": 4, "warmup_steps": 2, "lr_schedule": "cosine"},
        "ema": {"decay": 0.9},
        "output": {
            "dir": str(out),
            "checkpoint_every": 2,
            "trackers": [],
            "progress": False,
            "save_final": False,
        },
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values} if isinstance(values, dict) else values
    return config_from_dict(base)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a launcher's rendezvous or a server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_launcher(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` for a launcher (torchrun) in its own process
    group: at ``timeout`` the whole group is killed, ranks included, and ``TimeoutExpired`` raised (killing
    only the launcher left its ranks holding the pipes, and the test waited for ever)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def captioned_noise_folder(folder: Path, n: int = 4, size: int = 16) -> Path:
    """``n`` random RGB images of ``size`` px with captions "a shape number i" (an image folder)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a shape number {i}")
    return folder
