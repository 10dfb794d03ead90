"""The tiny-shapes demo model's components, in the formats real SD3 checkpoints use.

Everything is built offline from :mod:`~mmdit_flow.training.recipes.tiny_shapes.shapes` and a seed, into the
diffusers SD3 layout that ``weights/tiny-shapes/`` ships:

* ``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``: CLIP BPE (x2) and T5 sentencepiece tokenizers trained
  on the caption corpus (:mod:`~mmdit_flow.training.recipes.tiny_shapes.tokenizers`).
* ``text_encoder/``, ``text_encoder_2/``: tiny ``CLIPTextModelWithProjection`` in CLIP-L's and CLIP-G's
  shape (quick-GELU vs GELU, G twice as wide as L), **frozen random**; ``text_encoder_3/``: a tiny
  ``T5EncoderModel`` in T5 v1.1's shape (gated GELU, relative attention), **trained** on the caption corpus
  as a tagger (:mod:`~mmdit_flow.training.recipes.tiny_shapes.text_train`: every token learns which object it
  describes, what that object is and where), because a random T5's token outputs are context-free and the
  transformer sees the text tokens as a set (docs/tiny-shapes.md and docs/quality.md have the measurements).
* ``vae/``: a tiny ``AutoencoderKL`` with 16 latent channels and downsampling factor 4, trained by
  :mod:`~mmdit_flow.training.recipes.tiny_shapes.vae_train`.

The widths respect SD3's prompt layout: the two CLIPs' hidden states are concatenated (64 + 128 = 192) and
zero-padded to the T5 width (256), and the pooled vector is 64 + 128 = 192 wide, so the transformer needs
``joint_attention_dim = 256`` and ``pooled_projection_dim = 192`` (:data:`TRANSFORMER_TEXT_DIMS`).

One command builds it all (about 15 minutes on one thread, most of it the T5 tagger and the VAE)::

    python -m mmdit_flow.training.recipes.tiny_shapes components weights/tiny-shapes

A finished model folder is read back through the pipeline's loader (:func:`load_text_stack`), with its
slot-class limits and strict key checks.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmdit_flow.training.recipes.tiny_shapes import shapes, text_train, tokenizers, vae_train

logger = logging.getLogger(__name__)

# Tiny stand-ins for SD3's encoders: CLIP-L (768 wide, 12 layers, quick-GELU), CLIP-G (1280, 32 layers, GELU)
# and T5 v1.1 XXL (4096, gated GELU, 32 relative-position buckets). Vocabulary sizes come from the tokenizers.
CLIP_L = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "projection_dim": 64,
    "hidden_act": "quick_gelu",
}
CLIP_G = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "projection_dim": 128,
    "hidden_act": "gelu",
}
T5 = {
    "d_model": 256,
    "d_kv": 64,
    "d_ff": 512,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
}
# What the MMDiT must accept from these encoders (see the module docstring).
TRANSFORMER_TEXT_DIMS = {
    "joint_attention_dim": T5["d_model"],
    "pooled_projection_dim": CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
}
ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# Prompt length in tokens, for all three tokenizers (their model_max_length): the longest caption of the
# grammar is 21 CLIP / 20 T5 tokens. CLIP pads to it (not to 77), so the transformer attends over 32 + 32
# text tokens instead of 77 + 32, and the pipelines default to 32 T5 tokens, as the model was trained.
# The CLIP encoders keep 77 positions; being causal, their first 32 outputs are the same either way.
PROMPT_TOKENS = 32


# ------------------------------------------------------------------------------------------- text encoders


def _clip_encoder(tokenizer: Any, arch: dict, seed: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizers.CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def _t5_encoder(tokenizer: Any, arch: dict, seed: int) -> torch.nn.Module:
    """A random ``T5EncoderModel`` (the tagger's starting point)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **arch,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def trained_t5_encoder(
    tokenizer: Any, seed: int = 0, cfg: text_train.T5TrainConfig | None = None
) -> tuple[torch.nn.Module, text_train.TaggerResult]:
    """The recipe's T5: random from ``seed + 2``, then trained as a caption tagger (``cfg``, seeded with
    ``seed``; :mod:`mmdit_flow.training.recipes.tiny_shapes.text_train`)."""
    cfg = cfg or text_train.T5TrainConfig(seed=seed)
    model = _t5_encoder(tokenizer, T5, seed + 2)
    return model, text_train.train_t5_tagger(model, tokenizer, cfg)


def build_text_encoders(
    out_dir: str | Path,
    seed: int = 0,
    t5: text_train.T5TrainConfig | None = None,
    *,
    texts: Sequence[str] | None = None,
    prompt_tokens: int = PROMPT_TOKENS,
    train_t5: bool = True,
) -> dict[str, Any]:
    """Write the three tokenizers and the three text encoders into ``out_dir`` (SD3 layout).

    The CLIP encoders are random from ``seed`` and ``seed + 1``; the T5 is :func:`trained_t5_encoder`'s
    (``t5`` overrides its training config), so the folder is the same for the same seed on a machine
    with the same thread count. Returns the folder of each component by its SD3 name, and under ``"t5"``
    what the tagger's training measured
    (:class:`~mmdit_flow.training.recipes.tiny_shapes.text_train.TaggerResult`).

    Another recipe passes its own caption corpus (``texts``, for the tokenizers), the tokenizers' length
    (``prompt_tokens``) and ``train_t5=False`` (the tagger knows captioned shapes only): the T5 then stays
    random from ``seed + 2`` and ``"t5"`` is None.
    """
    from transformers import CLIPTokenizer, T5TokenizerFast

    out = Path(out_dir)
    folders = tokenizers.save_tokenizers(out, texts, clip_length=prompt_tokens, t5_length=prompt_tokens)
    tok_l = CLIPTokenizer.from_pretrained(folders.clip_l)
    tok_g = CLIPTokenizer.from_pretrained(folders.clip_g)
    tok_t5 = T5TokenizerFast.from_pretrained(folders.t5)
    if train_t5:
        t5_model, t5_result = trained_t5_encoder(tok_t5, seed, t5)
    else:
        t5_model, t5_result = _t5_encoder(tok_t5, T5, seed + 2), None
    models = (_clip_encoder(tok_l, CLIP_L, seed), _clip_encoder(tok_g, CLIP_G, seed + 1), t5_model)
    paths: dict[str, Any] = {
        "tokenizer": folders.clip_l,
        "tokenizer_2": folders.clip_g,
        "tokenizer_3": folders.t5,
    }
    for name, model in zip(ENCODER_FOLDERS, models, strict=True):
        model.save_pretrained(out / name, safe_serialization=True)
        paths[name] = out / name
    paths["t5"] = t5_result
    return paths


@dataclass
class TextStack:
    """The three tokenizers and encoders of a folder, as SD3's prompt encoding uses them."""

    tokenizers: tuple[Any, Any, Any]
    encoders: tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]


def load_text_stack(folder: str | Path) -> TextStack:
    """Load ``tokenizer*/`` and ``text_encoder*/`` of an SD3-layout folder with their transformers classes."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    f = Path(folder)
    toks = (
        CLIPTokenizer.from_pretrained(f / "tokenizer"),
        CLIPTokenizer.from_pretrained(f / "tokenizer_2"),
        T5TokenizerFast.from_pretrained(f / "tokenizer_3"),
    )
    encs = (
        CLIPTextModelWithProjection.from_pretrained(f / "text_encoder").eval(),
        CLIPTextModelWithProjection.from_pretrained(f / "text_encoder_2").eval(),
        T5EncoderModel.from_pretrained(f / "text_encoder_3").eval(),
    )
    return TextStack(toks, encs)


@dataclass
class TextFeatures:
    """Per-caption features of a :class:`TextStack`: ``pooled`` [N, 192] (CLIP-L ++ CLIP-G text_embeds),
    ``clip_tokens`` [N, K, 192] (penultimate hidden states, as SD3 takes them) and ``t5_tokens`` [N, K, 256],
    both cut to the first K positions (captions are shorter)."""

    pooled: np.ndarray
    clip_tokens: np.ndarray
    t5_tokens: np.ndarray


@torch.no_grad()
def text_features(stack: TextStack, captions: Sequence[str], positions: int = 24) -> TextFeatures:
    """Encode ``captions`` as SD3 does (padded to the tokenizers' lengths, no attention mask)."""
    (tok_l, tok_g, tok_t5), (enc_l, enc_g, enc_t5) = stack.tokenizers, stack.encoders
    captions = list(captions)

    def ids(tok: Any, length: int) -> torch.Tensor:
        return tok(
            captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids

    out_l = enc_l(ids(tok_l, tokenizers.CLIP_MAX_LENGTH), output_hidden_states=True)
    out_g = enc_g(ids(tok_g, tokenizers.CLIP_MAX_LENGTH), output_hidden_states=True)
    t5 = enc_t5(ids(tok_t5, positions))[0]
    clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)[:, :positions]
    pooled = torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1)
    return TextFeatures(pooled.numpy(), clip.numpy(), t5.numpy())


# ----------------------------------------------------------------------------------------------- linear probe


def caption_labels(scene: shapes.Scene) -> dict[str, str]:
    """The attributes a caption states, as categorical labels: each object's colour, shape and size
    ("none" for a missing second object), the layout (a position or a relation) and the background
    ("none" when the caption does not name it)."""
    objs = list(scene.objects) + [None] * (2 - len(scene.objects))
    labels = {}
    for i, obj in enumerate(objs):
        labels[f"color{i}"] = obj.color if obj else "none"
        labels[f"shape{i}"] = obj.shape if obj else "none"
        labels[f"size{i}"] = obj.size if obj else "none"
    labels["layout"] = scene.position or f"{scene.relation}/{scene.phrasing}"
    labels["background"] = scene.background if scene.show_background else "none"
    return labels


def bag_of_words(captions: Sequence[str]) -> np.ndarray:
    """Word counts [N, V] over the grammar's vocabulary: the order-free baseline."""
    vocab = {w: i for i, w in enumerate(shapes.caption_vocabulary())}
    out = np.zeros((len(captions), len(vocab)), dtype=np.float32)
    for n, text in enumerate(captions):
        for word in text.split():
            out[n, vocab[word]] += 1
    return out


def ridge_probe(x_train: np.ndarray, y_train: Sequence[str], x_test: np.ndarray, y_test: Sequence[str],
                alpha: float = 1e-3) -> float:  # fmt: skip
    """Accuracy of a linear classifier: ridge regression onto one-hot labels, prediction = argmax.

    Features are standardised on the training set; W = argmin |X W - Y|^2 + alpha * n * |W|^2, solved in
    the dual (X X^T + alpha * n * I)^-1 Y, since captions are fewer than features. Labels never seen in
    training count as errors.
    """
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    classes = sorted(set(y_train))
    onehot = np.eye(len(classes))[[classes.index(y) for y in y_train]]
    a = np.concatenate([a, np.ones((len(a), 1))], axis=1)  # bias column
    b = np.concatenate([b, np.ones((len(b), 1))], axis=1)
    n = len(a)
    dual = np.linalg.solve(a @ a.T + alpha * n * np.eye(n), onehot - onehot.mean(0))
    scores = b @ (a.T @ dual) + onehot.mean(0)
    pred = [classes[k] for k in scores.argmax(1)]
    return float(np.mean([p == y for p, y in zip(pred, y_test, strict=True)]))


def probe_text_features(folder: str | Path, n_train: int = 2000, n_test: int = 500, seed: int = 0) -> dict:
    """Linear-probe accuracy of each caption attribute from frozen features, on held-out captions.

    Probes are fitted on ``n_train`` training-split captions and scored on ``n_test`` held-out captions
    (whose colour-shape pairs never occur in training). Feature sets: the pooled vector, the CLIP token
    states, the T5 token states, and a bag of words as the order-free baseline. Returns
    ``{feature_set: {attribute: accuracy, ..., "mean": ...}}``.
    """
    stack = load_text_stack(folder)
    train = shapes.train_scenes(n_train, seed=seed)
    test = shapes.heldout_scenes(n_test, seed=seed)
    cap_train, cap_test = [shapes.caption(s) for s in train], [shapes.caption(s) for s in test]
    feats = {}
    for name, caps in (("train", cap_train), ("test", cap_test)):
        f = text_features(stack, caps)
        feats[name] = {
            "pooled": f.pooled,
            "clip_tokens": f.clip_tokens.reshape(len(caps), -1),  # [N, K, W] -> [N, K * W]
            "t5_tokens": f.t5_tokens.reshape(len(caps), -1),
            "bag_of_words": bag_of_words(caps),
        }
    lab_train = [caption_labels(s) for s in train]
    lab_test = [caption_labels(s) for s in test]
    results = {}
    for kind in feats["train"]:
        accs = {
            attr: ridge_probe(
                feats["train"][kind],
                [lab[attr] for lab in lab_train],
                feats["test"][kind],
                [lab[attr] for lab in lab_test],
            )  # fmt: skip
            for attr in lab_train[0]
        }
        accs["mean"] = float(np.mean(list(accs.values())))
        results[kind] = accs
    return results


# ----------------------------------------------------------------------------------------------- VAE


def evaluate_vae(vae: Any, n: int = 256, seed: int = 0) -> dict:
    """Reconstruct ``n`` held-out scenes through the posterior mean: PSNR (uint8 images, dB), the
    evaluator's accuracy on the reconstructions against their captions, and latent statistics after the
    config's normalisation (mean ~ 0 and std ~ 1 when shift / scale fit)."""
    from mmdit_flow.training.recipes.tiny_shapes import evaluator

    x = vae_train.shapes_batch(0, n, seed=seed, split="heldout")
    recon = vae_train.reconstruct(vae, x)
    captions = [shapes.caption(shapes.scene_at(i, seed=seed, split="heldout")) for i in range(n)]
    result = evaluator.evaluate(list(vae_train.to_uint8(recon)), captions)
    z = vae_train.encode_means(vae, x)
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    return {
        "psnr_db": vae_train.psnr(x, recon),
        "eval_overall": result.overall,
        "eval_all_correct": result.all_correct,
        "eval_per_attribute": result.per_attribute,
        "latent_mean": float(z.mean()),
        "latent_std": float(z.std()),
        "n_images": n,
    }


def train_vae(
    out_dir: str | Path,
    steps: int = vae_train.VAETrainConfig.steps,
    seed: int = 0,
    *,
    arch: vae_train.VAEArch | None = None,
    eval_images: int = 256,
    **train_kw: Any,
) -> dict:
    """Build, train and evaluate the tiny VAE and save it to ``out_dir/vae`` (diffusers, safetensors).

    ``arch`` defaults to :class:`~mmdit_flow.training.recipes.tiny_shapes.vae_train.VAEArch`; ``train_kw``
    overrides fields of
    :class:`~mmdit_flow.training.recipes.tiny_shapes.vae_train.VAETrainConfig` (batch_size, lr, ...).
    Returns the training metrics merged with :func:`evaluate_vae`'s.
    """
    cfg = vae_train.VAETrainConfig(steps=steps, seed=seed, **train_kw)
    vae = vae_train.build_vae(arch or vae_train.VAEArch(), seed=seed)
    metrics = vae_train.train_vae_model(vae, cfg).to_dict()
    metrics.update(evaluate_vae(vae, eval_images, seed=seed))
    vae.save_pretrained(Path(out_dir) / "vae", safe_serialization=True)
    return metrics


# ----------------------------------------------------------------------------------------------- command line


def build_components(
    out_dir: str | Path, *, seed: int = 0, vae_steps: int = vae_train.VAETrainConfig.steps, probe: bool = True
) -> dict:
    """The whole recipe minus the transformer: tokenizers, text encoders (the T5 trained; + their probe),
    the VAE."""
    report: dict[str, Any] = {"seed": seed}
    start = time.perf_counter()
    report["t5_tagger"] = build_text_encoders(out_dir, seed)["t5"].to_dict()
    report["text_encoders_s"] = time.perf_counter() - start
    if probe:
        start = time.perf_counter()
        report["probe"] = probe_text_features(out_dir, seed=seed)
        report["probe_s"] = time.perf_counter() - start
    report["vae"] = train_vae(out_dir, vae_steps, seed)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mmdit_flow.training.recipes.tiny_shapes",
        description="Build the tiny-shapes tokenizers, text encoders and VAE in the diffusers SD3 layout.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser(
        "components", help="tokenizers, text encoders (CLIPs random, T5 trained; + probe) and the trained VAE"
    )
    comp.add_argument("out_dir", type=Path)
    comp.add_argument("--seed", type=int, default=0)
    comp.add_argument("--vae-steps", type=int, default=vae_train.VAETrainConfig.steps)
    comp.add_argument("--no-probe", action="store_true", help="skip the text-feature linear probe")
    comp.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy CPU)")
    comp.add_argument("--report", type=Path, default=None, help="also write the measurements as JSON here")
    probe = sub.add_parser("probe", help="linear probe of the text encoders of an existing folder")
    probe.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "probe":
        report = probe_text_features(args.folder)
    else:
        torch.set_num_threads(args.threads)
        report = build_components(
            args.out_dir, seed=args.seed, vae_steps=args.vae_steps, probe=not args.no_probe
        )
        if args.report is not None:
            args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
