"""Render every save point of every run on the evaluation checkpoints, and index the images.

The sweep file's ``[evaluation]`` block is resolved once (:func:`resolve_evaluation`): random
prompt sets are drawn from their wildcard files (deterministically, so a re-run asks for the
same prompts) and everything is written to ``evaluation.json``. Each image is then a
:class:`EvalItem`: checkpoint x prompt set x prompt x seed x LoRA weight x with/without trigger.

Images are named after what they depend on (the settings, the prompt, and the LoRA file's size
and modification time), so a re-run renders only images that do not exist yet: new prompts, seeds
or checkpoints added to the sweep file, or the save points of newly trained runs. Each save
point's ``index.json`` lists its images (see loralab.sweep.layout); images of the evaluation
checkpoints without a LoRA go to ``eval/baseline_models/<checkpoint>/``.

Evaluation runs per checkpoint (:func:`evaluate_checkpoint`), so each checkpoint is loaded once
for the whole sweep; the LoRAs are applied to it and removed again by the generation engine.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loralab.errors import CheckpointError
from loralab.models.family import ModelFamily
from loralab.sample.samplers import SamplerError, resolve_sampler
from loralab.sweep.layout import (
    BASELINE_MODELS,
    EVALUATION_FILE,
    INDEX_FILE,
    SavePoint,
    eval_dir,
    read_json,
    write_json,
)
from loralab.sweep.spec import EvaluationSpec, RandomPrompts, SweepError, SweepSpec

DEFAULT_BATCH = 4


@dataclass(frozen=True)
class EvalCheckpointSettings:
    label: str
    path: str
    cfg: float


@dataclass(frozen=True)
class EvalSettings:
    """The evaluation block with every prompt resolved (``evaluation.json``)."""

    checkpoints: tuple[EvalCheckpointSettings, ...]
    prompt_sets: dict[str, list[str]]
    negative_prompt: str
    sampler: str
    steps: int
    seeds: tuple[int, ...]
    width: int | None
    height: int | None
    clip_skip: int | None
    save_points: str | tuple[str, ...]
    lora_weights: tuple[float, ...]
    trigger: str | None
    trigger_modes: tuple[bool, ...]
    base_images: bool
    cpu_threads: int | None = None  # torch threads when rendering on a CPU (the baseline's setting)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["checkpoints"] = {c.label: {"path": c.path, "cfg": c.cfg} for c in self.checkpoints}
        return data

    def wants(self, point: SavePoint) -> bool:
        """Whether ``point`` is one of the save points to render."""
        if self.save_points == "all":
            return True
        if self.save_points == "final":
            return point.label == "final"
        return point.label in self.save_points

    def images_per_save_point(self) -> int:
        prompts = sum(len(p) for p in self.prompt_sets.values())
        return len(self.checkpoints) * prompts * len(self.seeds) * len(self.lora_weights) * len(self.trigger_modes)


def _family_or_none(checkpoint: str | None) -> ModelFamily | None:
    """The family of the checkpoint the runs train on; None when it cannot be told yet (the run
    itself reports a missing or broken base checkpoint)."""
    from loralab.models.loading import checkpoint_family

    if checkpoint is None or is_placeholder(checkpoint) or not Path(checkpoint).exists():
        return None
    try:
        return checkpoint_family(checkpoint)
    except CheckpointError:
        return None


def _check_eval_checkpoint(where: str, path: Path, trained_on: ModelFamily | None) -> None:
    """An evaluation checkpoint must exist, be a full checkpoint, and be of the family the LoRAs
    are trained for (an SD1.x LoRA does not fit an SDXL UNet)."""
    from loralab.models.loading import checkpoint_family

    if not path.exists():
        raise SweepError(f"{where}: {path} not found")
    try:
        family = checkpoint_family(path)
    except CheckpointError as exc:
        raise SweepError(f"{where}: {exc}") from None
    if trained_on is not None and family is not trained_on:
        raise SweepError(
            f"{where}: {path} is an {family.label} checkpoint, but the runs train {trained_on.label} LoRAs, "
            f"which only load on {trained_on.label} checkpoints; choose an {trained_on.label} checkpoint"
        )


def resolve_evaluation(
    spec: SweepSpec, base_checkpoint: str | None, *, cpu_threads: int | None = None
) -> EvalSettings | None:
    """``spec``'s evaluation block, resolved; None when the sweep has none.

    Without checkpoints the runs are rendered on ``base_checkpoint`` (label ``base``).
    ``cpu_threads``: torch threads for rendering on a CPU (the baseline's ``num_cpu_threads_per_process``).
    Raises SweepError for a missing wildcard file, a template that cannot be expanded, an unknown
    sampler, or an evaluation checkpoint that is missing, not a full checkpoint, or of another family.
    """
    evaluation = spec.evaluation
    if evaluation is None:
        return None
    checkpoints = tuple(
        EvalCheckpointSettings(label, _sweep_path(spec, item.path), item.cfg or evaluation.cfg)
        for label, item in evaluation.checkpoints.items()
    ) or (EvalCheckpointSettings("base", str(base_checkpoint), evaluation.cfg),)
    # Found out now rather than after hours of training, when the first save point is rendered.
    trained_on = _family_or_none(base_checkpoint)
    for label, item in evaluation.checkpoints.items():
        path = _sweep_path(spec, item.path)
        if not is_placeholder(path):
            _check_eval_checkpoint(f"{spec.source}: evaluation.checkpoints.{label}", Path(path), trained_on)
    try:
        resolve_sampler(evaluation.sampler)
    except SamplerError as exc:
        raise SweepError(f"{spec.source}: evaluation.sampler: {exc}") from None
    prompt_sets = {name: _prompts(spec, evaluation, name, value) for name, value in evaluation.prompts.items()}
    save_points = evaluation.save_points if isinstance(evaluation.save_points, str) else tuple(evaluation.save_points)
    return EvalSettings(
        checkpoints=checkpoints, prompt_sets=prompt_sets, negative_prompt=evaluation.negative_prompt,
        sampler=evaluation.sampler, steps=evaluation.steps, seeds=tuple(evaluation.seeds), width=evaluation.width,
        height=evaluation.height, clip_skip=evaluation.clip_skip, save_points=save_points,
        lora_weights=tuple(evaluation.lora_weights), trigger=evaluation.trigger,
        trigger_modes=tuple(evaluation.trigger_modes()), base_images=evaluation.base_images,
        cpu_threads=cpu_threads,
    )  # fmt: skip


def is_placeholder(text: str) -> bool:
    """A value left for the user to fill in, as the guide's configs write them: ``<path to ...>``."""
    return text.startswith("<") and text.endswith(">")


def _sweep_path(spec: SweepSpec, text: str) -> str:
    return text if is_placeholder(text) else str(spec.resolve(text))


def _prompts(spec: SweepSpec, evaluation: EvaluationSpec, name: str, value: list[str] | RandomPrompts) -> list[str]:
    if isinstance(value, list):
        if not value:
            raise SweepError(f"{spec.source}: evaluation.prompts.{name} holds no prompts")
        return list(value)
    from loralab.sample.wildcards import WildcardError, Wildcards

    path = spec.resolve(value.wildcard_file)
    if path.suffix != ".txt" or not path.is_file():
        raise SweepError(f"{spec.source}: evaluation.prompts.{name}: wildcard file {path} not found (a .txt list)")
    template = value.template or ", ".join(filter(None, [evaluation.trigger, f"__{path.stem}__"]))
    # Wildcards are read from a folder of only the wildcard lists (.txt) beside the file: other files
    # there (configs, sweep files) are not wildcards.
    with tempfile.TemporaryDirectory(prefix="loralab-wildcards-") as folder:
        for text_file in path.parent.glob("*.txt"):
            shutil.copyfile(text_file, Path(folder) / text_file.name)
        wildcards = Wildcards(folder)
        try:
            # Prompt i is drawn with seed i: the same file and count always give the same prompts.
            return [wildcards.expand(template, seed=index) for index in range(value.count)]
        except WildcardError as exc:  # named with the folder the user knows, not the copy
            problem = str(exc).replace(folder, str(path.parent))
            raise SweepError(f"{spec.source}: evaluation.prompts.{name}: {problem}") from None


def write_evaluation(settings: EvalSettings, sweep_dir: Path) -> None:
    write_json(Path(sweep_dir) / EVALUATION_FILE, settings.to_json())


# ---------------------------------------------------------------------------------------------
# Items


def remove_trigger(prompt: str, trigger: str) -> str:
    """``prompt`` without the trigger word(s): ``"photo of blh woman"`` -> ``"photo of woman"``."""
    text = re.sub(rf"(?<![\w]){re.escape(trigger)}(?![\w])", "", prompt, flags=re.IGNORECASE)
    text = re.sub(r"\s{2,}", " ", text)
    text = re.sub(r"\(\s+", "(", text)
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # a tag that was only the trigger leaves ", ,"
    return text.strip(" ,")


@dataclass(frozen=True)
class EvalItem:
    """One image of a save point (or of a checkpoint without LoRA): what it shows and its file."""

    checkpoint: str
    prompt_set: str
    prompt_index: int
    prompt: str  # as rendered (trigger removed when ``trigger`` is False)
    seed: int
    lora_weight: float
    trigger: bool
    image: str  # relative to the save point's folder

    def index_entry(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "checkpoint": self.checkpoint,
            "prompt_set": self.prompt_set,
            "prompt": self.prompt,
            "seed": self.seed,
            "lora_weight": self.lora_weight,
            "trigger": self.trigger,
        }


@dataclass(frozen=True)
class RenderTarget:
    """What to render: a run's save point (``lora`` set), or a checkpoint without a LoRA."""

    folder: Path
    lora: Path | None
    width: int
    height: int
    clip_skip: int | None
    checkpoints: tuple[str, ...]  # labels to render (baseline_models folders hold one)


def items_for(settings: EvalSettings, target: RenderTarget, checkpoint: EvalCheckpointSettings) -> list[EvalItem]:
    """Every image ``target`` needs on ``checkpoint``, with its file name."""
    weights = settings.lora_weights if target.lora is not None else (0.0,)
    lora_identity = _file_identity(target.lora) if target.lora is not None else None
    items = []
    for set_name, prompts in settings.prompt_sets.items():
        for index, template in enumerate(prompts):
            for trigger in settings.trigger_modes:
                prompt = template if trigger or not settings.trigger else remove_trigger(template, settings.trigger)
                for seed in settings.seeds:
                    for weight in weights:
                        key = {
                            "checkpoint": checkpoint.path, "cfg": checkpoint.cfg, "prompt": prompt,
                            "negative": settings.negative_prompt, "sampler": settings.sampler, "steps": settings.steps,
                            "size": [target.width, target.height], "clip_skip": target.clip_skip, "seed": seed,
                            "weight": weight, "lora": lora_identity,
                        }  # fmt: skip
                        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
                        mode = "" if trigger else "-notrigger"
                        # Named by content, not position: a prompt inserted before it keeps its image.
                        name = f"{set_name}/{checkpoint.label}-s{seed}-w{weight:g}{mode}-{digest}.png"
                        items.append(EvalItem(checkpoint.label, set_name, index, prompt, seed, weight, trigger, name))
    return items


def _file_identity(path: Path) -> list[Any]:
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]


# ---------------------------------------------------------------------------------------------
# Rendering


class EvalModelCache:
    """A checkpoint loader for the generation engine that keeps the last checkpoint loaded, so a
    fresh engine per save point (which frees its LoRA files) does not load the model again."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._components: Any = None
        self.load_count = 0

    def __call__(self, checkpoint: Path, *, vae_path: Path | None = None, dtype: torch.dtype, device: Any) -> Any:
        from loralab.models.loading import load_checkpoint

        key = (str(checkpoint), str(vae_path), str(dtype), str(device))
        if key != self._key:
            self._components = None  # one model in memory at a time
            self._components = load_checkpoint(checkpoint, vae_path=vae_path, dtype=dtype, device=device)
            self._key = key
            self.load_count += 1
        return self._components

    def release(self) -> None:
        self._key, self._components = None, None


@dataclass
class RenderCounts:
    rendered: int = 0
    existing: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # target folder -> error


def evaluate_checkpoint(
    settings: EvalSettings,
    checkpoint_label: str,
    targets: Sequence[RenderTarget],
    *,
    models: EvalModelCache | None = None,
    batch_size: int = DEFAULT_BATCH,
    on_target: Callable[[RenderTarget, int], None] | None = None,
) -> RenderCounts:
    """Render the missing images of every target on one evaluation checkpoint.

    A target whose rendering fails (a LoRA of another model family, a bad setting) is recorded in
    the counts and skipped; the others go on. ``on_target(target, rendered)`` reports progress.
    """
    checkpoint = next(c for c in settings.checkpoints if c.label == checkpoint_label)
    models = models or EvalModelCache()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    counts = RenderCounts()
    with _cpu_threads(settings.cpu_threads if device == "cpu" else None):
        _render_targets(settings, checkpoint, targets, models, device, dtype, batch_size, counts, on_target)
    return counts


@contextmanager
def _cpu_threads(count: int | None) -> Iterator[None]:
    """Render with ``count`` torch threads (as training does), then restore the caller's count.

    Too many threads on a shared CPU make small models many times slower (threads wait for each
    other), so rendering follows the thread count the user chose for training.
    """
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _render_targets(
    settings: EvalSettings, checkpoint: EvalCheckpointSettings, targets: Sequence[RenderTarget], models: EvalModelCache,
    device: str, dtype: torch.dtype, batch_size: int, counts: RenderCounts,
    on_target: Callable[[RenderTarget, int], None] | None,
) -> None:  # fmt: skip
    from loralab.errors import LoralabError
    from loralab.sample.generator import GenerationEngine, ImageRequest, LoraRef

    for target in targets:
        if checkpoint.label not in target.checkpoints:
            continue
        wanted = items_for(settings, target, checkpoint)
        missing = [item for item in wanted if not (target.folder / item.image).is_file()]
        counts.existing += len(wanted) - len(missing)
        if not missing:
            continue
        requests = [
            ImageRequest(
                checkpoint=Path(checkpoint.path), prompt=item.prompt, negative_prompt=settings.negative_prompt,
                loras=(LoraRef(str(target.lora), item.lora_weight),) if target.lora is not None else (),
                sampler=settings.sampler, steps=settings.steps, cfg_scale=checkpoint.cfg, seed=item.seed,
                width=target.width, height=target.height, clip_skip=target.clip_skip,
            )  # fmt: skip
            for item in missing
        ]
        # A fresh engine per target: it frees the LoRA files it read; the checkpoint stays loaded.
        engine = GenerationEngine(device=device, dtype=dtype, loader=models)
        try:
            for index, image in engine.iter_generate(requests, batch_size=batch_size):
                image.save(target.folder / missing[index].image)
                counts.rendered += 1
        except LoralabError as exc:
            counts.failed[str(target.folder)] = str(exc)
        finally:
            engine.close()
        if on_target is not None:
            on_target(target, len(missing))


def write_index(settings: EvalSettings, target: RenderTarget) -> bool:
    """Write ``target``'s ``index.json`` when all of its images exist; False when some are missing."""
    items = [
        item
        for checkpoint in settings.checkpoints
        if checkpoint.label in target.checkpoints
        for item in items_for(settings, target, checkpoint)
    ]
    if not all((target.folder / item.image).is_file() for item in items):
        return False
    entries = [item.index_entry() for item in items]
    if read_json(target.folder / INDEX_FILE) != entries:
        write_json(target.folder / INDEX_FILE, entries)
    return True


def base_model_targets(
    settings: EvalSettings, sweep_dir: Path, width: int, height: int, clip_skip: int | None
) -> list[RenderTarget]:
    """One target per evaluation checkpoint: its images without any LoRA."""
    if not settings.base_images:
        return []
    return [
        RenderTarget(eval_dir(sweep_dir, BASELINE_MODELS, c.label), None, width, height, clip_skip, (c.label,))
        for c in settings.checkpoints
    ]
