"""The built-in scores: identity (likeness, face-found rate, trigger leak) and CLIP (prompt
adherence, diversity).

- **likeness**: mean cosine similarity between the face embedding of each generated image with
  the trigger and the centroid (normalised mean) of the training images' face embeddings. Only
  images where a face is found count; how many had one is the face-found rate.
- **face_found_rate**: share of the images with the trigger in which a face is found (0-1).
- **trigger_leak**: likeness of the images generated *without* the trigger; it should stay low
  (a LoRA that paints the person into every prompt has overfitted its class word).
- **prompt_adherence**: CLIP score of the images with the trigger against their own prompts,
  ``100 x max(cosine, 0)`` averaged (the scale torchmetrics' CLIPScore uses).
- **diversity**: ``1 - mean pairwise cosine similarity`` of the CLIP image embeddings of the
  images with the trigger, within each (eval checkpoint, prompt set, LoRA weight) group, then
  averaged over groups: images of one prompt set that all look alike are a sign of overfitting.
  Groups keep one checkpoint's style from counting as diversity against another's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loralab.sweep.scoring.base import EvalImage, FileCache, SavePointImages, ScoreUnavailable
from loralab.sweep.scoring.clip_model import ClipEmbedder
from loralab.sweep.scoring.face_model import FaceEmbedder


class IdentityScores:
    """Likeness, face-found rate and trigger leak from one face embedder."""

    def __init__(self, embedder: FaceEmbedder) -> None:
        self.embedder = embedder
        self._centroids: dict[tuple[Path, ...], np.ndarray] = {}

    def centroid(self, images: SavePointImages) -> np.ndarray:
        """The unit mean face embedding of the training images (computed once per image set)."""
        reference = images.reference_images
        if not reference:
            raise ScoreUnavailable(images.reference_problem or "no training images to compare with")
        if reference not in self._centroids:
            embeddings = [e for e in (self.embedder.embed_file(path) for path in reference) if e is not None]
            if not embeddings:
                raise ScoreUnavailable(f"no face found in any of the {len(reference)} training images")
            mean = np.mean(embeddings, axis=0)
            self._centroids[reference] = mean / max(float(np.linalg.norm(mean)), 1e-12)
        return self._centroids[reference]

    def _similarity(self, generated: Sequence[EvalImage], images: SavePointImages, what: str) -> float:
        if not generated:
            raise ScoreUnavailable(f"no evaluation images {what}")
        centroid = self.centroid(images)
        faces = [e for e in (self.embedder.embed_file(image.path) for image in generated) if e is not None]
        if not faces:
            raise ScoreUnavailable(f"no face found in any of the {len(generated)} images {what}")
        return float(np.mean(np.stack(faces) @ centroid))

    def likeness(self, images: SavePointImages) -> float:
        return self._similarity(images.with_trigger, images, "with the trigger")

    def trigger_leak(self, images: SavePointImages) -> float:
        return self._similarity(images.without_trigger, images, "without the trigger")

    def face_found_rate(self, images: SavePointImages) -> float:
        generated = images.with_trigger
        if not generated:
            raise ScoreUnavailable("no evaluation images with the trigger")
        found = sum(self.embedder.embed_file(image.path) is not None for image in generated)
        return found / len(generated)


class ClipScores:
    """Prompt adherence and diversity from one CLIP model."""

    def __init__(self, embedder: ClipEmbedder) -> None:
        self.embedder = embedder
        self._cache = FileCache()

    def _image_embeddings(self, generated: Sequence[EvalImage]) -> np.ndarray:
        return np.stack([self._cache.get(image.path, self._embed_one) for image in generated])

    def _embed_one(self, path: Path) -> np.ndarray:
        return self.embedder.embed_images([path])[0]

    def prompt_adherence(self, images: SavePointImages) -> float:
        generated = images.with_trigger
        if not generated:
            raise ScoreUnavailable("no evaluation images with the trigger")
        image_embeddings = self._image_embeddings(generated)
        text_embeddings = self.embedder.embed_texts([image.prompt for image in generated])
        cosine = np.sum(image_embeddings * text_embeddings, axis=1)
        return float(np.mean(100.0 * np.maximum(cosine, 0.0)))

    def diversity(self, images: SavePointImages) -> float:
        groups: dict[tuple[str, str, float], list[EvalImage]] = defaultdict(list)
        for image in images.with_trigger:
            groups[(image.checkpoint, image.prompt_set, image.lora_weight)].append(image)
        similarities = [
            mean_pairwise_similarity(self._image_embeddings(group)) for group in groups.values() if len(group) > 1
        ]
        if not similarities:
            raise ScoreUnavailable("fewer than 2 images with the trigger per checkpoint and prompt set")
        return 1.0 - float(np.mean(similarities))


def mean_pairwise_similarity(embeddings: np.ndarray) -> float:
    """Mean cosine similarity over all pairs ``i < j`` of unit-length rows."""
    count = len(embeddings)
    gram = embeddings @ embeddings.T
    return float(gram[np.triu_indices(count, k=1)].mean())
