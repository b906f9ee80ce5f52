"""Per-sample loss weights: min-SNR gamma, v-prediction scaling, debiased estimation, prior loss.

The loop computes the per-sample loss ``mse(pred, target).mean((1, 2, 3))``, multiplies it by
``LossWeighting.weights(timesteps, is_reg)`` and takes the mean. Every option sd-scripts
applies to that per-sample loss is a factor that depends only on the timestep's SNR (and on
whether the sample is a regularisation image), so they all live here as one product:

- ``prior_loss_weight``: reg samples weigh ``prior_loss_weight``, training samples 1.
- ``min_snr_gamma``: ``min(snr, gamma) / snr`` for eps targets, ``min(snr, gamma) / (snr + 1)``
  for v targets (sd-scripts' ``apply_snr_weight``).
- ``scale_v_pred_loss_like_noise_pred``: ``snr' / (snr' + 1)`` with ``snr' = min(snr, 1000)``.
- ``v_pred_like_loss``: adds ``v_pred_like_loss * loss / scale``, i.e. a factor
  ``1 + v_pred_like_loss / scale`` with the scale above.
- ``debiased_estimation_loss``: ``1 / sqrt(min(snr, 1000))``, for eps and v alike (sd-scripts'
  released formula; a v-specific variant exists only in an unmerged sd-scripts change).

SNR is ``(sqrt(a) / sqrt(1 - a))**2`` with ``a = alphas_cumprod`` of the DDPM scaled-linear
schedule SD was trained with (beta 0.00085 -> 0.012 over 1000 steps), computed in float32 as
diffusers and sd-scripts do (float32 rounding moves the t = 0 weight by ~3e-5 relative; we keep
it so weights match sd-scripts'), unless the loop passes its scheduler's ``alphas_cumprod``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# The SD1.x/SD2.x/SDXL training schedule: "scaled_linear" betas (linear in sqrt(beta)).
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_NUM_TRAIN_TIMESTEPS = 1000
# sd-scripts caps SNR at 1000 in the v-scaling and debiased weights (SNR is huge near t = 0).
SNR_CAP = 1000.0


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = SD_NUM_TRAIN_TIMESTEPS,
    beta_start: float = SD_BETA_START,
    beta_end: float = SD_BETA_END,
) -> torch.Tensor:
    """``alphas_cumprod`` of the DDPM scaled-linear schedule, as diffusers' ``DDPMScheduler`` builds it."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio per timestep: ``(sqrt(a) / sqrt(1 - a))**2`` (sd-scripts' ``all_snr``)."""
    return (torch.sqrt(alphas_cumprod) / torch.sqrt(1.0 - alphas_cumprod)) ** 2


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma weight: ``min(snr, gamma) / snr`` (eps) or ``min(snr, gamma) / (snr + 1)`` (v)."""
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if v_prediction else clipped / snr


def v_pred_noise_scale(snr: torch.Tensor) -> torch.Tensor:
    """sd-scripts' ``get_snr_scale``: ``snr' / (snr' + 1)`` with ``snr' = min(snr, 1000)``."""
    capped = torch.clamp(snr, max=SNR_CAP)
    return capped / (capped + 1.0)


def debiased_estimation_weight(snr: torch.Tensor) -> torch.Tensor:
    """Debiased estimation weight ``1 / sqrt(min(snr, 1000))``."""
    return 1.0 / torch.sqrt(torch.clamp(snr, max=SNR_CAP))


@dataclass(frozen=True)
class LossWeighting:
    """The loss-weighting options of a run; ``weights()`` turns them into per-sample factors."""

    v_prediction: bool = False
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    prior_loss_weight: float = 1.0

    @property
    def uses_snr(self) -> bool:
        return bool(
            self.min_snr_gamma
            or self.scale_v_pred_loss_like_noise_pred
            or self.v_pred_like_loss
            or self.debiased_estimation_loss
        )

    @classmethod
    def from_config(cls, config: Any) -> LossWeighting:
        """Read the options from a ``TrainConfig`` (``v_parameterization`` sets ``v_prediction``)."""
        values = {
            name: getattr(config, name)
            for name in cls.__dataclass_fields__
            if name != "v_prediction" and getattr(config, name, None) is not None
        }
        return cls(v_prediction=bool(getattr(config, "v_parameterization", False)), **values)

    def weights(
        self,
        timesteps: torch.Tensor,
        is_reg: torch.Tensor | None = None,
        alphas_cumprod: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One float32 factor per sample, on ``timesteps``' device.

        ``is_reg`` marks regularisation samples (bool, one per sample); ``alphas_cumprod``
        defaults to the SD scaled-linear schedule.
        """
        # Computed on the CPU (a handful of numbers), returned on the timesteps' device.
        weight = torch.ones(timesteps.shape[0], dtype=torch.float32)
        if is_reg is not None and self.prior_loss_weight != 1.0:
            prior = torch.where(is_reg.bool().cpu(), self.prior_loss_weight, 1.0).to(weight.dtype)
            weight = weight * prior
        if not self.uses_snr:
            return weight.to(device=timesteps.device)
        if alphas_cumprod is None:
            alphas_cumprod = scaled_linear_alphas_cumprod()
        # Elementwise, so the SNR of the batch's timesteps only is the same as indexing sd-scripts' all_snr.
        snr = snr_from_alphas_cumprod(alphas_cumprod.cpu()[timesteps.long().cpu()])
        if self.min_snr_gamma:
            weight = weight * min_snr_weight(snr, self.min_snr_gamma, self.v_prediction)
        if self.scale_v_pred_loss_like_noise_pred:
            weight = weight * v_pred_noise_scale(snr)
        if self.v_pred_like_loss:
            weight = weight * (1.0 + self.v_pred_like_loss / v_pred_noise_scale(snr))
        if self.debiased_estimation_loss:
            weight = weight * debiased_estimation_weight(snr)
        return weight.to(device=timesteps.device, dtype=torch.float32)
