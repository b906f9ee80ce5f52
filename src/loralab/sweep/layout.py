"""The sweep folder on disk: where each part lives, run status files, and save points.

::

    SWEEP_DIR/
      sweep.toml                      the sweep file as run
      expanded.json                   the runs (see loralab.sweep.expand)
      evaluation.json                 the evaluation settings with every prompt resolved
      runs/<run>/                     a `loralab train` run directory, plus status.json
      eval/<run>/<save point>/index.json          images of a save point, and the PNGs beside it
      eval/baseline_models/<checkpoint>/index.json images without any LoRA
      scores/<run>/<save point>.json  (written by loralab.sweep.scoring)
      results.json, results.csv       one row per run and save point
      report/                         (written by the report)

Save points are labelled ``e000002`` (after epoch 2), ``step00000100`` (after step 100) and
``final``. Every file is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from loralab.config.loading import write_text_atomic
from loralab.train.save_names import LORA_SUFFIX, parse_lora_name

SWEEP_FILE = "sweep.toml"
EVALUATION_FILE = "evaluation.json"
RUNS_DIR = "runs"
EVAL_DIR = "eval"
SCORES_DIR = "scores"
BASELINE_MODELS = "baseline_models"
STATUS_FILE = "status.json"
INDEX_FILE = "index.json"
FINAL = "final"

RunState = Literal["complete", "failed", "running"]


def run_dir(sweep_dir: Path, name: str) -> Path:
    return Path(sweep_dir) / RUNS_DIR / name


def eval_dir(sweep_dir: Path, name: str, save_point: str) -> Path:
    """``eval/<run>/<save point>`` (``name`` = ``baseline_models``, ``save_point`` = a checkpoint label)."""
    return Path(sweep_dir) / EVAL_DIR / name / save_point


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text_atomic(Path(path), json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when there is no readable file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


# ---------------------------------------------------------------------------------------------
# Run status


@dataclass
class RunStatus:
    """``runs/<run>/status.json``: how a run stands. ``config_hash`` ties it to its settings;
    ``seconds_per_step`` (measured while training) feeds later time estimates."""

    state: RunState
    error: str | None = None
    wall_seconds: float = 0.0
    peak_memory_mb: float | None = None
    config_hash: str | None = None
    global_step: int | None = None
    seconds_per_step: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_status(directory: Path) -> RunStatus | None:
    """The status of the run in ``directory``, or None when it has none (never started here)."""
    data = read_json(Path(directory) / STATUS_FILE)
    if not isinstance(data, dict) or data.get("state") not in ("complete", "failed", "running"):
        return None
    known = {key: data.get(key) for key in RunStatus.__dataclass_fields__ if key in data}
    return RunStatus(**known)


def write_status(directory: Path, status: RunStatus) -> None:
    write_json(Path(directory) / STATUS_FILE, status.to_json())


# ---------------------------------------------------------------------------------------------
# Save points


@dataclass(frozen=True)
class SavePoint:
    """A LoRA file a run saved: its label, file, and the epoch or step it was saved after."""

    label: str
    path: Path
    epoch: int | None = None
    step: int | None = None

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: epochs and steps in training order, the final file last."""
        if self.label == FINAL:
            return (2, 0)
        return (0, self.epoch) if self.epoch is not None else (1, self.step or 0)


def save_points(directory: Path, output_name: str) -> list[SavePoint]:
    """The LoRA files ``output_name`` left in a run directory, in training order."""
    directory = Path(directory)
    points = []
    for path in directory.glob(f"{output_name}*{LORA_SUFFIX}"):
        name = parse_lora_name(output_name, path.name)
        if name is None:
            continue
        if name.epoch is not None:
            points.append(SavePoint(f"e{name.epoch:06d}", path, epoch=name.epoch))
        elif name.step is not None:
            points.append(SavePoint(f"step{name.step:08d}", path, step=name.step))
        else:
            points.append(SavePoint(FINAL, path))
    return sorted(points, key=lambda point: point.order)
