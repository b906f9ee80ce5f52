"""The numbers behind the report's tables: config differences, score rows, best variants, noise.

Pure functions of :class:`~loralab.sweep.report.collect.RunReport` data; the HTML module only
formats what these return.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loralab.sweep.report.collect import RunReport, save_point_order
from loralab.sweep.scoring.registry import higher_is_better

# Where a run writes differs for every run and says nothing about how it trained.
PER_RUN_KEYS = frozenset({"output_dir", "logging_dir", "output_name", "resume"})


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer_args": {"d0": 1e-6}}`` -> ``{"optimizer_args.d0": 1e-6}`` (the names sweeps use)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(runs: Sequence[RunReport]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The settings whose values differ between ``runs``: (keys, run name -> key -> value).

    From each run's ``config.toml``; runs without one (not started) contribute their sweep
    overrides. A key a run does not set is shown as unset (None).
    """
    settings: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run.config:
            settings[run.name] = flatten(run.config)
        else:
            overrides = next(iter(run.entries.values()), {}).get("overrides") or {}
            settings[run.name] = flatten(overrides)
    keys = sorted({key for values in settings.values() for key in values} - PER_RUN_KEYS)
    different = [
        key
        for key in keys
        if len({json.dumps(values.get(key), sort_keys=True, default=str) for values in settings.values()}) > 1
    ]
    return different, settings


@dataclass(frozen=True)
class ScoreRow:
    """One run at one save point with its scores (value or missing reason per score)."""

    run: RunReport
    save_point: str
    values: dict[str, float]
    missing: dict[str, str]


def score_rows(runs: Sequence[RunReport]) -> list[ScoreRow]:
    """Every scored save point of ``runs``, in run order then training order."""
    return [
        ScoreRow(run, point, run.scores[point].values, run.scores[point].missing)
        for run in runs
        for point in sorted(run.scores, key=save_point_order)
    ]


def best_rows(rows: Sequence[ScoreRow], score_names: Sequence[str]) -> dict[str, ScoreRow]:
    """Per score, the row with the best value (ties: the first row).

    Scores without values are left out, and so are scores where every row has the same value:
    nothing won there.
    """
    best: dict[str, ScoreRow] = {}
    for name in score_names:
        candidates = [row for row in rows if name in row.values]
        if len(candidates) > 1 and len({row.values[name] for row in candidates}) == 1:
            continue
        if candidates:
            pick = max if higher_is_better(name) else min
            best[name] = pick(candidates, key=lambda row: row.values[name])
    return best


def baseline_spread(runs: Sequence[RunReport], score_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per save point and score, max - min over the baseline's seed repeats (where 2+ have a value).

    Two runs of identical settings differ by this much from noise alone: a variant's difference
    from the baseline smaller than that is not evidence.
    """
    baselines = [run for run in runs if run.is_baseline]
    spread: dict[str, dict[str, float]] = {}
    points = sorted({point for run in baselines for point in run.scores}, key=save_point_order)
    for point in points:
        for name in score_names:
            values = [
                scores.values[name]
                for run in baselines
                if (scores := run.scores.get(point)) is not None and name in scores.values
            ]
            if len(values) > 1:
                spread.setdefault(point, {})[name] = max(values) - min(values)
    return spread


@dataclass(frozen=True)
class Verdict:
    """The best variant of a comparison for one score, against the baseline at the same save point."""

    score: str
    best: ScoreRow
    baseline_value: float | None
    noise: float | None  # the baseline's seed spread at that save point, when it was repeated

    @property
    def within_noise(self) -> bool | None:
        """Whether the best variant differs from the baseline by no more than the seed noise."""
        if self.best.run.is_baseline or self.baseline_value is None or self.noise is None:
            return None
        return abs(self.best.values[self.score] - self.baseline_value) <= self.noise


def verdicts(runs: Sequence[RunReport], score_names: Sequence[str]) -> list[Verdict]:
    """One :class:`Verdict` per score that has values in this comparison."""
    rows = score_rows(runs)
    spread = baseline_spread(runs, score_names)
    baseline = next((run for run in runs if run.is_baseline and (run.seed_repeat or 1) == 1), None)
    out = []
    for name, row in best_rows(rows, score_names).items():
        base_scores = baseline.scores.get(row.save_point) if baseline else None
        out.append(
            Verdict(
                name,
                row,
                base_scores.values.get(name) if base_scores else None,
                spread.get(row.save_point, {}).get(name),
            )
        )
    return out
