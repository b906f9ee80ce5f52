"""Load SD1.x / SD2.x / SDXL checkpoints, offline, from single files or diffusers folders.

Loading happens in two steps. First a plan (``inspect_checkpoint``) is made from tensor names
and shapes only: family, prediction type, and each component's config. Then each component
is built empty (meta device), and its weights are read, renamed and assigned one component at
a time, so a checkpoint never sits in memory twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTokenizer

from loralab.errors import CheckpointError
from loralab.models.architecture import (
    TextEncoder,
    build_empty_model,
    bundled_scheduler_config,
    infer_text_encoder_sizes,
    infer_unet_sizes,
    infer_vae_sizes,
    text_encoder_class,
    text_encoder_config,
    unet_config,
    vae_config,
)
from loralab.models.checkpoint_file import CheckpointFile, read_state_dict
from loralab.models.family import (
    LDM_UNET_PREFIX,
    LDM_VAE_PREFIX,
    V_PREDICTION_MARKER,
    ModelFamily,
    TextEncoderSpec,
    describe_non_checkpoint,
    detect_family,
    is_lora_keys,
)
from loralab.models.single_file import text_encoder_ldm_to_diffusers, unet_ldm_to_diffusers, vae_ldm_to_diffusers
from loralab.models.tokenizer import load_clip_tokenizer

__all__ = [
    "CheckpointInfo",
    "StableDiffusionComponents",
    "inspect_checkpoint",
    "load_checkpoint",
    "load_vae",
    "make_noise_scheduler",
    "read_state_dict",
]

logger = logging.getLogger(__name__)


@dataclass
class StableDiffusionComponents:
    """Everything training and sampling need from one base model."""

    family: ModelFamily
    v_prediction: bool
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[TextEncoder]  # SDXL: [CLIP ViT-L, OpenCLIP ViT-bigG with projection]
    tokenizers: list[CLIPTokenizer]  # one per text encoder, padding as that encoder expects
    noise_scheduler: DDPMScheduler  # the training noise schedule, with the model's prediction type
    source: Path

    @property
    def prediction_type(self) -> str:
        return "v_prediction" if self.v_prediction else "epsilon"


@dataclass
class CheckpointInfo:
    """What a checkpoint is, read from names, shapes and configs without loading weights."""

    source: Path
    format: Literal["single-file", "diffusers"]
    family: ModelFamily
    v_prediction: bool
    unet_config: dict[str, Any]
    vae_config: dict[str, Any] | None  # None: the single file has no VAE (one must be passed)
    text_encoder_configs: list[dict[str, Any]]
    parameter_counts: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Building components


def _fill(
    model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str, source: Path
) -> None:
    """Assign ``state`` (consumed) as ``model``'s weights, cast to ``dtype``; one-line error on mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        problems = [
            f"{len(names)} {label} (e.g. {names[0]})"
            for names, label in ((missing, "missing"), (unexpected, "unexpected"), (wrong_shape, "of wrong shape"))
            if names
        ]
        raise CheckpointError(f"{what} weights in {source} do not fit its architecture: {', '.join(problems)}")
    for key, tensor in state.items():
        if tensor.is_floating_point():
            state[key] = tensor.to(dtype)  # replaces, so the source-precision copy can be freed
    model.load_state_dict(state, strict=True, assign=True)
    state.clear()
    model.eval()


def make_noise_scheduler(v_prediction: bool, overrides: Mapping[str, Any] | None = None) -> DDPMScheduler:
    """The DDPM training schedule (scaled-linear betas 0.00085..0.012 over 1000 steps).

    ``overrides``: values from a diffusers folder's scheduler config that describe the
    schedule the model was trained with (betas, steps); the prediction type is set from
    ``v_prediction``.
    """
    config = bundled_scheduler_config()
    schedule_keys = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "trained_betas")
    config.update({k: v for k, v in (overrides or {}).items() if k in schedule_keys and v is not None})
    config["prediction_type"] = "v_prediction" if v_prediction else "epsilon"
    return DDPMScheduler.from_config(config)


def _resolve_v_prediction(family: ModelFamily, requested: bool | None, stored: bool | None, source: Path) -> bool:
    """eps vs v: the caller's ``v_parameterization`` wins; else the checkpoint's own marker/config."""
    if requested is not None and stored is not None and requested != stored:
        logger.warning(
            "%s is stored as %s-prediction; using %s-prediction as v_parameterization says",
            source, "v" if stored else "epsilon", "v" if requested else "epsilon",
        )  # fmt: skip
    v_prediction = bool(stored) if requested is None else requested
    if v_prediction and not family.spec.supports_v_prediction:
        if requested:
            raise CheckpointError(
                f"v_parameterization is set but {source} is an {family.label} checkpoint, which predicts noise "
                "(epsilon); unset v_parameterization or use an SD2.x-v or SDXL v-prediction checkpoint"
            )
        raise CheckpointError(f"{source} is marked v-prediction, which is supported for SD2.x and SDXL only")
    return v_prediction


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _parameter_counts(info: CheckpointInfo) -> dict[str, int]:
    """Parameters per component, counted on empty (meta) models."""
    parts: dict[str, tuple[str, Mapping[str, Any], TextEncoderSpec | None]] = {
        "unet": ("unet", info.unet_config, None)
    }
    if info.vae_config is not None:
        parts["vae"] = ("vae", info.vae_config, None)
    for encoder, config in zip(info.family.spec.text_encoders, info.text_encoder_configs):
        parts[encoder.config_name] = ("text_encoder", _clip_config_args(config), encoder)
    return {
        name: sum(p.numel() for p in build_empty_model(kind, config, encoder).parameters())
        for name, (kind, config, encoder) in parts.items()
    }


# ---------------------------------------------------------------------------------------------
# Single files


def _single_file_info(checkpoint: CheckpointFile, v_parameterization: bool | None) -> CheckpointInfo:
    source = checkpoint.path
    meta = checkpoint.meta_state_dict()
    problem = describe_non_checkpoint(list(meta))
    if problem:
        raise CheckpointError(f"{source} {problem}")
    try:
        family = detect_family(meta)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    stored = True if V_PREDICTION_MARKER in meta else None
    v_prediction = _resolve_v_prediction(family, v_parameterization, stored, source)

    encoders = family.spec.text_encoders
    te_configs = []
    for encoder in encoders:
        if not any(k.startswith(encoder.ldm_prefix) for k in meta):
            raise CheckpointError(f"{source} has no {encoder.config_name} weights ({encoder.ldm_prefix}*)")
        converted = text_encoder_ldm_to_diffusers(meta, encoder)
        te_configs.append(text_encoder_config(family, encoder, infer_text_encoder_sizes(converted)))
    pooled_dim = te_configs[-1].get("projection_dim") if family is ModelFamily.SDXL else None
    unet_cfg = unet_config(family, infer_unet_sizes(_strip(meta, LDM_UNET_PREFIX)), pooled_dim=pooled_dim)
    vae_meta = _strip(meta, LDM_VAE_PREFIX)
    vae_cfg = vae_config(family, infer_vae_sizes(vae_meta)) if vae_meta else None

    prefixes = {"unet": LDM_UNET_PREFIX, "vae": LDM_VAE_PREFIX, **{e.config_name: e.ldm_prefix for e in encoders}}
    dtypes = {}
    for name, prefix in prefixes.items():
        stored_dtypes = {v.dtype for k, v in meta.items() if k.startswith(prefix)}
        if stored_dtypes:
            dtypes[name] = "/".join(sorted(str(d).removeprefix("torch.") for d in stored_dtypes))
    return CheckpointInfo(
        source, "single-file", family, v_prediction, unet_cfg, vae_cfg, te_configs, dtypes=dtypes
    )


def _load_single_file(
    path: Path, v_parameterization: bool | None, dtype: torch.dtype, need_vae: bool
) -> tuple[CheckpointInfo, UNet2DConditionModel, AutoencoderKL | None, list[TextEncoder]]:
    with CheckpointFile(path) as checkpoint:
        info = _single_file_info(checkpoint, v_parameterization)
        if info.vae_config is None and need_vae:
            raise CheckpointError(f"{path} has no VAE weights ({LDM_VAE_PREFIX}*); pass a VAE with --vae")
        # Each component: read only its tensors, each cast to ``dtype`` as it arrives (so no
        # component is ever held in two precisions), rename them (diffusers' converters), assign.
        unet = build_empty_model("unet", info.unet_config)
        converted = unet_ldm_to_diffusers(checkpoint.read_prefixed(LDM_UNET_PREFIX, dtype), info.unet_config)
        _fill(unet, converted, dtype, "UNet", path)
        vae = None
        if info.vae_config is not None and need_vae:
            vae = build_empty_model("vae", info.vae_config)
            _fill(
                vae,
                vae_ldm_to_diffusers(checkpoint.read_prefixed(LDM_VAE_PREFIX, dtype), info.vae_config),
                dtype,
                "VAE",
                path,
            )
        text_encoders = []
        for encoder, config in zip(info.family.spec.text_encoders, info.text_encoder_configs):
            model = build_empty_model("text_encoder", config, encoder)
            state = text_encoder_ldm_to_diffusers(checkpoint.read_prefixed(encoder.ldm_prefix, dtype), encoder)
            _fill(model, state, dtype, f"text encoder ({encoder.ldm_prefix}*)", path)
            text_encoders.append(model)
    return info, unet, vae, text_encoders


# ---------------------------------------------------------------------------------------------
# Diffusers folders


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"diffusers folder is incomplete: {path} is missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _diffusers_info(folder: Path, v_parameterization: bool | None) -> CheckpointInfo:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(
            f"{folder} is a folder without model_index.json; pass a diffusers model folder or a .safetensors file"
        )
    unet_cfg = _read_json(folder / "unet" / "config.json")
    # The family comes from the UNet's tensor names and shapes, as for single files.
    family = detect_family(build_empty_model("unet", unet_cfg).state_dict())
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler_cfg = _read_json(scheduler_file) if scheduler_file.is_file() else {}
    stored = None
    if "prediction_type" in scheduler_cfg:
        stored = scheduler_cfg["prediction_type"] == "v_prediction"
    v_prediction = _resolve_v_prediction(family, v_parameterization, stored, folder)
    vae_cfg = _read_json(folder / "vae" / "config.json")
    encoders = family.spec.text_encoders
    te_configs = [_read_json(folder / e.config_name / "config.json") for e in encoders]
    named = {"unet": unet_cfg, "vae": vae_cfg, **{e.config_name: c for e, c in zip(encoders, te_configs)}}
    dtypes = {
        name: str(c.get("torch_dtype") or c.get("dtype"))
        for name, c in named.items()
        if c.get("torch_dtype") or c.get("dtype")
    }
    return CheckpointInfo(folder, "diffusers", family, v_prediction, unet_cfg, vae_cfg, te_configs, dtypes=dtypes)


def _clip_config_args(config: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextConfig arguments from a saved config.json (drops bookkeeping keys)."""
    return {
        k: v
        for k, v in config.items()
        if not k.startswith("_") and k not in ("architectures", "transformers_version")
    }


def _pretrained(cls: Any, folder: Path, subfolder: str, dtype: torch.dtype) -> Any:
    """``cls.from_pretrained`` of one subfolder, offline, with a one-line error."""
    files = [p.name for p in (folder / subfolder).glob("*.safetensors")] + [
        p.name for p in (folder / subfolder).glob("*.bin")
    ]
    # Folders saved with only half-precision variants (``*.fp16.safetensors``) need the variant named.
    variant = "fp16" if files and all(".fp16." in name for name in files) else None
    dtype_arg = {"torch_dtype": dtype} if cls in (UNet2DConditionModel, AutoencoderKL) else {"dtype": dtype}
    try:
        model = cls.from_pretrained(
            str(folder), subfolder=subfolder, local_files_only=True, variant=variant, **dtype_arg
        )
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot load {subfolder} from diffusers folder {folder}: {first[:160]}") from None
    return _in_aligned_memory(model)


_ALIGNMENT = 64  # bytes: how torch aligns the CPU memory it allocates


def _in_aligned_memory(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every tensor at an address aligned as torch allocates.

    ``from_pretrained`` can leave tensors at any 8-byte offset of the files it read; some CPU
    kernels take other paths for such addresses, and the same weights loaded from a folder and
    from a single file predicted differently in the last bits (AVX-512 machines).
    """
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() % _ALIGNMENT:
                tensor.data = tensor.data.clone()
    return model


def _load_diffusers_folder(
    folder: Path, v_parameterization: bool | None, dtype: torch.dtype, need_vae: bool
) -> tuple[CheckpointInfo, UNet2DConditionModel, AutoencoderKL | None, list[TextEncoder]]:
    info = _diffusers_info(folder, v_parameterization)
    unet = _pretrained(UNet2DConditionModel, folder, "unet", dtype)
    vae = _pretrained(AutoencoderKL, folder, "vae", dtype) if need_vae else None
    text_encoders = [
        _pretrained(text_encoder_class(e), folder, e.config_name, dtype) for e in info.family.spec.text_encoders
    ]
    return info, unet, vae, text_encoders


def _scheduler_overrides(info: CheckpointInfo) -> dict[str, Any]:
    scheduler_file = info.source / "scheduler" / "scheduler_config.json"
    if info.format == "diffusers" and scheduler_file.is_file():
        return _read_json(scheduler_file)
    return {}


# ---------------------------------------------------------------------------------------------
# VAE and tokenizers


def load_vae(
    path: Path | str,
    family: ModelFamily,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AutoencoderKL:
    """Load a VAE override: a single file with original VAE keys (with or without the
    ``first_stage_model.`` prefix, e.g. ``vae-ft-mse-840000-ema-pruned.safetensors``, or a full
    checkpoint whose VAE is taken), or a diffusers VAE folder (or model folder with ``vae/``).
    Raises ``CheckpointError`` for anything else.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE not found: {path}")
    if path.is_dir():
        for subfolder in ("", "vae"):
            if (path / subfolder / "config.json").is_file():
                return _pretrained(AutoencoderKL, path, subfolder, dtype).to(device)
        raise CheckpointError(f"VAE folder {path} has no config.json (nor vae/config.json)")
    with CheckpointFile(path) as checkpoint:
        keys = checkpoint.keys()
        prefix = next((p for p in (LDM_VAE_PREFIX, "vae.") if any(k.startswith(p) for k in keys)), "")
        # Only the autoencoder itself: VAE files may also carry EMA copies or training-loss weights.
        parts = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
        vae_keys = [k for k in keys if k.startswith(prefix) and k[len(prefix) :].startswith(parts)]
        if not any(k[len(prefix) :].startswith("encoder.down.") for k in vae_keys):
            if is_lora_keys(keys):
                raise CheckpointError(
                    f"{path} is a LoRA file, not a VAE; give a VAE here and apply the LoRA on top of the checkpoint"
                )
            if any(k.startswith("encoder.down_blocks.") for k in keys):
                raise CheckpointError(f"{path} holds diffusers VAE weights; pass the folder with its config.json")
            raise CheckpointError(f"{path} is not a VAE: no VAE encoder weights (encoder.down.*) found")
        meta = checkpoint.meta_state_dict()
        config = vae_config(family, infer_vae_sizes({k[len(prefix) :]: meta[k] for k in vae_keys}))
        vae = build_empty_model("vae", config)
        _fill(vae, vae_ldm_to_diffusers(checkpoint.read(vae_keys, dtype), config), dtype, "VAE", path)
    return vae.to(device)


def _tokenizers(
    family: ModelFamily, model_folder: Path | None, tokenizer_path: Path | None
) -> list[CLIPTokenizer]:
    """One tokenizer per text encoder: from ``tokenizer_path``, the diffusers folder, or built in."""
    tokenizers = []
    for encoder in family.spec.text_encoders:
        if tokenizer_path is not None:
            own = tokenizer_path / encoder.tokenizer_name
            if own.is_dir():  # a diffusers-style folder with tokenizer/ (and tokenizer_2/)
                tokenizers.append(load_clip_tokenizer(own))
            else:  # one tokenizer folder for every encoder; padding follows each encoder
                tokenizers.append(load_clip_tokenizer(tokenizer_path, pad_with_eos=encoder.pad_with_eos))
        elif model_folder is not None and (model_folder / encoder.tokenizer_name).is_dir():
            tokenizers.append(load_clip_tokenizer(model_folder / encoder.tokenizer_name))
        else:
            tokenizers.append(load_clip_tokenizer(pad_with_eos=encoder.pad_with_eos))
    return tokenizers


# ---------------------------------------------------------------------------------------------
# Entry points


def inspect_checkpoint(path: Path | str, *, v_parameterization: bool | None = None) -> CheckpointInfo:
    """Family, prediction type, component configs and parameter counts, without reading weights.

    Raises ``CheckpointError`` as ``load_checkpoint`` does.
    """
    info = _checkpoint_info(Path(path), v_parameterization)
    info.parameter_counts = _parameter_counts(info)
    return info


def checkpoint_family(path: Path | str) -> ModelFamily:
    """The family of a checkpoint file or diffusers folder, from its tensor names and shapes only.

    Raises ``CheckpointError`` as ``load_checkpoint`` does (a LoRA, VAE or damaged file, say).
    """
    return _checkpoint_info(Path(path), None).family


def _checkpoint_info(path: Path, v_parameterization: bool | None) -> CheckpointInfo:
    if path.is_dir():
        return _diffusers_info(path, v_parameterization)
    with CheckpointFile(path) as checkpoint:
        return _single_file_info(checkpoint, v_parameterization)


def load_checkpoint(
    path: Path | str,
    *,
    v_parameterization: bool | None = None,
    vae_path: Path | str | None = None,
    tokenizer_path: Path | str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> StableDiffusionComponents:
    """Load an SD1.x, SD2.x (epsilon or v) or SDXL base checkpoint, offline.

    ``path``: an A1111-style single file (``.safetensors``; ``.ckpt``/``.pt`` only if
    weights-only unpickling can read it) or a diffusers folder (``model_index.json``).
    The family is detected from tensor names and shapes; sizes are read from shapes, so
    tiny test models of the same layout load too.
    ``v_parameterization``: True / False force v- / epsilon-prediction; None (default) takes
    the file's ``v_pred`` marker or the folder's scheduler config, else epsilon. Pass
    ``True if config.v_parameterization else None`` from a kohya-style config so an unset flag
    does not override a marked file.
    ``vae_path``: VAE override (see ``load_vae``). ``tokenizer_path``: a local tokenizer folder
    (else the folder's own tokenizers, else the built-in CLIP vocabulary).

    Raises ``CheckpointError`` (one line) for: a missing, truncated or corrupt file; a pickle
    needing arbitrary classes; a LoRA, VAE or embedding passed as a checkpoint; unrecognised
    tensors; v-prediction on SD1; weights that do not fit the inferred architecture.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    need_vae = vae_path is None
    if path.is_dir():
        info, unet, vae, text_encoders = _load_diffusers_folder(path, v_parameterization, dtype, need_vae)
    else:
        info, unet, vae, text_encoders = _load_single_file(path, v_parameterization, dtype, need_vae)
    if vae_path is not None:
        vae = load_vae(vae_path, info.family, dtype=dtype)
        if vae.config.latent_channels != unet.config.out_channels:
            raise CheckpointError(
                f"VAE {vae_path} has {vae.config.latent_channels} latent channels but the UNet of {path} "
                f"works on {unet.config.out_channels}; pass a VAE made for this model family"
            )
    assert vae is not None
    folder = path if info.format == "diffusers" else None
    return StableDiffusionComponents(
        family=info.family,
        v_prediction=info.v_prediction,
        unet=unet.to(device),
        vae=vae.to(device),
        text_encoders=[te.to(device) for te in text_encoders],
        tokenizers=_tokenizers(info.family, folder, Path(tokenizer_path) if tokenizer_path else None),
        noise_scheduler=make_noise_scheduler(info.v_prediction, _scheduler_overrides(info)),
        source=path,
    )
