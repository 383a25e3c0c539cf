"""ControlNet and T2I-Adapter: child runs of a frozen U-Net diffusion run (SPEC A2, A3)."""

from __future__ import annotations

import copy

import pytest
import torch

from genlab import api
from genlab.config import build_config
from genlab.errors import ConfigError
from genlab.methods import DataInfo
from genlab.methods.control import ControlNetMethod, T2IAdapterMethod
from genlab.methods.ddpm import DDPM
from genlab.runs import load_run
from step_context import RecordingContext
from tiny_configs import TINY_DDPM

DIGITS = DataInfo(channels=1, image_size=8, num_classes=10)
METHODS = (ControlNetMethod, T2IAdapterMethod)


def _base(*overrides: str) -> DDPM:
    """A tiny DDPM on 8x8 digits with random (not zero) weights everywhere, so every path carries signal."""
    torch.manual_seed(0)
    base = DDPM(build_config("ddpm", DDPM.Config, overrides=TINY_DDPM + list(overrides)).model, DIGITS)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)
    return base


def _child(cls, base: DDPM, *overrides: str):
    cfg = build_config(cls.name, cls.Config, overrides=["base=/a/run", *overrides]).model
    return cls(cfg, DIGITS, parents={"base": copy.deepcopy(base)}).eval()


def _inputs(n: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.randint(0, 100, (n,), generator=g)
    control = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return x, t, control


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.name)
@pytest.mark.parametrize("overrides", [(), ("model.class_conditional=true",), ("model.patch_size=2",)], ids=str)
def test_at_step_0_the_controlled_model_is_the_base_exactly(cls, overrides):
    base = _base(*overrides)
    child = _child(cls, base)
    x, t, control = _inputs()
    y = torch.tensor([0, 3, 5, 10]) if base.num_classes else None  # 10: the null class
    with torch.no_grad():
        plain = base.network(x, t, y)
        controlled = child.base.network(x, t, y, backbone_kwargs=child.steering(control))
        assert torch.equal(controlled, plain)  # zero convolutions: bit for bit, not approximately
        # ... and a control network whose outputs are not zero does change it (the test can fail).
        for p in child.control_network.parameters():
            p.add_(0.01)
        assert not torch.allclose(child.base.network(x, t, y, backbone_kwargs=child.steering(control)), plain)


def test_controlnet_is_a_copy_of_the_base_encoder_and_middle():
    base = _base()
    child = _child(ControlNetMethod, base)
    encoder = child.control_network.encoder
    ours = encoder.state_dict()
    theirs = {k: v for k, v in base.unet.state_dict().items()
              if not k.startswith(("up.", "norm_out.", "conv_out."))}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(p.requires_grad for p in child.control_network.parameters())
    assert not any(p.requires_grad for p in child.base.parameters())
    # the paper's condition encoder: 4x4 stride-2 convolutions as needed (8 px at patch 1: none), widths 16..128
    convs = [m for m in child.control_network.condition.layers if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128]
    patched = _child(ControlNetMethod, _base("model.patch_size=2"))
    convs = [m for m in patched.control_network.condition.layers if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((4, 4), (2, 2))] + [((3, 3), (1, 1))] * 3


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.name)
def test_training_moves_only_the_control_network_and_the_base_stays_bit_identical(cls):
    base = _base("model.class_conditional=true")
    child = _child(cls, base).train()
    frozen = {k: v.clone() for k, v in child.base.state_dict().items()}
    before = {k: v.clone() for k, v in child.control_network.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in child.parameters() if p.requires_grad], lr=1e-2)
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    batch = {"image": images, "label": torch.arange(8) % 10}
    for step in range(3):
        ctx = RecordingContext(8, seed=step)
        optimizer.zero_grad()
        child.training_step(batch, ctx)
        ctx.losses[0].backward()
        assert all(p.grad is None for p in child.base.parameters())
        optimizer.step()
    after = child.base.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    moved = [k for k, v in child.control_network.state_dict().items() if not torch.equal(before[k], v)]
    zero = [k for k in moved if "zero_conv" in k or k.startswith("outs.") or k.startswith("condition.out")]
    assert zero, "the zero convolutions must learn (their gradient is not zero although their weights are)"


def test_the_training_loss_is_the_base_loss_of_the_steered_network(monkeypatch):
    base = _base()
    child = _child(ControlNetMethod, base)
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ctx = RecordingContext(4, seed=7)
    child.training_step({"image": images}, ctx)
    # At step 0 the steered network is the base, so the loss equals the base's own training loss on the same draws.
    base_ctx = RecordingContext(4, seed=7)
    child.base.training_step({"image": images}, base_ctx)
    assert torch.equal(ctx.losses[0], base_ctx.losses[0])


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.name)
def test_sampling_follows_the_base_at_scale_0_and_checks_the_maps(cls):
    base = _base("model.class_conditional=true")
    child = _child(cls, base)
    for p in child.control_network.parameters():  # a trained-looking control network (outputs not zero)
        torch.nn.init.normal_(p, 0, 0.05)
    _, _, control = _inputs(4)
    labels = torch.tensor([1, 2, 3, 4])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = child.base.sample(4, generator=g(), steps=3, labels=labels, guidance_scale=2.0)
    off = child.sample(4, generator=g(), steps=3, labels=labels, guidance_scale=2.0, control=control, control_scale=0.0)
    on = child.sample(4, generator=g(), steps=3, labels=labels, guidance_scale=2.0, control=control)
    assert torch.equal(off, plain) and not torch.equal(on, plain)
    assert torch.equal(child.sample(4, generator=g(), steps=3, labels=labels, guidance_scale=2.0), plain)
    with pytest.raises(ConfigError, match=r"control maps of shape \(4, 1, 7, 7\): give one 1x8x8 map per sample"):
        child.sample(4, generator=g(), steps=3, control=control[..., :7, :7])


def test_a_dit_base_is_refused_in_one_line():
    from genlab.methods.dit import DiT

    base = DiT(build_config("dit", DiT.Config, overrides=["model.dit.hidden_size=32", "model.dit.depth=1",
                                                          "model.dit.num_heads=2", "model.dit.patch_size=2"]).model, DIGITS)
    with pytest.raises(ConfigError, match="controlnet steers a U-Net, but the base run /a/run denoises with DiT") as e:
        _child(ControlNetMethod, base)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.name)
def test_a_latent_diffusion_base_is_steered_in_latent_space_from_pixel_control_maps(cls):
    from genlab.methods.autoencoder import KLAutoencoder
    from genlab.methods.ldm import LDM
    from tiny_configs import TINY_KL_AE, TINY_LDM

    torch.manual_seed(0)
    autoencoder = KLAutoencoder(build_config("kl-ae", KLAutoencoder.Config, overrides=TINY_KL_AE).model, DIGITS)
    ldm = LDM(build_config("ldm", LDM.Config, overrides=TINY_LDM + ["autoencoder=/a/run"]).model, DIGITS,
              parents={"autoencoder": autoencoder})
    with torch.no_grad():
        for p in ldm.unet.parameters():
            p.normal_(0, 0.2)
    child = _child(cls, ldm)
    assert ldm.latent_shape == (4, 4, 4)  # 8 px images, 4 px latents: the condition encoder halves once
    z, t, _ = _inputs(3)
    z = z[:, :1].expand(3, 4, 8, 8)[..., :4, :4].contiguous()
    control = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(child.base.network(z, t, None, child.steering(control)), child.base.network(z, t))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    samples = child.sample(3, generator=g(), steps=2, control=control)
    assert torch.equal(samples, child.base.sample(3, generator=g(), steps=2))  # zero init: the base's samples
    assert samples.shape == (3, 1, 8, 8)


def test_an_empty_condition_encoder_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="model.controlnet.condition_channels is empty") as e:
        _child(ControlNetMethod, _base(), "model.controlnet.condition_channels=[]")
    assert "\n" not in str(e.value)


def _encoder_activations(unet) -> tuple[list, list]:
    """Hooks recording, per forward call of ``unet``, its encoder activations: conv_in's output, every down
    module's output, the middle block's output (the tensors a ControlNet copy mirrors). Returns (records, handles)."""
    records, handles = [], []
    handles.append(unet.conv_in.register_forward_hook(lambda m, i, o: records.append([o.detach().clone()])))
    for module in list(unet.down) + [unet.middle[-1]]:
        handles.append(module.register_forward_hook(lambda m, i, o: records[-1].append(o.detach().clone())))
    return records, handles


def _copy_activations(controlnet) -> tuple[list, list]:
    """Hooks recording, per ControlNet call, the inputs of its zero convolutions (its copy's encoder activations)."""
    records, handles = [], []
    convs = list(controlnet.zero_convs) + [controlnet.mid_zero_conv]
    handles.append(convs[0].register_forward_pre_hook(lambda m, i: records.append([i[0].detach().clone()])))
    for conv in convs[1:]:
        handles.append(conv.register_forward_pre_hook(lambda m, i: records[-1].append(i[0].detach().clone())))
    return records, handles


def _text_base(extra: tuple[str, ...] = ()):
    from methods.test_text_conditioning import _text_method

    return _text_method("unet", extra=extra)


@pytest.mark.parametrize("phase", ["guided sampling", "training"])
@pytest.mark.parametrize("conditioning", ["class", "text", "refined text"])
def test_the_controlnet_copy_sees_the_condition_the_base_sees(conditioning, phase):
    """The trainable copy's time + class (or text) embedding path matches the frozen encoder's: at initialisation
    (weights copied, the condition encoder's zero output) its encoder activations equal the base's, call by call,
    through classifier-free guidance's [conditional; null] batch and through a training step (labels or captions,
    some dropped). A copy fed no condition (or the null class, or the empty prompt, for every row) would differ:
    the check that the condition changes the base's activations makes sure it can."""
    from methods.test_text_conditioning import REFINED

    base = (_base("model.class_conditional=true") if conditioning == "class"
            else _text_base(tuple(REFINED) if conditioning == "refined text" else ()))
    child = _child(ControlNetMethod, base)
    captions = [["the digit one"], ["a thick two"], ["three"], ["a thin four"]]
    _, _, control = _inputs(4)
    base_records, base_hooks = _encoder_activations(child.base.backbone)
    copy_records, copy_hooks = _copy_activations(child.control_network)
    try:
        if phase == "training":
            child.base.config.p_uncond = 0.5  # half the rows to the null class / empty prompt (seeded draws)
            images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
            child.training_step({"image": images, "label": torch.tensor([1, 2, 3, 4]), "captions": captions},
                                RecordingContext(4, seed=3))
        else:
            options = ({"labels": torch.tensor([1, 2, 3, 4])} if conditioning == "class"
                       else {"prompts": [c[0] for c in captions]})
            child.sample(4, generator=torch.Generator().manual_seed(0), steps=3, guidance_scale=3.0, control=control,
                         **options)
    finally:
        for handle in base_hooks + copy_hooks:
            handle.remove()
    assert len(base_records) == len(copy_records) == (1 if phase == "training" else 3)  # one call per step
    for ours, theirs in zip(copy_records, base_records):
        assert len(ours) == len(theirs)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
        # rows differ in their condition only in guided sampling ([x_t; x_t]): there it reaches the activations
        if phase != "training":
            assert not torch.allclose(theirs[-1][:4], theirs[-1][4:])
