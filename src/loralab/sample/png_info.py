"""A1111's ``parameters`` PNG text chunk: write it as A1111 does, and read it back.

The text is what A1111's PNG Info tab and civitai read::

    a photo of blh woman, beach <lora:blh:0.8>
    Negative prompt: easynegative
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768,
    Model hash: 15012c538f, Model: realisticVision, Lora hashes: "blh: 6a2c3f1e0b7d", Version: loralab 0.1.0

(the last line is one line). The prompt keeps its ``<lora:...>`` tags, which is how A1111 and civitai
find the LoRAs; ``Lora hashes`` lists each with its A1111 hash. A value holding ``,``, ``:`` or a line
break is written as a JSON string (A1111's quoting). Fields loralab does not write are kept
when parsing (``GenerationParameters.extra``), and A1111's older single-string sampler names
(``Sampler: DPM++ 2M Karras``) parse to the same sampler as the newer two fields.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from loralab.errors import LoralabError

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"

# A1111's infotext grammar: ``Key: value`` pairs, a value either a JSON string or anything up to a comma.
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


class InfotextError(LoralabError):
    """A ``parameters`` text that cannot be read back."""


def quote(value: Any) -> str:
    """A1111's quoting: plain text unless it holds a comma, colon or line break."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _number(value: float) -> str:
    return f"{value:g}"


def _pairs_text(pairs: dict[str, str]) -> str:
    # A1111 removes the separators from names so the list splits back unambiguously.
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {value}" for name, value in pairs.items())


def _parse_pairs(text: str) -> dict[str, str]:
    pairs = {}
    for item in text.split(","):
        name, sep, value = item.strip().rpartition(":")
        if sep:
            pairs[name.strip()] = value.strip()
    return pairs


@dataclass
class GenerationParameters:
    """The settings of one image, as A1111's infotext holds them."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    schedule_type: str | None = None
    cfg_scale: float = 7.0
    seed: int = 0
    width: int = 512
    height: int = 512
    model_hash: str | None = None
    model: str | None = None
    vae_hash: str | None = None
    vae: str | None = None
    clip_skip: int | None = None
    lora_hashes: dict[str, str] = field(default_factory=dict)
    ti_hashes: dict[str, str] = field(default_factory=dict)
    emphasis: str | None = None
    version: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # other fields, as read

    def fields_text(self) -> str:
        """The last line: ``Steps: 20, Sampler: ..., Version: ...`` in A1111's order."""
        values: dict[str, Any] = {
            "Steps": self.steps,
            "Sampler": self.sampler,
            "Schedule type": self.schedule_type,
            "CFG scale": _number(self.cfg_scale),
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash,
            "Model": self.model,
            "VAE hash": self.vae_hash,
            "VAE": self.vae,
            "Clip skip": self.clip_skip if self.clip_skip and self.clip_skip > 1 else None,
            "Lora hashes": _pairs_text(self.lora_hashes) if self.lora_hashes else None,
            "TI hashes": _pairs_text(self.ti_hashes) if self.ti_hashes else None,
            "Emphasis": self.emphasis,
            **self.extra,
            "Version": self.version,
        }
        return ", ".join(f"{key}: {quote(value)}" for key, value in values.items() if value is not None)

    def to_text(self) -> str:
        """The whole ``parameters`` text (prompt, negative prompt line, fields line)."""
        negative = f"\n{NEGATIVE_PREFIX} {self.negative_prompt}" if self.negative_prompt else ""
        return f"{self.prompt}{negative}\n{self.fields_text()}".strip()

    @classmethod
    def from_text(cls, text: str) -> GenerationParameters:
        """Parse an A1111 ``parameters`` text. Raises ``InfotextError`` for a bad number or size."""
        prompt, negative, raw = parse_infotext(text)
        known = {
            "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size-1", "Size-2", "Model hash",
            "Model", "VAE hash", "VAE", "Clip skip", "Lora hashes", "TI hashes", "Emphasis", "Version",
        }  # fmt: skip
        try:
            values: dict[str, Any] = {
                "prompt": prompt,
                "negative_prompt": negative,
                "steps": int(raw.get("Steps", cls.steps)),
                "sampler": raw.get("Sampler", cls.sampler),
                "schedule_type": raw.get("Schedule type"),
                "cfg_scale": float(raw.get("CFG scale", cls.cfg_scale)),
                "seed": int(raw.get("Seed", cls.seed)),
                "width": int(raw.get("Size-1", cls.width)),
                "height": int(raw.get("Size-2", cls.height)),
                "model_hash": raw.get("Model hash"),
                "model": raw.get("Model"),
                "vae_hash": raw.get("VAE hash"),
                "vae": raw.get("VAE"),
                "clip_skip": int(raw["Clip skip"]) if "Clip skip" in raw else None,
                "lora_hashes": _parse_pairs(raw.get("Lora hashes", "")),
                "ti_hashes": _parse_pairs(raw.get("TI hashes", "")),
                "emphasis": raw.get("Emphasis"),
                "version": raw.get("Version"),
                "extra": {key: value for key, value in raw.items() if key not in known},
            }
        except ValueError as exc:
            raise InfotextError(f"cannot read generation parameters: {exc}") from None
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (for grid indexes and reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) of an A1111 ``parameters`` text, read as A1111 reads it.

    The last line holds the fields when at least three ``Key: value`` pairs are found in it; a
    ``Size: WxH`` field becomes ``Size-1``/``Size-2``; quoted values are unquoted.
    """
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    raw: dict[str, str] = {}
    for key, value in _FIELD.findall(last):
        value = unquote(value.strip())
        size = _SIZE.match(value)
        if size:
            raw[f"{key}-1"], raw[f"{key}-2"] = size.group(1), size.group(2)
        else:
            raw[key] = value
    return "\n".join(prompt_lines), "\n".join(negative_lines), raw


def save_png(image: Image.Image, path: Path | str, parameters: str | None = None) -> Path:
    """Save ``image`` as PNG with A1111's ``parameters`` text chunk, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, parameters)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temp, format="PNG", pnginfo=info)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def read_png_parameters(path: Path | str) -> str | None:
    """The ``parameters`` text of a PNG (None when it has none)."""
    with Image.open(path) as image:
        image.load()
        return image.info.get(PARAMETERS_KEY)
