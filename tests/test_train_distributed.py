"""Two CPU processes (gloo DDP through accelerate): ranks end identical and equal the one-process run."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmdit_flow.training.config import save_config
from mmdit_flow.training.trainer import train
from tests.train_helpers import free_port, make_cache, run_launcher, tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = textwrap.dedent(
    """
    import os, sys
    from safetensors.torch import save_file
    from mmdit_flow.training.config import load_config
    from mmdit_flow.training.trainer import train
    from tests.train_helpers import tiny_model

    config = load_config(sys.argv[1])
    model = tiny_model(0)
    code = train(config, model=model)
    rank = os.environ["RANK"]
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, f"{config.output.dir}/rank{rank}.st")
    sys.exit(code)
    """
)
# AdamW with a large eps steps linearly in the gradient (see test_train_loop), so summation-order rounding
# stays rounding-sized instead of becoming lr-sized
SGD_LIKE = {"lr": 10.0, "eps": 1000.0, "weight_decay": 0.0}


def test_two_processes_match_one(tmp_path):
    cache = make_cache(tmp_path / "cache", n=16)
    common = {"schedule": {"max_steps": 3}, "optimizer": SGD_LIKE}
    two = tiny_config(
        cache, tmp_path / "two", data={"batch_size": 2}, output={"checkpoint_every": 2}, **common
    )
    (tmp_path / "two").mkdir()
    save_config(two, tmp_path / "two.yaml")
    (tmp_path / "run.py").write_text(SCRIPT)
    # accelerate's own CPU multi-process launch needs mpirun; torchrun + ACCELERATE_USE_CPU gives the same
    # MULTI_CPU (gloo) state that `accelerate launch --multi_gpu` gives on GPUs
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(tmp_path / "run.py"), str(tmp_path / "two.yaml")]  # fmt: skip
    proc = run_launcher(cmd, 300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / "two" / f"rank{r}.st")) for r in range(2)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    ckpts = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000003"]  # saving on both ranks did not deadlock
    saved = {p.name for p in (tmp_path / "two/checkpoints/step-00000003").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= saved

    model = tiny_model(0)
    one = tiny_config(cache, tmp_path / "one", data={"batch_size": 4}, **common)
    assert train(one, model=model) == 0
    moved = False
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=name)
        moved |= bool((value - tiny_model(0).state_dict()[name]).abs().max() > 1e-3)  # >> the tolerance
    assert moved


def test_fsdp_on_cpu_processes_is_refused_not_ignored(tmp_path, monkeypatch):
    # accelerate 1.x takes FSDP only on accelerators: on CPU processes ACCELERATE_USE_FSDP is ignored and
    # the model trains unsharded; the trainer must say so before it trains
    import pytest
    from accelerate.utils import DistributedType

    from mmdit_flow.training.config import ConfigError
    from mmdit_flow.training.resolve import check_sharding

    check_sharding(DistributedType.FSDP, {"ACCELERATE_USE_FSDP": "true"})  # taken: nothing to say
    check_sharding(DistributedType.MULTI_CPU, {})  # not asked
    with pytest.raises(ConfigError, match="DeepSpeed was asked for.*MULTI_CPU"):
        check_sharding(DistributedType.MULTI_CPU, {"ACCELERATE_USE_DEEPSPEED": "true"})

    cache = make_cache(tmp_path / "cache", n=4)
    config = tiny_config(cache, tmp_path / "run", schedule={"max_steps": 1})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP was asked for.*trained unsharded"):
        train(config, model=tiny_model(0))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_launcher_timeout_kills_its_ranks_too(tmp_path):
    import subprocess
    import time

    import pytest

    pid_file = tmp_path / "rank.pid"
    launcher = (
        "import subprocess, sys, time\n"
        "rank = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(rank.pid))\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_launcher([sys.executable, "-c", launcher], 3)
    assert time.monotonic() - start < 30  # it did not wait for the rank's pipes

    def alive(pid: int) -> bool:  # a killed rank may linger as a zombie until it is reaped
        try:
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
        except OSError:
            return False
        return "Z" not in state

    rank = int(pid_file.read_text())
    for _ in range(50):
        if not alive(rank):
            break
        time.sleep(0.1)
    assert not alive(rank), "the launcher's rank outlived the timeout"
