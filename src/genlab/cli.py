"""The ``genlab`` command line: parses arguments, calls :mod:`genlab.api`, prints. No logic of its own."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from genlab.errors import GenlabError

EPILOG_TRAIN = """\
overrides are key=value pairs on the run's config, e.g.
  train.steps=3000 train.lr=1e-4 model.unet.base_channels=32 data.limit=1000
a bare leaf name works when it is unique (steps=3000). Unknown keys are rejected with the valid ones.

examples:
  genlab train ddpm --data mnist5k --preset small
  genlab train ddpm --data mnist --data-root ../shared/data --preset small train.steps=8000
  genlab train ddpm --run-dir runs/x --resume train.steps=6000
"""


EPILOG_EVAL = """\
examples:
  genlab eval runs/demo --ref mnist:test --n 10000 --sampler ddim --steps 50
  genlab eval samples.npz --ref mnist:test --metrics fid,kid
  genlab eval mnist:train --ref mnist:test --n 10000 --data-root ../shared/data
  genlab eval ref --data mnist --split test --data-root ../shared/data
"""


EPILOG_SAMPLE = """\
guidance (diffusion models):
  --guidance-scale w   classifier-free guidance, eps = eps_uncond + w (eps_cond - eps_uncond):
                       w = 1 is the plain conditional model, w = 0 the unconditional one
                       (the (1 + w') form of some papers is w = 1 + w')
  --negative-class k   the unconditional branch is replaced by class k ("not like a k")
  --classifier RUN --classifier-scale s    classifier guidance with a noisy-classifier run
  --rule NAME[:weight[:key=value,...]]     rule guidance on the predicted x0, e.g. --rule symmetry:50

examples:
  genlab sample runs/demo --n 64 --out grid.png --sampler dpmpp-2m --steps 10
  genlab sample runs/cfg --class 3 --guidance-scale 3 --out threes.png
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


def _class_label(text: str) -> int | str:
    """--class: a class index or the word `all`."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a class index (0, 1, ...) or `all`") from None


def _sampling_options(a, n: int) -> dict:
    """The sampling options given on the command line, as keyword arguments of Method.sample."""
    import torch

    options = {k: v for k, v in (("sampler", a.sampler), ("steps", a.steps), ("eta", getattr(a, "eta", None)),
                                 ("guidance_scale", a.guidance_scale), ("classifier", a.classifier),
                                 ("classifier_scale", a.classifier_scale), ("rules", a.rule),
                                 ("truncation", a.truncation), ("temperature", a.temperature), ("top_k", a.top_k))
               if v is not None}
    if getattr(a, "class_label", None) is not None:
        # "all": the run resolves it to balanced labels 0, 1, ..., C-1, 0, 1, ... (it knows C).
        options["labels"] = "all" if a.class_label == "all" else torch.full((n,), a.class_label, dtype=torch.long)
    if a.negative_class is not None:
        options["negative_labels"] = torch.full((n,), a.negative_class, dtype=torch.long)
    return options


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genlab",
        description="genlab: train, sample and evaluate image generative models from first principles.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a model; prints the run folder as the last line",
                       description="Train METHOD on a data source and write a run folder (config, checkpoints, "
                                   "log.jsonl, sample grids).",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("method", help="model family, e.g. ddpm (see `genlab methods`)")
    t.add_argument("--data", help="data source: digits, mnist5k (default), mnist, fashion-mnist, cifar10, folder:PATH")
    t.add_argument("--data-root", help="folder holding mnist/, fashion_mnist/, cifar10 data (default: $GENLAB_DATA)")
    t.add_argument("--preset", help="preset name (e.g. small, full) or a path to a YAML file")
    t.add_argument("--run-dir", help="run folder (default runs/<method>-<data>-<timestamp>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--codes", metavar="RUN", help="pixelcnn/gpt: the vqvae, vqgan or vq-ae run whose code maps to model "
                                                   "(sets model.codes; --data defaults to that run's data)")
    t.add_argument("--autoencoder", metavar="RUN", help="ldm: the kl-ae or vq-ae run whose latents to diffuse "
                                                        "(sets model.autoencoder; --data defaults to that run's data)")
    t.add_argument("--gan", metavar="RUN", help="gan-encoder: the gan or stylegan run to invert (sets model.gan)")
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
                   help="class K for every sample, or `all`: classes 0..C-1 in turn (class-conditional runs)")
    s.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    s.add_argument("--batch-size", type=int, default=256, help="images per forward batch")
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
    e.add_argument("--n", type=int, help="images to score: samples of a run (default 10000), the first N of a file or split "
                                        "(default all); with `eval ref`: reference images (default all)")
    e.add_argument("--sampler", help="sampler for a run (default: the run's config)")
    e.add_argument("--steps", type=int, help="sampling steps for a run (default: the run's config)")
    e.add_argument("--seed", type=int, default=0, help="sampling and metric seed (default 0)")
    e.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights of a run")
    e.add_argument("--extractor", help="mnist, fashion-mnist, inception, an evaluator .safetensors or Inception .pth "
                                       "(default: the shipped evaluator of the reference data, else inception)")
    e.add_argument("--inception-weights", help="file of the FID Inception weights (else $GENLAB_INCEPTION_WEIGHTS)")
    e.add_argument("--ref-n", type=int, help="use only the first N reference images (default all)")
    e.add_argument("--data-root", help="folder holding mnist/, fashion_mnist/, cifar10 data (default: $GENLAB_DATA)")
    e.add_argument("--json", help="also write the result (values and protocol) to this JSON file")
    e.add_argument("--batch-size", type=int, default=500, help="images per forward batch (default 500)")
    e.add_argument("--data", help="with `eval ref`: the data source (e.g. mnist)")
    e.add_argument("--split", default="test", help="with `eval ref`: the split (default test)")
    e.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is often faster on a busy CPU)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--kind", choices=("auto", "generation", "reconstruction"), default="auto",
                   help="for a run: generation metrics of samples, reconstruction metrics (MSE, PSNR, SSIM, and the "
                        "ELBO / codebook usage where they apply) on held-out images, or auto: whatever the run does")
    e.add_argument("--recon-data", metavar="SOURCE:SPLIT", help="held-out images for reconstruction (or pix2pix "
                                                               "translation) metrics (default: the run's test split; "
                                                               "mnist:test for mnist5k)")
    e.add_argument("--class", dest="class_label", type=_class_label, metavar="K|all",
                   help="sample class K only, or `all`: every class equally often; also reports class_accuracy, the "
                        "share of samples the evaluator assigns to their requested class (class-conditional runs, "
                        "or --classifier guidance)")
    _add_sampling_options(e)

    r = sub.add_parser("reconstruct", help="inputs above, reconstructions below, for an autoencoder-family run",
                       description="Reconstruct held-out images with an autoencoder-family run (ae, dae, vae, kl-ae, "
                                   "vqvae, vqgan, vq-ae) and save one PNG: the inputs in the upper rows, their "
                                   "reconstructions in the rows below. Prints the PSNR of these images.")
    r.add_argument("run", help="run folder")
    r.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    r.add_argument("--out", required=True, help="output .png")
    r.add_argument("--data", metavar="SOURCE:SPLIT", help="images to reconstruct (default: the run's test split)")
    r.add_argument("--data-root", help="folder holding mnist/, fashion_mnist/, cifar10 data (default: $GENLAB_DATA)")
    r.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")

    i = sub.add_parser("interpolate", help="walk the latent space between pairs of images (or GAN latents)",
                       description="Autoencoders: encode pairs of held-out images and decode the straight line between "
                                   "their latents. GANs: decode the great-circle path between two random latents. One "
                                   "row per pair, from the first endpoint on the left to the second on the right.")
    i.add_argument("run", help="run folder")
    i.add_argument("--out", required=True, help="output .png")
    i.add_argument("--pairs", type=int, default=4, help="number of rows (default 4)")
    i.add_argument("--steps", type=int, default=8, help="images per row, endpoints included (default 8)")
    i.add_argument("--seed", type=int, default=0, help="which images / latents are paired (default 0)")
    i.add_argument("--data", metavar="SOURCE:SPLIT", help="images to pair (default: the run's test split)")
    i.add_argument("--data-root", help="folder holding mnist/, fashion_mnist/, cifar10 data (default: $GENLAB_DATA)")
    i.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")

    tr = sub.add_parser("translate", help="image-to-image translation with a pix2pix run",
                        description="Translate input images (A) to outputs (B) with a pix2pix run. --input is a PNG "
                                    "or an .npz (uint8 N x H x W x C); without --input, held-out images are turned into "
                                    "the run's task inputs (edges, masked, low-res) and the PNG shows input / output / "
                                    "target rows with the PSNR and SSIM printed.")
    tr.add_argument("run", help="pix2pix run folder")
    tr.add_argument("--input", help="input image (.png) or images (.npz)")
    tr.add_argument("--out", required=True, help="output .png (grid) or .npz")
    tr.add_argument("--n", type=int, default=16, help="without --input: number of held-out images (default 16)")
    tr.add_argument("--data", metavar="SOURCE:SPLIT", help="without --input: held-out images (default: the run's test split)")
    tr.add_argument("--data-root", help="folder holding mnist/, fashion_mnist/, cifar10 data (default: $GENLAB_DATA)")
    tr.add_argument("--seed", type=int, default=0, help="seed of random task inputs (masks) (default 0)")
    tr.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")

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
    v.add_argument("--data", metavar="SOURCE:SPLIT", help="without --image: held-out images (default: the run's test split)")
    v.add_argument("--n", type=int, default=16, help="without --image: number of held-out images (default 16)")
    v.add_argument("--out", required=True, help="output .png")
    v.add_argument("--space", choices=("z", "w", "w+"), help="latent space (default: w for StyleGAN, z for DCGAN)")
    v.add_argument("--steps", type=int, default=300, help="optimisation steps (default 300; 0 with --encoder: encoder only)")
    v.add_argument("--lr", type=float, default=0.05, help="Adam learning rate on the latent (default 0.05)")
    v.add_argument("--perceptual-weight", type=float, default=0.1, help="weight of the perceptual term (default 0.1)")
    v.add_argument("--encoder", metavar="RUN", help="a gan-encoder run trained on this GAN: its prediction starts the search")
    v.add_argument("--edit", type=int, metavar="K", help="also show edits along the K-th principal direction (0 = first)")
    v.add_argument("--strength", type=float, default=3.0, help="edit range in standard deviations (default 3)")
    v.add_argument("--data-root", help="folder holding mnist/, fashion_mnist/, cifar10 data (default: $GENLAB_DATA)")
    v.add_argument("--seed", type=int, default=0, help="seed (default 0)")

    c = sub.add_parser("compare", help="one table and one bar chart of several runs' metrics",
                       description="Print a Markdown table of the newest metrics.json entry of each run (or metrics "
                                   "JSON file) and write a PNG bar chart. Evaluate the runs first with `genlab eval`.")
    c.add_argument("runs", nargs="+", help="run folders or metrics JSON files")
    c.add_argument("--ref", help="use the entries scored against this SOURCE:SPLIT (default: each run's newest)")
    c.add_argument("--out", default="compare.png", help="bar chart file (default compare.png)")

    rp = sub.add_parser("report", help="one self-contained HTML page of runs: curves, grids, metrics, warnings",
                        description="Write an HTML report of one run (config and command, loss / LR / grad-norm "
                                    "curves, sample grids over training, every evaluation with its protocol, sweeps, "
                                    "warnings) or a comparison of several; images are inline, it opens from disk.")
    rp.add_argument("runs", nargs="+", help="run folders")
    rp.add_argument("--out", help="HTML file (default RUN/report.html for one run, report.html for several)")

    d = sub.add_parser("data", help="data sources", description="Inspect data sources.")
    dsub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dsub.add_parser("list", help="list the data sources")

    sub.add_parser("methods", help="list the model families")

    demo = sub.add_parser("demo", help="train a small DDPM on mnist5k, sample, write runs/demo",
                          description="The five-minute tour: trains the small DDPM preset on the bundled mnist5k "
                                      "digits, samples with DDIM and writes a grid into the run folder.")
    demo.add_argument("--run-dir", default="runs/demo", help="run folder (default runs/demo)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. train.steps=500)")
    return p


def _cmd_train(a) -> int:
    from genlab import api

    parents = [f"model.{k}={v}" for k, v in (("codes", a.codes), ("autoencoder", a.autoencoder), ("gan", a.gan))
               if v is not None]
    run = api.train(a.method, data=a.data, preset=a.preset, overrides=parents + list(a.overrides), run_dir=a.run_dir,
                    resume=a.resume, data_root=a.data_root, progress=not a.no_progress, announce=print)
    print(run.path)
    return 0


def _cmd_sample(a) -> int:
    import torch

    from genlab import api
    from genlab.imageio import save_images

    if a.n < 1:
        raise GenlabError(f"--n must be at least 1, got {a.n}")
    out = Path(a.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise GenlabError(f"--out {out}: the file must end in .png (a grid) or .npz (uint8 images N x H x W x C)")
    run = api.load_run(a.run, weights=a.weights)
    options = _sampling_options(a, a.n)
    images = run.sample(a.n, seed=a.seed, batch_size=a.batch_size, progress=True, **options)
    save_images(images, out)
    print(out)
    return 0


def _format_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _cmd_eval(a) -> int:
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
        print(f"reference {a.data}:{a.split}: {ref.n} images, extractor {ref.key['extractor']} "
              f"(sha256 {ref.key['extractor_sha256'][:12]}...)")
        print(ref.path if ref.path is not None else "(not cached: the cache folder is not writable)")
        return 0
    if a.kind != "generation" and Path(a.target).is_dir():
        from genlab.methods import get_method
        from genlab.config import read_config_file
        from genlab.methods.capabilities import Generates, has

        cls = get_method(read_config_file(Path(a.target) / "config.yaml")["method"])
        if hasattr(cls, "translate"):  # image-to-image: PSNR / SSIM on held-out pairs
            _print_result(evaluation.evaluate_translation(a.target, data=a.recon_data, n=a.n, weights=a.weights,
                                                          data_root=a.data_root, seed=a.seed))
            return 0
        reconstructs, generates = hasattr(cls, "reconstruct"), has(cls, Generates)
        if a.kind == "reconstruction" and not reconstructs:
            raise GenlabError(f"{a.target}: a {cls.name} run does not reconstruct images; use --kind generation")
        if reconstructs:
            result = evaluation.evaluate_reconstruction(a.target, data=a.recon_data, n=a.n, weights=a.weights,
                                                        data_root=a.data_root, batch_size=a.batch_size, seed=a.seed,
                                                        json_path=None if generates else a.json,
                                                        progress=not a.no_progress)
            _print_result(result)
            if a.kind == "reconstruction" or not generates:
                return 0
    if a.data is not None:
        raise GenlabError(f"--data {a.data} is for `genlab eval ref`; to score a data split write it as the target, "
                          f"e.g. genlab eval {a.data}:{a.split} --ref {a.ref}")
    result = evaluation.evaluate(a.target, ref=a.ref, metrics=a.metrics, n=a.n,
                                 sampler=a.sampler, steps=a.steps, seed=a.seed, weights=a.weights, extractor=extractor,
                                 data_root=a.data_root, ref_n=a.ref_n, batch_size=a.batch_size, json_path=a.json,
                                 progress=not a.no_progress,
                                 sample_options=_sampling_options(a, a.n or evaluation.DEFAULT_N))
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
    shown = inputs if inputs.shape[1] == target.shape[1] else inputs[:, : target.shape[1]]
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


def _cmd_invert(a) -> int:
    import torch

    from genlab import api, inversion
    from genlab.data import to_model_range
    from genlab.imageio import save_grid
    from genlab.methods.capabilities import GANLatent

    run = api.load_run(a.run)
    run._need(GANLatent, "be inverted (it has no generator latent space)")
    method = run.method
    d = method.data_info
    if a.image is not None:
        target = to_model_range(_read_images_file(Path(a.image), d.channels))
        if tuple(target.shape[-2:]) != (d.image_size, d.image_size):
            raise GenlabError(f"--image {a.image}: images are {target.shape[-2]}x{target.shape[-1]}, the GAN makes "
                              f"{d.image_size}x{d.image_size}; resize them first")
    else:
        target = api.heldout_images(run, a.data, a.n, a.data_root).to_model_range()
    space = inversion.latent_space(method, a.space)
    init, encoder = None, None
    if a.encoder is not None:
        encoder = api.load_run(a.encoder).method
        if getattr(encoder, "name", None) != "gan-encoder":
            raise GenlabError(f"--encoder {a.encoder}: not a gan-encoder run")
        if encoder.space != space:
            raise GenlabError(f"--encoder predicts {encoder.space} but --space is {space}")
        with torch.no_grad():
            init = encoder.invert(target.to(encoder.device)).to(method.device)
    elif a.steps == 0:
        raise GenlabError("--steps 0 means no optimisation: give --encoder RUN, or steps > 0")
    result = inversion.project(method, target, space=space, steps=a.steps, lr=a.lr,
                               perceptual_weight=a.perceptual_weight, init=init)
    psnr = inversion.psnr_of(result.images, target)
    rows = [target, result.images.cpu()]
    nrow = min(len(target), 16)
    if a.edit is not None:
        if encoder is not None:
            held = api.heldout_images(run, a.data, 1000, a.data_root).to_model_range()
            with torch.no_grad():
                pool = torch.cat([encoder.invert(held[i: i + 250].to(encoder.device)) for i in range(0, len(held), 250)])
        elif space != "z":  # GANSpace: PCA of mapped styles
            g = torch.Generator().manual_seed(a.seed)
            with torch.no_grad():
                pool = method.mapping(torch.randn(2000, method.latent_dim, generator=g).to(method.device))
        else:
            raise GenlabError("--edit on a DCGAN needs --encoder RUN: its directions come from encoded real images")
        _, directions, stds = inversion.principal_directions(pool.flatten(1).cpu(), k=a.edit + 1)
        if a.edit >= len(directions):
            raise GenlabError(f"--edit {a.edit}: only {len(directions)} directions available")
        strengths = torch.linspace(-a.strength, a.strength, 7)
        if space == "w+":  # a style direction moves every layer's w alike
            directions = directions[:, None].expand(-1, method.num_ws, -1)
        edits = inversion.edit_along(method, result.latents, directions[a.edit], float(stds[a.edit]), space, strengths)
        save_grid(edits.flatten(0, 1).cpu(), a.out, nrow=len(strengths), scale=2)
        print(f"psnr {psnr.mean():.2f} dB; edits along direction {a.edit} (std {float(stds[a.edit]):.3g}) "
              f"from -{a.strength} to +{a.strength} std, one row per image")
        print(a.out)
        return 0
    save_grid(torch.cat([_pad_rows(r, nrow) for r in rows]), a.out, nrow=nrow, scale=2)
    how = ("encoder" if a.steps == 0 else f"encoder + {a.steps} steps") if encoder is not None else f"{a.steps} steps"
    print(f"psnr {psnr.mean():.2f} dB over {len(target)} images ({space}, {how}; targets above, inversions below)")
    print(a.out)
    return 0


def _cmd_compare(a) -> int:
    from genlab import evaluation

    table, _ = evaluation.compare(a.runs, ref=a.ref, out=a.out)
    print(table)
    print(a.out)
    return 0


def _cmd_report(a) -> int:
    from genlab.report.html import write_report

    out = a.out if a.out is not None or len(a.runs) == 1 else "report.html"
    print(write_report(a.runs, out))
    return 0


def _cmd_data(a) -> int:
    from genlab.data import list_sources

    if a.data_command != "list":
        print("usage: genlab data list", file=sys.stderr)
        return 2
    for name, description, needs_root in list_sources():
        print(f"{name:16s} {'(data root) ' if needs_root else ''}{description}")
    return 0


def _cmd_methods(a) -> int:
    from genlab.config import list_presets
    from genlab.methods import METHODS

    for name in sorted(METHODS):
        print(f"{name:18s} presets: {', '.join(list_presets(name)) or '-'}")
    return 0


def _cmd_demo(a) -> int:
    from genlab.demo import run_demo

    run_demo(Path(a.run_dir), a.overrides)
    return 0


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings for people: one line naming the problem (no source file or code line)."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _format_warning
    parser = _parser()
    # Overrides (key=value) may stand anywhere, also after options: collect them from the leftovers.
    a, rest = parser.parse_known_args(argv)
    extra = [r for r in rest if "=" in r and not r.startswith("-")]
    if len(extra) != len(rest):
        parser.error(f"unrecognized arguments: {' '.join(r for r in rest if r not in extra)}")
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
               "report": _cmd_report}[a.command]
    try:
        return handler(a)
    except GenlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
