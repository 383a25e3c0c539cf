"""The cheap ceiling of latent text-to-image on mnist-pairs: how well an autoencoder's reconstructions compose.

    PYTHONPATH=src python benchmarks/pairs_ceiling.py RUN [RUN ...] --data-root ../shared/data --n 5000

A latent diffusion model draws through its autoencoder's decoder, so the composition score of the decoded
latents of real mnist-pairs:test canvases bounds what the model can reach. For each autoencoder-family run
(trained on any size: a fully convolutional one encodes the 56 px canvases as they are), the first N test
canvases are reconstructed, rounded to 8 bits, and scored: PSNR (genlab.metrics.psnr, mean over images)
and ``composition_scores`` (each half classified by the shipped MNIST evaluator; both digits right and on
the captions' sides). The real canvases' own score is printed first.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--data-root")
    p.add_argument("--n", type=int, default=5000)
    a = p.parse_args()

    from genlab.data import DataConfig, from_model_range, load_data
    from genlab.evaluation.common import resolve_extractor
    from genlab.evaluation.text_to_image import composition_scores
    from genlab.metrics import psnr
    from genlab.runs import load_run

    torch.set_num_threads(1)
    pairs = load_data(DataConfig(source="mnist-pairs", split="test", root=a.data_root, limit=a.n))
    classes, arrangement = pairs.attributes["classes"], pairs.attributes["arrangement"]
    classifier = resolve_extractor(None, "mnist", "cpu")
    real = composition_scores(pairs.images, classes, arrangement, classifier)
    print(f"| real mnist-pairs:test (N = {len(pairs)}) | - | {real['composition_accuracy']:.1%} |")
    images = pairs.to_model_range()
    results = {"real": real}
    for path in a.runs:
        run = load_run(path)
        clock = time.process_time()
        reconstructions = run.reconstruct(images)  # (N, 1, 56, 56) in [-1, 1]
        seconds = time.process_time() - clock
        u8 = from_model_range(reconstructions)
        scores = composition_scores(u8, classes, arrangement, classifier)
        value = float(psnr(u8.float() / 127.5 - 1, images))
        results[path] = {"psnr": value, **scores, "cpu_s": seconds, "trained_size": run.method.data_info.image_size}
        print(f"| {path} (trained at {run.method.data_info.image_size} px) | {value:.2f} dB | "
              f"{scores['composition_accuracy']:.1%} |", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
