"""The comparison's image grids, per eval checkpoint and prompt set, as the guide lays them out.

- A prompt set with one prompt (the guide's "simple" and "complex" prompts): rows = variants
  (with several seeds, a row per variant and seed), columns = save points; the baseline's rows
  are boxed in red.
- A prompt set with several prompts (the guide's random scene prompts): one grid per save
  point, rows = prompt and seed, columns = variants; the baseline's columns are boxed.

LoRA weights and the images rendered without the trigger get grids of their own (the latter
shown folded, as are earlier save points of prompt-varied sets). Cells are
thumbnails (:func:`thumbnail_side`); a missing image (failed run, save point not reached) is a
grey cell. Drawing and labels are :func:`loralab.sample.grids.draw_grid`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageOps

from loralab.sample.grids import GridLayout, draw_grid
from loralab.sweep.report.collect import RunReport, save_point_order, save_point_title
from loralab.sweep.scoring.base import EvalImage

BOX_COLOUR = (220, 30, 30)
BOX_WIDTH = 3
# Thumbnails: large enough to judge a face, small enough for a grid of 10 x 10 in a page.
MAX_THUMBNAIL = 192
MIN_THUMBNAIL = 96  # tiny test images are enlarged (without smoothing) so they can be seen
PROMPT_LABEL_CHARS = 60


@dataclass(frozen=True)
class GridFigure:
    """One grid image and the words around it in the report."""

    section: str  # "<checkpoint> · <prompt set>": the heading grids are grouped under
    title: str
    caption: str
    image: Image.Image
    layout: GridLayout
    shape: tuple[int, int]  # (rows, columns) of cells
    collapsed: bool = False  # shown folded (images without the trigger, earlier save points of varied sets)

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """Pixel box (left, top, right, bottom) of one cell's slot in :attr:`image`."""
        rows, columns = self.shape
        row_pitch = (self.image.height - self.layout.top_band) // rows
        column_pitch = (self.image.width - self.layout.left_band) // columns
        left, top = self.layout.left_band + column * column_pitch, self.layout.top_band + row * row_pitch
        return left, top, left + column_pitch, top + row_pitch


@dataclass(frozen=True)
class _Placed:
    run: RunReport
    save_point: str
    image: EvalImage


def thumbnail_side(size: tuple[int, int]) -> int:
    """The side of the square a thumbnail is fitted into, from the first image's size.

    Small images are enlarged by a whole factor, so every pixel stays a square block.
    """
    longest = max(size)
    if longest < MIN_THUMBNAIL:
        return longest * math.ceil(MIN_THUMBNAIL / longest)
    return min(MAX_THUMBNAIL, longest)


def comparison_grids(runs: Sequence[RunReport]) -> list[GridFigure]:
    """Every grid of a comparison, grouped by (eval checkpoint, prompt set) in first-seen order."""
    placed = [
        _Placed(run, save_point, image)
        for run in runs
        for save_point, images in sorted(run.images.items(), key=lambda item: save_point_order(item[0]))
        for image in images
    ]
    groups: dict[tuple[str, str, float, bool], list[_Placed]] = {}
    for item in placed:
        key = (item.image.checkpoint, item.image.prompt_set, item.image.lora_weight, item.image.trigger)
        groups.setdefault(key, []).append(item)
    weights = {item.image.lora_weight for item in placed}
    figures: list[GridFigure] = []
    for (checkpoint, prompt_set, weight, trigger), items in groups.items():
        section = f"{checkpoint} · {prompt_set}"
        qualifiers = [f"LoRA weight {weight:g}"] if len(weights) > 1 else []
        if not trigger:
            qualifiers.append("without trigger")
        prompts = list(dict.fromkeys(item.image.prompt for item in items))
        if len(prompts) == 1:
            figures += _single_prompt_grids(runs, items, section, qualifiers, prompts[0], trigger=trigger)
        else:
            figures += _varied_prompt_grids(runs, items, section, qualifiers, trigger=trigger)
    return figures


def _single_prompt_grids(
    runs: Sequence[RunReport], items: list[_Placed], section: str, qualifiers: list[str], prompt: str, *, trigger: bool
) -> list[GridFigure]:
    """One grid: a row per variant and seed (a variant's seeds side by side), a column per save point."""
    save_points = sorted({item.save_point for item in items}, key=save_point_order)
    seeds = sorted({item.image.seed for item in items})
    found = {(item.run.name, item.image.seed, item.save_point): item.image for item in items}
    rows = [(run, seed) for run in runs for seed in seeds]
    drawn = _draw(
        [[found.get((run.name, seed, point)) for point in save_points] for run, seed in rows],
        columns=[save_point_title(point) for point in save_points],
        rows=[_run_label(run) + (f", seed {seed}" if len(seeds) > 1 else "") for run, seed in rows],
        boxed_rows=[index for index, (run, _) in enumerate(rows) if run.is_baseline],
    )
    if drawn is None:
        return []
    title = ", ".join([f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}", *qualifiers])
    # Images without the trigger only check for leaks: folded, so the grids that matter come first.
    return [GridFigure(section, title, prompt, *drawn, shape=(len(rows), len(save_points)), collapsed=not trigger)]


def _varied_prompt_grids(
    runs: Sequence[RunReport], items: list[_Placed], section: str, qualifiers: list[str], *, trigger: bool
) -> list[GridFigure]:
    save_points = sorted({item.save_point for item in items}, key=save_point_order)
    pairs = list(dict.fromkeys((item.image.prompt, item.image.seed) for item in items))
    figures = []
    for point in save_points:
        found = {
            (item.run.name, item.image.prompt, item.image.seed): item.image
            for item in items
            if item.save_point == point
        }
        cells = [[found.get((run.name, prompt, seed)) for run in runs] for prompt, seed in pairs]
        drawn = _draw(
            cells,
            columns=[_run_label(run) for run in runs],
            rows=[f"seed {seed}: {_shorten(prompt)}" for prompt, seed in pairs],
            boxed_columns=[index for index, run in enumerate(runs) if run.is_baseline],
        )
        if drawn is not None:
            title = ", ".join([save_point_title(point), *qualifiers])
            caption = f"{len(pairs)} prompt and seed pairs (prompts shortened in the row labels)"
            folded = point != save_points[-1] or not trigger
            figures.append(GridFigure(section, title, caption, *drawn, shape=(len(pairs), len(runs)), collapsed=folded))
    return figures


def _run_label(run: RunReport) -> str:
    label = run.display_name
    return label if run.state in ("complete", "running") else f"{label} ({run.state})"


def _shorten(prompt: str) -> str:
    return prompt if len(prompt) <= PROMPT_LABEL_CHARS else prompt[: PROMPT_LABEL_CHARS - 1].rstrip() + "…"


def _draw(
    cells: list[list[EvalImage | None]],
    *,
    columns: list[str],
    rows: list[str],
    boxed_rows: Sequence[int] = (),
    boxed_columns: Sequence[int] = (),
) -> tuple[Image.Image, GridLayout] | None:
    """The grid of ``cells`` and its layout, or None when none of its images exists on disk."""
    first = next((image for row in cells for image in row if image is not None and image.path.is_file()), None)
    if first is None:
        return None
    with Image.open(first.path) as opened:
        side = thumbnail_side(opened.size)
    thumbnails = [[_thumbnail(image, side) if image is not None else None for image in row] for row in cells]
    grid, layout = draw_grid(thumbnails, column_labels=columns, row_labels=rows)
    _box(grid, layout, len(rows), len(columns), boxed_rows, boxed_columns)
    return grid, layout


def _thumbnail(image: EvalImage, side: int) -> Image.Image | None:
    if not image.path.is_file():
        return None
    with Image.open(image.path) as opened:
        rgb = opened.convert("RGB")
    # Enlarging keeps hard pixel edges (what the model drew); shrinking averages (no aliasing).
    method = Image.Resampling.NEAREST if max(rgb.size) < side else Image.Resampling.LANCZOS
    return ImageOps.contain(rgb, (side, side), method=method)


def _box(
    grid: Image.Image,
    layout: GridLayout,
    rows: int,
    columns: int,
    boxed_rows: Sequence[int],
    boxed_columns: Sequence[int],
) -> None:
    """Red frames around the baseline's rows or columns of cells."""
    row_pitch = (grid.height - layout.top_band) // rows
    column_pitch = (grid.width - layout.left_band) // columns
    draw = ImageDraw.Draw(grid)
    for row in boxed_rows:
        top = layout.top_band + row * row_pitch
        draw.rectangle(
            (layout.left_band, top, grid.width - 1, top + row_pitch - 1), outline=BOX_COLOUR, width=BOX_WIDTH
        )
    for column in boxed_columns:
        left = layout.left_band + column * column_pitch
        draw.rectangle(
            (left, layout.top_band, left + column_pitch - 1, grid.height - 1), outline=BOX_COLOUR, width=BOX_WIDTH
        )
