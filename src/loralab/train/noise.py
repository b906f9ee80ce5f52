"""Noise and timesteps for a training batch, as sd-scripts draws them, split-invariant.

Every random number a sample needs (its timestep, its gaussian noise, its noise-offset
strength and per-channel offsets, its multires layers) comes from generators seeded by
``(seed, global_step, sample_index, stream)``. A sample therefore gets the same noise and
timestep whether it is trained in a batch of 8 on one process or in a batch of 2 on four
processes with accumulation: the loop only has to number samples the same way (their
position in the optimizer step's full batch).

Features and their sd-scripts names:

- ``noise_offset``: ``noise += noise_offset * randn(C, 1, 1)`` (a per-channel shift,
  crosslabs "offset noise").
- ``noise_offset_random_strength``: the offset is scaled by ``U[0, 1)``.
- ``adaptive_noise_scale``: ``offset = clamp(offset + adaptive_noise_scale * |mean_c(latent)|,
  min=0)`` per channel, only when ``noise_offset`` is set (as sd-scripts).
- ``multires_noise_iterations`` / ``multires_noise_discount``: pyramid noise; each
  iteration ``i`` adds bilinearly upsampled noise drawn at ``size / r**i`` (``r`` in
  ``[2, 4)``) weighted by ``discount**i``, then the result is scaled to unit std.
- ``min_timestep`` / ``max_timestep``: timesteps uniform in ``[min, max)``; ``min == max``
  fixes the timestep.

Deliberate differences from sd-scripts, all needed for split invariance: the random
strength is drawn per sample (sd-scripts draws one per batch), and pyramid noise is
normalised by each sample's own std (sd-scripts divides by the std of the whole batch).
Both are the same in distribution.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loralab.errors import ConfigError

# The DDPM schedule SD1.x/SD2.x/SDXL were trained with has 1000 steps.
NUM_TRAIN_TIMESTEPS = 1000
# sd-scripts' default for --multires_noise_discount.
DEFAULT_MULTIRES_DISCOUNT = 0.3


class NoiseStream(enum.IntEnum):
    """Independent random streams of one sample; switching one feature on leaves the others' draws unchanged."""

    TIMESTEP = 0
    NOISE = 1
    OFFSET = 2
    MULTIRES = 3


@dataclass(frozen=True)
class NoiseSettings:
    """The noise and timestep options of a run (sd-scripts argument names)."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = DEFAULT_MULTIRES_DISCOUNT
    min_timestep: int | None = None
    max_timestep: int | None = None
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    @classmethod
    def from_config(cls, config: Any) -> NoiseSettings:
        """Read the settings from a ``TrainConfig`` (fields it lacks keep their defaults)."""
        names = [f for f in cls.__dataclass_fields__ if f != "num_train_timesteps"]
        values = {name: getattr(config, name) for name in names if getattr(config, name, None) is not None}
        return cls(**values)

    def timestep_range(self) -> tuple[int, int]:
        """``(min, max)`` with sd-scripts' defaults filled in; raises ``ConfigError`` when out of range."""
        low = 0 if self.min_timestep is None else int(self.min_timestep)
        high = self.num_train_timesteps if self.max_timestep is None else int(self.max_timestep)
        if not 0 <= low <= high <= self.num_train_timesteps:
            raise ConfigError(
                f"min_timestep={low} / max_timestep={high} must satisfy "
                f"0 <= min_timestep <= max_timestep <= {self.num_train_timesteps}"
            )
        if low == high == self.num_train_timesteps:
            raise ConfigError(
                f"min_timestep = max_timestep = {high} is past the last timestep; use at most {high - 1}"
            )
        return low, high


@dataclass(frozen=True)
class NoiseBatch:
    """What the loop adds to a batch of latents: noise shaped like the latents, one timestep per sample."""

    noise: torch.Tensor
    timesteps: torch.Tensor


def sample_generator(seed: int, global_step: int, sample_index: int, stream: NoiseStream) -> torch.Generator:
    """A CPU generator owned by one sample of one optimizer step.

    The seed is a hash of the four numbers, so neighbouring steps/samples get unrelated
    streams. Draws stay on the CPU generator so the numbers do not depend on the device.
    """
    packed = struct.pack("<qqqq", int(seed), int(global_step), int(sample_index), int(stream))
    derived = int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little")
    return torch.Generator(device="cpu").manual_seed(derived)


def sample_timesteps(
    seed: int,
    global_step: int,
    sample_indices: Sequence[int],
    settings: NoiseSettings,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One timestep per sample, uniform in ``[min_timestep, max_timestep)`` (fixed when equal)."""
    low, high = settings.timestep_range()
    if low == high:
        return torch.full((len(sample_indices),), high, dtype=torch.long, device=device)
    draws = [
        torch.randint(low, high, (1,), generator=sample_generator(seed, global_step, i, NoiseStream.TIMESTEP))
        for i in sample_indices
    ]
    return torch.cat(draws).to(device)


def apply_noise_offset(
    noise: torch.Tensor,
    channel_offsets: torch.Tensor,
    noise_offset: torch.Tensor | float,
    *,
    latents: torch.Tensor | None = None,
    adaptive_noise_scale: float | None = None,
) -> torch.Tensor:
    """sd-scripts' offset noise: ``noise + offset * channel_offsets``.

    ``channel_offsets`` is standard normal of shape ``(B, C, 1, 1)``; ``noise_offset`` a
    scalar or one strength per sample. With ``adaptive_noise_scale`` (which needs the
    ``latents``) the offset grows with the absolute per-channel mean of each latent and is
    clamped at 0, since a negative scale could otherwise flip the offset's sign.
    """
    offset = torch.as_tensor(noise_offset, dtype=noise.dtype, device=noise.device)
    offset = offset.reshape(-1, 1, 1, 1) if offset.ndim else offset
    if adaptive_noise_scale is not None:
        if latents is None:
            raise ValueError("adaptive_noise_scale needs the latents")
        latent_mean = latents.to(noise.device, noise.dtype).mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(offset + adaptive_noise_scale * latent_mean, min=0.0)
    return noise + offset * channel_offsets


def pyramid_noise_like(
    noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float
) -> torch.Tensor:
    """Multi-resolution noise for ONE sample ``(C, H, W)``, as sd-scripts' ``pyramid_noise_like``.

    Iteration ``i`` draws noise at ``(H, W) / r**i`` with ``r`` uniform in ``[2, 4)`` (so
    ``i = 0`` is full resolution), upsamples it bilinearly and adds it with weight
    ``discount**i``; it stops after the first 1-pixel level. The sum is divided by its std.
    """
    channels, height, width = noise.shape
    result = noise.clone()
    for i in range(iterations):
        ratio = float(torch.rand(1, generator=generator)) * 2 + 2
        level_h = max(1, int(height / ratio**i))
        level_w = max(1, int(width / ratio**i))
        level = torch.randn((1, channels, level_h, level_w), generator=generator, dtype=noise.dtype)
        upsampled = F.interpolate(level, size=(height, width), mode="bilinear", align_corners=False)[0]
        result += upsampled * discount**i
        if level_h == 1 or level_w == 1:
            break
    return result / result.std()


def draw_noise_and_timesteps(
    latents: torch.Tensor,
    *,
    seed: int,
    global_step: int,
    sample_indices: Sequence[int],
    settings: NoiseSettings,
) -> NoiseBatch:
    """Noise (offset and multires applied, in sd-scripts' order) and timesteps for a batch.

    ``sample_indices`` numbers each latent by its place in the optimizer step's full batch
    (the same numbering however the batch is split over processes and accumulation). The
    noise is returned on the latents' device and dtype.
    """
    if latents.ndim != 4 or latents.shape[0] != len(sample_indices):
        raise ValueError(
            f"latents {tuple(latents.shape)} need shape (B, C, H, W) with B = {len(sample_indices)} sample indices"
        )
    shape = latents.shape[1:]
    noise = torch.stack(
        [
            torch.randn(shape, generator=sample_generator(seed, global_step, i, NoiseStream.NOISE))
            for i in sample_indices
        ]
    )

    if settings.noise_offset:  # sd-scripts skips both offset options when noise_offset is 0 or unset
        strengths, channel_offsets = [], []
        for i in sample_indices:
            gen = sample_generator(seed, global_step, i, NoiseStream.OFFSET)
            strength = float(settings.noise_offset)
            if settings.noise_offset_random_strength:
                strength *= float(torch.rand(1, generator=gen))
            strengths.append(strength)
            channel_offsets.append(torch.randn((shape[0], 1, 1), generator=gen))
        noise = apply_noise_offset(
            noise,
            torch.stack(channel_offsets),
            torch.tensor(strengths),
            latents=latents.detach(),
            adaptive_noise_scale=settings.adaptive_noise_scale,
        )

    if settings.multires_noise_iterations:
        noise = torch.stack(
            [
                pyramid_noise_like(
                    sample_noise,
                    sample_generator(seed, global_step, i, NoiseStream.MULTIRES),
                    settings.multires_noise_iterations,
                    settings.multires_noise_discount,
                )
                for sample_noise, i in zip(noise, sample_indices)
            ]
        )

    timesteps = sample_timesteps(seed, global_step, sample_indices, settings, device=latents.device)
    return NoiseBatch(noise=noise.to(device=latents.device, dtype=latents.dtype), timesteps=timesteps)


class ForwardDiffusion:
    """The model's DDPM forward process: diffusers' ``add_noise`` and ``get_velocity`` with the same
    arithmetic (bit for bit), the square roots of ``alphas_cumprod`` tabulated once per dtype instead
    of recomputed, cast and reshaped on every batch (a dozen small tensor operations each time)."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        self.alphas_cumprod = alphas_cumprod
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise``."""
        signal, noise_scale = self._scales(latents, timesteps)
        return signal * latents + noise_scale * noise

    def velocity(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``sqrt(a_t) noise - sqrt(1 - a_t) x_0``."""
        signal, noise_scale = self._scales(latents, timesteps)
        return signal * noise - noise_scale * latents

    def _scales(self, latents: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``sqrt(a_t)`` and ``sqrt(1 - a_t)``, shaped to broadcast over ``latents``."""
        key = (latents.device, latents.dtype)
        tables = self._tables.get(key)
        if tables is None:
            # diffusers casts alphas_cumprod to the samples' dtype first, then takes the roots.
            alphas = self.alphas_cumprod.to(device=latents.device, dtype=latents.dtype)
            tables = self._tables[key] = (alphas**0.5, (1 - alphas) ** 0.5)
        shape = (-1,) + (1,) * (latents.dim() - 1)
        index = timesteps.to(latents.device)
        return tables[0][index].reshape(shape), tables[1][index].reshape(shape)
