"""HTML of the report pages: plain HTML and inline CSS, no scripts, nothing fetched from outside.

Every value is escaped; images are relative links into the report's ``assets/`` folder, so the
folder can be zipped, moved and opened offline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from loralab.sweep.report.collect import RunReport, SweepReportData, save_point_title
from loralab.sweep.report.tables import ScoreRow, Verdict, baseline_spread, best_rows, config_differences, score_rows
from loralab.sweep.scoring.registry import higher_is_better

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
nav { margin-bottom: 1em; padding-bottom: .5em; border-bottom: 1px solid #ccc; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: 90%; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; background: #dff3df; }
td.missing { color: #999; }
tr.baseline td:first-child { border-left: 4px solid #dc1e1e; }
tr.noise td { font-style: italic; color: #555; }
.failed { color: #b00020; }
.note { color: #555; font-size: 90%; }
figure { margin: 0 0 1.5em; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 90%; color: #444; margin-bottom: .3em; }
details { margin-bottom: 1em; }
"""


@dataclass(frozen=True)
class Picture:
    """An image the page shows: its path relative to the page, size, and words."""

    src: str
    width: int
    height: int
    alt: str


def page(title: str, nav: Sequence[tuple[str, str]], body: str) -> str:
    """A whole HTML document with the shared style and the navigation bar."""
    links = "".join(f'<a href="{escape(href)}">{escape(text)}</a>' for text, href in nav)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body><nav>{links}</nav>\n{body}\n</body></html>\n"
    )


def img(picture: Picture) -> str:
    return (
        f'<img src="{escape(picture.src)}" width="{picture.width}" height="{picture.height}" '
        f'alt="{escape(picture.alt)}">'
    )


def number(value: Any) -> str:
    """Scores and losses with 4 significant digits; integers as they are; None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return escape(str(value))
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours}h {minutes:02d}m {secs:02d}s"
        if hours
        else f"{minutes}m {secs:02d}s"
        if minutes
        else f"{seconds:.1f} s"
    )


def table(headers: Sequence[str], rows: Iterable[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def cell(value: Any, css: str = "", title: str | None = None) -> str:
    classes = f' class="{css}"' if css else ""
    tip = f' title="{escape(title)}"' if title else ""
    return f"<td{classes}{tip}>{value}</td>"


def _run_name(run: RunReport) -> str:
    return escape(run.display_name)


# ---------------------------------------------------------------------------------------------
# Comparison page


def config_table(runs: Sequence[RunReport]) -> str:
    keys, settings = config_differences(runs)
    if not keys:
        return '<p class="note">The runs share every setting (repeats of one config differ only by their noise).</p>'
    rows = [
        "<tr>"
        + cell(f"<code>{escape(key)}</code>")
        + "".join(cell(number(settings[run.name].get(key))) for run in runs)
        + "</tr>"
        for key in keys
    ]
    return table(["setting", *[run.display_name for run in runs]], rows)


def runs_table(runs: Sequence[RunReport], comparison: str) -> str:
    rows = []
    for run in runs:
        entry = run.entries.get(comparison, {})
        state = escape(run.state) if run.state != "failed" else '<span class="failed">failed</span>'
        error = f'<span class="failed">{escape(run.error)}</span>' if run.error else ""
        css = ' class="baseline"' if run.is_baseline else ""
        rows.append(
            f"<tr{css}>"
            + cell(_run_name(run))
            + cell(number(entry.get("value")))
            + cell(state)
            + cell(number(run.last_step), "num")
            + cell(number(run.last_epoch_loss), "num")
            + cell(duration(run.wall_seconds), "num")
            + cell("—" if run.peak_memory_mb is None else f"{run.peak_memory_mb:,.0f}", "num")
            + cell(error)
            + "</tr>"
        )
    headers = ["run", "value", "state", "steps", "last loss/epoch", "wall time", "peak memory (MiB)", "error"]
    return table(headers, rows)


def score_table(runs: Sequence[RunReport], score_names: Sequence[str]) -> str:
    rows = score_rows(runs)
    if not rows:
        return '<p class="note">No save point of these runs has been scored yet.</p>'
    best = best_rows(rows, score_names)
    html_rows = [_score_row(row, score_names, best) for row in rows]
    for point, spreads in baseline_spread(runs, score_names).items():
        html_rows.append(
            '<tr class="noise">'
            + cell(f"baseline seed spread, {escape(save_point_title(point))}")
            + cell("")
            + "".join(cell(number(spreads.get(name)), "num") for name in score_names)
            + "</tr>"
        )
    headers = ["run", "save point", *[f"{name} ({'↑' if higher_is_better(name) else '↓'})" for name in score_names]]
    return table(headers, html_rows) + missing_list(rows, score_names)


def _score_row(row: ScoreRow, score_names: Sequence[str], best: dict[str, ScoreRow]) -> str:
    cells = []
    for name in score_names:
        if name in row.values:
            css = "num best" if best.get(name) is row else "num"
            cells.append(cell(number(row.values[name]), css))
        else:
            cells.append(cell("—", "num missing", row.missing.get(name, "not computed")))
    css = ' class="baseline"' if row.run.is_baseline else ""
    return (
        f"<tr{css}>"
        + cell(_run_name(row.run))
        + cell(escape(save_point_title(row.save_point)))
        + "".join(cells)
        + "</tr>"
    )


def missing_list(rows: Sequence[ScoreRow], score_names: Sequence[str]) -> str:
    """Each score that is missing somewhere, with every distinct reason (never a made-up number)."""
    reasons: dict[str, dict[str, int]] = {}
    for row in rows:
        for name in score_names:
            if name not in row.values:
                reason = row.missing.get(name, "not computed")
                reasons.setdefault(name, {}).setdefault(reason, 0)
                reasons[name][reason] += 1
    if not reasons:
        return ""
    items = "".join(
        f"<li><b>{escape(name)}</b>: "
        + "; ".join(
            f"{escape(reason)} ({count} save point{'s' if count > 1 else ''})" for reason, count in found.items()
        )
        + "</li>"
        for name, found in reasons.items()
    )
    return f"<p>Missing scores:</p><ul>{items}</ul>"


def verdict_text(verdict: Verdict) -> str:
    """``network_dim-64 at epoch 4: 0.712 (baseline 0.650, seed noise 0.030)``."""
    row = verdict.best
    text = f"{escape(row.run.name)} at {escape(save_point_title(row.save_point))}: {number(row.values[verdict.score])}"
    context = []
    if row.run.is_baseline:
        context.append("the baseline itself")
    elif verdict.baseline_value is not None:
        context.append(f"baseline {number(verdict.baseline_value)}")
    if verdict.noise is not None:
        context.append(f"seed noise {number(verdict.noise)}" + (", within noise" if verdict.within_noise else ""))
    return text + (f' <span class="note">({", ".join(context)})</span>' if context else "")


def comparison_page(
    data: SweepReportData,
    comparison: str,
    *,
    verdicts: Sequence[Verdict],
    plots: Sequence[Picture | str],
    grids: Sequence[tuple[str, str, str, Picture, bool]],
    nav: Sequence[tuple[str, str]],
) -> str:
    """The page of one comparison. ``plots``: a picture, or a sentence saying why there is none.
    ``grids``: (section, title, caption, picture, collapsed) in display order."""
    runs = data.comparison_runs(comparison)
    axis = next((run.entries[comparison].get("axis") for run in runs if run.entries[comparison].get("axis")), None)
    parts = [f"<h1>{escape(comparison)}</h1>"]
    if axis and axis != comparison:
        parts.append(f"<p>Axis: <code>{escape(str(axis))}</code></p>")
    parts.append("<h2>Settings that differ</h2>" + config_table(runs))
    parts.append("<h2>Runs</h2>" + runs_table(runs, comparison))
    parts.append("<h2>Training curves</h2>")
    for plot in plots:
        parts.append(
            f"<figure>{img(plot)}</figure>" if isinstance(plot, Picture) else f'<p class="note">{escape(plot)}</p>'
        )
    parts.append("<h2>Scores</h2>")
    if verdicts:
        items = "".join(f"<li><b>{escape(v.score)}</b>: {verdict_text(v)}</li>" for v in verdicts)
        parts.append(f"<p>Best per score:</p><ul>{items}</ul>")
    parts.append(score_table(runs, data.score_names))
    parts.append("<h2>Images</h2>")
    if not grids:
        parts.append('<p class="note">No evaluation images yet.</p>')
    section = None
    for grid_section, title, caption, picture, collapsed in grids:
        if grid_section != section:
            parts.append(f"<h3>{escape(grid_section)}</h3>")
            section = grid_section
        figure = f"<figure><figcaption><b>{escape(title)}</b> — {escape(caption)}</figcaption>{img(picture)}</figure>"
        parts.append(f"<details><summary>{escape(title)}</summary>{figure}</details>" if collapsed else figure)
    return page(f"{comparison} — loralab sweep report", nav, "\n".join(parts))


# ---------------------------------------------------------------------------------------------
# Summary page ("Brief")


def summary_page(
    data: SweepReportData,
    *,
    pages: dict[str, str],
    verdicts: dict[str, Sequence[Verdict]],
    nav: Sequence[tuple[str, str]],
) -> str:
    """The sweep at a glance: one line per comparison with its best variant per score."""
    runs = list(data.runs.values())
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.state] = counts.get(run.state, 0) + 1
    total = sum(run.wall_seconds or 0.0 for run in runs)
    parts = [
        f"<h1>{escape(data.title)}</h1>",
        f"<p>{escape(data.description)}</p>" if data.description else "",
        "<p>"
        + ", ".join(f"{count} {escape(state)}" for state, count in counts.items())
        + f" of {len(runs)} runs; training wall time {duration(total)}. "
        + 'Results: <a href="results.csv">results.csv</a>, <a href="results.json">results.json</a>.</p>',
        "<h2>Brief</h2>",
    ]
    # Scores with no value anywhere get no column here; the list of missing scores says why.
    shown = [name for name in data.score_names if any(v.score == name for found in verdicts.values() for v in found)]
    rows = []
    for comparison, href in pages.items():
        compared = data.comparison_runs(comparison)
        failed = [run.name for run in compared if run.state == "failed"]
        found = {verdict.score: verdict for verdict in verdicts.get(comparison, [])}
        best = "".join(cell(verdict_text(found[name]) if name in found else "—") for name in shown)
        rows.append(
            "<tr>"
            + cell(f'<a href="{escape(href)}">{escape(comparison)}</a>')
            + cell(", ".join(escape(run.name) for run in compared))
            + cell(f'<span class="failed">{escape(", ".join(failed))}</span>' if failed else "none")
            + best
            + "</tr>"
        )
    parts.append(table(["comparison", "runs", "failed", *[f"best {name}" for name in shown]], rows))
    failed_runs = [run for run in runs if run.state == "failed"]
    if failed_runs:
        items = "".join(
            f'<li>{escape(run.name)}: <span class="failed">{escape(run.error or "no error recorded")}</span></li>'
            for run in failed_runs
        )
        parts.append(f"<h2>Failed runs</h2><ul>{items}</ul>")
    if any(scores.values for scores in data.base_scores.values()):
        base_rows = [
            "<tr>"
            + cell(escape(label))
            + "".join(
                cell(number(scores.values[name]), "num")
                if name in scores.values
                else cell("—", "num missing", scores.missing.get(name, "not computed"))
                for name in data.score_names
            )
            + "</tr>"
            for label, scores in data.base_scores.items()
        ]
        parts.append(
            '<h2>Eval checkpoints without a LoRA</h2><p class="note">The same prompts and seeds without any '
            "LoRA: the floor every variant should beat on likeness.</p>"
            + table(["checkpoint", *data.score_names], base_rows)
        )
    all_rows = score_rows(runs)
    if all_rows:
        parts.append(missing_list(all_rows, data.score_names))
    return page(f"{data.title} — loralab sweep report", nav, "\n".join(parts))
