"""Sample images while training: the config's prompt lines (``train.sample_prompts``) rendered
by ``loralab generate``'s engine.

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
from pathlib import Path

import torch
from PIL import Image

from loralab.models.loading import StableDiffusionComponents
from loralab.sample.generator import GenerationEngine, ImageRequest
from loralab.sample.png_info import PARAMETERS_KEY, save_png
from loralab.train.sample_prompts import SamplePrompt


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
