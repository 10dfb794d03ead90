"""LoRA files of both families in every format we read, against diffusers (or, where diffusers cannot read a
format, against the LoRA merged by hand into the original-format weights, then converted to ours).

Every comparison is of values in fp32: transformer outputs, merged weights, prompt embeddings."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmdit_flow.training.config import LoRAConfig
from mmdit_flow.training.lora import add_lora, save_lora
from mmdit_flow.weights import load_transformer
from mmdit_flow.weights.io import save_file
from mmdit_flow.weights.lora import load_lora
from tests.components import diffusers_pipeline, flux_components, sd3_components
from tests.test_flux import diffusers_velocity

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _flux_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, 4, 4, 6, generator=g),
        "t": torch.tensor([0.3, 0.8]),
        "txt": torch.randn(2, 5, 32, generator=g),
        "vec": torch.randn(2, 16, generator=g),
        "guidance": torch.tensor([2.0, 4.5]),
    }


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny random Flux pipeline folder, its components and our transformer read from it."""
    folder = tmp_path_factory.mktemp("flux") / "base"
    components = flux_components()
    diffusers_pipeline(components).save_pretrained(folder)
    return folder, components


def _ours(folder):
    return load_transformer(folder / "transformer", dtype=torch.float32).eval()


def _theirs(components, lora_path, **kw):
    """diffusers' FluxPipeline transformer after load_lora_weights."""
    pipe = diffusers_pipeline({**components, "transformer": copy.deepcopy(components["transformer"])})
    pipe.load_lora_weights(str(lora_path), **kw)
    return pipe.transformer


def _random_(model, seed, scale=0.3, only="lora_"):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@torch.no_grad()
def test_flux_lora_export_loads_in_diffusers_with_the_same_output(flux, tmp_path):
    folder, components = flux
    targets = [
        "img_attn.qkv",
        "txt_attn.qkv",
        "linear1",
        "linear2",
        "img_mod.lin",
        "final_layer.modulation.lin",
    ]
    model = _random_(add_lora(_ours(folder), LoRAConfig(rank=2, alpha=6.0, target_modules=targets)), 1).eval()
    path = save_lora(model, tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    inputs = _flux_inputs()
    ours = model(**inputs)
    before = diffusers_velocity(components["transformer"], **inputs)
    theirs = diffusers_velocity(_theirs(components, path.parent), **inputs)
    assert (theirs - before).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, **TOL)
    torch.testing.assert_close(load_lora(_ours(folder), path)(**inputs), ours, **TOL)


def _diffusers_flux_lora(components, tmp_path, *, alpha, rank=2, targets=None, rslora=False):
    """A LoRA trained (here: randomized) on diffusers' Flux transformer and saved as diffusers' Flux script
    saves it: peft names and the LoraConfig (lora_alpha != rank) in the file's metadata."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(components["transformer"])
    targets = targets or [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_k_proj",
        "proj_mlp",
        "proj_out",
        "norm.linear",
    ]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora)
    model.add_adapter(config)
    _random_(model, 3)
    FluxPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    return tmp_path / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("rslora", [False, True])
@torch.no_grad()
def test_lora_alpha_in_the_metadata_is_honoured_as_diffusers_does(flux, tmp_path, rslora):
    folder, components = flux
    path = _diffusers_flux_lora(components, tmp_path, alpha=8, rslora=rslora)
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.lora_alpha"] == 8
    inputs = _flux_inputs()
    theirs = diffusers_velocity(_theirs(components, path), **inputs)
    ours = load_lora(_ours(folder), path)(**inputs)
    torch.testing.assert_close(ours, theirs, **TOL)
    # ignoring alpha (scale 1 instead of 4, or 8 / sqrt(2)) would give other outputs
    plain = load_lora(_ours(folder), load_file(path))  # the tensors without the metadata
    assert (plain(**inputs) - theirs).abs().max() > 1e-2


@torch.no_grad()
def test_alpha_entries_are_honoured_as_diffusers_network_alphas(flux, tmp_path):
    """.alpha keys beside peft factors (diffusers' network_alphas): per-module alpha / rank, the most common
    alpha for modules without an entry."""
    folder, components = flux
    path = _diffusers_flux_lora(components, tmp_path, alpha=2)
    sd = load_file(path)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    alphas = {f"{m}.alpha": torch.tensor(a) for m, a in zip(modules, [4.0, 4.0, 4.0, 1.0, 0.5], strict=False)}
    file = save_file({**sd, **alphas}, tmp_path / "alphas" / "lora.safetensors")
    inputs = _flux_inputs()
    theirs = diffusers_velocity(_theirs(components, file), **inputs)
    torch.testing.assert_close(load_lora(_ours(folder), file)(**inputs), theirs, **TOL)


# ------------------------------------------------------------------------- kohya, ComfyUI, original names


def _original_lora(original_sd, prefix, sep, factors, *, skip=(), seed=5, rank=3, alpha=6.0):
    """A LoRA on every linear layer of an original-format state dict: {key: tensor} in a file's names, and
    {original weight key: delta} as kohya's alpha / rank scales it."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for key, w in original_sd.items():
        if w.ndim != 2 or not key.endswith(".weight") or any(s in key for s in skip):
            continue
        module = key.removesuffix(".weight")
        name = prefix + (module.replace(".", "_") if sep == "_" else module)
        down, up = torch.randn(rank, w.shape[1], generator=g), torch.randn(w.shape[0], rank, generator=g)
        a = rank if "final_layer" in key else alpha  # diffusers' kohya converter ignores final_layer alphas
        sd[f"{name}.{factors[0]}.weight"], sd[f"{name}.{factors[1]}.weight"] = down * 0.2, up * 0.2
        if factors[0] == "lora_down":
            sd[f"{name}.alpha"] = torch.tensor(float(a))
        scale = a / rank if factors[0] == "lora_down" else 1.0
        deltas[key] = scale * (up * 0.2) @ (down * 0.2)
    return sd, deltas


def _merged_by_hand(model, family, deltas):
    """Our state dict after adding the deltas to the original-format weights, then converting back."""
    original = family.to_original(model.state_dict(), model.config)
    for key, delta in deltas.items():
        original[key] = original[key] + delta
    return family.from_original(original, model.config)


def _assert_same_weights(model, expected):
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], **TOL)


BY_HAND = ("single_blocks.0.linear1", "_in.", "final_layer")  # see the next two tests
KOHYA = ("lora_unet_", "_", ("lora_down", "lora_up"))
COMFYUI = ("diffusion_model.", ".", ("lora_down", "lora_up"))


@pytest.mark.parametrize("fmt", [KOHYA, COMFYUI], ids=["kohya", "comfyui"])
@torch.no_grad()
def test_flux_kohya_and_comfyui_files_equal_diffusers_converters(flux, tmp_path, fmt):
    """diffusers converts these (``_convert_kohya_flux_lora_to_diffusers``) for the blocks. Its converter
    hard-codes FLUX.1's single-block widths, and drops the embedders' and final layer's LoRAs (it names them
    without the ``transformer.`` prefix its loader keeps): those layers are compared by hand in the next
    test, against sd-scripts' rule (every layer, alpha / rank)."""
    from mmdit_flow.weights.flux_keys import FAMILY

    folder, components = flux
    ours = _ours(folder)
    sd, deltas = _original_lora(FAMILY.to_original(ours.state_dict(), ours.config), *fmt, skip=BY_HAND)
    file = save_file(sd, tmp_path / "lora.safetensors")
    inputs = _flux_inputs()
    theirs = diffusers_velocity(_theirs(components, file), **inputs)
    load_lora(ours, file)
    torch.testing.assert_close(ours(**inputs), theirs, **TOL)
    _assert_same_weights(ours, _merged_by_hand(_ours(folder), FAMILY, deltas))


@pytest.mark.parametrize(
    "fmt",
    [KOHYA, COMFYUI, ("diffusion_model.", ".", ("lora_A", "lora_B"))],
    ids=["kohya", "comfyui", "bfl-peft"],
)
@torch.no_grad()
def test_flux_original_name_files_equal_the_lora_merged_into_original_weights(flux, fmt):
    from mmdit_flow.weights.flux_keys import FAMILY

    folder, _ = flux
    ours = _ours(folder)
    sd, deltas = _original_lora(FAMILY.to_original(ours.state_dict(), ours.config), *fmt)
    assert any("linear1" in k for k in deltas)
    expected = _merged_by_hand(_ours(folder), FAMILY, deltas)
    _assert_same_weights(load_lora(ours, sd), expected)


@torch.no_grad()
def test_sd3_kohya_files_equal_the_lora_merged_into_original_weights(tmp_path):
    """diffusers cannot load SD3 kohya files (``lora_unet_joint_blocks_0_x_block_attn_qkv``); the oracle is
    the LoRA added to the original single-file weights, converted to ours."""
    from mmdit_flow.weights.sd3_keys import FAMILY

    diffusers_pipeline(sd3_components(sd35=True)).save_pretrained(tmp_path / "base")
    ours = _ours(tmp_path / "base")
    sd, deltas = _original_lora(FAMILY.to_original(ours.state_dict(), ours.config), *KOHYA)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in sd
    assert any("attn2" in k for k in deltas) and "final_layer.adaLN_modulation.1.weight" in deltas
    expected = _merged_by_hand(_ours(tmp_path / "base"), FAMILY, deltas)
    _assert_same_weights(load_lora(ours, save_file(sd, tmp_path / "kohya.safetensors")), expected)


# ------------------------------------------------------------------------------------ whole-pipeline files


def _peft_lora(model, targets, *, rank, alpha, seed):
    """peft LoRA factors (randomized) and LoraConfig dict for a copy of ``model``, as diffusers' scripts
    train and save them (the text encoders with --train_text_encoder)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    model = _random_(inject_adapter_in_model(config, copy.deepcopy(model)), seed)
    return get_peft_model_state_dict(model), config.to_dict()


def _whole_pipeline_lora(components, folder):
    """A LoRA file for the transformer and the CLIP text encoders, written by diffusers' save_lora_weights
    with lora_alpha != rank in its metadata."""
    sd3 = "tokenizer_3" in components
    layers = {}
    tr_targets = ["to_q", "to_k", "to_v", "add_q_proj", "to_out.0"] + ([] if sd3 else ["proj_mlp"])
    te_targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
    layers["transformer"] = _peft_lora(components["transformer"], tr_targets, rank=2, alpha=4, seed=11)
    encoders = ["text_encoder", "text_encoder_2"] if sd3 else ["text_encoder"]
    for i, name in enumerate(encoders):
        layers[name] = _peft_lora(components[name], te_targets, rank=2, alpha=1 + i, seed=12 + i)
    kwargs = {f"{n}_lora_layers": sd for n, (sd, _) in layers.items()}
    kwargs.update({f"{n}_lora_adapter_metadata": meta for n, (_, meta) in layers.items()})
    type(diffusers_pipeline(components)).save_lora_weights(folder, **kwargs)
    return folder


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_whole_pipeline_files_adapt_the_text_encoders_as_diffusers(tmp_path, family):
    from mmdit_flow.pipelines import TextToImagePipeline

    components = sd3_components() if family == "sd3" else flux_components()
    diffusers_pipeline(components).save_pretrained(tmp_path / "base")
    lora = _whole_pipeline_lora(components, tmp_path / "lora")  # a folder, as diffusers takes it
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "base", device="cpu", dtype=torch.float32)
    before = pipe.encode_prompt(["a red cat"], 16)
    pipe.load_lora(lora)
    ours = pipe.encode_prompt(["a red cat"], 16)
    theirs_pipe = diffusers_pipeline(components)
    theirs_pipe.load_lora_weights(str(lora))
    if family == "sd3":
        txt, _, vec, _ = theirs_pipe.encode_prompt(
            ["a red cat"], None, None, device="cpu", max_sequence_length=16
        )
    else:
        txt, vec, _ = theirs_pipe.encode_prompt(["a red cat"], None, device="cpu", max_sequence_length=16)
    assert (ours.vec - before.vec).abs().max() > 1e-3  # the text encoders did change
    torch.testing.assert_close(ours.txt, txt, **TOL)
    torch.testing.assert_close(ours.vec, vec, **TOL)
    kw = {"height": 32, "width": 32, "output_type": "np"}
    images = pipe("a red cat", steps=2, seed=0, progress=False, max_sequence_length=16, **kw)
    g = torch.Generator().manual_seed(0)
    theirs = theirs_pipe("a red cat", num_inference_steps=2, generator=g, max_sequence_length=16, **kw).images
    assert abs(images - theirs).max() < 1e-3


# ----------------------------------------------------------------------------------------------- adapters


def _flux_pipe(folder):
    from mmdit_flow.pipelines import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


def _state(pipe):
    models = {"transformer": pipe.transformer, **pipe.components.text_encoders}
    return {f"{n}.{k}": v.clone() for n, m in models.items() for k, v in m.state_dict().items()}


@torch.no_grad()
def test_adapters_mix_with_weights_as_diffusers_and_unload_bit_for_bit(flux, tmp_path):
    folder, components = flux
    one = _diffusers_flux_lora(components, tmp_path / "one", alpha=4)
    two = _whole_pipeline_lora(components, tmp_path / "two")
    pipe = _flux_pipe(folder)
    base = _state(pipe)
    assert pipe.load_lora(one, adapter_name="one") == "one"
    assert pipe.load_lora(two, scale=0.5) == "default_1"
    pipe.set_adapters(["one", "default_1"], [0.7, -0.4])
    inputs = _flux_inputs()
    theirs = diffusers_pipeline(
        {**components, **{n: copy.deepcopy(components[n]) for n in ("transformer", "text_encoder")}}
    )
    theirs.load_lora_weights(str(one), adapter_name="one")
    theirs.load_lora_weights(str(two), adapter_name="two")
    theirs.set_adapters(["one", "two"], [0.7, -0.4])
    torch.testing.assert_close(
        pipe.transformer(**inputs), diffusers_velocity(theirs.transformer, **inputs), **TOL
    )
    txt, vec, _ = theirs.encode_prompt(["a cat"], None, device="cpu", max_sequence_length=16)
    torch.testing.assert_close(pipe.encode_prompt(["a cat"], 16).vec, vec, **TOL)

    pipe.set_adapters("one")  # weight 1, the other off
    expected = load_lora(_ours(folder), one)(**inputs)
    torch.testing.assert_close(pipe.transformer(**inputs), expected, **TOL)

    pipe.unload_lora()
    after = _state(pipe)
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)

    pipe.load_lora(one)
    pipe.fuse_lora()
    fused = _state(pipe)
    pipe.unload_lora()  # nothing left to unload: the fused weights stay
    assert all(torch.equal(v, fused[k]) for k, v in _state(pipe).items())
    torch.testing.assert_close(pipe.transformer(**inputs), expected, **TOL)


def test_adapter_arguments_are_checked(flux, tmp_path):
    folder, components = flux
    one = _diffusers_flux_lora(components, tmp_path, alpha=4)
    pipe = _flux_pipe(folder)
    pipe.load_lora(one, adapter_name="one")
    with pytest.raises(ValueError, match="'one' is already loaded"):
        pipe.load_lora(one, adapter_name="one")
    with pytest.raises(ValueError, match="'two' are not loaded"):
        pipe.set_adapters(["one", "two"])
    with pytest.raises(ValueError, match="2 names but 1 weights"):
        pipe.set_adapters(["one", "one"], [1.0])
    with pytest.raises(ValueError, match="scale must be a finite number"):
        pipe.load_lora(one, scale=float("nan"))


# ------------------------------------------------------------------------------------------------- errors


def test_a_lora_for_the_other_family_is_named(flux, tmp_path):
    from mmdit_flow.pipelines import TextToImagePipeline

    folder, components = flux
    flux_file = _diffusers_flux_lora(components, tmp_path / "flux", alpha=2)
    diffusers_pipeline(sd3_components()).save_pretrained(tmp_path / "sd3")
    sd3 = TextToImagePipeline.from_pretrained(tmp_path / "sd3", device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="this is a Flux LoRA .*peft / diffusers.* the model is SD3"):
        sd3.load_lora(flux_file)
    kohya = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 32)}
    with pytest.raises(ValueError, match="this is a SD3 LoRA \\(kohya keys\\) and the model is Flux"):
        load_lora(_ours(folder), kohya)


def test_keys_that_match_nothing_and_shapes_that_do_not_fit_are_named(flux):
    folder, _ = flux
    model = _ours(folder)
    with pytest.raises(ValueError, match=r"lora_unet_foo.lora_down.weight match no layer .*\(kohya keys\)"):
        load_lora(model, {"lora_unet_foo.lora_down.weight": torch.zeros(2, 32)})
    bad = {
        "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.zeros(2, 32),
        "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.zeros(100, 2),
    }
    with pytest.raises(ValueError, match=r"single_transformer_blocks.0.proj_mlp is 100 x 32 .* 128 x 32"):
        load_lora(model, bad)
    dora = {
        "transformer.single_transformer_blocks.0.proj_out.lora_A.weight": torch.zeros(2, 160),
        "transformer.single_transformer_blocks.0.proj_out.lora_B.weight": torch.zeros(32, 2),
        "transformer.single_transformer_blocks.0.proj_out.lora_magnitude_vector": torch.zeros(32),
    }
    with pytest.raises(ValueError, match="magnitude_vector match no layer.*DoRA, which is not supported"):
        load_lora(model, dora)
    with pytest.raises(ValueError, match="holds no tensors"):
        load_lora(model, {})


@pytest.mark.parametrize("prefix", ["lora_te1_", "lora_te_"])
@torch.no_grad()
def test_kohya_text_encoder_keys_adapt_clip_as_diffusers(flux, tmp_path, prefix):
    """sd-scripts' ``lora_te1_*`` (CLIP-L, module names with underscores) beside ``lora_unet_*``."""
    folder, components = flux
    clip = {f"{n}.weight": m.weight for n, m in components["text_encoder"].named_modules() if "layers.0." in n
            and isinstance(m, torch.nn.Linear)}  # fmt: skip
    te, _ = _original_lora(clip, prefix, "_", ("lora_down", "lora_up"), seed=7)
    unet, _ = _original_lora({"double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32)}, *KOHYA, seed=8)
    file = save_file({**te, **unet}, tmp_path / "kohya.safetensors")
    pipe = _flux_pipe(folder)
    pipe.load_lora(file)
    theirs = diffusers_pipeline({**components, "text_encoder": copy.deepcopy(components["text_encoder"])})
    theirs.load_lora_weights(str(file))
    _, vec, _ = theirs.encode_prompt(["a cat"], None, device="cpu", max_sequence_length=16)
    _, before, _ = diffusers_pipeline(components).encode_prompt(["a cat"], None, device="cpu")
    assert (vec - before).abs().max() > 1e-3
    torch.testing.assert_close(pipe.encode_prompt(["a cat"], 16).vec, vec, **TOL)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_written_kohya_files_read_back_as_the_same_lora(flux, tmp_path, family):
    """``write_lora(..., naming=KOHYA)``: original names, the fused layers whole, alpha folded into B."""
    from mmdit_flow.training.lora import lora_layers, merged_copy
    from mmdit_flow.weights.lora import write_lora
    from mmdit_flow.weights.lora_formats import KOHYA as KOHYA_NAMING

    if family == "flux":
        base = flux[0]
    else:
        base = tmp_path / "sd3"
        diffusers_pipeline(sd3_components()).save_pretrained(base)
    targets = (
        ["qkv", "fc1", "mod.lin", "final.linear"] if family == "sd3" else ["qkv", "linear1", "img_mod.lin"]
    )
    model = add_lora(_ours(base), LoRAConfig(rank=2, alpha=5.0, target_modules=targets))
    model = _random_(model, 9).eval()
    path = write_lora(model, lora_layers(model), tmp_path / "kohya.safetensors", naming=KOHYA_NAMING)
    keys = load_file(path).keys()
    assert all(k.startswith("lora_unet_") and (".lora_down." in k or ".lora_up." in k) for k in keys)
    assert any("_qkv.lora_down" in k for k in keys)  # the fused layer whole, as sd-scripts names it
    _assert_same_weights(load_lora(_ours(base), path), merged_copy(model).state_dict())


@torch.no_grad()
def test_adapters_change_compiled_blocks_without_compiling_again(flux, tmp_path):
    folder, components = flux
    one = _diffusers_flux_lora(components, tmp_path, alpha=4)
    pipe = _flux_pipe(folder)
    pipe.compile(backend="aot_eager", warmup=False)
    inputs = _flux_inputs()
    pipe.transformer(**inputs)
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    assert before > 0  # the blocks did compile
    pipe.load_lora(one)
    torch.testing.assert_close(pipe.transformer(**inputs), load_lora(_ours(folder), one)(**inputs), **TOL)
    pipe.unload_lora()
    torch.testing.assert_close(pipe.transformer(**inputs), _ours(folder)(**inputs), **TOL)
    assert counters["stats"]["unique_graphs"] == before


# sd-scripts' text-encoder prefixes (networks/lora_sd3.py, lora_flux.py) -> the pipeline's text encoder
KOHYA_TE_PREFIXES = {
    "sd3": {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"},
    "flux": {"lora_te1_": "text_encoder", "lora_te3_": "text_encoder_2"},
}


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_kohya_lora_te2_and_te3_keys_adapt_clip_g_and_t5_merged_by_hand(tmp_path, family):
    """SD3's ``lora_te2_`` (CLIP-G) and ``lora_te3_`` (T5; Flux's T5 too), named as sd-scripts names them
    (the transformers module with underscores), give each encoder W + scale * alpha / rank * up @ down,
    every other weight untouched. diffusers cannot load these (no SD3 kohya converter), so the oracle is the
    merge by hand."""
    from mmdit_flow.pipelines import TextToImagePipeline

    diffusers_pipeline(sd3_components() if family == "sd3" else flux_components()).save_pretrained(tmp_path)
    pipe = TextToImagePipeline.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    encoders = pipe.components.text_encoders
    base = {n: {k: v.clone() for k, v in encoders[n].state_dict().items()} for n in encoders}
    sd, expected = {}, {}
    for i, (prefix, name) in enumerate(KOHYA_TE_PREFIXES[family].items()):
        linears = {f"{m}.weight": layer.weight for m, layer in encoders[name].named_modules()
                   if isinstance(layer, torch.nn.Linear)}  # fmt: skip
        lora, deltas = _original_lora(linears, prefix, "_", ("lora_down", "lora_up"), seed=20 + i, alpha=1.5)
        sd.update(lora)
        expected[name] = {k: w + 0.5 * deltas[k] if k in deltas else w for k, w in base[name].items()}
    assert "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0.lora_down.weight" in sd  # T5's gated MLP
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for k in sd) == (
        family == "sd3"
    )
    pipe.load_lora(save_file(sd, tmp_path / "kohya_te.safetensors"), scale=0.5)
    for name, weights in expected.items():
        got = encoders[name].state_dict()
        assert got.keys() == weights.keys()
        for key in got:
            torch.testing.assert_close(got[key], weights[key], rtol=1e-6, atol=1e-6)
        assert any(not torch.equal(got[k], base[name][k]) for k in got), name


def test_a_file_mixing_two_formats_is_an_error_naming_both(flux):
    """Half a file loading silently (the keys of the format that matches most) would be a wrong image."""
    folder, _ = flux
    kohya, _ = _original_lora({"double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32)}, *KOHYA)
    peft = {
        "transformer.single_transformer_blocks.0.proj_out.lora_A.weight": torch.zeros(2, 160),
        "transformer.single_transformer_blocks.0.proj_out.lora_B.weight": torch.zeros(32, 2),
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2),
    }
    message = (
        r"mixes two formats: 4 keys in the diffusers format \(transformer.single_transformer_blocks.0"
        r".proj_out.lora_A.weight, .*\) and 3 in the kohya format \(lora_unet_double_blocks_0_img_attn_qkv"
        r".alpha, lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight, .*\); a file holds one format"
    )
    with pytest.raises(ValueError, match=message):
        load_lora(_ours(folder), {**kohya, **peft})
    more = {f"double_blocks.0.{m}.qkv.weight": torch.zeros(96, 32) for m in ("img_attn", "txt_attn")}
    kohya, _ = _original_lora(more, *KOHYA)
    model = _ours(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"6 keys in the kohya format \(lora_unet_.*\) and 2 in the diffusers"
    ):
        load_lora(model, {**kohya, **dict(list(peft.items())[:2])})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded
