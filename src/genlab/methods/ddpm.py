"""Pixel-space diffusion (DDPM, Ho et al. 2020) with DDIM, fast samplers, learned variance and
guidance (SPEC D1-D9)."""

from __future__ import annotations

import copy
import functools
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
from genlab.data.micro import MICRO_CONDITIONS, micro_vector
from genlab.errors import ConfigError
from genlab.methods.base import DataInfo, Method
from genlab.methods.capabilities import Denoiser, Generates, NoiseAwareClassifier, require
from genlab.models.dit import DiT as DiTNetwork
from genlab.models.dit import DiTConfig
from genlab.models.unet import UNet, UNetConfig
from genlab.methods.text_conditioning import EMPTY_PROMPT, backbone_text_inputs, encode_prompts, is_trainable
from genlab.methods.text_conditioning import text_encoder_for, training_prompts
from genlab.noise import ImageNoise
from genlab.ranges import NonNegativeFloat, PositiveFloat, PositiveInt, Range, UnitFloat
from genlab.text.encoders import TextEncoderConfig, TextEncoding


NETWORKS = ("unet", "dit")  # the denoisers; each has its own config section model.<network>
# A child run's extra inputs of the frozen backbone: (h, t, condition kwargs) -> keyword arguments (see DDPM.network).
BackboneKwargs = Callable[[torch.Tensor, torch.Tensor, dict], dict]


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
    p_uncond: UnitFloat = 0.1  # label (text: caption -> empty prompt) dropped with this probability (for CFG)
    # Text conditioning (genlab.methods.text_conditioning): the encoder whose token states the denoiser
    # cross-attends to and whose pooled vector joins the time embedding; needs captioned data. None: no text.
    text: TextEncoderConfig | None = None
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
    # SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): the denoiser also sees each image's original
    # size, crop and target size (genlab.data.micro), as recorded by data.random_shift,
    # data.min_original_size and data.fit=buckets; sampling asks for them (crop (0, 0): whole objects).
    micro_conditioning: bool = False

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
        if self.text is not None and self.class_conditional:
            raise ConfigError("model.text and model.class_conditional=true: condition on one of them (text "
                              "prompts can name the class, e.g. 'the digit 3')")
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
        # The text encoder (None: no text); tiny trains with the denoiser, minilm is frozen.
        self.text_encoder = text_encoder_for(config.text, data_info.source) if config.text is not None else None
        self.num_micro = self._num_micro_conditions()
        network = self._make_network(in_channels=self._input_channels() * p * p,
                                     out_channels=outputs * data_info.channels * p * p,
                                     image_size=data_info.image_size // p)
        setattr(config, config.network, network.config)  # the sizes derived for this data, as saved
        self.add_module(self.network_name, network)
        self.schedule = NoiseSchedule.from_name(config.schedule, config.num_timesteps)

    def _make_network(self, in_channels: int, out_channels: int, image_size: int) -> nn.Module:
        """The denoiser model.network names, for (N, in_channels, image_size, image_size) inputs."""
        c = self.config
        width = None if self.text_encoder is None else self.text_encoder.width  # cross-attention and pooled inputs
        extra = {} if width is None else {"context_dim": width, "pooled_dim": width}
        if self.num_micro:
            extra["micro_conditions"] = self.num_micro
        if c.network == "dit":
            return DiTNetwork(c.dit, in_channels=in_channels, out_channels=out_channels, image_size=image_size,
                              num_classes=self.num_classes, **extra)
        return UNet(c.unet, in_channels=in_channels, out_channels=out_channels, image_size=image_size,
                    num_classes=self.num_classes, **extra)

    def _input_channels(self) -> int:
        """Channels the denoiser reads per pixel: the diffused image's (a super-resolution model adds its low-res input's)."""
        return self.data_info.channels

    def _num_micro_conditions(self) -> int:
        """K, the micro-conditions per image the denoiser embeds (0: none)."""
        return len(MICRO_CONDITIONS) if self.config.micro_conditioning else 0

    def default_micro(self, n: int) -> torch.Tensor:
        """The micro-conditions of plain data (n, K): the whole image at the data's size, uncropped."""
        size = self.data_info.image_size
        return micro_vector(n, (size, size)).to(self.device)

    @property
    def network_name(self) -> str:
        """The attribute (and EMA target) holding the denoiser, ``unet`` or ``dit``: its weights are
        saved as "<network_name>.*" and "ema_<network_name>"."""
        return self.config.network

    @property
    def backbone(self) -> nn.Module:
        """The denoising network (``self.unet`` or ``self.dit``)."""
        return getattr(self, self.network_name)

    def network(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | TextEncoding | None = None,
                backbone_kwargs: BackboneKwargs | None = None, micro: torch.Tensor | None = None,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """The model's output at full resolution: (N, C, H, W) -> (N, C, H, W), or (N, 2C, H, W) with
        learn_sigma (the prediction's channels first, then the variance's). ``y``: class labels (N,), or
        a text model's prompt encodings (None: the null class / the empty prompt).

        ``micro`` (N, K): micro-conditions (None: :meth:`default_micro`); ``condition`` (N, C', H, W): an
        image joined to x_t as extra input channels (a super-resolution model's up-sampled input).
        Classifier-free guidance runs [x_t; x_t] in one batch: inputs with fewer rows are repeated.
        ``backbone_kwargs(h, t, inputs)``, when given, returns extra keyword arguments of the backbone
        computed from its input h (after the pixel patch) and its other keyword arguments (labels or
        token states, mask and pooled vector; micro-conditions): how a child run (ControlNet,
        T2I-Adapter) steers this frozen network (``down_residuals``, ``adapter_features`` of the U-Net).
        """
        inputs = self._condition(y, len(x_t))
        if self.num_micro:
            micro = self.default_micro(len(x_t)) if micro is None else micro
            inputs["micro"] = _repeat_rows(micro, len(x_t))  # (N, K)
        if condition is not None:
            x_t = torch.cat([x_t, _repeat_rows(condition, len(x_t))], dim=1)  # (N, C + C', H, W)
        p = self.config.patch_size
        h = x_t if p == 1 else F.pixel_unshuffle(x_t, p)  # (N, C p^2, H / p, W / p)
        steering = {} if backbone_kwargs is None else backbone_kwargs(h, t, inputs)
        output = self.backbone(h, t, **inputs, **steering)  # (N, C_out p^2, H / p, W / p)
        # pixel_shuffle maps input channels [k p^2, (k + 1) p^2) to output channel k, so the first
        # C p^2 U-Net channels (the prediction) become the first C output channels.
        return output if p == 1 else F.pixel_shuffle(output, p)  # (N, C or 2C, H, W)

    def _condition(self, y: torch.Tensor | TextEncoding | None, n: int) -> dict[str, Any]:
        """The denoiser's keyword arguments for condition ``y``: labels, or (text models) token states, mask and
        pooled vector, those of the empty prompt when ``y`` is None."""
        if self.text_encoder is None:
            return {"y": y}
        if y is None:
            y = self.encode_prompts([EMPTY_PROMPT] * n)
        return backbone_text_inputs(y)

    def encode_prompts(self, prompts: list[str]) -> TextEncoding:
        """The text encoder's encodings of prompts (gradients only while a trainable encoder trains)."""
        if self.text_encoder is None:
            raise ConfigError(f"this {self.name} run has no text encoder: prompts need a model.text section")
        return encode_prompts(self.text_encoder, prompts)

    def _steered_network(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                         backbone_kwargs: BackboneKwargs | None = None, **inputs: Any) -> torch.Tensor:
        """:meth:`network`, called as ``network(x_t, t, y)`` when nothing steers it and there are no extra
        inputs (what overrides and test doubles of ``network`` expect)."""
        if backbone_kwargs is not None:
            inputs["backbone_kwargs"] = backbone_kwargs
        return self.network(x_t, t, y, **inputs)

    def _split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, v) of a network output; v = (raw + 1) / 2 as in improved DDPM's code, None
        without learn_sigma."""
        if not self.config.learn_sigma:
            return output, None
        prediction, raw = output.chunk(2, dim=1)  # (N, C, H, W) each
        return prediction, (raw + 1) / 2

    def ema_targets(self) -> dict[str, nn.Module]:
        targets = {self.network_name: self.backbone}
        if self.text_encoder is not None and is_trainable(self.text_encoder):  # tiny learns with the denoiser
            targets["text_encoder"] = self.text_encoder
        return targets

    def training_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """Ho et al. 2020 Alg. 1: t ~ U{0..T-1}, x_t = q_sample(x0, t, eps), regress the target."""
        c = self.config
        x0 = self._diffused(batch["image"])  # (n, C, H, W): images in [-1, 1] (latent models: latents)
        t = ctx.randint(*self._training_timesteps())  # (n,)
        noise = ctx.randn(*x0.shape[1:])  # (n, C, H, W)
        y = self.training_labels(batch, ctx)
        loss, logs = self.loss(x0, t, noise, y, **self._network_inputs(batch, x0, ctx))
        ctx.optimize(loss)
        return {"loss": loss.detach(), **logs}

    def training_labels(self, batch: dict[str, Any], ctx) -> torch.Tensor | TextEncoding | None:
        """The batch's condition: labels (n,), each dropped to the null class with probability p_uncond, or (text
        models) the encodings of one caption per image, dropped to the empty prompt with p_uncond; None: unconditional."""
        if self.text_encoder is not None:
            return self.encode_prompts(training_prompts(batch, ctx, self.config.p_uncond))
        if self.num_classes is None:
            return None
        y = batch["label"].clone()
        drop = ctx.rand() < self.config.p_uncond  # classifier-free guidance: learn p(x) with the null class
        y[drop] = self.num_classes
        return y

    def _training_timesteps(self) -> tuple[int, int]:
        """[low, high) of the training timesteps t ~ U{low..high-1}: all of them (a refiner: the low-noise ones)."""
        return 0, self.config.num_timesteps

    def _network_inputs(self, batch: dict[str, Any], x0: torch.Tensor, ctx) -> dict[str, torch.Tensor]:
        """Extra inputs of the network for a training batch: the micro-conditions the data recorded."""
        return {"micro": batch.get("micro")} if self.num_micro else {}

    def loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor | None = None,
             backbone_kwargs: BackboneKwargs | None = None, **inputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective at given (x0, t, noise, labels): (loss, extra logs). x0 is what is
        diffused (latent models: the scaled latents); ``backbone_kwargs`` and ``inputs`` (micro, condition)
        as in :meth:`network`."""
        c = self.config
        x_t = self.schedule.q_sample(x0, t, noise)
        output, v = self._split(self._steered_network(x_t, t, y, backbone_kwargs, **inputs))
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
                     batch_size: int = 500, prompt: str | None = None) -> float:
        """The training loss on held-out images (N, C, H, W) in [-1, 1], with t and noise drawn from
        ``seed`` (the same draws for every run: runs of one data set are compared on equal terms)
        and the true labels (no condition dropout); a text run conditions every image on ``prompt``
        (the same draws for every prompt: how well each prompt explains the images). Lower is better;
        comparable between runs with the same prediction target, schedule and weighting."""
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
            if prompt is not None:
                y = self.encode_prompts([prompt] * len(x0))
            else:
                y = None if self.num_classes is None or labels is None else labels[start: start + len(x0)].to(self.device)
            loss, _ = self.loss(x0, t, noise, y)
            total += float(loss) * len(x0)
        return total / n

    def _diffused(self, images: torch.Tensor) -> torch.Tensor:
        """What the model diffuses, from images in [-1, 1]: the images (latent models: their latents)."""
        return images

    def denoiser(self, y: torch.Tensor | None = None, backbone_kwargs: BackboneKwargs | None = None, **inputs: Any):
        """The eps-predicting callable the samplers expect: denoise(x_t, t) -> eps_hat, or
        (eps_hat, v) with learn_sigma. ``backbone_kwargs``, ``inputs`` (micro, condition): see :meth:`network`."""
        return lambda x_t, t: self._denoise(x_t, t, y, backbone_kwargs, **inputs)

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                 backbone_kwargs: BackboneKwargs | None = None, **inputs: Any):
        """eps_hat (or (eps_hat, v)) at (x_t, t) with labels y (None: unconditional/null class)."""
        output, v = self._split(self._steered_network(x_t, t, y, backbone_kwargs, **inputs))
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
        prompts: list[str] | None = None,
        negative_prompts: list[str] | None = None,
        classifier: Any = None,
        classifier_scale: float = 1.0,
        rules: list | None = None,
        backbone_kwargs: BackboneKwargs | None = None,
        micro: torch.Tensor | None = None,
        crop: tuple[int, int] | None = None,
        original_size: int | tuple[int, int] | None = None,
        target_size: int | tuple[int, int] | None = None,
        condition: torch.Tensor | None = None,
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
        - ``prompts`` (n strings; text models): the caption of each sample; without them every sample
          gets the empty prompt (the unconditional model). With ``guidance_scale`` w the unconditional
          branch is the empty prompt, and ``negative_prompts`` (n strings) replace it.
        - ``classifier`` (a noisy-classifier method; ``Run.sample`` loads it from a run folder) with
          ``classifier_scale`` s: classifier guidance towards ``labels`` (shifts DDPM's mean by s Sigma grad, other
          samplers' eps by -sqrt(1 - abar) s grad; Dhariwal & Nichol 2021).
        - ``rules``: rule specs ("symmetry:2", "brightness:1:target=0.3", "module:function", see
          :mod:`genlab.diffusion.guidance`) or (function, weight) pairs, steering x0_hat by gradient.
        - ``backbone_kwargs``: extra inputs of the network computed per call (see :meth:`network`);
          with guidance the callable sees the doubled batch [x_t; x_t].
        - micro-conditioned models (model.micro_conditioning): ``crop`` (top, left) (default (0, 0):
          whole, centred objects), ``original_size`` (default: the target size) and ``target_size``
          (h, w) or N (default: the data's size; another bucket's shape for multi-aspect models), or
          ``micro`` (n, 6) directly. ``condition`` (n, C', H, W): a conditioning image (super-resolution).
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
        text = self.text_encoder is not None
        if (prompts is not None or negative_prompts is not None) and not text:
            raise ConfigError("prompts need a text-conditioned model (train with a model.text section on captioned "
                              "data, e.g. --preset text_small --data mnist-captions)")
        if labels is not None and self.num_classes is None and classifier is None:
            raise ConfigError("--class needs a class-conditional model (train with model.class_conditional=true) "
                              "or a noise-aware classifier (--classifier RUN)")
        if (guidance_scale is not None and not text or negative_labels is not None) and self.num_classes is None:
            raise ConfigError("classifier-free guidance (guidance_scale, negative_labels) needs a class-conditional "
                              "model (train with model.class_conditional=true and p_uncond > 0)")
        if text and (guidance_scale is not None or negative_prompts is not None) and prompts is None:
            raise ConfigError("classifier-free guidance of a text model needs prompts (--prompt TEXT)")
        if (guidance_scale is not None and not text or negative_labels is not None or classifier is not None) and labels is None:
            raise ConfigError("guidance needs labels: give the class of each sample (--class K)")
        generator = ImageNoise.of(generator, n)
        inputs = self._sampling_inputs(n, micro, crop, original_size, target_size, condition)
        if noise is None:
            shape = self._noise_shape()
            if target_size is not None:  # a multi-aspect model asked for another bucket
                shape = (shape[0], *_size_pair(target_size))
            noise = generator.randn(*shape)  # (n, C, H, W): x_T of each image
        x = noise.to(self.device)
        if labels is not None:
            labels = torch.as_tensor(labels).long().to(self.device)
            if labels.shape != (len(x),):
                raise ConfigError(f"labels of shape {tuple(labels.shape)}: give one class per sample ({len(x)},)")
        conditioning = labels if self.num_classes is not None else None
        if text:
            conditioning = self.encode_prompts(self._per_sample(prompts, len(x), "prompts"))
        denoise = self.denoiser(conditioning, backbone_kwargs, **inputs)
        guided = functools.partial(self._denoise, backbone_kwargs=backbone_kwargs, **inputs)  # (x_t, t, y) -> eps
        if text and (guidance_scale is not None or negative_prompts is not None):
            # The unconditional branch is the empty prompt caption dropout trained; a negative prompt replaces it.
            empty = self.encode_prompts([EMPTY_PROMPT] * len(x))
            negative = None if negative_prompts is None else self.encode_prompts(
                self._per_sample(negative_prompts, len(x), "negative_prompts"))
            denoise = classifier_free_guidance(guided, conditioning, 1.0 if guidance_scale is None else float(guidance_scale),
                                               unconditional=empty, negative_labels=negative)
        elif guidance_scale is not None or negative_labels is not None:
            if negative_labels is not None:
                negative_labels = torch.as_tensor(negative_labels).long().to(self.device)
            denoise = classifier_free_guidance(
                guided, labels, 1.0 if guidance_scale is None else float(guidance_scale),
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

    @staticmethod
    def _per_sample(prompts: list[str] | None, n: int, name: str) -> list[str]:
        """``prompts`` checked to be n strings (None: n empty prompts, the unconditional model)."""
        if prompts is None:
            return [EMPTY_PROMPT] * n
        if isinstance(prompts, str) or len(prompts) != n or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"{name}: give a list of {n} strings, one per sample (Run.sample also takes one prompt for all)")
        return list(prompts)
    def _sampling_inputs(self, n: int, micro: torch.Tensor | None, crop, original_size, target_size,
                         condition: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The network's extra inputs for sampling n images: micro-conditions from the user's words, a condition image."""
        inputs = {} if condition is None else {"condition": condition.to(self.device)}
        asked = [name for name, v in (("crop", crop), ("original_size", original_size), ("target_size", target_size))
                 if v is not None]
        if asked and not self.config.micro_conditioning:
            raise ConfigError(f"--{asked[0].replace('_', '-')} needs a micro-conditioned model: train it with "
                              "model.micro_conditioning=true (and data.random_shift / data.min_original_size / data.fit=buckets)")
        if micro is None and self.config.micro_conditioning:
            size = self.data_info.image_size
            target = _size_pair(target_size if target_size is not None else size)
            original = None if original_size is None else _size_pair(original_size)
            micro = micro_vector(n, target, original, tuple(crop) if crop is not None else (0, 0))
        if micro is not None:
            inputs["micro"] = torch.as_tensor(micro, dtype=torch.float32).to(self.device)
        return inputs

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


def _repeat_rows(v: torch.Tensor, n: int) -> torch.Tensor:
    """``v`` (M, ...) repeated to n rows (n a multiple of M: classifier-free guidance's doubled batch)."""
    return v if len(v) == n else v.repeat(n // len(v), *([1] * (v.ndim - 1)))


def _size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """A size N or (h, w) as (h, w)."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
