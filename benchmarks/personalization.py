"""Personalisation numbers (issue 16 items 4-5): Textual Inversion and DreamBooth on a digit the base has no word for.

Protocol: a text DDPM base trained on mnist-captions either WITHOUT one class (``data.classes``: the base
never drew it) or with every class but that one's captions never naming it (``data.unnamed_classes``: the
base drew it, as "a thick digit"), then a child trained on the first --images training images of that
class. The shipped MNIST evaluator judges samples:

- ``base``: what the base does before: the share of the concept in samples of prompts that name it ("a photo
  of a seven"), of "a sks digit", and of the general prompts "a digit", "a photo of a digit" and "a photo of"
  (the TI prompt without S*: the floor a TI number is compared with), and the class accuracy of "the digit K"
  for every other class K;
- ``ti``: textual-inversion (``--ti-steps``) -> the concept share of "a photo of S*" samples (target >= 80 %),
  and its floor: the same samples with v* at its initial value (before any step);
- ``ti-loss``: the base's diffusion loss on held-out concept images (mnist:test) under "a photo of S*" and
  under prompts of known words (same t and noise for every prompt): what the learned word explains;
- ``db-prior`` / ``db-plain``: dreambooth with / without the prior-preservation loss (``--db-steps``) ->
  subject fidelity (concept share of "a sks digit" samples) and language drift (class accuracy of
  "the digit K", K != concept, after vs before).

Each part trains its child in OUT/<name> (``--name``, default the part) if that folder is missing (so the parts
can run in parallel), samples, scores, and writes OUT/<name>.json; ``--part table`` prints the Markdown table of
every measured json in OUT. Variants of one part get their own ``--name``:

    python benchmarks/personalization.py --base BASE_RUN --out-dir OUT --part ti      # also base, db-prior, db-plain
    python benchmarks/personalization.py --base BASE_RUN --out-dir OUT --part ti --name ti-captions \
        --ti-caption-words seven,7 --guidance-scales 3,5,7.5
    python benchmarks/personalization.py --base BASE_RUN --out-dir OUT --part table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from genlab import api
from genlab.evaluation.generation import classifier_accuracy
from genlab.imageio import save_grid
from genlab.metrics.extractors import get_extractor

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PARTS = ("base", "ti", "ti-loss", "db-prior", "db-plain")
GENERAL_PROMPTS = ("a digit", "a photo of a digit", "a photo of")  # name no digit; the last is "a photo of S*" without S*


def to_u8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 (N, C, H, W), as `genlab sample --out x.npz` writes them."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def share(extractor, images: torch.Tensor, label: int) -> float:
    """The evaluator's share of images it assigns to class ``label``."""
    return classifier_accuracy(extractor, to_u8(images), torch.full((len(images),), label))


def sample(run, prompt: str, n: int, a) -> torch.Tensor:
    return run.sample(n, seed=a.seed, prompt=prompt, guidance_scale=a.guidance_scale, steps=a.sample_steps,
                      batch_size=100, **sampler_option(a))


def sampler_option(a) -> dict[str, str]:
    return {"sampler": a.sampler} if a.sampler else {}


def drift(run, extractor, a, out: Path, name: str) -> dict[str, float]:
    """Class accuracy of "the digit K" for every class K but the concept, the share of those samples taken for
    the concept, and one grid row per K."""
    others = [k for k in range(10) if k != a.concept]
    images = {k: sample(run, f"the digit {k}", a.n_drift, a) for k in others}
    save_grid(torch.cat([images[k][:10] for k in others]), out / f"{name}_digits.png", nrow=10, scale=2)
    per_class = {k: share(extractor, images[k], k) for k in others}
    concept = sum(share(extractor, images[k], a.concept) for k in others) / len(others)
    return {"drift_accuracy": sum(per_class.values()) / len(others), "drift_per_class": per_class,
            "drift_concept_share": concept}  # "the digit K" samples the evaluator calls the concept


def train_child(method: str, run_dir: Path, a, overrides: list[str]) -> float:
    """Train a child of the base on the concept images (unless run_dir exists); its training seconds (trainer clock)."""
    if not (run_dir / "config.yaml").is_file():
        api.train(method, data="mnist-captions", run_dir=run_dir, progress=False, overrides=[
            f"model.base={a.base}", f"data.classes=[{a.concept}]", f"data.limit={a.images}",
            f"train.batch_size={a.images}", "train.threads=1", "train.sample_n=16", *overrides])
    ends = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if '"kind": "end"' in line]
    return float(ends[-1]["values"]["elapsed_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="text ddpm run trained without the concept class, or with it unnamed")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--part", required=True, choices=(*PARTS, "table"))
    p.add_argument("--concept", type=int, default=7, help="the class the base never saw")
    p.add_argument("--images", type=int, default=10, help="concept images (the first of the class in mnist train)")
    p.add_argument("--ti-steps", type=int, default=400)
    p.add_argument("--ti-lr", type=float, default=5e-3)
    p.add_argument("--ti-vectors", type=int, default=4)
    p.add_argument("--ti-init", default="digit", help="the word whose embedding starts v* (null: the mean row)")
    p.add_argument("--ti-init-noise", type=float, default=0.0)
    p.add_argument("--ti-caption-words", default="", help="comma-separated words naming the concept in its captions "
                   "(e.g. seven,7): the images' captions with the placeholder join the templates")
    p.add_argument("--ti-run", default="ti", help="ti-loss: the --name of the ti part to score")
    p.add_argument("--guidance-scales", default="3", help="ti: comma-separated guidance scales to sample S* at")
    p.add_argument("--db-steps", type=int, default=200)
    p.add_argument("--db-lr", type=float, default=2e-4)
    p.add_argument("--class-images", type=int, default=100)
    p.add_argument("--prior-weight", type=float, default=1.0)
    p.add_argument("--class-prompt", default="a digit")
    p.add_argument("--name", help="the run folder and json of this part in OUT (default: the part)")
    p.add_argument("--n", type=int, default=100, help="samples per concept prompt")
    p.add_argument("--n-drift", type=int, default=30, help="samples per 'the digit K' prompt")
    p.add_argument("--n-heldout", type=int, default=500, help="held-out concept images (mnist:test) for ti-loss")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--sample-steps", type=int, default=25, help="sampler steps")
    p.add_argument("--sampler", help="the sampler of every measured sample (default: the run's own, ddim for the presets); "
                   "a measurement with another sampler writes OUT/<name>_<sampler><steps>.json beside the default one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    name = a.name or a.part
    result_name = f"{name}_{a.sampler}{a.sample_steps}" if a.sampler else name  # the json and grids of this measurement
    torch.set_num_threads(a.threads)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if a.part == "table":
        return print_table(out, a)
    extractor = get_extractor("mnist")
    start = time.perf_counter()
    result: dict = {"part": a.part, "concept": a.concept, "images": a.images, "n": a.n, "n_drift": a.n_drift,
                    "guidance_scale": a.guidance_scale, "sample_steps": a.sample_steps, "seed": a.seed,
                    "sampler": a.sampler or "the run's"}
    concept_word = WORDS[a.concept]
    if a.part == "base":
        run = api.load_run(a.base)
        for prompt in (f"a photo of a {concept_word}", f"the digit {a.concept}", "a sks digit", *GENERAL_PROMPTS):
            images = sample(run, prompt, a.n, a)
            result[f"share[{prompt}]"] = share(extractor, images, a.concept)
        result.update(drift(run, extractor, a, out, result_name))
    elif a.part == "ti":
        run_dir = out / name
        words = [w for w in a.ti_caption_words.split(",") if w]
        result.update(ti_vectors=a.ti_vectors, ti_steps=a.ti_steps, ti_lr=a.ti_lr, ti_init=a.ti_init, ti_caption_words=words)
        result["train_seconds"] = train_child("textual-inversion", run_dir, a, [
            f"train.steps={a.ti_steps}", f"train.lr={a.ti_lr}", "train.lr_schedule=constant", "train.warmup_steps=0",
            "train.ema_decay=0.99", f"model.num_vectors={a.ti_vectors}", f"model.init_word={a.ti_init}",
            f"model.init_noise={a.ti_init_noise}", f"model.caption_words=[{','.join(words)}]"])
        run = api.load_run(run_dir)
        run.method.save_embeddings(out / f"{name}_s_star.safetensors")
        vectors = run.method.embedding.vectors
        learned = vectors.detach().clone()
        # The floor each number is compared with: the same prompt, seed and scales with v* at its start (the init
        # word's embedding or the mean row, without init_noise), i.e. what the base draws before any TI step.
        run.method.config.init_noise = 0.0
        initial = run.method._initial_vectors(run.method.text_encoder)
        for key, v in (("share", learned), ("floor", initial)):
            with torch.no_grad():
                vectors.copy_(v)
            for w in [float(g) for g in a.guidance_scales.split(",")]:  # the concept share at each guidance scale
                images = run.sample(a.n, seed=a.seed, prompt="a photo of S*", guidance_scale=w, steps=a.sample_steps,
                                    batch_size=100, **sampler_option(a))
                save_grid(images[:50], out / f"{result_name}_{'samples' if key == 'share' else 'floor'}_w{w:g}.png", nrow=10,
                          scale=2)
                result[f"{key}[a photo of S*][w={w:g}]"] = share(extractor, images, a.concept)
                if w == a.guidance_scale:
                    result[f"{key}[a photo of S*]"] = result[f"{key}[a photo of S*][w={w:g}]"]
    elif a.part == "ti-loss":
        from genlab.data import load_data

        held = load_data(source="mnist", split="test", classes=(a.concept,), limit=a.n_heldout)
        run = api.load_run(out / a.ti_run)
        run.method.base.text_encoder._cache.clear()
        prompts = ["a photo of S*", f"a photo of a {concept_word}", f"the digit {a.concept}", "a photo of a digit", ""]
        result["heldout_n"] = len(held)
        for prompt in prompts:
            # the same t and noise for every prompt; an ldm base scores the images' latents
            result[f"heldout_loss[{prompt}]"] = run.method.base.heldout_loss(held.to_model_range(), prompt=prompt,
                                                                            batch_size=100)
    else:
        prior = a.part == "db-prior"
        run_dir = out / name
        result.update(db_steps=a.db_steps, db_lr=a.db_lr, prior_weight=a.prior_weight if prior else 0.0,
                      class_prompt=a.class_prompt if prior else None)
        result["train_seconds"] = train_child("dreambooth", run_dir, a, [
            f"train.steps={a.db_steps}", f"train.lr={a.db_lr}", "train.lr_schedule=constant", "train.warmup_steps=0",
            "train.ema_decay=null", f"model.prior_preservation={str(prior).lower()}", f"model.prior_weight={a.prior_weight}",
            f"model.class_prompt={a.class_prompt}", f"model.num_class_images={a.class_images}",
            f"model.class_guidance_scale={a.guidance_scale}", f"model.class_sample_steps={a.sample_steps}"])
        run = api.load_run(run_dir)
        images = sample(run, "a sks digit", a.n, a)
        save_grid(images[:50], out / f"{result_name}_samples.png", nrow=10, scale=2)
        result["fidelity"] = share(extractor, images, a.concept)
        result.update(drift(run, extractor, a, out, result_name))
    result["measure_seconds"] = time.perf_counter() - start
    (out / f"{result_name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def print_table(out: Path, a) -> None:
    """The Markdown rows of every part measured in OUT (one json per --name)."""
    r = {f.stem: json.loads(f.read_text()) for f in sorted(out.glob("*.json"))}
    word = WORDS[a.concept]
    print("| model | train s (trainer clock) | concept share of its prompt | 'the digit K' accuracy, K != concept "
          "| 'the digit K' samples taken for the concept |")
    print("|---|---|---|---|---|")
    for name, x in r.items():
        if x["part"] == "base":
            general = "".join(f", {x[f'share[{p}]']:.1%} ('{p}')" for p in GENERAL_PROMPTS if f"share[{p}]" in x)
            print(f"| {name} | - | {x['share[a sks digit]']:.1%} ('a sks digit'), "
                  f"{x[f'share[a photo of a {word}]']:.1%} ('a photo of a {word}'), "
                  f"{x[f'share[the digit {a.concept}]']:.1%} ('the digit {a.concept}'){general} | {x['drift_accuracy']:.1%} | "
                  f"{x['drift_concept_share']:.1%} |")
        elif x["part"] == "ti":
            shares = ", ".join(f"{v:.0%} at w={k.split('[w=')[1][:-1]}"
                               + (f" (floor {x[f'floor{k[5:]}']:.0%})" if f"floor{k[5:]}" in x else "")
                               for k, v in x.items() if k.startswith("share[a photo of S*][w="))
            print(f"| {name}: textual-inversion, {x.get('ti_vectors')} vectors, {x.get('ti_steps')} steps, lr "
                  f"{x.get('ti_lr')}, init {x.get('ti_init')}, caption words {x.get('ti_caption_words') or '-'} | "
                  f"{x['train_seconds']:.0f} | {shares} ('a photo of S*') | unchanged (frozen) | unchanged |")
        elif x["part"] in ("db-prior", "db-plain"):
            prior = f"prior '{x.get('class_prompt')}' x {x.get('prior_weight')}" if x["part"] == "db-prior" else "no prior"
            print(f"| {name}: dreambooth, {prior}, {x.get('db_steps')} steps, lr {x.get('db_lr')} | "
                  f"{x['train_seconds']:.0f} | {x['fidelity']:.1%} ('a sks digit') | {x['drift_accuracy']:.1%} | "
                  f"{x['drift_concept_share']:.1%} |")
    for name, x in r.items():
        if x["part"] == "ti-loss":
            losses = {k[len("heldout_loss["):-1]: v for k, v in x.items() if k.startswith("heldout_loss[")}
            print(f"\n{name}: held-out diffusion loss on {x['heldout_n']} mnist:test images of the concept, by prompt: "
                  + ", ".join(f"'{k}' {v:.4f}" for k, v in losses.items()))


if __name__ == "__main__":
    main()
