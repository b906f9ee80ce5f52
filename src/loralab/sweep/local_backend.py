"""The local backend: every run trains in this process, one after another, then every image renders.

Runs share one loaded base model (:class:`~loralab.sweep.model_pool.BaseModelPool`) and the
content-addressed latent cache; evaluation loads each evaluation checkpoint once for all runs.
The pool is emptied before evaluation so that training and evaluation models are never in
memory together.
"""

from __future__ import annotations

from collections.abc import Callable

from loralab.sweep.evaluate import EvalModelCache, EvalSettings, RenderCounts, RenderTarget, evaluate_checkpoint
from loralab.sweep.execution import RunOutcome, RunTask, execute_run
from loralab.sweep.model_pool import BaseModelPool


class LocalBackend:
    """Train and render in this process (see the module docstring)."""

    def __init__(self, progress: str = "quiet") -> None:
        self.progress = progress
        self.pool = BaseModelPool()
        self.eval_models = EvalModelCache()

    def train(
        self, tasks: list[RunTask], report: Callable[[RunOutcome], None], on_measured: Callable[[float], None]
    ) -> list[RunOutcome]:
        """Train ``tasks`` in order; stops after a run that Ctrl-C interrupted."""
        outcomes = []
        for task in tasks:
            outcome = execute_run(task, pool=self.pool, progress=self.progress, on_measured=on_measured)
            outcomes.append(outcome)
            report(outcome)
            if outcome.interrupted:
                break
        self.pool.release()
        return outcomes

    def evaluate(self, settings: EvalSettings, targets: list[RenderTarget]) -> RenderCounts:
        """Render every target's missing images, one evaluation checkpoint at a time."""
        total = RenderCounts()
        for checkpoint in settings.checkpoints:
            counts = evaluate_checkpoint(settings, checkpoint.label, targets, models=self.eval_models)
            total.rendered += counts.rendered
            total.existing += counts.existing
            total.failed.update(counts.failed)
        self.eval_models.release()
        return total

    def close(self) -> None:
        self.pool.release()
        self.eval_models.release()
