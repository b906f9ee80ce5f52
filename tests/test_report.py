"""The sweep report, written from a synthetic sweep folder (see ``sweep_report_support``):
pages, plots, grids, score and result tables, rewriting, and the ``loralab report`` command.

The browser check (every image loads, no console error) is in ``test_report_browser.py``.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loralab.cli.main import main
from loralab.sweep.report import ReportError, write_report
from loralab.sweep.report.collect import collect_sweep, save_point_order, save_point_title
from loralab.sweep.report.grids import BOX_COLOUR, GridFigure, comparison_grids, thumbnail_side
from loralab.sweep.report.plots import BASELINE_COLOUR, PLOTS, plot_png, run_styles, smoothed
from loralab.sweep.report.tables import config_differences, verdicts
from loralab.sweep.scoring import ScoringSettings, build_scorers, per_image_mean, score_sweep
from loralab.train.tb_logging import read_scalars
from sweep_report_support import FAILED_ERROR, STEPS_PER_EPOCH, magenta_share, make_sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic sweep, scored with the "magenta" plug-in score (no face or CLIP model)."""
    folder = make_sweep(tmp_path_factory.mktemp("report"))
    scorers = build_scorers(ScoringSettings())
    scorers.add("magenta", per_image_mean(magenta_share, trigger=True))
    score_sweep(folder, scorers)
    return folder


@pytest.fixture(scope="module")
def report(sweep: Path) -> Path:
    return write_report(sweep)


class PageParser(HTMLParser):
    """Images, links and tables of a page; a table is a list of rows, a row a list of
    (cell text, cell class)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.tables: list[list[list[tuple[str, str]]]] = []
        self._cell: list[str] | None = None
        self._cell_class = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attrs}
        if tag == "img":
            self.images.append(values)
        elif tag == "a":
            self.links.append(values["href"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell, self._cell_class = [], values.get("class", "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(("".join(self._cell).strip(), self._cell_class))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


# ---------------------------------------------------------------------------------------------
# Pages


def test_pages_show_only_images_that_exist_at_their_stated_size(report: Path) -> None:
    folder = report.parent
    pages = sorted(folder.glob("*.html"))
    assert [page.name for page in pages] == ["index.html", "network_dim.html", "optimizer.html"]
    for page in pages:
        parsed = parse(page)
        for image in parsed.images:
            assert not image["src"].startswith(("/", "http", "file:")), image["src"]  # relative: viewable offline
            with Image.open(folder / image["src"]) as png:
                assert png.format == "PNG"
                assert png.size == (int(image["width"]), int(image["height"]))
            assert image["alt"]
        for href in parsed.links:
            assert (folder / href).is_file(), f"{page.name} links to missing {href}"
    network_dim = parse(folder / "network_dim.html")
    plots = [image for image in network_dim.images if "/plot-" in image["src"]]
    assert len(plots) == len(PLOTS)
    assert (folder / ".loralab-report").is_file()


def test_summary_page_is_a_brief_across_comparisons(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    assert "<h1>Synthetic</h1>" in text  # the sweep file's name
    rows = {row[0][0]: row for row in parse(report).tables[0]}
    assert rows["network_dim"][1][0] == "baseline, baseline-seed2, network_dim-8"
    assert "network_dim-8 at final: 0.1768" in rows["network_dim"][3][0]
    assert rows["optimizer"][2][0] == "optimizer-Prodigy"
    assert escape(FAILED_ERROR) in text
    # Scores with no model have no "best" column; they are listed as missing, with the reason.
    assert "best likeness" not in text
    assert "no face-identity model given" in text and "no CLIP model given" in text
    assert "Eval checkpoints without a LoRA" in text


def test_comparison_page_tables(report: Path) -> None:
    settings_table, runs_table, scores_table = parse(report.parent / "network_dim.html").tables
    settings = {row[0][0]: [text for text, _ in row[1:]] for row in settings_table[1:]}
    assert settings == {
        "network_dim": ["4", "4", "8"],
        "seed": ["42", "43", "42"],
    }  # output_dir differs but is not a setting

    header = [text for text, _ in scores_table[0]]
    assert header[:2] == ["run", "save point"]
    magenta = header.index("magenta (↑)")
    scored = [row for row in scores_table[1:] if row[1][0] in ("epoch 2", "final")]
    assert len(scored) == 6
    best = [row for row in scored if "best" in row[magenta][1]]
    assert [(row[0][0], row[1][0]) for row in best] == [("network_dim-8", "final")]
    assert all(row[header.index("likeness (↑)")] == ("—", "num missing") for row in scored)  # no model: no number
    assert [row[0][0] for row in scores_table if "noise" in row[0][0] or "spread" in row[0][0]] == [
        "baseline seed spread, epoch 2",
        "baseline seed spread, final",
    ]

    runs = {row[0][0]: [text for text, _ in row] for row in runs_table[1:]}
    last_loss = read_scalars(report.parents[1] / "runs" / "network_dim-8" / "logs")["loss/epoch"][-1][1]
    assert runs["network_dim-8"][1:8] == [
        "8",
        "complete",
        str(4 * STEPS_PER_EPOCH),
        f"{last_loss:.4g}",
        "1m 55s",
        "1,234",
        "",
    ]

    optimizer_runs = {
        row[0][0]: [text for text, _ in row] for row in parse(report.parent / "optimizer.html").tables[1][1:]
    }
    assert optimizer_runs["optimizer-Prodigy"][2:4] == ["failed", "7"]
    assert optimizer_runs["optimizer-Prodigy"][-1] == FAILED_ERROR


def test_verdicts_compare_the_best_variant_with_the_baseline_and_its_seed_noise(sweep: Path) -> None:
    data = collect_sweep(sweep)
    found = {verdict.score: verdict for verdict in verdicts(data.comparison_runs("network_dim"), data.score_names)}
    magenta = found["magenta"]
    assert (magenta.best.run.name, magenta.best.save_point) == ("network_dim-8", "final")
    baseline = data.runs["baseline"].scores["final"].values["magenta"]
    repeat = data.runs["baseline-seed2"].scores["final"].values["magenta"]
    assert magenta.baseline_value == baseline
    assert magenta.noise == pytest.approx(abs(repeat - baseline))
    assert magenta.within_noise is False
    assert set(found) == {"magenta"}  # the built-in scores have no values here


def test_config_differences_flatten_optimizer_args_and_skip_output_paths(sweep: Path) -> None:
    data = collect_sweep(sweep)
    keys, settings = config_differences(data.comparison_runs("optimizer"))
    assert keys == ["optimizer_type", "seed"]
    assert settings["baseline"]["optimizer_args.decouple"] is True


def test_collect_reads_states_logs_and_save_points(sweep: Path) -> None:
    data = collect_sweep(sweep)
    assert list(data.comparisons) == ["network_dim", "optimizer"]
    failed = data.runs["optimizer-Prodigy"]
    assert (failed.state, failed.error, failed.save_points) == ("failed", FAILED_ERROR, [])
    assert data.runs["baseline"].save_points == ["e000002", "final"]
    assert sorted(["final", "step00000100", "e000010", "e000002"], key=save_point_order) == [
        "e000002",
        "e000010",
        "step00000100",
        "final",
    ]
    assert save_point_title("e000010") == "epoch 10" and save_point_title("step00000100") == "step 100"
    assert set(data.base_images) == {"dreamshaper_like", "epicrealism_like"}


# ---------------------------------------------------------------------------------------------
# Results table


def test_report_rebuilds_the_results_table_with_the_scores(sweep: Path, report: Path) -> None:
    rows = json.loads((sweep / "results.json").read_text())
    assert [(row["run"], row["save_point"]) for row in rows] == [
        ("baseline", "e000002"),
        ("baseline", "final"),
        ("baseline-seed2", "e000002"),
        ("baseline-seed2", "final"),
        ("network_dim-8", "e000002"),
        ("network_dim-8", "final"),
        ("optimizer-AdamW", "e000002"),
        ("optimizer-AdamW", "final"),
        ("optimizer-Prodigy", None),
    ]
    by_key = {(row["run"], row["save_point"]): row for row in rows}
    failed = by_key[("optimizer-Prodigy", None)]
    assert (failed["state"], failed["error"]) == ("failed", FAILED_ERROR)
    row = by_key[("network_dim-8", "e000002")]
    score_file = json.loads((sweep / "scores" / "network_dim-8" / "e000002.json").read_text())
    assert row["magenta"] == score_file["magenta"] > 0 and row["likeness"] is None
    assert "no face-identity model" in row["missing_scores"]["likeness"]
    with open(sweep / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [line["magenta"] for line in table] == [str(row.get("magenta") or "") for row in rows]
    for name in ("results.json", "results.csv"):
        assert (report.parent / name).read_text() == (sweep / name).read_text()


# ---------------------------------------------------------------------------------------------
# Grids and plots


def cells_box(
    figure: GridFigure, *, rows: list[int] | None = None, columns: list[int] | None = None
) -> tuple[int, ...]:
    """The pixel box around the cells of the given rows (all columns) or columns (all rows)."""
    rows = rows if rows is not None else list(range(figure.shape[0]))
    columns = columns if columns is not None else list(range(figure.shape[1]))
    first, last = figure.cell_box(rows[0], columns[0]), figure.cell_box(rows[-1], columns[-1])
    return first[0], first[1], last[2], last[3]


def red_fraction(image: Image.Image, box: tuple[int, ...]) -> float:
    pixels = np.asarray(image.crop(box).convert("RGB"))
    return float(np.mean(np.all(pixels == BOX_COLOUR, axis=-1)))


def test_one_prompt_grids_have_variants_as_rows_save_points_as_columns_and_the_baseline_boxed(sweep: Path) -> None:
    data = collect_sweep(sweep)
    runs = data.comparison_runs("network_dim")
    figures = comparison_grids(runs)
    sections = list(dict.fromkeys(figure.section for figure in figures))
    assert sections == [
        "dreamshaper_like · simple",
        "dreamshaper_like · random",
        "epicrealism_like · simple",
        "epicrealism_like · random",
    ]
    simple = [figure for figure in figures if figure.section == "dreamshaper_like · simple"]
    assert [figure.title for figure in simple] == ["seed 7", "seed 7, without trigger"]
    assert simple[0].caption == "photo of blh woman"

    figure = simple[0]
    assert thumbnail_side((64, 64)) == 128  # 64 px images enlarged by a whole factor
    assert figure.shape == (3, 2)  # baseline, its repeat, network_dim-8 x epoch 2, final
    grid = figure.image
    # The baseline and its repeat (rows 0, 1) are framed in red; network_dim-8 (row 2) is not.
    assert [red_fraction(grid, cells_box(figure, rows=[row])) > 0.01 for row in range(3)] == [True, True, False]
    # Columns are save points: the ring thickens from epoch 2 to final.
    early, final = (grid.crop(figure.cell_box(2, column)) for column in (0, 1))
    assert magenta_share(final) > magenta_share(early) > 0


def test_several_seeds_of_one_prompt_put_each_variants_seeds_on_adjacent_rows(sweep: Path) -> None:
    runs = collect_sweep(sweep).comparison_runs("network_dim")
    for run in runs:  # every image also "rendered" with seed 8
        run.images = {
            point: images + tuple(replace(image, seed=8) for image in images) for point, images in run.images.items()
        }
    simple = [figure for figure in comparison_grids(runs) if figure.section == "dreamshaper_like · simple"]
    assert [(figure.title, figure.collapsed) for figure in simple] == [
        ("seeds 7, 8", False),
        ("seeds 7, 8, without trigger", True),
    ]
    figure = simple[0]
    assert figure.shape == (6, 2)
    framed = [red_fraction(figure.image, cells_box(figure, rows=[row])) > 0.01 for row in range(6)]
    assert framed == [True, True, True, True, False, False]  # baseline and its repeat, both seeds


def test_varied_prompt_grids_have_prompts_as_rows_variants_as_columns_per_save_point(sweep: Path) -> None:
    runs = collect_sweep(sweep).comparison_runs("optimizer")
    random = [figure for figure in comparison_grids(runs) if figure.section == "epicrealism_like · random"]
    assert [(figure.title, figure.collapsed) for figure in random] == [("epoch 2", True), ("final", False)]
    figure = random[-1]
    # Rows: the three prompts; columns: baseline, repeat, AdamW, and the failed Prodigy (grey cells).
    assert figure.shape == (3, 4)
    framed = [red_fraction(figure.image, cells_box(figure, columns=[column])) > 0.01 for column in range(4)]
    assert framed == [True, True, False, False]
    grey = np.asarray(figure.image.crop(figure.cell_box(0, 3)).convert("RGB"))
    assert np.all(grey[grey.shape[0] // 2, grey.shape[1] // 2] == (200, 200, 200))


def test_plots_overlay_every_run_with_the_baseline_in_black(sweep: Path) -> None:
    data = collect_sweep(sweep)
    runs = data.comparison_runs("optimizer")
    styles = run_styles(runs)
    assert styles["baseline"]["color"] == BASELINE_COLOUR and styles["baseline"]["linestyle"] == "-"
    assert styles["baseline-seed2"]["linestyle"] == "--"
    assert styles["optimizer-AdamW"]["color"] != styles["optimizer-Prodigy"]["color"] != BASELINE_COLOUR
    for spec in PLOTS:
        png = plot_png(spec, runs)
        assert png is not None and png.startswith(b"\x89PNG")
    # AdamW logs no d*lr: its lr/unet is drawn instead; nobody logged a made-up tag: no plot.
    d_lr = next(spec for spec in PLOTS if spec.tag == "lr/d*lr")
    assert plot_png(d_lr, [data.runs["optimizer-AdamW"]]) is not None
    assert plot_png(type(d_lr)("made/up", "t", "x", "y"), runs) is None


def test_smoothing_is_a_debiased_moving_average_that_skips_nan() -> None:
    assert smoothed([2.0] * 5, 10) == pytest.approx([2.0] * 5)  # no pull towards 0 at the start
    out = smoothed([1.0, float("nan"), 3.0], 2)
    assert out[0] == 1.0 and np.isnan(out[1]) and out[2] == pytest.approx((0.5 * 0.5 * 1 + 0.5 * 3) / 0.75)


# ---------------------------------------------------------------------------------------------
# Rewriting and the command


def test_report_is_replaced_whole_and_foreign_folders_are_left_alone(sweep: Path, tmp_path: Path) -> None:
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    index = write_report(copy)
    stale = index.parent / "assets" / "stale.png"
    stale.write_bytes(b"old")
    write_report(copy)
    assert not stale.exists() and index.is_file()
    assert not list(copy.glob(".report.*"))  # no staging or old folder left behind

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.jpg").write_bytes(b"x")
    with pytest.raises(ReportError, match="is not a loralab report"):
        write_report(copy, foreign)
    assert (foreign / "keep.jpg").read_bytes() == b"x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_report(copy, empty) == empty / "index.html"


def test_the_command_reports_unusable_folders_in_one_line(sweep: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    (tmp_path / "a_file").write_text("x")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "expanded.json").write_text("{not json")
    cases = [
        ([str(tmp_path / "a_file")], "is a file, not a folder"),
        ([str(damaged)], "expanded.json is damaged"),
        ([str(copy), "--out", str(tmp_path / "a_file" / "report")], "cannot write the report into"),
    ]
    for argv, message in cases:
        assert main(["report", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert (tmp_path / "a_file").read_text() == "x"


def test_a_run_that_never_started_is_listed(sweep: Path, tmp_path: Path) -> None:
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    shutil.rmtree(copy / "runs" / "optimizer-AdamW")
    shutil.rmtree(copy / "eval" / "optimizer-AdamW")
    shutil.rmtree(copy / "scores" / "optimizer-AdamW")
    index = write_report(copy)
    runs_table = parse(index.parent / "optimizer.html").tables[1]
    assert [text for text, _ in runs_table[3]][:3] == ["optimizer-AdamW", "AdamW", "not started"]
    assert collect_sweep(copy).runs["optimizer-AdamW"].state == "not started"


def test_loralab_report_command(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    assert main(["report", str(copy), "--out", str(tmp_path / "out")]) == 0
    assert f"report: {tmp_path / 'out' / 'index.html'}" in capsys.readouterr().out

    assert main(["report", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "expanded.json" in error

    assert main(["report", str(copy), "--face-model", str(tmp_path / "arcface.onnx")]) == 2
    assert "face-identity model not found" in capsys.readouterr().err


def test_a_score_equal_for_every_variant_has_no_best(sweep: Path) -> None:
    from loralab.sweep.report.tables import best_rows, score_rows

    rows = score_rows(collect_sweep(sweep).comparison_runs("network_dim"))
    for row in rows:
        row.values["flat"] = 0.0
    rows[0].values["lonely"] = 1.0
    best = best_rows(rows, ["flat", "lonely", "magenta"])
    assert set(best) == {"lonely", "magenta"}
