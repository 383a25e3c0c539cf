"""`genlab eval` of text-conditioned runs (issue 14 item 4 / issue 15): attribute control against a stub
run whose answer is known, and dispatch of a real (tiny) text run to the text metrics."""

from __future__ import annotations

import math

import pytest
import torch

from genlab import api
from genlab.errors import ConfigError
from genlab.evaluation import kinds_for
from genlab.evaluation.text_to_image import _attribute_control


class PromptedBars:
    """A stub run drawing a bar in [-1, 1]: width 4 for 'thick', 1 for 'thin', 2 else; its top leans right
    for 'slanted right', left for 'slanted left' (and ``flip`` swaps the two, a model that gets slant wrong)."""

    def __init__(self, flip: bool = False):
        self.flip = flip
        self.calls = []

    def sample(self, n, seed=0, batch_size=256, prompts=None, **options):
        self.calls.append(list(prompts))
        images = torch.full((n, 1, 28, 28), -1.0)
        for i, prompt in enumerate(prompts):
            width = 4 if "thick" in prompt else 1 if "thin" in prompt else 2
            lean = 0.3 if "right" in prompt else -0.3 if "left" in prompt else 0.0
            lean = -lean if self.flip else lean
            for y in range(4, 24):
                x = round(14 + lean * (14 - y))  # rows grow downwards: the top (small y) moves by +lean
                images[i, 0, y, x: x + width] = 1.0
        return images


def test_attribute_control_measures_thickness_and_slant():
    run = PromptedBars()
    values, protocol = _attribute_control(run, seed=0, batch_size=64, options={"guidance_scale": 2.0}, per_prompt=20, progress=False)
    assert values["thick_thin_ink_ratio"] == pytest.approx(4.0)  # 4-pixel bars against 1-pixel bars, same length
    assert values["thick_thin_stroke_width_ratio"] > 1.5
    assert values["slant_sign_accuracy"] == 1.0
    assert run.calls[0][:2] == ["a thick zero", "a thick zero"] and run.calls[1][-1] == "a thin nine"
    assert len(run.calls[0]) == 20 and "slanted left" in run.calls[2][0] and "slanted right" in run.calls[3][0]
    assert "ink" in protocol["thickness"] and "shear" in protocol["slant"]
    wrong, _ = _attribute_control(PromptedBars(flip=True), seed=0, batch_size=64, options={}, per_prompt=20, progress=False)
    assert wrong["slant_sign_accuracy"] == 0.0


@pytest.mark.slow
def test_a_text_run_is_scored_on_its_captions_and_prompts(tmp_path, data_root):
    overrides = ["data.limit=256", "train.steps=2", "train.batch_size=16", "train.threads=1", "train.sample_n=4",
                 "model.unet.base_channels=16", "model.unet.num_res_blocks=1", "model.unet.norm_groups=8",
                 "model.num_timesteps=50", "model.text.width=16", "model.text.layers=1", "model.text.heads=2"]
    run = api.train("ddpm", data="mnist-captions", preset="text_small", data_root=str(data_root), overrides=overrides,
                    run_dir=tmp_path / "run", progress=False)
    assert kinds_for(tmp_path / "run") == ("text",)
    result = run.evaluate(ref="mnist:test", ref_n=500, n=120, metrics="fid", sampler="ddim", steps=2, data_root=str(data_root),
                          sample_options={"guidance_scale": 2.0})[0]
    m, p = result["metrics"], result["protocol"]
    assert p["kind"] == "text" and p["guidance_scale"] == 2.0 and p["text"]["clip_judge"].startswith("clip-mnist-captions")
    for key in ("fid", "clip_score", "r_precision", "class_accuracy", "thick_thin_ink_ratio", "slant_sign_accuracy"):
        assert math.isfinite(m[key]), key
    assert 0 <= m["class_accuracy"] <= 1 and "the digit 0" in p["class_accuracy"]
    with pytest.raises(ConfigError, match="held-out captions"):
        run.evaluate(n=120, sample_options={"prompt": "a 7"})


def test_only_runs_with_a_text_encoder_are_scored_on_text():
    from types import SimpleNamespace

    from genlab.config import build_config
    from genlab.methods import DataInfo, get_method
    from tiny_configs import TINY_DDPM

    cls = get_method("ddpm")
    info = DataInfo(channels=1, image_size=8, num_classes=10, source="mnist-captions")
    plain = SimpleNamespace(method=cls(build_config("ddpm", cls.Config, overrides=TINY_DDPM).model, info), path="runs/plain")
    text = SimpleNamespace(method=cls(build_config("ddpm", cls.Config, overrides=[*TINY_DDPM, "model.text.width=16",
                                                                                   "model.text.heads=2"]).model, info), path="runs/t")
    assert kinds_for(plain) == ("generation",) and kinds_for(text) == ("text",) and kinds_for(text, "text") == ("text",)
    with pytest.raises(ConfigError, match="without a text encoder cannot be scored on text"):
        kinds_for(plain, "text")


def test_split_pair_recovers_the_placed_digits_exactly():
    """make_pairs then split_pair gives back each digit's 28x28 frame (its ink centred by mass, as MNIST's)."""
    from genlab.data import captions as C

    digits = torch.zeros(40, 1, 28, 28, dtype=torch.uint8)
    for k in range(40):  # a centred 8x8 square (centre of mass at the frame's centre) of intensity unique to k
        digits[k, 0, 10:18, 10:18] = 50 + 5 * k
    canvas, attributes = C.make_pairs(digits, torch.arange(40), 20, seed=1)
    assert set(attributes["arrangement"].tolist()) == {0, 1}  # both arrangements are exercised
    first, second = C.split_pair(canvas, attributes["arrangement"])
    assert torch.equal(first, digits[attributes["classes"][:, 0]])
    assert torch.equal(second, digits[attributes["classes"][:, 1]])
    # a blank canvas gives blank windows (no error from the empty centre of mass)
    blank = C.split_pair(torch.zeros(2, 1, 56, 56, dtype=torch.uint8), torch.tensor([0, 1]))
    assert all(int(half.sum()) == 0 and half.shape == (2, 1, 28, 28) for half in blank)


def test_composition_scores_real_pairs_near_the_ceiling_and_swaps_at_zero(data_root):
    """Real mnist-pairs test canvases with their own captions' digits score ~ the evaluator's MNIST accuracy;
    the same canvases asked with the digits swapped score 0 (and count as swapped)."""
    from genlab.data import DataConfig, load_data
    from genlab.evaluation.common import resolve_extractor
    from genlab.evaluation.text_to_image import composition_scores

    pairs = load_data(DataConfig(source="mnist-pairs", split="test", root=str(data_root), limit=300))
    classes, arrangement = pairs.attributes["classes"], pairs.attributes["arrangement"]
    classifier = resolve_extractor(None, "mnist", "cpu")
    right = composition_scores(pairs.images, classes, arrangement, classifier)
    assert right["composition_accuracy"] >= 0.95  # both of two ~99 %-accurate reads
    assert right["composition_first_digit"] >= 0.97 and right["composition_second_digit"] >= 0.97
    differ = classes[:, 0] != classes[:, 1]
    swapped = composition_scores(pairs.images[differ], classes[differ].flip(1), arrangement[differ], classifier)
    assert swapped["composition_accuracy"] <= 0.03 and swapped["composition_swapped"] >= 0.95
    # the wrong arrangement (left/right read as top/bottom) cuts through both digits: far from the ceiling
    crossed = composition_scores(pairs.images, classes, 1 - arrangement, classifier)
    assert crossed["composition_accuracy"] <= 0.5


def test_paraphrases_name_their_digit_and_no_caption_template_writes_them():
    from genlab.data.captions import DIGIT_WORDS, MNIST_TEMPLATES, PAIR_TEMPLATES
    from genlab.evaluation.text_to_image import mnist_paraphrases

    paraphrases = mnist_paraphrases()
    assert len(paraphrases) == 50 and sorted(k for k, _ in paraphrases) == sorted(list(range(10)) * 5)
    words = {k: {str(k), DIGIT_WORDS[k]} for k in range(10)}
    words[0].add("nought")
    for k, prompt in paraphrases:
        tokens = set(prompt.replace(",", " ").split())
        assert tokens & words[k], prompt  # names its own digit ...
        assert not any(tokens & words[j] for j in range(10) if j != k), prompt  # ... and no other
    # every template's fixed words; a paraphrase starting with one of their fixed openings would be a seen caption
    openings = {t.split("{")[0].strip() for t in MNIST_TEMPLATES + [t for ts in PAIR_TEMPLATES.values() for t in ts]} - {""}
    assert not any(prompt.startswith(o) for _, prompt in paraphrases for o in openings if len(o) > 2)
