"""Resume is exact: a run stopped by SIGINT, or hard-stopped after a state save, and resumed ends
with the uninterrupted run's LoRA weights and logged loss series (fp32 on CPU)."""

from __future__ import annotations

import os
import shutil
import signal
from types import SimpleNamespace

import pytest

from loralab.models.tiny import make_tiny
from loralab.train.loop import LoopHooks, StepReport
from loralab.train.run import train
from loralab.train.state import StateError
from train_support import lora_tensors, make_dataset, max_tensor_difference, series, tiny_config

COMPARED_TAGS = ("loss/current", "loss/average", "loss/epoch", "lr/unet", "lr/textencoder", "lr/d*lr")


class HardStop(BaseException):
    """Ends a run mid-way without any of its own shutdown, like a kill would."""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORALAB_CACHE_DIR", str(root / "cache"))
        checkpoint = make_tiny("sd15", "single-file", root / "tiny.safetensors")
        data = make_dataset(root, images=4, repeats=1)
        # Everything that carries state across steps: D-Adaptation's d, a warm-up + cosine
        # schedule, per-epoch data order and latent draws, LoRA dropout (global RNG), offset noise.
        config = tiny_config(
            checkpoint, data, max_train_epochs=3, optimizer_type="DAdaptAdam", learning_rate=1.0,
            optimizer_args={"growth_rate": 1.5}, lr_scheduler="cosine", lr_warmup_steps=2,
            network_dropout=0.1, noise_offset=0.05, min_snr_gamma=5.0, save_state=True, save_every_n_steps=2,
        )  # fmt: skip
        reference = train(config, run_dir=root / "reference", progress="quiet")
        yield SimpleNamespace(root=root, config=config, reference=reference)


def _assert_same_run(reference, resumed) -> None:
    assert resumed.status == "completed" and resumed.global_step == reference.global_step == 6
    assert max_tensor_difference(lora_tensors(reference.final_lora), lora_tensors(resumed.final_lora)) <= 1e-6
    expected, logged = series(reference.run_dir), series(resumed.run_dir)
    assert set(logged) == set(expected)
    for tag in (tag for tag in COMPARED_TAGS if tag in expected):  # no lr/d*lr without D-Adaptation
        assert [step for step, _ in logged[tag]] == [step for step, _ in expected[tag]], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in expected[tag]], rel=1e-6, abs=1e-9), tag


def test_sigint_finishes_the_step_saves_and_resumes_exactly(workspace, tmp_path, capsys):
    def interrupt(report: StepReport) -> None:
        if report.global_step == 3:  # mid-epoch: epoch 2 has two batches
            os.kill(os.getpid(), signal.SIGINT)

    run_dir = tmp_path / "run"
    # Python's own handler before the run (a test worker may have started with another one).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stopped = train(workspace.config, run_dir=run_dir, progress="quiet", hooks=LoopHooks(after_step=interrupt))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is gone
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.status == "interrupted" and stopped.global_step == 3
    assert (run_dir / "tiny-step00000003.safetensors").is_file()
    assert f"--resume {run_dir}" in capsys.readouterr().err

    resumed = train(workspace.config, run_dir=None, resume=run_dir, progress="quiet")
    _assert_same_run(workspace.reference, resumed)


def test_a_hard_stop_after_a_state_save_resumes_exactly(workspace, tmp_path):
    def crash(report: StepReport) -> None:
        if report.global_step == 5:  # the last state was saved at step 4, the end of epoch 2
            raise HardStop

    run_dir = tmp_path / "run"
    with pytest.raises(HardStop):
        train(workspace.config, run_dir=run_dir, progress="quiet", hooks=LoopHooks(after_step=crash))
    assert max(step for step, _ in series(run_dir)["loss/current"]) == 5  # logged past the state

    resumed = train(workspace.config, run_dir=None, resume=run_dir, progress="quiet")
    _assert_same_run(workspace.reference, resumed)


def test_resuming_with_other_totals_warns_and_continues(workspace, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(workspace.reference.run_dir, run_dir)
    longer = workspace.config.model_copy(update={"max_train_epochs": 4})
    with caplog.at_level("WARNING"):
        resumed = train(longer, run_dir=None, resume=run_dir, progress="quiet")
    assert "max_train_steps: 6 -> 8" in caplog.text
    assert resumed.global_step == 8


def test_resume_needs_a_saved_state(workspace, tmp_path):
    with pytest.raises(StateError, match="no saved training state"):
        train(workspace.config, run_dir=None, resume=tmp_path, progress="quiet")
    with pytest.raises(StateError, match="no such run folder"):
        train(workspace.config, run_dir=None, resume=tmp_path / "missing", progress="quiet")


def test_a_failed_resume_leaves_the_runs_config_as_it_was(workspace, tmp_path):
    """Resuming again needs the run's config.toml: a resume refused for a mismatched or damaged
    state must not overwrite it with the config that failed."""
    run_dir = tmp_path / "run"
    shutil.copytree(workspace.reference.run_dir, run_dir)
    saved = (run_dir / "config.toml").read_bytes()
    other_rank = workspace.config.model_copy(update={"network_dim": 8, "max_train_epochs": 4})
    with pytest.raises(StateError, match="does not fit .*size mismatch"):
        train(other_rank, run_dir=None, resume=run_dir, progress="quiet")
    (run_dir / "state" / "rng.pt").write_bytes(b"")
    with pytest.raises(StateError, match="rng.pt is unreadable"):
        train(workspace.config, run_dir=None, resume=run_dir, progress="quiet")
    assert (run_dir / "config.toml").read_bytes() == saved


def test_a_schedule_free_run_resumes_exactly(workspace, tmp_path):
    # Schedule-free optimizers swap the LoRA between two weight sequences (train/eval): saves and
    # states are taken in eval mode, and the resumed run must switch back exactly.
    config = workspace.config.model_copy(
        update={"optimizer_type": "AdamWScheduleFree", "learning_rate": 1e-3, "optimizer_args": {}}
    )
    reference = train(config, run_dir=tmp_path / "reference", progress="quiet")

    def interrupt(report: StepReport) -> None:
        if report.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    run_dir = tmp_path / "run"
    stopped = train(config, run_dir=run_dir, progress="quiet", hooks=LoopHooks(after_step=interrupt))
    assert stopped.status == "interrupted"
    resumed = train(config, run_dir=None, resume=run_dir, progress="quiet")
    _assert_same_run(reference, resumed)
