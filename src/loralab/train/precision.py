"""Numeric precision and CPU threading of a run.

``mixed_precision`` (sd-scripts names: ``no``, ``fp16``, ``bf16``) sets the autocast dtype and
the dtype the frozen UNet/text encoders are cast to; LoRA weights stay float32 (so small
updates are not lost) unless ``full_fp16`` / ``full_bf16`` casts them too, which needs the
matching ``mixed_precision``. fp16 needs loss scaling (its range underflows small
gradients); bf16 has float32's range and does not. ``save_precision`` (``fp16``, ``bf16``,
``float``) is the dtype LoRA files are written in; unset keeps the weights' own dtype.

``num_cpu_threads_per_process`` sets torch's intra-op threads (what ``accelerate launch
--num_cpu_threads_per_process`` does through OMP_NUM_THREADS); ``max_data_loader_n_workers``
caps the data-loader worker processes at the CPU count, as sd-scripts does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from loralab.errors import ConfigError

MIXED_PRECISION_DTYPES: dict[str, torch.dtype | None] = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_PRECISION_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


@dataclass(frozen=True)
class PrecisionPlan:
    """The dtypes of a run, resolved once from the config."""

    mixed_precision: str
    autocast_dtype: torch.dtype | None  # None: no autocast, compute in float32
    base_weight_dtype: torch.dtype  # frozen UNet / text encoder weights
    trainable_dtype: torch.dtype  # LoRA weights
    use_grad_scaler: bool
    save_dtype: torch.dtype | None  # None: save in the trainable dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matmuls run in."""
        return self.autocast_dtype or torch.float32


def resolve_precision(
    mixed_precision: str = "no",
    *,
    full_fp16: bool = False,
    full_bf16: bool = False,
    save_precision: str | None = None,
) -> PrecisionPlan:
    """Turn the precision options into a ``PrecisionPlan``; bad combinations raise ``ConfigError``."""
    if mixed_precision not in MIXED_PRECISION_DTYPES:
        raise ConfigError(f"mixed_precision={mixed_precision!r} is unknown; use one of no, fp16, bf16")
    if save_precision is not None and save_precision not in SAVE_PRECISION_DTYPES:
        raise ConfigError(f"save_precision={save_precision!r} is unknown; use one of fp16, bf16, float")
    if full_fp16 and full_bf16:
        raise ConfigError("full_fp16 and full_bf16 are both set; choose one")
    if full_fp16 and mixed_precision != "fp16":
        raise ConfigError("full_fp16 needs mixed_precision=fp16")
    if full_bf16 and mixed_precision != "bf16":
        raise ConfigError("full_bf16 needs mixed_precision=bf16")

    autocast_dtype = MIXED_PRECISION_DTYPES[mixed_precision]
    return PrecisionPlan(
        mixed_precision=mixed_precision,
        autocast_dtype=autocast_dtype,
        base_weight_dtype=autocast_dtype or torch.float32,
        trainable_dtype=autocast_dtype if (full_fp16 or full_bf16) else torch.float32,
        use_grad_scaler=mixed_precision == "fp16",
        save_dtype=SAVE_PRECISION_DTYPES[save_precision] if save_precision else None,
    )


def config_precision(config: Any) -> PrecisionPlan:
    """``resolve_precision`` of a ``TrainConfig``'s precision options."""
    return resolve_precision(
        config.mixed_precision, full_fp16=config.full_fp16, full_bf16=config.full_bf16,
        save_precision=config.save_precision,
    )  # fmt: skip


@contextlib.contextmanager
def autocast(plan: PrecisionPlan, device_type: str) -> Iterator[None]:
    """Autocast to the plan's dtype on ``device_type`` ("cpu", "cuda", ...); a no-op for ``no``."""
    if plan.autocast_dtype is None:
        yield  # entering even a disabled torch.autocast costs time on every batch
        return
    with torch.autocast(device_type, dtype=plan.autocast_dtype):
        yield


class _HalfParamGradScaler(torch.amp.GradScaler):
    """A GradScaler that may unscale fp16 gradients, which full_fp16 training produces.

    torch refuses to unscale fp16 gradients by default because they may overflow when
    unscaled; with full_fp16 the weights are fp16 by choice, so the check is lifted here
    (sd-scripts does the same by patching accelerate's scaler instance).
    """

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ANN001
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


def make_grad_scaler(plan: PrecisionPlan, device_type: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 runs, None otherwise."""
    if not plan.use_grad_scaler:
        return None
    if plan.trainable_dtype == torch.float16:
        return _HalfParamGradScaler(device_type)
    return torch.amp.GradScaler(device_type)


def cast_trainable_parameters(parameters: Iterable[torch.nn.Parameter], plan: PrecisionPlan) -> int:
    """Cast trainable parameters in place to the plan's trainable dtype; returns how many changed."""
    changed = 0
    for param in parameters:
        if param.dtype != plan.trainable_dtype:
            param.data = param.data.to(plan.trainable_dtype)
            changed += 1
    return changed


@dataclass(frozen=True)
class CpuThreads:
    """What ``apply_cpu_threads`` set."""

    torch_threads: int
    previous_torch_threads: int
    data_loader_workers: int


def apply_cpu_threads(
    num_cpu_threads_per_process: int | None,
    max_data_loader_n_workers: int | None,
    *,
    cpu_count: int | None = None,
) -> CpuThreads:
    """Set torch's thread count and work out the data-loader worker count.

    ``num_cpu_threads_per_process`` None leaves torch's thread count as it is. Worker count:
    ``min(max_data_loader_n_workers, cpu_count)`` (0 = load in the main process). torch's
    thread count is per process, so a caller that runs several trainings in one process
    can restore ``previous_torch_threads`` afterwards.
    """
    previous = torch.get_num_threads()
    if num_cpu_threads_per_process is not None:
        if int(num_cpu_threads_per_process) < 1:
            raise ConfigError(f"num_cpu_threads_per_process={num_cpu_threads_per_process} must be at least 1")
        torch.set_num_threads(int(num_cpu_threads_per_process))
    workers = 0
    if max_data_loader_n_workers:
        if int(max_data_loader_n_workers) < 0:
            raise ConfigError(f"max_data_loader_n_workers={max_data_loader_n_workers} must be 0 or more")
        workers = min(int(max_data_loader_n_workers), cpu_count or os.cpu_count() or 1)
    return CpuThreads(
        torch_threads=torch.get_num_threads(), previous_torch_threads=previous, data_loader_workers=workers
    )
