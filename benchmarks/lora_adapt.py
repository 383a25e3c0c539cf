"""Adapt a trained run to new data with LoRA at several ranks and targets and with full fine-tuning, same steps.

    python benchmarks/lora_adapt.py --base runs/ddpm-mnist --data fashion-mnist --steps 1000 \\
        --ranks 1,4,16 --targets attn,conv1x1 --lora-lr 5e-3 --full-lr 1e-3 --n 2000 \\
        --fid-at 500 --data-root ../shared/data --out-dir runs/lora-adapt

Each configuration is one `genlab train lora --base RUN --data DATA --preset small rank=r alpha=r
targets=T train.steps=S` run (full fine-tuning: model.full_finetune=true, every weight of the base's
networks trained by the same step, data and EMA), then scored by FID of N samples (the base's own
sampler and --sample-steps, seed 0, EMA weights) against DATA:test with the data's own evaluator
network; --fid-at also scores earlier checkpoints of each run (how far from converged it is). The
base itself, unadapted, is scored the same way. Prints one Markdown row per configuration: trainable
parameters and their share of the base networks' parameters, FID, the last logged training loss and
the training wall time (the trainer's own clock: no loading, no preview grid). Finished runs in
--out-dir are reused (delete a folder, or its entry in results.json, to redo it); --targets is
repeatable and every targets set is run at every rank. One configuration per process (one CPU-queue job
each): `--ranks ''` runs full fine-tuning alone, `--no-full --ranks 4 --targets T` one adapter.

    python benchmarks/lora_adapt.py --base runs/ddpm-mnist --shares   # the share table only, no training
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from genlab import api
from genlab.evaluation import evaluate
from genlab.metrics.extractors import DEFAULT_EXTRACTORS
from genlab.runs import checkpoint_choice, load_run

# Rows of the share table (targets, conv_rank): each kind alone, then the combinations the adaptation table uses.
SHARE_TARGETS = [("attn", None), ("conv1x1", None), ("linear", None), ("emb_proj", None), ("conv", None),
                 ("attn,conv1x1", None), ("attn,emb_proj", None), ("attn,linear", None), ("attn,linear,conv1x1", None),
                 ("attn,conv", None), ("attn,conv", 1), ("attn,conv", 2), ("conv", 1)]


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


def _finished(run_dir: Path, steps: int) -> bool:
    """Whether run_dir holds a run trained to ``steps`` (its log's "end" entry at that step)."""
    log = run_dir / "log.jsonl"
    return log.is_file() and any(e.get("kind") == "end" and e.get("step") == steps and not e["values"].get("stopped_early")
                                 for e in map(json.loads, log.read_text().splitlines()))


def last_loss(run_dir: Path) -> float | None:
    """The last training loss the run logged (a mean over its last log interval)."""
    losses = [e["values"]["loss"] for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
              if e.get("kind") == "train" and "loss" in e.get("values", {})]
    return losses[-1] if losses else None


def print_shares(base_run: str, ranks: list[int], rows: list[tuple[str, int | None]]) -> None:
    """The share of the base networks' parameters an adapter trains, per targets (and conv_rank) and rank: the
    adapters are built as a lora run builds them and their parameters counted (no training)."""
    import copy

    from genlab.nn.lora import adapter_parameters, adapter_ranks, inject_adapter, select_targets

    base = load_run(base_run, device="cpu").method
    total = sum(p.numel() for network in base.ema_targets().values() for p in network.parameters())
    print(f"base networks: {total:,} parameters")
    print(f"| targets | layers | {' | '.join(f'rank {r}' for r in ranks)} |")
    print(f"|---|---|{'---|' * len(ranks)}")
    for targets, conv_rank in rows:
        cells, layers = [], 0
        for r in ranks:
            model = copy.deepcopy(base)
            paths = select_targets(model, targets, within=model.ema_targets())
            inject_adapter(model, paths, "share", adapter_ranks(model, paths, r, conv_rank), r)
            n, layers = sum(p.numel() for p in adapter_parameters(model)), len(paths)
            cells.append(f"{n:,} ({100 * n / total:.2f} %)")
        label = targets if conv_rank is None else f"{targets}, conv_rank={conv_rank}"
        print(f"| {label} | {layers} | {' | '.join(cells)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the trained run to adapt")
    p.add_argument("--data", default="fashion-mnist", help="data source to adapt to (scored against DATA:test)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--ranks", default="1,4,16")
    p.add_argument("--targets", action="append", help="layers the adapters wrap (model.targets); repeatable, "
                   "default attn,conv")
    p.add_argument("--no-full", action="store_true", help="skip the full fine-tuning baseline")
    p.add_argument("--lora-lr", type=float, help="train.lr of the LoRA runs (default: the preset's)")
    p.add_argument("--full-lr", type=float, help="train.lr of full fine-tuning (default: the preset's)")
    p.add_argument("--extractor", help="evaluator network of the FID (default: the data's own, e.g. mnist for mnist-bold)")
    p.add_argument("--n", type=int, default=1000, help="samples per FID")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--fid-at", default="", help="also score these earlier checkpoints of each run (steps, e.g. 500)")
    p.add_argument("--data-root")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run (repeatable), e.g. --set train.batch_size=32")
    p.add_argument("--shares", action="store_true", help="only print the trainable share per targets and rank")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.shares:
        print_shares(a.base, [int(r) for r in a.ranks.split(",")], [(t, None) for t in a.targets or []] or SHARE_TARGETS)
        return
    if a.out_dir is None:
        p.error("--out-dir is required (except with --shares)")
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora_lr = [f"train.lr={a.lora_lr}"] if a.lora_lr else []
    full_lr = [f"train.lr={a.full_lr}"] if a.full_lr else []
    configs = [] if a.no_full else [("full fine-tuning", "full", ["model.full_finetune=true", *full_lr])]  # baseline first
    for targets in a.targets or ["attn,conv"]:
        configs += [(f"rank {r}, {targets}", f"r{r}-{targets.replace(',', '+')}",
                     [f"model.rank={r}", f"model.alpha={r}", f"model.targets={targets}", *lora_lr])
                    for r in a.ranks.split(",") if r]
    fid_at = [int(s) for s in a.fid_at.split(",") if s]
    extractor = a.extractor or DEFAULT_EXTRACTORS.get(a.data, a.data)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}

    def fid(target, checkpoint=None) -> tuple[float, dict]:
        with checkpoint_choice(checkpoint):
            result = evaluate(target, "generation", ref=f"{a.data}:test", metrics="fid", n=a.n, steps=a.sample_steps,
                              seed=0, extractor=extractor, data_root=a.data_root, write=False)
        return float(result["metrics"]["fid"]), result["protocol"]

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=2))

    if "base" not in results:
        value, protocol = fid(a.base)
        results["base"] = {"fid": value, "protocol": protocol}
        save()
    for label, name, overrides in configs:
        if name in results:
            continue
        run_dir = out / name
        if not _finished(run_dir, a.steps):  # a run whose training ended but whose scoring did not is only scored
            api.train("lora", data=a.data, preset="small", run_dir=run_dir, data_root=a.data_root, progress=False,
                      overrides=[f"model.base={a.base}", f"train.steps={a.steps}", f"train.threads={a.threads}",
                                 "train.sample_n=16", *a.set, *overrides])
        trained, total = trainable_share(run_dir)
        entry = {"label": label, "overrides": overrides, "steps": a.steps, "trained": trained, "base_params": total,
                 "train_min": training_seconds(run_dir) / 60, "loss": last_loss(run_dir)}
        entry["fid"], entry["protocol"] = fid(run_dir)
        entry["fid_at"] = {str(s): fid(run_dir, s)[0] for s in fid_at if s < a.steps}
        results[name] = entry
        save()
        print(json.dumps({name: {k: v for k, v in entry.items() if k != "protocol"}}), flush=True)
    protocol = results["base"]["protocol"]
    print(f"FID: N = {protocol['n']}, {protocol.get('sampler')} {protocol.get('steps')} steps, seed {protocol['seed']}, "
          f"against {protocol['reference']} with the {protocol['extractor']} evaluator "
          f"(sha256 {protocol['extractor_sha256'][:12]})")
    full = results.get("full", {}).get("fid")
    earlier = "".join(f" FID at step {s} |" for s in fid_at)
    print(f"| configuration | LR | trained parameters (share) | FID |{earlier} FID / full FT | last loss | train time |")
    print(f"|---|---|---|---|{'---|' * len(fid_at)}---|---|---|")
    base_ratio = f"{results['base']['fid'] / full:.2f}" if full else "-"
    print(f"| base, not adapted | - | 0 | {results['base']['fid']:.1f} |{' - |' * len(fid_at)} {base_ratio} | - | - |")
    for _, name, _ in configs:
        r = results[name]
        lr = next((o.split("=", 1)[1] for o in r["overrides"] if o.startswith("train.lr=")), "preset")
        cells = "".join(f" {r['fid_at'][str(s)]:.1f} |" if str(s) in r.get("fid_at", {}) else " - |" for s in fid_at)
        ratio = f"{r['fid'] / full:.2f}" if full else "-"
        print(f"| {r['label']} | {lr} | {r['trained']:,} ({100 * r['trained'] / r['base_params']:.2f} %) | "
              f"{r['fid']:.1f} |{cells} {ratio} | {r['loss']:.4f} | {r['train_min']:.1f} min |")


if __name__ == "__main__":
    main()
