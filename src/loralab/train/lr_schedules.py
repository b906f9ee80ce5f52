"""Learning-rate schedules: the curves sd-scripts trains with, from diffusers' scheduler functions.

sd-scripts builds its scheduler from the diffusers/transformers ``get_scheduler`` family, steps it
once per optimizer update, and logs ``lr/unet`` *after* that step. So after update ``k`` (1-based)
the learning rate is ``lr * f(k)``: a cosine run of 1100 steps logs ``f(1) = 0.99999...`` first and
``f(1100) = 0.0`` last. The planner shows these values and training uses the same scheduler.

Supported names: ``constant``, ``constant_with_warmup``, ``linear``, ``cosine``,
``cosine_with_restarts`` (``lr_scheduler_num_cycles`` hard restarts) and ``polynomial``
(``lr_scheduler_power``; decays to diffusers' fixed end lr of 1e-7, so its multiplier depends on
the optimizer's base lr).

Warm-up (``lr_warmup_steps``): an int is a number of steps; a float in (0, 1) is a ratio of the
total steps, truncated as sd-scripts does (``int(ratio * total)``). Configs from the kohya_ss GUI
(``steps_formula = "kohya_gui"``) give the warm-up as a whole percentage that the GUI turned into
steps itself with ``round(percent * total / 100)`` (Python's half-to-even rounding); we apply that
rule to them, so e.g. 7 % of 1110 steps is 78 steps there and 77 under the sd-scripts rule.

Errors: ConfigError for an unknown scheduler name, a warm-up on ``constant`` (sd-scripts refuses
it too), a warm-up longer than the run, or a polynomial schedule with a base lr at or below 1e-7.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

from loralab.errors import ConfigError

SCHEDULER_NAMES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)

# diffusers' polynomial schedule decays to this absolute lr and needs the base lr above it.
_POLYNOMIAL_LR_END = 1e-7


def resolve_warmup_steps(
    lr_warmup_steps: int | float, num_training_steps: int, *, kohya_gui: bool = False
) -> int:
    """Warm-up steps for a run of ``num_training_steps`` updates (see the module docstring)."""
    if isinstance(lr_warmup_steps, float) and 0 < lr_warmup_steps < 1:
        if kohya_gui:
            percent = lr_warmup_steps * 100
            if abs(percent - round(percent)) < 1e-9:
                # The GUI multiplies whole percent by whole steps, then rounds half to even.
                return round(round(percent) * num_training_steps / 100)
            return round(lr_warmup_steps * num_training_steps)
        return int(lr_warmup_steps * num_training_steps)
    return int(lr_warmup_steps)


def warmup_steps_for(config: Any, num_training_steps: int) -> int:
    """Warm-up steps of a TrainConfig's run, with the GUI rounding for kohya_ss GUI configs."""
    return resolve_warmup_steps(
        config.lr_warmup_steps, num_training_steps, kohya_gui=config.steps_formula == "kohya_gui"
    )


def _make_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int,
    num_cycles: int,
    power: float,
) -> LRScheduler:
    if name not in SCHEDULER_NAMES:
        raise ConfigError(f"unknown lr_scheduler {name!r}; use one of: {', '.join(SCHEDULER_NAMES)}")
    if num_warmup_steps < 0 or num_warmup_steps > num_training_steps:
        raise ConfigError(
            f"warm-up of {num_warmup_steps} steps does not fit a run of {num_training_steps} steps; "
            f"lower lr_warmup_steps"
        )
    if name == "constant" and num_warmup_steps:
        raise ConfigError(
            f"lr_scheduler 'constant' takes no warm-up ({num_warmup_steps} steps asked); "
            f"use constant_with_warmup or set lr_warmup_steps to 0"
        )
    if name == "polynomial" and optimizer.defaults["lr"] <= _POLYNOMIAL_LR_END:
        raise ConfigError(
            f"the polynomial schedule decays to {_POLYNOMIAL_LR_END} and needs a learning_rate above it"
        )
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
        power=power,
    )


def lr_multipliers(
    name: str,
    num_training_steps: int,
    num_warmup_steps: int,
    num_cycles: int,
    power: float,
    *,
    base_lr: float = 1.0,
) -> list[float]:
    """The lr multiplier after each of ``num_training_steps`` optimizer updates.

    ``base_lr`` is the optimizer's default lr (``learning_rate``); only the polynomial schedule
    depends on it. The values come from stepping the real scheduler training builds, so the two
    cannot drift apart.
    """
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=base_lr)
    scheduler = _make_scheduler(name, optimizer, num_training_steps, num_warmup_steps, num_cycles, power)
    values = []
    for _ in range(num_training_steps):
        optimizer.step()  # a no-op without gradients; keeps torch's step-order check quiet
        scheduler.step()
        values.append(scheduler.get_last_lr()[0] / base_lr)
    return values


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: Any, num_training_steps: int) -> LRScheduler:
    """The scheduler for a training run: step it once per optimizer update.

    Uses ``config.lr_scheduler``, ``lr_warmup_steps`` (see :func:`warmup_steps_for`),
    ``lr_scheduler_num_cycles`` and ``lr_scheduler_power``. Raises ConfigError as described in the
    module docstring.
    """
    return _make_scheduler(
        config.lr_scheduler,
        optimizer,
        num_training_steps,
        warmup_steps_for(config, num_training_steps),
        config.lr_scheduler_num_cycles,
        config.lr_scheduler_power,
    )
