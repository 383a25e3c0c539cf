"""CLIP: symmetric InfoNCE against a direct implementation, the temperature, zero-shot, training end to end."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from genlab import api
from genlab.data import DataConfig, load_data
from genlab.errors import ConfigError
from genlab.methods import get_method
from genlab.methods.base import DataInfo
from genlab.methods.clip import CLIPMethodConfig, class_embeddings, info_nce, zero_shot_predict
from genlab.models.clip import CLIP, CLIPConfig
from genlab.text.encoders import TextEncoderConfig, build_text_encoder
from step_context import RecordingContext


def _direct_info_nce(logits):
    """(1/2N) sum_i [-log softmax_row(i)_i - log softmax_col(i)_i], written with explicit sums."""
    n = len(logits)
    total = 0.0
    for i in range(n):
        total += -logits[i, i] + torch.log(torch.exp(logits[i]).sum())  # image i against every caption
        total += -logits[i, i] + torch.log(torch.exp(logits[:, i]).sum())  # caption i against every image
    return total / (2 * n)


def test_info_nce_and_its_gradient_match_the_direct_formula():
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    loss = info_nce(logits)
    assert float(loss.detach()) == pytest.approx(float(_direct_info_nce(logits.detach())), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logits)
    eye = torch.eye(6, dtype=torch.float64)
    # d/dlogits = (softmax over rows - I + softmax over columns - I) / (2N)
    expected = (torch.softmax(logits.detach(), 1) - eye + torch.softmax(logits.detach(), 0) - eye) / 12
    assert torch.allclose(grad, expected, atol=1e-12)


@pytest.fixture
def clip():
    torch.manual_seed(0)
    encoder = build_text_encoder(TextEncoderConfig(kind="tiny", width=16, layers=1, heads=2, vocab_size=100), ["a b c"])
    return CLIP(CLIPConfig(embed_dim=8), encoder)


def test_temperature_starts_at_0_07_and_the_scale_is_clamped_at_100(clip):
    assert float(clip.scale().detach()) == pytest.approx(1 / 0.07)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1000.0))
    assert float(clip.scale().detach()) == pytest.approx(100.0)
    images = torch.zeros(2, 1, 28, 28)
    logits = clip(images, ["a b", "c"])
    cos = clip.encode_image(images) @ clip.encode_text(["a b", "c"]).T
    assert torch.allclose(logits, 100.0 * cos, atol=1e-5)
    logits.sum().backward()
    assert clip.logit_scale.grad == 0  # past the bound the scale does not learn
    with pytest.raises(ConfigError, match="max_logit_scale"):
        CLIPConfig(max_logit_scale=10.0)


class _KnownEmbeddings:
    """A stand-in CLIP whose embeddings are set by hand: word k -> axis k, image -> axis of its pixel value."""

    def __init__(self):
        self.image_encoder = type("C", (), {"config": type("Cfg", (), {"image_size": 2, "in_channels": 1})()})()
        self.axis = {"cat": 0, "dog": 1, "bird": 2}

    def parameters(self):
        return iter([torch.zeros(1)])

    def encode_text(self, texts):
        rows = [F.one_hot(torch.tensor(next(v for k, v in self.axis.items() if k in t)), 3).float() for t in texts]
        return torch.stack(rows) + 0.1  # the prompt's other words add the same offset to every class

    def encode_image(self, x):
        value = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()  # pixel 0, 1, 2 -> class 0, 1, 2
        return F.one_hot(value, 3).float()


def test_zero_shot_on_a_set_whose_answer_is_known():
    fake = _KnownEmbeddings()
    classes = class_embeddings(fake, [["cat"], ["dog", "puppy dog"], ["bird"]], ["a photo of a {}", "a {}"])
    assert torch.allclose(classes.norm(dim=1), torch.ones(3))
    images = torch.tensor([2, 0, 1, 1, 2], dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    from genlab.methods.clip import embed_images

    assert zero_shot_predict(embed_images(fake, images), classes).tolist() == [2, 0, 1, 1, 2]
    with pytest.raises(ConfigError, match="needs a {}"):
        class_embeddings(fake, [["cat"]], ["a photo"])


def _captioned_folder(root, n=96):
    """16x16 images with a bright square on the left or right, in class folders, with a captions.csv."""
    rng = np.random.default_rng(0)
    rows = ["file,caption"]
    for i in range(n):
        side = ("left", "right")[i % 2]
        image = (rng.random((16, 16)) * 40).astype(np.uint8)
        y = int(rng.integers(0, 10))
        x = int(rng.integers(0, 3)) + (0 if side == "left" else 10)
        image[y: y + 6, x: x + 6] = 255
        (root / side).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / side / f"{i}.png")
        rows.append(f"{side}/{i}.png,a square on the {side}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


TINY_CLIP = ["train.batch_size=16", "train.lr=3e-3", "train.warmup_steps=0", "train.checkpoint_every=1000", "train.log_every=10",
             "model.clip.image.channels=[8,16]", "model.clip.image.pooled_size=2", "model.clip.image.feature_dim=32",
             "model.clip.text.width=16", "model.clip.text.layers=1", "model.clip.text.heads=2", "model.clip.embed_dim=16",
             "model.max_shift=1"]


@pytest.mark.slow
def test_training_learns_the_captions_and_reloads(tmp_path):
    folder = _captioned_folder(tmp_path / "squares")
    run = api.train("clip", data=f"folder:{folder}", overrides=[*TINY_CLIP, "train.steps=40"], run_dir=tmp_path / "run", progress=False)
    from genlab.evaluation.text import load_clip, zero_shot

    clip, name = load_clip(tmp_path / "run")
    data = load_data(DataConfig(source=f"folder:{folder}"))
    assert zero_shot(clip, data, ["a square on the {}"])["zero_shot_accuracy"] == 1.0
    assert name.startswith("run:") and run.method.clip.text_encoder.tokenizer.to_json() == clip.text_encoder.tokenizer.to_json()


def test_step_needs_captions_and_sampling_is_refused():
    method = get_method("clip")(CLIPMethodConfig(), DataInfo(channels=1, image_size=28, num_classes=10, source="mnist-captions"))
    with pytest.raises(ConfigError, match="needs captioned data"):
        method.training_step({"image": torch.zeros(2, 1, 28, 28)}, RecordingContext(2))
    batch = {"image": torch.zeros(2, 1, 28, 28), "captions": [("a thick seven", "a 7"), ("a thin one",)]}
    out = method.training_step(batch, RecordingContext(2))
    assert float(out["logit_scale"]) == pytest.approx(1 / 0.07)
    with pytest.raises(ConfigError, match="does not generate images"):
        method.sample(1)
    with pytest.raises(ConfigError, match="has no captions"):
        get_method("clip")(CLIPMethodConfig(), DataInfo(channels=1, image_size=28, num_classes=10, source="mnist"))


@pytest.mark.parametrize("source, size", [("mnist-captions", 28), ("fashion-mnist-captions", 28), ("mnist-pairs", 56)])
def test_shipped_presets_build_for_their_data(source, size):
    from genlab.api import resolve_preset
    from genlab.config import build_config

    cls = get_method("clip")
    cfg = build_config("clip", cls.Config, preset=resolve_preset("clip", source, "small"), overrides=[f"data.source={source}"])
    method = cls(cfg.model, DataInfo(channels=1, image_size=size, num_classes=None, source=source))
    logits = method.clip(torch.zeros(3, 1, size, size), ["a thick seven", "a 3 above an 8", "a dark coat"])
    assert logits.shape == (3, 3) and cfg.train.threads == 1


def test_ema_skips_a_frozen_text_encoder():
    info = DataInfo(channels=1, image_size=28, num_classes=10, source="mnist-captions")
    tiny = get_method("clip")(CLIPMethodConfig(), info)
    assert set(tiny.ema_targets()) == {"clip"}
    config = CLIPMethodConfig()
    config.clip.text.kind = "onehot"  # no trainable weights, like the frozen minilm
    frozen = get_method("clip")(config, info)
    targets = frozen.ema_targets()
    assert set(targets) == {"image_encoder", "text_projection"}
    averaged = {id(p) for m in targets.values() for p in m.parameters()}
    trainable = {id(p) for p in frozen.parameters() if p.requires_grad} - {id(frozen.clip.logit_scale)}
    assert averaged == trainable


def _direct_negclip(logits, hard):
    """NegCLIP's loss written with explicit sums: image i's softmax runs over the N captions and its own hard negatives."""
    n = len(logits)
    total = 0.0
    for i in range(n):
        row = torch.cat([logits[i], hard[i][torch.isfinite(hard[i])]])
        total += -logits[i, i] + torch.log(torch.exp(row).sum())
        total += -logits[i, i] + torch.log(torch.exp(logits[:, i]).sum())  # captions: only the N images
    return total / (2 * n)


def test_hard_negatives_join_only_their_images_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 5, generator=g, dtype=torch.float64)
    hard = torch.randn(5, 1, generator=g, dtype=torch.float64)
    hard[[1, 3]] = float("-inf")  # captions without a swap have no hard negative
    assert float(info_nce(logits, hard)) == pytest.approx(float(_direct_negclip(logits, hard)), rel=1e-12)
    assert float(info_nce(logits, hard)) > float(info_nce(logits))  # a negative only adds to the image side
    none = torch.full((5, 1), float("-inf"), dtype=torch.float64)
    assert float(info_nce(logits, none)) == pytest.approx(float(info_nce(logits)), rel=1e-12)


def test_swapped_caption_logits_and_why_a_bag_of_words_cannot_learn_order():
    """The hard-negative logit is scale * cos(image, swapped caption); a bag-of-words tower scores it like the truth."""
    config = CLIPMethodConfig(hard_negatives="swap_digits")
    config.clip.text.kind = "onehot"
    torch.manual_seed(0)
    method = get_method("clip")(config, DataInfo(channels=1, image_size=28, num_classes=None, source="mnist-pairs"))
    images = torch.rand(3, 1, 28, 28) * 2 - 1
    captions = ["the digit 3 is left of the digit 8", "a 0 under a 0", "an 8 above a 1"]
    logits, hard = method._logits(images, captions)
    assert torch.allclose(logits, method.clip(images, captions))
    assert hard[1, 0] == float("-inf")  # "0 under 0" has no different order
    swapped = method.clip(images, ["the digit 8 is left of the digit 3", "x", "a 1 above an 8"])
    assert torch.allclose(hard[[0, 2], 0], swapped.diagonal()[[0, 2]])
    assert torch.allclose(hard[[0, 2], 0], logits.diagonal()[[0, 2]])  # same words, same bag: no signal for order


def test_hard_negatives_are_checked():
    with pytest.raises(ConfigError, match="hard_negatives"):
        CLIPMethodConfig(hard_negatives="shuffle")
