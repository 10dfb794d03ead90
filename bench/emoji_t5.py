"""Does the tiny-emoji T5 keep a name's identity under phrasings it never saw? A random T5 against the
T5 trained as a caption tagger (``tiny_emoji.tagger``), on the same tokenizers.

For every third emoji, the mean-pooled T5 output of a caption in a new phrasing ("a small picture of a cat",
validation; "a drawing of a cat", held out) retrieves the nearest of the same emoji set's training-phrasing
captions ("a cat"); reported: the share that retrieve their own emoji. The tagger is trained here (about 12
minutes on one thread) with the recipe's TaggerConfig.

    python bench/emoji_t5.py --components PARTS     # PARTS: a components folder (its tokenizer_3)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--components", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tagger-steps", type=int, default=None)
    args = parser.parse_args()

    import torch
    from transformers import T5TokenizerFast

    from mmdit_flow.training.recipes.tiny_emoji import emoji_set as E
    from mmdit_flow.training.recipes.tiny_emoji import tagger
    from mmdit_flow.training.recipes.tiny_shapes import components as shapes_components

    torch.set_num_threads(1)
    tok = T5TokenizerFast.from_pretrained(args.components / "tokenizer_3")
    random_t5 = shapes_components._t5_encoder(tok, shapes_components.T5, args.seed + 2).eval()
    tagged = shapes_components._t5_encoder(tok, shapes_components.T5, args.seed + 2)
    cfg = tagger.TaggerConfig(seed=args.seed)
    if args.tagger_steps:
        cfg = tagger.TaggerConfig(seed=args.seed, steps=args.tagger_steps)
    result = tagger.train_tagger(tagged, tok, cfg)
    print(f"tagger: {cfg.steps} steps in {result.seconds:.0f} s; per-token tag accuracy {result.accuracy}")

    @torch.no_grad()
    def pooled(model, texts):
        enc = tok(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        h = model(enc.input_ids).last_hidden_state
        m = enc.attention_mask[..., None].float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    chosen = [e for e in E.catalogue()][::3]
    reference = [E.phrase(e.name) for e in chosen]
    print(f"\n| phrasing ({len(chosen)} emoji) | random T5 | tagger T5 |\n|---|---:|---:|")
    for split in ("validation", "heldout"):
        template = E.TEMPLATES[split][0]
        texts = [E.phrase(e.name, template) for e in chosen]
        row = []
        for model in (random_t5, tagged):
            sims = pooled(model, texts) @ pooled(model, reference).T
            row.append(float((sims.argmax(1) == torch.arange(len(chosen))).float().mean()))
        print(f"| {split}: {template.format(a='a', name='NAME')!r} | {row[0]:.1%} | {row[1]:.1%} |")


if __name__ == "__main__":
    main()
