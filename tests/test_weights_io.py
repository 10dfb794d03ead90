"""Family-agnostic checkpoint I/O: round trips, errors that name the file, pickle policy, strict loads."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from torch import nn

from mmdit_flow.weights import io
from mmdit_flow.weights.io import CheckpointError


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(8, 4, generator=g),
        "a.bias": torch.randn(8, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(3, 5, generator=g).to(torch.float16),
        "b.table": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "b.mask": torch.tensor([True, False, True]),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _no_temp_files(folder) -> None:
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- round trips


def test_file_round_trip_keeps_values_dtypes_and_metadata(tmp_path):
    sd = _sd()
    path = io.save_file(sd, tmp_path / "w.safetensors", metadata={"mmdit_flow.family": "sd3", "note": "x"})
    ckpt = io.read_checkpoint(path)
    _assert_same(sd, ckpt.state_dict)
    assert ckpt.metadata["mmdit_flow.family"] == "sd3" and ckpt.metadata["note"] == "x"
    assert ckpt.metadata["format"] == "pt"
    assert ckpt.files == [path]
    _no_temp_files(tmp_path)


def test_folder_with_one_file_and_subfolder(tmp_path):
    sd = _sd(1)
    io.save_folder(sd, tmp_path / "pipe" / "transformer")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    _assert_same(sd, io.read_state_dict(tmp_path / "pipe", subfolder="transformer"))
    _assert_same(sd, io.read_state_dict(tmp_path / "pipe" / "transformer"))


def test_sharded_round_trip_writes_diffusers_index(tmp_path):
    sd = _sd(2)
    files = io.save_folder(sd, tmp_path, max_shard_size=150, metadata={"k": "v"})
    names = sorted(p.name for p in files)
    index_name = "diffusion_pytorch_model.safetensors.index.json"
    assert index_name in names
    shards = [n for n in names if n != index_name]
    n = len(shards)
    assert n >= 2
    assert shards == [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / index_name).read_text())
    assert set(index["weight_map"]) == set(sd)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    ckpt = io.read_checkpoint(tmp_path)
    _assert_same(sd, ckpt.state_dict)
    assert ckpt.metadata["k"] == "v"
    # the index file itself is accepted as a path too
    _assert_same(sd, io.read_state_dict(tmp_path / index_name))
    _no_temp_files(tmp_path)


def test_resave_replaces_stale_layout(tmp_path):
    io.save_folder(_sd(0), tmp_path, max_shard_size=150)
    sd = _sd(3)
    io.save_folder(sd, tmp_path)  # unsharded now: old shards and index must go
    assert sorted(os.listdir(tmp_path)) == ["diffusion_pytorch_model.safetensors"]
    _assert_same(sd, io.read_state_dict(tmp_path))
    io.save_folder(sd, tmp_path, max_shard_size=150)  # and back to sharded: the single file must go
    assert "diffusion_pytorch_model.safetensors" not in os.listdir(tmp_path)
    _assert_same(sd, io.read_state_dict(tmp_path))


def test_one_shard_only_writes_a_plain_file(tmp_path):
    io.save_folder(_sd(), tmp_path, max_shard_size="10GB")
    assert os.listdir(tmp_path) == ["diffusion_pytorch_model.safetensors"]


def test_shared_storage_and_views_are_saved(tmp_path):
    base = torch.randn(4, 6)
    tied = nn.Linear(6, 4, bias=False)
    sd = {"emb": base, "head": base, "top": base[:2], "bottom": base[2:], "t": base.t(), "lin": tied.weight}
    io.save_file(sd, tmp_path / "w.safetensors")
    out = io.read_state_dict(tmp_path / "w.safetensors")
    for k, v in sd.items():
        assert torch.equal(out[k], v), k


def test_parse_size():
    assert io.parse_size("5GB") == 5 * 10**9
    assert io.parse_size("200MiB") == 200 * 2**20
    assert io.parse_size("1.5KB") == 1500
    assert io.parse_size(1234) == 1234
    for bad in ("lots", "5 parsecs", "0", -3):
        with pytest.raises(ValueError, match="size"):
            io.parse_size(bad)


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(ValueError, match="strings"):
        io.save_file(_sd(), tmp_path / "w.safetensors", metadata={"steps": 3})


# ---------------------------------------------------------------------------------------------- atomic writes


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    import safetensors.torch

    path = io.save_file(_sd(0), tmp_path / "w.safetensors")
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        io.save_file(_sd(1), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.safetensors"]


# ---------------------------------------------------------------------------------------------- bad files


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        io.read_state_dict(tmp_path / "nothing-here")


def test_lfs_pointer_names_the_file(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n"
    )
    with pytest.raises(CheckpointError, match="Git LFS pointer") as err:
        io.read_state_dict(tmp_path)
    assert str(path) in str(err.value) and "git lfs pull" in str(err.value) and "12,345" in str(err.value)


def test_truncated_file_names_it(tmp_path):
    path = io.save_file(_sd(), tmp_path / "w.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated") as err:
        io.read_state_dict(path)
    assert str(path) in str(err.value)
    path.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(CheckpointError, match="truncated"):
        io.read_state_dict(path)
    path.write_bytes(data[:3])
    with pytest.raises(CheckpointError, match="too small") as err:
        io.read_state_dict(path)
    assert str(path) in str(err.value)


def test_bad_header_names_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    garbage = b"{not json at all"
    path.write_bytes(struct.pack("<Q", len(garbage)) + garbage + b"\0" * 64)
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as err:
        io.read_state_dict(path)
    assert str(path) in str(err.value)
    path.write_bytes(b"\xff" * 64)  # an absurd header length
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        io.read_state_dict(path)


def test_inconsistent_tensor_entry_is_wrapped_with_the_file_name(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)  # 4 floats need 16 bytes, not 8
    with pytest.raises(CheckpointError) as err:
        io.read_state_dict(path)
    assert str(path) in str(err.value)


def test_missing_shard_names_index_and_shard(tmp_path):
    io.save_folder(_sd(), tmp_path, max_shard_size=60)
    shard = "diffusion_pytorch_model-00002-of-00003.safetensors"
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=shard) as err:
        io.read_state_dict(tmp_path)
    assert "index.json" in str(err.value)


def test_shard_outside_the_index_folder_is_refused(tmp_path):
    """An index may only name files beside it: "../x" or an absolute path would read a file from elsewhere."""
    io.save_file(_sd(), tmp_path / "elsewhere.safetensors")
    folder = tmp_path / "model"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    for shard in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")):
        io.write_json({"weight_map": dict.fromkeys(_sd(), shard)}, index)
        with pytest.raises(CheckpointError, match="not plain file names in its folder") as err:
            io.read_state_dict(folder)
        assert shard in str(err.value) and str(index) in str(err.value)


def test_lfs_check_is_public_and_keeps_its_old_name(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 99\n")
    for check in (io.check_not_lfs_pointer, io._check_not_lfs_pointer):
        with pytest.raises(
            CheckpointError, match=r"vocab.json is a Git LFS pointer file, not the real file of 99"
        ):
            check(str(path))
    path.write_text("{}")
    io.check_not_lfs_pointer(path)  # a real file passes


def test_shards_without_index_and_empty_folder(tmp_path):
    io.save_folder(_sd(), tmp_path / "s", max_shard_size=150)
    (tmp_path / "s" / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no .*index") as err:
        io.read_state_dict(tmp_path / "s")
    assert str(tmp_path / "s") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty") as err:
        io.read_state_dict(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README.md").write_text("hi")
    with pytest.raises(CheckpointError, match="README.md"):
        io.read_state_dict(tmp_path / "other")


def test_ambiguous_folder_prefers_the_standard_name_or_asks(tmp_path):
    io.save_file(_sd(0), tmp_path / "diffusion_pytorch_model.safetensors")
    io.save_file(_sd(1), tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    _assert_same(_sd(0), io.read_state_dict(tmp_path))
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    io.save_file(_sd(2), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="several"):
        io.read_state_dict(tmp_path)


def test_unknown_suffix_is_refused(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(b"123")
    with pytest.raises(CheckpointError, match="unknown weights format") as err:
        io.read_state_dict(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------- pickle policy


class _Payload:
    """Unpickling this would create a folder: weights_only must refuse it."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_pickle_refused_by_default_and_loaded_on_opt_in(tmp_path):
    sd = _sd()
    path = tmp_path / "model.bin"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="allow_pickle=True") as err:
        io.read_state_dict(path)
    assert str(path) in str(err.value) and "mmdit-flow convert" in str(err.value)
    with pytest.raises(CheckpointError, match="pickle"):
        io.read_state_dict(tmp_path)  # found in a folder, still refused
    _assert_same(sd, io.read_state_dict(path, allow_pickle=True))
    _assert_same(sd, io.read_state_dict(tmp_path, allow_pickle=True))


def test_pickle_opt_in_still_uses_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="weights_only=True") as err:
        io.read_state_dict(path, allow_pickle=True)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_lightning_style_ckpt_is_unwrapped(tmp_path):
    sd = _sd()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "global_step": 7}, path)
    _assert_same(sd, io.read_state_dict(path, allow_pickle=True))


# ---------------------------------------------------------------------------------------------- load_into


class _Net(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.proj = nn.Linear(3, width)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("scale", torch.full((width,), 2.0))  # persistent: in the state dict
        # computed at construction, not saved: must survive a meta-device build
        self.register_buffer("table", torch.arange(width, dtype=torch.float64) / 7, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x)) * self.scale + self.table.to(x.dtype)


def _trained_net() -> _Net:
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        net.scale.uniform_()
    return net


def test_load_into_meta_model_equals_source(tmp_path):
    src = _trained_net()
    io.save_file(src.state_dict(), tmp_path / "w.safetensors")
    with io.parameters_on_meta():
        dst = _Net()
    assert dst.proj.weight.is_meta and not dst.table.is_meta
    io.load_into(dst, io.read_state_dict(tmp_path / "w.safetensors"))
    assert io._on_meta(dst) == []
    assert isinstance(dst.proj.weight, nn.Parameter) and dst.proj.weight.requires_grad
    x = torch.randn(5, 3)
    assert torch.equal(dst(x), src(x))


def test_meta_device_build_reports_buffers_left_on_meta():
    src = _trained_net()
    with torch.device("meta"):
        dst = _Net()
    with pytest.raises(CheckpointError, match="meta device") as err:
        io.load_into(dst, src.state_dict(), source="ckpt.safetensors")
    assert "table" in str(err.value) and "ckpt.safetensors" in str(err.value)


def test_strict_load_lists_missing_unexpected_and_mismatched():
    sd = _trained_net().state_dict()
    del sd["norm.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["proj.weight"] = torch.zeros(5, 3)
    with io.parameters_on_meta():
        dst = _Net()
    with pytest.raises(CheckpointError) as err:
        io.load_into(dst, sd, source="w.safetensors")
    msg = str(err.value)
    assert "1 missing keys: norm.bias" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "proj.weight: checkpoint [5, 3] vs model [4, 3]" in msg
    assert "w.safetensors" in msg


def test_strict_error_truncates_long_lists():
    sd = {f"junk.{i}": torch.zeros(1) for i in range(500)} | _trained_net().state_dict()
    with pytest.raises(CheckpointError, match=r"500 unexpected keys: .*\.\.\. and 490 more") as err:
        io.load_into(_Net(), sd)
    assert len(str(err.value)) < 2000


def test_non_strict_load_returns_what_it_skipped():
    src = _trained_net()
    sd = src.state_dict()
    del sd["norm.bias"]
    sd["extra"] = torch.zeros(1)
    dst = _Net()
    before = dst.norm.bias.clone()
    result = io.load_into(dst, sd, strict=False)
    assert result.missing == ["norm.bias"] and result.unexpected == ["extra"] and result.mismatched == []
    assert torch.equal(dst.proj.weight, src.proj.weight) and torch.equal(dst.norm.bias, before)


def test_dtype_option_and_dtype_preserved():
    src = _trained_net()
    sd = {k: v.to(torch.float16) for k, v in src.state_dict().items()}
    with io.parameters_on_meta():
        kept = _Net()
    io.load_into(kept, sd)  # meta build: the checkpoint's dtype is kept
    assert kept.proj.weight.dtype == torch.float16 and kept.scale.dtype == torch.float16
    with io.parameters_on_meta():
        cast = _Net()
    io.load_into(cast, sd, dtype=torch.bfloat16)
    assert cast.proj.weight.dtype == torch.bfloat16
    assert torch.equal(cast.proj.weight, sd["proj.weight"].to(torch.bfloat16))
    real = _Net()
    io.load_into(real, sd)  # a real model keeps its own dtype and copies values in
    assert real.proj.weight.dtype == torch.float32
    assert torch.equal(real.proj.weight, sd["proj.weight"].float())


def test_pickle_named_safetensors_is_recognised(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save(_sd(), path)
    with pytest.raises(CheckpointError, match="pickle/zip file with a .safetensors name") as err:
        io.read_state_dict(path)
    assert str(path) in str(err.value)


def test_header_whose_size_starts_like_pickle_still_reads(tmp_path):
    """A 128-byte header starts the file with 0x80, the pickle opcode: it must still read as safetensors."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode().ljust(128)
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 128) + header + struct.pack("<2f", 1.5, -2.0))
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(io.read_state_dict(path)["w"], torch.tensor([1.5, -2.0]))
