"""CLIP image and text embeddings from a local model folder (transformers ``CLIPModel``).

The folder is what ``CLIPModel.save_pretrained`` writes (``config.json`` + weights), e.g. a
downloaded ``openai/clip-vit-large-patch14``. It is loaded with ``local_files_only``: nothing
is fetched. Its tokenizer files are used when present, else the SD CLIP tokenizer built from
the bundled vocabulary (the same BPE vocabulary every OpenAI CLIP uses).

Images are preprocessed here, not with ``CLIPProcessor`` (whose fast image path needs
torchvision): resize the shorter side to the model's size (bicubic), centre-crop a square,
scale to 0-1 and normalise with the folder's ``preprocessor_config.json`` mean and std, or
CLIP's own when the folder has none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from loralab.sweep.scoring.base import ScoringError

# OpenAI CLIP's normalisation (its preprocessing constants, used when the folder states none).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_TOKENIZER_FILES = ("vocab.json", "tokenizer.json")
_BATCH = 16


def plain_prompt_text(prompt: str) -> str:
    """The words of an A1111 prompt as CLIP should read them: no ``<lora:..>`` tags, no weights."""
    from loralab.sample.prompt_syntax import BREAK, PromptSyntaxError, extract_lora_tags, parse_prompt_attention

    try:
        text, _ = extract_lora_tags(prompt)
        pieces = parse_prompt_attention(text)
    except PromptSyntaxError:
        return prompt
    # BREAK only ends a 75-token chunk; as words it is a gap between the texts either side.
    words = "".join(" " if (text, weight) == BREAK else text for text, weight in pieces)
    return " ".join(words.split())


class ClipEmbedder:
    """Unit-length CLIP embeddings of images and prompts.

    Raises ScoringError when the folder is missing or holds no loadable CLIP model.
    """

    def __init__(self, folder: Path | str, *, device: str = "cpu") -> None:
        import torch
        from transformers import CLIPModel

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise ScoringError(
                f"no CLIP model in {self.folder} (no config.json); give a folder saved by CLIPModel.save_pretrained"
            )
        try:
            self.model = CLIPModel.from_pretrained(str(self.folder), local_files_only=True).eval().to(device)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ScoringError(f"cannot load a CLIP model from {self.folder}: {first[:200]}") from None
        self.device = device
        self._torch = torch
        self.tokenizer = _load_tokenizer(self.folder)
        if len(self.tokenizer) > self.model.config.text_config.vocab_size:
            raise ScoringError(
                f"the CLIP model in {self.folder} has {self.model.config.text_config.vocab_size} text tokens but its "
                f"tokenizer {len(self.tokenizer)}; add the model's own tokenizer files to the folder"
            )
        self.size, self.crop, self.mean, self.std = _image_settings(
            self.folder, self.model.config.vision_config.image_size
        )

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """``3 x crop x crop`` float32: the image as the model's vision tower expects it."""
        image = image.convert("RGB")
        scale = self.size / min(image.size)
        resized = image.resize(
            (max(self.crop, round(image.width * scale)), max(self.crop, round(image.height * scale))),
            Image.Resampling.BICUBIC,
        )
        left, top = (resized.width - self.crop) // 2, (resized.height - self.crop) // 2
        pixels = np.asarray(resized.crop((left, top, left + self.crop, top + self.crop)), dtype=np.float32) / 255.0
        return ((pixels - self.mean) / self.std).transpose(2, 0, 1)

    def embed_images(self, paths: list[Path]) -> np.ndarray:
        """``len(paths) x D`` unit image embeddings."""
        chunks = []
        for start in range(0, len(paths), _BATCH):
            batch = []
            for path in paths[start : start + _BATCH]:
                with Image.open(path) as image:
                    batch.append(self.pixel_values(image))
            tensor = self._torch.from_numpy(np.stack(batch)).to(self.device)
            with self._torch.no_grad():
                chunks.append(_unit(self.model.get_image_features(pixel_values=tensor)))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.model.config.projection_dim), np.float32)

    def embed_texts(self, prompts: list[str]) -> np.ndarray:
        """``len(prompts) x D`` unit text embeddings (prompts cut at CLIP's 77 tokens)."""
        chunks = []
        for start in range(0, len(prompts), _BATCH):
            texts = [plain_prompt_text(prompt) for prompt in prompts[start : start + _BATCH]]
            tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            with self._torch.no_grad():
                features = self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
            chunks.append(_unit(features))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.model.config.projection_dim), np.float32)


def _unit(features: Any) -> np.ndarray:
    # transformers 5 may return a model output instead of a tensor: its pooled projection is the feature.
    if not hasattr(features, "float"):
        features = features.pooler_output
    array = features.float().cpu().numpy()
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


def _load_tokenizer(folder: Path):  # -> CLIPTokenizer
    from loralab.errors import CheckpointError
    from loralab.models.tokenizer import load_clip_tokenizer

    try:
        if any((folder / name).is_file() for name in _TOKENIZER_FILES):
            return load_clip_tokenizer(folder)
        return load_clip_tokenizer()
    except CheckpointError as exc:
        raise ScoringError(str(exc)) from None


def _image_settings(folder: Path, image_size: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(resize size, crop size, mean, std) from ``preprocessor_config.json``, else CLIP's defaults."""
    settings: dict[str, Any] = {}
    path = folder / "preprocessor_config.json"
    if path.is_file():
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ScoringError(f"cannot read {path}: {exc}") from None
    size = settings.get("size", image_size)
    size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
    crop = settings.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    mean = np.asarray(settings.get("image_mean", CLIP_MEAN), dtype=np.float32)
    std = np.asarray(settings.get("image_std", CLIP_STD), dtype=np.float32)
    return int(size), int(crop), mean, std
