"""Text conditioning for the UNet: tokenising captions and encoding them as sd-scripts does.

One path serves every family; the branches are the places where the families differ:

- Tokens: captions are padded to ``max_token_length + 2`` (77 by default) and, for 150 or
  225 tokens, cut into 75-token chunks that each get the BOS token and an end token, so
  each chunk fits the 77-position CLIP encoder. Where the tokenizer pads with a token other
  than EOS (SD2, SDXL's second encoder) a chunk that ends mid-text gets EOS as its last
  token, and an empty chunk gets EOS right after BOS (sd-scripts' rules).
- SD1/SD2 hidden states: ``clip_skip`` None or 1 takes the last layer; ``clip_skip = n``
  takes ``hidden_states[-n]`` and applies the encoder's final layer norm.
- SDXL: the penultimate layer of both encoders, without the final layer norm, concatenated
  on the feature axis; the pooled embedding is the second encoder's EOS hidden state
  through its projection, from each caption's first chunk; ``clip_skip`` does not apply
  (sd-scripts ignores it for SDXL with a warning, so kohya SDXL configs that set it still run).
- Chunks are joined back into one sequence: the first chunk's BOS, the 75 inner positions
  of every chunk, and the last chunk's final position (77, 152 or 227 positions).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loralab.errors import ConfigError
from loralab.models.family import ModelFamily

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77  # positions of the CLIP text encoder, BOS and EOS included
CHUNK_TOKENS = CLIP_MAX_LENGTH - 2  # caption tokens per chunk
ALLOWED_MAX_TOKEN_LENGTHS = (75, 150, 225)


@dataclass(frozen=True)
class TextConditioning:
    """Encoder output for a batch: what the UNet's cross-attention (and SDXL's add-embedding) read."""

    encoder_hidden_states: torch.Tensor  # (B, 77 | 152 | 227, D)
    pooled: torch.Tensor | None = None  # SDXL only: (B, projection_dim)

    def unet_kwargs(self, time_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """Keyword arguments for ``UNet2DConditionModel.forward`` (SDXL also needs ``time_ids``)."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.pooled is not None:
            if time_ids is None:
                raise ValueError("SDXL conditioning needs time_ids (see sdxl_time_ids)")
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": time_ids}
        return kwargs


def normalize_max_token_length(max_token_length: int | None) -> int:
    """75 (the default, also for None), 150 or 225; anything else is a ``ConfigError``."""
    length = CHUNK_TOKENS if max_token_length is None else int(max_token_length)
    if length not in ALLOWED_MAX_TOKEN_LENGTHS:
        raise ConfigError(f"max_token_length={max_token_length} is not supported; use 75, 150 or 225")
    return length


def effective_clip_skip(family: ModelFamily, clip_skip: int | None) -> int | None:
    """The clip skip the encoder will use: ``clip_skip`` for SD1/SD2, None for SDXL.

    SDXL always uses both encoders' penultimate layers; kohya SDXL configs often carry
    ``clip_skip`` 1 or 2 anyway, so only other values are logged as ignored.
    """
    if clip_skip is not None and clip_skip < 1:
        raise ConfigError(f"clip_skip={clip_skip} must be 1 or more (1 = last layer)")
    if family == ModelFamily.SDXL:
        if clip_skip not in (None, 1, 2):
            logger.warning("clip_skip=%s is ignored for SDXL: it always uses the penultimate layer", clip_skip)
        return None
    return clip_skip


def chunk_token_ids(input_ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Split one padded caption ``(L,)`` (BOS first, ``L = 75 * n + 2``) into ``(n, 77)`` encoder inputs."""
    length = input_ids.shape[0]
    num_chunks = (length - 2) // CHUNK_TOKENS
    if num_chunks * CHUNK_TOKENS + 2 != length:
        raise ValueError(f"token sequence of length {length} is not 75 * n + 2")
    chunks = []
    for k in range(num_chunks):
        inner = input_ids[1 + k * CHUNK_TOKENS : 1 + (k + 1) * CHUNK_TOKENS]
        chunk = torch.cat([input_ids[:1], inner, input_ids[-1:]])
        if pad_id != eos_id:
            # Text runs to the chunk's end: close it with EOS. Empty chunk: EOS right after BOS.
            if chunk[-2] != eos_id and chunk[-2] != pad_id:
                chunk[-1] = eos_id
            if chunk[1] == pad_id:
                chunk[1] = eos_id
        chunks.append(chunk)
    return torch.stack(chunks)


def tokenize_captions(tokenizer: Any, captions: Sequence[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids ``(B, n_chunks, 77)`` for a batch of captions (``n_chunks`` = 1, 2 or 3)."""
    padded_length = normalize_max_token_length(max_token_length) + 2
    input_ids = tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=padded_length, return_tensors="pt"
    ).input_ids
    return torch.stack(
        [
            chunk_token_ids(ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
            for ids in input_ids
        ]
    )


def _unwrap(text_encoder: Any) -> Any:
    """The encoder itself when a data-parallel wrapper holds it (submodules live on ``.module``)."""
    return getattr(text_encoder, "module", text_encoder)


def _final_layer_norm(text_encoder: Any) -> torch.nn.Module:
    # transformers 5 dropped the ``text_model`` wrapper from CLIPTextModel but kept it in the
    # projection model; both keep ``final_layer_norm`` on the transformer itself.
    encoder = _unwrap(text_encoder)
    return getattr(encoder, "text_model", encoder).final_layer_norm


def _merge_chunks(hidden: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B * n, 77, D) -> (B, 75 * n + 2, D): first BOS, every chunk's inner positions, last end token."""
    hidden = hidden.reshape(batch_size, -1, CLIP_MAX_LENGTH, hidden.shape[-1])
    num_chunks = hidden.shape[1]
    if num_chunks == 1:
        return hidden[:, 0]
    inner = hidden[:, :, 1:-1].reshape(batch_size, num_chunks * CHUNK_TOKENS, hidden.shape[-1])
    return torch.cat([hidden[:, 0, :1], inner, hidden[:, -1, -1:]], dim=1)


def _run_encoder(text_encoder: Any, flat_ids: torch.Tensor, layer_from_end: int, final_norm: bool):
    """Hidden states of layer ``-layer_from_end`` (optionally final-normed) and the last hidden state."""
    device = next(text_encoder.parameters()).device
    output = text_encoder(flat_ids.to(device), output_hidden_states=layer_from_end > 1, return_dict=True)
    if layer_from_end == 1:
        return output.last_hidden_state, output.last_hidden_state
    hidden = output.hidden_states[-layer_from_end]
    if final_norm:
        hidden = _final_layer_norm(text_encoder)(hidden)
    return hidden, output.last_hidden_state


def _eos_pooled(text_encoder: Any, last_hidden_state: torch.Tensor, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Projected hidden state at each row's first EOS (sd-scripts' ``pool_workaround``).

    CLIP's own pooling picks the highest token id, which is wrong once added tokens exceed
    the EOS id; the EOS position is what SDXL was trained with.
    """
    eos_index = (ids == eos_id).int().argmax(dim=1).to(last_hidden_state.device)
    rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
    pooled = last_hidden_state[rows, eos_index]
    projection = _unwrap(text_encoder).text_projection
    return projection(pooled.to(projection.weight.dtype)).to(last_hidden_state.dtype)


def encode_text(
    family: ModelFamily,
    text_encoders: Sequence[Any],
    input_ids: Sequence[torch.Tensor],
    *,
    eos_token_ids: Sequence[int],
    clip_skip: int | None = None,
    dtype: torch.dtype | None = None,
) -> TextConditioning:
    """Encode token ids ``(B, n, 77)`` (one tensor per encoder) into UNet conditioning.

    ``eos_token_ids`` are the tokenizers' EOS ids (used for SDXL's pooled output);
    ``dtype`` casts the outputs (the UNet's compute dtype). Raises ``ConfigError`` for a
    ``clip_skip`` deeper than the encoder, ``ValueError`` when the number of encoders does
    not match the family.
    """
    expected = 2 if family == ModelFamily.SDXL else 1
    if len(text_encoders) != expected or len(input_ids) != expected:
        raise ValueError(f"{family.value} needs {expected} text encoder(s) and token tensors")
    batch_size = input_ids[0].shape[0]

    if family == ModelFamily.SDXL:
        flat1 = input_ids[0].reshape(-1, CLIP_MAX_LENGTH)
        flat2 = input_ids[1].reshape(-1, CLIP_MAX_LENGTH)
        hidden1, _ = _run_encoder(text_encoders[0], flat1, layer_from_end=2, final_norm=False)
        hidden2, last2 = _run_encoder(text_encoders[1], flat2, layer_from_end=2, final_norm=False)
        num_chunks = input_ids[1].shape[1]
        pooled = _eos_pooled(text_encoders[1], last2, flat2, eos_token_ids[1])[::num_chunks]
        hidden = torch.cat([_merge_chunks(hidden1, batch_size), _merge_chunks(hidden2, batch_size)], dim=-1)
    else:
        layers = _unwrap(text_encoders[0]).config.num_hidden_layers
        if (clip_skip or 1) > layers:
            raise ConfigError(f"clip_skip={clip_skip} is more than the text encoder's {layers} layers; use 1 or 2")
        flat = input_ids[0].reshape(-1, CLIP_MAX_LENGTH)
        hidden, _ = _run_encoder(text_encoders[0], flat, layer_from_end=clip_skip or 1, final_norm=True)
        hidden = _merge_chunks(hidden, batch_size)
        pooled = None

    if dtype is not None:
        hidden = hidden.to(dtype)
        pooled = pooled.to(dtype) if pooled is not None else None
    return TextConditioning(encoder_hidden_states=hidden, pooled=pooled)


def sdxl_time_ids(
    original_sizes_hw: torch.Tensor, crop_top_lefts: torch.Tensor, target_sizes_hw: torch.Tensor
) -> torch.Tensor:
    """SDXL's size/crop conditioning ``(B, 6)``: original (h, w), crop (top, left), target (h, w)."""
    parts = (original_sizes_hw, crop_top_lefts, target_sizes_hw)
    return torch.cat([torch.as_tensor(p, dtype=torch.float32).reshape(-1, 2) for p in parts], dim=1)
