"""Labelled image grids (Pillow): column labels on top, row labels on the left, an optional title.

Labels use Pillow's bundled scalable font (``ImageFont.load_default(size=...)``, Pillow >= 10.1), so
grids look the same on every machine without font files. The font size follows the cell size (as
A1111's grids do) but never drops below :data:`MIN_FONT_SIZE`, so labels of small test images stay
readable; long labels wrap to the cell width and bands grow to fit them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

MIN_FONT_SIZE = 16
MAX_FONT_SIZE = 48
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
EMPTY_CELL = (200, 200, 200)


@dataclass(frozen=True)
class GridLayout:
    """Where things went: cell size, label bands, font size (what tests and reports check)."""

    cell_width: int
    cell_height: int
    font_size: int
    top_band: int  # height of the title + column-label band above the cells
    left_band: int  # width of the row-label band left of the cells
    padding: int


def font_size_for(cell_width: int, cell_height: int) -> int:
    """A1111's rule (a 25th of width + height), kept between :data:`MIN_FONT_SIZE` and :data:`MAX_FONT_SIZE`."""
    return max(MIN_FONT_SIZE, min(MAX_FONT_SIZE, (cell_width + cell_height) // 25))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _wrap(text: str, font: ImageFont.ImageFont, max_width: int) -> list[str]:
    """Greedy word wrap; a word longer than the width is cut where it must be."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= max_width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > max_width and len(line) > 1:
                cut = len(line)
                while cut > 1 and font.getlength(line[:cut]) > max_width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def _block_height(lines: Sequence[str], font_size: int) -> int:
    return len(lines) * int(font_size * 1.25)


def _draw_lines(
    draw: ImageDraw.ImageDraw, lines: Sequence[str], font: ImageFont.ImageFont, box: tuple[int, int, int, int], size: int
) -> None:
    """Lines centred in ``box`` (left, top, right, bottom)."""
    left, top, right, bottom = box
    step = int(size * 1.25)
    y = top + (bottom - top - step * len(lines)) // 2
    for line in lines:
        x = left + (right - left - font.getlength(line)) / 2
        draw.text((x, y), line, font=font, fill=TEXT_COLOUR)
        y += step


def draw_grid(
    cells: Sequence[Sequence[Image.Image | None]],
    *,
    column_labels: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    title: str | None = None,
    font_size: int | None = None,
) -> tuple[Image.Image, GridLayout]:
    """A grid image of ``cells`` (rows of images, all the size of the first; None leaves a grey cell).

    ``column_labels`` (one per column) go above, ``row_labels`` (one per row) to the left, ``title``
    above everything. Returns the image and its :class:`GridLayout`.
    """
    rows = len(cells)
    columns = max((len(row) for row in cells), default=0)
    first = next((image for row in cells for image in row if image is not None), None)
    if first is None:
        raise ValueError("a grid needs at least one image")
    if column_labels and len(column_labels) != columns or row_labels and len(row_labels) != rows:
        raise ValueError("one label per column and per row")
    width, height = first.size
    size = font_size or font_size_for(width, height)
    font = _font(size)
    padding = max(4, size // 3)

    label_width = max(width, 7 * size)  # columns of tiny images widen so a short label fits on a line
    column_lines = [_wrap(label, font, label_width - 2 * padding) for label in column_labels]
    title_lines = _wrap(title, font, max(columns * width, 20 * size)) if title else []
    row_text_width = min(3 * max(width, 8 * size), max((font.getlength(r) for r in row_labels), default=0))
    row_lines = [_wrap(label, font, int(row_text_width) or 1) for label in row_labels]

    cell_pitch = max(width, label_width) if column_labels else width
    left_band = int(row_text_width) + 2 * padding if row_labels else 0
    column_band = max((_block_height(lines, size) for lines in column_lines), default=0)
    title_band = _block_height(title_lines, size) + padding if title_lines else 0
    top_band = title_band + (column_band + 2 * padding if column_lines else 0)
    row_pitch = max(height, max((_block_height(lines, size) for lines in row_lines), default=0))

    grid = Image.new("RGB", (left_band + columns * cell_pitch, top_band + rows * row_pitch), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title_lines:
        _draw_lines(draw, title_lines, font, (0, padding // 2, grid.width, title_band), size)
    for column, lines in enumerate(column_lines):
        left = left_band + column * cell_pitch
        _draw_lines(draw, lines, font, (left, title_band + padding, left + cell_pitch, top_band - padding), size)
    for row, lines in enumerate(row_lines):
        top = top_band + row * row_pitch
        _draw_lines(draw, lines, font, (padding, top, left_band - padding, top + row_pitch), size)
    for row, images in enumerate(cells):
        for column, image in enumerate(images):
            x = left_band + column * cell_pitch + (cell_pitch - width) // 2
            y = top_band + row * row_pitch + (row_pitch - height) // 2
            if image is None:
                draw.rectangle((x, y, x + width - 1, y + height - 1), fill=EMPTY_CELL)
                continue
            if image.size != (width, height):  # another size (a size axis): fitted in, aspect kept
                image = ImageOps.contain(image, (width, height))
            grid.paste(image.convert("RGB"), (x + (width - image.width) // 2, y + (height - image.height) // 2))
    return grid, GridLayout(width, height, size, top_band, left_band, padding)
