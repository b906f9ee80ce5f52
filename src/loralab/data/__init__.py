"""Datasets: kohya folder discovery, captions and aspect-ratio buckets (later: image prep, latent cache)."""

from loralab.data.buckets import (
    Bucket,
    BucketChoice,
    BucketManager,
    Sample,
    balance_reg_repeats,
    batches_per_epoch,
    epoch_samples,
    fill_buckets,
)
from loralab.data.discovery import DatasetInfo, ImageEntry, SkippedFolder, Subset, discover_dataset

__all__ = [
    "Bucket",
    "BucketChoice",
    "BucketManager",
    "DatasetInfo",
    "ImageEntry",
    "Sample",
    "SkippedFolder",
    "Subset",
    "balance_reg_repeats",
    "batches_per_epoch",
    "discover_dataset",
    "epoch_samples",
    "fill_buckets",
]
