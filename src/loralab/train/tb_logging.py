"""Training metrics under kohya's TensorBoard tag names, plus a JSON-lines stream for scripts.

Tags (the ones kohya users' dashboards and the seed's logs use):

- ``loss/current``: this step's loss; ``loss/average``: ``LossRecorder.moving_average``;
  both at x = global step.
- ``loss/epoch``: ``LossRecorder.moving_average`` when an epoch ends (its window is then that
  epoch's losses), at x = epoch number (1-based, as sd-scripts).
- ``lr/unet``, ``lr/textencoder``: each parameter group's learning rate after the scheduler
  stepped; ``lr/d*lr``: D-Adaptation/Prodigy ``d * lr`` of the first group.
- ``perf/step_seconds``, ``perf/images_per_second``, ``perf/peak_memory_mb``.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import torch


class LossRecorder:
    """Running mean of the loss over the last epoch's worth of steps (sd-scripts' ``LossRecorder``).

    In the first epoch it averages every loss so far; afterwards the loss of in-epoch step
    ``k`` replaces the one recorded at step ``k`` of the previous epoch, so the mean covers
    one epoch window. The total is updated incrementally, exactly as sd-scripts does.
    """

    def __init__(self) -> None:
        self.loss_list: list[float] = []
        self.loss_total: float = 0.0

    def add(self, *, epoch: int, step: int, loss: float) -> None:
        """Record ``loss`` of in-epoch ``step`` (0-based) in ``epoch`` (0-based)."""
        if epoch == 0:
            self.loss_list.append(loss)
        else:
            # An epoch longer than the first (e.g. after a resume with more data) grows the window.
            while len(self.loss_list) <= step:
                self.loss_list.append(0.0)
            self.loss_total -= self.loss_list[step]
            self.loss_list[step] = loss
        self.loss_total += loss

    @property
    def moving_average(self) -> float:
        """Mean loss over the window; 0.0 before the first loss."""
        return self.loss_total / len(self.loss_list) if self.loss_list else 0.0

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a resume."""
        return {"loss_list": list(self.loss_list), "loss_total": self.loss_total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.loss_list = [float(v) for v in state["loss_list"]]
        self.loss_total = float(state["loss_total"])


def step_scalars(
    *,
    current_loss: float,
    average_loss: float,
    group_lrs: Mapping[str, float],
    d_lr: float | None = None,
    step_seconds: float | None = None,
    images_per_second: float | None = None,
    peak_memory_mb: float | None = None,
) -> dict[str, float]:
    """The scalars of one optimizer step under kohya's tags.

    ``group_lrs`` maps a parameter group's name ("unet", "textencoder") to its learning rate.
    """
    scalars = {"loss/current": current_loss, "loss/average": average_loss}
    scalars.update({f"lr/{name}": float(lr) for name, lr in group_lrs.items()})
    optional = {
        "lr/d*lr": d_lr,
        "perf/step_seconds": step_seconds,
        "perf/images_per_second": images_per_second,
        "perf/peak_memory_mb": peak_memory_mb,
    }
    scalars.update({tag: float(value) for tag, value in optional.items() if value is not None})
    return scalars


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory of this process in MiB: CUDA's peak allocation, else the peak resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class MetricsLogger:
    """Writes scalars to TensorBoard event files in ``log_dir`` and/or as JSON lines.

    Either sink may be None (quiet runs log to TensorBoard only; scripts can read the JSON
    lines from stdout). Non-finite values are written as they are to TensorBoard and as
    ``null`` in JSON, which has no NaN.
    """

    def __init__(self, log_dir: Path | None, *, jsonl: TextIO | None = None) -> None:
        self._writer = None
        if log_dir is not None:
            # Imported here: tensorboard is slow to import.
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard.writer import FileWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._writer = FileWriter(str(log_dir))
            self._summary = Summary
        self._jsonl = jsonl

    def log_step(self, global_step: int, scalars: Mapping[str, float]) -> None:
        """Log one optimizer step's scalars at x = ``global_step``."""
        self._write({"step": global_step}, scalars, global_step)

    def log_epoch(self, epoch: int, loss: float) -> None:
        """Log ``loss/epoch`` at x = ``epoch`` (1-based: the number of epochs finished)."""
        self._write({"epoch": epoch}, {"loss/epoch": loss}, epoch)

    def log_image(self, tag: str, image: Any, global_step: int) -> None:
        """Log an image (PIL image or HWC uint8 array) to TensorBoard."""
        if self._writer is not None:
            import numpy as np
            from torch.utils.tensorboard.summary import image as image_summary

            self._writer.add_summary(image_summary(tag, np.asarray(image), dataformats="HWC"), global_step)

    def _write(self, position: dict[str, int], scalars: Mapping[str, float], x: int) -> None:
        if self._writer is not None:
            # One event holding every scalar of the step, where SummaryWriter.add_scalar writes
            # one event per tag: TensorBoard reads them the same, and on a small model the
            # per-tag events (each built, serialised and checksummed in Python) cost ~1% of a step.
            values = [self._summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
            self._writer.add_summary(self._summary(value=values), x)
        if self._jsonl is not None:
            record = dict(position)
            record.update({tag: (v if math.isfinite(v) else None) for tag, v in scalars.items()})
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    def flush(self) -> None:
        """Push buffered events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``log_dir``'s event files: tag -> [(step, value), ...] in the order
    they were written.

    A resumed run adds an event file; TensorBoard reads files in name order, and names made within
    one second differ only in a counter compared as text ("10" before "9"), so the series are
    put in order of their events' wall times.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time)]
        for tag in accumulator.Tags()["scalars"]
    }
