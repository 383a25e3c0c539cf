"""CLIP score, R-precision and retrieval recall@k against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from genlab.errors import ConfigError
from genlab.metrics.clip_score import clip_score, duplicate_ceiling, r_precision, recall_at_k


def _unit(angle_deg):
    a = math.radians(angle_deg)
    return torch.tensor([math.cos(a), math.sin(a)])


def test_clip_score_hand_computed():
    images = torch.stack([_unit(0), _unit(0), _unit(0)])
    texts = torch.stack([_unit(60), _unit(0), _unit(120)])  # cosines 0.5, 1, -0.5 (clipped to 0)
    assert float(clip_score(images, texts)) == pytest.approx(2.5 * (0.5 + 1 + 0) / 3)
    assert float(clip_score(images, texts, w=100)) == pytest.approx(100 * 1.5 / 3)
    with pytest.raises(ConfigError, match="one caption per image"):
        clip_score(images, texts[:2])


def test_r_precision_hand_computed():
    n = 200
    texts = F.normalize(torch.randn(n, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert float(r_precision(texts.clone(), texts, distractors=99)) == 1.0  # each image is its own caption: always first
    # Three pairs, two distractors: each image meets exactly the other two captions.
    texts = torch.stack([_unit(0), _unit(90), _unit(180)])
    images = torch.stack([_unit(10), _unit(170), _unit(180)])  # image 1 is nearer caption 2 (cos 10) than its own (cos 80)
    assert float(r_precision(images, texts, distractors=2)) == pytest.approx(2 / 3)
    ties = torch.stack([_unit(0), _unit(0), _unit(0)])
    assert float(r_precision(ties, ties, distractors=2)) == 0.0  # a tie is not a win
    with pytest.raises(ConfigError, match="at least 100 pairs, got 3"):
        r_precision(images, texts)


def test_recall_at_k_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(60, 8, generator=g), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(60, 8, generator=g), dim=-1)
    got = recall_at_k(images, texts, ks=(1, 3), gallery=20)
    for direction, (q, c) in {"image_to_text": (images, texts), "text_to_image": (texts, images)}.items():
        for k in (1, 3):
            hits = 0
            for start in range(0, 60, 20):
                for i in range(start, start + 20):
                    scores = [float(q[i] @ c[j]) for j in range(start, start + 20)]
                    better = sum(s >= scores[i - start] for j, s in enumerate(scores) if j != i - start)
                    hits += better < k
            assert got[f"{direction}_recall@{k}"] == pytest.approx(hits / 60)
    assert recall_at_k(images, images, ks=(1,))["text_to_image_recall@1"] == 1.0
    same = torch.ones(3, 2) / math.sqrt(2)  # three identical pairs: every candidate ties with the match
    tied = recall_at_k(same, same, ks=(1, 2, 3))
    assert (tied["image_to_text_recall@1"], tied["image_to_text_recall@2"], tied["image_to_text_recall@3"]) == (0.0, 0.0, 1.0)


def test_content_recall_counts_any_image_of_the_same_content():
    g = torch.Generator().manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(40, 6, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(40, 6, generator=g), dim=-1)
    keys = torch.randint(0, 6, (40,), generator=g)
    got = recall_at_k(images, texts, ks=(1, 2), gallery=20, keys=keys)
    for direction, (queries, candidates) in {"image_to_text": (images, texts), "text_to_image": (texts, images)}.items():
        for k in (1, 2):
            hits = 0
            for start in (0, 20):
                for i in range(start, start + 20):
                    scores = [(float(queries[i] @ candidates[j]), j) for j in range(start, start + 20)]
                    top = sorted(scores, reverse=True)[:k]
                    hits += any(int(keys[j]) == int(keys[i]) for _, j in top)
            assert got[f"{direction}_recall@{k}"] == pytest.approx(hits / 40)
    distinct = torch.arange(40)
    assert recall_at_k(images, texts, gallery=20, keys=distinct) == recall_at_k(images, texts, gallery=20)


def test_duplicate_ceiling_by_hand():
    # Gallery 1: keys 0, 0, 1, 2 -> 1/2 + 1/2 + 1 + 1; gallery 2: 5, 5, 5, 6 -> 3 * 1/3 + 1.
    assert duplicate_ceiling(torch.tensor([0, 0, 1, 2, 5, 5, 5, 6]), gallery=4) == pytest.approx((3.0 + 2.0) / 8)
    # A perfect model whose ties break at random reaches it (mean over many random tie-breaks).
    keys = torch.tensor([0, 0, 1, 2])
    one_hot = torch.nn.functional.one_hot(keys, 3).float()
    g = torch.Generator().manual_seed(0)
    runs = [recall_at_k(one_hot + 1e-3 * torch.randn(4, 3, generator=g), one_hot, ks=(1,))["text_to_image_recall@1"] for _ in range(2000)]
    assert sum(runs) / len(runs) == pytest.approx(0.75, abs=0.02)
