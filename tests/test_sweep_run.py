"""Running sweeps on tiny models: train, evaluate, re-run without redoing anything, failures,
interruption and resume, the shared latent cache and base model, and the Ray backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import loralab.data.latent_cache as latent_cache
from loralab.models.tiny import make_tiny
from loralab.sweep.layout import read_json, read_status, run_dir
from loralab.sweep.model_pool import BaseModelPool
from loralab.sweep.runner import SweepOptions, run_sweep
from train_support import make_dataset

IMAGES = 4
BASELINE = """
train_data_dir = "{data}"
pretrained_model_name_or_path = "{checkpoint}"
resolution = 64
train_batch_size = 2
max_train_epochs = 2
save_every_n_epochs = 1
optimizer_type = "DAdaptAdam"
learning_rate = 1.0
network_dim = 4
network_alpha = 4
num_cpu_threads_per_process = 1
max_data_loader_n_workers = 0
cache_latents = true
seed = 7
"""
EVALUATION = """
[evaluation]
checkpoints = {{ a = "{eval_a}", b = {{ path = "{eval_b}", cfg = 5.0 }} }}
prompts = {{ simple = ["photo of blh woman"], complex = ["blh woman, beach at sunset, {extra}"] }}
steps = 2
seeds = [1]
width = 32
height = 32
trigger = "blh"
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORALAB_CACHE_DIR", str(root / "cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        checkpoint = make_tiny("sd15", "single-file", root / "base.safetensors", seed=0)
        data = make_dataset(root, images=IMAGES, repeats=1, size=64)
        (root / "baseline.toml").write_text(BASELINE.format(data=data, checkpoint=checkpoint))
        yield SimpleNamespace(
            root=root,
            checkpoint=checkpoint,
            eval_a=make_tiny("sd15", "single-file", root / "eval_a.safetensors", seed=1),
            eval_b=make_tiny("sd15", "single-file", root / "eval_b.safetensors", seed=2),
        )


def sweep_file(folder: Path, axes: str, evaluation: str = "") -> Path:
    path = folder / "sweep.toml"
    path.write_text(f'name = "tiny"\n[baseline]\nconfig = "{folder.parent / "baseline.toml"}"\n{axes}\n{evaluation}')
    return path


def in_folder(workspace, name: str) -> Path:
    folder = workspace.root / name
    folder.mkdir()
    return folder


@pytest.fixture
def encodes(monkeypatch):
    """Counts the images the VAE encodes into the latent cache."""
    counter = SimpleNamespace(images=0)
    original = latent_cache.encode_distribution

    def counting(vae, images):
        counter.images += images.shape[0]
        return original(vae, images)

    monkeypatch.setattr(latent_cache, "encode_distribution", counting)
    return counter


def file_times(folder: Path, pattern: str) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in folder.rglob(pattern)}


def quiet(lines: list[str]):
    return lines.append


# ---------------------------------------------------------------------------------------------
# A whole sweep, and a re-run that does nothing


def test_rank_and_optimizer_sweep_trains_evaluates_and_reruns_nothing(workspace, encodes):
    folder = in_folder(workspace, "rank_optimizer")
    axes = '[axes]\nnetwork_dim = [4, 8]\noptimizer = ["DAdaptAdam", "Prodigy"]\n'
    evaluation = EVALUATION.format(eval_a=workspace.eval_a, eval_b=workspace.eval_b, extra="soft light")
    path = sweep_file(folder, axes, evaluation)
    out = folder / "out"
    lines: list[str] = []

    summary = run_sweep(SweepOptions(path, out), printer=quiet(lines))
    runs = ["baseline", "network_dim-8", "optimizer-Prodigy"]
    assert [(o.name, o.action) for o in summary.outcomes] == [(name, "trained") for name in runs]
    assert any(line.startswith("estimated training time:") and "(measured on the first run)" in line for line in lines)
    assert encodes.images == IMAGES  # the latent cache was filled once for the whole sweep

    for name in runs:
        status = read_status(run_dir(out, name))
        assert status.state == "complete" and status.error is None and status.global_step == 4
        assert sorted(p.name for p in run_dir(out, name).glob("*.safetensors")) == [f"{name}-000001.safetensors", f"{name}.safetensors"]
    assert read_json(run_dir(out, "optimizer-Prodigy") / "manifest.json")["final_metrics"]["global_step"] == 4

    # Every save point on both checkpoints with both prompt sets; the checkpoints alone too.
    per_save_point = 2 * 2
    assert summary.rendered == len(runs) * 2 * per_save_point + 2 * 2
    for name in runs:
        for save_point in ("e000001", "final"):
            index = read_json(out / "eval" / name / save_point / "index.json")
            assert len(index) == per_save_point
            assert {(e["checkpoint"], e["prompt_set"]) for e in index} == {(c, s) for c in "ab" for s in ("simple", "complex")}
            assert all(e["lora_weight"] == 1.0 and e["trigger"] is True and e["seed"] == 1 for e in index)
            for entry in index:
                with Image.open(out / "eval" / name / save_point / entry["image"]) as image:
                    assert image.size == (32, 32)
    base = read_json(out / "eval" / "baseline_models" / "a" / "index.json")
    assert len(base) == 2 and all(e["lora_weight"] == 0.0 and e["checkpoint"] == "a" for e in base)

    rows = read_json(out / "results.json")
    assert {(row["run"], row["save_point"]) for row in rows} >= {(n, p) for n in runs for p in ("e000001", "final")}
    baseline_row = next(r for r in rows if r["run"] == "baseline" and r["save_point"] == "final")
    assert baseline_row["comparison"] == "network_dim,optimizer" and baseline_row["is_baseline"] is True
    assert baseline_row["state"] == "complete" and baseline_row["steps"] == 4 and baseline_row["final_loss"] > 0
    prodigy_row = next(r for r in rows if r["run"] == "optimizer-Prodigy" and r["save_point"] == "e000001")
    assert (prodigy_row["comparison"], prodigy_row["axis"], prodigy_row["value"], prodigy_row["steps"]) == (
        "optimizer", "optimizer", "Prodigy", 2,
    )  # fmt: skip
    assert (out / "results.csv").read_text().startswith("run,")
    assert (out / "report" / "index.html").is_file()
    assert json.loads((out / "expanded.json").read_text())[0]["name"] == "network_dim-8"
    assert (out / "sweep.toml").read_text() == path.read_text()

    # Again: nothing trained, nothing rendered, nothing encoded, no file rewritten.
    loras, images = file_times(out / "runs", "*.safetensors"), file_times(out / "eval", "*.png")
    again = run_sweep(SweepOptions(path, out), printer=quiet(lines))
    assert [o.action for o in again.outcomes] == ["skipped"] * 3
    assert again.rendered == 0 and again.existing_images == summary.rendered
    assert encodes.images == IMAGES
    assert file_times(out / "runs", "*.safetensors") == loras and file_times(out / "eval", "*.png") == images

    # A prompt added to the sweep file: only its images are rendered, nothing is trained.
    path.write_text(path.read_text().replace('simple = ["photo of blh woman"]', 'simple = ["photo of blh woman", "blh woman smiling"]'))
    more = run_sweep(SweepOptions(path, out), printer=quiet(lines))
    assert more.trained == 0 and more.rendered == len(runs) * 2 * 2 + 2
    assert len(read_json(out / "eval" / "baseline" / "final" / "index.json")) == per_save_point + 2


def test_dry_run_prints_the_plan_and_writes_nothing(workspace):
    folder = in_folder(workspace, "dry")
    path = sweep_file(folder, "[axes]\nnetwork_dim = [4, 16]\n")
    lines: list[str] = []
    summary = run_sweep(SweepOptions(path, folder / "out", dry_run=True), printer=quiet(lines))
    text = "\n".join(lines)
    assert summary.outcomes == [] and not (folder / "out").exists()
    assert "2 runs" in text and "network_dim-16" in text and "to train: 2 of 2 runs, 8 steps" in text


def test_a_sweep_folder_that_cannot_be_made_is_one_clear_error(workspace):
    from loralab.sweep.spec import SweepError

    folder = in_folder(workspace, "unmakeable")
    path = sweep_file(folder, "[axes]\nnetwork_dim = [4, 16]\n")
    (folder / "a_file").write_text("x")
    with pytest.raises(SweepError, match="cannot create the sweep folder .*choose another --out") as error:
        run_sweep(SweepOptions(path, folder / "a_file" / "out"), printer=quiet([]))
    assert "\n" not in str(error.value) and (folder / "a_file").read_text() == "x"
    # A folder of other files is not a sweep folder: its results.json would be replaced.
    (folder / "mine").mkdir()
    (folder / "mine" / "results.json").write_text('{"mine": 1}')
    for dry_run in (True, False):
        with pytest.raises(SweepError, match="is not a loralab sweep folder"):
            run_sweep(SweepOptions(path, folder / "mine", dry_run=dry_run), printer=quiet([]))
    assert [p.name for p in (folder / "mine").iterdir()] == ["results.json"]


# ---------------------------------------------------------------------------------------------
# Failures


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(workspace, tmp_path):
    folder = in_folder(workspace, "failures")
    (folder / "empty").mkdir()
    axes = (
        "[axes.broken]\n"
        f'missing_weights = {{ network_weights = "{folder / "missing.safetensors"}" }}\n'
        f'no_images = {{ train_data_dir = "{folder / "empty"}" }}\n'
    )
    path = sweep_file(folder, axes)
    summary = run_sweep(SweepOptions(path, folder / "out"), printer=quiet([]))
    actions = {o.name: o.action for o in summary.outcomes}
    assert actions == {"baseline": "trained", "broken-missing_weights": "failed", "broken-no_images": "failed"}
    missing = read_status(run_dir(folder / "out", "broken-missing_weights"))
    assert missing.state == "failed" and "missing.safetensors" in missing.error and "\n" not in missing.error
    no_images = read_status(run_dir(folder / "out", "broken-no_images"))
    assert no_images.state == "failed" and "empty" in no_images.error
    rows = {row["run"]: row for row in read_json(folder / "out" / "results.json")}
    assert rows["broken-no_images"]["state"] == "failed" and rows["broken-no_images"]["error"] == no_images.error
    assert rows["baseline"]["state"] == "complete"

    from loralab.cli.main import main

    assert main(["sweep", str(path), "--out", str(folder / "out")]) == 1  # failed runs are tried again, and fail


def test_failed_evaluations_and_unplannable_dry_runs_exit_1(workspace, monkeypatch, capsys):
    from loralab.cli.main import main
    from loralab.sample.generator import GenerationEngine, GenerationError

    folder = in_folder(workspace, "eval_failures")
    evaluation = EVALUATION.format(eval_a=workspace.eval_a, eval_b=workspace.eval_b, extra="soft light")
    path = sweep_file(folder, "", evaluation)

    def out_of_memory(self, requests, *, batch_size=1):
        raise GenerationError("out of memory while rendering; lower the evaluation batch size")
        yield

    monkeypatch.setattr(GenerationEngine, "iter_generate", out_of_memory)
    assert main(["sweep", str(path), "--out", str(folder / "out")]) == 1  # trained, but nothing rendered
    out = capsys.readouterr().out
    assert "evaluation of" in out and "out of memory" in out and "evaluations failed" in out
    assert read_status(run_dir(folder / "out", "baseline")).state == "complete"

    # A dry run that finds runs the planner cannot plan says so in its exit status too.
    (folder / "empty").mkdir()
    broken = sweep_file(folder, f'[axes.data]\nno_images = {{ train_data_dir = "{folder / "empty"}" }}\n')
    assert main(["sweep", str(broken), "--out", str(folder / "dry"), "--dry-run"]) == 1
    assert "they will fail until fixed" in capsys.readouterr().out
    assert main(["sweep", str(sweep_file(folder, "")), "--out", str(folder / "dry"), "--dry-run"]) == 0


def test_a_run_folder_trained_with_other_settings_is_refused(workspace):
    folder = in_folder(workspace, "changed")
    path = sweep_file(folder, "")
    run_sweep(SweepOptions(path, folder / "out"), printer=quiet([]))
    (folder.parent / "baseline_changed.toml").write_text((workspace.root / "baseline.toml").read_text().replace("seed = 7", "seed = 8"))
    path.write_text(path.read_text().replace("baseline.toml", "baseline_changed.toml"))
    from loralab.sweep.spec import SweepError

    with pytest.raises(SweepError, match="was trained with other settings"):
        run_sweep(SweepOptions(path, folder / "out"), printer=quiet([]))


# ---------------------------------------------------------------------------------------------
# Interrupted sweeps


def start_sweep(path: Path, out: Path, workspace) -> subprocess.Popen:
    env = {**os.environ, "LORALAB_CACHE_DIR": str(workspace.root / "cache"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "loralab", "sweep", str(path), "--out", str(out)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_training(out: Path, name: str, process: subprocess.Popen, timeout: float = 240) -> None:
    """Until ``name`` has logged steps (its first save exists), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = read_status(run_dir(out, name))
        if status is not None and status.state == "running" and list(run_dir(out, name).glob(f"{name}-*.safetensors")):
            return
        if process.poll() is not None:
            pytest.fail(f"the sweep ended before {name} trained: {process.stdout.read()}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"{name} did not start training within {timeout} s")


LONG_RUN = "[axes.length]\nlong = { max_train_epochs = 40, network_dim = 8 }\n"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "ctrl-c"])
def test_interrupted_sweep_completes_on_rerun_without_retraining_finished_runs(workspace, how):
    folder = in_folder(workspace, f"interrupted_{how}")
    path = sweep_file(folder, LONG_RUN + "[axes.z]\nlater = { network_dim = 2 }\n")
    out = folder / "out"
    process = start_sweep(path, out, workspace)
    wait_until_training(out, "length-long", process)
    if how == "kill":
        process.kill()  # no chance to save anything
    else:
        process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    baseline_files = file_times(run_dir(out, "baseline"), "*.safetensors")
    assert read_status(run_dir(out, "baseline")).state == "complete"
    assert read_status(run_dir(out, "length-long")).state == "running"
    if how == "ctrl-c":
        assert process.returncode == 130, output
        assert "run the same command again to resume" in output
        assert (run_dir(out, "length-long") / "state").is_dir()  # saved on the way out

    summary = run_sweep(SweepOptions(path, out), printer=quiet([]))
    actions = {o.name: o.action for o in summary.outcomes}
    assert actions == {
        "baseline": "skipped", "length-long": "resumed" if how == "ctrl-c" else "trained", "z-later": "trained",
    }  # fmt: skip
    assert file_times(run_dir(out, "baseline"), "*.safetensors") == baseline_files
    long_run = read_status(run_dir(out, "length-long"))
    assert long_run.state == "complete" and long_run.global_step == 80
    assert read_json(run_dir(out, "length-long") / "manifest.json")["final_metrics"]["global_step"] == 80


# ---------------------------------------------------------------------------------------------
# The base model, shared


def test_model_pool_reuses_a_model_and_notices_changed_weights(workspace):
    from loralab.config.loading import load_config

    config = load_config(workspace.root / "baseline.toml")
    pool = BaseModelPool()
    first = pool.components_for(config)
    assert pool.components_for(config.model_copy(update={"network_dim": 32})) is first
    assert pool.load_count == 1 and pool.check_restored()
    with torch.no_grad():
        next(first.unet.parameters()).add_(1e-3)
    assert not pool.check_restored()  # dropped: the next run gets a fresh copy
    assert pool.components_for(config) is not first and pool.load_count == 2


def test_runs_share_one_loaded_base_model(workspace, monkeypatch):
    import loralab.train.base_model as base_model  # every load of a run's base checkpoint goes through it

    loads = []
    original = base_model.load_checkpoint
    monkeypatch.setattr(base_model, "load_checkpoint", lambda *a, **k: loads.append(a) or original(*a, **k))
    folder = in_folder(workspace, "shared_model")
    summary = run_sweep(SweepOptions(sweep_file(folder, "[axes]\nnetwork_dim = [8, 16]\n"), folder / "out"), printer=quiet([]))
    assert [o.action for o in summary.outcomes] == ["trained"] * 3
    assert len(loads) == 1


# ---------------------------------------------------------------------------------------------
# Ray


@pytest.mark.slow
def test_ray_backend_gives_the_local_results(workspace):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'loralab[ray]')")
    folder = in_folder(workspace, "ray")
    path = sweep_file(folder, "[axes]\nnetwork_dim = [8]\n")
    run_sweep(SweepOptions(path, folder / "local"), printer=quiet([]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_sweep(SweepOptions(path, folder / "ray", backend="ray", parallel=2), printer=quiet([]))
    finally:
        ray.shutdown()
    assert sorted((o.name, o.action) for o in summary.outcomes) == [("baseline", "trained"), ("network_dim-8", "trained")]

    def comparable(out: Path) -> list[dict]:
        rows = read_json(out / "results.json")
        return [{k: v for k, v in row.items() if k not in ("wall_seconds", "peak_memory_mb")} for row in rows]

    assert comparable(folder / "ray") == comparable(folder / "local")
    assert len(comparable(folder / "ray")) >= 4
