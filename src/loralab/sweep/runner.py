"""``run_sweep``: expand a sweep file, print its plan, train every run, evaluate, write the results.

Steps, each safe to repeat:

1. read and expand the sweep file (every variant's config validated before anything starts);
   a run folder trained with other settings than its run now has is refused;
2. print the plan (runs x steps, what is done, estimated time); ``--dry-run`` stops here and
   writes nothing;
3. write ``sweep.toml``, ``expanded.json`` and ``evaluation.json``; train the runs not complete
   (skipping finished runs, resuming interrupted ones; see :mod:`loralab.sweep.execution`) on the
   backend: ``local`` (this process, one run after another, base model and latent cache shared)
   or ``ray`` (:mod:`loralab.sweep.ray_backend`);
4. render the missing evaluation images of every complete run's save points, checkpoint by
   checkpoint (:mod:`loralab.sweep.evaluate`), and index them;
5. score the save points with the sweep file's ``[scoring]`` models (:mod:`loralab.sweep.scoring`;
   scores without a model are reported missing) and write ``results.json`` / ``results.csv`` and
   the report (:mod:`loralab.sweep.report`).

Ctrl-C during training ends the current run after its step with its state saved and stops the
sweep; running the same command again resumes it. Latent and text-encoder caches are shared by
content (see :mod:`loralab.data.latent_cache`): each image is encoded once for the whole sweep.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from loralab.config.loading import write_text_atomic
from loralab.sweep.evaluate import (
    EvalSettings,
    RenderCounts,
    RenderTarget,
    base_model_targets,
    is_placeholder,
    resolve_evaluation,
    write_evaluation,
    write_index,
)
from loralab.sweep.execution import RunOutcome, RunTask
from loralab.sweep.expand import EXPANDED_FILE, Expansion, expand_sweep, write_expanded
from loralab.sweep.layout import SWEEP_FILE, RunStatus, eval_dir, read_status, run_dir, save_points, write_status
from loralab.sweep.overview import RunPlan, estimate_line, format_overview, plan_runs, recorded_step_time
from loralab.sweep.results import write_results
from loralab.sweep.spec import SweepError, SweepSpec, read_sweep, safe_name

if TYPE_CHECKING:
    from loralab.sweep.scoring.registry import ScorerRegistry

Printer = Callable[[str], None]
BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class SweepOptions:
    """How to run a sweep (the ``loralab sweep`` options)."""

    file: Path
    out: Path | None = None
    backend: str = "local"
    address: str | None = None
    parallel: int = 1
    dry_run: bool = False
    progress: str = "quiet"  # of each run: "bar", "quiet"
    # Adds scores of the caller's own to the ones the sweep file's models give (the demo's toy
    # likeness, say): called with the registry before the save points are scored.
    extra_scores: Callable[[ScorerRegistry], None] | None = None


@dataclass
class SweepSummary:
    """What a sweep did."""

    sweep_dir: Path
    outcomes: list[RunOutcome] = field(default_factory=list)
    rendered: int = 0
    existing_images: int = 0
    eval_failures: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    report: Path | None = None  # the report's index page, once written
    unplanned: int = 0  # dry run: runs to train that cannot be planned (they would fail)

    def count(self, action: str) -> int:
        return sum(1 for outcome in self.outcomes if outcome.action == action)

    @property
    def all_succeeded(self) -> bool:
        """No run and no evaluation failed, and (dry run) every run to train can be planned."""
        return not (self.count("failed") or self.eval_failures or self.unplanned)

    @property
    def trained(self) -> int:
        return self.count("trained") + self.count("resumed")


class Backend(Protocol):
    """Where runs train and images render; both backends give the same files."""

    def train(
        self, tasks: list[RunTask], report: Callable[[RunOutcome], None], on_measured: Callable[[float], None]
    ) -> list[RunOutcome]: ...

    def evaluate(self, settings: EvalSettings, targets: list[RenderTarget]) -> RenderCounts: ...

    def close(self) -> None: ...


def default_sweep_dir(file: Path) -> Path:
    """``sweeps/<sweep file name>`` in the working directory."""
    return Path("sweeps") / safe_name(Path(file).stem)


def run_sweep(options: SweepOptions, printer: Printer = print) -> SweepSummary:
    """Run the sweep ``options.file`` (see the module docstring).

    Raises SweepError / ConfigError for a bad sweep file, a variant that cannot be configured, or a
    sweep folder holding runs trained with other settings.
    """
    if options.backend not in BACKENDS:
        raise SweepError(f"unknown backend {options.backend!r}; use one of {', '.join(BACKENDS)}")
    if options.parallel < 1:
        raise SweepError(f"--parallel {options.parallel} must be 1 or more")
    if options.backend == "local" and options.parallel > 1:
        raise SweepError("the local backend trains one run at a time; use --backend ray for --parallel runs")
    spec = read_sweep(options.file)
    expansion = expand_sweep(spec)
    sweep_dir = Path(options.out) if options.out is not None else default_sweep_dir(options.file)
    baseline = expansion.baseline
    settings = resolve_evaluation(
        spec, baseline.pretrained_model_name_or_path, cpu_threads=baseline.num_cpu_threads_per_process
    )
    _refuse_foreign_folder(sweep_dir)
    _refuse_changed_runs(expansion, sweep_dir)
    plans = _training_order(plan_runs(expansion, sweep_dir))
    step_time = recorded_step_time(sweep_dir, plans)
    printer(format_overview(spec.title, spec.mode, sweep_dir, plans, settings, step_time))
    summary = SweepSummary(sweep_dir)
    if options.dry_run:
        # Runs still holding <path to ...> placeholders are listed to fill in, not counted as failing.
        summary.unplanned = sum(1 for p in plans if p.to_train and p.problem is not None and not p.placeholders)
        return summary

    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SweepError(f"cannot create the sweep folder {sweep_dir} ({exc.strerror}); choose another --out") from None
    write_text_atomic(sweep_dir / SWEEP_FILE, Path(options.file).read_text(encoding="utf-8"))
    write_expanded(expansion, sweep_dir)
    if settings is not None:
        write_evaluation(settings, sweep_dir)
    backend = _make_backend(options)
    try:
        _train_all(backend, sweep_dir, plans, summary, printer, step_time)
        if summary.interrupted:
            printer(f"sweep interrupted; run the same command again to resume ({sweep_dir})")
            return summary
        if settings is not None:
            _evaluate_all(backend, settings, expansion, sweep_dir, summary, printer)
    except KeyboardInterrupt:
        printer(f"sweep interrupted; run the same command again to resume ({sweep_dir})")
        raise
    finally:
        backend.close()
    summary.report = _score_and_report(spec, sweep_dir, printer, options.extra_scores)
    printer(_summary_line(summary))
    return summary


# ---------------------------------------------------------------------------------------------
# Steps


def _refuse_foreign_folder(sweep_dir: Path) -> None:
    """A sweep writes its files (sweep.toml, results.json ...) into its folder: refuse a folder that
    holds other files and is not a sweep folder, whose files those would replace."""
    if sweep_dir.is_dir() and any(sweep_dir.iterdir()) and not (sweep_dir / EXPANDED_FILE).is_file():
        raise SweepError(f"{sweep_dir} holds files and is not a loralab sweep folder; give --out a new or empty folder")


def _refuse_changed_runs(expansion: Expansion, sweep_dir: Path) -> None:
    for run in expansion.runs:
        status = read_status(run_dir(sweep_dir, run.name))
        if status is not None and status.config_hash and status.config_hash != run.config_hash:
            raise SweepError(
                f"{run_dir(sweep_dir, run.name)} was trained with other settings than run {run.name!r} now has; "
                f"delete that folder to train it again, or give the sweep another --out"
            )


def _training_order(plans: list[RunPlan]) -> list[RunPlan]:
    """Baseline first, then runs that share a base model next to each other (it stays loaded)."""
    from loralab.sweep.model_pool import model_key

    keys = [model_key(plan.run.config) for plan in plans]
    first_seen: dict[Any, int] = {}
    for index, key in enumerate(keys):
        first_seen.setdefault(key, index)
    order = sorted(range(len(plans)), key=lambda i: (not plans[i].run.is_baseline, first_seen[keys[i]], i))
    return [plans[i] for i in order]


def _make_backend(options: SweepOptions) -> Backend:
    if options.backend == "ray":
        from loralab.sweep.ray_backend import RayBackend

        return RayBackend(address=options.address, parallel=options.parallel)
    from loralab.sweep.local_backend import LocalBackend

    return LocalBackend(progress=options.progress)


def _train_all(
    backend: Backend,
    sweep_dir: Path,
    plans: list[RunPlan],
    summary: SweepSummary,
    printer: Printer,
    step_time: tuple[float, str] | None,
) -> None:
    tasks = []
    for plan in plans:
        if not plan.to_train:
            status = read_status(run_dir(sweep_dir, plan.run.name)) or RunStatus("complete")
            summary.outcomes.append(RunOutcome(plan.run.name, "skipped", status))
            continue
        if plan.problem is not None:
            # Cannot train (the planner said why): recorded as failed without loading anything.
            status = RunStatus("failed", error=plan.problem, config_hash=plan.run.config_hash)
            write_status(run_dir(sweep_dir, plan.run.name), status)
            summary.outcomes.append(RunOutcome(plan.run.name, "failed", status))
            printer(f"{plan.run.name}: failed: {plan.problem}")
            continue
        config = plan.run.config.model_copy(update={"output_name": plan.run.name})
        tasks.append(RunTask(sweep_dir, plan.run.name, config, plan.run.config_hash, plan.steps))
    total = len(tasks)
    done = [0]

    def report(outcome: RunOutcome) -> None:
        done[0] += 1
        summary.outcomes.append(outcome)
        status = outcome.status
        if outcome.action == "failed":
            text = f"failed: {status.error}"
        elif outcome.interrupted:
            text = f"interrupted at step {status.global_step}"
        else:
            text = f"{outcome.action} ({status.global_step} steps, {status.wall_seconds:.1f} s)"
        printer(f"[{done[0]}/{total}] {outcome.name}: {text}")

    estimated = [step_time is not None]

    def on_measured(seconds_per_step: float) -> None:
        if not estimated[0]:
            estimated[0] = True
            printer(estimate_line(plans, seconds_per_step, "the first run"))

    if tasks:
        outcomes = backend.train(tasks, report, on_measured)
        summary.interrupted = any(outcome.interrupted for outcome in outcomes)


def _evaluate_all(
    backend: Backend, settings: EvalSettings, expansion: Expansion, sweep_dir: Path, summary: SweepSummary,
    printer: Printer,
) -> None:  # fmt: skip
    labels = tuple(c.label for c in settings.checkpoints)
    targets = []
    for run in expansion.runs:
        directory = run_dir(sweep_dir, run.name)
        status = read_status(directory)
        if status is None or status.state != "complete":
            continue
        width, height = settings.width or run.config.resolution[0], settings.height or run.config.resolution[1]
        clip_skip = settings.clip_skip or run.config.clip_skip
        for point in save_points(directory, run.name):
            if settings.wants(point):
                folder = eval_dir(sweep_dir, run.name, point.label)
                targets.append(RenderTarget(folder, point.path, width, height, clip_skip, labels))
    baseline = expansion.baseline
    width, height = settings.width or baseline.resolution[0], settings.height or baseline.resolution[1]
    targets += base_model_targets(settings, sweep_dir, width, height, settings.clip_skip or baseline.clip_skip)
    counts = backend.evaluate(settings, targets)
    summary.rendered += counts.rendered
    summary.existing_images += counts.existing
    summary.eval_failures.update(counts.failed)
    for folder, error in counts.failed.items():
        printer(f"evaluation of {folder} failed: {error}")
    for target in targets:
        write_index(settings, target)


def _score_and_report(
    spec: SweepSpec, sweep_dir: Path, printer: Printer, extra_scores: Callable[[ScorerRegistry], None] | None
) -> Path | None:
    """Score every evaluated save point with the sweep file's models (and ``extra_scores``), then
    write the results and the report; returns the report's index page, None when it failed.

    A scoring model that cannot be used is reported and the report is written without its scores;
    a report that cannot be written is reported too (the results are written either way).
    """
    import torch

    from loralab.errors import LoralabError
    from loralab.sweep.report import write_report
    from loralab.sweep.scoring import ScoringSettings, build_scorers, score_sweep

    def model(path: str | None) -> Path | None:
        return spec.resolve(path) if path and not is_placeholder(path) else None

    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = ScoringSettings(model(spec.scoring.face_model), model(spec.scoring.clip_model), device)
    try:
        scorers = build_scorers(settings)
        if extra_scores is not None:
            extra_scores(scorers)
        score_sweep(sweep_dir, scorers)
    except LoralabError as exc:
        printer(f"scoring failed: {exc}")
    write_results(sweep_dir)  # with the scores
    try:
        report = write_report(sweep_dir)
    except LoralabError as exc:  # the runs and results stand; `loralab report` can write it later
        printer(f"report not written: {exc}")
        return None
    printer(f"report: {report}")
    return report


def _summary_line(summary: SweepSummary) -> str:
    parts = [
        f"{summary.trained} trained",
        f"{summary.count('skipped')} already complete",
        f"{summary.count('failed')} failed",
        f"{summary.rendered} images rendered ({summary.existing_images} existed)",
    ]
    if summary.eval_failures:
        parts.append(f"{len(summary.eval_failures)} evaluations failed")
    return f"sweep done: {', '.join(parts)}; results in {summary.sweep_dir / 'results.json'}"


def progress_mode() -> str:
    """A progress bar per run on a terminal, nothing otherwise."""
    return "bar" if sys.stderr.isatty() else "quiet"
