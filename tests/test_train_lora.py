"""LoRA: our fused-qkv adapters exported in diffusers' naming load in diffusers and give the same outputs."""

from __future__ import annotations

import pytest
import torch

from mmdit_flow.training.config import LoRAConfig
from mmdit_flow.training.lora import add_lora, load_lora, lora_layers, merged_copy, save_lora
from tests.components import diffusers_pipeline, sd3_components

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
    from mmdit_flow.models.sd3 import SD3Config, SD3Transformer
    from tests.train_helpers import TINY

    with pytest.raises(ValueError, match="no linear layer is named 'attn.qkvv'"):
        add_lora(SD3Transformer(SD3Config(**TINY)), LoRAConfig(rank=2, target_modules=["attn.qkvv"]))


def test_pipeline_load_lora_equals_diffusers_with_a_scale(tmp_path):
    """Our pipeline with a LoRA at scale 0.5 equals diffusers' pipeline with that LoRA fused at 0.5."""
    from mmdit_flow.pipelines import TextToImagePipeline

    components = sd3_components()
    path = save_lora(_ours_with_random_lora(components, tmp_path), tmp_path / "lora" / "lora.safetensors")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "base", device="cpu", dtype=torch.float32)
    kw = {"steps": 2, "guidance": 2.0, "height": 32, "width": 32, "output": "np"}
    plain = pipe("a red circle", seed=0, progress=False, **kw)
    pipe.load_lora(path, scale=0.5)
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
