"""Aspect-ratio buckets against numbers worked out by hand from sd-scripts' rules."""

import pytest

from loralab.data.buckets import (
    Bucket,
    BucketManager,
    balance_reg_repeats,
    batches_per_epoch,
    fill_buckets,
    make_bucket_resolutions,
)
from loralab.errors import ConfigError, DatasetError

# sd-scripts' bucket list for 512x512, min 256, max 1024, step 64 (the one its logs print).
SD_SCRIPTS_512_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
    (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
    (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


@pytest.fixture
def buckets_512() -> BucketManager:
    return BucketManager((512, 512), min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64)


@pytest.fixture
def no_upscale_768() -> BucketManager:
    return BucketManager(
        (768, 768), min_bucket_reso=256, max_bucket_reso=2048, bucket_reso_steps=64, bucket_no_upscale=True
    )


def test_predefined_resolutions_keep_the_training_area():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SD_SCRIPTS_512_BUCKETS
    assert all(w * h <= 512 * 512 for w, h in SD_SCRIPTS_512_BUCKETS)


def test_portrait_photo_goes_to_closest_aspect_and_covers_it(buckets_512):
    # 1000x1500 (AR 0.667): 384x640 (AR 0.6) beats 448x576 (0.778). Its aspect is wider than the
    # bucket's, so the height is matched: scale 640/1500 -> 427x640, cropped to 384 wide.
    choice = buckets_512.select(1000, 1500)
    assert choice.bucket == (384, 640)
    assert choice.resized_size == (427, 640)
    assert choice.aspect_error == pytest.approx(0.6 - 1000 / 1500)


def test_landscape_photo(buckets_512):
    # 1920x1080 (AR 1.778): 640x384 (1.667) is closest; height matched: 384/1080 -> 683x384.
    choice = buckets_512.select(1920, 1080)
    assert choice.bucket == (640, 384)
    assert choice.resized_size == (683, 384)


def test_exact_bucket_size_and_square(buckets_512):
    assert buckets_512.select(448, 576).bucket == (448, 576)
    square = buckets_512.select(600, 600)
    assert square.bucket == (512, 512)
    assert square.resized_size == (512, 512)


def test_no_upscale_shrinks_large_images_to_the_area(no_upscale_768):
    # 1000x1500 is above 768*768: shrunk to 627.1x940.6. Width-first rounding gives 576x832
    # (AR error 0.026), height-first 576x896 (0.024) -> resized 597x896, bucket floored to 576x896.
    choice = no_upscale_768.select(1000, 1500)
    assert choice.resized_size == (597, 896)
    assert choice.bucket == (576, 896)
    # 4000x3000: height-first 640 wins -> 853x640, bucket 832x640.
    assert no_upscale_768.select(4000, 3000).bucket == (832, 640)


def test_no_upscale_keeps_small_images_and_floors_to_the_step(no_upscale_768):
    choice = no_upscale_768.select(700, 500)
    assert choice.resized_size == (700, 500)
    assert choice.bucket == (640, 448)
    assert no_upscale_768.predefined == ()


def test_no_upscale_image_thinner_than_a_step_is_an_error(no_upscale_768):
    with pytest.raises(DatasetError, match="thin.png is 40x900"):
        no_upscale_768.select(40, 900, "thin.png")


def test_bucketing_off_puts_every_image_in_the_resolution_bucket():
    manager = BucketManager((768, 768), enable_bucket=False)
    assert manager.select(1000, 1500).bucket == (768, 768)
    assert manager.select(300, 200).bucket == (768, 768)


@pytest.mark.parametrize(
    ("resolution", "settings", "message"),
    [
        ((770, 768), {}, "not divisible by bucket_reso_steps 64"),
        ((512, 512), {"min_bucket_reso": 640}, "min_bucket_reso 640 is larger"),
        ((1024, 1024), {"max_bucket_reso": 768}, "max_bucket_reso 768 is smaller"),
        ((512, 512), {"bucket_reso_steps": 60}, "multiple of 8"),
    ],
)
def test_bad_bucket_settings(resolution, settings, message):
    with pytest.raises(ConfigError, match=message):
        BucketManager(resolution, **settings)


def test_batches_are_counted_per_bucket():
    buckets = fill_buckets([((512, 512), 3), ((512, 512), 3), ((384, 640), 1), ((640, 384), 0)])
    assert buckets == [Bucket((384, 640), 1), Bucket((512, 512), 6)]
    # A bucket's last batch is short rather than filled from another bucket: 1 + ceil(6/4).
    assert batches_per_epoch(buckets, 4) == 3


def test_reg_images_are_balanced_like_sd_scripts():
    # Folder repeats first, then one more each round-robin until the training count is reached.
    assert balance_reg_repeats([1, 1, 1], 7) == [3, 2, 2]
    assert balance_reg_repeats([2, 2, 2], 3) == [2, 2, 0]  # surplus reg images are left out
    assert balance_reg_repeats([5], 3) == [5]
    assert balance_reg_repeats([], 3) == []
