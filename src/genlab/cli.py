"""The ``genlab`` command line: parses arguments, calls :mod:`genlab.api`, prints. No logic of its own."""

from __future__ import annotations

import os

# OpenMP threads that wait for work spin on their core (OMP_WAIT_POLICY=ACTIVE, libgomp's habit for a
# while after each parallel region); on a shared or busy machine the spinning steals the cores the
# other threads need. PASSIVE makes them sleep. OpenMP reads the variable once, when torch loads it,
# so it is set here, before anything imports torch; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
from pathlib import Path

import genlab
from genlab.errors import GenlabError

EPILOG_TRAIN = """\
overrides are key=value pairs on the run's config, e.g.
  train.steps=3000 train.lr=1e-4 model.unet.base_channels=32 data.limit=1000
a bare leaf name works when it is unique (steps=3000). Unknown keys are rejected with the valid ones.

examples:
  genlab train ddpm --data mnist5k --preset small
  genlab train ddpm --data mnist --data-root ../shared/data --preset small train.steps=8000
  genlab train ddpm --run-dir runs/x --resume train.steps=6000
  genlab train lora --base runs/ddpm-mnist --data fashion-mnist rank=4 alpha=4 targets=attn,conv
  genlab train lora --base runs/ddpm-mnist --data fashion-mnist rank=4 targets=attn,conv conv_rank=1

--resume may change train.steps (the LR decay continues from the current LR), train.lr, train.grad_clip,
train.time_limit (minutes per launch) and bookkeeping keys; other changes are refused. Ctrl-C or SIGTERM
saves a checkpoint after the current step; a second one stops at once. One writer per run folder.
"""


EPILOG_EVAL = """\
examples:
  genlab eval runs/demo --ref mnist:test --n 10000 --class all
  genlab eval samples.npz --ref mnist:test --metrics fid,kid
  genlab eval mnist:train --ref mnist:test --n 10000 --data-root ../shared/data
  genlab eval ref --data mnist --split test --data-root ../shared/data
  genlab eval runs/controlnet --ref mnist:train --n 2000
      (a controlnet / t2i-adapter run: controlled samples, from the edges etc. of the first N images of
       its test split, or --control-from SOURCE:SPLIT / --control-image FILE; adherence is reported too;
       a reference other than the maps' split keeps their own images out of the FID)
"""


EPILOG_SAMPLE = """\
guidance (diffusion models):
  --guidance-scale w   classifier-free guidance, eps = eps_uncond + w (eps_cond - eps_uncond):
                       w = 1 is the plain conditional model, w = 0 the unconditional one
                       (the (1 + w') form of some papers is w = 1 + w')
  --negative-class k   the unconditional branch is replaced by class k ("not like a k")
  --classifier RUN --classifier-scale s    classifier guidance with a noisy-classifier run
  --rule NAME[:weight[:key=value,...]]     rule guidance on the predicted x0, e.g. --rule symmetry:50
  --prompt TEXT / --prompts FILE            text-conditioned runs: the caption (FILE: one per line, --n
                                            samples each, one grid row per prompt); with --guidance-scale w
                                            the unconditional branch is the empty prompt, which
                                            --negative-prompt TEXT replaces

examples:
  genlab sample runs/demo --n 64 --out grid.png --sampler dpmpp-2m --steps 10
  genlab sample runs/cfg --class 3 --guidance-scale 3 --out threes.png
  genlab sample runs/t2i --prompt "a thick seven" --guidance-scale 3 --out sevens.png
  genlab sample runs/t2i --prompts prompts.txt --n 8 --guidance-scale 3 --out grid.png
  genlab sample runs/stylegan --truncation 0.7 --out sg.png
  genlab sample runs/gpt --temperature 0.9 --top-k 50 --out gpt.png
"""


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    """Sampling options shared by `sample` and `eval` (each method accepts the ones that apply to it)."""
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale w (1 = no guidance)")
    p.add_argument("--negative-class", type=int, help="negative conditioning: class for the unconditional branch")
    p.add_argument("--classifier", metavar="RUN", help="noisy-classifier run for classifier guidance")
    p.add_argument("--classifier-scale", type=float, help="classifier guidance scale s")
    p.add_argument("--rule", action="append", metavar="NAME[:W]", help="rule guidance (repeatable): brightness, "
                                                                        "symmetry, ink, region, or module:function")
    p.add_argument("--truncation", type=float, help="truncation psi of GAN latents (1 = none, 0 = the mean)")
    p.add_argument("--temperature", type=float, help="softmax temperature of autoregressive priors")
    p.add_argument("--top-k", type=int, help="sample autoregressive priors from the k most likely codes only")
    p.add_argument("--crop", metavar="TOP,LEFT", help="micro-conditioned runs: the crop asked for (default 0,0: whole, "
                                                      "centred objects; an offset reproduces cut-off ones)")
    p.add_argument("--original-size", metavar="N|HxW", help="micro-conditioned runs: the original size asked for "
                                                             "(default: the target size; smaller: up-scaled-looking images)")
    p.add_argument("--target-size", metavar="N|HxW", help="micro-conditioned multi-aspect runs: the shape to sample, "
                                                           "e.g. 20x40 (an aspect bucket of the training data)")
    p.add_argument("--switch", type=int, metavar="T", help="refiner runs: the base denoises t >= T, the refiner below "
                                                          "(default model.sample_switch, else model.t_switch; T <= t_switch)")
    p.add_argument("--control-from", metavar="SOURCE:SPLIT", help="controlnet, t2i-adapter: control maps of the first "
                                                                  "N images of this split (e.g. mnist:test; eval's "
                                                                  "default: the run's test split)")
    p.add_argument("--control-image", metavar="FILE", help="controlnet, t2i-adapter: a control map (.png, used for "
                                                           "every sample) or maps (.npz) at the run's image size")
    p.add_argument("--control-scale", type=float, help="multiplier of the control network's outputs (0: the base)")


def _add_data_options(p: argparse.ArgumentParser, data_flag: str = "--data",
                         data_help: str = "held-out images (default: the run's test split)", weights: bool = True) -> None:
    """The one declaration of --data SOURCE:SPLIT (held-out images), --data-root and --weights (EMA or raw)."""
    if data_flag:
        p.add_argument(data_flag, metavar="SOURCE:SPLIT", help=data_help)
    p.add_argument("--data-root", help="folder holding mnist/, fashion_mnist/, cifar10 data (default: $GENLAB_DATA)")
    if weights:
        p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")


def _int_or(word: str, what: str):
    """An argparse type taking an integer or ``word``: ``what`` names the integer in the error."""
    def parse(text: str) -> int | str:
        if text == word:
            return text
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {what} or `{word}`") from None
    return parse


_batch_size = _int_or("auto", "a number of images (e.g. 64)")  # --batch-size
_class_label = _int_or("all", "a class index (0, 1, ...)")  # --class


def _sampling_options(a, n: int) -> dict:
    """The sampling options given on the command line, as keyword arguments of Method.sample."""
    import torch

    options = {k: v for k, v in (("sampler", a.sampler), ("steps", a.steps), ("eta", getattr(a, "eta", None)),
                                 ("guidance_scale", a.guidance_scale), ("classifier", a.classifier),
                                 ("classifier_scale", a.classifier_scale), ("rules", a.rule),
                                 ("truncation", a.truncation), ("temperature", a.temperature), ("top_k", a.top_k),
                                 ("switch", getattr(a, "switch", None)))
               if v is not None}
    if getattr(a, "class_label", None) is not None:
        # "all": the run resolves it to balanced labels 0, 1, ..., C-1, 0, 1, ... (it knows C).
        options["labels"] = "all" if a.class_label == "all" else torch.full((n,), a.class_label, dtype=torch.long)
    if a.negative_class is not None:
        options["negative_labels"] = torch.full((n,), a.negative_class, dtype=torch.long)
    if getattr(a, "crop", None) is not None or getattr(a, "original_size", None) or getattr(a, "target_size", None):
        from genlab.data.micro import parse_crop, parse_size

        for key, value, parse in (("crop", a.crop, parse_crop), ("original_size", a.original_size, parse_size),
                                  ("target_size", a.target_size, parse_size)):
            if value is not None:
                options[key] = parse(value)
    return options


def _control_flags(a) -> dict:
    """--control-from / --control-image / --control-scale as given (sampling options a control run resolves once
    loaded: `genlab eval` scores a control run's controlled samples, by default from its held-out split)."""
    return {k: v for k, v in (("control_from", a.control_from), ("control_image", a.control_image),
                              ("control_scale", a.control_scale)) if v is not None}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genlab",
        description="genlab: train, sample and evaluate image generative models from first principles.",
    )
    p.add_argument("--version", action="version", version=f"genlab {genlab.__version__}")
    p.add_argument("--debug", action="store_true", help="on an unexpected failure print the full Python traceback")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a model; prints the run folder as the last line",
                       description="Train METHOD on a data source and write a run folder (config, checkpoints, "
                                   "log.jsonl, sample grids).",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("method", help="model family, e.g. ddpm (see `genlab methods`)")
    t.add_argument("--data", help="data source: digits, mnist5k (default), mnist, fashion-mnist, cifar10, folder:PATH")
    _add_data_options(t, data_flag="", weights=False)  # --data (a source, not a split) is declared above
    t.add_argument("--preset", help="preset name (e.g. small, full) or a path to a YAML file")
    t.add_argument("--run-dir", help="run folder (default runs/<method>-<data>-<timestamp>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    t.add_argument("--checkpoint", metavar="STEP|latest", help="with --resume: continue from this step's checkpoint "
                                                               "(later ones are removed; default: the newest intact one)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--codes", metavar="RUN", help="pixelcnn/gpt: the vqvae, vqgan or vq-ae run whose code maps to model "
                                                   "(sets model.codes; --data defaults to that run's data)")
    t.add_argument("--autoencoder", metavar="RUN", help="ldm: the kl-ae or vq-ae run whose latents to diffuse "
                                                        "(sets model.autoencoder; --data defaults to that run's data)")
    t.add_argument("--gan", metavar="RUN", help="gan-encoder: the gan or stylegan run to invert (sets model.gan)")
    t.add_argument("--base", metavar="RUN", help="the frozen parent run of a child method: lora: the run to adapt (then "
                                                 "rank=4 alpha=4 targets=attn,conv: attention projections and every Conv2d; "
                                                 "targets=attn,conv1x1 skips the 3x3 convs, conv_rank=k gives them their "
                                                 "own rank); controlnet, t2i-adapter: the ddpm or "
                                                 "ldm run to steer; sr, refiner: the base the cascade stage or refiner "
                                                 "builds on; textual-inversion, dreambooth: the text-conditioned run to "
                                                 "personalise (sets model.base)")
    t.add_argument("--control", choices=("edges", "mask", "scribble", "thickness"),
                   help="controlnet, t2i-adapter: the control map computed from each image (sets model.control)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    s = sub.add_parser("sample", help="draw samples from a run into a .png grid or an .npz file",
                       description="Sample from a trained run. FILE ending in .png writes a grid; .npz writes "
                                   "'images' as uint8 N x H x W x C.",
                       epilog=EPILOG_SAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("run", help="run folder")
    s.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same images")
    s.add_argument("--out", required=True, help="output file: .png or .npz")
    s.add_argument("--sampler", help="ddpm, ddim, euler, heun, dpmpp-2m (default: the run's config)")
    s.add_argument("--steps", type=int, help="sampling steps (default: the run's config)")
    s.add_argument("--eta", type=float, help="DDIM eta: 0 deterministic, 1 ancestral-like")
    s.add_argument("--class", dest="class_label", type=_class_label, metavar="K|all",
                   help="class K for every sample, or `all`: classes 0..C-1 in turn (class-conditional runs; the default "
                        "there is all; --guidance-scale 0 draws the null class's, i.e. unconditional, samples)")
    s.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    s.add_argument("--checkpoint", metavar="STEP|latest", help="checkpoint to sample (default: the newest intact one)")
    s.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="images per sampling call, or auto (default): the fastest per image for a diffusion model's "
                        "network on this machine, timed once and cached in $GENLAB_CACHE")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: OMP_NUM_THREADS when set, else the usable "
                                               "physical cores)")
    s.add_argument("--compile", action="store_true", help="diffusion runs: torch.compile the denoiser (faster steps "
                                                          "after a compile of minutes: pays for thousands of images)")
    s.add_argument("--lora", metavar="A[:W],B[:W]", help="LoRA adapters (lora run folders or PEFT folders) added to "
                                                          "the run, each scaled by its weight W (default 1)")
    s.add_argument("--data-root", help="folder holding mnist/, fashion_mnist/, cifar10 data (default: $GENLAB_DATA)")
    s.add_argument("--prompt", help="text-conditioned runs: the caption of every sample")
    s.add_argument("--prompts", dest="prompts_file", metavar="FILE", help="text-conditioned runs: a file of prompts, one "
                                                                          "per line; --n samples of each, one grid row each")
    s.add_argument("--negative-prompt", help="text-conditioned runs with --guidance-scale: replaces the empty prompt "
                                             "of the unconditional branch (steer away from it)")
    s.add_argument("--embeddings", metavar="FILE", help="text-conditioned runs: Textual Inversion embeddings "
                                                        "({token: tensor} safetensors) whose tokens prompts may name")
    _add_sampling_options(s)

    e = sub.add_parser("eval", help="score a run, an .npz of images or a data split against real data",
                       description="Score RUN (sampled with its EMA weights), FILE.npz (uint8 images N x H x W x C) or a "
                                   "data split SOURCE:SPLIT against the reference split --ref. Prints one line per "
                                   "metric, `name value` (`+- std` where there is one), then the protocol as `# key: "
                                   "value` lines; for a run the result is merged into RUN/metrics.json.\n\n"
                                   "`genlab eval ref --data mnist --split test` computes and caches the reference "
                                   "statistics only (a run folder called ref: write ./ref).",
                       epilog=EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("target", help="run folder, FILE.npz, SOURCE:SPLIT, or the word `ref`")
    e.add_argument("--ref", default="mnist:test", help="reference SOURCE:SPLIT (default mnist:test)")
    e.add_argument("--metrics", default="fid,kid,is,pr,dc", help="comma-separated: fid,kid,is,pr,dc (default all)")
    e.add_argument("--n", type=int, help="images to score: samples of a run (default 10000: tens of minutes for a "
                                        "diffusion run on a CPU; the estimate is printed before sampling starts), the "
                                        "first N of a file, split or held-out set (default all); with `eval ref`: "
                                        "reference images (default all)")
    e.add_argument("--sampler", help="sampler for a run (default: the run's config)")
    e.add_argument("--steps", type=int, help="sampling steps for a run (default: the run's config)")
    e.add_argument("--seed", type=int, default=0, help="sampling and metric seed (default 0)")
    e.add_argument("--checkpoint", metavar="STEP|latest", help="checkpoint of a run to score (default: the newest "
                                                               "intact one)")
    e.add_argument("--extractor", help="mnist, fashion-mnist, cifar10, inception, the NAME of an evaluator made with `genlab "
                                       "export-evaluator`, an evaluator .safetensors or Inception .pth (default: the "
                                       "shipped evaluator of the reference data, else inception)")
    e.add_argument("--inception-weights", help="file of the FID Inception weights (else $GENLAB_INCEPTION_WEIGHTS)")
    e.add_argument("--ref-n", type=int, help="use only the first N reference images (default all)")
    e.add_argument("--json", help="also write the result (values and protocol) to this JSON file")
    e.add_argument("--batch-size", type=int, default=500, help="images per forward batch (default 500)")
    e.add_argument("--data", help="with `eval ref`: the data source (e.g. mnist)")
    e.add_argument("--split", default="test", help="with `eval ref`: the split (default test)")
    e.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is often faster on a busy CPU)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--kind", choices=("auto", "generation", "reconstruction", "translation", "text"), default="auto",
                   help="for a run: generation metrics of samples, reconstruction metrics (MSE, PSNR, SSIM, and the "
                        "ELBO / codebook usage where they apply) or translation metrics on held-out images, text "
                        "metrics of a text-conditioned run (held-out captions: FID, CLIP score, R-precision; class "
                        "prompts' accuracy; attribute control), or auto (default): whatever the run allows")
    _add_data_options(e, "--recon-data", "held-out images for reconstruction (or pix2pix translation) metrics "
                                            "(default: the run's test split; mnist:test for mnist5k)")
    e.add_argument("--class", dest="class_label", type=_class_label, metavar="K|all",
                   help="sample class K only, or `all` (the default for class-conditional runs): every class "
                        "equally often; also reports class_accuracy, the share of samples the evaluator assigns to "
                        "their requested class (class-conditional runs, or --classifier guidance)")
    _add_sampling_options(e)

    r = sub.add_parser("reconstruct", help="inputs above, reconstructions below, for an autoencoder-family run",
                       description="Reconstruct held-out images with an autoencoder-family run (ae, dae, vae, kl-ae, "
                                   "vqvae, vqgan, vq-ae) and save one PNG: the inputs in the upper rows, their "
                                   "reconstructions in the rows below. Prints the PSNR of these images.")
    r.add_argument("run", help="run folder")
    r.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    r.add_argument("--out", required=True, help="output .png")
    _add_data_options(r, data_help="images to reconstruct (default: the run's test split)")

    i = sub.add_parser("interpolate", help="walk the latent space between pairs of images (or GAN latents)",
                       description="Autoencoders: encode pairs of held-out images and decode the straight line between "
                                   "their latents. GANs: decode the great-circle path between two random latents. One "
                                   "row per pair, from the first endpoint on the left to the second on the right.")
    i.add_argument("run", help="run folder")
    i.add_argument("--out", required=True, help="output .png")
    i.add_argument("--pairs", type=int, default=4, help="number of rows (default 4)")
    i.add_argument("--steps", type=int, default=8, help="images per row, endpoints included (default 8)")
    i.add_argument("--seed", type=int, default=0, help="which images / latents are paired (default 0)")
    _add_data_options(i, data_help="images to pair (default: the run's test split)")

    tr = sub.add_parser("translate", help="image-to-image translation with a pix2pix run",
                        description="Translate input images (A) to outputs (B) with a pix2pix run. --input is a PNG "
                                    "or an .npz (uint8 N x H x W x C); without --input, held-out images are turned into "
                                    "the run's task inputs (edges, masked, low-res) and the PNG shows input / output / "
                                    "target rows with the PSNR and SSIM printed.")
    tr.add_argument("run", help="pix2pix run folder")
    tr.add_argument("--input", help="input image (.png) or images (.npz)")
    tr.add_argument("--out", required=True, help="output .png (grid) or .npz")
    tr.add_argument("--n", type=int, default=16, help="without --input: number of held-out images (default 16)")
    _add_data_options(tr, data_help="without --input: held-out images (default: the run's test split)")
    tr.add_argument("--seed", type=int, default=0, help="seed of random task inputs (masks) (default 0)")

    v = sub.add_parser("invert", help="project images into a GAN's latent space (and edit them)",
                       description="Invert images with a gan or stylegan run: optimise the latent (z for a DCGAN, w for "
                                   "a StyleGAN) to minimise MSE + perceptual distance, starting from a trained "
                                   "gan-encoder's prediction when --encoder is given (--steps 0: the encoder alone). "
                                   "The PNG shows targets above and inversions below (and, with --edit K, each "
                                   "inversion moved along the K-th principal direction of the latents). Prints the PSNR.",
                       epilog="examples:\n  genlab invert runs/gan --image digit.png --out inv.png\n"
                              "  genlab invert runs/gan --data mnist:test --n 100 --encoder runs/enc --steps 0 --out inv.png\n"
                              "  genlab invert runs/stylegan --data mnist:test --n 8 --edit 0 --out edit.png",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("run", help="gan or stylegan run folder")
    v.add_argument("--image", help="image to invert (.png, or .npz of uint8 N x H x W x C)")
    _add_data_options(v, data_help="without --image: held-out images (default: the run's test split)")
    v.add_argument("--n", type=int, default=16, help="without --image: number of held-out images (default 16)")
    v.add_argument("--out", required=True, help="output .png")
    v.add_argument("--space", choices=("z", "w", "w+"), help="latent space (default: w for StyleGAN, z for DCGAN)")
    v.add_argument("--steps", type=int, default=300, help="optimisation steps (default 300; 0 with --encoder: encoder only)")
    v.add_argument("--lr", type=float, default=0.05, help="Adam learning rate on the latent (default 0.05)")
    v.add_argument("--perceptual-weight", type=float, default=0.1, help="weight of the perceptual term (default 0.1)")
    v.add_argument("--encoder", metavar="RUN", help="a gan-encoder run trained on this GAN: its prediction starts the search")
    v.add_argument("--edit", type=int, metavar="K", help="also show edits along the K-th principal direction (0 = first)")
    v.add_argument("--strength", type=float, default=3.0, help="edit range in standard deviations (default 3)")
    v.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("compare", help="one table per family of metrics and one bar chart of several runs",
                       description="Print Markdown tables of the newest metrics.json entries of each run (or metrics "
                                   "JSON file), one per family with its own columns (generation: FID, KID, IS, PR, "
                                   "DC, class accuracy; reconstruction: MSE, PSNR, SSIM, ELBO, codebook usage; "
                                   "translation: PSNR, SSIM), a warning line for each protocol field the entries "
                                   "differ in (sampler, steps, guidance, N, ...), and write a PNG bar chart. Evaluate "
                                   "the runs first with `genlab eval`.")
    c.add_argument("runs", nargs="+", help="run folders or metrics JSON files")
    c.add_argument("--ref", help="use the entries scored against this SOURCE:SPLIT (default: each run's newest)")
    c.add_argument("--out", default="compare.png", help="bar chart file (default compare.png)")

    x = sub.add_parser("export-evaluator", help="turn a trained classifier run into an evaluator for --extractor (or a clip run into a CLIP judge)",
                       description="Export a `classifier` run as an evaluator: NAME.safetensors and a NAME.json card\n"
                                   "(architecture, training command, test accuracy on the data's official test split,\n"
                                   "sha256) in --out, by default your evaluators folder ($GENLAB_CACHE/evaluators,\n"
                                   "i.e. ~/.cache/genlab/evaluators). Then score with `genlab eval RUN --extractor NAME`\n"
                                   "(or the .safetensors path). The shipped evaluators (mnist, fashion-mnist, cifar10) are never\n"
                                   "overwritten.",
                       epilog="example:\n  genlab train classifier --data fashion-mnist --preset small --run-dir runs/clf\n"
                              "  genlab export-evaluator runs/clf my-fashion\n"
                              "  genlab eval runs/ddpm --ref fashion-mnist:test --extractor my-fashion",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("run", help="classifier run folder (or clip run folder: a CLIP judge for zero-shot / retrieve / CLIP score)")
    x.add_argument("name", help="evaluator name: letters, digits, - and _ (e.g. my-fashion)")
    x.add_argument("--out", help="folder to write into (default: $GENLAB_CACHE/evaluators)")
    x.add_argument("--force", action="store_true", help="replace an existing evaluator of this name in --out")

    ee = sub.add_parser("export-embeddings", help="write a textual-inversion run's learned token as {token: tensor} "
                                                  "safetensors (diffusers' load_textual_inversion format)")
    ee.add_argument("run", help="textual-inversion run folder")
    ee.add_argument("out", help="file to write (.safetensors); use it with `genlab sample BASE_RUN --embeddings FILE`")
    ee.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw vectors")
    _add_data_options(x, data_flag="")
    ex = sub.add_parser("export", help="write a run in another library's format (diffusers), with a model card",
                        description="Export RUN into the folder OUT. --format diffusers: a pixel DDPM (U-Net) run becomes "
                                    "unet/ (UNet2DModel) and scheduler/ (DDPMScheduler with genlab's betas, prediction, "
                                    "clipping and spacing), plus model_index.json when DDPMPipeline can run it "
                                    "(unconditional, no pixel patch), genlab.json and a README.md model card (training "
                                    "command, data, steps, metrics with protocol, the sampling loop).",
                        epilog="example:\n  genlab export runs/ddpm --format diffusers ddpm-diffusers\n"
                               "  python -c \"from diffusers import DDPMPipeline; DDPMPipeline.from_pretrained('ddpm-diffusers')\"",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("run", help="run folder")
    ex.add_argument("--format", required=True, choices=("diffusers",), help="target format")
    ex.add_argument("out", help="folder to write (must be empty or absent unless --force)")
    ex.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    ex.add_argument("--checkpoint", metavar="STEP|latest", help="checkpoint to export (default: the newest intact one)")
    ex.add_argument("--force", action="store_true", help="replace OUT if it exists")
    im = sub.add_parser("import", help="make a genlab run from another library's model folder (diffusers)",
                        description="Import a diffusers UNet2DModel + scheduler folder (save_pretrained output, a Hub cache "
                                    "snapshot or a models--org--name cache folder) as a genlab DDPM run: it samples with "
                                    "every genlab sampler and guidance and is scored by `genlab eval`. Prints the run "
                                    "folder as the last line. Weights are read from safetensors only (never unpickled).",
                        epilog="example:\n  genlab import diffusers ddpm-diffusers --run-dir runs/imported --data mnist\n"
                               "  genlab eval runs/imported --ref mnist:test",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    im.add_argument("format", choices=("diffusers",), help="source format")
    im.add_argument("path", help="the model folder")
    im.add_argument("--run-dir", help="run folder to create (default runs/imported-<folder>-<time>)")
    im.add_argument("--data", help="data source the model was trained on, recorded in the run's config "
                                   "(default: what a genlab export says, else unknown)")
    rp = sub.add_parser("report", help="one self-contained HTML page of runs: curves, grids, metrics, warnings",
                        description="Write an HTML report of one run (config and command, loss / LR / grad-norm "
                                    "curves, sample grids over training, every evaluation with its protocol, sweeps, "
                                    "warnings) or a comparison of several; images are inline, it opens from disk.")
    rp.add_argument("runs", nargs="+", help="run folders")
    rp.add_argument("--out", help="HTML file (default RUN/report.html for one run, report.html for several)")

    lo = sub.add_parser("lora", help="LoRA adapters: export (PEFT folder), merge into / unmerge from a plain run",
                        description="Work with the adapters of lora runs (train them with `genlab train lora --base RUN "
                                    "--data SOURCE rank=4 alpha=4 targets=attn,conv`; sample several at once with "
                                    "`genlab sample BASE_RUN --lora A:0.7,B:0.3`).")
    losub = lo.add_subparsers(dest="lora_command", metavar="ACTION", required=True)
    le = losub.add_parser("export", help="write a lora run's adapter as a PEFT folder (adapter_config.json + "
                                         "adapter_model.safetensors), loadable by peft")
    le.add_argument("run", help="lora run folder")
    le.add_argument("out", help="folder to write")
    lm = losub.add_parser("merge", help="write a plain run of the base's kind with W + w (alpha / r) B A in its weights")
    lm.add_argument("run", help="lora run folder")
    lm.add_argument("--out", required=True, help="new run folder")
    lm.add_argument("--weight", type=float, default=1.0, help="adapter weight w (default 1)")
    lu = losub.add_parser("unmerge", help="write the base back from a run `genlab lora merge` wrote")
    lu.add_argument("run", help="merged run folder")
    lu.add_argument("--out", required=True, help="new run folder")

    d = sub.add_parser("data", help="data sources", description="Inspect data sources.")
    dsub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dsub.add_parser("list", help="list the data sources")
    ds = dsub.add_parser("show", help="draw a grid of a source's images with their captions (or class names)")
    ds.add_argument("source", metavar="SOURCE[:SPLIT]", help="e.g. mnist-captions, mnist-pairs:test, folder:PATH")
    ds.add_argument("--n", type=int, default=16, help="images to show (default 16)")
    ds.add_argument("--out", default="data.png", help="image file (default data.png)")
    ds.add_argument("--data-root", default=None, help="data root (default $GENLAB_DATA)")

    for name, helptext in (("zero-shot", "zero-shot classification accuracy of a clip run with prompt templates"),
                           ("retrieve", "image->text and text->image recall@1/5/10 of a clip run on held-out pairs")):
        z = sub.add_parser(name, help=helptext, description=helptext)
        z.add_argument("run", metavar="RUN", help="clip run folder, or a shipped CLIP evaluator (e.g. clip-mnist-captions)")
        z.add_argument("--data", required=True, metavar="SOURCE[:SPLIT]", help="held-out data (split defaults to test)")
        z.add_argument("--n", type=int, default=None, help="use the first N examples (default all)")
        z.add_argument("--data-root", default=None, help="data root (default $GENLAB_DATA)")
        if name == "zero-shot":
            z.add_argument("--prompts", nargs="+", default=["a photo of the digit {}"],
                           help="templates with {} for the class word; several are ensembled (default 'a photo of the digit {}')")
        else:
            z.add_argument("--gallery", type=int, default=100, help="rank among groups of this many pairs (0: all; default 100)")

    b = sub.add_parser("bench", help="benchmarks that train and score: `bench families` (every family, one budget)",
                       description="Benchmarks that train and score runs.")
    bsub = b.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    bf = bsub.add_parser("families", help="train every generative family at one CPU budget and score them alike",
                         description="Train every generative family (ddpm, dit, ldm on a kl-ae, vae, a VQ-VAE with a "
                                     "PixelCNN or GPT prior, gan, stylegan) with the data's small preset for --minutes "
                                     "minutes each (--clock: CPU or wall) on --threads threads (train.time_limit stops it; a two-stage "
                                     "family spends --parent-share of its minutes on the parent and the rest on the "
                                     "child), score each with the same generation protocol (--n samples against "
                                     "DATA:test, the data's shipped evaluator, evaluation seed 0, the run's own "
                                     "sampler; class-conditional runs are asked for every class equally often) and "
                                     "write OUT/families-DATA.json, .md (table) and .png (FID vs ms per sample, marker "
                                     "area = training minutes). Rerunning skips what is done and resumes what was "
                                     "interrupted.",
                         epilog="examples:\n  genlab bench families --data mnist --minutes 3 --n 2000\n"
                                "  genlab bench families --data mnist --minutes 3 --n 2000 --seeds 0,1,2\n"
                                "  genlab bench families --data fashion-mnist --minutes 15 --families ddpm,gan,vae\n"
                                "  genlab bench families --data mnist --table-only   # redraw the table and plot from the JSON",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    bf.add_argument("--data", required=True, help="data source with an evaluator: mnist, fashion-mnist (or any, "
                                                  "with --extractor)")
    bf.add_argument("--minutes", type=float, help="training minutes per family (parent included); required unless "
                                                 "--table-only")
    bf.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="what --minutes counts: the training "
                                                                          "process's CPU time (default: the same compute "
                                                                          "on a busy machine) or wall time")
    bf.add_argument("--n", type=int, default=10000, help="samples scored per run (default 10000)")
    bf.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1,2 (default 0): the table "
                                                 "gives mean +- std over them")
    bf.add_argument("--families", help="comma-separated subset (default all): ddpm,dit,ldm,vae,vqvae+pixelcnn,"
                                       "vqvae+gpt,gan,stylegan")
    bf.add_argument("--parent-share", type=float, default=1 / 3, help="fraction of a two-stage family's minutes "
                                                                     "for its parent (default 1/3)")
    bf.add_argument("--out", default="runs/families", help="folder of the runs and the outputs (default runs/families)")
    bf.add_argument("--threads", type=int, default=1, help="torch threads for training and sampling (default 1)")
    bf.add_argument("--extractor", help="evaluator NAME or file (default: the data's shipped evaluator)")
    bf.add_argument("--data-root", help="folder holding mnist/, fashion_mnist/, cifar10 data (default: $GENLAB_DATA)")
    bf.add_argument("--table-only", action="store_true", help="train and score nothing: rewrite the table and plot "
                                                              "from OUT/families-DATA.json")

    sub.add_parser("methods", help="list the model families")

    cf = sub.add_parser("config", help="print a method's resolved config: each key's value, default, source and meaning",
                        description="Resolve METHOD's config as `genlab train` would (defaults <- preset <- key=value "
                                    "overrides) and print one line per key: value, default, source layer (default, "
                                    "preset or override), type with its valid range, and meaning. Nothing is trained.",
                        epilog="examples:\n  genlab config ddpm\n  genlab config ddpm --data mnist --preset small "
                               "train.steps=500", formatter_class=argparse.RawDescriptionHelpFormatter)
    cf.add_argument("method", help="model family, e.g. ddpm (see `genlab methods`)")
    cf.add_argument("--data", help="data source (selects a dataset-specific preset, as `genlab train` does)")
    cf.add_argument("--preset", help="preset name (e.g. small) or a path to a YAML file")
    cf.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    demo = sub.add_parser("demo", help="train a small DDPM on mnist5k, sample, write runs/demo",
                          description="The five-minute tour: trains the small DDPM preset on the bundled mnist5k "
                                      "digits (class-conditional), samples with the preset's sampler (DDPM, 20 steps) and "
                                      "writes a 10 x 10 grid, column j = digit j, into the run folder.")
    demo.add_argument("--run-dir", default="runs/demo", help="run folder (default runs/demo)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. train.steps=500)")
    return p


def _cmd_train(a) -> int:
    from genlab import api

    parents = [f"model.{k}={v}" for k, v in (("codes", a.codes), ("autoencoder", a.autoencoder), ("gan", a.gan),
                                             ("base", a.base), ("control", a.control))
               if v is not None]
    run = api.train(a.method, data=a.data, preset=a.preset, overrides=parents + list(a.overrides), run_dir=a.run_dir,
                    resume=a.resume, data_root=a.data_root, progress=not a.no_progress, announce=print,
                    checkpoint=a.checkpoint)
    print(run.path)
    return 0


def _cmd_sample(a) -> int:
    import torch

    from genlab import api
    from genlab.imageio import save_images

    from genlab.runs import check_sampling_options

    out = Path(a.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise GenlabError(f"--out {out}: the file must end in .png (a grid) or .npz (uint8 images N x H x W x C)")
    check_sampling_options(n=a.n, seed=a.seed, batch_size=None if a.batch_size == "auto" else a.batch_size,
                           threads=a.threads)  # before the (slow) load
    import torch

    from genlab.autotune import default_threads

    torch.set_num_threads(a.threads or default_threads())
    n, nrow, prompts = a.n, None, None
    if a.prompts_file is not None:
        if a.prompt is not None:
            raise GenlabError("--prompt and --prompts FILE: give one of them")
        from genlab.methods.text_conditioning import read_prompts_file

        prompts = read_prompts_file(a.prompts_file)
        n, nrow = a.n * len(prompts), a.n  # --n samples of each prompt, one grid row each
    run = api.load_run(a.run, weights=a.weights, checkpoint=a.checkpoint)
    if a.lora:
        from genlab.adapters import attach_adapters

        attach_adapters(run, a.lora)
    if a.embeddings is not None:
        from genlab.methods.textual_inversion import load_embeddings

        load_embeddings(run.method, a.embeddings)
    options = _sampling_options(a, n)
    for key, value in (("prompt", a.prompt), ("prompts", prompts), ("negative_prompt", a.negative_prompt)):
        if value is not None:
            options[key] = value
    options.update(api.control_options(run, n, a.control_from, a.control_image, a.control_scale, a.data_root))
    images = run.sample(n, seed=a.seed, batch_size=a.batch_size, progress=True, compile=a.compile, **options)
    save_images(images, out, nrow=nrow if out.suffix.lower() == ".png" else None)
    if "control" in options:  # how well the samples follow their maps
        from genlab.metrics.adherence import adherence, adherence_name

        kind = run.config.model.control
        print(f"adherence {adherence(kind, images, options['control']).mean():.3f} ({adherence_name(kind)}) "
              f"over {n} samples")
    print(out)
    return 0


def _format_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _note(message: str) -> None:
    """A progress note for people (the number of images, a time estimate), on stderr beside the bars."""
    print(message, file=sys.stderr, flush=True)


def _cmd_eval(a) -> int:
    from genlab.runs import checkpoint_choice

    with checkpoint_choice(a.checkpoint):  # every load_run of this evaluation uses --checkpoint
        return _evaluate(a)


def _evaluate(a) -> int:
    from genlab import evaluation

    if a.threads is not None:
        import torch

        if a.threads < 1:
            raise GenlabError(f"--threads must be at least 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    extractor = a.extractor
    if a.inception_weights is not None:
        if extractor not in (None, "inception"):
            raise GenlabError(f"--inception-weights is for the inception extractor, but --extractor is {extractor}")
        extractor = a.inception_weights
    if a.target == "ref":
        if not a.data:
            raise GenlabError("genlab eval ref needs --data SOURCE (e.g. --data mnist --split test)")
        ref = evaluation.reference_stats(a.data, a.split, extractor, data_root=a.data_root, n=a.n,
                                         batch_size=a.batch_size, progress=not a.no_progress)
        evaluation.store_reference_parts(ref)  # PR/DC radii, KID sums of the default protocol: a fast first score
        print(f"reference {a.data}:{a.split}: {ref.n} images, extractor {ref.key['extractor']} "
              f"(sha256 {ref.key['extractor_sha256'][:12]}...)")
        print(ref.path if ref.path is not None else "(not cached: the cache folder is not writable)")
        return 0
    if a.data is not None:
        raise GenlabError(f"--data {a.data} is for `genlab eval ref`; to score a data split write it as the target, "
                          f"e.g. genlab eval {a.data}:{a.split} --ref {a.ref}")
    results = evaluation.evaluate_all(
        a.target, a.kind, ref=a.ref, metrics=a.metrics, n=a.n, sampler=a.sampler, steps=a.steps, seed=a.seed,
        weights=a.weights, extractor=extractor, data_root=a.data_root, data=a.recon_data, ref_n=a.ref_n,
        batch_size=a.batch_size, json_path=a.json, progress=not a.no_progress, log=_note,
        sample_options={**_sampling_options(a, a.n or evaluation.DEFAULT_N), **_control_flags(a)})
    for result in results:
        _print_result(result)
    return 0


def _print_result(result: dict) -> None:
    for name, value in result["metrics"].items():
        std = result["std"].get(name)
        print(f"{name} {_format_value(value)}" + (f" +- {_format_value(std)}" if std is not None else ""))
    for key, value in result["protocol"].items():
        if isinstance(value, dict):
            value = " ".join(f"{k}={_format_value(v)}" for k, v in value.items())
        print(f"# {key}: {_format_value(value)}")


def _cmd_reconstruct(a) -> int:
    import torch

    from genlab import api
    from genlab.imageio import save_grid
    from genlab.methods.capabilities import Reconstructs
    from genlab.metrics import psnr

    if a.n < 1:
        raise GenlabError(f"--n must be at least 1, got {a.n}")
    run = api.load_run(a.run, weights=a.weights)
    run._need(Reconstructs, "reconstruct images")
    x = api.heldout_images(run, a.data, a.n, a.data_root).to_model_range()
    x_hat = run.reconstruct(x)
    nrow = min(len(x), 16)
    save_grid(torch.cat([_pad_rows(x, nrow), _pad_rows(x_hat, nrow)]), a.out, nrow=nrow, scale=2)
    print(f"psnr {psnr(x_hat, x).item():.2f} dB over {len(x)} images (inputs above, reconstructions below)")
    print(a.out)
    return 0


def _pad_rows(images, nrow: int):
    """Pad a block of images with black tiles to whole rows, so blocks stack as rows in one grid."""
    import torch

    missing = -len(images) % nrow
    return torch.cat([images, -torch.ones(missing, *images.shape[1:])]) if missing else images


def _cmd_interpolate(a) -> int:
    import torch

    from genlab import api
    from genlab.imageio import save_grid
    from genlab.methods.capabilities import Encodes, GANLatent, has

    if a.pairs < 1:
        raise GenlabError(f"--pairs must be at least 1, got {a.pairs}")
    run = api.load_run(a.run, weights=a.weights)
    run._need((Encodes, GANLatent), "interpolate")
    g = torch.Generator().manual_seed(a.seed)
    if has(run.method, Encodes):
        held = api.heldout_images(run, a.data, None, a.data_root).to_model_range()
        idx = torch.randperm(len(held), generator=g)[: 2 * a.pairs]
        if len(idx) < 2 * a.pairs:
            raise GenlabError(f"{len(held)} held-out images are too few for {a.pairs} pairs")
        start, end = held[idx[: a.pairs]], held[idx[a.pairs:]]
    else:  # a GAN latent
        start = torch.randn(a.pairs, run.method.latent_dim, generator=g)
        end = torch.randn(a.pairs, run.method.latent_dim, generator=g)
    images = run.interpolate(start, end, a.steps)  # (pairs, steps, C, H, W)
    save_grid(images.flatten(0, 1), a.out, nrow=a.steps, scale=2)
    print(a.out)
    return 0


def _cmd_translate(a) -> int:
    import torch

    from genlab import api
    from genlab.data import to_model_range
    from genlab.imageio import save_grid, save_images
    from genlab.methods.capabilities import Translates

    run = api.load_run(a.run, weights=a.weights)
    run._need(Translates, "translate images")
    method = run.method
    d = method.data_info
    if a.input is not None:
        path = Path(a.input)
        a_u8 = _read_images_file(path, method.input_channels)
        if tuple(a_u8.shape[-2:]) != (d.image_size, d.image_size):
            raise GenlabError(f"--input {path}: images are {a_u8.shape[-2]}x{a_u8.shape[-1]}, the run translates "
                              f"{d.image_size}x{d.image_size}; resize them first")
        with torch.no_grad():
            b = method.translate(to_model_range(a_u8).to(method.device)).cpu()
        save_images(b, a.out)
        print(a.out)
        return 0
    from genlab.methods.pix2pix import evaluate_pairs

    held = api.heldout_images(run, a.data, a.n, a.data_root)
    target = held.to_model_range()
    g = torch.Generator().manual_seed(a.seed)
    given = None if held.conditions is None else to_model_range(held.conditions)  # paired data: the real inputs
    with torch.no_grad():
        inputs = given if given is not None else method.make_input(target.to(method.device), generator=g).cpu()
        outputs = method.translate(inputs.to(method.device)).cpu()
    scores = evaluate_pairs(method, target, torch.Generator().manual_seed(a.seed), images_a=given)
    print(f"discriminator receptive field {method.receptive_field} px ({method.disc_layers} layers)")
    # Inputs beside targets with their channels: a mask channel dropped, a one-channel edge map of RGB repeated.
    shown = inputs[:, : target.shape[1]] if inputs.shape[1] >= target.shape[1] else inputs[:, :1].expand_as(target)
    nrow = min(len(target), 16)
    save_grid(torch.cat([_pad_rows(shown, nrow), _pad_rows(outputs, nrow), _pad_rows(target, nrow)]), a.out,
              nrow=nrow, scale=2)
    print(" ".join(f"{k} {v:.4g}" for k, v in scores.items()) + f" over {len(target)} images "
          "(rows: input, output, target)")
    print(a.out)
    return 0


def _read_images_file(path: Path, channels: int):
    """uint8 (N, C, H, W) from a .png or an .npz, converted to ``channels`` (grey <-> colour)."""
    import numpy as np
    import torch

    from genlab.data.folder import decode_image
    from genlab.imageio import load_npz

    if not path.is_file():
        raise GenlabError(f"{path}: no such file")
    if path.suffix.lower() == ".npz":
        u8 = load_npz(path)
    else:
        u8 = torch.from_numpy(np.ascontiguousarray(decode_image(path.read_bytes(), str(path)))).permute(2, 0, 1)[None]
    if u8.shape[1] != channels:
        if u8.shape[1] == 1:
            u8 = u8.expand(-1, channels, -1, -1)
        else:  # ITU-R 601 luma, PIL's "L" conversion
            luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            u8 = (u8.float() * luma).sum(1, keepdim=True).round().to(torch.uint8)
    return u8


def _invert_targets(a, run):
    """The images to invert, in [-1, 1]: --image (a PNG or .npz) or held-out images."""
    from genlab import api
    from genlab.data import to_model_range

    d = run.method.data_info
    if a.image is None:
        return api.heldout_images(run, a.data, a.n, a.data_root).to_model_range()
    target = to_model_range(_read_images_file(Path(a.image), d.channels))
    if tuple(target.shape[-2:]) != (d.image_size, d.image_size):
        raise GenlabError(f"--image {a.image}: images are {target.shape[-2]}x{target.shape[-1]}, the GAN makes "
                          f"{d.image_size}x{d.image_size}; resize them first")
    return target


def _invert_encoder(a, space: str, target):
    """The --encoder run's method and its predicted latents of ``target`` (the optimisation's start), or (None, None)."""
    import torch

    from genlab import api

    if a.encoder is None:
        if a.steps == 0:
            raise GenlabError("--steps 0 means no optimisation: give --encoder RUN, or steps > 0")
        return None, None
    encoder = api.load_run(a.encoder).method
    if getattr(encoder, "name", None) != "gan-encoder":
        raise GenlabError(f"--encoder {a.encoder}: not a gan-encoder run")
    if encoder.space != space:
        raise GenlabError(f"--encoder predicts {encoder.space} but --space is {space}")
    with torch.no_grad():
        return encoder, encoder.invert(target.to(encoder.device))


def _edit_latent_pool(a, run, space: str, encoder):
    """Latents whose principal directions are the edits: encoded real images, or mapped styles (GANSpace)."""
    import torch

    from genlab import api

    method = run.method
    with torch.no_grad():
        if encoder is not None:
            held = api.heldout_images(run, a.data, 1000, a.data_root).to_model_range()
            return torch.cat([encoder.invert(held[i: i + 250].to(encoder.device)) for i in range(0, len(held), 250)])
        if space != "z":
            g = torch.Generator().manual_seed(a.seed)
            return method.mapping(torch.randn(2000, method.latent_dim, generator=g).to(method.device))
    raise GenlabError("--edit on a DCGAN needs --encoder RUN: its directions come from encoded real images")


def _save_edits(a, run, space: str, encoder, latents) -> float:
    """Each inverted latent moved along the --edit K-th principal direction, one row per image; returns its std."""
    import torch

    from genlab import inversion
    from genlab.imageio import save_grid

    pool = _edit_latent_pool(a, run, space, encoder)
    _, directions, stds = inversion.principal_directions(pool.flatten(1).cpu(), k=a.edit + 1)
    if a.edit >= len(directions):
        raise GenlabError(f"--edit {a.edit}: only {len(directions)} directions available")
    strengths = torch.linspace(-a.strength, a.strength, 7)
    if space == "w+":  # a style direction moves every layer's w alike
        directions = directions[:, None].expand(-1, run.method.num_ws, -1)
    edits = inversion.edit_along(run.method, latents, directions[a.edit], float(stds[a.edit]), space, strengths)
    save_grid(edits.flatten(0, 1).cpu(), a.out, nrow=len(strengths), scale=2)
    return float(stds[a.edit])


def _cmd_invert(a) -> int:
    import torch

    from genlab import api, inversion
    from genlab.imageio import save_grid
    from genlab.methods.capabilities import GANLatent
    from genlab.metrics import psnr

    run = api.load_run(a.run, weights=a.weights)
    run._need(GANLatent, "be inverted (it has no generator latent space)")
    target = _invert_targets(a, run)
    space = inversion.latent_space(run.method, a.space)
    encoder, init = _invert_encoder(a, space, target)
    if init is not None:
        init = init.to(run.method.device)
    result = inversion.project(run.method, target, space=space, steps=a.steps, lr=a.lr,
                               perceptual_weight=a.perceptual_weight, init=init, progress=not a.no_progress)
    score = float(psnr(result.images.cpu().double(), target.double()))  # mean over images of the one PSNR
    if a.edit is not None:
        std = _save_edits(a, run, space, encoder, result.latents)
        print(f"psnr {score:.2f} dB; edits along direction {a.edit} (std {std:.3g}) "
              f"from -{a.strength} to +{a.strength} std, one row per image")
        print(a.out)
        return 0
    nrow = min(len(target), 16)
    save_grid(torch.cat([_pad_rows(r, nrow) for r in (target, result.images.cpu())]), a.out, nrow=nrow, scale=2)
    how = ("encoder" if a.steps == 0 else f"encoder + {a.steps} steps") if encoder is not None else f"{a.steps} steps"
    print(f"psnr {score:.2f} dB over {len(target)} images ({space}, {how}; targets above, inversions below)")
    print(a.out)
    return 0


def _cmd_compare(a) -> int:
    from genlab import report

    table, _ = report.compare(a.runs, ref=a.ref, out=a.out)
    print(table)
    print(a.out)
    return 0


def _cmd_export_embeddings(a) -> int:
    from genlab import api

    run = api.load_run(a.run, weights=a.weights)
    if not hasattr(run.method, "save_embeddings"):
        raise GenlabError(f"{a.run}: a {run.config.method} run; export-embeddings needs a textual-inversion run")
    print(run.method.save_embeddings(a.out))
    return 0


def _cmd_export_evaluator(a) -> int:
    from genlab.evaluation import export_evaluator
    from genlab.metrics.extractors import user_evaluators_dir

    card = export_evaluator(a.run, a.name, out_dir=a.out, data_root=a.data_root, weights=a.weights, overwrite=a.force)
    out = Path(a.out) if a.out is not None else user_evaluators_dir()
    if "test_accuracy" not in card:  # a CLIP judge: retrieval (and zero-shot) scores
        r = card["scores"]["retrieval"]
        print(f"CLIP evaluator {card['name']}: text->image R@1 {r['text_to_image_recall@1']:.4f} on {card['test_split']}, "
              f"sha256 {card['sha256'][:12]}...; use it as a judge by name (genlab zero-shot / retrieve {a.name})")
        print(out / f"{a.name}.safetensors")
        return 0
    print(f"evaluator {card['name']}: test accuracy {card['test_accuracy']:.2%} on {card['test_split']} "
          f"({card['test_images']} images), sha256 {card['sha256'][:12]}...")
    print(f"use it with: genlab eval RUN --extractor "
          f"{a.name if a.out is None else out / (a.name + '.safetensors')}")
    print(out / f"{a.name}.safetensors")
    return 0


def _load_split(ref: str, n: int | None, data_root: str | None, default_split: str):
    from genlab.data import DataConfig, load_data, split_source_ref

    source, split = split_source_ref(ref)
    return load_data(DataConfig(source=source, split=split or default_split, root=data_root, limit=n))


def _cmd_export(a) -> int:
    from genlab.interop import export_diffusers

    print(export_diffusers(a.run, a.out, weights=a.weights, checkpoint=a.checkpoint, overwrite=a.force))
    return 0


def _cmd_import(a) -> int:
    import time

    from genlab.interop import import_diffusers

    run_dir = a.run_dir or Path("runs") / f"imported-{Path(a.path).resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(import_diffusers(a.path, run_dir, data=a.data))
    return 0


def _cmd_report(a) -> int:
    from genlab.report.html import write_report

    out = a.out if a.out is not None or len(a.runs) == 1 else "report.html"
    print(write_report(a.runs, out))
    return 0


def _cmd_data(a) -> int:
    from genlab.data import list_sources

    if a.data_command == "show":
        from genlab.imageio import save_captioned_grid

        if a.n < 1:
            raise GenlabError(f"--n must be at least 1, got {a.n}")
        data = _load_split(a.source, a.n, a.data_root, "train")
        print(save_captioned_grid(data, Path(a.out)))
        return 0
    if a.data_command != "list":
        print("usage: genlab data {list,show}", file=sys.stderr)
        return 2
    for name, description, needs_root in list_sources():
        print(f"{name:16s} {'(data root) ' if needs_root else ''}{description}")
    return 0


def _cmd_zero_shot(a) -> int:
    from genlab.evaluation.text import load_clip, retrieve, zero_shot

    clip, name = load_clip(a.run)
    data = _load_split(a.data, a.n, a.data_root, "test")
    if a.command == "zero-shot":
        result = zero_shot(clip, data, a.prompts)
        print(f"zero-shot accuracy {result['zero_shot_accuracy']:.4f} on {data.source}:{data.split} (n={len(data)}, {name})")
        print("per class: " + ", ".join(f"{k} {v:.3f}" for k, v in result["per_class"].items()))
    else:
        result = retrieve(clip, data, gallery=a.gallery or None)
        print(f"retrieval on {data.source}:{data.split} (n={result['n']}, galleries of {result['gallery']}, {name})")
        for direction in ("image_to_text", "text_to_image"):
            print(f"{direction:14s} " + "  ".join(f"R@{k} {result[f'{direction}_recall@{k}']:.4f}" for k in (1, 5, 10)))
        if "recall@1_ceiling" in result:  # the captions say less than the images: score by content too
            for direction in ("image_to_text", "text_to_image"):
                print(f"{direction:14s} " + "  ".join(f"content R@{k} {result[f'{direction}_content_recall@{k}']:.4f}" for k in (1, 5, 10)))
            print(f"(a perfect model's R@1 among duplicates of a caption's content: {result['recall@1_ceiling']:.4f})")
    return 0


def _cmd_bench(a) -> int:
    from genlab.report import families

    if a.table_only:
        source = Path(a.out) / f"families-{a.data}.json"
        if not source.is_file():
            raise GenlabError(f"{source}: no such file; run `genlab bench families --data {a.data} --minutes M` first")
        paths = families.write_outputs(families.read_rows(source), Path(a.out), a.data)
    else:
        if a.minutes is None:
            raise GenlabError("genlab bench families needs --minutes M: the training minutes of each family (e.g. 3)")
        try:
            seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        except ValueError:
            raise GenlabError(f"--seeds {a.seeds}: give comma-separated integers, e.g. 0,1,2") from None
        rows, paths = families.bench_families(a.data, a.minutes, n=a.n, seeds=seeds, families=a.families,
                                              parent_share=a.parent_share, out=a.out, threads=a.threads,
                                              extractor=a.extractor, data_root=a.data_root, clock=a.clock)
        if any(r.error for r in rows):
            print(paths["md"].read_text(), end="")
            print(f"wrote {', '.join(str(p) for p in paths.values())}; "
                  f"{sum(r.error is not None for r in rows)} of {len(rows)} failed (see the table)")
            return 1
    print(paths["md"].read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _cmd_methods(a) -> int:
    from genlab.config import list_presets
    from genlab.methods import METHODS

    for name in sorted(METHODS):
        print(f"{name:18s} presets: {', '.join(list_presets(name)) or '-'}")
    return 0


def _cmd_config(a) -> int:
    from genlab.api import resolve_preset
    from genlab.config import describe_config
    from genlab.methods import get_method

    overrides = ([f"data.source={a.data}"] if a.data is not None else []) + list(a.overrides)
    rows = describe_config(a.method, get_method(a.method).Config, preset=resolve_preset(a.method, a.data, a.preset),
                           overrides=overrides)
    table = [("key", "value", "default", "source", "type", "meaning")]
    for r in rows:
        meaning = r.meaning.split(". ")[0].rstrip(".")  # the first sentence: one line per key
        table.append((r.key, _yaml_value(r.value), _yaml_value(r.default), r.source, r.type, meaning))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5])
    return 0


def _yaml_value(value) -> str:
    """A value as it is written in a key=value override (null, true, [1, 2])."""
    import json

    return json.dumps(value) if not isinstance(value, str) else value


def _cmd_lora(a) -> int:
    from genlab import adapters

    if a.lora_command == "export":
        out = adapters.save_adapter(adapters.read_adapter(a.run), a.out)
    elif a.lora_command == "merge":
        out = adapters.merge_run(a.run, a.out, weight=a.weight)
    else:
        out = adapters.unmerge_run(a.run, a.out)
    print(out)
    return 0


def _cmd_demo(a) -> int:
    from genlab.demo import run_demo
    from genlab.train.lock import RunLock

    RunLock(a.run_dir, "trained").acquire().release()  # the demo moves an old run aside: not while it trains
    run_demo(Path(a.run_dir), a.overrides)
    return 0


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings for people: one line naming the problem (no source file or code line)."""
    return f"warning: {message}\n"


def _override_hint(a, unknown: list[str]) -> str:
    """For `--steps 100` given to train: "; write train.steps=100" (config keys are key=value, not flags)."""
    method = getattr(a, "method", None)
    if method is None or not hasattr(a, "overrides"):
        return ""
    try:
        from genlab.config import DataConfig, TrainConfig, leaf_keys
        from genlab.methods import get_method

        sections = {"data": DataConfig, "train": TrainConfig, "model": get_method(method).Config}
    except GenlabError:
        return ""
    keys = [f"{s}.{k}" for s, cls in sections.items() for k in leaf_keys(cls)]
    hints = []
    for i, flag in enumerate(unknown):
        if not flag.startswith("--"):
            continue
        name, _, value = flag[2:].partition("=")
        if not value and i + 1 < len(unknown) and not unknown[i + 1].startswith("-"):
            value = unknown[i + 1]
        name = name.replace("-", "_")
        matches = [k for k in keys if k == name or k.endswith("." + name)]
        if len(matches) == 1:
            hints.append(f"{matches[0]}={value or '...'}")
    return f"; config keys are key=value overrides: write {' '.join(hints)}" if hints else ""


def _unexpected(error: BaseException) -> str:
    """One line for a failure that is not the user's: what failed and where its full traceback was written."""
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    where = Path(tempfile.gettempdir()) / f"genlab-traceback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        where.write_text(f"genlab {genlab.__version__}, argv {sys.argv}\n{text}")
        saved = f"full traceback in {where}"
    except OSError:
        saved = "the traceback could not be saved"
    message = (str(error).strip().splitlines() or [""])[0][:200]
    return (f"error: unexpected {type(error).__name__}{': ' + message if message else ''} ({saved}; rerun with "
            "--debug to print it; please report it)")


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _format_warning
    parser = _parser()
    # Overrides (key=value) may stand anywhere, also after options: collect them from the leftovers.
    a, rest = parser.parse_known_args(argv)
    extra = [r for r in rest if "=" in r and not r.startswith("-")]
    if len(extra) != len(rest):
        unknown = [r for r in rest if r not in extra]
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_override_hint(a, unknown)}")
    if extra:
        if not hasattr(a, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        a.overrides = list(a.overrides) + extra
    if a.command is None:
        parser.print_help()
        return 2
    handler = {"train": _cmd_train, "sample": _cmd_sample, "data": _cmd_data, "methods": _cmd_methods,
               "demo": _cmd_demo, "eval": _cmd_eval, "compare": _cmd_compare, "reconstruct": _cmd_reconstruct,
               "interpolate": _cmd_interpolate, "translate": _cmd_translate, "invert": _cmd_invert,
               "export-evaluator": _cmd_export_evaluator, "zero-shot": _cmd_zero_shot,
               "export-embeddings": _cmd_export_embeddings,
               "retrieve": _cmd_zero_shot, "config": _cmd_config,
               "report": _cmd_report, "export": _cmd_export, "import": _cmd_import,
               "lora": _cmd_lora, "bench": _cmd_bench}[a.command]
    try:
        return handler(a)
    except GenlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as e:  # the trainer's message names the checkpoint that really exists
        print(str(e) or "interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)  # 130 for SIGINT, 143 for SIGTERM
    except Exception as e:  # a bug, or a failure we did not foresee: one line, the traceback in a file
        if a.debug:
            raise
        print(_unexpected(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
