"""Base models kept loaded across the runs of one process, their frozen weights checked between runs.

Loading a base checkpoint is a large part of a short run; a sweep's variants mostly share one.
:class:`BaseModelPool` loads each base model once (per checkpoint, VAE, tokenizer, prediction
type, dtype and device) and hands the same components to every run that needs them
(``train(..., base_model=components)``). A run applies its LoRA to the components and removes
it when it ends; after each run the pool compares a digest of every frozen tensor with the one
taken at load time, and drops the model when anything differs (it is loaded afresh for the
next run), so a run can never train on weights another run left changed.

The pool holds one model at a time (a sweep seldom alternates base checkpoints, and two SD
models rarely fit in memory together); runs are ordered so that runs sharing a model follow
each other.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any

import torch

from loralab.data.latent_cache import state_dict_digest
from loralab.models.loading import StableDiffusionComponents
from loralab.train.base_model import load_base_model
from loralab.train.precision import config_precision

logger = logging.getLogger(__name__)

ModelKey = tuple[str, str | None, str | None, bool, str, str]


def run_device() -> torch.device:
    """The device a run in this process trains on (what ``train`` picks)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def model_key(config: Any, device: torch.device | None = None) -> ModelKey:
    """What decides the loaded components of ``config``'s base model."""
    return (
        str(config.pretrained_model_name_or_path),
        str(config.vae) if config.vae else None,
        str(config.tokenizer_path) if config.tokenizer_path else None,
        bool(config.v_parameterization),
        str(config_precision(config).base_weight_dtype),
        str(device or run_device()),
    )


@dataclass
class _Loaded:
    key: ModelKey
    components: StableDiffusionComponents
    digest: str


class BaseModelPool:
    """One loaded base model, reused by consecutive runs that share it (see the module docstring)."""

    def __init__(self) -> None:
        self._loaded: _Loaded | None = None
        self.load_count = 0

    def components_for(self, config: Any) -> StableDiffusionComponents:
        """The base model of ``config``, loaded now unless the pool already holds it.

        Raises ``CheckpointError`` for an unusable checkpoint.
        """
        device = run_device()
        key = model_key(config, device)
        if self._loaded is not None and self._loaded.key == key:
            return self._loaded.components
        self.release()
        components = load_base_model(config, device=device)
        self.load_count += 1
        self._loaded = _Loaded(key, components, frozen_digest(components))
        return components

    def check_restored(self) -> bool:
        """After a run: True when the held model's weights are exactly as loaded; else drop it.

        (The run itself has put the modules' modes back; see ``train.base_model``.)
        """
        if self._loaded is None:
            return True
        if frozen_digest(self._loaded.components) == self._loaded.digest:
            return True
        logger.warning("the base model changed during the last run; it is loaded again for the next one")
        self.release()
        return False

    def release(self) -> None:
        """Forget the held model and free its memory."""
        if self._loaded is None:
            return
        self._loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def frozen_digest(components: StableDiffusionComponents) -> str:
    """One digest over every tensor (names, dtypes, shapes, bytes) of the UNet, VAE and text encoders.

    A LoRA left applied changes the module tree and so the names: it shows as a difference too.
    """
    parts = [state_dict_digest(module) for module in (components.unet, components.vae, *components.text_encoders)]
    return "".join(parts)
