"""What every scorer works on: the evaluation images of one save point and the training images.

A score is a function of one save point's images (:class:`SavePointImages`) that returns a
number, or raises :class:`ScoreUnavailable` with the reason it has none (no face found, no
training images, too few images to compare). A number is never made up: a score that cannot
be computed is reported missing with its reason.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError


class ScoringError(LoralabError):
    """A scoring model or an evaluation index given by the user cannot be used."""


class ScoreUnavailable(Exception):
    """A score has no value for these images; the message says why (shown in the report)."""


@dataclass(frozen=True)
class EvalImage:
    """One generated evaluation image and how it was made (an entry of an eval ``index.json``)."""

    path: Path
    checkpoint: str
    prompt_set: str
    prompt: str
    seed: int
    lora_weight: float
    trigger: bool


@dataclass(frozen=True)
class SavePointImages:
    """The images a score is computed from.

    ``images``: every evaluation image of the save point (all eval checkpoints, prompt sets,
    seeds and LoRA weights). ``reference_images``: the run's training images (the identity the
    LoRA should learn); empty when they cannot be found, and then ``reference_problem`` says why.
    """

    images: tuple[EvalImage, ...]
    reference_images: tuple[Path, ...] = ()
    reference_problem: str | None = None

    @property
    def with_trigger(self) -> tuple[EvalImage, ...]:
        """Images whose prompt held the trigger word (what the LoRA is for)."""
        return tuple(image for image in self.images if image.trigger)

    @property
    def without_trigger(self) -> tuple[EvalImage, ...]:
        """Images generated without the trigger word (the subject should not appear in them)."""
        return tuple(image for image in self.images if not image.trigger)


# A score: the save point's images in, one number out (or ScoreUnavailable raised).
ScoreFunction = Callable[[SavePointImages], float]


class FileCache:
    """Results of an expensive per-image computation, kept per (file, modification time).

    Several scores read the same images (likeness, face rate and leak embed the same faces); the
    cache makes each image cost one model call. Least recently used entries go first.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, float], Any] = OrderedDict()

    def get(self, path: Path, compute: Callable[[Path], Any]) -> Any:
        """``compute(path)``, or what it returned before for the unchanged file.

        Raises ScoringError when the file is missing.
        """
        path = Path(path)
        try:
            key = (str(path.resolve()), path.stat().st_mtime)
        except OSError as exc:
            raise ScoringError(f"image {path} is missing ({exc.strerror}); re-run the evaluation") from None
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = self._entries[key] = compute(path)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value
