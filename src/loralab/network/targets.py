"""Which modules a kohya LoRA adapts, and their kohya names.

Standard LoRA (sd-scripts ``networks/lora.py``): every ``Linear`` and 1x1 ``Conv2d`` inside the
UNet's ``Transformer2DModel`` blocks (``proj_in``, ``proj_out``, ``attn1``/``attn2``
``to_q/k/v/out.0``, ``ff.net.0.proj``, ``ff.net.2``) and inside the text encoders' attention and MLP
blocks (``q/k/v/out_proj``, ``fc1``, ``fc2``).

Conv LoRA ("LoCon", sd-scripts' ``conv_dim``): additionally every layer inside the ResNet blocks and
the down/upsamplers. Their 3x3 convs get the conv rank/alpha; their linear and 1x1 layers
(``time_emb_proj``, ``conv_shortcut``) get the ordinary rank/alpha, exactly as sd-scripts does.

Full-size counts (checked in the tests against sd-scripts): SD1.5 text encoder 72, UNet 192 (278 with
conv); SDXL text encoders 72 + 192, UNet 722 (788 with conv).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

from loralab.network.kohya_names import (
    UNET_PREFIX,
    diffusers_unet_path_to_sgm,
    kohya_name,
    text_encoder_kohya_name,
    text_encoder_prefix,
)

if TYPE_CHECKING:
    from loralab.models.family import ModelFamily

_UNET_BLOCKS = (Transformer2DModel,)
_UNET_CONV_BLOCKS = (ResnetBlock2D, Downsample2D, Upsample2D)
_TEXT_ENCODER_BLOCKS = (CLIPAttention, CLIPMLP)

Part = Literal["unet", "text_encoder"]


class ModelParts(Protocol):
    """What target discovery needs from ``StableDiffusionComponents``."""

    family: ModelFamily
    unet: nn.Module
    text_encoders: list[Any]


@dataclass(frozen=True)
class LoraTarget:
    """A module a LoRA can adapt, with where it lives.

    ``component`` is ``"unet"``, ``"text_encoder"`` or ``"text_encoder_2"`` (diffusers' pipeline
    attribute names) and ``module_path`` its diffusers/transformers path inside that component, so a
    kohya name can be turned back into a diffusers/PEFT key.
    """

    module: nn.Linear | nn.Conv2d
    component: str
    module_path: str
    is_conv3x3: bool

    @property
    def part(self) -> Part:
        return "unet" if self.component == "unet" else "text_encoder"


def is_sgm_named(family: ModelFamily | str) -> bool:
    """SDXL LoRA files name UNet modules by their SGM paths; SD1/SD2 by diffusers paths."""
    return str(getattr(family, "value", family)) == "sdxl"


def find_lora_target_details(components: ModelParts, *, conv: bool = False) -> dict[str, LoraTarget]:
    """Kohya LoRA name -> :class:`LoraTarget`, UNet first, then text encoders in order."""
    targets: dict[str, LoraTarget] = {}
    unet = components.unet
    if is_sgm_named(components.family):
        def unet_name(path: str) -> str:
            return kohya_name(UNET_PREFIX, diffusers_unet_path_to_sgm(path, unet.config))
    else:

        def unet_name(path: str) -> str:
            return kohya_name(UNET_PREFIX, path)

    blocks = _UNET_BLOCKS + (_UNET_CONV_BLOCKS if conv else ())
    for path, module in _adaptable_layers(unet, blocks):
        is_conv3x3 = isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)
        targets[unet_name(path)] = LoraTarget(module, "unet", path, is_conv3x3)

    count = len(components.text_encoders)
    for index, encoder in enumerate(components.text_encoders):
        prefix = text_encoder_prefix(index, count)
        component = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        for path, module in _adaptable_layers(encoder, _TEXT_ENCODER_BLOCKS):
            targets[text_encoder_kohya_name(prefix, path)] = LoraTarget(module, component, path, False)
    return targets


def find_lora_targets(components: ModelParts, *, conv: bool = False) -> dict[str, nn.Module]:
    """Kohya LoRA name (without ``.lora_down.weight``) -> the ``Linear``/``Conv2d`` it adapts.

    With ``conv=True`` the ResNet blocks and down/upsamplers are included (LoCon). Modules that
    currently carry LoRA adapters are reported as their original layer, so the table is the same
    before and after a network is applied.
    """
    return {name: target.module for name, target in find_lora_target_details(components, conv=conv).items()}


def _adaptable_layers(model: nn.Module, block_types: tuple[type, ...]) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) for each Linear/Conv2d inside a block of ``block_types``, in module order."""
    seen: set[int] = set()
    for block_path, block in _walk(model, ""):
        if isinstance(block, block_types):
            for path, layer in _walk(block, block_path):
                if isinstance(layer, (nn.Linear, nn.Conv2d)) and id(layer) not in seen:
                    seen.add(id(layer))
                    yield path, layer


def _walk(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    """Like ``named_modules`` but sees through adapter hosts to the original layer they wrap.

    The first name under which a shared module appears wins, as in ``named_modules``.
    """
    from loralab.network.lora import AdaptedLayer  # lora.py builds on this module

    visited: set[int] = set()
    stack = [(path, module)]
    while stack:
        current_path, current = stack.pop()
        if isinstance(current, AdaptedLayer):
            current = current.base
        if id(current) in visited:
            continue
        visited.add(id(current))
        yield current_path, current
        children = [
            (f"{current_path}.{name}" if current_path else name, child)
            for name, child in current.named_children()
        ]
        stack.extend(reversed(children))
