"""``train()``: one LoRA training run, set up from its config, trained, and cleaned up.

The entry point reads as what it does: ``setup_*`` builds each component from the config
(accelerator, model, network, data, optimizer, scheduler, logging), :func:`train_loop` trains,
and the cleanup closes logs and writes the manifest whatever happened. Nothing is kept at
module level, so several runs can follow each other in one process (a sweep); the global
torch random state and thread count are put back afterwards.

A run directory holds::

    config.toml      the fully resolved config (what ``--resume`` and reruns read)
    manifest.json    versions, dataset and base-model hashes, seeds, platform, timings, metrics
    logs/            TensorBoard events under kohya's tags
    samples/         sample images
    <output_name>-000010.safetensors ... <output_name>.safetensors   LoRA files (kohya format)
    state/           the training state for --resume (with save_state, and always on interrupt)
"""

from __future__ import annotations

import logging
import random
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from loralab.config.loading import save_config
from loralab.data.dataset import TrainingDataset
from loralab.data.latent_cache import LatentCache, default_cache_dir, vae_dtype_for
from loralab.data.text_cache import TextEncoderCache
from loralab.data.transforms import CaptionOptions
from loralab.errors import CheckpointError, ConfigError
from loralab.models.checkpoint_file import discard_prefetched
from loralab.models.family import ModelFamily
from loralab.models.loading import StableDiffusionComponents
from loralab.network.lora import LoRANetwork, NetworkSpec
from loralab.network.lora_file import read_lora_file
from loralab.plan.planner import Plan, make_plan
from loralab.train.base_model import lend_base_model, load_base_model
from loralab.train.faults import StopSignals, check_policy
from loralab.train.loop import LoopHooks, LoopOutcome, TrainingSession, train_loop
from loralab.train.loss_weighting import LossWeighting
from loralab.train.lr_schedules import build_lr_scheduler
from loralab.train.manifest import build_manifest, legacy_model_hash, read_manifest, relative_names, write_manifest
from loralab.train.noise import NoiseSettings
from loralab.train.optimizer_setup import setup_optimizer as build_run_optimizer
from loralab.train.precision import (
    PrecisionPlan,
    apply_cpu_threads,
    cast_trainable_parameters,
    config_precision,
    make_grad_scaler,
)
from loralab.train.resume import changed_totals, resume_hint, rewind_event_files
from loralab.train.sample_prompts import read_sample_prompts
from loralab.train.save_names import final_lora_name
from loralab.train.saving import training_metadata
from loralab.train.state import StateError, TrainingProgress, find_state_dir, load_training_state
from loralab.train.tb_logging import LossRecorder, MetricsLogger

logger = logging.getLogger(__name__)

ProgressMode = Literal["bar", "quiet", "jsonl"]
PROGRESS_MODES = ("bar", "quiet", "jsonl")
DEFAULT_OUTPUT_NAME = "last"  # sd-scripts' default
DEFAULT_SAMPLER = "euler_a"  # converges in few steps for SD1 and SDXL alike; ddim is poor on SDXL


@dataclass
class RunResult:
    """How a run ended and what it wrote."""

    run_dir: Path
    status: str  # "completed" or "interrupted"
    global_step: int
    epochs_done: int
    final_lora: Path | None
    lora_files: list[Path]
    message: str
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The entry point


def train(
    config: Any,
    *,
    run_dir: Path | str | None,
    resume: Path | str | None = None,
    progress: ProgressMode = "bar",
    hooks: LoopHooks | None = None,
    on_non_finite: str = "stop",
    base_model: StableDiffusionComponents | None = None,
    launched_at: float | None = None,
) -> RunResult:
    """Train a LoRA as ``config`` (a ``TrainConfig``) says, writing everything into ``run_dir``.

    Features: SD1.x (eps and v) and SDXL; every sd-scripts option of the config (noise offset and
    multires noise, min-SNR, debiased loss, prior loss, clip skip, text encoder trained or frozen
    with its own LR, accumulation, clipping, checkpointing, fp16/bf16, full_fp16/bf16, threads);
    cached latents and text-encoder outputs; kohya TensorBoard tags; LoRA saves and samples by
    epoch/step; exact resume (``resume=RUN_DIR`` continues that run in place; ``run_dir`` may then
    be None); SIGINT/SIGTERM end the run after the current step with state and a LoRA saved;
    multi-process data parallelism when started by ``accelerate launch`` or ``--num-processes``.
    ``progress``: "bar" (tqdm), "quiet", or "jsonl" (one JSON object per step on stdout).
    ``on_non_finite``: "stop" (default) or "skip" a step whose loss is NaN/inf.
    ``base_model``: components of the config's base checkpoint already loaded (frozen, on the run's
    device, in its weight dtype) to train on instead of loading it; they are handed back as they
    were on every exit (see ``train.base_model``).
    ``launched_at``: when the caller's launch began (``loralab train``: its process start), for the
    manifest's ``launch_to_first_step_seconds``; default: this call.

    Raises ``ConfigError`` (bad settings, a run directory that already holds a run),
    ``CheckpointError`` (base model), ``DatasetError`` (data), ``LoraFileError``
    (``network_weights``), ``StateError`` (resume), ``NonFiniteLossError`` (NaN loss).
    """
    if progress not in PROGRESS_MODES:
        raise ConfigError(f"progress={progress!r} is unknown; use one of {', '.join(PROGRESS_MODES)}")
    policy = check_policy(on_non_finite)
    called_at = time.time()
    if launched_at is None:
        launched_at = called_at
    sample_prompts = read_sample_prompts(config.sample_prompts)  # a bad prompt file fails before any loading
    run_dir = _resolve_run_dir(config, run_dir, resume)
    config = resolve_run_config(config, run_dir)

    with ExitStack() as cleanup:
        # The caller's random state and thread count are theirs; the run uses its own.
        cleanup.enter_context(torch.random.fork_rng(devices=_cuda_devices()))
        accelerator = setup_accelerator(cleanup)
        accelerator.wait_for_everyone()  # every process has checked run_dir before the main one writes to it
        threads = apply_cpu_threads(config.num_cpu_threads_per_process, config.max_data_loader_n_workers)
        cleanup.callback(torch.set_num_threads, threads.previous_torch_threads)
        torch.manual_seed(config.seed + accelerator.process_index)  # LoRA dropouts draw from it
        main = accelerator.is_main_process

        precision = config_precision(config)
        components = setup_model(config, precision, accelerator.device, base_model=base_model, cleanup=cleanup)
        discard_prefetched()  # a read ahead this run did not use must not stay in memory
        network, spec, text_encoder_params, unet_params = setup_network(config, components, precision)
        cleanup.callback(network.remove)  # a lent base model goes back without this run's LoRA
        dataset, plan, text_cache = setup_data(config, components, accelerator, train_text_encoder=bool(text_encoder_params))
        optimizer = setup_optimizer(config, text_encoder_params, unet_params, accelerator.device)
        lr_scheduler, grad_scaler = setup_scheduler(config, optimizer, plan, precision, accelerator.device)

        totals = _plan_totals(plan, accelerator.num_processes)
        loss_recorder = LossRecorder()
        start, manifest = TrainingProgress(0, 0, 0), None
        session_id, started_at = random.SystemRandom().randrange(2**31), called_at
        if resume is not None:
            restored = load_training_state(
                run_dir / "state", trainable=network, optimizer=optimizer, lr_scheduler=lr_scheduler,
                loss_recorder=loss_recorder, grad_scaler=grad_scaler,
            )  # fmt: skip
            start = restored.progress
            session_id = restored.extra.get("session_id", session_id)
            started_at = restored.extra.get("started_at", started_at)
            for change in changed_totals(restored.extra.get("totals", {}), totals):
                logger.warning("the config changed since the run was saved (%s); resuming anyway", change)
            manifest = read_manifest(run_dir)
        if main:
            # Only now: a resume that fails (state of another rank, a damaged file) must leave the
            # run's config.toml as it was, since resuming again needs it.
            save_config(config, run_dir / "config.toml")
            manifest = _start_manifest(manifest, config, dataset, accelerator, totals, start, resume is not None)
            write_manifest(run_dir, manifest)

        metrics, progress_bar = setup_logging(cleanup, run_dir, progress, main, plan, start, resumed=resume is not None)
        metadata = training_metadata(
            config=config, plan=plan, dataset=dataset.info, components=components, spec=spec,
            optimizer=optimizer, num_processes=accelerator.num_processes,
            base_model_hash=_base_model_hash(config.pretrained_model_name_or_path),
            started_at=started_at, session_id=session_id,
        )  # fmt: skip
        session = TrainingSession(
            config=config, plan=plan, components=components, network=network, dataset=dataset,
            optimizer=optimizer, lr_scheduler=lr_scheduler, grad_scaler=grad_scaler, precision=precision,
            noise=NoiseSettings.from_config(config), weighting=LossWeighting.from_config(config),
            text_cache=text_cache, text_encoder_params=text_encoder_params, unet_params=unet_params,
            accelerator=accelerator, run_dir=run_dir, metadata=metadata,
            state_extra={"totals": totals, "session_id": session_id, "started_at": started_at},
            metrics=metrics, progress_bar=progress_bar, sample_prompts=sample_prompts,
            stop=StopSignals(), start=start, loss_recorder=loss_recorder, hooks=hooks or LoopHooks(),
            on_non_finite=policy, data_workers=threads.data_loader_workers,
        )  # fmt: skip
        setup_seconds = time.time() - called_at

        outcome: LoopOutcome | None = None
        error: BaseException | None = None
        try:
            with session.stop.installed():
                outcome = train_loop(session)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if main and manifest is not None:
                _finish_manifest(manifest, run_dir, session, outcome, launched_at, setup_seconds, error)
                write_manifest(run_dir, manifest)
        return _result(session, outcome, run_dir, progress, main)


# ---------------------------------------------------------------------------------------------
# Setup, one function per component


def setup_accelerator(cleanup: ExitStack) -> Any:
    """The ``accelerate`` state of this process: device, rank and process group.

    On a machine without CUDA the processes talk over gloo. State this run created is reset
    when the run ends, so the next run in the same process starts clean.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    created = not PartialState._shared_state  # noqa: SLF001 - accelerate keeps its state there
    # Loss scaling and autocast are ours (train.precision), so accelerate's mixed precision stays off.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    if created:
        cleanup.callback(AcceleratorState._reset_state, True)  # noqa: SLF001
    return accelerator


def setup_model(
    config: Any,
    precision: PrecisionPlan,
    device: torch.device,
    *,
    base_model: StableDiffusionComponents | None = None,
    cleanup: ExitStack | None = None,
) -> StableDiffusionComponents:
    """Load the base checkpoint (or take the lent ``base_model``), frozen, in the run's dtypes, with
    its attention and checkpointing set."""
    if not config.pretrained_model_name_or_path:
        raise ConfigError("pretrained_model_name_or_path is not set; point it at a .safetensors checkpoint or diffusers folder")
    if base_model is not None:
        if cleanup is None:
            raise ValueError("a lent base model needs the run's cleanup stack to be handed back")
        components = lend_base_model(base_model, device=device, weight_dtype=precision.base_weight_dtype, cleanup=cleanup)
    else:
        components = load_base_model(config, device=device)
    _check_family(config, components)
    if components.vae.dtype != vae_dtype_for(config):  # diffusers warns on every cast, needed or not
        components.vae.to(dtype=vae_dtype_for(config))
    for module in (components.unet, components.vae, *components.text_encoders):
        module.requires_grad_(False)
    _set_attention(config, components)
    if config.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        for encoder in components.text_encoders:
            _enable_activation_checkpointing(encoder)
    return components


def setup_network(
    config: Any, components: StableDiffusionComponents, precision: PrecisionPlan
) -> tuple[LoRANetwork, NetworkSpec, list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Create (or load from ``network_weights``) the LoRA network and apply it to the components.

    A part whose learning rate is 0, or that ``network_train_*_only`` excludes, gets no LoRA
    modules at all (sd-scripts makes them and never trains them: same result, bigger files).
    Returns the network, its spec, and the text-encoder and UNet parameters to train.
    """
    text_encoder_lr = config.learning_rate if config.text_encoder_lr is None else config.text_encoder_lr
    unet_lr = config.learning_rate if config.unet_lr is None else config.unet_lr
    spec = NetworkSpec(
        rank=config.network_dim,
        alpha=config.network_alpha,
        conv_rank=config.conv_dim or None,
        conv_alpha=config.conv_alpha if config.conv_dim else None,
        dropout=config.network_dropout or None,
        rank_dropout=config.rank_dropout or None,
        module_dropout=config.module_dropout or None,
        train_unet=not config.network_train_text_encoder_only and unet_lr > 0,
        train_text_encoder=not config.network_train_unet_only and text_encoder_lr > 0,
    )
    generator = torch.Generator().manual_seed(config.seed)  # the LoRA's initial weights follow the seed
    if config.network_weights is not None and config.dim_from_weights:
        network = LoRANetwork.from_lora_file(read_lora_file(config.network_weights), components)
    else:
        network = LoRANetwork.create(components, spec, generator=generator)
        if config.network_weights is not None:
            _load_initial_weights(network, config.network_weights)
    network.apply_to(components)
    cast_trainable_parameters(network.parameters(), precision)
    parts = []
    for part in ("text_encoder", "unet"):
        params = network.part_parameters(part)
        for param in params:
            param.requires_grad_(True)
        parts.append(params)
    return network, spec, parts[0], parts[1]


def setup_data(
    config: Any, components: StableDiffusionComponents, accelerator: Any, *, train_text_encoder: bool
) -> tuple[TrainingDataset, Plan, TextEncoderCache | None]:
    """The dataset, the run's plan, and the text-encoder cache when the encoders are frozen.

    With N processes every batch the dataset yields is the step's *global* batch of
    ``N x train_batch_size`` samples (each process trains its slice), so steps, epochs and the LR
    schedule are planned with that batch size.
    """
    global_config = config
    if accelerator.num_processes > 1:
        global_config = config.model_copy(update={"train_batch_size": config.train_batch_size * accelerator.num_processes})
    plan = make_plan(global_config)
    dataset = TrainingDataset.from_config(global_config)
    if dataset.batches_per_epoch != plan.batches_per_epoch:
        raise RuntimeError(f"dataset has {dataset.batches_per_epoch} batches per epoch, the plan {plan.batches_per_epoch}")

    if config.cache_latents or config.cache_latents_to_disk:
        cache = LatentCache.for_vae(
            components.vae, source=config.vae or config.pretrained_model_name_or_path, root=config.cache_dir
        )
        if accelerator.is_main_process:
            cache.fill(components.vae, dataset.latent_requests(), progress=False)
        accelerator.wait_for_everyone()
        dataset = dataset.with_latent_cache(cache)

    text_cache = None
    frozen = not train_text_encoder
    if (config.cache_text_encoder_outputs or config.cache_text_encoder_outputs_to_disk or frozen) and not (
        CaptionOptions.from_config(config).changes_captions
    ):
        root = (config.cache_dir or default_cache_dir()) if config.cache_text_encoder_outputs_to_disk else None
        text_cache = TextEncoderCache.from_components(
            components, clip_skip=config.clip_skip, max_token_length=config.max_token_length, root=root
        )
    return dataset, plan, text_cache


def setup_optimizer(
    config: Any, text_encoder_params: list[torch.nn.Parameter], unet_params: list[torch.nn.Parameter], device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer over the LoRA parameters, text-encoder group first (sd-scripts' order)."""
    return build_run_optimizer(config, unet_params=unet_params, text_encoder_params=text_encoder_params, device=device)


def setup_scheduler(
    config: Any, optimizer: torch.optim.Optimizer, plan: Plan, precision: PrecisionPlan, device: torch.device
) -> tuple[Any, torch.amp.GradScaler | None]:
    """The LR scheduler over the plan's steps (the planner's curve) and the fp16 loss scaler."""
    return build_lr_scheduler(optimizer, config, plan.max_train_steps), make_grad_scaler(precision, device.type)


def setup_logging(
    cleanup: ExitStack, run_dir: Path, progress: str, main: bool, plan: Plan, start: TrainingProgress, *, resumed: bool
) -> tuple[MetricsLogger | None, Any | None]:
    """TensorBoard (and JSON lines) on the main process, and its progress bar.

    On resume, events the run logged after its saved state are dropped first.
    """
    if not main:
        return None, None
    log_dir = run_dir / "logs"
    if resumed and log_dir.is_dir():
        dropped = rewind_event_files(log_dir, start)
        if dropped:
            logger.info("dropped %d log events written after the saved state", dropped)
    metrics = cleanup.enter_context(MetricsLogger(log_dir, jsonl=sys.stdout if progress == "jsonl" else None))
    bar = None
    if progress == "bar":
        from tqdm import tqdm

        bar = tqdm(total=plan.max_train_steps, initial=start.global_step, desc="steps", unit="step", smoothing=0.1)
        cleanup.callback(bar.close)
    return metrics, bar


# ---------------------------------------------------------------------------------------------
# Helpers


def resolve_run_config(config: Any, run_dir: Path) -> Any:
    """The config as the run uses it: outputs in ``run_dir``, defaults filled in; saved as config.toml."""
    update: dict[str, Any] = {
        "output_dir": run_dir,
        "logging_dir": run_dir / "logs",
        "output_name": config.output_name or DEFAULT_OUTPUT_NAME,
        "resume": None,
    }
    if config.sample_sampler is None:
        update["sample_sampler"] = DEFAULT_SAMPLER
    return config.model_copy(update=update)


def default_run_dir(config: Any) -> Path:
    """``output_dir`` when the config sets one, else ``runs/<output_name>-<date-time>``."""
    if config.output_dir is not None:
        return Path(config.output_dir)
    return Path("runs") / f"{config.output_name or DEFAULT_OUTPUT_NAME}-{time.strftime('%Y%m%d-%H%M%S')}"


def _resolve_run_dir(config: Any, run_dir: Path | str | None, resume: Path | str | None) -> Path:
    if resume is not None:
        resume = Path(resume)
        if run_dir is not None and Path(run_dir).resolve() != resume.resolve():
            raise ConfigError(f"--resume {resume} continues that run in place; leave out --run-dir {run_dir}")
        if not resume.is_dir():
            raise StateError(f"--resume {resume}: no such run folder; give the folder of the run to continue")
        if find_state_dir(resume / "state") is None:
            raise StateError(
                f"{resume} holds no saved training state (state/); runs save it with save_state, or when interrupted"
            )
        return resume
    path = Path(run_dir) if run_dir is not None else default_run_dir(config)
    if find_state_dir(path / "state") is not None:
        raise ConfigError(f"{path} already holds a training run; resume it with --resume {path} or choose another --run-dir")
    if (path / "manifest.json").exists() or (path / "state").exists():
        raise ConfigError(
            f"{path} already holds a training run that saved no state to resume from; choose another --run-dir "
            "(or delete that folder)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run folder {path}: {exc.strerror or exc}; choose another --run-dir") from None
    return path


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _check_family(config: Any, components: StableDiffusionComponents) -> None:
    family = components.family
    source = config.pretrained_model_name_or_path
    if config.sdxl and family is not ModelFamily.SDXL:
        raise CheckpointError(f"sdxl is set but {source} is an {family.label} checkpoint; unset sdxl or use an SDXL checkpoint")
    if family is ModelFamily.SDXL and not config.sdxl:
        logger.info("%s is an SDXL checkpoint; training it as SDXL", source)
    if config.v2 and family is not ModelFamily.SD2:
        raise CheckpointError(f"v2 is set but {source} is an {family.label} checkpoint; unset v2")


def _enable_activation_checkpointing(encoder: torch.nn.Module) -> None:
    """Non-reentrant checkpointing of a transformers text encoder, under the name its version has
    (transformers 5 renamed ``gradient_checkpointing_enable``; the old name warns)."""
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _set_attention(config: Any, components: StableDiffusionComponents) -> None:
    """SDPA (diffusers' default kernel) unless xformers is asked for and installed."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if config.xformers:
        try:
            components.unet.enable_xformers_memory_efficient_attention()
            return
        except (ImportError, ModuleNotFoundError, ValueError, RuntimeError) as exc:
            # A speed option only: SDPA computes the same attention.
            logger.warning("xformers is not usable here (%s); using PyTorch SDPA attention", str(exc).splitlines()[0])
    components.unet.set_attn_processor(AttnProcessor2_0())


def _load_initial_weights(network: LoRANetwork, path: Path) -> None:
    """Start from a LoRA file's weights (``network_weights``) in a network of the config's ranks."""
    from loralab.errors import LoraFileError

    tensors = read_lora_file(path).tensors
    try:
        missing, unexpected = network.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise LoraFileError(
            f"{path} does not fit the network (different network_dim?): {str(exc).splitlines()[1].strip()}; "
            f"set dim_from_weights to take its ranks"
        ) from None
    if unexpected:
        raise LoraFileError(f"{path} has {len(unexpected)} modules this network lacks (e.g. {unexpected[0]})")
    if missing:
        logger.warning("%s lacks %d of the network's weights; they start fresh", path, len(missing))


def _base_model_hash(path: str | None) -> str | None:
    if path and Path(path).is_file():
        return legacy_model_hash(Path(path))
    return None


def _plan_totals(plan: Plan, num_processes: int) -> dict[str, Any]:
    return {
        "max_train_steps": plan.max_train_steps,
        "epochs": plan.epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "batches_per_epoch": plan.batches_per_epoch,
        "num_processes": num_processes,
    }


def _start_manifest(
    previous: dict[str, Any] | None,
    config: Any,
    dataset: TrainingDataset,
    accelerator: Any,
    totals: dict[str, Any],
    start: TrainingProgress,
    resumed: bool,
) -> dict[str, Any]:
    manifest = build_manifest(
        config=config, dataset=dataset.info, device=accelerator.device,
        num_processes=accelerator.num_processes, plan_totals=totals,
    )  # fmt: skip
    if resumed and previous is not None:
        manifest["lora_files"] = previous.get("lora_files", [])
        manifest["resumed"] = previous.get("resumed", []) + [{"global_step": start.global_step, "at": time.time()}]
        manifest["timings"] = {"previous": previous.get("timings", {})}
    return manifest


def _finish_manifest(
    manifest: dict[str, Any],
    run_dir: Path,
    session: TrainingSession,
    outcome: LoopOutcome | None,
    launched_at: float,
    setup_seconds: float,
    error: BaseException | None,
) -> None:
    now = time.time()
    manifest["status"] = outcome.status if outcome is not None else "failed"
    if error is not None:
        manifest["error"] = f"{type(error).__name__}: {error}"
    names = relative_names(session.lora_files, run_dir)
    manifest["lora_files"] = [n for n in dict.fromkeys(manifest.get("lora_files", []) + names) if (run_dir / n).is_file()]
    timings = manifest.setdefault("timings", {})
    timings.update({"setup_seconds": setup_seconds, "total_seconds": now - launched_at})
    if outcome is not None and outcome.first_step_finished_at is not None:
        timings["launch_to_first_step_seconds"] = outcome.first_step_finished_at - launched_at
    manifest["final_metrics"] = {
        "global_step": outcome.global_step if outcome else None,
        "epochs_done": outcome.epochs_done if outcome else None,
        "skipped_steps": outcome.skipped_steps if outcome else None,
        "loss_average": session.loss_recorder.moving_average,
        "peak_memory_mb": _peak_memory(session),
    }


def _peak_memory(session: TrainingSession) -> float:
    from loralab.train.tb_logging import peak_memory_mb

    return peak_memory_mb(session.accelerator.device)


def _result(session: TrainingSession, outcome: LoopOutcome, run_dir: Path, progress: str, main: bool) -> RunResult:
    final = run_dir / final_lora_name(session.config.output_name)
    if outcome.status == "interrupted":
        message = (
            f"interrupted after step {outcome.global_step}: state and "
            f"{session.last_good_lora.name if session.last_good_lora else 'a LoRA'} saved in {run_dir}; "
            f"resume with: {resume_hint(run_dir)}"
        )
    else:
        message = f"trained {outcome.global_step} steps; LoRA saved as {final}"
    if main and (progress != "quiet" or outcome.status == "interrupted"):
        print(message, file=sys.stderr)
    return RunResult(
        run_dir=run_dir,
        status=outcome.status,
        global_step=outcome.global_step,
        epochs_done=outcome.epochs_done,
        final_lora=final if outcome.status == "completed" else None,
        lora_files=list(session.lora_files),
        message=message,
        metrics=dict(outcome.last_losses),
    )
