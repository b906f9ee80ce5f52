"""Writing files so that a reader never sees half of one: temporary name, then rename."""

from __future__ import annotations

import os
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside ``path``, unique to this process (workers may write the same file)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    temporary = temporary_sibling(path)
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
