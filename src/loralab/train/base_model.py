"""A base model loaded once and lent to several runs in one process (a sweep's), handed back as lent.

``train(config, base_model=components)`` trains on components the caller already loaded instead of
loading the checkpoint again. A run changes a few things on the model it trains: it applies its
LoRA, may cast the VAE, sets the attention kernel, may switch gradient checkpointing on, and puts
modules in train mode. :func:`lend_base_model` checks that the components fit the run and
registers, on the run's exit stack, the undoing of each of those changes, so it happens on every
way out of the run: completion, interruption, a non-finite loss, or an exception. The frozen
weights themselves are never written by a run (the LoRA lives in its own modules).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from loralab.errors import ConfigError
from loralab.models.loading import StableDiffusionComponents, load_checkpoint
from loralab.train.precision import config_precision


def load_base_model(config: Any, *, device: torch.device) -> StableDiffusionComponents:
    """The config's base checkpoint (with its VAE, tokenizer and prediction-type settings), frozen
    weights in the run's weight dtype, on ``device``. Raises ``CheckpointError`` for an unusable one."""
    return load_checkpoint(
        config.pretrained_model_name_or_path,
        v_parameterization=True if config.v_parameterization else None,
        vae_path=config.vae,
        tokenizer_path=config.tokenizer_path,
        dtype=config_precision(config).base_weight_dtype,
        device=device,
    )


def reset_to_loaded_modes(components: StableDiffusionComponents) -> None:
    """Frozen, in eval mode, without gradient checkpointing: how ``load_checkpoint`` returns a model."""
    for module in (components.unet, components.vae, *components.text_encoders):
        module.eval()
        module.requires_grad_(False)
    if components.unet.is_gradient_checkpointing:
        components.unet.disable_gradient_checkpointing()
    for encoder in components.text_encoders:
        # transformers renamed it (the old name warns); switching it off when off is harmless.
        getattr(encoder, "activation_checkpointing_disable", encoder.gradient_checkpointing_disable)()


def lend_base_model(
    components: StableDiffusionComponents, *, device: torch.device, weight_dtype: torch.dtype, cleanup: ExitStack
) -> StableDiffusionComponents:
    """Check that ``components`` can serve a run on ``device`` with frozen weights in ``weight_dtype``,
    and register on ``cleanup`` what hands them back as they are now.

    Raises ``ConfigError`` when they are on another device or in another dtype (the run would
    otherwise cast a model that others share).
    """
    unet_parameter = next(components.unet.parameters())
    if unet_parameter.device.type != device.type:
        raise ConfigError(f"the lent base model is on {unet_parameter.device}, but this run trains on {device}")
    if unet_parameter.dtype != weight_dtype:
        raise ConfigError(
            f"the lent base model is in {unet_parameter.dtype}, but this run's precision needs {weight_dtype}; "
            f"load it in {weight_dtype} or let the run load its own"
        )
    vae_dtype = components.vae.dtype
    attention_processors = dict(components.unet.attn_processors)

    def hand_back() -> None:
        if components.vae.dtype != vae_dtype:
            components.vae.to(dtype=vae_dtype)
        components.unet.set_attn_processor(attention_processors)
        reset_to_loaded_modes(components)

    cleanup.callback(hand_back)
    return components
