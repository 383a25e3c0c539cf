"""Run folders: a trained (or training) run loaded from disk, and the layout it is read from.

A run is a folder (ARCHITECTURE: "A run is a folder"): ``config.yaml`` (the resolved config),
``checkpoints/step_XXXXXX/`` (safetensors + ``state.json``), ``log.jsonl``, ``samples/`` and
``metrics.json``. :func:`load_run` rebuilds the method from the saved config and a checkpoint;
:class:`Run` samples, reconstructs and interpolates with it. The CLI, the evaluation and the
public API (:mod:`genlab.api`) read runs through this module.

Child runs (ARCHITECTURE: "A child run"): a method declares its frozen parents (``Method.parents``:
role -> capability). :func:`build_method` is the one place that provides them: at training time it
loads each parent run named by ``model.<role>`` (EMA weights, frozen); the child's checkpoint then
stores each parent's config, data shape, method and provenance (:func:`parent_record`) in its
``state.json``, next to the parent's weights inside the child's own tensors. Loading a child
rebuilds each parent from that stored copy, so the child keeps working after the parent folder is
moved or deleted; the parent's path is provenance only.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genlab.compiling import compile_network, eager, fall_back, is_compiled
from genlab.config import RunConfig, build_config, read_config_file, to_dict
from genlab.data import is_path_source, load_data
from genlab.errors import ConfigError, DataError, GenlabError
from genlab.methods import DataInfo, Method, get_method
from genlab.methods.capabilities import Encodes, GANLatent, NoiseAwareClassifier, Reconstructs, has, require
from genlab.methods.text_conditioning import resolve_prompts
from genlab.ranges import Range
from genlab.train.checkpoint import STATE_FILE, check_weights_fit, find_checkpoint, load_checkpoint


def data_info_for(cfg: RunConfig, images) -> DataInfo:
    """Shape facts of the (fitted) training data."""
    size = images.image_size
    if not isinstance(size, int):
        raise ConfigError(f"images are {size[0]}x{size[1]}; set data.image_size=N to train on square images")
    num_classes = images.num_classes if images.labels is not None else None
    conditions = getattr(images, "conditions", None)
    return DataInfo(channels=images.channels, image_size=size, num_classes=num_classes or None, source=cfg.data.source,
                    condition_channels=None if conditions is None else int(conditions.shape[1]), num_images=len(images))


# Sampling options holding one row per sample (class labels, control maps): a batch of samples takes its rows.
PER_SAMPLE_OPTIONS = ("labels", "negative_labels", "control")
PER_SAMPLE_PROMPTS = ("prompts", "negative_prompts")


def per_sample_slice(options: dict, start: int, stop: int) -> dict:
    """``options`` with every per-image option (labels, control maps, prompt lists) cut to images [start, stop).

    A string stands for every image ("all" classes, one prompt) and is kept whole.
    """
    out = dict(options)
    for key in PER_SAMPLE_OPTIONS + PER_SAMPLE_PROMPTS:
        value = out.get(key)
        if value is None or isinstance(value, str):
            continue
        out[key] = list(value)[start:stop] if key in PER_SAMPLE_PROMPTS else torch.as_tensor(value)[start:stop]
    return out


@dataclass
class Run:
    """A trained (or training) run folder with its method loaded: sample from it, inspect its config."""

    path: Path
    config: RunConfig
    method: Method
    step: int
    weights: str  # "ema" or "raw"

    def sample(self, n: int, seed: int = 0, batch_size: int | str = "auto", progress: bool = False,
               compile: bool = False, **options: Any) -> torch.Tensor:
        """``n`` images in [-1, 1] (N, C, H, W), drawn in batches; same seed, same images (another batch size
        changes them only by float rounding, ~1e-6: the noise of each image follows from the seed alone).

        ``batch_size``: images per sampling call, or "auto": the fastest per image on this machine for a
        diffusion model's network, measured once and cached (:func:`genlab.autotune.auto_batch_size`).

        ``compile``: run a diffusion model's denoiser network through ``torch.compile`` (inductor,
        static shapes): measured 1.75x faster U-Net evaluations on a 1-thread CPU, 1.27x (DDIM-50) and 1.16x
        (DPM-Solver++ 10) faster sampling than diffusers, after a one-off compile of minutes (docs/results.md:
        it pays after thousands of images). A last, smaller batch runs eagerly. If compiling fails, a one-line
        warning and the eager network.

        Text-conditioned runs take ``prompt`` (one string for every sample) or ``prompts`` (n strings, or P
        strings with n a multiple of P: each prompt for n / P consecutive samples), and likewise
        ``negative_prompt`` / ``negative_prompts``; with ``guidance_scale`` w (classifier-free guidance).
        """
        from tqdm.auto import tqdm

        if batch_size == "auto":
            from genlab.autotune import auto_batch_size

            check_sampling_options(n=n)
            batch_size = auto_batch_size(self.method, n)
        check_sampling_options(n=n, seed=seed, batch_size=batch_size, **options)
        generator = torch.Generator().manual_seed(seed)
        self.method.eval()
        options = resolve_prompts(self.method, dict(options), n)  # a prompt for all, or one per sample
        self.resolve_labels(options, n)
        if options.get("classifier") is not None:
            options["classifier"] = guidance_classifier(options["classifier"], self.method.device)
        for key in ("labels", "negative_labels"):
            if options.get(key) is not None:
                options[key] = self._check_labels(options[key], n, key)
        draw = compiled_sampler(self.method) if compile else self.method.sample
        chunks = []
        with tqdm(total=n, disable=not progress, desc="sample", unit="img") as bar:
            for start in range(0, n, batch_size):
                m = min(batch_size, n - start)
                opts = per_sample_slice(options, start, start + m)  # per-image options follow the batch
                # A compiled network is specialised to the batch shape: a last, smaller batch runs eagerly
                # (compiling it again would take minutes for a few images).
                with eager(self.method.backbone) if compile and 0 < start and m < batch_size else contextlib.nullcontext():
                    chunks.append(draw(m, generator=generator, **opts).cpu())
                bar.update(m)
        return torch.cat(chunks)

    def resolve_labels(self, options: dict, n: int) -> None:
        """Sampling options' labels as the (n,) classes to draw, in place: a spec string ("all") resolved, and no
        class asked of a class-conditional run read as every class in turn.

        A user sampling a class-conditional model without naming a class expects digits of every class, not the
        null class that label dropout trained (the demo's FID is 18.6 with every class, 71.4 from the null
        class). Those unconditional samples stay one option away: ``guidance_scale=0`` is the null-class branch.
        """
        if options.get("labels") is None and getattr(self.method, "num_classes", None):
            options["labels"] = "all"
        if isinstance(options.get("labels"), str):
            options["labels"] = self.labels(options["labels"], n)

    def labels(self, spec: str, n: int) -> torch.Tensor:
        """Class labels for ``n`` samples from a spec: ``"all"`` is every class equally often, in turn."""
        if spec != "all":
            raise ConfigError(f"labels {spec!r}: give a class index or 'all'")
        num_classes = self.method.data_info.num_classes
        if not num_classes:
            raise ConfigError(f"{self.path}: the run's data has no class labels, so there is no class to ask for")
        return torch.arange(n) % num_classes

    def __repr__(self) -> str:
        return f"Run(method={self.config.method!r}, step={self.step}, weights={self.weights!r}, path='{self.path}')"

    def _need(self, capability: type | tuple[type, ...], what: str) -> None:
        """A one-line ConfigError naming the missing capability unless the run's method declares it."""
        require(self.method, capability, what, where=str(self.path))

    def evaluate(self, kind: str = "auto", **options: Any) -> list[dict]:
        """Score this run as loaded (its weights, its device): one result per kind, see ``genlab.evaluation``.

        ``kind`` is "auto" (whatever the run's capabilities offer), "generation", "reconstruction" or
        "translation"; ``options`` are those of ``genlab.evaluation.evaluate`` (ref, n, metrics, ...).
        """
        from genlab.evaluation import evaluate_run  # call-time: evaluation reads runs, not the reverse

        return evaluate_run(self, kind, **options)

    def _check_labels(self, labels: Any, n: int, key: str) -> torch.Tensor:
        """Class labels as a long tensor (n,), each a class of the run's data."""
        flag = "--class" if key == "labels" else "--negative-class"
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ConfigError(f"{flag}: class labels must be integers, got {labels.dtype}")
        if labels.shape != (n,):
            raise ConfigError(f"{flag}: give one class per sample, shape ({n},), got {tuple(labels.shape)}")
        num_classes = self.method.data_info.num_classes
        if num_classes and len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
            raise ConfigError(f"{flag} {bad}: the run's data has {num_classes} classes, 0 to {num_classes - 1}")
        return labels.long()

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Reconstructions in [-1, 1] of images in [-1, 1] (N, C, H, W), in batches."""
        self._need(Reconstructs, "reconstruct images")
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
        if has(method, Encodes):
            za, zb = method.encode(start.to(method.device)), method.encode(end.to(method.device))
            path = torch.stack([(1 - t) * za + t * zb for t in w], 1)  # (P, S, ...)
            images = method.decode(path.flatten(0, 1))
        else:
            self._need((Encodes, GANLatent), "interpolate")
            za, zb = start.to(method.device), end.to(method.device)
            path = torch.stack([slerp(za, zb, float(t)) for t in w], 1)
            images = method.synthesize(path.flatten(0, 1))
        return images.clamp(-1, 1).cpu().unflatten(0, (len(start), steps))


def compiled_sampler(method: Method):
    """``method.sample`` with its denoiser network compiled by torch.compile (static shapes; each new batch
    shape or timestep dtype compiles once more), falling back to the eager network with a one-line warning
    when compilation fails (no C++ compiler, an unsupported operator)."""
    backbone = getattr(method, "backbone", None)
    if not isinstance(backbone, torch.nn.Module):
        raise ConfigError(f"--compile applies to diffusion runs (a denoiser network); a {method.name} run has none: "
                          "sample without --compile")
    compile_network(backbone)  # once per loaded run

    def sample(n: int, generator: torch.Generator | None = None, **options: Any) -> torch.Tensor:
        if not is_compiled(backbone):  # an earlier batch fell back
            return method.sample(n, generator=generator, **options)
        state = None if generator is None else generator.get_state()
        try:
            return method.sample(n, generator=generator, **options)
        except GenlabError:
            raise  # the user's input, not the compiler
        except Exception as error:  # inductor's failures have many types (compiler missing, lowering, C++ build)
            fall_back(backbone, error, "sampling")
            if state is not None:
                generator.set_state(state)  # the same images as an eager run
            return method.sample(n, generator=generator, **options)

    return sample


# Ranges of the sampling options that methods share; Run.sample checks them, so the CLI and the API agree.
SAMPLING_RANGES = {
    "n": (int, Range(1)),
    "seed": (int, Range(0, 2**63 - 1)),  # torch.Generator.manual_seed's range
    "batch_size": (int, Range(1)),
    "threads": (int, Range(1)),
    "steps": (int, Range(1, 100_000)),  # far beyond any sampler's need; bounds the solvers' step grids
    "eta": (float, Range(0, 1)),  # DDIM: 0 deterministic, 1 DDPM-like; above 1 the step's variance exceeds 1 - abar
    "guidance_scale": (float, Range(0)),  # w = 0 is the unconditional model; --negative-class steers away
    "classifier_scale": (float, Range(0)),
    "truncation": (float, Range(0)),  # psi: 0 is the mean latent, 1 none
    "temperature": (float, Range(0, lo_open=True)),
    "top_k": (int, Range(1)),
    "control_scale": (float, Range(0)),  # 0: the frozen base; 1: as trained
    "switch": (int, Range(1)),  # refiner handoff step; the refiner refuses one above its t_switch
}


def check_sampling_options(**options: Any) -> None:
    """Raise ConfigError naming the first sampling option whose value is of the wrong type or out of range."""
    for name, value in options.items():
        if name not in SAMPLING_RANGES or value is None:
            continue
        kind, range_ = SAMPLING_RANGES[name]
        ok_type = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
        if isinstance(value, bool) or not ok_type or not range_.contains(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be {'an integer' if kind is int else 'a number'} "
                              f"{range_.describe()}, got {value!r}")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between rows of ``a`` and ``b`` (N, D) (Shoemake 1985; White 2016 for GANs)."""
    a_unit, b_unit = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    omega = torch.acos((a_unit * b_unit).sum(1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))  # (N, 1)
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def _heldout_source(data_config) -> tuple[str, str]:
    """(source, split) of the held-out images of a run's data config: its test split; mnist5k has none: mnist:test."""
    return "mnist" if data_config.source == "mnist5k" else data_config.source, "test"


def heldout_split(data_config) -> str:
    """:func:`_heldout_source` as "SOURCE:SPLIT" (what a protocol records)."""
    return ":".join(_heldout_source(data_config))


def heldout_images(run: "Run", data: str | None = None, n: int | None = None, data_root: str | None = None):
    """Held-out images for a run, fitted to its size and channels: ``data`` ("SOURCE:SPLIT") or the run's test split
    (:func:`heldout_split`; mnist:test for mnist5k, which needs the data root)."""
    return heldout_data(run.config.data, data, n, data_root)


def heldout_data(cfg, data: str | None = None, n: int | None = None, data_root: str | None = None):
    """:func:`heldout_images` of a run's data config ``cfg`` (a run not loaded yet: the trainer's periodic eval)."""
    from genlab.data import split_source_ref

    if data is None:
        source, split = _heldout_source(cfg)
    else:
        source, split = split_source_ref(data)
        if split is None:
            raise ConfigError(f"{data}: give the held-out data as SOURCE:SPLIT, e.g. mnist:test")
    root = data_root if data_root is not None else cfg.root
    held = dataclasses.replace(cfg, source=source, split=split, root=root, limit=n, hflip=False)
    try:
        return load_data(held)
    except DataError as e:
        if data is not None or not is_path_source(source):
            raise
        # The user asked for no split: say which option picks the held-out images (a folder often has no test/).
        raise DataError(f"{e}; the held-out images default to {source}:test: pass others as SOURCE:SPLIT with --data "
                        f"(--recon-data for eval), e.g. {source}:train (training images, not held out)") from None


def guidance_classifier(classifier: Any, device: torch.device | str | None = None) -> Method:
    """A noise-aware classifier for classifier guidance: a method as it is, or a run folder loaded (EMA weights).

    Classifier guidance is no parent: the classifier is used at sampling time only and is not saved.
    """
    if isinstance(classifier, (str, os.PathLike)):
        where = str(classifier)
        classifier = load_run(classifier, weights="ema", device=device).method
        require(classifier, NoiseAwareClassifier, "guide sampling (--classifier needs a noisy-classifier run: "
                "train one with `genlab train noisy-classifier`)", where=where)
    return classifier


def parent_record(run: Run) -> dict[str, Any]:
    """What a child stores of a parent run in its state.json: enough to rebuild it, plus provenance."""
    return {"method": run.config.method, "config": to_dict(run.config),
            "data_info": dataclasses.asdict(run.method.data_info), "parents": run.method.parent_records,
            "path": str(run.path.resolve()), "step": run.step, "weights": run.weights}


def _rebuild_parent(record: dict[str, Any]) -> Method:
    """A parent method rebuilt from its stored record (its weights come with the child's state dict)."""
    cls = get_method(record["method"])
    cfg = build_config(record["method"], cls.Config, base=record["config"])
    return build_method(cfg, DataInfo(**record["data_info"]), record.get("parents") or {})


def build_method(cfg: RunConfig, data_info: DataInfo, records: dict[str, dict] | None = None,
                 config_path: Path | None = None) -> Method:
    """The method of ``cfg`` for data of shape ``data_info``, with its frozen parents.

    Each parent the method declares is rebuilt from ``records`` (the copies a child checkpoint stores)
    or, without a record (training, or a checkpoint written before parents were stored), loaded from
    the run folder ``model.<role>`` names, with its EMA weights on the CPU. The method's constructor
    checks each parent's capability; ``method.parent_records`` is what the trainer saves. A value the
    method refuses is named with ``config_path`` (the run's config.yaml) when the config came from one.
    """
    method_cls = get_method(cfg.method)
    if not method_cls.parents:
        return _construct(method_cls, cfg, data_info, None, config_path)
    parents, kept = {}, {}
    for role in method_cls.parents:
        record = (records or {}).get(role)
        if record is not None:
            parents[role], kept[role] = _rebuild_parent(record), record
        elif getattr(cfg.model, role, None):
            parent_run = load_run(getattr(cfg.model, role), weights="ema", device="cpu")
            parents[role], kept[role] = parent_run.method, parent_record(parent_run)
    method = _construct(method_cls, cfg, data_info, parents, config_path)  # names a missing or incapable parent
    method.parent_records = kept
    return method


def _construct(method_cls: type[Method], cfg: RunConfig, data_info: DataInfo, parents: dict | None,
               config_path: Path | None) -> Method:
    """``method_cls(cfg.model, data_info[, parents])``; a refused value read from a config.yaml names that file."""
    try:
        return method_cls(cfg.model, data_info, parents=parents) if parents is not None else method_cls(cfg.model, data_info)
    except ConfigError as e:
        if config_path is None:
            raise
        raise ConfigError(f"{config_path}: {e} (was config.yaml edited or damaged? the first 'start' record of "
                          "log.jsonl holds the config the run started with)") from None


def stored_parent_records(checkpoint: Path | None) -> dict[str, dict] | None:
    """The parent records in a checkpoint's state.json; None without them (none stored yet, or unreadable:
    resuming then reports the checkpoint itself)."""
    try:
        return json.loads((checkpoint / STATE_FILE).read_text()).get("parents") if checkpoint is not None else None
    except (OSError, ValueError, AttributeError):
        return None


# `genlab eval --checkpoint STEP`: the evaluation loads its run itself, so the choice travels in a context
# variable that load_run reads when no checkpoint is passed (evaluation.py can take the argument later).
_CHECKPOINT_CHOICE: contextvars.ContextVar = contextvars.ContextVar("genlab_checkpoint", default=None)


@contextlib.contextmanager
def checkpoint_choice(checkpoint: int | str | None):
    """Within this block, load_run without an explicit ``checkpoint`` loads ``checkpoint`` (a step or "latest")."""
    token = _CHECKPOINT_CHOICE.set(checkpoint)
    try:
        yield
    finally:
        _CHECKPOINT_CHOICE.reset(token)


def load_run(path: str | Path, weights: str = "ema", checkpoint: int | str | Path | None = None,
             device: str | None = None) -> Run:
    """Load a run; ``checkpoint`` is a step, a folder, or None / "latest" (the newest intact one); weights ema|raw."""
    path = Path(path)
    if not path.is_dir():
        raise GenlabError(f"{path}: no such run folder")
    if checkpoint is None:
        checkpoint = _CHECKPOINT_CHOICE.get()
    saved = read_config_file(path / "config.yaml", complete=True)
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
    method = build_method(cfg, data_info, state.get("parents"), path / "config.yaml")
    check_weights_fit(method, tensors["model"], ckpt, path / "config.yaml")
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
