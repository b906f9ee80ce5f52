"""Expand a sweep file into its runs: readable names, validated configs, and ``expanded.json``.

Every run's config is the baseline config with the run's overrides applied through
:func:`loralab.config.loading.apply_overrides`, so a variant gets exactly the names and checks
of ``loralab train --set``; a variant that cannot train is reported before anything starts.

Names: ``baseline``, ``baseline-seed2`` (the baseline's repeats), ``network_dim-64``,
``optimizer-Prodigy``, ``optimizer_args.growth_rate-1.06``; in a grid the parts are joined with
``+`` (``network_dim-64+optimizer_args.growth_rate-inf``). A variant whose config equals the
baseline's *is* the baseline and is trained once.

``expanded.json`` holds one entry per run and comparison. A grid, or a one-at-a-time sweep of one
axis, is one comparison named after the sweep; in a one-at-a-time sweep of several axes each axis
is a comparison and the baseline (with its repeats) appears in each, under the same run name.
Fields: name, comparison, axis, value, is_baseline, seed_repeat, overrides, config_hash, and
``values`` (axis -> label of this run on every axis).

A sweep keeps every LoRA its runs save (the report compares the save points), so
``save_last_n_epochs`` / ``save_last_n_steps`` set in the baseline or a variant are overridden
to "keep all", with a warning.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from loralab.config.diagnostics import did_you_mean
from loralab.config.loading import apply_overrides, config_to_toml_values, load_config, write_text_atomic
from loralab.config.optimizer_args import format_optimizer_arg_value, format_optimizer_args
from loralab.config.schema import TrainConfig
from loralab.errors import LoralabError
from loralab.sweep.spec import SweepError, SweepSpec, canonical_setting, format_label, safe_name

logger = logging.getLogger(__name__)

BASELINE = "baseline"
EXPANDED_FILE = "expanded.json"
# Where a run writes is not part of what it trains: these keys stay out of the config hash.
OUTPUT_KEYS = ("output_dir", "logging_dir", "output_name", "resume")
SETTING_NAMES_EXTRA = ("optimizer", "optimizer_args.KEY")  # setting names besides the config's fields
KEEP_EVERY_SAVE = {"save_last_n_epochs": None, "save_last_n_steps": None}


@dataclass(frozen=True)
class Variant:
    """One value of an axis: its label and the settings it changes (override key -> value)."""

    label: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Axis:
    """An axis of the sweep; ``setting`` is the setting it varies (None for groups of settings)."""

    name: str
    setting: str | None
    variants: tuple[Variant, ...]


@dataclass(frozen=True)
class SweepRun:
    """One run as one comparison sees it (an entry of ``expanded.json``)."""

    name: str
    comparison: str
    axis: str | None
    value: str | None
    is_baseline: bool
    seed_repeat: int | None  # 1, 2, ... for the baseline and its repeats; None for variants
    overrides: dict[str, Any]
    values: dict[str, str]
    config: TrainConfig = field(repr=False, compare=False)
    config_hash: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "comparison": self.comparison,
            "axis": self.axis,
            "value": self.value,
            "is_baseline": self.is_baseline,
            "seed_repeat": self.seed_repeat,
            "overrides": {key: json_safe(value) for key, value in self.overrides.items()},
            "values": dict(self.values),
            "config_hash": self.config_hash,
        }


@dataclass(frozen=True)
class Expansion:
    """A sweep file, expanded: its baseline config and every (run, comparison) entry."""

    spec: SweepSpec
    baseline: TrainConfig
    axes: tuple[Axis, ...]
    entries: tuple[SweepRun, ...]

    @property
    def runs(self) -> list[SweepRun]:
        """Each run once (its first entry), in the order they train: baseline first."""
        first: dict[str, SweepRun] = {}
        for entry in self.entries:
            first.setdefault(entry.name, entry)
        return sorted(first.values(), key=lambda run: not run.is_baseline)  # stable: file order otherwise

    def to_json(self) -> list[dict[str, Any]]:
        return [entry.to_json() for entry in self.entries]


# ---------------------------------------------------------------------------------------------
# Overrides


def override_strings(overrides: Mapping[str, Any]) -> list[str]:
    """``{setting: value}`` as ``key=value`` strings for :func:`apply_overrides`.

    ``""`` resets a setting; a string for ``optimizer_args.KEY`` is kohya syntax as written;
    other values are written as TOML literals, so ``"true"`` stays a string and ``true`` a bool.
    """
    texts = []
    for key, value in overrides.items():
        if isinstance(value, str) and (value == "" or key.startswith("optimizer_args.")):
            texts.append(f"{key}={value}")
        elif key.startswith("optimizer_args."):
            texts.append(f"{key}={format_optimizer_arg_value(value)}")
        elif isinstance(value, Mapping):  # a whole optimizer_args table
            texts.append(f"{key}={toml_literal(format_optimizer_args(value))}")
        else:
            texts.append(f"{key}={toml_literal(value)}")
    return texts


def toml_literal(value: Any) -> str:
    """``value`` written as a TOML value (``768``, ``"cosine"``, ``[768, 512]``, ``inf``)."""
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as the strings kohya syntax reads (``"inf"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return format_label(value) if not math.isnan(value) else "nan"
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    return value


def config_hash(config: TrainConfig) -> str:
    """SHA-256 of everything that decides what a run trains (all settings but where it writes)."""
    values = {key: value for key, value in config_to_toml_values(config).items() if key not in OUTPUT_KEYS}
    text = json.dumps(values, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Axes


def parse_axes(spec: SweepSpec) -> tuple[Axis, ...]:
    """The axes of ``spec`` with their variants, settings checked against the config's names."""
    axes = []
    for name, values in spec.axes.items():
        setting = canonical_setting(name)
        if isinstance(values, dict) and _holds_groups(setting, values):
            variants = [
                Variant(str(label), _group_overrides(spec, name, label, group)) for label, group in values.items()
            ]
        elif setting is not None:
            labelled = values.items() if isinstance(values, dict) else ((format_label(v), v) for v in values)
            variants = [Variant(str(label), {setting: value}) for label, value in labelled]
        else:
            raise SweepError(
                f"{spec.source}: axis {name!r} is not a setting;{_setting_hint(name)} an axis of values is "
                f"named after a setting; any other name takes labelled groups, e.g. "
                f"[axes.{name}] label = {{ setting = value }}"
            )
        labels = [safe_name(variant.label) for variant in variants]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise SweepError(
                f"{spec.source}: axis {name!r} has two values labelled {duplicates[0]!r}; label them apart"
            )
        axes.append(Axis(name, setting, tuple(variants)))
    return tuple(axes)


def _holds_groups(setting: str | None, values: dict[str, Any]) -> bool:
    """Whether a labelled axis holds groups of settings rather than values of its setting.

    Any axis may hold groups (``[axes.optimizer] Prodigy = { optimizer = "Prodigy", ... }``);
    only ``optimizer_args`` takes a table as its value, so there a table is a value.
    """
    if setting is None:
        return True
    return setting != "optimizer_args" and any(isinstance(value, dict) for value in values.values())


def _group_overrides(spec: SweepSpec, axis: str, label: str, group: Any) -> dict[str, Any]:
    if not isinstance(group, dict):
        raise SweepError(
            f"{spec.source}: axes.{axis}.{label} must be a table of settings to change, e.g. "
            f"{{ mixed_precision = \"fp16\" }} (got {group!r})"
        )
    return {_setting(spec, f"axes.{axis}.{label}", key): value for key, value in group.items()}


def _setting(spec: SweepSpec, where: str, key: str) -> str:
    setting = canonical_setting(key)
    if setting is None:
        hint = _setting_hint(key) or " see loralab config --help"
        raise SweepError(f"{spec.source}: {where}: {key!r} is not a setting;{hint}")
    return setting


def _setting_hint(key: str) -> str:
    """``" did you mean 'x'?"`` for the setting closest to ``key``, or ``""``."""
    return did_you_mean(key, [*TrainConfig.model_fields, *SETTING_NAMES_EXTRA])


# ---------------------------------------------------------------------------------------------
# Expansion


def expand_sweep(spec: SweepSpec) -> Expansion:
    """Every run of ``spec`` with its validated config. Raises SweepError naming the bad run."""
    baseline_overrides = {_setting(spec, "baseline.set", key): value for key, value in spec.baseline.set.items()}
    config_path = spec.resolve(spec.baseline.config)
    try:
        baseline = load_config(config_path, override_strings(baseline_overrides))
    except LoralabError as exc:
        raise SweepError(f"{spec.source}: baseline: {exc}") from None
    baseline = keep_every_save(baseline, f"{spec.source}: baseline")
    axes = parse_axes(spec)
    builder = _Builder(spec, baseline)
    if not axes:
        builder.add_baseline(spec.title, None, None, {})
    elif spec.mode == "grid":
        _expand_grid(builder, spec.title, axes)
    else:
        for axis in axes:
            # One axis is the sweep's one comparison (named after the sweep); several are one each.
            _expand_axis(builder, axis, spec.title if len(axes) == 1 else axis.name)
    return Expansion(spec, baseline, axes, tuple(builder.entries))


def keep_every_save(config: TrainConfig, where: str) -> TrainConfig:
    """``config`` with keep-last-N pruning off: a sweep evaluates and reports every save point."""
    pruning = [key for key in KEEP_EVERY_SAVE if getattr(config, key)]
    if not pruning:
        return config
    logger.warning("%s: %s ignored; a sweep keeps every saved LoRA to compare them", where, ", ".join(pruning))
    return config.model_copy(update=KEEP_EVERY_SAVE)


def _expand_axis(builder: _Builder, axis: Axis, comparison: str) -> None:
    """One-at-a-time: each value of ``axis`` on the baseline, as ``comparison``."""
    labels = builder.baseline_labels([axis])
    for variant in axis.variants:
        config = builder.configure(variant.overrides, f"{axis.name}-{variant.label}")
        if builder.is_baseline(config):
            continue
        builder.add(
            name=safe_name(f"{axis.name}-{variant.label}"), comparison=comparison, axis=axis.name,
            value=variant.label, overrides=variant.overrides, values={axis.name: variant.label}, config=config,
        )  # fmt: skip
    builder.add_baseline(comparison, axis.name, labels[axis.name], labels)


def _expand_grid(builder: _Builder, comparison: str, axes: Sequence[Axis]) -> None:
    """Grid: every combination of the axes' values; the whole grid is one comparison."""
    axis_name = "+".join(axis.name for axis in axes)
    labels = builder.baseline_labels(axes)
    for combination in itertools.product(*(axis.variants for axis in axes)):
        overrides: dict[str, Any] = {}
        for variant in combination:  # axes apply in the order written: a later one wins a shared setting
            overrides.update(variant.overrides)
        parts = [f"{axis.name}-{variant.label}" for axis, variant in zip(axes, combination)]
        config = builder.configure(overrides, "+".join(parts))
        if builder.is_baseline(config):
            continue
        values = {axis.name: variant.label for axis, variant in zip(axes, combination)}
        builder.add(
            name="+".join(safe_name(part) for part in parts), comparison=comparison, axis=axis_name,
            value="+".join(values.values()), overrides=overrides, values=values, config=config,
        )  # fmt: skip
    builder.add_baseline(comparison, axis_name, "+".join(labels.values()), labels)


class _Builder:
    """Collects entries, validating each config once and keeping names unambiguous."""

    def __init__(self, spec: SweepSpec, baseline: TrainConfig) -> None:
        self.spec = spec
        self.baseline = baseline
        self.baseline_hash = config_hash(baseline)
        self.entries: list[SweepRun] = []
        self._hash_of_name: dict[str, str] = {}

    def configure(self, overrides: Mapping[str, Any], what: str) -> TrainConfig:
        try:
            config = apply_overrides(self.baseline, override_strings(overrides))
            return keep_every_save(config, f"{self.spec.source}: variant {what}")
        except LoralabError as exc:
            # The config's message names its source (``--set ...: ``); here the variant is the source.
            message = str(exc).split(": ", 1)[1] if str(exc).startswith("--set") else str(exc)
            raise SweepError(f"{self.spec.source}: variant {what}: {message}") from None

    def is_baseline(self, config: TrainConfig) -> bool:
        return config_hash(config) == self.baseline_hash

    def baseline_labels(self, axes: Iterable[Axis]) -> dict[str, str]:
        """The baseline's label on each axis: the value that leaves it unchanged, else its setting."""
        labels = {}
        for axis in axes:
            same = [v.label for v in axis.variants if self._leaves_baseline(axis, v)]
            labels[axis.name] = same[0] if same else self._current_label(axis)
        return labels

    def _leaves_baseline(self, axis: Axis, variant: Variant) -> bool:
        return self.is_baseline(self.configure(variant.overrides, f"{axis.name}-{variant.label}"))

    def _current_label(self, axis: Axis) -> str:
        if axis.setting is None:
            return BASELINE
        field, _, sub_key = axis.setting.partition(".")
        value = getattr(self.baseline, field)
        if sub_key:
            value = value.get(sub_key)
        return "unset" if value is None else format_label(value)

    def add(
        self, *, config: TrainConfig, is_baseline: bool = False, seed_repeat: int | None = None, **fields: Any
    ) -> None:
        entry = SweepRun(
            **fields, is_baseline=is_baseline, seed_repeat=seed_repeat, config=config, config_hash=config_hash(config)
        )
        known = self._hash_of_name.setdefault(entry.name, entry.config_hash)
        if known != entry.config_hash:
            raise SweepError(
                f"{self.spec.source}: two different variants are both named {entry.name!r}; label them apart"
            )
        self.entries.append(entry)

    def add_baseline(self, comparison: str, axis: str | None, value: str | None, values: dict[str, str]) -> None:
        """The baseline and its seed repeats, as members of ``comparison``."""
        for repeat in range(1, self.spec.baseline.repeats + 1):
            overrides = {} if repeat == 1 else {"seed": self.baseline.seed + repeat - 1}
            config = self.baseline if repeat == 1 else self.baseline.model_copy(update=overrides)
            self.add(
                name=BASELINE if repeat == 1 else f"{BASELINE}-seed{repeat}", comparison=comparison, axis=axis,
                value=value, is_baseline=True, seed_repeat=repeat, overrides=overrides, values=dict(values),
                config=config,
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# expanded.json


def write_expanded(expansion: Expansion, sweep_dir: Path) -> Path:
    """Write ``expanded.json`` into ``sweep_dir`` (atomically) and return its path."""
    path = Path(sweep_dir) / EXPANDED_FILE
    write_text_atomic(path, json.dumps(expansion.to_json(), indent=2) + "\n")
    return path


def read_expanded(sweep_dir: Path) -> list[dict[str, Any]]:
    """The entries of a sweep folder's ``expanded.json`` (for the report and scoring)."""
    path = Path(sweep_dir) / EXPANDED_FILE
    if Path(sweep_dir).exists() and not Path(sweep_dir).is_dir():
        raise SweepError(f"{sweep_dir} is a file, not a folder; give the sweep's output folder")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepError(f"{sweep_dir} holds no {EXPANDED_FILE}; run 'loralab sweep' on it first") from None
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise SweepError(f"{path} is damaged ({exc}); run 'loralab sweep' on the sweep file again to rewrite it") from None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise SweepError(f"{path} is damaged (not a list of runs); run 'loralab sweep' on the sweep file again to rewrite it")
    return entries
