"""Per-sample transforms of the training dataset: captions, crop geometry, pixels and colour.

Every function here is pure: randomness comes in as a ``random.Random`` that the dataset seeds
from ``(seed, epoch, batch, position, stream)`` (see :func:`sample_rng`), so a sample gets the
same caption, crop, flip and colour whether its epoch is run from the start or resumed midway.

Semantics follow sd-scripts:

* **Captions** (:func:`process_caption`): whole-caption dropout (``caption_dropout_rate``, and
  every ``caption_dropout_every_n_epochs``-th epoch, counting epochs from 1), then, when
  shuffling or tag dropout is on, the caption is split at ``,``; the first ``keep_tokens`` tags
  (or, with ``keep_tokens_separator``, the part before the separator and the part after a second
  one) stay in place, the others are shuffled and each dropped with
  ``caption_tag_dropout_rate``, and the tags are joined with ``", "``.
* **Geometry** (:class:`CropGeometry`): the image is resized to cover its bucket (the size the
  bucket manager chose), then cropped to the bucket, centred or at a random offset.
* **SDXL size conditioning** (:meth:`CropGeometry.sdxl_sizes`): original size, crop top-left
  and target size as sd-scripts computes them: its "crop" is the centred box the image would
  occupy if fitted *inside* the bucket (sd-scripts' ``get_crop_ltrb``), not the pixels trimmed,
  and it ignores the random crop offset. We keep those values so an SDXL LoRA sees the same
  conditioning as one trained with kohya (sd-scripts issue #1443 discusses the choice).
* **Pixels** (:func:`load_rgb`, :func:`resize_and_crop`): downscaling uses area averaging and
  upscaling Lanczos, as sd-scripts does. EXIF orientation is *not* applied (sd-scripts does not,
  and the bucket is chosen from the stored size; ``loralab prepare`` writes upright images).
  Transparent pixels are composited on white (sd-scripts drops the alpha channel, exposing
  whatever colour the transparent pixels hold; ``loralab prepare`` flattens on white too).
* **Colour** (:func:`color_augment`): with probability 0.33, either a hue shift of up to 8
  OpenCV hue units (16 degrees) or a gamma in [0.95, 1.05]. sd-scripts applies its gamma to raw
  0-255 values (``image ** gamma``), which brightens by up to 80 levels rather than bending the
  curve; we apply it to values normalised to [0, 1], as the RandomGamma it replaced did.

Errors: :class:`~loralab.errors.DatasetError` (one line) for an image that cannot be decoded or
whose size changed since the dataset was scanned.
"""

from __future__ import annotations

import enum
import hashlib
import io
import random
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from loralab.data.buckets import BucketChoice, Resolution
from loralab.errors import DatasetError

# sd-scripts' colour augmentation: how often it applies, and its limits.
COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT = 8.0  # OpenCV hue units (0-179), i.e. 16 degrees
GAMMA_RANGE = (0.95, 1.05)
_WHITE = (255, 255, 255)


class SampleStream(enum.IntEnum):
    """Independent random streams, so switching one option on leaves the other draws unchanged."""

    ORDER = 0  # the epoch's shuffle (one per epoch, not per sample)
    CAPTION = 1
    FLIP = 2
    CROP = 3
    COLOR = 4
    LATENT = 5


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (a hash, so neighbouring inputs give unrelated streams)."""
    packed = struct.pack(f"<{len(parts)}q", *(int(p) for p in parts))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


def sample_rng(seed: int, epoch: int, batch_index: int, position: int, stream: SampleStream) -> random.Random:
    """The random stream of one sample slot of one epoch."""
    return random.Random(derive_seed(seed, epoch, batch_index, position, stream))


# ---------------------------------------------------------------------------------------------
# Captions


@dataclass(frozen=True)
class CaptionOptions:
    """Caption handling options (sd-scripts names)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    caption_separator: str = ","

    @classmethod
    def from_config(cls, config: Any) -> CaptionOptions:
        """Read from a TrainConfig; fields it does not have keep their defaults."""
        names = [name for name in cls.__dataclass_fields__ if getattr(config, name, None) is not None]
        return cls(**{name: getattr(config, name) for name in names})

    @property
    def changes_captions(self) -> bool:
        """True when a caption may differ between epochs (which rules out cached text encodings)."""
        return bool(
            self.shuffle_caption
            or self.caption_dropout_rate
            or self.caption_dropout_every_n_epochs
            or self.caption_tag_dropout_rate
        )


def _split_tags(text: str, separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def process_caption(caption: str, options: CaptionOptions, epoch: int, rng: random.Random) -> str:
    """The caption a sample trains with in ``epoch`` (1-based), as sd-scripts builds it."""
    dropped = options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate
    every = options.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""
    if not (options.shuffle_caption or options.caption_tag_dropout_rate > 0):
        return caption

    separator = options.caption_separator
    fixed: list[str] = []
    fixed_suffix: list[str] = []
    marker = options.keep_tokens_separator
    if marker and marker in caption:
        fixed_part, flex_part = caption.split(marker, 1)
        if marker in flex_part:
            flex_part, suffix_part = flex_part.split(marker, 1)
            fixed_suffix = _split_tags(suffix_part, separator)
        fixed = _split_tags(fixed_part, separator)
        flex = _split_tags(flex_part, separator)
    else:
        # sd-scripts keeps empty tags here (only the separator variant drops them).
        tags = [tag.strip() for tag in caption.strip().split(separator)]
        fixed, flex = tags[: options.keep_tokens], tags[options.keep_tokens :]

    if options.shuffle_caption:
        rng.shuffle(flex)
    if options.caption_tag_dropout_rate > 0:
        flex = [tag for tag in flex if rng.random() >= options.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + fixed_suffix)


# ---------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class SdxlSizes:
    """SDXL's size conditioning of one sample, each as (height, width) / (top, left)."""

    original_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_hw: tuple[int, int]


@dataclass(frozen=True)
class CropGeometry:
    """How an image of ``original_size`` becomes a ``bucket``-sized training image: resize to
    ``resized_size`` (which covers the bucket), then crop the bucket at ``(crop_left, crop_top)``.
    Sizes are (width, height)."""

    original_size: Resolution
    resized_size: Resolution
    bucket: Resolution
    crop_left: int
    crop_top: int

    @classmethod
    def centred(cls, original_size: Resolution, choice: BucketChoice) -> CropGeometry:
        """The centre crop of the bucket manager's choice for an image of ``original_size``."""
        (resized_w, resized_h), (bucket_w, bucket_h) = choice.resized_size, choice.bucket
        if resized_w < bucket_w or resized_h < bucket_h:
            raise ValueError(f"resized size {choice.resized_size} does not cover bucket {choice.bucket}")
        return cls(
            tuple(original_size), choice.resized_size, choice.bucket, (resized_w - bucket_w) // 2, (resized_h - bucket_h) // 2
        )

    def randomised(self, rng: random.Random) -> CropGeometry:
        """The same resize with the crop at a random offset (sd-scripts' ``random_crop``)."""
        left = rng.randint(0, self.resized_size[0] - self.bucket[0])
        top = rng.randint(0, self.resized_size[1] - self.bucket[1])
        return CropGeometry(self.original_size, self.resized_size, self.bucket, left, top)

    def describe(self) -> dict[str, list[int]]:
        """JSON-ready fields (what cache keys are built from)."""
        return {
            "original": list(self.original_size),
            "resized": list(self.resized_size),
            "bucket": list(self.bucket),
            "crop": [self.crop_left, self.crop_top],
        }

    def sdxl_sizes(self, flipped: bool) -> SdxlSizes:
        """Original size, crop top-left and target size for SDXL, with sd-scripts' values.

        The crop box is the bucket-centred box of the image fitted inside the bucket; a flip
        mirrors it, so its left edge becomes ``bucket width - right edge``.
        """
        (bucket_w, bucket_h), (image_w, image_h) = self.bucket, self.original_size
        image_aspect = image_w / image_h
        if bucket_w / bucket_h > image_aspect:
            fitted_w, fitted_h = bucket_h * image_aspect, float(bucket_h)
        else:
            fitted_w, fitted_h = float(bucket_w), bucket_w / image_aspect
        left = (bucket_w - fitted_w) // 2
        top = (bucket_h - fitted_h) // 2
        if flipped:
            left = bucket_w - (left + fitted_w)
        return SdxlSizes((image_h, image_w), (int(top), int(left)), (bucket_h, bucket_w))


# ---------------------------------------------------------------------------------------------
# Pixels


def load_rgb(source: Path | bytes, label: str | Path = "") -> np.ndarray:
    """Decode an image file (path or its bytes) to ``(H, W, 3)`` uint8 RGB, alpha on white."""
    name = str(label or (source if isinstance(source, Path) else "image"))
    try:
        with warnings.catch_warnings():
            # Discovery already sized this image; a large one is the user's choice, not a bomb.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                image.load()
                return np.array(_to_rgb(image))  # a writable copy (torch refuses read-only arrays)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot decode image {name}: {exc}; replace it with a valid image or remove it") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        flattened = Image.new("RGB", rgba.size, _WHITE)
        flattened.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return flattened
    return image.convert("RGB")


def resize_and_crop(pixels: np.ndarray, geometry: CropGeometry, label: str | Path = "") -> np.ndarray:
    """Resize ``(H, W, 3)`` pixels to ``geometry.resized_size`` and crop the bucket out of them."""
    height, width = pixels.shape[:2]
    if (width, height) != tuple(geometry.original_size):
        expected = "x".join(map(str, geometry.original_size))
        raise DatasetError(
            f"image {label} is {width}x{height} but was {expected} when the dataset was scanned; "
            f"restart so the dataset is read again"
        )
    new_w, new_h = geometry.resized_size
    if (new_w, new_h) != (width, height):
        if new_w * new_h < width * height:
            # Area averaging is the alias-free way down (sd-scripts: cv2 INTER_AREA).
            pixels = cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_AREA)
        else:
            pixels = np.array(Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.LANCZOS))
    bucket_w, bucket_h = geometry.bucket
    left, top = geometry.crop_left, geometry.crop_top
    return np.ascontiguousarray(pixels[top : top + bucket_h, left : left + bucket_w])


def flip_horizontal(pixels: np.ndarray) -> np.ndarray:
    """Mirror ``(H, W, C)`` pixels left-right."""
    return np.ascontiguousarray(pixels[:, ::-1])


def color_augment(pixels: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' ``color_aug`` on ``(H, W, 3)`` uint8 RGB (see the module docstring)."""
    if rng.random() > COLOR_AUG_PROBABILITY:
        return pixels
    if rng.random() > 0.5:
        hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)
        shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
        hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.float32) + shift) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    gamma = rng.uniform(*GAMMA_RANGE)
    curved = 255.0 * np.power(pixels.astype(np.float32) / 255.0, gamma)
    return np.clip(np.rint(curved), 0, 255).astype(np.uint8)


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [-1, 1], the range the VAE encodes."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def training_pixels(source: Path | bytes, geometry: CropGeometry, flipped: bool, label: str | Path = "") -> np.ndarray:
    """Decode, resize, crop and (optionally) flip: the pixels a cached latent encodes."""
    pixels = resize_and_crop(load_rgb(source, label), geometry, label)
    return flip_horizontal(pixels) if flipped else pixels
