"""Reading a sweep's evaluation indexes and finding a run's training images.

Layout (the sweep's agreed on-disk layout)::

    SWEEP_DIR/eval/<run name>/<save point>/index.json
    SWEEP_DIR/eval/baseline_models/<checkpoint label>/index.json   (images without any LoRA)

Each index is a list of ``{"image", "checkpoint", "prompt_set", "prompt", "seed",
"lora_weight", "trigger"}``. ``image`` is a relative PNG path: relative to the index's own
folder, or (if no such file exists there) to the sweep folder.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from loralab.errors import DatasetError
from loralab.sweep.layout import INDEX_FILE, RUNS_DIR, eval_dir
from loralab.sweep.scoring.base import EvalImage, ScoringError

_FIELDS = ("image", "checkpoint", "prompt_set", "prompt", "seed", "lora_weight", "trigger")


def save_point_index_path(sweep_dir: Path, run: str, save_point: str) -> Path:
    """``eval/<run>/<save point>/index.json`` (``run`` may be ``baseline_models``)."""
    return eval_dir(sweep_dir, run, save_point) / INDEX_FILE


def read_eval_index(index_path: Path, sweep_dir: Path | None = None) -> tuple[EvalImage, ...]:
    """The entries of one eval ``index.json`` with image paths made absolute.

    Raises ScoringError when the file is not a list of entries with the agreed fields.
    """
    index_path = Path(index_path)
    try:
        entries = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ScoringError(f"cannot read evaluation index {index_path}: {exc}") from None
    if not isinstance(entries, list):
        raise ScoringError(f"evaluation index {index_path} is not a JSON list of images; re-run the evaluation")
    return tuple(_entry(entry, number, index_path, sweep_dir) for number, entry in enumerate(entries))


def _entry(entry: Any, number: int, index_path: Path, sweep_dir: Path | None) -> EvalImage:
    missing = [name for name in _FIELDS if not isinstance(entry, dict) or name not in entry]
    if missing:
        raise ScoringError(
            f"entry {number} of {index_path} lacks {', '.join(missing)}; re-run the evaluation of that save point"
        )
    try:
        return EvalImage(
            path=_resolve_image(str(entry["image"]), index_path, sweep_dir),
            checkpoint=str(entry["checkpoint"]),
            prompt_set=str(entry["prompt_set"]),
            prompt=str(entry["prompt"]),
            seed=int(entry["seed"]),
            lora_weight=float(entry["lora_weight"]),
            trigger=bool(entry["trigger"]),
        )
    except (TypeError, ValueError) as exc:
        raise ScoringError(f"entry {number} of {index_path} has a bad value ({exc}); re-run the evaluation") from None


def _resolve_image(relative: str, index_path: Path, sweep_dir: Path | None) -> Path:
    beside_index = index_path.parent / relative
    if beside_index.exists() or sweep_dir is None:
        return beside_index
    from_sweep = Path(sweep_dir) / relative
    return from_sweep if from_sweep.exists() else beside_index


def read_run_config_values(run_dir: Path) -> dict[str, Any]:
    """The raw key/values of a run's ``config.toml`` (empty when the run has none yet).

    Read as plain TOML, not validated: the report compares what each run was given.
    """
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScoringError(f"cannot read {path}: {exc}") from None


def training_images(sweep_dir: Path, run: str) -> tuple[tuple[Path, ...], str | None]:
    """The training images of ``run`` (from its config's ``train_data_dir``), or () and why not."""
    config = read_run_config_values(Path(sweep_dir) / RUNS_DIR / run)
    train_dir = config.get("train_data_dir")
    if not train_dir:
        return (), f"run {run} has no train_data_dir in runs/{run}/config.toml"
    from loralab.data.discovery import discover_dataset  # reads image headers only

    try:
        dataset = discover_dataset(Path(train_dir), None, str(config.get("caption_extension", ".caption")))
    except DatasetError as exc:
        return (), f"training images of {run} not readable: {exc}"
    return tuple(entry.path for subset in dataset.train for entry in subset.images), None
