"""EMA: closed-form averages, the warm-up schedule, exact swap-in/restore, state round trips."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genlab.errors import ConfigError
from genlab.train.checkpoint import flatten_state, load_checkpoint, save_checkpoint, unflatten_state
from genlab.train.ema import EMA


def _vector_module(values, dtype=torch.float64):
    m = nn.Module()
    m.w = nn.Parameter(torch.tensor(values, dtype=dtype))
    return m


def test_warmup_decay_values_by_hand():
    ema = EMA(_vector_module([0.0]), decay=0.5)
    # (1 + n) / (10 + n) for n = 0..8 is 1/10, 2/11, ..., 9/18 = 0.5; then capped at decay = 0.5.
    expected = [1 / 10, 2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15, 7 / 16, 8 / 17, 0.5, 0.5, 0.5]
    got = []
    for _ in expected:
        got.append(ema.current_decay())
        ema.update(_vector_module([0.0]))
    assert got == pytest.approx(expected, rel=1e-15)

    fixed = EMA(_vector_module([0.0]), decay=0.9, warmup=False)
    assert fixed.current_decay() == 0.9


@pytest.mark.parametrize("warmup", [True, False])
def test_constant_trajectory_matches_closed_form(warmup):
    x0, c, decay, k = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([5.0, 3.0, -4.0]), 0.95, 25
    model = _vector_module(x0.tolist())
    ema = EMA(model, decay=decay, warmup=warmup)
    with torch.no_grad():
        model.w.copy_(c)  # the parameter jumps to c and stays there
    for _ in range(k):
        ema.update(model)
    # shadow_k = P x0 + (1 - P) c with P = prod_i d_i, d_i = min(decay, (1 + i) / (10 + i)).
    d = [min(decay, (1 + i) / (10 + i)) if warmup else decay for i in range(k)]
    P = math.prod(d)
    expected = P * x0.double() + (1 - P) * c.double()
    torch.testing.assert_close(ema.params["w"], expected, rtol=1e-12, atol=1e-12)
    assert ema.num_updates == k


def test_moving_trajectory_matches_scalar_recurrence():
    model = _vector_module([0.0])
    ema = EMA(model, decay=0.9)
    shadow = 0.0
    for t in range(1, 30):
        with torch.no_grad():
            model.w.fill_(math.sin(t))
        d = min(0.9, (1 + (t - 1)) / (10 + (t - 1)))
        shadow = d * shadow + (1 - d) * math.sin(t)
        ema.update(model)
        assert ema.params["w"].item() == pytest.approx(shadow, rel=1e-12, abs=1e-14)


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
    model.train()
    model(torch.randn(8, 1, 6, 6, generator=g))  # moves BatchNorm running statistics


def test_averaged_swaps_in_and_restores_exactly():
    model = _bn_net()
    ema = EMA(model, decay=0.9)
    for s in range(4):
        _perturb(model, s)
        ema.update(model)
    _perturb(model, 99)  # raw weights now differ from the shadow
    raw = {k: v.clone() for k, v in model.state_dict().items()}

    x = torch.randn(3, 1, 6, 6)
    reference = _bn_net()
    ema.copy_to(reference)
    reference.eval()
    model.eval()
    with ema.averaged(model) as m:
        assert m is model
        for name, p in model.named_parameters():
            assert torch.equal(p, ema.params[name]), name
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k]), f"{k} not restored"

    with pytest.raises(RuntimeError, match="inside"):
        with ema.averaged(model):
            raise RuntimeError("failure inside the block")
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k]), f"{k} not restored after an exception"


def test_buffers_are_copied_not_averaged():
    model = _bn_net()
    ema = EMA(model, decay=0.999)
    _perturb(model, 1)
    ema.update(model)
    for name, b in model.named_buffers():
        assert torch.equal(ema.buffers[name], b), name
    # ... while parameters moved only (1 - 0.1) of the way on this first warm-up update.
    assert not torch.equal(ema.params["0.weight"], model[0].weight)


def test_state_round_trip_through_checkpoint(tmp_path):
    model = _bn_net()
    ema = EMA(model, decay=0.99)
    for s in range(3):
        _perturb(model, s)
        ema.update(model)
    tensors, skeleton = flatten_state(ema.state_dict())
    path = save_checkpoint(tmp_path, 3, {"ema": tensors}, {"ema": skeleton})

    loaded_t, loaded_s = load_checkpoint(path)
    restored = EMA(_bn_net(), decay=0.99)  # fresh shadow from a fresh model
    restored.load_state_dict(unflatten_state(loaded_t["ema"], loaded_s["ema"]))
    assert restored.num_updates == 3
    for s in range(3, 6):  # both continue identically
        _perturb(model, s)
        ema.update(model)
        restored.update(model)
    for name in ema.params:
        assert torch.equal(ema.params[name], restored.params[name]), name
    for name in ema.buffers:
        assert torch.equal(ema.buffers[name], restored.buffers[name]), name


def test_low_precision_parameters_keep_float32_shadow():
    model = _vector_module([1.0, 2.0], dtype=torch.bfloat16)
    ema = EMA(model, decay=0.999, warmup=False)
    assert ema.params["w"].dtype == torch.float32
    with torch.no_grad():
        model.w.add_(1.0)
    ema.update(model)
    # In bf16, 1.0 + 0.001 * 1 rounds back to 1.0; the float32 shadow keeps the increment.
    torch.testing.assert_close(ema.params["w"], torch.tensor([1.001, 2.001]), rtol=0, atol=1e-6)
    ema.copy_to(model)
    assert model.w.dtype == torch.bfloat16


def test_wrong_module_and_bad_decay_are_config_errors():
    ema = EMA(_vector_module([0.0]))
    with pytest.raises(ConfigError, match="w"):
        ema.update(nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="1.5"):
        EMA(_vector_module([0.0]), decay=1.5)
