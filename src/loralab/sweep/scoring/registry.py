"""The scores a sweep computes, by name: built-in ones from user-supplied models, plus any
callable a caller adds (the toy world's likeness, a user's own metric).

A registry is an ordinary object built per sweep (:func:`build_scorers`), not a process-wide
table, so two sweeps in one process can score differently. Every built-in name is always
present: with its model it computes, without it the entry carries the reason it cannot, and
the score files and the report show that reason instead of a number.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from loralab.sweep.scoring.base import SavePointImages, ScoreFunction, ScoreUnavailable

LIKENESS = "likeness"
FACE_FOUND_RATE = "face_found_rate"
TRIGGER_LEAK = "trigger_leak"
PROMPT_ADHERENCE = "prompt_adherence"
DIVERSITY = "diversity"
BUILTIN_SCORES = (LIKENESS, FACE_FOUND_RATE, TRIGGER_LEAK, PROMPT_ADHERENCE, DIVERSITY)
# Which way is better, for the report's "best variant" (names not listed here: higher is better).
LOWER_IS_BETTER = frozenset({TRIGGER_LEAK})


def higher_is_better(name: str) -> bool:
    """Whether a larger value of score ``name`` is the better one."""
    return name not in LOWER_IS_BETTER


@dataclass(frozen=True)
class Scorer:
    """One named score: its function, or the reason it cannot be computed in this sweep."""

    name: str
    function: ScoreFunction | None
    unavailable_reason: str | None = None

    def __post_init__(self) -> None:
        if (self.function is None) == (self.unavailable_reason is None):
            raise ValueError("a scorer has either a function or the reason it has none")


class ScorerRegistry:
    """Named scores in the order they were added (the report's column order)."""

    def __init__(self) -> None:
        self._scorers: dict[str, Scorer] = {}

    def add(self, name: str, function: ScoreFunction) -> None:
        """Compute score ``name`` with ``function`` (replacing what the name had)."""
        if not name or name == "missing":
            raise ValueError(f"score name {name!r} is reserved or empty")
        self._scorers[name] = Scorer(name, function)

    def add_unavailable(self, name: str, reason: str) -> None:
        """List score ``name`` as missing in this sweep, for ``reason``."""
        self._scorers[name] = Scorer(name, None, reason)

    def __iter__(self) -> Iterator[Scorer]:
        return iter(self._scorers.values())

    def __contains__(self, name: object) -> bool:
        return name in self._scorers

    def __getitem__(self, name: str) -> Scorer:
        return self._scorers[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._scorers)

    @property
    def available(self) -> tuple[str, ...]:
        """Names that have a function (the ones a score file records as computed)."""
        return tuple(scorer.name for scorer in self if scorer.function is not None)


def per_image_mean(score_image: Callable[[Image.Image], float], *, trigger: bool) -> ScoreFunction:
    """A save-point score from a per-image score: its mean over the images with (or without) the trigger.

    For example the toy world's likeness: ``registry.add("likeness", per_image_mean(toy_score,
    trigger=True))`` and ``registry.add("trigger_leak", per_image_mean(toy_score, trigger=False))``.
    """
    what = "with" if trigger else "without"

    def score(images: SavePointImages) -> float:
        chosen = images.with_trigger if trigger else images.without_trigger
        if not chosen:
            raise ScoreUnavailable(f"no evaluation images {what} the trigger")
        values = []
        for image in chosen:
            with Image.open(image.path) as opened:
                values.append(float(score_image(opened)))
        return sum(values) / len(values)

    return score


@dataclass(frozen=True)
class ScoringSettings:
    """The user's scoring models; None leaves the scores that need them missing (with the reason)."""

    face_model: Path | None = None  # ArcFace-style .onnx (1x3x112x112 -> 1x512)
    clip_model: Path | None = None  # folder saved by transformers' CLIPModel.save_pretrained
    device: str = "cpu"  # for the CLIP model; onnxruntime picks CUDA itself when it has it


def build_scorers(settings: ScoringSettings) -> ScorerRegistry:
    """The built-in scores for ``settings``; add more with :meth:`ScorerRegistry.add`.

    Raises ScoringError when a given model cannot be loaded (missing file, wrong kind of model,
    onnxruntime not installed): a model the user asked for is an error, not a missing score.
    """
    from loralab.sweep.scoring.builtin import ClipScores, IdentityScores
    from loralab.sweep.scoring.clip_model import ClipEmbedder
    from loralab.sweep.scoring.face_model import FaceEmbedder

    registry = ScorerRegistry()
    if settings.face_model is not None:
        identity = IdentityScores(FaceEmbedder(settings.face_model))
        registry.add(LIKENESS, identity.likeness)
        registry.add(FACE_FOUND_RATE, identity.face_found_rate)
        registry.add(TRIGGER_LEAK, identity.trigger_leak)
    else:
        reason = (
            "no face-identity model given (set [scoring] face_model in the sweep file to an ArcFace .onnx file, "
            "or run loralab report --face-model)"
        )
        for name in (LIKENESS, FACE_FOUND_RATE, TRIGGER_LEAK):
            registry.add_unavailable(name, reason)
    if settings.clip_model is not None:
        clip = ClipScores(ClipEmbedder(settings.clip_model, device=settings.device))
        registry.add(PROMPT_ADHERENCE, clip.prompt_adherence)
        registry.add(DIVERSITY, clip.diversity)
    else:
        reason = (
            "no CLIP model given (set [scoring] clip_model in the sweep file to a local CLIP model folder, "
            "or run loralab report --clip-model)"
        )
        for name in (PROMPT_ADHERENCE, DIVERSITY):
            registry.add_unavailable(name, reason)
    return registry
