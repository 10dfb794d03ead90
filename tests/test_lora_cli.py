"""``mmdit-flow generate --lora PATH[:SCALE]``: the images equal the Python API's with the same LoRAs and
weights (``pipe.load_lora`` + ``pipe.set_adapters``), differ from those without, are recorded in the PNG so
that ``--from-png`` makes them again, and bad arguments fail with a message before a model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmdit_flow.pipelines.cli import main
from mmdit_flow.pipelines.generate_cli import parse_lora
from mmdit_flow.weights.io import save_file
from tests.components import flux_components, save_diffusers_folder, sd3_components
from tests.test_lora_formats import _diffusers_flux_lora, _whole_pipeline_lora

PROMPT = "a photo of a cat"
CALL = {"steps": 2, "guidance": 3.5, "seed": 0, "height": 16, "width": 16, "max_sequence_length": 8}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny Flux folder and two LoRAs for it: a transformer file (peft, alpha 4 in its metadata) and a
    whole-pipeline folder (transformer and CLIP)."""
    root = tmp_path_factory.mktemp("lora_cli")
    components = flux_components()
    folder = save_diffusers_folder(components, root / "base")
    one = _diffusers_flux_lora(components, root / "one", alpha=4)
    two = _whole_pipeline_lora(components, root / "two")
    return folder, one, two


CPU = ["--device", "cpu", "--dtype", "fp32", "--no-progress"]


def _flags(folder):
    return ["--model", str(folder), *(f"--{k.replace('_', '-')}={v}" for k, v in CALL.items()), *CPU]


def _argv(folder, out, *extra):
    return ["generate", PROMPT, *_flags(folder), "-o", str(out), *extra]


def _api_image(folder, loras=()):
    """The image of the Python API with these (path, weight) adapters active."""
    from mmdit_flow.pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    names = [pipe.load_lora(path, adapter_name=f"a{i}") for i, (path, _) in enumerate(loras)]
    if names:
        pipe.set_adapters(names, [w for _, w in loras])
    return np.asarray(pipe(PROMPT, progress=False, **CALL))


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_two_loras_with_weights_equal_the_python_api(flux, tmp_path, capsys):
    folder, one, two = flux
    out = tmp_path / "lora.png"
    assert main(_argv(folder, out, "--lora", f"{one}:0.7", "--lora", f"{two}:-0.4")) == 0
    assert capsys.readouterr().out.strip() == str(out)
    expected = _api_image(folder, [(one, 0.7), (two, -0.4)])
    np.testing.assert_array_equal(_pixels(out), expected)
    without = _api_image(folder)
    assert np.abs(expected.astype(int) - without.astype(int)).max() > 10
    # the weights count: the same LoRAs at other weights give another image
    assert np.abs(expected.astype(int) - _api_image(folder, [(one, 1.0), (two, 1.0)]).astype(int)).max() > 0

    recorded = json.loads(Image.open(out).text["mmdit-flow"])["lora"]
    assert recorded == [
        [str(one.resolve()), 0.7],
        [str((two / "pytorch_lora_weights.safetensors").resolve()), -0.4],
    ]
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "-o", str(again), *CPU]) == 0  # the LoRAs recorded
    np.testing.assert_array_equal(_pixels(again), expected)


def test_one_lora_defaults_to_weight_one(flux, tmp_path):
    folder, one, _ = flux
    out = tmp_path / "one.png"
    assert main(_argv(folder, out, "--lora", str(one.parent))) == 0  # a folder, as diffusers takes it
    np.testing.assert_array_equal(_pixels(out), _api_image(folder, [(one, 1.0)]))
    plain = tmp_path / "plain.png"
    assert main(_argv(folder, plain)) == 0
    assert "lora" not in json.loads(Image.open(plain).text["mmdit-flow"])  # old PNGs stay as they were
    assert np.abs(_pixels(out).astype(int) - _pixels(plain).astype(int)).max() > 10


def test_batch_generation_takes_loras_and_keeps_them_apart(flux, tmp_path, capsys):
    folder, one, _ = flux
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n", encoding="utf-8")
    out = tmp_path / "out"
    batch = ["generate", "--prompts", str(prompts), "--out", str(out), *_flags(folder)]  # line 0: seed 0
    assert main([*batch, "--lora", f"{one}:0.5"]) == 0
    np.testing.assert_array_equal(_pixels(out / "00000.png"), _api_image(folder, [(one, 0.5)]))
    capsys.readouterr()
    # the same folder without the LoRA: an error before any work, not images made two ways
    assert main(batch) == 2
    assert "made with other settings (lora:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: these errors must come before it."""
    from mmdit_flow.pipelines import TextToImagePipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(TextToImagePipeline, "from_pretrained", refuse)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.safetensors", "--lora missing.safetensors: no such file or folder"),
        ("missing.safetensors:0.5", "--lora missing.safetensors: no such file or folder"),
        ("{one}:strong", "the scale 'strong' is not a number; write --lora PATH or --lora PATH:SCALE"),
        ("{one}:", "the scale '' is not a number; write --lora PATH or --lora PATH:SCALE"),
        ("{one}:nan", "the scale must be a finite number; write --lora PATH or --lora PATH:SCALE"),
        (":0.5", "no path before the scale; write --lora PATH or --lora PATH:SCALE"),
        ("{empty}", "has no LoRA file"),
    ],
)
def test_bad_lora_arguments_fail_before_loading_a_model(flux, tmp_path, capsys, no_model, spec, message):
    (tmp_path / "empty").mkdir()
    spec = spec.format(one=flux[1], empty=tmp_path / "empty")
    assert main(_argv(flux[0], tmp_path / "x.png", "--lora", spec)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmdit-flow generate: error: --lora") and message in err
    assert not (tmp_path / "x.png").exists()


def test_a_lora_that_does_not_fit_the_model_is_the_engines_error(flux, tmp_path, capsys):
    folder, one, _ = flux
    sd3 = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 32),
           "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(96, 2)}  # fmt: skip
    file = save_file(sd3, tmp_path / "sd3.safetensors")
    assert main(_argv(folder, tmp_path / "x.png", "--lora", str(one), "--lora", str(file))) == 2
    err = capsys.readouterr().err
    assert f"--lora {file.resolve()}: this is a SD3 LoRA (kohya keys) and the model is Flux" in err
    save_diffusers_folder(sd3_components(), tmp_path / "sd3")
    assert main(_argv(tmp_path / "sd3", tmp_path / "x.png", "--lora", str(one))) == 2
    assert "this is a Flux LoRA (peft / diffusers keys) and the model is SD3" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_the_scale_is_what_follows_the_last_colon(tmp_path):
    assert parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_lora("a:b/style.safetensors:-1e-1") == ("a:b/style.safetensors", -0.1)
    assert parse_lora("C:\\loras\\style.safetensors") == ("C:\\loras\\style.safetensors", 1.0)
    odd = tmp_path / "style:v2.safetensors"  # a colon in an existing file's name
    odd.touch()
    assert parse_lora(str(odd)) == (str(odd), 1.0)
    assert parse_lora(f"{odd}:2") == (str(odd), 2.0)


def test_help_says_what_lora_does(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lora PATH[:SCALE] apply a LoRA: a file or a folder holding one" in text
    assert "repeat for several at once" in text
