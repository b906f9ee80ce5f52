"""How much an image looks like the toy subject (a magenta ring with a yellow dot), from 0 to 1.

A person asked "is this the blh ring?" looks for the magenta colour first, then for a ring
(magenta all round, a hole in the middle), then for the yellow dot inside. The score asks
the same questions of the image, in that order, with fixed colour rules and geometry (no
learned features, so it means the same for every model and every run):

1. The image is box-filtered to 32 x 32 px (what the toy model draws).
2. **Magenta map**: per pixel, ``clip((min(R, B) - G - 0.15) / 0.3, 0, 1)`` (RGB in 0-1): 1 for
   the subject's magenta, 0 for the world's seven colours, gray and the sky. Isolated magenta
   pixels (noise, the thin seam where red meets blue) do not count: a pixel keeps its value
   only where most of its 3 x 3 neighbourhood is magenta too.
3. **Presence** (0-1): the magenta share of the image, 0 below 1 %, 1 from 4 % (the smallest
   subject in the toy photos covers about 6 %), and falling to 0 as magenta fills more than
   60 % of the image (a magenta wall is not a ring).
4. **Ring** (0-1): around the magenta centroid, with ``R`` the mean distance of magenta from
   it, ``hole`` says the disc of radius ``0.5 R`` is clear of magenta compared with the band
   ``0.7-1.3 R``, and ``coverage`` says all eight sectors around the centre hold magenta (a
   ring, not a crescent or two blobs). Ring = hole x coverage.
5. **Dot** (0-1): the yellow map (``clip((min(R, G) - B - 0.4) / 0.25, 0, 1)``, the dot's yellow,
   not orange) averaged within ``0.4 R`` of the centre, minus its average in the band
   ``1.4-2 R`` outside the ring (a yellow background is not a dot), over 0.5.

``score = presence x (0.3 + 0.35 x ring + 0.35 x dot)``: a magenta blob is 0.3, a magenta
ring 0.65, the subject 1; anything without the subject's magenta is 0, because its colour is
what tells this ring from the ordinary rings of the world (a ring of another colour with a
dot is another ring, as another face with the same haircut is another person).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

ANALYSIS_SIZE = 32
_SECTORS = 8


@dataclass(frozen=True)
class Likeness:
    """The score and the parts it is made of (all 0-1)."""

    score: float
    presence: float
    ring: float
    dot: float


def _as_rgb01(image: Image.Image | np.ndarray) -> np.ndarray:
    """(32, 32, 3) float RGB in 0-1 from a PIL image or an (H, W, 3) uint8 array."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (ANALYSIS_SIZE, ANALYSIS_SIZE):
        image = image.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32) / 255.0


def _ramp(values: np.ndarray | float, low: float, high: float) -> np.ndarray:
    """0 at ``low``, 1 at ``high``, linear between (``high < low`` ramps down)."""
    return np.clip((np.asarray(values, dtype=np.float32) - low) / (high - low), 0.0, 1.0) + 0.0  # no -0.0


def _box3(values: np.ndarray) -> np.ndarray:
    """Mean over each pixel's 3 x 3 neighbourhood (edges padded by repetition)."""
    padded = np.pad(values, 1, mode="edge")
    h, w = values.shape
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0


def magenta_map(rgb: np.ndarray) -> np.ndarray:
    """How magenta each pixel is (0-1), before the neighbourhood rule."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return _ramp(np.minimum(r, b) - g, 0.15, 0.45)


def yellow_map(rgb: np.ndarray) -> np.ndarray:
    """How much each pixel is the dot's yellow (0-1); orange and white are not."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return _ramp(np.minimum(r, g) - b, 0.4, 0.65)


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    return float(values[mask].mean()) if mask.any() else 0.0


def likeness_details(image: Image.Image | np.ndarray) -> Likeness:
    """The likeness of one image to the subject, with its parts (see the module docstring)."""
    rgb = _as_rgb01(image)
    magenta = magenta_map(rgb)
    magenta = magenta * _ramp(_box3(magenta), 0.25, 0.6)  # only coherent magenta regions count
    mass = float(magenta.sum())
    share = mass / magenta.size
    presence = float(_ramp(share, 0.01, 0.04) * _ramp(share, 0.6, 0.4))
    if presence == 0.0:
        return Likeness(0.0, 0.0, 0.0, 0.0)

    ys, xs = np.mgrid[0:ANALYSIS_SIZE, 0:ANALYSIS_SIZE].astype(np.float32) + 0.5
    cx, cy = float((magenta * xs).sum() / mass), float((magenta * ys).sum() / mass)
    dx, dy = xs - cx, ys - cy
    distance = np.hypot(dx, dy)
    radius = float((magenta * distance).sum() / mass)
    # The hole test needs a few pixels inside the ring; below that the blob is too small to tell.
    centre = distance < max(0.5 * radius, 1.0)
    band = (distance >= 0.7 * radius) & (distance <= 1.3 * radius)
    band_density = _masked_mean(magenta, band)
    hole = float(_ramp(_masked_mean(magenta, centre) / max(band_density, 1e-6), 1.0, 0.0))

    sector = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * _SECTORS).astype(np.int64) % _SECTORS
    sector_mass = np.bincount(sector.ravel(), weights=magenta.ravel(), minlength=_SECTORS)
    coverage = float(_ramp(sector_mass / (0.5 * mass / _SECTORS), 0.0, 1.0).mean())
    ring = hole * coverage

    yellow = yellow_map(rgb)
    inside = _masked_mean(yellow, distance < max(0.4 * radius, 1.0))
    outside = _masked_mean(yellow, (distance >= 1.4 * radius) & (distance <= 2.0 * radius))
    dot = float(_ramp(inside - outside, 0.0, 0.5))

    score = presence * (0.3 + 0.35 * ring + 0.35 * dot)
    return Likeness(float(score), presence, float(ring), dot)


def likeness(image: Image.Image | np.ndarray) -> float:
    """Likeness of one image to the toy subject, 0 (not it) to 1 (clearly it)."""
    return likeness_details(image).score


def mean_likeness(images: Iterable[Image.Image | np.ndarray]) -> float:
    """Average likeness over images (0 for none)."""
    scores = [likeness(image) for image in images]
    return float(np.mean(scores)) if scores else 0.0


def colour_share(image: Image.Image | np.ndarray, rgb: tuple[int, int, int], tolerance: float = 70.0) -> float:
    """Share of pixels (at 32 x 32) within ``tolerance`` (RGB distance, 0-255 scale) of ``rgb``.

    A plain measure of whether an image follows a prompt's colour words ("a red circle" should
    have more red than "a blue square").
    """
    rgb01 = _as_rgb01(image)
    distance = np.linalg.norm(rgb01 * 255.0 - np.asarray(rgb, dtype=np.float32), axis=-1)
    return float((distance <= tolerance).mean())
