"""The toy base model: SD1.5's architecture at a size a laptop CPU trains and samples in minutes.

Same classes and single-file layout as a real SD1.5 checkpoint (the loader reads these sizes
back from tensor shapes), only smaller:

- VAE: two levels (32, 64 channels), so it downsamples by 2, not 8: a 32 px image becomes a
  16 x 16 x 4 latent. (At SD's x8 a 32 px image would be a 4 x 4 latent, far too coarse for a
  star; a x4 VAE of this size also trains too slowly to reproduce the toy colours within the
  pretraining budget.) Channel counts are multiples of 32 because SD's group norms use 32 groups.
- Text encoder: CLIP with the real 49,408-token vocabulary (the real tokenizer works and
  trigger words like "blh" are ordinary rare tokens), 64 wide, 3 layers.
- UNet: levels of 32, 64, 128 channels (16, 8, 4 px); cross-attention (8 heads, SD1's rule)
  on the 8 px level and in the middle, none at 16 px (as SDXL leaves its first level without
  attention: there it would cost more than everything else together), conditioned on the
  64-wide text states.

The two trained checkpoints ship in ``checkpoints/``; ``scripts/pretrain_toy.py`` makes them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from loralab.errors import CheckpointError
from loralab.models.architecture import (
    TextEncoderSizes,
    UNetSizes,
    VaeSizes,
    text_encoder_config,
    unet_config,
    vae_config,
)
from loralab.models.family import ModelFamily
from loralab.models.loading import StableDiffusionComponents, make_noise_scheduler
from loralab.models.tokenizer import load_clip_tokenizer

if TYPE_CHECKING:
    import numpy as np

RESOLUTION = 32  # the toy world's image size, in pixels
TEXT_ENCODER = TextEncoderSizes(
    hidden_size=64, num_hidden_layers=3, intermediate_size=256, vocab_size=49408, max_position_embeddings=77
)
VAE = VaeSizes(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4)
UNET = UNetSizes(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    attention_levels=(False, True, False),
    transformer_depth=(1, 1, 1),
    mid_transformer_depth=1,
    cross_attention_dim=TEXT_ENCODER.hidden_size,
    use_linear_projection=False,  # SD1: 1x1-conv projections into the transformer
)
LATENT_SIZE = RESOLUTION // 2 ** (len(VAE.block_out_channels) - 1)

CheckpointName = Literal["base", "alt"]
CHECKPOINT_FILES: dict[str, str] = {"base": "toy_base.safetensors", "alt": "toy_alt.safetensors"}


def build_toy_components(seed: int = 0) -> StableDiffusionComponents:
    """Untrained toy components (random weights from ``seed``), ready to pretrain.

    The global RNG is left as it was: module initialisation draws from a forked copy.
    """
    family = ModelFamily.SD1
    (encoder,) = family.spec.text_encoders
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config(family, UNET))
        vae = AutoencoderKL.from_config(vae_config(family, VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(family, encoder, TEXT_ENCODER)))
    return StableDiffusionComponents(
        family=family,
        v_prediction=False,
        unet=unet,
        vae=vae,
        text_encoders=[text_encoder],
        tokenizers=[load_clip_tokenizer(pad_with_eos=encoder.pad_with_eos)],
        noise_scheduler=make_noise_scheduler(False),
        source=Path(f"toy-untrained-seed{seed}"),
    )


def checkpoints_dir() -> Path:
    """The folder of the shipped toy checkpoints (inside the installed package)."""
    return Path(str(resources.files("loralab.toy").joinpath("checkpoints")))


def toy_checkpoint(name: CheckpointName = "base") -> Path:
    """Path of a shipped toy checkpoint: "base" (the toy world) or "alt" (fine-tuned on warm backgrounds).

    Raises ``CheckpointError`` when the file is missing (a partial install or checkout).
    """
    if name not in CHECKPOINT_FILES:
        raise CheckpointError(f"unknown toy checkpoint '{name}'; choose one of {', '.join(CHECKPOINT_FILES)}")
    path = checkpoints_dir() / CHECKPOINT_FILES[name]
    if not path.is_file():
        raise CheckpointError(
            f"toy checkpoint {path} is missing; reinstall loralab or run scripts/pretrain_toy.py to make it"
        )
    return path


def draw(
    components: StableDiffusionComponents, prompt: str, seeds: tuple[int, ...] = (0, 1, 2, 3)
) -> list[np.ndarray]:
    """``prompt`` drawn once per seed at the toy resolution (DDIM, 20 steps, guidance 5: how the
    toy checkpoints are previewed and checked), as uint8 RGB arrays."""
    import numpy as np
    from diffusers import DDIMScheduler

    from loralab.sample.generator import build_pipeline

    pipeline = build_pipeline(components, DDIMScheduler.from_config(components.noise_scheduler.config))
    images = pipeline(
        prompt=[prompt] * len(seeds),
        width=RESOLUTION,
        height=RESOLUTION,
        num_inference_steps=20,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        output_type="np",
    ).images
    return [(image * 255).round().astype(np.uint8) for image in images]
