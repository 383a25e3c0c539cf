"""The lora method (a child of a frozen run), its PEFT folders, merge / unmerge runs and peft interop."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch

from genlab import api
from genlab.adapters import (CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, attach, attach_adapters, merge_run,
                             read_adapter, read_adapter_folder, run_adapter, save_adapter, unmerge_run)
from genlab.errors import ConfigError
from genlab.methods.lora import LoRA
from genlab.nn.lora import lora_layers
from genlab.runs import load_run
from tiny_configs import TINY_DDPM

TINY_LORA = ["train.batch_size=32", "train.lr=1e-2", "train.warmup_steps=0", "train.log_every=5", "train.sample_n=4",
             "train.threads=1", "train.ema_decay=null"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny class-conditional ddpm on digits and a rank-2 lora of it (trained a few steps)."""
    root = tmp_path_factory.mktemp("lora")
    api.train("ddpm", data="digits", overrides=TINY_DDPM + ["train.steps=6", "model.class_conditional=true"],
              run_dir=root / "base", progress=False)
    api.train("lora", overrides=TINY_LORA + [f"model.base={root / 'base'}", "rank=2", "alpha=4", "targets=attn,conv",
                                              "train.steps=8"], run_dir=root / "lora", progress=False)
    return root


def _x(n: int = 3):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([5, 50, 90][:n]), torch.tensor([1, 2, 3][:n])


def _out(method, x, t, y):
    with torch.no_grad():
        return method.network(x, t, y)


def test_training_changes_only_the_adapters_and_the_base_is_bit_identical(runs):
    base = load_run(runs / "base", device="cpu").method
    lora = load_run(runs / "lora", device="cpu").method
    assert isinstance(lora, LoRA) and lora.target_paths
    adapted = {k.replace(".base_layer", ""): v for k, v in lora.base.state_dict().items() if ".lora_" not in k}
    assert adapted.keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in adapted.items())
    b = [layer.lora_B["default"].weight for layer in lora_layers(lora.base).values()]
    assert any(float(w.detach().abs().sum()) > 0 for w in b)  # trained away from B = 0
    # only adapter parameters are optimised, and they are a small share
    trainable = {id(p) for p in lora.optimizer_groups()["main"]}
    names = [n for n, p in lora.named_parameters() if id(p) in trainable]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == names


def test_at_step_zero_the_lora_run_equals_its_base(runs):
    from genlab.config import build_config
    from genlab.runs import build_method

    base = load_run(runs / "base", device="cpu").method
    cfg = build_config("lora", LoRA.Config, overrides=[f"model.base={runs / 'base'}", "rank=3"])
    fresh = build_method(cfg, base.data_info)
    x, t, y = _x()
    assert torch.equal(_out(fresh.base, x, t, y), _out(base, x, t, y))


def test_the_run_samples_like_its_base_and_loads_without_the_base_folder(runs, tmp_path):
    moved = tmp_path / "lora"
    shutil.copytree(runs / "lora", moved)
    shutil.copytree(runs / "base", tmp_path / "base-copy")
    before = load_run(moved, device="cpu").sample(4, seed=1, steps=3, labels=torch.tensor([0, 1, 2, 3]))
    shutil.rmtree(tmp_path / "base-copy")  # (the run names runs/base; its stored copy is what loads)
    run = load_run(moved, device="cpu")
    again = run.sample(4, seed=1, steps=3, labels=torch.tensor([0, 1, 2, 3]))
    assert torch.equal(before, again) and before.shape == (4, 1, 8, 8)
    base = load_run(runs / "base", device="cpu").sample(4, seed=1, steps=3, labels=torch.tensor([0, 1, 2, 3]))
    assert not torch.equal(base, again)  # the adapters act on the samples


def test_peft_folder_round_trip_and_refusals(runs, tmp_path):
    adapter = run_adapter(load_run(runs / "lora", device="cpu"))
    folder = save_adapter(adapter, tmp_path / "ad")
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4 and config["peft_type"] == "LORA"
    keys = safetensors.torch.load_file(str(folder / WEIGHTS_FILE)).keys()
    assert all(k.startswith(PEFT_PREFIX) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    again = read_adapter_folder(folder)
    assert again.tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(again.tensors[k], v) for k, v in adapter.tensors.items())
    # a peft option genlab does not implement is refused by name, not ignored
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora"):
        read_adapter_folder(folder)
    # an extra key in the tensors file: one line naming it
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS_FILE))
    tensors[PEFT_PREFIX + "unet.conv_in.lora_C.weight"] = torch.zeros(1)
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_FILE))
    base = load_run(runs / "base", device="cpu").method
    with pytest.raises(ConfigError) as e:
        attach(base, read_adapter_folder(folder), "x", where=str(folder))
    assert "\n" not in str(e.value) and "unet.conv_in.lora_C.weight" in str(e.value)


def test_merge_run_samples_like_the_lora_run_and_unmerge_restores_the_base(runs, tmp_path):
    merged = merge_run(runs / "lora", tmp_path / "merged")
    lora, plain = load_run(runs / "lora", device="cpu").method, load_run(merged, device="cpu").method
    assert plain.name == "ddpm" and not lora_layers(plain)
    x, t, y = _x()
    a, b = _out(lora.base, x, t, y), _out(plain, x, t, y)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    restored = load_run(unmerge_run(merged, tmp_path / "restored"), device="cpu").method.state_dict()
    for key, value in load_run(runs / "base", device="cpu").method.state_dict().items():
        assert (restored[key] - value).abs().max() <= 1e-6 * value.abs().max().clamp_min(1e-12), key
    with pytest.raises(ConfigError, match="already holds a run"):
        merge_run(runs / "lora", tmp_path / "merged")


def test_several_adapters_mix_with_weights(runs, tmp_path):
    """Adapters at weights 0.7 and 0.3 make each layer W + 0.7 (alpha / r) B1 A1 + 0.3 (alpha / r) B2 A2."""
    run = load_run(runs / "base", device="cpu")
    plain = {k: v.clone() for k, v in run.method.state_dict().items()}
    x, t, y = _x()
    base_out = _out(run.method, x, t, y)
    first = save_adapter(run_adapter(load_run(runs / "lora", device="cpu")), tmp_path / "one")
    one, two = read_adapter(first), read_adapter(first)
    g = torch.Generator().manual_seed(0)
    two.tensors = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in two.tensors.items()}
    save_adapter(two, tmp_path / "two")
    names = attach_adapters(run, f"{tmp_path / 'one'}:0.7,{tmp_path / 'two'}:0.3")
    assert names == ["one", "two"]
    mixed = _out(run.method, x, t, y)
    assert not torch.allclose(mixed, base_out)
    scale = one.lora_alpha / one.r
    for path, layer in lora_layers(run.method).items():
        expected = plain[f"{path}.weight"].double()
        for adapter, w in ((one, 0.7), (two, 0.3)):
            a, b = adapter.tensors[f"{path}.lora_A.weight"].double(), adapter.tensors[f"{path}.lora_B.weight"].double()
            delta = b @ a if a.dim() == 2 else torch.einsum("ok,kihw->oihw", b[:, :, 0, 0], a)
            expected = expected + w * scale * delta
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_out(run.method, x, t, y), mixed, rtol=1e-5, atol=1e-5)


def test_our_adapter_loads_into_peft_and_peft_adapters_load_into_genlab(runs, tmp_path):
    peft = pytest.importorskip("peft")
    lora = load_run(runs / "lora", device="cpu").method
    folder = save_adapter(run_adapter(load_run(runs / "lora", device="cpu")), tmp_path / "ours")
    x, t, y = _x()
    ours = _out(lora.base, x, t, y)
    # peft on the equivalent torch module: the plain base method (a DDPM nn.Module) with the base's weights
    plain = load_run(runs / "base", device="cpu").method
    model = peft.PeftModel.from_pretrained(plain, str(folder))
    theirs = _out(model.base_model.model, x, t, y)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, _out(load_run(runs / "base", device="cpu").method, x, t, y))
    # the other way: peft trains-and-saves (random B here), genlab loads it with identical outputs
    base = load_run(runs / "base", device="cpu").method
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["to_qkv", "proj", "conv_in"], init_lora_weights=True)
    peft_model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    expected = _out(peft_model.base_model.model, x, t, y)
    assert not torch.allclose(expected, ours)
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    run = load_run(runs / "base", device="cpu")
    attach_adapters(run, str(tmp_path / "theirs"))
    torch.testing.assert_close(_out(run.method, x, t, y), expected, rtol=1e-5, atol=1e-6)


def test_refusals_name_the_problem(runs):
    with pytest.raises(ConfigError, match="nosuch"):
        api.train("lora", overrides=TINY_LORA + [f"model.base={runs / 'base'}", "targets=nosuch", "train.steps=1"],
                  run_dir=runs / "bad", progress=False)
    with pytest.raises(ConfigError, match="merge it first"):
        api.train("lora", overrides=TINY_LORA + [f"model.base={runs / 'lora'}", "train.steps=1"], run_dir=runs / "bad2",
                  progress=False)
    with pytest.raises(ConfigError, match="not a lora run"):
        run_adapter(load_run(runs / "base", device="cpu"))


@pytest.mark.parametrize("family", ["ldm", "vae"])
def test_other_families_train_only_their_adapters_through_their_own_step(family):
    """An ldm (denoiser adapted, its autoencoder untouched) and a vae: the base's loss, gradients in A and B only."""
    from genlab.config import build_config
    from genlab.methods import DataInfo, get_method
    from step_context import RecordingContext
    from tiny_configs import TINY_AE, TINY_KL_AE, TINY_LDM

    info = DataInfo(channels=1, image_size=8, num_classes=10)
    torch.manual_seed(0)
    if family == "ldm":
        ae = get_method("kl-ae")(build_config("kl-ae", get_method("kl-ae").Config, overrides=TINY_KL_AE).model, info)
        cfg = build_config("ldm", get_method("ldm").Config, overrides=TINY_LDM + ["autoencoder=/a/run"]).model
        base = get_method("ldm")(cfg, info, parents={"autoencoder": ae})
    else:
        base = get_method("vae")(build_config("vae", get_method("vae").Config, overrides=TINY_AE).model, info)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lora_cfg = build_config("lora", LoRA.Config, overrides=["model.base=/a/run", "rank=2", "targets=conv"]).model
    method = LoRA(lora_cfg, info, parents={"base": base})
    if family == "ldm":
        assert all(p.startswith("unet.") for p in method.target_paths)  # never the frozen autoencoder
    ctx = RecordingContext(4)
    method.training_step({"image": torch.rand(4, 1, 8, 8) * 2 - 1, "label": torch.arange(4)}, ctx)
    (loss,) = ctx.losses
    loss.backward()
    trainable = {id(p) for p in method.optimizer_groups()["main"]}
    with_grad = [n for n, p in method.named_parameters() if p.grad is not None]
    assert with_grad and all(id(p) in trainable for n, p in method.named_parameters() if p.grad is not None)
    assert all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    now = {k.replace(".base_layer", ""): v for k, v in method.base.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(now[k], v) for k, v in before.items())
    assert method.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)


def test_conv_rank_travels_as_peft_rank_pattern_both_ways(runs, tmp_path):
    """conv_rank=1 beside rank=3, alpha=6: the 3x3 convolutions get rank 1 at the same scale 2; the exported
    folder names them in rank_pattern / alpha_pattern, peft builds the same layers and gives the same outputs,
    and genlab reads the folder back to the same ranks (merge / unmerge runs go through the same folder)."""
    from types import SimpleNamespace

    from genlab.config import build_config
    from genlab.nn.lora import is_spatial_conv
    from genlab.runs import build_method

    peft = pytest.importorskip("peft")
    base = load_run(runs / "base", device="cpu").method
    cfg = build_config("lora", LoRA.Config, overrides=[f"model.base={runs / 'base'}", "rank=3", "alpha=6", "conv_rank=1",
                                                       "targets=attn,conv"])
    method = build_method(cfg, base.data_info)
    layers = lora_layers(method.base)
    assert {p for p, layer in layers.items() if layer.r["default"] == 1} == {
        p for p, layer in layers.items() if is_spatial_conv(layer)} != set()
    assert all(layer.scaling("default") == 2.0 for layer in layers.values())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.copy_(0.05 * torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    x, t, y = _x()
    ours = _out(method.base, x, t, y)
    folder = save_adapter(run_adapter(SimpleNamespace(method=method, path=tmp_path)), tmp_path / "ours")
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["r"] == 3 and set(config["rank_pattern"].values()) == {1} and set(config["alpha_pattern"].values()) == {2}
    model = peft.PeftModel.from_pretrained(load_run(runs / "base", device="cpu").method, str(folder))
    torch.testing.assert_close(_out(model.base_model.model, x, t, y), ours, rtol=1e-5, atol=1e-6)
    run = load_run(runs / "base", device="cpu")
    attach_adapters(run, str(folder))
    assert {p: layer.r["ours"] for p, layer in lora_layers(run.method).items()} == {
        p: layer.r["default"] for p, layer in layers.items()}
    torch.testing.assert_close(_out(run.method, x, t, y), ours, rtol=1e-5, atol=1e-6)
    # a folder peft wrote with its own patterns (a bare layer name, another alpha) reads the same way
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["to_qkv", "conv_in", "conv_out"],
                             rank_pattern={"conv_in": 1}, alpha_pattern={"conv_in": 5})
    peft_model = peft.get_peft_model(load_run(runs / "base", device="cpu").method, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    expected = _out(peft_model.base_model.model, x, t, y)
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    run = load_run(runs / "base", device="cpu")
    attach_adapters(run, str(tmp_path / "theirs"))
    conv_in = lora_layers(run.method)["unet.conv_in"]
    assert (conv_in.r["theirs"], conv_in.scaling("theirs")) == (1, 5.0)
    torch.testing.assert_close(_out(run.method, x, t, y), expected, rtol=1e-5, atol=1e-6)
