"""Checkpoints: exact nested-state round trips, exact training resume, crash safety, pruning, errors."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from genlab.errors import ConfigError, GenlabError
from genlab.train import checkpoint as ckpt
from genlab.train.checkpoint import (
    flatten_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)


def assert_identical(a, b, where="root"):
    """Exact structural equality: same types at every level, bitwise-equal tensors, same float bits."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}"
        bits_a, bits_b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
        assert torch.equal(bits_a, bits_b), f"{where}: tensor bits differ"
    elif isinstance(a, float):
        assert repr(a) == repr(b), f"{where}: {a!r} != {b!r}"  # tells nan, -0.0 and 0.0 apart
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{where}: keys {list(a)} != {list(b)}"
        for (ka, va), kb in zip(a.items(), b.keys()):
            assert type(ka) is type(kb), f"{where}: key {ka!r} type changed"
            assert_identical(va, b[kb], f"{where}[{ka!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def nasty_state():
    """Nesting and values that JSON alone would silently change."""
    shared = torch.arange(6, dtype=torch.float32)
    return {
        "ints": {0: torch.tensor(1.5), 1: [torch.zeros(2, 3)], -7: "neg"},
        "mixed_keys": {0: torch.ones(1), "0": torch.full((1,), 2.0), 1.5: None, True: "t", None: 3, (1, "a"): 4},
        "tuple": (1, (2.0, None), [True, False], ()),
        "floats": [math.inf, -math.inf, math.nan, -0.0, 0.0, 1e-310, 1.0, 0.1],
        "big_int": 2**70,
        "scalar": torch.tensor(7, dtype=torch.int64),  # 0-dim stays 0-dim
        "empty": torch.zeros(0, 4),
        "dtypes": [
            torch.tensor([1.0, -2.5], dtype=torch.bfloat16),
            torch.tensor([True, False]),
            torch.tensor([3], dtype=torch.int8),
        ],
        "tag_lookalike": {"__tensor__": "not a tensor"},
        "tuple_lookalike": {"__tuple__": [1, 2]},
        "shared_storage": [shared, shared[2:4], shared.view(2, 3).t()],  # views and a non-contiguous view
        "empty_containers": [{}, [], ()],
        "text": "é\n\"quoted\"",
    }


def test_flatten_unflatten_round_trip_through_json():
    state = nasty_state()
    tensors, skeleton = flatten_state(state)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    text = json.dumps(skeleton, allow_nan=False)  # strict JSON: no NaN/Infinity literals
    restored = unflatten_state(tensors, json.loads(text))
    assert_identical(state, restored)


def test_flatten_round_trip_through_checkpoint_files(tmp_path):
    state = nasty_state()
    tensors, skeleton = flatten_state(state)
    path = save_checkpoint(tmp_path, 3, {"extra": tensors}, {"extra": skeleton})
    loaded, loaded_state = load_checkpoint(path)
    assert_identical(state, unflatten_state(loaded["extra"], loaded_state["extra"]))
    assert loaded_state["step"] == 3 and loaded_state["checkpoint"]["genlab_version"]


def test_flatten_rejects_unsupported_types_naming_the_path():
    with pytest.raises(TypeError, match=r"set.*'a\.b\.1'"):
        flatten_state({"a": {"b": [0, {1, 2}]}})


def test_unflatten_missing_tensor_is_a_genlab_error():
    tensors, skeleton = flatten_state({"w": torch.ones(2)})
    with pytest.raises(GenlabError, match="'w'"):
        unflatten_state({}, skeleton)


# ---------------------------------------------------------------------------------------------
# Exact resume of AdamW + a warm-up LambdaLR.


def _make(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    warmup = 3
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    return model, opt, sched


def _train(model, opt, sched, steps: range):
    for step in steps:
        g = torch.Generator().manual_seed(1000 + step)  # the batch depends on the step only
        x = torch.randn(16, 4, generator=g)
        y = x.sum(dim=1, keepdim=True).sin()
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_adamw_and_lambdalr_resume_bit_identical(tmp_path):
    ref_model, ref_opt, ref_sched = _make(0)
    _train(ref_model, ref_opt, ref_sched, range(10))

    model, opt, sched = _make(0)
    _train(model, opt, sched, range(5))
    opt_t, opt_s = flatten_state(opt.state_dict())
    sch_t, sch_s = flatten_state(sched.state_dict())
    path = save_checkpoint(
        tmp_path, 5, {"model": model.state_dict(), "optimizer": opt_t, "scheduler": sch_t},
        {"optimizer": opt_s, "scheduler": sch_s},
    )
    del model, opt, sched

    tensors, state = load_checkpoint(path)
    model, opt, sched = _make(123)  # different init: everything must come from the checkpoint
    model.load_state_dict(tensors["model"])
    opt.load_state_dict(unflatten_state(tensors["optimizer"], state["optimizer"]))
    sched.load_state_dict(unflatten_state(tensors["scheduler"], state["scheduler"]))
    _train(model, opt, sched, range(5, 10))

    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume"
    assert sched.get_last_lr() == ref_sched.get_last_lr()
    assert opt.param_groups[0]["betas"] == (0.8, 0.95) and isinstance(opt.param_groups[0]["betas"], tuple)


# ---------------------------------------------------------------------------------------------
# Crash safety.


def _tensors(value: float):
    return {"model": {"w": torch.full((3, 3), value)}, "ema": {"w": torch.full((3, 3), value + 0.5)}}


class _Crash(RuntimeError):
    pass


def _crash_on_call(monkeypatch, n: int):
    """Make the n-th file write of the next save write half its bytes, then raise."""
    real = ckpt.atomic_write_bytes
    calls = {"n": 0}

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] == n:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise _Crash(f"simulated crash writing {path.name}")
        real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", flaky)


@pytest.mark.parametrize("crash_at", [1, 2, 3])  # model file, ema file, state.json (always last)
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_at):
    first = save_checkpoint(tmp_path, 10, _tensors(1.0), {"note": "first"})
    _crash_on_call(monkeypatch, crash_at)
    with pytest.raises(_Crash):
        save_checkpoint(tmp_path, 20, _tensors(2.0), {"note": "second"})
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == first
    assert list_checkpoints(tmp_path) == [first]
    tensors, state = load_checkpoint(first)
    assert state["note"] == "first" and torch.equal(tensors["model"]["w"], torch.full((3, 3), 1.0))
    stale = [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert stale, "the simulated crash should have left a temp folder behind"

    third = save_checkpoint(tmp_path, 30, _tensors(3.0), {"note": "third"}, keep_last=None)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert list_checkpoints(tmp_path) == [first, third]


def test_crash_while_replacing_same_step_keeps_old_content(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path, 10, _tensors(1.0), {"note": "old"})
    _crash_on_call(monkeypatch, 3)
    with pytest.raises(_Crash):
        save_checkpoint(tmp_path, 10, _tensors(2.0), {"note": "new"})
    monkeypatch.undo()
    assert load_checkpoint(latest_checkpoint(tmp_path))[1]["note"] == "old"

    save_checkpoint(tmp_path, 10, _tensors(2.0), {"note": "new"})  # a successful replacement
    assert list_checkpoints(tmp_path) == [path]
    assert load_checkpoint(path)[1]["note"] == "new"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000010"]


def test_crash_between_the_two_renames_falls_back_on_old_folder(tmp_path):
    path = save_checkpoint(tmp_path, 10, _tensors(1.0), {"note": "old"})
    old = path.with_name("step_000010.old-4242")
    os.replace(path, old)  # the state a crash leaves between "final -> old" and "tmp -> final"
    assert latest_checkpoint(tmp_path) == old
    assert load_checkpoint(old)[1]["note"] == "old"

    save_checkpoint(tmp_path, 20, _tensors(2.0), {}, keep_last=None)  # the next save puts it back
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000010", "step_000020"]
    assert load_checkpoint(path)[1]["note"] == "old"


def test_folder_without_state_json_is_not_a_checkpoint(tmp_path):
    good = save_checkpoint(tmp_path, 1, _tensors(1.0), {})
    half = tmp_path / "checkpoints" / "step_000002"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"junk")
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(GenlabError, match="state.json"):
        load_checkpoint(half)


# ---------------------------------------------------------------------------------------------
# Pruning, naming, errors.


def test_keep_last_prunes_to_newest(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 100, _tensors(float(step)), {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000400", "step_000500"]
    assert load_checkpoint(latest_checkpoint(tmp_path))[0]["model"]["w"][0, 0].item() == 5.0

    # A lower step (resumed from an earlier checkpoint) is never pruned right after being written.
    save_checkpoint(tmp_path, 350, _tensors(3.5), {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000350", "step_000400", "step_000500"]

    save_checkpoint(tmp_path, 600, _tensors(6.0), {}, keep_last=None)
    assert len(list_checkpoints(tmp_path)) == 4


def test_steps_beyond_six_digits_sort_numerically(tmp_path):
    save_checkpoint(tmp_path, 999_999, _tensors(1.0), {}, keep_last=None)
    big = save_checkpoint(tmp_path, 1_000_000, _tensors(2.0), {}, keep_last=None)
    assert big.name == "step_1000000" and latest_checkpoint(tmp_path) == big


def test_no_checkpoint_gives_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path) == []


def test_tied_and_non_contiguous_tensors_save(tmp_path):
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied weights: state_dict() lists both names, one storage
    sd = nn.ModuleDict({"emb": emb, "head": head}).state_dict()
    assert sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()
    sd["transposed"] = sd["emb.weight"].t()  # non-contiguous view of the same storage
    path = save_checkpoint(tmp_path, 1, {"model": sd}, {})
    loaded = load_checkpoint(path)[0]["model"]
    assert loaded.keys() == sd.keys()
    for name, t in sd.items():
        assert torch.equal(loaded[name], t), name


def test_load_to_device(tmp_path):
    path = save_checkpoint(tmp_path, 1, _tensors(1.0), {})
    tensors, _ = load_checkpoint(path, device="meta")
    assert tensors["model"]["w"].device.type == "meta"


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete"])
def test_corrupt_tensor_file_is_one_line_error_naming_it(tmp_path, damage):
    path = save_checkpoint(tmp_path, 1, _tensors(1.0), {})
    file = path / "ema.safetensors"
    data = bytearray(file.read_bytes())
    if damage == "flip_byte":
        data[-3] ^= 0xFF  # inside the tensor data: the header still parses, only the checksum sees it
        file.write_bytes(bytes(data))
    elif damage == "truncate":
        file.write_bytes(bytes(data[:20]))
    else:
        file.unlink()
    with pytest.raises(GenlabError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "ema.safetensors" in message and "\n" not in message


def test_invalid_safetensors_with_matching_checksum_is_one_line_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, _tensors(1.0), {})
    junk = b"\xff" * 8 + b"not a header"
    (path / "model.safetensors").write_bytes(junk)
    state = json.loads((path / "state.json").read_text())
    import hashlib

    state["checkpoint"]["files"]["model"].update(bytes=len(junk), sha256=hashlib.sha256(junk).hexdigest())
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(GenlabError) as info:
        load_checkpoint(path)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_corrupt_state_json_is_one_line_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, _tensors(1.0), {})
    (path / "state.json").write_text('{"step": 1, "checkp')
    with pytest.raises(GenlabError) as info:
        load_checkpoint(path)
    assert "state.json" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"state": {"best": math.inf}}, r"best"),
        ({"state": {"by_id": {0: 1}}}, r"by_id"),
        ({"state": {"w": torch.ones(1)}}, r"Tensor"),
        ({"state": {"checkpoint": 1}}, r"reserved"),
        ({"state": {"step": 4}}, r"disagrees"),
        ({"keep_last": 0}, r"keep_last"),
        ({"step": -1}, r"-1"),
        ({"tensors": {"../evil": {}}}, r"evil"),
        ({"tensors": {"model": {"w": [1.0]}}}, r"'w'"),
    ],
)
def test_bad_arguments_are_config_errors(tmp_path, kwargs, match):
    args = {"step": 5, "tensors": {}, "state": {}, "keep_last": 2, **kwargs}
    with pytest.raises(ConfigError, match=match):
        save_checkpoint(tmp_path, args["step"], args["tensors"], args["state"], keep_last=args["keep_last"])
    assert latest_checkpoint(tmp_path) is None
    assert not (tmp_path / "checkpoints").exists(), "validation must happen before anything is written"


# ---------------------------------------------------------------------------------------------
# File entries of state.json stay inside their step folder; symbolic links are refused.


def _rewrite_entry(path, group, name):
    state_path = path / "state.json"
    state = json.loads(state_path.read_text())
    state["checkpoint"]["files"][group]["file"] = name
    state_path.write_text(json.dumps(state))


@pytest.mark.parametrize("name", ["../../outside.safetensors", "{abs}", "sub/model.safetensors", "..", "", 7])
def test_file_entries_outside_the_step_folder_are_refused(tmp_path, name):
    path = save_checkpoint(tmp_path / "run", 10, _tensors(1.0), {})
    # The same bytes outside the folder, so only the location (not the sha256) can give it away.
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((path / "model.safetensors").read_bytes())
    (path / "sub").mkdir()
    (path / "sub" / "model.safetensors").write_bytes(outside.read_bytes())
    _rewrite_entry(path, "model", str(outside) if name == "{abs}" else name)
    with pytest.raises(GenlabError, match="not a plain file name inside its step folder"):
        load_checkpoint(path)


def test_symlinked_files_and_step_folders_are_refused(tmp_path):
    run = tmp_path / "run"
    path = save_checkpoint(run, 10, _tensors(1.0), {})
    elsewhere = tmp_path / "elsewhere.safetensors"
    os.replace(path / "model.safetensors", elsewhere)
    os.symlink(elsewhere, path / "model.safetensors")  # same bytes, same sha256
    with pytest.raises(GenlabError, match="symbolic link"):
        load_checkpoint(path)

    other = save_checkpoint(tmp_path / "other", 20, _tensors(2.0), {})
    linked = run / "checkpoints" / "step_000030"
    os.symlink(other, linked)
    assert list_checkpoints(run) == [path]  # a linked step folder is not one of the run's checkpoints
    with pytest.raises(GenlabError, match="symbolic link"):
        load_checkpoint(linked)


def test_find_checkpoint_skips_damaged_ones_and_picks_steps(tmp_path):
    first = save_checkpoint(tmp_path, 10, _tensors(1.0), {}, keep_last=None)
    second = save_checkpoint(tmp_path, 20, _tensors(2.0), {}, keep_last=None)
    assert ckpt.find_checkpoint(tmp_path) == second and ckpt.find_checkpoint(tmp_path, 10) == first
    assert ckpt.find_checkpoint(tmp_path, "10") == first and ckpt.find_checkpoint(tmp_path, second) == second
    (second / "ema.safetensors").unlink()
    with pytest.warns(UserWarning, match="skipping damaged checkpoint step_000020"):
        assert ckpt.find_checkpoint(tmp_path, "latest") == first
    with pytest.raises(GenlabError, match="no checkpoint at step 15; available steps: 10, 20"):
        ckpt.find_checkpoint(tmp_path, 15)
    assert ckpt.find_checkpoint(tmp_path / "empty") is None


def test_a_missing_state_key_is_a_one_line_genlab_error(tmp_path):
    path = save_checkpoint(tmp_path, 10, _tensors(1.0), {"skeletons": {"a": 1}})
    _, state = load_checkpoint(path)
    assert state["skeletons"]["a"] == 1
    with pytest.raises(GenlabError, match=r"state.json has no 'rng' entry"):
        state["rng"]
    with pytest.raises(GenlabError, match=r"has no 'b' entry"):
        state["skeletons"]["b"]


@pytest.mark.parametrize("code", [28, 27, 30])  # ENOSPC, EFBIG, EROFS
def test_a_failed_write_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code):
    first = save_checkpoint(tmp_path, 10, _tensors(1.0), {"note": "first"})
    real = ckpt.atomic_write_bytes
    calls = {"n": 0}

    def failing(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(code, os.strerror(code))
        return real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", failing)
    with pytest.raises(GenlabError) as info:
        save_checkpoint(tmp_path, 20, _tensors(2.0), {"note": "second"})
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and f"in {tmp_path / 'checkpoints'} ({os.strerror(code)};" in message
    assert " free there" in message
    assert list_checkpoints(tmp_path) == [first] and load_checkpoint(first)[1]["note"] == "first"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000010"]  # no temp left
