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
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    s = sub.add_parser("sample", help="draw samples from a run into a .png grid or an .npz file",
                       description="Sample from a trained run. FILE ending in .png writes a grid; .npz writes "
                                   "'images' as uint8 N x H x W x C.")
    s.add_argument("run", help="run folder")
    s.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same images")
    s.add_argument("--out", required=True, help="output file: .png or .npz")
    s.add_argument("--sampler", help="ddpm, ddim, euler, heun, dpmpp-2m (default: the run's config)")
    s.add_argument("--steps", type=int, help="sampling steps (default: the run's config)")
    s.add_argument("--eta", type=float, help="DDIM eta: 0 deterministic, 1 ancestral-like")
    s.add_argument("--class", dest="class_label", type=int, help="class label for class-conditional models")
    s.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    s.add_argument("--batch-size", type=int, default=256, help="images per forward batch")

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

    run = api.train(a.method, data=a.data, preset=a.preset, overrides=a.overrides, run_dir=a.run_dir,
                    resume=a.resume, data_root=a.data_root, progress=not a.no_progress)
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
    options = {k: v for k, v in (("sampler", a.sampler), ("steps", a.steps), ("eta", a.eta)) if v is not None}
    if a.class_label is not None:
        options["labels"] = torch.full((a.n,), a.class_label, dtype=torch.long)
    images = run.sample(a.n, seed=a.seed, batch_size=a.batch_size, progress=True, **options)
    save_images(images, out)
    print(out)
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
        print(f"{name:12s} presets: {', '.join(list_presets(name)) or '-'}")
    return 0


def _cmd_demo(a) -> int:
    from genlab.demo import run_demo

    run_demo(Path(a.run_dir), a.overrides)
    return 0


def main(argv: list[str] | None = None) -> int:
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
               "demo": _cmd_demo}[a.command]
    try:
        return handler(a)
    except GenlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
