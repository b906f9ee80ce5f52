"""Scores for a sweep's evaluation images: likeness, face-found rate, trigger leak, prompt
adherence and diversity, plus any named callable a caller adds.

Typical use (the sweep runner after evaluating a save point)::

    scorers = build_scorers(ScoringSettings(face_model=Path("arcface.onnx"), clip_model=None))
    scores = score_save_point(sweep_dir, "network_dim-64", "e000002", scorers)
    scores.values     # {"likeness": 0.41, "face_found_rate": 1.0, "trigger_leak": 0.08}
    scores.missing    # {"prompt_adherence": "no CLIP model given (...)", "diversity": "..."}
"""

from loralab.sweep.scoring.base import EvalImage, SavePointImages, ScoreFunction, ScoreUnavailable, ScoringError
from loralab.sweep.scoring.registry import (
    BUILTIN_SCORES,
    Scorer,
    ScorerRegistry,
    ScoringSettings,
    build_scorers,
    higher_is_better,
    per_image_mean,
)
from loralab.sweep.scoring.save_points import (
    SavePointScores,
    compute_scores,
    read_scores,
    score_save_point,
    score_sweep,
    scores_path,
)

__all__ = [
    "BUILTIN_SCORES",
    "EvalImage",
    "SavePointImages",
    "SavePointScores",
    "ScoreFunction",
    "ScoreUnavailable",
    "Scorer",
    "ScorerRegistry",
    "ScoringError",
    "ScoringSettings",
    "build_scorers",
    "compute_scores",
    "higher_is_better",
    "per_image_mean",
    "read_scores",
    "score_save_point",
    "score_sweep",
    "scores_path",
]
