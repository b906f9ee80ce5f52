"""Find faces in a photo, offline and on the CPU, with OpenCV's Haar cascades.

Why Haar cascades: the detector has to ship inside a PyPI package and run without downloads.
``opencv-python-headless`` 4.x carries its cascade XML files (``cv2.data.haarcascades``; 5.0
dropped them, hence the pin). OpenCV's better YuNet detector needs an ONNX model the wheel does
not include, and dlib's models (``face_recognition_models``) need dlib built from source. For
the portraits a LoRA dataset holds (one person, face towards the camera), the frontal cascade is
reliable; a profile cascade (run on the image and its mirror, since it only knows left-facing
profiles) catches turned heads when no frontal face is found.

Detection runs on reduced copies (see :data:`DETECTION_FACE_PIXELS`): a 12 MP photo would
otherwise cost seconds.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from loralab.data.prepare.box import Box
from loralab.errors import LoralabError

# alt2 gives fewer false positives on textured backgrounds than the "default" cascade.
FRONTAL_CASCADE = "haarcascade_frontalface_alt2.xml"
PROFILE_CASCADE = "haarcascade_profileface.xml"
# Smallest face looked for, as a fraction of the photo's shorter side. The search runs coarse
# first: dataset portraits have faces of 8% of the side or more, and only photos without one pay
# for the fine pass down to 5%. Smaller faces cannot fill a head-and-shoulders crop of a useful
# size, and tiny detections in textures are the cascades' typical false positives.
COARSE_FACE_FRACTION = 0.08
MIN_FACE_FRACTION = 0.05
# Each pass runs on a copy scaled so that its smallest face measures this many pixels, just above
# the cascades' 20x20 / 24x24 windows: the cost of a cascade grows with the pixels it scans at
# every scale, and a larger copy would only spend them on faces too small to use.
DETECTION_FACE_PIXELS = 24
_SCALE_FACTOR = 1.1
_MIN_NEIGHBOURS = 5


class FaceDetectorUnavailable(LoralabError):
    """The OpenCV install carries no Haar cascades (for example OpenCV 5)."""


@cache
def _cascade(name: str) -> cv2.CascadeClassifier:
    # Loading parses a ~1 MB XML file; once per process is enough.
    path = Path(cv2.data.haarcascades) / name
    classifier = cv2.CascadeClassifier(str(path))
    if not path.is_file() or classifier.empty():
        raise FaceDetectorUnavailable(
            f"OpenCV {cv2.__version__} has no face cascade {name}; install "
            f"opencv-python-headless 4.x (e.g. 4.14.0.94) or run with --face-focus off"
        )
    return classifier


def detect_faces(image: Image.Image) -> list[Box]:
    """Faces in ``image`` as boxes in its pixel coordinates, largest first.

    Frontal faces, coarse then fine; profile faces (looking either way) only when no frontal
    face is found.
    """
    gray = _GrayPyramid(image)
    for fraction in (COARSE_FACE_FRACTION, MIN_FACE_FRACTION):
        boxes = gray.detect(FRONTAL_CASCADE, fraction)
        if boxes:
            break
    else:
        # Profiles at the coarse size only: a turned head is a close-up in a portrait dataset,
        # and these two passes are what photos without any face pay for.
        boxes = gray.detect(PROFILE_CASCADE, COARSE_FACE_FRACTION)
        boxes += gray.detect(PROFILE_CASCADE, COARSE_FACE_FRACTION, mirrored=True)
    return sorted(boxes, key=lambda box: box.area, reverse=True)


class _GrayPyramid:
    """Grayscale copies of one image at the scales the passes need, made once each."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        self.copies: dict[float, np.ndarray] = {}

    def detect(self, cascade_name: str, fraction: float, mirrored: bool = False) -> list[Box]:
        width, height = self.image.size
        min_face = fraction * min(width, height)
        scale = min(1.0, DETECTION_FACE_PIXELS / min_face)
        gray = self._copy(scale)
        if mirrored:
            gray = np.ascontiguousarray(gray[:, ::-1])
        side = max(DETECTION_FACE_PIXELS, round(min_face * scale))
        boxes = _run(cascade_name, gray, side)
        if mirrored:
            boxes = [Box(gray.shape[1] - b.right, b.top, gray.shape[1] - b.left, b.bottom) for b in boxes]
        return [_clip(box.scaled(1.0 / scale), width, height) for box in boxes]

    def _copy(self, scale: float) -> np.ndarray:
        if scale not in self.copies:
            image = self.image
            if scale < 1.0:
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
            # No histogram equalisation: on our checks (the astronaut tilted, mirrored, rescaled,
            # darkened and brightened) it lost faces and added false positives.
            self.copies[scale] = np.asarray(image.convert("L"))
        return self.copies[scale]


def _run(cascade_name: str, gray: np.ndarray, min_face: int) -> list[Box]:
    found = _cascade(cascade_name).detectMultiScale(
        gray, scaleFactor=_SCALE_FACTOR, minNeighbors=_MIN_NEIGHBOURS, minSize=(min_face, min_face)
    )
    return [Box.from_xywh(*map(int, row)) for row in found]


def _clip(box: Box, width: int, height: int) -> Box:
    return Box(max(0, box.left), max(0, box.top), min(width, box.right), min(height, box.bottom))


def limit_detector_threads() -> None:
    """Make OpenCV single-threaded in this process (each prepare worker is its own process)."""
    # Without this every worker starts one OpenCV thread per core and they fight over the CPUs.
    cv2.setNumThreads(1)
