"""The training engine's building blocks each take effect: noise, loss weights, conditioning,
precision, threads, logging, optimizer setup and resume state (tiny tensors, no weights)."""

from __future__ import annotations

import io
import json
import math
import random
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from loralab.errors import ConfigError
from loralab.models.family import ModelFamily
from loralab.train.conditioning import (
    chunk_token_ids,
    effective_clip_skip,
    encode_text,
    sdxl_time_ids,
    tokenize_captions,
)
from loralab.train.gradient_clipping import GradientClipper
from loralab.train.loss_weighting import LossWeighting, scaled_linear_alphas_cumprod
from loralab.train.noise import (
    ForwardDiffusion,
    NoiseSettings,
    NoiseStream,
    draw_noise_and_timesteps,
    sample_generator,
    sample_timesteps,
)
from loralab.train.optimizer_setup import (
    build_optimizer,
    build_param_groups,
    check_optimizer_settings,
    d_times_lr,
    group_lrs,
)
from loralab.train.precision import (
    apply_cpu_threads,
    autocast,
    cast_trainable_parameters,
    make_grad_scaler,
    resolve_precision,
)
from loralab.train.state import (
    StateError,
    TrainingProgress,
    find_state_dir,
    load_training_state,
    save_training_state,
)
from loralab.train.tb_logging import LossRecorder, MetricsLogger, read_scalars, step_scalars

BOS, EOS = 49406, 49407

# ---------------------------------------------------------------------------------------------
# noise


def _latents(batch: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Channel means far from 0, so the adaptive noise scale has something to scale.
    return torch.randn((batch, 4, 8, 8), generator=gen) + torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1)


def test_noise_depends_only_on_seed_step_and_sample_index():
    settings = NoiseSettings(
        noise_offset=0.1,
        noise_offset_random_strength=True,
        adaptive_noise_scale=0.05,
        multires_noise_iterations=3,
        multires_noise_discount=0.4,
        min_timestep=10,
        max_timestep=900,
    )
    latents = _latents()
    whole = draw_noise_and_timesteps(latents, seed=7, global_step=3, sample_indices=[0, 1, 2, 3], settings=settings)
    first = draw_noise_and_timesteps(latents[:2], seed=7, global_step=3, sample_indices=[0, 1], settings=settings)
    second = draw_noise_and_timesteps(latents[2:], seed=7, global_step=3, sample_indices=[2, 3], settings=settings)
    assert torch.equal(whole.noise, torch.cat([first.noise, second.noise]))
    assert torch.equal(whole.timesteps, torch.cat([first.timesteps, second.timesteps]))

    # Samples, steps and seeds each get their own noise.
    assert not torch.equal(whole.noise[0], whole.noise[1])
    next_step = draw_noise_and_timesteps(latents, seed=7, global_step=4, sample_indices=range(4), settings=settings)
    other_seed = draw_noise_and_timesteps(latents, seed=8, global_step=3, sample_indices=range(4), settings=settings)
    assert not torch.allclose(whole.noise, next_step.noise)
    assert not torch.allclose(whole.noise, other_seed.noise)


def test_noise_offset_adds_a_per_channel_shift_by_the_formula():
    latents = _latents()
    indices = [0, 1, 2, 3]
    base = draw_noise_and_timesteps(latents, seed=1, global_step=5, sample_indices=indices, settings=NoiseSettings())
    offset = draw_noise_and_timesteps(
        latents, seed=1, global_step=5, sample_indices=indices, settings=NoiseSettings(noise_offset=0.1)
    )
    channel_draws = torch.stack(
        [torch.randn((4, 1, 1), generator=sample_generator(1, 5, i, NoiseStream.OFFSET)) for i in indices]
    )
    shift = offset.noise - base.noise
    assert shift.abs().max() > 1e-3
    torch.testing.assert_close(shift, (0.1 * channel_draws).expand_as(shift), rtol=0, atol=1e-6)
    assert torch.equal(base.timesteps, offset.timesteps)  # only the noise changed

    # Adaptive scale: offset = clamp(0.1 + s * |channel mean of the latent|, min=0).
    adaptive = draw_noise_and_timesteps(
        latents,
        seed=1,
        global_step=5,
        sample_indices=indices,
        settings=NoiseSettings(noise_offset=0.1, adaptive_noise_scale=0.3),
    )
    strength = 0.1 + 0.3 * latents.mean(dim=(2, 3), keepdim=True).abs()
    expected = (strength * channel_draws).expand_as(shift)
    torch.testing.assert_close(adaptive.noise - base.noise, expected, rtol=0, atol=1e-5)

    negative = draw_noise_and_timesteps(
        latents,
        seed=1,
        global_step=5,
        sample_indices=indices,
        settings=NoiseSettings(noise_offset=0.1, adaptive_noise_scale=-1.0),
    )
    strength = torch.clamp(0.1 - latents.mean(dim=(2, 3), keepdim=True).abs(), min=0)
    expected = (strength * channel_draws).expand_as(shift)
    torch.testing.assert_close(negative.noise - base.noise, expected, rtol=0, atol=1e-5)

    # Random strength scales the offset by U[0, 1) drawn per sample before the channel offsets.
    random_strength = draw_noise_and_timesteps(
        latents,
        seed=1,
        global_step=5,
        sample_indices=indices,
        settings=NoiseSettings(noise_offset=0.1, noise_offset_random_strength=True),
    )
    for i in indices:
        gen = sample_generator(1, 5, i, NoiseStream.OFFSET)
        scale = float(torch.rand(1, generator=gen)) * 0.1
        expected = scale * torch.randn((4, 1, 1), generator=gen)
        torch.testing.assert_close(
            random_strength.noise[i] - base.noise[i], expected.expand(4, 8, 8), rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_diffusion_equals_the_schedulers_add_noise_and_velocity(dtype):
    from loralab.models.loading import make_noise_scheduler

    scheduler = make_noise_scheduler(False)
    diffusion = ForwardDiffusion(scheduler.alphas_cumprod)
    generator = torch.Generator().manual_seed(0)
    for timesteps in (torch.tensor([0]), torch.tensor([999, 1, 500]), torch.randint(0, 1000, (16,), generator=generator)):
        latents = torch.randn(len(timesteps), 4, 8, 8, generator=generator).to(dtype)
        noise = torch.randn(len(timesteps), 4, 8, 8, generator=generator).to(dtype)
        noisy = diffusion.add_noise(latents, noise, timesteps)
        assert noisy.dtype == dtype and torch.equal(noisy, scheduler.add_noise(latents, noise, timesteps))
        assert torch.equal(diffusion.velocity(latents, noise, timesteps), scheduler.get_velocity(latents, noise, timesteps))
    # x_t interpolates: the signal at t=0, almost pure noise at t=999.
    latents, noise = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    scales = diffusion.add_noise(latents, noise, torch.tensor([0, 999]))[:, 0, 0, 0]
    assert scales[0] > 0.999 and scales[1] < 0.1


def test_multires_noise_is_sd_scripts_pyramid_noise():
    latents = _latents(batch=2)
    iterations, discount = 3, 0.5
    base = draw_noise_and_timesteps(latents, seed=2, global_step=0, sample_indices=[0, 1], settings=NoiseSettings())
    multires = draw_noise_and_timesteps(
        latents,
        seed=2,
        global_step=0,
        sample_indices=[0, 1],
        settings=NoiseSettings(multires_noise_iterations=iterations, multires_noise_discount=discount),
    )
    for i in range(2):
        gen = sample_generator(2, 0, i, NoiseStream.MULTIRES)
        expected = base.noise[i].clone()
        for level in range(iterations):
            r = float(torch.rand(1, generator=gen)) * 2 + 2
            h, w = max(1, int(8 / r**level)), max(1, int(8 / r**level))
            layer = torch.randn((1, 4, h, w), generator=gen)
            expected += F.interpolate(layer, size=(8, 8), mode="bilinear", align_corners=False)[0] * discount**level
            if h == 1 or w == 1:
                break
        expected /= expected.std()
        torch.testing.assert_close(multires.noise[i], expected, rtol=0, atol=1e-6)
        assert abs(float(multires.noise[i].std()) - 1.0) < 1e-5
    assert not torch.allclose(multires.noise, base.noise)


def test_timesteps_are_uniform_in_min_max_range():
    settings = NoiseSettings(min_timestep=100, max_timestep=110)
    timesteps = sample_timesteps(0, 0, range(200), settings)
    assert timesteps.dtype == torch.long
    assert set(timesteps.tolist()) == set(range(100, 110))
    full = sample_timesteps(0, 0, range(200), NoiseSettings())
    assert 0 <= int(full.min()) and int(full.max()) < 1000 and len(set(full.tolist())) > 100
    assert set(sample_timesteps(0, 0, range(5), NoiseSettings(min_timestep=500, max_timestep=500)).tolist()) == {500}
    with pytest.raises(ConfigError):
        NoiseSettings(min_timestep=600, max_timestep=500).timestep_range()
    with pytest.raises(ConfigError):
        NoiseSettings(max_timestep=1001).timestep_range()


# ---------------------------------------------------------------------------------------------
# loss weighting


def _diffusers_snr() -> torch.Tensor:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False
    )
    alphas_cumprod = scheduler.alphas_cumprod  # float32, as sd-scripts computes its all_snr
    return (alphas_cumprod.sqrt() / (1 - alphas_cumprod).sqrt()) ** 2


def test_alphas_cumprod_is_the_ddpm_scaled_linear_schedule():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    torch.testing.assert_close(scaled_linear_alphas_cumprod(), scheduler.alphas_cumprod, rtol=1e-6, atol=0)


@pytest.mark.parametrize("v_prediction", [False, True])
def test_min_snr_gamma_weights_equal_the_formula(v_prediction):
    timesteps = torch.tensor([0, 50, 200, 500, 999])
    snr = _diffusers_snr()[timesteps]
    gamma = 5.0
    expected = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1 if v_prediction else snr)
    weights = LossWeighting(v_prediction=v_prediction, min_snr_gamma=gamma).weights(timesteps)
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    # Low-noise timesteps (SNR > gamma) are damped; for eps the noisiest keep weight 1.
    assert weights[0] < 0.01
    if not v_prediction:
        assert float(weights[-1]) == pytest.approx(1.0)
    assert torch.equal(LossWeighting(v_prediction=v_prediction).weights(timesteps), torch.ones(5))


def test_other_loss_weights_and_prior_loss_weight():
    timesteps = torch.tensor([0, 300, 999])
    snr = _diffusers_snr()[timesteps]
    capped = torch.clamp(snr, max=1000)
    scale = capped / (capped + 1)
    torch.testing.assert_close(
        LossWeighting(v_prediction=True, scale_v_pred_loss_like_noise_pred=True).weights(timesteps),
        scale,
        rtol=1e-6,
        atol=0,
    )
    torch.testing.assert_close(
        LossWeighting(v_pred_like_loss=0.2).weights(timesteps), 1 + 0.2 / scale, rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        LossWeighting(debiased_estimation_loss=True).weights(timesteps), 1 / capped.sqrt(), rtol=1e-6, atol=0
    )
    is_reg = torch.tensor([False, True, True])
    weights = LossWeighting(prior_loss_weight=0.25, min_snr_gamma=5).weights(timesteps, is_reg)
    plain = LossWeighting(min_snr_gamma=5).weights(timesteps)
    torch.testing.assert_close(weights, plain * torch.tensor([1.0, 0.25, 0.25]))


# ---------------------------------------------------------------------------------------------
# conditioning


def _tiny_tokenizer(pad_with_eos: bool) -> CLIPTokenizer:
    """A real CLIP tokenizer whose vocabulary is single letters (one token per letter)."""
    vocab = {"!": 0}
    for i, letter in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[letter] = 100 + i
        vocab[letter + "</w>"] = 200 + i
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = BOS, EOS
    pad_token = "<|endoftext|>" if pad_with_eos else "!"
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=77)


def _clip_config(hidden: int, projection: int = 16) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )


def test_clip_skip_changes_the_conditioning_as_sd_scripts_does():
    torch.manual_seed(0)
    encoder = CLIPTextModel(_clip_config(32)).eval()
    ids = tokenize_captions(_tiny_tokenizer(pad_with_eos=True), ["a photo of sks dog", "blh woman"])
    assert ids.shape == (2, 1, 77)
    with torch.no_grad():
        last = encode_text(ModelFamily.SD1, [encoder], [ids], eos_token_ids=[EOS], clip_skip=None)
        skip1 = encode_text(ModelFamily.SD1, [encoder], [ids], eos_token_ids=[EOS], clip_skip=1)
        skip2 = encode_text(ModelFamily.SD2, [encoder], [ids], eos_token_ids=[EOS], clip_skip=2)
        reference = encoder(ids[:, 0], output_hidden_states=True)
    assert last.encoder_hidden_states.shape == (2, 77, 32) and last.pooled is None
    torch.testing.assert_close(last.encoder_hidden_states, reference.last_hidden_state)
    torch.testing.assert_close(skip1.encoder_hidden_states, last.encoder_hidden_states)
    torch.testing.assert_close(skip2.encoder_hidden_states, encoder.final_layer_norm(reference.hidden_states[-2]))
    assert (skip2.encoder_hidden_states - last.encoder_hidden_states).abs().max() > 1e-3
    assert effective_clip_skip(ModelFamily.SD1, 2) == 2
    assert effective_clip_skip(ModelFamily.SDXL, 2) is None
    with pytest.raises(ConfigError):
        effective_clip_skip(ModelFamily.SD1, 0)
    with pytest.raises(ConfigError):
        encode_text(ModelFamily.SD1, [encoder], [ids], eos_token_ids=[EOS], clip_skip=4)  # 3 layers


def test_long_captions_are_chunked_per_75_tokens():
    caption = "x" * 100  # one token per letter: 100 tokens -> two chunks at max_token_length 150
    sd1_tokens = tokenize_captions(_tiny_tokenizer(pad_with_eos=True), [caption], max_token_length=150)
    assert sd1_tokens.shape == (1, 2, 77)
    assert sd1_tokens[0, :, 0].tolist() == [BOS, BOS] and sd1_tokens[0, :, -1].tolist() == [EOS, EOS]
    assert (sd1_tokens[0, 0, 1:76] == 123).all()  # 75 letters "x" in the first chunk
    assert (sd1_tokens[0, 1, 1:25] == 123).all() and sd1_tokens[0, 1, 25] == 223  # the last one ends the word

    # Padding with "!" (SD2/SDXL TE2): a chunk with text to its end gets EOS, an empty chunk EOS after BOS.
    sd2_tokens = tokenize_captions(_tiny_tokenizer(pad_with_eos=False), ["x" * 80, "ab"], max_token_length=225)
    assert sd2_tokens.shape == (2, 3, 77)
    assert sd2_tokens[0, 0, -1] == EOS  # text runs on past chunk 0
    assert sd2_tokens[0, 1, 6] == EOS and sd2_tokens[0, 1, -1] == 0  # 5 letters, EOS, then padding
    assert sd2_tokens[1, 2, :3].tolist() == [BOS, EOS, 0]  # empty third chunk
    with pytest.raises(ConfigError):
        tokenize_captions(_tiny_tokenizer(pad_with_eos=True), ["a"], max_token_length=100)
    with pytest.raises(ValueError):
        chunk_token_ids(torch.zeros(80, dtype=torch.long), EOS, EOS)

    torch.manual_seed(0)
    encoder = CLIPTextModel(_clip_config(32)).eval()
    with torch.no_grad():
        out = encode_text(ModelFamily.SD1, [encoder], [sd1_tokens], eos_token_ids=[EOS], clip_skip=2)
        chunk_states = encoder.final_layer_norm(encoder(sd1_tokens[0], output_hidden_states=True).hidden_states[-2])
    assert out.encoder_hidden_states.shape == (1, 152, 32)
    expected = torch.cat([chunk_states[0, :1], chunk_states[0, 1:76], chunk_states[1, 1:76], chunk_states[1, 76:]])
    torch.testing.assert_close(out.encoder_hidden_states[0], expected)


def test_sdxl_conditioning_uses_both_encoders_pooled_output_and_time_ids():
    torch.manual_seed(0)
    te1 = CLIPTextModel(_clip_config(32)).eval()
    te2 = CLIPTextModelWithProjection(_clip_config(48, projection=24)).eval()
    ids1 = tokenize_captions(_tiny_tokenizer(pad_with_eos=True), ["blh woman", "a dog"], max_token_length=150)
    ids2 = tokenize_captions(_tiny_tokenizer(pad_with_eos=False), ["blh woman", "a dog"], max_token_length=150)
    with torch.no_grad():
        out = encode_text(ModelFamily.SDXL, [te1, te2], [ids1, ids2], eos_token_ids=[EOS, EOS], clip_skip=2)
        first_chunk2 = te2(ids2[:, 0], output_hidden_states=True)
        first_chunk1 = te1(ids1[:, 0], output_hidden_states=True)
    assert out.encoder_hidden_states.shape == (2, 152, 32 + 48)
    assert out.pooled.shape == (2, 24)
    # Penultimate layers without the final layer norm, TE1 features first.
    torch.testing.assert_close(out.encoder_hidden_states[:, :76, :32], first_chunk1.hidden_states[-2][:, :76])
    torch.testing.assert_close(out.encoder_hidden_states[:, :76, 32:], first_chunk2.hidden_states[-2][:, :76])
    # Pooled: TE2's first-chunk EOS state through its projection (= transformers' text_embeds here).
    torch.testing.assert_close(out.pooled, first_chunk2.text_embeds)

    time_ids = sdxl_time_ids(
        torch.tensor([[1024, 768]] * 2), torch.tensor([[0, 32]] * 2), torch.tensor([[960, 704]] * 2)
    )
    assert time_ids.tolist()[0] == [1024, 768, 0, 32, 960, 704]
    kwargs = out.unet_kwargs(time_ids)
    assert kwargs["added_cond_kwargs"] == {"text_embeds": out.pooled, "time_ids": time_ids}
    assert kwargs["encoder_hidden_states"] is out.encoder_hidden_states
    with pytest.raises(ValueError):
        out.unet_kwargs()


# ---------------------------------------------------------------------------------------------
# precision and threads


@pytest.mark.parametrize(
    ("mixed_precision", "compute_dtype"), [("no", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_mixed_precision_sets_the_compute_dtype(mixed_precision, compute_dtype):
    plan = resolve_precision(mixed_precision)
    layer = torch.nn.Linear(4, 4)
    with autocast(plan, "cpu"):
        out = layer(torch.randn(2, 4))
    assert out.dtype == compute_dtype == plan.compute_dtype
    assert plan.base_weight_dtype == compute_dtype
    assert plan.trainable_dtype == torch.float32  # LoRA weights stay fp32 without full_fp16/bf16
    assert (make_grad_scaler(plan, "cpu") is not None) == (mixed_precision == "fp16")


def test_full_precision_casts_trainable_weights_and_save_precision_maps():
    plan = resolve_precision("bf16", full_bf16=True, save_precision="fp16")
    layer = torch.nn.Linear(4, 4)
    assert cast_trainable_parameters(layer.parameters(), plan) == 2
    assert layer.weight.dtype == torch.bfloat16 and plan.save_dtype == torch.float16
    assert resolve_precision("no", save_precision="float").save_dtype == torch.float32
    assert resolve_precision("no").save_dtype is None
    for bad in (dict(mixed_precision="bf16", full_fp16=True), dict(mixed_precision="fp8"), dict(save_precision="fp32")):
        with pytest.raises(ConfigError):
            resolve_precision(**bad)

    # full_fp16: the loss scaler must unscale fp16 gradients (plain GradScaler refuses).
    plan16 = resolve_precision("fp16", full_fp16=True)
    layer16 = torch.nn.Linear(4, 4)
    cast_trainable_parameters(layer16.parameters(), plan16)
    optimizer = torch.optim.SGD(layer16.parameters(), lr=0.1)
    scaler = make_grad_scaler(plan16, "cpu")
    before = layer16.weight.detach().clone()
    with autocast(plan16, "cpu"):
        loss = layer16(torch.randn(2, 4, dtype=torch.float16)).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(before, layer16.weight)


def test_cpu_threads_set_torch_threads_and_worker_count():
    before = torch.get_num_threads()
    try:
        threads = apply_cpu_threads(1, 8, cpu_count=2)
        assert torch.get_num_threads() == 1 == threads.torch_threads
        assert threads.previous_torch_threads == before
        assert threads.data_loader_workers == 2  # capped at the CPU count
        assert apply_cpu_threads(2, 0).data_loader_workers == 0
        assert torch.get_num_threads() == 2
        assert apply_cpu_threads(None, 1).torch_threads == 2  # None leaves torch alone
        with pytest.raises(ConfigError):
            apply_cpu_threads(0, 0)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# logging


def test_loss_recorder_averages_over_the_epoch_window_as_sd_scripts():
    recorder = LossRecorder()
    averages = []
    for epoch, losses in enumerate([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]):
        for step, loss in enumerate(losses):
            recorder.add(epoch=epoch, step=step, loss=loss)
            averages.append(recorder.moving_average)
    assert averages == pytest.approx([1.0, 1.5, 2.0, 3.0, 4.0, 5.0])
    copy = LossRecorder()
    copy.load_state_dict(json.loads(json.dumps(recorder.state_dict())))
    copy.add(epoch=2, step=0, loss=7.0)
    recorder.add(epoch=2, step=0, loss=7.0)
    assert copy.moving_average == recorder.moving_average == pytest.approx(6.0)


def test_tensorboard_tags_are_written_and_read_back(tmp_path):
    stream = io.StringIO()
    with MetricsLogger(tmp_path / "logs", jsonl=stream) as logger:
        for step in (1, 2):
            logger.log_step(
                step,
                step_scalars(
                    current_loss=0.1 * step,
                    average_loss=0.05 * step,
                    group_lrs={"textencoder": 1.0, "unet": 0.5 * step},
                    d_lr=1e-6 * step,
                    step_seconds=0.2,
                    images_per_second=15.0,
                    peak_memory_mb=123.0,
                ),
            )
        logger.log_epoch(1, 0.125)
        logger.log_step(3, {"loss/current": math.nan})
    scalars = read_scalars(tmp_path / "logs")
    assert set(scalars) == {
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
    assert [s for s, _ in scalars["lr/unet"]] == [1, 2]
    assert [v for _, v in scalars["lr/unet"]] == pytest.approx([0.5, 1.0])
    assert scalars["loss/epoch"] == [(1, pytest.approx(0.125))]
    assert [v for _, v in scalars["lr/d*lr"]] == pytest.approx([1e-6, 2e-6])
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert records[0]["step"] == 1 and records[0]["lr/unet"] == 0.5
    assert records[2] == {"epoch": 1, "loss/epoch": 0.125}
    assert records[3] == {"step": 3, "loss/current": None}
    # One event per logged step or epoch, holding all of its scalars (not one event per tag).
    events = [event for event in _events(tmp_path / "logs") if event.HasField("summary")]
    assert [(event.step, len(event.summary.value)) for event in events] == [(1, 8), (2, 8), (1, 1), (3, 1)]


def _events(log_dir):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (path,) = log_dir.glob("events.out.tfevents.*")
    return list(EventFileLoader(str(path)).Load())



def test_series_of_a_resumed_run_are_read_in_the_order_written(tmp_path):
    # A resumed run writes a second event file; its name may sort before the first one's.
    logs = tmp_path / "logs"
    for steps in ((1, 2, 3), (4, 5, 6)):
        with MetricsLogger(logs) as logger:
            for step in steps:
                logger.log_step(step, {"loss/current": 0.1 * step})
        time.sleep(0.01)
    first, second = sorted(logs.iterdir(), key=lambda path: path.stat().st_mtime_ns)  # in writing order
    first.rename(logs / "events.out.tfevents.zz")  # the earlier file now sorts last
    second.rename(logs / "events.out.tfevents.aa")
    assert [step for step, _ in read_scalars(logs)["loss/current"]] == [1, 2, 3, 4, 5, 6]

# ---------------------------------------------------------------------------------------------
# optimizer


def _lora_like_params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3))], [torch.nn.Parameter(torch.randn(2, 3))]


def test_optimizer_args_land_in_param_groups():
    unet, text_encoder = _lora_like_params()
    groups = build_param_groups(
        unet_params=unet, text_encoder_params=text_encoder, learning_rate=1.0, unet_lr=None, text_encoder_lr=0.5
    )
    args = dict(decouple=True, weight_decay=0.6, betas=(0.9, 0.99), use_bias_correction=True, growth_rate=1.02)
    optimizer = build_optimizer("dadaptadam", args, groups, learning_rate=1.0)
    assert type(optimizer).__name__ == "DAdaptAdam"
    for group in optimizer.param_groups:
        assert group["decouple"] is True and group["weight_decay"] == 0.6 and group["betas"] == (0.9, 0.99)
        assert group["use_bias_correction"] is True and group["growth_rate"] == 1.02
    assert group_lrs(optimizer) == {"textencoder": 0.5, "unet": 1.0}  # unet_lr falls back to learning_rate
    assert d_times_lr(optimizer) == pytest.approx(1e-6 * 0.5)  # d0 times the first (text encoder) group's lr

    unet_only = build_param_groups(unet_params=unet, text_encoder_params=[], learning_rate=1e-4)
    adamw = build_optimizer("AdamW", {"weight_decay": 0.01}, unet_only, learning_rate=1e-4)
    assert d_times_lr(adamw) is None and group_lrs(adamw) == {"unet": 1e-4}
    assert adamw.param_groups[0]["weight_decay"] == 0.01
    # A learning rate of 0 leaves the group out, as sd-scripts does.
    frozen_te = build_param_groups(
        unet_params=unet, text_encoder_params=text_encoder, learning_rate=1.0, text_encoder_lr=0
    )
    assert [g["group_name"] for g in frozen_te] == ["unet"]
    with pytest.raises(ConfigError):
        build_param_groups(unet_params=[], text_encoder_params=text_encoder, learning_rate=1.0, text_encoder_lr=0.0)


@pytest.mark.parametrize("optimizer_type", ["AdamW", "SGDNesterov"])
def test_torch_optimizers_use_their_fused_kernel_on_cpu_with_the_same_updates(optimizer_type):
    """The fused kernel is a speed choice only: the weights follow torch's default loop."""
    torch.manual_seed(0)
    start = [torch.randn(16, 4), torch.randn(4, 320), torch.randn(3)]
    gradients = [[torch.randn_like(t) for t in start] for _ in range(10)]
    finals = {}
    for label, args in (("chosen", {}), ("torch default", {"foreach": False})):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = build_param_groups(
            unet_params=params[1:], text_encoder_params=params[:1], learning_rate=1e-2, text_encoder_lr=5e-3
        )
        optimizer = build_optimizer(optimizer_type, {"weight_decay": 0.1, **args}, groups, learning_rate=1e-2)
        assert all(bool(group["fused"]) is (label == "chosen") for group in optimizer.param_groups)
        for step in gradients:
            for param, gradient in zip(params, step):
                param.grad = gradient.clone()
            optimizer.step()
        finals[label] = params
    for chosen, default in zip(finals["chosen"], finals["torch default"]):
        torch.testing.assert_close(chosen, default, rtol=1e-6, atol=1e-7)
    # An explicit choice in optimizer_args is kept, and other devices keep torch's default.
    params = [torch.nn.Parameter(t.clone()) for t in start]
    groups = build_param_groups(unet_params=params, text_encoder_params=[], learning_rate=1e-2)
    assert build_optimizer(optimizer_type, {"fused": False}, groups, learning_rate=1e-2).param_groups[0]["fused"] is False
    assert not build_optimizer(optimizer_type, {}, groups, learning_rate=1e-2, device="meta").param_groups[0]["fused"]


def test_optimizer_errors_are_config_errors():
    unet, _ = _lora_like_params()
    groups = build_param_groups(unet_params=unet, text_encoder_params=[], learning_rate=1e-4)
    with pytest.raises(ConfigError, match="CUDA GPU"):
        build_optimizer("AdamW8bit", {}, groups, learning_rate=1e-4, device="cpu")
    with pytest.raises(ConfigError, match="growth_rat"):
        build_optimizer("DAdaptAdam", {"growth_rat": 1.02}, groups, learning_rate=1.0)
    with pytest.raises(ConfigError, match="relative_step=False"):
        build_optimizer("Adafactor", {}, groups, learning_rate=1e-4)
    # Values the optimizer's own checks refuse (a float for betas, a negative decay).
    with pytest.raises(ConfigError, match=r"AdamW refused its settings .*betas=0.9"):
        build_optimizer("AdamW", {"betas": 0.9}, groups, learning_rate=1e-4)
    with pytest.raises(ConfigError, match="Invalid weight_decay value"):
        build_optimizer("AdamW", {"weight_decay": -1.0}, groups, learning_rate=1e-4)
    # The same checks before a run (loralab plan), leaving GPU-only and absent packages to the run.
    with pytest.raises(ConfigError, match="AdamW refused its settings"):
        check_optimizer_settings("AdamW", {"betas": 0.9}, 1e-4)
    check_optimizer_settings("AdamW8bit", {}, 1e-4)
    check_optimizer_settings("not_an_installed_package.Optimizer", {}, 1e-4)
    fixed_lr = {"relative_step": False, "scale_parameter": False, "warmup_init": False}
    adafactor = build_optimizer("Adafactor", fixed_lr, groups, learning_rate=1e-4)
    assert adafactor.param_groups[0]["lr"] == 1e-4


def _d_history(growth_rate: float, steps: int = 8) -> list[float]:
    """d of DAdaptAdam after each step on the toy quadratic |w - 3|^2."""
    weight = torch.nn.Parameter(torch.zeros(16))
    groups = build_param_groups(unet_params=[weight], text_encoder_params=[], learning_rate=1.0)
    optimizer = build_optimizer("DAdaptAdam", {"growth_rate": growth_rate}, groups, learning_rate=1.0)
    history = [optimizer.param_groups[0]["d"]]
    for _ in range(steps):
        optimizer.zero_grad()
        (weight - 3.0).pow(2).sum().backward()
        optimizer.step()
        history.append(optimizer.param_groups[0]["d"])
    return history


def test_growth_rate_caps_d_growth_per_step():
    capped = _d_history(growth_rate=1.5)
    free = _d_history(growth_rate=math.inf)
    for before, after in zip(capped, capped[1:]):
        assert after <= before * 1.5 * (1 + 1e-12)
    # The cap binds: d grows by exactly the cap on some steps and ends well below the uncapped d.
    assert any(after == pytest.approx(before * 1.5) for before, after in zip(capped, capped[1:]))
    assert free[-1] > 10 * capped[-1]


def test_blocks_read_their_options_from_train_config():
    from loralab.config.schema import TrainConfig
    from loralab.train.optimizer_setup import setup_optimizer

    config = TrainConfig(
        noise_offset=0.05,
        adaptive_noise_scale=0.01,
        multires_noise_iterations=6,
        min_timestep=10,
        min_snr_gamma=5,
        v_parameterization=True,
        prior_loss_weight=0.5,
        optimizer_type="DAdaptAdam",
        optimizer_args={"growth_rate": 1.02},
        learning_rate=1.0,
        text_encoder_lr=0.5,
        network_train_unet_only=True,
    )
    noise = NoiseSettings.from_config(config)
    assert (noise.noise_offset, noise.adaptive_noise_scale, noise.multires_noise_iterations) == (0.05, 0.01, 6)
    assert noise.timestep_range() == (10, 1000)
    weighting = LossWeighting.from_config(config)
    assert weighting == LossWeighting(v_prediction=True, min_snr_gamma=5, prior_loss_weight=0.5)
    unet, text_encoder = _lora_like_params()
    optimizer = setup_optimizer(config, unet_params=unet, text_encoder_params=text_encoder)
    assert group_lrs(optimizer) == {"unet": 1.0}  # network_train_unet_only drops the text encoder group
    assert optimizer.param_groups[0]["growth_rate"] == 1.02


# ---------------------------------------------------------------------------------------------
# resume state


def _toy_training(seed: int = 0):
    torch.manual_seed(seed)
    network = torch.nn.Linear(3, 2)
    from dadaptation import DAdaptAdam

    optimizer = DAdaptAdam(network.parameters(), lr=1.0, decouple=True, weight_decay=0.1, growth_rate=1.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return network, optimizer, scheduler


def _toy_step(network, optimizer, scheduler, data_generator):
    inputs = torch.randn((4, 3), generator=data_generator)
    # Global RNGs too: dropout and data shuffles draw from them.
    noise = torch.randn(4, 2) * 0.01 + float(np.random.rand()) * 0.01 + random.random() * 0.01
    loss = (network(inputs) - noise).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def test_state_round_trip_gives_the_same_next_steps(tmp_path):
    network, optimizer, scheduler = _toy_training()
    data_generator = torch.Generator().manual_seed(3)
    recorder = LossRecorder()
    for step in range(3):
        recorder.add(epoch=0, step=step, loss=_toy_step(network, optimizer, scheduler, data_generator))
    save_training_state(
        tmp_path / "state",
        progress=TrainingProgress(global_step=3, epoch=0, step_in_epoch=3),
        trainable=network,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        loss_recorder=recorder,
        generators={"data": data_generator},
        extra={"max_train_steps": 10},
    )
    uninterrupted = [_toy_step(network, optimizer, scheduler, data_generator) for _ in range(2)]
    expected_d = optimizer.param_groups[0]["d"]

    # A fresh process: different weights and RNG positions until the state is loaded.
    resumed_network, resumed_optimizer, resumed_scheduler = _toy_training(seed=99)
    resumed_generator = torch.Generator().manual_seed(0)
    resumed_recorder = LossRecorder()
    torch.manual_seed(1234), np.random.seed(1), random.seed(2)
    resumed = load_training_state(
        tmp_path / "state",
        trainable=resumed_network,
        optimizer=resumed_optimizer,
        lr_scheduler=resumed_scheduler,
        loss_recorder=resumed_recorder,
        generators={"data": resumed_generator},
    )
    assert resumed.progress == TrainingProgress(global_step=3, epoch=0, step_in_epoch=3)
    assert resumed.extra == {"max_train_steps": 10}
    assert resumed_recorder.moving_average == recorder.moving_average
    again = [_toy_step(resumed_network, resumed_optimizer, resumed_scheduler, resumed_generator) for _ in range(2)]
    assert again == uninterrupted
    assert resumed_optimizer.param_groups[0]["d"] == expected_d
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()
    for a, b in zip(network.parameters(), resumed_network.parameters()):
        assert torch.equal(a, b)


def test_state_write_is_atomic_and_errors_are_clear(tmp_path):
    network, optimizer, scheduler = _toy_training()
    common = dict(trainable=network, optimizer=optimizer, lr_scheduler=scheduler, loss_recorder=LossRecorder())
    save_training_state(tmp_path / "state", progress=TrainingProgress(1, 0, 1), **common)

    def failing_state_dict():
        raise RuntimeError("disk full")

    class Broken:
        state_dict = staticmethod(failing_state_dict)

    with pytest.raises(RuntimeError):
        save_training_state(
            tmp_path / "state", progress=TrainingProgress(2, 0, 2), **{**common, "lr_scheduler": Broken()}
        )
    # The old state is intact and no temporary directory is left behind.
    assert json.loads((tmp_path / "state" / "progress.json").read_text())["progress"]["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state"]

    # A crash between the two renames leaves the previous state under .state.old-*.
    (tmp_path / "state").rename(tmp_path / ".state.old-1234")
    assert find_state_dir(tmp_path / "state") == tmp_path / ".state.old-1234"
    with pytest.raises(StateError):
        load_training_state(tmp_path / "missing", **common)
    other_network = torch.nn.Linear(5, 2)
    with pytest.raises(StateError):
        load_training_state(tmp_path / "state", **{**common, "trainable": other_network})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda state: (state / "trainable.safetensors").unlink(), "trainable.safetensors is unreadable \\(missing\\)"),
        (lambda state: _truncate(state / "trainable.safetensors"), "trainable.safetensors is unreadable"),
        (lambda state: (state / "progress.json").write_text(""), "progress.json is unreadable"),
        (lambda state: (state / "progress.json").write_text('{"format_version": 1}'), "progress.json is unreadable"),
        (lambda state: _truncate(state / "rng.pt"), "rng.pt is unreadable"),
        (lambda state: _truncate(state / "optimizer.pt"), "optimizer.pt is unreadable"),
        (lambda state: (state / "lr_scheduler.pt").unlink(), "lr_scheduler.pt is unreadable \\(missing\\)"),
    ],
)
def test_a_damaged_state_is_one_clear_error(tmp_path, damage, message):
    network, optimizer, scheduler = _toy_training()
    common = dict(trainable=network, optimizer=optimizer, lr_scheduler=scheduler, loss_recorder=LossRecorder())
    state = save_training_state(tmp_path / "state", progress=TrainingProgress(1, 0, 1), **common)
    damage(state)
    with pytest.raises(StateError, match=f"is damaged: {message}.*start the run again") as error:
        load_training_state(state, **common)
    assert "\n" not in str(error.value)


def test_a_state_of_another_network_names_the_mismatch(tmp_path):
    network, optimizer, scheduler = _toy_training()
    common = dict(trainable=network, optimizer=optimizer, lr_scheduler=scheduler, loss_recorder=LossRecorder())
    state = save_training_state(tmp_path / "state", progress=TrainingProgress(1, 0, 1), **common)
    wider = torch.nn.Linear(3, 4)
    with pytest.raises(StateError, match="does not fit .*size mismatch for weight") as error:
        load_training_state(state, **{**common, "trainable": wider})
    assert "\n" not in str(error.value)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("gradient_scale", [1e-3, 10.0])  # below and above max_norm
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16,), (torch.float32, torch.float64)])
def test_gradient_clipping_equals_torch_clip_grad_norm(gradient_scale, dtypes):
    generator = torch.Generator().manual_seed(0)
    # Small gradients share one norm on a CPU, large ones (over GATHERED_MAX_ELEMENTS) keep their own.
    shapes = [(4, 8), (16,), (3, 3, 2, 2), (1, 5), (80, 64)] * 6
    ours = [torch.nn.Parameter(torch.zeros(shape, dtype=dtypes[i % len(dtypes)])) for i, shape in enumerate(shapes)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for mine, theirs in zip(ours, reference):
        gradient = torch.randn(mine.shape, generator=generator, dtype=torch.float64).to(mine.dtype) * gradient_scale
        mine.grad, theirs.grad = gradient.clone(), gradient.clone()
    ours[3].grad = reference[3].grad = None  # a parameter without a gradient is left out
    GradientClipper(ours, 1.0)()
    torch.nn.utils.clip_grad_norm_(reference, 1.0, foreach=True)
    # The same norm summed in another order: equal to rounding (bit-equal where torch's own call runs).
    for mine, theirs in zip(ours, reference):
        assert (mine.grad is None) == (theirs.grad is None)
        if mine.grad is not None:
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-6 if mine.dtype != torch.float16 else 1e-3, atol=0)
            assert len(dtypes) == 1 or torch.equal(mine.grad, theirs.grad)
    total = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in ours if p.grad is not None]))
    assert total <= 1.0 + 1e-5 if gradient_scale > 1 else total < 1.0
