"""The training loop, top to bottom: one optimizer step after another until the plan's steps run out.

Each optimizer step trains on ``gradient_accumulation_steps`` batches. For each batch:

1. latents: drawn from the cached VAE posteriors, or encoded now (the same draw either way);
2. noise and timesteps from ``(seed, step, sample index)`` (:mod:`loralab.train.noise`), so a
   sample gets the same noise however the batch is split over processes;
3. forward diffusion ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise`` with the DDPM scaled-linear
   schedule the model was trained with;
4. text conditioning: the text encoders with their LoRA when they train, the cached encodings
   when they are frozen; SDXL adds the pooled embedding and the size/crop ``time_ids``;
5. the UNet's prediction (epsilon or v) and its target (the noise or the velocity);
6. per-sample MSE times the loss weights (prior loss for regularisation images, min-SNR,
   debiased estimation, v-prediction scaling: :mod:`loralab.train.loss_weighting`);
7. backward of this process's share of the step's mean loss.

Then the step: gradients summed over processes, loss unscaled (fp16), clipped to
``max_grad_norm``, the optimizer and the LR scheduler step, the max-norm regularisation
(``scale_weight_norms``), and the logging under kohya's TensorBoard tags. Saves, samples and
the stop check follow at step and epoch boundaries. A non-finite loss is caught before its
backward pass (it stops the run, or with ``on_non_finite="skip"`` drops the step).

Everything the loop uses is built by :mod:`loralab.train.run` and handed over in a
:class:`TrainingSession`; the loop itself creates nothing but tensors.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loralab.data.dataset import TrainingDataset
from loralab.data.latent_cache import latents_from_images
from loralab.data.text_cache import TextEncoderCache
from loralab.models.family import ModelFamily
from loralab.models.loading import StableDiffusionComponents
from loralab.network.lora import LoRANetwork
from loralab.plan.planner import Plan
from loralab.train.conditioning import TextConditioning, effective_clip_skip, encode_text, tokenize_captions
from loralab.train.faults import NonFiniteLossError, StopSignals, non_finite_message
from loralab.train.gradient_clipping import GradientClipper
from loralab.train.loss_weighting import LossWeighting
from loralab.train.noise import ForwardDiffusion, NoiseSettings, draw_noise_and_timesteps
from loralab.train.optimizer_setup import d_times_lr, group_lrs
from loralab.train.precision import PrecisionPlan, autocast
from loralab.train.sample_prompts import SamplePrompt
from loralab.train.sampling import render_samples, sample_file_name, save_png_atomically
from loralab.train.save_names import epoch_lora_name, final_lora_name, step_lora_name
from loralab.train.saving import Cadence, KeepLast, save_lora
from loralab.train.state import TrainingProgress, save_training_state
from loralab.train.tb_logging import LossRecorder, MetricsLogger, peak_memory_mb, step_scalars

logger = logging.getLogger(__name__)

_TOKEN_MEMO_SIZE = 4096  # distinct captions whose token ids a run remembers


@dataclass(frozen=True)
class StepReport:
    """What the ``after_step`` hook learns about a finished optimizer step."""

    global_step: int
    epoch: int  # 0-based epoch in progress
    loss: float | None  # None when the step was skipped


@dataclass(frozen=True)
class BatchReport:
    """What the ``on_batch`` hook learns about one batch once its loss weights are known.

    Tensors are this process's rows of the batch, detached; ``per_sample_loss`` is the MSE of
    each sample before ``weights`` (prior loss, min-SNR, ...) multiply it.
    """

    global_step: int  # the step being trained, 1-based
    epoch: int  # 0-based epoch in progress
    captions: list[str]
    is_reg: torch.Tensor
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    per_sample_loss: torch.Tensor
    weights: torch.Tensor


@dataclass
class LoopHooks:
    """Callbacks for tests and embedding applications; a normal run has none.

    ``on_start(session)`` runs once before the first step with everything the run built (to
    inspect the optimizer, or attach module hooks to the models); ``on_batch`` runs for each
    batch after its loss weights; ``after_step`` runs on every process after each optimizer
    step (and its saves); ``loss_transform(global_step, loss)`` may replace a batch's summed
    loss before backward (``global_step`` is the step being trained, 1-based).
    """

    after_step: Callable[[StepReport], None] | None = None
    loss_transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    on_start: Callable[[TrainingSession], None] | None = None
    on_batch: Callable[[BatchReport], None] | None = None


@dataclass
class TrainingSession:
    """Everything a run's setup built, handed to :func:`train_loop`."""

    config: Any  # TrainConfig
    plan: Plan
    components: StableDiffusionComponents
    network: LoRANetwork
    dataset: TrainingDataset
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    grad_scaler: torch.amp.GradScaler | None
    precision: PrecisionPlan
    noise: NoiseSettings
    weighting: LossWeighting
    text_cache: TextEncoderCache | None  # set when the text encoders are frozen and captions fixed
    text_encoder_params: list[torch.nn.Parameter]
    unet_params: list[torch.nn.Parameter]
    accelerator: Any  # accelerate.Accelerator
    run_dir: Path
    metadata: dict[str, str]
    state_extra: dict[str, Any]
    metrics: MetricsLogger | None  # main process only
    progress_bar: Any | None  # tqdm, main process only
    sample_prompts: list[SamplePrompt]
    stop: StopSignals
    start: TrainingProgress
    loss_recorder: LossRecorder
    hooks: LoopHooks = field(default_factory=LoopHooks)
    on_non_finite: str = "stop"
    data_workers: int = 0
    lora_files: list[Path] = field(default_factory=list)
    last_good_lora: Path | None = None
    token_ids: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


@dataclass
class LoopOutcome:
    """How the loop ended."""

    status: str  # "completed" or "interrupted"
    global_step: int
    epochs_done: int
    skipped_steps: int = 0
    first_step_finished_at: float | None = None
    last_losses: dict[str, float] = field(default_factory=dict)


def train_loop(s: TrainingSession) -> LoopOutcome:
    """Train from ``s.start`` to the end of the plan (or a stop signal); see the module docstring.

    Raises :class:`~loralab.train.faults.NonFiniteLossError` when the loss becomes NaN/inf and
    ``on_non_finite`` is "stop" (nothing is saved for that step).
    """
    config, plan, acc = s.config, s.plan, s.accelerator
    device = acc.device
    family = s.components.family
    unet, vae = s.components.unet, s.components.vae
    noise_scheduler = s.components.noise_scheduler
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    diffusion = ForwardDiffusion(alphas_cumprod)
    trainable = s.text_encoder_params + s.unet_params
    clip_gradients = GradientClipper(trainable, config.max_grad_norm) if config.max_grad_norm else None
    accumulation = config.gradient_accumulation_steps
    saves = Cadence(config.save_every_n_epochs, config.save_every_n_steps)
    samples = Cadence(config.sample_every_n_epochs, config.sample_every_n_steps)
    outcome = LoopOutcome("completed", s.start.global_step, s.start.epoch)
    global_step = s.start.global_step

    _set_training_modes(s)
    if s.hooks.on_start is not None:
        s.hooks.on_start(s)
    if config.sample_at_first and global_step == 0:
        _sample(s, epoch=None, global_step=0)

    for epoch in range(s.start.epoch, plan.epochs):
        consumed = s.start.step_in_epoch if epoch == s.start.epoch else 0
        # The dataset counts epochs from 1 (as kohya logs them); its order is a function of (seed, epoch).
        # A DataLoader draws its workers' base seed from the global RNG; shielding that draw keeps
        # the LoRA dropout stream the same whether an epoch starts fresh or mid-way on resume.
        # With N processes each loads only its slice of the step's global batch.
        part = (acc.process_index, config.train_batch_size) if acc.num_processes > 1 else None
        with torch.random.fork_rng(devices=[]):
            batches = iter(s.dataset.loader(epoch + 1, consumed, num_workers=s.data_workers, part=part))
        while global_step < plan.max_train_steps:
            window = list(islice(batches, accumulation))
            if not window:
                break
            started = time.perf_counter()
            text_encoder_trains = _text_encoders_train(s, global_step)
            # Per batch of the window: this process's summed weighted loss; last: non-finite count.
            stats = [0.0] * (len(window) + 1)
            sample_offset = 0
            for micro, batch in enumerate(window):
                sample_indices = [sample_offset + p for p in batch.positions]
                sample_offset += batch.full_size
                if len(batch) == 0:
                    continue  # a short last batch of a bucket left this process nothing

                # 1. Latents: cached posterior draws, or the VAE now (same seeded draw as the cache).
                if batch.latents is not None:
                    latents = batch.latents.to(device)
                else:
                    latents = latents_from_images(vae, batch.images, seeds=batch.latent_seeds).to(device)

                # 2. Noise and timesteps owned by (seed, step, sample index): split-invariant.
                drawn = draw_noise_and_timesteps(
                    latents, seed=config.seed, global_step=global_step, sample_indices=sample_indices, settings=s.noise
                )

                # 3. Forward diffusion with the model's own DDPM schedule.
                noisy_latents = diffusion.add_noise(latents, drawn.noise, drawn.timesteps)

                with autocast(s.precision, device.type):
                    # 4. Text conditioning (encoders with LoRA when training, cached when frozen).
                    conditioning = _encode_captions(s, batch.captions, trains=text_encoder_trains)
                    time_ids = batch.sdxl_time_ids().to(device) if family is ModelFamily.SDXL else None
                    # 5. The UNet's prediction: epsilon, or v for v-parameterisation.
                    prediction = unet(noisy_latents, drawn.timesteps, **conditioning.unet_kwargs(time_ids)).sample

                # 6. Target: the noise for epsilon models, the velocity for v models.
                if s.components.v_prediction:
                    target = diffusion.velocity(latents, drawn.noise, drawn.timesteps)
                else:
                    target = drawn.noise

                # 7. Per-sample MSE times its weight (prior loss, min-SNR, debiased, v scaling).
                per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                weights = s.weighting.weights(drawn.timesteps, batch.is_reg.to(device), alphas_cumprod)
                loss_sum = (per_sample * weights).sum()
                if s.hooks.on_batch is not None:
                    s.hooks.on_batch(
                        BatchReport(
                            global_step + 1, epoch, list(batch.captions), batch.is_reg, latents.detach(),
                            drawn.noise.detach(), drawn.timesteps, per_sample.detach(), weights.detach(),
                        )
                    )  # fmt: skip
                if s.hooks.loss_transform is not None:
                    loss_sum = s.hooks.loss_transform(global_step + 1, loss_sum)
                loss_value = float(loss_sum.detach())
                if not math.isfinite(loss_value):
                    stats[-1] += 1  # never backpropagate a NaN: it would reach every LoRA weight
                    continue
                stats[micro] = loss_value

                # 8. Backward: this process's share of the global batch mean, averaged over the
                #    accumulated batches (accelerate's convention, as sd-scripts).
                share = loss_sum / (batch.full_size * accumulation)
                (s.grad_scaler.scale(share) if s.grad_scaler is not None else share).backward()

            # 9. Agree across processes on the losses (for logging) and on non-finite batches.
            totals = _sum_over_processes(acc, stats)
            batch_losses = [totals[i] / window[i].full_size for i in range(len(window))]
            skipped = totals[-1] > 0
            if skipped and s.on_non_finite == "stop":
                last = str(s.last_good_lora) if s.last_good_lora else None
                raise NonFiniteLossError(
                    non_finite_message(global_step=global_step + 1, epoch=epoch + 1, last_save=last)
                )

            if skipped:
                logger.warning("step %d: non-finite loss, the update is skipped", global_step + 1)
                outcome.skipped_steps += 1
            else:
                # 10. Gradients: each process holds its share of the global mean; sum the shares.
                _sum_gradients_over_processes(acc, trainable)
                if s.grad_scaler is not None:
                    s.grad_scaler.unscale_(s.optimizer)
                # 11. Clip, then step (the scaler skips steps whose fp16 gradients overflowed).
                if clip_gradients is not None:
                    clip_gradients()
                if s.grad_scaler is not None:
                    s.grad_scaler.step(s.optimizer)
                    s.grad_scaler.update()
                else:
                    s.optimizer.step()
            # 12. The schedule advances with every step, so lr/unet stays the planner's curve.
            s.lr_scheduler.step()
            s.optimizer.zero_grad(set_to_none=True)
            max_norm_scalars = (
                apply_max_norm(s.network, config.scale_weight_norms) if config.scale_weight_norms and not skipped else {}
            )
            global_step += 1
            consumed += len(window)

            # 13. Losses and logs under kohya's tags; sd-scripts records every accumulated batch.
            if not skipped:
                for index, loss in enumerate(batch_losses):
                    s.loss_recorder.add(epoch=epoch, step=consumed - len(window) + index, loss=loss)
            step_seconds = time.perf_counter() - started
            _log_step(s, global_step, None if skipped else batch_losses[-1], step_seconds, sample_offset, max_norm_scalars)
            if outcome.first_step_finished_at is None:
                outcome.first_step_finished_at = time.time()

            # 14. Saves and samples at step boundaries, then the stop check.
            if saves.after_step(global_step):
                _save_lora_and_state(s, step_lora_name(config.output_name, global_step), global_step, epoch + 1,
                                     TrainingProgress(global_step, epoch, consumed))  # fmt: skip
                _remove_old_saves(s, global_step=global_step)
            if samples.after_step(global_step):
                _sample(s, epoch=None, global_step=global_step)
            if s.hooks.after_step is not None:
                s.hooks.after_step(StepReport(global_step, epoch, None if skipped else batch_losses[-1]))
            if _stop_agreed(acc, s.stop):
                progress = TrainingProgress(global_step, epoch, consumed)
                _save_lora_and_state(s, step_lora_name(config.output_name, global_step), global_step, epoch + 1,
                                     progress, force_state=True)  # fmt: skip
                outcome.status, outcome.global_step, outcome.epochs_done = "interrupted", global_step, epoch
                return outcome

        # End of epoch: loss/epoch at x = epochs finished, then the epoch's saves and samples.
        epochs_done = epoch + 1
        if s.metrics is not None:
            s.metrics.log_epoch(epochs_done, s.loss_recorder.moving_average)
        if saves.after_epoch(epochs_done, plan.epochs, including_last=False):
            _save_lora_and_state(s, epoch_lora_name(config.output_name, epochs_done), global_step, epochs_done,
                                 TrainingProgress(global_step, epochs_done, 0))  # fmt: skip
            _remove_old_saves(s, epoch=epochs_done)
        if samples.after_epoch(epochs_done, plan.epochs, including_last=True):
            _sample(s, epoch=epochs_done, global_step=global_step)
        outcome.epochs_done = epochs_done

    final_state = TrainingProgress(global_step, plan.epochs, 0)
    _save_lora_and_state(s, final_lora_name(config.output_name), global_step, plan.epochs, final_state)
    outcome.global_step = global_step
    outcome.last_losses = {"loss/average": s.loss_recorder.moving_average}
    return outcome


# ---------------------------------------------------------------------------------------------
# Pieces of a step


def _set_training_modes(s: TrainingSession) -> None:
    """sd-scripts' modes: base models in train mode only for gradient checkpointing (their dropout
    is 0 either way); the LoRA modules always in train mode, so their dropouts act; a schedule-free
    optimizer in train mode (it refuses to step otherwise)."""
    _optimizer_mode(s.optimizer, "train")
    checkpointing = bool(s.config.gradient_checkpointing)
    s.components.unet.train(checkpointing)
    for encoder in s.components.text_encoders:
        encoder.train(checkpointing and bool(s.text_encoder_params))
    s.network.train()


def _text_encoders_train(s: TrainingSession, global_step: int) -> bool:
    """Whether the text encoders' LoRA trains in this step (``stop_text_encoder_training`` ends it)."""
    if not s.text_encoder_params:
        return False
    stop_at = s.config.stop_text_encoder_training
    if stop_at is not None and global_step >= stop_at:
        if s.text_encoder_params[0].requires_grad:
            for param in s.text_encoder_params:
                param.requires_grad_(False)
            logger.info("step %d: text encoder training stops (stop_text_encoder_training)", global_step)
        return False
    return True


def _encode_captions(s: TrainingSession, captions: list[str], *, trains: bool) -> TextConditioning:
    """UNet conditioning for a batch's captions."""
    if s.text_cache is not None and not trains:
        return s.text_cache.encode(captions, dtype=s.precision.compute_dtype)
    tokenizers = s.components.tokenizers
    ids = [torch.cat([_token_ids(s, index, caption) for caption in captions]) for index in range(len(tokenizers))]
    with torch.set_grad_enabled(trains):
        return encode_text(
            s.components.family,
            s.components.text_encoders,
            ids,
            eos_token_ids=[tokenizer.eos_token_id for tokenizer in tokenizers],
            clip_skip=effective_clip_skip(s.components.family, s.config.clip_skip),
        )


def _token_ids(s: TrainingSession, encoder_index: int, caption: str) -> torch.Tensor:
    """Token ids ``(1, n, 77)`` of one caption, remembered for the run (captions repeat every epoch)."""
    key = (encoder_index, caption)
    ids = s.token_ids.get(key)
    if ids is None:
        ids = tokenize_captions(s.components.tokenizers[encoder_index], [caption], s.config.max_token_length)
        if len(s.token_ids) < _TOKEN_MEMO_SIZE:  # shuffled or dropped captions could grow it without bound
            s.token_ids[key] = ids
    return ids


def _sum_gradients_over_processes(acc: Any, params: list[torch.nn.Parameter]) -> None:
    """All-reduce (sum) the LoRA gradients as one flat buffer; a no-op in a single process.

    Each process's gradient is its share of the global batch mean, so the sum is the gradient
    of the whole batch, exactly as one process would compute it.
    """
    if acc.num_processes == 1:
        return
    params = [p for p in params if p.requires_grad]  # text encoders may have stopped training
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = acc.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
    offset = 0
    for param in params:
        count = param.numel()
        param.grad = flat[offset : offset + count].view_as(param).to(param.dtype)
        offset += count


def _sum_over_processes(acc: Any, values: list[float]) -> list[float]:
    """``values`` summed over all processes; one process skips the collective (and the tensor)."""
    if acc.num_processes == 1:
        return values
    summed = acc.reduce(torch.tensor(values, dtype=torch.float64, device=acc.device), reduction="sum")
    return summed.cpu().tolist()


def _stop_agreed(acc: Any, stop: StopSignals) -> bool:
    """True on every process once any of them received a stop signal."""
    if acc.num_processes == 1:
        return stop.requested
    return _sum_over_processes(acc, [1.0 if stop.requested else 0.0])[0] > 0


@torch.no_grad()
def apply_max_norm(network: LoRANetwork, max_norm: float) -> dict[str, float]:
    """sd-scripts' max-norm regularisation (``scale_weight_norms``): scale each LoRA whose weight
    delta ``scale * up @ down`` has a norm above ``max_norm`` back to it (up and down by the
    square root of the ratio each). Returns kohya's ``max_norm/*`` scalars."""
    norms, scaled = [], 0
    for module in network.lora_modules().values():
        delta_norm = module.delta_weight().norm()
        norm = delta_norm.clamp(min=max_norm / 2)
        ratio = norm.clamp(max=max_norm) / norm
        if ratio != 1:
            scaled += 1
            module.lora_up.weight.mul_(ratio.sqrt().to(module.lora_up.weight.dtype))
            module.lora_down.weight.mul_(ratio.sqrt().to(module.lora_down.weight.dtype))
        norms.append(float(delta_norm * ratio))
    if not norms:
        return {}
    return {
        "max_norm/keys_scaled": float(scaled),
        "max_norm/average_key_norm": sum(norms) / len(norms),
        "max_norm/max_key_norm": max(norms),
    }


# ---------------------------------------------------------------------------------------------
# Logging, saving and samples


def _log_step(
    s: TrainingSession,
    global_step: int,
    loss: float | None,
    step_seconds: float,
    images: int,
    extra: dict[str, float],
) -> None:
    if s.metrics is None and s.progress_bar is None:
        return  # not the main process (or nothing to show)
    average = s.loss_recorder.moving_average
    if s.metrics is not None:
        scalars = step_scalars(
            current_loss=math.nan if loss is None else loss,
            average_loss=average,
            group_lrs=group_lrs(s.optimizer),
            d_lr=d_times_lr(s.optimizer),
            step_seconds=step_seconds,
            images_per_second=images / step_seconds if step_seconds > 0 else None,
            peak_memory_mb=peak_memory_mb(s.accelerator.device),
        )
        if loss is None:  # a skipped step has no loss to log
            scalars = {tag: value for tag, value in scalars.items() if not tag.startswith("loss/")}
        scalars.update(extra)
        s.metrics.log_step(global_step, scalars)
    if s.progress_bar is not None:
        s.progress_bar.set_postfix(avr_loss=f"{average:.4g}", refresh=False)
        s.progress_bar.update(1)


def _optimizer_mode(optimizer: torch.optim.Optimizer, mode: str) -> None:
    """Schedule-free optimizers keep two sets of weights and must be told which one to expose."""
    switch = getattr(optimizer, mode, None)
    if callable(switch):
        switch()


def _save_lora_and_state(
    s: TrainingSession,
    name: str,
    global_step: int,
    epoch: int,
    progress: TrainingProgress,
    *,
    force_state: bool = False,
) -> None:
    """Write a LoRA file (and the training state when ``save_state`` or ``force_state``)."""
    acc = s.accelerator
    if acc.is_main_process:
        _optimizer_mode(s.optimizer, "eval")
        path = save_lora(s.run_dir / name, s.network, s.metadata, global_step=global_step, epoch=epoch,
                         dtype=s.precision.save_dtype)  # fmt: skip
        if path not in s.lora_files:
            s.lora_files.append(path)
        s.last_good_lora = path
        if s.config.save_state or force_state:
            if s.metrics is not None:
                s.metrics.flush()  # the logs must hold every step the state has seen
            save_training_state(
                s.run_dir / "state",
                progress=progress,
                trainable=s.network,
                optimizer=s.optimizer,
                lr_scheduler=s.lr_scheduler,
                loss_recorder=s.loss_recorder,
                grad_scaler=s.grad_scaler,
                extra=s.state_extra,
            )
        _optimizer_mode(s.optimizer, "train")
    acc.wait_for_everyone()


def _remove_old_saves(s: TrainingSession, *, epoch: int | None = None, global_step: int | None = None) -> None:
    """``save_last_n_epochs`` / ``save_last_n_steps``: drop the LoRA files that fell out of the
    window, after the new one is written (main process; the others wait at the next save)."""
    if not s.accelerator.is_main_process:
        return
    keep = KeepLast.from_config(s.config)
    removed = keep.prune(s.run_dir, s.config.output_name, epoch=epoch, global_step=global_step)
    s.lora_files[:] = [path for path in s.lora_files if path not in removed]


def _sample(s: TrainingSession, *, epoch: int | None, global_step: int) -> None:
    """Render the sample prompts with the current LoRA; PNGs to ``samples/`` and TensorBoard."""
    acc = s.accelerator
    if s.sample_prompts and acc.is_main_process:
        components = s.components
        for module in (components.unet, *components.text_encoders):
            module.eval()  # also puts the LoRA modules (inside them) in eval: no dropout in samples
        _optimizer_mode(s.optimizer, "eval")
        # Sampling must not move the training run's random state (resume equality depends on it).
        with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
            with autocast(s.precision, acc.device.type):
                images = render_samples(
                    components,
                    s.sample_prompts,
                    sampler=s.config.sample_sampler,
                    resolution=tuple(s.config.resolution),
                    base_seed=s.config.seed,
                    clip_skip=s.config.clip_skip,
                )
        for index, image in enumerate(images):
            name = sample_file_name(s.config.output_name, index, epoch=epoch, global_step=global_step)
            save_png_atomically(image, s.run_dir / "samples" / name)
            if s.metrics is not None:
                s.metrics.log_image(f"sample/{index:02d}", image, global_step)
        _optimizer_mode(s.optimizer, "train")
        _set_training_modes(s)
    acc.wait_for_everyone()
