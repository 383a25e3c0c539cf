"""The CIFAR-10 evaluator's cost and accuracy (issue 17 point 6): FLOPs, training speed, flip averaging.

Three measurements, printed as Markdown:

1. **Cost of the preset's network** (``classifier_cifar10_small.yaml``): FLOPs per 32x32 image of one
   forward pass and of one training step (forward + backward), counted with torch.utils.flop_counter
   (convolutions and matmuls; normalisations and element-wise ops are free), and so per epoch of
   50,000 images; then the measured seconds per training step at the preset's batch on this machine's
   current threads (SGD step included, random data, median of ``--repeats``): NCHW and channels_last
   in float32, and channels_last under bfloat16 autocast (the preset's ``train.mixed_precision: bf16``),
   with the effective GFLOP/s.
2. **Training speed of a finished run** (``--run RUN``): images/s and seconds per epoch read from its
   log.jsonl (median of the logged windows), and its total training seconds.
3. **Test accuracy of an evaluator** (``--evaluator NAME_OR_PATH``, default the shipped ``cifar10``)
   on the 10,000 CIFAR-10 test images, as the metrics load it (flip-averaged features), and with flip
   averaging switched off (the same weights, single images): what the test-time augmentation adds.

    python benchmarks/cifar10_evaluator.py --run runs/eval-classifier-cifar10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from genlab.config import build_config
from genlab.methods import DataInfo
from genlab.methods.classifier import ClassifierMethod, ClassifierMethodConfig

EPOCH_IMAGES = 50_000


def preset_network(channels_last: bool) -> tuple[ClassifierMethod, int]:
    """The classifier_cifar10_small network (3x32x32, 10 classes) and the preset's batch size."""
    cfg = build_config("classifier", ClassifierMethodConfig, preset="cifar10_small",
                       overrides=[f"model.channels_last={str(channels_last).lower()}"])
    return ClassifierMethod(cfg.model, DataInfo(channels=3, image_size=32, num_classes=10)), cfg.train.batch_size


def flops_per_image() -> tuple[float, float]:
    """(forward FLOPs, forward + backward FLOPs) of one training image (train mode: no flip averaging)."""
    method, _ = preset_network(channels_last=False)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with FlopCounterMode(display=False) as forward:
        method(x)
    with FlopCounterMode(display=False) as step:
        F.cross_entropy(method(x), y).backward()
    return forward.get_total_flops() / 8, step.get_total_flops() / 8


def step_seconds(channels_last: bool, repeats: int, bf16: bool = False) -> float:
    """Median wall seconds of one SGD training step at the preset's batch on random data (bf16: autocast)."""
    method, batch = preset_network(channels_last)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(repeats + 2):  # two warm-up steps
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(method(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_speed(run: Path) -> dict[str, float]:
    """Median images/s of a run's logged windows, seconds per epoch, and its total training seconds."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["values"]["images_per_s"] for r in records if r["kind"] == "train" and "images_per_s" in r["values"]]
    ends = [r["values"]["elapsed_s"] for r in records if r["kind"] == "end"]
    rate = statistics.median(rates)
    return {"images_per_s": rate, "seconds_per_epoch": EPOCH_IMAGES / rate, "train_seconds": ends[-1] if ends else float("nan")}


def accuracies(evaluator: str, data_root: str | None) -> tuple[float, float, float]:
    """(accuracy with flip averaging, without it, seconds of the flip-averaged pass) on cifar10:test."""
    from genlab.data import load_data
    from genlab.evaluation import classifier_accuracy
    from genlab.metrics.extractors import ClassifierExtractor, get_extractor

    test = load_data(source="cifar10", split="test", root=data_root)
    extractor = get_extractor(evaluator)
    start = time.perf_counter()
    with_flip = classifier_accuracy(extractor, test.images, test.labels)
    seconds = time.perf_counter() - start
    single = extractor.model.__class__(dataclasses.replace(extractor.model.config, flip_average=False))
    single.load_state_dict(extractor.model.state_dict())
    without = classifier_accuracy(ClassifierExtractor(single, "single", sha256=""), test.images, test.labels)
    return with_flip, without, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished classifier_cifar10_small run: its logged speed")
    parser.add_argument("--evaluator", default="cifar10", help="evaluator to score on cifar10:test ('' to skip)")
    parser.add_argument("--data-root", help="data root (default $GENLAB_DATA)")
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps per layout")
    a = parser.parse_args(argv)
    forward, step = flops_per_image()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)\n")
    print("| network | forward MFLOP / image | train step MFLOP / image | TFLOP / epoch (50,000) |")
    print("|---|---|---|---|")
    print(f"| classifier_cifar10_small | {forward / 1e6:.1f} | {step / 1e6:.1f} | {step * EPOCH_IMAGES / 1e12:.2f} |\n")
    _, batch = preset_network(False)
    print(f"| layout | s / step (batch {batch}) | s / epoch | effective GFLOP/s |")
    print("|---|---|---|---|")
    for channels_last, bf16 in ((False, False), (True, False), (True, True)):
        seconds = step_seconds(channels_last, a.repeats, bf16)
        layout = ("channels_last" if channels_last else "contiguous (NCHW)") + (", bf16 autocast" if bf16 else ", float32")
        print(f"| {layout} | {seconds:.3f} | "
              f"{seconds * EPOCH_IMAGES / batch:.0f} | {step * batch / seconds / 1e9:.1f} |")
    if a.run is not None:
        speed = run_speed(a.run)
        print(f"\nrun {a.run}: {speed['images_per_s']:.0f} images/s (median of logged windows), "
              f"{speed['seconds_per_epoch']:.0f} s / epoch, {speed['train_seconds']:.0f} s of training")
    if a.evaluator:
        with_flip, without, seconds = accuracies(a.evaluator, a.data_root)
        print(f"\nevaluator {a.evaluator} on cifar10:test (10,000): {with_flip:.2%} with flip averaging "
              f"({seconds:.1f} s), {without:.2%} on single images")


if __name__ == "__main__":
    main()
