"""Randomly initialised models with the real classes and layouts: tiny ones for tests and bug
reports, and full-size ones (written straight to disk) for loading tests and benchmarks.

Tiny models keep each family's real structure, only narrower and shallower: the same block
kinds in the same order (SDXL: first level without attention, two text encoders, size
conditioning, more than one transformer block per attention so SGM numbering is exercised),
the full 49,408-token vocabulary so the real tokenizer works, and a VAE with the real x8
downscale. Their configs are built by the same functions that read checkpoints, so a tiny
file loads through exactly the code paths a real one does.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig

from loralab.errors import CheckpointError
from loralab.models.architecture import (
    TextEncoderSizes,
    UNetSizes,
    VaeSizes,
    build_empty_model,
    bundled_config,
    text_encoder_class,
    text_encoder_config,
    unet_config,
    vae_config,
)
from loralab.models.family import ModelFamily
from loralab.models.loading import StableDiffusionComponents, make_noise_scheduler
from loralab.models.saving import save_diffusers_folder, save_single_file
from loralab.models.single_file import to_single_file_state_dict
from loralab.models.tokenizer import load_clip_tokenizer

TinyName = Literal["sd15", "sd2v", "sdxl"]
TinyFormat = Literal["single-file", "diffusers"]

TINY_MODELS: dict[str, tuple[ModelFamily, bool]] = {
    "sd15": (ModelFamily.SD1, False),
    "sd2v": (ModelFamily.SD2, True),  # SD2.x 768-v: v-prediction
    "sdxl": (ModelFamily.SDXL, False),
}

_VOCAB, _POSITIONS = 49408, 77
# Four levels like the real VAE, so images map to latents at 1/8 of their size.
_TINY_VAE = VaeSizes(
    in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4
)


def _tiny_text_encoder(hidden: int, projection: bool) -> TextEncoderSizes:
    return TextEncoderSizes(hidden, 2, 2 * hidden, _VOCAB, _POSITIONS, hidden if projection else None)


def tiny_sizes(family: ModelFamily) -> tuple[UNetSizes, VaeSizes, list[TextEncoderSizes]]:
    """Sizes of the tiny model of ``family``."""
    if family is ModelFamily.SDXL:
        # The two encoders differ in width as in SDXL (768 / 1280): readers tell them apart by it.
        encoders = [_tiny_text_encoder(32, False), _tiny_text_encoder(64, True)]
        time_id_width = 8
        unet = UNetSizes(
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            attention_levels=(False, True),
            transformer_depth=(1, 2),
            mid_transformer_depth=2,
            cross_attention_dim=32 + 64,  # SDXL conditions on both encoders' states, concatenated
            use_linear_projection=True,
            projection_class_embeddings_input_dim=64 + 6 * time_id_width,
        )
        return unet, _TINY_VAE, encoders
    unet = UNetSizes(
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_levels=(True, False),  # as SD1/SD2: no attention at the lowest resolution
        transformer_depth=(1, 1),
        mid_transformer_depth=1,
        cross_attention_dim=32,
        use_linear_projection=family is ModelFamily.SD2,
    )
    return unet, _TINY_VAE, [_tiny_text_encoder(32, False)]


def _configs(
    family: ModelFamily, unet: UNetSizes, vae: VaeSizes, encoders: list[TextEncoderSizes]
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    te_configs = [text_encoder_config(family, spec, s) for spec, s in zip(family.spec.text_encoders, encoders)]
    pooled = encoders[-1].projection_dim if family is ModelFamily.SDXL else None
    return unet_config(family, unet, pooled_dim=pooled), vae_config(family, vae), te_configs


def _resolve(name: str) -> tuple[ModelFamily, bool]:
    if name not in TINY_MODELS:
        raise CheckpointError(f"unknown tiny model '{name}'; choose one of {', '.join(TINY_MODELS)}")
    return TINY_MODELS[name]


def build_tiny_components(family: TinyName, seed: int = 0) -> StableDiffusionComponents:
    """A tiny random model of ``family`` ("sd15", "sd2v" or "sdxl"), in memory, deterministic in ``seed``."""
    model_family, v_prediction = _resolve(family)
    unet_cfg, vae_cfg, te_configs = _configs(model_family, *tiny_sizes(model_family))
    encoders = model_family.spec.text_encoders
    # Seed a private copy of the global RNG (module init draws from it) and leave the caller's alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_cfg).eval()
        vae = AutoencoderKL.from_config(vae_cfg).eval()
        text_encoders = [text_encoder_class(e)(CLIPTextConfig(**c)).eval() for e, c in zip(encoders, te_configs)]
    return StableDiffusionComponents(
        family=model_family,
        v_prediction=v_prediction,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=[load_clip_tokenizer(pad_with_eos=e.pad_with_eos) for e in encoders],
        noise_scheduler=make_noise_scheduler(v_prediction),
        source=Path(f"tiny-{family}-seed{seed}"),
    )


def make_tiny(family: TinyName, fmt: TinyFormat, out: Path | str, seed: int = 0) -> Path:
    """Write a tiny random ``family`` model to ``out`` as a single ``.safetensors`` file in the
    original layout, or as a diffusers folder. Returns the path written.
    """
    components = build_tiny_components(family, seed)
    if fmt == "single-file":
        return save_single_file(components, out)
    if fmt == "diffusers":
        return save_diffusers_folder(components, out)
    raise CheckpointError(f"unknown format '{fmt}'; choose single-file or diffusers")


# ---------------------------------------------------------------------------------------------
# Full size


def _fill_values(shape: torch.Size, pool: torch.Tensor, offset: int) -> torch.Tensor:
    """Cheap distinct values: a window of a small random pool (repeated for larger tensors).
    Loading tests and benchmarks need real tensors of the right shapes, not trained values."""
    count, size = shape.numel(), pool.numel()
    if count <= size:
        start = offset % (size - count + 1)
        return pool[start : start + count].reshape(shape)
    return pool.roll(offset % size).repeat(-(-count // size))[:count].reshape(shape)


def _write_safetensors_streaming(
    path: Path, shapes: dict[str, tuple[torch.Size, torch.dtype]], make: Callable[[str], torch.Tensor]
) -> None:
    """Write a safetensors file one tensor at a time (``make(key)`` builds each), so memory holds
    one tensor, not the model plus its serialised copy as ``safetensors.torch.save_file`` would."""
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, (shape, dtype) in shapes.items():
        size = shape.numel() * dtype.itemsize
        header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for key, (shape, dtype) in shapes.items():
            tensor = make(key).to(dtype).contiguous()
            assert tensor.shape == shape
            handle.write(tensor.reshape(-1).view(torch.uint8).numpy())


def write_random_full_size(
    family: ModelFamily,
    out: Path | str,
    *,
    v_prediction: bool = False,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> Path:
    """Write a randomly filled full-size single-file checkpoint of ``family`` (published sizes).

    Modules are built on the meta device only to learn their parameter names and shapes;
    each tensor is made just before it is written. SD1.5 in fp16 is about 2 GB.
    """
    out = Path(out)
    unet_cfg = bundled_config(family, "unet")
    vae_cfg = bundled_config(family, "vae")
    encoders = family.spec.text_encoders
    te_configs = [bundled_config(family, e.config_name) for e in encoders]
    meta = to_single_file_state_dict(
        (build_empty_model("unet", unet_cfg).state_dict(), unet_cfg),
        (build_empty_model("vae", vae_cfg).state_dict(), vae_cfg),
        [(build_empty_model("text_encoder", c, e).state_dict(), e) for e, c in zip(encoders, te_configs)],
        v_prediction=v_prediction,
    )
    shapes = {k: (v.shape, dtype) for k, v in meta.items()}
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 22, generator=generator) * 0.02).to(dtype)
    offsets = {k: int(torch.randint(0, 1 << 30, (1,), generator=generator)) for k in shapes}
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    try:
        _write_safetensors_streaming(
            Path(temp), shapes, lambda key: _fill_values(shapes[key][0], pool, offsets[key])
        )
        os.replace(temp, out)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return out
