"""The sweep file: one baseline, the axes to vary from it, and how to evaluate every variant.

A sweep file is TOML::

    name = "Network Rank"                  # the comparison's title (default: the file name)
    mode = "one-at-a-time"                 # or "grid" (every combination of the axes)

    [baseline]
    config = "config_SD1.5.json"           # native TOML, sd-scripts TOML or kohya_ss GUI JSON
    set = { max_train_epochs = 20 }        # inline overrides, as `loralab train --set`
    repeats = 2                            # the baseline trained twice, with seeds seed, seed+1

    [axes]
    network_dim = [32, 64, 128, 192]                   # a setting and its values
    "optimizer_args.growth_rate" = [1.02, 1.06, "inf"] # one optimizer argument (kohya syntax)
    optimizer = ["DAdaptAdam", "Prodigy"]              # alias of optimizer_type
    train_data_dir = { cropped = "data/cropped", uncropped = "data/raw" }   # labelled values
    [axes.precision]                                   # not a setting: labelled groups of settings
    fp16 = { mixed_precision = "fp16", save_precision = "fp16" }
    bf16 = {}                                          # {} is the baseline itself

    [evaluation]                                       # optional; see :class:`EvaluationSpec`
    include = "evaluation.toml"                        # optional: shared settings, overridden here

    [scoring]                                          # optional; see :class:`ScoringSpec`
    face_model = "models/arcface.onnx"

An axis named after a setting (a ``TrainConfig`` field, ``optimizer_args.KEY``, or the alias
``optimizer``) takes a list of values, labelled by the values themselves, or a table of
label -> value. Any other axis name takes a table of label -> settings to change together.
Setting names and values are exactly those of ``loralab train --set``; a value ``""`` resets the
setting (``optimizer_args.KEY = ""`` removes that argument), and a string given to
``optimizer_args.KEY`` is read in kohya's syntax (``"inf"``, ``"0.9,0.99"``).

Relative paths of the sweep file itself (``baseline.config``, evaluation checkpoints, wildcard
files) are relative to the sweep file's folder; config values (``train_data_dir`` ...) are
config values and, as in a config file, relative to the working directory.

Errors: :class:`SweepError` (one line, naming the file and the key) for anything wrong.
"""

from __future__ import annotations

import math
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from loralab.config.diagnostics import did_you_mean
from loralab.config.schema import TrainConfig
from loralab.errors import LoralabError

SweepMode = Literal["one-at-a-time", "grid"]
SETTING_ALIASES = {"optimizer": "optimizer_type"}  # the kohya_ss GUI's name for optimizer_type
_DICT_SETTINGS = ("optimizer_args",)
_LABEL_CHARS = re.compile(r"[^A-Za-z0-9._\-]+")


class SweepError(LoralabError):
    """A sweep file, its axes or its evaluation block is invalid, or a sweep folder conflicts."""


# ---------------------------------------------------------------------------------------------
# Settings and labels


def canonical_setting(key: str) -> str | None:
    """The override key ``key`` stands for (``optimizer`` -> ``optimizer_type``), or None when
    ``key`` is not a setting."""
    key = SETTING_ALIASES.get(key, key)
    field, dot, sub_key = key.partition(".")
    if dot:
        return key if field in _DICT_SETTINGS and sub_key else None
    return key if key in TrainConfig.model_fields else None


def format_label(value: Any) -> str:
    """How a value reads in a run name and a report: ``1.1``, ``inf``, ``true``, ``768x512``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list | tuple):
        return "x".join(format_label(item) for item in value)
    if isinstance(value, dict):
        return "+".join(f"{key}={format_label(item)}" for key, item in value.items())
    return str(value)


def safe_name(text: str) -> str:
    """``text`` usable as a folder name on every platform: runs of other characters become ``_``."""
    cleaned = _LABEL_CHARS.sub("_", text).strip("._")
    return cleaned or "_"


# ---------------------------------------------------------------------------------------------
# The file's parts


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaselineSpec(_Strict):
    """The config every run starts from."""

    config: Path = Field(description="Baseline config: native TOML, sd-scripts TOML or kohya_ss GUI JSON.")
    set: dict[str, Any] = Field(default_factory=dict, description="Inline overrides: setting -> value.")
    repeats: int = Field(
        1, ge=1, le=20, description="Train the baseline this many times, with seeds seed, seed+1, ... (noise floor)."
    )


class RandomPrompts(_Strict):
    """``count`` prompts drawn from ``template``'s wildcards (``__scene__`` reads ``scene.txt``)."""

    wildcard_file: Path = Field(description="Wildcard list, one entry a line; its name (stem) is the wildcard.")
    count: int = Field(ge=1, le=1000, description="How many prompts to draw.")
    template: str | None = Field(
        None, description="Prompt with __<wildcard>__ in it (default: the trigger and the wildcard)."
    )


class EvalCheckpoint(_Strict):
    """A base checkpoint the LoRAs are rendered on."""

    path: str = Field(description="Single-file checkpoint or diffusers folder.")
    cfg: float | None = Field(None, gt=0, description="CFG scale on this checkpoint (default: evaluation.cfg).")


class EvaluationSpec(_Strict):
    """How every save point of every run is rendered: checkpoints x prompt sets x seeds x weights."""

    checkpoints: dict[str, EvalCheckpoint] = Field(
        default_factory=dict, description="label -> checkpoint (a path, or {path, cfg}); none: the run's own base."
    )
    prompts: dict[str, list[str] | RandomPrompts] = Field(
        description="prompt set name -> prompts, or {wildcard_file, count, template} for random prompts."
    )
    negative_prompt: str = Field("", description="Negative prompt of every image.")
    sampler: str = Field("euler_a", description="Sampler: an A1111 name ('DPM++ 2M Karras') or kohya's ('euler_a').")
    steps: int = Field(20, ge=1, le=500, description="Sampling steps.")
    cfg: float = Field(7.0, gt=0, description="CFG scale where a checkpoint sets none.")
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1, description="Seeds; every prompt is drawn with each."
    )
    width: int | None = Field(None, ge=8, multiple_of=8, description="Image width (default: the run's training width).")
    height: int | None = Field(
        None, ge=8, multiple_of=8, description="Image height (default: the run's training height)."
    )
    clip_skip: int | None = Field(None, ge=1, le=12, description="Clip skip when rendering (default: the run's).")
    save_points: Literal["all", "final"] | list[str] = Field(
        "all", description="'all', 'final', or labels such as ['e000010', 'final']."
    )
    lora_weights: list[float] = Field(default_factory=lambda: [1.0], min_length=1, description="LoRA multipliers.")
    trigger: str | None = Field(None, description="Trigger word(s) in the prompts, e.g. 'blh'.")
    without_trigger: bool = Field(
        False, description="Also render every prompt with the trigger removed (trigger leak)."
    )
    base_images: bool = Field(True, description="Render the prompts on each checkpoint without a LoRA too.")

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _path_or_table(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for label, item in value.items():
                if not isinstance(item, str | dict):
                    raise ValueError(f"checkpoint {label!r} must be a path or {{ path = ..., cfg = ... }} (got {item!r})")
            return {label: {"path": item} if isinstance(item, str) else item for label, item in value.items()}
        return value

    @field_validator("checkpoints", "prompts")
    @classmethod
    def _labels_are_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for label in value:
            if safe_name(label) != label:
                raise ValueError(f"{label!r} is not a plain name (letters, digits, '.', '_', '-')")
        return value

    @field_validator("save_points")
    @classmethod
    def _save_point_labels(cls, value: Any) -> Any:
        if isinstance(value, list):
            for label in value:
                if label != "final" and not re.fullmatch(r"e\d{6}|step\d{8}", label):
                    raise ValueError(f"save point {label!r} is not 'final', 'e000010' or 'step00000100'")
        return value

    @model_validator(mode="after")
    def _trigger_for_leak(self) -> EvaluationSpec:
        if self.without_trigger and not self.trigger:
            raise ValueError("without_trigger needs the trigger word(s) to remove: set evaluation.trigger")
        return self

    def trigger_modes(self) -> list[bool]:
        """With the trigger, and without it when asked."""
        return [True, False] if self.without_trigger else [True]


class ScoringSpec(_Strict):
    """Models for the scores (see loralab.sweep.scoring); a score whose model is not given is
    reported as missing, with the reason."""

    face_model: str | None = Field(
        None, description="ArcFace-style .onnx face-identity model: likeness, face rate, trigger leak."
    )
    clip_model: str | None = Field(None, description="Local CLIP model folder: prompt adherence and diversity.")


AxisValues = list[Any] | dict[str, Any]


class SweepSpec(_Strict):
    """A whole sweep file (see the module docstring)."""

    name: str | None = Field(None, description="Title of the comparison (default: the file's name).")
    description: str = Field("", description="What the sweep compares, for the report.")
    mode: SweepMode = Field("one-at-a-time", description="'one-at-a-time' from the baseline, or 'grid'.")
    baseline: BaselineSpec
    axes: dict[str, AxisValues] = Field(default_factory=dict, description="axis -> values (see the module docstring).")
    evaluation: EvaluationSpec | None = None
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)
    _source: Path | None = PrivateAttr(None)  # the file this was read from (set by the reader)

    @field_validator("axes")
    @classmethod
    def _axes_have_values(cls, axes: dict[str, AxisValues]) -> dict[str, AxisValues]:
        for name, values in axes.items():
            if not values:
                raise ValueError(f"axis {name!r} has no values")
        return axes

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def title(self) -> str:
        return self.name or (self.source.stem if self.source else "sweep")

    @property
    def folder(self) -> Path:
        """Where the file's own relative paths start."""
        return self.source.parent if self.source is not None else Path.cwd()

    def resolve(self, path: Path | str) -> Path:
        """A path of the sweep file, relative to its folder."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.folder / path


def read_sweep(path: Path | str) -> SweepSpec:
    """Read and validate a sweep file. Raises SweepError (one line) for any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SweepError(f"sweep file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SweepError(f"{path}: cannot read the sweep file ({exc})") from None
    return parse_sweep(text, path)


def _with_included(evaluation: dict[str, Any], source: Path) -> dict[str, Any]:
    """``[evaluation] include = "file.toml"``: that file's settings, then the table's own on top."""
    rest = dict(evaluation)
    include = rest.pop("include")
    if not isinstance(include, str):
        raise SweepError(f"{source}: evaluation.include must be the path of a TOML file (got {include!r})")
    path = Path(include).expanduser()
    path = path if path.is_absolute() else source.parent / path
    try:
        included = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepError(f"{source}: evaluation.include: {path} not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SweepError(f"{source}: evaluation.include: cannot read {path}: {exc}") from None
    if "include" in included:
        raise SweepError(f"{path}: an included evaluation file cannot include another")
    # Paths in the included file are relative to the sweep file, as everywhere else in it.
    return {**included, **rest}


def parse_sweep(text: str, source: Path) -> SweepSpec:
    """Validate the TOML ``text`` of a sweep file read from ``source``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{source}: invalid TOML: {exc}") from None
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict) and "include" in evaluation:
        data["evaluation"] = _with_included(evaluation, source)
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SweepError(f"{source}: {_validation_message(exc)}") from None
    spec._source = source
    return spec


def _validation_message(exc: ValidationError) -> str:
    """pydantic's errors as one line: the key, what is wrong, and what to write instead."""
    errors = exc.errors(include_url=False)
    # A misspelt key also leaves the key it should have been missing: the unknown key explains both.
    first = next((error for error in errors if error["type"] == "extra_forbidden"), errors[0])
    keys = _keys(first["loc"])
    where = ".".join(keys) or "sweep"
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        known = _keys_at(first["loc"][:-1])
        hint = did_you_mean(keys[-1], known) or f" known keys there: {', '.join(known)}"
        message = f"{where}: unknown key;{hint}"
    elif keys[:1] == ["axes"] and len(keys) == 2:
        message = (
            f"{where}: give a list of values, e.g. {keys[1]} = [4, 8], or a table of label = value (got {value!r})"
        )
    elif first["type"] == "model_type":
        message = f"{where}: must be a table with the keys {', '.join(_keys_at(first['loc']))} (got {value!r})"
    else:
        got = "" if first["type"] in ("missing", "value_error") else f" (got {value!r})"  # ours name the value
        message = f"{where}: {first['msg'].removeprefix('Value error, ')}{got}"
    others = [error for error in errors if not _same_problem(error, first)]
    more = {0: "", 1: " (and 1 more problem)"}.get(len(others), f" (and {len(others)} more problems)")
    return message + more


def _keys(location: tuple[Any, ...]) -> list[str]:
    """The keys of an error's location; pydantic also names the union branch it tried
    (``list[any]``, ``RandomPrompts``), which is no key of the file."""
    return [str(part) for part in location if not (isinstance(part, str) and ("[" in part or part in _SPEC_MODELS))]


def _same_problem(error: Any, first: Any) -> bool:
    """Whether ``error`` follows from ``first``: another union branch failing on the same value, or
    the key a misspelt one was meant to be, missing beside it."""
    keys, first_keys = _keys(error["loc"]), _keys(first["loc"])
    if error is first or (len(keys) < len(error["loc"]) and first_keys[: len(keys)] == keys):
        return True
    return (
        first["type"] == "extra_forbidden" and error["type"] == "missing" and keys[:-1] == first_keys[:-1]
        and bool(did_you_mean(first_keys[-1], keys[-1:]))
    )  # fmt: skip


def _keys_at(location: tuple[Any, ...]) -> list[str]:
    """The keys the sweep file allows at ``location`` (a table inside it), for a did-you-mean hint."""
    models: list[type[BaseModel]] = [SweepSpec]
    for part in location:
        if isinstance(part, str) and part in _SPEC_MODELS:  # a union branch names its model
            models = [_SPEC_MODELS[part]]
            continue
        fields = [model.model_fields[part] for model in models if part in model.model_fields]
        if fields:  # else a label of a table (a checkpoint's, a prompt set's): same models inside
            models = [model for field in fields for model in _models_in(field.annotation)]
    return sorted({name for model in models for name in model.model_fields})


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in typing.get_args(annotation) for model in _models_in(argument)]


# Models a sweep file's tables validate into, by the name pydantic gives a union branch.
_SPEC_MODELS: dict[str, type[BaseModel]] = {
    model.__name__: model
    for model in (SweepSpec, BaselineSpec, EvaluationSpec, EvalCheckpoint, RandomPrompts, ScoringSpec)
}
