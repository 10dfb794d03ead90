"""LoRA: our fused-qkv adapters exported in diffusers' naming load in diffusers and give the same outputs;
LoRA files found in folders as diffusers finds them; bad files refused with errors that name the keys."""

from __future__ import annotations

import pytest
import torch

from mmdit_flow.models.sd3 import SD3Config, SD3Transformer
from mmdit_flow.training.config import LoRAConfig
from mmdit_flow.training.lora import add_lora, lora_layers, merged_copy, save_lora
from mmdit_flow.weights.io import CheckpointError, save_file
from mmdit_flow.weights.lora import LORA_WEIGHT_NAME, find_lora_file, load_lora, lora_deltas
from tests.components import diffusers_pipeline, sd3_components
from tests.train_helpers import TINY

TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mod.lin", "final.linear"]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.8])
    txt = torch.randn(2, 7, 48, generator=g)
    vec = torch.randn(2, 24, generator=g)
    return x, t, txt, vec


def _ours_with_random_lora(pipe_components, tmp_path):
    from mmdit_flow.weights import load_transformer

    diffusers_pipeline(pipe_components).save_pretrained(tmp_path / "base")
    model = load_transformer(tmp_path / "base" / "transformer", dtype=torch.float32)
    model = add_lora(model, LoRAConfig(rank=2, alpha=4.0, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    return model


@torch.no_grad()
def test_lora_file_loads_in_diffusers_with_the_same_output(tmp_path):
    components = sd3_components()
    model = _ours_with_random_lora(components, tmp_path).eval()
    layers = lora_layers(model)
    assert "blocks.0.img.attn.qkv" in layers and layers["blocks.0.img.attn.qkv"][2] == 2.0  # alpha / r
    path = save_lora(model, tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    x, t, txt, vec = _inputs()
    ours = model(x, t, txt, vec)

    pipe = diffusers_pipeline(components)
    before = pipe.transformer(hidden_states=x, encoder_hidden_states=txt, pooled_projections=vec,
                              timestep=1000 * t).sample  # fmt: skip
    pipe.load_lora_weights(str(path.parent))
    theirs = pipe.transformer(hidden_states=x, encoder_hidden_states=txt, pooled_projections=vec,
                              timestep=1000 * t).sample  # fmt: skip
    assert (theirs - before).abs().max() > 1e-2  # the LoRA does change the output
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)

    # merged export and our loader (with a scale) give the same function
    torch.testing.assert_close(merged_copy(model)(x, t, txt, vec), ours, rtol=1e-4, atol=1e-5)
    from mmdit_flow.weights import load_transformer

    plain = load_transformer(tmp_path / "base" / "transformer", dtype=torch.float32)
    torch.testing.assert_close(load_lora(plain, path)(x, t, txt, vec), ours, rtol=1e-4, atol=1e-5)
    half = load_lora(
        load_transformer(tmp_path / "base" / "transformer", dtype=torch.float32), path, scale=0.5
    )
    for module in model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
            module.scaling["default"] *= 0.5
    torch.testing.assert_close(half(x, t, txt, vec), model(x, t, txt, vec), rtol=1e-4, atol=1e-5)


def test_bad_target_module_is_named():
    with pytest.raises(ValueError, match="no linear layer is named 'attn.qkvv'"):
        add_lora(SD3Transformer(SD3Config(**TINY)), LoRAConfig(rank=2, target_modules=["attn.qkvv"]))


def test_bad_target_module_on_flux_lists_existing_double_and_single_block_layers():
    from torch import nn

    from mmdit_flow.models.flux import FluxConfig, FluxTransformer
    from tests.test_train_flux import FLUX_TINY

    model = FluxTransformer(FluxConfig(**FLUX_TINY))
    with pytest.raises(ValueError, match="no linear layer is named 'attn.qkvv'") as err:
        add_lora(model, LoRAConfig(rank=2, target_modules=["attn.qkvv"]))
    examples = str(err.value).split("; e.g. ")[1].split(", ")
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {"img_attn.qkv", "txt_mlp.fc1", "linear1", "linear2"} <= set(examples)
    # each example is a real suffix target: add_lora accepts it
    assert all(any(n.endswith("." + e) for n in names) for e in examples)
    add_lora(model, LoRAConfig(rank=2, target_modules=examples))


def test_pipeline_load_lora_equals_diffusers_with_a_scale(tmp_path):
    """Our pipeline with a LoRA at scale 0.5 equals diffusers' pipeline with that LoRA fused at 0.5."""
    from mmdit_flow.pipelines import TextToImagePipeline

    components = sd3_components()
    path = save_lora(_ours_with_random_lora(components, tmp_path), tmp_path / "lora" / "lora.safetensors")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "base", device="cpu", dtype=torch.float32)
    kw = {"steps": 2, "guidance": 2.0, "height": 32, "width": 32, "output": "np"}
    plain = pipe("a red circle", seed=0, progress=False, **kw)
    pipe.load_lora(path.parent, scale=0.5)  # a folder holding one .safetensors file, as diffusers takes
    ours = pipe("a red circle", seed=0, progress=False, **kw)

    theirs_pipe = diffusers_pipeline(components)
    theirs_pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    theirs_pipe.fuse_lora(lora_scale=0.5)
    theirs = theirs_pipe(
        "a red circle",
        num_inference_steps=2,
        guidance_scale=2.0,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert abs(ours - plain).max() > 1e-3  # the LoRA changes the image
    assert abs(ours - theirs).max() < 1e-3


def _tiny_lora_file(path, seed=0):
    """A diffusers-named LoRA on block 0's image q and the final adaLN (swapped halves) of a TINY model."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 32, generator=g),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 2, generator=g),
        "transformer.norm_out.linear.lora_A.weight": torch.randn(2, 32, generator=g),
        "transformer.norm_out.linear.lora_B.weight": torch.randn(64, 2, generator=g),
    }
    return save_file(sd, path), sd


def test_a_lora_on_one_part_of_a_fused_layer_updates_only_its_rows(tmp_path):
    _, sd = _tiny_lora_file(tmp_path / "l.safetensors")
    deltas = lora_deltas(SD3Transformer(SD3Config(**TINY)), sd)
    assert sorted(deltas) == ["blocks.0.img.attn.qkv.weight", "final.mod.lin.weight"]
    q = sd["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    q = q @ sd["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    torch.testing.assert_close(deltas["blocks.0.img.attn.qkv.weight"], torch.cat([q, torch.zeros(64, 32)]))
    mod = sd["transformer.norm_out.linear.lora_B.weight"] @ sd["transformer.norm_out.linear.lora_A.weight"]
    torch.testing.assert_close(deltas["final.mod.lin.weight"], torch.cat([mod[32:], mod[:32]]))


def _merged(source, **kw):
    """What merging ``source`` changes, on a model with the same random weights each call."""
    torch.manual_seed(0)
    model = SD3Transformer(SD3Config(**TINY))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_lora(model, source, **kw)
    return {k: v - before[k] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_folders_are_searched_as_diffusers_does(tmp_path):
    file, sd = _tiny_lora_file(tmp_path / "one" / "my_lora.safetensors")
    expected = _merged(sd)
    assert sorted(expected) == ["blocks.0.img.attn.qkv.weight", "final.mod.lin.weight"]
    assert find_lora_file(tmp_path / "one") == file  # the only .safetensors file
    got = _merged(tmp_path / "one")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

    _tiny_lora_file(tmp_path / "one" / "other.safetensors", seed=1)
    with pytest.raises(CheckpointError, match="several weight files .*weight_name="):
        find_lora_file(tmp_path / "one")
    assert find_lora_file(tmp_path / "one", weight_name="other.safetensors").name == "other.safetensors"
    _tiny_lora_file(tmp_path / "one" / LORA_WEIGHT_NAME, seed=2)
    assert find_lora_file(tmp_path / "one").name == LORA_WEIGHT_NAME  # diffusers' default name wins

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty has no LoRA file"):
        find_lora_file(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        find_lora_file(tmp_path / "nowhere")


def test_pickle_lora_files_need_allow_pickle(tmp_path):
    _, sd = _tiny_lora_file(tmp_path / "l.safetensors")
    (tmp_path / "pickled").mkdir()
    torch.save(sd, tmp_path / "pickled" / "pytorch_lora_weights.bin")
    with pytest.raises(CheckpointError, match="pickle.*allow_pickle=True"):
        _merged(tmp_path / "pickled")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        _merged(tmp_path / "pickled" / "pytorch_lora_weights.bin")
    got, expected = _merged(tmp_path / "pickled", allow_pickle=True), _merged(sd)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"transformer.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 32)}, "double_blocks"),
        ({"text_encoder.text_model.q_proj.lora_A.weight": torch.zeros(2, 32)}, "text encoders"),
        (
            {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(2, 32)},
            "not .*to_k.lora_B",
        ),
        ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(3, 32)}, "rank 3 but"),
        ({"transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(48, 2)}, "other sizes"),
        (
            {
                "transformer.pos_embed.proj.lora_A.weight": torch.zeros(2, 16),
                "transformer.pos_embed.proj.lora_B.weight": torch.zeros(32, 2),
            },
            "pos_embed.proj, which is not a linear layer",
        ),
    ],
)
def test_bad_lora_files_are_refused_with_the_key(tmp_path, change, match):
    _, sd = _tiny_lora_file(tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match=match):
        lora_deltas(SD3Transformer(SD3Config(**TINY)), {**sd, **change})


def test_alpha_entries_scale_as_diffusers_network_alphas(tmp_path):
    """A peft file's .alpha entries scale B A by alpha / rank; a module without one takes the most common
    alpha (diffusers' network_alphas rule); tested against diffusers in tests/test_lora_formats.py."""
    _, sd = _tiny_lora_file(tmp_path / "l.safetensors")
    model = SD3Transformer(SD3Config(**TINY))
    expected = lora_deltas(model, sd)
    got = lora_deltas(model, {**sd, "transformer.norm_out.linear.alpha": torch.tensor(8.0)})
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key] * 4.0)  # alpha 8 / rank 2, both modules
