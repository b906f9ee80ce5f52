"""``loralab.imports.heavy_imports``: the cyclic garbage collector is paused while the libraries
import and what they created is frozen afterwards; ``loralab train`` imports that way."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loralab.imports import heavy_imports


@pytest.fixture
def collector_state():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()  # into the oldest generation: the collector may free cycles among them again
    (gc.enable if enabled else gc.disable)()


def _write_module(folder: Path, name: str) -> None:
    (folder / f"{name}.py").write_text("TABLE = [{'row': index} for index in range(20000)]\n")


def test_the_collector_pauses_during_the_imports_and_their_objects_are_frozen(tmp_path, monkeypatch, collector_state):
    _write_module(tmp_path, "loralab_test_heavy_module")
    monkeypatch.syspath_prepend(str(tmp_path))
    gc.enable()
    frozen_before = gc.get_freeze_count()
    with heavy_imports():
        assert not gc.isenabled()
        import loralab_test_heavy_module  # noqa: F401
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen_before + 20000
    monkeypatch.delitem(sys.modules, "loralab_test_heavy_module")


def test_nothing_is_frozen_when_nothing_new_was_imported(collector_state):
    gc.enable()
    frozen_before = gc.get_freeze_count()
    with heavy_imports():
        import json  # noqa: F401  (already imported)
    assert gc.isenabled() and gc.get_freeze_count() == frozen_before


def test_a_paused_collector_stays_paused_and_an_error_restores_the_state(collector_state):
    gc.disable()
    with heavy_imports():
        pass
    assert not gc.isenabled()
    gc.enable()
    with pytest.raises(ImportError), heavy_imports():
        import loralab_no_such_module  # noqa: F401
    assert gc.isenabled()


def test_loralab_train_imports_with_the_collector_paused(tmp_path):
    """A fresh ``loralab train`` process: the libraries it imported are frozen, and no collection
    ran while diffusers was being imported."""
    from loralab.models.tiny import make_tiny

    checkpoint = make_tiny("sd15", "single-file", tmp_path / "tiny.safetensors")
    images = tmp_path / "img" / "1_sks dog"
    images.mkdir(parents=True)
    from PIL import Image

    for index in range(2):
        Image.new("RGB", (64, 64), (40 * index, 90, 200)).save(images / f"{index}.png")
        (images / f"{index}.txt").write_text("sks dog")
    config = tmp_path / "run.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "{checkpoint}"\ntrain_data_dir = "{tmp_path / "img"}"\n'
        'resolution = 64\nmax_train_steps = 1\noptimizer_type = "AdamW"\nnetwork_dim = 2\n'
    )
    probe = (
        "import gc, sys\n"
        "collections = []\n"
        "gc.callbacks.append(lambda phase, info: phase == 'start' and collections.append('diffusers' in sys.modules and 'loralab.train.run' not in sys.modules))\n"
        "from loralab.cli.main import main\n"
        f"code = main(['train', {str(config)!r}, '--quiet', '--run-dir', {str(tmp_path / 'run')!r}])\n"
        "print(code, gc.get_freeze_count(), any(collections))\n"
    )  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORALAB_CACHE_DIR": str(tmp_path / "cache")}
    spawned_at = time.time()
    printed = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    code, frozen, collected_while_importing = printed.stdout.split()
    assert code == "0"
    assert int(frozen) > 100_000
    assert collected_while_importing == "False"

    # The manifest times the launch from the process's start, imports included, as a user sees it.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    first_step_seen = events.Scalars("loss/current")[0].wall_time - spawned_at
    timings = json.loads((tmp_path / "run" / "manifest.json").read_text())["timings"]
    assert first_step_seen - 0.3 < timings["launch_to_first_step_seconds"] <= first_step_seen + 0.05
    assert timings["launch_to_first_step_seconds"] > timings["setup_seconds"] + 1.0  # the imports
