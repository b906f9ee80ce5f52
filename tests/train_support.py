"""Shared pieces of the training tests: a tiny dataset, configs on the tiny model, reading results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from loralab.config.schema import TrainConfig
from loralab.train.tb_logging import read_scalars

CAPTION = "blh woman"


def make_dataset(root: Path, *, images: int = 4, repeats: int = 1, size: int = 64, folder: str | None = None) -> Path:
    """``root/img/<repeats>_blh woman/`` with ``images`` distinct PNGs (colour fields with a square)."""
    data = root / "img"
    subset = data / (folder or f"{repeats}_{CAPTION}")
    subset.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(images):
        pixels = np.zeros((size, size, 3), np.uint8)
        pixels[..., index % 3] = 40 + 50 * index
        quarter = size // 4
        pixels[quarter : 3 * quarter, quarter : 3 * quarter] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(subset / f"{index:03d}.png")
    return data


def tiny_config(checkpoint: Path, data: Path, **overrides: Any) -> TrainConfig:
    """A fast fp32 config on the tiny model: 64 px, AdamW, rank 4, one thread, no workers."""
    values: dict[str, Any] = {
        "pretrained_model_name_or_path": str(checkpoint),
        "train_data_dir": data,
        "resolution": 64,
        "train_batch_size": 2,
        "max_train_epochs": 2,
        "learning_rate": 1e-3,
        "network_dim": 4,
        "network_alpha": 4,
        "output_name": "tiny",
        "num_cpu_threads_per_process": 1,
        "max_data_loader_n_workers": 0,
        "cache_latents": True,
        "seed": 7,
    }
    values.update(overrides)
    return TrainConfig(**values)


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def max_tensor_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[k].float() - second[k].float()).abs().max().item() for k in first)


def series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar series of a run."""
    return read_scalars(run_dir / "logs")
