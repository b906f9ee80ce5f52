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
    :data:`MAX_FACE_OFFSET` of the crop's side.
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
    crop_w, crop_h = _integer_size(crop_height * aspect, crop_height, image_size)
    # The crop centre sits below the face centre by FACE_ABOVE_CENTRE (< MAX_FACE_OFFSET), then
    # the crop is slid back inside the photo; the limits above guarantee the offset stays small.
    left = _clamp(round(centre_x - crop_w / 2), 0, width - crop_w)
    top = _clamp(round(centre_y + FACE_ABOVE_CENTRE * crop_h - crop_h / 2), 0, height - crop_h)
    return Box(left, top, left + crop_w, top + crop_h)


def centre_crop(image_size: Size, aspect: float) -> Box:
    """The largest crop of aspect ratio ``aspect`` centred in the photo."""
    width, height = image_size
    crop_height = min(height, width / aspect)
    crop_w, crop_h = _integer_size(crop_height * aspect, crop_height, image_size)
    left = (width - crop_w) // 2
    top = (height - crop_h) // 2
    return Box(left, top, left + crop_w, top + crop_h)


def face_offset(crop: Box, face: Box) -> tuple[float, float]:
    """How far the face centre is from the crop centre, as fractions of the crop's width/height."""
    crop_x, crop_y = crop.centre
    face_x, face_y = face.centre
    return abs(face_x - crop_x) / crop.width, abs(face_y - crop_y) / crop.height


def downscale_to_fit(size: Size, target: Size) -> Size:
    """``size`` scaled down (never up) to fit inside ``target``, keeping its aspect ratio."""
    width, height = size
    scale = min(1.0, target[0] / width, target[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


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
