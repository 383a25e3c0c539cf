"""The all-families driver without training: budget accounting, resumability, the table and plot from fake numbers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from genlab.cli import main
from genlab.errors import ConfigError, GenlabError
from genlab.methods import get_method
from genlab.methods.capabilities import Generates
from genlab.report import families as fam
from genlab.train.checkpoint import save_checkpoint

from oneline import one_line_error


# ------------------------------------------------------------------------------------------ the families


def test_every_family_generates_and_its_parent_fits_the_role():
    """The list names methods that draw images, and each parent serves the child's declared parent role."""
    assert len({f.name for f in fam.FAMILIES}) == len(fam.FAMILIES) == 8
    for f in fam.FAMILIES:
        cls = get_method(f.method)
        assert issubclass(cls, Generates), f.method
        if f.parent is None:
            assert f.role is None
            continue
        spec = cls.parents[f.role]  # KeyError: the child has no such parent key
        assert issubclass(get_method(f.parent), spec.capability), (f.parent, spec.capability)
        assert not issubclass(get_method(f.parent), Generates)  # the parents draw nothing by themselves


def test_select_families_keeps_table_order_and_names_unknown_ones():
    assert [f.name for f in fam.select_families("gan,ddpm,gpt")] == ["ddpm", "vqvae+gpt", "gan"]
    with pytest.raises(ConfigError, match="--families ganz: unknown; choose from ddpm,dit,ldm"):
        fam.select_families("ddpm,ganz")


# ------------------------------------------------------------------------------------------ budget


@pytest.mark.parametrize("minutes,share", [(3.0, 1 / 3), (15.0, 0.4), (1.0, 0.9)])
def test_parent_and_child_add_up_to_the_budget(minutes, share):
    parent = fam.parent_budget(minutes, share)
    assert parent == pytest.approx(minutes * share)
    # The child gets what the parent really used subtracted, not the planned share.
    used = parent + 0.01  # the trainer stops after the step that crosses the limit
    assert used + fam.child_budget(minutes, used) == pytest.approx(minutes)


def test_budget_refusals_are_one_line():
    for share in (0.0, 1.0, -0.2):
        with pytest.raises(ConfigError, match="--parent-share"):
            fam.parent_budget(3, share)
    with pytest.raises(ConfigError, match="leaving none for the child"):
        fam.child_budget(3, 2.99)
    with pytest.raises(ConfigError, match="--minutes 0"):
        fam.plan("mnist", 0, [0], fam.FAMILIES, 0.3, Path("x"))
    with pytest.raises(ConfigError, match="--clock gpu: choose cpu"):
        fam.plan("mnist", 3, [0], fam.FAMILIES, 0.3, Path("x"), clock="gpu")


def test_minutes_left():
    T = fam.Trained
    assert fam.minutes_left(None, 3.0) == 3.0
    assert fam.minutes_left(T(step=400, minutes=1.25, planned_steps=6000), 3.0) == pytest.approx(1.75)  # interrupted
    assert fam.minutes_left(T(step=900, minutes=3.01, planned_steps=6000), 3.0) == 0  # stopped by the time limit
    assert fam.minutes_left(T(step=900, minutes=2.97, planned_steps=6000), 3.0) == 0  # within the tolerance
    assert fam.minutes_left(T(step=2000, minutes=2.0, planned_steps=2000), 3.0) == 0  # the preset's steps are done
    assert fam.minutes_left(T(step=900, minutes=3.0, planned_steps=6000), 5.0) == pytest.approx(2.0)  # budget raised


def _fake_run(run_dir: Path, step: int, minutes: float, planned: int = 6000) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(f"method: ddpm\ntrain:\n  steps: {planned}\n")
    # Wall time twice the CPU time: a process that had half a core.
    save_checkpoint(run_dir, step, {"model": {"w": torch.zeros(1)}},
                    {"cpu_seconds": minutes * 60, "elapsed_seconds": 2 * minutes * 60})


def test_trained_state_reads_the_newest_checkpoint(tmp_path):
    assert fam.trained_state(tmp_path / "absent") is None
    _fake_run(tmp_path / "r", 100, 0.5)
    _fake_run(tmp_path / "r", 250, 1.5)
    assert fam.trained_state(tmp_path / "r") == fam.Trained(250, 1.5, 6000)  # CPU minutes by default
    assert fam.trained_state(tmp_path / "r", "wall") == fam.Trained(250, 3.0, 6000)


# ------------------------------------------------------------------------------------------ resumability


@pytest.fixture
def fake_trainer(monkeypatch, tmp_path):
    """api.train replaced by a clock: each call 'trains' time_limit minutes (or `short` of them) into a fake run."""
    from genlab import api

    calls = []

    def train(method, data=None, preset=None, overrides=(), run_dir=None, resume=False, **kw):
        values = dict(o.split("=", 1) for o in overrides)
        calls.append({"method": method, "resume": resume, **values})
        before = fam.trained_state(Path(run_dir))
        minutes = (before.minutes if before else 0.0) + float(values["train.time_limit"]) * train.fraction
        _fake_run(Path(run_dir), (before.step if before else 0) + 100, minutes)

    train.fraction = 1.0
    monkeypatch.setattr(api, "train", train)
    return train, calls


def test_train_runs_resumes_and_skips(fake_trainer, tmp_path):
    train, calls = fake_trainer
    run = tmp_path / "ddpm-s0"
    train.fraction = 0.4  # the first launch is killed after 40 % of its minutes
    fam._train("ddpm", run, "mnist", 3.0, seed=7, threads=1, data_root=None, say=lambda s: None)
    assert calls[-1]["resume"] is False and calls[-1]["train.seed"] == "7" and calls[-1]["train.threads"] == "1"
    assert calls[-1]["train.time_clock"] == "cpu"
    assert float(calls[-1]["train.time_limit"]) == pytest.approx(3.0)
    train.fraction = 1.0
    state = fam._train("ddpm", run, "mnist", 3.0, seed=7, threads=1, data_root=None, say=lambda s: None)
    assert calls[-1]["resume"] is True and "train.seed" not in calls[-1]
    assert float(calls[-1]["train.time_limit"]) == pytest.approx(3.0 - 1.2, abs=1e-3)  # only what is left
    assert state.minutes == pytest.approx(3.0, abs=1e-3)
    fam._train("ddpm", run, "mnist", 3.0, seed=7, threads=1, data_root=None, say=lambda s: None)
    assert len(calls) == 2  # done: not trained again


def test_two_stage_family_charges_the_parent(fake_trainer, monkeypatch, tmp_path):
    """LDM: kl-ae gets share x budget, the child the rest of what the parent really used; priors share one VQ-VAE."""
    train, calls = fake_trainer
    monkeypatch.setattr(fam, "_evaluate", lambda run_dir, job, *a: ({"metrics": {"fid": 10.0}, "protocol": {
        "n": 8, "reference": "mnist:test", "extractor": "mnist", "extractor_sha256": "x", "sampler": "ddim",
        "steps": 50, "seconds": {"sample": 0.4}}}, False))
    jobs = fam.plan("mnist", 3.0, [0], fam.select_families("ldm,pixelcnn,gpt"), 0.25, tmp_path)
    rows = [fam.run_job(j, 8, say=lambda s: None) for j in jobs]
    by_method = {c["method"]: c for c in calls}
    assert [c["method"] for c in calls] == ["kl-ae", "ldm", "vqvae", "pixelcnn", "gpt"]  # one vqvae for two priors
    assert float(by_method["kl-ae"]["train.time_limit"]) == pytest.approx(0.75)
    assert float(by_method["ldm"]["train.time_limit"]) == pytest.approx(2.25, abs=1e-3)
    assert by_method["ldm"]["model.autoencoder"] == str(tmp_path / "mnist" / "kl-ae-s0")
    assert by_method["gpt"]["model.codes"] == str(tmp_path / "mnist" / "vqvae-s0")
    for row in rows:
        assert row.train_min == pytest.approx(3.0, abs=1e-3) and row.parent_min == pytest.approx(0.75, abs=1e-3)
        assert row.ms_per_sample == pytest.approx(50.0)  # 0.4 s / 8 samples


def test_cpu_account_measures_the_share_of_a_core(tmp_path):
    import time

    def spend(seconds):  # busy until this much CPU was used, however long the machine makes that take
        start = time.process_time()
        while time.process_time() - start < seconds:
            pass

    def parts():
        return json.loads((tmp_path / fam.CPU_FILE).read_text())

    with fam._cpu_account(tmp_path):
        time.sleep(0.3)  # waiting: no CPU
    first = parts()["train"]
    assert first["wall_seconds"] >= 0.3 and first["cpu_seconds"] < 0.1
    with fam._cpu_account(tmp_path):
        spend(0.2)
    train = parts()["train"]  # training launches add up
    assert train["cpu_seconds"] >= first["cpu_seconds"] + 0.2 and train["wall_seconds"] >= first["wall_seconds"] + 0.2
    assert fam.cpu_share(tmp_path) == pytest.approx(train["cpu_seconds"] / train["wall_seconds"])
    for _ in range(2):
        with fam._cpu_account(tmp_path, "eval"):
            spend(0.1)
    assert 0.1 <= parts()["eval"]["cpu_seconds"] < 0.2  # an evaluation replaces the previous one
    assert parts()["train"] == train
    assert fam.cpu_share(tmp_path / "absent") is None and fam.cpu_share(tmp_path, "other") is None
    (tmp_path / fam.CPU_FILE).write_text(json.dumps({"cpu_seconds": 1.0, "wall_seconds": 4.0}))  # the first format
    assert fam.cpu_share(tmp_path) == 0.25


def test_scored_matches_the_protocol_only(tmp_path):
    entry = {"metrics": {"fid": 5.0}, "std": {}, "protocol": {"kind": "generation", "reference": "mnist:test",
                                                               "n": 2000, "seed": 0, "checkpoint_step": 900}}
    (tmp_path / "metrics.json").write_text(json.dumps({"entries": [entry]}))
    same = {"reference": "mnist:test", "n": 2000, "seed": 0, "checkpoint_step": 900}
    assert fam._scored(tmp_path, same)["metrics"]["fid"] == 5.0
    for key, other in (("n", 10000), ("checkpoint_step", 1000), ("reference", "fashion-mnist:test"), ("seed", 1)):
        assert fam._scored(tmp_path, {**same, key: other}) is None, key


# ------------------------------------------------------------------------------------------ outputs


def _row(family, seed, fid, ms=2.0, minutes=3.0, error=None, parent=None):
    return fam.Row(family, family, "mnist", seed, 3.0, f"runs/{family}-s{seed}", parent=parent,
                   parent_min=1.0 if parent else None, train_min=minutes, steps=900, planned_steps=6000,
                   preset=f"{family}_mnist_small", parent_preset="kl_ae_mnist_small" if parent else None,
                   cpu_share=0.9, sampler="ddpm", sample_steps=20, n=2000, ms_per_sample=ms, sample_cpu_ms=0.9 * ms, reference="mnist:test",
                   extractor="mnist", extractor_sha256="abc", metrics={} if error else {"fid": fid, "kid": fid / 1000},
                   error=error)


def test_table_pools_seeds_with_mean_and_sample_std_and_lists_failures():
    fids = [10.0, 12.0, 17.0]
    rows = [_row("ddpm", s, f) for s, f in enumerate(fids)] + [_row("ldm", 0, 40.0, parent="kl-ae"),
                                                             _row("dit", 0, 0, error="disk full; free space")]
    table = fam.markdown_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 3 and all(line.count("|") == 17 for line in lines[:4])
    ddpm = next(line for line in lines if line.startswith("| ddpm "))
    mean, std = statistics.fmean(fids), statistics.stdev(fids)  # 13.0, 3.606
    assert f"{mean:.1f} ± {std:.1f}" in ddpm and "| 0,1,2 |" in ddpm
    assert "| 3.00 ± 0.00 | 0.90 ± 0.00 | 900 / 6000 | ddpm 20 | 2.0 ± 0.0 | 1.8 ± 0.0 |" in ddpm and "| train CPU-min |" in lines[0]
    ldm = next(line for line in lines if line.startswith("| ldm "))
    assert "ldm_mnist_small (kl_ae_mnist_small)" in ldm and "(parent 1.00)" in ldm and "| 40.0 |" in ldm
    assert lines[-1].startswith("| dit | failed: seed 0: disk full; free space |")


def test_outputs_round_trip_and_plot(tmp_path):
    rows = [_row("ddpm", 0, 8.0, ms=30.0), _row("gan", 0, 60.0, ms=0.3, minutes=3.0)]
    paths = fam.write_outputs(rows, tmp_path, "mnist")
    doc = json.loads(paths["json"].read_text())
    assert doc["protocol"] == {"n": 2000, "reference": "mnist:test", "extractor": "mnist", "extractor_sha256": "abc"}
    assert fam.read_rows(paths["json"]) == rows
    assert paths["md"].read_text() == fam.markdown_table(rows)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = paths["png"].read_bytes()
    fam.write_outputs(fam.read_rows(paths["json"]), tmp_path, "mnist")
    assert paths["png"].read_bytes() == before  # the same numbers give the same picture


def test_driver_records_a_failure_and_goes_on(monkeypatch, tmp_path):
    def run_job(job, n, *a, say=print, **k):
        if job.family.name == "dit":
            raise GenlabError("model.dit.depth=0: must be at least 1")
        if job.family.name == "gan":
            raise RuntimeError("boom\nsecond line")
        return _row(job.family.name, job.seed, 10.0)

    monkeypatch.setattr(fam, "run_job", run_job)
    said = []
    rows, paths = fam.bench_families("mnist", 3, n=100, families="ddpm,dit,gan", out=tmp_path, say=said.append)
    assert [r.error for r in rows] == [None, "model.dit.depth=0: must be at least 1", "unexpected RuntimeError: boom"]
    assert said[0].startswith("[1/3] ddpm mnist seed 0: FID 10.0, 1.8 CPU ms/sample, trained 3.00 CPU-min (900 of 6000 steps)")
    assert said[1] == "[2/3] dit mnist seed 0: error: model.dit.depth=0: must be at least 1"
    assert all("\n" not in s for s in said)
    assert len(json.loads(paths["json"].read_text())["rows"]) == 3


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["bench", "families", "--data", "mnist-pairs", "--minutes", "3", "--out", str(tmp_path)]) == 2
    assert "ships no evaluator" in one_line_error(capsys)
    assert main(["bench", "families", "--data", "mnist", "--minutes", "3", "--seeds", "0,x", "--out", str(tmp_path)]) == 2
    assert "--seeds 0,x" in one_line_error(capsys)
    assert main(["bench", "families", "--data", "mnist", "--minutes", "3", "--table-only", "--out", str(tmp_path)]) == 2
    assert "no such file" in one_line_error(capsys)
    assert main(["bench", "families", "--data", "mnist", "--out", str(tmp_path)]) == 2
    assert "needs --minutes M" in one_line_error(capsys)
    assert main(["bench", "families", "--data", "mnist", "--minutes", "-1", "--out", str(tmp_path)]) == 2
    assert "--minutes -1" in one_line_error(capsys)
    assert not list(tmp_path.iterdir())  # nothing trained or written


def test_cli_table_only_rewrites_from_the_json(capsys, tmp_path):
    fam.write_outputs([_row("vae", 0, 33.0)], tmp_path, "mnist")
    (tmp_path / "families-mnist.md").unlink()
    assert main(["bench", "families", "--data", "mnist", "--table-only", "--out", str(tmp_path)]) == 0
    assert "| vae | vae_mnist_small |" in capsys.readouterr().out
    assert (tmp_path / "families-mnist.md").is_file()


def test_a_later_invocation_adds_its_families_to_the_table(monkeypatch, tmp_path):
    """--families gan, then --families ddpm: one table of both; a different budget or N starts a new table."""
    monkeypatch.setattr(fam, "run_job", lambda job, n, *a, say=print, **k: fam.Row(
        job.family.name, job.family.method, "mnist", job.seed, job.minutes, "r", job.clock, preset="p", train_min=job.minutes,
        steps=1, planned_steps=2, n=n, ms_per_sample=1.0, metrics={"fid": 5.0}))
    fam.bench_families("mnist", 1, n=100, families="gan", out=tmp_path, say=lambda s: None)
    rows, _ = fam.bench_families("mnist", 1, n=100, families="ddpm", out=tmp_path, say=lambda s: None)
    assert [r.family for r in fam.read_rows(tmp_path / "families-mnist.json")] == ["ddpm", "gan"]  # table order
    fam.bench_families("mnist", 1, n=200, families="vae", out=tmp_path, say=lambda s: None)
    assert [r.family for r in fam.read_rows(tmp_path / "families-mnist.json")] == ["vae"]
