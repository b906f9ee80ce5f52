"""Text-encoder outputs per caption, cached for runs that do not train the text encoders.

When only the UNet's LoRA trains (``network_train_unet_only``, the usual SDXL setting) and
captions do not change between epochs, the frozen encoders give the same output for a caption
every time; encoding each caption once saves their forward pass on every step (SDXL's second
encoder is 700M parameters).

**Key.** SHA-256 of: the caption text, the family, the identity of every text encoder (a digest
of its weights, memoised by the file it was loaded from as for the VAE, see
:func:`~loralab.data.latent_cache.weights_identity`) and tokenizer (its full serialised
vocabulary, merges and special tokens), the effective ``clip_skip`` and ``max_token_length``.
A cache without a ``root`` (memory only) identifies its encoders and tokenizers by the live
objects instead: its keys never leave the process, and hashing the weights would cost seconds.
The output is what :func:`~loralab.train.conditioning.encode_text` returns for that caption, so
a hit equals encoding it again.

Entries live in memory for the cache's lifetime and, when a ``root`` is given, on disk under
``<root>/text/<2 hex>/<key>.safetensors`` (atomic writes), so the runs of a sweep share them.

Encoding is done under ``torch.no_grad()`` in the encoders' own dtype; the caller casts to its
compute dtype (``encode(..., dtype=)``). Captions that vary per epoch (shuffle, dropout) make
caching wrong; the config refuses that combination (``cache_text_encoder_outputs``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loralab.data.latent_cache import read_safetensors, sha256_json, weights_identity, write_safetensors_atomic
from loralab.models.family import ModelFamily
from loralab.train.conditioning import (
    TextConditioning,
    effective_clip_skip,
    encode_text,
    normalize_max_token_length,
    tokenize_captions,
)

CACHE_FORMAT_VERSION = 1


def tokenizer_identity(tokenizer: Any) -> str:
    """SHA-256 of everything that decides a tokenizer's ids: vocabulary, merges, special tokens,
    padding token and maximum length."""
    hasher = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialised = json.loads(backend.to_str())
        # Padding and truncation are per-call settings that each call leaves behind on the
        # backend; tokenize_captions passes its own, so they are not part of the identity.
        serialised.pop("padding", None)
        serialised.pop("truncation", None)
        hasher.update(sha256_json(serialised).encode())
    else:  # a slow tokenizer: its vocabulary (merges are not exposed uniformly)
        hasher.update(sha256_json(sorted(tokenizer.get_vocab().items())).encode())
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.model_max_length]
    hasher.update(sha256_json([type(tokenizer).__name__, *specials]).encode())
    return hasher.hexdigest()


def _in_process_identities(objects: Sequence[Any]) -> list[str]:
    """Identities valid while ``objects`` are alive: their ``id``s plus this process's id.

    A cache without a ``root`` keeps entries only in its own memory and holds its encoders and
    tokenizers, so their ids cannot be reused while its keys are in use; hashing the encoders'
    weights (hundreds of MB) for such a cache would only cost start-up time.
    """
    return [f"process {os.getpid()} object {id(item)}" for item in objects]


class TextEncoderCache:
    """Encodes captions with frozen text encoders, each distinct caption once.

    Build it with :meth:`from_components` and call :meth:`encode` with a batch's captions.
    ``encoded`` counts the captions that went through the encoders (hits do not).
    """

    def __init__(
        self,
        family: ModelFamily,
        text_encoders: Sequence[Any],
        tokenizers: Sequence[Any],
        *,
        clip_skip: int | None = None,
        max_token_length: int | None = None,
        root: Path | str | None = None,
        source: Path | str | None = None,
    ) -> None:
        self.family = family
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.clip_skip = effective_clip_skip(family, clip_skip)
        self.max_token_length = normalize_max_token_length(max_token_length)
        self.root = Path(root) if root is not None else None
        if self.root is None:
            encoder_ids = _in_process_identities(self.text_encoders)
            tokenizer_ids = _in_process_identities(self.tokenizers)
        else:
            encoder_ids = [
                weights_identity(encoder, self.root, source=source, component=f"text_encoder_{index}")
                for index, encoder in enumerate(self.text_encoders)
            ]
            tokenizer_ids = [tokenizer_identity(t) for t in self.tokenizers]
        self.identity = sha256_json(
            {
                "format": CACHE_FORMAT_VERSION,
                "family": family.value,
                "encoders": encoder_ids,
                "tokenizers": tokenizer_ids,
                "clip_skip": self.clip_skip,
                "max_token_length": self.max_token_length,
            }
        )
        self._memory: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.encoded = 0

    @classmethod
    def from_components(
        cls,
        components: Any,
        *,
        clip_skip: int | None = None,
        max_token_length: int | None = None,
        root: Path | str | None = None,
    ) -> TextEncoderCache:
        """A cache for a loaded model's encoders (``StableDiffusionComponents``)."""
        return cls(
            components.family,
            components.text_encoders,
            components.tokenizers,
            clip_skip=clip_skip,
            max_token_length=max_token_length,
            root=root,
            source=components.source,
        )

    def key_for(self, caption: str) -> str:
        return sha256_json({"identity": self.identity, "caption": caption})

    def _path(self, key: str) -> Path | None:
        return None if self.root is None else self.root / "text" / key[:2] / f"{key}.safetensors"

    def _lookup(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if key in self._memory:
            return self._memory[key]
        path = self._path(key)
        if path is None:
            return None
        names = ("hidden", "pooled") if self.family is ModelFamily.SDXL else ("hidden",)
        tensors = read_safetensors(path, names)
        if tensors is None:
            return None
        entry = (tensors["hidden"], tensors.get("pooled"))
        self._memory[key] = entry
        return entry

    def _encode_missing(self, captions: list[str], keys: list[str]) -> None:
        ids = [tokenize_captions(tokenizer, captions, self.max_token_length) for tokenizer in self.tokenizers]
        with torch.no_grad():
            output = encode_text(
                self.family,
                self.text_encoders,
                ids,
                eos_token_ids=[t.eos_token_id for t in self.tokenizers],
                clip_skip=self.clip_skip,
            )
        self.encoded += len(captions)
        for row, (caption, key) in enumerate(zip(captions, keys)):
            hidden = output.encoder_hidden_states[row].detach().cpu()
            pooled = output.pooled[row].detach().cpu() if output.pooled is not None else None
            self._memory[key] = (hidden, pooled)
            path = self._path(key)
            if path is not None:
                tensors = {"hidden": hidden} if pooled is None else {"hidden": hidden, "pooled": pooled}
                metadata = {"format": f"loralab-text-{CACHE_FORMAT_VERSION}", "caption": caption, "identity": self.identity}
                write_safetensors_atomic(path, tensors, metadata)

    def encode(self, captions: Sequence[str], *, dtype: torch.dtype | None = None) -> TextConditioning:
        """Conditioning for ``captions``, as ``encode_text`` would give, on the encoders' device."""
        if not captions:
            raise ValueError("encode needs at least one caption")
        keys = [self.key_for(caption) for caption in captions]
        missing: dict[str, str] = {}
        for caption, key in zip(captions, keys):
            if key not in missing and self._lookup(key) is None:
                missing[key] = caption
        if missing:
            self._encode_missing(list(missing.values()), list(missing))
        device = next(self.text_encoders[0].parameters()).device
        entries = [self._memory[key] for key in keys]
        hidden = torch.stack([h for h, _ in entries]).to(device)
        pooled = torch.stack([p for _, p in entries]).to(device) if entries[0][1] is not None else None
        if dtype is not None:
            hidden = hidden.to(dtype)
            pooled = pooled.to(dtype) if pooled is not None else None
        return TextConditioning(encoder_hidden_states=hidden, pooled=pooled)
