"""Open one source photo safely and turn it into an upright 8-bit RGB image.

What users bring is phone and camera output: EXIF-rotated JPEGs, PNGs with alpha, CMYK scans,
16-bit TIFFs, grayscale, palette GIFs, wide-gamut (Display P3) photos, the odd corrupt or
enormous file. :func:`load_image` handles each of these and records, in plain words, every
change it made, so the prepare report can say what happened to each file.

Memory safety: Pillow opens lazily, so the pixel size is known from the header before any pixel
is decoded. Files whose header promises more pixels than ``max_decode_pixels`` are either decoded
at a reduced scale (JPEG can do this natively with ``draft``) or skipped with a reason; Pillow's
own decompression-bomb guard stays in force and its refusal becomes a report line too.

Errors: :class:`UnusableImage` (with a one-line reason for the report) for anything that cannot
be turned into a usable image. Nothing here raises for bad input otherwise.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

# Decoding a 50 MP RGB image takes ~150 MB and converting it briefly doubles or triples that;
# with a few worker processes this keeps the whole job well under the 1.5 GB budget.
DEFAULT_MAX_DECODE_PIXELS = 50_000_000

_EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATION_WORDS = {
    2: "mirrored left-right",
    3: "rotated 180°",
    4: "flipped top-bottom",
    5: "mirrored and rotated 90° counter-clockwise",
    6: "rotated 90° clockwise",
    7: "mirrored and rotated 90° clockwise",
    8: "rotated 90° counter-clockwise",
}
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_RGB_MODES = ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA")
_WHITE = (255, 255, 255)


class UnusableImage(Exception):
    """A source file that cannot become a training image; ``reason`` goes into the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class LoadedImage:
    """An upright RGB image and what was done to get it from the file."""

    image: Image.Image
    file_size: tuple[int, int]  # (width, height) as stored in the file's header
    file_bytes: int
    actions: list[str] = field(default_factory=list)


def load_image(
    path: Path, *, min_side: int = 1, max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS
) -> LoadedImage:
    """Decode ``path`` into an upright 8-bit RGB image, within a pixel budget.

    ``min_side``: images whose shorter side (from the header) is below this are refused before
    decoding. ``max_decode_pixels``: larger images are decoded at 1/2, 1/4 or 1/8 scale when the
    format allows it (JPEG), otherwise refused.

    Raises UnusableImage with the reason for empty, unreadable, non-image, corrupt, too small or
    too large files.
    """
    try:
        data_size = path.stat().st_size
        handle = path.open("rb")
    except OSError as exc:
        raise UnusableImage(f"cannot read the file: {exc.strerror or exc}") from exc
    if data_size == 0:
        handle.close()
        raise UnusableImage("empty file (0 bytes)")
    with handle:
        image = _open_header(handle)
        with image:
            return _decode(image, data_size, min_side=min_side, max_decode_pixels=max_decode_pixels)


def _open_header(handle: io.BufferedReader) -> Image.Image:
    # Between Pillow's warning and error thresholds it only warns; our own budget below is
    # stricter, so the warning would just be noise on stderr.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(handle)
        except Image.DecompressionBombError as exc:
            raise UnusableImage(f"too large: Pillow's decompression-bomb guard refused it ({exc})") from exc
        except UnidentifiedImageError as exc:
            raise UnusableImage(f"not an image (no format Pillow can read){_heif_hint(handle)}") from exc
        except Exception as exc:  # a plugin choking on a malformed header
            raise UnusableImage(f"corrupt image header: {exc}") from exc


def _heif_hint(handle: io.BufferedReader) -> str:
    handle.seek(4)
    if handle.read(8) in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftypavif"):
        return "; it looks like HEIC/AVIF: convert it to JPEG or PNG first"
    return ""


def _decode(image: Image.Image, file_bytes: int, *, min_side: int, max_decode_pixels: int) -> LoadedImage:
    width, height = image.size
    if min(width, height) < min_side:
        raise UnusableImage(f"too small: {width}x{height} px, shorter side below --min-size {min_side}")
    loaded = LoadedImage(image, (width, height), file_bytes)
    if width * height > max_decode_pixels:
        _decode_reduced(image, max_decode_pixels, loaded)
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        loaded.actions.append(f"used the first of {frames} frames")
    try:
        image.load()
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise UnusableImage(f"corrupt or truncated image data: {exc}") from exc
    icc_profile = image.info.get("icc_profile")
    upright = _apply_exif_orientation(image, loaded.actions)
    try:
        loaded.image = _to_rgb(upright, icc_profile, loaded.actions)
    except (OSError, ValueError) as exc:  # Pillow's way of saying a mode has no RGB conversion
        raise UnusableImage(f"cannot convert its {upright.mode} pixels to RGB: {exc}") from exc
    return loaded


def _decode_reduced(image: Image.Image, max_decode_pixels: int, loaded: LoadedImage) -> None:
    width, height = image.size
    megapixels = f"{width}x{height} ({width * height / 1e6:.0f} MP)"
    limit = f"{max_decode_pixels / 1e6:.0f} MP decode limit"
    if image.format != "JPEG":
        raise UnusableImage(
            f"too large: {megapixels} is over the {limit} and {image.format} cannot be decoded at "
            f"a reduced size; downscale it first"
        )
    for scale in (2, 4, 8):  # the reductions libjpeg performs while decoding
        reduced = (math.ceil(width / scale), math.ceil(height / scale))
        if reduced[0] * reduced[1] <= max_decode_pixels:
            image.draft(image.mode, reduced)
            loaded.actions.append(f"decoded at 1/{scale} scale ({megapixels} is over the {limit})")
            return
    raise UnusableImage(
        f"too large: {megapixels} stays over the {limit} even at 1/8 scale; downscale it first"
    )


def _apply_exif_orientation(image: Image.Image, actions: list[str]) -> Image.Image:
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:  # malformed EXIF must not cost the user the photo
        actions.append(f"EXIF unreadable ({exc}); orientation left as stored")
        return image.copy()  # the caller closes the file-backed original
    if orientation in _ORIENTATION_WORDS:
        actions.append(f"{_ORIENTATION_WORDS[orientation]} (EXIF orientation {orientation})")
    return upright


def _to_rgb(image: Image.Image, icc_profile: bytes | None, actions: list[str]) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, in sRGB when an embedded profile says otherwise."""
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        actions.append(f"converted {_bit_depth_words(image.mode)} grayscale ({image.mode}) to 8-bit RGB")
        # Any profile described the original samples, not our rescaled ones: it is dropped.
        return _high_bit_depth_to_l(image).convert("RGB")
    if image.mode == "CMYK":
        converted = _icc_to_srgb(image, icc_profile, "CMYK", actions)
        if converted is None:
            actions.append("converted CMYK to RGB")
            converted = image.convert("RGB")
        return converted
    # An RGB profile describes colour samples; on a grayscale image it is a mislabel to ignore.
    colour = image.mode in _RGB_MODES
    if _has_transparency(image):
        image = _flatten_on_white(image, actions)
    elif image.mode != "RGB":
        actions.append(f"converted {_MODE_WORDS.get(image.mode, image.mode)} to RGB")
        image = image.convert("RGB")
    if not colour:
        return image
    return _icc_to_srgb(image, icc_profile, "RGB", actions) or image


def _has_transparency(image: Image.Image) -> bool:
    # An alpha band, or a palette / single-colour key marked transparent ("transparency" info).
    return image.mode in _ALPHA_MODES or "transparency" in image.info


_MODE_WORDS = {"L": "grayscale (L)", "1": "black-and-white (1-bit)", "P": "palette (P)"}


def _bit_depth_words(mode: str) -> str:
    return {"I": "32-bit integer", "F": "floating-point"}.get(mode, "16-bit")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Rescale 16-bit / 32-bit / float samples to 8 bits without clipping the highlights."""
    samples = np.asarray(image).astype(np.float64)
    low, peak = (float(samples.min()), float(samples.max())) if samples.size else (0.0, 0.0)
    if low < 0 or peak > 65535:
        scaled = (samples - low) * (255.0 / max(peak - low, 1e-12))  # no convention: stretch the range
    elif image.mode == "F" and peak <= 1.0:
        scaled = samples * 255.0  # float images conventionally hold [0, 1]
    elif peak <= 255:
        scaled = samples  # already 8-bit values stored in a wide type
    else:
        scaled = samples / 257.0  # 65535 -> 255, the exact inverse of 8->16-bit expansion
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _flatten_on_white(image: Image.Image, actions: list[str]) -> Image.Image:
    # Transparent pixels hold arbitrary colour (often black); training on them teaches junk, so
    # they become white, which is what viewers show and what captions never mention.
    mode = image.mode
    rgba = image.convert("RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] == 255:
        actions.append(f"dropped a fully opaque alpha channel ({mode})")
        return rgba.convert("RGB")
    flattened = Image.new("RGB", rgba.size, _WHITE)
    flattened.paste(rgba.convert("RGB"), mask=alpha)
    actions.append(f"composited transparency ({mode}) on white")
    return flattened


def _icc_to_srgb(
    image: Image.Image, icc_profile: bytes | None, colour_space: str, actions: list[str]
) -> Image.Image | None:
    """Convert through the embedded ICC profile; None when there is none, it is sRGB already,
    it is for another colour space (a gray profile on a grayscale photo), or it is unusable."""
    if not icc_profile:
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        if source.profile.xcolor_space.strip() != colour_space:
            return None
        description = (ImageCms.getProfileDescription(source) or "").strip()
        if colour_space == "RGB" and "srgb" in description.lower():
            return None
        converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        actions.append(f"embedded ICC profile unusable ({exc}); colours taken as stored")
        return None
    actions.append(f"converted {colour_space} to sRGB using its ICC profile '{description}'")
    return converted
