"""genlab's pixel DDPM <-> diffusers' ``UNet2DModel`` and ``DDPMScheduler`` (SPEC P8, issue 18 item 4).

An export (``genlab export RUN --format diffusers OUT``) is the folder ``save_pretrained`` writes::

    OUT/model_index.json                            DDPMPipeline (only when the U-Net alone makes images, below)
    OUT/unet/config.json                            UNet2DModel's constructor arguments
    OUT/unet/diffusion_pytorch_model.safetensors
    OUT/scheduler/scheduler_config.json             DDPMScheduler: betas, prediction type, clipping, spacing
    OUT/genlab.json                                 what diffusers' files cannot say: pixel patch, null class, source
    OUT/README.md                                   the model card (genlab.report.card)

Same function, different names. genlab's U-Net (models/unet.py) and a UNet2DModel of DownBlock2D /
AttnDownBlock2D / UNetMidBlock2D / UpBlock2D / AttnUpBlock2D blocks compute the same thing: conv_in,
per level ``num_res_blocks`` residual blocks (attention after each at attended resolutions) and a
stride-2 conv, a middle residual-attention-residual, a decoder of ``num_res_blocks + 1`` blocks per level
eating the skips in reverse, GroupNorm-SiLU-conv out. The time embedding is the same cos-first
sinusoid (``flip_sin_to_cos=True``, ``freq_shift=0``) and MLP; genlab's residual block is
ResnetBlock2D ("default" adds the embedding, "scale_shift" is ADM's). Names differ, and genlab keeps
its own (saved runs must keep loading), so one table, :data:`NAME_TABLE` with the structural walk
of :func:`module_pairs`, maps them in both directions. The only tensor that is not copied as it is:
genlab's fused q/k/v projection ``to_qkv`` (3C, C) is diffusers' ``to_q``, ``to_k``, ``to_v`` stacked.

What a plain DDPMPipeline cannot run is still exported, with its loop in the model card:

- class-conditional runs: UNet2DModel's ``num_class_embeds`` is genlab's table of num_classes + 1
  rows, the last being the null class of classifier-free guidance; DDPMPipeline passes no labels.
- a pixel patch (``model.patch_size`` p > 1, the MNIST presets' p = 2): the U-Net runs on
  pixel_unshuffle(x, p) and its output is pixel_shuffle'd back. The patching is parameter-free, so
  the weights are exactly the U-Net's and two lines around ``unet(...)`` reproduce the model;
  refusing would leave genlab's main presets (and the demo) with no export at all.
  DDPMPipeline would instead draw noise of the U-Net's shape (C p^2, H / p, W / p) and return it as
  images, so these folders have no model_index.json: loading them as a pipeline fails instead of
  silently producing wrong images.

An option UNet2DModel lacks (cross-attention context, a first level wider than conv_in, a head count
that differs from width / head width) is refused by name; so is, on import, every diffusers option
genlab's U-Net cannot express (``freq_shift=1``, ``downsample_padding=0``, ``norm_eps=1e-6`` of the
original google/ddpm-* ports, ...). Nothing is unpickled: weights are safetensors only.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from genlab.diffusion.schedule import BETA_SCHEDULES, beta_schedule
from genlab.errors import ConfigError
from genlab.fileio import atomic_write_bytes, sha256_file, write_error
from genlab.models.unet import UNet, UNetConfig

DIFFUSERS_VERSION = "0.27.0"  # written as _diffusers_version: the oldest diffusers of genlab's dev extra
MARKER_FILE = "genlab.json"  # genlab's facts beside diffusers' files (pixel patch, null class, provenance)
MARKER_FORMAT = 1
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

# ---------------------------------------------------------------------------------------------
# The one name table: genlab module (inside the U-Net) -> diffusers module (inside UNet2DModel)

# Modules that sit at the top of both networks.
TOP_LEVEL = {
    "time_embed.mlp.0": "time_embedding.linear_1",
    "time_embed.mlp.2": "time_embedding.linear_2",
    "class_embed": "class_embedding",  # (num_classes + 1, E): the last row is genlab's null class
    "conv_in": "conv_in",
    "norm_out": "conv_norm_out",
    "conv_out": "conv_out",
}
# Inside a residual block: genlab.nn.blocks.ResBlock -> diffusers ResnetBlock2D.
RES_BLOCK = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
             "skip": "conv_shortcut"}
# Inside an attention block: genlab.nn.attention.SpatialAttention -> diffusers Attention. A tuple is a
# fused genlab weight split along its output axis (genlab's q, k, v = to_qkv(x).chunk(3)).
ATTENTION = {"norm": "group_norm", "attention.to_qkv": ("to_q", "to_k", "to_v"), "attention.proj": "to_out.0"}
# Inside Downsample / Upsample -> Downsample2D / Upsample2D.
RESAMPLE = {"conv": "conv"}

NAME_TABLE = {"top": TOP_LEVEL, "res": RES_BLOCK, "attention": ATTENTION, "resample": RESAMPLE}


def module_pairs(config: UNetConfig) -> list[tuple[str, str, dict | None]]:
    """(genlab prefix, diffusers prefix, leaf table) of every container, by walking the layout of ``config``.

    genlab's ``down`` and ``up`` are flat lists of layers and resamplers; diffusers nests them in
    blocks, one per level: level l's j-th layer is ``down_blocks.l.resnets.j`` (+ ``attentions.j``)
    and its stride-2 conv ``down_blocks.l.downsamplers.0``; the decoder's blocks count from the
    deepest level (``up_blocks.0``). A leaf table of None means the prefix is a module itself.
    """
    pairs: list[tuple[str, str, dict | None]] = [(g, d, None) for g, d in TOP_LEVEL.items()]
    levels, k = len(config.channel_mult), 0

    def layer(genlab: str, block: str, j: int) -> None:
        pairs.append((f"{genlab}.res", f"{block}.resnets.{j}", RES_BLOCK))
        pairs.append((f"{genlab}.attention", f"{block}.attentions.{j}", ATTENTION))

    for level in range(levels):
        for j in range(config.num_res_blocks):
            layer(f"down.{k}", f"down_blocks.{level}", j)
            k += 1
        if level < levels - 1:
            pairs.append((f"down.{k}", f"down_blocks.{level}.downsamplers.0", RESAMPLE))
            k += 1
    layer("middle.0", "mid_block", 0)
    pairs.append(("middle.1.res", "mid_block.resnets.1", RES_BLOCK))
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(config.num_res_blocks + 1):
            layer(f"up.{k}", f"up_blocks.{i}", j)
            k += 1
        if level > 0:
            pairs.append((f"up.{k}", f"up_blocks.{i}.upsamplers.0", RESAMPLE))
            k += 1
    return pairs


def diffusers_names(key: str, pairs: list[tuple[str, str, dict | None]]) -> tuple[str, ...] | None:
    """The diffusers key(s) of genlab's U-Net key ``key`` (e.g. ``down.0.res.emb_proj.weight``), None if unmapped."""
    module, _, param = key.rpartition(".")
    for genlab, diffusers, leaves in pairs:
        if leaves is None:
            if module == genlab:
                return (f"{diffusers}.{param}",)
        elif module.startswith(genlab + "."):
            target = leaves.get(module[len(genlab) + 1:])
            if target is None:
                return None
            names = target if isinstance(target, tuple) else (target,)
            return tuple(f"{diffusers}.{name}.{param}" for name in names)
    return None


def to_diffusers_state(unet: UNet) -> dict[str, torch.Tensor]:
    """genlab's U-Net weights under UNet2DModel's names (fused q/k/v split); unmapped weights are refused by name."""
    pairs = module_pairs(unet.config)
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in unet.state_dict().items():
        names = diffusers_names(key, pairs)
        if names is None:
            unmapped.append(key)
            continue
        for name, part in zip(names, value.detach().cpu().chunk(len(names), dim=0)):
            out[name] = part.contiguous().clone()
    if unmapped:
        raise ConfigError(f"the U-Net has weights UNet2DModel has no place for ({', '.join(unmapped[:3])}"
                          f"{', ...' if len(unmapped) > 3 else ''}): a network option diffusers lacks; "
                          "export a run without it")
    return out


def from_diffusers_state(tensors: dict[str, torch.Tensor], unet: UNet, source: str) -> dict[str, torch.Tensor]:
    """UNet2DModel weights ``tensors`` as the state dict of genlab's ``unet``; a missing, unmapped or
    misshapen weight is refused by its name (``source`` names the file in the message)."""
    pairs = module_pairs(unet.config)
    out, used, missing = {}, set(), []
    for key, expected in unet.state_dict().items():
        names = diffusers_names(key, pairs)
        if names is None:  # genlab grew a module this table does not know: the table needs a row
            raise ConfigError(f"genlab's U-Net weight {key} has no diffusers name in genlab.interop.diffusers.NAME_TABLE")
        absent = [name for name in names if name not in tensors]
        if absent:
            missing += absent
            continue
        value = torch.cat([tensors[name] for name in names]) if len(names) > 1 else tensors[names[0]]
        if value.shape != expected.shape:
            raise ConfigError(f"{source}: {names[0]} has shape {tuple(tensors[names[0]].shape)}, but its config.json "
                              f"implies {tuple(expected.shape) if len(names) == 1 else (expected.shape[0] // 3, *expected.shape[1:])}: "
                              "config and weights disagree (damaged or edited folder?)")
        out[key] = value.to(expected.dtype)
        used.update(names)
    if missing:
        raise ConfigError(f"{source} lacks weights its config.json needs: {', '.join(missing[:3])}"
                          f"{', ...' if len(missing) > 3 else ''} ({len(missing)} missing; damaged or partial file?)")
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ConfigError(f"{source} has weights genlab's U-Net cannot place: {', '.join(unexpected[:3])}"
                          f"{', ...' if len(unexpected) > 3 else ''} (a block type or option genlab lacks)")
    return out


# ---------------------------------------------------------------------------------------------
# Network configuration: genlab UNet <-> UNet2DModel config.json

# UNet2DModel's constructor defaults (diffusers 0.27-0.42): what a config.json without the key means.
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}
# Settings genlab's U-Net has exactly one value of (what each means in genlab's terms after the #).
UNET2D_FIXED: dict[str, Any] = {
    "center_input_sample": False,  # inputs are x_t as they are
    "time_embedding_type": "positional",  # sinusoidal time features
    "flip_sin_to_cos": True,  # cos first (genlab.nn.embeddings.timestep_embedding)
    "freq_shift": 0,  # frequencies max_period^(-i / half)
    "mid_block_type": "UNetMidBlock2D",  # residual, attention, residual
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,  # symmetric padding of the stride-2 conv
    "downsample_type": "conv",
    "upsample_type": "conv",  # nearest-neighbour x2 then a 3x3 conv
    "act_fn": "silu",
    "norm_eps": 1e-5,  # torch's GroupNorm default
    "class_embed_type": None,  # a class table (num_class_embeds), added to the time embedding
}


def _attention_head_dim(unet: UNet, widths: list[int], attended: list[bool]) -> int | None:
    """UNet2DModel's one head width giving genlab's head count at every attended width (middle included)."""
    c = unet.config
    if c.num_head_channels is not None:
        return c.num_head_channels  # ADM's fixed head width: diffusers' own convention
    used = sorted({w for w, a in zip(widths, attended) if a} | ({widths[-1]} if c.mid_attention else set()))
    if not used:
        return None  # no attention anywhere: the value is never used
    if len(used) > 1:
        raise ConfigError(f"model.unet.num_heads={c.num_heads} gives {c.num_heads} heads at the attended widths {used}; "
                          "UNet2DModel fixes the head width (attention_head_dim), so its head count varies with the "
                          "width: export a run trained with model.unet.num_head_channels set, or attention at one width")
    return used[0] // c.num_heads


def unet2d_config(unet: UNet) -> dict[str, Any]:
    """UNet2DModel's config.json for genlab's ``unet``; an option diffusers lacks is refused by name."""
    c = unet.config
    if unet.context_dim is not None:
        raise ConfigError(f"the U-Net cross-attends to a context (context_dim={unet.context_dim}, text "
                          "conditioning); UNet2DModel has no cross-attention: only unconditional and "
                          "class-conditional runs export")
    if c.coordinates:
        raise ConfigError("model.unet.coordinates=true: the U-Net reads two coordinate channels beside the image, "
                          "which UNet2DModel lacks; export a run trained without them")
    if c.channel_mult[0] != 1:
        raise ConfigError(f"model.unet.channel_mult={list(c.channel_mult)}: UNet2DModel's first level has the width of "
                          "conv_in (block_out_channels[0]); export a run whose channel_mult starts with 1")
    extra = [name for name, _ in unet.named_children()
             if name not in {"time_embed", "class_embed", "conv_in", "down", "middle", "up", "norm_out", "conv_out"}]
    if extra:
        raise ConfigError(f"the U-Net has the submodule(s) {', '.join(extra)}, which UNet2DModel lacks: export a run "
                          "built without that option")
    widths = [c.base_channels * m for m in c.channel_mult]
    resolutions = [unet.image_size // 2**i for i in range(len(widths))]
    attended = [r in c.attention_resolutions for r in resolutions]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        **UNET2D_FIXED,
        "sample_size": unet.image_size,
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "time_embedding_dim": None,  # 4 x block_out_channels[0], as genlab's
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attended],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attended)],
        "block_out_channels": widths,
        "layers_per_block": c.num_res_blocks,
        "dropout": c.dropout,
        "attention_head_dim": _attention_head_dim(unet, widths, attended),
        "norm_num_groups": c.norm_groups,
        # Without it diffusers drops the middle attention's GroupNorm when resnet_time_scale_shift="scale_shift".
        "attn_norm_num_groups": c.norm_groups,
        "resnet_time_scale_shift": "scale_shift" if c.use_scale_shift_norm else "default",
        "add_attention": c.mid_attention,
        "num_class_embeds": None if unet.num_classes is None else unet.num_classes + 1,
        "num_train_timesteps": None,
    }


def _refuse(where: str, key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: {key}={json.dumps(value)} cannot be imported: {why}")


def genlab_unet(config: dict[str, Any], where: str) -> tuple[UNetConfig, int, int, int, int | None]:
    """(UNetConfig, in_channels, out_channels, image_size, class rows) of a UNet2DModel config.json.

    Every key is checked: unknown keys, block types other than (Attn)Down/UpBlock2D and values genlab's
    U-Net cannot express are refused by name (``where`` names the file).
    """
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _refuse(where, "_class_name", config["_class_name"],
                      "genlab imports UNet2DModel (pixel U-Nets with optional class labels); text-conditioned "
                      "UNet2DConditionModel and other networks have no genlab counterpart yet")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in UNET2D_DEFAULTS)
    if unknown:
        raise _refuse(where, unknown[0], config[unknown[0]], "an option genlab does not know (newer diffusers?)")
    cfg = {**UNET2D_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, value in UNET2D_FIXED.items():
        ok = math.isclose(cfg[key], value, rel_tol=1e-9) if key == "norm_eps" else cfg[key] == value
        if not ok:
            raise _refuse(where, key, cfg[key], f"genlab's U-Net has only {key}={json.dumps(value)}")
    if cfg["act_fn"] not in ("silu", "swish"):
        raise _refuse(where, "act_fn", cfg["act_fn"], "genlab's U-Net uses SiLU")
    widths = [int(w) for w in cfg["block_out_channels"]]
    base = widths[0]
    if any(w % base for w in widths):
        raise _refuse(where, "block_out_channels", widths, "genlab's widths are base_channels x integer multipliers")
    if cfg["time_embedding_dim"] not in (None, 4 * base):
        raise _refuse(where, "time_embedding_dim", cfg["time_embedding_dim"],
                      f"genlab's time embedding is 4 x block_out_channels[0] = {4 * base}")
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse(where, "sample_size", size, "genlab's diffusion models are square")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise _refuse(where, "sample_size", size, "give the image size the model was trained on")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if len(down) != len(widths) or len(up) != len(widths):
        raise _refuse(where, "down_block_types", down, "one down and one up block per block_out_channels entry")
    for kind, allowed, types in (("down_block_types", ("DownBlock2D", "AttnDownBlock2D"), down),
                                 ("up_block_types", ("UpBlock2D", "AttnUpBlock2D"), up)):
        bad = [t for t in types if t not in allowed]
        if bad:
            raise _refuse(where, kind, types, f"{bad[0]} has no genlab counterpart (genlab has {' and '.join(allowed)})")
    attended = [t == "AttnDownBlock2D" for t in down]
    if attended != [t == "AttnUpBlock2D" for t in reversed(up)]:
        raise _refuse(where, "up_block_types", up, "genlab attends at the same resolutions in the encoder and the "
                      f"decoder, but down_block_types are {down}")
    shift = cfg["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        raise _refuse(where, "resnet_time_scale_shift", shift, "genlab has 'default' (add) and 'scale_shift' (ADM)")
    groups = cfg["norm_num_groups"]
    attn_groups = cfg["attn_norm_num_groups"]
    if cfg["add_attention"] and attn_groups not in (groups, None if shift == "default" else groups):
        raise _refuse(where, "attn_norm_num_groups", attn_groups,
                      f"genlab's middle attention has a GroupNorm of norm_num_groups={groups} groups")
    num_heads, head_channels = _genlab_heads(cfg, widths, attended, where)
    if cfg["class_embed_type"] is None and cfg["num_class_embeds"] is not None and cfg["num_class_embeds"] < 2:
        raise _refuse(where, "num_class_embeds", cfg["num_class_embeds"], "need at least 2 class rows")
    unet_config = UNetConfig(
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=int(cfg["layers_per_block"]),
        attention_resolutions=tuple(size // 2**i for i, a in enumerate(attended) if a),
        num_heads=num_heads,
        num_head_channels=head_channels,
        dropout=float(cfg["dropout"]),
        use_scale_shift_norm=shift == "scale_shift",
        norm_groups=int(groups),
        mid_attention=bool(cfg["add_attention"]),
    )
    return unet_config, int(cfg["in_channels"]), int(cfg["out_channels"]), size, cfg["num_class_embeds"]


def _genlab_heads(cfg: dict, widths: list[int], attended: list[bool], where: str) -> tuple[int, int | None]:
    """(num_heads, num_head_channels) of genlab's U-Net giving UNet2DModel's heads at every attention."""
    head_dim = cfg["attention_head_dim"]
    used = sorted({w for w, a in zip(widths, attended) if a} | ({widths[-1]} if cfg["add_attention"] else set()))
    if head_dim is None or not used:
        return 1, None  # diffusers: head width = the block's width, i.e. one head everywhere
    bad = [w for w in used if w % head_dim]
    if bad:
        raise _refuse(where, "attention_head_dim", head_dim, f"it does not divide the attended width(s) {bad}")
    if all(w % head_dim == 0 for w in widths):
        return 4, head_dim  # num_heads is unused when num_head_channels is set
    if len(used) == 1:
        return used[0] // head_dim, None
    raise _refuse(where, "attention_head_dim", head_dim, f"it does not divide every level's width {widths} "
                  "(genlab's num_head_channels must) and the attended widths differ")


# ---------------------------------------------------------------------------------------------
# Noise schedule and sampling settings: genlab's DDPMConfig <-> DDPMScheduler's config

PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}  # genlab -> diffusers
SCHEDULER_DEFAULTS: dict[str, Any] = {  # DDPMScheduler's constructor defaults
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
    "prediction_type": "epsilon", "thresholding": False, "timestep_spacing": "leading", "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}


def scheduler_config(config: Any) -> dict[str, Any]:
    """DDPMScheduler's scheduler_config.json for a DDPM config: the same betas, prediction, clipping and spacing.

    genlab's ancestral sampler uses the posterior variance beta~_t ("fixed_small"); a learned variance
    (improved DDPM) interpolates log beta_t and log beta~_t with the network's v ("learned_range").
    """
    T = config.num_timesteps
    out = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **SCHEDULER_DEFAULTS,
           "num_train_timesteps": T, "variance_type": "learned_range" if config.learn_sigma else "fixed_small",
           "clip_sample": bool(config.clip_denoised), "prediction_type": PREDICTION_TYPES[config.prediction],
           "timestep_spacing": config.spacing}
    if config.schedule == "linear":
        scale = 1000.0 / T  # genlab scales both ends by 1000 / T (improved DDPM's rule), as beta_schedule does
        out.update(beta_schedule="linear", beta_start=scale * 1e-4, beta_end=scale * 0.02)
    elif config.schedule == "cosine":
        out.update(beta_schedule="squaredcos_cap_v2")
    elif config.schedule == "scaled-linear":
        out.update(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    else:  # diffusers' "sigmoid" is another curve than genlab's: the betas themselves
        out.update(trained_betas=beta_schedule(config.schedule, T).tolist())
    return out


def _scheduler_betas(cfg: dict, where: str) -> torch.Tensor:
    """The betas (T,) float64 a diffusers scheduler config describes."""
    T = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
        if betas.shape != (T,):
            raise _refuse(where, "trained_betas", f"<{len(betas)} values>", f"num_train_timesteps is {T}")
        return betas
    kind, start, end = cfg["beta_schedule"], float(cfg["beta_start"]), float(cfg["beta_end"])
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        return beta_schedule("cosine", T)  # the same formula (Nichol & Dhariwal eq. 17, capped at 0.999)
    raise _refuse(where, "beta_schedule", kind, "genlab has linear, scaled_linear and squaredcos_cap_v2 "
                  "(diffusers' sigmoid is another curve than genlab's)")


def ddpm_settings(scheduler: dict[str, Any], learned_variance: bool, where: str) -> dict[str, Any]:
    """The DDPMConfig fields of a diffusers scheduler config (DDPM, DDIM or any with the same keys).

    The betas must be one of genlab's schedules (compared value by value); settings genlab's samplers
    do not have (dynamic thresholding, zero-terminal-SNR rescaling, an offset of leading timesteps)
    are refused by name. ``learned_variance``: the U-Net outputs twice the channels.
    """
    cfg = {**SCHEDULER_DEFAULTS, **scheduler}
    T = cfg["num_train_timesteps"]
    if not isinstance(T, int) or T < 2:
        raise _refuse(where, "num_train_timesteps", T, "use an integer >= 2")
    for key, value in (("thresholding", False), ("rescale_betas_zero_snr", False)):
        if cfg.get(key):
            raise _refuse(where, key, cfg[key], f"genlab's samplers have no {key.replace('_', ' ')}")
    prediction = {v: k for k, v in PREDICTION_TYPES.items()}.get(cfg["prediction_type"])
    if prediction is None:
        raise _refuse(where, "prediction_type", cfg["prediction_type"], "genlab predicts epsilon, sample or v_prediction")
    if cfg["clip_sample"] and float(cfg["clip_sample_range"]) != 1.0:
        raise _refuse(where, "clip_sample_range", cfg["clip_sample_range"], "genlab clips x0 to the data range [-1, 1]")
    spacing = cfg["timestep_spacing"]
    if spacing not in ("leading", "trailing", "linspace"):
        raise _refuse(where, "timestep_spacing", spacing, "genlab has leading, trailing and linspace")
    if spacing == "leading" and cfg["steps_offset"]:
        raise _refuse(where, "steps_offset", cfg["steps_offset"], "genlab's leading timesteps start at 0")
    variance = cfg.get("variance_type") or "fixed_small"
    wanted = ("learned_range",) if learned_variance else ("fixed_small", "fixed_small_log")
    if variance not in wanted:
        raise _refuse(where, "variance_type", variance,
                      "genlab samples with the posterior variance (fixed_small) or, when the U-Net outputs twice "
                      "the channels, improved DDPM's learned_range")
    betas = _scheduler_betas(cfg, where)
    for name in BETA_SCHEDULES:
        try:
            ours = beta_schedule(name, T)
        except ConfigError:
            continue
        if torch.allclose(betas, ours, rtol=1e-5, atol=1e-9):
            return {"schedule": name, "num_timesteps": T, "prediction": prediction,
                    "clip_denoised": bool(cfg["clip_sample"]), "spacing": spacing, "learn_sigma": learned_variance}
    raise _refuse(where, "beta_schedule", cfg["beta_schedule"], f"its betas (beta_start={cfg['beta_start']}, "
                  f"beta_end={cfg['beta_end']}, T={T}) match none of genlab's schedules {', '.join(BETA_SCHEDULES)}")


# ---------------------------------------------------------------------------------------------
# Export: a run folder -> a diffusers folder


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder unless ``overwrite`` (nothing already written is lost by accident)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another folder or pass --force to replace it")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out`` (replacing it): a crash leaves the old folder or the new one."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_diffusers(run_dir: str | os.PathLike, out: str | os.PathLike, weights: str = "ema",
                     checkpoint: int | str | None = None, overwrite: bool = False) -> Path:
    """Write a pixel DDPM run (U-Net network) as a diffusers folder ``out``; returns ``out``.

    Unconditional runs without a pixel patch become a ``DDPMPipeline`` (``model_index.json``);
    class-conditional or patched runs get ``unet/`` and ``scheduler/`` with the sampling loop in
    README.md. ``weights``: "ema" (default, what genlab samples with) or "raw".
    """
    from genlab.config import to_dict
    from genlab.report.card import write_model_card
    from genlab.runs import load_run

    out = Path(out).expanduser()
    _check_out(out, overwrite)
    run = load_run(run_dir, weights=weights, checkpoint=checkpoint, device="cpu")
    if run.config.method != "ddpm":
        raise ConfigError(f"{run_dir} is a '{run.config.method}' run; --format diffusers exports pixel 'ddpm' runs "
                          "(a DDPMPipeline has no autoencoder, prior or GAN)")
    model = run.config.model
    if model.network != "unet":
        raise ConfigError(f"{run_dir}: model.network={model.network}; --format diffusers exports U-Net runs "
                          "(UNet2DModel); a DiT has no UNet2DModel form")
    unet = run.method.unet
    unet_config = unet2d_config(unet)
    tensors = to_diffusers_state(unet)
    patch, classes = model.patch_size, unet.num_classes
    pipeline = patch == 1 and classes is None
    info = run.method.data_info
    marker = {
        "format": MARKER_FORMAT,
        "pipeline": "DDPMPipeline" if pipeline else None,
        "patch_size": patch,  # the U-Net runs on pixel_unshuffle(x, patch_size)
        "image_size": info.image_size,
        "channels": info.channels,
        "num_classes": classes,
        "null_class": classes,  # class_embedding row of the unconditional model (classifier-free guidance)
        "data_source": run.config.data.source,
        "sampling": {"sampler": model.sampler, "steps": model.sample_steps, "eta": model.eta,
                     "sigma_max": model.sigma_max},
        "model": to_dict(model),  # training-only settings (p_uncond, ...) and the head rule, for a faithful import
        "source_run": str(Path(run_dir).resolve()),
        "step": run.step,
        "weights": run.weights,
    }
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "unet").mkdir(parents=True)
        (tmp / "scheduler").mkdir()
        atomic_write_bytes(tmp / "unet" / WEIGHTS_FILE, safetensors.torch.save(tensors, metadata={"format": "pt"}))
        atomic_write_bytes(tmp / "unet" / "config.json", _json_bytes(unet_config))
        atomic_write_bytes(tmp / "scheduler" / "scheduler_config.json", _json_bytes(scheduler_config(model)))
        if pipeline:
            atomic_write_bytes(tmp / "model_index.json", _json_bytes({
                "_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))
        marker["unet_sha256"] = sha256_file(tmp / "unet" / WEIGHTS_FILE)
        atomic_write_bytes(tmp / MARKER_FILE, _json_bytes(marker))
        write_model_card(tmp, run.path, title=f"{Path(run.path).resolve().name}: genlab DDPM for diffusers",
                         summary=_export_summary(marker, unet_config), usage=usage_text(marker, unet_config),
                         step=run.step, weights=run.weights, provenance=_imported_from(run_dir, checkpoint))
        _publish(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(getattr(err, "os_error", err), out) from None
    return out


def _imported_from(run_dir: str | os.PathLike, checkpoint: int | str | None) -> dict[str, str]:
    """The card's provenance line of a run that `genlab import diffusers` made (else nothing)."""
    from genlab.train.checkpoint import STATE_FILE, find_checkpoint

    try:
        state = json.loads((find_checkpoint(run_dir, checkpoint) / STATE_FILE).read_text())
        source = state["imported_from"]
        return {"Imported into genlab from": f"{source['path']} (weights sha256 {source['weights_sha256']})"}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _export_summary(marker: dict, unet_config: dict) -> str:
    """The card's first paragraph: what the folder holds and what loads it."""
    shape = f"{marker['channels']}x{marker['image_size']}x{marker['image_size']}"
    what = "an unconditional" if marker["num_classes"] is None else f"a class-conditional ({marker['num_classes']} classes)"
    text = (f"A denoising diffusion model (DDPM, Ho et al. 2020) trained with genlab: {what} pixel-space model of "
            f"{shape} images, as a diffusers `UNet2DModel` (`unet/`) and `DDPMScheduler` (`scheduler/`) whose betas, "
            "prediction type, clipping and timestep spacing are genlab's.")
    if marker["pipeline"]:
        return text + " It loads as a `DDPMPipeline`."
    reasons = []
    if marker["num_classes"] is not None:
        reasons.append(f"the U-Net takes class labels (rows 0..{marker['num_classes'] - 1}; row {marker['null_class']} "
                       "is the null class of classifier-free guidance), which DDPMPipeline does not pass")
    if marker["patch_size"] > 1:
        p = marker["patch_size"]
        reasons.append(f"the U-Net runs on {p}x{p} pixel patches folded into channels (pixel_unshuffle: "
                       f"{unet_config['in_channels']}x{unet_config['sample_size']}x{unet_config['sample_size']}), "
                       "which DDPMPipeline does not do")
    return (text + " It is not a `DDPMPipeline` (there is no model_index.json) because " + "; and ".join(reasons)
            + ": sample with the loop below.")


def usage_text(marker: dict, unet_config: dict) -> str:
    """The card's usage section: DDPMPipeline, or the documented loop (pixel patch, class labels, guidance)."""
    c, size, p = marker["channels"], marker["image_size"], marker["patch_size"]
    if marker["pipeline"]:
        return ("```python\nimport torch\nfrom diffusers import DDPMPipeline\n\n"
                'pipe = DDPMPipeline.from_pretrained("PATH")\n'
                "images = pipe(batch_size=16, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images\n"
                "```\n\nAny diffusers scheduler built from this config samples too, e.g. DDIM: "
                "`DDIMScheduler.from_config(pipe.scheduler.config)` (pass `use_clipped_model_output=True` to its "
                "`step` to re-derive the noise from the clipped x0, as genlab does)." + sampling_notes(marker))
    conditional = marker["num_classes"] is not None
    lines = ["```python", "import torch", "import torch.nn.functional as F",
             "from diffusers import DDPMScheduler, UNet2DModel", "",
             'unet = UNet2DModel.from_pretrained("PATH", subfolder="unet").eval()',
             'scheduler = DDPMScheduler.from_pretrained("PATH", subfolder="scheduler")',
             f"p = {p}  # pixel patch: the U-Net sees pixel_unshuffle(x, p)"]
    if conditional:
        lines += [f"labels = torch.tensor([0, 1, 2, 3])  # classes 0..{marker['num_classes'] - 1}",
                  f"null = torch.full_like(labels, {marker['null_class']})  # the null class (unconditional model)",
                  "guidance_scale = 1.0  # genlab's w: eps = eps(null) + w (eps(label) - eps(null)); 1 = no guidance",
                  "n = len(labels)"]
    else:
        lines += ["n = 4"]
    lines += ["generator = torch.Generator().manual_seed(0)",
              f"x = torch.randn(n, {c}, {size}, {size}, generator=generator)",
              "scheduler.set_timesteps(50)",
              "",
              "def denoise(x, t, y):",
              "    out = unet(F.pixel_unshuffle(x, p), t, class_labels=y).sample",
              "    return F.pixel_shuffle(out, p)  # (n, C, H, W), or 2C with a learned variance",
              "",
              "with torch.no_grad():",
              "    for t in scheduler.timesteps:"]
    if conditional:
        lines += ["        out = denoise(x, t, labels)",
                  "        if guidance_scale != 1.0:",
                  "            out_null = denoise(x, t, null)",
                  "            out = out_null + guidance_scale * (out - out_null)",
                  "        x = scheduler.step(out, t, x, generator=generator).prev_sample"]
    else:
        lines += ["        x = scheduler.step(denoise(x, t, None), t, x, generator=generator).prev_sample"]
    lines += ["images = (x / 2 + 0.5).clamp(0, 1)  # (n, C, H, W) in [0, 1]", "```"]
    note = "\n\nWith p = 1 the two pixel_(un)shuffle calls are the identity." if p == 1 else ""
    return "\n".join(lines) + note + sampling_notes(marker)


def sampling_notes(marker: dict) -> str:
    """What the card says about samplers: genlab's default, and where diffusers' schedulers differ from genlab's."""
    s = marker.get("sampling") or {}
    model = marker.get("model") or {}
    notes = [f"genlab samples this run with `{s.get('sampler')}` in {s.get('steps')} steps by default; "
             "DDPMScheduler with `set_timesteps(K)` is `genlab sample --sampler ddpm --steps K` (the same images "
             "for the same noise, up to float rounding)."]
    if model.get("learn_sigma") and model.get("spacing") == "trailing":
        notes.append("The variance is learned (`variance_type=learned_range`) and the spacing is trailing, so the "
                     "last timestep is above 0: there diffusers' DDPMScheduler still adds noise, genlab returns the "
                     "predicted x0 (as improved DDPM's code does); use `timestep_spacing=\"leading\"` for identical "
                     "images.")
    return "\n\n" + " ".join(notes)


# ---------------------------------------------------------------------------------------------
# Import: a diffusers folder -> a run folder


def diffusers_folder(path: str | os.PathLike) -> tuple[Path, Path]:
    """(unet folder, scheduler config file) of a save_pretrained pipeline folder, a UNet folder beside a
    scheduler folder, a Hub cache snapshot (``.../snapshots/<hash>``) or a Hub cache model folder
    (``models--org--name``: the snapshot refs/main points to)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder; give a diffusers folder (from save_pretrained) or a Hub cache folder")
    if (root / "snapshots").is_dir():  # a Hub cache model folder
        ref = root / "refs" / "main"
        snapshots = sorted(p for p in (root / "snapshots").iterdir() if p.is_dir())
        if ref.is_file() and (root / "snapshots" / ref.read_text().strip()).is_dir():
            root = root / "snapshots" / ref.read_text().strip()
        elif len(snapshots) == 1:
            root = snapshots[0]
        else:
            raise ConfigError(f"{root} holds {len(snapshots)} snapshots and no refs/main; give one "
                              f"{root / 'snapshots' / '<hash>'} folder")
    if (root / "unet" / "config.json").is_file():
        unet_dir, scheduler = root / "unet", root / "scheduler" / "scheduler_config.json"
    elif (root / "config.json").is_file():
        unet_dir, scheduler = root, root.parent / "scheduler" / "scheduler_config.json"
    else:
        raise ConfigError(f"{root}: no unet/config.json (nor config.json); give the folder DDPMPipeline.save_pretrained "
                          "or UNet2DModel.save_pretrained wrote")
    if not scheduler.is_file():
        raise ConfigError(f"{root}: no {scheduler.relative_to(scheduler.parent.parent)} beside the U-Net; genlab needs "
                          "the noise schedule (save the scheduler with save_pretrained next to unet/)")
    return unet_dir, scheduler


def _weights_file(unet_dir: Path) -> Path:
    """The U-Net's safetensors file; a pickled .bin is refused (unpickling can run arbitrary code)."""
    plain = unet_dir / WEIGHTS_FILE
    if plain.is_file():
        return plain
    variants = sorted(unet_dir.glob("diffusion_pytorch_model.*.safetensors"))
    if len(variants) == 1:
        return variants[0]  # e.g. the fp16 variant; cast to float32 on import
    pickled = sorted(unet_dir.glob("diffusion_pytorch_model*.bin"))
    if pickled:
        raise ConfigError(f"{pickled[0]} is a pickled PyTorch file, and unpickling can run arbitrary code, so genlab "
                          "reads safetensors only: convert it once where you trust it (UNet2DModel.from_pretrained(...)"
                          ".save_pretrained(OUT) writes diffusion_pytorch_model.safetensors)")
    if (unet_dir / f"{WEIGHTS_FILE}.index.json").is_file():
        raise ConfigError(f"{unet_dir}: the weights are sharded (index.json); re-save them in one file "
                          "(save_pretrained(..., max_shard_size='100GB'))")
    raise ConfigError(f"{unet_dir}: no {WEIGHTS_FILE}" + (f" (several variants: {[p.name for p in variants]})"
                                                         if variants else ""))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not readable JSON ({str(e).splitlines()[0]}); is the folder complete?") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object of settings")
    return data


def import_diffusers(path: str | os.PathLike, run_dir: str | os.PathLike, data: str | None = None) -> Path:
    """Make a genlab DDPM run folder ``run_dir`` from a diffusers UNet2DModel + scheduler folder; returns it.

    The run samples with every genlab sampler and guidance and is scored by ``genlab eval`` like a
    trained one (its checkpoint is step 0 with no EMA: the weights are used as they are). ``data``
    names the data source the model was trained on (recorded; default: what a genlab export says,
    else "unknown"). Provenance (the folder, the weights' sha256, both configs) is in state.json.
    """
    from genlab.config import RunConfig, TrainConfig
    from genlab.data import DataConfig
    from genlab.methods import DataInfo
    from genlab.methods.ddpm import DDPM, DDPMConfig
    from genlab.train.checkpoint import latest_checkpoint

    run_dir = Path(run_dir).expanduser()
    if latest_checkpoint(run_dir) is not None or (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} already holds a run; choose another --run-dir")
    unet_dir, scheduler_file = diffusers_folder(path)
    root = unet_dir.parent if unet_dir.name == "unet" else unet_dir
    marker = _read_json(root / MARKER_FILE) if (root / MARKER_FILE).is_file() else {}
    unet_json = _read_json(unet_dir / "config.json")
    scheduler_json = _read_json(scheduler_file)
    unet_config, in_channels, out_channels, size, class_rows = genlab_unet(unet_json, str(unet_dir / "config.json"))
    patch = int(marker.get("patch_size", 1))
    if in_channels % (patch * patch) or out_channels not in (in_channels, 2 * in_channels):
        raise _refuse(str(unet_dir / "config.json"), "out_channels", out_channels,
                      f"genlab's DDPM predicts in_channels={in_channels} values (or twice, with a learned variance)")
    settings = ddpm_settings(scheduler_json, out_channels == 2 * in_channels, str(scheduler_file))
    # Class rows: a genlab export's last row is its null class; any other model's K classes get a zero
    # null row appended (no training saw it: its conditional samples are exact, guidance is not meaningful).
    if class_rows is None:
        num_classes, null_row = None, None
    elif marker.get("null_class") is not None and marker["null_class"] == class_rows - 1:
        num_classes, null_row = class_rows - 1, "exported by genlab (trained with label dropout)"
    else:
        num_classes, null_row = class_rows, "added as zeros (the model has no null class: use guidance_scale 1)"
    sampling = marker.get("sampling") or {}
    model = DDPMConfig(network="unet", unet=unet_config, patch_size=patch, class_conditional=num_classes is not None,
                       **settings, **{k: v for k, v in (("sampler", sampling.get("sampler")),
                                                        ("sample_steps", sampling.get("steps")),
                                                        ("eta", sampling.get("eta")),
                                                        ("sigma_max", sampling.get("sigma_max"))) if v is not None})
    model = _saved_model_config(marker, model, in_channels, out_channels, size, class_rows)
    channels = in_channels // (patch * patch)
    source = data or marker.get("data_source") or "unknown"
    info = DataInfo(channels=channels, image_size=size * patch, num_classes=num_classes, source=source)
    cfg = RunConfig(method="ddpm", data=DataConfig(source=source, image_size=size * patch, channels=channels),
                    train=TrainConfig(steps=1, ema_decay=None), model=model)
    method = DDPM(model, info)
    weights_file = _weights_file(unet_dir)
    try:
        tensors = safetensors.torch.load_file(str(weights_file), device="cpu")
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ConfigError(f"{weights_file} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    if num_classes is not None and null_row is not None and num_classes == class_rows:
        table = tensors.get("class_embedding.weight")
        if table is not None:
            tensors["class_embedding.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])
    state = from_diffusers_state(tensors, method.unet, str(weights_file))
    method.unet.load_state_dict(state)
    provenance = {
        "format": "diffusers",
        "path": str(Path(path).expanduser().resolve()),
        "unet_folder": str(unet_dir.resolve()),
        "weights_file": weights_file.name,
        "weights_sha256": sha256_file(weights_file),
        "unet_config": unet_json,
        "scheduler_config": scheduler_json,
        "null_class": null_row,
        "genlab_export": marker or None,
        "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    save_run(run_dir, cfg, method, {"imported_from": provenance})
    return run_dir


def _saved_model_config(marker: dict, derived: Any, in_channels: int, out_channels: int, size: int,
                        class_rows: int | None) -> Any:
    """A genlab export's own model config when it describes the same network and schedule as ``derived``
    (training-only settings such as p_uncond or min_snr_gamma then survive the round trip), else ``derived``."""
    from genlab.config import from_dict
    from genlab.methods.ddpm import DDPMConfig

    try:
        saved = from_dict(DDPMConfig, marker["model"], "model")
    except (KeyError, TypeError, ConfigError):
        return derived
    if saved.network != "unet" or saved.patch_size != derived.patch_size or \
            saved.class_conditional != derived.class_conditional or scheduler_config(saved) != scheduler_config(derived):
        return derived
    rows = None if class_rows is None else class_rows - 1
    with torch.device("meta"):  # configs only: no memory for weights
        same = (unet2d_config(UNet(saved.unet, in_channels, out_channels, size, rows))
                == unet2d_config(UNet(derived.unet, in_channels, out_channels, size, rows)))
    return saved if same else derived


def save_run(run_dir: Path, cfg: Any, method: Any, state: dict[str, Any] | None = None) -> Path:
    """Write ``method`` (built from ``cfg``, weights as they are) as a run folder: config.yaml and a
    step-0 checkpoint that :func:`genlab.runs.load_run` reads (no EMA, no optimiser: nothing to resume)."""
    import dataclasses

    from genlab.config import save_config, to_dict
    from genlab.train.checkpoint import save_checkpoint

    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        save_checkpoint(run_dir, 0, {"model": {k: v.detach() for k, v in method.state_dict().items()}},
                        {"method": cfg.method, "data_info": dataclasses.asdict(method.data_info), "skeletons": {},
                         "parents": {}, "config": to_dict(cfg), **(state or {})})
    except OSError as err:
        raise write_error(getattr(err, "os_error", err), run_dir) from None
    return run_dir
