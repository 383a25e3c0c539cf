"""Configs small enough for tests: a few dozen training steps in seconds."""

# The noise schedule and training loop shared by every tiny diffusion model (DDPM, DiT, LDM).
TINY_DIFFUSION_TRAINING = [
    "model.num_timesteps=100",
    "model.sample_steps=5",
    "train.batch_size=32",
    "train.lr=2e-3",
    "train.lr_schedule=constant",
    "train.warmup_steps=5",
    "train.log_every=5",
    "train.sample_n=4",
    "train.threads=1",
]

# A DDPM small enough to train for a few dozen steps in seconds on 8x8 `digits`.
TINY_DDPM = [
    "model.unet.base_channels=16",
    "model.unet.channel_mult=[1,2]",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_resolutions=[4]",
    "model.unet.norm_groups=8",
    "model.unet.dropout=0.0",
] + TINY_DIFFUSION_TRAINING

# Networks small enough to train a few dozen steps in seconds on 8x8 `digits` (f = 2: 4x4 latents).
TINY_AE = [
    "model.net.base_channels=8",
    "model.net.channel_mult=[1,2]",
    "model.net.num_res_blocks=0",
    "model.net.norm_groups=4",
    "train.batch_size=16",
    "train.lr=3e-3",
    "train.lr_schedule=constant",
    "train.warmup_steps=0",
    "train.ema_decay=null",
    "train.log_every=5",
    "train.sample_n=4",
    "train.threads=1",
]

# Tiny VQ networks for 8x8 digits: f = 2 (4x4 code maps), 16 codes of dimension 4.
TINY_VQ = [
    "model.net.base_channels=8",
    "model.net.channel_mult=[1,2]",
    "model.net.num_res_blocks=0",
    "model.net.norm_groups=4",
    "model.quantizer.codebook_size=16",
    "model.quantizer.dim=4",
    "train.batch_size=32",
    "train.lr=2e-3",
    "train.lr_schedule=constant",
    "train.warmup_steps=0",
    "train.ema_decay=null",
    "train.log_every=5",
    "train.threads=1",
]

# A GAN small enough to train for a few dozen steps in seconds on 8x8 `digits`.
TINY_DCGAN = [
    "model.latent_dim=16",
    "model.g_channels=16",
    "model.d_channels=16",
    "model.health.every=0",
    "train.batch_size=32",
    "train.warmup_steps=0",
    "train.log_every=5",
    "train.sample_n=4",
    "train.threads=1",
]

# A kl-ae for 8x8 digits: 4x4x4 latents (f = 2).
TINY_KL_AE = [
    "model.net.base_channels=8",
    "model.net.channel_mult=[1,2]",
    "model.net.num_res_blocks=0",
    "model.net.norm_groups=4",
    "model.latent_channels=4",
    "train.batch_size=32",
    "train.lr=3e-3",
    "train.lr_schedule=constant",
    "train.warmup_steps=0",
    "train.ema_decay=null",
    "train.sample_n=4",
    "train.threads=1",
]

# An ldm on TINY_KL_AE's latents: a U-Net, or (TINY_LDM_DIT) a one-block DiT.
TINY_LDM = [
    "model.unet.base_channels=16",
    "model.unet.channel_mult=[1,2]",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_resolutions=[2]",
    "model.unet.norm_groups=8",
    "model.unet.dropout=0.0",
] + TINY_DIFFUSION_TRAINING
TINY_LDM_DIT = ["model.network=dit", "model.dit.hidden_size=32", "model.dit.depth=1", "model.dit.num_heads=2",
                "model.dit.patch_size=1"] + TINY_DIFFUSION_TRAINING

# A gan-encoder for 8x8 digits (no perceptual term: no feature network to load).
TINY_ENCODER = ["model.net.base_channels=8", "model.net.channel_mult=[1,2]", "model.net.num_res_blocks=0",
                "model.net.norm_groups=4", "model.perceptual_weight=0", "train.batch_size=32", "train.lr=3e-3",
                "train.warmup_steps=0", "train.ema_decay=null", "train.threads=1", "train.log_every=5"]
