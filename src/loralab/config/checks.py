"""Checks between fields of a ``TrainConfig``, run when the config is built.

Each check says what is wrong and what to do in one line (``ConfigError``). Where a pipeline
stage already owns a rule (bucket settings, precision, timestep range) the check calls that
stage's own validation, so the rule lives in one place and fails at load time instead of
minutes into a run.

Rules from sd-scripts:

- SDXL with v2; weighted captions on SDXL; xformers together with sdpa;
- full_fp16 / full_bf16 without the matching mixed_precision;
- a non-zero adaptive_noise_scale without noise_offset (sd-scripts refuses 0 too, which does
  nothing, so loralab lets 0 through);
- scale_v_pred_loss_like_noise_pred without v_parameterization; v_pred_like_loss with it;
- cached latents with color_aug or random_crop; cached text-encoder outputs while the text
  encoder trains or while captions change (shuffling, dropout);
- both network_train_*_only flags;
- bucket settings (resolution divisible by bucket_reso_steps, a multiple of 8, within
  min/max_bucket_reso) and the timestep range;
- optimizer_args keys against the optimizer's signature.

loralab adds: conv_alpha needs conv_dim. v_parameterization with SDXL is allowed (v-pred SDXL
checkpoints exist; current sd-scripts only warns).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from loralab.errors import ConfigError

if TYPE_CHECKING:
    from loralab.config.schema import TrainConfig

log = logging.getLogger(__name__)


def check_config(config: TrainConfig) -> None:
    """Raise ConfigError for the first invalid combination of settings in ``config``."""
    _check_model(config)
    _check_caching(config)
    _check_network(config)
    _check_loss(config)
    _check_stage_rules(config)
    _check_optimizer(config)


def _check_model(config: TrainConfig) -> None:
    if config.sdxl and config.v2:
        raise ConfigError("sdxl and v2 are both set; an SDXL checkpoint is not SD 2.x, unset v2")
    if config.xformers and config.sdpa:
        raise ConfigError("xformers and sdpa are both set; choose one attention implementation")
    if config.weighted_captions and config.sdxl:
        raise ConfigError("weighted_captions is not supported for SDXL (as in sd-scripts); unset it")


def _check_caching(config: TrainConfig) -> None:
    if config.cache_latents or config.cache_latents_to_disk:
        for name in ("color_aug", "random_crop"):
            if getattr(config, name):
                raise ConfigError(
                    f"{name} changes the image every epoch and cannot be used with cached latents; "
                    f"unset {name} or cache_latents/cache_latents_to_disk"
                )
    if config.cache_text_encoder_outputs or config.cache_text_encoder_outputs_to_disk:
        if not config.network_train_unet_only:
            raise ConfigError(
                "cache_text_encoder_outputs needs network_train_unet_only: the text encoders cannot "
                "train on cached outputs"
            )
        caption_changers = (
            "shuffle_caption",
            "caption_dropout_rate",
            "caption_tag_dropout_rate",
            "caption_dropout_every_n_epochs",
        )
        for name in caption_changers:
            if getattr(config, name):
                raise ConfigError(
                    f"{name} changes captions during training and cannot be used with cached "
                    f"text-encoder outputs; unset {name} or cache_text_encoder_outputs"
                )


def _check_network(config: TrainConfig) -> None:
    if config.network_train_unet_only and config.network_train_text_encoder_only:
        raise ConfigError(
            "network_train_unet_only and network_train_text_encoder_only are both set; nothing would train"
        )
    if config.conv_alpha is not None and config.conv_dim is None:
        raise ConfigError("conv_alpha is set without conv_dim; set conv_dim to train the 3x3 conv layers (LoCon)")


def _check_loss(config: TrainConfig) -> None:
    # sd-scripts also refuses adaptive_noise_scale = 0 here; a 0 does nothing, so it is let through.
    if config.adaptive_noise_scale and config.noise_offset is None:
        raise ConfigError("adaptive_noise_scale needs noise_offset; set noise_offset (e.g. 0.05)")
    if config.scale_v_pred_loss_like_noise_pred and not config.v_parameterization:
        raise ConfigError("scale_v_pred_loss_like_noise_pred only applies with v_parameterization")
    if config.v_pred_like_loss and config.v_parameterization:
        raise ConfigError("v_pred_like_loss cannot be used with v_parameterization (the loss already is v)")


def _check_stage_rules(config: TrainConfig) -> None:
    from loralab.data.buckets import BucketManager
    from loralab.train.noise import NoiseSettings
    from loralab.train.precision import config_precision

    BucketManager.from_config(config)
    config_precision(config)
    NoiseSettings.from_config(config).timestep_range()


def _check_optimizer(config: TrainConfig) -> None:
    from loralab.train.optimizers import OptimizerPackageMissing, validate_optimizer_args

    try:
        validate_optimizer_args(config.optimizer_type, config.optimizer_args)
    except OptimizerPackageMissing as exc:
        # Planning or converting a config must not need a GPU-only package; training will.
        if config.optimizer_args:  # else there is nothing left unchecked to warn about
            log.warning("optimizer_args not checked: %s", exc)
