"""Registry of methods (model families) by the name used on the command line."""

from __future__ import annotations

import importlib

from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, Method, OptimizerSpec

# name -> "module:Class"; imported lazily so `genlab --help` stays fast.
METHODS = {
    "ddpm": "genlab.methods.ddpm:DDPM",
    "classifier": "genlab.methods.classifier:ClassifierMethod",
    "noisy-classifier": "genlab.methods.noisy_classifier:NoisyClassifier",
    "ae": "genlab.methods.autoencoder:Autoencoder",
    "dae": "genlab.methods.autoencoder:DenoisingAutoencoder",
    "vae": "genlab.methods.autoencoder:VAE",
    "kl-ae": "genlab.methods.autoencoder:KLAutoencoder",
    "vqvae": "genlab.methods.vq:VQVAE",
    "vqgan": "genlab.methods.vq:VQGAN",
    "vq-ae": "genlab.methods.vq:VQAutoencoder",
    "pixelcnn": "genlab.methods.prior:PixelCNNPrior",
    "gpt": "genlab.methods.prior:GPTPrior",
    "gan": "genlab.methods.gan:GAN",
    "stylegan": "genlab.methods.stylegan:StyleGAN",
    "pix2pix": "genlab.methods.pix2pix:Pix2Pix",
    "gan-encoder": "genlab.methods.gan_encoder:GANEncoder",
    "dit": "genlab.methods.dit:DiT",
    "ldm": "genlab.methods.ldm:LDM",
    "clip": "genlab.methods.clip:CLIPMethod",
    "lora": "genlab.methods.lora:LoRA",
    "controlnet": "genlab.methods.control:ControlNetMethod",
    "t2i-adapter": "genlab.methods.control:T2IAdapterMethod",
    "sr": "genlab.methods.cascade:SuperResolution",
    "refiner": "genlab.methods.refiner:Refiner",
    "textual-inversion": "genlab.methods.textual_inversion:TextualInversion",
    "dreambooth": "genlab.methods.dreambooth:DreamBooth",
}


def get_method(name: str) -> type[Method]:
    """The Method class registered as ``name``."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; valid methods: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:  # registered ahead of its implementation
        raise ConfigError(f"method '{name}' is not available in this version of genlab ({e})") from e


__all__ = ["METHODS", "DataInfo", "Method", "OptimizerSpec", "get_method"]
