"""Aspect-ratio buckets, with the semantics of sd-scripts (which kohya_ss drives).

Every batch holds images of one size, so images are grouped into *buckets* by aspect ratio and
each image is resized and centre-cropped to its bucket's resolution. Two modes:

* **Predefined buckets** (``bucket_no_upscale`` off). The candidate resolutions keep the area of
  the training resolution: for every width ``w`` from ``min_bucket_reso`` to ``max_bucket_reso``
  in steps of ``bucket_reso_steps``, the height is the largest multiple of the step with
  ``w * h <= area`` (capped at the maximum); both ``(w, h)`` and ``(h, w)`` are buckets, plus the
  square one. An image goes to the bucket whose aspect ratio is closest to its own (an image whose
  exact size is a bucket keeps it), and is scaled, up or down, so that it covers the bucket.
* **Per-image buckets** (``bucket_no_upscale`` on). Images are never enlarged: one larger than the
  training area is first shrunk to that area at its aspect ratio (the side that rounds to the step
  with the smaller aspect error decides the size), and the bucket is the size floored to the step.
  ``min_bucket_reso`` / ``max_bucket_reso`` do not apply in this mode (as in sd-scripts).

With bucketing off (``enable_bucket`` false) there is one bucket, the training resolution.
Rounding follows sd-scripts exactly (``int(x + 0.5)`` then down to the step), so an image lands in
the same bucket here as it did in a kohya_ss run.

:func:`epoch_samples` turns a discovered dataset into what one epoch trains on: every image with
its bucket and how often it is used (its folder's repeats; for regularisation images the count
after sd-scripts' balancing). The planner counts them; training batches them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from loralab.data.discovery import DatasetInfo, ImageEntry
from loralab.errors import ConfigError, DatasetError

Resolution = tuple[int, int]  # (width, height) in pixels

# Latents are 1/8 of the image size, so every trained side must be a multiple of 8.
_LATENT_FACTOR = 8


def make_bucket_resolutions(
    max_reso: Resolution, min_size: int, max_size: int, divisible: int
) -> list[Resolution]:
    """The predefined bucket resolutions for a training resolution, sorted by (width, height)."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resolutions = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
    return sorted(resolutions)


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: its bucket, the size it is resized to before the crop, the AR error."""

    bucket: Resolution
    resized_size: Resolution
    aspect_error: float  # bucket aspect ratio minus image aspect ratio


@dataclass(frozen=True)
class Bucket:
    """A bucket and how many samples (images x repeats) it holds per epoch."""

    resolution: Resolution
    count: int

    def batches(self, batch_size: int) -> int:
        # The last batch of a bucket may be short: sd-scripts does not borrow from other buckets.
        return math.ceil(self.count / batch_size)


class BucketManager:
    """Assigns image sizes to buckets for one training resolution and bucket settings.

    Raises ConfigError for settings sd-scripts rejects or that cannot train (a resolution outside
    ``[min_bucket_reso, max_bucket_reso]``, a resolution not divisible by the bucket step, a step
    that is not a multiple of 8).
    """

    def __init__(
        self,
        resolution: Resolution,
        *,
        enable_bucket: bool = True,
        min_bucket_reso: int = 256,
        max_bucket_reso: int = 1024,
        bucket_reso_steps: int = 64,
        bucket_no_upscale: bool = False,
    ) -> None:
        width, height = resolution
        if width <= 0 or height <= 0:
            raise ConfigError(f"resolution {width}x{height} must be positive, e.g. 512 or 768,768")
        self.resolution: Resolution = (width, height)
        self.enable_bucket = enable_bucket
        self.no_upscale = enable_bucket and bucket_no_upscale
        self.steps = bucket_reso_steps
        self.max_area = width * height
        if enable_bucket:
            _check_bucket_settings(self.resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
            if self.no_upscale:
                self.predefined: tuple[Resolution, ...] = ()
            else:
                self.predefined = tuple(
                    make_bucket_resolutions(self.resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
                )
        else:
            if width % _LATENT_FACTOR or height % _LATENT_FACTOR:
                raise ConfigError(
                    f"resolution {width}x{height} must be a multiple of {_LATENT_FACTOR} on both sides"
                )
            self.predefined = (self.resolution,)
        self._predefined_set = frozenset(self.predefined)

    @classmethod
    def from_config(cls, config: Any) -> BucketManager:
        """Build from a TrainConfig (``resolution`` and the ``*bucket*`` fields)."""
        return cls(
            tuple(config.resolution),
            enable_bucket=config.enable_bucket,
            min_bucket_reso=config.min_bucket_reso,
            max_bucket_reso=config.max_bucket_reso,
            bucket_reso_steps=config.bucket_reso_steps,
            bucket_no_upscale=config.bucket_no_upscale,
        )

    def select(self, width: int, height: int, label: str = "") -> BucketChoice:
        """The bucket for an image of ``width`` x ``height`` pixels.

        ``label`` (e.g. the file path) only makes the error message name the image. Raises
        DatasetError when ``bucket_no_upscale`` would give the image a zero-sized bucket.
        """
        name = f"image {label}" if label else "an image"
        if width <= 0 or height <= 0:
            raise DatasetError(f"{name} has an empty size {width}x{height}; remove it")
        aspect = width / height
        if self.no_upscale:
            resized = self._shrink_to_area(width, height, aspect)
            bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
            if 0 in bucket:
                raise DatasetError(
                    f"{name} is {width}x{height}: with bucket_no_upscale a side below "
                    f"bucket_reso_steps ({self.steps}) gives an empty bucket; enlarge or remove it"
                )
        else:
            bucket = self._closest_predefined(width, height, aspect)
            bucket_aspect = bucket[0] / bucket[1]
            # Scale so the image covers the bucket: match the side that would otherwise fall short.
            scale = bucket[1] / height if aspect > bucket_aspect else bucket[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        return BucketChoice(bucket, resized, bucket[0] / bucket[1] - aspect)

    def _closest_predefined(self, width: int, height: int, aspect: float) -> Resolution:
        if (width, height) in self._predefined_set:
            return (width, height)
        errors = [abs(w / h - aspect) for w, h in self.predefined]
        # First minimum wins on ties, as numpy's argmin does in sd-scripts.
        return self.predefined[errors.index(min(errors))]

    def _round_to_steps(self, value: float) -> int:
        rounded = int(value + 0.5)
        return rounded - rounded % self.steps

    def _shrink_to_area(self, width: int, height: int, aspect: float) -> Resolution:
        if width * height <= self.max_area:
            return (width, height)
        shrunk_width = math.sqrt(self.max_area * aspect)
        shrunk_height = self.max_area / shrunk_width
        # Round one side to the step, derive the other from the aspect ratio; keep the candidate
        # whose rounded aspect ratio is closer to the image's.
        width_first = self._round_to_steps(shrunk_width)
        height_for_width = self._round_to_steps(width_first / aspect)
        height_first = self._round_to_steps(shrunk_height)
        width_for_height = self._round_to_steps(height_first * aspect)
        error_width_first = abs(width_first / height_for_width - aspect) if height_for_width else math.inf
        error_height_first = abs(width_for_height / height_first - aspect) if height_first else math.inf
        if error_width_first < error_height_first:
            return (width_first, int(width_first / aspect + 0.5))
        return (int(height_first * aspect + 0.5), height_first)


def _check_bucket_settings(resolution: Resolution, min_reso: int, max_reso: int, steps: int) -> None:
    width, height = resolution
    if steps <= 0 or steps % _LATENT_FACTOR:
        raise ConfigError(
            f"bucket_reso_steps {steps} must be a positive multiple of {_LATENT_FACTOR} (64 is usual)"
        )
    if width % steps or height % steps:
        suggestion = f"{_nearest_multiple(width, steps)},{_nearest_multiple(height, steps)}"
        raise ConfigError(
            f"resolution {width}x{height} is not divisible by bucket_reso_steps {steps}; "
            f"use e.g. resolution={suggestion} or change bucket_reso_steps"
        )
    if min_reso > max_reso:
        raise ConfigError(f"min_bucket_reso {min_reso} is larger than max_bucket_reso {max_reso}")
    if min(resolution) < min_reso:
        raise ConfigError(
            f"min_bucket_reso {min_reso} is larger than the resolution's shorter side {min(resolution)}; "
            f"lower min_bucket_reso"
        )
    if max(resolution) > max_reso:
        raise ConfigError(
            f"max_bucket_reso {max_reso} is smaller than the resolution's longer side {max(resolution)}; "
            f"raise max_bucket_reso"
        )


def _nearest_multiple(value: int, step: int) -> int:
    return max(step, round(value / step) * step)


def fill_buckets(samples: Iterable[tuple[Resolution, int]]) -> list[Bucket]:
    """Sum ``(bucket, repeats)`` pairs into buckets, sorted by resolution as sd-scripts lists them."""
    counts: Counter[Resolution] = Counter()
    for resolution, repeats in samples:
        if repeats > 0:
            counts[resolution] += repeats
    return [Bucket(resolution, count) for resolution, count in sorted(counts.items())]


def batches_per_epoch(buckets: Iterable[Bucket], batch_size: int) -> int:
    """Batches the data loader yields per epoch: each bucket is batched on its own."""
    return sum(bucket.batches(batch_size) for bucket in buckets)


@dataclass(frozen=True)
class Sample:
    """One image as an epoch uses it: its bucket and how many times per epoch."""

    image: ImageEntry
    choice: BucketChoice
    repeats: int
    is_reg: bool


def balance_reg_repeats(folder_repeats: list[int], num_train_images: int) -> list[int]:
    """Per regularisation image, how often it is used per epoch (0 = not used).

    sd-scripts walks the images in order, first with their folder's repeats, then adding one
    repeat at a time round-robin, until the count reaches the training images with repeats.
    """
    used = [0] * len(folder_repeats)
    total = 0
    for index, repeats in enumerate(folder_repeats):
        used[index] = repeats
        total += repeats
        if total >= num_train_images:
            return used
    while folder_repeats and total < num_train_images:
        for index in range(len(used)):
            used[index] += 1
            total += 1
            if total >= num_train_images:
                break
    return used


def epoch_samples(dataset: DatasetInfo, manager: BucketManager) -> list[Sample]:
    """Every image of ``dataset`` with its bucket and repeats per epoch (unused reg images left out).

    Images are in discovery order (folders, then files, sorted), which is also the order
    regularisation balancing walks.
    """
    samples = [
        Sample(image, manager.select(image.width, image.height, str(image.path)), subset.repeats, False)
        for subset in dataset.train
        for image in subset.images
    ]
    reg_images = [(image, subset.repeats) for subset in dataset.reg for image in subset.images]
    reg_used = balance_reg_repeats([repeats for _, repeats in reg_images], dataset.num_train_images)
    samples += [
        Sample(image, manager.select(image.width, image.height, str(image.path)), used, True)
        for (image, _), used in zip(reg_images, reg_used)
        if used
    ]
    return samples
