"""Build the optimizer for the LoRA parameters, with sd-scripts' learning-rate groups.

Parameter groups follow sd-scripts' LoRA network: the text encoder group first, then the
UNet group, each with ``text_encoder_lr`` / ``unet_lr`` or else ``learning_rate``; a group
whose learning rate is 0 is left out, so those weights are not trained (sd-scripts skips
them the same way). Each group carries a ``group_name`` ("textencoder" / "unet") that the
logger turns into ``lr/textencoder`` / ``lr/unet``.

Names and ``optimizer_args`` go through :mod:`loralab.train.optimizers` (name resolution,
signature checks, the kwargs an sd-scripts name implies). Extra rules here:

- bitsandbytes optimizers (``AdamW8bit`` ...) need a CUDA GPU; on any other device they are
  refused with a ConfigError before their package is imported.
- ``Adafactor`` must be given ``relative_step=False``: with transformers' default
  (``relative_step=True``) it ignores the learning rate and scheduler and picks its own,
  which sd-scripts handles with a special "adafactor" scheduler we do not have.
- D-Adaptation and Prodigy estimate the step size ``d`` themselves and use the learning
  rate as a multiplier of it; a learning rate <= 0.1 is almost always a mistake there, so
  it is logged as a warning (as sd-scripts does).
- On a CPU, torch's own optimizers that have a fused kernel (AdamW, Adam, SGD/SGDNesterov,
  Adagrad) use it unless ``optimizer_args`` chose ``fused`` or ``foreach``: the same update as
  torch's default per-tensor loop (equal to within float rounding), in a quarter of its time for
  a LoRA's hundreds of small tensors. GPUs keep torch's default.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from loralab.errors import ConfigError
from loralab.train.optimizers import (
    OptimizerPackageMissing,
    optimizer_kwargs,
    resolve_optimizer,
    validate_optimizer_args,
)

logger = logging.getLogger(__name__)

TEXT_ENCODER_GROUP = "textencoder"
UNET_GROUP = "unet"
_ADAPTIVE_PREFIXES = ("dadapt", "prodigy")


def build_param_groups(
    *,
    unet_params: Iterable[torch.nn.Parameter],
    text_encoder_params: Iterable[torch.nn.Parameter],
    learning_rate: float,
    unet_lr: float | None = None,
    text_encoder_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: text encoder first, then UNet (sd-scripts' order).

    Raises ``ConfigError`` when no group is left to train.
    """
    groups = []
    for name, params, lr in (
        (TEXT_ENCODER_GROUP, list(text_encoder_params), text_encoder_lr),
        (UNET_GROUP, list(unet_params), unet_lr),
    ):
        lr = learning_rate if lr is None else lr
        if params and lr:
            groups.append({"params": params, "lr": float(lr), "group_name": name})
    if not groups:
        raise ConfigError(
            "nothing to train: the LoRA has no UNet or text-encoder weights with a learning rate above 0; "
            "check unet_lr, text_encoder_lr and learning_rate"
        )
    return groups


def _is_bitsandbytes(module: str) -> bool:
    return module == "bitsandbytes" or module.startswith("bitsandbytes.")


def build_optimizer(
    optimizer_type: str,
    optimizer_args: Mapping[str, Any],
    param_groups: list[dict[str, Any]],
    *,
    learning_rate: float,
    device: torch.device | str = "cpu",
) -> torch.optim.Optimizer:
    """Instantiate ``optimizer_type`` over ``param_groups`` with ``optimizer_args``.

    Raises ``ConfigError`` for unknown names, arguments the class does not take, a missing
    optional package, bitsandbytes off a CUDA device, and Adafactor's relative step.
    """
    spec = resolve_optimizer(optimizer_type)
    device = torch.device(device)
    if _is_bitsandbytes(spec.module) and device.type != "cuda":
        raise ConfigError(
            f"optimizer_type {spec.name} is a bitsandbytes optimizer and needs a CUDA GPU, but this run is on "
            f"{device.type}; use AdamW (or another optimizer without 8bit/Paged in its name)"
        )
    validate_optimizer_args(optimizer_type, optimizer_args)
    kwargs = optimizer_kwargs(optimizer_type, optimizer_args)
    if spec.name == "Adafactor" and kwargs.get("relative_step", True):
        raise ConfigError(
            "Adafactor picks its own learning rate unless told not to; add "
            "'relative_step=False scale_parameter=False warmup_init=False' to optimizer_args"
        )
    if spec.name.lower().startswith(_ADAPTIVE_PREFIXES) and min(g["lr"] for g in param_groups) <= 0.1:
        logger.warning(
            "%s scales its own step size by the learning rate; a learning rate around 1.0 is usual, "
            "%s looks too low",
            spec.name,
            min(g["lr"] for g in param_groups),
        )
    optimizer_cls = spec.load()
    if _use_fused_cpu_kernel(optimizer_cls, kwargs, param_groups, device):
        kwargs["fused"] = True
    try:
        return optimizer_cls(param_groups, lr=learning_rate, **kwargs)
    except (TypeError, ValueError) as exc:  # the optimizer's own checks of its arguments' values
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        settings = " ".join(f"{key}={value!r}" for key, value in optimizer_args.items()) or "none"
        raise ConfigError(
            f"{spec.name} refused its settings ({detail}); check optimizer_args ({settings}) and the learning rates"
        ) from None


def check_optimizer_settings(optimizer_type: str, optimizer_args: Mapping[str, Any], learning_rate: float) -> None:
    """Build the optimizer over one throwaway parameter, so that values it refuses (``betas=0.9``,
    a negative weight decay) fail in ``loralab plan`` as they would when the run starts.

    bitsandbytes optimizers are left to the run (they need a CUDA GPU), and so are optimizers whose
    package is not installed here (the config's own check has warned about those).
    """
    if _is_bitsandbytes(resolve_optimizer(optimizer_type).module):
        return
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": learning_rate}]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # D-Adaptation prints its settings when built
            build_optimizer(optimizer_type, optimizer_args, groups, learning_rate=learning_rate)
    except OptimizerPackageMissing:
        return


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _use_fused_cpu_kernel(
    optimizer_cls: type, kwargs: Mapping[str, Any], param_groups: list[dict[str, Any]], device: torch.device
) -> bool:
    """Whether to ask a torch optimizer for its fused kernel: on a CPU, where torch's default is a
    Python loop over tensors (a LoRA step spends more time there than in the arithmetic)."""
    if device.type != "cpu" or not optimizer_cls.__module__.startswith("torch.optim"):
        return False
    if "fused" in kwargs or "foreach" in kwargs or kwargs.get("differentiable"):
        return False
    if "fused" not in inspect.signature(optimizer_cls).parameters:
        return False
    params = [param for group in param_groups for param in group["params"]]
    return all(param.device.type == "cpu" and param.dtype in _FUSED_DTYPES for param in params)


def setup_optimizer(
    config: Any,
    *,
    unet_params: Iterable[torch.nn.Parameter],
    text_encoder_params: Iterable[torch.nn.Parameter],
    device: torch.device | str = "cpu",
) -> torch.optim.Optimizer:
    """The run's optimizer from a ``TrainConfig``.

    Reads ``optimizer_type``, ``optimizer_args``, ``learning_rate``, ``unet_lr``,
    ``text_encoder_lr`` and ``network_train_unet_only`` / ``network_train_text_encoder_only``.
    """
    if getattr(config, "network_train_unet_only", False):
        text_encoder_params = []
    if getattr(config, "network_train_text_encoder_only", False):
        unet_params = []
    groups = build_param_groups(
        unet_params=unet_params,
        text_encoder_params=text_encoder_params,
        learning_rate=config.learning_rate,
        unet_lr=config.unet_lr,
        text_encoder_lr=config.text_encoder_lr,
    )
    return build_optimizer(
        config.optimizer_type, config.optimizer_args or {}, groups, learning_rate=config.learning_rate, device=device
    )


def d_times_lr(optimizer: torch.optim.Optimizer) -> float | None:
    """D-Adaptation/Prodigy ``d * lr`` of the first parameter group (kohya's ``lr/d*lr``), else None."""
    group = optimizer.param_groups[0]
    if "d" not in group:
        return None
    return float(group["d"]) * float(group["lr"])


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each named group's current learning rate: ``{"textencoder": ..., "unet": ...}``."""
    return {
        group.get("group_name", f"group{index}"): float(group["lr"])
        for index, group in enumerate(optimizer.param_groups)
    }
