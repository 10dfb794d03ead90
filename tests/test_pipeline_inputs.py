"""What a user meets at the pipeline: diffusers' argument names, ``pipe.to``, per-model defaults from the
folder's ``mmdit_flow.json``, warnings for words and sizes the model never saw, images that decode to NaN."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from components import save_diffusers_folder, sd3_components

OK = {"steps": 2, "height": 16, "width": 16, "progress": False, "max_sequence_length": 8, "seed": 0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_diffusers_folder(sd3_components(), tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def pipe(folder):
    from mmdit_flow.pipelines import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


def _with_defaults(folder, tmp_path, data: dict | str):
    """A copy of the folder with this mmdit_flow.json."""
    copy = shutil.copytree(folder, tmp_path / "with-defaults")
    (copy / "mmdit_flow.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return copy


# ---------------------------------------------------------------------------------- diffusers' names


def test_diffusers_argument_names_map_to_ours(pipe):
    ours = pipe(["a cat", "a dog"], guidance=3.0, num_images=2, output="np", **OK)
    kw = {k: v for k, v in OK.items() if k != "steps"}
    theirs = pipe(
        ["a cat", "a dog"],
        num_inference_steps=2,
        guidance_scale=3.0,
        num_images_per_prompt=2,
        output_type="np",
        **kw,
    )
    assert ours.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_inference_steps": 3}, r"pass steps or diffusers' name num_inference_steps for it, not both"),
        ({"guidance": 2.0, "guidance_scale": 2.0}, r"pass guidance or diffusers' name guidance_scale"),
        ({"return_dict": False}, r"takes no return_dict: the call returns the images themselves"),
        ({"callback_on_step_end": print}, r"takes no callback_on_step_end: pass callback\(i, t, latents\)"),
        ({"stesp": 3}, r"unexpected keyword argument 'stesp'; did you mean steps\?"),
        ({"guidence": 3}, r"unexpected keyword argument 'guidence'; did you mean guidance\?"),
    ],
)
def test_bad_argument_names(pipe, kwargs, match):
    with pytest.raises(TypeError, match=match):
        pipe("a cat", **{**OK, **kwargs})


# --------------------------------------------------------------------------------------------- pipe.to


def test_to_moves_and_casts_every_component_by_the_loading_rules(folder):
    from mmdit_flow.pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    before = pipe("a cat", output="np", **OK)

    def dtypes(p) -> dict:
        models = {"transformer": p.transformer, "vae": p.codec.vae, **p.components.text_encoders}
        return {name: next(m.parameters()).dtype for name, m in models.items()}

    assert pipe.to(torch.float16) is pipe and pipe.dtype == torch.float16
    upcast_vae = torch.float32 if pipe.codec.force_upcast else torch.float16
    expected = {"transformer": torch.float16, "vae": upcast_vae, "text_encoder": torch.float16}
    expected |= {"text_encoder_2": torch.float16, "text_encoder_3": torch.float32}  # T5 never in float16
    assert dtypes(pipe) == expected
    assert pipe.to("cpu", torch.bfloat16) is pipe and pipe.device == torch.device("cpu")
    assert set(dtypes(pipe).values()) == {torch.bfloat16} | (
        {torch.float32} if pipe.codec.force_upcast else set()
    )
    with pytest.raises(ValueError, match="dtype must be torch.float32, torch.bfloat16 or torch.float16"):
        pipe.to(torch.float64)
    # back to float32 from float16 weights: the image moves by fp16 rounding, not more
    after = pipe.to(torch.float32)("a cat", output="np", **OK)
    assert set(dtypes(pipe).values()) == {torch.float32}
    assert 0 < np.abs(after - before).max() < 0.05


# ------------------------------------------------------------------------------------ model defaults


def test_folder_defaults_are_used_where_the_call_leaves_them_unset(folder, pipe, tmp_path):
    from mmdit_flow.pipelines import TextToImagePipeline

    data = {"defaults": {"steps": 3, "guidance": 2.5, "height": 24, "width": 16, "max_sequence_length": 8}}
    custom = TextToImagePipeline.from_pretrained(_with_defaults(folder, tmp_path, data), device="cpu")
    assert (custom.defaults.steps, custom.defaults.guidance, custom.defaults.height) == (3, 2.5, 24)
    assert custom.defaults.describe() == "3 steps, guidance 2.5, 24x16 px, max_sequence_length 8"
    steps = []
    image = custom("a cat", seed=0, output="np", progress=False, callback=lambda i, t, x: steps.append(i))
    assert image.shape == (1, 24, 16, 3) and steps == [0, 1, 2]
    explicit = pipe(
        "a cat",
        seed=0,
        output="np",
        progress=False,
        steps=3,
        guidance=2.5,
        height=24,
        width=16,
        max_sequence_length=8,
    )
    np.testing.assert_array_equal(image, explicit)
    # without the file: diffusers' defaults and the transformer's native size (sample_size 16 x VAE scale 2)
    d = pipe.defaults
    assert (d.steps, d.guidance, d.height, d.width, d.max_sequence_length) == (28, 7.0, 32, 32, None)
    assert not d.recorded and d.vocabulary is None and d.trained_sizes is None


def test_save_pretrained_keeps_the_defaults(folder, tmp_path):
    from mmdit_flow.pipelines import TextToImagePipeline

    data = {"defaults": {"steps": 5, "guidance": 3.0}, "trained_sizes": [16, 32], "vocabulary": ["a", "Cat"]}
    pipe = TextToImagePipeline.from_pretrained(_with_defaults(folder, tmp_path, data), device="cpu")
    saved = pipe.save_pretrained(tmp_path / "saved")
    again = TextToImagePipeline.from_pretrained(saved, device="cpu")
    assert again.defaults == pipe.defaults and again.defaults.vocabulary == {"a", "cat"}


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"defaults": {"steps": 0}}', r"mmdit_flow.json: defaults.steps must be an integer >= 1, got 0"),
        ('{"defaults": {"steps": "28"}}', r"defaults.steps must be an integer >= 1, got '28'"),
        ('{"defaults": {"guidance": NaN}}', r"defaults.guidance must be a finite number >= 0, got nan"),
        ('{"defaults": {"guidence": 4}}', r"unknown key\(s\) defaults.guidence; known: defaults.steps"),
        ('{"vocabulary": ["a b"]}', r"vocabulary must be a list of words"),
        ('{"trained_sizes": [64, 32]}', r"trained_sizes is \[smallest, largest\]"),
        ('{"defaults": {"height": true}}', r"defaults.height must be an integer >= 1, got True"),
        ("{not json", r"mmdit_flow.json is not valid JSON"),
    ],
)
def test_bad_defaults_file_is_named(folder, tmp_path, text, match):
    from mmdit_flow.pipelines import TextToImagePipeline

    with pytest.raises(ValueError, match=match):
        TextToImagePipeline.from_pretrained(_with_defaults(folder, tmp_path, text), device="cpu")


# ----------------------------------------------------------------------- words and sizes never seen


def test_one_warning_names_the_unknown_words_and_one_the_untrained_size(folder, tmp_path):
    from mmdit_flow.pipelines import TextToImagePipeline

    data = {"trained_sizes": [16, 16], "vocabulary": ["a", "red", "cat", "on", "the", "left"]}
    pipe = TextToImagePipeline.from_pretrained(_with_defaults(folder, tmp_path, data), device="cpu")
    long = {**OK, "max_sequence_length": 64}  # no truncation warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(["a red cat on the left", "A RED Cat!"], **long)  # case and punctuation do not matter
    assert [str(w.message) for w in caught] == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(["a blue cat", "a red dog's ball"], negative_prompt="blurry", **{**long, "height": 24})
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert messages[0].startswith("this model never saw the word(s) 'ball', 'blue', 'blurry', \"dog's\"")
    assert "pipe.defaults.vocabulary lists the 6 words it knows" in messages[0]
    assert messages[1].startswith("24x16 px is outside the sizes this model was trained at (16 px a side)")


def test_shipped_model_records_its_defaults_and_words():
    from mmdit_flow.pipelines.defaults import read_defaults
    from mmdit_flow.pipelines.loading import demo_folder
    from mmdit_flow.training.recipes.tiny_shapes import shapes

    d = read_defaults(demo_folder())
    assert (d.steps, d.guidance, d.height, d.width, d.max_sequence_length) == (28, 4.0, 64, 64, 32)
    assert d.trained_sizes == (64, 64) and d.recorded
    assert d.vocabulary == set(shapes.caption_vocabulary())  # the words the training grammar writes
    assert d.unknown_words(["a large red circle on the left", "a dog"]) == ["dog"]


# ------------------------------------------------------------------------------------ NaN from the VAE


def test_nan_decoded_images_raise_before_conversion(folder):
    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.pipelines.vae import NonFiniteImagesError

    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    hook = pipe.codec.vae.decoder.register_forward_hook(lambda m, a, out: out * float("nan"))
    for output in ("pil", "np", "pt"):
        with pytest.raises(
            NonFiniteImagesError, match=r"image\(s\) \[0\] to NaN or inf .* broken VAE weights"
        ):
            pipe("a cat", output=output, **OK)
    pipe.codec.vae.to(torch.bfloat16)
    with pytest.raises(NonFiniteImagesError, match=r"in torch.bfloat16. It overflowed: decode in float32"):
        pipe("a cat", **OK)
    pipe.codec.vae.to(torch.float32)
    assert pipe("a cat", output="latent", **OK).isfinite().all()  # latents are not decoded
    hook.remove()
    assert np.isfinite(pipe("a cat", output="np", **OK)).all()


def test_nan_sampled_latents_raise_before_decoding(folder):
    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.pipelines.vae import NonFiniteLatentsError

    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    pipe.transformer.register_forward_hook(lambda m, a, out: out * float("nan"))  # an overflowing network
    with pytest.raises(NonFiniteLatentsError, match=r"the sampled latents of image\(s\) \[0, 1\]"):
        pipe(["a cat", "a dog"], **OK)
