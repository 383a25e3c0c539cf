"""genlab compare: one table per family of metrics (its own columns), and one warning line per protocol difference."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from genlab.cli import main
from genlab.evaluation import merge_metrics
from genlab.report import compare


def _generation(n=1000, sampler="ddim", steps=50, guidance=None, fid=10.0, date="2026-01-01", labels=False):
    options = {}
    if guidance is not None:
        options["guidance_scale"] = guidance
    if labels:
        options["labels"] = {"classes": {"0": 5, "1": 5}}
    metrics = {"fid": fid, "kid": 0.01, **({"class_accuracy": 0.9} if labels else {})}
    protocol = {"kind": "generation", "n": n, "checkpoint_step": 100, "reference": "mnist:test", "reference_n": 10000,
                "extractor": "mnist", "extractor_sha256": "abc", "sampler": sampler, "steps": steps, "seed": 0,
                "weights": "ema", "kid_subset_size": 1000, "date": date}
    if options:
        protocol["sample_options"] = options
    return {"metrics": metrics, "std": {"kid": 0.001}, "protocol": protocol}


def _reconstruction(mse=0.01, n=10000, codes=False):
    metrics = {"mse": mse, "psnr": 26.0, "psnr_dataset": 25.0, "ssim": 0.93,
               **({"code_usage": 1.0, "code_perplexity": 200.0} if codes else {"nll_nats": 800.0})}
    protocol = {"kind": "reconstruction", "n": n, "checkpoint_step": 40, "data": "mnist:test", "weights": "ema",
                "psnr": "one", "ssim_window": "gaussian 11x11", "date": "2026-01-02"}
    return {"metrics": metrics, "std": {}, "protocol": protocol}


def _run(tmp_path: Path, name: str, *entries: dict) -> Path:
    for entry in entries:
        merge_metrics(tmp_path / name / "metrics.json", entry)
    return tmp_path / name


def _table_rows(text: str, family: str) -> list[list[str]]:
    """The cells of one family's table (header first)."""
    lines = text.splitlines()
    start = lines.index(f"{family}:") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_each_family_gets_its_own_columns(tmp_path):
    vae = _run(tmp_path, "vae", _reconstruction(), _generation(fid=30.0))
    vq = _run(tmp_path, "vq", _reconstruction(mse=0.02, codes=True))
    ddpm = _run(tmp_path, "ddpm", _generation(fid=5.0, labels=True))
    text, rows = compare([vae, vq, ddpm], out=tmp_path / "c.png")
    generation = _table_rows(text, "generation")
    assert generation[0] == ["run", "step", "N", "reference", "extractor", "sampler", "steps", "guidance", "fid", "kid",
                             "class_accuracy"]
    assert [r[0] for r in generation[1:]] == ["vae", "ddpm"]
    assert generation[1][-3:] == ["30", "0.01 +- 0.001", "-"] and generation[2][-3:] == ["5", "0.01 +- 0.001", "0.9"]
    reconstruction = _table_rows(text, "reconstruction")
    assert reconstruction[0] == ["run", "step", "N", "data", "mse", "psnr", "psnr_dataset", "ssim", "nll_nats",
                                 "code_usage", "code_perplexity"]
    assert reconstruction[1] == ["vae", "40", "10000", "mnist:test", "0.01", "26", "25", "0.93", "800", "-", "-"]
    assert reconstruction[2] == ["vq", "40", "10000", "mnist:test", "0.02", "26", "25", "0.93", "-", "1", "200"]
    assert sorted((r["run"].split("/")[-1], r["kind"]) for r in rows) == [
        ("ddpm", "generation"), ("vae", "generation"), ("vae", "reconstruction"), ("vq", "reconstruction")]
    assert "warning" not in text  # the same protocols: nothing to warn about
    assert Image.open(tmp_path / "c.png").format == "PNG"


@pytest.mark.parametrize("other, field, shown", [
    (dict(sampler="ddpm"), "sampler", "ddim vs ddpm"),
    (dict(steps=1000), "steps", "50 vs 1000"),
    (dict(guidance=3.0), "guidance", "none vs guidance_scale=3.0"),
    (dict(n=500), "n", "1000 vs 500"),
])
def test_one_warning_line_per_protocol_difference(tmp_path, other, field, shown):
    a = _run(tmp_path, "a", _generation())
    b = _run(tmp_path, "b", _generation(**other))
    text, _ = compare([a, b], out=None)
    warnings = [line for line in text.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: the generation protocols differ in {field} ({shown}); "
                        "these numbers are not directly comparable"]


def test_cli_compare_prints_the_family_tables_and_the_warnings(tmp_path, capsys):
    a = _run(tmp_path, "a", _generation(sampler="ddim"), _reconstruction())
    b = _run(tmp_path, "b", _generation(sampler="heun", steps=18), _reconstruction(n=500))
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "generation:" in out and "reconstruction:" in out and out[-1] == str(tmp_path / "c.png")
    warned = [line.split(" differ in ")[1].split(" (")[0] for line in out if line.startswith("warning:")]
    assert warned == ["sampler", "steps", "n"]
