"""``--set key=value`` overrides: parsed like TOML values, applied with the file's names and checks.

``value`` is read as a TOML value (``1e-4``, ``true``, ``"text"``, ``[768, 512]``), falling
back to the plain string (``768,512``, ``cosine``) for the setting's own parsing. An empty value
(``key=``) resets the setting to its default. ``optimizer_args.KEY=VALUE`` sets one optimizer
argument, its value written in kohya's syntax (``optimizer_args.betas=0.9,0.99``,
``optimizer_args.growth_rate=inf``); ``optimizer_args.KEY=`` removes it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from loralab.config.diagnostics import unknown_key_error
from loralab.config.optimizer_args import parse_optimizer_arg_token, parse_optimizer_args
from loralab.config.schema import TrainConfig
from loralab.errors import ConfigError

WHERE = "--set"
_DICT_FIELDS = ("optimizer_args",)


def parse_override(text: str) -> tuple[str, str]:
    """``"key=value"`` -> ``("key", "value")``; raises ConfigError without ``=``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{WHERE} {text!r} is not key=value, e.g. --set learning_rate=1e-4")
    return key, value.strip()


def parse_value(text: str) -> Any:
    """A TOML value, or the text itself when it is not one."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def override_values(values: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``values`` (TrainConfig inputs) with ``overrides`` applied, in order.

    Raises ConfigError for malformed overrides and unknown keys (with a hint).
    """
    result = dict(values)
    for text in overrides:
        key, raw = parse_override(text)
        field, dot, sub_key = key.partition(".")
        if dot and field in _DICT_FIELDS:
            entries = dict(parse_optimizer_args(result.get(field)))
            if raw:
                name, value = parse_optimizer_arg_token(f"{sub_key}={raw}")
                entries[name] = value
            else:
                entries.pop(sub_key, None)
            result[field] = entries
        elif key in TrainConfig.model_fields:
            if raw:
                result[key] = parse_value(raw)
            else:
                result.pop(key, None)
        else:
            candidates = [*TrainConfig.model_fields, *(f"{name}.{sub_key or 'KEY'}" for name in _DICT_FIELDS)]
            raise unknown_key_error(key, candidates, WHERE)
    return result
