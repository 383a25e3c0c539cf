"""Prompt control of a text-conditioned run: the text metrics at several guidance scales, and a prompt grid.

    PYTHONPATH=src python benchmarks/text_to_image.py RUN --data-root ../shared/data --scales 1,2,3,5 \
        --n 1000 --per-prompt 50 --sampler dpmpp-2m --steps 10 --grid docs/img/prompts.png

For each guidance scale w, ``genlab eval RUN --kind text --guidance-scale w`` (genlab.evaluation.text_to_image):
FID / KID of samples of the first N held-out captions against mnist:test (the mnist evaluator's
features), CLIP score and R-precision under the shipped CLIP judge, class accuracy of "the digit K"
prompts (the shipped MNIST classifier), the same for 50 free-form paraphrases, attribute control (thick / thin
ink ratio, slant sign), and for mnist-pairs runs the composition accuracy (both digits right, on the asked sides).
Prints one markdown row per scale and a JSON line with every value and protocol. ``--grid`` draws
the prompt grid at ``--grid-scale`` (default: the scale with the best class accuracy): one row per
prompt, one column per seed (the same seeds in every row).
"""

from __future__ import annotations

import argparse
import json

import torch

GRID_PROMPTS = [
    "the digit 0", "the digit 3", "the digit 7", "a thick seven", "a thin seven",
    "a handwritten 7 that is slanted left", "a handwritten 7 that is slanted right", "show me a seven",
    "a 7 drawn with a thick pen",
]
COLUMNS = ("fid", "kid", "clip_score", "clip_score_x100", "r_precision", "class_accuracy", "paraphrase_accuracy",
           "thick_thin_ink_ratio", "thick_thin_stroke_width_ratio", "slant_sign_accuracy", "composition_accuracy",
           "composition_swapped")


def prompt_grid(run, prompts: list[str], seeds: int, scale: float, sampler: str, steps: int, path: str) -> None:
    """Rows: prompts; columns: seeds 0..seeds-1 (image j of every row starts from seed j's noise)."""
    from genlab.imageio import save_grid

    rows = [torch.cat([run.sample(1, seed=s, prompt=p, guidance_scale=scale, sampler=sampler, steps=steps) for s in range(seeds)])
            for p in prompts]
    save_grid(torch.cat(rows), path, nrow=seeds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--data-root")
    p.add_argument("--ref", default="mnist:test", help="reference of FID / KID (mnist-pairs runs: mnist-pairs:test)")
    p.add_argument("--scales", default="1,2,3,5")
    p.add_argument("--n", type=int, default=1000, help="caption samples per scale")
    p.add_argument("--per-prompt", type=int, default=50, help="samples of each class / attribute prompt")
    p.add_argument("--sampler", default="dpmpp-2m")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--metrics", default="fid,kid")
    p.add_argument("--grid", help="write the prompt grid PNG here")
    p.add_argument("--grid-scale", type=float)
    p.add_argument("--grid-seeds", type=int, default=8)
    a = p.parse_args()

    from genlab.evaluation.text_to_image import evaluate_text
    from genlab.runs import load_run

    torch.set_num_threads(1)
    run = load_run(a.run)
    results = {}
    print("| w | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for w in [float(s) for s in a.scales.split(",")]:
        result = evaluate_text(run, ref=a.ref, metrics=a.metrics, n=a.n, sampler=a.sampler, steps=a.steps,
                               data_root=a.data_root, per_prompt=a.per_prompt, sample_options={"guidance_scale": w})
        results[w] = result
        m = result["metrics"]
        print(f"| {w:g} | " + " | ".join(f"{m[c]:.4g}" if c in m else "-" for c in COLUMNS) + " |", flush=True)
    best = max(results, key=lambda w: results[w]["metrics"].get("class_accuracy", 0.0))
    if a.grid:
        scale = a.grid_scale if a.grid_scale is not None else best
        prompt_grid(run, GRID_PROMPTS, a.grid_seeds, scale, a.sampler, a.steps, a.grid)
        print(f"grid: {a.grid} (w = {scale:g}; rows: {GRID_PROMPTS})")
    print(json.dumps({"best_scale_by_class_accuracy": best, "results": {str(w): r for w, r in results.items()}}))


if __name__ == "__main__":
    main()
