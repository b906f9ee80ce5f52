"""The Ray backend: runs train as tasks on a Ray cluster (or a local Ray instance), N at a time.

Install with ``pip install 'loralab[ray]'``. ``--address`` joins an existing cluster (``ray start
--head`` on one machine, ``ray start --address ...`` on the others); without it a local Ray
instance is started and stopped with the sweep.

Each of the ``--parallel`` workers is a Ray actor holding one GPU where the cluster has GPUs (one
CPU otherwise). Runs are handed to whichever worker is free; a worker keeps its base model
loaded between the runs it gets (:class:`~loralab.sweep.model_pool.BaseModelPool`), as the local
backend does. Evaluation is one task per evaluation checkpoint. Workers do exactly what the
local backend does (:func:`~loralab.sweep.execution.execute_run`,
:func:`~loralab.sweep.evaluate.evaluate_checkpoint`), so the files, and the results, are the same.

The sweep folder and the latent cache must be on storage every node sees: workers write runs
and images into the sweep folder, and the driver's ``LORALAB_CACHE_DIR`` (and ``HF_HUB_OFFLINE``)
are passed on to the workers. Ctrl-C stops the sweep and its workers; a run cut short restarts
(or resumes from its saved state) the next time the sweep runs.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

from loralab.sweep.evaluate import EvalModelCache, EvalSettings, RenderCounts, RenderTarget, evaluate_checkpoint
from loralab.sweep.execution import RunOutcome, RunTask, execute_run
from loralab.sweep.model_pool import BaseModelPool
from loralab.sweep.spec import SweepError

# Environment the workers need to find the same caches and stay offline.
FORWARDED_ENV = ("LORALAB_CACHE_DIR", "HF_HUB_OFFLINE", "XDG_CACHE_HOME")


class SweepWorker:
    """What one Ray actor does: train runs and render checkpoints, keeping models between calls."""

    def __init__(self) -> None:
        self.pool = BaseModelPool()
        self.eval_models = EvalModelCache()

    def train(self, task: RunTask) -> RunOutcome:
        return execute_run(task, pool=self.pool)

    def evaluate(self, settings: EvalSettings, checkpoint_label: str, targets: list[RenderTarget]) -> RenderCounts:
        self.pool.release()  # training is over: make room for the evaluation checkpoint
        try:
            return evaluate_checkpoint(settings, checkpoint_label, targets, models=self.eval_models)
        finally:
            self.eval_models.release()


class RayBackend:
    """Dispatch runs and evaluation to Ray actors (see the module docstring)."""

    def __init__(self, *, address: str | None = None, parallel: int = 1) -> None:
        try:
            import ray
        except ImportError:
            raise SweepError("the ray backend needs Ray: pip install 'loralab[ray]' (or use --backend local)") from None
        self._ray = ray
        self._started_here = not ray.is_initialized()
        if self._started_here:
            env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
            try:
                ray.init(
                    address=address, include_dashboard=False, log_to_driver=True,
                    runtime_env={"env_vars": env} if env else None,
                )  # fmt: skip
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise SweepError(f"cannot start or reach {where}: {str(exc).splitlines()[0]}") from None
        has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
        resources: dict[str, Any] = {"num_gpus": 1} if has_gpus else {"num_cpus": 1}
        actor = ray.remote(SweepWorker).options(**resources)
        self._workers = [actor.remote() for _ in range(parallel)]

    def train(
        self, tasks: list[RunTask], report: Callable[[RunOutcome], None], on_measured: Callable[[float], None]
    ) -> list[RunOutcome]:
        """Train ``tasks`` on the workers, each run on the first free one; outcomes as runs finish."""
        from ray.util import ActorPool

        pool = ActorPool(self._workers)
        outcomes = []
        for outcome in pool.map_unordered(lambda worker, task: worker.train.remote(task), tasks):
            outcomes.append(outcome)
            report(outcome)
        return outcomes

    def evaluate(self, settings: EvalSettings, targets: list[RenderTarget]) -> RenderCounts:
        """One task per evaluation checkpoint, spread over the workers."""
        workers = itertools.cycle(self._workers)
        futures = [next(workers).evaluate.remote(settings, c.label, targets) for c in settings.checkpoints]
        total = RenderCounts()
        for counts in self._ray.get(futures):
            total.rendered += counts.rendered
            total.existing += counts.existing
            total.failed.update(counts.failed)
        return total

    def close(self) -> None:
        for worker in self._workers:
            self._ray.kill(worker)
        self._workers = []
        if self._started_here:
            self._ray.shutdown()
