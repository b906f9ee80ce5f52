"""``results.json`` / ``results.csv``: one row per run and save point, with the scores.

The sweep runner writes the rows it knows (steps, losses, state); the report adds a column per
score from ``scores/`` and fills what the runner left out from the run folders. The runner's
values win for the fields it wrote; score columns always come from the score files, so a score
computed later (a model given afterwards) reaches the table. A run with no save point (failed
early, not started) still gets one row, with an empty save point, so failures are listed too.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from loralab.config.loading import write_text_atomic
from loralab.sweep.layout import read_json, write_json
from loralab.sweep.report.collect import RunReport, SweepReportData

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
LEADING_COLUMNS = ("run", "comparison", "axis", "value", "is_baseline", "save_point", "steps", "final_loss")
TRAILING_COLUMNS = ("wall_seconds", "peak_memory_mb", "state", "error")


def build_rows(data: SweepReportData) -> list[dict[str, Any]]:
    """The result rows: the runner's ``results.json`` rows merged with what is on disk."""
    previous = read_json(data.sweep_dir / RESULTS_JSON, default=[])
    runner_rows = {
        (row.get("run"), row.get("save_point") or ""): row
        for row in (previous if isinstance(previous, list) else [])
        if isinstance(row, dict)
    }
    rows = []
    for run in data.runs.values():
        for save_point in run.save_points or [""]:
            row = _row_from_disk(run, save_point, data.score_names)
            for key, value in runner_rows.pop((run.name, save_point), {}).items():
                if key not in data.score_names and (value is not None or key not in row):
                    row[key] = value
            rows.append(_finite(row))
    # Rows the runner wrote for runs no longer in expanded.json stay, with their scores columns empty.
    for row in runner_rows.values():
        rows.append(_finite({**row, **{name: row.get(name) for name in data.score_names}}))
    return rows


def _row_from_disk(run: RunReport, save_point: str, score_names: list[str]) -> dict[str, Any]:
    entries = list(run.entries.values())
    scores = run.scores.get(save_point)
    row: dict[str, Any] = {
        "run": run.name,
        "comparison": _joined(entry.get("comparison") for entry in entries),
        "axis": _joined(entry.get("axis") for entry in entries),
        "value": _joined(entry.get("value") for entry in entries),
        "is_baseline": run.is_baseline,
        "save_point": save_point,
        "steps": run.steps(save_point) if save_point else run.last_step,
        "final_loss": run.final_loss(save_point) if save_point else None,
    }
    row.update({name: scores.values.get(name) if scores else None for name in score_names})
    row.update(
        {
            "wall_seconds": run.wall_seconds,
            "peak_memory_mb": run.peak_memory_mb,
            "state": run.state,
            "error": run.error,
        }
    )
    return row


def _joined(values: Any) -> Any:
    """The one value all entries share, or the distinct values joined with commas (the baseline
    belongs to every comparison of a one-at-a-time sweep)."""
    distinct = list(dict.fromkeys(value for value in values if value is not None))
    if len(distinct) <= 1:
        return distinct[0] if distinct else None
    return ",".join(str(value) for value in distinct)


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN; a diverged loss is reported as empty, its run's error says what happened.
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in row.items()}


def columns(rows: list[dict[str, Any]], score_names: list[str]) -> list[str]:
    """CSV column order: run identity, steps and loss, scores, time and memory, then any others."""
    ordered = [*LEADING_COLUMNS, *score_names, *TRAILING_COLUMNS]
    extra = [key for row in rows for key in row if key not in ordered]
    return ordered + list(dict.fromkeys(extra))


def results_csv_text(rows: list[dict[str, Any]], score_names: list[str]) -> str:
    """The rows as CSV (lists and tables as JSON, booleans as true/false, None as empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(rows, score_names), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(value) for key, value in row.items()})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def write_results(folder: Path, rows: list[dict[str, Any]], score_names: list[str]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.csv`` into ``folder`` (atomically)."""
    folder = Path(folder)
    write_json(folder / RESULTS_JSON, rows)
    write_text_atomic(folder / RESULTS_CSV, results_csv_text(rows, score_names))
    return folder / RESULTS_JSON, folder / RESULTS_CSV
