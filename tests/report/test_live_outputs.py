"""What a run writes while training: report.html every train.report_every steps, TensorBoard events."""

from __future__ import annotations

import sys
from html import escape

import pytest
from report_fixtures import make_run
from tiny_configs import TINY_DDPM

from genlab import api
from genlab.cli import main
from genlab.errors import ConfigError, GenlabError
from genlab.report.live import ReportEvery, training_outputs
from genlab.report.tensorboard import TensorBoardWriter
from genlab.train.runlog import read_log


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """10 steps of a tiny DDPM on digits with a live report every 5 steps and TensorBoard events."""
    pytest.importorskip("tensorboard")
    run_dir = tmp_path_factory.mktemp("live") / "run"
    api.train("ddpm", data="digits", run_dir=run_dir, progress=False,
              overrides=[*TINY_DDPM, "train.steps=10", "train.sample_every=5", "train.report_every=5",
                         "train.tensorboard=true"])
    return run_dir


@pytest.mark.slow
def test_the_live_report_at_the_end_equals_genlab_report(tiny_run, tmp_path, capsys):
    live = (tiny_run / "report.html").read_text()
    assert "step 10 of 10, finished" in live
    out = tmp_path / "again.html"
    assert main(["report", str(tiny_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text() == live


@pytest.mark.slow
def test_tensorboard_scalars_equal_the_log_and_grids_are_images(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    train = [r for r in read_log(tiny_run) if r["kind"] == "train"]
    for key in ("loss", "lr", "grad_norm", "images_per_s"):
        logged = [(r["step"], r["values"][key]) for r in train]
        written = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert [s for s, _ in written] == [s for s, _ in logged] == [5, 10]
        assert [v for _, v in written] == pytest.approx([v for _, v in logged], rel=1e-6)  # float32 in the events
    assert events.Scalars("final/train/loss")[0].value == pytest.approx(train[-1]["values"]["loss"], rel=1e-6)
    assert [e.step for e in events.Images("samples")] == sorted(int(p.stem[5:]) for p in (tiny_run / "samples").glob("*.png"))
    assert b"final/train/loss" in events.PluginTagToContent("hparams")["_hparams_/experiment"]


def test_report_every_writes_when_a_multiple_is_passed_and_at_the_end(tmp_path, monkeypatch):
    written_at = []
    every = ReportEvery(tmp_path, 10)
    monkeypatch.setattr("genlab.report.live.write_report", lambda runs, out: written_at.append((step, out)))
    for step in (5, 10, 15, 25, 30, 35):  # log_every 5 with a gap: 20 is seen at 25
        every({"kind": "train", "step": step, "values": {}})
    every({"kind": "end", "step": step, "values": {}})
    assert written_at == [(s, tmp_path / "report.html") for s in (10, 25, 30, 35)]


def test_tensorboard_events_of_a_hand_made_log(tmp_path):
    """The writer fed a run's records: scalars equal the log, every grid is an image, hparams at the end."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = make_run(tmp_path / "run")
    writer = TensorBoardWriter(run)
    for record in read_log(run):
        writer(record)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    train = [r for r in read_log(run) if r["kind"] == "train"]
    for key in ("loss", "lr", "grad_norm"):
        written = events.Scalars(f"train/{key}")
        assert [e.step for e in written] == [r["step"] for r in train]
        assert [e.value for e in written] == pytest.approx([r["values"][key] for r in train], rel=1e-6)  # float32
    assert [e.step for e in events.Images("samples")] == [10, 20]
    hparams = events.PluginTagToContent("hparams")
    assert b"train.lr" in hparams["_hparams_/session_start_info"]
    assert b"final/train/loss" in hparams["_hparams_/experiment"]


def test_a_negative_report_every_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.report_every must be >= 0"):
        training_outputs(tmp_path, -5, False)
    assert training_outputs(tmp_path, 0, False) is None


def test_tensorboard_missing_names_the_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.startswith(("tensorboard", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    with pytest.raises(GenlabError, match=r"genlab\[tensorboard\]"):
        TensorBoardWriter(tmp_path)


def test_health_warnings_become_log_records_and_show_in_the_report(tmp_path):
    """A GAN whose grad-norm ceiling is absurdly low warns; the warning is a `health` record and on the page."""
    from tiny_configs import TINY_DCGAN

    from genlab.report.html import read_run, render_report

    run_dir = tmp_path / "gan"
    with pytest.warns(UserWarning, match="exploding"):
        api.train("gan", data="digits", run_dir=run_dir, progress=False,
                  overrides=[*TINY_DCGAN, "train.steps=2", "train.log_every=1", "model.health.grad_norm_max=1e-6"])
    health = [r for r in read_log(run_dir) if r["kind"] == "health"]
    assert health and all("exploding" in r["values"]["warning"] for r in health)
    assert health[0]["step"] == 1  # the first episode, logged with the step that saw it
    page = render_report([read_run(run_dir)])
    assert escape(health[0]["values"]["warning"]) in page
