"""Sampling settings chosen by measurement: the batch size probe, its cache, and the default threads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genlab import autotune
from genlab.autotune import CANDIDATES, auto_batch_size, default_threads, probe_ms_per_image

from tiny_configs import TINY_DDPM


@pytest.fixture
def tiny_ddpm(tmp_path):
    from genlab import api
    from genlab.runs import load_run

    api.train("ddpm", data="digits", overrides=[*TINY_DDPM, "train.steps=1"], run_dir=tmp_path / "ddpm", progress=False)
    return load_run(tmp_path / "ddpm")


def test_auto_batch_size_takes_the_fastest_per_image_and_caches_it_per_thread_count(tiny_ddpm, tmp_path, monkeypatch):
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    probes = []

    def fake_probe(method, shape, device):
        probes.append((shape, torch.get_num_threads()))
        return {16: 3.0, 32: 2.0, 64: 1.5, 128: 1.7, 256: 2.5}  # ms per image: 64 is the fastest

    monkeypatch.setattr(autotune, "probe_ms_per_image", fake_probe)
    method = tiny_ddpm.method
    assert auto_batch_size(method, 1000) == 64
    assert auto_batch_size(method, 40) == 40  # never more than the images asked for
    assert auto_batch_size(method, 5) == 5  # at most the smallest candidate: no probe needed
    assert probes == [((1, 8, 8), torch.get_num_threads())]  # one probe: the others read the cache
    cached = json.loads((tmp_path / "cache" / "sampling_batch_size.json").read_text())
    assert list(cached.values()) == [64]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # another thread count is another machine: probe again
        auto_batch_size(method, 1000)
    finally:
        torch.set_num_threads(threads)
    assert len(probes) == 2


def test_the_probe_times_every_candidate_and_run_sample_uses_the_choice(tiny_ddpm, tmp_path, monkeypatch):
    timings = probe_ms_per_image(tiny_ddpm.method, (1, 8, 8), torch.device("cpu"))
    assert list(timings) == list(CANDIDATES) and all(ms > 0 for ms in timings.values())
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "probe_ms_per_image", lambda *a: {16: 1.0, 32: 2.0})
    calls = []
    sample = tiny_ddpm.method.sample
    monkeypatch.setattr(tiny_ddpm.method, "sample", lambda n, **k: calls.append(n) or sample(n, **k))
    images = tiny_ddpm.sample(40, seed=1, sampler="ddim", steps=2)
    assert calls == [16, 16, 8] and images.shape == (40, 1, 8, 8)


def test_methods_without_a_denoiser_network_use_the_default_batch_size():
    class Generator(torch.nn.Module):
        pass

    assert auto_batch_size(Generator(), 1000) == autotune.DEFAULT_BATCH_SIZE
    assert auto_batch_size(Generator(), 10) == 10


def test_default_threads_follow_omp_num_threads_else_the_usable_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(autotune.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    siblings = {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}  # two cores with two hardware threads each
    monkeypatch.setattr(autotune.Path, "read_text", lambda self: siblings[int(self.parts[-3][3:])] + "\n")
    assert default_threads() == 2


def test_auto_mixed_precision_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    for flags, expected in [({"avx2", "avx512f"}, "no"), ({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"), (set(), "no")]:
        monkeypatch.setattr(autotune, "cpu_flags", lambda flags=flags: flags)
        assert autotune.auto_mixed_precision(torch.device("cpu")) == expected
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert autotune.auto_mixed_precision(torch.device("cuda")) == ("bf16" if supported else "no")
    assert autotune.auto_mixed_precision(torch.device("mps")) == "no"


def test_cpu_flags_read_the_flags_line():
    from genlab.autotune import cpu_flags

    flags = cpu_flags()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    line = next((l for l in text.splitlines() if l.startswith("flags")), None)
    assert flags == (set(line.split(":", 1)[1].split()) if line else set())
