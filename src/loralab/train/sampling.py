"""Sample images while training: kohya prompt lines rendered by ``loralab generate``'s engine.

A prompt line is kohya's (read by ``loralab.sample.prompt_file``, the one parser of the syntax)::

    a photo of blh woman, beach --n low quality --w 512 --h 768 --l 7 --s 28 --d 5 --ss euler_a

``--n`` negative prompt, ``--w``/``--h`` size (rounded down to a multiple of 8), ``--l`` CFG
scale (7.5), ``--s`` steps (30), ``--d`` seed, ``--ss`` sampler (the run's ``sample_sampler``).
Lines that are empty or start with ``#`` are skipped. Two defaults differ from sd-scripts:
the size defaults to the training resolution (not 512, which suits no SDXL model), and a line
without ``--d`` gets the seed ``config.seed + line index`` (not a random one), so the samples
of two runs can be compared image by image.

The images come from ``loralab.sample.generator.GenerationEngine`` rendering on the components
being trained (nothing is loaded or downloaded), with the LoRA applied as modules as it is
trained (never fused into the weights, which must stay as they are for training). So a sample is
the image ``loralab generate`` makes from the same prompt, seed and settings with the LoRA saved
at that point at weight 1, up to rounding (``generate`` fuses LoRA files into the weights):
prompts are read with A1111's syntax (attention weights, long prompts in 75-token chunks, as
sd-scripts' own long-prompt sampling pipeline reads them) and samplers follow A1111's schedules. Each image carries its A1111 ``parameters`` text
(``image.info``), which :func:`save_png_atomically` writes into the PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from loralab.errors import ConfigError
from loralab.models.loading import StableDiffusionComponents
from loralab.sample.generator import GenerationEngine, ImageRequest
from loralab.sample.png_info import PARAMETERS_KEY, save_png
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
        except OSError as exc:
            raise ConfigError(f"cannot read sample_prompts file {sample_prompts}: {exc.strerror}") from None
    else:
        lines = list(sample_prompts)
    try:
        return [SamplePrompt.from_line(line) for line in parse_prompt_lines(lines)]
    except SamplerError as exc:
        raise _as_config_error(exc) from None


@torch.no_grad()
def render_samples(
    components: StableDiffusionComponents,
    prompts: Sequence[SamplePrompt],
    *,
    sampler: str,
    resolution: tuple[int, int],
    base_seed: int,
    clip_skip: int | None = None,
) -> list[Image.Image]:
    """Render ``prompts`` with the current weights; returns PIL images in prompt order.

    The caller puts the models in eval mode. Random draws use a generator per image, so the
    training run's random state is left as it was; the components are left as they were.
    """
    engine = GenerationEngine()
    checkpoint = engine.use_components(components, "training")
    requests = [
        ImageRequest(
            checkpoint,
            prompt.prompt,
            prompt.negative_prompt,
            sampler=prompt.sampler or sampler,
            steps=prompt.steps,
            cfg_scale=prompt.scale,
            seed=base_seed + index if prompt.seed is None else prompt.seed,
            width=prompt.width or resolution[0],
            height=prompt.height or resolution[1],
            clip_skip=clip_skip,
        )
        for index, prompt in enumerate(prompts)
    ]
    try:
        generated = engine.generate(requests)
    finally:
        engine.close()
    for result in generated:
        result.image.info[PARAMETERS_KEY] = result.infotext
    return [result.image for result in generated]


def sample_file_name(output_name: str, index: int, *, epoch: int | None, global_step: int) -> str:
    """sd-scripts' sample naming without its timestamp: ``<name>_e<epoch:06d>_<i:02d>.png`` or
    ``<name>_<step:06d>_<i:02d>.png``, so reruns overwrite instead of piling up."""
    when = f"e{epoch:06d}" if epoch is not None else f"{global_step:06d}"
    return f"{output_name}_{when}_{index:02d}.png"


def save_png_atomically(image: Image.Image, path: Path) -> Path:
    """Save a PIL image as PNG via a temporary file in the same folder, with its A1111 parameters
    (``image.info["parameters"]``, set by :func:`render_samples`) when it has them."""
    return save_png(image, path, image.info.get(PARAMETERS_KEY))
