"""Sampler names as A1111 and kohya users write them, mapped to diffusers schedulers.

A1111 names (``Euler a``, ``DPM++ 2M Karras`` ...) and kohya's ``sample_sampler`` names
(``euler_a``, ``k_euler``, ``dpmsolver++`` ...) resolve to one :class:`SamplerSpec`: the diffusers
scheduler class, its options, and the A1111 name and schedule type written into PNG info (so
A1111 and civitai show a name they know). Names are matched without regard to case and
spacing; an unknown name raises ``SamplerError`` listing the known ones.

Schedules follow A1111's defaults where diffusers has the equivalent: the k-diffusion samplers
(Euler, Heun, LMS, DPM2, DPM++) step through timesteps spaced evenly from 999 to 0
(``timestep_spacing="linspace"``), ``Karras`` variants use Karras sigmas; DDIM and PLMS keep the
model's own spacing (``leading`` with ``steps_offset=1``, as A1111's "uniform" DDIM
discretisation). Every scheduler is built from the checkpoint's training noise schedule, so its
betas and prediction type (epsilon or v) are the model's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from loralab.errors import LoralabError


class SamplerError(LoralabError):
    """An unknown sampler name."""


@dataclass(frozen=True)
class SamplerSpec:
    """How to build one sampler: diffusers class and options, and its A1111 name and schedule type."""

    a1111_name: str  # "DPM++ 2M"
    schedule_type: str  # A1111's "Schedule type": "Automatic", "Karras"
    scheduler_class: str  # diffusers class name
    options: dict[str, Any] = field(default_factory=dict)
    seeded_noise: bool = False  # the scheduler draws its noise from its own seeded source (DPM++ SDE)

    @property
    def display_name(self) -> str:
        """The single-string name (A1111 before 1.9): "DPM++ 2M Karras"."""
        return self.a1111_name if self.schedule_type == "Automatic" else f"{self.a1111_name} {self.schedule_type}"


_K_DIFFUSION = {"timestep_spacing": "linspace"}
_KARRAS = {**_K_DIFFUSION, "use_karras_sigmas": True}


def _spec(name: str, cls: str, options: dict[str, Any] | None = None, *, karras: bool = False, **kw: Any) -> SamplerSpec:
    opts = {**(_KARRAS if karras else _K_DIFFUSION), **(options or {})}
    return SamplerSpec(name, "Karras" if karras else "Automatic", cls, opts, **kw)


# A1111's sampler list (those diffusers can reproduce), keyed by their displayed names.
A1111_SAMPLERS: dict[str, SamplerSpec] = {
    spec.display_name: spec
    for spec in (
        _spec("Euler a", "EulerAncestralDiscreteScheduler"),
        _spec("Euler", "EulerDiscreteScheduler"),
        _spec("LMS", "LMSDiscreteScheduler"),
        _spec("LMS", "LMSDiscreteScheduler", karras=True),
        _spec("Heun", "HeunDiscreteScheduler"),
        _spec("DPM2", "KDPM2DiscreteScheduler"),
        _spec("DPM2", "KDPM2DiscreteScheduler", karras=True),
        _spec("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
        _spec("DPM2 a", "KDPM2AncestralDiscreteScheduler", karras=True),
        _spec("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
        _spec("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, karras=True),
        _spec("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
        _spec("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, karras=True),
        _spec("DPM++ SDE", "DPMSolverSDEScheduler", seeded_noise=True),
        _spec("DPM++ SDE", "DPMSolverSDEScheduler", karras=True, seeded_noise=True),
        _spec("UniPC", "UniPCMultistepScheduler"),
        SamplerSpec("DDIM", "Automatic", "DDIMScheduler", {"set_alpha_to_one": False}),
        SamplerSpec("PLMS", "Automatic", "PNDMScheduler", {"skip_prk_steps": True}),
        SamplerSpec("DDPM", "Automatic", "DDPMScheduler"),
    )
}

# kohya's sample_sampler names (sd-scripts' list) and what they are in A1111's terms.
KOHYA_SAMPLERS: dict[str, str] = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "k_lms": "LMS",
    "euler": "Euler",
    "k_euler": "Euler",
    "euler_a": "Euler a",
    "k_euler_a": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a",
    "k_dpm_2_a": "DPM2 a",
    "dpmsolver++": "DPM++ 2M",
}
# sd-scripts' two names for diffusers schedulers A1111 has no entry for.
_KOHYA_ONLY: dict[str, SamplerSpec] = {
    "dpmsolver": SamplerSpec("DPM Solver", "Automatic", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsingle": SamplerSpec("DPM Solver single-step", "Automatic", "DPMSolverSinglestepScheduler"),
}


def _key(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower())


_LOOKUP: dict[str, SamplerSpec] = {
    **{_key(name): spec for name, spec in A1111_SAMPLERS.items()},
    **{_key(name): A1111_SAMPLERS[a1111] for name, a1111 in KOHYA_SAMPLERS.items()},
    **{_key(name): spec for name, spec in _KOHYA_ONLY.items()},
}


def known_sampler_names() -> list[str]:
    """Every name :func:`resolve_sampler` accepts: A1111's, then kohya's."""
    return [*A1111_SAMPLERS, *KOHYA_SAMPLERS, *_KOHYA_ONLY]


def resolve_sampler(name: str, schedule_type: str | None = None) -> SamplerSpec:
    """The sampler called ``name`` (A1111 or kohya spelling, any case).

    ``schedule_type`` is A1111's separate "Schedule type" (1.9+): ``Karras`` turns ``DPM++ 2M`` into
    ``DPM++ 2M Karras``; ``Automatic`` or None keeps the name as it is.
    """
    key = _key(name)
    if schedule_type and _key(schedule_type) not in ("automatic", ""):
        key = f"{key} {_key(schedule_type)}"
    spec = _LOOKUP.get(key)
    if spec is None:
        shown = name if not schedule_type else f"{name} ({schedule_type})"
        raise SamplerError(f"unknown sampler {shown!r}; known samplers: {', '.join(known_sampler_names())}")
    return spec


def build_scheduler(spec: SamplerSpec, noise_scheduler: Any, *, noise_seed: int | None = None) -> Any:
    """A fresh diffusers scheduler for ``spec`` on the model's training noise schedule.

    ``noise_seed`` seeds the schedulers that draw their own noise (DPM++ SDE's Brownian tree), so
    they are as reproducible as the others, which draw from the pipeline's generator.
    """
    import diffusers

    options = dict(spec.options)
    if spec.seeded_noise and noise_seed is not None:
        options["noise_sampler_seed"] = noise_seed
    return getattr(diffusers, spec.scheduler_class).from_config(noise_scheduler.config, **options)
