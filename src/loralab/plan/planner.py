"""The dry-run plan of a training run: dataset, buckets, steps, epochs and LR schedule, no model.

``make_plan`` answers, before anything heavy loads, the questions a kohya user asks of a run:
how many images (with repeats) and regularisation images, which aspect buckets, how many
batches per epoch, how many optimizer steps and epochs, and the learning rate after every step.
Training uses the same functions, so the plan is what will happen.

Step semantics (sd-scripts, ``steps_formula = "sd-scripts"``):

* batches per epoch = sum over buckets of ``ceil(samples_in_bucket / train_batch_size)``, where a
  bucket's samples are its images times their folder's repeats (train and regularisation images
  share buckets);
* regularisation images are repeated round-robin until they match the number of training images
  with repeats (extra ones are left out), as sd-scripts balances them;
* optimizer steps per epoch = ``ceil(batches / gradient_accumulation_steps)``;
* ``max_train_epochs`` (when set) fixes the steps to ``epochs x steps per epoch`` and overrides
  ``max_train_steps``; with neither set, sd-scripts' default of 1600 steps applies;
* epochs = ``ceil(max_train_steps / steps per epoch)``; training stops when the steps run out,
  so the last epoch may be cut short.

kohya_ss GUI configs (``steps_formula = "kohya_gui"``): the GUI computes ``max_train_steps`` itself
as ``ceil(images x repeats / batch / accumulation x epochs x (2 if a reg folder is set else 1))``,
counting only .jpg/.jpeg/.png/.webp files, and passes only that number on. It knows nothing of
buckets, so when buckets make more batches than ``images x repeats / batch`` the run ends
mid-epoch (the guide's uncropped runs stopped in epoch 69 of 100). A ``max_train_steps`` set in the
GUI is passed through unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.data.buckets import Bucket, BucketManager, batches_per_epoch, epoch_samples, fill_buckets
from loralab.data.discovery import DatasetInfo, SkippedFolder, Subset, discover_dataset
from loralab.errors import ConfigError, DatasetError
from loralab.train.lr_schedules import lr_multipliers, warmup_steps_for
from loralab.train.optimizer_setup import check_optimizer_settings
from loralab.train.sample_prompts import read_sample_prompts

# sd-scripts' --max_train_steps default, used when neither steps nor epochs are given.
DEFAULT_MAX_TRAIN_STEPS = 1600

# The only extensions the kohya_ss GUI counts when it computes max_train_steps.
KOHYA_GUI_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class FolderSummary:
    """One dataset folder as the plan reports it."""

    path: Path
    repeats: int
    images: int
    captions_from_files: int

    @classmethod
    def of(cls, subset: Subset) -> FolderSummary:
        from_files = sum(1 for image in subset.images if image.caption_source == "file")
        return cls(subset.folder, subset.repeats, subset.num_images, from_files)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "repeats": self.repeats,
            "images": self.images,
            "captions_from_files": self.captions_from_files,
        }


@dataclass(frozen=True)
class Plan:
    """What a training run will do. ``lr_schedule`` holds the lr/unet value after every step."""

    steps_formula: str
    train_folders: tuple[FolderSummary, ...]
    reg_folders: tuple[FolderSummary, ...]
    skipped_folders: tuple[SkippedFolder, ...]
    num_train_images: int  # training images x repeats
    num_reg_images: int  # regularisation images x their folder's repeats
    reg_images_per_epoch: int  # regularisation samples per epoch after balancing
    buckets: tuple[Bucket, ...]
    batch_size: int
    gradient_accumulation_steps: int
    batches_per_epoch: int
    steps_per_epoch: int  # optimizer updates per epoch
    epochs: int
    max_train_steps: int
    steps_in_last_epoch: int
    lr_scheduler: str
    lr_warmup_steps: int
    unet_lr: float
    lr_schedule: tuple[float, ...]
    warnings: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``loralab plan --json`` output)."""
        return {
            "max_train_steps": self.max_train_steps,
            "epochs": self.epochs,
            "batches_per_epoch": self.batches_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "steps_in_last_epoch": self.steps_in_last_epoch,
            "num_train_images": self.num_train_images,
            "num_reg_images": self.num_reg_images,
            "reg_images_per_epoch": self.reg_images_per_epoch,
            "train_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "steps_formula": self.steps_formula,
            "buckets": [
                {"resolution": list(b.resolution), "count": b.count, "batches": b.batches(self.batch_size)}
                for b in self.buckets
            ],
            "train_folders": [folder.to_json() for folder in self.train_folders],
            "reg_folders": [folder.to_json() for folder in self.reg_folders],
            "skipped_folders": [{"path": str(s.path), "reason": s.reason} for s in self.skipped_folders],
            "lr_scheduler": self.lr_scheduler,
            "lr_warmup_steps": self.lr_warmup_steps,
            "unet_lr": self.unet_lr,
            "lr_schedule": list(self.lr_schedule),
            "warnings": list(self.warnings),
        }


def kohya_gui_max_train_steps(
    dataset: DatasetInfo, epochs: int, batch_size: int, accumulation: int, reg_dir_set: bool
) -> int:
    """``max_train_steps`` as the kohya_ss GUI computes it (same float operations, same order)."""
    total = sum(
        subset.repeats
        * sum(1 for image in subset.images if image.path.suffix.lower() in KOHYA_GUI_IMAGE_EXTENSIONS)
        for subset in dataset.train
    )
    reg_factor = 2 if reg_dir_set else 1
    return int(math.ceil(float(total) / batch_size / accumulation * epochs * reg_factor))


def check_run_settings(config: Any) -> None:
    """Raise ConfigError for what a run of ``config`` would refuse as it starts, found here without
    loading a model: an unreadable sample prompts file, and optimizer argument values the
    optimizer itself rejects (its keys are checked with the config)."""
    read_sample_prompts(config.sample_prompts)
    check_optimizer_settings(config.optimizer_type, config.optimizer_args, config.learning_rate)


def make_plan(config: Any, train_dir: Path | str | None = None, reg_dir: Path | str | None = None) -> Plan:
    """Plan the run of ``config`` (a TrainConfig) without loading any model.

    ``train_dir`` / ``reg_dir`` replace the config's ``train_data_dir`` / ``reg_data_dir``.
    Raises ConfigError for settings that cannot train (bucket settings, scheduler and warm-up)
    and DatasetError for a missing, unreadable or empty dataset.
    """
    train_root = Path(train_dir) if train_dir is not None else config.train_data_dir
    if train_root is None:
        raise DatasetError("no training data folder: set train_data_dir in the config or pass --train-data DIR")
    reg_root = Path(reg_dir) if reg_dir is not None else config.reg_data_dir
    manager = BucketManager.from_config(config)
    dataset = discover_dataset(train_root, reg_root, config.caption_extension)

    samples = epoch_samples(dataset, manager)
    buckets = fill_buckets((sample.choice.bucket, sample.repeats) for sample in samples)

    batch_size = config.train_batch_size
    accumulation = config.gradient_accumulation_steps
    batches = batches_per_epoch(buckets, batch_size)
    steps_per_epoch = math.ceil(batches / accumulation)
    max_train_steps = _max_train_steps(config, dataset, steps_per_epoch, reg_root is not None)
    epochs = math.ceil(max_train_steps / steps_per_epoch)
    warmup = warmup_steps_for(config, max_train_steps)
    multipliers = lr_multipliers(
        config.lr_scheduler,
        max_train_steps,
        warmup,
        config.lr_scheduler_num_cycles,
        config.lr_scheduler_power,
        base_lr=config.learning_rate,
    )
    # lr/unet is the UNet group's lr: unet_lr when given, else learning_rate.
    unet_lr = config.unet_lr if config.unet_lr is not None else config.learning_rate
    steps_in_last_epoch = max_train_steps - (epochs - 1) * steps_per_epoch

    notes = list(dataset.warnings)
    notes += _bucketing_off_note(config, manager, dataset)
    reg_files = sum(subset.num_images for subset in dataset.reg)
    reg_samples = [sample for sample in samples if sample.is_reg]
    if len(reg_samples) < reg_files:
        notes.append(
            f"{reg_files - len(reg_samples)} of {reg_files} regularisation images are not used: there are "
            f"more than training images with repeats ({dataset.num_train_images})"
        )
    if steps_in_last_epoch < steps_per_epoch:
        notes.append(
            f"the last epoch ({epochs}) stops after {steps_in_last_epoch} of {steps_per_epoch} steps "
            f"because max_train_steps ({max_train_steps}) is not a whole number of epochs"
        )
    return Plan(
        steps_formula=config.steps_formula,
        train_folders=tuple(FolderSummary.of(s) for s in dataset.train),
        reg_folders=tuple(FolderSummary.of(s) for s in dataset.reg),
        skipped_folders=dataset.skipped,
        num_train_images=dataset.num_train_images,
        num_reg_images=dataset.num_reg_images,
        reg_images_per_epoch=sum(sample.repeats for sample in reg_samples),
        buckets=tuple(buckets),
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        batches_per_epoch=batches,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        max_train_steps=max_train_steps,
        steps_in_last_epoch=steps_in_last_epoch,
        lr_scheduler=config.lr_scheduler,
        lr_warmup_steps=warmup,
        unet_lr=unet_lr,
        lr_schedule=tuple(unet_lr * m for m in multipliers),
        warnings=tuple(notes),
    )


def _max_train_steps(config: Any, dataset: DatasetInfo, steps_per_epoch: int, reg_dir_set: bool) -> int:
    if config.steps_formula == "kohya_gui":
        if config.max_train_steps is not None:
            return config.max_train_steps
        if config.max_train_epochs is None:
            raise ConfigError("a kohya_ss GUI config needs max_train_epochs (the GUI's 'epoch') or max_train_steps")
        return kohya_gui_max_train_steps(
            dataset, config.max_train_epochs, config.train_batch_size, config.gradient_accumulation_steps, reg_dir_set
        )
    if config.max_train_epochs is not None:
        return config.max_train_epochs * steps_per_epoch
    if config.max_train_steps is not None:
        return config.max_train_steps
    return DEFAULT_MAX_TRAIN_STEPS


def _bucketing_off_note(config: Any, manager: BucketManager, dataset: DatasetInfo) -> list[str]:
    if config.enable_bucket:
        return []
    width, height = manager.resolution
    other = sum(
        1
        for subset in dataset.train + dataset.reg
        for image in subset.images
        if (image.width, image.height) != (width, height)
    )
    if not other:
        return []
    return [f"bucketing is off: {other} images are not {width}x{height} and are resized and centre-cropped to it"]
