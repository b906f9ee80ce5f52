"""The training dataset: what an epoch holds, its order, and what each sample looks like.

Images are small (40-96 px) synthetic PNGs; no model is needed. The latent-cache side of the
dataset is tested in test_latent_cache.py.
"""

from __future__ import annotations

import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loralab.config.schema import TrainConfig
from loralab.data.dataset import TrainingDataset
from loralab.data.latent_cache import LatentCache
from loralab.data.transforms import (
    CaptionOptions,
    CropGeometry,
    color_augment,
    load_rgb,
    process_caption,
)
from loralab.errors import ConfigError, DatasetError
from loralab.plan.planner import make_plan

# Buckets small enough for 64 px images: area 64x64, sides 32..128 in steps of 16.
SMALL_BUCKETS = dict(resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
MIXED_SIZES = [(64, 64), (80, 48), (48, 80), (96, 64), (64, 96), (72, 40), (40, 72)]


def write_image(path: Path, size: tuple[int, int], seed: int = 0, pixels: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_folder(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    return [write_image(folder / f"{i:03d}.png", size, seed + i) for i, size in enumerate(sizes)]


def config(tmp_path: Path, **values) -> TrainConfig:
    values.setdefault("train_data_dir", tmp_path / "img")
    return TrainConfig(**values)


def epoch_counts(dataset: TrainingDataset, epoch: int) -> Counter:
    return Counter(dataset.samples[i].image.path for batch in dataset.epoch_order(epoch) for i in batch)


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Non-square mixed sizes in two training folders and a regularisation folder."""
    write_folder(tmp_path / "img" / "3_blh woman", MIXED_SIZES)
    write_folder(tmp_path / "img" / "2_blh woman smiling", [(64, 64), (96, 64), (40, 72)], seed=50)
    write_folder(tmp_path / "reg" / "1_woman", [(64, 64), (80, 48), (64, 96), (48, 80)] * 3, seed=100)
    return tmp_path


# --- what an epoch holds -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(SMALL_BUCKETS, train_batch_size=3),
        dict(SMALL_BUCKETS, train_batch_size=2, bucket_no_upscale=True),
        dict(resolution=64, train_batch_size=4),  # bucketing off: one bucket
    ],
    ids=["buckets", "no-upscale", "no-buckets"],
)
def test_batches_per_epoch_equal_the_planners(mixed: Path, settings: dict) -> None:
    cfg = config(mixed, reg_data_dir=mixed / "reg", **settings)
    dataset = TrainingDataset.from_config(cfg)
    plan = make_plan(cfg)
    assert dataset.batches_per_epoch == plan.batches_per_epoch
    assert dataset.buckets == list(plan.buckets)
    if settings.get("enable_bucket"):
        assert len(plan.buckets) > 2  # the dataset really is mixed
    size = cfg.train_batch_size
    for epoch in (1, 2):
        order = dataset.epoch_order(epoch)
        assert len(order) == plan.batches_per_epoch
        # Every batch holds one bucket, and at most one short batch per bucket.
        short = Counter()
        for batch in order:
            assert 1 <= len(batch) <= size
            assert len({dataset.samples[i].choice.bucket for i in batch}) == 1
            short[dataset.samples[batch[0]].choice.bucket] += len(batch) < size
        assert max(short.values()) <= 1


def test_each_image_appears_its_repeats_per_epoch(mixed: Path) -> None:
    dataset = TrainingDataset.from_config(config(mixed, train_batch_size=2, **SMALL_BUCKETS))
    counts = epoch_counts(dataset, 1)
    for path, count in counts.items():
        assert count == (3 if path.parent.name == "3_blh woman" else 2)
    assert len(counts) == len(MIXED_SIZES) + 3


def test_reg_images_are_balanced_against_training_images_with_their_loss_weight(tmp_path: Path) -> None:
    write_folder(tmp_path / "img" / "2_blh woman", [(64, 64)] * 3)  # 6 training samples
    reg = write_folder(tmp_path / "reg" / "1_woman", [(64, 64)] * 4, seed=10)
    cfg = config(tmp_path, resolution=64, reg_data_dir=tmp_path / "reg", prior_loss_weight=0.25, train_batch_size=3)
    dataset = TrainingDataset.from_config(cfg)
    counts = epoch_counts(dataset, 1)
    # sd-scripts: each reg image once, then one more round-robin until 6: [2, 2, 1, 1].
    assert [counts[p] for p in reg] == [2, 2, 1, 1]
    assert make_plan(cfg).reg_images_per_epoch == 6

    seen_reg = 0
    for batch in dataset.iter_epoch(1):
        for path, weight, is_reg in zip(batch.paths, batch.loss_weights.tolist(), batch.is_reg.tolist()):
            assert is_reg == (path.parent.name == "1_woman")
            assert weight == (0.25 if is_reg else 1.0)
            seen_reg += is_reg
    assert seen_reg == 6


def test_surplus_reg_images_are_left_out(tmp_path: Path) -> None:
    write_folder(tmp_path / "img" / "2_blh woman", [(64, 64)] * 2)  # 4 training samples
    reg = write_folder(tmp_path / "reg" / "1_woman", [(64, 64)] * 7, seed=10)
    dataset = TrainingDataset.from_config(config(tmp_path, resolution=64, reg_data_dir=tmp_path / "reg"))
    counts = epoch_counts(dataset, 1)
    assert [counts[p] for p in reg] == [1, 1, 1, 1, 0, 0, 0]


# --- order: deterministic and resumable --------------------------------------------------------


def test_epoch_order_is_a_pure_function_of_seed_and_epoch(mixed: Path) -> None:
    cfg = config(mixed, reg_data_dir=mixed / "reg", train_batch_size=2, seed=7, **SMALL_BUCKETS)
    first, second = TrainingDataset.from_config(cfg), TrainingDataset.from_config(cfg)
    later_first = second.epoch_order(3)  # asking out of order changes nothing
    assert first.epoch_order(1) == second.epoch_order(1)
    assert first.epoch_order(3) == later_first
    assert first.epoch_order(1) != first.epoch_order(2)  # reshuffled every epoch
    other_seed = TrainingDataset.from_config(config(mixed, reg_data_dir=mixed / "reg", train_batch_size=2, seed=8, **SMALL_BUCKETS))
    assert other_seed.epoch_order(1) != first.epoch_order(1)
    assert sorted(first.epoch_order(1)) != first.epoch_order(1)  # not left in bucket order
    with pytest.raises(ValueError, match="from 1"):
        first.epoch_order(0)


def test_resuming_mid_epoch_gives_the_batches_a_full_epoch_gives(mixed: Path) -> None:
    cfg = config(
        mixed, train_batch_size=2, flip_aug=True, random_crop=True, color_aug=True,
        shuffle_caption=True, caption_tag_dropout_rate=0.3, **SMALL_BUCKETS,
    )  # fmt: skip
    dataset = TrainingDataset.from_config(cfg)
    full = list(dataset.iter_epoch(2))
    start = 3
    resumed = list(TrainingDataset.from_config(cfg).loader(2, start))
    assert len(resumed) == len(full) - start
    for expected, got in zip(full[start:], resumed):
        assert got.index == expected.index
        assert got.paths == expected.paths
        assert got.captions == expected.captions
        assert torch.equal(got.flipped, expected.flipped)
        assert torch.equal(got.images, expected.images)
        assert got.latent_seeds == expected.latent_seeds
    # Another epoch draws other augmentations for the same slots.
    assert [b.latent_seeds for b in dataset.iter_epoch(3)] != [b.latent_seeds for b in full]


def test_dataset_survives_pickling_for_loader_workers(mixed: Path) -> None:
    dataset = TrainingDataset.from_config(config(mixed, train_batch_size=2, **SMALL_BUCKETS))
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.epoch_order(1) == dataset.epoch_order(1)
    assert torch.equal(copy.batch(1, 0).images, dataset.batch(1, 0).images)


# --- captions ----------------------------------------------------------------------------------


CAPTION = "blh woman, smiling, red dress, outdoors, sunlight"


def test_captions_are_unchanged_without_caption_options() -> None:
    assert process_caption(CAPTION, CaptionOptions(), 1, random.Random(0)) == CAPTION


def test_shuffle_keeps_the_first_keep_tokens_in_place() -> None:
    options = CaptionOptions(shuffle_caption=True, keep_tokens=2)
    results = {process_caption(CAPTION, options, 1, random.Random(seed)) for seed in range(20)}
    assert len(results) > 5
    for result in results:
        tags = result.split(", ")
        assert tags[:2] == ["blh woman", "smiling"]
        assert sorted(tags[2:]) == sorted(["red dress", "outdoors", "sunlight"])


def test_keep_tokens_separator_fixes_a_prefix_and_a_suffix() -> None:
    options = CaptionOptions(shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||")
    caption = "blh woman, photo ||| red, green, blue, yellow ||| best quality"
    results = {process_caption(caption, options, 1, random.Random(seed)) for seed in range(20)}
    assert len(results) > 5
    for result in results:
        tags = result.split(", ")
        assert tags[:2] == ["blh woman", "photo"] and tags[-1] == "best quality"
        assert sorted(tags[2:-1]) == ["blue", "green", "red", "yellow"]


def test_tag_dropout_never_drops_kept_tokens() -> None:
    everything = CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert process_caption(CAPTION, everything, 1, random.Random(0)) == "blh woman"
    some = CaptionOptions(caption_tag_dropout_rate=0.5, keep_tokens=1)
    lengths = {len(process_caption(CAPTION, some, 1, random.Random(s)).split(", ")) for s in range(30)}
    assert min(lengths) >= 1 and len(lengths) > 2


def test_caption_dropout_by_rate_and_every_n_epochs() -> None:
    assert process_caption(CAPTION, CaptionOptions(caption_dropout_rate=1.0), 1, random.Random(0)) == ""
    half = CaptionOptions(caption_dropout_rate=0.5)
    dropped = sum(process_caption(CAPTION, half, 1, random.Random(s)) == "" for s in range(200))
    assert 70 < dropped < 130
    every_two = CaptionOptions(caption_dropout_every_n_epochs=2)
    # Epochs count from 1, as in sd-scripts: epochs 2 and 4 train without captions.
    assert [process_caption(CAPTION, every_two, e, random.Random(0)) for e in (1, 2, 3, 4)] == [CAPTION, "", CAPTION, ""]


def test_dataset_reads_caption_files_with_the_configured_extension(tmp_path: Path) -> None:
    folder = tmp_path / "img" / "1_blh woman"
    write_folder(folder, [(64, 64)] * 2)
    (folder / "000.txt").write_text("blh woman, red dress, smiling\n", encoding="utf-8")
    cfg = config(tmp_path, resolution=64, caption_extension=".txt", shuffle_caption=True, keep_tokens=1, train_batch_size=2)
    batch = TrainingDataset.from_config(cfg).batch(1, 0)
    by_path = dict(zip((p.name for p in batch.paths), batch.captions))
    assert by_path["001.png"] == "blh woman"  # no caption file: the folder's class tokens
    assert by_path["000.png"].startswith("blh woman, ")
    assert sorted(by_path["000.png"].split(", ")[1:]) == ["red dress", "smiling"]


def test_non_utf8_caption_file_is_one_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "img" / "1_blh woman"
    write_folder(folder, [(64, 64)])
    (folder / "000.caption").write_bytes("blh woman, café".encode("latin-1"))
    with pytest.raises(DatasetError) as error:
        TrainingDataset.from_config(config(tmp_path, resolution=64))
    message = str(error.value)
    assert "\n" not in message and "000.caption" in message and "UTF-8" in message


# --- geometry: resize, crop, flip --------------------------------------------------------------


def column_ramp(width: int, height: int) -> np.ndarray:
    """Red = x, green = y: every pixel says where it came from."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.arange(width, dtype=np.uint8)[None, :]
    pixels[:, :, 1] = np.arange(height, dtype=np.uint8)[:, None]
    return pixels


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()


def test_centre_crop_and_flip_take_the_right_pixels(tmp_path: Path) -> None:
    # 96x64 into a 64x64 bucket: height already fits, so no resize; 16 columns trimmed each side.
    write_image(tmp_path / "img" / "1_blh woman" / "wide.png", (96, 64), pixels=column_ramp(96, 64))
    dataset = TrainingDataset.from_config(config(tmp_path, resolution=64))
    assert dataset.geometries[0] == CropGeometry((96, 64), (96, 64), (64, 64), 16, 0)
    pixels = to_uint8(dataset.batch(1, 0).images[0])
    assert (pixels[:, :, 0] == np.arange(16, 80)[None, :]).all()
    assert (pixels[:, :, 1] == np.arange(64)[:, None]).all()

    flipping = TrainingDataset.from_config(config(tmp_path, resolution=64, flip_aug=True))
    batches = [flipping.batch(epoch, 0) for epoch in range(1, 13)]
    flips = [bool(b.flipped[0]) for b in batches]
    assert any(flips) and not all(flips)
    for batch, flipped in zip(batches, flips):
        red = to_uint8(batch.images[0])[:, :, 0]
        assert (red == (np.arange(79, 15, -1) if flipped else np.arange(16, 80))[None, :]).all()


def test_random_crop_moves_the_window_within_the_resized_image(tmp_path: Path) -> None:
    write_image(tmp_path / "img" / "1_blh woman" / "wide.png", (96, 64), pixels=column_ramp(96, 64))
    dataset = TrainingDataset.from_config(config(tmp_path, resolution=64, random_crop=True))
    lefts = [int(to_uint8(dataset.batch(epoch, 0).images[0])[0, 0, 0]) for epoch in range(1, 16)]
    assert all(0 <= left <= 32 for left in lefts) and len(set(lefts)) > 3
    assert lefts[0] == int(to_uint8(dataset.batch(1, 0).images[0])[0, 0, 0])  # same slot, same crop


@pytest.mark.parametrize(("size", "resized"), [((128, 96), (85, 64)), ((32, 48), (64, 96))], ids=["down", "up"])
def test_images_are_resized_to_cover_the_bucket_then_cropped(tmp_path: Path, size, resized) -> None:
    write_image(tmp_path / "img" / "1_blh woman" / "a.png", size, pixels=np.full((size[1], size[0], 3), 200, np.uint8))
    dataset = TrainingDataset.from_config(config(tmp_path, resolution=64))
    geometry = dataset.geometries[0]
    assert geometry.resized_size == resized and geometry.bucket == (64, 64)
    image = dataset.batch(1, 0).images[0]
    assert image.shape == (3, 64, 64)
    assert torch.allclose(image, torch.full_like(image, 200 / 127.5 - 1), atol=1 / 127.5)


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4, :, :] = (10, 20, 30, 255)
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    pixels = load_rgb(path)
    assert pixels.shape == (8, 8, 3)
    assert (pixels[:4] == (10, 20, 30)).all() and (pixels[4:] == 255).all()


def test_undecodable_image_is_one_clear_error(tmp_path: Path) -> None:
    path = write_image(tmp_path / "img" / "1_blh woman" / "a.png", (64, 64))
    dataset = TrainingDataset.from_config(config(tmp_path, resolution=64))
    path.write_bytes(path.read_bytes()[:60])  # truncated after discovery read the header
    with pytest.raises(DatasetError, match="a.png"):
        dataset.batch(1, 0)


# --- SDXL size conditioning --------------------------------------------------------------------


def test_sdxl_sizes_follow_sd_scripts(tmp_path: Path) -> None:
    folder = tmp_path / "img" / "1_blh woman"
    write_image(folder / "landscape.png", (96, 64))
    write_image(folder / "portrait.png", (64, 96))
    dataset = TrainingDataset.from_config(config(tmp_path, resolution=64))
    by_name = {s.image.path.name: g for s, g in zip(dataset.samples, dataset.geometries)}
    # Landscape fitted inside 64x64 is 64 x 42.67, centred: top (64 - 42.67) // 2 = 10, left 0.
    landscape = by_name["landscape.png"]
    assert landscape.sdxl_sizes(False).original_hw == (64, 96)
    assert landscape.sdxl_sizes(False).crop_top_left == (10, 0)
    assert landscape.sdxl_sizes(True).crop_top_left == (10, 0)
    assert landscape.sdxl_sizes(False).target_hw == (64, 64)
    # Portrait: left (64 - 42.67) // 2 = 10; flipped, the box's left edge is 64 - 52.67 = 11.33.
    portrait = by_name["portrait.png"]
    assert portrait.sdxl_sizes(False).crop_top_left == (0, 10)
    assert portrait.sdxl_sizes(True).crop_top_left == (0, 11)

    # In a batch the values arrive as SDXL time ids: original (h, w), crop (top, left), target (h, w).
    batching = TrainingDataset.from_config(config(tmp_path, resolution=64, train_batch_size=2, flip_aug=True))
    batch = batching.batch(1, 0)
    for row, path, flipped in zip(batch.sdxl_time_ids().tolist(), batch.paths, batch.flipped.tolist()):
        sizes = by_name[path.name].sdxl_sizes(flipped)
        assert row == [*sizes.original_hw, *sizes.crop_top_left, *sizes.target_hw]


def test_sdxl_target_size_is_the_bucket(mixed: Path) -> None:
    dataset = TrainingDataset.from_config(config(mixed, train_batch_size=2, **SMALL_BUCKETS))
    for batch in dataset.iter_epoch(1):
        height, width = batch.images.shape[2:]
        assert batch.target_sizes_hw.tolist() == [[height, width]] * len(batch)
        for path, original in zip(batch.paths, batch.original_sizes_hw.tolist()):
            with Image.open(path) as image:
                assert original == [image.height, image.width]


# --- colour augmentation -----------------------------------------------------------------------


def test_color_aug_changes_about_a_third_of_the_images() -> None:
    pixels = np.random.default_rng(0).integers(30, 220, (16, 16, 3), dtype=np.uint8)
    changed = [not np.array_equal(color_augment(pixels, random.Random(seed)), pixels) for seed in range(300)]
    assert 0.25 < sum(changed) / len(changed) < 0.42
    assert np.array_equal(color_augment(pixels, random.Random(5)), color_augment(pixels, random.Random(5)))
    shifted = next(color_augment(pixels, random.Random(s)) for s, c in enumerate(changed) if c)
    # Hue shifts and gammas near 1 keep each pixel close to where it was.
    assert np.abs(shifted.astype(int) - pixels.astype(int)).mean() < 40


def test_color_aug_and_random_crop_rule_out_cached_latents(tmp_path: Path) -> None:
    write_folder(tmp_path / "img" / "1_blh woman", [(64, 64)])
    cache = LatentCache(tmp_path / "cache", vae_id="0" * 64, dtype="float32", scaling_factor=0.18215)
    for option in ("color_aug", "random_crop"):
        dataset = TrainingDataset.from_config(config(tmp_path, resolution=64, **{option: True}))
        assert not dataset.options.latent_cacheable
        with pytest.raises(ConfigError, match=option):
            dataset.with_latent_cache(cache)
