"""Run folders: a trained (or training) run loaded from disk, and the layout it is read from.

A run is a folder (ARCHITECTURE: "A run is a folder"): ``config.yaml`` (the resolved config),
``checkpoints/step_XXXXXX/`` (safetensors + ``state.json``), ``log.jsonl``, ``samples/`` and
``metrics.json``. :func:`load_run` rebuilds the method from the saved config and a checkpoint;
:class:`Run` samples, reconstructs and interpolates with it. The CLI, the evaluation and the
public API (:mod:`genlab.api`) read runs through this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genlab.config import RunConfig, build_config, read_config_file
from genlab.data import load_data
from genlab.errors import ConfigError, GenlabError
from genlab.methods import DataInfo, Method, get_method
from genlab.train.checkpoint import find_checkpoint, load_checkpoint


def data_info_for(cfg: RunConfig, images) -> DataInfo:
    """Shape facts of the (fitted) training data."""
    size = images.image_size
    if not isinstance(size, int):
        raise ConfigError(f"images are {size[0]}x{size[1]}; set data.image_size=N to train on square images")
    num_classes = images.num_classes if images.labels is not None else None
    conditions = getattr(images, "conditions", None)
    return DataInfo(channels=images.channels, image_size=size, num_classes=num_classes or None, source=cfg.data.source,
                    condition_channels=None if conditions is None else int(conditions.shape[1]))


@dataclass
class Run:
    """A trained (or training) run folder with its method loaded: sample from it, inspect its config."""

    path: Path
    config: RunConfig
    method: Method
    step: int
    weights: str  # "ema" or "raw"

    def sample(self, n: int, seed: int = 0, batch_size: int = 256, progress: bool = False, **options: Any) -> torch.Tensor:
        """``n`` images in [-1, 1] (N, C, H, W), drawn in batches; same seed, same images."""
        from tqdm.auto import tqdm

        generator = torch.Generator().manual_seed(seed)
        self.method.eval()
        options = dict(options)
        if isinstance(options.get("labels"), str):
            options["labels"] = self.labels(options["labels"], n)
        chunks = []
        with tqdm(total=n, disable=not progress, desc="sample", unit="img") as bar:
            for start in range(0, n, batch_size):
                m = min(batch_size, n - start)
                opts = dict(options)
                for key in ("labels", "negative_labels"):  # per-image options follow the batch
                    if opts.get(key) is not None:
                        opts[key] = torch.as_tensor(opts[key])[start: start + m]
                chunks.append(self.method.sample(m, generator=generator, **opts).cpu())
                bar.update(m)
        return torch.cat(chunks)

    def labels(self, spec: str, n: int) -> torch.Tensor:
        """Class labels for ``n`` samples from a spec: ``"all"`` is every class equally often, in turn."""
        if spec != "all":
            raise ConfigError(f"labels {spec!r}: give a class index or 'all'")
        num_classes = self.method.data_info.num_classes
        if not num_classes:
            raise ConfigError(f"{self.path}: the run's data has no class labels, so there is no class to ask for")
        return torch.arange(n) % num_classes

    def _need(self, attribute: str, what: str) -> None:
        if not hasattr(self.method, attribute):
            raise ConfigError(f"{self.path}: a {self.config.method} run cannot {what}; "
                              "that needs an autoencoder-family run (ae, dae, vae, kl-ae, vqvae, vqgan, vq-ae)")

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Reconstructions in [-1, 1] of images in [-1, 1] (N, C, H, W), in batches."""
        self._need("reconstruct", "reconstruct images")
        self.method.eval()
        return torch.cat([self.method.reconstruct(images[i: i + batch_size].to(self.method.device)).cpu()
                          for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def interpolate(self, start: torch.Tensor, end: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Images along the latent path from ``start`` to ``end``: (pairs, steps, C, H, W).

        Autoencoders interpolate linearly between the encodings of two images; GANs interpolate
        spherically between two latent vectors z (a Gaussian's mass lies near a sphere, so the
        straight line would pass through unlikely small-norm latents).
        """
        if steps < 2:
            raise ConfigError(f"interpolation needs at least 2 steps, got {steps}")
        method = self.method.eval()
        w = torch.linspace(0, 1, steps)
        if hasattr(method, "encode"):
            za, zb = method.encode(start.to(method.device)), method.encode(end.to(method.device))
            path = torch.stack([(1 - t) * za + t * zb for t in w], 1)  # (P, S, ...)
            images = method.decode(path.flatten(0, 1))
        elif hasattr(method, "synthesize"):
            za, zb = start.to(method.device), end.to(method.device)
            path = torch.stack([slerp(za, zb, float(t)) for t in w], 1)
            images = method.synthesize(path.flatten(0, 1))
        else:
            raise ConfigError(f"{self.path}: a {self.config.method} run has no latent space to interpolate in")
        return images.clamp(-1, 1).cpu().unflatten(0, (len(start), steps))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between rows of ``a`` and ``b`` (N, D) (Shoemake 1985; White 2016 for GANs)."""
    a_unit, b_unit = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    omega = torch.acos((a_unit * b_unit).sum(1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))  # (N, 1)
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def heldout_images(run: "Run", data: str | None = None, n: int | None = None, data_root: str | None = None):
    """Held-out images for a run, fitted to its size and channels: ``data`` ("SOURCE:SPLIT") or the run's test split.

    mnist5k has no test split; its held-out images are mnist:test (which needs the data root).
    """
    import dataclasses

    from genlab.data import split_source_ref

    cfg = run.config.data
    if data is None:
        source = "mnist" if cfg.source == "mnist5k" else cfg.source
        split = "test"
    else:
        source, split = split_source_ref(data)
        if split is None:
            raise ConfigError(f"{data}: give the held-out data as SOURCE:SPLIT, e.g. mnist:test")
    root = data_root if data_root is not None else cfg.root
    held = dataclasses.replace(cfg, source=source, split=split, root=root, limit=n, hflip=False)
    return load_data(held)


def load_run(path: str | Path, weights: str = "ema", checkpoint: int | str | Path | None = None,
             device: str | None = None) -> Run:
    """Load a run; ``checkpoint`` is a step, a folder, or None / "latest" (the newest intact one); weights ema|raw."""
    path = Path(path)
    if not path.is_dir():
        raise GenlabError(f"{path}: no such run folder")
    saved = read_config_file(path / "config.yaml")
    method_cls = get_method(saved["method"])
    cfg = build_config(saved["method"], method_cls.Config, base=saved)
    ckpt = find_checkpoint(path, checkpoint)
    if ckpt is None:
        raise GenlabError(f"{path}: no checkpoint yet (train it first, or wait for the first checkpoint)")
    tensors, state = load_checkpoint(ckpt, device="cpu")
    info = state.get("data_info")
    if info is None:
        images = load_data(cfg.data)
        data_info = data_info_for(cfg, images)
    else:
        data_info = DataInfo(**info)
    method = method_cls(cfg.model, data_info)
    method.load_state_dict(tensors["model"])
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights must be 'ema' or 'raw', got {weights!r}")
    used = "raw"
    if weights == "ema":
        from genlab.train.checkpoint import unflatten_state
        from genlab.train.ema import EMA

        for name, module in method.ema_targets().items():
            key = f"ema_{name}"
            if key in tensors:
                ema = EMA(module)
                ema.load_state_dict(unflatten_state(tensors[key], state["skeletons"][key]))
                ema.copy_to(module)
                used = "ema"
    if device is not None:
        method.to(device)
    elif torch.cuda.is_available():
        method.to("cuda")
    return Run(path=path, config=cfg, method=method.eval(), step=int(state["step"]), weights=used)
