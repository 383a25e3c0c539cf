"""Pixel-space diffusion (DDPM, Ho et al. 2020) with DDIM, fast samplers, learned variance and
guidance (SPEC D1-D9)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Annotated, Any, Callable, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from genlab.diffusion import (
    NoiseSchedule,
    classifier_free_guidance,
    classifier_guidance,
    classifier_log_prob_gradient,
    classifier_mean_shift,
    diffusion_loss,
    loss_weight,
    model_output_to_x0_eps,
    rule_guidance,
    sample as run_sampler,
    training_target,
    vlb_terms,
)
from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, Method
from genlab.methods.capabilities import Denoiser, Generates, NoiseAwareClassifier, require
from genlab.models.dit import DiT as DiTNetwork
from genlab.models.dit import DiTConfig
from genlab.models.unet import UNet, UNetConfig
from genlab.noise import ImageNoise
from genlab.ranges import NonNegativeFloat, PositiveFloat, PositiveInt, Range, UnitFloat


NETWORKS = ("unet", "dit")  # the denoisers; each has its own config section model.<network>
# A child run's extra inputs of the frozen backbone: (h, t, y) -> keyword arguments (see DDPM.network).
BackboneKwargs = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], dict]


@dataclass
class DDPMConfig:
    """DDPM's diffusion (noise schedule, objective, default sampler) and its denoising network.

    ``network`` chooses the denoiser and only that network's section (``unet`` or ``dit``) is
    accepted; the other stays None. Size-dependent fields left at None (``patch_size``,
    ``unet.channel_mult``, ``unet.attention_resolutions``, ``dit.patch_size``) are derived from the
    data when the method is built, and the run's saved config records the values chosen.
    """

    # Presets and saved configs keep only the chosen network's section (genlab.config drops the other).
    network_sections: ClassVar[tuple[str, ...]] = NETWORKS
    network: Literal["unet", "dit"] = "unet"
    unet: UNetConfig | None = None  # network=unet: the U-Net (None: its defaults)
    dit: DiTConfig | None = None  # network=dit: the transformer (None: its defaults)
    # U-Net only: space-to-depth before the network (pixel_unshuffle): p x p pixel patches become
    # channels, so the U-Net runs at 1/p of the resolution for ~p^2 less compute. p = 2 is what makes
    # 28x28 diffusion train in minutes on a CPU; the diffusion itself still happens on every pixel.
    # None: derived (see ``derived_pixel_patch``). A DiT cuts its own patches (dit.patch_size).
    patch_size: PositiveInt | None = None
    schedule: Literal["linear", "cosine", "sigmoid", "scaled-linear"] = "linear"
    num_timesteps: Annotated[int, Range(2)] = 1000
    prediction: Literal["eps", "x0", "v"] = "eps"
    min_snr_gamma: PositiveFloat | None = None  # Hang et al. 2023; None: plain MSE on the target
    class_conditional: bool = False  # embed labels; needs a labelled data source
    p_uncond: UnitFloat = 0.1  # label dropped to the null class with this probability (for CFG)
    sampler: Literal["ddpm", "ddim", "euler", "heun", "dpmpp-2m"] = "ddim"  # default of `genlab sample`
    sample_steps: PositiveInt = 50
    eta: UnitFloat = 0.0  # DDIM stochasticity: 0 deterministic, 1 DDPM-like
    spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    # Clip predicted x0 to the data range in DDPM/DDIM steps. Needed with the cosine schedule: at
    # t = T-1 its alpha_bar is ~1e-9, so x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) amplifies any eps
    # error by ~3e4 and unclipped DDIM from trailing t = T-1 yields noise.
    clip_denoised: bool = True
    # Improved DDPM (Nichol & Dhariwal 2021): the U-Net also outputs v (twice the channels), the
    # variance interpolation log Sigma = v log beta_t + (1 - v) log beta_tilde_t, trained by the
    # hybrid loss L_simple + vlb_weight * L_vlb (lambda = 0.001, stop-gradient on the mean in L_vlb).
    learn_sigma: bool = False
    vlb_weight: NonNegativeFloat = 0.001
    # Highest noise level of the Karras solvers (euler, heun, dpmpp-2m); None: min(schedule's, 80).
    sigma_max: PositiveFloat | None = None

    def __post_init__(self):
        """Fill the chosen network's section with its defaults; refuse the other network's keys."""
        if self.network not in NETWORKS:  # the type check names the choices; this guards direct use
            raise ConfigError(f"model.network={self.network!r}: choose one of {', '.join(NETWORKS)}")
        for other in NETWORKS:
            section = getattr(self, other)
            if other != self.network and section is not None:
                defaults = type(section)()
                changed = [f.name for f in fields(section) if getattr(section, f.name) != getattr(defaults, f.name)]
                key = f"model.{other}.{changed[0]}={getattr(section, changed[0])!r}" if changed else f"model.{other}"
                raise ConfigError(f"{key} applies to network={other}, but this run's model.network is "
                                  f"{self.network}: remove it (the {self.network}'s settings are model.{self.network}.*)")
        if getattr(self, self.network) is None:
            setattr(self, self.network, UNetConfig() if self.network == "unet" else DiTConfig())
        if self.network == "dit" and self.patch_size not in (None, 1):
            raise ConfigError(f"model.patch_size={self.patch_size}: a DiT cuts its own patches; "
                              "set model.dit.patch_size instead and leave model.patch_size unset")


MAX_DERIVED_WORKING_SIZE = 16  # a derived pixel patch brings the U-Net's input to at most 16 px ...
MAX_DERIVED_PIXEL_PATCH = 4  # ... with patches of at most 4 x 4 pixels


def derived_pixel_patch(image_size: int) -> int:
    """The U-Net's pixel patch for ``image_size``: double p (up to 4) while the input is above 16 px
    and p still divides the size (28 px: 2, a 14 px U-Net; 8 px: 1; 64 px: 4)."""
    p = 1
    while image_size // p > MAX_DERIVED_WORKING_SIZE and image_size % (2 * p) == 0 and 2 * p <= MAX_DERIVED_PIXEL_PATCH:
        p *= 2
    return p


class DDPM(Method, Generates, Denoiser):
    """eps/x0/v-prediction diffusion in pixel space, denoised by an ADM-style U-Net or a DiT (model.network)."""

    name = "ddpm"
    Config = DDPMConfig

    def __init__(self, config: DDPMConfig, data_info: DataInfo, parents: Mapping[str, nn.Module] | None = None):
        config = copy.deepcopy(config)  # resolved below for this data; the caller's stays as given
        super().__init__(config, data_info, parents)
        if config.class_conditional and not data_info.num_classes:
            raise ConfigError("model.class_conditional=true needs a labelled data source (e.g. mnist, cifar10)")
        if not 0.0 <= config.p_uncond < 1.0:
            raise ConfigError(f"model.p_uncond must be in [0, 1), got {config.p_uncond}")
        self.num_classes = data_info.num_classes if config.class_conditional else None
        if config.patch_size is None:
            config.patch_size = derived_pixel_patch(data_info.image_size) if config.network == "unet" else 1
        p = config.patch_size
        if p < 1 or data_info.image_size % p:
            raise ConfigError(f"model.patch_size={p} must be a positive divisor of the image size "
                              f"{data_info.image_size}: choose a divisor or leave it unset (derived)")
        if config.vlb_weight < 0:
            raise ConfigError(f"model.vlb_weight must be >= 0 (0.001 in improved DDPM), got {config.vlb_weight}")
        outputs = 2 if config.learn_sigma else 1  # the prediction, and v when the variance is learned
        network = self._make_network(in_channels=data_info.channels * p * p,
                                     out_channels=outputs * data_info.channels * p * p,
                                     image_size=data_info.image_size // p)
        setattr(config, config.network, network.config)  # the sizes derived for this data, as saved
        self.add_module(self.network_name, network)
        self.schedule = NoiseSchedule.from_name(config.schedule, config.num_timesteps)

    def _make_network(self, in_channels: int, out_channels: int, image_size: int) -> nn.Module:
        """The denoiser model.network names, for (N, in_channels, image_size, image_size) inputs."""
        c = self.config
        if c.network == "dit":
            return DiTNetwork(c.dit, in_channels=in_channels, out_channels=out_channels, image_size=image_size,
                              num_classes=self.num_classes)
        return UNet(c.unet, in_channels=in_channels, out_channels=out_channels, image_size=image_size,
                    num_classes=self.num_classes)

    @property
    def network_name(self) -> str:
        """The attribute (and EMA target) holding the denoiser, ``unet`` or ``dit``: its weights are
        saved as "<network_name>.*" and "ema_<network_name>"."""
        return self.config.network

    @property
    def backbone(self) -> nn.Module:
        """The denoising network (``self.unet`` or ``self.dit``)."""
        return getattr(self, self.network_name)

    def network(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                backbone_kwargs: BackboneKwargs | None = None) -> torch.Tensor:
        """The model's output at full resolution: (N, C, H, W) -> (N, C, H, W), or (N, 2C, H, W) with
        learn_sigma (the prediction's channels first, then the variance's).

        ``backbone_kwargs(h, t, y)``, when given, returns extra keyword arguments of the backbone
        computed from its input h (after the pixel patch): how a child run (ControlNet, T2I-Adapter)
        steers this frozen network (``down_residuals``, ``adapter_features`` of the U-Net).
        """
        p = self.config.patch_size
        h = x_t if p == 1 else F.pixel_unshuffle(x_t, p)  # (N, C p^2, H / p, W / p)
        extra = {} if backbone_kwargs is None else backbone_kwargs(h, t, y)
        if p == 1:
            return self.backbone(h, t, y, **extra)
        # pixel_shuffle maps input channels [k p^2, (k + 1) p^2) to output channel k, so the first
        # C p^2 U-Net channels (the prediction) become the first C output channels.
        return F.pixel_shuffle(self.backbone(h, t, y, **extra), p)  # (N, C or 2C, H, W)

    def _steered_network(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                         backbone_kwargs: BackboneKwargs | None) -> torch.Tensor:
        """:meth:`network`, called as ``network(x_t, t, y)`` when nothing steers it (what overrides and
        test doubles of ``network`` expect)."""
        if backbone_kwargs is None:
            return self.network(x_t, t, y)
        return self.network(x_t, t, y, backbone_kwargs=backbone_kwargs)

    def _split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, v) of a network output; v = (raw + 1) / 2 as in improved DDPM's code, None
        without learn_sigma."""
        if not self.config.learn_sigma:
            return output, None
        prediction, raw = output.chunk(2, dim=1)  # (N, C, H, W) each
        return prediction, (raw + 1) / 2

    def ema_targets(self) -> dict[str, nn.Module]:
        return {self.network_name: self.backbone}

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """Ho et al. 2020 Alg. 1: t ~ U{0..T-1}, x_t = q_sample(x0, t, eps), regress the target."""
        c = self.config
        x0 = self._diffused(batch["image"])  # (n, C, H, W): images in [-1, 1] (latent models: latents)
        t = ctx.randint(0, c.num_timesteps)  # (n,)
        noise = ctx.randn(*x0.shape[1:])  # (n, C, H, W)
        y = self.training_labels(batch, ctx)
        loss, logs = self.loss(x0, t, noise, y)
        ctx.optimize(loss)
        return {"loss": loss.detach(), **logs}

    def training_labels(self, batch: dict[str, torch.Tensor], ctx) -> torch.Tensor | None:
        """The batch's labels (n,), each dropped to the null class with probability p_uncond (None: unconditional)."""
        if self.num_classes is None:
            return None
        y = batch["label"].clone()
        drop = ctx.rand() < self.config.p_uncond  # classifier-free guidance: learn p(x) with the null class
        y[drop] = self.num_classes
        return y

    def loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor | None = None,
             backbone_kwargs: BackboneKwargs | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective at given (x0, t, noise, labels): (loss, extra logs). x0 is what is
        diffused (latent models: the scaled latents); ``backbone_kwargs`` as in :meth:`network`."""
        c = self.config
        x_t = self.schedule.q_sample(x0, t, noise)
        output, v = self._split(self._steered_network(x_t, t, y, backbone_kwargs))
        target = training_target(c.prediction, x0, noise, t, self.schedule)
        weight = loss_weight(t, self.schedule, c.prediction, c.min_snr_gamma)
        loss = diffusion_loss(output, target, weight)
        logs = {}
        if v is not None:
            # Improved DDPM hybrid loss: L_vlb = T E_t[L_t] trains only Sigma (the mean is detached);
            # lambda L_vlb = vlb_weight * T * mean L_t, as in Nichol & Dhariwal's code (bits/dim).
            _, eps_hat = model_output_to_x0_eps(output.detach(), x_t, t, self.schedule, c.prediction)
            vlb = vlb_terms(self.schedule, x0, x_t, t, eps_hat, v).mean()
            logs = {"mse": loss.detach(), "vlb": vlb.detach()}
            loss = loss + c.vlb_weight * c.num_timesteps * vlb
        return loss, logs

    @torch.no_grad()
    def heldout_loss(self, images: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0,
                     batch_size: int = 500) -> float:
        """The training loss on held-out images (N, C, H, W) in [-1, 1], with t and noise drawn from
        ``seed`` (the same draws for every run: runs of one data set are compared on equal terms)
        and the true labels (no condition dropout). Lower is better; comparable between runs with
        the same prediction target, schedule and weighting."""
        n = len(images)
        shape = self._diffused(images[:1].to(self.device)).shape[1:]
        # All draws up front: the result does not depend on batch_size.
        generator = torch.Generator().manual_seed(seed)
        t_all = torch.randint(0, self.config.num_timesteps, (n,), generator=generator)
        noise_all = torch.randn((n, *shape), generator=generator)
        total = 0.0
        for start in range(0, n, batch_size):
            x0 = self._diffused(images[start: start + batch_size].to(self.device))
            t = t_all[start: start + len(x0)].to(self.device)
            noise = noise_all[start: start + len(x0)].to(self.device)
            y = None if self.num_classes is None or labels is None else labels[start: start + len(x0)].to(self.device)
            loss, _ = self.loss(x0, t, noise, y)
            total += float(loss) * len(x0)
        return total / n

    def _diffused(self, images: torch.Tensor) -> torch.Tensor:
        """What the model diffuses, from images in [-1, 1]: the images (latent models: their latents)."""
        return images

    def denoiser(self, y: torch.Tensor | None = None, backbone_kwargs: BackboneKwargs | None = None):
        """The eps-predicting callable the samplers expect: denoise(x_t, t) -> eps_hat, or
        (eps_hat, v) with learn_sigma."""
        return lambda x_t, t: self._denoise(x_t, t, y, backbone_kwargs)

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                 backbone_kwargs: BackboneKwargs | None = None):
        """eps_hat (or (eps_hat, v)) at (x_t, t) with labels y (None: unconditional/null class)."""
        output, v = self._split(self._steered_network(x_t, t, y, backbone_kwargs))
        if self.config.prediction != "eps":
            # Fractional t (Karras solvers) is only meaningful for eps; others need an integer t.
            _, output = model_output_to_x0_eps(output, x_t, t.round().long(), self.schedule, self.config.prediction)
        return output if v is None else (output, v)

    def _check_classifier(self, classifier: Any) -> Method:
        """A noise-aware classifier (a method object; runs.py loads one from its run folder) fit for this model."""
        require(classifier, NoiseAwareClassifier, "guide sampling as a noise-aware classifier (train one with "
                "`genlab train noisy-classifier`)")
        theirs, ours = classifier.schedule.betas, self.schedule.betas
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours):
            raise ConfigError(
                f"the classifier was trained on a different noise schedule ({classifier.config.schedule}, "
                f"{len(theirs)} steps) than this model ({self.config.schedule}, {len(ours)} steps): "
                "train it with the same model.schedule and model.num_timesteps"
            )
        d, e = self.data_info, classifier.data_info
        if (d.channels, d.image_size) != (e.channels, e.image_size):
            raise ConfigError(f"the classifier sees {e.channels}x{e.image_size}px images, this model "
                              f"{d.channels}x{d.image_size}px: train it on the same data")
        return classifier.to(self.device).eval()

    @torch.no_grad()
    def invert(self, x0: torch.Tensor, steps: int | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM inversion (eta = 0 run upwards): the noise x_T that DDIM with the same steps maps back to x0."""
        from genlab.diffusion import ddim_invert, make_timesteps

        timesteps = make_timesteps(self.config.num_timesteps, self.config.sample_steps if steps is None else steps,
                                   self.config.spacing)
        return ddim_invert(self.denoiser(labels), x0.to(self.device), self.schedule, timesteps)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        generator: ImageNoise | torch.Generator | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        labels: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        callback: Any = None,
        guidance_scale: float | None = None,
        negative_labels: torch.Tensor | None = None,
        classifier: Any = None,
        classifier_scale: float = 1.0,
        rules: list | None = None,
        backbone_kwargs: BackboneKwargs | None = None,
        **unknown: Any,
    ) -> torch.Tensor:
        """Draw ``n`` images with the configured (or given) sampler, optionally guided.

        - ``generator``: an :class:`~genlab.noise.ImageNoise` (image i's noise, x_T and every step's,
          comes from its own generator, whatever the batch) or a torch.Generator seeding one.
        - ``labels`` (n,) long: the class of each sample (class-conditional model and/or classifier).
        - ``guidance_scale`` w (classifier-free guidance, class-conditional models trained with
          p_uncond > 0): eps = eps_uncond + w (eps_cond - eps_uncond). w = 1 (or None) is the plain
          conditional model, w = 0 the unconditional one, w > 1 stronger conditioning; the
          "(1 + w')" form of Ho & Salimans has w = 1 + w'. ``negative_labels`` (n,) replace the
          unconditional branch (steer away from those classes).
        - ``classifier`` (a noisy-classifier method; ``Run.sample`` loads it from a run folder) with
          ``classifier_scale`` s: classifier guidance towards ``labels`` (shifts DDPM's mean by s Sigma grad, other
          samplers' eps by -sqrt(1 - abar) s grad; Dhariwal & Nichol 2021).
        - ``rules``: rule specs ("symmetry:2", "brightness:1:target=0.3", "module:function", see
          :mod:`genlab.diffusion.guidance`) or (function, weight) pairs, steering x0_hat by gradient.
        - ``backbone_kwargs``: extra inputs of the network computed per call (see :meth:`network`);
          with guidance the callable sees the doubled batch [x_t; x_t].
        """
        if unknown:
            raise ConfigError(f"{self.name} sampling does not take {', '.join(sorted(unknown))}")
        c = self.config
        sampler = sampler or c.sampler
        if steps is None:  # (steps=0 is refused by Run.sample, never silently replaced)
            steps = c.num_timesteps if sampler == "ddpm" and c.sampler != "ddpm" else c.sample_steps
        eta = c.eta if eta is None else eta
        if sampler != "ddim":
            eta = 0.0
        if labels is not None and self.num_classes is None and classifier is None:
            raise ConfigError("--class needs a class-conditional model (train with model.class_conditional=true) "
                              "or a noise-aware classifier (--classifier RUN)")
        if (guidance_scale is not None or negative_labels is not None) and self.num_classes is None:
            raise ConfigError("classifier-free guidance (guidance_scale, negative_labels) needs a class-conditional "
                              "model (train with model.class_conditional=true and p_uncond > 0)")
        if (guidance_scale is not None or negative_labels is not None or classifier is not None) and labels is None:
            raise ConfigError("guidance needs labels: give the class of each sample (--class K)")
        generator = ImageNoise.of(generator, n)
        if noise is None:
            noise = generator.randn(*self._noise_shape())  # (n, C, H, W): x_T of each image
        x = noise.to(self.device)
        if labels is not None:
            labels = torch.as_tensor(labels).long().to(self.device)
            if labels.shape != (len(x),):
                raise ConfigError(f"labels of shape {tuple(labels.shape)}: give one class per sample ({len(x)},)")
        conditioning = labels if self.num_classes is not None else None
        denoise = self.denoiser(conditioning, backbone_kwargs)
        if guidance_scale is not None or negative_labels is not None:
            if negative_labels is not None:
                negative_labels = torch.as_tensor(negative_labels).long().to(self.device)
            denoise = classifier_free_guidance(
                lambda x_t, t, y: self._denoise(x_t, t, y, backbone_kwargs), labels,
                1.0 if guidance_scale is None else float(guidance_scale),
                null_label=self.num_classes, negative_labels=negative_labels,
            )
        mean_shift = None
        if classifier is not None:
            gradient = classifier_log_prob_gradient(self._check_classifier(classifier), labels)
            if sampler == "ddpm":
                mean_shift = classifier_mean_shift(gradient, float(classifier_scale)) if classifier_scale else None
            else:
                denoise = classifier_guidance(denoise, self.schedule, gradient, float(classifier_scale))
        if rules:
            denoise = self._rule_guidance(denoise, rules)
        karras = sampler in ("euler", "heun", "dpmpp-2m")
        x0 = run_sampler(sampler, denoise, x, self.schedule, steps, eta=eta,
                         spacing=c.spacing, generator=generator, callback=callback,
                         clip_denoised=c.clip_denoised if sampler in ("ddpm", "ddim") else None,
                         mean_shift=mean_shift, sigma_max=c.sigma_max if karras else None)
        return self._finish(x0)

    def _finish(self, x0: torch.Tensor) -> torch.Tensor:
        """The sampler's x_0 as the method's output: images clamped to [-1, 1] (latent models override)."""
        return x0.clamp(-1, 1)

    def _noise_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the noise the sampler starts from: an image's (latent models: a latent's)."""
        d = self.data_info
        return (d.channels, d.image_size, d.image_size)

    def _rule_guidance(self, denoise, rules: list):
        """``denoise`` steered by ``rules`` judging the predicted x0 (latent models judge its decoded image)."""
        return rule_guidance(denoise, self.schedule, rules)
