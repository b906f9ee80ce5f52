"""The latent cache, ``loralab cache``, and the text-encoder output cache, on tiny models.

Checkpoints are tiny random models from ``loralab.models.tiny`` (another seed = another VAE);
images are 40-96 px. torch runs single-threaded here: the machines running the suite are
shared, and a tiny VAE is faster on one thread than fighting for two.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from loralab.cli.main import main
from loralab.config.schema import TrainConfig
from loralab.data import latent_cache as latent_cache_module
from loralab.data.dataset import TrainingDataset
from loralab.data.latent_cache import (
    LatentCache,
    default_cache_dir,
    draw_latents,
    encode_distribution,
)
from loralab.data.text_cache import TextEncoderCache
from loralab.data.transforms import to_tensor, training_pixels
from loralab.errors import DatasetError
from loralab.models.architecture import vae_config
from loralab.models.family import ModelFamily
from loralab.models.loading import load_checkpoint, load_vae
from loralab.models.tiny import build_tiny_components, make_tiny, tiny_sizes
from loralab.train.conditioning import encode_text, tokenize_captions

BUCKETS = ["--set", "enable_bucket=true", "--set", "min_bucket_reso=32", "--set", "max_bucket_reso=128", "--set", "bucket_reso_steps=16"]
SIZES = [(64, 64), (80, 48), (48, 80), (96, 64)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, Path]:
    """Tiny SD1.5 single-file checkpoints: seed 0 and seed 1 (a different VAE)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {seed: make_tiny("sd15", "single-file", folder / f"tiny{seed}.safetensors", seed=seed) for seed in (0, 1)}


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """Only the VAE of the tiny SD1.5 model (its sizes), with weights from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL.from_config(vae_config(ModelFamily.SD1, tiny_sizes(ModelFamily.SD1)[1])).eval()


def write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    for index, size in enumerate(SIZES):
        write_image(tmp_path / "data" / "2_blh woman" / f"{index}.png", size, index)
    return tmp_path / "data"


def run_cache(capsys, dataset: Path, checkpoint: Path, cache_dir: Path, *extra: str) -> str:
    code = main(["cache", str(dataset), "--checkpoint", str(checkpoint), "--cache-dir", str(cache_dir), "--resolution", "64", *BUCKETS, *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out.strip()


def small_config(dataset: Path, **values) -> TrainConfig:
    return TrainConfig(
        train_data_dir=dataset, resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
        bucket_reso_steps=16, **values,
    )  # fmt: skip


# --- acceptance: loralab cache -----------------------------------------------------------------


def test_cache_encodes_only_what_changed(capsys, dataset_dir: Path, checkpoints, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    n = len(SIZES)
    assert run_cache(capsys, dataset_dir, checkpoints[0], cache_dir) == f"0 cached, {n} encoded"
    assert run_cache(capsys, dataset_dir, checkpoints[0], cache_dir) == f"{n} cached, 0 encoded"

    # A new modification time with the same bytes is the same image: still cached.
    first = dataset_dir / "2_blh woman" / "0.png"
    os.utime(first, (1_000_000_000, 1_000_000_000))
    assert run_cache(capsys, dataset_dir, checkpoints[0], cache_dir) == f"{n} cached, 0 encoded"

    # Touch one image's pixels (same size): exactly that one is encoded again.
    changed = dataset_dir / "2_blh woman" / "2.png"
    pixels = np.array(Image.open(changed))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(changed)
    assert run_cache(capsys, dataset_dir, checkpoints[0], cache_dir) == f"{n - 1} cached, 1 encoded"

    # Another VAE: everything is encoded again, and the first VAE's entries stay valid.
    assert run_cache(capsys, dataset_dir, checkpoints[0], cache_dir, "--vae", str(checkpoints[1])) == f"0 cached, {n} encoded"
    assert run_cache(capsys, dataset_dir, checkpoints[1], cache_dir) == f"{n} cached, 0 encoded"
    assert run_cache(capsys, dataset_dir, checkpoints[0], cache_dir) == f"{n} cached, 0 encoded"
    leftovers = [p for p in cache_dir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []

    # Training loads the whole checkpoint, not just its VAE: it finds every latent the CLI cached.
    components = load_checkpoint(checkpoints[0])
    cache = LatentCache.for_vae(components.vae, source=checkpoints[0], root=cache_dir)
    dataset = TrainingDataset.from_config(small_config(dataset_dir))
    assert all(cache.has(key) for key in cache.keys_for(dataset.latent_requests()))


def test_cache_with_flip_aug_stores_mirrored_entries_and_reads_a_prepare_folder(capsys, tmp_path: Path, checkpoints) -> None:
    prepared = tmp_path / "prepared"
    for index, size in enumerate(SIZES[:2]):
        write_image(prepared / "img" / "1_blh woman" / f"{index}.png", size, index)
    write_image(prepared / "reg" / "1_woman" / "r.png", (64, 64), 9)
    out = run_cache(capsys, prepared, checkpoints[0], tmp_path / "cache", "--set", "flip_aug=true")
    assert out == "0 cached, 6 encoded"  # (2 training + 1 reg image) x (as is, mirrored)


def test_runs_differing_only_in_rank_share_every_latent(dataset_dir: Path, tmp_path: Path) -> None:
    cache = LatentCache.for_vae(tiny_vae(), root=tmp_path / "cache")
    rank_4 = TrainingDataset.from_config(small_config(dataset_dir, network_dim=4, flip_aug=True))
    rank_32 = TrainingDataset.from_config(small_config(dataset_dir, network_dim=32, network_alpha=16, flip_aug=True))
    keys = cache.keys_for(rank_4.latent_requests())
    assert keys == cache.keys_for(rank_32.latent_requests())
    assert len(set(keys)) == 2 * len(SIZES)

    vae = tiny_vae()
    assert cache.fill(vae, rank_4.latent_requests()).encoded == len(keys)
    assert cache.fill(vae, rank_32.latent_requests()).encoded == 0
    assert all(cache.has(key) for key in cache.keys_for(rank_32.latent_requests()))
    assert rank_32.with_latent_cache(cache).batch(1, 0).latents is not None

    # What does change the crop does change the key (so the check above can fail).
    other = TrainingDataset.from_config(small_config(dataset_dir, network_dim=4, flip_aug=True, bucket_no_upscale=True))
    assert set(cache.keys_for(other.latent_requests())) != set(keys)


def test_key_depends_on_vae_weights_and_dtype(dataset_dir: Path, tmp_path: Path) -> None:
    requests = TrainingDataset.from_config(small_config(dataset_dir)).latent_requests()
    keys = {
        name: set(LatentCache.for_vae(vae, root=tmp_path).keys_for(requests))
        for name, vae in (("seed0", tiny_vae(0)), ("seed0-again", tiny_vae(0)), ("seed1", tiny_vae(1)), ("half", tiny_vae(0).half()))
    }
    assert keys["seed0"] == keys["seed0-again"]
    assert keys["seed0"].isdisjoint(keys["seed1"]) and keys["seed0"].isdisjoint(keys["half"])


# --- acceptance: sampling from the cached posterior --------------------------------------------


def test_sampling_from_cached_mean_and_logvar_is_unbiased(dataset_dir: Path, tmp_path: Path) -> None:
    vae = tiny_vae()
    dataset = TrainingDataset.from_config(small_config(dataset_dir))
    cache = LatentCache.for_vae(vae, root=tmp_path / "cache")
    request = dataset.latent_requests()[0]
    cache.fill(vae, [request])
    mean, logvar = cache.load(cache.keys_for([request])[0])
    key = cache.keys_for([request])[0]
    draws = torch.cat([cache.draw([key], seeds=[seed]) for seed in range(200)]) / cache.scaling_factor

    latent_std = draws.std()
    average = draws.mean(dim=0)
    # The 200-draw average sits on the cached mean: within 1% of the latent std overall ...
    assert (average - mean).mean().abs() / latent_std < 0.01
    # ... and per element within the sampling error sigma / sqrt(200) (a z-score). The tiny random
    # VAE's posterior std (about 1) exceeds the spread of its means, unlike a trained VAE's, so the
    # per-element bound is statistical rather than 1%.
    posterior_std = torch.exp(0.5 * logvar)
    z = (average - mean) / (posterior_std / 200**0.5)
    assert z.abs().mean() < 1.0 and z.abs().max() < 4.5
    # The draws really are samples: their spread is the posterior's.
    assert torch.allclose(draws.std(dim=0).mean(), posterior_std.mean(), rtol=0.1)

    # The mean mode returns the scaled mean; the same seed returns the same draw.
    assert torch.equal(cache.draw([key], seeds=[0], mode="mean")[0], mean * cache.scaling_factor)
    assert torch.equal(cache.draw([key], seeds=[3]), cache.draw([key], seeds=[3]))


def test_draw_applies_shift_then_scale() -> None:
    mean, logvar = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    latents = draw_latents(mean, logvar, seeds=[0], mode="mean", scaling_factor=2.0, shift_factor=0.5)
    assert torch.equal(latents, torch.full_like(mean, 1.0))


# --- the dataset reading from the cache --------------------------------------------------------


def test_cached_batches_match_encoding_the_pixels(dataset_dir: Path, tmp_path: Path) -> None:
    vae = tiny_vae()
    plain = TrainingDataset.from_config(small_config(dataset_dir, flip_aug=True, train_batch_size=2))
    cache = LatentCache.for_vae(vae, root=tmp_path / "cache")
    cache.fill(vae, plain.latent_requests())
    cached = plain.with_latent_cache(cache)
    flips_seen = set()
    for epoch in (1, 2):
        for index in range(plain.batches_per_epoch):
            with_pixels, with_latents = plain.batch(epoch, index), cached.batch(epoch, index)
            assert with_latents.images is None and with_pixels.latents is None
            assert with_latents.paths == with_pixels.paths
            assert torch.equal(with_latents.flipped, with_pixels.flipped)
            flips_seen.update(with_latents.flipped.tolist())
            # Same posterior, same seeds, same scaling: an uncached run draws the same latents.
            expected = with_pixels.latents_for(vae)
            assert torch.allclose(with_latents.latents_for(vae), expected, atol=1e-5)
    assert flips_seen == {False, True}

    # Each epoch draws a fresh latent of the same image (same path, same flip, other epoch).
    def latents_by_image(epoch):
        found = {}
        for batch in cached.iter_epoch(epoch):
            for path, flipped, latent in zip(batch.paths, batch.flipped.tolist(), batch.latents):
                found.setdefault((path, flipped), latent)
        return found

    first, second = latents_by_image(1), latents_by_image(2)
    shared = set(first) & set(second)
    assert shared
    for image in shared:
        assert first[image].shape == second[image].shape and not torch.equal(first[image], second[image])


def test_mean_mode_batches_are_the_scaled_means(dataset_dir: Path, tmp_path: Path) -> None:
    vae = tiny_vae()
    found = TrainingDataset.from_config(small_config(dataset_dir))
    dataset = TrainingDataset(found.info, found.bucket_manager, replace(found.options, latent_sampling="mean"))
    cache = LatentCache.for_vae(vae, root=tmp_path / "cache")
    cache.fill(vae, dataset.latent_requests())
    batch = dataset.with_latent_cache(cache).batch(1, 0)
    pixels = training_pixels(batch.paths[0], dataset.geometries[dataset.epoch_order(1)[0][0]], False)
    mean, _ = encode_distribution(vae, to_tensor(pixels)[None])
    assert torch.allclose(batch.latents, mean * vae.config.scaling_factor, atol=1e-5)


# --- robustness --------------------------------------------------------------------------------


def test_damaged_entry_is_encoded_again(dataset_dir: Path, tmp_path: Path) -> None:
    vae = tiny_vae()
    requests = TrainingDataset.from_config(small_config(dataset_dir)).latent_requests()
    cache = LatentCache.for_vae(vae, root=tmp_path / "cache")
    cache.fill(vae, requests)
    damaged = cache.path_for(cache.keys_for(requests)[1])
    damaged.write_bytes(damaged.read_bytes()[:50])
    with pytest.raises(DatasetError, match="missing or unreadable"):
        cache.load(cache.keys_for(requests)[1])
    stats = cache.fill(vae, requests)
    assert (stats.cached, stats.encoded) == (len(requests) - 1, 1)


def test_entries_read_once_stay_in_memory_within_the_budget(dataset_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A run reads each entry from disk once (sd-scripts keeps cached latents in RAM), up to the
    budget; entries beyond it are read from disk every time."""
    vae = tiny_vae()
    requests = TrainingDataset.from_config(small_config(dataset_dir)).latent_requests()
    first, second = LatentCache.for_vae(vae, root=tmp_path / "cache").keys_for(requests)[:2]
    LatentCache.for_vae(vae, root=tmp_path / "cache").fill(vae, requests)
    entry_bytes = sum(t.numel() * t.element_size() for t in LatentCache.for_vae(vae, root=tmp_path / "cache").load(first))
    monkeypatch.setattr(latent_cache_module, "MEMORY_BUDGET_BYTES", entry_bytes)  # room for one entry
    cache = LatentCache.for_vae(vae, root=tmp_path / "cache")
    reads: list[Path] = []
    original = latent_cache_module.read_safetensors
    monkeypatch.setattr(latent_cache_module, "read_safetensors", lambda path, names: reads.append(path) or original(path, names))
    expected = [cache.load(first), cache.load(second)]
    again = [cache.load(first), cache.load(second)]
    assert reads == [cache.path_for(first), cache.path_for(second), cache.path_for(second)]
    for (mean, logvar), (mean_again, logvar_again) in zip(expected, again):
        assert torch.equal(mean, mean_again) and torch.equal(logvar, logvar_again)


def test_vae_digest_is_memoised_by_file_identity(checkpoints, tmp_path: Path, monkeypatch) -> None:
    calls = []
    real_digest = latent_cache_module.state_dict_digest
    monkeypatch.setattr(latent_cache_module, "state_dict_digest", lambda m: calls.append(1) or real_digest(m))
    path = tmp_path / "vae.safetensors"
    path.write_bytes(checkpoints[0].read_bytes())
    vae = load_vae(path, ModelFamily.SD1)
    first = LatentCache.for_vae(vae, source=path, root=tmp_path / "cache").vae_id
    second = LatentCache.for_vae(load_vae(path, ModelFamily.SD1), source=path, root=tmp_path / "cache").vae_id
    assert first == second and len(calls) == 1

    # Replace the file with another model: its identity changes, so the digest is computed again.
    path.write_bytes(checkpoints[1].read_bytes())
    third = LatentCache.for_vae(load_vae(path, ModelFamily.SD1), source=path, root=tmp_path / "cache").vae_id
    assert third != first and len(calls) == 2
    # Without a source file nothing is remembered.
    LatentCache.for_vae(vae, root=tmp_path / "cache")
    assert len(calls) == 3


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORALAB_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LORALAB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "loralab"


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("no-checkpoint", "no checkpoint"),
        ("color-aug", "color_aug"),
        ("bad-caption", "UTF-8"),
        ("resolution-0", "error: --resolution 0 must be positive"),
        ("resolution-word", "error: --resolution: resolution 'big' is not"),
        ("set-resolution-0", "error: --set resolution: resolution 0x0 must be positive"),
    ],
)
def test_cache_cli_errors_are_one_line(capsys, dataset_dir: Path, tmp_path: Path, problem: str, expected: str) -> None:
    resolution = {"resolution-0": "0", "resolution-word": "big"}.get(problem, "64")
    argv = ["cache", str(dataset_dir), "--cache-dir", str(tmp_path / "cache"), "--resolution", resolution]
    if problem == "set-resolution-0":
        argv = ["cache", str(dataset_dir), "--cache-dir", str(tmp_path / "cache"), "--set", "resolution=0"]
    if problem != "no-checkpoint":
        argv += ["--checkpoint", str(tmp_path / "unused.safetensors")]
    if problem == "color-aug":
        argv += ["--set", "color_aug=true"]
    if problem == "bad-caption":
        (dataset_dir / "2_blh woman" / "0.caption").write_bytes(b"caf\xe9")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err


# --- text-encoder outputs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_components("sd15", seed=0)


def direct_encoding(components, captions, clip_skip=None):
    ids = [tokenize_captions(t, captions) for t in components.tokenizers]
    with torch.no_grad():
        return encode_text(
            components.family, components.text_encoders, ids,
            eos_token_ids=[t.eos_token_id for t in components.tokenizers], clip_skip=clip_skip,
        )  # fmt: skip


def test_text_cache_encodes_each_caption_once_and_matches_direct_encoding(sd15, tmp_path: Path) -> None:
    cache = TextEncoderCache.from_components(sd15, root=tmp_path / "cache")
    captions = ["blh woman, smiling", "blh woman", "blh woman, smiling"]
    output = cache.encode(captions)
    assert cache.encoded == 2
    assert torch.allclose(output.encoder_hidden_states, direct_encoding(sd15, captions).encoder_hidden_states, atol=1e-5)
    cache.encode(["blh woman"])
    assert cache.encoded == 2

    # A new cache over the same folder reads the entries from disk.
    reopened = TextEncoderCache.from_components(sd15, root=tmp_path / "cache")
    again = reopened.encode(captions, dtype=torch.float16)
    assert reopened.encoded == 0 and again.encoder_hidden_states.dtype == torch.float16
    assert torch.allclose(again.encoder_hidden_states.float(), output.encoder_hidden_states, atol=1e-2)


def test_text_cache_key_covers_encoder_clip_skip_and_length(sd15) -> None:
    base = TextEncoderCache.from_components(sd15)
    variants = [
        TextEncoderCache.from_components(sd15, clip_skip=2),
        TextEncoderCache.from_components(sd15, max_token_length=150),
        TextEncoderCache.from_components(build_tiny_components("sd15", seed=1)),
    ]
    assert base.key_for("blh woman") == TextEncoderCache.from_components(sd15).key_for("blh woman")
    assert all(v.key_for("blh woman") != base.key_for("blh woman") for v in variants)
    skipped = variants[0].encode(["blh woman"]).encoder_hidden_states
    assert torch.allclose(skipped, direct_encoding(sd15, ["blh woman"], clip_skip=2).encoder_hidden_states, atol=1e-5)


def test_text_cache_keeps_sdxl_pooled_output(tmp_path: Path) -> None:
    sdxl = build_tiny_components("sdxl", seed=0)
    cache = TextEncoderCache.from_components(sdxl, root=tmp_path / "cache")
    first = cache.encode(["blh woman", "a photo"])
    reread = TextEncoderCache.from_components(sdxl, root=tmp_path / "cache").encode(["a photo"])
    assert first.pooled is not None and reread.pooled is not None
    assert torch.allclose(reread.pooled[0], first.pooled[1], atol=1e-6)
    assert torch.allclose(reread.encoder_hidden_states[0], first.encoder_hidden_states[1], atol=1e-6)
