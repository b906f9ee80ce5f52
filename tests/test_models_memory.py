"""Checkpoint reading casts tensor by tensor: the values of a cast read, and its peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loralab.errors import CheckpointError
from loralab.models.checkpoint_file import CheckpointFile


@pytest.fixture()
def mixed_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "half": torch.randn(7, 5, generator=generator).half(),
        "bf16": torch.randn(3, 4, 2, generator=generator).bfloat16(),
        "f32": torch.randn(6, generator=generator),
        "scalar": torch.tensor(1.5, dtype=torch.float16),
        "empty": torch.zeros(0),
        "ids": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "mask": torch.tensor([True, False, True]),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float16, torch.bfloat16])
def test_read_casts_floats_and_keeps_other_tensors(mixed_file, dtype):
    path, tensors = mixed_file
    with CheckpointFile(path) as checkpoint:
        read = checkpoint.read(list(tensors), dtype)
    with safe_open(str(path), framework="pt") as reference:
        for key, original in tensors.items():
            expected = reference.get_tensor(key)
            if dtype is not None and expected.is_floating_point():
                expected = expected.to(dtype)
            assert read[key].dtype == expected.dtype, key
            assert read[key].shape == expected.shape, key
            assert torch.equal(read[key], expected), key
            assert read[key].is_contiguous()


def test_read_tensors_are_independent_of_the_file(mixed_file):
    """Results own their memory: later reads (through the shared scratch buffer) and closing
    the file leave earlier results unchanged."""
    path, tensors = mixed_file
    with CheckpointFile(path) as checkpoint:
        first = checkpoint.read(["half"], torch.float32)["half"]
        checkpoint.read(["bf16", "scalar"], torch.float32)
    assert torch.equal(first, tensors["half"].float())


def test_truncated_data_is_a_checkpoint_error(mixed_file, tmp_path):
    path, _ = mixed_file
    with CheckpointFile(path) as checkpoint:
        # Cut the file after safe_open validated it: the positioned read finds the end early.
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 8])
        with pytest.raises(CheckpointError, match="truncated"):
            checkpoint.read(["mask", "ids", "f32", "bf16", "half"], torch.float32)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from loralab.models.checkpoint_file import CheckpointFile

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    with CheckpointFile(sys.argv[1]) as checkpoint:
        keys = checkpoint.keys()
        before = status("VmRSS")
        tensors = checkpoint.read(keys, torch.float32)
        peak = status("VmHWM")
    print(json.dumps({"before": before, "peak": peak, "kept": sum(t.nbytes for t in tensors.values())}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_half_precision_file_read_into_float32_peaks_near_the_result(tmp_path):
    """Reading 128 MiB of fp16 into 256 MiB of fp32 may add little beyond the result: neither
    the file's pages nor a second precision of the whole state stay resident."""
    path = tmp_path / "big.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_file(
        {f"w{i}": torch.randn(1 << 21, generator=generator).half() for i in range(32)}, str(path)
    )
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True, check=True
    )
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["kept"] == 32 * (1 << 21) * 4
    growth = numbers["peak"] - numbers["before"]
    # The result plus one tensor's scratch and allocator slack; the old path (memory-mapped
    # reads, cast after) peaked at the result plus the whole file (~+50%).
    assert growth <= numbers["kept"] * 1.15, (growth / 2**20, numbers["kept"] / 2**20)


def test_memory_only_text_cache_does_not_hash_the_encoders(monkeypatch):
    """Without a cache folder the key identifies the live encoders, so building the cache reads
    no weights; different encoders still get different keys, the same ones the same key."""
    from loralab.data import text_cache
    from loralab.models.tiny import build_tiny_components

    def refuse(*args, **kwargs):
        raise AssertionError("a memory-only text cache hashed the encoder weights")

    monkeypatch.setattr(text_cache, "weights_identity", refuse)
    monkeypatch.setattr(text_cache, "tokenizer_identity", refuse)
    first, second = build_tiny_components("sd15", seed=0), build_tiny_components("sd15", seed=0)
    cache = text_cache.TextEncoderCache.from_components(first)
    assert cache.key_for("blh") == text_cache.TextEncoderCache.from_components(first).key_for("blh")
    assert cache.key_for("blh") != text_cache.TextEncoderCache.from_components(second).key_for("blh")
    assert cache.encode(["blh"]).encoder_hidden_states.shape[0] == 1
