"""Captioned emoji (tiny_emoji.emoji_set) and their judge (tiny_emoji.judge).

Tests that need the Noto Color Emoji font and Unicode's emoji-test.txt skip when they are absent
(``python -m mmdit_flow.training.recipes.tiny_emoji install`` installs both); nothing is downloaded here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmdit_flow.training.recipes.tiny_emoji import emoji_set as E

MISSING = E.available()
needs_font = pytest.mark.skipif(MISSING is not None, reason=f"emoji data absent: {MISSING}")


def test_cldr_names_become_caption_names():
    assert E.caption_name("flag: Japan") == "flag of japan"
    assert E.caption_name("keycap: 1") == "keycap 1"
    assert E.caption_name("A button (blood type)") == "a button blood type"
    assert E.caption_name("piñata") == "pinata"
    assert E.caption_name("family: man, woman, boy") == "family man woman boy"
    assert (
        E.phrase("apple", "a picture of {a} {name}", "orange")
        == "a picture of an apple on an orange background"
    )


def test_missing_font_names_the_package_and_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(E.FONT_ENV, str(tmp_path / "nope.ttf"))
    with pytest.raises(E.EmojiDataMissing, match=E.FONT_ENV):
        E.font_path()
    monkeypatch.delenv(E.FONT_ENV)
    monkeypatch.setattr(E, "FONT_PATHS", (str(tmp_path / "absent.ttf"),))
    with pytest.raises(E.EmojiDataMissing, match="apt-get install fonts-noto-color-emoji"):
        E.font_path()


def test_phrasings_of_the_splits_are_disjoint():
    train, val, held = (set(E.TEMPLATES[s]) for s in E.SPLITS)
    assert not (train & val) and not (train & held) and not (val & held)


@needs_font
def test_catalogue_has_one_picture_per_emoji_and_unique_names():
    cat = E.catalogue()
    assert 1800 < len(cat) < 2000
    assert not any(set(e.char) & {chr(int(t, 16)) for t in E.SKIN_TONES} for e in cat)
    names = [n for e in cat for n in e.names]
    assert len(names) == len(set(names))  # every caption names one emoji
    by = E.by_name()
    assert by["cat"].char == "\U0001f408" and by["cat face"].char == "\U0001f431"
    assert "cat" not in by["cat face"].aliases  # the alias is another emoji's name
    assert by["apple"].name == "red apple"  # an alias kept
    assert {e.category for e in cat} == set(E.GROUPS.values())


@needs_font
def test_samples_are_deterministic_and_render_what_they_say():
    a, b = E.sample_at(123, seed=3, split="heldout"), E.sample_at(123, seed=3, split="heldout")
    assert a == b and a != E.sample_at(123, seed=4, split="heldout")
    assert a.emoji == 123 % len(E.catalogue()) and a.template in E.TEMPLATES["heldout"]
    for i in range(40):
        s = E.sample_at(i * 47, seed=1)
        img = E.render(s).astype(int)
        bg = np.array(E.BACKGROUNDS[s.background])
        assert (img[0, 0] == bg).all() and (img[-1, -1] == bg).all()
        ys, xs = np.nonzero(np.abs(img - bg).max(2) > 8)
        side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        assert abs(side - s.extent * 64) <= 2.5  # the longer side is the sample's extent
        if (ys.max() - ys.min()) > 0.9 * side and (xs.max() - xs.min()) > 0.9 * side:  # a full-box picture
            assert abs((xs.min() + xs.max() + 1) / 2 - s.x * 64) <= 1.5
            assert abs((ys.min() + ys.max() + 1) / 2 - s.y * 64) <= 1.5
        text = E.caption(s)
        assert text.endswith(f"on {E.article(s.background)} {s.background} background") == s.show_background


@needs_font
def test_captions_parse_back_to_their_emoji():
    from mmdit_flow.training.recipes.tiny_emoji.judge import parse_caption

    for split in E.SPLITS:
        for i in range(0, 1870, 7):
            s = E.sample_at(i, split=split)
            assert parse_caption(E.caption(s)) == s.emoji, E.caption(s)
    assert parse_caption("A Red Apple.") == E.by_name()["red apple"].index
    with pytest.raises(ValueError, match="names no emoji"):
        parse_caption("a purple unicorn spaceship")


@needs_font
def test_identical_pictures_count_as_one_and_only_those():
    from mmdit_flow.training.recipes.tiny_emoji.judge import picture_classes

    same, by = picture_classes(), E.by_name()
    assert same[by["flag of france"].index] == same[by["flag of clipperton island"].index]
    assert same[by["flag of romania"].index] != same[by["flag of chad"].index]  # alike, not the same
    assert len(set(same.tolist())) > len(same) - 20


@needs_font
def test_judge_finds_fresh_renders_and_not_noise_or_shuffled_pairs():
    from mmdit_flow.training.recipes.tiny_emoji import judge

    rng = np.random.default_rng(0)
    picks = rng.choice(len(E.catalogue()), 300, replace=False)
    samples = [E.sample_at(int(i) + 7 * len(E.catalogue()), seed=5, split="validation") for i in picks]
    ranked = judge.retrieve([E.render(s) for s in samples])
    targets = [s.emoji for s in samples]
    right = judge.score(ranked, targets)
    assert right.top1 >= 0.99 and right.top5 >= 0.995
    shuffled = judge.score(ranked, list(np.roll(targets, 1)))
    assert shuffled.top1 <= 0.01
    noise = rng.integers(0, 256, (60, 64, 64, 3), dtype=np.uint8)
    assert judge.score(judge.retrieve(list(noise)), targets[:60]).top5 <= 0.05
    # captions in, the same answer out, per category too
    result = judge.evaluate([E.render(s) for s in samples[:50]], [E.caption(s) for s in samples[:50]])
    assert result.top1 == pytest.approx(np.mean([h for h, _ in right.hits[:50]]))
    assert sum(n for n, _, _ in result.per_category.values()) == 50


@needs_font
def test_eval_cli_scores_an_emoji_folder(tmp_path, capsys):
    from mmdit_flow.pipelines.cli import main

    E.write_dataset(tmp_path / "imgs", 12, split="heldout")
    assert (tmp_path / "imgs" / "LICENSE.txt").read_text().startswith("Pictures: Noto Color Emoji")
    assert main(["eval", str(tmp_path / "imgs"), "--task", "emoji", "--json", str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["n_images"] == 12 and out["top1"] == 1.0 and len(out["files"]) == 12
    assert "all" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "imgs")]) == 2
    assert "--task emoji" in capsys.readouterr().err


@needs_font
def test_committed_common_list_is_what_the_ranking_gives():
    pytest.importorskip("wordfreq", reason="the ranking needs wordfreq (pip install wordfreq)")
    from mmdit_flow.training.recipes.tiny_emoji import common

    committed = common.committed_common()
    assert [e.index for e in committed] == [e.index for e in common.common_emoji(300)]
    assert {e.category for e in committed} <= set(common.COMMON_CATEGORIES)
    names = {e.name for e in committed}
    assert {"cat", "dog", "pizza", "red apple", "rocket", "house"} <= names


@needs_font
def test_corpus_and_vocabulary_hold_every_name_and_no_held_out_word():
    from mmdit_flow.training.recipes.tiny_emoji import components, ship

    corpus = set(components.caption_corpus())
    for e in E.catalogue()[::37]:
        for name in e.names:
            assert {E.phrase(name, t) for t in E.TEMPLATES["train"]} <= corpus
    assert not any(
        text.startswith(("a drawing of", "an image showing", "a small picture of")) for text in corpus
    )
    vocab = set(ship.vocabulary())
    assert {"cat", "pizza", "rocket", "background", "emoji", "icon"} <= vocab
    assert {"drawing", "image"}.isdisjoint(vocab)


@needs_font
def test_written_defaults_are_what_the_pipeline_reads(tmp_path):
    from mmdit_flow.pipelines.defaults import FILE, ModelDefaults
    from mmdit_flow.training.recipes.tiny_emoji import ship

    ship.write_defaults(tmp_path, {"guidance": 3.0})
    data = json.loads((tmp_path / FILE).read_text())
    d = ModelDefaults.from_json(data, family="sd3", native_size=64, source=str(tmp_path / FILE))
    assert (d.steps, d.guidance, d.height, d.width) == (28, 3.0, 64, 64)
    assert d.unknown_words(["a drawing of a cat on a blue background"]) == ["drawing"]


@needs_font
@pytest.mark.slow  # 40-85 s; the recipe's T5 is random (docs/tiny-emoji.md)
def test_tagger_tags_every_caption_token_and_learns_the_pictures(tmp_path):
    import torch
    from transformers import T5TokenizerFast

    from mmdit_flow.training.recipes.tiny_emoji import components, judge, tagger
    from mmdit_flow.training.recipes.tiny_shapes import components as shapes_components
    from mmdit_flow.training.recipes.tiny_shapes import tokenizers

    folders = tokenizers.save_tokenizers(tmp_path, components.caption_corpus(), clip_length=32, t5_length=32)
    tok = T5TokenizerFast.from_pretrained(folders.t5)
    samples = E.samples(40, seed=0)
    ids, tags = tagger.token_tags(tok, samples, 32)
    pictures = judge.picture_classes()
    for i, s in enumerate(samples):
        n = len(tok(E.caption(s)).input_ids)  # the caption's tokens and its end token, then padding
        assert (tags["picture"][i, :n] == int(pictures[s.emoji])).all()
        assert (tags["picture"][i, n:] == tagger.IGNORE).all()
        bg = tagger.BACKGROUND_CLASSES.index(s.background) if s.show_background else 0
        assert (tags["background"][i, :n] == bg).all()
        assert torch.equal(tags["word"][i, :n], ids[i, :n])

    torch.manual_seed(0)
    model = shapes_components._t5_encoder(tok, shapes_components.T5, 2)
    heads = tagger._heads(model.config.d_model, model.config.vocab_size)
    before = tagger.tagging_accuracy(model, heads, ids, tags)["picture"]
    cfg = tagger.TaggerConfig(steps=60, batch_size=32, captions=40, lr=3e-3)
    result = tagger.train_tagger(model, tok, cfg, eval_captions=40)
    # the 40 training captions name 40 pictures out of 1870: chance is 0.05 %
    assert before < 0.05 and result.accuracy["train"]["picture"] > 0.5, (before, result.accuracy)


@needs_font
@pytest.mark.slow
def test_the_recipe_makes_a_folder_that_diffusers_loads_with_our_images(tmp_path, monkeypatch):
    """components -> prepare -> mmdit-flow cache -> train (a few steps) -> assemble, then both pipelines."""
    import subprocess
    import sys

    import torch
    from diffusers import StableDiffusion3Pipeline

    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.pipelines.cli import main as cli
    from mmdit_flow.training.recipes.tiny_emoji import components, ship

    monkeypatch.chdir(tmp_path)
    parts = tmp_path / "parts"
    components.build_text_encoders(parts, seed=0)
    vae = components.train_vae(parts, steps=4, eval_images=8)
    assert 0.0 <= vae["judge_top1"] <= 1.0 and vae["n_images"] == 8
    ship.prepare("runs/tiny-emoji", parts, images_per_emoji=1)
    over = ["schedule.max_steps=3", "model.compile=false", "output.checkpoint_every=3", "data.batch_size=4"]
    assert cli(["cache", str(ship.CONFIG)]) == 0
    done = subprocess.run([sys.executable, "-m", "mmdit_flow.training", str(ship.CONFIG), *over],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = ship.assemble(
        "runs/tiny-emoji/train", tmp_path / "tiny-emoji", components=parts, guidance=3.0
    ).parent
    assert (out / "LICENSE-emoji.txt").read_text().startswith("Pictures: Noto Color Emoji")
    ours = TextToImagePipeline.from_pretrained(out)
    assert (ours.defaults.guidance, ours.defaults.steps) == (3.0, 28)
    with pytest.warns(UserWarning, match="'drawing'"):
        mine = ours("a drawing of a cat", steps=2, seed=0, output="np", progress=False)
    ref = StableDiffusion3Pipeline.from_pretrained(out)
    theirs = ref(
        "a drawing of a cat", num_inference_steps=2, guidance_scale=3.0, height=64, width=64,
        max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="np",
    ).images  # fmt: skip
    assert np.abs(mine - theirs).max() <= 1e-3
