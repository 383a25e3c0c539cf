"""Captioned data (DATA2): attributes measured on hand-made images, templated captions, pairs, folder captions."""

import colorsys
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.data import DataConfig, ImageSet, load_data
from genlab.data import captions as C
from genlab.errors import ConfigError, DataError


def _canvas(h=28, w=28, channels=1):
    return torch.zeros(1, channels, h, w, dtype=torch.uint8)


def test_stroke_width_of_a_bar_is_2_area_over_perimeter():
    for width, length in ((1, 20), (2, 18), (4, 16)):
        img = _canvas()
        img[0, 0, 5: 5 + width, 4: 4 + length] = 255
        expected = 2 * width * length / (2 * length + 2 * width)
        assert float(C.stroke_width(img)) == pytest.approx(expected)


def test_slant_sign_and_upright_bar():
    right = _canvas()
    for y in range(4, 24):
        right[0, 0, y, 14 + (14 - y) // 2] = 255  # higher rows (small y) further right: leans right
    left = right.flip(-1)
    upright = _canvas()
    upright[0, 0, 4:24, 13:15] = 255
    assert float(C.slant(right)) > C.SLANT_UPRIGHT
    assert float(C.slant(left)) == pytest.approx(-float(C.slant(right)))
    assert float(C.slant(upright)) == pytest.approx(0.0, abs=1e-12)
    # x = a + b y exactly for a one-pixel line with slope -1/2 per row: shear 1/2 (up to the integer steps)
    assert float(C.slant(right)) == pytest.approx(0.5, abs=0.03)


def test_bounding_box_and_mnist_classes_of_hand_drawn_digits():
    thick_small = _canvas()
    thick_small[0, 0, 10:20, 10:14] = 255  # 10 x 4 box, width 2*40/28 = 2.86 px: thick, small, upright
    thin_large = _canvas()
    thin_large[0, 0, 3:25, 5] = 255  # a 1-px vertical line ...
    thin_large[0, 0, 3, 5:25] = 255  # ... and a 1-px horizontal one: box 22 x 20 = 440, thin
    images = torch.cat([thick_small, thin_large])
    assert C.bounding_box_area(images).tolist() == [40, 440]
    a = C.measure_mnist(images)
    words = {k: [list(C.MNIST_ATTRIBUTES[k])[i] for i in a[k].tolist()] for k in ("thickness", "size")}
    assert words == {"thickness": ["thick", "thin"], "size": ["small", "large"]}
    assert list(C.MNIST_ATTRIBUTES["slant"])[int(a["slant"][0])] == "upright"


def test_hsv_matches_colorsys_and_dominant_colour():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1, 3, 4, 5), dtype=np.uint8)
    hue, sat, val = C.rgb_to_hsv(torch.from_numpy(pixels))
    for y in range(4):
        for x in range(5):
            h, s, v = colorsys.rgb_to_hsv(*(pixels[0, :, y, x] / 255.0))
            assert (float(hue[0, y, x]) / 360.0, float(sat[0, y, x]), float(val[0, y, x])) == pytest.approx((h, s, v), abs=1e-9)
    red = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    red[:, 0] = 220
    red[:, 2, :16] = 40  # half the picture crimson (hue 349 degrees): red as well, across the wrap at 360
    blue_half = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    blue_half[:, :, :, :16] = torch.tensor([20, 40, 230], dtype=torch.uint8)[:, None, None]
    grey = torch.full((1, 3, 32, 32), 200, dtype=torch.uint8)
    a = C.measure_cifar(torch.cat([red, blue_half, grey]))
    assert a["colour"].tolist() == [C.COLOURS.index("red"), C.COLOURS.index("blue"), C.NO_COLOUR]
    assert a["brightness"].tolist() == [0, 0, 1]  # luma < 70, ~96, 200
    assert C.hue_bin(torch.tensor([0.0, 14.9, 15.0, 200.0, 340.0, 359.9])).tolist() == [0, 0, 1, 5, 0, 0]


def test_articles_follow_the_next_word():
    assert C.fill_template("a {name} beside a {b}", {"name": "eight", "b": "8"}) == "an eight beside an 8"
    assert C.fill_template("a {name}, a {b}", {"name": "ankle boot", "b": "seven"}) == "an ankle boot, a seven"


def _mentioned(text: str, vocab: dict) -> set[tuple[str, str]]:
    """(attribute, class) of every attribute synonym that occurs as whole words in a caption."""
    padded = f" {text.replace(',', ' ')} "
    return {(attr, cls) for attr, classes in vocab.items() for cls, words in classes.items() for w in words if f" {w} " in padded}


def test_mnist_captions_state_the_class_and_measured_attributes():
    labels = torch.tensor([7, 8, 1])
    attributes = {"thickness": torch.tensor([2, 0, 1]), "slant": torch.tensor([2, 1, 0]), "size": torch.tensor([1, 0, 0])}
    truth = [{(k, list(C.MNIST_ATTRIBUTES[k])[int(attributes[k][i])]) for k in C.MNIST_ATTRIBUTES} for i in range(3)]
    captions = C.mnist_captions(labels, attributes)
    assert [len(c) for c in captions] == [C.CAPTIONS_PER_IMAGE] * 3
    assert len(set(captions[0])) == C.CAPTIONS_PER_IMAGE  # different templates, not one relabelled id
    for caps, label, true in zip(captions, labels.tolist(), truth):
        mentioned = set()
        for text in caps:
            assert f" {label}" in f" {text}" or C.DIGIT_WORDS[label] in text, text
            assert " a 8" not in f" {text}" and " a eight" not in f" {text}", text
            mentioned |= _mentioned(text, C.MNIST_ATTRIBUTES)
        assert mentioned and mentioned <= true, (caps, true)
    assert C.mnist_captions(labels, attributes) == captions  # same captions on every load


def test_unnamed_classes_never_name_the_class_and_leave_every_other_caption_unchanged():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (400,), generator=g)
    attributes = {k: torch.randint(0, len(v), (400,), generator=g) for k, v in C.MNIST_ATTRIBUTES.items()}
    named = C.mnist_captions(labels, attributes)
    unnamed = C.mnist_captions(labels, attributes, unnamed=(7,))
    assert unnamed == C.mnist_captions(labels, attributes, unnamed=(7,))  # deterministic
    sevens = (labels == 7).nonzero().flatten().tolist()
    assert len(sevens) > 20
    for i in range(len(labels)):
        if i not in sevens:
            assert unnamed[i] == named[i]
            continue
        for before, after in zip(named[i], unnamed[i], strict=True):
            assert not re.search(r"\b(7|seven)\b", after), after
            assert "digit digit" not in after and "number" not in after and "the digit" not in after, after
            # The same template and attribute words: the named caption with its naming phrase made general.
            expected = re.sub(r"the (digit|number) (7|seven)\b", "a digit", before)
            expected = C.fix_articles(re.sub(r"\b(7|seven)\b", "digit", expected))
            assert after == expected, (before, after)
    assert any("a digit, written with a" in c for i in sevens for c in unnamed[i])


def test_generic_share_writes_the_last_captions_of_every_named_image_without_its_name():
    """So that the general word does not come to mean the unnamed class: with share 0.5 the last 2 of each other
    image's 4 captions are the generic rewrite of its named ones, the first 2 unchanged; the 7s stay all generic."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (300,), generator=g)
    attributes = {k: torch.randint(0, len(v), (300,), generator=g) for k, v in C.MNIST_ATTRIBUTES.items()}
    only7 = C.mnist_captions(labels, attributes, unnamed=(7,))
    half = C.mnist_captions(labels, attributes, unnamed=(7,), generic_share=0.5)
    everyone = C.mnist_captions(labels, attributes, unnamed=tuple(range(10)))
    assert C.mnist_captions(labels, attributes, generic_share=0.5) == C.mnist_captions(labels, attributes)  # needs unnamed
    generic_others = 0
    for i, label in enumerate(labels.tolist()):
        if label == 7:
            assert half[i] == only7[i]
            continue
        assert half[i][:2] == only7[i][:2] and half[i][2:] == everyone[i][2:]
        generic_others += sum(not re.search(r"\b(%d|%s)\b" % (label, C.DIGIT_WORDS[label]), c) for c in half[i][2:])
    assert generic_others >= 2 * (labels != 7).sum().item() - 5  # nearly all of them really lost the name
    with pytest.raises(ConfigError, match="generic_share"):
        DataConfig(generic_share=1.5)


def test_unnamed_classes_config_and_source_errors():
    with pytest.raises(ConfigError, match="unnamed_classes"):
        DataConfig(unnamed_classes=())
    with pytest.raises(DataError, match="only mnist-captions"):
        load_data(DataConfig(source="digits", unnamed_classes=(7,)))
    with pytest.raises(DataError, match="classes 0 to 9, not 12"):
        load_data(DataConfig(source="mnist-captions", unnamed_classes=(12,)))


@pytest.mark.data
def test_mnist_captions_source_with_an_unnamed_class(data_root):
    cfg = DataConfig(source="mnist-captions", split="test", root=str(data_root), limit=300, unnamed_classes=(7,),
                     generic_share=0.0)
    data, plain = load_data(cfg), load_data(DataConfig(source="mnist-captions", split="test", root=str(data_root), limit=300))
    sevens = data.labels == 7
    assert sevens.any() and torch.equal(data.images, plain.images)
    for caps, named, seven in zip(data.captions, plain.captions, sevens.tolist()):
        assert (caps != named) == seven
        assert not seven or not any(re.search(r"\b(7|seven)\b", c) for c in caps)
    # The default generic_share (0.5) also writes half of the other digits' captions without their names.
    half = load_data(DataConfig(source="mnist-captions", split="test", root=str(data_root), limit=300, unnamed_classes=(7,)))
    for caps, named, seven in zip(half.captions, plain.captions, sevens.tolist()):
        assert seven or (caps[:2] == named[:2] and caps[2:] != named[2:])


def test_pairs_place_each_digit_where_stored():
    # Random pixels everywhere: the two 28x28 patches overlap on the canvas and must merge by max.
    digits = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 1, 28, 28), dtype=np.uint8))
    images, attrs = C.make_pairs(digits, torch.arange(6), 3, seed=0)
    assert images.shape == (3, 1, C.PAIR_CANVAS, C.PAIR_CANVAS)
    for i in range(3):
        rebuilt = torch.zeros(C.PAIR_CANVAS, C.PAIR_CANVAS, dtype=torch.uint8)
        for j in range(2):
            y, x = attrs["positions"][i, j].tolist()
            k = int(attrs["classes"][i, j])  # labels are the digit indices here
            rebuilt[y: y + 28, x: x + 28] = torch.maximum(rebuilt[y: y + 28, x: x + 28], digits[k, 0])
        assert torch.equal(rebuilt, images[i, 0])
        axis = 1 if int(attrs["arrangement"][i]) == C.HORIZONTAL else 0
        assert attrs["positions"][i, 0, axis] < attrs["positions"][i, 1, axis]  # the first digit is left of / above the second
    caps = C.pair_captions({"classes": torch.tensor([[3, 8]]), "arrangement": torch.tensor([C.HORIZONTAL])})[0]
    for text in caps:
        if "left" in text:
            assert text.index("3") < text.index("8") and text.index("left") > text.index("3"), text
        if "right" in text:
            assert text.index("8") < text.index("right") < text.index("3"), text
    assert any(t.startswith("an 8 to the right of a 3") for t in C.pair_captions(
        {"classes": torch.tensor([[3, 8]] * 30), "arrangement": torch.tensor([C.HORIZONTAL] * 30)}) for t in t)


def test_swapped_digits_are_the_caption_of_the_swapped_pair():
    """swap_digits of every pair caption of (a, b) is the same template written for (b, a), articles and all."""
    def write(template, a, b):
        return C.fill_template(template, {"a": str(a), "b": str(b), "a_art": C._article(str(a)), "b_art": C._article(str(b))})

    for kind, templates in C.PAIR_TEMPLATES.items():
        for template in templates:
            for a in range(10):
                for b in range(10):
                    swapped = C.swap_digits(write(template, a, b))
                    assert swapped == (None if a == b else write(template, b, a)), (template, a, b)
    assert C.swap_digits("an eight above a three") == "a three above an eight"
    assert C.swap_digits("a thick seven, slanted right") is None  # one digit: nothing to swap
    assert C.swap_digits("someone wrote 4") is None  # "one" inside a word is not a digit


def test_pair_content_keys_tell_every_caption_content_apart():
    classes = torch.tensor([[a, b] for a in range(10) for b in range(10) for _ in range(2)])
    arrangement = torch.tensor([C.HORIZONTAL, C.VERTICAL] * 100)
    keys = C.pair_content_keys({"classes": classes, "arrangement": arrangement})
    assert len(set(keys.tolist())) == 200
    again = C.pair_content_keys({"classes": classes.flip(0), "arrangement": arrangement.flip(0)})
    assert torch.equal(again, keys.flip(0))


def test_imageset_subset_and_limit_keep_captions_aligned():
    data = ImageSet(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.arange(4), None, "x", "train",
                    captions=[(f"c{i}",) for i in range(4)], attributes={"a": torch.arange(4) * 10})
    sub = data.subset(torch.tensor([True, False, True, False]))
    assert sub.captions == [("c0",), ("c2",)] and sub.attributes["a"].tolist() == [0, 20]
    with pytest.raises(ValueError, match="one tuple per image"):
        ImageSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), None, None, "x", "train", captions=[("a",)])


@pytest.mark.data
def test_mnist_captions_source_stores_attributes(data_root):
    data = load_data(DataConfig(source="mnist-captions", split="test", root=str(data_root), limit=50))
    plain = load_data(DataConfig(source="mnist", split="test", root=str(data_root), limit=50))
    assert torch.equal(data.images, plain.images) and len(data.captions) == 50
    again = C.measure_mnist(plain.images)
    assert torch.equal(again["thickness"], data.attributes["thickness"])
    pairs = load_data(DataConfig(source="mnist-pairs", split="test", root=str(data_root), limit=5))
    assert pairs.images.shape == (5, 1, 56, 56) and pairs.attributes["classes"].shape == (5, 2)


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, dtype=np.uint8)).save(path)


def test_folder_captions_from_csv_jsonl_and_sidecars(tmp_path):
    for name in ("a.png", "b.png"):
        _png(tmp_path / "csv" / name)
        _png(tmp_path / "jsonl" / name)
        _png(tmp_path / "txt" / name)
    (tmp_path / "csv" / "captions.csv").write_text('file,caption\na.png,"a dark, square picture"\nb.png,another one\nb.png,a second caption\n')
    (tmp_path / "jsonl" / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "first"}) + "\n\n"
                                                        + json.dumps({"file": "b.png", "caption": "  second   one "}) + "\n")
    (tmp_path / "txt" / "a.txt").write_text("from a sidecar\n\n")
    (tmp_path / "txt" / "b.txt").write_text("line one\nline two\n")
    load = lambda sub: load_data(DataConfig(source=f"folder:{tmp_path / sub}")).captions  # noqa: E731
    assert load("csv") == [("a dark, square picture",), ("another one", "a second caption")]
    assert load("jsonl") == [("first",), ("second one",)]
    assert load("txt") == [("from a sidecar",), ("line one", "line two")]
    _png(tmp_path / "none" / "a.png")
    assert load("none") is None  # no caption files: an uncaptioned folder


@pytest.mark.parametrize("files, message", [
    ({"captions.csv": "file,caption\na.png,fine\n"}, "b.png has no caption"),
    ({"captions.csv": "name,text\na.png,x\n"}, "header 'file,caption'"),
    ({"captions.csv": "file,caption\na.png,\nb.png,x\n"}, "line 2: empty caption for 'a.png'"),
    ({"captions.csv": "file,caption\na.png,x,y\n"}, "line 2: expected 2 columns"),
    ({"captions.jsonl": '{"file": "a.png", "caption": "x"}\n{"file": "b.png"\n'}, "line 2: not valid JSON"),
    ({"captions.jsonl": '{"file": "a.png"}\n'}, "line 1: needs the keys"),
    ({"a.txt": "x", "b.txt": "\n  \n"}, "b.txt is empty"),
])
def test_corrupt_caption_files_give_one_line_errors(tmp_path, files, message):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as excinfo:
        load_data(DataConfig(source=f"folder:{tmp_path}"))
    assert "\n" not in str(excinfo.value) and message in str(excinfo.value), str(excinfo.value)
