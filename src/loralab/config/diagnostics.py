"""One-line messages for config problems (unknown keys with a hint, pydantic errors) and
the record of keys an importer ignores on purpose."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import ValidationError

from loralab.errors import ConfigError


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``" did you mean 'x'?"`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" did you mean {close[0]!r}?" if close else ""


def unknown_key_error(key: str, candidates: Iterable[str], where: str) -> ConfigError:
    """The error for a key that is neither a setting nor a known key of ``where``'s format."""
    return ConfigError(f"{where}: unknown config key {key!r};{did_you_mean(key, candidates) or ' no similar key'}")


def validation_error(exc: ValidationError, where: str) -> ConfigError:
    """Turn pydantic's (multi-line) error into one line naming the key, the problem and the value."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    key = ".".join(str(part) for part in first["loc"]) or "config"
    value = first.get("input")
    text = f"{where}: {key}: {first['msg']} (got {value!r})"
    if first["type"] == "literal_error" and isinstance(value, str) and first["loc"]:
        hint = did_you_mean(value, _literal_choices(str(first["loc"][0])))
        if hint:
            text += ";" + hint
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problems)"
    return ConfigError(text)


def _literal_choices(field_name: str) -> list[str]:
    from loralab.config.schema import TrainConfig

    field = TrainConfig.model_fields.get(field_name)
    return _literal_values(field.annotation) if field is not None else []


def _literal_values(annotation: object) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [value for value in typing.get_args(annotation) if isinstance(value, str)]
    return [value for arg in typing.get_args(annotation) for value in _literal_values(arg)]


@dataclass(frozen=True)
class IgnoredKey:
    """A key of an imported config that loralab reads but deliberately does not use."""

    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"
