"""``write_report``: the sweep report folder, written whole and swapped in at once.

The folder is built beside its destination and renamed over it when complete, so a reader
never sees half a report and no image of an older report lingers. Only a folder that is empty
or was written by this function (it carries :data:`MARKER`) is ever replaced.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

from PIL import Image

from loralab.errors import LoralabError
from loralab.sweep.report.collect import SweepReportData, collect_sweep
from loralab.sweep.report.grids import comparison_grids
from loralab.sweep.report.html import Picture, comparison_page, summary_page
from loralab.sweep.report.plots import PLOTS, plot_png
from loralab.sweep.report.tables import verdicts
from loralab.sweep.results import RESULTS_CSV, RESULTS_JSON, write_results

REPORT_DIR = "report"
INDEX = "index.html"
ASSETS = "assets"
MARKER = ".loralab-report"


class ReportError(LoralabError):
    """The report cannot be written where asked."""


def write_report(sweep_dir: Path, out_dir: Path | None = None) -> Path:
    """Write the HTML report of ``sweep_dir`` and return the path of its ``index.html``.

    Also rebuilds ``results.json`` / ``results.csv`` in the sweep folder (with a column per score
    as ``scores/`` holds them now) and copies them into the report. ``out_dir`` defaults to
    ``SWEEP_DIR/report``.

    Raises SweepError when ``sweep_dir`` is not a sweep folder, ReportError when ``out_dir``
    exists and is neither empty nor an earlier report.
    """
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / REPORT_DIR
    _check_replaceable(out_dir)
    data = collect_sweep(sweep_dir)
    write_results(sweep_dir)

    staging = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / ASSETS).mkdir(parents=True)
    except OSError as exc:
        raise ReportError(f"cannot write the report into {out_dir} ({exc.strerror}); choose another --out") from None
    try:
        _render(data, staging)
        for name in (RESULTS_JSON, RESULTS_CSV):
            shutil.copyfile(sweep_dir / name, staging / name)
        (staging / MARKER).write_text("written by loralab report\n", encoding="utf-8")
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / INDEX


def _render(data: SweepReportData, folder: Path) -> None:
    pages = _page_names(list(data.comparisons))
    nav = [("Summary", INDEX)] + [(comparison, href) for comparison, href in pages.items()]
    found_verdicts = {}
    for comparison, href in pages.items():
        runs = data.comparison_runs(comparison)
        asset_dir = f"{ASSETS}/{Path(href).stem}"
        (folder / asset_dir).mkdir(parents=True, exist_ok=True)
        plots: list[Picture | str] = []
        for spec in PLOTS:
            png = plot_png(spec, runs)
            if png is None:
                plots.append(f"No run of this comparison logged {spec.tag} yet.")
                continue
            name = f"{asset_dir}/plot-{re.sub(r'[^a-z0-9]+', '_', spec.tag.lower())}.png"
            (folder / name).write_bytes(png)
            width, height = Image.open(io.BytesIO(png)).size
            plots.append(Picture(name, width, height, spec.title))
        grids = []
        for number, figure in enumerate(comparison_grids(runs), start=1):
            name = f"{asset_dir}/grid-{number:03d}.png"
            figure.image.save(folder / name, format="PNG", optimize=True)
            picture = Picture(name, figure.image.width, figure.image.height, f"{figure.section}, {figure.title}")
            grids.append((figure.section, figure.title, figure.caption, picture, figure.collapsed))
        found_verdicts[comparison] = verdicts(runs, data.score_names)
        html = comparison_page(data, comparison, verdicts=found_verdicts[comparison], plots=plots, grids=grids, nav=nav)
        (folder / href).write_text(html, encoding="utf-8")
    (folder / INDEX).write_text(summary_page(data, pages=pages, verdicts=found_verdicts, nav=nav), encoding="utf-8")


def _page_names(comparisons: list[str]) -> dict[str, str]:
    """comparison -> its page's file name: readable, unique, never ``index.html``."""
    names: dict[str, str] = {}
    used = {Path(INDEX).stem}
    for comparison in comparisons:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", comparison).strip("._") or "comparison"
        candidate, number = stem, 2
        while candidate.lower() in used:
            candidate, number = f"{stem}-{number}", number + 1
        used.add(candidate.lower())
        names[comparison] = f"{candidate}.html"
    return names


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).exists())):
        raise ReportError(f"{out_dir} exists and is not a loralab report; give --out a new or empty folder")


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Rename the finished report into place; the old one goes only after the new one is there."""
    old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by an interrupted earlier swap
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)
