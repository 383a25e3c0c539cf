"""Two gloo processes on localhost give the same metrics as one process (sufficient statistics and gathers)."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from genlab.metrics import FID, KID, PRDC, GaussianStats, InceptionScore, InceptionScoreConfig, KIDConfig


def _data():
    """Real/fake features and class probabilities, the same in every process."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(90, 6, generator=g, dtype=torch.float64)
    fake = torch.randn(70, 6, generator=g, dtype=torch.float64) * 1.2 + 0.3
    probabilities = torch.softmax(3 * torch.randn(80, 5, generator=g, dtype=torch.float64), dim=1)
    return real, fake, probabilities


def _metrics(real_batches, fake_batches, probability_batches):
    """Every streaming metric fed with the given batches; computed over all processes when distributed."""
    fid, kid = FID(), KID(KIDConfig(subsets=3, subset_size=40, seed=1))
    prdc, inception = PRDC(), InceptionScore(InceptionScoreConfig(splits=4, seed=2))
    stats = GaussianStats()
    for batch in real_batches:
        fid.update(batch, real=True)
        kid.update(batch, real=True)
        prdc.update(batch, real=True)
        stats.update(batch)
    for batch in fake_batches:
        fid.update(batch, real=False)
        kid.update(batch, real=False)
        prdc.update(batch, real=False)
    for batch in probability_batches:
        inception.update(batch)
    stats.all_reduce()
    return {
        "n": stats.n,
        "mean": stats.mean.tolist(),
        "covariance": stats.covariance.flatten().tolist(),
        "fid": fid.compute(),
        "fid_twice": fid.compute(),  # compute() must not sum the statistics again
        "kid": list(kid.compute()),
        "is": list(inception.compute()),
        **prdc.compute(),
    }


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        real, fake, probabilities = _data()
        # A DistributedSampler-like interleaved shard, uneven in size; rank 1 sees no probabilities at all.
        shard = lambda x: x[rank::world_size].split(11)  # noqa: E731
        result = _metrics(shard(real), shard(fake), probabilities.split(16) if rank == 0 else [])
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    real, fake, probabilities = _data()
    single = _metrics([real], [fake], [probabilities])
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["n"] == single["n"] == 90
        for key in single:
            assert result[key] == pytest.approx(single[key], rel=1e-10, abs=1e-10), (rank, key)
