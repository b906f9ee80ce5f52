"""Optimizer names as sd-scripts knows them -> optimizer classes, imported only when used.

``optimizer_type`` takes the names kohya users type (case does not matter, as in sd-scripts):

- torch: ``AdamW``, ``SGDNesterov`` (SGD with ``nesterov=True`` and ``momentum=0.9`` unless
  given), and any other ``torch.optim`` class by its name (``Adam``, ``RAdam`` ...);
- ``dadaptation``: ``DAdaptAdam``, ``DAdaptLion``, ``DAdaptAdan``, ``DAdaptSGD``,
  ``DAdaptAdaGrad``, ``DAdaptAdamPreprint`` (alias ``DAdaptation``), ``DAdaptAdanIP``;
- ``prodigyopt``: ``Prodigy``;
- ``bitsandbytes`` (8-bit, GPU only): ``AdamW8bit``, ``Lion8bit``, ``SGDNesterov8bit``,
  ``PagedAdamW``, ``PagedAdamW8bit``, ``PagedAdamW32bit``, ``PagedLion8bit``,
  ``AdEMAMix8bit``, ``PagedAdEMAMix8bit``;
- ``lion-pytorch``: ``Lion``; ``transformers``: ``Adafactor``;
- ``schedulefree``: ``AdamWScheduleFree``, ``RAdamScheduleFree``, ``SGDScheduleFree``;
- ``module.Class`` for anything else importable (``pytorch_optimizer.CAME``).

Nothing is imported until a class is asked for, so a missing optional package only matters
to a run that uses it (``OptimizerPackageMissing``, a ConfigError that says what to install).
``validate_optimizer_args`` checks ``optimizer_args`` keys against the class's signature.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loralab.errors import ConfigError


class OptimizerPackageMissing(ConfigError):
    """The optimizer's package is not installed (or its module cannot be imported)."""


@dataclass(frozen=True)
class OptimizerSpec:
    """Where an optimizer class lives and the keyword arguments its sd-scripts name implies."""

    name: str  # canonical spelling (sd-scripts' name, or the ``module.Class`` path)
    module: str
    attribute: str
    package: str | None = None  # the pip name, for a package loralab does not depend on
    fixed_kwargs: Mapping[str, Any] = field(default_factory=dict)  # part of the name's meaning
    default_kwargs: Mapping[str, Any] = field(default_factory=dict)  # used unless optimizer_args set them

    def load(self) -> type:
        """Import and return the optimizer class."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            install = self.package or self.module.split(".")[0]
            raise OptimizerPackageMissing(
                f"optimizer_type {self.name!r} needs the {install!r} package, which cannot be imported "
                f"({exc}); install it with `pip install {install}` or choose another optimizer"
            ) from None
        try:
            return getattr(module, self.attribute)
        except AttributeError:
            raise ConfigError(
                f"optimizer_type {self.name!r}: module {self.module!r} has no {self.attribute!r} "
                f"(is the installed version too old?)"
            ) from None


def _spec(
    name: str, module: str, attribute: str | None = None, package: str | None = None, **kwargs: Any
) -> OptimizerSpec:
    return OptimizerSpec(name, module, attribute or name, package, **kwargs)


_NESTEROV = {"fixed_kwargs": {"nesterov": True}, "default_kwargs": {"momentum": 0.9}}

_KNOWN: tuple[OptimizerSpec, ...] = (
    _spec("AdamW", "torch.optim"),
    _spec("SGDNesterov", "torch.optim", "SGD", **_NESTEROV),
    _spec("DAdaptAdam", "dadaptation"),
    _spec("DAdaptLion", "dadaptation"),
    _spec("DAdaptAdan", "dadaptation"),
    _spec("DAdaptSGD", "dadaptation"),
    _spec("DAdaptAdaGrad", "dadaptation"),
    _spec("DAdaptAdamPreprint", "dadaptation.experimental"),
    _spec("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint"),
    _spec("DAdaptAdanIP", "dadaptation.experimental"),
    _spec("Prodigy", "prodigyopt"),
    _spec("AdamW8bit", "bitsandbytes.optim", package="bitsandbytes"),
    _spec("Lion8bit", "bitsandbytes.optim", package="bitsandbytes"),
    _spec("SGDNesterov8bit", "bitsandbytes.optim", "SGD8bit", package="bitsandbytes", **_NESTEROV),
    _spec("PagedAdamW", "bitsandbytes.optim", package="bitsandbytes"),
    _spec("PagedAdamW8bit", "bitsandbytes.optim", package="bitsandbytes"),
    _spec("PagedAdamW32bit", "bitsandbytes.optim", package="bitsandbytes"),
    _spec("PagedLion8bit", "bitsandbytes.optim", package="bitsandbytes"),
    _spec("AdEMAMix8bit", "bitsandbytes.optim", package="bitsandbytes"),
    _spec("PagedAdEMAMix8bit", "bitsandbytes.optim", package="bitsandbytes"),
    _spec("Lion", "lion_pytorch", package="lion-pytorch"),
    _spec("Adafactor", "transformers.optimization", package="transformers"),
    _spec("AdamWScheduleFree", "schedulefree", package="schedulefree"),
    _spec("RAdamScheduleFree", "schedulefree", package="schedulefree"),
    _spec("SGDScheduleFree", "schedulefree", package="schedulefree"),
)
KNOWN_OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name.lower(): spec for spec in _KNOWN}

# Arguments the training loop passes itself; giving them in optimizer_args would clash.
_SET_BY_LOOP = {"params": "it is the LoRA parameters", "lr": "set learning_rate / unet_lr / text_encoder_lr instead"}


def resolve_optimizer(optimizer_type: str) -> OptimizerSpec:
    """The spec for ``optimizer_type``, without importing anything except for bare torch names.

    Raises ConfigError for an unknown name (with a "did you mean" hint).
    """
    name = optimizer_type.strip()
    if not name:
        raise ConfigError("optimizer_type is empty; use e.g. AdamW, DAdaptAdam or Prodigy")
    known = KNOWN_OPTIMIZERS.get(name.lower())
    if known is not None:
        return known
    if "." in name:
        module, _, attribute = name.rpartition(".")
        if not module or not attribute:
            raise ConfigError(f"optimizer_type {name!r} is not of the form module.Class")
        return OptimizerSpec(name, module, attribute)
    # sd-scripts falls back to a torch.optim class of that exact name.
    import torch.optim

    candidate = getattr(torch.optim, name, None)
    if inspect.isclass(candidate) and issubclass(candidate, torch.optim.Optimizer):
        return OptimizerSpec(name, "torch.optim", name)
    names = [spec.name for spec in _KNOWN]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6) or difflib.get_close_matches(
        name.lower(), [n.lower() for n in names], n=1, cutoff=0.6
    )
    hint = f"did you mean {KNOWN_OPTIMIZERS[close[0].lower()].name!r}? " if close else ""
    raise ConfigError(
        f"unknown optimizer_type {name!r}; {hint}use an sd-scripts name (AdamW, AdamW8bit, DAdaptAdam, "
        f"Prodigy, Lion, Adafactor, ...) or module.Class"
    )


def optimizer_class(optimizer_type: str) -> type:
    """The optimizer class for ``optimizer_type``, imported now (see :func:`resolve_optimizer`)."""
    return resolve_optimizer(optimizer_type).load()


def validate_optimizer_args(optimizer_type: str, args: Mapping[str, Any]) -> None:
    """Check ``optimizer_args`` keys against the optimizer's ``__init__`` signature.

    Raises ConfigError for a key the class does not take (with a "did you mean" hint), for
    ``lr``/``params`` (the loop sets them), and for a key the optimizer name fixes
    (``nesterov`` for SGDNesterov); OptimizerPackageMissing when the class cannot be imported.
    """
    spec = resolve_optimizer(optimizer_type)
    for key in args:
        if key in _SET_BY_LOOP:
            raise ConfigError(f"optimizer_args cannot set {key!r}: {_SET_BY_LOOP[key]}")
        if key in spec.fixed_kwargs:
            raise ConfigError(
                f"optimizer_args cannot set {key!r}: {spec.name} always uses {key}={spec.fixed_kwargs[key]!r}"
            )
    cls = spec.load()
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no introspectable signature: nothing to check against
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [name for name, p in parameters.items() if name not in _SET_BY_LOOP and p.kind in keyword_kinds]
    for key in args:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"optimizer_args key {key!r} is not an argument of {spec.name} "
                f"({cls.__module__}.{cls.__name__}); {hint}it takes: {', '.join(accepted)}"
            )


def optimizer_kwargs(optimizer_type: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments to build the optimizer with (besides params and lr): the name's
    defaults, then ``optimizer_args``, then what the name fixes."""
    spec = resolve_optimizer(optimizer_type)
    return {**spec.default_kwargs, **args, **spec.fixed_kwargs}
