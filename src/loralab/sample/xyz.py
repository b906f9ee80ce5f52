"""X/Y/Z plots: one setting per axis, a labelled grid per Z value, every cell saved and indexed.

Axes are written ``KIND=V1,V2,...`` (values read as CSV, so a value with a comma is quoted):

================  ===========================================================================
kind              values
================  ===========================================================================
``checkpoint``    checkpoint files or folders
``lora``          LoRA files or names (``name:0.8`` sets its weight); ``none`` = no LoRA
``lora_weight``   strengths for the LoRAs given with ``--lora`` or the ``lora`` axis; ``none``
                  = no LoRA (a baseline row, as A1111 issue #14806 asks for)
``cfg``           CFG scales
``sampler``       sampler names (A1111 or kohya)
``steps``         step counts
``seed``          seeds
``prompt``        Prompt S/R: the first value is searched for, each value replaces it in the
                  prompt and negative prompt (the first cell keeps the prompt as it is)
``clip_skip``     clip skip values
``size``          ``WxH`` sizes
================  ===========================================================================

A1111's names work too (``CFG Scale``, ``Checkpoint name``, ``Prompt S/R``). Every cell is the
template with its axis values set, expanded with the template's seed (unless a seed axis sets
it). The engine renders cells checkpoint by checkpoint, so each checkpoint loads once. Output:
``xyz-<z>-<y>-<x>.png`` per cell (with its PNG info), ``grid.png`` (or ``grid-<z>.png`` per Z
value) with the labels, and ``index.json`` listing the axes, grids and each cell's file, labels
and parameters.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from loralab.errors import LoralabError
from loralab.sample.generator import GeneratedImage, GenerationEngine, ImageRequest
from loralab.sample.grids import draw_grid
from loralab.sample.lora_library import parse_lora_option
from loralab.sample.png_info import save_png
from loralab.sample.request_plan import RequestTemplate, expand_template
from loralab.sample.samplers import resolve_sampler
from loralab.sample.wildcards import Wildcards


class AxisError(LoralabError):
    """An X/Y/Z axis that cannot be read."""


# kind -> label shown on the grid
AXIS_LABELS = {
    "checkpoint": "Checkpoint",
    "lora": "LoRA",
    "lora_weight": "LoRA weight",
    "cfg": "CFG",
    "sampler": "Sampler",
    "steps": "Steps",
    "seed": "Seed",
    "prompt": "Prompt",
    "clip_skip": "Clip skip",
    "size": "Size",
}
_ALIASES = {
    "checkpoint name": "checkpoint", "model": "checkpoint", "cfg scale": "cfg", "cfg_scale": "cfg",
    "prompt s/r": "prompt", "prompt_sr": "prompt", "clip skip": "clip_skip", "lora weight": "lora_weight",
    "weight": "lora_weight", "seeds": "seed",
}  # fmt: skip
NONE_VALUE = "none"


@dataclass(frozen=True)
class Axis:
    """One axis: a kind (``AXIS_LABELS``' keys) and its values as written."""

    kind: str
    values: tuple[str, ...]

    def label(self, index: int) -> str:
        value = self.values[index]
        if self.kind == "checkpoint":
            value = Path(value).stem if value.endswith((".safetensors", ".ckpt")) else Path(value).name
        elif self.kind == "lora":
            name, weight = parse_lora_option(value)
            value = Path(name).stem if name.endswith(".safetensors") else name
            value += f" ({weight:g})" if ":" in self.values[index] else ""
        return f"{AXIS_LABELS[self.kind]}: {value}"


def parse_axis(text: str) -> Axis:
    """``KIND=V1,V2,...`` -> :class:`Axis`. Raises ``AxisError`` for an unknown kind or no values."""
    kind, sep, values_text = text.partition("=")
    key = kind.strip().lower()
    key = _ALIASES.get(key, key)
    if not sep or key not in AXIS_LABELS:
        raise AxisError(f"axis {text!r} must be KIND=V1,V2,... with KIND one of {', '.join(AXIS_LABELS)}")
    values = tuple(v.strip() for row in csv.reader([values_text], skipinitialspace=True) for v in row if v.strip())
    if not values:
        raise AxisError(f"axis {text!r} has no values")
    axis = Axis(key, values)
    _check_values(axis)
    return axis


def _check_values(axis: Axis) -> None:
    """Catch what needs no model: unknown samplers, non-numbers (before anything loads)."""
    for value in axis.values:
        if axis.kind == "sampler":
            resolve_sampler(value)
        numeric = {"cfg": float, "steps": int, "seed": int, "clip_skip": int, "lora_weight": float}.get(axis.kind)
        if numeric and not (axis.kind == "lora_weight" and value.lower() == NONE_VALUE):
            try:
                numeric(value)
            except ValueError:
                raise AxisError(f"{AXIS_LABELS[axis.kind]} axis value {value!r} is not a number") from None


def _with_value(template: RequestTemplate, axis: Axis, index: int) -> tuple[RequestTemplate, int | None]:
    """The template with ``axis``'s value ``index`` set; the seed when the axis sets it."""
    value = axis.values[index]
    kind = axis.kind
    if kind == "checkpoint":
        return replace(template, checkpoints=(value,)), None
    if kind == "lora":
        if value.lower() == NONE_VALUE:
            return replace(template, loras=()), None
        name, weight = parse_lora_option(value)
        if ":" not in value and template.loras:  # keep the weight the template gave its LoRA
            weight = parse_lora_option(template.loras[0])[1]
        return replace(template, loras=(f"{name}:{weight:g}",)), None
    if kind == "lora_weight":
        if value.lower() == NONE_VALUE:
            return replace(template, loras=()), None
        if not template.loras:
            raise AxisError("a lora_weight axis needs LoRAs to weigh: give --lora or a lora axis")
        return replace(template, loras=tuple(f"{parse_lora_option(o)[0]}:{value}" for o in template.loras)), None
    if kind == "prompt":
        search = axis.values[0]
        if search not in template.prompt and search not in template.negative_prompt:
            raise AxisError(f"Prompt S/R: {search!r} is not in the prompt or the negative prompt")
        return (
            replace(
                template,
                prompt=template.prompt.replace(search, value),
                negative_prompt=template.negative_prompt.replace(search, value),
            ),
            None,
        )
    if kind == "seed":
        return template, int(value)
    field_name = {"cfg": "cfg_scale", "sampler": "sampler", "steps": "steps", "clip_skip": "clip_skip", "size": "size"}
    return replace(template, **{field_name[kind]: value}), None


@dataclass(frozen=True)
class XyzCell:
    """One cell: its position, axis labels and request."""

    x: int
    y: int
    z: int
    labels: tuple[str, ...]
    request: ImageRequest

    @property
    def file_name(self) -> str:
        return f"xyz-{self.z:02d}-{self.y:02d}-{self.x:02d}.png"


# Axes are applied in this order whatever their position, so a lora_weight axis weighs the
# LoRA a lora axis chose.
_APPLY_ORDER = ("checkpoint", "lora", "lora_weight", "prompt", "sampler", "cfg", "steps", "clip_skip", "size", "seed")


def plan_xyz(
    template: RequestTemplate, axes: Sequence[Axis | None], seed: int, wildcards: Wildcards
) -> list[XyzCell]:
    """Every cell of the X/Y/Z plot (``axes`` = x, y, z; None or missing axes have one cell).

    Raises ``AxisError`` when an axis does not fit the template (a missing S/R term, two axes of one kind).
    """
    x_axis, y_axis, z_axis = (list(axes) + [None, None, None])[:3]
    present = [axis for axis in (x_axis, y_axis, z_axis) if axis is not None]
    kinds = [axis.kind for axis in present]
    if len(set(kinds)) != len(kinds):
        raise AxisError(f"two axes of the same kind ({', '.join(kinds)}); use one axis per setting")
    if len(template.checkpoints) != 1 and "checkpoint" not in kinds:
        raise AxisError("an X/Y/Z plot takes one --checkpoint, or a checkpoint axis")
    cells = []
    sizes = [len(axis.values) if axis else 1 for axis in (x_axis, y_axis, z_axis)]
    for z in range(sizes[2]):
        for y in range(sizes[1]):
            for x in range(sizes[0]):
                positions = {id(a): i for a, i in ((x_axis, x), (y_axis, y), (z_axis, z)) if a is not None}
                cell_template, cell_seed = template, seed
                for axis in sorted(present, key=lambda a: _APPLY_ORDER.index(a.kind)):
                    cell_template, axis_seed = _with_value(cell_template, axis, positions[id(axis)])
                    cell_seed = axis_seed if axis_seed is not None else cell_seed
                labels = tuple(axis.label(positions[id(axis)]) for axis in present)
                request = expand_template(cell_template, cell_template.checkpoints[0], cell_seed, wildcards)
                cells.append(XyzCell(x, y, z, labels, request))
    return cells


@dataclass
class XyzResult:
    """What a plot wrote: grid images (one per Z value), the index, and every cell's image."""

    grids: list[Path]
    index: Path
    images: list[GeneratedImage]


def render_xyz(
    engine: GenerationEngine,
    cells: Sequence[XyzCell],
    axes: Sequence[Axis | None],
    out_dir: Path | str,
    *,
    batch_size: int = 1,
) -> XyzResult:
    """Render ``cells`` (each checkpoint loaded once), save each cell, one labelled grid per Z value,
    and ``index.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x_axis, y_axis, z_axis = (list(axes) + [None, None, None])[:3]
    images = engine.generate([cell.request for cell in cells], batch_size=batch_size)
    for cell, image in zip(cells, images):
        image.save(out_dir / cell.file_name)

    grids = []
    depth = len(z_axis.values) if z_axis else 1
    rows = len(y_axis.values) if y_axis else 1
    columns = len(x_axis.values) if x_axis else 1
    by_position = {(c.z, c.y, c.x): image.image for c, image in zip(cells, images)}
    for z in range(depth):
        grid_cells: list[list[Image.Image | None]] = [
            [by_position.get((z, y, x)) for x in range(columns)] for y in range(rows)
        ]
        grid, _ = draw_grid(
            grid_cells,
            column_labels=[x_axis.label(i) for i in range(columns)] if x_axis else (),
            row_labels=[y_axis.label(i) for i in range(rows)] if y_axis else (),
            title=z_axis.label(z) if z_axis else None,
        )
        path = out_dir / (f"grid-{z:02d}.png" if z_axis else "grid.png")
        save_png(grid, path)
        grids.append(path)

    index = out_dir / "index.json"
    _write_json(index, _index(cells, images, (x_axis, y_axis, z_axis), grids))
    return XyzResult(grids, index, images)


def _index(
    cells: Sequence[XyzCell], images: Sequence[GeneratedImage], axes: Sequence[Axis | None], grids: Sequence[Path]
) -> dict[str, Any]:
    return {
        "axes": {
            name: {"kind": axis.kind, "values": list(axis.values)}
            for name, axis in zip("xyz", axes)
            if axis is not None
        },
        "grids": [path.name for path in grids],
        "cells": [
            {
                "x": cell.x,
                "y": cell.y,
                "z": cell.z,
                "file": cell.file_name,
                "labels": list(cell.labels),
                "checkpoint": str(cell.request.checkpoint),
                "parameters": image.parameters.as_dict(),
            }
            for cell, image in zip(cells, images)
        ],
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
