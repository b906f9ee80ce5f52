"""The config's sample prompts: kohya prompt lines, read and checked before a run loads anything.

A prompt line is kohya's (read by ``loralab.sample.prompt_file``, the one parser of the syntax)::

    a photo of blh woman, beach --n low quality --w 512 --h 768 --l 7 --s 28 --d 5 --ss euler_a

``--n`` negative prompt, ``--w``/``--h`` size (rounded down to a multiple of 8), ``--l`` CFG
scale (7.5), ``--s`` steps (30), ``--d`` seed, ``--ss`` sampler (the run's ``sample_sampler``).
Lines that are empty or start with ``#`` are skipped. Two defaults differ from sd-scripts:
the size defaults to the training resolution (not 512, which suits no SDXL model), and a line
without ``--d`` gets the seed ``config.seed + line index`` (not a random one), so the samples
of two runs can be compared image by image. Rendering them is ``train.sampling``'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loralab.errors import ConfigError
from loralab.sample.prompt_file import PromptLine, parse_prompt_lines
from loralab.sample.prompt_file import parse_prompt_line as parse_kohya_line
from loralab.sample.samplers import SamplerError

DEFAULT_SCALE = 7.5
DEFAULT_STEPS = 30


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to render: a prompt line with training's defaults filled in."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None  # None: the training resolution
    height: int | None = None
    scale: float = DEFAULT_SCALE
    steps: int = DEFAULT_STEPS
    seed: int | None = None  # None: the run's seed + the line's index
    sampler: str | None = None  # None: the run's sample_sampler

    @classmethod
    def from_line(cls, line: PromptLine) -> SamplePrompt:
        return cls(
            prompt=line.prompt,
            negative_prompt=line.negative_prompt or "",
            width=line.width,
            height=line.height,
            scale=DEFAULT_SCALE if line.cfg_scale is None else line.cfg_scale,
            steps=DEFAULT_STEPS if line.steps is None else line.steps,
            seed=line.seed,
            sampler=line.sampler,
        )


def _as_config_error(exc: SamplerError) -> ConfigError:
    # In training, a prompt line is part of the run's configuration.
    return ConfigError(f"sample_prompts: {exc}")


def parse_prompt_line(line: str) -> SamplePrompt:
    """One kohya prompt line -> :class:`SamplePrompt` (see the module docstring).

    Unknown options are ignored, as sd-scripts does; an unknown sampler raises ``ConfigError``.
    """
    try:
        return SamplePrompt.from_line(parse_kohya_line(line))
    except SamplerError as exc:
        raise _as_config_error(exc) from None


def read_sample_prompts(sample_prompts: Sequence[str] | Path | None) -> list[SamplePrompt]:
    """The prompts of ``sample_prompts``: a list of lines, or a ``.txt`` file of lines."""
    if sample_prompts is None:
        return []
    if isinstance(sample_prompts, Path):
        if sample_prompts.suffix.lower() not in (".txt", ""):
            raise ConfigError(
                f"sample_prompts file {sample_prompts} is not a .txt file of kohya prompt lines; "
                f"convert it to one prompt per line"
            )
        try:
            lines = sample_prompts.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise ConfigError(
                f"sample_prompts file {sample_prompts} not found; fix the path or leave sample_prompts out"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read sample_prompts file {sample_prompts}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"sample_prompts file {sample_prompts} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
            ) from None
    else:
        lines = list(sample_prompts)
    try:
        return [SamplePrompt.from_line(line) for line in parse_prompt_lines(lines)]
    except SamplerError as exc:
        raise _as_config_error(exc) from None
