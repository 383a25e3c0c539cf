"""ControlNet and T2I-Adapter on a frozen MNIST DDPM: adherence over training steps, FID, cost (issue 16).

    python benchmarks/controlnet.py --base RUN --controlnet RUN [--adapter RUN] --data-root ../shared/data \
        --n 200 --fid-n 2000 --steps 20 --json docs/controlnet.json --plot docs/img/controlnet_adherence.png

Protocol:
- Control maps: the run's control (e.g. edges) of the first ``--n`` images of mnist:test (held out: the
  control runs train on mnist:train).
- Adherence: :func:`genlab.metrics.adherence.adherence` of each sample to its map (edges: the exact-pixel
  F1; with a 1-pixel tolerance beside it), averaged over the n samples. The
  base's value is that of its own (uncontrolled) samples against the same maps: the chance level.
- Curve: every checkpoint of the ControlNet (and T2I-Adapter) run (``--weights``, EMA by default); step 0 is the base
  (the zero convolutions make the controlled model exactly the base there). Results are kept in
  ``--json`` between calls, so the base can be scored while the control runs still train.
- FID: ``--fid-n`` samples (controls: the first fid-n mnist:test maps; the base: uncontrolled) against
  the first 10,000 images of mnist:train with the shipped mnist evaluator, so the controls' own test
  images are not the reference.
- Sampler: ``--sampler`` (default ddpm: ancestral, the mnist presets' choice, far better FID than DDIM on these
  networks), ``--steps`` steps, seed 0 (the same noise for every model). ``--timing``: ms / sample of
  the three models sampled in turn (batches of 50, the minimum of 3 rounds), so they share the machine's
  load; the ms / sample stored beside each adherence was measured at different times (busy machine).
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


SAMPLING: dict = {}  # sampler and steps of every sample drawn (main() sets them from --sampler, --steps)


def _adherence(run, maps: torch.Tensor, kind: str, controlled: bool, scale: float | None = None) -> dict:
    from genlab.metrics.adherence import adherence

    start = time.perf_counter()
    options = {"control": maps, "control_scale": scale} if controlled else {}
    samples = run.sample(len(maps), seed=0, batch_size=len(maps), **SAMPLING, **options)
    seconds = time.perf_counter() - start
    out = {"adherence": float(adherence(kind, samples, maps).mean()), "ms_per_sample": 1000 * seconds / len(maps)}
    if kind in ("edges", "scribble"):
        out["adherence_tolerance_1px"] = float(adherence(kind, samples, maps, tolerance=1).mean())
    return out


def _fid(run, maps: torch.Tensor | None, n: int, data_root: str | None, scale: float | None = None) -> float:
    """FID of n samples (controlled by maps (n, 1, H, W) at ``scale``, or not: the base) against mnist:train[:10000]."""
    from genlab.evaluation import evaluate
    from genlab.imageio import save_npz

    options = {} if maps is None else {"control": maps[:n], "control_scale": scale}
    images = run.sample(n, seed=0, batch_size=500, **SAMPLING, **options)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.npz"
        save_npz(images, path)
        result = evaluate(path, ref="mnist:train", ref_n=10000, metrics="fid", data_root=data_root, write=False)
    return float(result["metrics"]["fid"])


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*"))


def _train_seconds(run_dir: Path) -> float | None:
    """Wall seconds of the run's training (the last ``elapsed_s`` its log.jsonl recorded)."""
    seconds = None
    log = Path(run_dir) / "log.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        seconds = json.loads(line).get("values", {}).get("elapsed_s", seconds)
    return seconds


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--controlnet", help="the ControlNet run (every checkpoint is scored)")
    p.add_argument("--adapter", help="the T2I-Adapter run (its final checkpoint)")
    p.add_argument("--control", default="edges", help="the control of the runs (taken from them when given)")
    p.add_argument("--data-root", default=os.environ.get("GENLAB_DATA"))
    p.add_argument("--heldout", default="mnist:test", help="SOURCE:SPLIT whose first images give the control maps")
    p.add_argument("--n", type=int, default=200, help="samples per adherence value")
    p.add_argument("--fid-n", type=int, default=2000, help="samples per FID (0: skip FID)")
    p.add_argument("--sampler", default="ddpm", help="sampler of every model (default ddpm: ancestral)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--weights", default="ema", choices=("ema", "raw"))
    p.add_argument("--json", required=True, help="results; kept between calls (a stage already in it is not redone)")
    p.add_argument("--plot", help="write the adherence-vs-steps curve here (.png)")
    p.add_argument("--scales", default="", help="also the final runs' adherence (and FID) at these control scales, "
                                                "e.g. 1.5,2")
    p.add_argument("--scale-fid", action="store_true", help="also the FID at each of --scales (fid-n samples each)")
    p.add_argument("--timing", action="store_true", help="ms per sample of the three models measured interleaved "
                                                         "(batches of 50, the minimum of 3 rounds: same load for all)")
    p.add_argument("--curve-only", action="store_true", help="score the checkpoints that exist, not the final run "
                                                            "(while it still trains)")
    p.add_argument("--grid", help="write a picture here (.png): rows of 16 control maps, then the base's, "
                                  "ControlNet's and T2I-Adapter's samples for them")
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    from genlab import api
    from genlab.data.controls import control_map

    protocol = {"heldout": a.heldout, "n": a.n, "sampler": a.sampler, "steps": a.steps, "weights": a.weights, "fid_n": a.fid_n}
    SAMPLING.update(sampler=a.sampler, steps=a.steps)
    path = Path(a.json)
    results = json.loads(path.read_text()) if path.is_file() else {}
    if results.get("protocol") != protocol:
        results = {"protocol": protocol}

    def save() -> None:
        path.write_text(json.dumps(results, indent=1) + "\n")

    base = api.load_run(a.base, device="cpu")
    kind = api.load_run(a.controlnet, device="cpu").config.model.control if a.controlnet else a.control
    results["control"] = kind
    held = api.heldout_images(base, a.heldout, max(a.n, a.fid_n), a.data_root).to_model_range()
    maps_all = control_map(kind, held)
    maps = maps_all[: a.n]
    if "base" not in results:
        results["base"] = {"run": str(a.base), "step": base.step, "parameters": _parameters(base.method.backbone),
                           "train_seconds": _train_seconds(Path(a.base)),
                           **_adherence(base, maps, kind, False)}
        if a.fid_n:
            results["base"]["fid"] = _fid(base, None, a.fid_n, a.data_root)
        save()
    print(f"base: {results['base']}", flush=True)
    for role, run_dir in (("controlnet", a.controlnet), ("t2i_adapter", a.adapter)):
        if not run_dir:
            continue
        curve = results.setdefault(f"{role}_curve", {})
        # The headline numbers first (the final run; its adherence is also the curve's last point), then the curve.
        if role not in results and not a.curve_only:
            final = api.load_run(run_dir, weights=a.weights, device="cpu")
            results[role] = {"run": str(run_dir), "step": final.step,
                             "parameters": _parameters(final.method.control_network),
                             "train_seconds": _train_seconds(Path(run_dir)),
                             **_adherence(final, maps, kind, True)}
            curve[str(final.step)] = results[role]["adherence"]
            save()
            if a.fid_n:
                results[role]["fid"] = _fid(final, maps_all, a.fid_n, a.data_root)
                save()
        if role in results:
            by_scale = results[role].setdefault("adherence_by_scale", {})
            fid_by_scale = results[role].setdefault("fid_by_scale", {})
            for scale in [x for x in a.scales.split(",") if x]:
                final = api.load_run(run_dir, weights=a.weights, device="cpu")
                if scale not in by_scale:
                    by_scale[scale] = _adherence(final, maps, kind, True, float(scale))["adherence"]
                    save()
                if a.fid_n and a.scale_fid and scale not in fid_by_scale:
                    fid_by_scale[scale] = _fid(final, maps_all, a.fid_n, a.data_root, float(scale))
                    save()
        for step in _checkpoint_steps(Path(run_dir)):
            if str(step) not in curve:
                run = api.load_run(run_dir, weights=a.weights, checkpoint=step, device="cpu")
                curve[str(step)] = _adherence(run, maps, kind, True)["adherence"]
                save()
                if a.plot:  # the curve so far, in case the run is stopped
                    _plot(results, Path(a.plot))
            print(f"{role} step {step}: adherence {curve[str(step)]:.3f}", flush=True)
        print(f"{role}: {results.get(role)}", flush=True)
    if a.timing and "timing" not in results:
        runs = {"base": (base, {})}
        for role, run_dir in (("controlnet", a.controlnet), ("t2i_adapter", a.adapter)):
            if run_dir:
                runs[role] = (api.load_run(run_dir, weights=a.weights, device="cpu"), {"control": maps_all[:50]})
        best = {name: float("inf") for name in runs}
        for _ in range(3):
            for name, (run, options) in runs.items():
                start = time.perf_counter()
                run.sample(50, seed=0, batch_size=50, **SAMPLING, **options)
                best[name] = min(best[name], 1000 * (time.perf_counter() - start) / 50)
        results["timing"] = {"ms_per_sample": best, "batch": 50, "rounds": 3}
        save()
        print(f"timing: {results['timing']}", flush=True)
    if a.plot:
        _plot(results, Path(a.plot))
    if a.grid:
        from genlab.imageio import save_grid

        rows = [maps[:16], base.sample(16, seed=0, **SAMPLING)]
        for run_dir in (a.controlnet, a.adapter):
            if run_dir:
                run = api.load_run(run_dir, weights=a.weights, device="cpu")
                rows.append(run.sample(16, seed=0, **SAMPLING, control=maps[:16]))
        save_grid(torch.cat(rows), a.grid, nrow=16, scale=2)
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for role, label, style in (("controlnet", "ControlNet", "o-"), ("t2i_adapter", "T2I-Adapter", "s--")):
        curve = sorted((int(k), v) for k, v in results.get(f"{role}_curve", {}).items())
        if curve:  # step 0: the base (zero-initialised outputs make both the base exactly)
            steps, values = zip(*([(0, results["base"]["adherence"])] + curve))
            ax.plot(steps, values, style, label=label)
    ax.axhline(results["base"]["adherence"], color="grey", ls="--", label="base (uncontrolled)")
    ax.axhline(0.7, color="C2", ls=":", label="goal 0.7")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"adherence ({results['control']})")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    protocol = results["protocol"]
    ax.set_title(f"MNIST, {protocol['n']} samples per point, {protocol['sampler'].upper()} {protocol['steps']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
