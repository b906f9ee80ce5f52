"""``loralab prepare``: every kind of source file a user brings, and the dataset it becomes.

The source folder is built from photos bundled with scikit-image (a real face: ``astronaut.png``;
scenes without faces: coffee, chelsea, rocket, moon, coins, brick), turned into the variants users
have: EXIF-rotated, RGBA, CMYK, 16-bit, float, grayscale, palette GIF, tilted, mirrored, scaled
onto a larger canvas, near an edge, re-encoded duplicates, tiny, truncated, empty, 1x1, a
20000x20000 header, HEIC, junk and caption sidecars (UTF-8 with BOM, Latin-1, empty, shadowed).

Every report row is checked against what the source file is, and the face crops are checked
geometrically: the face box detected in the source lies inside the crop, within 10% of its centre,
and the face is found again, centred, in the written image.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from loralab.cli.main import main
from loralab.data.prepare import PrepareError, PrepareOptions, prepare_dataset
from loralab.data.prepare.box import Box
from loralab.data.prepare.dedupe import NEAR_DUPLICATE_MAX_DISTANCE, hash_distance
from loralab.data.prepare.faces import detect_faces
from loralab.data.prepare.image_io import UnusableImage, load_image

TOKEN, CLASS, REPEATS = "blh", "woman", 10
RESOLUTION, MIN_SIZE = 256, 128
TRAIN_FOLDER = f"img/{REPEATS}_{TOKEN} {CLASS}"
REG_FOLDER = f"reg/1_{CLASS}"
MAX_FACE_OFFSET = 0.10  # the acceptance bound: face centre within 10% of the side from the centre

EXIF_ORIENTATION = 0x0112


def skimage_photo(name: str) -> Image.Image:
    """A photo bundled in scikit-image's wheel, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-image (test extra) is not installed: it provides the test photos")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    with Image.open(path) as image:
        return image.copy()


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _tilted(image: Image.Image, degrees: float) -> Image.Image:
    return image.rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128))


def _with_exif_orientation(upright: Image.Image, orientation: int) -> tuple[Image.Image, Image.Exif]:
    """Pixels stored as a camera would, plus the EXIF tag that makes them upright again."""
    stored = {
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,  # viewer rotates 90 clockwise to undo
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return upright.transpose(stored), exif


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` RGB, followed by one tiny data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


# Expected report line of every source file: (status, words its details must contain).
# ``family`` groups the face variants that show the same framing of the same photo: near-duplicates
# may only be found inside a family, and each family keeps exactly one image.
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {}
FAMILY: dict[str, str] = {}


def build_sources(root: Path) -> None:
    """Write the test source folder (the expectations live in EXPECTED / FAMILY)."""
    astronaut = skimage_photo("astronaut.png").convert("RGB")  # 512x512, face near the top
    (root / "faces").mkdir(parents=True)
    (root / "scenes").mkdir()
    (root / "bad" / "deeper").mkdir(parents=True)

    def add(relative: str, data: bytes | Image.Image, status: str, *words: str, family: str | None = None, **params):
        path = root / relative
        if isinstance(data, Image.Image):
            data.save(path, **params)
        else:
            path.write_bytes(data)
        EXPECTED[relative] = (status, words)
        if family:
            FAMILY[relative] = family

    # Family "upright": the photo as shot, and conversions of it that frame the same face.
    add("faces/astronaut.png", astronaut, "kept", "face crop", family="upright")
    add("faces/astronaut_q80.jpg", _encoded(astronaut, "JPEG", quality=80), "duplicate", "face crop", family="upright")
    rotated, exif = _with_exif_orientation(astronaut, 6)
    add("faces/astronaut_exif6.jpg", rotated, "duplicate", "rotated 90° clockwise (EXIF orientation 6)", "face crop",
        family="upright", exif=exif, quality=95)
    rgba = astronaut.convert("RGBA")
    alpha = np.full((512, 512), 255, np.uint8)
    alpha[480:, :] = 0  # a transparent strip below the crop
    rgba.putalpha(Image.fromarray(alpha))
    add("faces/astronaut_rgba.png", rgba, "duplicate", "composited transparency (RGBA) on white", family="upright")
    add("faces/astronaut_cmyk.jpg", astronaut.convert("CMYK"), "duplicate", "converted CMYK to RGB",
        family="upright", quality=95)
    gray16 = Image.fromarray((np.asarray(astronaut.convert("L")).astype(np.uint16) * 257))
    add("faces/astronaut_gray16.png", gray16, "duplicate", "converted 16-bit grayscale (I;16) to 8-bit RGB",
        family="upright")
    add("faces/astronaut_gray.png", astronaut.convert("L"), "duplicate", "converted grayscale (L) to RGB",
        family="upright")
    # Too small once framed: the face is found, but its head-and-shoulders crop is < MIN_SIZE.
    add("faces/astronaut_small.png", astronaut.resize((200, 200)), "skipped", "face crop", "too small after cropping")
    add("faces/astronaut_tiny.png", astronaut.resize((64, 64)), "skipped", "too small: 64x64 px")

    # Other framings of the face, each its own family (tilted or mirrored changes the crop).
    canvas = _noise((1000, 800), seed=1)
    canvas.paste(ImageOps.mirror(astronaut).resize((700, 700)), (150, 120))
    add("faces/mirror_canvas.png", canvas, "kept", "face crop", "resized from", family="mirror")
    tilted_left, exif = _with_exif_orientation(_tilted(astronaut, 12), 8)
    add("faces/tilt_left_exif8.jpg", tilted_left, "kept", "rotated 90° counter-clockwise (EXIF orientation 8)",
        "face crop", family="tilt-left", exif=exif, quality=95)
    tilted_right, exif = _with_exif_orientation(_tilted(astronaut, -12), 3)
    add("faces/tilt_right_exif3.jpg", tilted_right, "kept", "rotated 180° (EXIF orientation 3)", "face crop",
        family="tilt-right", exif=exif, quality=95)
    edge = _noise((700, 560), seed=2)
    edge.paste(ImageOps.mirror(_tilted(astronaut, 12)).resize((560, 560)), (140, 0))  # face near the top edge
    add("faces/mirror_tilt_edge.png", edge, "kept", "face crop", family="mirror-tilt")

    # Scenes without a face: centre crops, and the remaining colour modes.
    coffee = skimage_photo("coffee.png").convert("RGBA")
    corners = np.full((400, 600), 255, np.uint8)
    corners[:60, :] = 0
    coffee.putalpha(Image.fromarray(corners))
    add("scenes/coffee_rgba.png", coffee, "kept", "composited transparency (RGBA) on white",
        "centre crop at box", "(no face found)")
    chelsea = skimage_photo("chelsea.png").convert("RGB")
    add("scenes/chelsea_cmyk.jpg", chelsea.convert("CMYK"), "kept", "converted CMYK to RGB", "(no face found)",
        quality=95)
    add("scenes/chelsea_copy.jpg", _encoded(chelsea.resize((400, 266)), "JPEG", quality=85), "duplicate",
        "near-duplicate of chelsea_cmyk.jpg")
    moon16 = Image.fromarray(np.asarray(skimage_photo("moon.png")).astype(np.uint16) * 257)
    add("scenes/moon_16bit.tif", moon16, "kept", "converted 16-bit grayscale (I;16) to 8-bit RGB",
        "no crop needed (no face found; already square)")
    brick = Image.fromarray(np.asarray(skimage_photo("brick.png")).astype(np.float32) / 255.0, mode="F")
    add("scenes/brick_float.tif", brick, "kept", "converted floating-point grayscale (F) to 8-bit RGB")
    add("scenes/coins_gray.png", skimage_photo("coins.png"), "kept", "converted grayscale (L) to RGB",
        "resized from 303x303 to 256x256")
    rocket = skimage_photo("rocket.jpg").convert("RGB").quantize(64)
    frames = [rocket, rocket.rotate(180)]
    add("scenes/rocket_anim.gif", frames[0], "kept", "used the first of 2 frames",
        "composited transparency (P) on white", save_all=True, append_images=frames[1:], transparency=0)

    # Files that cannot become training images.
    add("bad/empty.jpg", b"", "skipped", "empty file (0 bytes)")
    add("bad/one_pixel.png", Image.new("RGB", (1, 1), (200, 10, 10)), "skipped", "too small: 1x1 px")
    add("bad/truncated.png", _encoded(astronaut, "PNG")[:150_000], "skipped", "corrupt or truncated image data")
    add("bad/deeper/truncated.jpg", _encoded(chelsea, "JPEG", quality=90)[:9_000], "skipped",
        "corrupt or truncated image data")
    add("bad/huge_20000.png", _png_header_only(20000, 20000), "skipped", "too large", "decompression-bomb")
    add("bad/fake.jpg", b"this is not a picture\n" * 10, "skipped", "not an image")
    add("bad/readme.md", b"# notes\n", "skipped", "not an image")
    add("bad/.DS_Store", b"\x00\x00\x00\x01Bud1" + b"\x00" * 64, "skipped", "not an image")
    add("bad/phone.heic", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64, "skipped", "HEIC")
    add("bad/notes.txt", b"remember the lighting", "skipped", "caption file with no image")

    # Caption sidecars (--caption file).
    add("faces/astronaut.txt", "\ufeffblh woman in a spacesuit\nsecond line\n".encode(), "caption",
        "caption for faces/astronaut.png")
    add("faces/mirror_canvas.caption", "blh femme en scaphandre, été".encode("latin-1"), "skipped",
        "not UTF-8 text (byte 0xe9")
    add("scenes/coffee_rgba.txt", b"  \n", "skipped", "empty caption file")
    add("scenes/chelsea_cmyk.caption", b"a cat", "caption", "caption for scenes/chelsea_cmyk.jpg")
    add("scenes/chelsea_cmyk.txt", b"a cat (old caption)", "caption", "not used: scenes/chelsea_cmyk.caption")


def build_reg(root: Path) -> None:
    root.mkdir(parents=True)
    skimage_photo("gravel.png").save(root / "gravel.png")
    skimage_photo("motorcycle_left.png").convert("RGB").save(root / "motorcycle.jpg", quality=90)
