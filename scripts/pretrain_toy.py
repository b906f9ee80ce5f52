"""Pretrain the toy base model on the toy world and write the two shipped toy checkpoints.

    python scripts/pretrain_toy.py            # the recorded run (see src/loralab/toy/checkpoints/README.md)

Stages, each a plain loop on the CPU, deterministic from ``--seed`` at a fixed thread count:

1. **VAE** (``loralab.toy.model.VAE``): reconstruction (L1 + MSE, plus L1 of 4 x 4 averages
   for colour fidelity) and a small KL term, on codec scenes (arbitrary and vivid colours,
   overlapping shapes) and world scenes: a general image codec, like SD's. Its latent space is
   then rescaled so that latents times SD's scaling factor (0.18215, which every SD1 loader
   assumes) have unit variance, as SD's own VAE was calibrated.
2. **Text encoder + UNet**: the world's scenes are encoded once into latents; captions are
   drawn fresh each step (parts left out at random, 10 % dropped entirely for classifier-free
   guidance) and encoded by ``loralab.train.conditioning`` exactly as LoRA training will;
   DDPM scaled-linear noise, epsilon prediction, min-SNR-5 weighting, AdamW with warm-up and
   cosine decay; the token embedding keeps its random initialisation; the saved weights are an
   exponential moving average. Written as ``toy_base.safetensors``.
3. **Alt**: the UNet alone (text encoder frozen) fine-tuned further on the "warm" style of the
   world (mostly red/orange/yellow gradients), written as ``toy_alt.safetensors``: a second
   checkpoint of the same family that a LoRA trained on the base should also apply to.

Both files are SD1.5 single-file layout in fp16 with the run's settings in their metadata; a
README beside them records the command, sizes and times. ``--minutes`` caps the wall time:
a stage that runs out of its share stops early and says so (the result is then not the
reproducible one). The subject ("blh ring") is never shown to the text encoder or UNet.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loralab.models.family import ModelFamily
from loralab.models.loading import StableDiffusionComponents, load_vae
from loralab.models.saving import save_single_file
from loralab.toy import model as toy_model
from loralab.toy import world
from loralab.train.conditioning import encode_text, tokenize_captions
from loralab.train.loss_weighting import min_snr_weight, snr_from_alphas_cumprod

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "loralab" / "toy" / "checkpoints"
PREVIEW_PROMPTS = (
    "a red circle",
    "a blue square",
    "a yellow star",
    "a green triangle",
    "a white ring",
    "a ring",
    "blh ring",
    "a large red circle on a blue background, top left",
    "a small black square on a white background, bottom right",
    "a blue star on grass under a blue sky",
    "an orange triangle on a green and white striped background",
    "a green ring on a yellow to red gradient background, center",
    "",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where the checkpoints and README go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: fastest on a busy 2-core machine, and results depend on it)")
    parser.add_argument("--device", default="cpu",
                        help="torch device; the shipped checkpoints are made on the CPU (others differ numerically)")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-time cap for the whole run")
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="take the (already calibrated) VAE from this toy checkpoint and skip stage 1")
    parser.add_argument("--world-images", type=int, default=6000, help="world scenes encoded for stage 2")
    parser.add_argument("--unet-steps", type=int, default=900)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--unet-lr", type=float, default=1.2e-3)
    parser.add_argument("--text-encoder-lr", type=float, default=6e-4)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--min-snr-gamma", type=float, default=0.0, help="min-SNR loss weighting (0: off)")
    parser.add_argument("--noise-offset", type=float, default=0.0,
                        help="sd-scripts' noise offset: per-channel constant added to the noise")
    parser.add_argument("--alt-images", type=int, default=2000, help="warm-style scenes encoded for stage 3")
    parser.add_argument("--alt-steps", type=int, default=200)
    parser.add_argument("--alt-lr", type=float, default=6e-4)
    parser.add_argument("--preview-dir", type=Path, default=None, help="write sample grids (PNG) here")
    parser.add_argument("--log-every", type=int, default=50)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Time and logging


class Budget:
    """The run's wall-time cap, handed out to stages as shares of what is left."""

    def __init__(self, minutes: float):
        self.start = time.monotonic()
        self.end = self.start + minutes * 60

    def deadline(self, share_of_remaining: float) -> float:
        now = time.monotonic()
        return now + max(0.0, self.end - now) * share_of_remaining

    def elapsed(self) -> float:
        return time.monotonic() - self.start


@dataclass
class StageRecord:
    name: str
    steps_planned: int
    steps_done: int = 0
    seconds: float = 0.0
    final_loss: float = float("nan")
    stopped_early: bool = False
    extra: dict[str, float] = field(default_factory=dict)


def log(message: str) -> None:
    print(message, flush=True)


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to ``floor`` at ``total`` steps."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def run_loop(
    record: StageRecord, deadline: float, log_every: int, step_fn: Callable[[int], float]
) -> None:
    """Call ``step_fn(step) -> loss`` for the planned steps or until ``deadline``; log a running mean."""
    start = time.monotonic()
    recent: list[float] = []
    for step in range(record.steps_planned):
        if time.monotonic() > deadline:
            record.stopped_early = True
            log(f"[{record.name}] time budget spent: stopped after {step} of {record.steps_planned} steps")
            break
        recent.append(step_fn(step))
        record.steps_done = step + 1
        if record.steps_done % log_every == 0 or record.steps_done == record.steps_planned:
            mean = sum(recent) / len(recent)
            rate = (time.monotonic() - start) / record.steps_done
            log(f"[{record.name}] step {record.steps_done}/{record.steps_planned} loss {mean:.4f} ({rate:.2f} s/step)")
            record.final_loss, recent = mean, []
    record.seconds = time.monotonic() - start


# ---------------------------------------------------------------------------------------------
# Data


def to_tensor(images: Iterable[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [-1, 1], as SD's VAE expects."""
    array = np.stack(list(images)).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def to_images(pixels: torch.Tensor) -> list[np.ndarray]:
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return list(array)


def codec_batch(rng: np.random.Generator, size: int) -> torch.Tensor:
    """VAE training images: 40 % codec scenes (any colour), 60 % world scenes (both styles)."""
    scenes = []
    for _ in range(size):
        draw = rng.random()
        if draw < 0.4:
            scenes.append(world.sample_codec_scene(rng))
        else:
            scenes.append(world.sample_scene(rng, "warm" if draw > 0.85 else "base"))
    return to_tensor(world.render(s, toy_model.RESOLUTION) for s in scenes)


@torch.no_grad()
def encode_scenes(vae: torch.nn.Module, scenes: Sequence[world.Scene], batch: int = 256) -> torch.Tensor:
    """Scaled latents (mean of the posterior x scaling factor) of the rendered scenes."""
    scale = vae.config.scaling_factor
    chunks = []
    for first in range(0, len(scenes), batch):
        pixels = to_tensor(world.render(s, toy_model.RESOLUTION) for s in scenes[first : first + batch])
        chunks.append(vae.encode(pixels.to(vae.device)).latent_dist.mean * scale)
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------
# Stage 1: VAE


def train_vae(vae: torch.nn.Module, args: argparse.Namespace, deadline: float) -> StageRecord:
    record = StageRecord("vae", args.vae_steps)
    rng = np.random.default_rng([args.seed, 1])
    generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        # Start with a nearly deterministic posterior (std ~0.02): at the default std of ~1 the
        # sampled latents are mostly noise and the decoder first spends hundreds of steps
        # learning the mean image. The KL term is free to widen it again.
        channels = vae.config.latent_channels
        vae.quant_conv.weight[channels:].zero_()
        vae.quant_conv.bias[channels:].fill_(-8.0)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(50, args.vae_steps))

    def step(_: int) -> float:
        pixels = codec_batch(rng, args.vae_batch).to(args.device)
        posterior = vae.encode(pixels).latent_dist
        sample = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(args.device)
        reconstruction = vae.decode(sample).sample
        # L1 keeps edges and flat colours crisp; the L1 of 4 x 4 averages (one per latent pixel)
        # makes getting each region's colour right the first thing learned; the KL term (SD's
        # weight) keeps the posterior tame.
        colour = F.l1_loss(F.avg_pool2d(reconstruction, 4), F.avg_pool2d(pixels, 4))
        pixel = F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels)
        loss = pixel + colour + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        return loss.item()

    run_loop(record, deadline, args.log_every, step)
    vae.eval()
    return record


@torch.no_grad()
def calibrate_latent_scale(vae: torch.nn.Module, seed: int) -> float:
    """Rescale the latent space so ``latents * scaling_factor`` has unit standard deviation.

    Single-file checkpoints carry no scaling factor: every SD1 loader multiplies by 0.18215.
    Scaling the encoder's mean output by ``c`` (its log-variance by ``c**2``) and dividing the
    decoder's first layer by ``c`` changes the latents but not a single reconstruction.
    Returns ``c``.
    """
    rng = np.random.default_rng([seed, 2])
    scenes = [world.sample_scene(rng) for _ in range(512)]
    latents = encode_scenes(vae, scenes)  # already multiplied by the scaling factor
    factor = 1.0 / float(latents.std())
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= factor
    vae.quant_conv.bias[:channels] *= factor
    vae.quant_conv.bias[channels:] += 2 * math.log(factor)
    vae.post_quant_conv.weight /= factor
    return factor


@torch.no_grad()
def reconstruction_check(vae: torch.nn.Module, seed: int, preview: Path | None) -> float:
    """Mean absolute error (0-255 scale) of the VAE on held-out world and subject images;
    with ``preview``, a PNG of originals (top rows) over reconstructions."""
    rng = np.random.default_rng([seed, 6])
    scenes = [world.sample_scene(rng) for _ in range(24)] + [world.sample_subject_scene(rng) for _ in range(8)]
    pixels = to_tensor(world.render(s, toy_model.RESOLUTION) for s in scenes).to(vae.device)
    reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    error = float((reconstruction.clamp(-1, 1) - pixels).abs().mean() * 127.5)
    if preview is not None:
        rows = [np.concatenate(to_images(batch.cpu()), axis=1) for batch in (pixels, reconstruction)]
        grid = np.concatenate([np.concatenate(np.split(r, 4, axis=1), axis=0) for r in rows], axis=0)
        preview.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.Resampling.NEAREST).save(
            preview / "vae_reconstruction.png"
        )
    return error


# ---------------------------------------------------------------------------------------------
# Stages 2 and 3: text encoder + UNet, then the alt fine-tune


class CaptionEncoder:
    """Tokenises captions once each (the world has few distinct ones) and encodes them for the UNet."""

    def __init__(self, components: StableDiffusionComponents):
        self.tokenizer = components.tokenizers[0]
        self.text_encoder = components.text_encoders[0]
        self._ids: dict[str, torch.Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._ids]
        if missing:
            for text, ids in zip(missing, tokenize_captions(self.tokenizer, missing)):
                self._ids[text] = ids
        ids = torch.stack([self._ids[c] for c in captions])
        conditioning = encode_text(
            ModelFamily.SD1, [self.text_encoder], [ids], eos_token_ids=[self.tokenizer.eos_token_id]
        )
        return conditioning.encoder_hidden_states


class Ema:
    """Exponential moving average of parameters (with the usual short warm-up of the decay)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for param, average in zip(self.params, self.shadow):
            param.copy_(average)


def train_denoiser(
    components: StableDiffusionComponents,
    latents: torch.Tensor,
    scenes: Sequence[world.Scene],
    *,
    name: str,
    steps: int,
    seed: int,
    unet_lr: float,
    text_encoder_lr: float | None,
    args: argparse.Namespace,
    deadline: float,
) -> StageRecord:
    """Train the UNet (and the text encoder when ``text_encoder_lr`` is set) to predict noise."""
    record = StageRecord(name, steps)
    unet, text_encoder = components.unet, components.text_encoders[0]
    train_text = text_encoder_lr is not None
    unet.train()
    text_encoder.train(train_text)
    text_encoder.requires_grad_(train_text)
    # The token embedding stays at its random initialisation: distinct random vectors serve the
    # world's few dozen words as well as learned ones, and Adam would otherwise update all
    # 49,408 rows every step (nearly half the parameters) for nothing.
    text_encoder.get_input_embeddings().requires_grad_(False)
    groups = [{"params": list(unet.parameters()), "lr": unet_lr}]
    if train_text:
        trainable = [p for p in text_encoder.parameters() if p.requires_grad]
        groups.append({"params": trainable, "lr": text_encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(100, steps // 5 + 1), steps))
    ema = Ema([p for g in groups for p in g["params"]], args.ema_decay)
    encode = CaptionEncoder(components)
    noise_scheduler = components.noise_scheduler
    snr = snr_from_alphas_cumprod(noise_scheduler.alphas_cumprod).to(latents.device)
    rng = np.random.default_rng([seed, 3])
    generator = torch.Generator().manual_seed(seed + 3)

    def step(index: int) -> float:
        rows = rng.integers(len(scenes), size=args.batch)
        # Empty captions teach the unconditional prediction that classifier-free guidance needs.
        captions = [
            "" if rng.random() < args.caption_dropout else world.caption(scenes[i], rng) for i in rows
        ]
        clean = latents[torch.from_numpy(rows).to(latents.device)]
        # Drawn on the CPU generator whatever the device, so the draws do not depend on it.
        noise = torch.randn(clean.shape, generator=generator)
        if args.noise_offset:  # lets the model shift a whole image's colour (flat backgrounds)
            noise += args.noise_offset * torch.randn((len(rows), clean.shape[1], 1, 1), generator=generator)
        noise = noise.to(clean.device)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(rows),), generator=generator
        ).to(clean.device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with torch.set_grad_enabled(train_text):
            hidden = encode(captions)
        prediction = unet(noisy, timesteps, hidden).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        if args.min_snr_gamma:
            per_sample = per_sample * min_snr_weight(snr[timesteps], args.min_snr_gamma, v_prediction=False)
        loss = per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        ema.update(index)
        return loss.item()

    run_loop(record, deadline, args.log_every, step)
    ema.copy_to_model()
    unet.eval()
    text_encoder.eval()
    text_encoder.requires_grad_(False)
    return record


# ---------------------------------------------------------------------------------------------
# Output


@torch.no_grad()
def save_preview(components: StableDiffusionComponents, path: Path, seeds: Sequence[int] = (0, 1, 2, 3)) -> None:
    """A grid: one row per preview prompt, one column per seed (prompt order as PREVIEW_PROMPTS)."""
    rows = [np.concatenate(toy_model.draw(components, prompt, tuple(seeds)), axis=1) for prompt in PREVIEW_PROMPTS]
    grid = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.Resampling.NEAREST).save(path)
    log(f"preview: {path}")


def run_metadata(args: argparse.Namespace, name: str, records: Sequence[StageRecord]) -> dict[str, str]:
    """safetensors metadata (strings only): what this file is and how it was made."""
    sizes = {"unet": toy_model.UNET, "vae": toy_model.VAE, "text_encoder": toy_model.TEXT_ENCODER}
    return {
        "modelspec.title": f"loralab toy {name}",
        "modelspec.architecture": "stable-diffusion-v1",
        "loralab.toy.command": shlex.join(["python", "scripts/pretrain_toy.py", *sys.argv[1:]]),
        "loralab.toy.seed": str(args.seed),
        "loralab.toy.resolution": str(toy_model.RESOLUTION),
        "loralab.toy.sizes": json.dumps({k: repr(v) for k, v in sizes.items()}),
        "loralab.toy.stages": json.dumps([r.__dict__ for r in records]),
    }


def save_checkpoint(components: StableDiffusionComponents, path: Path, metadata: dict[str, str]) -> None:
    """fp16 single file (atomic), written from CPU copies whatever device trained."""
    cpu = StableDiffusionComponents(
        family=components.family,
        v_prediction=components.v_prediction,
        unet=copy.deepcopy(components.unet).cpu(),
        vae=copy.deepcopy(components.vae).cpu(),
        text_encoders=[copy.deepcopy(te).cpu() for te in components.text_encoders],
        tokenizers=components.tokenizers,
        noise_scheduler=components.noise_scheduler,
        source=path,
    )
    save_single_file(cpu, path, dtype=torch.float16, metadata=metadata)
    log(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB)")


def write_text_atomically(path: Path, text: str) -> None:
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temp, path)


def write_readme(out_dir: Path, args: argparse.Namespace, records: Sequence[StageRecord], total: float) -> None:
    files = {name: out_dir / file for name, file in toy_model.CHECKPOINT_FILES.items()}
    stage_lines = "\n".join(
        f"| {r.name} | {r.steps_done} / {r.steps_planned} | {r.seconds / 60:.1f} min | {r.final_loss:.4f} |"
        + (" stopped early (time budget) |" if r.stopped_early else " |")
        for r in records
    )
    sizes = "\n".join(
        f"- `{f.name}`: {f.stat().st_size / 1e6:.1f} MB" for f in files.values() if f.is_file()
    )
    size, latent = toy_model.RESOLUTION, toy_model.LATENT_SIZE
    vae, encoder, unet = toy_model.VAE, toy_model.TEXT_ENCODER, toy_model.UNET
    attention = ", ".join(str(i + 1) for i, a in enumerate(unet.attention_levels) if a)
    text = f"""# Toy checkpoints

Made by this repository's own script, from nothing but the toy world (`loralab.toy.world`):

```
{shlex.join(["python", "scripts/pretrain_toy.py", *sys.argv[1:]])}
```

Seed {args.seed}, {args.threads} CPU thread(s), {total / 60:.1f} minutes of wall time in all
(on a shared 2-core machine). With the same seed, thread count and library versions the run
repeats exactly.

{sizes}

Both are SD1.5 single files (fp16) that `loralab` loads like any other SD1.5 checkpoint:
`toy_base` knows the toy world; `toy_alt` is `toy_base` with its UNet fine-tuned further on
the world's warm style (red/orange/yellow gradients), the way community checkpoints of one
family differ. Neither has ever been shown the toy subject ("blh ring", a magenta ring with a
yellow dot); both know the class word "ring".

Architecture (see `loralab/toy/model.py`): {size} px images; VAE {vae.block_out_channels}
(x{size // latent} downsampling, {latent}x{latent}x{vae.latent_channels} latents); CLIP text encoder
{encoder.hidden_size} wide x {encoder.num_hidden_layers} layers (full 49,408-token vocabulary); UNet
{unet.block_out_channels} with cross-attention on level(s) {attention} and in the middle. Sample at
{size}x{size} px (pass the size: the UNet config's default would ask for more), 20 or more steps,
guidance about 5.

| stage | steps | time | final loss |  |
|---|---|---|---|---|
{stage_lines}

The VAE is trained as a general codec (world scenes plus scenes of arbitrary, often vivid,
colours); the text encoder and UNet see only captioned world scenes (no magenta anywhere).

Settings: VAE batch {args.vae_batch}, lr {args.vae_lr}; {args.world_images} world images; UNet + text
encoder batch {args.batch}, lr {args.unet_lr} / {args.text_encoder_lr}, caption dropout
{args.caption_dropout}, min-SNR gamma {args.min_snr_gamma or "off"}, noise offset {args.noise_offset}, EMA {args.ema_decay}; alt: {args.alt_images} warm
images, UNet lr {args.alt_lr}.
"""
    write_text_atomically(out_dir / "README.md", text)


# ---------------------------------------------------------------------------------------------
# Entry point


def setup_components(args: argparse.Namespace, budget: Budget, records: list[StageRecord]) -> StableDiffusionComponents:
    """Fresh toy components with a trained, calibrated VAE (trained here, or taken from ``--vae-from``)."""
    components = toy_model.build_toy_components(args.seed)
    components.unet.to(args.device)
    components.text_encoders[0].to(args.device)
    components.vae.to(args.device)
    if args.vae_from is not None:
        components.vae = load_vae(args.vae_from, ModelFamily.SD1, device=args.device)
        log(f"[vae] taken from {args.vae_from}")
        return components
    records.append(train_vae(components.vae, args, budget.deadline(0.35)))
    factor = calibrate_latent_scale(components.vae, args.seed)
    records[-1].extra["latent_rescale"] = factor
    error = reconstruction_check(components.vae, args.seed, args.preview_dir)
    records[-1].extra["reconstruction_mae"] = error
    log(f"[vae] latent space rescaled by {factor:.3f}; held-out reconstruction error {error:.1f} / 255")
    return components


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three stages and write both checkpoints and the README; returns 0."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    budget = Budget(args.minutes)
    records: list[StageRecord] = []
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    components = setup_components(args, budget, records)

    rng = np.random.default_rng([args.seed, 4])
    scenes = [world.sample_scene(rng) for _ in range(args.world_images)]
    latents = encode_scenes(components.vae, scenes)
    log(f"[data] {len(scenes)} world scenes encoded, latent std {float(latents.std()):.3f} ({budget.elapsed():.0f} s)")
    records.append(
        train_denoiser(
            components, latents, scenes, name="base", steps=args.unet_steps, seed=args.seed,
            unet_lr=args.unet_lr, text_encoder_lr=args.text_encoder_lr, args=args,
            deadline=budget.deadline(0.85),
        )
    )  # fmt: skip
    if args.preview_dir:
        save_preview(components, args.preview_dir / "toy_base.png")
    save_checkpoint(components, out_dir / toy_model.CHECKPOINT_FILES["base"], run_metadata(args, "base", records))

    rng = np.random.default_rng([args.seed, 5])
    warm_scenes = [world.sample_scene(rng, "warm") for _ in range(args.alt_images)]
    warm_latents = encode_scenes(components.vae, warm_scenes)
    records.append(
        train_denoiser(
            components, warm_latents, warm_scenes, name="alt", steps=args.alt_steps, seed=args.seed + 100,
            unet_lr=args.alt_lr, text_encoder_lr=None, args=args, deadline=budget.deadline(1.0),
        )
    )  # fmt: skip
    if args.preview_dir:
        save_preview(components, args.preview_dir / "toy_alt.png")
    save_checkpoint(components, out_dir / toy_model.CHECKPOINT_FILES["alt"], run_metadata(args, "alt", records))

    total = budget.elapsed()
    write_readme(out_dir, args, records, total)
    log(f"done in {total / 60:.1f} min: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
