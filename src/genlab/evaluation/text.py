"""CLIP models as judges: zero-shot accuracy, retrieval, CLIP score and R-precision of captioned images.

A CLIP judge is a ``clip`` run folder or a shipped evaluator (``src/genlab/evaluators/clip-<data>.*``:
weights + a JSON card with the training command, data, accuracy and sha256), found by name or by
the data source it was trained on. :func:`score_captions` is what ``genlab eval`` uses for
text-conditioned runs and for ``.npz`` files with a ``captions`` array; every result carries a
protocol naming the judge, so numbers are only compared under the same one.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from genlab.data import ImageSet
from genlab.errors import ConfigError, DataError, GenlabError
from genlab.metrics.clip_score import HESSEL_W, clip_score, duplicate_ceiling, r_precision, recall_at_k
from genlab.fileio import sha256_file
from genlab.metrics.extractors import _evaluators_dir as shipped_evaluators_dir
from genlab.models.clip import CLIP, clip_evaluator_card, clip_evaluator_choices, load_clip_card, load_clip_evaluator

# Data source -> the shipped CLIP evaluator trained on it (or on the same images).
EVALUATOR_FOR_SOURCE = {
    "mnist-captions": "clip-mnist-captions", "mnist": "clip-mnist-captions", "mnist5k": "clip-mnist-captions",
    "fashion-mnist-captions": "clip-fashion-mnist-captions", "fashion-mnist": "clip-fashion-mnist-captions",
    "mnist-pairs": "clip-mnist-pairs",
}


def load_clip(judge: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CLIP, str]:
    """(CLIP model in eval mode, its name for protocols) from a run folder, an evaluator name or a data source name."""
    path = Path(judge)
    if path.is_dir() and (path / "config.yaml").is_file():
        from genlab.runs import load_run

        run = load_run(path, device=str(device))
        if run.config.method != "clip":
            raise ConfigError(f"{path} is a '{run.config.method}' run; a CLIP judge must be a 'clip' run or a shipped evaluator")
        return run.method.clip.eval(), f"run:{path}@{run.step}"
    name = EVALUATOR_FOR_SOURCE.get(str(judge), str(judge))
    if clip_evaluator_card(name) is None:
        raise ConfigError(f"no CLIP judge {str(judge)!r}: give a clip run folder, {clip_evaluator_choices()}")
    return load_clip_evaluator(name, device)


def class_words(class_names: Sequence[str]) -> list[list[str]]:
    """Words for each class in the captions' vocabulary (synonyms included, for prompt ensembles)."""
    from genlab.data.captions import DIGIT_WORDS, FASHION_WORDS

    out = []
    for name in class_names:
        if name.isdigit() and int(name) < 10:
            out.append([name, DIGIT_WORDS[int(name)]])
        else:
            out.append(list(FASHION_WORDS.get(name, [name.lower()])))
    return out


def zero_shot(clip: CLIP, data: ImageSet, prompts: Sequence[str]) -> dict:
    """Zero-shot accuracy of classifying ``data`` by its most similar class prompt (ensembled over prompts)."""
    from genlab.methods.clip import class_embeddings, embed_images, zero_shot_predict

    if data.labels is None or not data.class_names:
        raise DataError(f"{data.source}:{data.split} has no class labels; zero-shot accuracy needs a labelled split")
    classes = class_embeddings(clip, class_words(data.class_names), prompts)  # (K, E)
    predicted = zero_shot_predict(embed_images(clip, data.images), classes)  # (N,)
    correct = predicted == data.labels
    per_class = {name: float(correct[data.labels == k].float().mean()) for k, name in enumerate(data.class_names) if (data.labels == k).any()}
    return {"zero_shot_accuracy": float(correct.float().mean()), "per_class": per_class, "n": len(data), "prompts": list(prompts)}


def first_captions(data: ImageSet) -> list[str]:
    """The first caption of each image (the held-out text of a pair)."""
    if data.captions is None:
        raise DataError(f"{data.source}:{data.split} has no captions; use a captioned source (mnist-captions, mnist-pairs, ...)")
    return [caps[0] for caps in data.captions]


def content_keys(data: ImageSet) -> torch.Tensor | None:
    """What each image's captions say, as one integer per image, where the data records it (mnist-pairs), else None."""
    from genlab.data.captions import pair_content_keys

    attributes = data.attributes or {}
    if "classes" in attributes and "arrangement" in attributes:
        return pair_content_keys(attributes)
    return None


def retrieve(clip: CLIP, data: ImageSet, gallery: int | None = 100, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Image->text and text->image recall@k on held-out pairs (image, its first caption), in galleries.

    Where the data records what the captions say (mnist-pairs: the two digits in order and their
    arrangement), it also gives content recall (``*_content_recall@k``: any image of the caption's
    content is a hit) and ``recall@1_ceiling``, the instance recall@1 a perfect model reaches by
    chance among duplicates: a mnist-pairs caption has 200 possible contents, so a gallery of 100
    often holds two images that fit it equally.
    """
    from genlab.methods.clip import embed_images, embed_texts

    image_emb, text_emb = embed_images(clip, data.images), embed_texts(clip, first_captions(data))
    result = recall_at_k(image_emb, text_emb, ks, gallery)
    keys = content_keys(data)
    if keys is not None:
        content = recall_at_k(image_emb, text_emb, ks, gallery, keys=keys)
        result.update({k.replace("_recall@", "_content_recall@"): v for k, v in content.items()})
        result["recall@1_ceiling"] = duplicate_ceiling(keys, gallery or len(data))
    return {**result, "n": len(data), "gallery": gallery or len(data)}


def score_captions(
    images_u8: torch.Tensor, captions: Sequence[str], judge: str | os.PathLike, distractors: int = 99, seed: int = 0
) -> tuple[dict[str, float], dict]:
    """CLIP score (w = 2.5 and x100) and R-precision of images (uint8 (N, C, H, W)) against their captions.

    Returns (metrics, protocol); the protocol names the judge, the conventions and the distractors.
    """
    from genlab.methods.clip import embed_images, embed_texts

    if len(images_u8) != len(captions):
        raise DataError(f"CLIP score needs one caption per image, got {len(images_u8)} images and {len(captions)} captions")
    clip, name = load_clip(judge)
    image_emb, text_emb = embed_images(clip, images_u8), embed_texts(clip, captions)
    metrics = {
        "clip_score": float(clip_score(image_emb, text_emb, HESSEL_W)),
        "clip_score_x100": float(clip_score(image_emb, text_emb, 100.0)),
    }
    if len(captions) > distractors:
        metrics["r_precision"] = float(r_precision(image_emb, text_emb, distractors, torch.Generator().manual_seed(seed)))
    protocol = {
        "clip_judge": name,
        "clip_score": f"mean of w * max(cos, 0), w = {HESSEL_W} (Hessel et al. 2021); clip_score_x100: w = 100 (torchmetrics CLIPScore)",
        "r_precision": f"true caption ranked against {distractors} captions of other images (AttnGAN), seed {seed}",
        "n": len(captions),
    }
    return metrics, protocol


def export_clip_evaluator(run_dir: str | os.PathLike, name: str, data_root: str | None = None, training_command: str | None = None,
                          out_dir: str | os.PathLike | None = None, prompts: Sequence[str] = ("a photo of the digit {}",)) -> dict:
    """Write a ``clip`` run as evaluator ``<out_dir>/<name>.safetensors`` + ``<name>.json`` with its measured scores."""
    from safetensors.torch import save_file

    from genlab.runs import load_run
    from genlab.config import to_dict
    from genlab.data import DataConfig, load_data
    from genlab.train.checkpoint import latest_checkpoint, load_checkpoint

    run = load_run(run_dir, device="cpu")
    if run.config.method != "clip":
        raise ConfigError(f"{run_dir} is a '{run.config.method}' run; export_clip_evaluator needs a 'clip' run")
    clip = run.method.clip.eval()
    source = run.config.data.source
    root = data_root if data_root is not None else run.config.data.root
    test = load_data(DataConfig(source=source, split="test", root=root))
    scores = {"retrieval": retrieve(clip, test, gallery=100)}
    if test.labels is not None:
        scores["zero_shot"] = {k: v for k, v in zero_shot(clip, test, prompts).items() if k != "per_class"}
    out_dir = Path(out_dir) if out_dir is not None else shipped_evaluators_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    _, state = load_checkpoint(latest_checkpoint(Path(run_dir)), device="cpu")
    card = {
        "name": name,
        "architecture": "genlab.models.clip.CLIP",
        "config": to_dict(clip.config),
        "training_command": training_command or f"genlab train clip --preset {Path(run_dir) / 'config.yaml'}",
        "dataset": source,
        "test_split": f"{source}:test",
        "scores": scores,
        "sha256": sha256_file(weights),
        "weights": weights.name,
        "bytes": weights.stat().st_size,
        "parameters": sum(p.numel() for p in clip.parameters()),
        "train_steps": run.step,
        "train_seconds": round(float(state.get("elapsed_seconds", 0.0)), 1),
        "seed": run.config.train.seed,
        "ema": run.weights == "ema",
        "torch_version": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    # What the metrics load must be what was measured: reload the written files and re-check retrieval.
    reloaded, _ = load_clip_card(out_dir / f"{name}.json")
    again = retrieve(reloaded, test, gallery=100)
    if abs(again["text_to_image_recall@1"] - scores["retrieval"]["text_to_image_recall@1"]) > 1e-9:
        raise GenlabError(f"the exported evaluator {name} scores differently from its run; the export is inconsistent")
    return card


__all__ = ["EVALUATOR_FOR_SOURCE", "class_words", "export_clip_evaluator", "load_clip", "retrieve", "score_captions", "zero_shot"]
