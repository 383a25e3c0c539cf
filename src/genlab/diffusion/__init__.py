"""Diffusion core: the noising process, prediction targets and losses, and samplers (SPEC D1-D6)."""

from genlab.diffusion.objectives import (
    PREDICTIONS,
    diffusion_loss,
    loss_weight,
    model_output_to_x0_eps,
    training_target,
)
from genlab.diffusion.samplers import (
    SAMPLERS,
    SPACINGS,
    ddim_invert,
    ddim_step,
    karras_sigmas,
    make_timesteps,
    num_function_evaluations,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)
from genlab.diffusion.schedule import BETA_SCHEDULES, NoiseSchedule, beta_schedule

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTIONS",
    "SAMPLERS",
    "SPACINGS",
    "NoiseSchedule",
    "beta_schedule",
    "ddim_invert",
    "ddim_step",
    "diffusion_loss",
    "karras_sigmas",
    "loss_weight",
    "make_timesteps",
    "model_output_to_x0_eps",
    "num_function_evaluations",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "training_target",
]
