"""Choose the crop rectangle for a photo: around the largest face, or the centre.

A LoRA of a person learns the face from head-and-shoulders framing. The face crop therefore
makes the crop's shorter side :data:`HEAD_AND_SHOULDERS` times the face box (a Haar box spans
roughly brows to chin, so ~2.8x takes in hair, neck and shoulders), places the face a little above
the centre (:data:`FACE_ABOVE_CENTRE`, room for the shoulders), and shrinks the crop when the
photo's edge would otherwise push the face more than :data:`MAX_FACE_OFFSET` of the side away
from the centre. A crop that keeps the face centred always contains the whole face box, because
the box lies inside the photo.

All functions work on sizes and boxes only; nothing here touches pixels.
"""

from __future__ import annotations

import math

from loralab.data.prepare.box import Box

Size = tuple[int, int]  # (width, height)

HEAD_AND_SHOULDERS = 2.8
FACE_ABOVE_CENTRE = 0.04
# Below the 10% the dataset checks promise, leaving room for detector jitter on the output.
MAX_FACE_OFFSET = 0.07


def face_crop(image_size: Size, face: Box, aspect: float) -> Box:
    """Crop of aspect ratio ``aspect`` (width / height) framing ``face`` head-and-shoulders.

    The crop is as large as :data:`HEAD_AND_SHOULDERS` asks, but never larger than the photo,
    and never so large that the photo's edges force the face off-centre by more than
    :data:`MAX_FACE_OFFSET` of the crop's side. A square crop always achieves both; a crop of
    another aspect ratio beside an edge may not, and then keeps the whole face, off-centre.
    """
    width, height = image_size
    centre_x, centre_y = face.centre
    # Largest crop height for which the face can stay within MAX_FACE_OFFSET of the centre: when
    # the crop is clamped at an edge, its centre sits half a side from that edge.
    slack = 0.5 - MAX_FACE_OFFSET
    limits = [
        height,
        width / aspect,
        min(centre_y, height - centre_y) / slack,
        min(centre_x, width - centre_x) / slack / aspect,
    ]
    wanted_short_side = HEAD_AND_SHOULDERS * max(face.width, face.height)
    wanted_height = wanted_short_side if aspect >= 1 else wanted_short_side / aspect
    crop_height = min(wanted_height, *limits)
    # A whole face matters more than a centred one: a wide crop beside the photo's left or right
    # edge (or a tall one near the top or bottom) can be too short for the face while staying
    # centred; then it takes the face's size and lets the face sit off-centre.
    needed_height = max(face.height, face.width / aspect)
    if crop_height < needed_height:
        crop_height = min(math.ceil(needed_height), height, width / aspect)
    crop_w, crop_h = _integer_size(crop_height * aspect, crop_height, image_size)
    # The crop centre sits below the face centre by FACE_ABOVE_CENTRE (< MAX_FACE_OFFSET), then
    # the crop is slid to keep the whole face and stay inside the photo; the limits above
    # guarantee the face stays near the centre.
    left = _place(centre_x - crop_w / 2, crop_w, face.left, face.right, width)
    top = _place(centre_y + FACE_ABOVE_CENTRE * crop_h - crop_h / 2, crop_h, face.top, face.bottom, height)
    return Box(left, top, left + crop_w, top + crop_h)


def _place(wanted_start: float, length: int, face_start: int, face_end: int, image_length: int) -> int:
    """Start of a crop span near ``wanted_start`` that covers the face span and fits the image."""
    low = max(0, min(face_start, face_end - length))
    high = min(image_length - length, max(face_start, face_end - length))
    return _clamp(round(wanted_start), low, max(low, high))


def centre_crop(image_size: Size, aspect: float) -> Box:
    """The largest crop of aspect ratio ``aspect`` centred in the photo."""
    width, height = image_size
    crop_height = min(height, width / aspect)
    crop_w, crop_h = _integer_size(crop_height * aspect, crop_height, image_size)
    left = (width - crop_w) // 2
    top = (height - crop_h) // 2
    return Box(left, top, left + crop_w, top + crop_h)


def downscale_to_area(size: Size, max_area: int) -> Size:
    """``size`` scaled down (never up) to at most ``max_area`` pixels, keeping its aspect ratio."""
    width, height = size
    scale = min(1.0, math.sqrt(max_area / (width * height)))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _integer_size(crop_width: float, crop_height: float, image_size: Size) -> Size:
    return (
        _clamp(round(crop_width), 1, image_size[0]),
        _clamp(round(crop_height), 1, image_size[1]),
    )


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))
