"""Train one run of a sweep: skip it when complete, resume or restart it when not, record its status.

:func:`execute_run` is what every backend calls for a run (in this process, or in a Ray worker).
It decides from ``runs/<run>/status.json`` and the run folder what to do:

- ``complete`` with the same config hash: nothing;
- an unfinished run (``running`` or ``failed``) with a saved state: resume it in place;
- an unfinished run without a state, or a folder without a status: start it again from scratch
  (the folder holds nothing a resume could use);
- otherwise: train it.

A run that raises (a bad setting, a NaN loss, out of memory) is marked ``failed`` with its error
and the sweep goes on; a run stopped by Ctrl-C keeps ``running`` and its state, and the sweep stops.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError
from loralab.sweep.layout import RunStatus, read_json, read_status, run_dir, write_status
from loralab.sweep.model_pool import BaseModelPool
from loralab.train.loop import LoopHooks, StepReport
from loralab.train.run import train
from loralab.train.state import find_state_dir

logger = logging.getLogger(__name__)

# Steps timed before a step time counts as measured (the first step pays for warm-up).
TIMED_STEPS = 4


@dataclass(frozen=True)
class RunTask:
    """One run to train: picklable, so a Ray worker can take it."""

    sweep_dir: Path
    name: str
    config: Any  # TrainConfig, with output_name set to the run's name
    config_hash: str
    max_train_steps: int | None = None  # from the plan, for progress messages


@dataclass(frozen=True)
class RunOutcome:
    """What :func:`execute_run` did: ``action`` is skipped, trained, resumed, failed or interrupted."""

    name: str
    action: str
    status: RunStatus

    @property
    def interrupted(self) -> bool:
        return self.action == "interrupted"


class StepTimer:
    """Times a run's optimizer steps through the loop's ``after_step`` hook; reports the step time
    once ``TIMED_STEPS`` gaps are measured (or the run's last step came first)."""

    def __init__(self, on_measured: Callable[[float], None] | None = None, total_steps: int | None = None) -> None:
        self._times: list[float] = []
        self._on_measured = on_measured
        self._report_at = max(2, min(TIMED_STEPS + 1, total_steps or TIMED_STEPS + 1))

    def __call__(self, report: StepReport) -> None:
        self._times.append(time.perf_counter())
        if len(self._times) == self._report_at and self._on_measured is not None:
            self._on_measured(self.seconds_per_step or 0.0)

    @property
    def seconds_per_step(self) -> float | None:
        """Median time between consecutive steps (None before two steps)."""
        gaps = [later - earlier for earlier, later in zip(self._times, self._times[1:])]
        return statistics.median(gaps) if gaps else None


def execute_run(
    task: RunTask,
    *,
    pool: BaseModelPool | None = None,
    progress: str = "quiet",
    on_measured: Callable[[float], None] | None = None,
) -> RunOutcome:
    """Bring ``task``'s run to complete (see the module docstring); never raises for a failed run.

    ``pool``: reuse loaded base models across runs (each run hands its model back as lent).
    ``on_measured(seconds_per_step)``: called once the run has timed its first steps.
    Raises KeyboardInterrupt when Ctrl-C arrives outside the training loop.
    """
    directory = run_dir(task.sweep_dir, task.name)
    previous = read_status(directory)
    if previous is not None and previous.state == "complete" and previous.config_hash == task.config_hash:
        return RunOutcome(task.name, "skipped", previous)
    resume = _prepare_folder(directory, previous)
    earlier_seconds = previous.wall_seconds if (resume and previous is not None) else 0.0
    status = RunStatus("running", config_hash=task.config_hash, wall_seconds=earlier_seconds)
    write_status(directory, status)

    timer = StepTimer(on_measured, task.max_train_steps)
    started = time.perf_counter()
    try:
        result = _train(task, directory, resume=resume, pool=pool, progress=progress, hooks=LoopHooks(after_step=timer))
    except KeyboardInterrupt:
        _finish(status, directory, started, timer)  # stays "running": the next sweep resumes or restarts it
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of one run is recorded and the sweep goes on
        status.state, status.error = "failed", _one_line(exc)
        _finish(status, directory, started, timer)
        if not isinstance(exc, LoralabError):
            logger.debug("run %s failed", task.name, exc_info=True)
        return RunOutcome(task.name, "failed", status)
    finally:
        if pool is not None:
            pool.check_restored()

    status.global_step = result.global_step
    if result.status == "interrupted":
        _finish(status, directory, started, timer)
        return RunOutcome(task.name, "interrupted", status)
    status.state = "complete"
    _finish(status, directory, started, timer)
    return RunOutcome(task.name, "resumed" if resume else "trained", status)


def _prepare_folder(directory: Path, previous: RunStatus | None) -> bool:
    """True when the run resumes from its saved state; otherwise the folder is made empty."""
    if previous is not None and previous.state != "complete" and find_state_dir(directory / "state") is not None:
        return True
    if directory.exists():
        # A run that stopped without a state, failed before saving one, or was trained with other
        # settings: nothing in the folder can be continued, and train() refuses a used folder.
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return False


def _train(
    task: RunTask, directory: Path, *, resume: bool, pool: BaseModelPool | None, progress: str, hooks: LoopHooks
) -> Any:
    base_model = pool.components_for(task.config) if pool is not None else None
    kwargs: dict[str, Any] = {"progress": progress, "hooks": hooks, "base_model": base_model}
    if resume:
        return train(task.config, run_dir=None, resume=directory, **kwargs)
    return train(task.config, run_dir=directory, **kwargs)


def _finish(status: RunStatus, directory: Path, started: float, timer: StepTimer) -> None:
    status.wall_seconds += time.perf_counter() - started
    status.seconds_per_step = timer.seconds_per_step
    manifest = read_json(directory / "manifest.json", {})
    status.peak_memory_mb = (manifest.get("final_metrics") or {}).get("peak_memory_mb")
    write_status(directory, status)


def _one_line(exc: BaseException) -> str:
    """The error as one line: a user error's own message, else its type and first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, LoralabError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
