"""Batch generation (``--prompts FILE --out DIR``, ``pipelines/generate.py``) and the parameters every PNG
carries (``pipelines/parameters.py``), with the shipped tiny model at 64 x 64 and 2 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdit_flow.pipelines import generate
from mmdit_flow.pipelines.cli import main
from mmdit_flow.pipelines.generate_cli import read_metadata
from mmdit_flow.pipelines.parameters import DEMO_MODEL, GenerationParameters, resolved_settings
from tests.train_helpers import free_port, run_launcher

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a large red circle on the left",
    "",  # a blank line: skipped, its number kept
    "a small blue square on the right",
    "a large green triangle at the top",
    "a small yellow circle at the bottom",
    "a large purple square in the center",
]
CPU = ["--device", "cpu", "--dtype", "fp32", "--no-progress"]


@pytest.fixture(scope="module")
def pipe():
    from mmdit_flow.pipelines import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(device="cpu", dtype=torch.float32)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def make_jobs(pipe, prompts_file, seed=10, **given):
    settings = resolved_settings(
        pipe,
        **{"steps": 2, "guidance": None, "height": None, "width": None, "max_sequence_length": None, **given},
    )
    base = GenerationParameters(
        prompt="", negative=None, seed=0, sampler="euler", model=DEMO_MODEL, **settings
    )
    return generate.plan(generate.read_prompts(str(prompts_file)), base, seed)


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_plan_numbers_files_and_seeds_by_line(pipe, prompts_file):
    jobs = make_jobs(pipe, prompts_file, seed=10)
    assert [(j.line, j.name, j.params.seed, j.params.prompt) for j in jobs] == [
        (i, f"{i:05d}.png", 10 + i, p) for i, p in enumerate(PROMPTS) if p
    ]
    assert jobs[0].params.steps == 2 and jobs[0].params.guidance == pipe.defaults.guidance == 4.0
    # batches are cut in file order, then dealt out: the same batches for any process count
    lines = [[[j.line for j in b] for b in generate.batches(jobs, 2, r, 2)] for r in range(2)]
    assert lines == [[[0, 2], [5]], [[3, 4]]]


def test_images_are_the_same_for_one_and_two_processes(pipe, prompts_file, tmp_path):
    jobs = make_jobs(pipe, prompts_file)
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        out.mkdir()
    assert generate.generate_part(pipe, jobs, one, batch_size=2).written == 5
    tallies = [generate.generate_part(pipe, jobs, two, batch_size=2, rank=r, world=2) for r in range(2)]
    assert [t.written for t in tallies] == [3, 2]
    for out in (one, two):
        generate.write_manifest(out, jobs)
    assert files(one) == files(two)  # byte for byte, the manifest included

    # batch size 1: each image equals a single pipeline call with its line's seed, exactly
    single = tmp_path / "single"
    single.mkdir()
    generate.generate_part(pipe, jobs, single, batch_size=1)
    for job in jobs:
        image = pipe(job.params.prompt, seed=job.params.seed, steps=2, progress=False)
        np.testing.assert_array_equal(pixels(single / job.name), np.asarray(image))
        # batching changes only float rounding (a batched matmul sums in another order): 1/255 at most
        diff = np.abs(pixels(one / job.name).astype(int) - pixels(single / job.name).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, job.name


def test_two_processes_under_torchrun_equal_one(pipe, prompts_file, tmp_path):
    """A real launch: two gloo processes (what `accelerate launch --num_processes 2` starts on GPUs)."""
    jobs = make_jobs(pipe, prompts_file, seed=10)
    ref = tmp_path / "ref"
    ref.mkdir()
    generate.generate_part(pipe, jobs, ref, batch_size=2)
    generate.write_manifest(ref, jobs)
    out = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "mmdit_flow.pipelines.generate", "--prompts", str(prompts_file), "--out", str(out),
           "--steps", "2", "--seed", "10", "--batch-size", "2", *CPU]  # fmt: skip
    proc = run_launcher(cmd, 600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "process 0 of 2: wrote 3 image(s)" in proc.stdout
        and "process 1 of 2: wrote 2 image(s)" in proc.stdout
    )
    assert files(out) == files(ref)


def test_a_stopped_run_continues_without_rewriting(pipe, prompts_file, tmp_path):
    jobs = make_jobs(pipe, prompts_file)
    full = tmp_path / "full"
    full.mkdir()
    generate.generate_part(pipe, jobs, full, batch_size=2)
    generate.write_manifest(full, jobs)

    out = tmp_path / "out"
    out.mkdir()
    # stopped: process 0 of 2 finished (batches [0, 2] and [5]), process 1 wrote 00003.png of [3, 4] only
    generate.generate_part(pipe, jobs, out, batch_size=2, rank=0, world=2)
    (out / "00003.png").write_bytes((full / "00003.png").read_bytes())
    (out / "00005.png").write_bytes((full / "00005.png").read_bytes()[:300])  # damaged: cut short
    for name in ("00000.png", "00003.png"):
        os.utime(out / name, ns=(10**9, 10**9))  # an mtime that a rewrite would not keep

    tally = generate.generate_part(pipe, jobs, out, batch_size=2)
    assert (tally.written, tally.kept) == (2, 3)  # 00004.png and the damaged 00005.png
    generate.write_manifest(out, jobs)
    for name in ("00000.png", "00003.png"):
        assert (out / name).stat().st_mtime_ns == 10**9, name
    assert files(out) == files(full)  # the damaged file remade

    again = generate.generate_part(pipe, jobs, out, batch_size=2)
    assert (again.written, again.kept) == (0, 5)


def test_manifest_lists_every_line_in_order(pipe, prompts_file, tmp_path):
    jobs = make_jobs(pipe, prompts_file, seed=7)
    generate.generate_part(pipe, jobs, tmp_path, batch_size=3)
    path = generate.write_manifest(tmp_path, jobs)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {
            "file_name": f"{i:05d}.png",
            "text": p,
            "line": i,
            "negative": None,
            "steps": 2,
            "guidance": 4.0,
            "seed": 7 + i,
            "sampler": "euler",
            "model": DEMO_MODEL,
            "height": 64,
            "width": 64,
            "max_sequence_length": 32,
        }
        for i, p in enumerate(PROMPTS)
        if p
    ]
    # the imagefolder convention `mmdit-flow eval` reads
    assert read_metadata(path) == [(f"{i:05d}.png", p) for i, p in enumerate(PROMPTS) if p]
    (tmp_path / "00004.png").unlink()
    with pytest.raises(ValueError, match="1 image\\(s\\) missing .*00004.png.*run again"):
        generate.write_manifest(tmp_path, jobs)


def test_the_command_line_batch_and_its_resume_checks(pipe, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--prompts", str(prompts_file), "--out", str(out), "--steps", "2", "--seed", "10"]
    assert main([*argv, "--batch-size", "2", *CPU]) == 0
    assert f"wrote 5 image(s), kept 0 already in {out}" in capsys.readouterr().out
    ref = tmp_path / "ref"
    ref.mkdir()
    jobs = make_jobs(pipe, prompts_file, seed=10)
    generate.generate_part(pipe, jobs, ref, batch_size=2)
    generate.write_manifest(ref, jobs)
    assert files(out) == files(ref)
    # other settings into the same folder: an error before anything is written
    before = files(out)
    assert main(["generate", "--prompts", str(prompts_file), "--out", str(out), "--steps", "3", *CPU]) == 2
    err = capsys.readouterr().err
    assert f"{out / '00000.png'} was made with other settings (steps: 2 there, 3 now)" in err
    assert files(out) == before
    # an image that is not ours is never overwritten
    Image.new("RGB", (64, 64)).save(out / "00003.png")
    assert main([*argv, *CPU]) == 2
    assert "00003.png carries no 'mmdit-flow' text chunk" in capsys.readouterr().err


def test_png_parameters_round_trip(tmp_path, capsys):
    x = tmp_path / "x.png"
    prompt = "a small red square on the left"
    argv = ["generate", prompt, "--steps", "2", "--seed", "3", "--negative", "a blue circle"]
    assert main([*argv, "-o", str(x), *CPU]) == 0
    assert GenerationParameters.from_png(x) == GenerationParameters(
        prompt=prompt,
        negative="a blue circle",
        steps=2,
        guidance=4.0,
        seed=3,
        sampler="euler",
        model=DEMO_MODEL,
        height=64,
        width=64,
        max_sequence_length=32,
    )
    y = tmp_path / "y.png"
    assert main(["generate", "--from-png", str(x), "-o", str(y), *CPU]) == 0
    np.testing.assert_array_equal(pixels(y), pixels(x))
    assert GenerationParameters.from_png(y) == GenerationParameters.from_png(x)
    # an option beside --from-png replaces the recorded value
    z, direct = tmp_path / "z.png", tmp_path / "direct.png"
    assert main(["generate", "--from-png", str(x), "--seed", "4", "-o", str(z), *CPU]) == 0
    assert main([*argv[:-4], "--seed", "4", "--negative", "a blue circle", "-o", str(direct), *CPU]) == 0
    np.testing.assert_array_equal(pixels(z), pixels(direct))
    assert not np.array_equal(pixels(z), pixels(x))
    capsys.readouterr()


def test_unseeded_and_num_images_calls_are_reproducible(tmp_path):
    many = tmp_path / "m.png"
    assert (
        main(["generate", "a large cyan circle", "--steps", "2", "--num-images", "3", "-o", str(many), *CPU])
        == 0
    )
    params = GenerationParameters.from_png(tmp_path / "m-2.png")
    assert (params.num_images, params.index) == (3, 2) and 0 <= params.seed < 2**32  # drawn, recorded
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(tmp_path / "m-2.png"), "-o", str(again), *CPU]) == 0
    np.testing.assert_array_equal(pixels(again), pixels(tmp_path / "m-2.png"))
    assert not np.array_equal(pixels(again), pixels(tmp_path / "m-1.png"))


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, [], "--prompts {p}: no such file"),
        (b"", [], "--prompts {p} holds no prompt (it is empty or blank); write one prompt a line"),
        (b"\n  \n\n", [], "--prompts {p} holds no prompt"),
        (b"\xff\xfe a\n", [], "--prompts {p} is not UTF-8 text"),
        (b"a cat\n", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (b"a cat\n", ["--num-images", "2"], "--num-images does not go with --prompts"),
        (b"a cat\n", ["-o", "x.png"], "-o names one image file; with --prompts name the folder with --out"),
    ],
)
def test_bad_batch_arguments_are_errors_before_loading(tmp_path, capsys, content, extra, message):
    p = tmp_path / "prompts.txt"
    if content is not None:
        p.write_bytes(content)
    missing_model = str(tmp_path / "no-model")  # never read: the arguments fail first
    argv = ["generate", "--prompts", str(p), "--out", str(tmp_path / "out"), "--model", missing_model, *extra]
    assert main(argv) == 2
    assert message.format(p=p) in capsys.readouterr().err


def test_out_and_prompts_misuse_are_errors(tmp_path, capsys):
    p = tmp_path / "prompts.txt"
    p.write_text("a cat\n")
    a_file = tmp_path / "taken"
    a_file.write_text("")
    cases = [
        (["--prompts", str(p), "--out", str(a_file)], f"--out {a_file} is a file; --out names a folder"),
        (["--prompts", str(p)], "--prompts needs --out DIR"),
        (["a dog", "--prompts", str(p), "--out", "d"], "--prompts reads the prompts from its file"),
        (["--out", str(tmp_path / "d")], "--out and --batch-size go with --prompts FILE"),
        ([], "give a prompt, --from-png FILE, or --prompts FILE --out DIR"),
        (["--from-png", str(tmp_path / "none.png")], "none.png: no such file"),
        (["--from-png", str(p)], "prompts.txt: cannot read the image"),
    ]
    for args, message in cases:
        assert main(["generate", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert main(["generate", "--from-png", str(plain)]) == 2
    assert "carries no 'mmdit-flow' text chunk" in capsys.readouterr().err


def test_the_module_needs_prompts():
    run = subprocess.run(
        [sys.executable, "-m", "mmdit_flow.pipelines.generate", "a dog"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 2 and "pass --prompts FILE and --out DIR" in run.stderr
