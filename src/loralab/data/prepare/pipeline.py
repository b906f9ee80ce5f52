"""Prepare one source image: load, find the face, crop, resize, hash, write.

:func:`prepare_image` is what each worker process runs; it takes and returns plain picklable
data and never raises for bad input (an unusable file comes back as a skipped outcome with its
reason). Output images are PNG: lossless, so the VAE sees the photo and not a second generation
of compression artefacts the LoRA could learn; a dataset of a few hundred images at 768 px is a
few hundred MB at most. They are named by the hash of their pixels, so preparing the same photos
with the same settings gives the same files.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from loralab.data.buckets import BucketManager
from loralab.data.prepare.box import Box
from loralab.data.prepare.dedupe import perceptual_hash
from loralab.data.prepare.faces import detect_faces
from loralab.data.prepare.files import temporary_sibling
from loralab.data.prepare.framing import MAX_FACE_OFFSET, centre_crop, downscale_to_area, face_crop
from loralab.data.prepare.image_io import UnusableImage, load_image

CropMode = Literal["square", "bucket", "none"]
OUTPUT_SUFFIX = ".png"
# zlib level 3 is ~3x faster than Pillow's default 6 for ~5% larger files.
_PNG_COMPRESS_LEVEL = 3
_NAME_HEX_DIGITS = 16  # 64 bits of SHA-256: no collision in any real dataset


@dataclass(frozen=True)
class FramingSettings:
    """How every image of one set (training or regularisation) is framed and sized."""

    crop: CropMode
    face_focus: bool
    resolution: int
    min_size: int
    max_decode_pixels: int
    buckets: BucketManager | None = None  # required for crop == "bucket"


@dataclass(frozen=True)
class ImageTask:
    source: Path
    key: str  # unique id of the source in this job (set + relative path)
    settings: FramingSettings
    output_dir: Path | None  # None: dry run, write nothing


@dataclass
class ImageOutcome:
    """What happened to one source image; ``output_name`` is set when it was kept."""

    key: str
    actions: list[str] = field(default_factory=list)
    skip_reason: str | None = None
    file_size: tuple[int, int] | None = None
    file_bytes: int = 0
    output_size: tuple[int, int] | None = None
    face_box: Box | None = None
    crop_box: Box | None = None
    phash: str | None = None
    output_name: str | None = None


def prepare_image(task: ImageTask) -> ImageOutcome:
    """Run one source image through the whole preparation; never raises for bad input."""
    outcome = ImageOutcome(task.key)
    settings = task.settings
    try:
        loaded = load_image(
            task.source, min_side=settings.min_size, max_decode_pixels=settings.max_decode_pixels
        )
    except UnusableImage as exc:
        outcome.skip_reason = exc.reason
        return outcome
    image = loaded.image
    outcome.file_size = loaded.file_size
    outcome.file_bytes = loaded.file_bytes
    outcome.actions.extend(loaded.actions)
    crop, target = _frame(image, settings, outcome)
    outcome.crop_box = crop
    if min(crop.width, crop.height) < settings.min_size:
        outcome.skip_reason = (
            f"too small after cropping: {crop.width}x{crop.height} px, shorter side below "
            f"--min-size {settings.min_size}"
        )
        return outcome
    if crop.as_tuple() != (0, 0, *image.size):
        image = image.crop(crop.as_tuple())
    output_size = _covered_target(crop, target)
    if output_size != image.size:
        outcome.actions.append(
            f"resized from {image.width}x{image.height} to {output_size[0]}x{output_size[1]}"
        )
        # reducing_gap: a fast box reduction first, then Lanczos over the last factor of 3 only.
        image = image.resize(output_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    elif output_size != target:
        kept = f"{image.width}x{image.height}"
        outcome.actions.append(
            f"kept at {kept}: smaller than the {target[0]}x{target[1]} target, not enlarged"
        )
    outcome.output_size = image.size
    outcome.phash = perceptual_hash(image)
    outcome.output_name = content_name(image)
    if task.output_dir is not None:
        _write_png(image, task.output_dir / outcome.output_name)
    return outcome


def _frame(
    image: Image.Image, settings: FramingSettings, outcome: ImageOutcome
) -> tuple[Box, tuple[int, int]]:
    """The crop box in the upright image and the output size aimed for (never enlarged to)."""
    width, height = image.size
    if settings.crop == "none":
        return Box(0, 0, width, height), downscale_to_area(image.size, settings.resolution**2)
    if settings.crop == "bucket":
        assert settings.buckets is not None, "bucket crop needs a BucketManager"
        target = settings.buckets.select(width, height).bucket
    else:
        target = (settings.resolution, settings.resolution)
    aspect = target[0] / target[1]
    faces = detect_faces(image) if settings.face_focus else []
    if faces:
        face = faces[0]
        crop = face_crop(image.size, face, aspect)
        outcome.face_box = face
        among = f", the largest of {len(faces)} faces" if len(faces) > 1 else ""
        outcome.actions.append(
            f"face crop at box {crop} around face {face}{among}{_off_centre_words(face, crop)}"
        )
    else:
        crop = centre_crop(image.size, aspect)
        why = "no face found" if settings.face_focus else "--face-focus off"
        if crop.width == width and crop.height == height:
            outcome.actions.append(f"no crop needed ({why}; already {_aspect_words(target)})")
        else:
            outcome.actions.append(f"centre crop at box {crop} ({why})")
    return crop, target


def _off_centre_words(face: Box, crop: Box) -> str:
    (face_x, face_y), (crop_x, crop_y) = face.centre, crop.centre
    offset = max(abs(face_x - crop_x) / crop.width, abs(face_y - crop_y) / crop.height)
    if offset <= MAX_FACE_OFFSET + 1 / min(crop.width, crop.height):  # one pixel of rounding
        return ""
    return f" (off-centre by {offset:.0%}: the face is at the photo's edge)"


def _aspect_words(target: tuple[int, int]) -> str:
    return "square" if target[0] == target[1] else f"the {target[0]}x{target[1]} aspect ratio"


def _covered_target(crop: Box, target: tuple[int, int]) -> tuple[int, int]:
    # Scale down to the target; a crop smaller than the target keeps its size: enlarging here
    # only adds interpolation that training would do anyway.
    if crop.width >= target[0] and crop.height >= target[1]:
        return target
    return crop.width, crop.height


def content_name(image: Image.Image) -> str:
    """File name from the image's size and pixels: the same picture always gets the same name."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:_NAME_HEX_DIGITS] + OUTPUT_SUFFIX


def _write_png(image: Image.Image, path: Path) -> None:
    # Written under a temporary name and renamed: two sources with identical pixels write the
    # same file, and a reader never sees half an image.
    temporary = temporary_sibling(path)
    image.save(temporary, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    os.replace(temporary, path)
