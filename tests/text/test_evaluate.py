"""Shipped CLIP evaluators, CLIP score of real against shuffled pairs, captions in .npz files, the CLI's one-line errors."""

import json

import numpy as np
import pytest
import torch

from genlab.cli import main
from genlab.data import DataConfig, load_data
from genlab.errors import ConfigError, DataError
from genlab.imageio import load_npz_captions
from genlab.evaluation.text import first_captions, load_clip, score_captions, zero_shot
from genlab.metrics.extractors import _evaluators_dir as evaluators_dir

SHIPPED = sorted(p.stem for p in evaluators_dir().glob("clip-*.json"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_evaluator_matches_its_card(name):
    import hashlib

    card = json.loads((evaluators_dir() / f"{name}.json").read_text())
    weights = evaluators_dir() / card["weights"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == card["sha256"]
    assert weights.stat().st_size < 2_000_000 and card["training_command"].startswith("genlab train clip")
    clip, label = load_clip(name)
    assert sum(p.numel() for p in clip.parameters()) == card["parameters"] and card["sha256"][:12] in label


def test_unknown_judge_is_a_one_line_error():
    with pytest.raises(ConfigError, match="no CLIP judge 'nope'") as excinfo:
        load_clip("nope")
    assert "\n" not in str(excinfo.value)


@pytest.mark.data
@pytest.mark.skipif("clip-mnist-captions" not in SHIPPED, reason="no shipped MNIST CLIP evaluator")
def test_mnist_judge_zero_shot_and_real_pairs_beat_shuffled(data_root):
    data = load_data(DataConfig(source="mnist-captions", split="test", root=str(data_root), limit=300))
    clip, _ = load_clip("mnist")  # found by the data source it judges
    assert zero_shot(clip, data, ["a photo of the digit {}"])["zero_shot_accuracy"] > 0.95
    captions = first_captions(data)
    shuffled = captions[1:] + captions[:1]
    real, protocol = score_captions(data.images, captions, "mnist-captions")
    floor, _ = score_captions(data.images, shuffled, "mnist-captions")
    assert real["clip_score"] > floor["clip_score"] + 0.3 and real["r_precision"] > floor["r_precision"] + 0.2
    assert real["clip_score_x100"] == pytest.approx(real["clip_score"] * 100 / 2.5, rel=1e-6)
    assert "clip-mnist-captions" in protocol["clip_judge"] and "99" in protocol["r_precision"]


def test_npz_captions(tmp_path):
    images = np.zeros((2, 4, 4, 1), dtype=np.uint8)
    np.savez(tmp_path / "ok.npz", images=images, captions=np.array(["a thick seven", "a 3 left of an 8"]))
    np.savez(tmp_path / "none.npz", images=images)
    np.savez(tmp_path / "empty.npz", images=images, captions=np.array(["a seven", "  "]))
    np.savez(tmp_path / "numbers.npz", images=images, captions=np.array([1, 2]))
    assert load_npz_captions(tmp_path / "ok.npz") == ["a thick seven", "a 3 left of an 8"]
    assert load_npz_captions(tmp_path / "none.npz") is None
    with pytest.raises(DataError, match="caption 1 is empty"):
        load_npz_captions(tmp_path / "empty.npz")
    with pytest.raises(DataError, match="1-d array of strings"):
        load_npz_captions(tmp_path / "numbers.npz")
    with pytest.raises(DataError, match="one caption per image"):
        score_captions(torch.zeros(3, 1, 28, 28, dtype=torch.uint8), ["a"], "nope")


def test_cli_zero_shot_and_data_show_errors_are_one_line(tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a black square\n")
    assert main(["data", "show", f"folder:{tmp_path}", "--n", "1", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert main(["zero-shot", "nope", "--data", "digits:test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no CLIP judge") and err.count("\n") == 1
    (tmp_path / "a.txt").write_text("\n")
    assert main(["data", "show", f"folder:{tmp_path}", "--out", str(tmp_path / "g.png")]) == 2
    assert "a.txt is empty" in capsys.readouterr().err


def test_a_users_clip_evaluator_is_found_by_name_and_checked(tmp_path, monkeypatch):
    """An evaluator in $GENLAB_CACHE/evaluators (where genlab export-evaluator writes) loads by name, only if untouched."""
    from safetensors.torch import save_file

    from genlab.config import to_dict
    from genlab.errors import GenlabError
    from genlab.fileio import sha256_file
    from genlab.models.clip import CLIP, CLIPConfig
    from genlab.text.encoders import TextEncoderConfig, build_text_encoder

    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path))
    folder = tmp_path / "evaluators"
    folder.mkdir()
    torch.manual_seed(0)
    text = TextEncoderConfig(kind="tiny", width=16, layers=1, heads=2, vocab_size=100)
    clip = CLIP(CLIPConfig(text=text, embed_dim=8), build_text_encoder(text, ["a left square", "a right square"])).eval()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "my-clip.safetensors"))
    card = {"name": "my-clip", "architecture": "genlab.models.clip.CLIP", "config": to_dict(clip.config),
            "weights": "my-clip.safetensors", "sha256": sha256_file(folder / "my-clip.safetensors")}
    (folder / "my-clip.json").write_text(json.dumps(card))
    loaded, label = load_clip("my-clip")
    images = torch.rand(3, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(images, ["a left square", "a right"]), clip(images, ["a left square", "a right"]), atol=1e-6)
    assert label.startswith("my-clip (sha256 ")
    weights = folder / "my-clip.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(GenlabError, match="does not match the sha256"):
        load_clip("my-clip")
