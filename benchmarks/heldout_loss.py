"""The diffusion training loss of runs on held-out images, with the same t and noise draws for every run.

    python benchmarks/heldout_loss.py runs/dit-* --data mnist:test --n 10000 --data-root ../shared/data

Training losses in log.jsonl are noisy (one batch per step, random t) and include condition dropout;
this scores every run on the same images, timesteps and noise (seed), with their true labels, so the
differences between runs are not sampling noise. Prints one Markdown row per run: method, the
network's conditioning (DiT) or network, training steps and minutes, the held-out loss.
"""

from __future__ import annotations

import argparse
import json

import torch

from genlab import api
from genlab.data import DataConfig, load_data, split_source_ref


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="diffusion run folders (ddpm, dit, ldm)")
    p.add_argument("--data", default="mnist:test", help="held-out images SOURCE:SPLIT")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    source, split = split_source_ref(a.data)
    held = load_data(DataConfig(source=source, split=split or "test", root=a.data_root, limit=a.n))
    images, labels = held.to_model_range()[: a.n], held.labels[: a.n]
    print(f"| run | method | network | steps | train min | held-out loss ({a.data}, N={len(images)}, seed {a.seed}, "
          f"{a.weights}) |")
    print("|---|---|---|---|---|---|")
    for path in a.runs:
        run = api.load_run(path, weights=a.weights)
        method, model = run.method, run.config.model
        network = model.network  # every diffusion config names its denoiser
        if network == "dit":
            network = f"dit, {model.dit.conditioning}"
        loss = method.heldout_loss(images, labels, seed=a.seed)
        log = [json.loads(line) for line in (run.path / "log.jsonl").read_text().splitlines() if line.strip()]
        minutes = max((e["values"].get("elapsed_s", 0) for e in log if e.get("kind") == "train"), default=0) / 60
        print(f"| {run.path.name} | {run.config.method} | {network} | {run.step} | {minutes:.1f} | {loss:.5f} |",
              flush=True)


if __name__ == "__main__":
    main()
