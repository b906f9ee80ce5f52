"""Resuming a run in its own run directory: where it stood, and cleaning up what came after.

``loralab train CONFIG --resume RUN_DIR`` continues the run in ``RUN_DIR`` from its ``state/``
(see :mod:`loralab.train.state` for what the state holds). Two things need care besides
restoring the training objects:

- **Logs written after the state.** A run killed some steps after its last state save left
  TensorBoard events for steps the resumed run will train again. :func:`rewind_event_files`
  rewrites the event files (atomically) without them, so the resumed run's series join the
  earlier ones with no duplicates: the logged loss series of an interrupted-and-resumed run is
  the uninterrupted run's. TensorBoard's own "purge_step" cannot do this because ``loss/epoch``
  is logged at x = epoch and would be purged with every step after that number.
- **Changed totals.** Resuming with a config whose steps, epochs or batches per epoch differ from
  the saved run's is allowed (e.g. to train longer) but warned about, since the learning-rate
  schedule and the data position then mean something else.
"""

from __future__ import annotations

import logging
import os
import shlex
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loralab.train.state import TrainingProgress

logger = logging.getLogger(__name__)

EPOCH_TAG = "loss/epoch"  # logged at x = epochs finished, not at x = global step
TOTALS = ("max_train_steps", "epochs", "steps_per_epoch", "batches_per_epoch", "num_processes")


def _keep_event(event: Any, progress: TrainingProgress) -> bool:
    """Whether an event was logged at or before the resume point."""
    if not event.HasField("summary"):
        return True  # file version and other bookkeeping records
    tags = {value.tag for value in event.summary.value}
    # ``progress.epoch`` is the 0-based epoch in progress = the number of epochs finished.
    limit = progress.epoch if tags == {EPOCH_TAG} else progress.global_step
    return event.step <= limit


def rewind_event_files(log_dir: Path, progress: TrainingProgress) -> int:
    """Drop the events logged after ``progress`` from the event files in ``log_dir``.

    Returns how many events were dropped. Each changed file is rewritten to a temporary file
    and renamed over the original.
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    dropped = 0
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [record for record in records if _keep_event(Event.FromString(record), progress)]
        if len(kept) == len(records):
            continue
        dropped += len(records) - len(kept)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                writer = RecordWriter(file)
                for record in kept:
                    writer.write(record)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
    return dropped


def changed_totals(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"name: saved -> current"`` for every run total that differs from the saved run's."""
    return [
        f"{name}: {saved[name]} -> {current[name]}"
        for name in TOTALS
        if name in saved and name in current and saved[name] != current[name]
    ]


def resume_hint(run_dir: Path) -> str:
    """The command that resumes the run in ``run_dir``."""
    return f"loralab train {shlex.quote(str(run_dir / 'config.toml'))} --resume {shlex.quote(str(run_dir))}"
