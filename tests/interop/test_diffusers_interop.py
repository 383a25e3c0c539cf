"""diffusers interop: export -> diffusers and diffusers -> import give the same images as genlab (<= 1e-4).

Reference implementation: diffusers itself (UNet2DModel, DDPMPipeline, DDPMScheduler, DDIMScheduler),
with small random models. Randomness is aligned by giving image i of both the same torch.Generator
(genlab's ImageNoise holds one generator per image; DDPMPipeline takes a list of generators).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from genlab.config import RunConfig, TrainConfig
from genlab.data import DataConfig
from genlab.diffusion import classifier_free_guidance, sample as run_sampler
from genlab.errors import ConfigError
from genlab.interop.diffusers import (export_diffusers, genlab_unet, import_diffusers, module_pairs, save_run,
                                      unet2d_config)
from genlab.methods import DataInfo
from genlab.methods.ddpm import DDPM, DDPMConfig
from genlab.models.unet import UNet, UNetConfig
from genlab.noise import ImageNoise
from genlab.runs import load_run

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # the parity bound on images in [0, 1]


def _randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Perturb every weight: zero-initialised output layers would hide a wrong mapping of their inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def _genlab_run(path: Path, unet: UNetConfig, data_info: DataInfo, **model) -> Path:
    """A run folder holding a randomly initialised DDPM (step 0): what export reads."""
    torch.manual_seed(0)
    config = DDPMConfig(unet=unet, **{"num_timesteps": 100, "sample_steps": 8, **model})
    method = DDPM(config, data_info)
    _randomise(method)
    cfg = RunConfig(method="ddpm", data=DataConfig(source=data_info.source or "digits"),
                    train=TrainConfig(ema_decay=None), model=method.config)
    return save_run(path, cfg, method)


def _to_unit(images: torch.Tensor) -> np.ndarray:
    """genlab's images in [-1, 1] (N, C, H, W) as DDPMPipeline's numpy output in [0, 1] (N, H, W, C)."""
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


TINY = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8, dropout=0.0)
DIGITS = DataInfo(channels=1, image_size=8, source="digits")

# (U-Net options, DDPM options): every schedule, prediction, spacing, both embeddings, both head rules, learned variance.
EXPORT_CASES = {
    "linear-eps-trailing": (dict(attention_resolutions=(4,), num_heads=2, use_scale_shift_norm=True),
                            dict(schedule="linear", prediction="eps", spacing="trailing")),
    "cosine-v-leading-add": (dict(attention_resolutions=(8, 4), num_head_channels=8, use_scale_shift_norm=False),
                             dict(schedule="cosine", prediction="v", spacing="leading")),
    "sigmoid-x0-linspace-noclip": (dict(attention_resolutions=(), mid_attention=False),
                                   dict(schedule="sigmoid", prediction="x0", spacing="linspace", clip_denoised=False)),
    # Leading spacing: its last timestep is 0. From a last timestep t > 0 (trailing) diffusers' learned_range
    # still adds noise of variance ~beta_t^frac * 1e-20^(1 - frac) at the final step, where genlab (as
    # improved DDPM's code) returns x0_hat: the card says so.
    "scaled-linear-learned-variance": (dict(attention_resolutions=(4,), num_heads=1),
                                       dict(schedule="scaled-linear", learn_sigma=True, spacing="leading")),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_exported_pipeline_samples_what_genlab_samples(tmp_path, case):
    unet_options, ddpm_options = EXPORT_CASES[case]
    run = _genlab_run(tmp_path / "run", UNetConfig(**TINY, **unet_options), DIGITS, patch_size=1, **ddpm_options)
    out = export_diffusers(run, tmp_path / "export")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"

    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=_generators(2), num_inference_steps=8, output_type="np").images
    method = load_run(run, device="cpu").method
    ours = method.sample(2, generator=ImageNoise(_generators(2)), sampler="ddpm", steps=8)
    assert np.abs(theirs - _to_unit(ours)).max() <= TOL
    assert theirs.std() > 0.05  # the comparison is between real images, not two constants


def test_exported_scheduler_drives_ddim_like_genlab(tmp_path):
    """DDIMScheduler built from the exported config (eta = 0, clipped eps as genlab) = genlab's DDIM."""
    unet_options, ddpm_options = EXPORT_CASES["linear-eps-trailing"]
    run = _genlab_run(tmp_path / "run", UNetConfig(**TINY, **unet_options), DIGITS, patch_size=1, **ddpm_options)
    out = export_diffusers(run, tmp_path / "export")
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    theirs = x.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = pipe.unet(theirs, t).sample
            theirs = scheduler.step(eps, t, theirs, eta=0.0, use_clipped_model_output=True).prev_sample
        ours = load_run(run, device="cpu").method.sample(3, noise=x, sampler="ddim", steps=10)
    assert (theirs.clamp(-1, 1) - ours).abs().max() <= 2 * TOL


def _card_loop(out: Path, guidance_scale: float) -> dict:
    """Run the Python block of the exported README (the documented loop) and return its variables."""
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    code = code.replace('"PATH"', repr(str(out))).replace("guidance_scale = 1.0", f"guidance_scale = {guidance_scale}")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the card's own snippet, as a user runs it
    return scope


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_card_loop_of_class_conditional_patched_run_samples_like_genlab(tmp_path, guidance_scale):
    """No DDPMPipeline (labels, pixel patch): the README's loop, run as written, reproduces genlab's CFG sampler."""
    data_info = DataInfo(channels=1, image_size=8, num_classes=10, source="digits")
    unet = UNetConfig(**TINY, attention_resolutions=(2,), num_heads=2)
    run = _genlab_run(tmp_path / "run", unet, data_info, patch_size=2, class_conditional=True, spacing="trailing")
    out = export_diffusers(run, tmp_path / "export")
    assert not (out / "model_index.json").exists()  # DDPMPipeline would return the U-Net's 4x4x4 noise as images
    assert json.loads((out / "unet" / "config.json").read_text())["num_class_embeds"] == 11  # + the null row

    scope = _card_loop(out, guidance_scale)
    theirs = scope["images"]
    method = load_run(run, device="cpu").method
    labels = scope["labels"]
    generator = torch.Generator().manual_seed(0)  # the card's seed, one generator for the batch as in the card
    x = torch.randn(len(labels), 1, 8, 8, generator=generator)
    denoise = classifier_free_guidance(method._denoise, labels, guidance_scale, null_label=10)
    with torch.no_grad():
        ours = run_sampler("ddpm", denoise, x, method.schedule, 50, spacing="trailing", generator=generator,
                           clip_denoised=True)
    assert (theirs - (ours.clamp(-1, 1) / 2 + 0.5)).abs().max() <= TOL


def _diffusers_folder(path: Path, seed: int = 0, **unet_options) -> Path:
    """A random UNet2DModel + DDPMScheduler saved by diffusers itself (DDPMPipeline.save_pretrained)."""
    torch.manual_seed(seed)
    options = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   norm_num_groups=8, attention_head_dim=8)
    options.update(unet_options)
    unet = diffusers.UNet2DModel(**options)
    _randomise(unet, seed)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, beta_start=0.001, beta_end=0.2,
                                        timestep_spacing="trailing")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path))
    return path


IMPORT_CASES = {
    "head-dim-8-default": dict(),
    "one-head-scale-shift": dict(attention_head_dim=None, resnet_time_scale_shift="scale_shift",
                                 attn_norm_num_groups=8),
    "no-attention": dict(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                         add_attention=False),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_imported_diffusers_model_samples_what_diffusers_samples(tmp_path, case):
    folder = _diffusers_folder(tmp_path / "pipe", **IMPORT_CASES[case])
    run = load_run(import_diffusers(folder, tmp_path / "run"), device="cpu")
    assert run.config.model.schedule == "linear" and run.config.model.num_timesteps == 100

    pipe = diffusers.DDPMPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=_generators(2), num_inference_steps=8, output_type="np").images
    ours = run.method.sample(2, generator=ImageNoise(_generators(2)), sampler="ddpm", steps=8)
    assert np.abs(theirs - _to_unit(ours)).max() <= TOL
    # The Karras solvers (euler, heun, dpmpp-2m) evaluate the network at fractional timesteps.
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.25, 71.5])
    with torch.no_grad():
        assert (run.method.unet(x, t) - pipe.unet(x, t).sample).abs().max() <= TOL


def test_imported_class_conditional_model_gets_a_null_row_and_keeps_its_classes(tmp_path):
    folder = _diffusers_folder(tmp_path / "pipe", num_class_embeds=3)
    run = load_run(import_diffusers(folder, tmp_path / "run"), device="cpu")
    unet = diffusers.UNet2DModel.from_pretrained(str(folder), subfolder="unet")
    assert run.method.num_classes == 3  # all three of the model's classes, plus genlab's (zero) null row
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 99]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert (run.method.unet(x, t, y) - unet(x, t, class_labels=y).sample).abs().max() <= TOL
    assert torch.equal(run.method.unet.class_embed.weight[3], torch.zeros(64))


def test_round_trip_samples_identically_with_every_sampler_and_guidance(tmp_path):
    """genlab -> diffusers -> genlab: same config, same weights, so every sampler and guidance gives the same images."""
    data_info = DataInfo(channels=1, image_size=8, num_classes=10, source="digits")
    unet = UNetConfig(**TINY, attention_resolutions=(2,), num_heads=2)
    original = _genlab_run(tmp_path / "run", unet, data_info, patch_size=2, class_conditional=True,
                           schedule="cosine", prediction="v", sampler="dpmpp-2m", sample_steps=4)
    back = import_diffusers(export_diffusers(original, tmp_path / "export"), tmp_path / "back")
    a, b = load_run(original, device="cpu"), load_run(back, device="cpu")
    assert b.config.model == a.config.model and b.method.data_info == a.method.data_info
    for sampler in ("ddpm", "ddim", "euler", "heun", "dpmpp-2m"):
        options = dict(sampler=sampler, steps=3, labels=torch.tensor([1, 7]), guidance_scale=2.0)
        assert torch.equal(a.sample(2, seed=1, **options), b.sample(2, seed=1, **options)), sampler


def test_hub_cache_folder_is_read_through_refs_main(tmp_path):
    """``models--org--name``: refs/main names the snapshot; the files there are symlinks into blobs/."""
    saved = _diffusers_folder(tmp_path / "saved")
    cache = tmp_path / "hub" / "models--someone--tiny-ddpm"
    snapshot = cache / "snapshots" / "abc123"
    for file in saved.rglob("*"):
        if file.is_file():
            blob = cache / "blobs" / file.name.replace(".", "_")
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, blob)
            link = snapshot / file.relative_to(saved)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(blob)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123")
    run = load_run(import_diffusers(cache, tmp_path / "run"), device="cpu")
    unet = diffusers.UNet2DModel.from_pretrained(str(saved), subfolder="unet")
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([40])
    with torch.no_grad():
        assert (run.method.unet(x, t) - unet(x, t).sample).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------
# Refusals: by name, one line, nothing written


@pytest.mark.parametrize("key, value", [("freq_shift", 1), ("flip_sin_to_cos", False), ("downsample_padding", 0),
                                        ("norm_eps", 1e-6), ("center_input_sample", True),
                                        ("resnet_time_scale_shift", "ada_group")])
def test_import_refuses_options_genlab_lacks_by_name(tmp_path, key, value):
    config = unet2d_config(UNet(UNetConfig(**TINY, attention_resolutions=(4,)), 1, 1, 8))
    config[key] = value
    with pytest.raises(ConfigError, match=rf"{key}=.*cannot be imported"):
        genlab_unet(config, "unet/config.json")


def test_import_refuses_foreign_blocks_and_networks(tmp_path):
    config = unet2d_config(UNet(UNetConfig(**TINY, attention_resolutions=(4,)), 1, 1, 8))
    with pytest.raises(ConfigError, match="ResnetDownsampleBlock2D has no genlab counterpart"):
        genlab_unet({**config, "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"]}, "config.json")
    with pytest.raises(ConfigError, match="UNet2DConditionModel"):
        genlab_unet({**config, "_class_name": "UNet2DConditionModel"}, "config.json")
    with pytest.raises(ConfigError, match="an option genlab does not know"):
        genlab_unet({**config, "cross_attention_dim": 64}, "config.json")


def test_import_refuses_missing_and_unmapped_weights_by_name(tmp_path):
    folder = _diffusers_folder(tmp_path / "pipe")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    missing = {k: v for k, v in tensors.items() if k != "down_blocks.1.attentions.0.to_k.weight"}
    safetensors.torch.save_file(missing, str(weights))
    with pytest.raises(ConfigError, match=r"lacks weights .*down_blocks\.1\.attentions\.0\.to_k\.weight"):
        import_diffusers(folder, tmp_path / "run1")
    safetensors.torch.save_file({**tensors, "down_blocks.0.extra.weight": torch.zeros(2)}, str(weights))
    with pytest.raises(ConfigError, match=r"cannot place: down_blocks\.0\.extra\.weight"):
        import_diffusers(folder, tmp_path / "run2")
    assert not (tmp_path / "run1").exists() and not (tmp_path / "run2").exists()


def test_import_refuses_pickled_weights_without_reading_them(tmp_path):
    folder = _diffusers_folder(tmp_path / "pipe")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ConfigError, match=r"diffusion_pytorch_model\.bin is a pickled PyTorch file.*safetensors only"):
        import_diffusers(folder, tmp_path / "run")


def test_import_refuses_schedules_genlab_lacks(tmp_path):
    folder = _diffusers_folder(tmp_path / "pipe")
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    for key, value, message in (("beta_end", 0.1, "match none of genlab's schedules"),
                                ("thresholding", True, "thresholding=true cannot be imported"),
                                ("variance_type", "fixed_large", "variance_type=\"fixed_large\"")):
        path.write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConfigError, match=message):
            import_diffusers(folder, tmp_path / "run")


def test_export_refuses_what_unet2dmodel_cannot_express(tmp_path):
    with pytest.raises(ConfigError, match="context_dim=8"):
        unet2d_config(UNet(UNetConfig(**TINY, attention_resolutions=(4,)), 1, 1, 8, context_dim=8))
    with pytest.raises(ConfigError, match=r"channel_mult=\[2, 2\]"):
        unet2d_config(UNet(UNetConfig(**{**TINY, "channel_mult": (2, 2)}, attention_resolutions=(4,)), 1, 1, 8))
    with pytest.raises(ConfigError, match=r"num_heads=2 gives 2 heads at the attended widths \[16, 32\]"):
        unet2d_config(UNet(UNetConfig(**TINY, attention_resolutions=(8,), num_heads=2), 1, 1, 8))


def test_name_table_covers_every_weight_of_genlab_unets():
    """Every weight of a U-Net with attention, resamplers, class table and skip projections has a diffusers name,
    and no two weights share one (the table is a bijection onto UNet2DModel's state dict)."""
    unet = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(8, 4),
                           norm_groups=4, num_head_channels=4), 1, 1, 16, num_classes=3)
    from genlab.interop.diffusers import to_diffusers_state

    state = to_diffusers_state(unet)
    reference = diffusers.UNet2DModel(**{k: v for k, v in unet2d_config(unet).items() if not k.startswith("_")})
    assert set(state) == set(reference.state_dict())
    assert all(state[k].shape == v.shape for k, v in reference.state_dict().items())
    assert len(module_pairs(unet.config)) > 0


def test_export_refuses_a_unet_with_coordinate_channels():
    from genlab.interop.diffusers import unet2d_config
    from genlab.models.unet import UNet, UNetConfig

    unet = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                           norm_groups=4, coordinates=True), in_channels=1, out_channels=1, image_size=8)
    with pytest.raises(ConfigError, match="model.unet.coordinates=true: .*UNet2DModel lacks"):
        unet2d_config(unet)
