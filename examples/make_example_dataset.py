#!/usr/bin/env python3
"""Write the bundled example dataset: 33 square 768x768 PNGs in ``OUT_DIR/img/1_blh woman``.

Usage: ``python examples/make_example_dataset.py OUT_DIR``

The guide this project follows trains on 33 photos of one person in a folder named
``1_blh woman`` (1 repeat, caption "blh woman"). The stand-ins written here are solid colours
from a fixed palette, so they are deterministic and each file is a few kilobytes; they let
``loralab plan examples/person_sd15.json --train-data OUT_DIR/img`` run on a fresh machine.
"""

from __future__ import annotations

import colorsys
import os
import sys
from pathlib import Path

from PIL import Image

NUM_IMAGES = 33
SIZE = 768
FOLDER = "1_blh woman"


def colour(index: int) -> tuple[int, int, int]:
    """A distinct, fixed colour per image: hues around the wheel."""
    red, green, blue = colorsys.hsv_to_rgb(index / NUM_IMAGES, 0.5, 0.8)
    return round(red * 255), round(green * 255), round(blue * 255)


def write_png(image: Image.Image, path: Path) -> None:
    """Save atomically: a temp file in the same folder, then a rename."""
    temp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temp_path, format="PNG", optimize=True)
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


def make_example_dataset(out_dir: Path) -> Path:
    """Write the images and return the ``img`` folder to pass as ``--train-data``."""
    image_root = out_dir / "img"
    folder = image_root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(NUM_IMAGES):
        write_png(Image.new("RGB", (SIZE, SIZE), colour(index)), folder / f"blh_woman_{index:03d}.png")
    return image_root


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: make_example_dataset.py OUT_DIR", file=sys.stderr)
        return 2
    image_root = make_example_dataset(Path(argv[0]))
    print(f"wrote {NUM_IMAGES} images to {image_root / FOLDER}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
