"""The training dataset: batches per aspect bucket, with sd-scripts' semantics, deterministic and
resumable.

What an epoch holds (the same as the planner counts, from the same functions):

* every training image ``repeats`` times (its folder's ``N_``);
* regularisation images balanced against the training images with repeats as sd-scripts does
  (:func:`~loralab.data.buckets.epoch_samples`: their own repeats first, then one more at a time
  round-robin until the counts match; surplus images are left out); their loss weight is
  ``prior_loss_weight``, a training image's is 1;
* each bucket's samples cut into batches of ``train_batch_size`` (the last one may be short;
  buckets never mix), so the batches per epoch are the planner's ``batches_per_epoch``.

Order: epoch ``e`` (counted from 1, as kohya logs it) shuffles each bucket's samples and then the
list of batches with a random stream seeded from ``(seed, e)`` only, so the order is a pure
function of the two, and ``iter_epoch(e, start=k)`` / ``loader(e, start=k)`` resume at batch
``k`` with exactly the batches a full epoch would have given. Per-sample randomness (caption
shuffle and dropout, flip, random crop, colour, latent draw) comes from streams seeded by
``(seed, epoch, batch, position in batch)``, so it is reproducible on resume too. The numbers
differ from sd-scripts' (which draws from Python's global generator); the distributions do not.

A sample is the image resized to cover its bucket and cropped into it (centre, or random with
``random_crop``), colour-augmented with ``color_aug``, flipped with probability 1/2 with
``flip_aug`` (in that order, as sd-scripts). With a :class:`~loralab.data.latent_cache.LatentCache`
attached (:meth:`TrainingDataset.with_latent_cache`) batches carry latents drawn from the cached
posteriors instead of pixels; ``color_aug`` and ``random_crop`` rule that out, as in sd-scripts.
With bucketing off, images that are not the training resolution are resized and centre-cropped
to it (sd-scripts' latent-caching path; its in-memory path refuses them).

Captions come from discovery (caption file, else the folder's class tokens). A caption file that
is not UTF-8 is an error, not a fallback: discovery raises a one-line ``DatasetError`` naming the
file, so ``loralab plan`` and training refuse the same dataset.

Errors: ``DatasetError`` for a missing, empty or unreadable dataset (from discovery) or an image
that cannot be decoded; ``ConfigError`` for cached latents with ``color_aug``/``random_crop`` and
for bucket settings.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from loralab.data.buckets import Bucket, BucketManager, Resolution, Sample, batches_per_epoch, epoch_samples, fill_buckets
from loralab.data.discovery import DatasetInfo, discover_dataset
from loralab.data.latent_cache import LatentCache, LatentRequest, LatentSampling, latents_from_images
from loralab.data.transforms import (
    CaptionOptions,
    CropGeometry,
    SampleStream,
    color_augment,
    derive_seed,
    flip_horizontal,
    load_rgb,
    process_caption,
    resize_and_crop,
    sample_rng,
    to_tensor,
)
from loralab.errors import ConfigError, DatasetError
from loralab.train.conditioning import sdxl_time_ids


@dataclass(frozen=True)
class DatasetOptions:
    """Settings of the training dataset (sd-scripts names where it has them)."""

    batch_size: int = 1
    seed: int = 42
    prior_loss_weight: float = 1.0
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    latent_sampling: LatentSampling = "sample"  # draw a fresh latent per epoch, or use the mean

    @classmethod
    def from_config(cls, config: Any) -> DatasetOptions:
        """Read from a TrainConfig (fields it does not have keep their defaults)."""
        return cls(
            batch_size=config.train_batch_size,
            seed=config.seed,
            prior_loss_weight=config.prior_loss_weight,
            captions=CaptionOptions.from_config(config),
            flip_aug=config.flip_aug,
            color_aug=config.color_aug,
            random_crop=config.random_crop,
            latent_sampling=config.latent_sampling,
        )

    @property
    def latent_cacheable(self) -> bool:
        """Cached latents need the same pixels every epoch (sd-scripts' ``is_latent_cacheable``)."""
        return not (self.color_aug or self.random_crop)


@dataclass
class Batch:
    """One batch: images or latents, captions, loss weights and SDXL size conditioning.

    ``latents_for(vae)`` gives the UNet's input either way: the cached latents, or the images
    encoded now and drawn with the same per-sample seeds a cached run would use.
    """

    epoch: int
    index: int  # position of the batch in its epoch
    captions: list[str]
    loss_weights: torch.Tensor  # (B,) float32: 1 for training images, prior_loss_weight for reg
    is_reg: torch.Tensor  # (B,) bool
    flipped: torch.Tensor  # (B,) bool
    original_sizes_hw: torch.Tensor  # (B, 2) long, SDXL conditioning
    crop_top_lefts: torch.Tensor  # (B, 2) long
    target_sizes_hw: torch.Tensor  # (B, 2) long
    latent_seeds: tuple[int, ...]  # per-sample seeds for drawing latents from the VAE posterior
    paths: tuple[Path, ...]
    images: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1] when latents are not cached
    latents: torch.Tensor | None = None  # (B, C, H/8, W/8), scaled, when they are
    latent_sampling: LatentSampling = "sample"
    # Set by TrainingDataset.batch: the samples' positions in the whole batch (a process may
    # load only its slice of it) and the whole batch's size.
    positions: tuple[int, ...] = ()
    full_size: int = 0

    def __len__(self) -> int:
        return len(self.captions)

    def latents_for(self, vae: Any) -> torch.Tensor:
        """Scaled latents ``(B, C, H/8, W/8)``: the cached ones, else ``images`` encoded with ``vae``."""
        if self.latents is not None:
            return self.latents
        assert self.images is not None
        return latents_from_images(vae, self.images, seeds=self.latent_seeds, mode=self.latent_sampling)

    def sdxl_time_ids(self) -> torch.Tensor:
        """SDXL's ``time_ids`` ``(B, 6)``: original (h, w), crop (top, left), target (h, w)."""
        return sdxl_time_ids(self.original_sizes_hw, self.crop_top_lefts, self.target_sizes_hw)


class TrainingDataset:
    """The samples of a run, cut into per-bucket batches per epoch (see the module docstring).

    Picklable and free of models, so :meth:`loader` can hand it to data-loader workers.
    """

    def __init__(
        self,
        info: DatasetInfo,
        buckets: BucketManager,
        options: DatasetOptions,
    ) -> None:
        self.info = info
        self.options = options
        self.bucket_manager = buckets
        # What one epoch holds, exactly as the planner counts it.
        self.samples: tuple[Sample, ...] = tuple(epoch_samples(info, buckets))
        self.geometries: tuple[CropGeometry, ...] = tuple(
            CropGeometry.centred((s.image.width, s.image.height), s.choice) for s in self.samples
        )
        members: dict[Resolution, list[int]] = {}
        for index, sample in enumerate(self.samples):
            members.setdefault(sample.choice.bucket, []).extend([index] * sample.repeats)
        # Sorted by resolution, as sd-scripts (and the planner) list buckets.
        self._bucket_members = tuple(tuple(members[resolution]) for resolution in sorted(members))
        self.latent_cache: LatentCache | None = None
        self._latent_keys: dict[tuple[int, bool], str] = {}
        self._order_memo: tuple[int, tuple[tuple[int, ...], ...]] | None = None

    @classmethod
    def from_config(
        cls, config: Any, *, train_dir: Path | str | None = None, reg_dir: Path | str | None = None
    ) -> TrainingDataset:
        """Discover the config's dataset (``train_dir``/``reg_dir`` replace its folders) and build it."""
        train_root = Path(train_dir) if train_dir is not None else config.train_data_dir
        if train_root is None:
            raise DatasetError("no training data folder: set train_data_dir in the config or pass the folder")
        reg_root = Path(reg_dir) if reg_dir is not None else config.reg_data_dir
        manager = BucketManager.from_config(config)
        info = discover_dataset(train_root, reg_root, config.caption_extension)
        return cls(info, manager, DatasetOptions.from_config(config))

    # --- size ---------------------------------------------------------------------------------

    @property
    def buckets(self) -> list[Bucket]:
        """Buckets with their samples per epoch (the planner's ``Plan.buckets``)."""
        return fill_buckets((sample.choice.bucket, sample.repeats) for sample in self.samples)

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.buckets, self.options.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    # --- order --------------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> tuple[tuple[int, ...], ...]:
        """Indices into :attr:`samples` of every batch of ``epoch`` (from 1), in training order."""
        if epoch < 1:
            raise ValueError(f"epochs are counted from 1, got {epoch}")
        if self._order_memo is not None and self._order_memo[0] == epoch:
            return self._order_memo[1]
        rng = sample_rng(self.options.seed, epoch, 0, 0, SampleStream.ORDER)
        size = self.options.batch_size
        batches: list[tuple[int, ...]] = []
        for members in self._bucket_members:
            shuffled = list(members)
            rng.shuffle(shuffled)
            batches += [tuple(shuffled[i : i + size]) for i in range(0, len(shuffled), size)]
        rng.shuffle(batches)
        order = tuple(batches)
        self._order_memo = (epoch, order)
        return order

    # --- batches ------------------------------------------------------------------------------

    def batch(self, epoch: int, index: int, positions: Sequence[int] | None = None) -> Batch:
        """Batch ``index`` (from 0) of ``epoch`` (from 1); with ``positions``, only the samples at
        those positions of it (a process's slice: each sample is loaded, augmented and drawn
        exactly as in the whole batch). A slice may be empty (no images or latents then)."""
        whole = self.epoch_order(epoch)[index]
        chosen = tuple(range(len(whole))) if positions is None else tuple(positions)
        members = [whole[position] for position in chosen]
        seed, options = self.options.seed, self.options
        captions, flips, sizes, latent_seeds, pixels, keys = [], [], [], [], [], []
        for position, sample_index in zip(chosen, members):
            sample = self.samples[sample_index]
            caption = sample.image.caption
            if options.captions.changes_captions:  # else the caption is used as written
                caption_rng = sample_rng(seed, epoch, index, position, SampleStream.CAPTION)
                caption = process_caption(caption, options.captions, epoch, caption_rng)
            captions.append(caption)
            flipped = options.flip_aug and sample_rng(seed, epoch, index, position, SampleStream.FLIP).random() < 0.5
            flips.append(flipped)
            sizes.append(self.geometries[sample_index].sdxl_sizes(flipped))
            latent_seeds.append(derive_seed(seed, epoch, index, position, SampleStream.LATENT))
            if self.latent_cache is not None:
                keys.append(self._latent_keys[(sample_index, flipped)])
            else:
                pixels.append(to_tensor(self._pixels(sample_index, flipped, (epoch, index, position))))

        batch = Batch(
            epoch=epoch,
            index=index,
            captions=captions,
            loss_weights=torch.tensor(
                [options.prior_loss_weight if self.samples[i].is_reg else 1.0 for i in members], dtype=torch.float32
            ),
            is_reg=torch.tensor([self.samples[i].is_reg for i in members], dtype=torch.bool),
            flipped=torch.tensor(flips, dtype=torch.bool),
            original_sizes_hw=torch.tensor([s.original_hw for s in sizes], dtype=torch.long),
            crop_top_lefts=torch.tensor([s.crop_top_left for s in sizes], dtype=torch.long),
            target_sizes_hw=torch.tensor([s.target_hw for s in sizes], dtype=torch.long),
            latent_seeds=tuple(latent_seeds),
            paths=tuple(self.samples[i].image.path for i in members),
            latent_sampling=options.latent_sampling,
            positions=chosen,
            full_size=len(whole),
        )
        if not members:
            return batch
        if self.latent_cache is not None:
            batch.latents = self.latent_cache.draw(keys, seeds=latent_seeds, mode=options.latent_sampling)
        else:
            batch.images = torch.stack(pixels)
        return batch

    def _pixels(self, sample_index: int, flipped: bool, slot: tuple[int, int, int]) -> Any:
        path, seed = self.samples[sample_index].image.path, self.options.seed
        geometry = self.geometries[sample_index]
        if self.options.random_crop:
            geometry = geometry.randomised(sample_rng(seed, *slot, SampleStream.CROP))
        pixels = resize_and_crop(load_rgb(path), geometry, path)
        if self.options.color_aug:
            pixels = color_augment(pixels, sample_rng(seed, *slot, SampleStream.COLOR))
        return flip_horizontal(pixels) if flipped else pixels

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from batch ``start`` on (``start > 0`` resumes mid-epoch)."""
        for index in range(start, len(self.epoch_order(epoch))):
            yield self.batch(epoch, index)

    def loader(
        self, epoch: int, start: int = 0, *, num_workers: int = 0, part: tuple[int, int] | None = None
    ) -> Iterable[Batch]:
        """:meth:`iter_epoch`'s batches, built in ``num_workers`` processes (a DataLoader), or in
        this one for 0 (directly: a DataLoader would only add its per-batch bookkeeping).

        ``part=(rank, per_process)``: each batch holds only the ``per_process`` samples from
        position ``rank * per_process`` on (fewer, or none, in a bucket's short last batch).
        """
        batches = EpochBatches(self, epoch, start, part)
        if num_workers == 0:
            return batches
        return DataLoader(batches, batch_size=None, shuffle=False, num_workers=num_workers)

    # --- latent cache -------------------------------------------------------------------------

    def _latent_slots(self) -> list[tuple[tuple[int, bool], LatentRequest]]:
        flips = (False, True) if self.options.flip_aug else (False,)
        return [
            ((index, flipped), LatentRequest(sample.image.path, geometry, flipped))
            for index, (sample, geometry) in enumerate(zip(self.samples, self.geometries))
            for flipped in flips
        ]

    def latent_requests(self) -> list[LatentRequest]:
        """Every latent training can ask for: each image's centre crop, and its mirror with ``flip_aug``."""
        return list(dict.fromkeys(request for _, request in self._latent_slots()))

    def with_latent_cache(self, cache: LatentCache) -> TrainingDataset:
        """A copy whose batches carry latents drawn from ``cache`` instead of pixels.

        Image files are hashed now to find their keys; fill the cache first
        (``cache.fill(vae, dataset.latent_requests())``). Raises ConfigError with ``color_aug``
        or ``random_crop``, which change the pixels every epoch (sd-scripts refuses them too).
        """
        if not self.options.latent_cacheable:
            names = [name for name in ("color_aug", "random_crop") if getattr(self.options, name)]
            raise ConfigError(
                f"{' and '.join(names)} change the image every epoch, so latents cannot be cached; "
                f"unset {' and '.join(names)} or do not cache latents"
            )
        slots = self._latent_slots()
        cached = copy.copy(self)  # shares the immutable samples and buckets
        cached.latent_cache = cache
        cached._latent_keys = dict(zip([slot for slot, _ in slots], cache.keys_for(r for _, r in slots)))
        return cached


class EpochBatches(TorchDataset):
    """One epoch's batches from ``start`` on, as a map-style dataset (batch ``i`` = ``start + i``)."""

    def __init__(
        self, dataset: TrainingDataset, epoch: int, start: int = 0, part: tuple[int, int] | None = None
    ) -> None:
        total = len(dataset.epoch_order(epoch))
        if not 0 <= start <= total:
            raise ValueError(f"cannot start epoch {epoch} at batch {start}: it has {total} batches")
        self.dataset, self.epoch, self.start, self.total, self.part = dataset, epoch, start, total, part

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[Batch]:
        return (self[index] for index in range(len(self)))

    def __getitem__(self, index: int) -> Batch:
        if self.part is None:
            return self.dataset.batch(self.epoch, self.start + index)
        rank, per_process = self.part
        size = len(self.dataset.epoch_order(self.epoch)[self.start + index])
        positions = range(rank * per_process, min((rank + 1) * per_process, size))
        return self.dataset.batch(self.epoch, self.start + index, positions)

