"""What the demo trains and compares: its sizes (quick or full), the baseline config and the sweep file.

The baseline follows the guide's SD1.5 config (DAdaptAdam at learning rate 1.0 with the guide's
optimizer arguments, cosine schedule, min-SNR 5, network alpha 1) with its sizes scaled down to
the toy model: 32 px images and a rank that suits a UNet 64-128 channels wide. It trains with
class images (``reg_data_dir``, ``prior_loss_weight``) so the subject stays with its trigger: without
them the LoRA draws the subject for any "ring" prompt (see ``loralab.demo.class_images``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.config import TrainConfig, save_config
from loralab.toy import world
from loralab.toy.model import RESOLUTION, toy_checkpoint

# The guide's DAdaptAdam arguments ("decouple=True weight_decay=0.6 betas=0.9,0.99
# use_bias_correction=True growth_rate=1.02"), unchanged: only sizes differ in the toy world.
GUIDE_OPTIMIZER_ARGS: dict[str, Any] = {
    "decouple": True,
    "weight_decay": 0.6,
    "betas": (0.9, 0.99),
    "use_bias_correction": True,
    "growth_rate": 1.02,
    # D-Adaptation starts its step size d at 1e-6 and, at growth rate 1.02, can only double it
    # every ~35 steps: fine over the guide's thousands of steps, nothing over the toy's dozens.
    # Starting d where a long run's d ends keeps the guide's growth rule and lets the toy learn.
    "d0": 1e-2,
}
# The toy text encoder has 3 layers and was pretrained on its last one: clip skip 1. (The guide's
# 2 suits checkpoints trained on the penultimate layer of a 12-layer encoder.)
TOY_CLIP_SKIP = 1
CPU_THREADS = 1  # the toy model is too small to gain from more; on a shared CPU they only wait
PHOTO_SIZE = 64  # rendered "photos"; prepare's smallest resolution, training scales them to 32 px
CHECKPOINT_LABELS = {"toy_base": "base", "toy_alt": "alt"}  # eval label -> shipped toy checkpoint


@dataclass(frozen=True)
class DemoSize:
    """How much work a demo does."""

    photos: int
    epochs: int
    save_every_n_epochs: int
    batch_size: int
    network_dims: tuple[int, int]  # baseline rank, then the rank it is compared with
    seeds: tuple[int, ...]
    sample_steps: int

    @property
    def save_points(self) -> str:
        return "final" if self.save_every_n_epochs >= self.epochs else "all"


QUICK = DemoSize(photos=16, epochs=30, save_every_n_epochs=30, batch_size=4, network_dims=(8, 2), seeds=(1, 2),
                 sample_steps=20)  # fmt: skip
FULL = DemoSize(photos=24, epochs=40, save_every_n_epochs=20, batch_size=4, network_dims=(8, 2), seeds=(1, 2, 3),
                sample_steps=24)  # fmt: skip

# Eval prompts in the words of the photos' captions; without the trigger each becomes an ordinary
# ring prompt ("ring on a green background"), which must not turn into the subject.
EVAL_PROMPTS = (
    f"{world.SUBJECT_TRIGGER} {world.SUBJECT_CLASS} on a green background",
    f"{world.SUBJECT_TRIGGER} {world.SUBJECT_CLASS} on a blue to white gradient background, center",
)
SAMPLE_CFG = 5.0  # the toy checkpoints' README: guidance about 5
SAMPLER = "ddim"
# Prior preservation: the class images (see loralab.demo.class_images) weigh as much as the photos,
# sd-scripts' and DreamBooth's default.
PRIOR_LOSS_WEIGHT = 1.0


def baseline_config(dataset_img_dir: Path, reg_dir: Path, size: DemoSize) -> TrainConfig:
    """The demo's baseline: the guide's optimizer and schedule, toy-sized, with class images."""
    return TrainConfig(
        pretrained_model_name_or_path=str(toy_checkpoint("base")),
        train_data_dir=dataset_img_dir,
        reg_data_dir=reg_dir,
        prior_loss_weight=PRIOR_LOSS_WEIGHT,
        caption_extension=".caption",
        resolution=(RESOLUTION, RESOLUTION),
        train_batch_size=size.batch_size,
        max_train_epochs=size.epochs,
        save_every_n_epochs=size.save_every_n_epochs,
        optimizer_type="DAdaptAdam",
        optimizer_args=dict(GUIDE_OPTIMIZER_ARGS),
        learning_rate=1.0,
        lr_scheduler="cosine",
        network_dim=size.network_dims[0],
        network_alpha=1.0,
        min_snr_gamma=5.0,
        clip_skip=TOY_CLIP_SKIP,
        cache_latents=True,
        max_data_loader_n_workers=0,
        num_cpu_threads_per_process=CPU_THREADS,
        seed=42,
    )


def _toml_list(values: tuple[Any, ...] | list[Any]) -> str:
    return "[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in values) + "]"


def sweep_toml(baseline_path: Path, size: DemoSize) -> str:
    """The demo's sweep file: network rank and optimizer, one at a time, on both toy checkpoints."""
    checkpoints = ", ".join(
        f'{label} = "{toy_checkpoint(name).as_posix()}"' for label, name in CHECKPOINT_LABELS.items()
    )
    return f"""\
name = "Toy demo"
description = "The guide's baseline on the toy subject: network rank, and DAdaptAdam against Prodigy"
mode = "one-at-a-time"

[baseline]
config = "{baseline_path.as_posix()}"

[axes]
network_dim = {_toml_list(list(size.network_dims))}

[axes.optimizer]
DAdaptAdam = {{}}
Prodigy = {{ optimizer = "Prodigy", "optimizer_args.betas" = "", "optimizer_args.d_coef" = 2, "optimizer_args.safeguard_warmup" = true }}

[evaluation]
checkpoints = {{ {checkpoints} }}
prompts = {{ subject = {_toml_list(list(EVAL_PROMPTS))} }}
sampler = "{SAMPLER}"
steps = {size.sample_steps}
cfg = {SAMPLE_CFG}
seeds = {_toml_list(list(size.seeds))}
save_points = "{size.save_points}"
trigger = "{world.SUBJECT_TRIGGER}"
without_trigger = true
"""


def write_sweep_files(folder: Path, dataset_img_dir: Path, reg_dir: Path, size: DemoSize) -> Path:
    """Write ``baseline.toml`` and ``sweep.toml`` into ``folder``; returns the sweep file."""
    folder.mkdir(parents=True, exist_ok=True)
    baseline = folder / "baseline.toml"
    save_config(baseline_config(dataset_img_dir, reg_dir, size), baseline)
    sweep = folder / "sweep.toml"
    temporary = sweep.with_name(f".{sweep.name}.tmp")
    # Named relative to the sweep file (as sweep files resolve paths), so any --out works, relative too.
    temporary.write_text(sweep_toml(Path(baseline.name), size), encoding="utf-8")
    temporary.replace(sweep)
    return sweep
