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

    c = sub.add_parser("compare", help="one table and one bar chart of several runs' metrics",
                       description="Print a Markdown table of the newest metrics.json entry of each run (or metrics "
                                   "JSON file) and write a PNG bar chart. Evaluate the runs first with `genlab eval`.")
    c.add_argument("runs", nargs="+", help="run folders or metrics JSON files")
    c.add_argument("--ref", help="use the entries scored against this SOURCE:SPLIT (default: each run's newest)")
    c.add_argument("--out", default="compare.png", help="bar chart file (default compare.png)")

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
    if a.data is not None:
        raise GenlabError(f"--data {a.data} is for `genlab eval ref`; to score a data split write it as the target, "
                          f"e.g. genlab eval {a.data}:{a.split} --ref {a.ref}")
    result = evaluation.evaluate(a.target, ref=a.ref, metrics=a.metrics, n=a.n,
                                 sampler=a.sampler, steps=a.steps, seed=a.seed, weights=a.weights, extractor=extractor,
                                 data_root=a.data_root, ref_n=a.ref_n, batch_size=a.batch_size, json_path=a.json,
                                 progress=not a.no_progress)
    for name, value in result["metrics"].items():
        std = result["std"].get(name)
        print(f"{name} {_format_value(value)}" + (f" +- {_format_value(std)}" if std is not None else ""))
    for key, value in result["protocol"].items():
        if isinstance(value, dict):
            value = " ".join(f"{k}={_format_value(v)}" for k, v in value.items())
        print(f"# {key}: {_format_value(value)}")
    return 0


def _cmd_compare(a) -> int:
    from genlab import evaluation

    table, _ = evaluation.compare(a.runs, ref=a.ref, out=a.out)
    print(table)
    print(a.out)
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
               "demo": _cmd_demo, "eval": _cmd_eval, "compare": _cmd_compare}[a.command]
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
