"""RunLog: records round trip, line-by-line flushing, truncation on resume, partial last lines."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from genlab.errors import ConfigError, GenlabError
from genlab.train.runlog import RunLog, read_log


def test_records_round_trip_with_conversions(tmp_path):
    with RunLog(tmp_path) as log:
        log.log(0, {"loss": torch.tensor(0.25), "lr": np.float32(0.5), "n": np.int64(3)})
        log.log(1, {"loss": float("nan"), "grad_norm": torch.tensor(float("inf")), "hist": torch.tensor([1.0, 2.0])})
        nested = {"d": torch.tensor([[1, 2]]), "one": torch.ones(1, 1)}
        log.log(2, {"neg": -math.inf, "nested": nested, "label": "ok"}, kind="eval")
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    for line in lines:  # strict JSON: no NaN / Infinity literals
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))

    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [r["kind"] for r in records] == ["train", "train", "eval"]
    assert records[0]["values"] == {"loss": 0.25, "lr": 0.5, "n": 3}
    assert isinstance(records[0]["values"]["n"], int)
    assert math.isnan(records[1]["values"]["loss"]) and records[1]["values"]["grad_norm"] == math.inf
    assert records[1]["values"]["hist"] == [1.0, 2.0]
    assert records[2]["values"] == {"neg": -math.inf, "nested": {"d": [[1, 2]], "one": 1.0}, "label": "ok"}
    assert all(isinstance(r["time"], float) for r in records)


def test_each_record_is_on_disk_before_close(tmp_path):
    log = RunLog(tmp_path)
    log.log(7, {"loss": 1.0})
    # Another reader (or a crash right now) sees the whole line without close() or sync().
    assert read_log(tmp_path)[-1]["step"] == 7
    log.close()


def _write_steps(path, steps):
    with RunLog(path) as log:
        for s in steps:
            log.log(s, {"loss": float(s)})


def test_truncate_after_drops_later_records_and_keeps_appending(tmp_path):
    _write_steps(tmp_path, range(10))
    log = RunLog(tmp_path)
    dropped = log.truncate_after(5)
    assert dropped == 4
    log.log(6, {"loss": 60.0})
    log.close()
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    assert records[-1]["values"]["loss"] == 60.0
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]  # no temp file left behind


def test_partial_last_line_dropped_with_warning(tmp_path):
    _write_steps(tmp_path, range(3))
    path = tmp_path / "log.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "time": 1.0, "kind": "train", "values": {"lo')  # crash mid-line
    with pytest.warns(UserWarning, match="partial last line"):
        records = read_log(path)
    assert [r["step"] for r in records] == [0, 1, 2]

    with pytest.warns(UserWarning, match="partial last line"):
        log = RunLog(tmp_path)  # resuming cuts the fragment before appending
    log.log(3, {"loss": 3.0})
    log.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the repaired file reads cleanly
        assert [r["step"] for r in read_log(path)] == [0, 1, 2, 3]


def test_complete_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "log.jsonl"
    record = '{{"step": {}, "time": 1.0, "kind": "train", "values": {{}}}}'
    path.write_text(record.format(0) + "\n" + record.format(1))  # last newline never written
    assert [r["step"] for r in read_log(path)] == [0, 1]
    with RunLog(path) as log:
        log.log(2, {})
    assert [r["step"] for r in read_log(path)] == [0, 1, 2]


def test_corrupt_middle_line_is_skipped_with_one_warning_naming_it(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0, "values": {}}\nnot json\n{"step": 2, "values": {}}\n[1]\n{"step": 4, "values": {}}\n')
    with pytest.warns(UserWarning, match=r"skipped 2 corrupt lines \(2, 4\)") as caught:
        assert [r["step"] for r in read_log(path)] == [0, 2, 4]
    assert len(caught) == 1
    log = RunLog(path)
    with pytest.warns(UserWarning, match="corrupt"):
        log.begin_launch(2)  # resuming from step 2 drops the damage (and step 4) for good
    log.log(3, {})
    log.close()
    assert [r["step"] for r in read_log(path)] == [0, 2, 3]


def test_begin_launch_keeps_one_start_per_surviving_launch(tmp_path):
    """A fresh launch starts a new log; a resume drops later records and the start of a launch that saved nothing."""
    log = RunLog(tmp_path)
    for step, kind in [(0, "start"), (5, "train"), (10, "train"), (10, "end"),  # launch 1: steps 0-10, finished
                       (10, "start"), (15, "train"), (20, "train"),  # launch 2: killed after its step-20 checkpoint
                       (20, "start"), (25, "train")]:  # launch 3 (from 20): killed before saving anything
        log.log(step, {}, kind=kind)
    assert log.begin_launch(20) == 2  # resume from step 20 again
    assert [(r["step"], r["kind"]) for r in log.records()] == [
        (0, "start"), (5, "train"), (10, "train"), (10, "end"), (10, "start"), (15, "train"), (20, "train")]
    log.begin_launch(0)  # no checkpoint at all: a fresh run
    assert log.records() == []
    log.close()


def test_bad_values_are_config_errors(tmp_path):
    with RunLog(tmp_path) as log:
        with pytest.raises(ConfigError, match="model"):
            log.log(0, {"model": object()})
        with pytest.raises(ConfigError, match="step"):
            log.log("3", {})
