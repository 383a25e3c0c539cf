"""Scoring of text-conditioned runs (issue 15; SPEC E4, M3): does the text control the image?

``genlab eval RUN`` on a run with a text encoder (``kind="text"``, chosen by ``auto``) measures:

- **caption samples**: one sample per held-out caption (the first caption of each image of the run's
  test split, e.g. ``mnist-captions:test``), scored against the reference split with the generation
  metrics (FID, KID, ... on the shipped evaluator's features) and with the shipped CLIP judge of the
  data: CLIP score (Hessel et al. 2021, w = 2.5; and x100) and R-precision (AttnGAN: the true caption
  against 99 others). docs/results.md has the ceiling (real pairs) and the floor (shuffled pairs).
- **class accuracy of class prompts**: ``per_prompt`` samples of "the digit K" for every K (Fashion:
  "a photo of a NAME"), classified by the shipped classifier evaluator of the data.
- **attribute control** (mnist-captions): "a thick NAME" vs "a thin NAME" for every digit, with the
  same noise for both (paired samples): the ratio of their mean ink (sum of pixel intensities) and of
  their mean stroke width; and "a handwritten K that is slanted left / right": the share of samples
  whose measured slant (:func:`genlab.data.captions.slant`) has the asked sign; and **free-form prompts**:
  the class accuracy of 50 paraphrases no caption template writes ("show me a seven", mnist_paraphrases.txt).
- **composition** (mnist-pairs): "the digit 3 is left of the digit 6" and the other spatial templates;
  each half of the canvas is classified, and a sample counts when both digits are right and on the
  asked sides (:func:`composition_scores`; real test canvases score the ceiling, see docs/results.md).

Each block's prompts, sample counts, sampler and guidance are recorded in the protocol.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from genlab.data import from_model_range
from genlab.errors import ConfigError
from genlab.evaluation.common import as_run, default_device, now, parse_ref, resolve_extractor, versions
from genlab.evaluation.generation import (
    KID_SUBSET_SIZE, KID_SUBSETS, classifier_accuracy, classifier_predictions, parse_metrics, sample_run, score_images,
)
from genlab.evaluation.reference import reference_stats
from genlab.evaluation.store import write_result

DEFAULT_TEXT_N = 1000  # caption samples when n is not given (R-precision needs more than 100)
DEFAULT_PER_PROMPT = 50  # samples of each class / attribute prompt

# Captioned source -> (its class-labelled base, the class prompt of class index k).
CLASS_PROMPTS: dict[str, tuple[str, Callable[[int, list[str]], str]]] = {
    "mnist-captions": ("mnist", lambda k, names: f"the digit {k}"),
    "fashion-mnist-captions": ("fashion-mnist", lambda k, names: f"a photo of a {_fashion_word(names[k])}"),
}


def _fashion_word(name: str) -> str:
    from genlab.data.captions import FASHION_WORDS

    return FASHION_WORDS.get(name, [name.lower()])[0]


def conditions_on_text_config(saved_model: dict | None) -> bool:
    """Whether a run's saved model config has a text encoder (read without building the run)."""
    return isinstance(saved_model, dict) and saved_model.get("text") is not None


def _samples_u8(run, prompts: Sequence[str], seed: int, batch_size: int, options: dict, progress: bool,
                log: Callable[[str], None] | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) samples of the prompts (8-bit as `genlab sample --out x.npz` stores them)."""
    images = sample_run(run, len(prompts), seed, batch_size, {**options, "prompts": list(prompts)}, progress=progress, log=log)
    return from_model_range(images)


def _attribute_control(run, seed: int, batch_size: int, options: dict, per_prompt: int, progress: bool
                       ) -> tuple[dict[str, float], dict[str, Any]]:
    """Thick / thin ink and stroke-width ratios, slant-sign accuracy of mnist-captions prompts (paired noise)."""
    from genlab.data.captions import DIGIT_WORDS, measure_mnist

    reps = max(1, per_prompt // 10)

    def measured(template: str) -> dict[str, torch.Tensor]:
        prompts = [template.format(name=DIGIT_WORDS[k], digit=k) for k in range(10) for _ in range(reps)]
        images = _samples_u8(run, prompts, seed, batch_size, options, progress)
        return {**measure_mnist(images), "ink": images.double().sum((1, 2, 3)) / 255.0}

    thick, thin = measured("a thick {name}"), measured("a thin {name}")
    left, right = measured("a handwritten {digit} that is slanted left"), measured("a handwritten {digit} that is slanted right")
    values = {
        "thick_thin_ink_ratio": float(thick["ink"].mean() / thin["ink"].mean().clamp(min=1e-12)),
        "thick_thin_stroke_width_ratio": float(thick["stroke_width"].double().mean() / thin["stroke_width"].double().mean()),
        "slant_sign_accuracy": float(torch.cat([left["shear"] < 0, right["shear"] > 0]).float().mean()),
    }
    protocol = {
        "thickness": f"'a thick NAME' vs 'a thin NAME', NAME = zero..nine, {reps} samples each, same seeds for both; "
                     "ink = sum of pixel intensities / 255, stroke width = 2 area / perimeter of the ink (>= 128)",
        "slant": f"'a handwritten K that is slanted left' / '... slanted right', K = 0..9, {reps} samples each; "
                 "correct when the measured shear (-mu11 / mu02 of the ink) is < 0 (left) / > 0 (right)",
    }
    return values, protocol


PARAPHRASES_FILE = Path(__file__).with_name("mnist_paraphrases.txt")


def mnist_paraphrases() -> list[tuple[int, str]]:
    """The fixed free-form prompts (class, prompt) of mnist-captions runs: no caption template writes them."""
    rows = [line.split("\t") for line in PARAPHRASES_FILE.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]
    return [(int(k), prompt) for k, prompt in rows]


def _paraphrase_accuracy(run, seed: int, batch_size: int, options: dict, per_prompt: int, progress: bool, classifier
                         ) -> tuple[dict[str, float], str]:
    """Class accuracy of samples of free-form prompts ("show me a seven") the captions never used."""
    paraphrases = mnist_paraphrases()
    reps = max(1, per_prompt // 5)
    labels = torch.tensor([k for k, _ in paraphrases]).repeat_interleave(reps)
    prompts = [p for _, p in paraphrases for _ in range(reps)]
    images = _samples_u8(run, prompts, seed, batch_size, options, progress)
    return {"paraphrase_accuracy": classifier_accuracy(classifier, images, labels, batch_size)}, (
        f"{len(paraphrases)} free-form prompts ({PARAPHRASES_FILE.name}, 5 per digit, none written by a caption template), "
        f"{reps} samples each, share the {classifier.name} evaluator assigns to the prompt's digit")


# The (first, second) digits of the composition prompts: every digit once in each place, never twice in a pair.
COMPOSITION_PAIRS = [(k, (k + 3) % 10) for k in range(10)]


def composition_scores(images_u8: torch.Tensor, classes: torch.Tensor, arrangement: torch.Tensor, classifier,
                       batch_size: int = 500) -> dict[str, float]:
    """How mnist-pairs canvases (N, 1, 56, 56) uint8 follow their asked digits (N, 2) and arrangement (N,).

    Each half of the canvas is classified (:func:`genlab.data.captions.split_pair`): ``composition_accuracy``
    is the share with both digits right and on the asked sides, ``swapped`` the share with two different
    asked digits on each other's sides.
    """
    from genlab.data.captions import split_pair

    first, second = split_pair(images_u8, arrangement)
    p1, p2 = classifier_predictions(classifier, first, batch_size), classifier_predictions(classifier, second, batch_size)
    a, b = classes[:, 0].cpu(), classes[:, 1].cpu()
    return {"composition_accuracy": float(((p1 == a) & (p2 == b)).double().mean()),
            "composition_first_digit": float((p1 == a).double().mean()),
            "composition_second_digit": float((p2 == b).double().mean()),
            "composition_swapped": float(((p1 == b) & (p2 == a) & (a != b)).double().mean())}


def composition_asks(per_prompt: int) -> tuple[list[str], torch.Tensor, torch.Tensor, list[tuple[int, int, int, int]], int]:
    """The composition block's spatial prompts: (prompts (N,), asked digits (N, 2), arrangement (N,), the 20 asks
    (first digit, second digit, arrangement, template), samples per ask). Each pair of COMPOSITION_PAIRS side by
    side and stacked, the templates in turn, per_prompt / 2 samples each."""
    from genlab.data.captions import HORIZONTAL, PAIR_TEMPLATES, VERTICAL, pair_caption

    asks = [(a, b, kind, i % len(PAIR_TEMPLATES[kind])) for i, (a, b) in enumerate(COMPOSITION_PAIRS)
            for kind in (HORIZONTAL, VERTICAL)]
    reps = max(1, per_prompt // 2)
    prompts = [pair_caption(a, b, kind, t) for a, b, kind, t in asks for _ in range(reps)]
    classes = torch.tensor([[a, b] for a, b, _, _ in asks]).repeat_interleave(reps, 0)
    arrangement = torch.tensor([kind for _, _, kind, _ in asks]).repeat_interleave(reps)
    return prompts, classes, arrangement, asks, reps


def _pair_composition(run, seed: int, batch_size: int, options: dict, per_prompt: int, progress: bool, classifier
                      ) -> tuple[dict[str, float], str]:
    """Samples of spatial prompts ("the digit 3 is left of the digit 6"), scored half by half."""
    prompts, classes, arrangement, asks, reps = composition_asks(per_prompt)
    images = _samples_u8(run, prompts, seed, batch_size, options, progress)
    return composition_scores(images, classes, arrangement, classifier, batch_size), (
        f"{len(asks)} spatial prompts (digits {COMPOSITION_PAIRS} side by side and stacked, the templates in turn, "
        f"e.g. '{prompts[0]}'), {reps} samples each; each half of the canvas (its ink re-centred in a 28x28 window) "
        f"classified by the {classifier.name} evaluator (sha256 {classifier.sha256[:12]}); correct when both digits "
        "are the asked ones on the asked sides")


def evaluate_text(
    target: str | os.PathLike,
    ref: str = "mnist:test",
    metrics: Sequence[str] | str = ("fid", "kid"),
    n: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    weights: str = "ema",
    extractor=None,
    data_root: str | os.PathLike | None = None,
    data: str | None = None,
    ref_n: int | None = None,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    json_path: str | os.PathLike | None = None,
    write: bool = True,
    progress: bool = False,
    sample_options: dict | None = None,
    log: Callable[[str], None] | None = None,
    per_prompt: int = DEFAULT_PER_PROMPT,
    judge: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score a text-conditioned run (see the module docstring); ``n`` caption samples (default 1000) from the
    held-out captions ``data`` (SOURCE:SPLIT, default the run's test split), ``per_prompt`` samples of each
    class / attribute prompt, ``judge`` the CLIP judge (default: the shipped one of the run's data)."""
    from genlab.evaluation.text import EVALUATOR_FOR_SOURCE, first_captions, score_captions
    from genlab.methods.capabilities import conditions_on_text
    from genlab.runs import heldout_images

    source, split = parse_ref(ref)
    if n is not None and n < 2:
        raise ConfigError(f"n must be at least 2 caption samples, got {n}")
    if per_prompt < 1:
        raise ConfigError(f"per_prompt must be at least 1 sample per prompt, got {per_prompt}")
    run = as_run(target, weights)
    if not conditions_on_text(run.method):
        raise ConfigError(f"{run.path}: a {run.config.method} run without a text encoder; text metrics need a text-conditioned "
                          "run (a model.text section, e.g. --preset text_small)")
    options = dict(sample_options or {})
    if any(options.get(k) is not None for k in ("prompt", "prompts", "labels")):
        raise ConfigError("genlab eval draws its prompts from held-out captions and class / attribute templates: "
                          "drop --prompt / --class (use genlab sample for your own prompts)")
    options.update({k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None})
    # "none": no image-distribution metrics (e.g. mnist-pairs canvases, which no shipped evaluator embeds)
    metrics = () if metrics in ("none", "", (), None) else parse_metrics(metrics)
    device = torch.device(device) if device is not None else default_device()
    run_source = run.config.data.source
    n = DEFAULT_TEXT_N if n is None else n
    held = heldout_images(run, data, n, None if data_root is None else str(data_root))
    captions = first_captions(held)[:n]
    if len(captions) < n:
        raise ConfigError(f"{held.source}:{held.split} holds {len(captions)} captions, fewer than n={n}; lower --n")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    if metrics:
        extractor = resolve_extractor(extractor, source, device)
        reference = reference_stats(source, split, extractor, data_root=data_root, n=ref_n, batch_size=batch_size,
                                    device=device, progress=progress)
    seconds["reference"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    images_u8 = _samples_u8(run, captions, seed, batch_size, options, progress, log)
    seconds["caption_samples"] = round(time.perf_counter() - clock, 3)
    values, stds = {}, {}
    if metrics:
        values, stds = score_images(images_u8, reference, extractor, metrics, seed=seed, batch_size=batch_size,
                                    device=device, progress=progress)
    judge = judge if judge is not None else EVALUATOR_FOR_SOURCE.get(run_source)
    if judge is not None:
        text_values, text_protocol = score_captions(images_u8, captions, judge, seed=seed)
        values.update(text_values)
    else:  # a folder of the user's: no shipped CLIP knows its captions
        text_protocol = f"no CLIP judge for {run_source}: pass judge=RUN (a clip run trained on these captions)"
    protocol: dict[str, Any] = {
        "kind": "text",
        "target": str(run.path),
        "method": run.config.method,
        "checkpoint_step": run.step,
        "weights": run.weights,
        "sampler": sampler or getattr(run.config.model, "sampler", None),
        "steps": steps if steps is not None else getattr(run.config.model, "sample_steps", None),
        "guidance_scale": options.get("guidance_scale"),
        "negative_prompt": options.get("negative_prompt"),
        "seed": seed,
        "captions": f"first caption of the first {n} images of {held.source}:{held.split}, one sample each",
        "n": n,
        "image_shape": list(images_u8.shape[1:]),
        **({"reference": f"{source}:{split}", "reference_n": reference.n, "extractor": extractor.name,
            "extractor_sha256": extractor.sha256, "kid_subsets": KID_SUBSETS,
            "kid_subset_size": min(KID_SUBSET_SIZE, reference.n, n)} if metrics else {"metrics": "none"}),
        "text": text_protocol,
    }
    if run_source in CLASS_PROMPTS:
        base, prompt_of = CLASS_PROMPTS[run_source]
        names = list(held.class_names or [])
        classifier = resolve_extractor(None, base, device)
        labels = torch.arange(len(names)).repeat_interleave(per_prompt)
        prompts = [prompt_of(int(k), names) for k in labels]
        clock = time.perf_counter()
        class_images = _samples_u8(run, prompts, seed, batch_size, options, progress)
        seconds["class_samples"] = round(time.perf_counter() - clock, 3)
        values["class_accuracy"] = classifier_accuracy(classifier, class_images, labels, batch_size=batch_size)
        protocol["class_accuracy"] = (f"{per_prompt} samples of each of the {len(names)} prompts "
                                      f"'{prompt_of(0, names)}' ... '{prompt_of(len(names) - 1, names)}', share the "
                                      f"{classifier.name} evaluator (sha256 {classifier.sha256[:12]}) assigns to the asked class")
    if run_source == "mnist-captions":
        clock = time.perf_counter()  # `classifier`: the mnist evaluator of the class-prompt block above
        paraphrase_values, protocol["paraphrases"] = _paraphrase_accuracy(
            run, seed, batch_size, options, per_prompt, progress, classifier)
        values.update(paraphrase_values)
        seconds["paraphrase_samples"] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()
        attribute_values, attribute_protocol = _attribute_control(run, seed, batch_size, options, per_prompt, progress)
        seconds["attribute_samples"] = round(time.perf_counter() - clock, 3)
        values.update(attribute_values)
        protocol["attributes"] = attribute_protocol
    if run_source == "mnist-pairs":
        clock = time.perf_counter()
        composition_values, protocol["composition"] = _pair_composition(
            run, seed, batch_size, options, per_prompt, progress, resolve_extractor(None, "mnist", device))
        values.update(composition_values)
        seconds["composition_samples"] = round(time.perf_counter() - clock, 3)
    protocol.update({**versions(), "date": now(), "seconds": seconds})
    return write_result({"metrics": values, "std": stds, "protocol": protocol}, Path(run.path), json_path, write)


__all__ = ["CLASS_PROMPTS", "COMPOSITION_PAIRS", "DEFAULT_TEXT_N", "DEFAULT_PER_PROMPT", "composition_scores", "conditions_on_text_config",
           "evaluate_text", "mnist_paraphrases"]
