"""kohya's ``optimizer_args`` syntax: ``decouple=True weight_decay=0.6 betas=0.9,0.99``.

The kohya_ss GUI stores the optimizer's extra keyword arguments as one string of
``key=value`` tokens separated by spaces; sd-scripts takes the same tokens as a list
(``--optimizer_args a=1 b=2``, or an array in its TOML). Values are typed:

- ``True`` / ``False`` (any case) -> bool, ``None`` -> None,
- integers and floats, including ``inf``, ``-inf`` and ``nan`` (``growth_rate=inf``),
- comma-separated values -> a tuple (``betas=0.9,0.99``; ``(0.9,0.99)`` and a trailing
  comma for one element are accepted too),
- a quoted value -> that string; a bare word (``name=adam``) -> the word.

The string is split into tokens like a shell command line, because the GUI hands it to
sd-scripts through one: quotes around a whole token or value are removed first, so a string
that looks like another type needs two levels (``name="'True'"``).

A token without ``=``, an empty key or value, or a bare value that looks like a broken
number (``weight_decay=0.6.1``) is a ``ConfigError`` naming the token. The same key given
twice is an error too. :func:`format_optimizer_args` writes a dict back in this syntax so
that parsing the result gives the same dict.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

from loralab.errors import ConfigError

OptimizerArgValue = bool | int | float | str | None | tuple[Any, ...]

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# A bare string value must look like a word (or a dotted name): anything else is far more
# likely a mistyped number or list than a string the optimizer expects.
_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_INT = re.compile(r"[+-]?\d+\Z")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z")
_SPECIAL_FLOATS = {"inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_KEYWORDS: dict[str, Any] = {"true": True, "false": False, "none": None}


def parse_optimizer_args(raw: str | Iterable[str] | Mapping[str, Any] | None) -> dict[str, OptimizerArgValue]:
    """Parse ``optimizer_args`` given as a kohya string, a list of tokens, or a mapping.

    A mapping (a TOML table) keeps its typed values; its lists become tuples. Raises
    ConfigError with the offending token for malformed input.
    """
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return {_check_key(str(key), str(key)): _from_typed(key, value) for key, value in raw.items()}
    if isinstance(raw, str):
        try:
            tokens = shlex.split(raw)
        except ValueError as exc:  # an unclosed quote
            raise ConfigError(f"optimizer_args {raw!r} cannot be split into tokens: {exc}") from None
    else:
        tokens = [str(token) for token in raw]
    parsed: dict[str, OptimizerArgValue] = {}
    for token in tokens:
        key, value = parse_optimizer_arg_token(token)
        if key in parsed:
            raise ConfigError(f"optimizer_args sets {key!r} twice; keep one of them")
        parsed[key] = value
    return parsed


def parse_optimizer_arg_token(token: str) -> tuple[str, OptimizerArgValue]:
    """One ``key=value`` token -> ``(key, typed value)``."""
    key, sep, text = token.partition("=")
    if not sep:
        raise ConfigError(f"malformed optimizer_args token {token!r}: expected key=value, e.g. betas=0.9,0.99")
    key = _check_key(key.strip(), token)
    return key, parse_optimizer_arg_value(text.strip(), token)


def parse_optimizer_arg_value(text: str, token: str | None = None) -> OptimizerArgValue:
    """Type one value written in kohya's syntax (see the module docstring)."""
    where = token if token is not None else text
    if not text:
        raise ConfigError(f"malformed optimizer_args token {where!r}: the value is empty")
    if _is_quoted(text):
        return text[1:-1]
    if len(text) >= 2 and text[0] + text[-1] in ("()", "[]"):
        text = text[1:-1].strip()
        if not text:
            return ()
        if "," not in text:
            text += ","
    if "," in text:
        parts = text.split(",")
        if parts[-1].strip() == "":  # a trailing comma: ``0.9,`` is a one-element tuple
            parts = parts[:-1]
        return tuple(_parse_scalar(part.strip(), where) for part in parts)
    return _parse_scalar(text, where)


def format_optimizer_args(args: Mapping[str, Any]) -> str:
    """Write ``args`` in kohya's syntax; ``parse_optimizer_args`` of the result equals ``args``."""
    tokens = []
    for key, value in args.items():
        token = f"{key}={format_optimizer_arg_value(value)}"
        # Tokens are split like a shell command line; quote the ones that need it.
        tokens.append(token if shlex.quote(token) == token else shlex.quote(token))
    return " ".join(tokens)


def format_optimizer_arg_value(value: Any) -> str:
    """One value in kohya's syntax (the inverse of :func:`parse_optimizer_arg_value`)."""
    if isinstance(value, tuple | list):
        if not value:
            return "()"
        for item in value:
            if isinstance(item, str) and "," in item:
                raise ConfigError(f"optimizer_args list element {item!r} holds a comma and cannot be written")
        text = ",".join(_format_scalar(item) for item in value)
        return text + "," if len(value) == 1 else text
    return _format_scalar(value)


def _check_key(key: str, token: str) -> str:
    if not _KEY.match(key):
        raise ConfigError(
            f"malformed optimizer_args token {token!r}: {key!r} is not an argument name (letters, digits, _)"
        )
    return key


def _is_quoted(text: str) -> bool:
    return len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""


def _parse_scalar(text: str, where: str) -> OptimizerArgValue:
    if not text:
        raise ConfigError(f"malformed optimizer_args token {where!r}: a list element is empty")
    if _is_quoted(text):
        return text[1:-1]
    lowered = text.lower()
    if lowered in _KEYWORDS:
        return _KEYWORDS[lowered]
    if lowered in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[lowered]
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    if _BARE_WORD.match(text):
        return text
    raise ConfigError(
        f"malformed optimizer_args token {where!r}: {text!r} is not a number, True/False/None, or a word "
        f"(quote strings, e.g. name='{text}')"
    )


def _format_scalar(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        if _BARE_WORD.match(value) and value.lower() not in _KEYWORDS and value.lower() not in _SPECIAL_FLOATS:
            return value
        if "'" not in value:
            return f"'{value}'"
        if '"' not in value:
            return f'"{value}"'
        raise ConfigError(f"optimizer_args string {value!r} holds both quote characters and cannot be written")
    raise ConfigError(f"optimizer_args value {value!r} is not a bool, number, string, None or a flat list")


def _from_typed(key: Any, value: Any) -> OptimizerArgValue:
    """A value from a TOML table: already typed; lists become tuples (the optimizers' betas).

    A string is read as kohya writes values (``"0.9,0.99"`` is the tuple, ``"True"`` the bool), as
    ``--set`` and sweep axes read it; one that is no kohya value stays the string it is.
    """
    if isinstance(value, str):
        try:
            return parse_optimizer_arg_value(value.strip())
        except ConfigError:
            return value
    if isinstance(value, list | tuple):
        items = tuple(value)
        for item in items:
            if isinstance(item, list | tuple | dict):
                raise ConfigError(f"optimizer_args {key!r}: nested lists are not supported (got {value!r})")
        return items
    if isinstance(value, dict):
        raise ConfigError(f"optimizer_args {key!r}: a table is not a valid value (got {value!r})")
    return value
