"""LoRA files: read any common LoRA safetensors file, write kohya-format ones with sd-scripts metadata.

Reading (:func:`read_lora_file`) accepts kohya files (sd-scripts, kohya LoCon, old files without
``.alpha``) and diffusers/PEFT-format files, which are renamed to kohya names on load. The family
(SD1/SD2/SDXL) is detected from key names and shapes, falling back to the file's own metadata when
shapes cannot tell (tiny test models).

Writing (:func:`save_lora_file`) keeps only ``lora_*`` tensors, casts them (alpha included) to the
save precision, adds ``sshs_model_hash``/``sshs_legacy_hash`` computed exactly as sd-scripts does,
and replaces the target atomically. :func:`build_lora_metadata` makes the ``ss_*`` and
``modelspec.*`` fields that webuis show on a LoRA card.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import safetensors.torch
import torch
from safetensors import safe_open

from loralab import __version__
from loralab.errors import LoraFileError
from loralab.models.family import ModelFamily
from loralab.network.kohya_names import (
    UNET_PREFIX,
    diffusers_unet_path_to_sgm,
    kohya_name,
    parse_foreign_key,
    sdxl_base_unet_config,
    split_lora_key,
    text_encoder_kohya_name,
)

if TYPE_CHECKING:
    from loralab.network.lora import NetworkSpec

SAI_MODEL_SPEC_VERSION = "1.0.1"  # what current sd-scripts writes (see the sd-scripts fixtures)
_SGM_UNET_PREFIXES = tuple(f"{UNET_PREFIX}_{block}_" for block in ("input_blocks", "middle_block", "output_blocks"))
_SAVE_DTYPES = {
    "fp32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


class LoraWeights(NamedTuple):
    """One LoRA module of a file: ``down`` and ``up`` weights and its alpha (rank when missing/0)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float


@dataclass
class LoraFile:
    """A LoRA file's contents in kohya naming.

    ``tensors`` are kohya keys (``<name>.lora_down.weight`` ...), ``metadata`` the file's string
    metadata, ``family`` the detected family (None when nothing tells), ``source_format``
    ``"kohya"`` or ``"diffusers"`` (diffusers/PEFT keys converted on load), ``unsupported_keys``
    the file keys that are not plain LoRA weights (LoHa/LoKr/DoRA parts, half pairs); they are
    reported when the file is applied, never silently dropped.
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    family: ModelFamily | None
    path: Path | None = None
    source_format: str = "kohya"
    unsupported_keys: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.path.name if self.path else "LoRA"

    def modules(self) -> dict[str, LoraWeights]:
        """Kohya module name -> (down, up, alpha) for every complete down/up pair."""
        modules = {}
        for key, tensor in self.tensors.items():
            split = split_lora_key(key)
            if split is None or split[1] != "down":
                continue
            name = split[0]
            up = self.tensors.get(f"{name}.lora_up.weight")
            if up is None:
                continue
            alpha_tensor = self.tensors.get(f"{name}.alpha")
            alpha = float(alpha_tensor.float().item()) if alpha_tensor is not None else 0.0
            modules[name] = LoraWeights(tensor, up, alpha if alpha else float(tensor.shape[0]))
        return modules


# --- families ---------------------------------------------------------------------------------------


def family_label(family: ModelFamily | None) -> str:
    return "an unknown model family" if family is None else ModelFamily(family).label


def check_family(lora_file: LoraFile, family: ModelFamily) -> None:
    """Raise ``LoraFileError`` naming both families when the LoRA was made for another family."""
    if lora_file.family is not None and lora_file.family != family:
        raise LoraFileError(
            f"{lora_file.label} is a LoRA for {family_label(lora_file.family)} but the checkpoint is "
            f"{family_label(family)}; use a LoRA made for {family_label(family)} models"
        )


def detect_lora_family(down_shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> ModelFamily | None:
    """Family of a LoRA from its kohya module names and down-weight shapes (metadata as a fallback)."""
    names = list(down_shapes)
    if any(n.startswith(("lora_te1_", "lora_te2_")) or n.startswith(_SGM_UNET_PREFIXES) for n in names):
        return ModelFamily.SDXL
    # The widths of the full-size models: cross-attention context and text-encoder hidden size.
    context = {768: ModelFamily.SD1, 1024: ModelFamily.SD2, 2048: ModelFamily.SDXL}
    for name, shape in down_shapes.items():
        if name.endswith(("attn2_to_k", "attn2_to_v")) and shape[1] in context:
            return context[shape[1]]
        if name.startswith("lora_te_") and name.endswith("self_attn_q_proj") and shape[1] in (768, 1024):
            return context[shape[1]]
    version = metadata.get("ss_base_model_version", "")
    for start, family in (("sdxl", ModelFamily.SDXL), ("sd_v2", ModelFamily.SD2), ("sd_v1", ModelFamily.SD1)):
        if version.startswith(start):
            return family
    # SD1 projects into its transformers with 1x1 convs, SD2 with Linear layers.
    for name, shape in down_shapes.items():
        if name.endswith(("_proj_in", "_proj_out")):
            return ModelFamily.SD1 if len(shape) == 4 else ModelFamily.SD2
    return None


# --- reading ----------------------------------------------------------------------------------------


def read_lora_file(path: str | os.PathLike[str], *, unet_config: Mapping[str, Any] | None = None) -> LoraFile:
    """Read a LoRA ``.safetensors`` file into kohya naming.

    ``unet_config`` is only used to rename the UNet keys of diffusers/PEFT-format SDXL files to SGM
    names; the default, SDXL's published config, fits every real SDXL UNet.

    Raises ``LoraFileError`` (one line) for a missing, truncated or non-safetensors file, and for a
    file without LoRA weights.
    """
    path = Path(path)
    _check_safetensors_container(path)
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise LoraFileError(f"{path.name} cannot be read as safetensors ({exc}); the file is damaged") from exc
    if any(key.startswith("lora_") for key in tensors):
        lora_file = _from_kohya(tensors, metadata, path)
    else:
        lora_file = _from_foreign(tensors, metadata, path, unet_config or sdxl_base_unet_config())
    if not lora_file.modules():
        raise LoraFileError(
            f"{path.name} holds no LoRA weights (no lora_down/lora_up or lora_A/lora_B pairs); "
            "is it a checkpoint or another kind of adapter?"
        )
    return lora_file


def _check_safetensors_container(path: Path) -> None:
    """One clear line for the usual ways a file is not a readable safetensors file."""
    if not path.is_file():
        raise LoraFileError(f"LoRA file not found: {path}")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
        first = handle.read(1)
        if header_size <= 1 or first != b"{":
            raise LoraFileError(f"{path.name} is not a safetensors file; LoRA files must be .safetensors")
        if 8 + header_size > size:
            raise LoraFileError(f"{path.name} is truncated ({size} bytes, its header alone needs {8 + header_size})")
        try:
            header = json.loads(first + handle.read(header_size - 1))
            ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise LoraFileError(f"{path.name} is not a safetensors file (unreadable header)") from exc
    needed = 8 + header_size + max(ends, default=0)
    if needed > size:
        raise LoraFileError(f"{path.name} is truncated ({size} of {needed} bytes); download or copy it again")


def _from_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> LoraFile:
    kept = {key: t for key, t in tensors.items() if key.startswith("lora_") and split_lora_key(key)}
    unsupported = [key for key in tensors if key not in kept]
    unsupported += _incomplete_pairs(kept)
    family = detect_lora_family(_down_shapes(kept), metadata)
    return LoraFile(kept, metadata, family, path, "kohya", sorted(unsupported))


def _from_foreign(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, unet_config: Mapping[str, Any]
) -> LoraFile:
    """Rename diffusers/PEFT keys to kohya ones; alphas from ``.alpha`` keys or the PEFT config."""
    parsed, unsupported = {}, []
    for key in tensors:
        foreign = parse_foreign_key(key)
        if foreign is None:
            unsupported.append(key)
        else:
            parsed[key] = foreign
    components = {foreign.component for foreign in parsed.values()}
    te_count = 2 if "text_encoder_2" in components else 1
    te_prefixes = {"text_encoder": "lora_te" if te_count == 1 else "lora_te1", "text_encoder_2": "lora_te2"}

    def provisional(component: str, module_path: str) -> str:
        if component == "unet":
            return kohya_name(UNET_PREFIX, module_path)
        return text_encoder_kohya_name(te_prefixes[component], module_path)

    down_shapes = {
        provisional(f.component, f.module_path): tuple(tensors[k].shape) for k, f in parsed.items() if f.role == "down"
    }
    family = detect_lora_family(down_shapes, metadata)
    if family is ModelFamily.SDXL:
        te_prefixes["text_encoder"] = "lora_te1"

    def final_name(component: str, module_path: str) -> str:
        if component == "unet" and family is ModelFamily.SDXL:
            return kohya_name(UNET_PREFIX, diffusers_unet_path_to_sgm(module_path, unet_config))
        return provisional(component, module_path)

    alphas = _peft_alphas(metadata)
    kohya: dict[str, torch.Tensor] = {}
    suffixes = {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha"}
    for key, foreign in parsed.items():
        try:
            name = final_name(foreign.component, foreign.module_path)
        except ValueError:
            unsupported.append(key)
            continue
        kohya[name + suffixes[foreign.role]] = tensors[key]
        alpha = _alpha_for(alphas, foreign.component, foreign.module_path)
        if foreign.role == "down" and alpha is not None and f"{name}.alpha" not in kohya:
            kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    unsupported += _incomplete_pairs(kohya)
    return LoraFile(kohya, metadata, family, path, "diffusers", sorted(unsupported))


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The PEFT config diffusers stores under ``lora_adapter_metadata`` (``unet.lora_alpha`` ...)."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        return dict(json.loads(text))
    except (ValueError, TypeError):
        return {}


def _alpha_for(config: Mapping[str, Any], component: str, module_path: str) -> float | None:
    patterns = config.get(f"{component}.alpha_pattern") or {}
    for pattern, value in patterns.items():
        if module_path == pattern or module_path.endswith("." + pattern):
            return float(value)
    value = config.get(f"{component}.lora_alpha")
    return None if value is None else float(value)


def _down_shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for key, tensor in tensors.items():
        split = split_lora_key(key)
        if split and split[1] == "down":
            shapes[split[0]] = tuple(tensor.shape)
    return shapes


def _incomplete_pairs(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of modules that lack their down or up weight."""
    roles: dict[str, set[str]] = {}
    for key in tensors:
        split = split_lora_key(key)
        if split:
            roles.setdefault(split[0], set()).add(split[1])
    return [
        key for key in tensors if (split := split_lora_key(key)) and not {"down", "up"} <= roles[split[0]]
    ]


# --- writing -----------------------------------------------------------------------------------------


def save_lora_file(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write a kohya LoRA file atomically and return its path.

    ``tensors`` must all be ``lora_*`` down/up/alpha tensors (a ``LoRANetwork.state_dict()``);
    ``dtype`` (``torch.float16``, ``"fp16"``, ``"bf16"``, ``"fp32"``/``"float"``; None keeps each
    tensor's dtype) applies to every tensor, alpha included. ``sshs_model_hash`` and
    ``sshs_legacy_hash`` are computed from the saved tensors and the ``ss_*`` metadata as sd-scripts
    does; other metadata is written unchanged and must all be strings.
    """
    path = Path(path)
    bad = [key for key in tensors if not key.startswith("lora_") or split_lora_key(key) is None]
    if bad:
        raise ValueError(f"only lora_* down/up/alpha tensors belong in a LoRA file, got {bad[:3]}")
    not_text = [key for key, value in metadata.items() if not isinstance(value, str)]
    if not_text:
        raise TypeError(f"LoRA metadata values must be strings: {not_text[:3]}")
    target_dtype = _SAVE_DTYPES[dtype] if isinstance(dtype, str) else dtype
    prepared = {
        key: tensor.detach().to("cpu", target_dtype or tensor.dtype).contiguous() for key, tensor in tensors.items()
    }
    final_metadata = dict(metadata)
    final_metadata["sshs_model_hash"], final_metadata["sshs_legacy_hash"] = safetensors_hashes(prepared, metadata)
    write_safetensors_atomically(path, prepared, final_metadata)
    return path


def write_safetensors_atomically(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file under a temporary name next to ``path``, then rename it into place.

    A crash or a full disk never leaves a half-written file under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    handle.close()
    try:
        safetensors.torch.save_file(dict(tensors), handle.name, metadata=dict(metadata))
        with open(handle.name, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) as sd-scripts precalculates them.

    Both hash the safetensors serialisation of the tensors with only the ``ss_*`` metadata (user
    metadata can change later without changing the hash): the model hash is the SHA-256 of everything
    after the header, the legacy hash the first 8 hex digits of the SHA-256 of the 64 KiB at 1 MiB
    (sd-webui-additional-networks' hashes).
    """
    training_metadata = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    data = safetensors.torch.save(dict(tensors), training_metadata)
    header_size = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(memoryview(data)[8 + header_size :]).hexdigest()
    legacy_hash = hashlib.sha256(memoryview(data)[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def base_model_hashes(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(``ss_sd_model_hash``, ``ss_new_sd_model_hash``) of a single-file checkpoint, as sd-scripts.

    The old webui hash (8 hex digits of the SHA-256 of the 64 KiB at 1 MiB) and the full file SHA-256.
    """
    full = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        legacy = hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
        handle.seek(0)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            full.update(chunk)
    return legacy, full.hexdigest()


# --- metadata ----------------------------------------------------------------------------------------


def metadata_text(value: Any) -> str:
    """A metadata value as sd-scripts writes it: dicts/lists as JSON, everything else ``str()``."""
    if isinstance(value, str):
        return value
    if isinstance(value, (Mapping, list)):
        return json.dumps(value)
    return str(value)


def build_lora_metadata(
    *,
    family: ModelFamily,
    network: NetworkSpec,
    title: str,
    v_prediction: bool = False,
    resolution: tuple[int, int] | None = None,
    clip_skip: int | None = None,
    extra_fields: Mapping[str, Any] | None = None,
    timestamp: float | None = None,
) -> dict[str, str]:
    """The metadata sd-scripts writes into a LoRA file, all strings.

    Always: ``ss_network_module/dim/alpha/dropout`` (and ``ss_network_args`` for conv LoRA and
    rank/module dropout), ``ss_base_model_version``, ``ss_v2``, and the ``modelspec.*`` fields
    (``sai_model_spec``, ``architecture``, ``implementation``, ``title``, ``resolution``, ``date``,
    ``prediction_type``, ``encoder_layer`` when ``clip_skip`` is set). ``extra_fields`` adds the
    training fields a LoRA card shows (``ss_steps``, ``ss_learning_rate``, ``ss_tag_frequency`` ...)
    as Python values, stringified like sd-scripts (dicts as JSON); they override the fields above.
    """
    family = ModelFamily(family)
    when = datetime.datetime.fromtimestamp(int(timestamp if timestamp is not None else datetime.datetime.now().timestamp()))
    metadata = dict(network.to_metadata())
    metadata["ss_base_model_version"] = _base_model_version(family, v_prediction)
    metadata["ss_v2"] = str(family is ModelFamily.SD2)
    metadata.update(_modelspec(family, v_prediction, title, resolution, clip_skip, when))
    for key, value in (extra_fields or {}).items():
        metadata[key] = metadata_text(value)
    return metadata


def _base_model_version(family: ModelFamily, v_prediction: bool) -> str:
    if family is ModelFamily.SDXL:
        return "sdxl_base_v1-0"
    return ("sd_v2" if family is ModelFamily.SD2 else "sd_v1") + ("_v" if v_prediction else "")


def _modelspec(
    family: ModelFamily,
    v_prediction: bool,
    title: str,
    resolution: tuple[int, int] | None,
    clip_skip: int | None,
    when: datetime.datetime,
) -> dict[str, str]:
    if family is ModelFamily.SDXL:
        architecture, implementation, default_size = (
            "stable-diffusion-xl-v1-base",
            "https://github.com/Stability-AI/generative-models",
            1024,
        )
    elif family is ModelFamily.SD2:
        architecture = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
        implementation, default_size = "diffusers", 768 if v_prediction else 512
    else:
        architecture, implementation, default_size = "stable-diffusion-v1", "diffusers", 512
    width, height = resolution or (default_size, default_size)
    spec = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": implementation,
        "modelspec.implementation_version": f"loralab/{__version__}",
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": when.isoformat(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(clip_skip)
    return spec


__all__ = [
    "LoraFile",
    "LoraWeights",
    "base_model_hashes",
    "build_lora_metadata",
    "check_family",
    "detect_lora_family",
    "family_label",
    "metadata_text",
    "read_lora_file",
    "safetensors_hashes",
    "save_lora_file",
    "write_safetensors_atomically",
]
