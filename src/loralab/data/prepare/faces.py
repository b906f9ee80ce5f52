"""Find faces in a photo, offline and on the CPU, with OpenCV's Haar cascades.

Why Haar cascades: the detector has to ship inside a PyPI package and run without downloads.
``opencv-python-headless`` 4.x carries its cascade XML files (``cv2.data.haarcascades``; 5.0
dropped them, hence the pin). OpenCV's better YuNet detector needs an ONNX model the wheel does
not include, and dlib's models (``face_recognition_models``) need dlib built from source. For
the portraits a LoRA dataset holds (one person, face towards the camera), the frontal cascade is
reliable; a profile cascade (run on the image and its mirror, since it only knows left-facing
profiles) catches turned heads when no frontal face is found.

Detection runs on a copy reduced to :data:`DETECTION_MAX_SIDE` pixels: cascades find faces of
any size at that scale, and a 12 MP photo would otherwise cost seconds.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from loralab.data.prepare.box import Box
from loralab.errors import LoralabError

DETECTION_MAX_SIDE = 640
# alt2 gives fewer false positives on textured backgrounds than the "default" cascade.
FRONTAL_CASCADE = "haarcascade_frontalface_alt2.xml"
PROFILE_CASCADE = "haarcascade_profileface.xml"
# Faces smaller than this fraction of the shorter side cannot fill a head-and-shoulders crop of
# a useful size, and tiny detections in textures are the cascades' typical false positives.
MIN_FACE_FRACTION = 0.05
_MIN_FACE_PIXELS = 20  # the cascades' own 20x20 / 24x24 training windows
_SCALE_FACTOR = 1.1
_MIN_NEIGHBOURS = 5


class FaceDetectorUnavailable(LoralabError):
    """The OpenCV install carries no Haar cascades (for example OpenCV 5)."""


@lru_cache(maxsize=None)
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
    """Faces in ``image`` as boxes in its pixel coordinates, largest first."""
    width, height = image.size
    scale = min(1.0, DETECTION_MAX_SIDE / max(width, height))
    if scale < 1.0:
        small = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR, reducing_gap=2.0)
    else:
        small = image
    # No histogram equalisation: on our checks (the astronaut tilted, mirrored, rescaled, darkened
    # and brightened) it lost faces and added false positives rather than finding more.
    gray = np.asarray(small.convert("L"))
    min_face = max(_MIN_FACE_PIXELS, round(MIN_FACE_FRACTION * min(gray.shape)))
    boxes = _run(FRONTAL_CASCADE, gray, min_face)
    if not boxes:
        boxes = _run(PROFILE_CASCADE, gray, min_face)
        mirrored = _run(PROFILE_CASCADE, np.ascontiguousarray(gray[:, ::-1]), min_face)
        gray_width = gray.shape[1]
        boxes += [Box(gray_width - b.right, b.top, gray_width - b.left, b.bottom) for b in mirrored]
    boxes = [_clip(box.scaled(1.0 / scale), width, height) for box in boxes]
    return sorted(boxes, key=lambda box: box.area, reverse=True)


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
