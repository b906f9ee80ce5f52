"""Find LoRA files by the names prompts use, as A1111 finds them in its Lora folder.

A name (``<lora:blh_final_rv20 (8):0.9>``, ``--lora blh:0.8``) is resolved in this order: an existing
file path; then, in the LoRA folder and its subfolders, a file whose path relative to the folder
without ``.safetensors`` is the name (``people/blh``), then one whose file name without extension
is the name, then the same ignoring case, then one whose ``ss_output_name`` metadata is the name
(A1111's "alias from file"). Two files that match equally make the name ambiguous; no match is an
error that suggests close names. Files are read once (``read_lora_file``) and kept.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path

from loralab.errors import LoraFileError
from loralab.network.lora_file import LoraFile, read_lora_file
from loralab.sample.hashes import lora_short_hash, safetensors_metadata

LORA_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA to apply to one image: its file, the name it was asked for by, and its strengths."""

    path: Path
    name: str  # as the prompt or option named it (infotext and "Lora hashes" use it)
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    in_prompt: bool = False  # came from a <lora:...> tag (else from an option: written into infotext as a tag)

    @property
    def tag(self) -> str:
        te, unet = f"{self.te_multiplier:g}", f"{self.unet_multiplier:g}"
        return f"<lora:{self.name}:{te}>" if te == unet else f"<lora:{self.name}:{te}:{unet}>"


def parse_lora_option(text: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` -> (file or name, weight); a colon is only a weight separator before a number."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(weight):
            raise LoraFileError(f"LoRA weight {tail!r} in {text!r} must be a finite number, e.g. 0.8")
        return head, weight
    return text, 1.0


class LoraLibrary:
    """LoRA files by name in ``folder`` (optional: without it only paths resolve), read once each."""

    def __init__(self, folder: Path | str | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None and not self.folder.is_dir():
            raise LoraFileError(f"LoRA folder not found: {self.folder}")
        self._files: list[Path] | None = None
        self._read: dict[Path, LoraFile] = {}

    def files(self) -> list[Path]:
        """Every ``.safetensors`` file under the folder, sorted."""
        if self._files is None:
            self._files = (
                sorted(p for p in self.folder.rglob(f"*{LORA_SUFFIX}") if p.is_file()) if self.folder else []
            )
        return self._files

    def resolve(self, name: str) -> Path:
        """The file for ``name`` (rules in the module docstring). Raises ``LoraFileError``."""
        direct = Path(name).expanduser()
        if direct.is_file():
            return direct
        if self.folder is None:
            raise LoraFileError(f"LoRA {name!r} is not a file; pass its path or the folder it is in with --lora-dir")
        key = name.removesuffix(LORA_SUFFIX)
        files = self.files()
        relative = {p: p.relative_to(self.folder).with_suffix("").as_posix() for p in files}
        rules = (
            lambda p: relative[p] == key,
            lambda p: p.stem == key,
            lambda p: p.stem.lower() == key.lower(),
            lambda p: safetensors_metadata(p).get("ss_output_name") == key,  # read only if the others fail
        )
        for rule in rules:
            matches = [p for p in files if rule(p)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                listed = ", ".join(relative[p] for p in matches[:4])
                raise LoraFileError(f"LoRA name {name!r} is ambiguous in {self.folder} ({listed}); use the sub-path")
        close = difflib.get_close_matches(key, sorted({p.stem for p in files}), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(files)} LoRA files there)"
        raise LoraFileError(f"LoRA {name!r} not found in {self.folder}{hint}")

    def read(self, path: Path) -> LoraFile:
        """The LoRA file at ``path``, read on first use. Raises ``LoraFileError``."""
        key = path.resolve()
        if key not in self._read:
            self._read[key] = read_lora_file(path)
        return self._read[key]

    @staticmethod
    def short_hash(path: Path) -> str:
        return lora_short_hash(path)
