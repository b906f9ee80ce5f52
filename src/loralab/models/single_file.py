"""Key conversion between the original single-file layout (LDM / SGM) and diffusers/transformers.

Original -> diffusers uses diffusers' own single-file converters, so we read files exactly as
diffusers does. Diffusers has no converters for the other direction, so those are written
here as tables: for each diffusers module prefix, the original module prefix and how the
leaf modules are renamed. They are checked by round trip against diffusers' converters.

All functions work on any tensors, including meta tensors (shapes only).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

from loralab.models.family import LDM_UNET_PREFIX, LDM_VAE_PREFIX, V_PREDICTION_MARKER, TextEncoderSpec

StateDict = dict[str, torch.Tensor]

# Leaf renames inside one module: (diffusers name, original name), applied to the key's start.
_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_OPEN_CLIP_LAYER = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
_NO_LEAVES: tuple[tuple[str, str], ...] = ()

ModuleMap = dict[str, tuple[str, tuple[tuple[str, str], ...]]]


def _rename(key: str, table: ModuleMap) -> str | None:
    """Original name of diffusers ``key`` via the longest module prefix in ``table``, or None."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            target, leaves = table[prefix]
            rest = ".".join(parts[cut:])
            for old, new in leaves:
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            return f"{target}.{rest}"
    return None


# ---------------------------------------------------------------------------------------------
# UNet


def unet_module_map(config: Mapping[str, Any]) -> ModuleMap:
    """Diffusers UNet module prefix -> (original ``input_blocks``-style prefix, leaf renames).

    The original UNet numbers its blocks in one sequence per side: ``input_blocks.0`` is
    conv_in, then each level has ``layers_per_block`` (resnet, attention) pairs and a
    downsampler; the output side has one pair more per level and its upsampler shares the
    last pair's block. Public so LoRA naming (SGM names for SDXL) can reuse it.
    """
    per_level = int(config["layers_per_block"])
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    table: ModuleMap = {
        "time_embedding.linear_1": ("time_embed.0", _NO_LEAVES),
        "time_embedding.linear_2": ("time_embed.2", _NO_LEAVES),
        "add_embedding.linear_1": ("label_emb.0.0", _NO_LEAVES),
        "add_embedding.linear_2": ("label_emb.0.2", _NO_LEAVES),
        "conv_in": ("input_blocks.0.0", _NO_LEAVES),
        "conv_norm_out": ("out.0", _NO_LEAVES),
        "conv_out": ("out.2", _NO_LEAVES),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", _NO_LEAVES),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
    }
    for level, block_type in enumerate(down_types):
        for layer in range(per_level):
            index = 1 + level * (per_level + 1) + layer
            table[f"down_blocks.{level}.resnets.{layer}"] = (f"input_blocks.{index}.0", _UNET_RESNET)
            if block_type.startswith("CrossAttn"):
                table[f"down_blocks.{level}.attentions.{layer}"] = (f"input_blocks.{index}.1", _NO_LEAVES)
        if level < len(down_types) - 1:
            index = (level + 1) * (per_level + 1)
            table[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", _NO_LEAVES)
    for level, block_type in enumerate(up_types):
        has_attention = block_type.startswith("CrossAttn")
        for layer in range(per_level + 1):
            index = level * (per_level + 1) + layer
            table[f"up_blocks.{level}.resnets.{layer}"] = (f"output_blocks.{index}.0", _UNET_RESNET)
            if has_attention:
                table[f"up_blocks.{level}.attentions.{layer}"] = (f"output_blocks.{index}.1", _NO_LEAVES)
        if level < len(up_types) - 1:
            index = level * (per_level + 1) + per_level
            slot = 2 if has_attention else 1
            table[f"up_blocks.{level}.upsamplers.0.conv"] = (f"output_blocks.{index}.{slot}.conv", _NO_LEAVES)
    return table


def diffusers_to_ldm_unet_name(name: str, config: Mapping[str, Any]) -> str:
    """Original (unprefixed) name of a diffusers UNet module or parameter ``name``."""
    renamed = _rename(name + ".", unet_module_map(config))
    if renamed is None:
        raise KeyError(f"no original UNet name for '{name}'")
    return renamed[:-1]


def unet_diffusers_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """Diffusers UNet state dict -> original keys (with the ``model.diffusion_model.`` prefix)."""
    table = unet_module_map(config)
    out: StateDict = {}
    for key, tensor in state.items():
        renamed = _rename(key, table)
        if renamed is None:
            raise KeyError(f"UNet key '{key}' has no original name")
        out[LDM_UNET_PREFIX + renamed] = tensor
    return out


def unet_ldm_to_diffusers(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """Original UNet keys (``model.diffusion_model.`` prefix) -> diffusers, via diffusers."""
    return convert_ldm_unet_checkpoint(dict(state), dict(config))


# ---------------------------------------------------------------------------------------------
# VAE


def _vae_module_map(config: Mapping[str, Any]) -> ModuleMap:
    levels = len(config["block_out_channels"])
    table: ModuleMap = {name: (name, _NO_LEAVES) for name in ("quant_conv", "post_quant_conv")}
    for side in ("encoder", "decoder"):
        table[f"{side}.conv_in"] = (f"{side}.conv_in", _NO_LEAVES)
        table[f"{side}.conv_out"] = (f"{side}.conv_out", _NO_LEAVES)
        table[f"{side}.conv_norm_out"] = (f"{side}.norm_out", _NO_LEAVES)
        table[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", _VAE_ATTENTION)
        for index in range(2):
            table[f"{side}.mid_block.resnets.{index}"] = (f"{side}.mid.block_{index + 1}", _VAE_RESNET)
    for level in range(levels):
        table[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (
            f"encoder.down.{level}.downsample.conv",
            _NO_LEAVES,
        )
        # The decoder's up blocks run from the lowest resolution; the original numbers them from the highest.
        original = levels - 1 - level
        table[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (
            f"decoder.up.{original}.upsample.conv",
            _NO_LEAVES,
        )
        for layer in range(int(config["layers_per_block"]) + 1):
            table[f"encoder.down_blocks.{level}.resnets.{layer}"] = (
                f"encoder.down.{level}.block.{layer}",
                _VAE_RESNET,
            )
            table[f"decoder.up_blocks.{level}.resnets.{layer}"] = (
                f"decoder.up.{original}.block.{layer}",
                _VAE_RESNET,
            )
    return table


def vae_diffusers_to_ldm(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = LDM_VAE_PREFIX
) -> StateDict:
    """Diffusers AutoencoderKL state dict -> original keys (``first_stage_model.`` by default)."""
    table = _vae_module_map(config)
    out: StateDict = {}
    for key, tensor in state.items():
        renamed = _rename(key, table)
        if renamed is None:
            raise KeyError(f"VAE key '{key}' has no original name")
        if ".mid.attn_1." in renamed and renamed.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # the original attention uses 1x1 convs
        out[prefix + renamed] = tensor
    return out


def vae_ldm_to_diffusers(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """Original VAE keys (``first_stage_model.``/``vae.`` prefix or none) -> diffusers, via diffusers."""
    return convert_ldm_vae_checkpoint(dict(state), dict(config))


# ---------------------------------------------------------------------------------------------
# Text encoders


def _flat(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop transformers' ``text_model.`` wrapper prefix (present only with a projection head)."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def _for_model_class(state: StateDict, with_projection: bool) -> StateDict:
    """Key names as the model class expects them: CLIPTextModel is flat, the projection model wraps."""
    flat = _flat(state)
    if not with_projection:
        return flat
    return {k if k == "text_projection.weight" else f"text_model.{k}": v for k, v in flat.items()}


def text_encoder_ldm_to_diffusers(state: Mapping[str, torch.Tensor], encoder: TextEncoderSpec) -> StateDict:
    """One text encoder's original keys (with ``encoder.ldm_prefix``) -> transformers keys, via diffusers."""
    own = {k: v for k, v in state.items() if k.startswith(encoder.ldm_prefix)}
    if encoder.layout == "hf_clip":
        converted = convert_ldm_clip_checkpoint(own)
        # position_ids is a non-persistent buffer in current transformers; old files carry it.
        converted.pop("text_model.embeddings.position_ids", None)
    else:
        width = own[encoder.ldm_prefix + "token_embedding.weight"].shape[1]
        # diffusers only asks the model for its width (when the file has no text projection).
        holder = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
        converted = convert_open_clip_checkpoint(holder, own, prefix=encoder.ldm_prefix)
        if not encoder.with_projection:
            converted.pop("text_projection.weight", None)
    return _for_model_class(converted, encoder.with_projection)


def text_encoder_diffusers_to_ldm(state: Mapping[str, torch.Tensor], encoder: TextEncoderSpec) -> StateDict:
    """transformers CLIP text encoder state dict -> original keys under ``encoder.ldm_prefix``."""
    flat = _flat(state)
    if encoder.layout == "hf_clip":
        return {f"{encoder.ldm_prefix}text_model.{k}": v for k, v in flat.items()}
    return _open_clip_from_transformers(flat, encoder.ldm_prefix)


def _open_clip_from_transformers(flat: StateDict, prefix: str) -> StateDict:
    direct = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layers = sorted({int(k.split(".")[2]) for k in flat if k.startswith("encoder.layers.")})
    layer_table: ModuleMap = {
        f"encoder.layers.{i}": (f"transformer.resblocks.{i}", _OPEN_CLIP_LAYER) for i in layers
    }
    out: StateDict = {}
    for key, tensor in flat.items():
        if key in direct:
            out[prefix + direct[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()  # OpenCLIP computes x @ P
        elif any(f".self_attn.{p}_proj." in key for p in "qkv"):
            continue  # fused below
        elif (renamed := _rename(key, layer_table)) is not None:
            out[prefix + renamed] = tensor
        else:
            raise KeyError(f"text encoder key '{key}' has no OpenCLIP name")
    for layer in layers:
        for kind in ("weight", "bias"):
            q, k, v = (flat[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv")
            # OpenCLIP (torch.nn.MultiheadAttention) stores q, k, v stacked in one projection.
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([q, k, v], dim=0)
    return out


# ---------------------------------------------------------------------------------------------
# Whole checkpoints


def to_single_file_state_dict(
    unet: tuple[Mapping[str, torch.Tensor], Mapping[str, Any]],
    vae: tuple[Mapping[str, torch.Tensor], Mapping[str, Any]],
    text_encoders: list[tuple[Mapping[str, torch.Tensor], TextEncoderSpec]],
    *,
    v_prediction: bool = False,
) -> StateDict:
    """One single-file (A1111 / LDM / SGM layout) state dict from diffusers-layout parts.

    ``unet`` and ``vae`` are (state dict, config); each text encoder is (state dict, its
    family spec entry). A v-prediction model gets the ``v_pred`` marker key that ComfyUI and
    others write, so the file says what it predicts.
    """
    state = unet_diffusers_to_ldm(*unet)
    state.update(vae_diffusers_to_ldm(*vae))
    for encoder_state, encoder in text_encoders:
        state.update(text_encoder_diffusers_to_ldm(encoder_state, encoder))
    if v_prediction:
        state[V_PREDICTION_MARKER] = torch.zeros(0)
    return state
