"""The captioned-shapes evaluator: caption parsing, accuracy on true, shuffled, noisy and blurred images."""

import json

import numpy as np
import pytest

from mmdit_flow.training.recipes.tiny_shapes import evaluator as E
from mmdit_flow.training.recipes.tiny_shapes import shapes as S


@pytest.fixture(scope="module")
def scenes():
    return S.sample_scenes(300, seed=1, split="all")


@pytest.fixture(scope="module")
def images(scenes):
    return [S.render(s) for s in scenes]


@pytest.fixture(scope="module")
def chance(scenes):
    return E.chance_level(scenes)


def _every_form():
    a = S.ObjectSpec("circle", "red", "large", 0.3, 0.3, 0.38)
    b = S.ObjectSpec("triangle", "cyan", "small", 0.7, 0.7, 0.2)
    for show in (True, False):
        for p in S.POSITIONS:
            yield S.Scene((a,), "white", position=p, show_background=show)
        for r in S.RELATIONS:
            for ph in S.PHRASINGS:
                yield S.Scene((a, b), "black", relation=r, phrasing=ph, show_background=show)


def test_parse_inverts_caption_for_every_grammar_form():
    forms = list(_every_form())
    assert len(forms) == 2 * (5 + 4 * 2)
    for scene in forms:
        claim = E.parse_caption(S.caption(scene))
        objs = tuple(E.ObjectClaim(o.shape, o.color, o.size) for o in scene.objects)
        bg = scene.background if scene.show_background else None
        assert claim == E.Claim(objs, scene.position, scene.relation, bg), S.caption(scene)
    # Case, spacing and a final full stop do not matter.
    assert E.parse_caption("A Large RED circle   on the left.") == E.parse_caption(
        "a large red circle on the left"
    )


@pytest.mark.parametrize(
    ("caption", "message"),
    [
        ("a large red dog on the left", "unknown word.*'dog'"),
        ("a red circle on the left", "expected a size"),
        ("a large red circle", "expected a place"),
        ("a large red circle on the left and a small blue square on the left", "opposite"),
        ("a large red circle on the left on a red background", "background colour"),
        ("a large red circle on the left on a gray background above", "end of the caption"),
    ],
)
def test_parse_rejects_off_grammar_captions(caption, message):
    with pytest.raises(ValueError, match=message):
        E.parse_caption(caption)


def test_analysis_recovers_geometry():
    scene = S.Scene(
        (
            S.ObjectSpec("square", "purple", "large", 0.3, 0.5, 0.38),
            S.ObjectSpec("triangle", "orange", "large", 0.75, 0.4, 0.38),
        ),
        "white",
        relation="left of",
    )
    a = E.analyze(S.render(scene))
    assert a.background == "white" and len(a.detections) == 2
    for det, obj in zip(a.detections, scene.objects, strict=True):  # sorted largest first
        assert (det.shape, det.color, det.size) == (obj.shape, obj.color, obj.size)
        assert abs(det.x - obj.x) * 64 <= 1 and abs(det.y - obj.y) * 64 <= 1
        assert abs(det.extent - obj.extent) * 64 <= 1.5
    assert a.detections[0].fill == pytest.approx(1.0, abs=0.03)  # square fills its box
    assert a.detections[0].diag == pytest.approx(2**0.5, abs=0.1)  # square: diagonal extent sqrt(2) x side
    assert a.detections[1].drop == pytest.approx(1 / 6, abs=0.04)  # triangle centroid h/6 below box centre
    assert a.detections[1].taper == pytest.approx(1 / 3, abs=0.06)  # triangle width at 1/4 vs 3/4 height


def test_own_images_score_at_least_99_percent(scenes, images):
    assert sum(len(s.objects) == 2 for s in scenes) > 100
    result = E.evaluate(images, [S.caption(s) for s in scenes])
    assert set(result.per_attribute) == set(E.ATTRIBUTES)
    assert result.overall >= 0.99 and result.all_correct >= 0.97
    assert min(result.per_attribute.values()) >= 0.98, result.per_attribute
    # Inputs as PIL images or floats in [0, 1] give the same answer.
    from PIL import Image

    few = [S.caption(s) for s in scenes[:10]]
    as_pil = E.evaluate([Image.fromarray(im) for im in images[:10]], few)
    as_float = E.evaluate([im / 255.0 for im in images[:10]], few)
    assert as_pil.per_image == as_float.per_image == E.evaluate(images[:10], few).per_image


def test_chance_level_matches_closed_forms(chance):
    # Perfect perception against an unrelated caption: colour 1/7, shape 1/3, size 1/2, background 1/3,
    # count 1/2 (one or two objects, equally likely); sampling error of 300 scenes is about +-0.03.
    expect = {"color": 1 / 7, "shape": 1 / 3, "size": 1 / 2, "background": 1 / 3, "count": 1 / 2}
    for name, p in expect.items():
        assert abs(chance.per_attribute[name] - p) < 0.06, (name, chance.per_attribute[name])
    assert 0.25 < chance.overall < 0.40 and chance.all_correct < 0.01


def test_shuffled_captions_score_at_chance(scenes, images, chance):
    captions = [S.caption(s) for s in scenes]
    result = E.evaluate(images, captions[7:] + captions[:7])
    assert abs(result.overall - chance.overall) < 0.03, (result.overall, chance.overall)
    assert result.all_correct < 0.01


def test_noise_scores_at_or_below_chance(scenes, chance):
    rng = np.random.default_rng(0)
    captions = [S.caption(s) for s in scenes]
    # White noise: no objects at all, only the background can be right (mid-gray: 1/3 of backgrounds).
    white = E.evaluate([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in scenes], captions)
    assert white.overall <= chance.overall and white.all_correct == 0
    assert white.per_attribute["count"] == 0
    # Smooth noise makes blobs: they score like an unrelated caption, not better.
    from scipy import ndimage

    blobs = [np.clip(128 + 200 * ndimage.gaussian_filter(rng.normal(size=(64, 64, 3)), (2, 2, 0)), 0, 255)
             for _ in scenes]  # fmt: skip
    smooth = E.evaluate([b.astype(np.uint8) for b in blobs], captions)
    assert abs(smooth.overall - chance.overall) < 0.05 and smooth.all_correct == 0


def test_robust_to_mild_blur_and_noise(scenes, images):
    from scipy import ndimage

    rng = np.random.default_rng(1)
    degraded = [
        np.clip(
            ndimage.gaussian_filter(im.astype(float), (1.0, 1.0, 0)) + rng.normal(0, 10, im.shape), 0, 255
        )
        for im in images
    ]
    result = E.evaluate([d.astype(np.uint8) for d in degraded], [S.caption(s) for s in scenes])
    assert result.overall >= 0.98 and result.all_correct >= 0.9, result.per_attribute


def test_scoring_counts_missing_and_extra_objects():
    claim = E.parse_caption("a large red circle to the left of a small blue square on a gray background")
    red = E.Detection("circle", "red", "large", 0.25, 0.5, 0.38)
    blue = E.Detection("square", "blue", "small", 0.75, 0.5, 0.2)
    speck = E.Detection("circle", "green", "small", 0.5, 0.1, 0.05)
    checks = E.score(claim, E.Analysis("gray", (128.0,) * 3, (blue, red, speck)))  # order does not matter
    assert checks == {"shape": [True, True], "color": [True, True], "size": [True, True], "relation": [True],
                      "count": [False], "background": [True]}  # fmt: skip
    checks = E.score(claim, E.Analysis("black", (20.0,) * 3, (red,)))  # the square is missing
    assert (
        checks["shape"] == [True, False] and checks["relation"] == [False] and checks["background"] == [False]
    )
    result = E.summarize([checks])
    assert claim.n_checks == 9 and result.overall == pytest.approx(3 / 9) and result.all_correct == 0


def test_evaluate_rejects_bad_input():
    with pytest.raises(ValueError, match="one caption per image"):
        E.evaluate([np.zeros((8, 8, 3), np.uint8)], [])
    with pytest.raises(ValueError, match=r"RGB image \[H, W, 3\]"):
        E.analyze(np.zeros((8, 8), np.uint8))


def test_eval_command(tmp_path, capsys):
    from mmdit_flow.pipelines.cli import main

    folder = S.write_dataset(tmp_path / "ds", 12, seed=5, split="heldout")
    assert main(["eval", str(folder), "--json", str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["n_images"] == 12 and out["overall"] == 1.0 and len(out["files"]) == 12
    assert "overall" in capsys.readouterr().out
    # Captions elsewhere, one of them wrong: the colour check fails for that image only.
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    claim = E.parse_caption(rows[0]["text"])
    other = next(c for c in S.COLORS if c != claim.objects[0].color)
    rows[0]["text"] = rows[0]["text"].replace(f" {claim.objects[0].color} ", f" {other} ", 1)
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert (
        main(
            [
                "eval",
                str(folder),
                "--captions",
                str(tmp_path / "caps.jsonl"),
                "--json",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    out = json.loads((tmp_path / "s.json").read_text())
    assert out["all_correct"] == pytest.approx(11 / 12) and out["per_image"][0]["color"][0] is False
    assert main(["eval", str(tmp_path / "missing")]) == 2


def test_bootstrap_difference(scenes, images):
    """Same results: 0 with a zero-width interval; truth vs mismatched captions: the exact gap, interval
    around it and clear of 0; unpaired inputs are refused."""
    captions = [S.caption(s) for s in scenes]
    true = E.evaluate(images, captions)
    assert E.bootstrap_difference(true, true) == (0.0, 0.0, 0.0)
    shuffled = E.evaluate(images, captions[1:] + captions[:1])
    diff, low, high = E.bootstrap_difference(true, shuffled)
    assert diff == pytest.approx(true.overall - shuffled.overall, abs=1e-12)
    assert 0 < low < diff < high
    assert high - low < 0.2  # 300 images pin a gap of ~0.6 down to a few points
    with pytest.raises(ValueError, match="paired results needed"):
        E.bootstrap_difference(true, E.summarize(shuffled.per_image[:10]))
