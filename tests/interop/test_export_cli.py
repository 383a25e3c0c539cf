"""`genlab export --format diffusers` and `genlab import diffusers` on a trained run: the model card, one-line
errors, provenance, and `genlab eval` of the imported run (the same numbers as the original's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import genlab
from genlab import evaluation
from genlab.cli import main
from genlab.fileio import sha256_file
from genlab.metrics.extractors import save_classifier_evaluator
from genlab.models.classifier import Classifier, ClassifierConfig

from oneline import one_line_error
from tiny_configs import TINY_DDPM

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny DDPM trained for 3 steps on digits, scored once, and a random 8x8 evaluator to score with."""
    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    assert main(["train", "ddpm", "--data", "digits", "--run-dir", str(run), "--no-progress", *TINY_DDPM,
                 "train.steps=3"]) == 0
    torch.manual_seed(0)
    evaluator, _ = save_classifier_evaluator(
        Classifier(ClassifierConfig(image_size=8, channels=(8,), pooled_size=2, feature_dim=16)), root, "tiny",
        training_command="random init (test)", seed=0, test_accuracy=0.1)
    return run, evaluator


def _eval(target: Path, evaluator: Path) -> dict:
    return evaluation.evaluate(target, ref="digits:test", metrics="fid,kid", n=24, steps=2, seed=3,
                               extractor=str(evaluator), device="cpu", batch_size=12)


def test_export_writes_a_card_with_command_data_steps_metrics_and_version(trained, tmp_path, capsys, monkeypatch):
    run, evaluator = trained
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    scored = _eval(run, evaluator)
    out = tmp_path / "export"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "diffusers", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    card = (out / "README.md").read_text()
    assert "genlab train ddpm --data digits" in card and "model.unet.base_channels=16" in card  # the command
    assert "- Data: `digits`" in card and "- Steps: 3 of 3 planned, batch 32" in card
    assert f"genlab {genlab.__version__}" in card
    row = next(line for line in card.splitlines() if line.startswith("| reference digits:test"))
    assert "n 24" in row and "extractor tiny" in row and "sampler ddim" in row and "steps 2" in row
    assert f"{scored['metrics']['fid']:.4g}" in row and f"± {scored['std']['kid']:.4g}" in row
    (run / "metrics.json").unlink()

    # An existing folder is never overwritten by accident: one line naming the fix.
    assert main(["export", str(run), "--format", "diffusers", str(out)]) == 2
    assert "--force" in one_line_error(capsys)
    assert main(["export", str(run), "--format", "diffusers", str(out), "--force"]) == 0


def test_imported_run_is_scored_like_the_original(trained, tmp_path, capsys, monkeypatch):
    """Export (EMA weights) -> import -> `genlab eval`: the same images, so the same FID and KID as the original run."""
    run, evaluator = trained
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    out, back = tmp_path / "export", tmp_path / "imported"
    assert main(["export", str(run), "--format", "diffusers", str(out)]) == 0
    capsys.readouterr()
    assert main(["import", "diffusers", str(out), "--run-dir", str(back)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(back)
    original, imported = _eval(run, evaluator), _eval(back, evaluator)
    assert imported["metrics"] == original["metrics"]
    (run / "metrics.json").unlink()

    state = json.loads(next((back / "checkpoints").glob("step_*/state.json")).read_text())
    provenance = state["imported_from"]
    assert provenance["weights_sha256"] == sha256_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert provenance["genlab_export"]["source_run"] == str(run.resolve())
    assert main(["export", str(back), "--format", "diffusers", str(tmp_path / "again")]) == 0
    assert f"Imported into genlab from: {out.resolve()}" in (tmp_path / "again" / "README.md").read_text()
    assert main(["import", "diffusers", str(out), "--run-dir", str(back)]) == 2  # never over an existing run
    assert "already holds a run" in one_line_error(capsys)


def test_export_refuses_a_run_that_is_not_a_pixel_ddpm(tmp_path, capsys):
    run = tmp_path / "vae"
    assert main(["train", "vae", "--data", "digits", "--run-dir", str(run), "--no-progress", "train.steps=1",
                 "train.threads=1", "train.batch_size=8"]) == 0
    assert main(["export", str(run), "--format", "diffusers", str(tmp_path / "out")]) == 2
    assert "'vae' run; --format diffusers exports pixel 'ddpm' runs" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_resuming_an_imported_run_fine_tunes_from_its_weights(trained, tmp_path, capsys):
    """An imported checkpoint holds weights only (no optimiser, EMA or RNG state): `--resume` trains on from those
    weights with a fresh optimiser and an EMA started from them (training settings such as train.ema_decay may change:
    there is no state they must agree with), instead of failing on the missing state. At
    train.lr=1e-12 two steps move no weight by more than ~1e-11, so raw and EMA weights must stay at the imported
    ones; a random start (or an EMA started from it: 1.8 % of it is left after two warm-up updates) would not."""
    from genlab.train.checkpoint import latest_checkpoint, load_checkpoint

    run, _ = trained
    out, back = tmp_path / "export", tmp_path / "imported"
    assert main(["export", str(run), "--format", "diffusers", str(out)]) == 0
    assert main(["import", "diffusers", str(out), "--run-dir", str(back)]) == 0
    imported = load_checkpoint(latest_checkpoint(back))[0]["model"]
    capsys.readouterr()
    assert main(["train", "ddpm", "--run-dir", str(back), "--resume", "--no-progress", "train.steps=2",
                 "train.lr=1e-12", "train.ema_decay=0.99", "train.sample_every=0"]) == 0
    assert "holds weights only (imported)" in capsys.readouterr().err
    tuned, state = load_checkpoint(latest_checkpoint(back))
    assert state["step"] == 2
    assert max((tuned["model"][k] - w).abs().max().item() for k, w in imported.items()) < 1e-9
    shadows = {k.removeprefix("params."): v for k, v in tuned["ema_unet"].items() if k.startswith("params.")}
    assert shadows.keys() == {k.removeprefix("unet.") for k in imported}
    assert max((shadow - imported["unet." + k]).abs().max().item() for k, shadow in shadows.items()) < 1e-9
