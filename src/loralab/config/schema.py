"""The typed configuration of one training run: ``TrainConfig``.

One flat model whose field names are sd-scripts argument names (what kohya users know) and
whose defaults are sd-scripts' defaults, with these exceptions: ``seed`` defaults to 42 (every
run is reproducible and the variants of a sweep share their noise), ``max_token_length``
is 75 rather than unset, and a few fields that sd-scripts does not have
(``steps_formula``, ``tokenizer_path``). ``sample_prompts`` takes either a file path (as in
sd-scripts) or a list of prompts (what the kohya_ss GUI stores).

An empty string means "not set" for every field (the kohya_ss GUI writes ``""`` for empty
boxes), and ``0`` is kept as the value 0. Values are checked when the model is built; the
checks between fields live in :mod:`loralab.config.checks` and raise ``ConfigError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loralab.config.optimizer_args import OptimizerArgValue, parse_optimizer_args
from loralab.errors import ConfigError

LrSchedulerName = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
SampleSamplerName = Literal[
    "ddim",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "dpmsolver",
    "dpmsolver++",
    "dpmsingle",
    "k_lms",
    "k_euler",
    "k_euler_a",
    "k_dpm_2",
    "k_dpm_2_a",
]

_RATIO = {"ge": 0.0, "le": 1.0}


class TrainConfig(BaseModel):
    """Every setting of one LoRA training run (sd-scripts names; see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- base model -------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = Field(
        None, description="Base checkpoint: a single-file .safetensors/.ckpt or a diffusers folder."
    )
    vae: str | None = Field(None, description="VAE to use instead of the checkpoint's own (file or folder).")
    tokenizer_path: Path | None = Field(
        None, description="Local CLIP tokenizer folder; unset builds the SD tokenizer offline (loralab addition)."
    )
    v2: bool = Field(False, description="The base model is SD 2.x.")
    v_parameterization: bool = Field(False, description="Train with v-prediction (SD 2.x 768-v, v-pred SDXL).")
    sdxl: bool = Field(False, description="The base model is SDXL.")
    no_half_vae: bool = Field(
        False, description="Keep the VAE in float32 under mixed precision (SDXL's VAE overflows in fp16)."
    )

    # --- dataset ----------------------------------------------------------------------------
    train_data_dir: Path | None = Field(
        None, description="Folder of kohya dataset folders named 'N_token class' (N = repeats)."
    )
    reg_data_dir: Path | None = Field(None, description="Folder of regularisation image folders ('N_class').")
    caption_extension: str = Field(".caption", description="Extension of caption files next to the images.")
    resolution: tuple[int, int] = Field(
        (512, 512), description="Training resolution (width, height); 768 or '768,768' are accepted."
    )
    enable_bucket: bool = Field(False, description="Aspect-ratio bucketing.")
    min_bucket_reso: int = Field(256, ge=1, description="Smallest bucket side in pixels.")
    max_bucket_reso: int = Field(1024, ge=1, description="Largest bucket side in pixels.")
    bucket_reso_steps: int = Field(64, ge=1, description="Bucket sides are multiples of this (a multiple of 8).")
    bucket_no_upscale: bool = Field(False, description="Never upscale an image to fit a bucket.")
    shuffle_caption: bool = Field(False, description="Shuffle comma-separated caption tags each time.")
    keep_tokens: int = Field(0, ge=0, description="Leading caption tags kept in place when shuffling.")
    keep_tokens_separator: str = Field(
        "", description="Tags before this separator stay in place when shuffling (overrides keep_tokens)."
    )
    caption_separator: str = Field(",", description="Separator between caption tags for shuffling and dropout.")
    caption_dropout_rate: float = Field(
        0.0, **_RATIO, description="Probability of training a sample with an empty caption."
    )
    caption_dropout_every_n_epochs: int = Field(0, ge=0, description="Drop all captions every N epochs (0: never).")
    caption_tag_dropout_rate: float = Field(0.0, **_RATIO, description="Probability of dropping each caption tag.")
    flip_aug: bool = Field(False, description="Random horizontal flips.")
    color_aug: bool = Field(False, description="Random hue shifts (cannot be combined with cached latents).")
    random_crop: bool = Field(
        False, description="Random instead of centre crop (cannot be combined with cached latents)."
    )
    weighted_captions: bool = Field(False, description="Read '(word:1.2)' weights in captions (not with SDXL).")
    max_token_length: Literal[75, 150, 225] = Field(75, description="Caption tokens per text-encoder pass.")
    cache_latents: bool = Field(False, description="Encode every image with the VAE once and keep the latents.")
    cache_latents_to_disk: bool = Field(False, description="Cache latents on disk (implies cache_latents).")
    latent_sampling: Literal["sample", "mean"] = Field(
        "sample",
        description="Per epoch, draw a fresh latent from the cached VAE distribution, or use its mean "
        "(sd-scripts caches one draw and reuses it).",
    )
    cache_dir: Path | None = Field(
        None, description="Latent and text-encoder cache folder shared across runs (default: user cache dir)."
    )
    cache_text_encoder_outputs: bool = Field(
        False, description="Cache text-encoder outputs (needs network_train_unet_only and fixed captions)."
    )
    cache_text_encoder_outputs_to_disk: bool = Field(
        False, description="Cache text-encoder outputs on disk (implies cache_text_encoder_outputs)."
    )
    max_data_loader_n_workers: int = Field(
        8, ge=0, description="Data-loader worker processes (capped at the CPU count)."
    )

    # --- run length -------------------------------------------------------------------------
    train_batch_size: int = Field(1, ge=1, description="Images per batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches per optimizer step.")
    max_train_epochs: int | None = Field(None, ge=1, description="Epochs to train (overrides max_train_steps).")
    max_train_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to train; sd-scripts' 1600 applies when both are unset."
    )
    steps_formula: Literal["sd-scripts", "kohya_gui"] = Field(
        "sd-scripts",
        description=(
            "How max_train_steps follows from the dataset: 'sd-scripts' (epochs x steps per epoch), or "
            "'kohya_gui' (the GUI's images*repeats/batch/accumulation*epochs, x2 with regularisation "
            "images; warm-up ratios rounded as the GUI does). Set by the kohya_ss GUI importer."
        ),
    )
    seed: int = Field(42, description="Random seed of the run (sd-scripts draws one when unset; loralab uses 42).")

    # --- optimizer and learning rate --------------------------------------------------------
    optimizer_type: str = Field(
        "AdamW", description="Optimizer: an sd-scripts name (DAdaptAdam, Prodigy, ...) or module.Class."
    )
    optimizer_args: dict[str, OptimizerArgValue] = Field(
        default_factory=dict,
        description="Extra optimizer keyword arguments; kohya's 'decouple=True betas=0.9,0.99' string or a table.",
    )
    learning_rate: float = Field(2e-6, ge=0.0, description="Base learning rate (1.0 for D-Adaptation / Prodigy).")
    unet_lr: float | None = Field(None, ge=0.0, description="UNet learning rate (unset: learning_rate).")
    text_encoder_lr: float | None = Field(
        None, ge=0.0, description="Text-encoder learning rate (unset: learning_rate)."
    )
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0: no clipping).")
    lr_scheduler: LrSchedulerName = Field("constant", description="Learning-rate schedule.")
    lr_warmup_steps: int | float = Field(
        0,
        description=(
            "Warm-up: an int is a number of steps, a float in [0, 1) a ratio of the total steps "
            "('10%' is accepted). The kohya_ss GUI importer stores its percentage as that ratio."
        ),
    )
    lr_scheduler_num_cycles: int = Field(1, ge=1, description="Restarts of cosine_with_restarts.")
    lr_scheduler_power: float = Field(1.0, description="Power of the polynomial schedule.")

    # --- network ----------------------------------------------------------------------------
    network_dim: int = Field(4, ge=1, description="LoRA rank of linear layers.")
    network_alpha: float = Field(1.0, ge=0.0, description="LoRA alpha (scale = alpha / rank; 0 means alpha = rank).")
    network_dropout: float | None = Field(None, **_RATIO, description="Dropout on the LoRA down projection's output.")
    rank_dropout: float | None = Field(None, **_RATIO, description="Dropout of whole ranks (sd-scripts network_args).")
    module_dropout: float | None = Field(
        None, **_RATIO, description="Probability of skipping a whole LoRA module (network_args)."
    )
    conv_dim: int | None = Field(
        None, ge=0, description="LoCon: rank of 3x3 conv layers (sd-scripts network_args conv_dim; unset/0: none)."
    )
    conv_alpha: float | None = Field(
        None, ge=0.0, description="LoCon: alpha of 3x3 conv layers (network_args conv_alpha)."
    )
    network_weights: Path | None = Field(None, description="LoRA file to start from.")
    dim_from_weights: bool = Field(False, description="Take the ranks from network_weights.")
    network_train_unet_only: bool = Field(False, description="Train only the UNet's LoRA.")
    network_train_text_encoder_only: bool = Field(False, description="Train only the text encoders' LoRA.")
    stop_text_encoder_training: int | None = Field(
        None, ge=0, description="Stop training the text encoders after this many steps."
    )
    scale_weight_norms: float | None = Field(
        None, ge=0.0, description="Max-norm regularisation of each LoRA module's weight (0/unset: off)."
    )
    training_comment: str | None = Field(None, description="Comment stored in the LoRA file's metadata.")

    # --- noise, timesteps and loss ----------------------------------------------------------
    noise_offset: float | None = Field(
        None, description="Offset noise strength (0/unset: off; around 0.05-0.1 typical)."
    )
    noise_offset_random_strength: bool = Field(False, description="Scale the offset by a random factor in [0, 1).")
    adaptive_noise_scale: float | None = Field(
        None, description="Add |latent mean| x this to the offset (needs noise_offset)."
    )
    multires_noise_iterations: int | None = Field(
        None, ge=0, description="Pyramid (multires) noise levels (0/unset: off)."
    )
    multires_noise_discount: float = Field(0.3, ge=0.0, description="Weight decay of each multires noise level.")
    min_timestep: int | None = Field(None, ge=0, le=1000, description="Lowest training timestep (default 0).")
    max_timestep: int | None = Field(None, ge=0, le=1000, description="Timesteps are drawn below this (default 1000).")
    min_snr_gamma: float | None = Field(
        None, ge=0.0, description="Min-SNR loss weighting gamma (0/unset: off; 5 typical)."
    )
    debiased_estimation_loss: bool = Field(False, description="Weight the loss by 1/sqrt(SNR).")
    scale_v_pred_loss_like_noise_pred: bool = Field(False, description="Scale a v-prediction loss like an eps loss.")
    v_pred_like_loss: float | None = Field(
        None, ge=0.0, description="Add a v-prediction-like loss term (eps models only)."
    )
    prior_loss_weight: float = Field(1.0, ge=0.0, description="Loss weight of regularisation images.")
    clip_skip: int | None = Field(
        None, ge=1, le=12, description="Use the text encoder's n-th layer from the end (1 or unset: the last)."
    )

    # --- precision and speed ----------------------------------------------------------------
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast dtype of the frozen model.")
    save_precision: Literal["float", "fp16", "bf16"] | None = Field(
        None, description="dtype of saved LoRA files (unset: the training dtype)."
    )
    full_fp16: bool = Field(False, description="Keep the LoRA weights in fp16 too (needs mixed_precision fp16).")
    full_bf16: bool = Field(False, description="Keep the LoRA weights in bf16 too (needs mixed_precision bf16).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    xformers: bool = Field(False, description="Use xformers attention.")
    sdpa: bool = Field(False, description="Use PyTorch scaled-dot-product attention.")
    num_cpu_threads_per_process: int | None = Field(
        None, ge=1, description="CPU threads of each training process (accelerate's option; unset: torch default)."
    )

    # --- outputs ----------------------------------------------------------------------------
    output_dir: Path | None = Field(None, description="Folder the LoRA files are written to.")
    output_name: str | None = Field(None, description="Base name of the LoRA files.")
    logging_dir: Path | None = Field(None, description="TensorBoard log folder.")
    save_every_n_epochs: int | None = Field(
        None, ge=0, description="Save a LoRA every N epochs (0/unset: only at the end)."
    )
    save_every_n_steps: int | None = Field(None, ge=0, description="Save a LoRA every N steps (0/unset: off).")
    save_last_n_epochs: int | None = Field(
        None,
        ge=0,
        description="Keep only the N newest per-epoch LoRA files (0/unset: keep all; sweeps always keep all).",
    )
    save_last_n_steps: int | None = Field(
        None,
        ge=0,
        description="Keep only the per-step LoRA files of the last N steps (0/unset: keep all; sweeps keep all).",
    )
    save_state: bool = Field(False, description="Also save the training state, to resume from.")
    resume: Path | None = Field(None, description="Saved training state to resume from.")

    # --- samples ----------------------------------------------------------------------------
    sample_prompts: list[str] | Path | None = Field(
        None,
        description=(
            "Prompts for sample images: a file (as sd-scripts) or a list of prompts with kohya's "
            "--n/--w/--h/--l/--s/--d options (as the kohya_ss GUI)."
        ),
    )
    sample_every_n_epochs: int | None = Field(None, ge=0, description="Render samples every N epochs (0/unset: off).")
    sample_every_n_steps: int | None = Field(None, ge=0, description="Render samples every N steps (0/unset: off).")
    sample_at_first: bool = Field(False, description="Render samples before the first step.")
    sample_sampler: SampleSamplerName | None = Field(
        None, description="Sampler for sample images (unset: euler_a for every family; sd-scripts defaults to ddim)."
    )

    @model_validator(mode="before")
    @classmethod
    def _empty_string_is_unset(cls, data: Any) -> Any:
        # The kohya_ss GUI and hand-written TOML use "" for "not set"; TOML has no null.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if not (isinstance(value, str) and value == "")}
        return data

    @field_validator("resolution", mode="before")
    @classmethod
    def _parse_resolution(cls, value: Any) -> Any:
        return parse_resolution(value)

    @field_validator("optimizer_args", mode="before")
    @classmethod
    def _parse_optimizer_args(cls, value: Any) -> Any:
        return parse_optimizer_args(value)

    @field_validator("lr_warmup_steps", mode="before")
    @classmethod
    def _parse_warmup(cls, value: Any) -> Any:
        return parse_warmup(value)

    @field_validator("optimizer_type")
    @classmethod
    def _canonical_optimizer_name(cls, value: str) -> str:
        # "adamw8bit" and "AdamW8bit" are the same optimizer in sd-scripts; store one spelling.
        from loralab.train.optimizers import resolve_optimizer

        return resolve_optimizer(value).name

    @field_validator("caption_extension")
    @classmethod
    def _check_caption_extension(cls, value: str) -> str:
        if not value.startswith("."):
            raise ConfigError(f"caption_extension {value!r} must start with a dot, e.g. '.txt'")
        return value

    @field_validator("sample_prompts", mode="before")
    @classmethod
    def _prompts_file_or_list(cls, value: Any) -> Any:
        # A string is a prompt file (sd-scripts' meaning); a list holds the prompts themselves.
        if isinstance(value, str):
            return Path(value)
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        from loralab.config.checks import check_config  # checks call into the pipeline stages

        check_config(self)
        return self


def parse_resolution(value: Any) -> Any:
    """``768``, ``"768"``, ``"768,512"``, ``[768, 512]`` -> ``(768, 512)`` (width, height)."""
    if isinstance(value, bool):
        raise ConfigError(f"resolution {value!r} is not a size; use e.g. 768 or '768,512'")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str):
        parts = [part.strip() for part in value.replace("x", ",").split(",")]
        try:
            sizes = [int(part) for part in parts]
        except ValueError:
            raise ConfigError(f"resolution {value!r} is not 'width,height' or one size, e.g. '768,512'") from None
        value = sizes
    if isinstance(value, list | tuple):
        if len(value) == 1:
            value = (value[0], value[0])
        if len(value) != 2:
            raise ConfigError(f"resolution {value!r} must be one size or width,height")
        return tuple(value)
    return value


def parse_warmup(value: Any) -> Any:
    """``lr_warmup_steps``: ints are steps, floats in [0, 1) ratios, ``"10%"`` a ratio."""
    if isinstance(value, bool):
        raise ConfigError(f"lr_warmup_steps {value!r} is not a number of steps or a ratio")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else (int(text) if text.isdigit() else float(text))
        except ValueError:
            raise ConfigError(f"lr_warmup_steps {value!r} is not a number of steps, a ratio or a percentage") from None
    if isinstance(value, float):
        if value < 0:
            raise ConfigError(f"lr_warmup_steps {value} is negative")
        if value >= 1:
            # As sd-scripts: a float of 1 or more is a number of steps.
            if not value.is_integer():
                raise ConfigError(f"lr_warmup_steps {value} is neither a whole number of steps nor a ratio below 1")
            return int(value)
    elif isinstance(value, int) and value < 0:
        raise ConfigError(f"lr_warmup_steps {value} is negative")
    return value
