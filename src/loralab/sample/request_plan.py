"""From settings with variants to one :class:`ImageRequest` per image.

A :class:`RequestTemplate` holds the settings of a set of images as text, and every text may hold
Dynamic Prompts variants and wildcards (``{3|5|7}``, ``{512x768|768x512}``,
``<lora:blh_final_{rv20|28d28} ({8|9|10}):{0.9|1.0|1.1}>``, ``__scene__``). Each image expands them
with its own seed: the prompt with the seed itself (as the Dynamic Prompts extension does), every
other setting with a seed derived from it, so one image's draws are independent of each other and
the same on every run.

- :func:`plan_images`: every checkpoint x every seed (``loralab generate --batch N``).
- :func:`plan_random`: ``count`` images, each drawing its checkpoint from the list and every
  variant (``loralab generate --count N``), which is how the guide makes its final images.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from loralab.sample.generator import GenerationError, ImageRequest, LoraRef
from loralab.sample.lora_library import parse_lora_option
from loralab.sample.prompt_file import PromptLine
from loralab.sample.wildcards import Wildcards, derived_seed

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class RequestTemplate:
    """Settings for a set of images; text fields may hold variants and wildcards."""

    checkpoints: tuple[str, ...]
    prompt: str
    negative_prompt: str = ""
    loras: tuple[str, ...] = ()  # "name-or-path[:weight]"
    sampler: str = "Euler a"
    steps: str = "20"
    cfg_scale: str = "7"
    size: str = "512x512"  # "WxH"
    clip_skip: str | None = None
    vae: Path | None = None

    def with_prompt_line(self, line: PromptLine) -> RequestTemplate:
        """This template with the settings a kohya prompt-file line gives."""
        changes: dict[str, object] = {"prompt": line.prompt}
        if line.negative_prompt is not None:
            changes["negative_prompt"] = line.negative_prompt
        if line.width is not None or line.height is not None:
            width, height = _size(self.size) if "{" not in self.size else (512, 512)
            changes["size"] = f"{line.width or width}x{line.height or height}"
        if line.cfg_scale is not None:
            changes["cfg_scale"] = f"{line.cfg_scale:g}"
        if line.steps is not None:
            changes["steps"] = str(line.steps)
        if line.sampler is not None:
            changes["sampler"] = line.sampler
        return replace(self, **changes)  # type: ignore[arg-type]


def _number(text: str, what: str, kind: type) -> int | float:
    try:
        return kind(text.strip())
    except ValueError:
        raise GenerationError(f"{what} {text!r} is not {'an integer' if kind is int else 'a number'}") from None


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.strip().lower().partition("x")
    if not sep:
        raise GenerationError(f"size {text!r} must be WIDTHxHEIGHT, e.g. 512x768")
    return int(_number(width, "width", int)), int(_number(height, "height", int))


def expand_template(template: RequestTemplate, checkpoint: str, seed: int, wildcards: Wildcards) -> ImageRequest:
    """The request for one image: ``template``'s variants drawn with ``seed`` (see the module docstring)."""

    def draw(text: str, purpose: str) -> str:
        return wildcards.expand(text, derived_seed(seed, purpose))

    loras = []
    for index, option in enumerate(template.loras):
        name, weight = parse_lora_option(draw(option, f"lora{index}"))
        loras.append(LoraRef(name, weight))
    width, height = _size(draw(template.size, "size"))
    clip_skip = draw(template.clip_skip, "clip_skip") if template.clip_skip else None
    return ImageRequest(
        checkpoint=Path(draw(checkpoint, "checkpoint")).expanduser(),
        prompt=wildcards.expand(template.prompt, seed),
        negative_prompt=draw(template.negative_prompt, "negative"),
        loras=tuple(loras),
        sampler=draw(template.sampler, "sampler"),
        steps=int(_number(draw(template.steps, "steps"), "steps", int)),
        cfg_scale=float(_number(draw(template.cfg_scale, "cfg"), "CFG scale", float)),
        seed=seed,
        width=width,
        height=height,
        clip_skip=int(_number(clip_skip, "clip skip", int)) if clip_skip else None,
        vae=template.vae,
    )


def plan_images(template: RequestTemplate, seeds: Sequence[int], wildcards: Wildcards) -> list[ImageRequest]:
    """One image per checkpoint and seed, checkpoint by checkpoint."""
    return [expand_template(template, checkpoint, seed, wildcards) for checkpoint in template.checkpoints for seed in seeds]


def plan_random(template: RequestTemplate, count: int, first_seed: int, wildcards: Wildcards) -> list[ImageRequest]:
    """``count`` images with seeds ``first_seed``, ``first_seed + 1``, ...; each draws its checkpoint
    from ``template.checkpoints`` and every variant of the template."""
    if count < 1:
        raise GenerationError(f"--count {count} must be 1 or more")
    requests = []
    for offset in range(count):
        seed = (first_seed + offset) % (MAX_SEED + 1)
        checkpoint = random.Random(derived_seed(seed, "checkpoint choice")).choice(template.checkpoints)
        requests.append(expand_template(template, checkpoint, seed, wildcards))
    return requests


def random_seed() -> int:
    """A fresh seed for "no seed given" (A1111's -1)."""
    return random.SystemRandom().randrange(MAX_SEED + 1)
