"""Use LoRAs on a loaded model: apply them switchably, fuse or merge them into the weights, save the result.

Applying (:func:`apply_loras`) adds LoRA modules next to the model's layers; :func:`remove_loras`
takes them out again, so one loaded base model serves any number of LoRAs in turn (training uses
this: its LoRA must stay a module to learn). Merging (:func:`merge_loras`) adds
``multiplier * alpha/rank * up @ down`` to the weights themselves for good, and
:func:`save_merged_checkpoint` writes the components as one single-file (LDM/SGM layout)
safetensors checkpoint that any webui loads. Fusing (:func:`fuse_loras`) merges the same way but
keeps a copy of each weight it changes, and :meth:`FusedLoras.restore` copies them back bit for bit:
inference then runs at the speed of the bare model (no LoRA term per layer and step), as A1111
renders with LoRAs.
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
from loralab.network.lora import AdaptedLayer, LoRAModule, LoRANetwork
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


def _weight_changes(
    components: ModelParts, loras: Sequence[LoraUse], strict: bool
) -> list[tuple[torch.Tensor, list[tuple[LoRAModule, float]]]]:
    """Each weight the LoRAs change, with the (LoRA module, multiplier) pairs that change it.

    Modules at multiplier 0 are left out, so a LoRA at weight 0 touches no weight at all (adding a
    zero delta would still turn a ``-0.0`` into ``0.0``). The multiplier is read as each use is
    resolved, so one network used twice at two strengths counts twice.
    """
    changes: dict[int, tuple[torch.Tensor, list[tuple[LoRAModule, float]]]] = {}
    for use in loras:
        network = _network_for(use, components, strict)
        for _name, module, target in network.iter_targets(components):
            if module.multiplier != 0.0:
                weight = target.module.weight
                changes.setdefault(id(weight), (weight, []))[1].append((module, module.multiplier))
    return list(changes.values())


@torch.no_grad()
def _add_deltas(weight: torch.Tensor, modules: Sequence[tuple[LoRAModule, float]]) -> None:
    """``weight += sum of the modules' deltas``: summed in fp32, rounded to the weight's dtype once."""
    total = weight.float()
    for module, multiplier in modules:
        total = total + module.delta_weight(multiplier).to(weight.device).reshape(weight.shape)
    weight.copy_(total.to(weight.dtype))


def merge_loras(components: ModelParts, loras: Sequence[LoraUse], *, strict: bool = True) -> None:
    """Add each LoRA's weight change to the weights of ``components`` in place.

    Deltas are computed in fp32 and added in the weights' own dtype. Same errors as :func:`apply_loras`.
    """
    for weight, modules in _weight_changes(components, loras, strict):
        _add_deltas(weight, modules)


class FusedLoras:
    """LoRAs fused into a model's weights by :func:`fuse_loras`, and the original weights to restore.

    Holds a copy of each weight a LoRA changed (only those) on the CPU, as A1111 keeps its
    backups, so fusing costs no accelerator memory. :meth:`restore` copies them back (bit for bit,
    never by subtracting the delta again, which would leave rounding behind) and frees them; it is
    safe to call twice.
    """

    def __init__(self) -> None:
        self._backups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (live weight, its original)

    @property
    def layer_count(self) -> int:
        """How many weights are changed (and backed up) now."""
        return len(self._backups)

    @torch.no_grad()
    def _fuse(self, weight: torch.Tensor, modules: Sequence[tuple[LoRAModule, float]]) -> None:
        self._backups.append((weight, weight.detach().to("cpu", copy=True)))
        _add_deltas(weight, modules)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every changed weight back to its original values and drop the copies."""
        while self._backups:
            weight, original = self._backups.pop()
            weight.copy_(original)


def fuse_loras(components: ModelParts, loras: Sequence[LoraUse], *, strict: bool = True) -> FusedLoras:
    """Merge ``loras`` into the weights of ``components`` until the returned handle's ``restore()``.

    The weights change exactly as :func:`merge_loras` changes them (fp32 deltas, several LoRAs on
    one layer summed before rounding to the weight's dtype once); layers no LoRA changes are
    neither touched nor copied. Fuse files' LoRAs only: a network being trained must stay applied
    as modules (:func:`apply_loras`) to receive gradients. A failure part way restores what was
    already fused before it raises. Same errors as :func:`apply_loras`.
    """
    fused = FusedLoras()
    try:
        for weight, modules in _weight_changes(components, loras, strict):
            fused._fuse(weight, modules)
    except BaseException:
        fused.restore()
        raise
    return fused


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
