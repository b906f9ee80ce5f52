"""kohya's sample-prompt lines: ``prompt --n negative --w 512 --h 768 --l 7 --s 28 --d 42 --ss euler_a``.

The one reader of this syntax, for ``loralab generate --prompt-file`` and for sampling during
training. Options follow the prompt, each introduced by `` --``, as sd-scripts reads them:

=========  =============================  =====================================================
option     meaning                        as read
=========  =============================  =====================================================
``--n``    negative prompt                the rest of that option's text
``--w``    width                          rounded down to a multiple of 8, at least 8
``--h``    height                         (same)
``--l``    CFG scale                      a number
``--s``    steps                          kept between 1 and 1000
``--d``    seed                           an integer
``--ss``   sampler                        any name ``samplers.resolve_sampler`` knows
=========  =============================  =====================================================

Options a line does not set stay None (the caller's defaults apply). Unknown options are ignored,
as sd-scripts ignores them; an unknown sampler is an error. Empty lines and lines starting with
``#`` are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from loralab.errors import ConfigError
from loralab.sample.samplers import resolve_sampler

MAX_STEPS = 1000
MIN_SIDE = 8  # sd-scripts floors at 64; any multiple of 8 renders, and small test models use less


@dataclass(frozen=True)
class PromptLine:
    """One line of a prompt file; None where the line does not say."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    cfg_scale: float | None = None
    steps: int | None = None
    seed: int | None = None
    sampler: str | None = None


_OPTIONS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("sampler", re.compile(r"ss (.+)", re.IGNORECASE)),
    ("width", re.compile(r"w (\d+)", re.IGNORECASE)),
    ("height", re.compile(r"h (\d+)", re.IGNORECASE)),
    ("seed", re.compile(r"d (\d+)", re.IGNORECASE)),
    ("steps", re.compile(r"s (\d+)", re.IGNORECASE)),
    ("cfg_scale", re.compile(r"l (\d+(?:\.\d*)?|\.\d+)", re.IGNORECASE)),
    ("negative_prompt", re.compile(r"n (.*)", re.IGNORECASE | re.DOTALL)),
)


def _side(text: str) -> int:
    value = int(text)
    return max(MIN_SIDE, value - value % 8)  # sd-scripts rounds sample sizes down the same way


def parse_prompt_line(line: str) -> PromptLine:
    """One kohya prompt line -> :class:`PromptLine`. Raises ``SamplerError`` for an unknown ``--ss``."""
    prompt, *options = line.strip().split(" --")
    values: dict[str, object] = {"prompt": prompt.strip()}
    for option in options:
        for name, pattern in _OPTIONS:
            match = pattern.fullmatch(option.strip())
            if match is None:
                continue
            text = match.group(1).strip()
            if name == "sampler":
                resolve_sampler(text)
                values[name] = text
            elif name in ("width", "height"):
                values[name] = _side(text)
            elif name == "seed":
                values[name] = int(text)
            elif name == "steps":
                values[name] = min(max(int(text), 1), MAX_STEPS)
            elif name == "cfg_scale":
                values[name] = float(text)
            else:
                values[name] = text
            break
    return PromptLine(**values)  # type: ignore[arg-type]


def parse_prompt_lines(lines: list[str]) -> list[PromptLine]:
    """The prompts of ``lines``, skipping empty ones and ``#`` comments."""
    return [parse_prompt_line(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def read_prompt_file(path: Path | str) -> list[PromptLine]:
    """The prompts of a ``.txt`` prompt file. Raises ``ConfigError`` for a missing or non-text file."""
    path = Path(path)
    if path.suffix.lower() not in (".txt", ""):
        raise ConfigError(f"prompt file {path} is not a .txt file of kohya prompt lines; write one prompt per line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read prompt file {path}: {exc}") from None
    prompts = parse_prompt_lines(text.splitlines())
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts (only empty or # lines)")
    return prompts
