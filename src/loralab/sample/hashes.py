"""The file hashes A1111 writes into PNG info, so A1111 and civitai recognise the files used.

- Checkpoints and VAEs (``Model hash``, ``VAE hash``): the first 10 hex digits of the file's SHA-256.
- Textual-inversion embeddings (``TI hashes``): the first 12 hex digits of the file's SHA-256.
- LoRAs (``Lora hashes``): the first 12 hex digits of the "addnet" hash, the SHA-256 of a
  safetensors file *after* its header (so editing metadata does not change it). sd-scripts stores
  the same hash as ``sshs_model_hash`` in the file's metadata, and A1111 takes it from there when
  present; so do we.

Hashes are cached per file (path, size and modification time), so a checkpoint of several GB is
read once per process however many images name it.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

_BLOCK = 1 << 20
CHECKPOINT_HASH_DIGITS = 10
SHORT_HASH_DIGITS = 12


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=256)
def _sha256(key: tuple[str, int, int], after_header: bool) -> str:
    digest = hashlib.sha256()
    with open(key[0], "rb") as handle:
        if after_header:
            header_size = int.from_bytes(handle.read(8), "little")
            handle.seek(8 + header_size)
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path | str) -> str:
    """SHA-256 of the whole file (hex)."""
    return _sha256(_file_key(Path(path)), False)


def checkpoint_short_hash(path: Path | str) -> str | None:
    """A1111's ``Model hash``/``VAE hash`` of a single file; None for a folder (A1111 shows none)."""
    path = Path(path)
    if not path.is_file():
        return None
    return file_sha256(path)[:CHECKPOINT_HASH_DIGITS]


def embedding_short_hash(path: Path | str) -> str:
    """A1111's ``TI hashes`` entry of an embedding file."""
    return file_sha256(path)[:SHORT_HASH_DIGITS]


def safetensors_metadata(path: Path | str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its header alone ({} when unreadable)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if header_size > path.stat().st_size - 8:  # not a safetensors file (its first bytes are anything)
                return {}
            header = json.loads(handle.read(header_size))
    except (OSError, ValueError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {k: v for k, v in metadata.items() if isinstance(v, str)} if isinstance(metadata, dict) else {}


def lora_short_hash(path: Path | str) -> str:
    """A1111's ``Lora hashes`` entry of a LoRA file (addnet hash, 12 hex digits)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return file_sha256(path)[:SHORT_HASH_DIGITS]
    stored = safetensors_metadata(path).get("sshs_model_hash", "")
    full = stored if len(stored) == 64 else _sha256(_file_key(path), True)
    return full[:SHORT_HASH_DIGITS]


def clear_cache() -> None:
    """Forget cached hashes (for files rewritten in place with the same size and time)."""
    _sha256.cache_clear()


__all__ = [
    "checkpoint_short_hash",
    "clear_cache",
    "embedding_short_hash",
    "file_sha256",
    "lora_short_hash",
    "safetensors_metadata",
]
