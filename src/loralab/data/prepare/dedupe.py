"""Near-duplicate detection with perceptual hashes (``imagehash.phash``).

A pHash says, for each of the 8x8 lowest DCT frequencies of a 32x32 grayscale thumbnail, whether
it is above their median: 64 bits that survive rescaling, recompression and small colour
changes. Two images whose hashes differ in at most :data:`NEAR_DUPLICATE_MAX_DISTANCE` bits are
treated as the same photo.

The threshold, measured on face crops of scikit-image's astronaut photo: the same photo
re-encoded as JPEG, rescaled, recoloured, turned grayscale or recropped (so the detected face box
and the crop move by a few percent) differs by 0-6 bits; the photo rotated by 5 degrees differs by
8-12, by 10 degrees 12-18, mirrored 20-34; unrelated images differ by ~32 (half the bits). 7 drops
the first kind and keeps the second: a photo turned by a few degrees is a different training
image. The hash is taken of the prepared image (after orientation, conversion and crop),
because that is what training sees: two sources that yield the same training image add weight,
not information.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import imagehash
from PIL import Image

NEAR_DUPLICATE_MAX_DISTANCE = 7


def perceptual_hash(image: Image.Image) -> str:
    """The image's 64-bit pHash as 16 hex digits."""
    return str(imagehash.phash(image))


def hash_distance(first: str, second: str) -> int:
    """Number of differing bits between two hex pHashes."""
    return (int(first, 16) ^ int(second, 16)).bit_count()


@dataclass(frozen=True)
class HashedImage:
    """One candidate: its key, pHash, and how much we prefer keeping it (higher wins)."""

    key: str
    phash: str
    preference: tuple[int, ...]


@dataclass(frozen=True)
class Duplicate:
    """``key`` is dropped as a near-duplicate of the kept image ``kept_key``."""

    key: str
    kept_key: str
    distance: int


def find_near_duplicates(
    images: Sequence[HashedImage], max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE
) -> list[Duplicate]:
    """Which images to drop so that no two kept images are within ``max_distance`` bits.

    Images are considered in order of preference (then key, for a stable result); each is kept
    unless it is within ``max_distance`` of an already kept image, in which case it is reported
    as a duplicate of the closest one.
    """
    ordered = sorted(images, key=lambda item: (tuple(-value for value in item.preference), item.key))
    kept: list[HashedImage] = []
    duplicates: list[Duplicate] = []
    for candidate in ordered:
        distances = [(hash_distance(candidate.phash, other.phash), other.key) for other in kept]
        nearest = min(distances, default=None)
        if nearest is not None and nearest[0] <= max_distance:
            duplicates.append(Duplicate(candidate.key, nearest[1], nearest[0]))
        else:
            kept.append(candidate)
    return duplicates
