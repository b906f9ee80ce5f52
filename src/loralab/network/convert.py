"""Convert LoRA files between the kohya format and the PEFT format diffusers loads natively.

PEFT format (what diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` reads without
any conversion): ``<component>.<module path>.lora_A.weight`` (= kohya down) and ``...lora_B.weight``
(= kohya up), ``<component>`` being ``unet``, ``text_encoder`` or ``text_encoder_2`` and the module
path the diffusers/transformers one (SDXL UNet paths too, not SGM ones).

PEFT files carry no per-module alpha tensors; without diffusers' optional ``lora_adapter_metadata``
config a loader uses ``alpha = rank`` (scale 1). So each module's scale ``alpha / rank`` is folded
into ``lora_B``: every loader (diffusers, ComfyUI, webuis) then applies the same delta. The original
alphas are also kept in the ``loralab_alphas`` metadata entry, so converting back to kohya restores
the exact original up weights and alphas.

A kohya name cannot be split back into a module path by text alone (names contain ``_``), so names
are looked up in a table of the layers of a model of the file's family: the real architecture of a
given checkpoint, or else the family's published full-size architecture, built on the meta device
(no memory, no weights).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from loralab.errors import LoraFileError
from loralab.models.architecture import build_empty_model, bundled_config
from loralab.models.family import ModelFamily
from loralab.models.loading import inspect_checkpoint
from loralab.network.lora_file import (
    LoraFile,
    check_family,
    family_label,
    read_lora_file,
    save_lora_file,
    write_safetensors_atomically,
)
from loralab.network.targets import LoraTarget, find_lora_target_details

LoraFormat = Literal["kohya", "peft"]
ALPHAS_METADATA_KEY = "loralab_alphas"


@dataclass
class _EmptyModel:
    """Meta-device components: enough to list a model's LoRA targets and their names."""

    family: ModelFamily
    unet: nn.Module
    text_encoders: list[nn.Module]


def _empty_components(family: ModelFamily, unet_config: Mapping, text_encoder_configs: list[Mapping]) -> _EmptyModel:
    encoders = [
        # A diffusers folder's config.json carries bookkeeping keys CLIPTextConfig does not take.
        build_empty_model("text_encoder", {k: v for k, v in config.items() if not k.startswith("_")}, spec)
        for spec, config in zip(family.spec.text_encoders, text_encoder_configs, strict=True)
    ]
    return _EmptyModel(family, build_empty_model("unet", unet_config), encoders)


def family_layers(family: ModelFamily) -> dict[str, LoraTarget]:
    """Kohya name -> layer (conv layers included) of the family's full-size published architecture."""
    configs = [bundled_config(family, spec.config_name) for spec in family.spec.text_encoders]
    model = _empty_components(family, bundled_config(family, "unet"), configs)
    return find_lora_target_details(model, conv=True)


def checkpoint_layers(checkpoint: str | Path) -> tuple[ModelFamily, dict[str, LoraTarget], dict]:
    """(family, kohya name -> layer, UNet config) of a checkpoint's architecture, read from tensor
    names and shapes only (no weights). Raises ``CheckpointError`` for unreadable checkpoints."""
    info = inspect_checkpoint(checkpoint)
    model = _empty_components(info.family, info.unet_config, info.text_encoder_configs)
    return info.family, find_lora_target_details(model, conv=True), dict(model.unet.config)


def kohya_to_peft(lora: LoraFile, targets: Mapping[str, LoraTarget]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """PEFT-format tensors and metadata for ``lora`` (scale folded into ``lora_B``).

    Raises ``LoraFileError`` for modules that match no layer in ``targets`` or entries that are not
    plain LoRA weights.
    """
    if lora.unsupported_keys:
        raise LoraFileError(
            f"{lora.label} holds {len(lora.unsupported_keys)} entries that are not plain LoRA weights "
            f"(e.g. {lora.unsupported_keys[0]}); only LoRA/LoCon files convert to PEFT"
        )
    modules = lora.modules()
    unknown = sorted(set(modules) - set(targets))
    if unknown:
        raise LoraFileError(
            f"{lora.label}: {len(unknown)} modules match no layer of a {family_label(lora.family)} model "
            f"(e.g. {unknown[0]}); pass the checkpoint the LoRA was made for with --checkpoint"
        )
    tensors: dict[str, Tensor] = {}
    alphas: dict[str, float] = {}
    for name, (down, up, alpha) in modules.items():
        target = targets[name]
        rank = down.shape[0]
        # The table only names layers (it may be the full-size model while the LoRA is for a smaller
        # one), so sizes come from the LoRA; the layer kind fixes the layout PEFT expects: lora_A
        # shaped like the adapted layer (a conv keeps its kernel), lora_B a 1x1 conv for convs.
        if isinstance(target.module, nn.Conv2d):
            kernel = tuple(target.module.kernel_size)
            down_shape = (rank, down[0].numel() // (kernel[0] * kernel[1]), *kernel)
            up_shape = (up.shape[0], rank, 1, 1)
        else:
            down_shape, up_shape = (rank, down[0].numel()), (up.shape[0], rank)
        layer_kernel = tuple(down_shape[2:]) or (1, 1)  # a Linear works like a 1x1 conv
        if down.dim() == 4 and tuple(down.shape[2:]) != layer_kernel:
            raise LoraFileError(
                f"{lora.label}: {name} has a {tuple(down.shape[2:])} kernel but its layer has {layer_kernel}; "
                "the LoRA was made for a different model"
            )
        key = f"{target.component}.{_peft_module_path(target)}"
        tensors[f"{key}.lora_A.weight"] = down.reshape(down_shape).contiguous()
        tensors[f"{key}.lora_B.weight"] = (up.float() * (alpha / rank)).to(up.dtype).reshape(up_shape).contiguous()
        alphas[name] = alpha
    metadata = {key: value for key, value in lora.metadata.items() if not key.startswith("sshs_")}
    metadata[ALPHAS_METADATA_KEY] = json.dumps(alphas)
    return tensors, metadata


def _peft_module_path(target: LoraTarget) -> str:
    # Text-encoder keys keep CLIP's ``text_model.`` level, as every PEFT/diffusers file has it:
    # diffusers drops it again for text encoders built without that level.
    if target.component != "unet" and not target.module_path.startswith("text_model."):
        return "text_model." + target.module_path
    return target.module_path


def peft_to_kohya(lora: LoraFile) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Kohya tensors and metadata for a file read from PEFT format (see ``read_lora_file``).

    Alphas recorded by :func:`kohya_to_peft` are restored (unfolding ``lora_B``); other PEFT files
    get ``alpha = rank`` with their up weights unchanged, which applies the same delta.
    """
    recorded = _recorded_alphas(lora.metadata)
    tensors: dict[str, Tensor] = {}
    for name, (down, up, alpha) in lora.modules().items():
        rank = down.shape[0]
        original = recorded.get(name)
        if original is not None and original > 0 and abs(alpha - rank) < 1e-6:
            up = (up.float() * (rank / original)).to(up.dtype)
            alpha = original
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    metadata = {key: value for key, value in lora.metadata.items() if key != ALPHAS_METADATA_KEY}
    return tensors, metadata


def _recorded_alphas(metadata: Mapping[str, str]) -> dict[str, float]:
    try:
        recorded = json.loads(metadata.get(ALPHAS_METADATA_KEY, "{}"))
    except ValueError:
        return {}
    return {str(k): float(v) for k, v in recorded.items()} if isinstance(recorded, dict) else {}


def convert_lora_file(
    source: str | Path,
    target: str | Path,
    to: LoraFormat,
    *,
    checkpoint: str | Path | None = None,
) -> LoraFile:
    """Convert ``source`` (kohya or PEFT format) to ``to`` and write ``target`` atomically.

    ``checkpoint``: a model of the LoRA's family whose architecture names the layers (needed only
    for models that are not full-size SD1/SD2/SDXL). Tensors keep their dtype. Returns the source
    as read. Raises ``LoraFileError`` for unreadable input, an unknown family, a checkpoint of
    another family, or unmatched modules; ``CheckpointError`` for an unreadable checkpoint.
    """
    targets: dict[str, LoraTarget] | None = None
    unet_config = None
    if checkpoint is not None:
        family, targets, unet_config = checkpoint_layers(checkpoint)
    lora = read_lora_file(source, unet_config=unet_config)
    if checkpoint is not None:
        check_family(lora, family)
    if to == "kohya":
        tensors, metadata = peft_to_kohya(lora)
        save_lora_file(target, tensors, metadata)
        return lora
    if lora.family is None:
        raise LoraFileError(
            f"cannot tell which model family {lora.label} is for; pass a checkpoint of its family with --checkpoint"
        )
    if targets is None:
        targets = family_layers(lora.family)
    tensors, metadata = kohya_to_peft(lora, targets)
    write_safetensors_atomically(Path(target), tensors, metadata)
    return lora
