"""End-to-end training on tiny models: the seed config through the CLI, learning, faults, samples,
and data-parallel training on two CPU processes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from train_support import CAPTION, lora_tensors, make_dataset, max_tensor_difference, series, tiny_config

from loralab.cli.main import main
from loralab.config.loading import load_config, save_config
from loralab.errors import ConfigError
from loralab.models.loading import load_checkpoint
from loralab.models.tiny import make_tiny
from loralab.network.lora import LoRANetwork
from loralab.network.lora_file import read_lora_file
from loralab.plan.planner import make_plan
from loralab.train.conditioning import encode_text, tokenize_captions
from loralab.train.faults import NonFiniteLossError
from loralab.train.launch import launch_training
from loralab.train.loop import LoopHooks
from loralab.train.run import train
from loralab.train.sample_prompts import SamplePrompt, parse_prompt_line, read_sample_prompts
from loralab.train.save_names import SavedLoraName, epoch_lora_name, final_lora_name, parse_lora_name, step_lora_name
from loralab.train.saving import Cadence, KeepLast
from loralab.train.state import TrainingProgress, save_training_state
from loralab.train.tb_logging import LossRecorder

SEED_CONFIG = Path(__file__).parent / "data" / "seed" / "config_SD1.5.json"
KOHYA_TAGS = {
    "loss/current",
    "loss/average",
    "loss/epoch",
    "lr/unet",
    "lr/textencoder",
    "lr/d*lr",
    "perf/step_seconds",
    "perf/images_per_second",
    "perf/peak_memory_mb",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORALAB_CACHE_DIR", str(root / "cache"))
        checkpoint = make_tiny("sd15", "single-file", root / "tiny.safetensors")
        yield SimpleNamespace(
            root=root,
            checkpoint=checkpoint,
            data=make_dataset(root / "two_repeats", images=4, repeats=2),
            single=make_dataset(root / "one_repeat", images=4, repeats=1),
        )


# ---------------------------------------------------------------------------------------------
# The seed config, unchanged but for paths and size, through the CLI


def test_seed_config_trains_through_the_cli_with_kohya_logs(workspace, tmp_path):
    overrides = [
        f"pretrained_model_name_or_path={workspace.checkpoint}",
        f"train_data_dir={workspace.data}",
        "resolution=64",
        "min_bucket_reso=64",
        "max_bucket_reso=128",
        "max_train_epochs=3",
        "network_dim=8",
        "output_name=seed",
        "num_cpu_threads_per_process=1",
    ]
    run_dir = tmp_path / "run"
    argv = ["train", str(SEED_CONFIG), "--run-dir", str(run_dir), "--quiet"]
    for override in overrides:
        argv += ["--set", override]
    assert main(argv) == 0

    logged = series(run_dir)
    assert set(logged) == KOHYA_TAGS
    # lr/unet after every step is the planner's schedule (cosine here, from the GUI config).
    plan = make_plan(load_config(SEED_CONFIG, overrides))
    unet_lr = [value for _, value in logged["lr/unet"]]
    assert [step for step, _ in logged["lr/unet"]] == list(range(1, plan.max_train_steps + 1))
    assert unet_lr == pytest.approx(list(plan.lr_schedule), rel=1e-6, abs=1e-9)
    # D-Adaptation's d (logged as d * lr) grows from its start under growth_rate=1.02.
    d_values = [d_lr / lr for (_, d_lr), (_, lr) in zip(logged["lr/d*lr"], logged["lr/unet"]) if lr > 0]
    assert d_values[-1] > d_values[0] * 1.02
    assert max(d_values[i + 1] / d_values[i] for i in range(len(d_values) - 1)) <= 1.02 + 1e-6
    assert [step for step, _ in logged["loss/epoch"]] == list(range(1, plan.epochs + 1))

    final = run_dir / "seed.safetensors"
    with safe_open(str(final), "pt") as lora:
        metadata = lora.metadata()
        dtypes = {lora.get_tensor(key).dtype for key in lora.keys()}
    assert dtypes == {torch.bfloat16}  # save_precision from the GUI config
    assert metadata["ss_network_dim"] == "8"
    assert metadata["ss_steps"] == str(plan.max_train_steps)
    assert metadata["ss_optimizer"].startswith("dadaptation") and "growth_rate=1.02" in metadata["ss_optimizer"]
    assert metadata["ss_clip_skip"] == "2" and metadata["ss_min_snr_gamma"] == "5.0"

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["plan"]["max_train_steps"] == plan.max_train_steps
    assert len(manifest["dataset"]["files"]) == 4
    assert manifest["base_model"]["legacy_hash"] == metadata["ss_sd_model_hash"]
    assert manifest["lora_files"] == ["seed.safetensors"]
    resolved = load_config(run_dir / "config.toml")
    assert resolved.optimizer_type == "DAdaptAdam" and resolved.output_dir == run_dir


# ---------------------------------------------------------------------------------------------
# Learning


@torch.no_grad()
def _denoising_loss(checkpoint: Path, data: Path, lora: Path | None) -> float:
    """MSE of the noise prediction on the training images at fixed seeded noise and timesteps."""
    components = load_checkpoint(checkpoint)
    if lora is not None:
        LoRANetwork.from_lora_file(read_lora_file(lora), components).apply_to(components)
    paths = sorted(data.rglob("*.png"))
    pixels = torch.stack(
        [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1 for p in paths]
    )
    latents = components.vae.encode(pixels).latent_dist.mean * components.vae.config.scaling_factor
    ids = tokenize_captions(components.tokenizers[0], [CAPTION] * len(paths))
    context = encode_text(components.family, components.text_encoders, [ids], eos_token_ids=[49407]).encoder_hidden_states
    generator = torch.Generator().manual_seed(123)
    losses = []
    for timestep in (50, 250, 450, 650, 850):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((len(paths),), timestep)
        noisy = components.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = components.unet(noisy, timesteps, encoder_hidden_states=context).sample
        losses.append(torch.nn.functional.mse_loss(prediction, noise).item())
    return sum(losses) / len(losses)


def test_a_short_run_lowers_the_denoising_loss_by_a_fifth(workspace, tmp_path):
    config = tiny_config(
        workspace.checkpoint, workspace.single, train_batch_size=4, max_train_epochs=None, max_train_steps=16,
        learning_rate=1e-2, network_dim=8, network_alpha=8,
    )  # fmt: skip
    result = train(config, run_dir=tmp_path / "run", progress="quiet")
    base = _denoising_loss(workspace.checkpoint, workspace.single, None)
    trained = _denoising_loss(workspace.checkpoint, workspace.single, result.final_lora)
    assert trained < 0.8 * base, (base, trained)


# ---------------------------------------------------------------------------------------------
# Faults


def _nan_at(step: int) -> LoopHooks:
    def transform(global_step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if global_step == step else loss

    return LoopHooks(loss_transform=transform)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_lora(workspace, tmp_path):
    config = tiny_config(workspace.checkpoint, workspace.data, save_every_n_steps=2)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as raised:
        train(config, run_dir=run_dir, progress="quiet", hooks=_nan_at(3))
    good = run_dir / step_lora_name("tiny", 2)
    message = str(raised.value)
    assert "step 3" in message and str(good) in message and "\n" not in message
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == [good.name]
    with safe_open(str(good), "pt") as lora:
        assert lora.metadata()["ss_steps"] == "2"
        assert all(torch.isfinite(lora.get_tensor(key)).all() for key in lora.keys())
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"


def test_skip_policy_drops_only_the_non_finite_step(workspace, tmp_path):
    config = tiny_config(workspace.checkpoint, workspace.single)
    result = train(config, run_dir=tmp_path / "run", progress="quiet", hooks=_nan_at(2), on_non_finite="skip")
    assert result.status == "completed" and result.global_step == 4
    assert all(torch.isfinite(t).all() for t in lora_tensors(result.final_lora).values())
    logged = series(result.run_dir)
    assert [step for step, _ in logged["loss/current"]] == [1, 3, 4]
    assert [step for step, _ in logged["lr/unet"]] == [1, 2, 3, 4]


def _gradient_norms_stepped(config, run_dir: Path) -> list[float]:
    """The global L2 norm of the LoRA gradients each optimizer step of a run steps with."""
    norms: list[float] = []

    def on_start(session) -> None:
        params = session.text_encoder_params + session.unet_params

        def record(*_: object) -> None:
            grads = [p.grad.double() for p in params if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

        session.optimizer.register_step_pre_hook(record)

    train(config, run_dir=run_dir, progress="quiet", hooks=LoopHooks(on_start=on_start))
    return norms


def test_max_grad_norm_clips_the_gradients_the_optimizer_steps_with(workspace, tmp_path):
    free = _gradient_norms_stepped(tiny_config(workspace.checkpoint, workspace.single, max_grad_norm=0.0), tmp_path / "free")
    limit = min(free) / 4
    clipped_config = tiny_config(workspace.checkpoint, workspace.single, max_grad_norm=limit)
    clipped = _gradient_norms_stepped(clipped_config, tmp_path / "clipped")
    assert len(free) == len(clipped) == 4
    assert clipped == pytest.approx([limit] * 4, rel=1e-4)


def test_a_run_directory_holding_a_run_is_refused(workspace, tmp_path):
    config = tiny_config(workspace.checkpoint, workspace.single)
    (tmp_path / "manifest.json").write_text("{}")
    # Without a saved state there is nothing to resume: the message must not send the user there.
    with pytest.raises(ConfigError, match="already holds a training run that saved no state") as error:
        train(config, run_dir=tmp_path, progress="quiet")
    assert "--resume" not in str(error.value)
    module = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_training_state(
        tmp_path / "state", progress=TrainingProgress(1, 1, 1), trainable=module, optimizer=optimizer,
        lr_scheduler=scheduler, loss_recorder=LossRecorder(),
    )  # fmt: skip
    with pytest.raises(ConfigError, match=f"resume it with --resume {tmp_path}"):
        train(config, run_dir=tmp_path, progress="quiet")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_gpu_only_optimizer_on_the_cpu_is_one_error_line(workspace, tmp_path, capsys, caplog):
    config_file = tmp_path / "run.toml"
    save_config(tiny_config(workspace.checkpoint, workspace.single, optimizer_args={}), config_file)
    argv = ["train", str(config_file), "--set", "optimizer_type=AdamW8bit", "--quiet", "--run-dir", str(tmp_path / "run")]
    with caplog.at_level("WARNING"):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "needs a CUDA GPU" in err
    # No warning beside it (without bitsandbytes installed, nothing in optimizer_args went unchecked).
    assert [record.getMessage() for record in caplog.records if record.levelname == "WARNING"] == []


def test_a_run_directory_that_cannot_be_made_is_one_clear_error(workspace, tmp_path):
    (tmp_path / "a_file").write_text("x")
    config = tiny_config(workspace.checkpoint, workspace.single)
    for run_dir in (tmp_path / "a_file", tmp_path / "a_file" / "run"):
        with pytest.raises(ConfigError, match="cannot create the run folder .*choose another --run-dir"):
            train(config, run_dir=run_dir, progress="quiet")
    assert (tmp_path / "a_file").read_text() == "x"


# ---------------------------------------------------------------------------------------------
# Saves and samples


def test_save_and_sample_cadence_follow_sd_scripts():
    every_two = Cadence(every_n_epochs=2, every_n_steps=3)
    assert [s for s in range(1, 10) if every_two.after_step(s)] == [3, 6, 9]
    assert [e for e in range(1, 7) if every_two.after_epoch(e, 6, including_last=False)] == [2, 4]
    assert [e for e in range(1, 7) if every_two.after_epoch(e, 6, including_last=True)] == [2, 4, 6]
    assert not Cadence(0, None).after_step(5)
    assert (epoch_lora_name("me", 10), step_lora_name("me", 300), final_lora_name("me")) == (
        "me-000010.safetensors",
        "me-step00000300.safetensors",
        "me.safetensors",
    )


def test_keep_last_n_windows_are_sd_scripts_examples(tmp_path):
    for step in (10, 20, 30, 40, 50):
        (tmp_path / step_lora_name("me", step)).write_bytes(b"")
    for epoch in (2, 4, 6, 8, 10):
        (tmp_path / epoch_lora_name("me", epoch)).write_bytes(b"")
    (tmp_path / final_lora_name("me")).write_bytes(b"")
    (tmp_path / step_lora_name("other", 10)).write_bytes(b"")
    # Every 10 steps, last 30 steps: at step 50 the files of steps 20-50 remain.
    assert [p.name for p in KeepLast(steps=30).stale(tmp_path, "me", global_step=50)] == [step_lora_name("me", 10)]
    # Every 2 epochs, last 3 saves: at epoch 10 the files of epochs 6, 8, 10 remain.
    stale = KeepLast(epochs=3, every_n_epochs=2).stale(tmp_path, "me", epoch=10)
    assert [p.name for p in stale] == [epoch_lora_name("me", 2), epoch_lora_name("me", 4)]
    assert KeepLast().stale(tmp_path, "me", epoch=10, global_step=50) == []  # unset: keep all
    assert KeepLast(steps=30).stale(tmp_path, "me", epoch=10) == []  # an epoch save prunes only epoch files


def test_keep_last_n_saves_prune_older_loras_as_sd_scripts(workspace, tmp_path):
    """4 epochs of 2 steps, a save every epoch and every 2 steps: sd-scripts' windows keep the 2
    newest epoch files and the step files of the last 3 steps; the final LoRA and the newest
    state (what --resume reads) stay."""
    saves = {"max_train_epochs": 4, "save_every_n_epochs": 1, "save_every_n_steps": 2, "save_state": True}
    kept_all = train(tiny_config(workspace.checkpoint, workspace.single, **saves), run_dir=tmp_path / "all",
                     progress="quiet")  # fmt: skip
    pruned = train(
        tiny_config(workspace.checkpoint, workspace.single, save_last_n_epochs=2, save_last_n_steps=3, **saves),
        run_dir=tmp_path / "pruned", progress="quiet",
    )  # fmt: skip
    every = [epoch_lora_name("tiny", e) for e in (1, 2, 3)] + [step_lora_name("tiny", s) for s in (2, 4, 6, 8)]
    assert sorted(p.name for p in kept_all.run_dir.glob("*.safetensors")) == sorted([*every, "tiny.safetensors"])
    remaining = sorted(
        [epoch_lora_name("tiny", 2), epoch_lora_name("tiny", 3), step_lora_name("tiny", 6), step_lora_name("tiny", 8),
         final_lora_name("tiny")]
    )  # fmt: skip
    assert sorted(p.name for p in pruned.run_dir.glob("*.safetensors")) == remaining
    assert sorted(p.name for p in pruned.lora_files) == remaining
    assert sorted(json.loads((pruned.run_dir / "manifest.json").read_text())["lora_files"]) == remaining
    assert json.loads((pruned.run_dir / "state" / "progress.json").read_text())["progress"]["global_step"] == 8
    # Pruning removes files only: the LoRAs it keeps are the ones the unpruned run wrote.
    for name in remaining:
        assert max_tensor_difference(lora_tensors(kept_all.run_dir / name), lora_tensors(pruned.run_dir / name)) == 0


def test_lora_file_names_are_read_back_as_written():
    assert parse_lora_name("blh", epoch_lora_name("blh", 3)) == SavedLoraName(epoch=3)
    assert parse_lora_name("blh", step_lora_name("blh", 120)) == SavedLoraName(step=120)
    assert parse_lora_name("blh", final_lora_name("blh")).is_final
    assert parse_lora_name("blh", "blh-step123456789.safetensors") == SavedLoraName(step=123456789)
    # Another run's files, sd-scripts' state folders and other widths are not this run's saves.
    for other in ("blh-v2.safetensors", "blh-0003.safetensors", "blh-000003-state", "xblh.safetensors", "blh.ckpt"):
        assert parse_lora_name("blh", other) is None, other


def test_kohya_prompt_lines_are_parsed():
    parsed = parse_prompt_line("a photo, beach --n low quality, bad --w 770 --h 512 --l 3.5 --s 50 --d 1 --ss euler")
    assert parsed == SamplePrompt("a photo, beach", "low quality, bad", 768, 512, 3.5, 50, 1, "euler")
    assert parse_prompt_line("just a prompt") == SamplePrompt("just a prompt")
    assert read_sample_prompts(["# comment", "", "x --s 2000"]) == [SamplePrompt("x", steps=1000)]
    with pytest.raises(ConfigError, match="sampler"):
        parse_prompt_line("x --ss unknown_sampler")


def test_samples_are_rendered_during_training(workspace, tmp_path):
    config = tiny_config(
        workspace.checkpoint, workspace.single, max_train_epochs=1, sample_every_n_epochs=1, sample_at_first=True,
        sample_prompts=["blh woman on a beach --w 64 --h 48 --s 2 --d 3", "blh woman --n ugly --s 2 --l 4"],
    )  # fmt: skip
    result = train(config, run_dir=tmp_path / "run", progress="quiet")
    samples = sorted(p.name for p in (result.run_dir / "samples").iterdir())
    assert samples == ["tiny_000000_00.png", "tiny_000000_01.png", "tiny_e000001_00.png", "tiny_e000001_01.png"]
    assert Image.open(result.run_dir / "samples" / "tiny_e000001_00.png").size == (64, 48)
    assert Image.open(result.run_dir / "samples" / "tiny_e000001_01.png").size == (64, 64)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result.run_dir / "logs"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["sample/00", "sample/01"]
    assert [event.step for event in events.Images("sample/00")] == [0, 2]


# ---------------------------------------------------------------------------------------------
# Data parallel


@pytest.mark.slow
def test_two_processes_with_half_the_batch_give_the_same_lora(workspace, tmp_path):
    settings = {
        "max_train_epochs": 2,
        "gradient_accumulation_steps": 2,
        "noise_offset": 0.05,
        "min_snr_gamma": 5.0,
        "learning_rate": 1e-3,
    }
    single = train(tiny_config(workspace.checkpoint, workspace.data, train_batch_size=4, **settings),
                   run_dir=tmp_path / "one", progress="quiet")  # fmt: skip
    split = launch_training(2, tiny_config(workspace.checkpoint, workspace.data, train_batch_size=2, **settings),
                            run_dir=tmp_path / "two", progress="quiet")  # fmt: skip
    assert split.global_step == single.global_step == 2
    assert max_tensor_difference(lora_tensors(single.final_lora), lora_tensors(split.final_lora)) < 1e-5
    one, two = series(single.run_dir), series(split.run_dir)
    for tag in ("loss/current", "loss/epoch"):
        assert [v for _, v in one[tag]] == pytest.approx([v for _, v in two[tag]], rel=1e-5)
    assert not math.isclose(one["loss/current"][0][1], one["loss/current"][1][1])


# ---------------------------------------------------------------------------------------------
# Families


def test_sdxl_trains_the_unet_on_cached_text_encodings(workspace, tmp_path):
    checkpoint = make_tiny("sdxl", "single-file", tmp_path / "sdxl.safetensors")
    config = tiny_config(
        checkpoint, workspace.single, sdxl=True, max_train_epochs=1, network_train_unet_only=True,
        cache_text_encoder_outputs=True,
    )  # fmt: skip
    result = train(config, run_dir=tmp_path / "run", progress="quiet")
    lora = read_lora_file(result.final_lora)
    assert lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    names = {name for name in lora.modules()}
    assert names and all(name.startswith("lora_unet_") for name in names)
    assert any(name.startswith("lora_unet_input_blocks_") for name in names)  # SGM naming
    assert set(series(result.run_dir)) == KOHYA_TAGS - {"lr/textencoder", "lr/d*lr"}


def test_v_prediction_models_train_on_the_velocity(workspace, tmp_path):
    """The first logged loss equals the v-prediction loss computed by hand from the same
    batch, noise and timesteps (a new LoRA changes nothing until it has trained)."""
    from loralab.data.dataset import TrainingDataset
    from loralab.data.latent_cache import LatentCache
    from loralab.train.noise import NoiseSettings, draw_noise_and_timesteps

    checkpoint = make_tiny("sd2v", "single-file", tmp_path / "sd2v.safetensors")
    config = tiny_config(checkpoint, workspace.single, v2=True, v_parameterization=True, max_train_epochs=1)
    result = train(config, run_dir=tmp_path / "run", progress="quiet")
    metadata = read_lora_file(result.final_lora).metadata
    assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["modelspec.prediction_type"] == "v"

    components = load_checkpoint(checkpoint)
    dataset = TrainingDataset.from_config(config).with_latent_cache(LatentCache.for_vae(components.vae, source=checkpoint))
    batch = dataset.batch(1, 0)
    drawn = draw_noise_and_timesteps(batch.latents, seed=config.seed, global_step=0, sample_indices=[0, 1],
                                     settings=NoiseSettings.from_config(config))  # fmt: skip
    scheduler = components.noise_scheduler
    noisy = scheduler.add_noise(batch.latents, drawn.noise, drawn.timesteps)
    ids = tokenize_captions(components.tokenizers[0], batch.captions)
    with torch.no_grad():
        context = encode_text(components.family, components.text_encoders, [ids], eos_token_ids=[49407])
        prediction = components.unet(noisy, drawn.timesteps, encoder_hidden_states=context.encoder_hidden_states).sample
    velocity = scheduler.get_velocity(batch.latents, drawn.noise, drawn.timesteps)
    first_loss = series(result.run_dir)["loss/current"][0][1]
    assert first_loss == pytest.approx(torch.nn.functional.mse_loss(prediction, velocity).item(), rel=1e-5)
    assert first_loss != pytest.approx(torch.nn.functional.mse_loss(prediction, drawn.noise).item(), rel=1e-3)
