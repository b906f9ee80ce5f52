"""Everything the report shows, read from a sweep folder (nothing is computed here but reading).

Reads ``expanded.json`` (runs and comparisons), each run's ``status.json``, ``config.toml`` and
TensorBoard logs, the eval indexes and the score files. A run that never started, failed, or
has no logs yet is still listed, with what is known about it.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.sweep.layout import (
    BASELINE_MODELS,
    EVAL_DIR,
    FINAL,
    INDEX_FILE,
    SCORES_DIR,
    SWEEP_FILE,
    read_status,
    run_dir,
)
from loralab.sweep.scoring.base import EvalImage
from loralab.sweep.scoring.eval_index import read_eval_index, read_run_config_values
from loralab.sweep.scoring.registry import BUILTIN_SCORES
from loralab.sweep.scoring.save_points import SavePointScores, read_scores, scores_path

NOT_STARTED = "not started"
_EPOCH_LABEL = re.compile(r"e(\d{6})")
_STEP_LABEL = re.compile(r"step(\d{8})")


@dataclass
class RunReport:
    """One run: its place in the sweep, how it went, its curves, images and scores."""

    name: str
    comparisons: list[str]
    is_baseline: bool
    seed_repeat: int | None
    entries: dict[str, dict[str, Any]]  # comparison -> its expanded.json entry (axis, value, ...)
    state: str = NOT_STARTED
    error: str | None = None
    wall_seconds: float | None = None
    peak_memory_mb: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    images: dict[str, tuple[EvalImage, ...]] = field(default_factory=dict)  # save point -> eval images
    scores: dict[str, SavePointScores] = field(default_factory=dict)  # save point -> scores

    @property
    def display_name(self) -> str:
        """The run name, marked as the baseline where the name does not already say so."""
        return self.name if not self.is_baseline or self.name.startswith("baseline") else f"{self.name} (baseline)"

    @property
    def save_points(self) -> list[str]:
        """Save points with images or scores, in training order."""
        return sorted(set(self.images) | set(self.scores), key=save_point_order)

    @property
    def last_step(self) -> int | None:
        series = self.scalars.get("loss/current")
        return series[-1][0] if series else None

    @property
    def last_epoch_loss(self) -> float | None:
        """The last ``loss/epoch`` logged (the mean loss of the last finished epoch)."""
        series = self.scalars.get("loss/epoch")
        return series[-1][1] if series else None


@dataclass
class SweepReportData:
    """The whole sweep as the report sees it."""

    sweep_dir: Path
    runs: dict[str, RunReport]  # run name -> run, in expanded.json order
    comparisons: dict[str, list[str]]  # comparison -> run names: baseline runs first, then expanded.json order
    base_images: dict[str, tuple[EvalImage, ...]]  # eval checkpoint label -> images without a LoRA
    base_scores: dict[str, SavePointScores]
    score_names: list[str]
    title: str = ""  # the sweep file's name (default: the folder's name)
    description: str = ""

    def comparison_runs(self, comparison: str) -> list[RunReport]:
        return [self.runs[name] for name in self.comparisons[comparison]]


def save_point_order(label: str) -> tuple[int, int, str]:
    """Training order: epochs, then steps, then ``final``; unknown labels last, by name."""
    if (match := _EPOCH_LABEL.fullmatch(label)) is not None:
        return (0, int(match.group(1)), label)
    if (match := _STEP_LABEL.fullmatch(label)) is not None:
        return (1, int(match.group(1)), label)
    return (2, 0, label) if label == FINAL else (3, 0, label)


def save_point_title(label: str) -> str:
    """``e000002`` -> ``epoch 2``, ``step00000100`` -> ``step 100``, ``final`` -> ``final``."""
    if (match := _EPOCH_LABEL.fullmatch(label)) is not None:
        return f"epoch {int(match.group(1))}"
    if (match := _STEP_LABEL.fullmatch(label)) is not None:
        return f"step {int(match.group(1))}"
    return label


def collect_sweep(sweep_dir: Path) -> SweepReportData:
    """Read a sweep folder. Raises SweepError when it has no ``expanded.json``."""
    from loralab.sweep.expand import read_expanded

    sweep_dir = Path(sweep_dir)
    runs: dict[str, RunReport] = {}
    comparisons: dict[str, list[str]] = {}
    for entry in read_expanded(sweep_dir):
        name, comparison = entry["name"], entry.get("comparison") or "sweep"
        run = runs.get(name)
        if run is None:
            run = runs[name] = RunReport(name, [], bool(entry.get("is_baseline")), entry.get("seed_repeat"), {})
        run.comparisons.append(comparison)
        run.entries[comparison] = entry
        comparisons.setdefault(comparison, []).append(name)
    for names in comparisons.values():  # the baseline first: it is the row everything is read against
        names.sort(key=lambda name: not runs[name].is_baseline)
    for run in runs.values():
        _read_run(sweep_dir, run)
    base_images = {
        index.parent.name: read_eval_index(index, sweep_dir)
        for index in sorted((sweep_dir / EVAL_DIR / BASELINE_MODELS).glob(f"*/{INDEX_FILE}"))
    }
    base_scores = {
        label: scores
        for label in base_images
        if (scores := read_scores(scores_path(sweep_dir, BASELINE_MODELS, label))) is not None
    }
    title, description = _sweep_title(sweep_dir)
    return SweepReportData(
        sweep_dir, runs, comparisons, base_images, base_scores, _score_names(runs, base_scores), title, description
    )


def _sweep_title(sweep_dir: Path) -> tuple[str, str]:
    """``name`` and ``description`` of the sweep file copied into the folder (raw TOML: the
    copy's relative paths need not resolve for this)."""
    try:
        spec = tomllib.loads((sweep_dir / SWEEP_FILE).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        spec = {}
    return str(spec.get("name") or sweep_dir.name), str(spec.get("description") or "")


def _read_run(sweep_dir: Path, run: RunReport) -> None:
    directory = run_dir(sweep_dir, run.name)
    status = read_status(directory)
    if status is not None:
        run.state, run.error = status.state, status.error
        run.wall_seconds, run.peak_memory_mb = status.wall_seconds, status.peak_memory_mb
    run.config = read_run_config_values(directory)
    logs = directory / "logs"
    if any(logs.glob("events.out.tfevents.*")):  # `loralab train` logs straight into logs/
        from loralab.train.tb_logging import read_scalars

        run.scalars = read_scalars(logs)
    for index in sorted((sweep_dir / EVAL_DIR / run.name).glob(f"*/{INDEX_FILE}")):
        run.images[index.parent.name] = read_eval_index(index, sweep_dir)
    scores_dir = sweep_dir / SCORES_DIR / run.name
    for path in sorted(scores_dir.glob("*.json")):
        if (scores := read_scores(path)) is not None:
            run.scores[path.stem] = scores


def _score_names(runs: dict[str, RunReport], base_scores: dict[str, SavePointScores]) -> list[str]:
    """Every score name on disk: the built-in ones in their order, then the others by name."""
    found: set[str] = set()
    for scores in [s for run in runs.values() for s in run.scores.values()] + list(base_scores.values()):
        found |= set(scores.values) | set(scores.missing)
    return [name for name in BUILTIN_SCORES if name in found] + sorted(found - set(BUILTIN_SCORES))
