"""Adapt a trained run to new data with LoRA at several ranks and with full fine-tuning, same steps.

    python benchmarks/lora_adapt.py --base runs/ddpm-mnist --data fashion-mnist --steps 300 \\
        --ranks 1,4,16 --n 1000 --sample-steps 20 --data-root ../shared/data --out-dir runs/lora-adapt

Each configuration is one `genlab train lora --base RUN --data DATA --preset small rank=r alpha=r
train.steps=S` run (full fine-tuning: model.full_finetune=true, every weight of the base's networks
trained by the same step, data, learning rate and EMA), then scored by FID of N samples (DDIM with
--sample-steps, seed 0, EMA weights) against DATA:test with the data's own evaluator network. The
base itself, unadapted, is scored the same way. Prints one Markdown row per configuration: trainable
parameters and their share of the base networks' parameters, FID, training wall time (the trainer's own
clock: no loading, no preview grid). Finished runs
in --out-dir are reused (delete a folder to retrain it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from genlab import api
from genlab.evaluation import evaluate
from genlab.runs import load_run


def trainable_share(run_dir: Path) -> tuple[int, int]:
    """(trained parameters, parameters of the base's networks) of a lora run."""
    method = load_run(run_dir, device="cpu").method
    trained = sum(p.numel() for p in method.trainable_parameters())
    base = sum(p.numel() for network in method.networks.values() for name, p in network.named_parameters()
               if ".lora_" not in name)
    return trained, base


def training_seconds(run_dir: Path) -> float:
    """Seconds the trainer spent training (its own clock in the last checkpoint: no loading, no preview grid)."""
    from genlab.train.checkpoint import STATE_FILE, latest_checkpoint

    return float(json.loads((latest_checkpoint(run_dir) / STATE_FILE).read_text())["elapsed_seconds"])


def print_shares(base_run: str, ranks: list[int], targets: list[str]) -> None:
    """The share of the base networks' parameters an adapter trains, per targets and rank (no training)."""
    import copy

    from genlab.nn.lora import adapter_parameters, inject_adapter, select_targets

    base = load_run(base_run, device="cpu").method
    total = sum(p.numel() for network in base.ema_targets().values() for p in network.parameters())
    print(f"| targets | layers | {' | '.join(f'rank {r}' for r in ranks)} |")
    print(f"|---|---|{'---|' * len(ranks)}")
    for t in targets:
        cells, layers = [], 0
        for r in ranks:
            model = copy.deepcopy(base)
            paths = select_targets(model, t, within=model.ema_targets())
            inject_adapter(model, paths, "share", r, r)
            n, layers = sum(p.numel() for p in adapter_parameters(model)), len(paths)
            cells.append(f"{n:,} ({100 * n / total:.2f} %)")
        print(f"| {t} | {layers} | {' | '.join(cells)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the trained run to adapt")
    p.add_argument("--data", default="fashion-mnist", help="data source to adapt to (scored against DATA:test)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--ranks", default="1,4,16")
    p.add_argument("--targets", default="attn,conv", help="layers the adapters wrap (model.targets)")
    p.add_argument("--no-full", action="store_true", help="skip the full fine-tuning baseline")
    p.add_argument("--n", type=int, default=1000, help="samples per FID")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--data-root")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run (repeatable), e.g. --set train.lr=5e-3")
    p.add_argument("--shares", action="store_true", help="only print the trainable share per targets and rank")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.shares:
        print_shares(a.base, [int(r) for r in a.ranks.split(",")], ["attn", "linear", "conv", "attn,conv"])
        return
    if a.out_dir is None:
        p.error("--out-dir is required (except with --shares)")
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = [] if a.no_full else [("full fine-tuning", "full", ["model.full_finetune=true"])]  # the baseline first
    configs += [(f"rank {r}", f"r{r}", [f"model.rank={r}", f"model.alpha={r}"]) for r in a.ranks.split(",") if r]
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}

    def fid(target) -> float:
        result = evaluate(target, "generation", ref=f"{a.data}:test", metrics="fid", n=a.n, steps=a.sample_steps,
                          seed=0, extractor=a.data, data_root=a.data_root, write=False)
        return float(result["metrics"]["fid"])

    if "base" not in results:
        results["base"] = {"fid": fid(a.base)}
        results_file.write_text(json.dumps(results, indent=2))
    for label, name, overrides in configs:
        if name in results:
            continue
        run_dir = out / name
        api.train("lora", data=a.data, preset="small", run_dir=run_dir, data_root=a.data_root, progress=False,
                  overrides=[f"model.base={a.base}", f"train.steps={a.steps}", f"train.threads={a.threads}",
                             f"model.targets={a.targets}", "train.sample_n=16", *a.set, *overrides])
        minutes = training_seconds(run_dir) / 60
        trained, total = trainable_share(run_dir)
        results[name] = {"label": label, "trained": trained, "base_params": total, "train_min": minutes,
                         "fid": fid(run_dir)}
        results_file.write_text(json.dumps(results, indent=2))
        print(json.dumps({name: results[name]}), flush=True)
    print(f"| configuration | trained parameters | share of the base network | FID ({a.data}:test, N={a.n}) | "
          "train wall time |")
    print("|---|---|---|---|---|")
    print(f"| base, not adapted | 0 | 0 % | {results['base']['fid']:.2f} | - |")
    for _, name, _ in configs:
        r = results[name]
        print(f"| {r['label']} | {r['trained']:,} | {100 * r['trained'] / r['base_params']:.2f} % | {r['fid']:.2f} | "
              f"{r['train_min']:.1f} min |")


if __name__ == "__main__":
    main()
