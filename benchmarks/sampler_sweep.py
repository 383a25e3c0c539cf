"""FID against the number of model evaluations (NFE) for every sampler, on one trained diffusion run.

    python benchmarks/sampler_sweep.py RUN --samplers ddpm,ddim,euler,heun,dpmpp-2m \\
        --nfe 5,10,20,50,100,250,1000 --n 10000 --ref mnist:test --out docs/img/sampler_sweep.png

For each sampler and each NFE target the sampler is given the steps that spend about that many
evaluations (Heun spends 2 steps - 1, the others 1 per step), the evaluations are counted on the
network itself (a forward hook, one batch), and the run is scored with `genlab.evaluation.evaluate`
(so every point is also merged into RUN/metrics.json with its protocol). Points already in the JSON
file (--json, default next to --out) are not recomputed, so an interrupted sweep resumes. Prints a
Markdown table (FID, NFE, sampling ms per image) and writes the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from genlab import api, evaluation

# Evaluations a sampler spends for `steps` steps (samplers.py docstrings); inverted below.
_NFE_PER_STEPS = {"heun": lambda steps: 2 * steps - 1}


def steps_for(sampler: str, nfe: int) -> int:
    """The step count whose evaluation count is closest to ``nfe`` (ties: fewer steps)."""
    cost = _NFE_PER_STEPS.get(sampler, lambda steps: steps)
    return min(range(1, nfe + 1), key=lambda steps: (abs(cost(steps) - nfe), steps))


def counted_nfe(run: api.Run, sampler: str, steps: int, options: dict) -> int:
    """Network forward calls of one 2-image batch with these settings (a batched CFG pass counts once)."""
    calls = 0

    def count(*_):
        nonlocal calls
        calls += 1

    handle = run.method.backbone.register_forward_hook(count)
    try:  # Run.sample: resolves labels="all" and slices per-image options to the batch, as evaluate does
        run.sample(2, seed=0, sampler=sampler, steps=steps, **{k: v for k, v in options.items() if v is not None})
    finally:
        handle.remove()
    return calls


def plot(points: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for sampler in dict.fromkeys(p["sampler"] for p in points):
        rows = sorted((p for p in points if p["sampler"] == sampler), key=lambda p: p["nfe"])
        ax.plot([p["nfe"] for p in rows], [p["fid"] for p in rows], marker="o", label=sampler)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="diffusion run folder (ddpm, dit, ldm)")
    p.add_argument("--samplers", default="ddpm,ddim,euler,heun,dpmpp-2m")
    p.add_argument("--nfe", default="5,10,20,50,100,250,1000", help="NFE targets, comma-separated")
    p.add_argument("--max-nfe", default="", help="per-sampler caps, e.g. heun=100,euler=250 (skip costlier points)")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--ref", default="mnist:test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="class_label", default=None,
                   help="class-conditional runs: `all` (balanced classes, no guidance) or a class index")
    p.add_argument("--data-root")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/img/sampler_sweep.png")
    p.add_argument("--json", help="results file (default: --out with .json)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    json_path = Path(a.json) if a.json else out.with_suffix(".json")
    done = json.loads(json_path.read_text()) if json_path.exists() else []
    caps = {k: int(v) for k, v in (item.split("=") for item in a.max_nfe.split(",") if item)}
    run = api.load_run(a.run)
    labels = None if a.class_label is None else (a.class_label if a.class_label == "all" else
                                                 torch.full((a.n,), int(a.class_label), dtype=torch.long))
    options = {"labels": labels}
    for sampler in a.samplers.split(","):
        for target in (int(v) for v in a.nfe.split(",")):
            if target > caps.get(sampler, math.inf):
                continue
            steps = steps_for(sampler, target)
            key = (sampler, steps, a.n, a.seed)
            if any((d["sampler"], d["steps"], d["n"], d["seed"]) == key for d in done):
                continue
            nfe = counted_nfe(run, sampler, steps, options)
            result = evaluation.evaluate(a.run, ref=a.ref, metrics="fid,kid", n=a.n, sampler=sampler, steps=steps,
                                         seed=a.seed, data_root=a.data_root, batch_size=a.batch_size,
                                         sample_options={k: v for k, v in options.items() if v is not None})
            protocol = result["protocol"]
            point = {"sampler": sampler, "steps": steps, "nfe": nfe, "n": a.n, "seed": a.seed,
                     "fid": result["metrics"]["fid"], "kid": result["metrics"]["kid"],
                     "sample_ms_per_image": 1000 * protocol["seconds"]["sample"] / a.n,
                     "extractor": protocol["extractor"], "extractor_sha256": protocol["extractor_sha256"],
                     "reference": protocol["reference"], "weights": protocol["weights"],
                     "checkpoint_step": protocol["checkpoint_step"], "threads": a.threads}
            done.append(point)
            json_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = json_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(done, indent=1) + "\n")
            os.replace(tmp, json_path)  # atomic: an interrupted sweep keeps every finished point
            print(f"{sampler} steps={steps} nfe={nfe} fid={point['fid']:.3f} "
                  f"({point['sample_ms_per_image']:.2f} ms/img)", flush=True)
    points = [d for d in done if d["n"] == a.n and d["seed"] == a.seed]
    first = points[0] if points else None
    if first:
        plot(points, out, f"{Path(a.run).name}: FID ({first['extractor']} features, N={a.n}) vs NFE")
    print("| sampler | steps | NFE | FID | KID | sample ms/img |")
    print("|---|---|---|---|---|---|")
    for d in sorted(points, key=lambda d: (d["sampler"], d["nfe"])):
        print(f"| {d['sampler']} | {d['steps']} | {d['nfe']} | {d['fid']:.2f} | {d['kid']:.2e} | "
              f"{d['sample_ms_per_image']:.2f} |")


if __name__ == "__main__":
    main()
