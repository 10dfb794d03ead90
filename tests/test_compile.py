"""``pipe.compile()``: regional torch.compile of the transformer blocks. After its warm-up no call compiles
again (dynamo's graph count stays put across prompts, CFG's doubled batch, images per prompt, step counts,
guidance on and off, and image sizes), and the images equal eager ones to fp32 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from components import flux_components, save_diffusers_folder, sd3_components

from mmdit_flow.pipelines.compiling import compiled_graphs

# compiled kernels fuse and reorder fp32 arithmetic (layer norms, GELU, residuals): the shipped model's images
# moved by 2.8e-6 (bench/pipeline.py --best --dtype float32), far below one 8-bit level (3.9e-3)
TOLERANCE = {"blocks": 1e-5, "model": 5e-5}  # the whole model: Flux's rotary tables are compiled code too

# (prompt, keyword arguments): guidance on (batch 2 n) and off (batch n), 1 to 3 images, 1 to 4 steps
SD3_CALLS = [
    ("a photo of a cat", {"steps": 2, "guidance": 5.0, "num_images": 1}),
    ("a red dog", {"steps": 3, "guidance": 1.0, "num_images": 1}),
    ("a blue cat on the dog", {"steps": 1, "guidance": 4.0, "num_images": 3}),
    ("the cat", {"steps": 4, "guidance": 1.0, "num_images": 2, "negative_prompt": "blurry"}),
    ("a cat", {"steps": 2, "guidance": 3.0, "num_images": 2, "height": 48, "width": 48}),
]
FLUX_CALLS = [  # a dev-like Flux: guidance is an input; true CFG (batch 2 n) needs true_cfg_scale > 1
    ("a photo of a cat", {"steps": 2, "guidance": 3.5, "num_images": 1}),
    ("a red dog", {"steps": 3, "guidance": 2.0, "num_images": 2}),
    ("a blue cat", {"steps": 1, "num_images": 1, "true_cfg_scale": 2.0, "negative_prompt": "bad"}),
    ("the cat", {"steps": 2, "num_images": 3, "true_cfg_scale": 1.5, "negative_prompt": "blurry"}),
    ("a cat", {"steps": 2, "num_images": 1, "height": 48, "width": 48}),
]


def _images(pipe, calls) -> list[np.ndarray]:
    return [pipe(p, seed=i, output="np", progress=False, **kw) for i, (p, kw) in enumerate(calls)]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_no_recompiles_after_the_warmup_and_images_equal_eager(family, tmp_path):
    _check_compiled_calls(family, tmp_path, "blocks")


@pytest.mark.slow  # 150 s with a cold inductor cache (46 s warm): it compiles the whole forward of both
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_whole_model_compiles_once_too(family, tmp_path):
    _check_compiled_calls(family, tmp_path, "model")


def _check_compiled_calls(family: str, tmp_path, scope: str) -> None:
    from mmdit_flow.pipelines import TextToImagePipeline

    components = sd3_components() if family == "sd3" else flux_components()
    folder = save_diffusers_folder(components, tmp_path / family)
    calls = SD3_CALLS if family == "sd3" else FLUX_CALLS
    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    eager = _images(pipe, calls)

    torch._dynamo.reset()
    report = pipe.compile(scope=scope)
    n_blocks = 2  # SD3: two joint blocks (the last is pre-only); Flux: one double and one single block
    assert report.blocks == n_blocks and report.seconds > 0
    # one graph at batch 1 and one (symbolic) at batch >= 2: per block variant (here the first block and the
    # last), or for the whole forward
    assert report.graphs == 2 * (n_blocks if scope == "blocks" else 1), report
    after_warmup = compiled_graphs()
    compiled = _images(pipe, calls)
    assert compiled_graphs() == after_warmup, "a call after the warm-up compiled again"
    for i, (a, b) in enumerate(zip(compiled, eager, strict=True)):
        assert a.shape == b.shape
        diff = float(np.abs(a - b).max())
        assert diff <= TOLERANCE[scope], f"call {i}: compiled images differ from eager ones by {diff:.2e}"
    torch._dynamo.reset()


def test_from_pretrained_compiles_and_bad_options_name_the_argument(tmp_path):
    from mmdit_flow.pipelines import TextToImagePipeline

    folder = save_diffusers_folder(sd3_components(t5=False), tmp_path / "sd3")
    torch._dynamo.reset()
    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, compile=True)
    assert pipe.compile_report is not None and pipe.compile_report.graphs == 4
    assert "compiled 2 blocks into 4 graphs" in str(pipe.compile_report)
    with pytest.raises(ValueError, match="backend"):
        pipe.compile(backend="tensorrt")
    with pytest.raises(ValueError, match="dynamic"):
        pipe.compile(dynamic="batch")
    with pytest.raises(ValueError, match="scope"):
        pipe.compile(scope="vae")
    torch._dynamo.reset()


def test_more_graphs_than_dynamos_default_limit_still_compile(tmp_path):
    """Three dtypes of one 2-block SD3 make 12 graphs of one block class, past dynamo's default limit of 8
    graphs per function (after which it would run the blocks eager)."""
    from mmdit_flow.pipelines import TextToImagePipeline

    folder = save_diffusers_folder(sd3_components(t5=False), tmp_path / "sd3")
    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    torch._dynamo.reset()
    graphs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        pipe.to(dtype)
        graphs.append(pipe.compile(backend="eager").graphs)  # eager backend: tracing only, fast
    assert graphs == [4, 4, 4]
    torch._dynamo.reset()


def test_step_caching_and_a_whole_model_compile_are_refused_in_either_order(tmp_path):
    from mmdit_flow.pipelines import TextToImagePipeline

    folder = save_diffusers_folder(sd3_components(t5=False), tmp_path / "sd3")
    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    pipe.enable_step_cache(0.1)
    with pytest.raises(ValueError, match="compiled again at every step"):
        pipe.compile(scope="model", backend="aot_eager", warmup=False)
    pipe.disable_step_cache()
    torch._dynamo.reset()
    pipe.compile(scope="model", backend="aot_eager", warmup=False)
    with pytest.raises(ValueError, match="compiled again at every step"):
        pipe.enable_step_cache(0.1)
    assert pipe.transformer.step_cache is None
    torch._dynamo.reset()
