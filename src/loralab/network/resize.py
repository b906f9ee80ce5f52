"""Resize a LoRA to a lower rank by SVD of each module's weight delta.

Each module's delta is ``scale * up @ down`` with ``scale = alpha / rank``. Its best rank-``k``
approximation (Eckart-Young) is the truncated SVD ``U[:, :k] diag(S[:k]) Vh[:k]``; the resized
module stores ``up = U[:, :k] diag(S[:k])``, ``down = Vh[:k]`` and keeps the module's scale, so
``new_alpha = scale * k`` -- the rule sd-scripts' ``networks/resize_lora.py`` follows, which means
a resized file applies with the same multiplier the original needed.

Ranks are chosen per module, either fixed or dynamically from the singular values, with the
definitions of sd-scripts' resize script (``S`` sorted descending, ``k`` the new rank):

- ``sv_ratio=R``: keep every singular value larger than ``S[0] / R``.
- ``sv_cumulative=T``: the smallest ``k`` with ``sum(S[:k]) / sum(S) >= T``.
- ``sv_fro=T``: the smallest ``k`` with ``sqrt(sum(S[:k]**2) / sum(S**2)) >= T``, i.e. the
  truncated delta keeps at least the fraction ``T`` of the delta's Frobenius norm.

A module whose largest singular value is at most ``1e-6`` (an all-zero delta, e.g. a text-encoder
layer that clip skip never trained) is kept at rank 1, as sd-scripts does.

Where we differ from sd-scripts, on purpose:

- The SVD is exact and cheap: ``up @ down`` has rank at most ``r``, so we factor ``up = Qu Ru`` and
  ``down.T = Qd Rd`` (QR) and take the SVD of the ``r x r`` core ``Ru Rd.T`` instead of the full
  ``out x in`` product (sd-scripts uses a full SVD, or a randomised one above 2048 features).
- A module never grows: its new rank is capped at its old rank (extra singular values of a rank-``r``
  product are zero and would only make the file bigger). With ``--dynamic``, the cap is ``--rank``
  when given, else the module's old rank (sd-scripts caps at ``--new_rank``, default 4).
- Only 3x3 convolutions (LoCon) take ``conv_rank``; 1x1 convolutions are resized with ``rank`` like
  the linear layers they stand for, matching how sd-scripts *trains* them (its resize script
  treats every 4-d weight as a conv).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor

from loralab.errors import LoraFileError
from loralab.network.lora_file import LoraFile, read_lora_file, save_lora_file

DynamicMethod = Literal["sv_ratio", "sv_fro", "sv_cumulative"]
DYNAMIC_METHODS: tuple[str, ...] = get_args(DynamicMethod)

# Below this largest singular value a module's delta counts as zero (sd-scripts' MIN_SV).
ZERO_SINGULAR_VALUE = 1e-6


@dataclass(frozen=True)
class RankRule:
    """How to choose each module's new rank.

    ``rank`` is the fixed rank (or, with ``method``, the largest rank allowed); ``conv_rank`` does the
    same for 3x3 convolutions and defaults to ``rank``. ``method``/``param`` select a dynamic rule.
    """

    rank: int | None = None
    conv_rank: int | None = None
    method: DynamicMethod | None = None
    param: float | None = None

    def __post_init__(self) -> None:
        if self.method is None and self.rank is None:
            raise LoraFileError(
                "resize needs a target rank or a dynamic method: give --rank N or --dynamic METHOD=VALUE"
            )
        for name, value in (("rank", self.rank), ("conv rank", self.conv_rank)):
            if value is not None and value < 1:
                raise LoraFileError(f"the {name} must be at least 1, got {value}")
        if self.method is not None:
            if self.method not in DYNAMIC_METHODS:
                raise LoraFileError(
                    f"unknown dynamic resize method {self.method!r}: use one of {', '.join(DYNAMIC_METHODS)}"
                )
            if self.param is None or not math.isfinite(self.param) or self.param <= 0:
                example = f"{self.method}={_EXAMPLE_PARAM[self.method]}"
                raise LoraFileError(f"{self.method} needs a positive value, e.g. {example}")
            if self.method != "sv_ratio" and self.param > 1:
                raise LoraFileError(f"{self.method} is a fraction in (0, 1], got {self.param}")

    def max_rank(self, *, is_conv3x3: bool) -> int | None:
        """The most rank a module may keep under this rule (``None``: its old rank)."""
        if is_conv3x3 and self.conv_rank is not None:
            return self.conv_rank
        return self.rank

    def describe(self) -> str:
        """A short human description, e.g. ``rank 8 (conv 4)`` or ``sv_fro=0.9``."""
        if self.method is not None:
            text = f"{self.method}={self.param:g}"
            return text if self.rank is None else f"{text} (max rank {self.rank})"
        if self.conv_rank is not None and self.conv_rank != self.rank:
            return f"rank {self.rank} (conv {self.conv_rank})"
        return f"rank {self.rank}"


_EXAMPLE_PARAM = {"sv_ratio": "20", "sv_fro": "0.9", "sv_cumulative": "0.9"}


def parse_dynamic(text: str) -> tuple[DynamicMethod, float]:
    """Parse ``METHOD=VALUE`` (e.g. ``sv_fro=0.9``) as given to ``lora resize --dynamic``."""
    method, sep, value = text.partition("=")
    method = method.strip()
    if not sep or method not in DYNAMIC_METHODS:
        raise LoraFileError(
            f"--dynamic takes METHOD=VALUE with METHOD one of {', '.join(DYNAMIC_METHODS)}, got {text!r}"
        )
    try:
        param = float(value)
    except ValueError:
        raise LoraFileError(f"--dynamic {method} needs a number, got {value!r}") from None
    return method, param  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Rank selection on a spectrum


def dynamic_rank(singular_values: Tensor, method: DynamicMethod, param: float) -> int:
    """The rank that ``method=param`` keeps for a spectrum sorted in descending order (>= 1)."""
    s = singular_values.double()
    count = s.numel()
    if method == "sv_ratio":
        keep = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        keep = _first_reaching(torch.cumsum(s, 0) / s.sum(), param)
    elif method == "sv_fro":
        squares = s.square()
        # Compare squared fractions: sqrt is monotonic, so the answer is the same without rounding it.
        keep = _first_reaching(torch.cumsum(squares, 0) / squares.sum(), param * param)
    else:  # RankRule validates names; this guards direct calls
        raise LoraFileError(f"unknown dynamic resize method {method!r}")
    return max(1, min(keep, count))


def _first_reaching(fractions: Tensor, target: float) -> int:
    """How many leading entries are needed until the running fraction reaches ``target``."""
    reached = torch.nonzero(fractions >= target)
    # Rounding can leave the last cumulative fraction a hair below 1.0: then everything is kept.
    return int(reached[0]) + 1 if reached.numel() else fractions.numel()


def choose_rank(singular_values: Tensor, old_rank: int, rule: RankRule, *, is_conv3x3: bool) -> int:
    """The new rank of one module: the rule's rank or dynamic choice, capped at the old rank."""
    if float(singular_values[0]) <= ZERO_SINGULAR_VALUE:
        return 1
    cap = rule.max_rank(is_conv3x3=is_conv3x3) or old_rank
    wanted = dynamic_rank(singular_values, rule.method, rule.param) if rule.method else cap  # type: ignore[arg-type]
    return max(1, min(wanted, cap, old_rank))


# ---------------------------------------------------------------------------------------------
# One module


def as_matrices(down: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """``down`` and ``up`` as 2-d fp32 matrices whose product is the (flattened) weight delta.

    A conv LoRA's down is a ``(r, in, kh, kw)`` kernel and its up a ``(out, r, 1, 1)`` 1x1 conv; the
    delta of the adapted conv is ``up.view(out, r) @ down.view(r, in * kh * kw)`` reshaped to
    ``(out, in, kh, kw)``.
    """
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise LoraFileError(f"LoRA up/down ranks differ ({up.shape[1]} vs {rank}): the file is damaged")
    return down.reshape(rank, -1).float(), up.reshape(up.shape[0], rank).float()


def lowrank_svd(down: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD ``U, S, Vh`` of ``up @ down`` (2-d, rank ``r``) from an ``r x r`` problem.

    ``up = Qu Ru`` and ``down.T = Qd Rd`` give ``up @ down = Qu (Ru Rd.T) Qd.T``; the SVD
    ``Ru Rd.T = u S vh`` turns into ``U = Qu u`` and ``Vh = vh Qd.T``. Only ``min(r, out, in)``
    singular values exist; the rest are exactly zero.
    """
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return (q_up @ u).float(), s.float(), (vh @ q_down.T).float()


@dataclass
class ResizedModule:
    """A module after resizing, with how much of its delta survived."""

    down: Tensor
    up: Tensor
    alpha: float
    old_rank: int
    new_rank: int
    fro_retained: float  # ||truncated delta||_F / ||delta||_F (1.0 for an all-zero delta)


def resize_module(down: Tensor, up: Tensor, alpha: float | None, rule: RankRule) -> ResizedModule:
    """Resize one LoRA module (linear, 1x1 or 3x3 conv) under ``rule``; returns fp32 tensors.

    ``alpha`` ``None`` or 0 means ``alpha = rank`` (scale 1), the convention of files without alpha.
    """
    old_rank = down.shape[0]
    scale = (alpha / old_rank) if alpha else 1.0
    is_conv3x3 = down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
    down_2d, up_2d = as_matrices(down, up)
    u, s, vh = lowrank_svd(down_2d, up_2d)
    new_rank = choose_rank(s, old_rank, rule, is_conv3x3=is_conv3x3)

    # The singular values go into up and down stays orthonormal, so the kept alpha/rank scale applies.
    new_up = u[:, :new_rank] * s[:new_rank]
    new_down = vh[:new_rank]
    total = float(s.double().square().sum())
    kept = float(s[:new_rank].double().square().sum())
    return ResizedModule(
        down=new_down.reshape(new_rank, *down.shape[1:]).contiguous(),
        up=new_up.reshape(up.shape[0], new_rank, *up.shape[2:]).contiguous(),
        alpha=scale * new_rank,
        old_rank=old_rank,
        new_rank=new_rank,
        fro_retained=math.sqrt(kept / total) if total > 0 else 1.0,
    )


# ---------------------------------------------------------------------------------------------
# A whole file


@dataclass
class ResizeResult:
    """The resized file's tensors and metadata (ready for ``save_lora_file``) and per-module details."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    modules: dict[str, ResizedModule] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: module count, old -> new ranks and the mean Frobenius norm kept."""
        old = sorted({m.old_rank for m in self.modules.values()})
        new = sorted({m.new_rank for m in self.modules.values()})
        mean_kept = sum(m.fro_retained for m in self.modules.values()) / max(1, len(self.modules))
        return (
            f"{len(self.modules)} modules, rank {_range_text(old)} -> {_range_text(new)}, "
            f"mean Frobenius norm kept {mean_kept:.1%}"
        )


def _range_text(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"


def resize_lora(lora: LoraFile, rule: RankRule) -> ResizeResult:
    """Resize every module of ``lora`` under ``rule``; see the module docstring for the maths.

    Raises ``LoraFileError`` when the file holds weights other than plain LoRA pairs (LoHa, LoKr,
    DoRA parts): resizing would have to drop them.
    """
    if lora.unsupported_keys:
        raise LoraFileError(
            f"{lora.label} holds {len(lora.unsupported_keys)} entries that are not plain LoRA weights "
            f"(e.g. {lora.unsupported_keys[0]}); only kohya LoRA/LoCon files can be resized"
        )
    weights = lora.modules()
    if rule.method is None:
        _check_lowers_some_rank(weights, rule, lora.label)
    tensors: dict[str, Tensor] = {}
    modules: dict[str, ResizedModule] = {}
    for name, (down, up, alpha) in weights.items():
        resized = resize_module(down, up, alpha, rule)
        modules[name] = resized
        tensors[f"{name}.lora_down.weight"] = resized.down
        tensors[f"{name}.lora_up.weight"] = resized.up
        tensors[f"{name}.alpha"] = torch.tensor(resized.alpha)
    metadata = _resized_metadata(lora.metadata, modules, rule)
    return ResizeResult(tensors, metadata, modules)


def _check_lowers_some_rank(weights: dict, rule: RankRule, label: str) -> None:
    """A fixed rank that lowers no module would only rewrite the file: say so instead."""
    for down, _up, _alpha in weights.values():
        is_conv3x3 = down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
        if (rule.max_rank(is_conv3x3=is_conv3x3) or down.shape[0]) < down.shape[0]:
            return
    ranks = sorted({int(down.shape[0]) for down, _up, _alpha in weights.values()})
    raise LoraFileError(
        f"{rule.describe()} lowers no module of {label} (its ranks: {', '.join(map(str, ranks))}); "
        "resize only lowers ranks: give a smaller --rank"
    )


def _resized_metadata(old: dict[str, str], modules: dict[str, ResizedModule], rule: RankRule) -> dict[str, str]:
    """The old metadata with the network size fields updated and the resize recorded.

    Fixed rank: ``ss_network_dim``/``ss_network_alpha`` (and ``conv_dim``/``conv_alpha`` in
    ``ss_network_args``) become the most common new rank/alpha of the linear (conv) modules, which is
    what sd-scripts writes for a uniformly ranked file. Dynamic: ``"Dynamic"``, as sd-scripts.
    """
    metadata = {key: value for key, value in old.items() if not key.startswith("sshs_")}
    linear = [m for m in modules.values() if not _is_conv3x3(m)]
    conv = [m for m in modules.values() if _is_conv3x3(m)]
    old_rank = max((m.old_rank for m in modules.values()), default=0)

    def size_fields(group: list[ResizedModule]) -> tuple[str, str] | None:
        if not group:
            return None
        if rule.method is not None:
            return "Dynamic", "Dynamic"
        rank = _most_common([m.new_rank for m in group])
        alpha = _most_common([m.alpha for m in group if m.new_rank == rank])
        return str(rank), str(float(alpha))

    if fields := size_fields(linear):
        metadata["ss_network_dim"], metadata["ss_network_alpha"] = fields
    conv_fields = size_fields(conv)
    if conv_fields and "ss_network_args" in metadata:
        try:
            args = json.loads(metadata["ss_network_args"])
        except ValueError:
            args = None
        if isinstance(args, dict) and "conv_dim" in args:
            args["conv_dim"], args["conv_alpha"] = conv_fields
            metadata["ss_network_args"] = json.dumps(args)

    description = f"resized from rank {old_rank} to {rule.describe()}"
    comment = metadata.get("ss_training_comment", "")
    metadata["ss_training_comment"] = f"{description}; {comment}" if comment else description
    mean_kept = sum(m.fro_retained for m in modules.values()) / max(1, len(modules))
    metadata["loralab_resize"] = json.dumps(
        {
            "from_rank": old_rank,
            "rank": rule.rank,
            "conv_rank": rule.conv_rank,
            "dynamic_method": rule.method,
            "dynamic_param": rule.param,
            "mean_fro_retained": round(mean_kept, 6),
        }
    )
    return metadata


def _is_conv3x3(module: ResizedModule) -> bool:
    return module.down.dim() == 4 and tuple(module.down.shape[2:]) != (1, 1)


def _most_common(values: list[float]) -> float:
    counts: dict[float, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return max(counts, key=lambda value: (counts[value], value))


def resize_lora_file(
    source: str | Path,
    target: str | Path,
    rule: RankRule,
    *,
    save_dtype: torch.dtype | str | None = None,
) -> ResizeResult:
    """Read ``source`` (kohya or PEFT format), resize it under ``rule`` and write ``target``
    atomically in kohya format.

    ``save_dtype`` (``"fp16"``, ``"bf16"``, ``"fp32"`` or a torch dtype) defaults to the dtype of the
    source's weights. The hashes (``sshs_*``) are recomputed for the new tensors by the writer.
    Raises ``LoraFileError`` for unreadable or non-LoRA input (see ``read_lora_file``).
    """
    lora = read_lora_file(source)
    result = resize_lora(lora, rule)
    if save_dtype is None:
        save_dtype = next(iter(lora.modules().values())).down.dtype
    save_lora_file(target, result.tensors, result.metadata, save_dtype)
    return result
