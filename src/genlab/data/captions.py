"""Captioned data (SPEC DATA2): captions made from the class plus attributes measured on each image.

Sources (registered in :mod:`genlab.data.sources`):

- ``mnist-captions``: MNIST with stroke thickness (thin / medium / thick), slant (left / upright /
  right) and size (small / large) measured on every digit, e.g. "a thick seven", "the digit 7,
  written with a heavy stroke, slanted right". ``data.unnamed_classes`` writes the captions of some digits
  without their number ("a thick digit", "a digit, written with a heavy stroke"; :func:`unnamed_template`).
- ``fashion-mnist-captions``: Fashion-MNIST with the garment's brightness (dark / grey / light) and
  texture (plain / patterned).
- ``cifar10-captions``: CIFAR-10 with the picture's brightness (dark / bright) and, where one colour
  covers much of the picture, its dominant colour ("a red car").
- ``mnist-pairs``: two MNIST digits on a 56x56 canvas, side by side or one above the other, with a
  spatial caption ("the digit 3 is left of the digit 8", "a 5 above a 1"), after alignDRAW's
  MNIST-with-captions (Mansimov et al. 2016). Classes, positions and the arrangement are stored.

Every image gets ``CAPTIONS_PER_IMAGE`` captions drawn from several templates and synonyms (seeded by
the image's index, so a split always has the same captions); a training step picks one of them, so
text is not a relabelled class id. The measured attributes are stored in ``ImageSet.attributes``
(an index into the attribute's word list, plus the raw measurement), so that methods and
evaluations can check them.

User data: ``folder:PATH`` picks up captions from ``PATH/captions.csv`` (columns ``file,caption``),
``PATH/captions.jsonl`` (``{"file": ..., "caption": ...}`` per line; several rows per file give
several captions) or a sidecar ``NAME.txt`` beside each image (one caption per non-empty line).
A folder without any caption file is uncaptioned; once captions exist, an image without one, or an
empty caption, is a one-line error naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from genlab.errors import DataError

CAPTIONS_PER_IMAGE = 4
PAIR_CANVAS = 56  # mnist-pairs canvas side: two 28x28 digits side by side or stacked

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# --------------------------------------------------------------------------------------------
# Attribute vocabularies: attribute -> its classes -> synonyms used in captions.

MNIST_ATTRIBUTES = {
    "thickness": {"thin": ["thin", "light", "fine"], "medium": ["medium", "regular"], "thick": ["thick", "heavy", "bold"]},
    "slant": {"left": ["slanted left", "leaning left", "tilted to the left"], "upright": ["upright", "straight"],
              "right": ["slanted right", "leaning right", "tilted to the right"]},
    "size": {"small": ["small", "little"], "large": ["large", "big"]},
}
FASHION_ATTRIBUTES = {
    "brightness": {"dark": ["dark", "black"], "grey": ["grey", "mid-grey"], "light": ["light", "white", "pale"]},
    "texture": {"plain": ["plain", "solid"], "patterned": ["patterned", "textured"]},
}
COLOURS = ["red", "orange", "yellow", "green", "teal", "blue", "purple", "pink"]
CIFAR_ATTRIBUTES = {
    "brightness": {"dark": ["dark", "dim"], "bright": ["bright", "sunny", "well-lit"]},
    "colour": {c: [c] for c in COLOURS},
}
FASHION_WORDS = {
    "T-shirt/top": ["t-shirt", "top", "tee"], "Trouser": ["pair of trousers", "pair of pants"], "Pullover": ["pullover", "sweater"],
    "Dress": ["dress"], "Coat": ["coat", "jacket"], "Sandal": ["sandal"], "Shirt": ["shirt"], "Sneaker": ["sneaker", "trainer"],
    "Bag": ["bag", "handbag"], "Ankle boot": ["ankle boot", "boot"],
}

# Thresholds of the measurements. MNIST's are near the tertiles of the training set (stroke width
# 1.75 / 2.2 px) and a shear of 0.15 (about 8.5 degrees) for slant; bounding-box area 250 px^2
# splits the digits about 30 / 70 (measured with the functions below on mnist:train).
THIN_BELOW, THICK_ABOVE = 1.75, 2.2
SLANT_UPRIGHT = 0.15
SMALL_BELOW = 250
INK_THRESHOLD = 128  # a pixel is ink when >= 128 (of 255)


def stroke_width(images: Tensor) -> Tensor:
    """Mean stroke width in pixels of binarised grey images (N, 1, H, W) uint8: 2 * area / perimeter.

    A stroke of length L and width w has area w L and perimeter 2 (L + w), so 2 area / perimeter =
    w L / (L + w), which tends to w for long strokes (ink per skeleton length, without a skeleton).
    The perimeter counts the 4-neighbour edges between ink and background pixels.
    """
    ink = images[:, 0] >= INK_THRESHOLD  # (N, H, W)
    padded = torch.nn.functional.pad(ink, (1, 1, 1, 1))  # (N, H + 2, W + 2), background outside
    centre = padded[:, 1:-1, 1:-1]
    edges = sum((centre & ~neighbour).sum((1, 2)) for neighbour in
                (padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]))
    area = ink.sum((1, 2)).double()
    return 2 * area / edges.clamp(min=1).double()  # (N,)


def slant(images: Tensor) -> Tensor:
    """Shear of the ink (N,): -mu11 / mu02 of intensity-weighted second moments (> 0: top leans right).

    Regressing x on y over the ink gives x = a + b y with b = mu11 / mu02; image rows grow downwards,
    so a digit whose top leans right has b < 0 (the deskewing shear of LeCun et al.'s MNIST work).
    """
    x = images[:, 0].double()  # (N, H, W)
    h, w = x.shape[-2:]
    yy = torch.arange(h, dtype=torch.float64)[:, None]
    xx = torch.arange(w, dtype=torch.float64)[None, :]
    mass = x.sum((1, 2)).clamp(min=1e-12)
    cy = (x * yy).sum((1, 2)) / mass
    cx = (x * xx).sum((1, 2)) / mass
    dy, dx = yy - cy[:, None, None], xx - cx[:, None, None]  # (N, H, W)
    mu11 = (x * dy * dx).sum((1, 2)) / mass
    mu02 = (x * dy * dy).sum((1, 2)) / mass
    return -mu11 / mu02.clamp(min=1e-12)


def bounding_box_area(images: Tensor) -> Tensor:
    """Area in pixels (N,) of the smallest axis-aligned box holding every ink pixel (0 when blank)."""
    ink = images[:, 0] >= INK_THRESHOLD  # (N, H, W)
    def extent(mask: Tensor) -> Tensor:  # (N, K) bool -> (N,) last - first + 1, 0 when empty
        k = torch.arange(mask.shape[1])
        first = torch.where(mask, k, mask.shape[1]).min(1).values
        last = torch.where(mask, k, -1).max(1).values
        return (last - first + 1).clamp(min=0)
    return extent(ink.any(2)) * extent(ink.any(1))


def measure_mnist(images: Tensor) -> dict[str, Tensor]:
    """Thickness, slant and size classes (N,) of grey digits, plus the raw measurements."""
    width, shear, box = stroke_width(images), slant(images), bounding_box_area(images)
    thickness = (width >= THIN_BELOW).long() + (width > THICK_ABOVE).long()  # thin 0, medium 1, thick 2
    tilt = (shear >= -SLANT_UPRIGHT).long() + (shear > SLANT_UPRIGHT).long()  # left 0, upright 1, right 2
    size = (box >= SMALL_BELOW).long()  # small 0, large 1
    return {"thickness": thickness, "slant": tilt, "size": size,
            "stroke_width": width.float(), "shear": shear.float(), "box_area": box.float()}


# Fashion-MNIST: the garment is every pixel above 10 (the background is exactly 0 almost everywhere).
GARMENT_THRESHOLD = 10
DARK_BELOW, LIGHT_ABOVE = 140, 180  # mean garment intensity; near the tertiles of fashion-mnist:train
PATTERNED_ABOVE = 52  # standard deviation of the garment intensities; near the median of fashion-mnist:train


def measure_fashion(images: Tensor) -> dict[str, Tensor]:
    """Brightness (dark / grey / light) and texture (plain / patterned) of each garment (N,)."""
    x = images[:, 0].double()  # (N, H, W)
    garment = x > GARMENT_THRESHOLD
    count = garment.sum((1, 2)).clamp(min=1)
    mean = (x * garment).sum((1, 2)) / count
    std = (((x - mean[:, None, None]) ** 2) * garment).sum((1, 2)).div(count).sqrt()
    brightness = (mean >= DARK_BELOW).long() + (mean > LIGHT_ABOVE).long()
    texture = (std > PATTERNED_ABOVE).long()
    return {"brightness": brightness, "texture": texture, "mean_intensity": mean.float(), "intensity_std": std.float()}


# CIFAR-10: brightness is the mean luma (BT.601); a dominant colour exists when at least
# COLOUR_SHARE of the pixels are saturated (HSV S >= 0.35, V >= 0.25) and one hue bin holds most of them.
BRIGHT_ABOVE = 120
COLOUR_SHARE = 0.3
HUE_EDGES = [15, 45, 70, 160, 195, 255, 290, 330]  # degrees: upper edges of red, orange, yellow, green, teal, blue, purple, pink
NO_COLOUR = -1


def rgb_to_hsv(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] of uint8 RGB images (N, 3, H, W)."""
    rgb = images.double() / 255.0
    value, argmax = rgb.max(1)  # (N, H, W)
    minimum = rgb.min(1).values
    chroma = value - minimum
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), torch.zeros_like(value))
    r, g, b = rgb.unbind(1)
    c = chroma.clamp(min=1e-12)
    hue = torch.where(argmax == 0, ((g - b) / c) % 6, torch.where(argmax == 1, (b - r) / c + 2, (r - g) / c + 4)) * 60.0
    return torch.where(chroma > 0, hue, torch.zeros_like(hue)), saturation, value


def hue_bin(hue: Tensor) -> Tensor:
    """Index into COLOURS of hues in degrees (red wraps around 360)."""
    bins = torch.bucketize(hue, torch.tensor(HUE_EDGES, dtype=hue.dtype), right=True)
    return torch.where(bins == len(HUE_EDGES), torch.zeros_like(bins), bins)  # above pink's edge: red again


def measure_cifar(images: Tensor) -> dict[str, Tensor]:
    """Brightness (dark / bright) and dominant colour (index into COLOURS, or -1 for none) (N,)."""
    r, g, b = images.double().unbind(1)
    luma = (0.299 * r + 0.587 * g + 0.114 * b).mean((1, 2))  # (N,)
    hue, saturation, value = rgb_to_hsv(images)
    coloured = (saturation >= 0.35) & (value >= 0.25)  # (N, H, W)
    bins = hue_bin(hue)
    counts = torch.stack([(coloured & (bins == k)).sum((1, 2)) for k in range(len(COLOURS))], 1)  # (N, 8)
    top_count, top = counts.max(1)
    pixels = images.shape[-1] * images.shape[-2]
    colour = torch.where(top_count >= COLOUR_SHARE * pixels, top, torch.full_like(top, NO_COLOUR))
    return {"brightness": (luma > BRIGHT_ABOVE).long(), "colour": colour, "luma": luma.float()}


# --------------------------------------------------------------------------------------------
# Templates. Fields: {name} class word, {digit} numeral, {a} the article of the next word, and the
# attribute names. A template is used only when every attribute it names exists for the image.

MNIST_TEMPLATES = [
    "a {thickness} {name}",
    "the digit {digit}, written with a {thickness} stroke, {slant}",
    "a {size} {name}, {slant}",
    "a handwritten {digit} that is {slant}",
    "a {size}, {thickness} {name}",
    "the number {name} in a {thickness} hand",
    "a photo of the digit {digit}",
    "a {thickness} {digit}, {slant}",
]
FASHION_TEMPLATES = [
    "a photo of a {name}",
    "a {brightness} {name}",
    "a {texture} {name}",
    "a {brightness}, {texture} {name}",
    "a {name} that is {brightness} and {texture}",
    "a picture of a {brightness} {name}",
]
CIFAR_TEMPLATES = [
    "a photo of a {name}",
    "a {brightness} photo of a {name}",
    "a {colour} {name}",
    "a photo of a {colour} {name}",
    "a {name} in a {brightness} picture",
    "a picture of a {name}",
]


def _article(text: str) -> str:
    """'a' or 'an' for the word that starts ``text`` (an 8, an eight, an ankle boot)."""
    word = text.split()[0].lower() if text.strip() else ""
    return "an" if word[:1] in tuple("aeio") or word in ("8", "11", "18", "80") or word.startswith("eight") else "a"


def fill_template(template: str, fields: dict[str, str]) -> str:
    """Format a template and fix every "a" before a vowel sound ("a eight" -> "an eight")."""
    return fix_articles(template.format(**fields))


def fix_articles(text: str) -> str:
    """Every "a" / "an" of ``text`` made to agree with the word after it."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = _article(words[i + 1])
        elif words[i] in ("A", "An"):
            words[i] = _article(words[i + 1]).capitalize()
    return " ".join(words)


# A digit written as a numeral or a word, as the captions write it ("3", "three").
_DIGIT_PATTERN = re.compile(r"\b(" + "|".join([str(d) for d in range(10)] + DIGIT_WORDS) + r")\b")


def swap_digits(caption: str) -> str | None:
    """The caption with its first two different digits exchanged, or None when it has no such two.

    "the digit 3 is left of the digit 8" -> "the digit 8 is left of the digit 3"; "an 8 to the right
    of a 3" -> "a 3 to the right of an 8" (articles follow the words, so they do not give the swap
    away). This is the word-order hard negative of NegCLIP (Yuksekgonul et al. 2023, "When and why
    vision-language models behave like bags-of-words"): a caption with the same words and another
    meaning, which a bag-of-words text tower cannot tell from the true one.
    """
    found = list(_DIGIT_PATTERN.finditer(caption))
    if not found:
        return None
    first = found[0]
    second = next((m for m in found[1:] if m.group(1) != first.group(1)), None)
    if second is None:
        return None
    swapped = (caption[: first.start()] + second.group(1) + caption[first.end(): second.start()] + first.group(1)
               + caption[second.end():])
    return fix_articles(swapped)


def caption_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream that writes image ``index``'s captions (same captions on every load)."""
    return np.random.default_rng([seed, index])


def _captions_from_templates(
    templates: list[str], n: int, seed: int, fields_of: Callable[[int, np.random.Generator], dict[str, str | None]],
    rewrite: Callable[[int, int, str], str] = lambda i, j, template: template,
) -> list[tuple[str, ...]]:
    """CAPTIONS_PER_IMAGE distinct-template captions per image; fields_of(i, rng) gives words (None: absent).

    ``rewrite(i, j, template)`` may change the j-th chosen template of image i after the random draws, so a
    rewritten caption keeps every word the draws gave it (see :func:`unnamed_template`).
    """
    out = []
    for i in range(n):
        rng = caption_rng(seed, i)
        fields = fields_of(i, rng)
        usable = [t for t in templates if all(fields.get(key) is not None for key in _field_names(t))]
        chosen = rng.choice(len(usable), size=min(CAPTIONS_PER_IMAGE, len(usable)), replace=False)
        out.append(tuple(fill_template(rewrite(i, j, usable[k]), fields) for j, k in enumerate(chosen)))
    return out


def _field_names(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _attribute_word(vocab: dict[str, list[str]], index: int, rng: np.random.Generator) -> str | None:
    """A synonym of class ``index`` of an attribute (None for a negative index: attribute absent)."""
    if index < 0:
        return None
    return _pick(rng, list(vocab.values())[index])


def templated_captions(labels: Tensor, attributes: dict[str, Tensor], vocab: dict[str, dict[str, list[str]]],
                       templates: list[str], words_of: Callable[[int], list[str]], seed: int = 0,
                       unnamed: tuple[int, ...] = (), unnamed_word: str = "",
                       generic_share: float = 0.0) -> list[tuple[str, ...]]:
    """Captions of labelled images: {name} is a synonym of the class (``words_of(label)``), {digit} the label,
    and each attribute of ``vocab`` a synonym of the image's measured class of it. Images of the classes
    ``unnamed`` are called ``unnamed_word`` instead (:func:`unnamed_template`); of every other image, the last
    round(generic_share x its caption count) captions are written so too, the rest unchanged."""
    labels_list = labels.tolist()
    attrs = {k: attributes[k].tolist() for k in vocab}

    def fields(i: int, rng: np.random.Generator) -> dict[str, str | None]:
        words = {k: _attribute_word(vocab[k], attrs[k][i], rng) for k in vocab}
        return {"name": _pick(rng, words_of(labels_list[i])), "digit": str(labels_list[i]), **words}

    n_generic = round(generic_share * CAPTIONS_PER_IMAGE) if unnamed else 0

    def rewrite(i: int, j: int, template: str) -> str:
        generic = labels_list[i] in unnamed or j >= CAPTIONS_PER_IMAGE - n_generic
        return unnamed_template(template, unnamed_word) if generic else template

    return _captions_from_templates(templates, len(labels_list), seed, fields, rewrite)


# data.unnamed_classes: a class the captions never name, the word a source's captions call it instead.
# A base trained so has seen the class but has no word for it (Textual Inversion's concept "the base
# has no word for"). Only sources whose word is already in their tokenizer corpus (caption_corpus).
UNNAMED_WORDS = {"mnist-captions": "digit"}


def unnamed_template(template: str, word: str) -> str:
    """``template`` with its class named only by the general ``word``: the naming phrases "the digit {digit}"
    and "the number {name}" become "a WORD" (a definite article would point at a named digit), then every
    {name} / {digit} becomes WORD. "the digit {digit}, written with a {thickness} stroke" -> "a digit,
    written with a {thickness} stroke"; "a {thickness} {name}" -> "a {thickness} digit"."""
    for phrase in ("the digit {digit}", "the number {name}"):
        template = template.replace(phrase, "a {name}")
    return template.replace("{digit}", "{name}").replace("{name}", word)


def mnist_captions(labels: Tensor, attributes: dict[str, Tensor], seed: int = 0,
                   unnamed: tuple[int, ...] = (), generic_share: float = 0.0) -> list[tuple[str, ...]]:
    """Captions of MNIST digits from their labels and :func:`measure_mnist` attributes; the digits ``unnamed``
    are called "digit" ("a thick digit") instead of by their number."""
    return templated_captions(labels, attributes, MNIST_ATTRIBUTES, MNIST_TEMPLATES, lambda d: [DIGIT_WORDS[d], str(d)], seed,
                              unnamed, UNNAMED_WORDS["mnist-captions"], generic_share)


# --------------------------------------------------------------------------------------------
# mnist-pairs: two digits and where they are.

HORIZONTAL, VERTICAL = 0, 1  # arrangement: first digit left of the second, or above it
PAIR_TEMPLATES = {
    HORIZONTAL: ["the digit {a} is left of the digit {b}", "the digit {b} is right of the digit {a}", "{a_art} {a} to the left of {b_art} {b}",
                 "{b_art} {b} to the right of {a_art} {a}", "{a} and {b}, side by side", "{a_art} {a} beside {b_art} {b}, on its left"],
    VERTICAL: ["the digit {a} is above the digit {b}", "the digit {b} is below the digit {a}", "{a_art} {a} above {b_art} {b}",
               "{b_art} {b} below {a_art} {a}", "{a} on top of {b}", "{b_art} {b} under {a_art} {a}"],
}


def make_pairs(images: Tensor, labels: Tensor, n: int, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """``n`` 56x56 canvases of two digits drawn without replacement; returns images and attributes.

    Horizontal pairs put the first digit in columns 0-4 and the second in columns 24-28 (rows
    anywhere in 0-28), vertical pairs the same along rows: the two digits never swap sides, and
    overlapping borders are merged with max (ink over background).
    """
    if 2 * n > len(images):
        raise DataError(f"mnist-pairs: {n} pairs need {2 * n} digits, the split has {len(images)}")
    rng = np.random.default_rng(seed)
    order = torch.from_numpy(rng.permutation(len(images))[: 2 * n]).view(n, 2)  # (n, 2) digit indices
    arrangement = torch.from_numpy(rng.integers(0, 2, n))  # (n,)
    near = torch.from_numpy(rng.integers(0, 5, (n, 2)))  # offset along the arrangement's axis
    far = torch.from_numpy(rng.integers(0, PAIR_CANVAS - 28 + 1, (n, 2)))  # offset across it
    along = torch.stack([near[:, 0], near[:, 1] + PAIR_CANVAS - 28 - 4], 1)  # (n, 2): first digit near 0, second near 28
    rows = torch.where(arrangement[:, None] == VERTICAL, along, far)  # (n, 2) top row of each digit
    cols = torch.where(arrangement[:, None] == HORIZONTAL, along, far)  # (n, 2) left column of each digit
    canvas = torch.zeros(n, 1, PAIR_CANVAS, PAIR_CANVAS, dtype=torch.uint8)
    for i in range(n):
        for j in range(2):
            y, x = int(rows[i, j]), int(cols[i, j])
            patch = canvas[i, 0, y: y + 28, x: x + 28]
            torch.maximum(patch, images[order[i, j], 0], out=patch)
    classes = labels[order]  # (n, 2)
    positions = torch.stack([rows, cols], 2)  # (n, 2 digits, (row, col))
    return canvas, {"classes": classes, "arrangement": arrangement, "positions": positions}


def split_pair(canvases: Tensor, arrangement: Tensor) -> tuple[Tensor, Tensor]:
    """The first and second digit of mnist-pairs canvases (N, 1, 56, 56) as 28x28 images (N, 1, 28, 28).

    The inverse of :func:`make_pairs` for scoring samples: each digit is the ink in its half of the
    canvas along the arrangement's axis (left / top first), cut out by a 28x28 window centred on that
    ink's centre of mass, as MNIST centres its digits; a blank half gives its middle window.
    """
    n, side = len(canvases), canvases.shape[-1]
    half = side // 2
    index = torch.arange(side)
    horizontal = (arrangement == HORIZONTAL).view(n, 1, 1)
    first_half = torch.where(horizontal, index[None, None, :] < half, index[None, :, None] < half)  # (n, side, side)
    x = canvases[:, 0].double()
    digits = []
    for mask in (first_half, ~first_half):
        ink = x * mask
        # The centre of mass of the ink; of the half itself when it holds none.
        weights = torch.where(ink.sum((1, 2), keepdim=True) > 0, ink, mask.double())
        mass = weights.sum((1, 2))
        centre = [(weights.sum(dim) * index.double()).sum(1) / mass + 0.5 for dim in (2, 1)]  # row, column
        top = (centre[0] - 14).round().long().clamp(0, side - 28)
        left = (centre[1] - 14).round().long().clamp(0, side - 28)
        windows = torch.stack([(canvases[i, 0] * mask[i])[top[i]: top[i] + 28, left[i]: left[i] + 28] for i in range(n)])
        digits.append(windows[:, None].to(canvases.dtype))
    return digits[0], digits[1]


def pair_caption(a: int, b: int, arrangement: int, template: int) -> str:
    """Template ``template`` of ``arrangement`` saying the digit ``a`` comes first (left / top) and ``b`` second."""
    fields = {"a": str(a), "b": str(b), "a_art": _article(str(a)), "b_art": _article(str(b))}
    return PAIR_TEMPLATES[arrangement][template].format(**fields)


def pair_captions(attributes: dict[str, Tensor], seed: int = 0) -> list[tuple[str, ...]]:
    """Spatial captions of mnist-pairs canvases from their classes and arrangement."""
    classes, arrangement = attributes["classes"].tolist(), attributes["arrangement"].tolist()
    out = []
    for i, ((a, b), kind) in enumerate(zip(classes, arrangement)):
        rng = caption_rng(seed, i)
        templates = PAIR_TEMPLATES[kind]
        chosen = rng.choice(len(templates), size=CAPTIONS_PER_IMAGE, replace=False)
        out.append(tuple(pair_caption(a, b, kind, k) for k in chosen))
    return out


def pair_content_keys(attributes: dict[str, Tensor]) -> Tensor:
    """One integer (n,) per mnist-pairs canvas for what its captions say: both classes in order, and the arrangement.

    Two canvases with the same key fit each other's captions equally well.
    """
    classes, arrangement = attributes["classes"], attributes["arrangement"]  # (n, 2), (n,)
    return (classes[:, 0] * 10 + classes[:, 1]) * 2 + arrangement


def caption_corpus(source: str) -> list[str]:
    """Every word a built-in captioned source can write, as short texts (to train a tokenizer offline)."""
    texts: list[str] = []
    if source.startswith("mnist-captions") or source.startswith("mnist-pairs"):
        texts += DIGIT_WORDS + [str(d) for d in range(10)] + MNIST_TEMPLATES + [t for ts in PAIR_TEMPLATES.values() for t in ts]
        texts += [w for vocab in MNIST_ATTRIBUTES.values() for ws in vocab.values() for w in ws]
    if source.startswith("fashion-mnist-captions"):
        texts += FASHION_TEMPLATES + [w for ws in FASHION_WORDS.values() for w in ws]
        texts += [w for vocab in FASHION_ATTRIBUTES.values() for ws in vocab.values() for w in ws]
    if source.startswith("cifar10-captions"):
        from genlab.data.cifar import CIFAR10_CLASSES

        texts += CIFAR_TEMPLATES + list(CIFAR10_CLASSES)
        texts += [w for vocab in CIFAR_ATTRIBUTES.values() for ws in vocab.values() for w in ws]
    return [t.replace("{", " ").replace("}", " ") for t in texts] + ["a an the of and is"]


# --------------------------------------------------------------------------------------------
# Captions of user folders.

CAPTION_FILES = ("captions.csv", "captions.jsonl")


def read_caption_table(path: Path) -> dict[str, list[str]]:
    """file -> captions from a captions.csv (file,caption) or captions.jsonl ({"file", "caption"} per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read caption file {path} ({e}); save it as UTF-8 text") from e
    rows: list[tuple[int, str, object]] = []
    if path.suffix == ".csv":
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["file", "caption"]:
            raise DataError(f"{path}: the first line must be the header 'file,caption', got {','.join(header or [])!r}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise DataError(f"{path} line {line}: expected 2 columns (file,caption), got {len(row)}; quote captions that contain commas")
            rows.append((line, row[0].strip(), row[1]))
    else:
        for line, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line}: not valid JSON ({e.msg}); write one {{\"file\": ..., \"caption\": ...}} object per line") from e
            if not isinstance(record, dict) or "file" not in record or "caption" not in record:
                raise DataError(f"{path} line {line}: needs the keys \"file\" and \"caption\", got {raw.strip()[:80]!r}")
            rows.append((line, str(record["file"]).strip(), record["caption"]))
    table: dict[str, list[str]] = {}
    for line, file, caption in rows:
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{path} line {line}: empty caption for {file!r}; write a caption or remove the line")
        table.setdefault(file, []).append(" ".join(caption.split()))
    return table


def folder_captions(folder: Path, paths: list[str]) -> list[tuple[str, ...]] | None:
    """Captions of the images ``paths`` (relative to ``folder``), or None when the folder has no captions.

    Looks for captions.csv / captions.jsonl in ``folder`` (keys are paths relative to it, or bare
    file names when unique), then for sidecar ``.txt`` files. Images without a caption are an error.
    """
    if not folder.is_dir():
        return None  # archives: captions are read from folders only
    tables = [folder / name for name in CAPTION_FILES if (folder / name).is_file()]
    if len(tables) > 1:
        raise DataError(f"{folder} has both captions.csv and captions.jsonl; keep one")
    table = read_caption_table(tables[0]) if tables else {}
    sidecars = {p: folder / Path(p).with_suffix(".txt") for p in paths}
    if not table and not any(s.is_file() for s in sidecars.values()):
        return None
    by_name = {Path(k).name: v for k, v in table.items()}
    captions = []
    for p in paths:
        found = table.get(p) or by_name.get(Path(p).name)
        if found is None and sidecars[p].is_file():
            lines = [" ".join(line.split()) for line in sidecars[p].read_text(encoding="utf-8", errors="replace").splitlines()]
            found = [line for line in lines if line]
            if not found:
                raise DataError(f"caption file {sidecars[p]} is empty; write a caption in it or delete it")
        if not found:
            where = tables[0].name if tables else "a sidecar .txt"
            raise DataError(f"image {folder / p} has no caption (looked in {where}); add one, or remove all caption files for an uncaptioned folder")
        captions.append(tuple(found))
    return captions


# --------------------------------------------------------------------------------------------
# Source loaders: wrap a labelled source's loader, measure, write captions.

Loader = Callable[..., "ImageSet"]  # (DataConfig, root) -> ImageSet


def _with_source(cfg, name: str):
    import dataclasses

    return dataclasses.replace(cfg, source=name)


def captioned_loader(base_name: str, base_load: Loader, measure: Callable, write: Callable) -> Loader:
    """A loader that reads ``base_name`` with ``base_load`` and adds measured attributes and captions."""

    def load(cfg, root):
        data = base_load(_with_source(cfg, base_name), root)
        attributes = measure(data.images)
        seed = 0 if data.split == "train" else 1
        captions = write(data.labels, attributes, data.class_names, seed, tuple(cfg.unnamed_classes or ()), cfg.generic_share)
        data.source, data.captions, data.attributes = cfg.source, captions, attributes
        return data

    return load


def pairs_loader(base_load: Loader) -> Loader:
    """mnist-pairs: half as many 56x56 two-digit canvases as the MNIST split has digits."""

    def load(cfg, root):
        import dataclasses

        from genlab.data.imageset import ImageSet

        # data.limit counts pairs: read twice as many digits.
        digits = base_load(dataclasses.replace(cfg, source="mnist", limit=None if cfg.limit is None else 2 * cfg.limit), root)
        seed = 0 if cfg.split == "train" else 1
        images, attributes = make_pairs(digits.images, digits.labels, len(digits) // 2, seed)
        return ImageSet(images, None, None, cfg.source, cfg.split, digits.origin,
                        captions=pair_captions(attributes, seed), attributes=attributes)

    return load


def measure_and_write(kind: str) -> tuple[Callable, Callable]:
    """(measure(images), write(labels, attributes, class_names, seed)) of a captioned source kind."""
    if kind == "mnist":
        return measure_mnist, (lambda labels, attrs, names, seed, unnamed=(), generic_share=0.0:
                               mnist_captions(labels, attrs, seed, unnamed, generic_share))
    styles = {"fashion-mnist": (measure_fashion, FASHION_ATTRIBUTES, FASHION_TEMPLATES, lambda name: FASHION_WORDS[name]),
              "cifar10": (measure_cifar, CIFAR_ATTRIBUTES, CIFAR_TEMPLATES, lambda name: [name])}
    if kind not in styles:
        raise ValueError(f"no captions for {kind!r}")
    measure, vocab, templates, words = styles[kind]

    def write(labels, attrs, class_names, seed, unnamed=(), generic_share=0.0):  # unnamed: mnist only (load_data refuses it here)
        return templated_captions(labels, attrs, vocab, templates, lambda label: words(class_names[label]), seed)

    return measure, write


def folder_caption_texts(spec: str) -> list[str]:
    """Every caption in a folder's captions.csv / captions.jsonl / sidecar .txt files (a tokenizer's corpus)."""
    folder = Path(spec).expanduser()
    texts = []
    for name in CAPTION_FILES:
        if (folder / name).is_file():
            texts += [c for caps in read_caption_table(folder / name).values() for c in caps]
    for sidecar in sorted(folder.rglob("*.txt")) if folder.is_dir() else []:
        texts += [" ".join(line.split()) for line in sidecar.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not texts:
        raise DataError(f"{folder} has no captions (captions.csv, captions.jsonl or .txt beside the images); the clip method needs them")
    return texts
