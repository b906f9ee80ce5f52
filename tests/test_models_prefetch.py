"""Reading the base checkpoint ahead (``models.prefetch``): loading then takes the tensors read in the
background thread instead of reading the file again, with identical results; reads ahead that do
not fit (another dtype, a changed file) or are never taken are not used and are let go."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from loralab.models import checkpoint_file
from loralab.models.checkpoint_file import CheckpointFile, discard_prefetched
from loralab.models.loading import load_checkpoint
from loralab.models.prefetch import checkpoint_prefetch, use_one_core_in_this_thread
from loralab.models.tiny import make_tiny
from loralab.sweep.model_pool import frozen_digest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny("sd15", "single-file", tmp_path_factory.mktemp("prefetch") / "tiny.safetensors")


@pytest.fixture
def reads(monkeypatch):
    """The names of the threads that read each tensor from the file."""
    seen: list[str] = []
    original = CheckpointFile._read_one

    def recording(self, key, dtype):
        seen.append(threading.current_thread().name)
        return original(self, key, dtype)

    monkeypatch.setattr(CheckpointFile, "_read_one", recording)
    return seen


def test_loading_takes_the_tensors_read_ahead(checkpoint, reads):
    expected = frozen_digest(load_checkpoint(checkpoint))
    reads.clear()
    with checkpoint_prefetch(checkpoint, torch.float32):
        loaded = load_checkpoint(checkpoint)
    assert frozen_digest(loaded) == expected
    assert reads and set(reads) == {"loralab-checkpoint-prefetch"}  # the loader read nothing itself
    assert not checkpoint_file._PREFETCHED


def test_a_read_ahead_in_another_dtype_is_not_used(checkpoint, reads):
    with checkpoint_prefetch(checkpoint, torch.float16):
        loaded = load_checkpoint(checkpoint)  # float32
        assert threading.main_thread().name in reads
    assert next(loaded.unet.parameters()).dtype == torch.float32
    assert not checkpoint_file._PREFETCHED  # dropped when the block ends


def test_a_changed_file_is_read_again(checkpoint, tmp_path, reads):
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(checkpoint.read_bytes())
    with checkpoint_prefetch(copy, torch.float32):
        copy.touch()  # a new modification time: what was read ahead may be stale
        load_checkpoint(copy)
        assert threading.main_thread().name in reads


def test_a_read_ahead_nobody_takes_is_discarded(checkpoint):
    with checkpoint_prefetch(checkpoint, torch.float32):
        (entry,) = checkpoint_file._PREFETCHED.values()
        discard_prefetched()
        assert not checkpoint_file._PREFETCHED and entry.take() is None


def test_only_single_safetensors_files_are_read_ahead(tmp_path):
    folder = make_tiny("sd15", "diffusers", tmp_path / "folder")
    with checkpoint_prefetch(folder, torch.float32), checkpoint_prefetch(None, torch.float32):
        assert not checkpoint_file._PREFETCHED


def test_the_switch_interval_is_short_while_reading_and_restored_after(checkpoint, monkeypatch):
    # The reader needs the GIL a few times per tensor while the main thread imports; with the
    # default 5 ms interval it waited seconds for it on the full-size model.
    release = threading.Event()
    original = CheckpointFile.read_from_file

    def held_read(self, keys, dtype=None):
        release.wait(timeout=30)
        return original(self, keys, dtype)

    monkeypatch.setattr(CheckpointFile, "read_from_file", held_read)
    before = sys.getswitchinterval()
    with checkpoint_prefetch(checkpoint, torch.float32):
        assert sys.getswitchinterval() < before / 10
        release.set()
        (entry,) = checkpoint_file._PREFETCHED.values()
        assert entry.take()
        assert sys.getswitchinterval() == before


def test_overlapping_read_aheads_restore_the_interval_from_before_the_first(checkpoint, monkeypatch):
    # A dropped read-ahead still runs to its end, so the next run's may start before it ends.
    gates = {torch.float32: threading.Event(), torch.float16: threading.Event()}
    original = CheckpointFile.read_from_file

    def held_read(self, keys, dtype=None):
        gates[dtype].wait(timeout=30)
        return original(self, keys, dtype)

    monkeypatch.setattr(CheckpointFile, "read_from_file", held_read)
    before = sys.getswitchinterval()
    with checkpoint_prefetch(checkpoint, torch.float32), checkpoint_prefetch(checkpoint, torch.float16):
        first, second = checkpoint_file._PREFETCHED.values()
        gates[torch.float32].set()
        assert first.take()
        assert sys.getswitchinterval() < before / 10  # the second one still reads
        gates[torch.float16].set()
        assert second.take()
    assert sys.getswitchinterval() == before


def _in_new_thread(work):
    result = []
    thread = threading.Thread(target=lambda: result.append(work()))
    thread.start()
    thread.join()
    return result[0]


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_one_core_for_a_thread_leaves_the_others_their_thread_count(two_threads):
    assert _in_new_thread(lambda: (use_one_core_in_this_thread(), torch.get_num_threads())) == (True, 1)
    assert torch.get_num_threads() == 2
    assert _in_new_thread(torch.get_num_threads) == 2


def test_the_read_ahead_casts_on_one_core(checkpoint, monkeypatch, two_threads):
    counts: dict[str, set[int]] = {}
    original = CheckpointFile._read_one

    def recording(self, key, dtype):
        counts.setdefault(threading.current_thread().name, set()).add(torch.get_num_threads())
        return original(self, key, dtype)

    monkeypatch.setattr(CheckpointFile, "_read_one", recording)
    with checkpoint_prefetch(checkpoint, torch.float32):
        load_checkpoint(checkpoint)
    assert counts == {"loralab-checkpoint-prefetch": {1}}
    assert torch.get_num_threads() == 2
