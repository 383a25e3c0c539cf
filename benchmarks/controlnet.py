"""ControlNet and T2I-Adapter on a frozen MNIST DDPM: adherence over training steps, FID, cost (issue 16).

    python benchmarks/controlnet.py --base RUN --controlnet RUN [--adapter RUN] --data-root ../shared/data \
        --n 200 --fid-n 2000 --steps 20 --json docs/controlnet.json --plot docs/img/controlnet_adherence.png

Protocol:
- Control maps: the run's control (e.g. edges) of the first ``--n`` images of mnist:test (held out: the
  control runs train on mnist:train).
- Adherence: :func:`genlab.metrics.adherence.adherence` of each sample to its map (edges: the exact-pixel
  F1; with a 1-pixel tolerance beside it), averaged over the n samples. The
  base's value is that of its own (uncontrolled) samples against the same maps: the chance level.
- Curve: every checkpoint of the ControlNet run (``--weights``, EMA by default); step 0 is the base
  (the zero convolutions make the controlled model exactly the base there).
- FID: ``--fid-n`` samples (controls: the first fid-n mnist:test maps; the base: uncontrolled) against
  the first 10,000 images of mnist:train with the shipped mnist evaluator, so the controls' own test
  images are not the reference.
- Sampler: DDIM, ``--steps`` steps, seed 0 (the same noise for every model); ms / sample is the wall time
  of sampling the n adherence images in one batch, divided by n.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def _adherence(run, maps: torch.Tensor, kind: str, steps: int, controlled: bool) -> dict:
    from genlab.metrics.adherence import adherence

    start = time.perf_counter()
    options = {"control": maps} if controlled else {}
    samples = run.sample(len(maps), seed=0, batch_size=len(maps), sampler="ddim", steps=steps, **options)
    seconds = time.perf_counter() - start
    out = {"adherence": float(adherence(kind, samples, maps).mean()), "ms_per_sample": 1000 * seconds / len(maps)}
    if kind in ("edges", "scribble"):
        out["adherence_tolerance_1px"] = float(adherence(kind, samples, maps, tolerance=1).mean())
    return out


def _fid(run, maps: torch.Tensor | None, n: int, steps: int, data_root: str | None) -> float:
    """FID of n samples (controlled by maps (n, 1, H, W), or not: the base) against mnist:train[:10000]."""
    from genlab.evaluation import evaluate
    from genlab.imageio import save_npz

    options = {} if maps is None else {"control": maps[:n]}
    images = run.sample(n, seed=0, batch_size=500, sampler="ddim", steps=steps, **options)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.npz"
        save_npz(images, path)
        result = evaluate(path, ref="mnist:train", ref_n=10000, metrics="fid", data_root=data_root, write=False)
    return float(result["metrics"]["fid"])


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*"))


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--controlnet", required=True)
    p.add_argument("--adapter")
    p.add_argument("--data-root", default=os.environ.get("GENLAB_DATA"))
    p.add_argument("--n", type=int, default=200, help="samples per adherence value")
    p.add_argument("--fid-n", type=int, default=2000, help="samples per FID (0: skip FID)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--weights", default="ema", choices=("ema", "raw"))
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write the adherence-vs-steps curve here (.png)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    from genlab import api

    base = api.load_run(a.base, device="cpu")
    child_dir = Path(a.controlnet)
    final = api.load_run(child_dir, weights=a.weights, device="cpu")
    kind = final.config.model.control
    held = api.heldout_images(final, "mnist:test", max(a.n, a.fid_n), a.data_root).to_model_range()
    maps_all = final.method.control_maps(held)
    maps = maps_all[: a.n]
    results = {"control": kind, "n": a.n, "steps": a.steps, "weights": a.weights,
               "base": {"run": str(a.base), "step": base.step, **_adherence(base, maps, kind, a.steps, False)}}
    print(f"base (uncontrolled) adherence {results['base']['adherence']:.3f}", flush=True)
    curve = [(0, results["base"]["adherence"])]
    for step in _checkpoint_steps(child_dir):
        run = api.load_run(child_dir, weights=a.weights, checkpoint=step, device="cpu")
        value = _adherence(run, maps, kind, a.steps, True)
        curve.append((step, value["adherence"]))
        print(f"controlnet step {step}: adherence {value['adherence']:.3f}", flush=True)
    results["curve"] = curve
    results["controlnet"] = {"run": str(child_dir), "step": final.step,
                             "parameters": _parameters(final.method.control_network),
                             "base_parameters": _parameters(base.method.backbone),
                             **_adherence(final, maps, kind, a.steps, True)}
    if a.adapter:
        adapter = api.load_run(a.adapter, weights=a.weights, device="cpu")
        results["t2i_adapter"] = {"run": str(a.adapter), "step": adapter.step,
                                  "parameters": _parameters(adapter.method.control_network),
                                  **_adherence(adapter, maps, kind, a.steps, True)}
        print(f"t2i-adapter: {results['t2i_adapter']}", flush=True)
    if a.fid_n:
        results["fid_n"] = a.fid_n
        results["base"]["fid"] = _fid(base, None, a.fid_n, a.steps, a.data_root)
        results["controlnet"]["fid"] = _fid(final, maps_all, a.fid_n, a.steps, a.data_root)
        if a.adapter:
            results["t2i_adapter"]["fid"] = _fid(adapter, maps_all, a.fid_n, a.steps, a.data_root)
        print(f"FID: base {results['base']['fid']:.2f}, controlnet {results['controlnet']['fid']:.2f}", flush=True)
    print(json.dumps(results, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    if a.plot:
        _plot(results, Path(a.plot))
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*results["curve"])
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(steps, values, "o-", label="ControlNet")
    ax.axhline(results["base"]["adherence"], color="grey", ls="--", label="base (uncontrolled)")
    if "t2i_adapter" in results:
        ax.plot([results["t2i_adapter"]["step"]], [results["t2i_adapter"]["adherence"]], "s", color="C1",
                label="T2I-Adapter (final)")
    ax.axhline(0.7, color="C2", ls=":", label="goal 0.7")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"adherence ({results['control']})")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"MNIST, {results['n']} samples per point, DDIM {results['steps']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
