"""LoRA modules (kohya LoRA / LoCon) as real modules in the model tree, and the network of them.

A LoRA adapts one ``Linear`` or ``Conv2d`` layer with weight ``W``::

    y = W x + multiplier * scale * up(rank_mask * dropout(down(x)))      scale = alpha / rank

``down`` maps the input to ``rank`` channels (for a conv: a conv with the layer's own kernel, stride
and padding), ``up`` maps back (a 1x1 conv for convs). ``alpha`` 0 or missing means ``alpha = rank``
(scale 1). The three dropouts are sd-scripts' and act only in training mode:

* network dropout (``dropout``): ordinary dropout on the ``rank`` channels, after ``down``;
* rank dropout: a random subset of the rank channels is zeroed per sample and ``scale`` is divided
  by ``1 - rank_dropout`` (sd-scripts treats it as a temporary change of rank);
* module dropout: with that probability the whole LoRA of a layer is skipped for the step.

Why an own module instead of peft's ``LoraConfig``: peft covers rank/alpha/dropout, but not
sd-scripts' rank and module dropout, it keys per-module alpha and rank by regex patterns rather
than per module, and its adapters name their weights ``lora_A``/``lora_B`` under peft's own tree,
so every save and load would need a conversion anyway. The kohya file is the contract; a module
whose state dict *is* the kohya file keeps that contract visible. diffusers' peft-based loader is
used in the tests as the independent judge of our files.

The network is applied by replacing each adapted layer in its parent with an :class:`AdaptedLayer`
that keeps the original layer as ``base`` and holds the adapters; removing the network puts the
original layer back. Nothing is patched in place, several networks can be applied side by side,
and switching LoRAs never reloads the base model.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from loralab.errors import ConfigError, LoraFileError
from loralab.network.lora_file import LoraFile, check_family, family_label
from loralab.network.targets import LoraTarget, ModelParts, Part, find_lora_target_details

if TYPE_CHECKING:
    from loralab.models.family import ModelFamily

logger = logging.getLogger(__name__)

NETWORK_MODULE = "networks.lora"  # what ``ss_network_module`` says: the format is sd-scripts' LoRA


def lora_delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * up @ down`` as a weight delta (fp32) shaped like the adapted layer's weight.

    ``down`` is ``[rank, in]`` (Linear) or ``[rank, in, kh, kw]`` (Conv2d); ``up`` is ``[out, rank]``
    or ``[out, rank, 1, 1]``. For a kxk conv the composition of ``down`` and the 1x1 ``up`` is the
    single kxk conv ``delta[o, i] = sum_r up[o, r] * down[r, i]``.
    """
    up2 = up.float().flatten(1)
    if down.dim() == 2:
        return scale * (up2 @ down.float())
    return scale * torch.einsum("or,rihw->oihw", up2, down.float())


class LoRAModule(nn.Module):
    """One LoRA: the low-rank term ``multiplier * scale * up(rank_mask * dropout(down(x)))``.

    Its state dict is the kohya one: ``lora_down.weight``, ``lora_up.weight`` and a 0-dim ``alpha``.
    Weights are created in fp32 on the layer's device (on CPU when the layer is a ``meta``
    placeholder, so files can be checked against full-size architectures without their weights).
    ``down`` starts Kaiming-uniform and ``up`` at zero, as sd-scripts does: a new LoRA changes
    nothing until it is trained.
    """

    def __init__(
        self,
        layer: nn.Linear | nn.Conv2d,
        rank: int,
        alpha: float | None = None,
        *,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        device = layer.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        factory = {"device": device, "dtype": torch.float32}
        if isinstance(layer, nn.Conv2d):
            self.lora_down: nn.Module = nn.Conv2d(
                layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False, **factory
            )
            self.lora_up: nn.Module = nn.Conv2d(rank, layer.out_channels, (1, 1), (1, 1), bias=False, **factory)
        elif isinstance(layer, nn.Linear):
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False, **factory)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False, **factory)
        else:
            raise TypeError(f"LoRA adapts Linear and Conv2d layers, not {type(layer).__name__}")
        # Drawn where the generator lives (the CPU for a seeded run) and copied over, so a seed gives
        # the same initial LoRA on every device.
        initial_down = torch.empty(
            self.lora_down.weight.shape, dtype=torch.float32, device=generator.device if generator else device
        )
        nn.init.kaiming_uniform_(initial_down, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_down.weight.copy_(initial_down)
        nn.init.zeros_(self.lora_up.weight)
        self.rank = rank
        alpha = float(rank) if not alpha else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=device))
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.multiplier = 1.0  # the network sets it from its per-LoRA and per-part multipliers

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA term for input ``x``, or None when module dropout skips this layer this step."""
        if self.module_dropout and self.training and torch.rand(1).item() < self.module_dropout:
            return None
        hidden = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout and self.training:
            hidden = F.dropout(hidden, p=self.dropout)
        scale = self.alpha / self.rank
        if self.rank_dropout and self.training:
            keep = torch.rand((hidden.shape[0], self.rank), device=hidden.device) > self.rank_dropout
            if hidden.dim() == 3:  # tokens: [batch, tokens, rank]
                keep = keep.unsqueeze(1)
            elif hidden.dim() == 4:  # conv: [batch, rank, h, w]
                keep = keep[:, :, None, None]
            hidden = hidden * keep
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(hidden) * (self.multiplier * scale)

    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """The weight change this LoRA makes at ``multiplier`` (default: its current one), fp32, layer-shaped."""
        multiplier = self.multiplier if multiplier is None else multiplier
        return lora_delta_weight(self.lora_down.weight, self.lora_up.weight, multiplier * self.scale)


class AdaptedLayer(nn.Module):
    """A ``Linear``/``Conv2d`` with LoRAs added: ``y = base(x) + sum(adapter(x) for adapter in adapters)``.

    ``base`` is the original layer object, untouched. Each adapter computes in its own dtype (fp32
    LoRA weights on an fp16 model) and its output is cast to the layer's output dtype.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()

    # Code that reads a layer's parameters directly (dtype checks, fused projections) sees the original.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for adapter in self.adapters.values():
            delta = adapter(x)
            if delta is not None:
                out = out + delta.to(out.dtype)
        return out


@dataclass(frozen=True)
class NetworkSpec:
    """How to build a new LoRA network; sd-scripts' argument in brackets.

    ``rank`` [network_dim] and ``alpha`` [network_alpha] for Linear and 1x1 layers; ``conv_rank``
    [conv_dim] and ``conv_alpha`` [conv_alpha, default 1] turn on conv LoRA for the ResNet blocks and
    down/upsamplers; ``dropout`` [network_dropout], ``rank_dropout`` and ``module_dropout`` (training
    only); ``train_unet``/``train_text_encoder`` [network_train_text_encoder_only /
    network_train_unet_only] choose which parts get LoRA modules at all.
    """

    rank: int = 4
    alpha: float = 1.0
    conv_rank: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    train_unet: bool = True
    train_text_encoder: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1 or (self.conv_rank is not None and self.conv_rank < 1):
            raise ConfigError(f"network rank must be at least 1 (network_dim={self.rank}, conv_dim={self.conv_rank})")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if not (self.train_unet or self.train_text_encoder):
            raise ConfigError("network trains neither the UNet nor the text encoder; enable at least one")

    @property
    def effective_conv_alpha(self) -> float:
        return 1.0 if self.conv_alpha is None else self.conv_alpha

    def to_metadata(self) -> dict[str, str]:
        """The ``ss_network_*`` fields sd-scripts writes for this network (all strings)."""
        fields = {
            "ss_network_module": NETWORK_MODULE,
            "ss_network_dim": str(self.rank),
            "ss_network_alpha": str(float(self.alpha)),
            "ss_network_dropout": str(self.dropout),
        }
        args: dict[str, Any] = {}
        if self.conv_rank is not None:
            args["conv_dim"] = str(self.conv_rank)
            args["conv_alpha"] = _number_text(self.effective_conv_alpha)
        for name in ("rank_dropout", "module_dropout"):
            if getattr(self, name) is not None:
                args[name] = _number_text(getattr(self, name))
        if args:  # sd-scripts writes network args only when there are any, plus the dropout it injects
            args["dropout"] = self.dropout
            fields["ss_network_args"] = json.dumps(args)
        return fields


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass
class _Placement:
    """Where an adapter of this network sits while applied."""

    parent: nn.Module
    attribute: str
    host: AdaptedLayer
    adapter_name: str


class LoRANetwork(nn.Module):
    """A set of :class:`LoRAModule`, one per adapted layer, registered under their kohya names.

    ``state_dict()`` is therefore exactly the kohya file's tensors (``lora_unet_..._to_q.lora_down.weight``
    etc.). Build one with :meth:`create` (training) or :meth:`from_lora_file`; then :meth:`apply_to`
    a model's components, :meth:`set_multiplier`, :meth:`remove`, apply elsewhere. A network made on
    one checkpoint applies to any checkpoint of the same family.

    Raises ``LoraFileError`` when a file or network does not fit the components (other family,
    unmatched modules, wrong shapes).
    """

    def __init__(
        self,
        modules: Mapping[str, LoRAModule],
        *,
        family: ModelFamily | None,
        spec: NetworkSpec | None = None,
        unmatched: Iterable[str] = (),
    ) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.family = family
        self.spec = spec
        self.unmatched = list(unmatched)  # file modules that matched nothing (non-strict loads)
        self._multipliers = {"all": 1.0, "unet": 1.0, "text_encoder": 1.0}
        self._placements: list[_Placement] = []

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def create(cls, components: ModelParts, spec: NetworkSpec, *, generator: torch.Generator | None = None) -> LoRANetwork:
        """A new, untrained network for ``components`` as ``spec`` describes (not yet applied)."""
        targets = find_lora_target_details(components, conv=spec.conv_rank is not None)
        wanted = {"unet": spec.train_unet, "text_encoder": spec.train_text_encoder}
        modules = {}
        for name, target in targets.items():
            if not wanted[target.part]:
                continue
            rank, alpha = (
                (spec.conv_rank, spec.effective_conv_alpha) if target.is_conv3x3 else (spec.rank, spec.alpha)
            )
            modules[name] = LoRAModule(
                target.module,
                rank,
                alpha,
                dropout=spec.dropout,
                rank_dropout=spec.rank_dropout,
                module_dropout=spec.module_dropout,
                generator=generator,
            )
        return cls(modules, family=components.family, spec=spec)

    @classmethod
    def from_lora_file(cls, lora_file: LoraFile, components: ModelParts, *, strict: bool = True) -> LoRANetwork:
        """The network stored in ``lora_file``, shaped for ``components`` (not yet applied).

        Every module of the file must match a layer of the components. With ``strict=False`` the
        modules that match nothing (and keys that are no LoRA weights) are logged as a warning and
        kept in ``network.unmatched`` instead of raising.
        """
        check_family(lora_file, components.family)
        targets = find_lora_target_details(components, conv=True)
        weights = lora_file.modules()
        unmatched = sorted(set(weights) - set(targets)) + lora_file.unsupported_keys
        if unmatched:
            message = (
                f"{lora_file.label}: {len(unmatched)} LoRA entries match no layer of this "
                f"{family_label(components.family)} checkpoint (e.g. {', '.join(unmatched[:3])}); "
                "check that the LoRA was made for this kind of model"
            )
            if strict:
                raise LoraFileError(message)
            logger.warning(message)
        modules = {}
        for name, (down, up, alpha) in weights.items():
            if name in targets:
                modules[name] = _module_from_weights(name, targets[name], down, up, alpha, lora_file.label)
        return cls(modules, family=components.family, unmatched=unmatched)

    # --- views ------------------------------------------------------------------------------------

    def lora_modules(self, part: Part | None = None) -> dict[str, LoRAModule]:
        """Kohya name -> module, optionally only the ``"unet"`` or ``"text_encoder"`` ones."""
        return {
            name: module
            for name, module in self.named_children()
            if isinstance(module, LoRAModule) and (part is None or _part_of(name) == part)
        }

    def part_parameters(self, part: Part) -> list[nn.Parameter]:
        """The weights of the ``"unet"`` or ``"text_encoder"`` LoRA modules, in module order."""
        return [param for module in self.lora_modules(part).values() for param in module.parameters()]

    def param_groups(
        self, *, default_lr: float, unet_lr: float | None = None, text_encoder_lr: float | None = None
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups: one per part present, each with its learning rate."""
        groups = []
        for part, lr in (("text_encoder", text_encoder_lr), ("unet", unet_lr)):
            params = self.part_parameters(part)
            if params:
                groups.append({"params": params, "lr": default_lr if lr is None else lr, "name": part})
        return groups

    # --- multipliers --------------------------------------------------------------------------------

    def set_multiplier(
        self, multiplier: float | None = None, *, unet: float | None = None, text_encoder: float | None = None
    ) -> None:
        """Strength of this LoRA: overall ``multiplier`` times the per-part ``unet``/``text_encoder`` one."""
        for key, value in (("all", multiplier), ("unet", unet), ("text_encoder", text_encoder)):
            if value is not None:
                self._multipliers[key] = float(value)
        for name, module in self.lora_modules().items():
            module.multiplier = self._multipliers["all"] * self._multipliers[_part_of(name)]

    # --- applying -----------------------------------------------------------------------------------

    @property
    def is_applied(self) -> bool:
        return bool(self._placements)

    def apply_to(self, components: ModelParts, *, adapter_name: str = "lora") -> None:
        """Add this network's LoRAs to the layers of ``components`` (same family, any checkpoint).

        ``adapter_name`` tells networks on the same layer apart; apply several networks with
        different names to use them together.
        """
        if self.is_applied:
            raise RuntimeError("this network is already applied; remove() it before applying it again")
        targets = self._matching_targets(components)
        placements = []
        for name, module in self.lora_modules().items():
            target = targets[name]
            parent_path, _, attribute = target.module_path.rpartition(".")
            root = components.unet if target.component == "unet" else _text_encoder(components, target.component)
            parent = root.get_submodule(parent_path) if parent_path else root
            current = getattr(parent, attribute)
            host = current if isinstance(current, AdaptedLayer) else AdaptedLayer(current)
            if adapter_name in host.adapters:
                raise ValueError(f"an adapter named {adapter_name!r} is already applied to {target.module_path}")
            host.adapters[adapter_name] = module
            if host is not current:
                setattr(parent, attribute, host)
            placements.append(_Placement(parent, attribute, host, adapter_name))
        self._placements = placements

    def remove(self) -> None:
        """Take this network's LoRAs out again; layers left without adapters get their original back."""
        for placement in self._placements:
            host = placement.host
            del host.adapters[placement.adapter_name]
            if not host.adapters and getattr(placement.parent, placement.attribute) is host:
                setattr(placement.parent, placement.attribute, host.base)
        self._placements = []

    def _matching_targets(self, components: ModelParts) -> dict[str, LoraTarget]:
        if self.family is not None and components.family != self.family:
            raise LoraFileError(
                f"this LoRA is for {family_label(self.family)} but the checkpoint is "
                f"{family_label(components.family)}; use a LoRA made for {family_label(components.family)}"
            )
        targets = find_lora_target_details(components, conv=True)
        missing = [name for name in self.lora_modules() if name not in targets]
        if missing:
            raise LoraFileError(
                f"{len(missing)} LoRA modules match no layer of the checkpoint (e.g. {', '.join(missing[:3])})"
            )
        return targets

    def iter_targets(self, components: ModelParts) -> Iterator[tuple[str, LoRAModule, LoraTarget]]:
        """(kohya name, LoRA module, the layer it adapts in ``components``) for every module."""
        targets = self._matching_targets(components)
        for name, module in self.lora_modules().items():
            yield name, module, targets[name]


def _module_from_weights(
    name: str, target: LoraTarget, down: torch.Tensor, up: torch.Tensor, alpha: float, label: str
) -> LoRAModule:
    module = LoRAModule(target.module, int(down.shape[0]), alpha)
    for tensor, parameter, role in ((down, module.lora_down.weight, "down"), (up, module.lora_up.weight, "up")):
        if tensor.numel() != parameter.numel() or tensor.shape[:2] != parameter.shape[:2]:
            raise LoraFileError(
                f"{label}: {name} {role} weight has shape {tuple(tensor.shape)} but the layer needs "
                f"{tuple(parameter.shape)}; the LoRA was made for a different model"
            )
        # Linear and 1x1-conv LoRAs are interchangeable: [r, in] and [r, in, 1, 1] hold the same numbers.
        with torch.no_grad():
            parameter.copy_(tensor.reshape(parameter.shape))
    return module


def _part_of(name: str) -> Part:
    return "unet" if name.startswith("lora_unet_") else "text_encoder"


def _text_encoder(components: ModelParts, component: str) -> nn.Module:
    index = 0 if component == "text_encoder" else int(component.rsplit("_", 1)[1]) - 1
    return components.text_encoders[index]


__all__ = [
    "AdaptedLayer",
    "LoRAModule",
    "LoRANetwork",
    "NetworkSpec",
    "lora_delta_weight",
]
