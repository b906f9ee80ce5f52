"""Toy likeness of a sweep's evaluation images, against the same prompts and seeds without a LoRA.

The sweep's score files hold one likeness per save point over every eval checkpoint; the demo's
claim is per checkpoint ("the LoRA draws the subject on a checkpoint it was not trained on too"),
so this module pairs each LoRA image with the base checkpoint's image of the same prompt and seed
and reports, per run x save point x checkpoint, the mean likeness with the trigger and without it,
each next to the checkpoint's own (no LoRA) mean.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from loralab.sweep.layout import BASELINE_MODELS, EVAL_DIR, INDEX_FILE, write_json
from loralab.sweep.scoring import ScorerRegistry, per_image_mean
from loralab.sweep.scoring.base import EvalImage
from loralab.sweep.scoring.eval_index import read_eval_index
from loralab.toy.likeness import likeness

GAINS_FILE = "likeness.json"
_Pairing = tuple[str, int, bool]  # prompt (as rendered), seed, trigger


def add_toy_scores(registry: ScorerRegistry) -> None:
    """Score the toy likeness as ``likeness`` and, without the trigger, as ``trigger_leak``."""
    registry.add("likeness", per_image_mean(likeness, trigger=True))
    registry.add("trigger_leak", per_image_mean(likeness, trigger=False))


@dataclass(frozen=True)
class LikenessGain:
    """One run's save point on one eval checkpoint: LoRA vs no LoRA, same prompts and seeds."""

    run: str
    save_point: str
    checkpoint: str
    with_trigger: float
    base_with_trigger: float
    without_trigger: float
    base_without_trigger: float
    images: int

    @property
    def gain(self) -> float:
        """How much more the subject shows with the trigger than on the checkpoint alone."""
        return self.with_trigger - self.base_with_trigger

    @property
    def leak(self) -> float:
        """How much more the subject shows without the trigger than on the checkpoint alone."""
        return self.without_trigger - self.base_without_trigger


def _scored(images: tuple[EvalImage, ...], cache: dict[Path, float]) -> dict[tuple[str, _Pairing], float]:
    scores = {}
    for image in images:
        if image.path not in cache:
            with Image.open(image.path) as opened:
                cache[image.path] = likeness(opened)
        scores[(image.checkpoint, (image.prompt, image.seed, image.trigger))] = cache[image.path]
    return scores


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def likeness_gains(sweep_dir: Path) -> list[LikenessGain]:
    """Every evaluated save point's likeness per checkpoint, paired with the checkpoint's own images.

    Only pairs with an image on both sides count (LoRA weight 1 and other weights alike).
    """
    eval_root = Path(sweep_dir) / EVAL_DIR
    cache: dict[Path, float] = {}
    base: dict[tuple[str, _Pairing], float] = {}
    for index in sorted((eval_root / BASELINE_MODELS).glob(f"*/{INDEX_FILE}")):
        base.update(_scored(read_eval_index(index, sweep_dir), cache))
    gains = []
    for index in sorted(eval_root.glob(f"*/*/{INDEX_FILE}")):
        run, save_point = index.parent.parent.name, index.parent.name
        if run == BASELINE_MODELS:
            continue
        groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for (checkpoint, pairing), value in _scored(read_eval_index(index, sweep_dir), cache).items():
            if (checkpoint, pairing) not in base:
                continue
            mode = "with" if pairing[2] else "without"
            groups[checkpoint][mode].append(value)
            groups[checkpoint][f"base_{mode}"].append(base[(checkpoint, pairing)])
        for checkpoint, values in sorted(groups.items()):
            gains.append(
                LikenessGain(
                    run, save_point, checkpoint,
                    _mean(values["with"]), _mean(values["base_with"]),
                    _mean(values["without"]), _mean(values["base_without"]),
                    len(values["with"]) + len(values["without"]),
                )
            )  # fmt: skip
    return gains


def write_gains(sweep_dir: Path, gains: list[LikenessGain], path: Path) -> None:
    """``path``: the gains as JSON (each with its gain and leak), written atomically."""
    rows: list[dict[str, Any]] = [{**asdict(g), "gain": g.gain, "leak": g.leak} for g in gains]
    # A checkpoint with no image pair of one kind has no mean: null, not NaN (JSON has no NaN).
    rows = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows]
    write_json(path, {"sweep": str(sweep_dir), "likeness": rows})


def format_gains(gains: list[LikenessGain]) -> str:
    """A plain-text table of the gains, one line per run x save point x checkpoint."""
    lines = [f"{'run':<24} {'save point':<10} {'checkpoint':<10} {'trigger':>16} {'no trigger':>16}"]
    for g in gains:
        lines.append(
            f"{g.run:<24} {g.save_point:<10} {g.checkpoint:<10} "
            f"{g.with_trigger:>6.2f} ({g.gain:+.2f}) {g.without_trigger:>9.2f} ({g.leak:+.2f})"
        )
    return "\n".join(lines)
