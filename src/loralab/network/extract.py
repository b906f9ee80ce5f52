"""Extract a LoRA from the difference of two checkpoints of the same family.

For every module a LoRA would adapt (``find_lora_targets``; 3x3 convs too when a conv rank is
given) the weight delta ``tuned - base`` is factored by a truncated SVD: ``up = U[:, :r] diag(S[:r])``,
``down = Vh[:r]``, ``alpha = r`` (scale 1), so applying the file at multiplier 1 adds the best
rank-``r`` approximation of the delta. This follows sd-scripts' ``networks/extract_lora_from_models.py``:

- ``clamp_quantile=Q``: after the SVD, the entries of up and down (together) are clamped to
  ``[-h, h]`` with ``h`` the ``Q`` quantile of those entries (sd-scripts' default and ours: 0.99).
  It trims the few largest entries at the cost of a less exact delta; ``None`` turns it off.
- ``min_diff=D``: when no text-encoder weight differs by more than ``D`` (absolute, sd-scripts'
  default 0.01), the tuned model is taken to share the base's text encoder(s) and only the UNet is
  extracted. The UNet is always extracted, module for module.
- A rank larger than the delta's smaller dimension (for a 3x3 conv: of its ``out x in*9`` matrix)
  is cut to that dimension; sd-scripts cuts conv ranks at ``in`` channels already.
- The SVD is exact (``torch.linalg.svd``); sd-scripts' extract also uses the full SVD.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from loralab.errors import CheckpointError, LoraFileError
from loralab.models.family import ModelFamily
from loralab.models.loading import inspect_checkpoint, load_checkpoint
from loralab.network.lora import NetworkSpec
from loralab.network.lora_file import build_lora_metadata, save_lora_file
from loralab.network.targets import ModelParts, find_lora_target_details

logger = logging.getLogger(__name__)

DEFAULT_CLAMP_QUANTILE = 0.99
DEFAULT_MIN_DIFF = 0.01


@dataclass(frozen=True)
class ExtractedModule:
    """One module's LoRA factors (fp32) and the share of the delta's Frobenius norm they keep."""

    down: Tensor
    up: Tensor
    alpha: float
    fro_retained: float


def factor_delta(delta: Tensor, rank: int, clamp_quantile: float | None = DEFAULT_CLAMP_QUANTILE) -> ExtractedModule:
    """Rank-``rank`` LoRA factors of one weight delta (linear ``(out, in)`` or conv ``(out, in, kh, kw)``).

    A 3x3 conv is flattened to ``(out, in*kh*kw)``: its down becomes an ``(r, in, kh, kw)`` kernel and
    its up a 1x1 conv, the LoCon layout. A 1x1 conv keeps its 4-d shape with 1x1 kernels.
    """
    out_features = delta.shape[0]
    matrix = delta.reshape(out_features, -1).float()
    rank = max(1, min(rank, *matrix.shape))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if clamp_quantile is not None:
        up, down = _clamp_to_quantile(up, down, clamp_quantile)
    total = float(s.double().square().sum())
    kept = float(s[:rank].double().square().sum())
    if delta.dim() == 4:
        down = down.reshape(rank, *delta.shape[1:])
        up = up.reshape(out_features, rank, 1, 1)
    return ExtractedModule(
        down=down.contiguous(),
        up=up.contiguous(),
        alpha=float(rank),
        fro_retained=(kept / total) ** 0.5 if total > 0 else 1.0,
    )


def _clamp_to_quantile(up: Tensor, down: Tensor, quantile: float) -> tuple[Tensor, Tensor]:
    """Clamp up and down to +-(the ``quantile`` of their pooled entries), as sd-scripts does."""
    pooled = torch.cat([up.flatten(), down.flatten()])
    # numpy: torch.quantile refuses inputs above 2**24 entries, which large conv deltas can reach.
    high = float(np.quantile(pooled.numpy(), quantile))
    return up.clamp(-high, high), down.clamp(-high, high)


@dataclass
class ExtractResult:
    """The extracted file's tensors and metadata (ready for ``save_lora_file``) and per-module details."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    modules: dict[str, ExtractedModule] = field(default_factory=dict)
    text_encoder_skipped: bool = False

    def summary(self) -> str:
        """One line: modules per part and the mean Frobenius norm kept."""
        unet = sum(name.startswith("lora_unet_") for name in self.modules)
        mean_kept = sum(m.fro_retained for m in self.modules.values()) / max(1, len(self.modules))
        te = f"{len(self.modules) - unet} text encoder"
        if self.text_encoder_skipped:
            te = "text encoder unchanged, skipped"
        return f"{unet} UNet modules, {te}; mean Frobenius norm kept {mean_kept:.1%}"


def check_same_family(base_family: ModelFamily, tuned_family: ModelFamily, base: object, tuned: object) -> None:
    """Refuse to diff checkpoints of different families, naming both."""
    if base_family != tuned_family:
        raise CheckpointError(
            f"cannot extract a LoRA across model families: {base} is {ModelFamily(base_family).label} but "
            f"{tuned} is {ModelFamily(tuned_family).label}; use two checkpoints of the same family"
        )


def extract_lora(
    base: ModelParts,
    tuned: ModelParts,
    *,
    rank: int,
    conv_rank: int | None = None,
    clamp_quantile: float | None = DEFAULT_CLAMP_QUANTILE,
    min_diff: float = DEFAULT_MIN_DIFF,
    title: str = "extracted LoRA",
    v_prediction: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExtractResult:
    """A LoRA whose delta approximates ``tuned - base`` (both loaded components of one family).

    ``rank`` applies to linear and 1x1 layers, ``conv_rank`` (None: no conv LoRA) to 3x3 convs;
    see the module docstring for ``clamp_quantile`` and ``min_diff``. ``progress`` is called with
    each module name before it is factored (for a progress bar).

    Raises ``CheckpointError`` when the two models differ in family or architecture, and
    ``LoraFileError`` for a rank below 1 or a clamp quantile outside (0, 1].
    """
    check_same_family(base.family, tuned.family, "the base checkpoint", "the tuned checkpoint")
    _check_settings(rank, conv_rank, clamp_quantile)
    conv = conv_rank is not None
    base_targets = find_lora_target_details(base, conv=conv)
    tuned_targets = find_lora_target_details(tuned, conv=conv)
    if set(base_targets) != set(tuned_targets) or any(
        base_targets[name].module.weight.shape != tuned_targets[name].module.weight.shape for name in base_targets
    ):
        raise CheckpointError(
            "the base and tuned checkpoints have different architectures (layer names or sizes differ); "
            "extract needs a fine-tune of the base"
        )

    def delta(name: str) -> Tensor:
        return tuned_targets[name].module.weight.detach().float() - base_targets[name].module.weight.detach().float()

    text_encoder_names = [name for name, target in base_targets.items() if target.part == "text_encoder"]
    largest_te_change = max((float(delta(name).abs().max()) for name in text_encoder_names), default=0.0)
    skip_text_encoder = largest_te_change <= min_diff
    if skip_text_encoder and text_encoder_names:
        logger.info(
            "text encoder weights differ by at most %g (<= %g): extracting the UNet only", largest_te_change, min_diff
        )

    modules: dict[str, ExtractedModule] = {}
    tensors: dict[str, Tensor] = {}
    for name, target in base_targets.items():
        if target.part == "text_encoder" and skip_text_encoder:
            continue
        if progress is not None:
            progress(name)
        module_rank = conv_rank if (target.is_conv3x3 and conv_rank is not None) else rank
        extracted = factor_delta(delta(name), module_rank, clamp_quantile)
        modules[name] = extracted
        tensors[f"{name}.lora_down.weight"] = extracted.down
        tensors[f"{name}.lora_up.weight"] = extracted.up
        tensors[f"{name}.alpha"] = torch.tensor(extracted.alpha)

    # Alpha = rank everywhere (scale 1): the factors carry the delta's full size, as in sd-scripts.
    conv_alpha = None if conv_rank is None else float(conv_rank)
    spec = NetworkSpec(rank=rank, alpha=float(rank), conv_rank=conv_rank, conv_alpha=conv_alpha)
    metadata = build_lora_metadata(family=base.family, network=spec, title=title, v_prediction=v_prediction)
    metadata.setdefault("ss_network_args", "{}")  # sd-scripts' extract always writes its (maybe empty) args
    metadata["ss_training_comment"] = _extraction_comment(rank, conv_rank, clamp_quantile, skip_text_encoder)
    return ExtractResult(tensors, metadata, modules, bool(text_encoder_names) and skip_text_encoder)


def _check_settings(rank: int, conv_rank: int | None, clamp_quantile: float | None) -> None:
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise LoraFileError(f"extract ranks must be at least 1 (rank {rank}, conv rank {conv_rank})")
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise LoraFileError(
            f"the clamp quantile must be in (0, 1], got {clamp_quantile}; use none to turn clamping off"
        )


def _extraction_comment(rank: int, conv_rank: int | None, clamp_quantile: float | None, te_skipped: bool) -> str:
    parts = [f"extracted by SVD at rank {rank}" + (f" (conv {conv_rank})" if conv_rank is not None else "")]
    parts.append("no clamping" if clamp_quantile is None else f"clamp quantile {clamp_quantile:g}")
    if te_skipped:
        parts.append("text encoder unchanged, UNet only")
    return ", ".join(parts)


def extract_lora_file(
    base_path: str | Path,
    tuned_path: str | Path,
    out_path: str | Path,
    *,
    rank: int,
    conv_rank: int | None = None,
    clamp_quantile: float | None = DEFAULT_CLAMP_QUANTILE,
    min_diff: float = DEFAULT_MIN_DIFF,
    save_dtype: torch.dtype | str | None = None,
    load_dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> ExtractResult:
    """Load two checkpoints (any supported layout), extract the LoRA of their difference, save it.

    The families are compared from names and shapes before any weights are read, so a mismatch
    fails fast. ``save_dtype`` defaults to fp32 (``"fp16"``/``"bf16"`` halve the file);
    ``load_dtype`` is the precision the models are loaded in (fp32 keeps every bit of an fp32
    checkpoint; fp16 halves memory and is exact for fp16 checkpoints). Raises ``CheckpointError``
    for unreadable checkpoints or a family mismatch.
    """
    base_info = inspect_checkpoint(base_path)
    tuned_info = inspect_checkpoint(tuned_path)
    check_same_family(base_info.family, tuned_info.family, Path(base_path).name, Path(tuned_path).name)
    _check_settings(rank, conv_rank, clamp_quantile)
    base = load_checkpoint(base_path, dtype=load_dtype)
    tuned = load_checkpoint(tuned_path, dtype=load_dtype)
    result = extract_lora(
        base,
        tuned,
        rank=rank,
        conv_rank=conv_rank,
        clamp_quantile=clamp_quantile,
        min_diff=min_diff,
        title=Path(out_path).stem,
        v_prediction=tuned.v_prediction,
        progress=progress,
    )
    save_lora_file(out_path, result.tensors, result.metadata, save_dtype or torch.float32)
    return result
