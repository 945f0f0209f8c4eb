"""ctm_core: the math of Consistency Trajectory Models, free of any orchestration.

Orchestration (Ray Tune, SLURM, MLflow) wraps this package; nothing here imports it.
"""
from .ema import EMABank
from .gmm import GaussianMixture
from .losses import (CTMTerms, GridTimes, adaptive_weight, ctm_loss, discriminator_loss, dsm_loss, edm_loss_weight,
                     gan_discriminator_loss, generator_adversarial_loss, last_layer_grad_norm,
                     gan_generator_loss, l1_distance, l2_distance, make_distance, pseudo_huber_distance,
                     sample_cd_times, sample_ctm_times, sample_dsm_times)
from .parameterization import CTMModel, edm_scalings, noise_conditioning
from .process import VEProcess, karras_grid, karras_time
from .samplers import cm_multistep_sample, ctm_consistency_fn, gamma_sample, heun_nfe, heun_sample
from .schedules import WeightSchedule
from .solvers import euler_step, grid_path, heun_step, solve_on_grid, solve_path

__all__ = [name for name in dir() if not name.startswith("_")]
