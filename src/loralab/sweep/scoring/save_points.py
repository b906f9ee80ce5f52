"""Scoring a sweep's save points and keeping the results in ``scores/``.

``scores/<run>/<save point>.json`` (and ``scores/baseline_models/<checkpoint label>.json`` for
the eval checkpoints without a LoRA) holds ``{score name: value or null, "missing": {score name:
reason}, "inputs": {...}}``. ``inputs`` records what the scores were computed from (a hash of the
eval index and of the training-image list, and which scorers had models); a re-run with the same
inputs reuses the file, so re-running a sweep scores nothing new, while adding prompts or giving
a model later rescores.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.sweep.layout import BASELINE_MODELS, EVAL_DIR, INDEX_FILE, SCORES_DIR, read_json, write_json
from loralab.sweep.scoring.base import SavePointImages, ScoreUnavailable, ScoringError
from loralab.sweep.scoring.eval_index import read_eval_index, save_point_index_path, training_images
from loralab.sweep.scoring.registry import ScorerRegistry

# Keys of a score file that are not scores.
MISSING_KEY = "missing"
INPUTS_KEY = "inputs"
RESERVED_KEYS = frozenset({MISSING_KEY, INPUTS_KEY})


@dataclass(frozen=True)
class SavePointScores:
    """The scores of one save point: a value per computed score, a reason per missing one."""

    values: dict[str, float]
    missing: dict[str, str]
    inputs: dict[str, Any] | None = None  # what they were computed from (see the module docstring)

    def to_json(self) -> dict[str, Any]:
        """The score file's content (every name, null for the missing ones)."""
        data: dict[str, Any] = dict(self.values)
        data.update({name: None for name in self.missing})
        data[MISSING_KEY] = dict(self.missing)
        if self.inputs is not None:
            data[INPUTS_KEY] = self.inputs
        return data


def scores_path(sweep_dir: Path, run: str, save_point: str) -> Path:
    """``scores/<run>/<save point>.json``."""
    return Path(sweep_dir) / SCORES_DIR / run / f"{save_point}.json"


def read_scores(path: Path) -> SavePointScores | None:
    """A score file's scores, or None when there is none (or it is unreadable: it will be rewritten)."""
    data = read_json(Path(path))
    if not isinstance(data, dict):
        return None
    missing = {str(k): str(v) for k, v in (data.get(MISSING_KEY) or {}).items()}
    values = {
        name: float(value)
        for name, value in data.items()
        if name not in RESERVED_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    for name, value in data.items():  # null without a recorded reason still must not look like a value
        if name not in RESERVED_KEYS and value is None:
            missing.setdefault(name, "no value recorded")
    inputs = data.get(INPUTS_KEY)
    return SavePointScores(values, missing, inputs if isinstance(inputs, dict) else None)


def score_save_point(
    sweep_dir: Path,
    run: str,
    save_point: str,
    scorers: ScorerRegistry,
    *,
    reference_images: Sequence[Path] | None = None,
) -> SavePointScores:
    """Score the eval images of ``run`` at ``save_point`` and write ``scores/<run>/<save point>.json``.

    ``reference_images``: the identity's photos; by default the run's training images (for
    ``run == "baseline_models"``, those of the sweep's baseline run). When the score file already
    holds every available score of the same images, it is returned unchanged; scores it holds
    whose scorer is unavailable now are kept.

    Raises ScoringError when the save point has no eval index or the index is malformed.
    """
    sweep_dir = Path(sweep_dir)
    index_path = save_point_index_path(sweep_dir, run, save_point)
    if not index_path.is_file():
        raise ScoringError(
            f"no evaluation images for {run} at {save_point} ({index_path} is missing); evaluate it first"
        )
    if reference_images is None:
        references, problem = training_images(sweep_dir, reference_run(sweep_dir) if run == BASELINE_MODELS else run)
    else:
        references, problem = tuple(Path(p) for p in reference_images), None
    inputs: dict[str, Any] = {
        "index_sha256": hashlib.sha256(index_path.read_bytes()).hexdigest(),
        "reference_sha256": hashlib.sha256("\n".join(map(str, references)).encode()).hexdigest(),
    }
    out = scores_path(sweep_dir, run, save_point)
    cached = read_scores(out)
    # Values computed earlier from the same images stay valid; a scorer without its model this
    # time (a report run without --clip-model) must not erase what an earlier run computed.
    kept: dict[str, float] = {}
    if cached is not None and cached.inputs is not None and all(cached.inputs.get(k) == v for k, v in inputs.items()):
        done = set(cached.inputs.get("scorers") or [])
        if set(scorers.available) <= done and set(cached.values) | set(cached.missing) >= set(scorers.names):
            return cached
        kept = {name: value for name, value in cached.values.items() if name in done and name not in scorers.available}
    images = SavePointImages(read_eval_index(index_path, sweep_dir), tuple(references), problem)
    missing_files = [image.path for image in images.images if not image.path.is_file()]
    if missing_files:
        raise ScoringError(
            f"{len(missing_files)} evaluation image(s) of {run} at {save_point} are missing, e.g. {missing_files[0]}; "
            f"re-run the evaluation"
        )
    inputs["scorers"] = sorted(set(scorers.available) | set(kept))
    computed = compute_scores(images, scorers, inputs)
    scores = SavePointScores(
        {**computed.values, **kept}, {k: v for k, v in computed.missing.items() if k not in kept}, inputs
    )
    write_json(out, scores.to_json())
    return scores


def compute_scores(
    images: SavePointImages, scorers: ScorerRegistry, inputs: dict[str, Any] | None = None
) -> SavePointScores:
    """Every score of ``scorers`` on ``images`` (no files read or written beyond the images)."""
    values: dict[str, float] = {}
    missing: dict[str, str] = {}
    for scorer in scorers:
        if scorer.function is None:
            missing[scorer.name] = scorer.unavailable_reason or "not available"
            continue
        try:
            value = float(scorer.function(images))
        except ScoreUnavailable as exc:
            missing[scorer.name] = str(exc)
            continue
        if math.isfinite(value):
            values[scorer.name] = value
        else:
            missing[scorer.name] = f"the score came out as {value}"
    return SavePointScores(values, missing, inputs)


def score_sweep(sweep_dir: Path, scorers: ScorerRegistry) -> dict[tuple[str, str], SavePointScores]:
    """Score every evaluated save point of the sweep (and the eval checkpoints without a LoRA).

    Returns ``{(run, save point): scores}``; for the checkpoints without a LoRA the key is
    ``("baseline_models", checkpoint label)``. A save point that cannot be scored (a malformed
    index, images gone) does not stop the others; afterwards ScoringError names the first of them.
    """
    sweep_dir = Path(sweep_dir)
    results: dict[tuple[str, str], SavePointScores] = {}
    failures: list[str] = []
    for index in sorted((sweep_dir / EVAL_DIR).glob(f"*/*/{INDEX_FILE}")):
        run, save_point = index.parent.parent.name, index.parent.name
        try:
            results[(run, save_point)] = score_save_point(sweep_dir, run, save_point, scorers)
        except ScoringError as exc:
            failures.append(str(exc))
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ScoringError(f"{failures[0]}{more}")
    return results


def reference_run(sweep_dir: Path) -> str:
    """The run whose training images stand for the identity: the first baseline in ``expanded.json``.

    Raises SweepError when the sweep folder has no ``expanded.json``.
    """
    from loralab.sweep.expand import read_expanded

    runs = read_expanded(Path(sweep_dir))
    if not runs:
        raise ScoringError(f"{Path(sweep_dir) / 'expanded.json'} lists no runs; run 'loralab sweep' again")
    baselines = [run["name"] for run in runs if run.get("is_baseline")]
    return baselines[0] if baselines else runs[0]["name"]
