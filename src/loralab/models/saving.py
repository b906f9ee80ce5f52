"""Write loaded components back out: as an A1111-style single file or as a diffusers folder.

Both writes are atomic: the result is assembled next to the target and moved into place, so
an interrupted write never leaves a half-written model where a user expects one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from loralab.errors import CheckpointError
from loralab.models.family import ModelFamily
from loralab.models.loading import StableDiffusionComponents
from loralab.models.single_file import to_single_file_state_dict

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def single_file_state_dict(components: StableDiffusionComponents) -> dict[str, torch.Tensor]:
    """The components' weights under their original single-file names."""
    encoders = components.family.spec.text_encoders
    return to_single_file_state_dict(
        (components.unet.state_dict(), components.unet.config),
        (components.vae.state_dict(), components.vae.config),
        [(model.state_dict(), spec) for model, spec in zip(components.text_encoders, encoders)],
        v_prediction=components.v_prediction,
    )


def save_single_file(
    components: StableDiffusionComponents,
    path: Path | str,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save as one ``.safetensors`` in the original LDM/SGM layout (atomic); returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"single-file checkpoints are written as .safetensors; got {path.name}")
    state = {
        key: (tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)).contiguous()
        for key, tensor in single_file_state_dict(components).items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(state, temp, metadata=metadata)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return path


def _pipeline(components: StableDiffusionComponents) -> DiffusionPipeline:
    """The diffusers pipeline object that owns the folder layout (model_index.json and subfolders)."""
    # Imported here: the pipeline modules pull in far more than loading needs.
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if components.family is ModelFamily.SDXL:
        return StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1],
            unet=components.unet,
            scheduler=components.noise_scheduler,
        )
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoders[0],
        tokenizer=components.tokenizers[0],
        unet=components.unet,
        scheduler=components.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_diffusers_folder(components: StableDiffusionComponents, path: Path | str) -> Path:
    """Save as a diffusers folder (model_index.json + subfolders, safetensors); returns the path.

    Refuses to write into an existing non-empty folder rather than mixing two models.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path} already exists; remove it or choose another output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _pipeline(components).save_pretrained(str(temp), safe_serialization=True)
        if path.exists():
            path.rmdir()  # empty (checked above); a directory cannot be replaced otherwise
        os.replace(temp, path)
    finally:
        if temp.exists():
            shutil.rmtree(temp)
    return path
