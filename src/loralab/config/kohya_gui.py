"""kohya_ss GUI JSON (LoRA tab) -> loralab settings, with what the GUI itself passes to sd-scripts.

The GUI saves its form as JSON: numbers often as strings (``"seed": "1234"``), ``""`` for
empty boxes, its own names for some settings, and values that only reach sd-scripts after
the GUI transforms them. This importer reproduces those transformations:

- ``epoch`` -> ``max_train_epochs`` with ``steps_formula = "kohya_gui"``: the GUI computes
  max_train_steps itself (images x repeats / batch / accumulation x epochs, x2 with a
  regularisation folder). A ``max_train_steps`` box overrides that formula; a
  ``max_train_epochs`` box makes sd-scripts recompute the steps from epochs (``sd-scripts``).
- ``lr_warmup`` (a percentage of max_train_steps) -> ``lr_warmup_steps`` = percent / 100, a
  ratio resolved once the steps are known, rounded as the GUI rounds (see
  ``loralab.train.lr_schedules``). The GUI drops warm-up with the ``constant`` scheduler.
- ``max_resolution`` -> ``resolution``; ``optimizer`` -> ``optimizer_type``;
  ``lora_network_weights`` -> ``network_weights``.
- ``LoRA_type``: ``Standard`` trains linear layers only; ``Kohya LoCon``, ``LoCon`` and
  ``LyCORIS/LoCon`` also train 3x3 convs with ``conv_dim``/``conv_alpha`` (LyCORIS LoCon is
  trained as kohya LoCon, the same file layout). Other types are refused.
- ``text_encoder_lr``/``unet_lr``: 0 or empty means unset; only one of them set turns on
  ``network_train_unet_only`` / ``network_train_text_encoder_only``, as in the GUI.
- ``noise_offset_type``: ``Original`` passes noise_offset (+ adaptive_noise_scale), ``Multires``
  passes the multires settings; the other group is dropped.
- ``xformers``: ``"xformers"``/``"sdpa"``/``"none"`` (or a bool in old GUIs).
- ``sdxl_cache_text_encoder_outputs``/``sdxl_no_half_vae`` apply only with ``sdxl``.
- ``sample_prompts``: the text box, one prompt per line.
- ``additional_parameters``: sd-scripts flags, read like sd-scripts' own settings.

Placeholder paths such as ``"<path to img dir>"`` are kept as given; a command checks a path
only when it needs it. Keys with no effect in loralab are listed in ``GUI_IGNORED`` (the one
list, with reasons, reported on import); block-wise weights and scheduler arguments are
refused unless empty (``GUI_UNSUPPORTED_UNLESS_EMPTY``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loralab.config.diagnostics import IgnoredKey, unknown_key_error
from loralab.config.sd_scripts import map_sd_scripts_keys, parse_command_line
from loralab.errors import ConfigError

_LYCORIS_ONLY = "only used by LyCORIS/DyLoRA network types, which loralab does not train"

# Keys of the GUI that loralab deliberately does not use, with the reason reported on import.
GUI_IGNORED: dict[str, str] = {
    "model_list": "the GUI's quick-pick of base models; pretrained_model_name_or_path names the model",
    "save_model_as": "LoRA files are always written as .safetensors",
    "use_wandb": "loralab logs to TensorBoard only (and keeps no API keys in configs)",
    "wandb_api_key": "loralab logs to TensorBoard only (and keeps no API keys in configs)",
    "persistent_data_loader_workers": "a data-loader speed option; no effect on the result",
    "vae_batch_size": "a latent-caching speed option; no effect on the result",
    "mem_eff_attn": "sd-scripts' own attention kernel; loralab uses xformers or sdpa (diffusers)",
    "no_token_padding": "the GUI does not pass it to LoRA training",
    **dict.fromkeys(
        ("save_last_n_epochs_state", "save_last_n_steps_state"),
        "loralab keeps only the newest training state (state/, what --resume reads)",
    ),
    "stop_text_encoder_training": "a percentage the GUI's LoRA tab does not pass to sd-scripts",
    **dict.fromkeys(
        ("num_processes", "num_machines", "multi_gpu", "gpu_ids"),
        "an accelerate launch setting; loralab's launcher starts the processes",
    ),
    **dict.fromkeys(
        (
            "factor",
            "use_cp",
            "decompose_both",
            "train_on_input",
            "unit",
            "LyCORIS_preset",
            "use_tucker",
            "use_scalar",
            "rank_dropout_scale",
            "constrain",
            "rescaled",
            "train_norm",
        ),
        _LYCORIS_ONLY,
    ),
}

# Keys that change training when set but that loralab does not implement: refused unless empty.
GUI_UNSUPPORTED_UNLESS_EMPTY: dict[str, str] = {
    **dict.fromkeys(
        (
            "down_lr_weight",
            "mid_lr_weight",
            "up_lr_weight",
            "block_lr_zero_threshold",
            "block_dims",
            "block_alphas",
            "conv_block_dims",
            "conv_block_alphas",
        ),
        "block-wise LoRA learning rates / ranks are not supported",
    ),
    "lr_scheduler_args": "extra scheduler arguments are not supported",
}

# GUI keys that are TrainConfig fields of the same name and meaning.
_SAME_NAME = (
    "pretrained_model_name_or_path",
    "vae",
    "v2",
    "v_parameterization",
    "sdxl",
    "train_data_dir",
    "reg_data_dir",
    "output_dir",
    "output_name",
    "logging_dir",
    "resume",
    "save_state",
    "caption_extension",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "shuffle_caption",
    "keep_tokens",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "flip_aug",
    "color_aug",
    "random_crop",
    "weighted_captions",
    "cache_latents",
    "cache_latents_to_disk",
    "max_data_loader_n_workers",
    "train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "optimizer_args",
    "learning_rate",
    "max_grad_norm",
    "lr_scheduler",
    "lr_scheduler_num_cycles",
    "lr_scheduler_power",
    "network_dim",
    "network_alpha",
    "network_dropout",
    "rank_dropout",
    "module_dropout",
    "dim_from_weights",
    "scale_weight_norms",
    "training_comment",
    "min_timestep",
    "max_timestep",
    "min_snr_gamma",
    "debiased_estimation_loss",
    "scale_v_pred_loss_like_noise_pred",
    "v_pred_like_loss",
    "prior_loss_weight",
    "clip_skip",
    "mixed_precision",
    "save_precision",
    "full_fp16",
    "full_bf16",
    "gradient_checkpointing",
    "num_cpu_threads_per_process",
    "save_every_n_epochs",
    "save_every_n_steps",
    "save_last_n_epochs",
    "save_last_n_steps",
    "sample_every_n_epochs",
    "sample_every_n_steps",
    "sample_sampler",
)
_RENAMED = {"optimizer": "optimizer_type", "lora_network_weights": "network_weights", "max_resolution": "resolution"}
# Keys the functions below translate.
_TRANSLATED = (
    "epoch",
    "max_train_epochs",
    "max_train_steps",
    "lr_warmup",
    "LoRA_type",
    "conv_dim",
    "conv_alpha",
    "text_encoder_lr",
    "unet_lr",
    "noise_offset_type",
    "noise_offset",
    "adaptive_noise_scale",
    "multires_noise_iterations",
    "multires_noise_discount",
    "xformers",
    "sdxl_cache_text_encoder_outputs",
    "sdxl_no_half_vae",
    "sample_prompts",
    "max_token_length",
    "additional_parameters",
)

KNOWN_GUI_KEYS: frozenset[str] = frozenset(
    (*_SAME_NAME, *_RENAMED, *_TRANSLATED, *GUI_IGNORED, *GUI_UNSUPPORTED_UNLESS_EMPTY)
)

_LOCON_TYPES = ("Kohya LoCon", "LoCon", "LyCORIS/LoCon")
_NOISE_GROUPS = {
    "Original": ("noise_offset", "adaptive_noise_scale"),
    "Multires": ("multires_noise_iterations", "multires_noise_discount"),
}


def import_gui_config(data: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[IgnoredKey]]:
    """Translate a kohya_ss GUI config (parsed JSON) into ``TrainConfig`` values.

    Returns the values and the keys ignored on purpose (with reasons). Raises ConfigError for
    unknown keys (with a hint), unsupported LoRA types or settings, and malformed values.
    """
    for key in data:
        if key not in KNOWN_GUI_KEYS:
            raise unknown_key_error(key, KNOWN_GUI_KEYS, where)
    gui = {key: value for key, value in data.items() if value is not None}
    ignored = [IgnoredKey(key, GUI_IGNORED[key]) for key in gui if key in GUI_IGNORED]
    for key, reason in GUI_UNSUPPORTED_UNLESS_EMPTY.items():
        if _is_set(gui.get(key)):
            raise ConfigError(f"{where}: {key} = {gui[key]!r}: {reason}; clear it")

    values: dict[str, Any] = {key: gui[key] for key in _SAME_NAME if key in gui}
    values.update({new: gui[old] for old, new in _RENAMED.items() if old in gui})
    if _is_set(gui.get("max_token_length")):
        values["max_token_length"] = _number(gui["max_token_length"], "max_token_length", where, int)
    _map_run_length(gui, values, where)
    _map_warmup(gui, values, ignored, where)
    _map_network_type(gui, values, ignored, where)
    _map_learning_rates(gui, values, where)
    _map_noise(gui, values, ignored, where)
    _map_attention(gui, values, where)
    _map_sdxl_options(gui, values, ignored)
    if _is_set(gui.get("sample_prompts")):
        values["sample_prompts"] = prompt_lines(str(gui["sample_prompts"]))
    if _is_set(gui.get("additional_parameters")):
        # Appended last to the GUI's command line, so these win over the form's values.
        extra_where = f"{where}: additional_parameters"
        extra, extra_ignored = map_sd_scripts_keys(
            parse_command_line(str(gui["additional_parameters"]), extra_where), extra_where
        )
        values.update(extra)
        ignored += extra_ignored
    return values, ignored


def prompt_lines(text: str) -> list[str]:
    """The GUI's prompt box -> prompts: one per line; blank and ``#`` comment lines skipped (as sd-scripts)."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _map_run_length(gui: dict[str, Any], values: dict[str, Any], where: str) -> None:
    epochs_box = _positive_int_or_none(gui.get("max_train_epochs"), "max_train_epochs", where)
    steps_box = _positive_int_or_none(gui.get("max_train_steps"), "max_train_steps", where)
    if epochs_box is not None:
        # The GUI passes --max_train_epochs, and sd-scripts then derives the steps from epochs.
        values.update(max_train_epochs=epochs_box, steps_formula="sd-scripts")
    elif steps_box is not None:
        values.update(max_train_steps=steps_box, steps_formula="kohya_gui")
    elif _is_set(gui.get("epoch")):
        values.update(max_train_epochs=_number(gui["epoch"], "epoch", where, int), steps_formula="kohya_gui")


def _map_warmup(gui: dict[str, Any], values: dict[str, Any], ignored: list[IgnoredKey], where: str) -> None:
    if not _is_set(gui.get("lr_warmup")):
        return
    percent = _number(gui["lr_warmup"], "lr_warmup", where, float)
    if percent == 0:
        values["lr_warmup_steps"] = 0
    elif gui.get("lr_scheduler", "constant") == "constant":
        ignored.append(IgnoredKey("lr_warmup", "the GUI passes no warm-up with the 'constant' scheduler"))
    elif not 0 < percent < 100:
        raise ConfigError(f"{where}: lr_warmup {percent}% must be a percentage from 0 to below 100")
    else:
        values["lr_warmup_steps"] = percent / 100


def _map_network_type(gui: dict[str, Any], values: dict[str, Any], ignored: list[IgnoredKey], where: str) -> None:
    lora_type = gui.get("LoRA_type") or "Standard"
    if lora_type in _LOCON_TYPES:
        for key in ("conv_dim", "conv_alpha"):
            if _is_set(gui.get(key)):
                values[key] = gui[key]
    elif lora_type == "Standard":
        for key in ("conv_dim", "conv_alpha"):
            if _is_set(gui.get(key)):
                ignored.append(IgnoredKey(key, "LoRA_type 'Standard' trains no conv layers (the GUI does not pass it)"))
    else:
        raise ConfigError(
            f"{where}: LoRA_type {lora_type!r} is not supported; loralab trains 'Standard' LoRA and LoCon "
            f"({', '.join(repr(name) for name in _LOCON_TYPES)})"
        )


def _map_learning_rates(gui: dict[str, Any], values: dict[str, Any], where: str) -> None:
    # The GUI reads an empty box as 0 and passes only the non-zero rates; a single one also
    # restricts training to that part of the network.
    text_encoder_lr = _number(gui.get("text_encoder_lr") or 0, "text_encoder_lr", where, float)
    unet_lr = _number(gui.get("unet_lr") or 0, "unet_lr", where, float)
    if text_encoder_lr:
        values["text_encoder_lr"] = text_encoder_lr
    if unet_lr:
        values["unet_lr"] = unet_lr
    if text_encoder_lr and not unet_lr:
        values["network_train_text_encoder_only"] = True
    elif unet_lr and not text_encoder_lr:
        values["network_train_unet_only"] = True


def _map_noise(gui: dict[str, Any], values: dict[str, Any], ignored: list[IgnoredKey], where: str) -> None:
    kind = gui.get("noise_offset_type") or "Original"
    if kind not in _NOISE_GROUPS:
        raise ConfigError(f"{where}: noise_offset_type {kind!r} is unknown; use 'Original' or 'Multires'")
    for group, keys in _NOISE_GROUPS.items():
        for key in keys:
            if not _is_set(gui.get(key)):
                continue
            used = group == kind and (key != "adaptive_noise_scale" or _is_set(gui.get("noise_offset")))
            if used:
                values[key] = gui[key]
            elif _number(gui[key], key, where, float) != 0:
                ignored.append(IgnoredKey(key, f"not used with noise_offset_type {kind!r} (the GUI does not pass it)"))


def _map_attention(gui: dict[str, Any], values: dict[str, Any], where: str) -> None:
    choice = gui.get("xformers", "none")
    if choice is True or choice == "xformers":
        values["xformers"] = True
    elif choice == "sdpa":
        values["sdpa"] = True
    elif choice not in (False, "none", ""):
        raise ConfigError(f"{where}: xformers {choice!r} is unknown; use 'xformers', 'sdpa' or 'none'")


def _map_sdxl_options(gui: dict[str, Any], values: dict[str, Any], ignored: list[IgnoredKey]) -> None:
    targets = {"sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs", "sdxl_no_half_vae": "no_half_vae"}
    for key, field in targets.items():
        if gui.get(key) is True:
            if gui.get("sdxl") is True:
                values[field] = True
            else:
                ignored.append(IgnoredKey(key, "only applies to SDXL (sdxl is off)"))


def _is_set(value: Any) -> bool:
    return value is not None and value != ""


def _number(value: Any, key: str, where: str, kind: type) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} {value!r} is not a number") from None
    if kind is int:
        if not number.is_integer():
            raise ConfigError(f"{where}: {key} {value!r} is not a whole number")
        return int(number)
    return number


def _positive_int_or_none(value: Any, key: str, where: str) -> int | None:
    # The GUI treats an empty box and 0 alike: "not set".
    if not _is_set(value):
        return None
    number = _number(value, key, where, int)
    return number if number > 0 else None
