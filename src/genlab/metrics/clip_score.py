"""Image-text agreement scores on CLIP embeddings (SPEC M3): CLIP score, R-precision, retrieval recall@k.

All functions take unit-norm embeddings, images (N, E) and texts (N, E), row i of one matching row
i of the other.

- CLIP score (Hessel et al. 2021, eq. 1): w * max(cos(image, caption), 0) with w = 2.5, averaged
  over pairs. torchmetrics' ``CLIPScore`` reports 100 * max(cos, 0) instead; both are returned.
- R-precision (Xu et al. 2018, AttnGAN section 4.1): for each image, its true caption is ranked
  against ``distractors`` (99) captions of other images; the score is the share of images whose true
  caption ranks first (R = 1 relevant caption among the 100).
- Recall@k for retrieval (image -> text and text -> image) within galleries of ``gallery`` pairs.
"""

from __future__ import annotations

import torch

from genlab.errors import ConfigError

HESSEL_W = 2.5


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor, w: float = HESSEL_W) -> torch.Tensor:
    """Mean of w * max(cos(image_i, text_i), 0) over the N pairs (Hessel et al. 2021)."""
    if image_emb.shape != text_emb.shape:
        raise ConfigError(f"CLIP score needs one caption per image, got embeddings {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    cos = (image_emb * text_emb).sum(-1)  # (N,)
    return w * cos.clamp(min=0).mean()


def r_precision(image_emb: torch.Tensor, text_emb: torch.Tensor, distractors: int = 99, generator: torch.Generator | None = None) -> torch.Tensor:
    """Share of images whose own caption beats ``distractors`` captions of other images drawn at random.

    Ties count against the true caption (it must score strictly higher than every distractor).
    """
    n = len(image_emb)
    if n < distractors + 1:
        raise ConfigError(f"R-precision with {distractors} mismatched captions needs at least {distractors + 1} pairs, got {n}")
    # Distractor j of image i: caption (i + offset_ij) mod n with distinct offsets in 1..n-1, so never its own.
    offsets = torch.stack([torch.randperm(n - 1, generator=generator)[:distractors] + 1 for _ in range(n)])  # (N, K)
    others = (torch.arange(n)[:, None] + offsets) % n  # (N, K)
    true = (image_emb * text_emb).sum(-1)  # (N,)
    wrong = torch.einsum("ne,nke->nk", image_emb, text_emb[others.to(text_emb.device)])  # (N, K)
    return (true[:, None] > wrong).all(1).float().mean()


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10), gallery: int | None = None,
                keys: torch.Tensor | None = None) -> dict[str, float]:
    """Image -> text and text -> image recall@k, ranking within consecutive galleries of ``gallery`` pairs.

    recall@k = share of queries whose match is among the k most similar candidates (ties against
    the match). ``gallery=None`` ranks among all N; a last partial gallery is dropped. With ``keys``
    (N,) every candidate with the query's key is a match (the best-ranked one counts): content
    recall, for captions that cannot tell apart two images with the same content.
    """
    n = len(image_emb)
    g = n if gallery is None else gallery
    if g < 1 or n < g:
        raise ConfigError(f"retrieval galleries of {g} pairs need at least {g} pairs, got {n}")
    if keys is not None and len(keys) != n:
        raise ConfigError(f"retrieval keys need one key per pair, got {len(keys)} keys for {n} pairs")
    out = {f"{d}_recall@{k}": 0.0 for d in ("image_to_text", "text_to_image") for k in ks}
    groups = n // g
    for start in range(0, groups * g, g):
        sim = image_emb[start: start + g] @ text_emb[start: start + g].T  # (g, g): images x texts
        match = torch.eye(g, dtype=torch.bool) if keys is None else keys[start: start + g, None] == keys[None, start: start + g]  # (g, g)
        match = match.to(sim.device)
        for direction, s in (("image_to_text", sim), ("text_to_image", sim.T)):
            best = s.masked_fill(~match, float("-inf")).max(1, keepdim=True).values  # (g, 1) best-scoring match
            rank = ((s >= best) & ~match).sum(1)  # non-matches scoring at least as high as it
            for k in ks:
                out[f"{direction}_recall@{k}"] += float((rank < k).sum())
    return {key: value / (groups * g) for key, value in out.items()}


def duplicate_ceiling(keys: torch.Tensor, gallery: int) -> float:
    """Expected recall@1 of a perfect model whose ties break at random, when queries share content ``keys``.

    In a gallery where m other candidates have the query's content, even a perfect model can only
    guess among the m + 1: it ranks the true one first with probability 1 / (m + 1).
    """
    n = len(keys)
    groups = n // gallery
    total = 0.0
    for start in range(0, groups * gallery, gallery):
        k = keys[start: start + gallery]
        total += float((1.0 / (k[:, None] == k[None, :]).sum(1)).sum())
    return total / (groups * gallery)
