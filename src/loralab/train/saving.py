"""When and how a run writes its LoRA files: names, cadence and sd-scripts' ``ss_*`` metadata.

File names (``train.save_names``) are sd-scripts' so existing habits and scripts keep working:

- every ``save_every_n_epochs`` epochs: ``<output_name>-<epoch:06d>.safetensors`` (not after the
  last epoch, which the final save covers);
- every ``save_every_n_steps`` steps: ``<output_name>-step<step:08d>.safetensors`` (also the
  name of the LoRA saved when a run is interrupted);
- at the end: ``<output_name>.safetensors``.

``save_every_n_*`` of 0 or unset means off. Samples use the same cadence rules
(``sample_every_n_*``), except that the last epoch is sampled too.

Every saved LoRA is kept unless ``save_last_n_epochs`` / ``save_last_n_steps`` say otherwise
(sweeps always keep all: they compare the save points). Those prune as sd-scripts does:

- ``save_last_n_epochs = N`` keeps the N newest per-epoch files: after the save at epoch ``e``,
  per-epoch files of epochs ``<= e - save_every_n_epochs * N`` are removed;
- ``save_last_n_steps = N`` is a window of *steps*, not a count of files: after the save at
  step ``s``, per-step files of steps ``< s - N`` are removed (every 10 steps, last 30: at step
  50 the files of steps 20-50 remain).

Pruning runs only after the new file is in place, removes whole files (an unlink is atomic),
and never touches the final ``<output_name>.safetensors``; it scans the run directory, so files
written before a resume are pruned by the same rule.

The metadata is what sd-scripts writes (``ss_*`` training fields, ``modelspec.*``, hashes),
built once when the run starts (:func:`training_metadata`) and completed at each save with
the step, epoch and time (:func:`save_lora`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loralab.data.discovery import DatasetInfo
from loralab.models.loading import StableDiffusionComponents
from loralab.network.lora import LoRANetwork, NetworkSpec
from loralab.network.lora_file import build_lora_metadata, save_lora_file
from loralab.plan.planner import Plan
from loralab.train.save_names import parse_lora_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cadence:
    """Every N epochs and/or every N steps (0 or None: never), as sd-scripts' ``*_every_n_*``."""

    every_n_epochs: int | None = None
    every_n_steps: int | None = None

    def after_step(self, global_step: int) -> bool:
        """Due after optimizer step ``global_step`` (1-based)."""
        return bool(self.every_n_steps) and global_step % self.every_n_steps == 0

    def after_epoch(self, epochs_done: int, total_epochs: int, *, including_last: bool) -> bool:
        """Due when epoch ``epochs_done`` (1-based) ends; the last epoch only if ``including_last``."""
        if not self.every_n_epochs or epochs_done % self.every_n_epochs:
            return False
        return including_last or epochs_done < total_epochs


@dataclass(frozen=True)
class KeepLast:
    """sd-scripts' keep-last-N of intermediate LoRA files (see the module docstring).

    ``epochs``: how many per-epoch files to keep; ``steps``: the window of steps whose per-step
    files are kept; ``every_n_epochs``: the epoch cadence the epoch count is measured in.
    None or 0 keeps every file.
    """

    epochs: int | None = None
    steps: int | None = None
    every_n_epochs: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> KeepLast:
        return cls(config.save_last_n_epochs, config.save_last_n_steps, config.save_every_n_epochs)

    def stale(
        self, directory: Path, output_name: str, *, epoch: int | None = None, global_step: int | None = None
    ) -> list[Path]:
        """The files in ``directory`` that fall out of the window once the save at ``epoch``
        (a per-epoch save) or ``global_step`` (a per-step save) is written, oldest first."""
        if epoch is not None and self.epochs and self.every_n_epochs:
            oldest_kept = epoch - self.every_n_epochs * self.epochs + 1
            return [path for number, path in _numbered_saves(directory, output_name, "") if number < oldest_kept]
        if global_step is not None and self.steps:
            oldest_kept = global_step - self.steps
            return [path for number, path in _numbered_saves(directory, output_name, "step") if number < oldest_kept]
        return []

    def prune(
        self, directory: Path, output_name: str, *, epoch: int | None = None, global_step: int | None = None
    ) -> list[Path]:
        """Remove :meth:`stale` files; returns the paths removed."""
        removed = []
        for path in self.stale(directory, output_name, epoch=epoch, global_step=global_step):
            try:
                path.unlink()
            except FileNotFoundError:
                continue  # already gone (removed by hand): nothing to keep or report
            logger.info("removed %s (save_last_n_%s)", path.name, "epochs" if epoch is not None else "steps")
            removed.append(path)
        return removed


def _numbered_saves(directory: Path, output_name: str, kind: str) -> list[tuple[int, Path]]:
    """``(number, path)`` of the run's per-epoch (``kind=""``) or per-step (``"step"``) files, by number."""
    found = []
    for path in Path(directory).iterdir():
        name = parse_lora_name(output_name, path.name)
        number = None if name is None else (name.step if kind else name.epoch)
        if number is not None and path.is_file():
            found.append((number, path))
    return sorted(found)


def optimizer_description(optimizer: torch.optim.Optimizer, optimizer_args: Mapping[str, Any]) -> str:
    """``module.Class(key=value,...)``, what sd-scripts writes as ``ss_optimizer``."""
    cls = type(optimizer)
    name = f"{cls.__module__}.{cls.__name__}"
    if optimizer_args:
        name += "(" + ",".join(f"{key}={value}" for key, value in optimizer_args.items()) + ")"
    return name


def _tag_frequency(dataset: DatasetInfo, *, reg: bool) -> dict[str, dict[str, int]]:
    frequency: dict[str, dict[str, int]] = {}
    for subset in dataset.reg if reg else dataset.train:
        tags: Counter[str] = Counter()
        for image in subset.images:
            tags.update(tag.strip() for tag in image.caption.split(",") if tag.strip())
        frequency[subset.folder.name] = dict(tags)
    return frequency


def _dataset_dirs(dataset: DatasetInfo, *, reg: bool) -> dict[str, dict[str, int]]:
    return {
        subset.folder.name: {"n_repeats": subset.repeats, "img_count": subset.num_images}
        for subset in (dataset.reg if reg else dataset.train)
    }


def training_metadata(
    *,
    config: Any,
    plan: Plan,
    dataset: DatasetInfo,
    components: StableDiffusionComponents,
    spec: NetworkSpec,
    optimizer: torch.optim.Optimizer,
    num_processes: int,
    base_model_hash: str | None,
    started_at: float,
    session_id: int,
) -> dict[str, str]:
    """The metadata every LoRA file of the run carries, as strings (see the module docstring)."""
    fields: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_output_name": config.output_name,
        "ss_learning_rate": config.learning_rate,
        "ss_text_encoder_lr": config.text_encoder_lr,
        "ss_unet_lr": config.unet_lr,
        "ss_num_train_images": plan.num_train_images,
        "ss_num_reg_images": plan.num_reg_images,
        "ss_num_batches_per_epoch": plan.batches_per_epoch,
        "ss_num_epochs": plan.epochs,
        "ss_batch_size_per_device": config.train_batch_size,
        "ss_total_batch_size": config.train_batch_size * num_processes * config.gradient_accumulation_steps,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_max_train_steps": plan.max_train_steps,
        "ss_lr_warmup_steps": plan.lr_warmup_steps,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_mixed_precision": config.mixed_precision,
        "ss_full_fp16": config.full_fp16,
        "ss_clip_skip": config.clip_skip,
        "ss_max_token_length": config.max_token_length,
        "ss_cache_latents": config.cache_latents or config.cache_latents_to_disk,
        "ss_seed": config.seed,
        "ss_lowram": False,
        "ss_noise_offset": config.noise_offset,
        "ss_noise_offset_random_strength": config.noise_offset_random_strength,
        "ss_adaptive_noise_scale": config.adaptive_noise_scale,
        "ss_multires_noise_iterations": config.multires_noise_iterations,
        "ss_multires_noise_discount": config.multires_noise_discount,
        "ss_zero_terminal_snr": False,
        "ss_training_comment": config.training_comment,
        "ss_optimizer": optimizer_description(optimizer, config.optimizer_args),
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_caption_dropout_rate": config.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": config.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": config.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": config.prior_loss_weight,
        "ss_min_snr_gamma": config.min_snr_gamma,
        "ss_scale_weight_norms": config.scale_weight_norms,
        "ss_debiased_estimation": config.debiased_estimation_loss,
        "ss_loss_type": "l2",
        "ss_resolution": f"({config.resolution[0]}, {config.resolution[1]})",
        "ss_enable_bucket": config.enable_bucket,
        "ss_min_bucket_reso": config.min_bucket_reso,
        "ss_max_bucket_reso": config.max_bucket_reso,
        "ss_bucket_no_upscale": config.bucket_no_upscale,
        "ss_keep_tokens": config.keep_tokens,
        "ss_shuffle_caption": config.shuffle_caption,
        "ss_color_aug": config.color_aug,
        "ss_flip_aug": config.flip_aug,
        "ss_random_crop": config.random_crop,
        "ss_dataset_dirs": _dataset_dirs(dataset, reg=False),
        "ss_reg_dataset_dirs": _dataset_dirs(dataset, reg=True),
        "ss_tag_frequency": _tag_frequency(dataset, reg=False),
        "ss_bucket_info": {
            "buckets": {
                str(index): {"resolution": list(bucket.resolution), "count": bucket.count}
                for index, bucket in enumerate(plan.buckets)
            }
        },
        "ss_sd_model_name": Path(str(components.source)).name,
        "ss_sd_model_hash": base_model_hash,
        "ss_vae_name": Path(config.vae).name if config.vae else None,
    }
    return build_lora_metadata(
        family=components.family,
        network=spec,
        title=config.output_name,
        v_prediction=components.v_prediction,
        resolution=tuple(config.resolution),
        clip_skip=config.clip_skip,
        extra_fields=fields,
        timestamp=started_at,
    )


def save_lora(
    path: Path,
    network: LoRANetwork,
    metadata: Mapping[str, str],
    *,
    global_step: int,
    epoch: int,
    dtype: torch.dtype | None,
) -> Path:
    """Write the network as a kohya LoRA file (atomically) with the run's metadata completed."""
    final = dict(metadata)
    final["ss_steps"] = str(global_step)
    final["ss_epoch"] = str(epoch)
    final["ss_training_finished_at"] = str(time.time())
    return save_lora_file(path, network.state_dict(), final, dtype)
