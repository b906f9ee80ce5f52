"""sd-scripts settings -> loralab settings: ``--config_file`` TOML and command-line flags.

sd-scripts' TOML config holds its argparse names as flat keys, optionally grouped in
``[sections]`` that it merges into one namespace. Native loralab TOML uses the same names, so
one reader serves both: sections are flattened (a table named ``optimizer_args`` is that
setting, not a section), keys that are ``TrainConfig`` fields pass through, and the keys below
are translated, accepted only at their default, or ignored on purpose:

- ``network_module`` must be ``networks.lora`` (kohya LoRA / LoCon, what loralab trains);
- ``network_args`` (``conv_dim``, ``conv_alpha``, ``rank_dropout``, ``module_dropout``) become
  the flat fields of the same names;
- ``use_8bit_adam`` / ``use_lion_optimizer`` (old spellings) set ``optimizer_type``;
  ``caption_extention`` (sd-scripts' old misspelling) is ``caption_extension``;
- ``SD_SCRIPTS_DEFAULT_ONLY``: features loralab does not implement, accepted while they have
  sd-scripts' default value (GUI-written TOML lists them all);
- ``SD_SCRIPTS_IGNORED``: settings with no effect on the trained LoRA in loralab, reported.

Anything else is an unknown key (``ConfigError`` with a "did you mean" hint).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from loralab.config.diagnostics import IgnoredKey, did_you_mean, unknown_key_error
from loralab.config.schema import TrainConfig
from loralab.errors import ConfigError

# Settings that do not change what loralab trains; reported as ignored.
SD_SCRIPTS_IGNORED: dict[str, str] = {
    **dict.fromkeys(
        (
            "log_with",
            "log_prefix",
            "log_tracker_name",
            "log_tracker_config",
            "wandb_run_name",
            "wandb_api_key",
            "log_config",
        ),
        "loralab logs to TensorBoard in logging_dir only",
    ),
    **dict.fromkeys(
        (
            "huggingface_repo_id",
            "huggingface_repo_type",
            "huggingface_path_in_repo",
            "huggingface_token",
            "huggingface_repo_visibility",
            "save_state_to_huggingface",
            "resume_from_huggingface",
            "async_upload",
        ),
        "loralab does not upload to the Hugging Face Hub",
    ),
    **dict.fromkeys(
        ("lowram", "highvram", "persistent_data_loader_workers", "vae_batch_size", "disable_mmap_load_safetensors"),
        "a memory/speed option of sd-scripts' own loaders; no effect on the result",
    ),
    **dict.fromkeys(
        ("ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph"),
        "multi-GPU runs are set up by loralab's accelerate launcher",
    ),
    **dict.fromkeys(
        ("save_last_n_epochs_state", "save_last_n_steps_state"),
        "loralab keeps only the newest training state (state/, what --resume reads)",
    ),
    **dict.fromkeys(("console_log_level", "console_log_file", "console_log_simple"), "sd-scripts' console logging"),
    **dict.fromkeys(("config_file", "output_config"), "sd-scripts' command-line plumbing"),
    "mem_eff_attn": "sd-scripts' own attention kernel; loralab uses xformers or sdpa (diffusers)",
    "save_model_as": "LoRA files are always written as .safetensors",
    "tokenizer_cache_dir": "the tokenizer is built offline (see tokenizer_path)",
}

# Features loralab does not implement: accepted only at these values (sd-scripts' defaults).
SD_SCRIPTS_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "loss_type": ("l2",),
    "huber_c": (0.1,),
    "huber_schedule": ("snr",),
    "huber_scale": (1.0,),
    "ip_noise_gamma": (0, 0.0),
    "ip_noise_gamma_random_strength": (False,),
    "zero_terminal_snr": (False,),
    "fp8_base": (False,),
    "fp8_base_unet": (False,),
    "alpha_mask": (False,),
    "masked_loss": (False,),
    "network_multiplier": (1, 1.0),
    "lr_scheduler_type": ("",),
    "lr_scheduler_args": ("", ()),
    "lr_decay_steps": (0,),
    "dataset_config": ("",),
    "in_json": ("",),
    "dataset_repeats": (1,),
    "caption_prefix": ("",),
    "caption_suffix": ("",),
    "caption_separator": (",",),
    "keep_tokens_separator": ("",),
    "secondary_separator": ("",),
    "enable_wildcard": (False,),
    "face_crop_aug_range": ("",),
    "token_warmup_min": (1,),
    "token_warmup_step": (0, 0.0),
    "base_weights": ("", ()),
    "fused_backward_pass": (False,),
    "torch_compile": (False,),
}

# Settings whose value is a TOML table; any other table is a section.
_TABLE_FIELDS = frozenset({"optimizer_args"})
# sd-scripts arguments that take several values (``--optimizer_args a=1 b=2``).
_LIST_ARGUMENTS = ("optimizer_args", "network_args", "lr_scheduler_args", "base_weights")
_NETWORK_ARGS = {"conv_dim": int, "conv_alpha": float, "rank_dropout": float, "module_dropout": float}
_RENAMED = {"caption_extention": "caption_extension"}
_OLD_OPTIMIZER_FLAGS = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}
_SPECIAL = ("network_module", "network_args", *_RENAMED, *_OLD_OPTIMIZER_FLAGS)

KNOWN_SD_SCRIPTS_KEYS: frozenset[str] = frozenset(
    (*TrainConfig.model_fields, *SD_SCRIPTS_IGNORED, *SD_SCRIPTS_DEFAULT_ONLY, *_SPECIAL)
)


def flatten_sections(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Merge ``[section]`` tables into one flat dict, as sd-scripts does."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        entries = value.items() if isinstance(value, dict) and key not in _TABLE_FIELDS else [(key, value)]
        for name, item in entries:
            if name in flat:
                raise ConfigError(f"{where}: {name!r} is set twice; keep one")
            if isinstance(item, dict) and name not in _TABLE_FIELDS:
                raise ConfigError(f"{where}: [{key}] holds the table {name!r}; sections cannot be nested")
            flat[name] = item
    return flat


def map_sd_scripts_keys(data: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[IgnoredKey]]:
    """sd-scripts keys -> ``TrainConfig`` values, plus the keys ignored on purpose.

    Raises ConfigError for unknown keys, unsupported values and contradictions.
    """
    values: dict[str, Any] = {}
    ignored: list[IgnoredKey] = []
    for key, value in data.items():
        if key in TrainConfig.model_fields:
            _put(values, key, value, where)
        elif key in _RENAMED:
            _put(values, _RENAMED[key], value, where)
        elif key in SD_SCRIPTS_IGNORED:
            ignored.append(IgnoredKey(key, SD_SCRIPTS_IGNORED[key]))
        elif key in SD_SCRIPTS_DEFAULT_ONLY:
            _check_default(key, value, where)
        elif key == "network_module":
            if value not in ("networks.lora", "", None):
                raise ConfigError(
                    f"{where}: network_module {value!r} is not supported; loralab trains kohya LoRA/LoCon "
                    f"(networks.lora)"
                )
        elif key == "network_args":
            for name, item in parse_network_args(value, where).items():
                _put(values, name, item, where)
        elif key in _OLD_OPTIMIZER_FLAGS:
            if value is True:
                _put(values, "optimizer_type", _OLD_OPTIMIZER_FLAGS[key], where)
        else:
            raise unknown_key_error(key, KNOWN_SD_SCRIPTS_KEYS, where)
    return values, ignored


def parse_network_args(value: Any, where: str) -> dict[str, Any]:
    """``["conv_dim=4", "conv_alpha=1"]`` or ``"conv_dim=4 conv_alpha=1"`` -> typed dict."""
    tokens = shlex.split(value) if isinstance(value, str) else [str(token) for token in value]
    parsed: dict[str, Any] = {}
    for token in tokens:
        name, sep, text = token.partition("=")
        name, text = name.strip(), text.strip().strip("'\"")
        if not sep or not name:
            raise ConfigError(f"{where}: malformed network_args token {token!r}; expected key=value, e.g. conv_dim=4")
        if name not in _NETWORK_ARGS:
            raise ConfigError(
                f"{where}: network_args {name!r} is not supported (loralab trains plain LoRA/LoCon; "
                f"it takes {', '.join(_NETWORK_ARGS)});{did_you_mean(name, _NETWORK_ARGS) or ' remove it'}"
            )
        try:
            parsed[name] = _NETWORK_ARGS[name](text)
        except ValueError:
            raise ConfigError(f"{where}: network_args {token!r}: {text!r} is not a number") from None
    return parsed


def parse_command_line(text: str, where: str) -> dict[str, Any]:
    """sd-scripts command-line flags (``--name``, ``--name=value``, ``--name value ...``) -> dict.

    Flags of bool settings take no value; list arguments (``--optimizer_args``) take every value
    up to the next flag. Raises ConfigError for text that is not a flag.
    """
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: {text!r} cannot be split into arguments: {exc}") from None
    parsed: dict[str, Any] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"{where}: unexpected {token!r}; expected --name or --name=value")
        name, sep, inline = token[2:].partition("=")
        following: list[str] = []
        while index < len(tokens) and not tokens[index].startswith("--"):
            following.append(tokens[index])
            index += 1
        if sep:
            following.insert(0, inline)
        if name in _LIST_ARGUMENTS:
            parsed[name] = following
        elif not following:
            parsed[name] = True  # a store_true flag
        elif len(following) == 1 and not _is_bool_setting(name):
            parsed[name] = following[0]
        else:
            takes = "no value" if _is_bool_setting(name) else "one value"
            raise ConfigError(f"{where}: --{name} takes {takes}, got {following}")
    return parsed


def _is_bool_setting(name: str) -> bool:
    field = TrainConfig.model_fields.get(name)
    return field is not None and field.annotation is bool


def _put(values: dict[str, Any], key: str, value: Any, where: str) -> None:
    if key in values and values[key] != value:
        raise ConfigError(f"{where}: {key} is given twice with different values ({values[key]!r} and {value!r})")
    values[key] = value


def _check_default(key: str, value: Any, where: str) -> None:
    accepted = SD_SCRIPTS_DEFAULT_ONLY[key]
    normalized = tuple(value) if isinstance(value, list) else value
    if normalized is None or normalized in accepted:
        return
    raise ConfigError(
        f"{where}: {key} = {value!r} is not supported by loralab; remove it or use sd-scripts' default {accepted[0]!r}"
    )
