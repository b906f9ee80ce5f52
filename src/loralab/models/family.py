"""Model families (SD1.x, SD2.x, SDXL) and how to recognise them from tensor names and shapes.

A checkpoint's family is never taken from its file name: the original (LDM / SGM) layout
names each text encoder differently, and the UNet itself differs in small visible ways
(SD1 uses 1x1-conv ``proj_in`` layers, SD2 and SDXL linear ones; SDXL has a ``label_emb`` for
its size conditioning). Those facts, and the per-family rules that cannot be read from
shapes (attention head counts, tokenizer padding), live here in one table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from loralab.errors import CheckpointError

# Prefixes of the original single-file layout (CompVis LDM for SD1/SD2, Stability SGM for SDXL).
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
V_PREDICTION_MARKER = "v_pred"
"""Key that ComfyUI and others store (an empty tensor) in v-prediction single-file checkpoints."""


class ModelFamily(str, Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"

    @property
    def spec(self) -> FamilySpec:
        return _SPECS[self]

    @property
    def label(self) -> str:
        return {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[self.value]


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family: where it lives in a single file and how it is built."""

    ldm_prefix: str
    layout: Literal["hf_clip", "open_clip"]  # transformers-style CLIP keys, or OpenCLIP's fused-qkv keys
    with_projection: bool  # CLIPTextModelWithProjection (its pooled output feeds SDXL's UNet)
    pad_with_eos: bool  # OpenAI CLIP pads with <|endoftext|>; OpenCLIP pads with "!" (id 0)
    config_name: str  # key of its config in the bundled family JSON (= diffusers subfolder name)
    tokenizer_name: str  # diffusers subfolder holding its tokenizer


@dataclass(frozen=True)
class FamilySpec:
    """What a family is made of, plus the rules shapes alone cannot tell."""

    text_encoders: tuple[TextEncoderSpec, ...]
    # Attention heads are invisible in the weights: SD1 uses 8 heads per block, SD2 and SDXL
    # 64 channels per head. Exactly one of the two is set.
    unet_num_heads: int | None
    unet_head_channels: int | None
    text_encoder_head_channels: int  # CLIP-L, OpenCLIP-H and -bigG all use 64
    supports_v_prediction: bool

    def unet_heads_for(self, channels: int) -> int:
        """Heads of an attention block with ``channels`` channels (at least one, for tiny models)."""
        if self.unet_num_heads is not None:
            return self.unet_num_heads
        assert self.unet_head_channels is not None
        return max(1, channels // self.unet_head_channels)

    def text_encoder_heads_for(self, hidden_size: int) -> int:
        return max(1, hidden_size // self.text_encoder_head_channels)


_CLIP_L_SD1 = TextEncoderSpec("cond_stage_model.transformer.", "hf_clip", False, True, "text_encoder", "tokenizer")
_OPEN_CLIP_H = TextEncoderSpec("cond_stage_model.model.", "open_clip", False, False, "text_encoder", "tokenizer")
_CLIP_L_SDXL = TextEncoderSpec(
    "conditioner.embedders.0.transformer.", "hf_clip", False, True, "text_encoder", "tokenizer"
)
_OPEN_CLIP_BIGG = TextEncoderSpec(
    "conditioner.embedders.1.model.", "open_clip", True, False, "text_encoder_2", "tokenizer_2"
)

_SPECS: dict[ModelFamily, FamilySpec] = {
    ModelFamily.SD1: FamilySpec((_CLIP_L_SD1,), 8, None, 64, supports_v_prediction=False),
    ModelFamily.SD2: FamilySpec((_OPEN_CLIP_H,), None, 64, 64, supports_v_prediction=True),
    ModelFamily.SDXL: FamilySpec((_CLIP_L_SDXL, _OPEN_CLIP_BIGG), None, 64, 64, supports_v_prediction=True),
}


def _has_prefix(keys: Any, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def detect_family(state_dict: Mapping[str, Any]) -> ModelFamily:
    """Tell SD1 / SD2 / SDXL apart from tensor names and shapes only.

    Accepts a single-file (LDM/SGM) state dict, or a diffusers-layout UNet state dict (keys
    like ``down_blocks.0...``, optionally prefixed with ``unet.``). Values only need a
    ``.shape`` (meta tensors are fine). Raises ``CheckpointError`` when the tensors fit none.
    """
    keys = list(state_dict.keys())
    # The text encoders' layouts are the clearest signature of a single-file checkpoint.
    if _has_prefix(keys, _OPEN_CLIP_BIGG.ldm_prefix):
        return ModelFamily.SDXL
    if _has_prefix(keys, "conditioner.embedders.0.model."):
        raise CheckpointError(
            "this is an SDXL refiner checkpoint, which is not supported; use an SDXL base checkpoint"
        )
    if _has_prefix(keys, _OPEN_CLIP_H.ldm_prefix):
        return ModelFamily.SD2
    if _has_prefix(keys, _CLIP_L_SD1.ldm_prefix):
        return ModelFamily.SD1
    # No text encoder: decide from the UNet alone (LDM or diffusers names).
    unet = {k.removeprefix("unet.").removeprefix(LDM_UNET_PREFIX): v for k, v in state_dict.items()}
    if "label_emb.0.0.weight" in unet or "add_embedding.linear_1.weight" in unet:
        return ModelFamily.SDXL
    proj_in = [v for k, v in unet.items() if k.endswith(".proj_in.weight")]
    if proj_in:
        # SD2 and SDXL project into the transformer with Linear layers, SD1 with 1x1 convs.
        return ModelFamily.SD2 if len(proj_in[0].shape) == 2 else ModelFamily.SD1
    raise CheckpointError(
        "cannot tell the model family: no SD1/SD2/SDXL text encoder or UNet attention weights found"
    )


def is_lora_keys(keys: list[str]) -> bool:
    """kohya (``lora_unet_*``), diffusers or PEFT LoRA tensor names."""
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys) or any(
        ".lora_down." in k or ".lora_A." in k or ".lora.down." in k for k in keys
    )


def describe_non_checkpoint(keys: list[str]) -> str | None:
    """If these keys are plainly some other kind of file than a full checkpoint, say which.

    Returns the end of a one-line message (what the file is and what to do), or None.
    """
    if is_lora_keys(keys):
        return "is a LoRA file, not a model checkpoint; give a full checkpoint here and apply the LoRA on top of it"
    if any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") for k in keys):
        return "is a textual-inversion embedding, not a model checkpoint"
    has_unet = _has_prefix(keys, LDM_UNET_PREFIX)
    if not has_unet and any(k.startswith(("encoder.down.", "first_stage_model.encoder.")) for k in keys):
        return (
            "is a VAE, not a full checkpoint; give a full checkpoint here and the VAE as its own setting "
            "(--vae, or vae in a training config)"
        )
    if not has_unet and any(k.startswith(("down_blocks.", "encoder.down_blocks.")) for k in keys):
        return "holds one diffusers model's weights; pass the whole diffusers folder (with model_index.json)"
    if not has_unet:
        preview = ", ".join(sorted(keys)[:3]) or "no tensors at all"
        return (
            f"is not a Stable Diffusion checkpoint: no UNet weights ({LDM_UNET_PREFIX}*) found (keys: {preview})"
        )
    return None
