"""Read, override and write training configs.

``load_config`` reads, by extension:

- ``.toml``: native loralab TOML (flat keys; ``[sections]`` allowed as grouping) or an
  sd-scripts ``--config_file`` TOML: the same names, with sd-scripts' extra keys translated
  (see :mod:`loralab.config.sd_scripts`);
- ``.json``: a kohya_ss GUI config (see :mod:`loralab.config.kohya_gui`).

Then ``--set key=value`` overrides are applied (:mod:`loralab.config.overrides`) and the whole
is validated once, so an override gets exactly the checks a file key gets. ``save_config``
writes the native TOML atomically; ``load_config(save_config(c))`` equals ``c``.

Errors: every problem is a one-line ``ConfigError`` that names the file (or ``--set``) and the key.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import ValidationError

from loralab.config.diagnostics import IgnoredKey, validation_error
from loralab.config.kohya_gui import import_gui_config
from loralab.config.optimizer_args import format_optimizer_args
from loralab.config.overrides import WHERE as OVERRIDES_WHERE
from loralab.config.overrides import override_values, parse_override
from loralab.config.schema import TrainConfig
from loralab.config.sd_scripts import flatten_sections, map_sd_scripts_keys
from loralab.errors import ConfigError

log = logging.getLogger(__name__)

SourceFormat = Literal["native", "sd-scripts", "kohya_gui"]
_HEADER = "# loralab training config (native TOML; sd-scripts names, see docs/config.md)\n"


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config, the format it was read from, and the keys ignored on purpose."""

    config: TrainConfig
    source_format: SourceFormat
    ignored: tuple[IgnoredKey, ...]


def load_config(path: Path | str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a native TOML, sd-scripts TOML or kohya_ss GUI JSON config and apply ``overrides``.

    Keys ignored on purpose are logged at INFO; use :func:`read_config` to get them.
    Raises ConfigError (one line) for anything wrong with the file, its keys or values.
    """
    loaded = read_config(path, overrides)
    for item in loaded.ignored:
        log.info("%s: ignored %s", path, item)
    return loaded.config


def read_config(path: Path | str, overrides: Sequence[str] = ()) -> LoadedConfig:
    """Like :func:`load_config`, returning the source format and the ignored keys too."""
    path = Path(path)
    where = str(path)
    # A missing file or a folder says so before its name's suffix is judged.
    if not path.exists():
        raise ConfigError(f"config file {path} not found; check the path")
    if path.is_dir():
        raise ConfigError(f"config path {path} is a folder; give the config file")
    if path.suffix.lower() == ".json":
        data = _read_json(path)
        values, ignored = import_gui_config(data, where)
        source: SourceFormat = "kohya_gui"
    elif path.suffix.lower() == ".toml":
        data = _read_toml(path)
        flat = flatten_sections(data, where)
        values, ignored = map_sd_scripts_keys(flat, where)
        native = flat == data and all(key in TrainConfig.model_fields for key in flat)
        source = "native" if native else "sd-scripts"
    else:
        raise ConfigError(
            f"{path}: unknown config format {path.suffix!r}; use .toml (loralab or sd-scripts) or .json (kohya_ss GUI)"
        )
    config = _build_with_overrides(values, overrides, where)
    return LoadedConfig(config, source, tuple(ignored))


def apply_overrides(config: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """``config`` with ``key=value`` overrides applied and everything validated again."""
    return _build_with_overrides(config.model_dump(), list(overrides), OVERRIDES_WHERE)


def build_config(values: Mapping[str, Any], where: str, overridden: Iterable[str] = ()) -> TrainConfig:
    """Validate ``values`` into a TrainConfig; every error becomes a one-line ConfigError.

    The message names ``where`` (the file), or ``--set`` when the bad key was in ``overridden``.
    """
    overridden_keys = frozenset(overridden)
    try:
        return TrainConfig.model_validate(dict(values))
    except ValidationError as exc:
        location = exc.errors()[0]["loc"]
        source = OVERRIDES_WHERE if location and str(location[0]) in overridden_keys else where
        raise validation_error(exc, source) from None
    except ConfigError as exc:  # raised by the schema's own checks, which do not know the source
        keys = ", ".join(sorted(overridden_keys))
        if not keys:
            source = where
        elif where == OVERRIDES_WHERE:
            source = f"{OVERRIDES_WHERE} {keys}"
        else:
            source = f"{where} with {OVERRIDES_WHERE} {keys}"
        raise ConfigError(f"{source}: {exc}") from None


def save_config(config: TrainConfig, path: Path | str) -> None:
    """Write ``config`` as native TOML, atomically (a temporary file renamed over ``path``)."""
    write_text_atomic(Path(path), config_to_toml(config))


def config_to_toml(config: TrainConfig) -> str:
    """The native TOML text of ``config``: every set field, flat, in schema order."""
    return _HEADER + tomli_w.dumps(config_to_toml_values(config))


def config_to_toml_values(config: TrainConfig) -> dict[str, Any]:
    """``config`` as TOML-ready values (None left out: absent means unset)."""
    values: dict[str, Any] = {}
    for name, value in config.model_dump(exclude_none=True).items():
        if name == "optimizer_args":
            if value:
                values[name] = format_optimizer_args(value)
        elif isinstance(value, Path):
            values[name] = str(value)
        elif name == "resolution":
            values[name] = ",".join(str(size) for size in value)  # "768,768", as kohya users write it
        else:
            values[name] = value
    return values


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _build_with_overrides(values: Mapping[str, Any], overrides: Sequence[str], where: str) -> TrainConfig:
    merged = override_values(values, overrides)
    overridden = {parse_override(text)[0].partition(".")[0] for text in overrides}
    return build_config(merged, where, overridden)


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _read_json(path: Path) -> dict[str, Any]:
    # The GUI on Windows may write a byte-order mark; utf-8-sig accepts both.
    try:
        data = json.loads(_read_text(path, encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a kohya_ss GUI config is a JSON object, not {type(data).__name__}")
    return data
