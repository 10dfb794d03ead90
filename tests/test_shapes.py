"""The captioned-shapes generator: determinism, splits, geometry, captions, rendering, dataset folder."""

import json

import numpy as np
import pytest

from mmdit_flow.training.recipes.tiny_shapes import shapes as S


def _scene(*objects, background="gray", **kw):
    return S.Scene(tuple(S.ObjectSpec(*o) for o in objects), background, **kw)


def test_same_seed_same_scenes_and_pixels():
    a = S.sample_scenes(20, seed=3, split="all")
    b = S.sample_scenes(20, seed=3, split="all")
    assert a == b
    assert all(np.array_equal(S.render(x), S.render(y)) for x, y in zip(a[:5], b[:5], strict=True))
    assert S.sample_scenes(20, seed=4, split="all") != a
    assert S.scene_at(7, seed=3, split="all") == a[7]  # indexable without generating the prefix


def test_splits_separate_heldout_pairs_and_cover_every_colour_and_shape():
    train, held = S.train_scenes(600), S.heldout_scenes(200)
    assert not any(S.is_heldout(s) for s in train)
    assert all(S.is_heldout(s) for s in held)
    train_pairs = {(o.color, o.shape) for s in train for o in s.objects}
    assert {c for c, _ in train_pairs} == set(S.COLORS)  # every colour and shape is seen in training ...
    assert {sh for _, sh in train_pairs} == set(S.SHAPES)
    all_pairs = {(c, sh) for c in S.COLORS for sh in S.SHAPES}
    assert train_pairs == all_pairs - S.HELDOUT_PAIRS  # ... only the held-out combinations are not
    held_pairs = {(o.color, o.shape) for s in held for o in s.objects}
    assert S.HELDOUT_PAIRS <= held_pairs


def test_objects_inside_image_and_never_overlapping():
    for s in S.sample_scenes(400, split="all"):
        for o in s.objects:
            assert o.extent / 2 <= o.x <= 1 - o.extent / 2 and o.extent / 2 <= o.y <= 1 - o.extent / 2
            lo, hi = S.SIZE_EXTENT[o.size] * (1 - S.SIZE_JITTER), S.SIZE_EXTENT[o.size] * (1 + S.SIZE_JITTER)
            assert lo - 1e-4 <= o.extent <= hi + 1e-4
        if len(s.objects) == 2:
            a, b = s.objects
            reach = (a.extent + b.extent) / 2
            assert max(abs(a.x - b.x), abs(a.y - b.y)) - reach >= S._GAP - 1e-3
            dx, dy = b.x - a.x, b.y - a.y  # the stated relation holds along the dominant axis
            expect = {"left of": dx > 2 * abs(dy), "right of": -dx > 2 * abs(dy),
                      "above": dy > 2 * abs(dx), "below": -dy > 2 * abs(dx)}  # fmt: skip
            assert expect[s.relation], s
        else:
            ax, ay = S.POSITION_ANCHORS[s.position]
            o = s.objects[0]
            assert abs(o.x - ax) <= S.POSITION_JITTER + 1e-4 and abs(o.y - ay) <= S.POSITION_JITTER + 1e-4


def test_captions_follow_the_grammar():
    red, blue = ("circle", "red", "large", 0.25, 0.5, 0.38), ("square", "blue", "small", 0.75, 0.5, 0.2)
    left_right = _scene(red, blue, relation="left of", phrasing="absolute", show_background=False)
    assert S.caption(left_right) == "a large red circle on the left and a small blue square on the right"
    center = _scene(("triangle", "green", "small", 0.5, 0.5, 0.2), position="center")
    assert S.caption(center) == "a small green triangle in the center on a gray background"
    above = _scene(("square", "yellow", "large", 0.5, 0.25, 0.38), ("circle", "cyan", "small", 0.5, 0.8, 0.2),
                   background="black", relation="above")  # fmt: skip
    assert S.caption(above) == "a large yellow square above a small cyan circle on a black background"
    words = {w for s in S.sample_scenes(300, split="all") for w in S.caption(s).split()}
    assert words == set(S.caption_vocabulary())


def test_every_grammar_form_is_sampled():
    scenes = S.sample_scenes(400, split="all")
    forms = {(s.position, s.relation, s.phrasing if s.relation else None, s.show_background) for s in scenes}
    expected = {(p, None, None, b) for p in S.POSITIONS for b in (True, False)}
    expected |= {(None, r, ph, b) for r in S.RELATIONS for ph in S.PHRASINGS for b in (True, False)}
    assert forms == expected


def test_render_pixels_and_areas():
    # A large square 0.375 * 64 = 24 px wide, centred on pixel boundaries: exact colour, exact area.
    sq = _scene(("square", "orange", "large", 0.5, 0.5, 0.375), background="white", position="center")
    img = S.render(sq)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    is_obj = np.all(img == S.COLORS["orange"], axis=-1)
    assert is_obj.sum() == 24 * 24 and is_obj[20:44, 20:44].all()
    assert np.all(img[0, 0] == S.BACKGROUNDS["white"])
    # Circle and triangle cover pi/4 and 1/2 of their box (antialiased: count partial pixels by coverage).
    # PIL fills outline pixels inclusively, about half a supersampled pixel along the perimeter: +1 %.
    for shape, ratio in (("circle", np.pi / 4), ("triangle", 0.5)):
        sc = _scene((shape, "blue", "large", 0.5, 0.5, 0.375), background="black", position="center")
        img = S.render(sc, 128).astype(float)
        bg, fg = np.array(S.BACKGROUNDS["black"]), np.array(S.COLORS["blue"])
        coverage = ((img - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
        assert 0 <= coverage.sum() / 48**2 / ratio - 1 <= 0.015


def test_write_dataset_is_an_imagefolder(tmp_path):
    from PIL import Image

    folder = S.write_dataset(tmp_path / "ds", 6, seed=2, split="heldout", size=32)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    scenes = S.sample_scenes(6, seed=2, split="heldout")
    assert [r["text"] for r in rows] == [S.caption(s) for s in scenes]
    for row, scene in zip(rows, scenes, strict=True):
        assert S.scene_from_dict(row["scene"]) == scene
        assert np.array_equal(np.asarray(Image.open(folder / row["file_name"])), S.render(scene, 32))


def test_bad_values_raise_with_choices():
    with pytest.raises(ValueError, match="unknown color 'pink'.*red"):
        S.ObjectSpec("circle", "pink", "small", 0.5, 0.5, 0.2)
    with pytest.raises(ValueError, match="unknown split"):
        S.scene_at(0, split="test")
    with pytest.raises(ValueError, match="one or two objects"):
        S.Scene((), "gray")
    with pytest.raises(ValueError, match="position"):
        _scene(("circle", "red", "small", 0.5, 0.5, 0.2))


@pytest.mark.parametrize("share", [0.0, 0.3, 0.75, 1.0])
def test_two_object_share_is_exact_and_spread_evenly(share):
    counts = S.object_counts(400, share)
    for n in (40, 400):  # every prefix holds the share to within one scene
        assert abs(sum(k == 2 for k in counts[:n]) - share * n) <= 1
    scenes = S.sample_scenes(400, split="train", two_object_share=share)
    assert [len(s.objects) for s in scenes] == counts
    assert not any(S.is_heldout(s) for s in scenes)  # the training split stays free of held-out pairs
    held = S.sample_scenes(50, split="heldout", two_object_share=share)
    assert all(S.is_heldout(s) for s in held) and [len(s.objects) for s in held] == counts[:50]


def test_fixed_object_counts_leave_the_default_stream_alone():
    default = S.sample_scenes(30, seed=1, split="train")
    mixed = S.sample_scenes(30, seed=1, split="train", two_object_share=0.75)
    assert S.sample_scenes(30, seed=1, split="train") == default  # asking for counts changes nothing else
    counts = S.object_counts(30, 0.75)
    for i in (4, 5):  # indexable, like the default stream
        assert S.scene_at(i, seed=1, split="train", objects=counts[i]) == mixed[i]
    assert sum(a == b for a, b in zip(default, mixed, strict=True)) == 0  # a stream of its own
    for k in (1, 2):  # every form of a k-object caption is still drawn
        scenes = S.sample_scenes(300, split="all", two_object_share=k - 1.0)
        assert {len(s.objects) for s in scenes} == {k}
        if k == 1:
            assert {s.position for s in scenes} == set(S.POSITIONS)
        else:
            assert {(s.relation, s.phrasing) for s in scenes} == {
                (r, p) for r in S.RELATIONS for p in S.PHRASINGS
            }


def test_two_object_share_bad_values_say_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match=r"two_object_share must lie in \[0, 1\], got 1.5"):
        S.sample_scenes(3, two_object_share=1.5)
    with pytest.raises(ValueError, match="objects must be 1, 2 or None"):
        S.scene_at(0, objects=3)
    folder = S.write_dataset(tmp_path / "ds", 8, split="train", size=16, two_object_share=0.5)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [len(r["scene"]["objects"]) for r in rows] == S.object_counts(8, 0.5)
