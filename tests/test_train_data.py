"""Training data: odd image files decode correctly or are skipped and counted, never crash; the data order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmdit_flow.training.config import DataConfig
from mmdit_flow.training.data import (
    BadImage,
    ImageFolderDataset,
    Layout,
    SampleKey,
    StepSampler,
    TooManyBadFiles,
    collate,
    load_image,
    make_buckets,
    nearest_bucket,
    scan_folder,
)


def _png_bytes(img: Image.Image, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_rgba_composited_on_background(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200  # red, half transparent on the left, opaque on the right
    arr[:, :2, 3] = 128
    arr[:, 2:, 3] = 255
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png", background=(0, 0, 255)))
    assert out.shape == (4, 4, 3)
    # alpha a over background b: a * c + (1 - a) * b
    np.testing.assert_allclose(out[0, 0], [200 * 128 / 255, 0, 255 * 127 / 255], atol=1)
    np.testing.assert_array_equal(out[0, 3], [200, 0, 0])


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 2), 0)
    img.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_image(tmp_path / "p.png", background=(255, 255, 255)))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # transparent index shows the background
    np.testing.assert_array_equal(out[1, 1], [250, 0, 0])


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100], [65535, 32896]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    np.testing.assert_array_equal(out[..., 0], [[0, 100], [255, 128]])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_greyscale_and_exif_rotation(tmp_path):
    Image.fromarray(np.full((3, 5), 77, np.uint8), "L").save(tmp_path / "l.png")
    assert np.asarray(load_image(tmp_path / "l.png")).tolist() == [[[77] * 3] * 5] * 3
    # a 6x2 (w x h) JPEG with orientation 6 (rotate 90 clockwise) displays as 2x6
    arr = np.zeros((2, 6, 3), np.uint8)
    arr[:, :3] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = np.asarray(load_image(tmp_path / "r.jpg"))
    assert out.shape == (6, 2, 3)
    assert out[0].mean() > 200 and out[-1].mean() < 50  # the white left half is now on top


def _bad_files(tmp: Path) -> dict[str, str]:  # noqa: F821
    good = _png_bytes(Image.new("RGB", (64, 64), (9, 9, 9)))
    (tmp / "zero.png").write_bytes(b"")
    (tmp / "corrupt.png").write_bytes(b"this is not an image at all" * 10)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noisy.save(tmp / "truncated.jpg", quality=95)
    (tmp / "truncated.jpg").write_bytes((tmp / "truncated.jpg").read_bytes()[:2000])
    # one colour, 4000 x 4000: 16 kB on disk, 16 megapixels decoded (limit 10 in these tests)
    Image.new("L", (4000, 4000)).save(tmp / "bomb.png", optimize=True)
    return {"good": good}


def test_bad_files_raise_badimage(tmp_path):
    _bad_files(tmp_path)
    for name in ("zero.png", "corrupt.png", "truncated.jpg", "bomb.png"):
        with pytest.raises(BadImage, match=name):
            load_image(tmp_path / name, max_pixels=10_000_000)


def _folder(tmp_path, n_good=6, **data_kw):
    _bad_files(tmp_path)
    rows = []
    for i in range(n_good):
        Image.new("RGB", (96 if i % 2 else 64, 64), (i * 20, 0, 0)).save(tmp_path / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"caption {i}"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "img0.txt").write_text("ignored: metadata.jsonl wins")
    return DataConfig(
        path=str(tmp_path), resolution=64, bucket_step=32, max_image_pixels=10_000_000, **data_kw
    )


def test_folder_skips_and_counts_bad_files(tmp_path):
    data = _folder(tmp_path, max_bad_fraction=0.5)
    records, bad = scan_folder(tmp_path, data)
    assert len(records) == 7  # 6 good + the truncated one, whose header is fine
    assert bad.total == 10 and set(map(lambda p: p.split("/")[-1], bad.paths)) == {
        "zero.png",
        "corrupt.png",
        "bomb.png",
    }
    bad.check()  # 30% < 50%
    assert [r.caption for r in records if "img" in r.path] == [f"caption {i}" for i in range(6)]
    ds = ImageFolderDataset(records, data)
    trunc = next(i for i, r in enumerate(records) if "truncated" in r.path)
    item = ds[SampleKey(trunc, 0)]  # replaced by the next readable image of its bucket
    assert [b[0].split("/")[-1] for b in item["bad"]] == ["truncated.jpg"]
    assert item["pixels"].shape == (3, 64, 64) and item["pixels"].min() >= -1 and item["pixels"].max() <= 1
    bad.add(*item["bad"][0])
    assert bad.summary() == "4 of 10 images skipped as unreadable (40.0%)"
    bad.max_fraction = 0.35
    with pytest.raises(TooManyBadFiles, match="4 of 10 images"):
        bad.check()


def test_buckets_and_random_crop(tmp_path):
    data = _folder(tmp_path, buckets=True, crop="random", flip=True)
    data.resolution = 128
    assert make_buckets(128, 32, 2.0) == [(160, 96), (128, 128), (96, 160), (96, 192)]
    records, _ = scan_folder(tmp_path, data)
    sizes = {r.path.split("/")[-1]: r.size for r in records}
    assert sizes["img0.png"] == (128, 128) and sizes["img1.png"] == (96, 160)  # (h, w) nearest to 3:2
    for h, w in make_buckets(512, 64, 2.0):
        assert h % 64 == 0 and w % 64 == 0 and max(h / w, w / h) <= 2 and abs(h * w / 512**2 - 1) < 0.2
    assert nearest_bucket(1000, 500, make_buckets(512, 64, 2.0)) == (384, 704)
    ds = ImageFolderDataset(records, data)
    i = next(i for i, r in enumerate(records) if r.path.endswith("img1.png"))
    a, b, c = ds[SampleKey(i, 1)], ds[SampleKey(i, 1)], ds[SampleKey(i, 2)]
    assert a["pixels"].shape == (3, 96, 160)
    assert torch.equal(a["pixels"], b["pixels"])  # the same seed crops the same way
    assert a["caption"] == "caption 1" and c["seed"] == 2


def test_step_sampler_splits_one_order_over_processes_and_micro_steps():
    groups = [0] * 10 + [1] * 7
    whole = StepSampler(groups, Layout(batch_size=4), seed=3)
    assert whole.steps_per_epoch == 2 + 1
    for step in range(7):
        ref = whole.keys(step)
        assert len({groups[k.index] for k in ref}) == 1  # one bucket per step
        split = [
            StepSampler(groups, Layout(batch_size=1, num_processes=2, rank=r, grad_accum=2), seed=3).keys(
                step
            )
            for r in range(2)
        ]
        # micro-step m, rank r holds positions (m * 2 + r)
        assert [split[0][0], split[1][0], split[0][1], split[1][1]] == ref
    resumed = StepSampler(groups, Layout(batch_size=4), seed=3, start_step=4, max_steps=6)
    assert list(resumed) == [whole.keys(4), whole.keys(5)]
    epoch0 = sorted(k.index for s in range(3) for k in whole.keys(s))
    assert len(set(epoch0)) == 12  # no sample twice within an epoch
    with pytest.raises(ValueError, match="largest bucket holds 10"):
        StepSampler(groups, Layout(batch_size=11), seed=0)


def test_collate_stacks_and_concatenates():
    out = collate(
        [
            {"pixels": torch.zeros(3), "caption": "a", "seed": 1, "bad": [("x", "y")]},
            {"pixels": torch.ones(3), "caption": "b", "seed": 2, "bad": []},
        ]
    )
    assert out["pixels"].shape == (2, 3) and out["caption"] == ["a", "b"]
    assert out["seed"].tolist() == [1, 2] and out["bad"] == [("x", "y")]


def test_webdataset_shards(tmp_path):
    import webdataset as wds

    from mmdit_flow.training.data import ShardStream

    good = [_png_bytes(Image.new("RGB", (64, 64), (i * 30, 0, 0))) for i in range(5)]
    with wds.TarWriter(str(tmp_path / "s0.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"a{i}", "png": good[i], "txt": f"cap {i}"})
        w.write({"__key__": "bad", "png": b"garbage", "txt": "bad"})
    with wds.TarWriter(str(tmp_path / "s1.tar")) as w:
        for i in range(3, 5):
            w.write({"__key__": f"b{i}", "png": good[i], "json": json.dumps({"text": f"cap {i}"})})
    data = DataConfig(shards=[str(tmp_path / "s{0..1}.tar")], resolution=32, bucket_step=32)
    stream = ShardStream(data.shards, data, Layout(batch_size=2), seed=0)
    steps = list(zip(range(4), stream, strict=False))
    captions = [s[1]["caption"] for s in steps]
    epoch0 = [c for pair in captions[:2] for c in pair]  # 5 good samples: two step batches, one left over
    assert len(set(epoch0)) == 4 and set(epoch0) < {f"cap {i}" for i in range(5)}
    assert all(s[1]["pixels"].shape == (2, 3, 32, 32) for s in steps)
    bad = [b for s in steps for b in s[1]["bad"]]
    assert bad and all("bad" in name for name, _ in bad)
    resumed = ShardStream(data.shards, data, Layout(batch_size=2), seed=0, start_step=2)
    first = next(iter(resumed))
    assert first["caption"] == steps[2][1]["caption"] and torch.equal(first["pixels"], steps[2][1]["pixels"])


def test_run_stops_before_training_when_too_many_files_are_bad(tmp_path):
    from mmdit_flow.training.config import config_from_dict
    from mmdit_flow.training.trainer import make_loader

    data = _folder(tmp_path, n_good=2)  # 3 unreadable headers of 6 files
    cfg = config_from_dict(
        {"model": {"preset": "sd3_medium"}, "data": {**vars(data), "max_bad_fraction": 0.4}}
    )
    with pytest.raises(TooManyBadFiles, match=r"3 of 6 images \(50.0%\)"):
        make_loader(cfg, Layout(batch_size=1), 0)
    cfg.data.max_bad_fraction = 0.5
    loader, bad, _ = make_loader(cfg, Layout(batch_size=1), 0)
    assert len(bad.paths) == 3 and next(iter(loader))["pixels"].shape == (1, 3, 64, 64)


def test_a_caption_that_is_not_utf8_is_skipped_and_named(tmp_path):
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}", encoding="utf-8")
    (tmp_path / "img1.txt").write_bytes("caf\xe9 latin-1".encode("latin-1"))
    data = DataConfig(path=str(tmp_path), resolution=64, bucket_step=32, max_bad_fraction=0.5)
    records, bad = scan_folder(tmp_path, data)
    assert [r.caption for r in records] == ["caption 0", "caption 2"]
    assert list(bad.paths) == [str(tmp_path / "img1.png")]
    assert f"{tmp_path / 'img1.txt'}: the caption is not UTF-8" in bad.paths[str(tmp_path / "img1.png")]
    assert bad.summary() == "1 of 3 images skipped as unreadable (33.3%)"


def test_metadata_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    rows = [
        json.dumps({"file_name": "a.png", "text": "fine"}).encode(),
        b'{"file_name": "b.png", "text": "\xe9"}',
    ]
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(rows))
    data = DataConfig(path=str(tmp_path), resolution=64, bucket_step=32)
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: the line is not UTF-8"):
        scan_folder(tmp_path, data)


def test_webdataset_caption_that_is_not_utf8_is_a_bad_sample(tmp_path):
    import webdataset as wds

    from mmdit_flow.training.data import ShardStream

    good = [_png_bytes(Image.new("RGB", (64, 64), (i * 30, 0, 0))) for i in range(3)]
    with wds.TarWriter(str(tmp_path / "s0.tar")) as w:
        w.write({"__key__": "a0", "png": good[0], "txt": "cap 0"})
        w.write({"__key__": "latin", "png": good[1], "txt": "caf\xe9".encode("latin-1")})
        w.write({"__key__": "a2", "png": good[2], "txt": "cap 2"})
    data = DataConfig(shards=[str(tmp_path / "s0.tar")], resolution=32, bucket_step=32)
    first = next(iter(ShardStream(data.shards, data, Layout(batch_size=2), seed=0)))
    assert sorted(first["caption"]) == ["cap 0", "cap 2"]  # no replacement characters trained on
    assert [name.split(":")[-1] for name, _ in first["bad"]] == ["latin"]
    assert "the caption is not UTF-8" in first["bad"][0][1]
