"""The Python API; the CLI is a thin layer over these functions (SPEC P2).

    import genlab
    run = genlab.train("ddpm", data="mnist5k", preset="small", overrides=["train.steps=500"])
    images = run.sample(16, seed=0, sampler="ddim", steps=50)   # (16, 1, 28, 28) in [-1, 1]
    run = genlab.load_run("runs/demo")                             # later, from the folder
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from genlab.config import RunConfig, build_config, list_presets, read_config_file
from genlab.data import load_data
from genlab.errors import ConfigError, GenlabError
from genlab.methods import DataInfo, Method, get_method
from genlab.train.checkpoint import latest_checkpoint, load_checkpoint


def data_info_for(cfg: RunConfig, images) -> DataInfo:
    """Shape facts of the (fitted) training data."""
    size = images.image_size
    if not isinstance(size, int):
        raise ConfigError(f"images are {size[0]}x{size[1]}; set data.image_size=N to train on square images")
    num_classes = images.num_classes if images.labels is not None else None
    conditions = getattr(images, "conditions", None)
    return DataInfo(channels=images.channels, image_size=size, num_classes=num_classes or None, source=cfg.data.source,
                    condition_channels=None if conditions is None else int(conditions.shape[1]))


def default_run_dir(method: str, source: str) -> Path:
    safe = source.replace(":", "_").replace("/", "_").strip("_")
    return Path("runs") / f"{method}-{safe}-{time.strftime('%Y%m%d-%H%M%S')}"


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


def train(
    method: str,
    data: str | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    resume: bool = False,
    data_root: str | None = None,
    progress: bool = True,
) -> Run:
    """Train ``method`` and return the finished :class:`Run` (EMA weights loaded when present)."""
    from genlab.train.trainer import Trainer

    method_cls = get_method(method)
    overrides = list(overrides)
    base = None
    if resume:
        if run_dir is None:
            raise ConfigError("--resume needs --run-dir: the run folder to continue")
        base = read_config_file(Path(run_dir) / "config.yaml")
        if data is not None and data != base.get("data", {}).get("source"):
            raise ConfigError(f"--data {data} differs from the run's data source {base['data']['source']!r}; "
                              "a resumed run keeps its data")
        preset = None  # the saved config already contains the preset
    overrides = _resolve_parent_run(overrides, data, data_root, resume)
    if data is not None:
        overrides.insert(0, f"data.source={data}")
        preset = resolve_preset(method, data, preset)
    if data_root is not None:
        overrides.insert(0, f"data.root={data_root}")
    cfg = build_config(method, method_cls.Config, preset=preset, overrides=overrides, base=base)
    if resume and base is not None:
        changed = _changed_keys(base, cfg)
        if changed - {"train.steps", "train.time_limit", "train.checkpoint_every", "train.sample_every",
                      "train.log_every", "train.threads", "train.keep_checkpoints"}:
            import warnings

            warnings.warn(f"resuming with changed {sorted(changed)}: the continuation is no longer an exact resume")
    if run_dir is None:
        run_dir = default_run_dir(method, cfg.data.source)
    run_dir = Path(run_dir)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    images = load_data(cfg.data)
    torch.manual_seed(cfg.train.seed)  # weight initialisation is part of the run's seed
    instance = method_cls(cfg.model, data_info_for(cfg, images))
    trainer = Trainer(run_dir, cfg, instance, images, progress=progress)
    trainer.fit(resume=resume)
    return load_run(run_dir)


def resolve_preset(method: str, data: str | None, preset: str | None) -> str | None:
    """A dataset-specific preset (ddpm_mnist_small.yaml) wins over the generic one (ddpm_small.yaml)."""
    if data is not None and preset is not None and f"{data.replace('-', '_')}_{preset}" in list_presets(method):
        return f"{data.replace('-', '_')}_{preset}"
    return preset


# Config fields that name a frozen parent run: a prior's VQ model, an LDM's autoencoder, an inverter's GAN.
PARENT_RUN_KEYS = ("codes", "autoencoder", "gan")


def _resolve_parent_run(overrides: list[str], data: str | None, data_root: str | None, resume: bool) -> list[str]:
    """Make a parent run path absolute and, unless --data is given, train on the parent's data."""
    out = list(overrides)
    for i, text in enumerate(overrides):
        key, _, value = text.partition("=")
        if key.removeprefix("model.") not in PARENT_RUN_KEYS or not value or value in ("null", "None"):
            continue
        parent = Path(value).expanduser()
        if not (parent / "config.yaml").is_file():
            raise ConfigError(f"{key}={value}: not a run folder (no config.yaml); pass the folder of a trained run")
        out[i] = f"{key}={parent.resolve()}"
        if data is None and not resume:
            # The parent's data section first, so the prior or LDM sees the images its parent was trained on.
            parent_data = read_config_file(parent / "config.yaml").get("data", {})
            for name in ("source", "image_size", "fit", "channels"):
                if parent_data.get(name) is not None:
                    out.insert(0, f"data.{name}={parent_data[name]}")
            if data_root is None and parent_data.get("root"):
                out.insert(0, f"data.root={parent_data['root']}")
    return out


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


def _changed_keys(base: dict, cfg: RunConfig) -> set[str]:
    from genlab.config import to_dict

    new = to_dict(cfg)
    out = set()

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in set(a) | set(b):
                walk(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        elif a != b:
            out.add(prefix)

    walk(base, new, "")
    return out


def load_run(path: str | Path, weights: str = "ema", checkpoint: str | Path | None = None, device: str | None = None) -> Run:
    """Load a run folder's method with its latest (or given) checkpoint; ``weights`` is "ema" or "raw"."""
    path = Path(path)
    if not path.is_dir():
        raise GenlabError(f"{path}: no such run folder")
    saved = read_config_file(path / "config.yaml")
    method_cls = get_method(saved["method"])
    cfg = build_config(saved["method"], method_cls.Config, base=saved)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(path)
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
