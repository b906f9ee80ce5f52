"""Sample images while training: kohya prompt lines rendered with diffusers' pipelines.

A prompt line is kohya's: the prompt, then options separated by `` --``::

    a photo of blh woman, beach --n low quality --w 512 --h 768 --l 7 --s 28 --d 5 --ss euler_a

``--n`` negative prompt, ``--w``/``--h`` size (rounded down to a multiple of 8), ``--l`` CFG
scale (7.5), ``--s`` steps (30), ``--d`` seed, ``--ss`` sampler (the run's ``sample_sampler``).
Lines that are empty or start with ``#`` are skipped. Two defaults differ from sd-scripts:
the size defaults to the training resolution (not 512, which suits no SDXL model), and a line
without ``--d`` gets the seed ``config.seed + line index`` (not a random one), so the samples
of two runs can be compared image by image.

The images come from diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
assembled from the loaded components (nothing is downloaded), with the LoRA applied as it is
trained and the prompts encoded by the training code; each image is saved as a PNG in
``samples/`` and logged to TensorBoard.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from loralab.errors import ConfigError
from loralab.models.family import ModelFamily
from loralab.models.loading import StableDiffusionComponents
from loralab.train.conditioning import effective_clip_skip, encode_text, tokenize_captions

DEFAULT_SCALE = 7.5
DEFAULT_STEPS = 30
MAX_STEPS = 1000

# sd-scripts' sampler names -> (diffusers scheduler class, extra config).
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to render."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None  # None: the training resolution
    height: int | None = None
    scale: float = DEFAULT_SCALE
    steps: int = DEFAULT_STEPS
    seed: int | None = None  # None: the run's seed + the line's index
    sampler: str | None = None  # None: the run's sample_sampler


_OPTIONS = (
    ("ss", re.compile(r"ss (.+)", re.IGNORECASE)),
    ("w", re.compile(r"w (\d+)", re.IGNORECASE)),
    ("h", re.compile(r"h (\d+)", re.IGNORECASE)),
    ("d", re.compile(r"d (\d+)", re.IGNORECASE)),
    ("s", re.compile(r"s (\d+)", re.IGNORECASE)),
    ("l", re.compile(r"l ([\d.]+)", re.IGNORECASE)),
    ("n", re.compile(r"n (.*)", re.IGNORECASE | re.DOTALL)),
)


def parse_prompt_line(line: str) -> SamplePrompt:
    """One kohya prompt line -> :class:`SamplePrompt` (see the module docstring).

    Unknown options are ignored, as sd-scripts does; an unknown sampler raises ``ConfigError``.
    """
    prompt, *options = line.strip().split(" --")
    values: dict[str, Any] = {"prompt": prompt.strip()}
    for option in options:
        for key, pattern in _OPTIONS:
            match = pattern.fullmatch(option.strip())
            if match is None:
                continue
            text = match.group(1).strip()
            if key == "ss":
                if text not in SAMPLERS:
                    raise ConfigError(f"sample prompt sampler --ss {text!r} is unknown; use one of {', '.join(SAMPLERS)}")
                values["sampler"] = text
            elif key in ("w", "h"):
                values["width" if key == "w" else "height"] = max(8, int(text) - int(text) % 8)
            elif key == "d":
                values["seed"] = int(text)
            elif key == "s":
                values["steps"] = min(max(int(text), 1), MAX_STEPS)
            elif key == "l":
                values["scale"] = float(text)
            else:
                values["negative_prompt"] = text
            break
    return SamplePrompt(**values)


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
    return [parse_prompt_line(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def make_sampler(name: str, training_scheduler: Any) -> Any:
    """A diffusers scheduler for sd-scripts' sampler ``name``, on the model's own noise schedule."""
    import diffusers

    if name not in SAMPLERS:
        raise ConfigError(f"sample_sampler {name!r} is unknown; use one of {', '.join(SAMPLERS)}")
    class_name, extra = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(training_scheduler.config, **extra)


def build_pipeline(components: StableDiffusionComponents, scheduler: Any) -> Any:
    """A diffusers text-to-image pipeline over the run's own modules (no copies, no download)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if components.family is ModelFamily.SDXL:
        pipeline = StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1],
            unet=components.unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            unet=components.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _prompt_embeddings(
    components: StableDiffusionComponents, text: str, *, clip_skip: int | None, max_token_length: int | None
) -> dict[str, torch.Tensor]:
    """The pipeline's ``prompt_embeds`` (and SDXL's ``pooled_prompt_embeds``) for ``text``, encoded
    exactly as training conditions the UNet (clip skip, long-prompt chunks)."""
    ids = [tokenize_captions(tokenizer, [text], max_token_length) for tokenizer in components.tokenizers]
    conditioning = encode_text(
        components.family,
        components.text_encoders,
        ids,
        eos_token_ids=[tokenizer.eos_token_id for tokenizer in components.tokenizers],
        clip_skip=effective_clip_skip(components.family, clip_skip),
    )
    embeddings = {"prompt_embeds": conditioning.encoder_hidden_states}
    if conditioning.pooled is not None:
        embeddings["pooled_prompt_embeds"] = conditioning.pooled
    return embeddings


def _negative_embeddings(
    components: StableDiffusionComponents, text: str, *, clip_skip: int | None, max_token_length: int | None
) -> dict[str, torch.Tensor]:
    if not text and components.family is ModelFamily.SDXL:
        # SDXL was trained to see zeros, not the empty prompt's encoding, as the unconditional input
        # (diffusers' force_zeros_for_empty_prompt).
        positive = _prompt_embeddings(components, "", clip_skip=clip_skip, max_token_length=max_token_length)
        return {f"negative_{name}": torch.zeros_like(value) for name, value in positive.items()}
    negative = _prompt_embeddings(components, text, clip_skip=clip_skip, max_token_length=max_token_length)
    return {f"negative_{name}": value for name, value in negative.items()}


@torch.no_grad()
def render_samples(
    components: StableDiffusionComponents,
    prompts: Sequence[SamplePrompt],
    *,
    sampler: str,
    resolution: tuple[int, int],
    base_seed: int,
    clip_skip: int | None = None,
    max_token_length: int | None = None,
) -> list[Any]:
    """Render ``prompts`` with the current weights; returns PIL images in prompt order.

    Prompts are encoded by the training code (so clip skip and 150/225-token prompts mean what
    they meant in training) and handed to the pipeline as embeddings. The caller puts the models
    in eval mode. Random draws use a generator per image, so the training run's random state is
    left as it was.
    """
    pipelines: dict[str, Any] = {}
    images = []
    for index, prompt in enumerate(prompts):
        name = prompt.sampler or sampler
        if name not in pipelines:
            pipelines[name] = build_pipeline(components, make_sampler(name, components.noise_scheduler))
        prompt = replace(
            prompt,
            width=prompt.width or resolution[0],
            height=prompt.height or resolution[1],
            seed=base_seed + index if prompt.seed is None else prompt.seed,
        )
        encoding = {"clip_skip": clip_skip, "max_token_length": max_token_length}
        result = pipelines[name](
            **_prompt_embeddings(components, prompt.prompt, **encoding),
            **_negative_embeddings(components, prompt.negative_prompt, **encoding),
            width=prompt.width,
            height=prompt.height,
            num_inference_steps=prompt.steps,
            guidance_scale=prompt.scale,
            generator=torch.Generator(device="cpu").manual_seed(prompt.seed),
        )
        images.append(result.images[0])
    return images


def sample_file_name(output_name: str, index: int, *, epoch: int | None, global_step: int) -> str:
    """sd-scripts' sample naming without its timestamp: ``<name>_e<epoch:06d>_<i:02d>.png`` or
    ``<name>_<step:06d>_<i:02d>.png``, so reruns overwrite instead of piling up."""
    when = f"e{epoch:06d}" if epoch is not None else f"{global_step:06d}"
    return f"{output_name}_{when}_{index:02d}.png"


def save_png_atomically(image: Any, path: Path) -> Path:
    """Save a PIL image as PNG via a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temp, format="PNG")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path
