"""The Stable Diffusion CLIP tokenizer, built offline.

Every SD text encoder uses OpenAI CLIP's byte-level BPE (49,408 tokens). Its merge list ships
inside the ``openai-clip`` package as ``clip/bpe_simple_vocab_16e6.txt.gz``; the vocabulary is
derived from it the way CLIP's ``SimpleTokenizer`` defines it, and both are handed to
transformers' ``CLIPTokenizer``. The file is located through package metadata without
importing ``clip`` (which would import torch and torchvision).

SD1 (OpenAI CLIP) pads with ``<|endoftext|>``; SD2 and SDXL's second encoder (OpenCLIP) pad
with ``!`` (id 0). The padding changes the embeddings the UNet sees, so it follows the model.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

from loralab.errors import CheckpointError

MAX_LENGTH = 77  # CLIP's context length, for every SD text encoder
_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 lines of the file as merges (the first line is a header).
_NUM_MERGES = 49152 - 256 - 2
_START, _END, _OPENCLIP_PAD = "<|startoftext|>", "<|endoftext|>", "!"


def _bpe_file() -> Path:
    """Path of the CLIP merge list inside the installed ``openai-clip`` distribution."""
    try:
        dist = importlib.metadata.distribution("openai-clip")
        for file in dist.files or ():
            if file.name == _VOCAB_FILE:
                return Path(str(dist.locate_file(file)))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("clip")  # finds the package directory without running it
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / _VOCAB_FILE
            if candidate.is_file():
                return candidate
    raise CheckpointError(
        "the CLIP vocabulary is missing: install the 'openai-clip' package, or pass a tokenizer folder"
    )


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable character per byte value, in byte-table order.

    Printable Latin-1 bytes stand for themselves; the other bytes are moved past 255 so that
    no token contains whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(moved))]


@lru_cache(maxsize=1)
def _clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(token -> id, merges) exactly as CLIP's SimpleTokenizer builds them."""
    lines = gzip.decompress(_bpe_file().read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES])
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [_START, _END]
    return {token: index for index, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def load_clip_tokenizer(path: Path | str | None = None, *, pad_with_eos: bool | None = None) -> CLIPTokenizer:
    """The SD CLIP tokenizer: built from the bundled vocabulary, or loaded from a local folder.

    ``path``: a tokenizer folder (vocab.json + merges.txt, or tokenizer.json), e.g. a diffusers
    model's ``tokenizer/``. ``pad_with_eos``: True pads with ``<|endoftext|>`` (SD1, SDXL's
    first encoder), False with ``!`` (SD2, SDXL's second encoder); None keeps the folder's own
    choice, or pads with ``<|endoftext|>`` for the built-in vocabulary.
    Raises ``CheckpointError`` if the folder cannot be read.
    """
    if path is None:
        vocab, merges = _clip_vocabulary()
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH)
    else:
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"tokenizer folder not found: {folder}")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"cannot load a CLIP tokenizer from {folder}: {first[:160]}") from None
        if tokenizer.model_max_length > MAX_LENGTH:  # folders without a max length get "unlimited"
            tokenizer.model_max_length = MAX_LENGTH
    if pad_with_eos is not None:
        tokenizer.pad_token = _END if pad_with_eos else _OPENCLIP_PAD
    return tokenizer
