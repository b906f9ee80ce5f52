"""The names of a run's LoRA files, written and read back (sd-scripts' names; no torch needed).

- every ``save_every_n_epochs`` epochs: ``<output_name>-<epoch:06d>.safetensors``;
- every ``save_every_n_steps`` steps (and on an interrupt): ``<output_name>-step<step:08d>.safetensors``;
- at the end: ``<output_name>.safetensors``.

Training writes them (``train.saving``), keep-last-N pruning and the sweep's save points
(``sweep.layout``) read them with :func:`parse_lora_name`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LORA_SUFFIX = ".safetensors"


def epoch_lora_name(output_name: str, epoch: int) -> str:
    """``<output_name>-<epoch:06d>.safetensors``, sd-scripts' per-epoch name (epoch 1-based)."""
    return f"{output_name}-{epoch:06d}{LORA_SUFFIX}"


def step_lora_name(output_name: str, global_step: int) -> str:
    """``<output_name>-step<step:08d>.safetensors``, sd-scripts' per-step name."""
    return f"{output_name}-step{global_step:08d}{LORA_SUFFIX}"


def final_lora_name(output_name: str) -> str:
    """``<output_name>.safetensors``: the LoRA at the end of the run."""
    return f"{output_name}{LORA_SUFFIX}"


@dataclass(frozen=True)
class SavedLoraName:
    """What a file name says: after which epoch or step it was saved (neither: the final save)."""

    epoch: int | None = None
    step: int | None = None

    @property
    def is_final(self) -> bool:
        return self.epoch is None and self.step is None


def parse_lora_name(output_name: str, file_name: str) -> SavedLoraName | None:
    """The save a file name of run ``output_name`` stands for, or None for any other file.

    Numbers wider than the written widths are accepted (a run past epoch 999999 or step 99999999).
    """
    pattern = rf"{re.escape(output_name)}(?:-(\d{{6,}})|-step(\d{{8,}}))?{re.escape(LORA_SUFFIX)}"
    match = re.fullmatch(pattern, file_name)
    if match is None:
        return None
    epoch, step = match.groups()
    return SavedLoraName(int(epoch) if epoch else None, int(step) if step else None)
