"""Use LoRAs on a loaded model: apply them switchably, merge them into the weights, save the result.

Applying (:func:`apply_loras`) adds LoRA modules next to the model's layers; :func:`remove_loras`
takes them out again, so one loaded base model serves any number of LoRAs in turn. Merging
(:func:`merge_loras`) adds ``multiplier * alpha/rank * up @ down`` to the weights themselves, and
:func:`save_merged_checkpoint` writes the components as one single-file (LDM/SGM layout)
safetensors checkpoint that any webui loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loralab.models.loading import StableDiffusionComponents
from loralab.models.saving import save_single_file
from loralab.network.lora import AdaptedLayer, LoRANetwork
from loralab.network.lora_file import LoraFile
from loralab.network.targets import ModelParts


@dataclass(frozen=True)
class LoraUse:
    """One LoRA and how strongly to use it.

    The strength on a layer is ``multiplier * unet_multiplier`` on the UNet and
    ``multiplier * text_encoder_multiplier`` on the text encoder(s).
    """

    lora: LoraFile | LoRANetwork
    multiplier: float = 1.0
    unet_multiplier: float = 1.0
    text_encoder_multiplier: float = 1.0


def _network_for(use: LoraUse, components: ModelParts, strict: bool) -> LoRANetwork:
    network = use.lora if isinstance(use.lora, LoRANetwork) else LoRANetwork.from_lora_file(
        use.lora, components, strict=strict
    )
    network.set_multiplier(use.multiplier, unet=use.unet_multiplier, text_encoder=use.text_encoder_multiplier)
    return network


def apply_loras(components: ModelParts, loras: Sequence[LoraUse], *, strict: bool = True) -> list[LoRANetwork]:
    """Add each LoRA to ``components`` (any checkpoint of the LoRA's family); returns their networks.

    The base weights are not touched: change a strength later with ``network.set_multiplier`` and
    take the LoRAs out with :func:`remove_loras`. Raises ``LoraFileError`` for a LoRA of another
    family or with modules that match no layer (with ``strict=False`` those are only logged).
    """
    networks = [_network_for(use, components, strict) for use in loras]
    applied: list[LoRANetwork] = []
    try:
        for index, network in enumerate(networks):
            network.apply_to(components, adapter_name=f"lora_{index}")
            applied.append(network)
    except BaseException:
        remove_loras(applied)
        raise
    return networks


def remove_loras(networks: Sequence[LoRANetwork]) -> None:
    """Take applied LoRAs out of their model again (in any order), restoring the original layers."""
    for network in networks:
        if network.is_applied:
            network.remove()


@torch.no_grad()
def merge_loras(components: ModelParts, loras: Sequence[LoraUse], *, strict: bool = True) -> None:
    """Add each LoRA's weight change to the weights of ``components`` in place.

    Deltas are computed in fp32 and added in the weights' own dtype. Same errors as :func:`apply_loras`.
    """
    for use in loras:
        network = _network_for(use, components, strict)
        for _name, module, target in network.iter_targets(components):
            weight = target.module.weight
            delta = module.delta_weight().to(weight.device).reshape(weight.shape)
            weight.copy_((weight.float() + delta).to(weight.dtype))


def save_merged_checkpoint(
    components: StableDiffusionComponents,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = torch.float16,
    merged: Sequence[LoraUse] = (),
) -> Path:
    """Write ``components`` (usually after :func:`merge_loras`) as a single-file safetensors checkpoint.

    The models package writes it (original LDM/SGM names, atomic). Refuses while LoRAs are still
    applied as modules: merge them instead. The metadata lists the merged LoRAs and strengths.
    """
    models = [components.unet, *components.text_encoders]
    if any(isinstance(module, AdaptedLayer) for model in models for module in model.modules()):
        raise RuntimeError("remove applied LoRAs (remove_loras) before saving; merge_loras bakes them in")
    metadata = {"loralab_merged_loras": json.dumps([_describe(use) for use in merged])}
    return save_single_file(components, Path(path), dtype=dtype, metadata=metadata)


def _describe(use: LoraUse) -> dict[str, Any]:
    source = use.lora.label if isinstance(use.lora, LoraFile) else "network"
    return {
        "lora": source,
        "multiplier": use.multiplier,
        "unet_multiplier": use.unet_multiplier,
        "text_encoder_multiplier": use.text_encoder_multiplier,
    }
