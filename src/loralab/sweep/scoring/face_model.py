"""Face-identity embeddings from an ArcFace-style ONNX model, run with onnxruntime.

The model is the user's (for example insightface's ``w600k_r50.onnx`` / ``glintr100.onnx``
recognition model): input ``N x 3 x 112 x 112`` float (RGB, ``(pixel - 127.5) / 127.5``, the
normalisation insightface's ArcFace models expect), output ``N x D`` (512 for ArcFace). Models
whose batch size is fixed at 1 are run one face at a time.

Faces are found with loralab's OpenCV Haar cascade detector (:mod:`loralab.data.prepare.faces`),
the largest face per image. Without facial landmarks the face is not aligned the way ArcFace was
trained (a similarity transform onto five points); a square around the detected box, widened by
:data:`FACE_CROP_MARGIN`, is the closest plain crop. Scores from it compare variants with one
another fairly, but they are not comparable with numbers from aligned pipelines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from loralab.data.prepare.box import Box
from loralab.sweep.scoring.base import FileCache, ScoringError

# Haar boxes hug brows-to-mouth; ArcFace's aligned crops also show the forehead and chin.
FACE_CROP_MARGIN = 1.25
DEFAULT_FACE_SIZE = 112


def square_face_crop(image: Image.Image, box: Box, size: int) -> Image.Image:
    """A ``size`` x ``size`` RGB crop centred on ``box``, widened by :data:`FACE_CROP_MARGIN`.

    Parts of the square outside the image are black (Pillow's crop pads), as a detector's crop
    of a face at the border would be.
    """
    centre_x, centre_y = box.centre
    half = max(box.width, box.height) * FACE_CROP_MARGIN / 2
    square = (round(centre_x - half), round(centre_y - half), round(centre_x + half), round(centre_y + half))
    return image.convert("RGB").crop(square).resize((size, size), Image.Resampling.BILINEAR)


class FaceEmbedder:
    """Finds the largest face in an image and embeds it with an ONNX face-recognition model.

    Raises ScoringError when onnxruntime is missing or the file is not a model with an
    ``N x 3 x H x W`` image input and an ``N x D`` output.
    """

    def __init__(self, model_path: Path | str) -> None:
        self.model_path = Path(model_path)
        self._session = _open_session(self.model_path)
        model_input = self._session.get_inputs()[0]
        model_output = self._session.get_outputs()[0]
        shape = list(model_input.shape)
        if len(shape) != 4 or shape[1] not in (3, "3") or len(model_output.shape) != 2:
            raise ScoringError(
                f"{self.model_path} is not a face-identity model: it takes {shape} and returns "
                f"{list(model_output.shape)}, expected N x 3 x 112 x 112 -> N x 512 (an ArcFace ONNX file)"
            )
        self._input_name = model_input.name
        # A fixed batch dimension (an int) of 1 means one face per call; a named one, any batch.
        self._batch = shape[0] if isinstance(shape[0], int) else None
        self.face_size = shape[2] if isinstance(shape[2], int) else DEFAULT_FACE_SIZE
        # A 512-d embedding is 2 KiB: the default cache holds a save point's images and the
        # training set, so the likeness, face-rate and leak scores embed each image once.
        self._cache = FileCache()

    def face_tensor(self, face: Image.Image) -> np.ndarray:
        """``1 x 3 x S x S`` float32, RGB scaled to -1..1, from a face crop of ``S`` x ``S``."""
        pixels = np.asarray(face.convert("RGB"), dtype=np.float32)
        return ((pixels - 127.5) / 127.5).transpose(2, 0, 1)[None]

    def embed_faces(self, faces: list[Image.Image]) -> np.ndarray:
        """Unit-length embeddings (``len(faces) x D``) of face crops of the model's input size."""
        if not faces:
            return np.zeros((0, 0), dtype=np.float32)
        batch = np.concatenate([self.face_tensor(face) for face in faces])
        step = self._batch or len(faces)
        outputs = [
            self._session.run(None, {self._input_name: batch[start : start + step]})[0]
            for start in range(0, len(faces), step)
        ]
        embeddings = np.concatenate(outputs).astype(np.float32)
        return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)

    def embed_image(self, image: Image.Image) -> np.ndarray | None:
        """The unit embedding of the largest face in ``image``, or None when no face is found."""
        from loralab.data.prepare.faces import detect_faces

        faces = detect_faces(image)
        if not faces:
            return None
        return self.embed_faces([square_face_crop(image, faces[0], self.face_size)])[0]

    def embed_file(self, path: Path) -> np.ndarray | None:
        """:meth:`embed_image` of an image file, remembered per (path, modification time)."""
        return self._cache.get(Path(path), self._embed_path)

    def _embed_path(self, path: Path) -> np.ndarray | None:
        with Image.open(path) as image:
            return self.embed_image(image)


def _open_session(model_path: Path):  # -> onnxruntime.InferenceSession
    if not model_path.is_file():
        raise ScoringError(f"face-identity model not found: {model_path}; give the path of an ArcFace .onnx file")
    try:
        import onnxruntime
    except ImportError:
        raise ScoringError(
            "face-identity scoring needs onnxruntime; install it with: pip install 'loralab[scoring]'"
        ) from None
    # CUDA when this onnxruntime build has it, else the CPU; never a provider that would compile.
    providers = [
        name
        for name in ("CUDAExecutionProvider", "CPUExecutionProvider")
        if name in onnxruntime.get_available_providers()
    ]
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the user sees our one-line messages, not ORT's
    try:
        return onnxruntime.InferenceSession(str(model_path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for every kind of bad file
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ScoringError(
            f"cannot load face-identity model {model_path}: {first[:200]}; give the path of an ArcFace .onnx file"
        ) from None
