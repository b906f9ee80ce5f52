"""The plan a sweep prints before it starts: runs, steps, what is done, and how long the rest takes.

Steps and epochs come from the planner (:func:`loralab.plan.planner.make_plan`, no model
loaded). The time estimate multiplies the steps still to train by a measured step time: the one
earlier runs of this sweep folder recorded, else the one the first run measures after its first
steps (the runner prints the estimate then).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError
from loralab.sweep.evaluate import EvalSettings, is_placeholder
from loralab.sweep.expand import Expansion, SweepRun
from loralab.sweep.layout import read_status, run_dir


@dataclass(frozen=True)
class RunPlan:
    """One run as the overview shows it. ``problem``: why it cannot be planned (it will fail)."""

    run: SweepRun
    steps: int | None
    epochs: int | None
    state: str  # "complete", "to train", "to resume", "to retry"
    problem: str | None = None
    placeholders: tuple[str, ...] = field(default=())

    @property
    def to_train(self) -> bool:
        return self.state != "complete"


def placeholders_of(config: Any) -> tuple[str, ...]:
    """Settings still holding a ``<path to ...>`` placeholder, as ``key = value``."""
    from loralab.sweep.expand import OUTPUT_KEYS  # the sweep chooses where runs write

    found = []
    for key, value in config.model_dump().items():
        if key not in OUTPUT_KEYS and isinstance(value, str | Path) and is_placeholder(str(value)):
            found.append(f"{key} = {value}")
    return tuple(found)


def plan_runs(expansion: Expansion, sweep_dir: Path) -> list[RunPlan]:
    """Plan every run of ``expansion`` (unique runs, training order)."""
    from loralab.plan.planner import check_run_settings, make_plan
    from loralab.train.state import find_state_dir

    plans = []
    for run in expansion.runs:
        directory = run_dir(sweep_dir, run.name)
        status = read_status(directory)
        if status is not None and status.state == "complete" and status.config_hash == run.config_hash:
            state = "complete"
        elif status is not None and find_state_dir(directory / "state") is not None:
            state = "to resume"
        else:
            state = "to retry" if status is not None and status.state == "failed" else "to train"
        placeholders = placeholders_of(run.config)
        try:
            plan = make_plan(run.config)
            check_run_settings(run.config)
            steps, epochs, problem = plan.max_train_steps, plan.epochs, None
        except LoralabError as exc:
            steps, epochs, problem = None, None, str(exc)
        plans.append(RunPlan(run, steps, epochs, state, problem, placeholders))
    return plans


def recorded_step_time(sweep_dir: Path, plans: list[RunPlan]) -> tuple[float, str] | None:
    """The median step time earlier runs of this folder measured, and one run it came from."""
    measured = []
    for plan in plans:
        status = read_status(run_dir(sweep_dir, plan.run.name))
        if status is not None and status.seconds_per_step:
            measured.append((status.seconds_per_step, plan.run.name))
    if not measured:
        return None
    median = statistics.median(seconds for seconds, _ in measured)
    return median, measured[0][1]


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


def steps_to_train(plans: list[RunPlan]) -> int:
    return sum(plan.steps or 0 for plan in plans if plan.to_train and plan.problem is None)


def estimate_line(plans: list[RunPlan], seconds_per_step: float, source: str) -> str:
    steps = steps_to_train(plans)
    return (
        f"estimated training time: {format_duration(steps * seconds_per_step)} for {steps} steps "
        f"at {seconds_per_step:.3g} s/step (measured on {source})"
    )


def format_overview(
    title: str,
    mode: str,
    sweep_dir: Path,
    plans: list[RunPlan],
    evaluation: EvalSettings | None,
    step_time: tuple[float, str] | None,
) -> str:
    """The plan as printed before a sweep starts (and by ``--dry-run``)."""
    width = max([len(plan.run.name) for plan in plans] + [3])
    lines = [f"sweep {title!r} ({mode}): {len(plans)} runs -> {sweep_dir}"]
    lines.append(f"  {'run':<{width}}  {'steps':>7}  {'epochs':>6}  state")
    for plan in plans:
        steps = "?" if plan.steps is None else str(plan.steps)
        epochs = "?" if plan.epochs is None else str(plan.epochs)
        lines.append(f"  {plan.run.name:<{width}}  {steps:>7}  {epochs:>6}  {plan.state}")
    pending = [plan for plan in plans if plan.to_train]
    lines.append(f"to train: {len(pending)} of {len(plans)} runs, {steps_to_train(plans)} steps")
    if pending and steps_to_train(plans):
        if step_time is not None:
            lines.append(estimate_line(plans, *step_time))
        else:
            lines.append("estimated training time: measured on the first run's first steps")
    unplanned = [plan for plan in pending if plan.problem is not None]
    if unplanned:
        lines.append(f"not planned ({len(unplanned)} runs, they will fail until fixed): {unplanned[0].problem}")
    placeholders = sorted({item for plan in plans for item in plan.placeholders})
    if placeholders:
        lines.append("fill in before training: " + "; ".join(placeholders))
    if evaluation is not None:
        lines.append(_evaluation_line(evaluation))
    return "\n".join(lines)


def _evaluation_line(evaluation: EvalSettings) -> str:
    prompts = sum(len(p) for p in evaluation.prompt_sets.values())
    parts = [
        f"{len(evaluation.checkpoints)} checkpoints ({', '.join(c.label for c in evaluation.checkpoints)})",
        f"{len(evaluation.prompt_sets)} prompt sets ({prompts} prompts)",
        f"{len(evaluation.seeds)} seeds",
        f"{len(evaluation.lora_weights)} LoRA weights",
    ]
    if len(evaluation.trigger_modes) > 1:
        parts.append("with and without trigger")
    save_points = evaluation.save_points
    if not isinstance(save_points, str):
        save_points = ", ".join(save_points)
    placeholders = [c.path for c in evaluation.checkpoints if is_placeholder(c.path)]
    line = (
        f"evaluation: {' x '.join(parts)} = {evaluation.images_per_save_point()} images per save point "
        f"({save_points} save points)"
    )
    if placeholders:
        line += "; fill in: " + ", ".join(placeholders)
    return line
