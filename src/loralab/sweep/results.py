"""``results.json`` / ``results.csv``: one row per run and save point, from what the sweep folder holds.

A row joins the run's entries in ``expanded.json`` (comparison, axis, value, baseline or not; a
run in several comparisons, as the baseline, lists them joined with commas), its ``status.json``
(state, error, wall time, peak memory), its training logs (steps at the save point,
``final_loss`` = ``loss/epoch`` at the save point, the peak ``lr/d*lr``) and, when the scorer has
written them, the scores in ``scores/<run>/<save point>.json`` (one column per score; the reasons
for missing ones in ``missing_scores``). A run without save points (failed, not trained yet) has
one row with ``save_point`` null.

:func:`write_results` rebuilds both files from the folder alone, so the report can call it again
after scoring.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from loralab.config.loading import write_text_atomic
from loralab.sweep.expand import read_expanded
from loralab.sweep.layout import SCORES_DIR, SavePoint, read_json, read_status, run_dir, save_points, write_json

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
MISSING_SCORES = "missing_scores"
_SCORE_FILE_KEYS = ("missing", "inputs")  # keys of a score file that are not scores
ROW_FIELDS = (
    "run", "comparison", "axis", "value", "is_baseline", "seed_repeat", "save_point", "epoch", "steps",
    "final_loss", "max_d_lr", "wall_seconds", "peak_memory_mb", "state", "error",
)  # fmt: skip


def result_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every row (see the module docstring), runs in ``expanded.json`` order, save points in training order."""
    sweep_dir = Path(sweep_dir)
    entries: dict[str, list[dict[str, Any]]] = {}
    for entry in read_expanded(sweep_dir):
        entries.setdefault(entry["name"], []).append(entry)
    rows = []
    for name, run_entries in entries.items():
        facts = _RunFacts.read(sweep_dir, name)
        first = run_entries[0]
        base = {
            "run": name,
            "comparison": joined(entry["comparison"] for entry in run_entries),
            "axis": joined(entry["axis"] for entry in run_entries),
            "value": joined(entry["value"] for entry in run_entries),
            "is_baseline": first["is_baseline"],
            "seed_repeat": first["seed_repeat"],
        }
        run_fields = {
            "max_d_lr": facts.max_d_lr, "wall_seconds": facts.status.get("wall_seconds"),
            "peak_memory_mb": facts.status.get("peak_memory_mb"), "state": facts.status.get("state", "not started"),
            "error": facts.status.get("error"),
        }  # fmt: skip
        if not facts.points:
            rows.append({**dict.fromkeys(ROW_FIELDS), **base, **run_fields})
            continue
        for point in facts.points:
            row = {**base, "save_point": point.label, "epoch": point.epoch, "steps": facts.steps_at(point)}
            row["final_loss"] = facts.loss_at(point)
            row.update(run_fields)
            row.update(_scores(sweep_dir, name, point.label))
            rows.append(row)
    return rows


def joined(values: Any) -> Any:
    """The one value every entry of a run shares, or the distinct values joined with commas (the
    baseline belongs to every comparison of a one-at-a-time sweep)."""
    distinct = list(dict.fromkeys(value for value in values if value is not None))
    if len(distinct) <= 1:
        return distinct[0] if distinct else None
    return ",".join(str(value) for value in distinct)


def write_results(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``results.json`` and ``results.csv`` into ``sweep_dir``; returns the rows."""
    rows = result_rows(sweep_dir)
    write_json(Path(sweep_dir) / RESULTS_JSON, [_json_ready(row) for row in rows])
    write_text_atomic(Path(sweep_dir) / RESULTS_CSV, _csv_text(rows))
    return rows


class _RunFacts:
    """What one run's folder tells about it (read once per run)."""

    def __init__(self, status: dict[str, Any], points: list[SavePoint], scalars: dict[str, list[tuple[int, float]]],
                 totals: dict[str, Any]) -> None:  # fmt: skip
        self.status = status
        self.points = points
        self.scalars = scalars
        self.totals = totals

    @classmethod
    def read(cls, sweep_dir: Path, name: str) -> _RunFacts:
        directory = run_dir(sweep_dir, name)
        status = read_status(directory)
        status_json = status.to_json() if status is not None else {}
        if status is None or status.state != "complete":
            return cls(status_json, [], {}, {})
        manifest = read_json(directory / "manifest.json", {})
        output_name = _output_name(directory)
        scalars = {}
        if (directory / "logs").is_dir():
            from loralab.train.tb_logging import read_scalars

            scalars = read_scalars(directory / "logs")
        totals = dict(manifest.get("plan") or {})
        totals.setdefault("global_step", (manifest.get("final_metrics") or {}).get("global_step") or status.global_step)
        return cls(status_json, save_points(directory, output_name), scalars, totals)

    @property
    def max_d_lr(self) -> float | None:
        series = self.scalars.get("lr/d*lr")
        return max(value for _, value in series) if series else None

    def loss_at(self, point: SavePoint) -> float | None:
        series = dict(self.scalars.get("loss/epoch", []))
        if point.epoch is not None:
            return series.get(point.epoch)
        if point.label == "final" and series:
            return series[max(series)]
        return None

    def steps_at(self, point: SavePoint) -> int | None:
        if point.step is not None:
            return point.step
        total = self.totals.get("global_step") or self.totals.get("max_train_steps")
        per_epoch = self.totals.get("steps_per_epoch")
        if point.epoch is not None and per_epoch:
            return min(point.epoch * per_epoch, total) if total else point.epoch * per_epoch
        return total


def _output_name(directory: Path) -> str:
    import tomllib

    try:
        return tomllib.loads((directory / "config.toml").read_text(encoding="utf-8")).get("output_name", directory.name)
    except (OSError, tomllib.TOMLDecodeError):
        return directory.name


def _scores(sweep_dir: Path, run: str, save_point: str) -> dict[str, Any]:
    data = read_json(Path(sweep_dir) / SCORES_DIR / run / f"{save_point}.json")
    if not isinstance(data, dict):
        return {}
    scores = {key: value for key, value in data.items() if key not in _SCORE_FILE_KEYS}
    scores[MISSING_SCORES] = dict(data.get("missing") or {})
    return scores


def _json_ready(row: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN or infinity: a diverged loss is empty, and the run's error says what happened.
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in row.items()}


def _csv_text(rows: list[dict[str, Any]]) -> str:
    columns = list(ROW_FIELDS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {key: _csv_value(value) for key, value in row.items()}
        writer.writerow(flat)
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if isinstance(value, dict):
        return "; ".join(f"{key}: {item}" for key, item in value.items())
    return "" if value is None else value
