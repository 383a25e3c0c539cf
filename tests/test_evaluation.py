"""The evaluation pipeline: cached reference statistics, evaluate() on files, splits and runs, metrics.json,
compare (genlab.report), periodic evaluation, evaluator export, the `genlab eval` / `genlab compare` commands, and the
shipped evaluators (SPEC E1-E5)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import genlab
from genlab import api, evaluation, report
from genlab.cli import main
from genlab.data import from_model_range, load_data, to_model_range
from genlab.errors import ConfigError, DataError
from genlab.imageio import save_npz
from genlab.metrics import (
    GaussianStats,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    kid_real_kernel_sums,
    knn_radii,
    precision_recall_density_coverage,
)
from genlab.metrics.extractors import CARD_KEYS, ClassifierExtractor, get_extractor, save_classifier_evaluator, sha256_file
from genlab.models.classifier import Classifier, ClassifierConfig

from conftest import DATA_ROOT
from oneline import one_line_error
from tiny_configs import TINY_DDPM

# What every metrics.json entry must say about how its numbers were made (SPEC E5).
PROTOCOL_FIELDS = ("n", "reference", "reference_n", "extractor", "extractor_sha256", "sampler", "steps", "weights",
                   "checkpoint_step", "seed", "genlab", "torch", "date")


def _tiny_evaluator(directory: Path, seed: int = 0, name: str = "tiny") -> Path:
    """A randomly initialised 8x8 classifier saved as an evaluator (weights + card); returns the weights path."""
    torch.manual_seed(seed)
    model = Classifier(ClassifierConfig(image_size=8, channels=(8,), pooled_size=2, feature_dim=16))
    weights, _ = save_classifier_evaluator(model, directory, name, training_command="random init (test)", seed=seed,
                                           test_accuracy=0.1)
    return weights


class CountingExtractor:
    """An extractor that counts its calls (to see whether reference statistics were recomputed)."""

    def __init__(self, inner: ClassifierExtractor):
        self.inner = inner
        self.batch_size = inner.batch_size
        self.name, self.sha256 = inner.name, inner.sha256
        self.feature_dim, self.num_classes = inner.feature_dim, inner.num_classes
        self.calls = 0

    def to(self, device):
        self.inner.to(device)
        return self

    def features_and_logits(self, images):
        self.calls += 1
        return self.inner.features_and_logits(images)


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("evaluators")
    _tiny_evaluator(directory, seed=0, name="tiny")
    _tiny_evaluator(directory, seed=1, name="tiny-other")
    return directory


@pytest.fixture
def tiny(evaluator_dir) -> CountingExtractor:
    return CountingExtractor(ClassifierExtractor.from_files(evaluator_dir / "tiny.safetensors"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_ddpm_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("eval") / "ddpm"
    api.train("ddpm", data="digits", overrides=[*TINY_DDPM, "train.steps=3"], run_dir=run_dir, progress=False)
    return run_dir


def _save_u8_npz(images_u8: torch.Tensor, path: Path) -> Path:
    return save_npz(to_model_range(images_u8), path)


def _features(extractor, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and probabilities (N, C) computed directly, without the pipeline."""
    features, logits = extractor.features_and_logits(to_model_range(images_u8))
    return features, torch.softmax(logits.double(), dim=1)


# ---------------------------------------------------------------------------------------------
# Reference statistics.


def test_reference_is_the_statistics_of_the_split(cache, tiny):
    reference = evaluation.reference_stats("digits", "test", tiny, device="cpu")
    images = load_data(source="digits", split="test").images
    features, probabilities = _features(tiny.inner, images)
    assert reference.n == len(images) == 297
    torch.testing.assert_close(reference.features, features)
    torch.testing.assert_close(reference.probabilities, probabilities)
    expected = GaussianStats().update(features)
    torch.testing.assert_close(reference.stats.mean, expected.mean)
    torch.testing.assert_close(reference.stats.covariance, expected.covariance)
    assert reference.path.is_file() and reference.path.parent == cache / "refs"
    assert json.loads(reference.path.with_suffix(".json").read_text())["extractor_sha256"] == tiny.sha256


def test_reference_cache_is_reused_and_rebuilt_when_its_key_changes(cache, tiny, evaluator_dir):
    first = evaluation.reference_stats("digits", "test", tiny, device="cpu")
    assert tiny.calls > 0
    tiny.calls = 0
    again = evaluation.reference_stats("digits", "test", tiny, device="cpu")
    assert tiny.calls == 0, "the cached reference was recomputed"
    assert again.path == first.path and torch.equal(again.stats.outer_sum, first.stats.outer_sum)
    assert torch.equal(again.features, first.features)

    # Each part of the key: N, split, extractor weights (same name, other sha256).
    limited = evaluation.reference_stats("digits", "test", tiny, n=100, device="cpu")
    assert tiny.calls > 0 and limited.n == 100 and limited.path != first.path
    tiny.calls = 0
    train = evaluation.reference_stats("digits", "train", tiny, device="cpu")
    assert tiny.calls > 0 and train.n == 1500 and train.path != first.path
    other = ClassifierExtractor.from_files(evaluator_dir / "tiny-other.safetensors")
    other.name = tiny.name  # same name, different weights: only the sha256 tells them apart
    counted_other = CountingExtractor(other)
    rebuilt = evaluation.reference_stats("digits", "test", counted_other, device="cpu")
    assert counted_other.calls > 0 and rebuilt.path != first.path
    assert not torch.equal(rebuilt.features, first.features)

    # A file whose stored key does not match (copied over, or stale) is rebuilt, as is a corrupt one.
    rebuilt.path.write_bytes(first.path.read_bytes())
    counted_other.calls = 0
    fixed = evaluation.reference_stats("digits", "test", counted_other, device="cpu")
    assert counted_other.calls > 0 and torch.equal(fixed.features, rebuilt.features)
    first.path.write_bytes(b"not a safetensors file")
    tiny.calls = 0
    evaluation.reference_stats("digits", "test", tiny, device="cpu")
    assert tiny.calls > 0


def test_reference_only_metric_parts_are_stored_in_the_cache_and_leave_the_scores_unchanged(cache, tiny, tmp_path,
                                                                                               monkeypatch):
    from genlab.evaluation import reference as reference_module

    noise = torch.randint(0, 256, (150, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    path = _save_u8_npz(noise, tmp_path / "noise.npz")
    first = evaluation.evaluate(path, ref="digits:test", extractor=tiny, device="cpu", seed=2)
    stored = evaluation.reference_stats("digits", "test", tiny, device="cpu")
    real_features = stored.features.double()
    # What the file holds is what the metrics compute from the reals alone (squared k-NN radii, KID sums).
    radii = knn_radii(real_features, (3, 5))
    assert torch.equal(stored.derived["knn_radii.k3"], radii[3]) and torch.equal(stored.derived["knn_radii.k5"], radii[5])
    torch.testing.assert_close(stored.derived["kid_real_kernel_sums.seed2.subsets100.m1000.nfake150"],
                               kid_real_kernel_sums(real_features, 150, 100, 1000, torch.Generator().manual_seed(2)),
                               rtol=1e-12, atol=0)

    # Scored again: read from the file, not recomputed, and the same numbers as the direct formulas.
    def not_again(*args, **kwargs):
        raise AssertionError("a stored reference part was recomputed")

    computes = {name: getattr(reference_module, name) for name in ("knn_radii", "kid_real_kernel_sums")}
    for name in computes:
        monkeypatch.setattr(reference_module, name, not_again)
    again = evaluation.evaluate(path, ref="digits:test", extractor=tiny, device="cpu", seed=2)
    fake_features, _ = _features(tiny.inner, noise)
    prdc = precision_recall_density_coverage(real_features, fake_features, 3, 5)
    kid = kernel_inception_distance(real_features, fake_features, 100, 1000, torch.Generator().manual_seed(2))
    for result in (first, again):
        assert {name: result["metrics"][name] for name in prdc} == prdc
        assert (result["metrics"]["kid"], result["std"]["kid"]) == pytest.approx(kid, rel=1e-11)

    # Another seed or another N draws other KID subsets: new sums, stored beside the old ones.
    for name, compute in computes.items():
        monkeypatch.setattr(reference_module, name, compute)
    evaluation.evaluate(path, ref="digits:test", n=120, extractor=tiny, device="cpu", seed=3)
    names = set(evaluation.reference_stats("digits", "test", tiny, device="cpu").derived)
    assert {"kid_real_kernel_sums.seed2.subsets100.m1000.nfake150",
            "kid_real_kernel_sums.seed3.subsets100.m1000.nfake120"} <= names
    # Another k is another name (computed and stored); another extractor is another reference file.
    assert torch.equal(stored.knn_radii((4,))[4], knn_radii(real_features, (4,))[4])
    assert "knn_radii.k4" in evaluation.reference_stats("digits", "test", tiny, device="cpu").derived


# ---------------------------------------------------------------------------------------------
# evaluate() on files and splits: the pipeline equals the metric math on the same features.


def test_evaluate_npz_equals_the_metric_math(cache, tiny, tmp_path):
    real = load_data(source="digits", split="test").images  # (297, 1, 8, 8)
    noise = torch.randint(0, 256, (100, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    same = evaluation.evaluate(_save_u8_npz(real, tmp_path / "real.npz"), ref="digits:test", metrics="fid,pr,dc",
                               extractor=tiny, device="cpu")
    assert same["metrics"]["fid"] < 1e-9  # identical sets
    assert same["metrics"]["precision"] == 1.0 and same["metrics"]["recall"] == 1.0
    assert same["metrics"]["coverage"] == 1.0

    result = evaluation.evaluate(_save_u8_npz(noise, tmp_path / "noise.npz"), ref="digits:test", extractor=tiny,
                                 device="cpu", seed=3)
    real_features, _ = _features(tiny.inner, real)
    fake_features, fake_probabilities = _features(tiny.inner, noise)
    real_stats, fake_stats = GaussianStats().update(real_features), GaussianStats().update(fake_features)
    fid = frechet_distance(fake_stats.mean, fake_stats.covariance, real_stats.mean, real_stats.covariance)
    kid = kernel_inception_distance(real_features, fake_features, subsets=100, subset_size=1000,
                                    generator=torch.Generator().manual_seed(3))
    inception = inception_score(fake_probabilities, splits=10, generator=torch.Generator().manual_seed(3))
    prdc = precision_recall_density_coverage(real_features, fake_features, 3, 5)
    values, stds = result["metrics"], result["std"]
    assert values["fid"] == pytest.approx(fid, rel=1e-9) and fid > 1e6 * max(same["metrics"]["fid"], 1e-15)
    assert (values["kid"], stds["kid"]) == pytest.approx(kid, rel=1e-9)
    assert (values["is"], stds["is"]) == pytest.approx(inception, rel=1e-9)
    p_y = fake_probabilities.double().mean(dim=0)
    assert values["class_entropy"] == pytest.approx(float(-(p_y * p_y.log()).sum()), rel=1e-9)
    for name in ("precision", "recall", "density", "coverage"):
        assert values[name] == pytest.approx(prdc[name], abs=1e-12)
    protocol = result["protocol"]
    assert protocol["n"] == 100 and protocol["reference"] == "digits:test" and protocol["reference_n"] == 297
    assert protocol["extractor_sha256"] == tiny.sha256
    assert protocol["target_sha256"] == sha256_file(tmp_path / "noise.npz")
    assert all(field in protocol for field in PROTOCOL_FIELDS)


def test_evaluate_uses_the_first_n_images_and_only_the_asked_metrics(cache, tiny, tmp_path):
    real = load_data(source="digits", split="train").images[:100]
    path = _save_u8_npz(real, tmp_path / "x.npz")
    result = evaluation.evaluate(path, ref="digits:test", metrics="fid,pr", n=60, extractor=tiny, device="cpu")
    assert set(result["metrics"]) == {"fid", "precision", "recall"} and result["std"] == {}
    # The first 60 images, as a data split target gives them too.
    split = evaluation.evaluate("digits:train", ref="digits:test", metrics=["fid"], n=60, extractor=tiny, device="cpu")
    assert split["metrics"]["fid"] == result["metrics"]["fid"] and result["protocol"]["n"] == 60
    with pytest.raises(DataError, match="fewer than n=200"):
        evaluation.evaluate(path, ref="digits:test", n=200, extractor=tiny, device="cpu")


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"ref": "digits"}, ConfigError, ["'digits'", "SOURCE:SPLIT"]),
        ({"ref": "nosuch:test"}, DataError, ["nosuch"]),
        ({"ref": "folder:/photos"}, ConfigError, ["'folder:/photos'", "folder:/photos:train"]),  # not "source 'folder'"
        ({"metrics": "fid,lpips"}, ConfigError, ["lpips", "fid, kid, is, pr, dc"]),
        ({"weights": "last"}, ConfigError, ["last"]),
        ({"sampler": "ddim"}, ConfigError, ["--sampler", "not a run folder"]),
    ],
)
def test_bad_arguments_are_one_line_errors(cache, tiny, tmp_path, kwargs, error, words):
    path = _save_u8_npz(load_data(source="digits", split="test").images[:20], tmp_path / "x.npz")
    with pytest.raises(error) as info:
        evaluation.evaluate(path, **{"ref": "digits:test", "extractor": tiny, "device": "cpu", **kwargs})
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)


# ---------------------------------------------------------------------------------------------
# Runs: sampling, metrics.json with protocols, compare, periodic evaluation.


def test_evaluate_run_equals_evaluating_its_npz_and_writes_metrics_json(cache, tiny, tiny_ddpm_run, tmp_path):
    result = evaluation.evaluate(tiny_ddpm_run, ref="digits:test", metrics="fid,kid", n=40, steps=3, seed=5,
                                 extractor=tiny, device="cpu", batch_size=16)
    # `genlab sample --out x.npz` with the same seed and options, then scored as a file: the same numbers.
    images = api.load_run(tiny_ddpm_run).sample(40, seed=5, steps=3, batch_size=16)
    from_file = evaluation.evaluate(save_npz(images, tmp_path / "s.npz"), ref="digits:test", metrics="fid,kid", seed=5,
                                    extractor=tiny, device="cpu")
    # Equal up to float32 rounding of features computed in batches of another size.
    assert result["metrics"] == pytest.approx(from_file["metrics"], rel=1e-6)
    protocol = result["protocol"]
    assert (protocol["sampler"], protocol["steps"], protocol["weights"], protocol["checkpoint_step"]) == ("ddim", 3, "ema", 3)
    entries = evaluation.read_metrics(tiny_ddpm_run)
    assert len(entries) == 1 and entries[0]["metrics"] == result["metrics"]
    assert all(field in entries[0]["protocol"] for field in PROTOCOL_FIELDS)

    # Same protocol, other metric: merged into the same entry. Other seed: a new entry.
    evaluation.evaluate(tiny_ddpm_run, ref="digits:test", metrics="pr", n=40, steps=3, seed=5, extractor=tiny,
                        device="cpu", batch_size=16)
    entries = evaluation.read_metrics(tiny_ddpm_run)
    assert len(entries) == 1 and set(entries[0]["metrics"]) == {"fid", "kid", "precision", "recall"}
    assert entries[0]["metrics"]["fid"] == result["metrics"]["fid"]
    evaluation.evaluate(tiny_ddpm_run, ref="digits:test", metrics="fid", n=40, steps=3, seed=6, extractor=tiny,
                        device="cpu", batch_size=16)
    entries = evaluation.read_metrics(tiny_ddpm_run)
    assert [e["protocol"]["seed"] for e in entries] == [5, 6]
    assert entries[1]["metrics"]["fid"] != entries[0]["metrics"]["fid"]
    (tiny_ddpm_run / "metrics.json").unlink()


def test_class_all_asks_each_class_equally_and_scores_the_evaluator_verdict(cache, tiny, tmp_path):
    run_dir = tmp_path / "cond"
    api.train("ddpm", data="digits", overrides=[*TINY_DDPM, "train.steps=2", "model.class_conditional=true",
                                                 "model.p_uncond=0.2"], run_dir=run_dir, progress=False)
    result = evaluation.evaluate(run_dir, ref="digits:test", metrics="fid", n=30, steps=2, seed=3, extractor=tiny,
                                 device="cpu", batch_size=8, write=False,
                                 sample_options={"labels": "all", "guidance_scale": 2.0})
    labels = torch.arange(30) % 10
    assert result["protocol"]["sample_options"]["labels"] == {"classes": {k: 3 for k in range(10)}}
    # The same samples drawn by hand and judged by hand: the evaluator's argmax against the asked class.
    images = api.load_run(run_dir).sample(30, seed=3, steps=2, batch_size=8, labels=labels, guidance_scale=2.0)
    images_u8 = from_model_range(images)
    _, logits = tiny.features_and_logits(to_model_range(images_u8))
    expected = float((logits.argmax(1) == labels).double().mean())
    assert result["metrics"]["class_accuracy"] == pytest.approx(expected, abs=1e-12)
    # With the time estimate (what `genlab eval` prints) the timing batch takes the first images' classes
    # and the scored samples stay the same.
    logged = evaluation.evaluate(run_dir, ref="digits:test", metrics="fid", n=30, steps=2, seed=3, extractor=tiny,
                                 device="cpu", batch_size=8, write=False, log=lambda message: None,
                                 sample_options={"labels": "all", "guidance_scale": 2.0})
    assert logged["metrics"] == result["metrics"]
    # Asking for a class of a dataset without labels is a one-line error.
    with pytest.raises(ConfigError, match="no class labels"):
        evaluation.evaluate(tiny_unlabelled_run(tmp_path), ref="digits:test", metrics="fid", n=4, steps=1,
                            extractor=tiny, device="cpu", write=False, sample_options={"labels": "all"})


def tiny_unlabelled_run(tmp_path: Path) -> Path:
    """An unconditional DDPM run on an image folder (no labels at all)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    run_dir = tmp_path / "unlabelled"
    api.train("ddpm", data=f"folder:{folder}", overrides=[*TINY_DDPM, "train.steps=1", "train.batch_size=4"],
              run_dir=run_dir, progress=False)
    return run_dir


def test_periodic_eval_scores_the_method_as_evaluate_scores_the_run(cache, tiny, tiny_ddpm_run):
    run = api.load_run(tiny_ddpm_run, device="cpu")
    values = evaluation.periodic_eval(run.method, ref="digits:test", n=24, metrics=("fid", "kid"), seed=2,
                                      extractor=tiny, batch_size=8, sample_options={"steps": 3})
    full = evaluation.evaluate(tiny_ddpm_run, ref="digits:test", metrics="fid,kid", n=24, steps=3, seed=2,
                               extractor=tiny, device="cpu", batch_size=8, write=False)
    assert values["fid"] == full["metrics"]["fid"] and values["kid"] == full["metrics"]["kid"]
    assert values["kid_std"] == full["std"]["kid"] and values["eval_n"] == 24
    assert run.method.training is False  # the caller's mode is restored


def test_compare_tables_the_newest_entries_and_draws_a_chart(cache, tiny, tmp_path):
    paths = []
    for name, images in (("real", load_data(source="digits", split="train").images[:100]),
                         ("noise", torch.randint(0, 256, (120, 1, 8, 8), dtype=torch.uint8))):
        result = evaluation.evaluate(_save_u8_npz(images, tmp_path / f"{name}.npz"), ref="digits:test",
                                     metrics="fid,kid", extractor=tiny, device="cpu",
                                     json_path=tmp_path / f"{name}.json")
        paths.append((tmp_path / f"{name}.json", result))
    table, rows = report.compare([p for p, _ in paths], out=tmp_path / "chart.png")
    lines = table.splitlines()
    assert lines[0] == "generation:"
    assert lines[2].startswith("| run |") and "fid" in lines[2] and "kid" in lines[2]
    for line, (path, result) in zip(lines[4:6], paths):
        assert line.startswith(f"| {path.name} |")
        assert f"{result['metrics']['fid']:.4g}" in line and f"+- {result['std']['kid']:.2g}" in line
    assert "protocols differ in n (100 vs 120)" in table
    image = Image.open(tmp_path / "chart.png")
    assert image.format == "PNG" and image.width > 200
    with pytest.raises(DataError, match="no metrics against mnist:test"):
        report.compare([paths[0][0]], ref="mnist:test", out=None)


# ---------------------------------------------------------------------------------------------
# Exporting a classifier run as an evaluator.


TINY_CLASSIFIER = ["model.net.channels=[8,16]", "model.net.pooled_size=2", "model.net.feature_dim=32",
                   "model.max_shift=1", "train.batch_size=64", "train.lr=3e-3", "train.warmup_steps=5", "train.steps=40",
                   "train.threads=1"]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("clf") / "run"
    api.train("classifier", data="digits", run_dir=run_dir, progress=False, overrides=TINY_CLASSIFIER)
    return run_dir


def test_export_evaluator_writes_a_card_with_the_measured_accuracy(classifier_run, tmp_path, cache):
    card = evaluation.export_evaluator(classifier_run, "digits-eval", out_dir=tmp_path / "out",
                                       training_command="genlab train classifier --data digits (test)")
    weights = tmp_path / "out" / "digits-eval.safetensors"
    assert all(key in card for key in CARD_KEYS)
    assert card["sha256"] == sha256_file(weights) and card["train_steps"] == 40 and card["ema"] is True
    test = load_data(source="digits", split="test")
    run = api.load_run(classifier_run, device="cpu")
    with torch.no_grad():
        accuracy = (run.method(test.to_model_range()).argmax(dim=1) == test.labels).double().mean().item()
    assert card["test_accuracy"] == pytest.approx(accuracy, abs=1e-12) and card["test_accuracy"] > 0.3
    assert get_extractor(weights).sha256 == card["sha256"]
    with pytest.raises(ConfigError, match="'classifier' run"):
        ddpm = tmp_path / "ddpm"
        api.train("ddpm", data="digits", overrides=[*TINY_DDPM, "train.steps=1"], run_dir=ddpm, progress=False)
        evaluation.export_evaluator(ddpm, "x", out_dir=tmp_path / "out")


def test_cli_export_evaluator_writes_to_the_user_folder_and_eval_finds_it_by_name(classifier_run, cache, tmp_path,
                                                                                     capsys):
    assert main(["export-evaluator", str(classifier_run), "my-digits"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    weights = cache / "evaluators" / "my-digits.safetensors"  # $GENLAB_CACHE/evaluators, not the package
    assert Path(out[-1]) == weights and weights.is_file() and weights.with_suffix(".json").is_file()
    assert not (Path(genlab.__file__).parent / "evaluators" / "my-digits.safetensors").exists()
    card = json.loads(weights.with_suffix(".json").read_text())
    assert f"{card['test_accuracy']:.2%}" in out[0] and "--extractor my-digits" in out[1]
    # --extractor NAME and --extractor PATH are the same evaluator.
    npz = _save_u8_npz(load_data(source="digits", split="train").images[:40], tmp_path / "x.npz")
    by_name = evaluation.evaluate(npz, ref="digits:test", metrics="fid", extractor="my-digits", write=False)
    by_path = evaluation.evaluate(npz, ref="digits:test", metrics="fid", extractor=str(weights), write=False)
    assert by_name["protocol"]["extractor_sha256"] == card["sha256"] == by_path["protocol"]["extractor_sha256"]
    assert by_name["metrics"] == by_path["metrics"]
    assert main(["eval", str(npz), "--ref", "digits:test", "--metrics", "fid", "--extractor", "my-digits",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.split()[:2] == ["fid", f"{by_name['metrics']['fid']:.6g}"]
    # An existing evaluator is kept unless --force; shipped names and the package folder are refused.
    before = weights.read_bytes()
    assert main(["export-evaluator", str(classifier_run), "my-digits"]) == 2
    assert "--force" in one_line_error(capsys) and weights.read_bytes() == before
    assert main(["export-evaluator", str(classifier_run), "my-digits", "--force"]) == 0
    capsys.readouterr()
    assert main(["export-evaluator", str(classifier_run), "mnist"]) == 2  # shadowed by the shipped one
    assert "shipped" in one_line_error(capsys) and not (cache / "evaluators" / "mnist.json").exists()
    package = Path(genlab.__file__).parent / "evaluators"
    assert main(["export-evaluator", str(classifier_run), "mine", "--out", str(package)]) == 2
    assert "installed package" in one_line_error(capsys) and not (package / "mine.json").exists()
    assert main(["export-evaluator", str(classifier_run), "../up"]) == 2
    assert "letters, digits" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# Which scoring a run gets: its declared capabilities.


def _fake_run(tmp_path: Path, method: str) -> Path:
    """A folder with only a config.yaml naming ``method``: enough for the dispatch (no weights are loaded)."""
    folder = tmp_path / method
    folder.mkdir()
    (folder / "config.yaml").write_text(f"method: {method}\n")
    return folder


@pytest.mark.parametrize("method, kinds", [
    ("ddpm", ("generation",)), ("gan", ("generation",)), ("gpt", ("generation",)),
    ("ae", ("reconstruction",)), ("vqvae", ("reconstruction",)), ("vae", ("reconstruction", "generation")),
    ("pix2pix", ("translation",)),
])
def test_auto_kind_follows_the_declared_capabilities(tmp_path, method, kinds):
    assert evaluation.kinds_for(_fake_run(tmp_path, method)) == kinds


@pytest.mark.parametrize("method, kind, capability", [
    ("ddpm", "reconstruction", "Reconstructs"), ("ae", "generation", "Generates"),
    ("vae", "translation", "Translates"), ("classifier", "auto", "Generates"),
])
def test_a_kind_the_run_cannot_do_names_the_missing_capability(tmp_path, capsys, method, kind, capability):
    run = _fake_run(tmp_path, method)
    with pytest.raises(ConfigError, match=f"capability '{capability}'"):
        evaluation.kinds_for(run, kind)
    assert main(["eval", str(run), "--kind", kind]) == 2
    err = one_line_error(capsys)
    assert capability in err and str(run) in err


def test_evaluate_run_scores_the_loaded_run_without_reloading_it(cache, tiny, tiny_ddpm_run, monkeypatch):
    import genlab.runs

    options = dict(ref="digits:test", metrics="fid", n=16, steps=2, seed=4, extractor=tiny, device="cpu", batch_size=8,
                   write=False)
    by_path = evaluation.evaluate(tiny_ddpm_run, **options)
    run = api.load_run(tiny_ddpm_run, device="cpu")
    monkeypatch.setattr(genlab.runs, "load_run", lambda *a, **k: pytest.fail("the loaded run was loaded again"))
    results = evaluation.evaluate_run(run, **options)
    assert len(results) == 1 and results[0]["metrics"] == by_path["metrics"]
    assert [r["metrics"] for r in run.evaluate(**options)] == [by_path["metrics"]]  # the API's Run.evaluate
    assert results[0]["protocol"]["target"] == str(tiny_ddpm_run)
    with pytest.raises(ConfigError, match=f"^{tiny_ddpm_run}: a ddpm run cannot be scored on reconstruction"):
        evaluation.evaluate_run(run, "reconstruction")


def test_files_and_splits_are_scored_as_generated_images(tmp_path):
    npz = _save_u8_npz(load_data(source="digits", split="test").images[:4], tmp_path / "x.npz")
    assert evaluation.kinds_for(npz) == evaluation.kinds_for("digits:train") == ("generation",)
    with pytest.raises(ConfigError, match="not a run folder"):
        evaluation.kinds_for(npz, "reconstruction")


# ---------------------------------------------------------------------------------------------
# Saying the cost before paying it; bars that move.


def test_eval_says_how_many_images_and_the_time_before_sampling(cache, tiny, tiny_ddpm_run, monkeypatch):
    from genlab.runs import Run

    events = []
    original = Run.sample

    def recording_sample(self, n, *args, **kwargs):
        events.append(("sample", n))
        return original(self, n, *args, **kwargs)

    monkeypatch.setattr(Run, "sample", recording_sample)
    result = evaluation.evaluate(tiny_ddpm_run, ref="digits:test", metrics="fid", n=40, seed=1, extractor=tiny,
                                 device="cpu", batch_size=16, write=False, log=lambda m: events.append(("log", m)))
    # A first batch of min(n, batch size, 32) images is timed, then the estimate, then the real sampling.
    assert [e[0] for e in events] == ["sample", "log", "sample"]
    assert events[0][1] == 16 and events[2][1] == 40
    assert events[1][1].startswith(f"sampling 40 images from {tiny_ddpm_run} in batches of 16: about ")
    assert "ms per image, timed on a first 16" in events[1][1]
    seconds = result["protocol"]["seconds"]
    assert seconds["probe"] > 0 and "probe" not in evaluation.evaluate(
        tiny_ddpm_run, ref="digits:test", metrics="fid", n=4, extractor=tiny, device="cpu", write=False
    )["protocol"]["seconds"]  # the timing batch is recorded apart from the N images' sampling time
    # The timing batch is thrown away: the scored samples are those of a plain evaluation.
    plain = evaluation.evaluate(tiny_ddpm_run, ref="digits:test", metrics="fid", n=40, seed=1, extractor=tiny,
                                device="cpu", batch_size=16, write=False)
    assert result["metrics"] == plain["metrics"]


@pytest.fixture
def bar_updates(monkeypatch) -> list[float]:
    """The amounts every enabled progress bar moves by, in order (tqdm.auto.tqdm replaced by a recorder)."""
    import tqdm.auto

    updates: list[float] = []

    class RecordingBar:
        def __init__(self, total=None, disable=False, **kwargs):
            self.total, self.n, self.disable = total, 0, disable

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, amount):
            if not self.disable:
                updates.append(amount)
            self.n += amount

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    return updates


def test_sampling_bar_moves_at_every_sampler_step(tiny_ddpm_run, bar_updates):
    from genlab.evaluation.generation import sample_run

    updates = bar_updates
    run = api.load_run(tiny_ddpm_run, device="cpu")
    images = sample_run(run, 10, seed=0, batch_size=4, options={"steps": 3}, progress=True)
    # 3 batches (4 + 4 + 2 images) x 3 DDIM steps, each moving the bar by its share; then the remainder (0).
    assert updates[:9] == pytest.approx([4 / 3] * 6 + [2 / 3] * 3) and sum(updates) == pytest.approx(10)
    assert torch.equal(images, run.sample(10, seed=0, batch_size=4, steps=3))


def test_the_timing_probe_samples_the_first_images_own_prompts_and_labels():
    """`genlab eval` of a text run times a first batch before sampling: each per-image option (prompts as a list,
    labels as a tensor) must be cut to that batch, or a run checking one prompt per sample refuses it."""
    from types import SimpleNamespace

    from genlab.evaluation.generation import sample_run

    calls = []

    def sample(n, seed=0, batch_size=None, prompts=None, labels=None, progress=False):
        assert len(prompts) == n and len(labels) == n  # what DDPM.sample requires of per-sample options
        calls.append((n, list(prompts), labels.tolist()))
        return torch.zeros(n, 1, 4, 4)

    run = SimpleNamespace(method=torch.nn.Linear(1, 1), path="runs/stub", sample=sample)
    prompts = [f"the digit {k % 10}" for k in range(40)]
    logged = []
    sample_run(run, 40, seed=0, batch_size=32, options={"prompts": prompts, "labels": torch.arange(40)}, log=logged.append)
    probe, full = calls
    assert probe[1] == prompts[: probe[0]] and probe[2] == list(range(probe[0])) and full[1] == prompts
    assert "40 images" in logged[0]


def test_per_sample_slice_keeps_whole_run_specs_whole():
    from genlab.runs import per_sample_slice

    cut = per_sample_slice({"labels": "all", "prompt": "a 7", "prompts": ["a", "b", "c"], "negative_labels": [1, 2, 3],
                            "steps": 3}, 1, 3)
    assert cut["labels"] == "all" and cut["prompt"] == "a 7" and cut["prompts"] == ["b", "c"] and cut["steps"] == 3
    assert cut["negative_labels"].tolist() == [2, 3]


def test_feature_bar_moves_every_few_extractor_batches(tiny, bar_updates):
    from genlab.evaluation.reference import features_and_probabilities

    tiny.batch_size = tiny.inner.batch_size = 5  # 4 extractor batches (20 images) per bar step, not one step per 500 images
    images = load_data(source="digits", split="test").images[:50]
    stats, features, _ = features_and_probabilities(tiny, images, 500, "cpu", True, "score")
    assert bar_updates == [20, 20, 10] and stats.n == 50
    torch.testing.assert_close(features, _features(tiny, images)[0])


def test_cli_eval_prints_the_estimate_on_stderr_and_help_states_the_cost(cache, evaluator_dir, tiny_ddpm_run, capsys):
    assert main(["eval", str(tiny_ddpm_run), "--ref", "digits:test", "--metrics", "fid", "--n", "8", "--steps", "2",
                 "--extractor", str(evaluator_dir / "tiny.safetensors"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"sampling 8 images from {tiny_ddpm_run}") and "about" in captured.err
    assert captured.out.split()[0] == "fid"
    (tiny_ddpm_run / "metrics.json").unlink()
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default 10000: tens of minutes for a diffusion run on a CPU" in help_text


# ---------------------------------------------------------------------------------------------
# The command line.


def test_cli_eval_prints_metric_lines_then_the_protocol(cache, evaluator_dir, tmp_path, capsys):
    images = load_data(source="digits", split="train").images[:64]
    path = _save_u8_npz(images, tmp_path / "x.npz")
    weights = evaluator_dir / "tiny.safetensors"
    argv = ["eval", str(path), "--ref", "digits:test", "--metrics", "fid,kid,is,pr,dc", "--n", "50",
            "--extractor", str(weights), "--json", str(tmp_path / "r.json"), "--no-progress"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = evaluation.evaluate(path, ref="digits:test", n=50, extractor=str(weights), write=False)
    names = ["fid", "kid", "is", "class_entropy", "precision", "recall", "density", "coverage"]
    for line, name in zip(lines, names):
        words = line.split()
        assert words[0] == name and float(words[1]) == pytest.approx(result["metrics"][name], rel=1e-5)
        if name in ("kid", "is"):
            assert words[2] == "+-" and float(words[3]) == pytest.approx(result["std"][name], rel=1e-5)
        else:
            assert len(words) == 2
    protocol = dict(line[2:].split(": ", 1) for line in lines[len(names):])
    assert all(line.startswith("# ") for line in lines[len(names):])
    assert protocol["n"] == "50" and protocol["reference"] == "digits:test"
    assert protocol["extractor_sha256"] == sha256_file(weights)
    assert json.loads((tmp_path / "r.json").read_text())["protocol"]["n"] == 50


def test_cli_eval_ref_caches_the_reference(cache, evaluator_dir, capsys):
    weights = evaluator_dir / "tiny.safetensors"
    assert main(["eval", "ref", "--data", "digits", "--split", "test", "--extractor", str(weights), "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "297 images" in out[0] and Path(out[-1]).is_file() and Path(out[-1]).parent == cache / "refs"
    # The default protocol's reference-only parts are stored with it: the first score reads them.
    from safetensors import safe_open

    with safe_open(out[-1], framework="pt") as f:
        names = set(f.keys())
    assert {"derived.knn_radii.k3", "derived.knn_radii.k5",
            f"derived.kid_real_kernel_sums.seed0.subsets100.m1000.nfake{evaluation.DEFAULT_N}"} <= names


@pytest.mark.parametrize(
    "argv, words",
    [
        (["eval", "{npz}", "--ref", "nosuch:test"], ["nosuch"]),
        (["eval", "{npz}", "--ref", "mnist"], ["'mnist'", "SOURCE:SPLIT"]),
        (["eval", "/no/such/file.npz", "--ref", "digits:test"], ["/no/such/file.npz"]),
        (["eval", "/no/such/thing", "--ref", "digits:test"], ["/no/such/thing", "SOURCE:SPLIT"]),
        (["eval", "{npz}", "--ref", "digits:test", "--metrics", "fid,fad"], ["fad"]),
        (["eval", "ref", "--split", "test"], ["--data"]),
        (["compare", "/no/such/run"], ["/no/such/run"]),
    ],
)
def test_cli_bad_input_gives_one_line_errors(cache, evaluator_dir, tmp_path, capsys, argv, words):
    npz = _save_u8_npz(load_data(source="digits", split="test").images[:20], tmp_path / "x.npz")
    argv = [a.replace("{npz}", str(npz)) for a in argv] + ["--extractor", str(evaluator_dir / "tiny.safetensors")] * (
        argv[0] == "eval")
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert all(w in err for w in words), err


def test_cli_compare_prints_a_table_and_writes_the_chart(cache, tiny, tmp_path, capsys):
    json_path = tmp_path / "a.json"
    evaluation.evaluate(_save_u8_npz(load_data(source="digits", split="train").images[:50], tmp_path / "a.npz"),
                        ref="digits:test", metrics="fid", extractor=tiny, device="cpu", json_path=json_path)
    assert main(["compare", str(json_path), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[2].startswith("| run |") and out[4].startswith("| a.json |") and out[-1] == str(tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").format == "PNG"


# ---------------------------------------------------------------------------------------------
# The shipped evaluators.


@pytest.mark.parametrize("name, minimum", [("mnist", 0.99), ("fashion-mnist", 0.90), ("cifar10", 0.85)])
def test_shipped_evaluator_cards_are_complete_and_small(name, minimum):
    weights = Path(genlab.__file__).parent / "evaluators" / f"{name}.safetensors"
    if not weights.is_file():
        pytest.skip(f"{weights} has not been exported yet")
    card = json.loads(weights.with_suffix(".json").read_text())
    assert all(key in card for key in CARD_KEYS)
    assert card["sha256"] == sha256_file(weights) and weights.stat().st_size < 2_000_000
    assert card["test_accuracy"] >= minimum and card["test_images"] == 10000


@pytest.mark.slow  # 10,000 test images through the network: about 5 s each on a busy 2-core CPU
@pytest.mark.data
@pytest.mark.parametrize("name, source", [("mnist", "mnist"), ("fashion-mnist", "fashion-mnist"), ("cifar10", "cifar10")])
def test_shipped_evaluator_accuracy_reproduces_on_the_official_test_split(name, source, data_root):
    weights = Path(genlab.__file__).parent / "evaluators" / f"{name}.safetensors"
    if not weights.is_file():
        pytest.skip(f"{weights} has not been exported yet")
    extractor = get_extractor(name)
    test = load_data(source=source, split="test", root=str(data_root))
    accuracy = evaluation.classifier_accuracy(extractor, test.images, test.labels)
    assert accuracy == extractor.card["test_accuracy"]


@pytest.mark.data
def test_shipped_cifar10_evaluator_classifies_real_test_images_at_its_documented_accuracy(data_root):
    """500 CIFAR-10 test images drawn with a fixed seed (all ten classes): the shipped weights, loaded as the metrics load
    them, score the card's 10,000-image accuracy p within 4 binomial standard deviations sqrt(p (1 - p) / 500)
    (about 6 points): random or mis-loaded weights (10 %), swapped colour channels or a wrong input range fail."""
    weights = Path(genlab.__file__).parent / "evaluators" / "cifar10.safetensors"
    if not weights.is_file():
        pytest.skip(f"{weights} has not been exported yet")
    extractor = get_extractor("cifar10")
    test = load_data(source="cifar10", split="test", root=str(data_root))
    index = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:500]
    images, labels = test.images[index], test.labels[index]
    assert sorted(set(labels.tolist())) == list(range(10))
    accuracy = evaluation.classifier_accuracy(extractor, images, labels)
    p = extractor.card["test_accuracy"]
    assert abs(accuracy - p) <= 4 * math.sqrt(p * (1 - p) / len(labels)), (accuracy, p)


def test_default_extractor_for_cifar10_is_the_shipped_cifar10_evaluator_and_inception_stays_selectable():
    from genlab.evaluation.common import resolve_extractor

    if not (Path(genlab.__file__).parent / "evaluators" / "cifar10.safetensors").is_file():
        pytest.skip("the shipped cifar10 evaluator has not been exported yet")
    extractor = resolve_extractor(None, "cifar10", "cpu")
    assert extractor.name == "cifar10" and (extractor.feature_dim, extractor.num_classes) == (128, 10)
    assert extractor.model.config.in_channels == 3 and extractor.model.config.flip_average
    # Other sources keep their own default; "inception" still names the FID Inception path (weights needed).
    assert evaluation.DEFAULT_EXTRACTORS.get("folder:x", "inception") == "inception"
    with pytest.raises(DataError):
        resolve_extractor(str(Path(genlab.__file__).parent / "evaluators" / "absent-inception.pth"), "cifar10", "cpu")


def test_default_extractor_for_digits_is_the_shipped_mnist_evaluator(cache, tmp_path):
    if not (Path(genlab.__file__).parent / "evaluators" / "mnist.safetensors").is_file():
        pytest.skip("the shipped mnist evaluator has not been exported yet")
    images = load_data(source="digits", split="train").images[:30]
    result = evaluation.evaluate(_save_u8_npz(images, tmp_path / "d.npz"), ref="digits:test", metrics="fid",
                                 device="cpu")
    assert result["protocol"]["extractor"] == "mnist"
    assert result["protocol"]["extractor_sha256"] == get_extractor("mnist").sha256
    assert math.isfinite(result["metrics"]["fid"]) and result["metrics"]["fid"] > 0


def _merge_many(path: str, worker: int) -> None:
    for i in range(15):
        evaluation.merge_metrics(path, {"metrics": {"fid": float(i)}, "std": {},
                                        "protocol": {"n": 10, "seed": 1000 * worker + i, "date": "now"}})


def test_parallel_evaluations_of_one_run_keep_every_entry(tmp_path):
    """Four processes merging into one metrics.json at once: none may overwrite another's entry."""
    import multiprocessing

    path = tmp_path / "metrics.json"
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    workers = [context.Process(target=_merge_many, args=(str(path), w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seeds = sorted(e["protocol"]["seed"] for e in evaluation.read_metrics(path))
    assert seeds == sorted(1000 * w + i for w in range(4) for i in range(15))


@pytest.mark.slow  # scores the 10,000 MNIST test images three times
def test_export_evaluator_of_an_mnist5k_classifier_measures_on_mnist_test(tmp_path, cache, data_root):
    """mnist5k holds training images only: its held-out split is mnist:test, as for every other command."""
    run_dir = tmp_path / "clf5k"
    api.train("classifier", data="mnist5k", run_dir=run_dir, progress=False,
              overrides=[*TINY_CLASSIFIER, "train.steps=2", "data.limit=64"])
    card = evaluation.export_evaluator(run_dir, "m5k", out_dir=tmp_path / "out", data_root=data_root)
    test = load_data(source="mnist", split="test", root=str(data_root))
    run = api.load_run(run_dir, device="cpu")
    with torch.no_grad():
        accuracy = (run.method(test.to_model_range()).argmax(dim=1) == test.labels).double().mean().item()
    assert card["test_split"] == "mnist:test" and card["test_images"] == 10000
    assert card["test_accuracy"] == pytest.approx(accuracy, abs=1e-12)
