"""Architecture sizes of each component, read from tensor shapes, and the configs built from them.

A single-file checkpoint carries no config. The bundled family configs (``configs/*.json``,
the published diffusers/transformers configs) give everything shapes cannot tell (activation
functions, norm epsilons, sample size); the sizes below replace theirs, so a full-size
checkpoint, a pruned one and a tiny test model of the same layout all build from the same
code. Nothing here reads weights: meta tensors (shapes only) are enough.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loralab.errors import CheckpointError
from loralab.models.family import FamilySpec, ModelFamily, TextEncoderSpec

# ---------------------------------------------------------------------------------------------
# Bundled configs


@cache
def _read_bundled(name: str) -> dict[str, Any]:
    text = resources.files("loralab.models").joinpath(f"configs/{name}.json").read_text("utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def bundled_config(family: ModelFamily, component: str) -> dict[str, Any]:
    """A fresh copy of the published config of ``component`` ("unet", "vae", "text_encoder", ...)."""
    return copy.deepcopy(_read_bundled(family.value)[component])


def bundled_scheduler_config() -> dict[str, Any]:
    """The training noise schedule (DDPMScheduler arguments) shared by all families."""
    return copy.deepcopy(_read_bundled("scheduler"))


# ---------------------------------------------------------------------------------------------
# Sizes: what tensor shapes tell


@dataclass(frozen=True)
class UNetSizes:
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_levels: tuple[bool, ...]  # which resolution levels have cross-attention blocks
    transformer_depth: tuple[int, ...]  # transformer blocks per level (down blocks; up blocks mirror)
    mid_transformer_depth: int
    cross_attention_dim: int
    use_linear_projection: bool
    # SDXL's size/crop conditioning: width of the label embedding input and of each time id embedding.
    projection_class_embeddings_input_dim: int | None = None
    addition_time_embed_dim: int | None = None


@dataclass(frozen=True)
class VaeSizes:
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int


@dataclass(frozen=True)
class TextEncoderSizes:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    projection_dim: int | None = None  # only for CLIPTextModelWithProjection


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(
            f"checkpoint is missing tensor '{key}'; the file is incomplete or of an unknown layout"
        )
    return tuple(state[key].shape)


def _indices(keys: Any, pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) over ``keys``."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def infer_unet_sizes(unet: Mapping[str, torch.Tensor]) -> UNetSizes:
    """Read UNet sizes from LDM/SGM key names (``input_blocks...``, prefix already removed)."""
    keys = list(unet.keys())
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in unet]
    levels = len(downsamplers) + 1
    layers_per_block = (len(blocks) - 1 - len(downsamplers)) // levels
    if not blocks or (len(blocks) - 1 - len(downsamplers)) % levels:
        raise CheckpointError("UNet input blocks do not form regular resolution levels; unsupported layout")

    channels, attention, depth = [], [], []
    for level in range(levels):
        first = 1 + level * (layers_per_block + 1)
        channels.append(_shape(unet, f"input_blocks.{first}.0.out_layers.3.weight")[0])
        has_attention = f"input_blocks.{first}.1.proj_in.weight" in unet
        attention.append(has_attention)
        depth.append(
            len(_indices(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")) if has_attention else 1
        )
    mid_depth = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))

    attn2 = [k for k in keys if k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in keys if k.endswith(".proj_in.weight")]
    if not attn2 or not proj_in:
        raise CheckpointError("UNet has no cross-attention blocks; not a Stable Diffusion UNet")

    label = unet.get("label_emb.0.0.weight")
    return UNetSizes(
        in_channels=_shape(unet, "input_blocks.0.0.weight")[1],
        out_channels=_shape(unet, "out.2.weight")[0],
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        attention_levels=tuple(attention),
        transformer_depth=tuple(depth),
        mid_transformer_depth=mid_depth,
        cross_attention_dim=_shape(unet, attn2[0])[1],
        use_linear_projection=len(_shape(unet, proj_in[0])) == 2,
        projection_class_embeddings_input_dim=None if label is None else int(label.shape[1]),
    )


def infer_vae_sizes(vae: Mapping[str, torch.Tensor]) -> VaeSizes:
    """Read VAE sizes from LDM key names (``encoder.down.0.block.0...``, prefix already removed)."""
    keys = list(vae.keys())
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise CheckpointError("no VAE encoder weights (encoder.down.*) found")
    return VaeSizes(
        in_channels=_shape(vae, "encoder.conv_in.weight")[1],
        out_channels=_shape(vae, "decoder.conv_out.weight")[0],
        block_out_channels=tuple(_shape(vae, f"encoder.down.{i}.block.0.conv2.weight")[0] for i in levels),
        layers_per_block=len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
        latent_channels=_shape(vae, "decoder.conv_in.weight")[1],
    )


def infer_text_encoder_sizes(text_encoder: Mapping[str, torch.Tensor]) -> TextEncoderSizes:
    """Read CLIP text encoder sizes from transformers key names (with or without ``text_model.``)."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.items()}
    vocab_size, hidden_size = _shape(state, "embeddings.token_embedding.weight")
    projection = state.get("text_projection.weight")
    return TextEncoderSizes(
        hidden_size=hidden_size,
        num_hidden_layers=len(_indices(state.keys(), r"encoder\.layers\.(\d+)\.")),
        intermediate_size=_shape(state, "encoder.layers.0.mlp.fc1.weight")[0],
        vocab_size=vocab_size,
        max_position_embeddings=_shape(state, "embeddings.position_embedding.weight")[0],
        projection_dim=None if projection is None else int(projection.shape[0]),
    )


# ---------------------------------------------------------------------------------------------
# Configs: bundled defaults + sizes + the family's rules


def unet_config(family: ModelFamily, sizes: UNetSizes, *, pooled_dim: int | None = None) -> dict[str, Any]:
    """Diffusers UNet2DConditionModel config for ``family`` with these sizes.

    ``pooled_dim`` (SDXL) is the pooled text embedding width (second text encoder's
    projection); with the label embedding width it fixes the size of each time-id embedding.
    """
    spec: FamilySpec = family.spec
    config = bundled_config(family, "unet")
    heads = [spec.unet_heads_for(c) for c in sizes.block_out_channels]
    # diffusers only reads transformer_layers_per_block[-1] for the mid block, so a last level
    # without attention carries the mid block's depth there.
    depth = list(sizes.transformer_depth)
    if not sizes.attention_levels[-1]:
        depth[-1] = sizes.mid_transformer_depth
    elif depth[-1] != sizes.mid_transformer_depth:
        raise CheckpointError("UNet mid block depth differs from its last level's; unsupported layout")
    config.update(
        in_channels=sizes.in_channels,
        out_channels=sizes.out_channels,
        block_out_channels=list(sizes.block_out_channels),
        layers_per_block=sizes.layers_per_block,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in sizes.attention_levels],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(sizes.attention_levels)],
        transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else depth,
        # diffusers' "attention_head_dim" is, for these models, the number of heads (as published).
        attention_head_dim=heads[0] if spec.unet_num_heads is not None else heads,
        cross_attention_dim=sizes.cross_attention_dim,
        use_linear_projection=sizes.use_linear_projection,
    )
    if family is ModelFamily.SDXL:
        if sizes.projection_class_embeddings_input_dim is None or pooled_dim is None:
            raise CheckpointError("SDXL UNet without size conditioning (label_emb) or pooled text encoder")
        time_ids_width = sizes.projection_class_embeddings_input_dim - pooled_dim
        if time_ids_width <= 0 or time_ids_width % 6:
            raise CheckpointError("SDXL label embedding width does not match the second text encoder")
        config.update(
            projection_class_embeddings_input_dim=sizes.projection_class_embeddings_input_dim,
            addition_time_embed_dim=time_ids_width // 6,  # six time ids: size, crop, target size
        )
    elif sizes.projection_class_embeddings_input_dim is not None:
        raise CheckpointError(f"{family.label} UNet with a class/label embedding (e.g. unCLIP) is not supported")
    return config


def vae_config(family: ModelFamily, sizes: VaeSizes) -> dict[str, Any]:
    """Diffusers AutoencoderKL config; the latent scaling factor is the family's."""
    config = bundled_config(family, "vae")
    levels = len(sizes.block_out_channels)
    config.update(
        in_channels=sizes.in_channels,
        out_channels=sizes.out_channels,
        block_out_channels=list(sizes.block_out_channels),
        layers_per_block=sizes.layers_per_block,
        latent_channels=sizes.latent_channels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
    )
    return config


def text_encoder_config(family: ModelFamily, encoder: TextEncoderSpec, sizes: TextEncoderSizes) -> dict[str, Any]:
    """transformers CLIPTextConfig arguments for one of the family's text encoders."""
    config = bundled_config(family, encoder.config_name)
    config.update(
        hidden_size=sizes.hidden_size,
        num_hidden_layers=sizes.num_hidden_layers,
        intermediate_size=sizes.intermediate_size,
        vocab_size=sizes.vocab_size,
        max_position_embeddings=sizes.max_position_embeddings,
        num_attention_heads=family.spec.text_encoder_heads_for(sizes.hidden_size),
    )
    if encoder.with_projection:
        if sizes.projection_dim is None:
            raise CheckpointError("the second SDXL text encoder has no text projection")
        config["projection_dim"] = sizes.projection_dim
    return config


# ---------------------------------------------------------------------------------------------
# Empty models

TextEncoder = CLIPTextModel | CLIPTextModelWithProjection


def text_encoder_class(encoder: TextEncoderSpec) -> type[TextEncoder]:
    return CLIPTextModelWithProjection if encoder.with_projection else CLIPTextModel


def build_empty_model(
    kind: Literal["unet", "vae", "text_encoder"], config: Mapping[str, Any], encoder: TextEncoderSpec | None = None
) -> torch.nn.Module:
    """A model with its parameters on the meta device: no memory, no random init, real shapes."""
    with init_empty_weights():
        if kind == "unet":
            return UNet2DConditionModel.from_config(dict(config))
        if kind == "vae":
            return AutoencoderKL.from_config(dict(config))
        assert encoder is not None
        return text_encoder_class(encoder)(CLIPTextConfig(**config))
