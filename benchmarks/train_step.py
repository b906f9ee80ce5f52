#!/usr/bin/env python3
"""How close ``loralab train`` runs to the bare compute floor of a LoRA training step.

Usage: ``python benchmarks/train_step.py [--full] [--steps N] [--small-steps N] [--repeats R] [--threads T]``

For a tiny and a medium SD1-layout model (random weights, written as single-file checkpoints)
it trains with ``loralab.train.run.train`` and, in the same process, times the floor: the same
model with the same LoRA (rank, alpha, UNet and text encoder), the same shapes, and the same
optimizer, doing only text-encoder forward, UNet forward, MSE, backward and the optimizer step
(and freeing the step's autograd graph, which every training loop pays for).
The two are interleaved step by step (a loop hook runs one floor step after each of our steps),
so both see the same moment of a shared machine's load. Our step is everything the loop does
between two hook calls (data, noise, loss weighting, clipping, scheduler, logging). It prints the
medians and ``ratio = ours / floor`` (target <= 1.05): the median of the per-step ratios; then
each run's ratio, the ratio of the two sides' fastest quarters of steps, and the CPU time the host
took for other machines meanwhile (``steal`` in ``/proc/stat``), which tells a disturbed
measurement from a slow one.

``--full`` adds a randomly initialised full-size SD1.5 (written in fp16 to a temporary file,
about 2 GB; ``--checkpoint FILE`` reuses one) at 64 px, batch 1, rank 4, AdamW, fp32, latents
cached, UNet and text encoder trained, run through the real CLI in a child process: s/step,
time from the child's launch to its first finished step, and its peak RSS. The floor runs in a
child process too, alternating with ours ``--rounds`` times; then the step ratio is measured
again in this process, step by step as for the small models (the figure to trust on a shared
machine, whose load swings between whole processes). The whole benchmark runs with glibc's
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (unless already set; ours and the floor
alike), which cut page-fault work per step on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
CAPTION = "blh woman"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    resolution: int
    unet_channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    cross_attention_dim: int
    text_hidden: int
    text_layers: int


TINY = ModelSpec("tiny", 64, (32, 64), (True, False), 32, 32, 2)
MEDIUM = ModelSpec("medium", 128, (128, 256, 512), (True, True, False), 512, 512, 6)


def write_model(spec: ModelSpec, out: Path) -> Path:
    """A random SD1-layout checkpoint of ``spec``'s sizes, through loralab's own config builders."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loralab.models.architecture import (
        TextEncoderSizes,
        UNetSizes,
        VaeSizes,
        text_encoder_config,
        unet_config,
        vae_config,
    )
    from loralab.models.family import ModelFamily
    from loralab.models.loading import StableDiffusionComponents, make_noise_scheduler
    from loralab.models.saving import save_single_file
    from loralab.models.tokenizer import load_clip_tokenizer

    family = ModelFamily.SD1
    levels = len(spec.unet_channels)
    unet = UNetSizes(4, 4, spec.unet_channels, 1, spec.attention_levels, (1,) * levels, 1, spec.cross_attention_dim, False)
    vae = VaeSizes(3, 3, (32, 32, 64, 64), 1, 4)
    text = TextEncoderSizes(spec.text_hidden, spec.text_layers, 4 * spec.text_hidden, 49408, 77)
    torch.manual_seed(0)
    components = StableDiffusionComponents(
        family=family,
        v_prediction=False,
        unet=UNet2DConditionModel.from_config(unet_config(family, unet)),
        vae=AutoencoderKL.from_config(vae_config(family, vae)),
        text_encoders=[CLIPTextModel(CLIPTextConfig(**text_encoder_config(family, family.spec.text_encoders[0], text)))],
        tokenizers=[load_clip_tokenizer()],
        noise_scheduler=make_noise_scheduler(False),
        source=out,
    )
    return save_single_file(components, out)


def write_dataset(root: Path, size: int, images: int = 4) -> Path:
    folder = root / "img" / f"1_{CAPTION}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(images):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return root / "img"


def bench_config(checkpoint: Path, data: Path, resolution: int, steps: int, threads: int, rank: int):
    from loralab.config.schema import TrainConfig

    return TrainConfig(
        pretrained_model_name_or_path=str(checkpoint),
        train_data_dir=data,
        resolution=resolution,
        train_batch_size=1,
        max_train_steps=steps,
        optimizer_type="AdamW",
        learning_rate=1e-4,
        network_dim=rank,
        network_alpha=rank,
        cache_latents=True,
        num_cpu_threads_per_process=threads,
        max_data_loader_n_workers=0,
        output_name="bench",
    )


def step_times(run_dir: Path) -> list[float]:
    """Seconds between consecutive steps' first logged event (the loop's whole iteration)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    stamps = [event.wall_time for event in events.Scalars("loss/current")]
    return [later - earlier for earlier, later in zip(stamps, stamps[1:])]


class FloorStep:
    """The bare step: TE forward, UNet forward, MSE, backward, optimizer step, and freeing the
    step's tensors and autograd graph; nothing else.

    Same model file, same LoRA (rank, alpha, UNet and text encoder) and the same optimizer as the
    run builds it (loralab's ``build_optimizer``: torch's AdamW, fused on a CPU), so the ratio
    measures what the loop adds around the compute, not a choice of optimizer kernel.
    """

    def __init__(self, checkpoint: Path, resolution: int, rank: int) -> None:
        from loralab.models.loading import load_checkpoint
        from loralab.network.lora import LoRANetwork, NetworkSpec
        from loralab.train.conditioning import encode_text, tokenize_captions
        from loralab.train.optimizer_setup import build_optimizer, build_param_groups

        self.encode_text = encode_text

        self.components = load_checkpoint(checkpoint)
        for module in (self.components.unet, self.components.vae, *self.components.text_encoders):
            module.requires_grad_(False)
        network = LoRANetwork.create(self.components, NetworkSpec(rank=rank, alpha=rank))
        network.apply_to(self.components)
        groups = build_param_groups(
            unet_params=network.part_parameters("unet"),
            text_encoder_params=network.part_parameters("text_encoder"),
            learning_rate=1e-4,
        )
        self.optimizer = build_optimizer("AdamW", {}, groups, learning_rate=1e-4)
        self.optimizer_kind = "fused" if self.optimizer.param_groups[0].get("fused") else "per-tensor"
        latent = resolution // 8
        generator = torch.Generator().manual_seed(0)
        self.latents = torch.randn(1, 4, latent, latent, generator=generator)
        self.noise = torch.randn(1, 4, latent, latent, generator=generator)
        self.ids = tokenize_captions(self.components.tokenizers[0], [CAPTION])
        self.timesteps = torch.tensor([500])

    def step(self) -> float:
        """One timed step, in seconds, including freeing its autograd graph (the tensors are
        ``_train_once``'s locals): any training loop pays that every step, ours included."""
        started = time.perf_counter()
        self._train_once()
        return time.perf_counter() - started

    def _train_once(self) -> None:
        context = self.encode_text(self.components.family, self.components.text_encoders, [self.ids], eos_token_ids=[49407])
        prediction = self.components.unet(self.latents, self.timesteps, encoder_hidden_states=context.encoder_hidden_states).sample
        torch.nn.functional.mse_loss(prediction, self.noise).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def floor_seconds(checkpoint: Path, resolution: int, rank: int, repeats: int) -> list[float]:
    """``repeats`` timed floor steps after two warm-up steps."""
    floor = FloorStep(checkpoint, resolution, rank)
    return [floor.step() for _ in range(repeats + 2)][2:]


class Interleaved:
    """A loop hook that runs one floor step after each of our steps: both sides see the same
    moment of a shared machine's load, step by step. Our step is the time from the end of one
    hook call to the start of the next (everything the loop does)."""

    def __init__(self, floor: FloorStep, warmup: int = 2) -> None:
        self.floor, self.warmup = floor, warmup
        self.ours: list[float] = []
        self.floors: list[float] = []
        self._steps = 0
        self._last: float | None = None

    def after_step(self, report: object) -> None:
        now = time.perf_counter()
        floor_step_seconds = self.floor.step()
        self._steps += 1
        if self._last is not None and self._steps > self.warmup:
            self.ours.append(now - self._last)
            self.floors.append(floor_step_seconds)
        self._last = time.perf_counter()


def compare(spec: ModelSpec, work: Path, steps: int, threads: int, rank: int, rounds: int) -> None:
    """Our steps against the floor's, step by step, on a model of ``spec``'s sizes."""
    checkpoint = write_model(spec, work / f"{spec.name}.safetensors")
    data = write_dataset(work / spec.name, spec.resolution)
    interleaved(f"{spec.name:<7} {spec.resolution:>4}px", checkpoint, data, spec.resolution, work / spec.name,
                steps=steps, threads=threads, rank=rank, rounds=rounds)  # fmt: skip


def interleaved(
    label: str, checkpoint: Path, data: Path, resolution: int, work: Path, *, steps: int, threads: int, rank: int, rounds: int
) -> None:
    """``rounds`` runs of ours, each step followed by a floor step; the ratio is the median of the
    per-step ratios (ours over the floor step right after it)."""
    from loralab.train.loop import LoopHooks
    from loralab.train.run import train

    config = bench_config(checkpoint, data, resolution, steps, threads, rank)
    torch.set_num_threads(threads)
    floor = FloorStep(checkpoint, resolution, rank)
    ours, floors, rounds_ratios = [], [], []
    stolen = steal_seconds()
    for round_index in range(rounds):
        timer = Interleaved(floor)
        train(config, run_dir=work / f"run{round_index}", progress="quiet", hooks=LoopHooks(after_step=timer.after_step))
        ours += timer.ours
        floors += timer.floors
        rounds_ratios.append(statistics.median(a / b for a, b in zip(timer.ours, timer.floors)))
    ratio = statistics.median(a / b for a, b in zip(ours, floors))
    print(f"{label}  ours {statistics.median(ours) * 1000:8.1f} ms/step  "
          f"floor {statistics.median(floors) * 1000:8.1f} ms/step ({floor.optimizer_kind} AdamW)  ratio {ratio:5.3f} "
          f"(rounds: {', '.join(f'{r:.3f}' for r in rounds_ratios)}; fastest quarters {quartile(ours) / quartile(floors):5.3f}; "
          f"{describe_steal(stolen)})", flush=True)  # fmt: skip


def quartile(values: list[float]) -> float:
    """The lower quartile: on a shared machine interference only ever adds time, so the fast end
    of many steps is the steadier estimate of the undisturbed step."""
    return statistics.quantiles(values, n=4)[0]


def steal_seconds() -> float | None:
    """CPU time the hypervisor gave to other machines so far (Linux ``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def describe_steal(since: float | None) -> str:
    now = steal_seconds()
    return "steal n/a" if since is None or now is None else f"host steal {now - since:.1f} s"


def full_size(work: Path, checkpoint: Path | None, steps: int, repeats: int, threads: int, rounds: int) -> None:
    """Our CLI run and the floor, alternated ``rounds`` times, each in a fresh child process with the
    same environment (allocator settings included), so neither gets a warmer or differently tuned
    process than the other."""
    from loralab.config.loading import save_config
    from loralab.models.family import ModelFamily
    from loralab.models.tiny import write_random_full_size

    if checkpoint is None:
        started = time.perf_counter()
        checkpoint = write_random_full_size(ModelFamily.SD1, work / "sd15-random.safetensors")
        print(f"full    wrote random SD1.5 ({checkpoint.stat().st_size / 2**30:.2f} GiB) in "
              f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    data = write_dataset(work / "full", 64)
    config_path = work / "full.toml"
    save_config(bench_config(checkpoint, data, 64, steps, threads, rank=4), config_path)
    # Fill the latent cache first: the measured runs then start as a rerun of a sweep does.
    env = {**os.environ, "LORALAB_CACHE_DIR": str(work / "cache"), **{k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()}}
    command = [sys.executable, "-m", "loralab", "train", str(config_path), "--quiet", "--run-dir"]
    subprocess.run([*command, str(work / "full-warm"), "--set", "max_train_steps=1"], env=env, check=True)
    floor_command = [sys.executable, __file__, "--floor-only", str(checkpoint), "--threads", str(threads),
                     "--repeats", str(repeats)]  # fmt: skip
    ours, floor, first_steps, peaks = [], [], [], []
    stolen = steal_seconds()
    for round_index in range(rounds):
        run_dir = work / f"full-run{round_index}"
        launched = time.time()
        subprocess.run([*command, str(run_dir)], env=env, check=True)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "logs"), size_guidance={"scalars": 0})
        events.Reload()
        first_steps.append(events.Scalars("loss/current")[0].wall_time - launched)
        ours += step_times(run_dir)[1:]
        manifest = json.loads((run_dir / "manifest.json").read_text())
        peaks.append(manifest["final_metrics"]["peak_memory_mb"] / 1024)
        printed = subprocess.run(floor_command, env=env, check=True, capture_output=True, text=True).stdout
        floor += json.loads(printed.strip().splitlines()[-1])
    ours_median, floor_median = statistics.median(ours), statistics.median(floor)
    print(f"full    SD1.5 64px  CLI {ours_median:.3f} s/step  floor process {floor_median:.3f} s/step  ratio "
          f"{ours_median / floor_median:5.3f}  launch-to-first-step {statistics.median(first_steps):.1f} s "
          f"(rounds: {', '.join(f'{t:.1f}' for t in first_steps)})  peak RSS {max(peaks):.2f} GiB  "
          f"{describe_steal(stolen)}", flush=True)  # fmt: skip
    # The step ratio again, step by step in this process as for the small models: the load of a
    # shared machine swings between whole processes far more than between neighbouring steps.
    interleaved("full    SD1.5 64px", checkpoint, data, 64, work / "full-interleaved",
                steps=steps, threads=threads, rank=4, rounds=rounds)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="also benchmark a random full-size SD1.5 (~2 GB file, ~7 GB RAM)")
    parser.add_argument("--checkpoint", type=Path, help="full-size SD1.5 checkpoint to use instead of writing one")
    parser.add_argument("--steps", type=int, default=12, help="training steps per full-size run (the first two are warm-up)")
    # A tiny step is tens of milliseconds, so one interrupted step moves a short run's median by
    # percents; forty steps a run cost seconds and settle it.
    parser.add_argument("--small-steps", type=int, default=42, help="training steps per tiny/medium run (the first two are warm-up)")
    parser.add_argument("--repeats", type=int, default=8, help="timed floor steps per round (full size)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of the tiny/medium runs")
    parser.add_argument("--rounds", type=int, default=5, help="runs of ours (tiny/medium: each step followed by a floor step; full size: alternating with the floor)")
    parser.add_argument("--skip-small", action="store_true", help="leave out the tiny and medium models")
    parser.add_argument("--floor-only", type=Path, help=argparse.SUPPRESS)  # the floor's child process
    args = parser.parse_args(argv)
    if args.floor_only is not None:
        torch.set_num_threads(args.threads)
        print(json.dumps(floor_seconds(args.floor_only, 64, 4, args.repeats)))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="loralab-bench-") as folder:
        work = Path(folder)
        os.environ["LORALAB_CACHE_DIR"] = str(work / "cache")
        print(f"torch {torch.__version__}, {args.threads} threads; tiny/medium: {args.rounds} runs x {args.small_steps - 2} "
              f"steps, each followed by a floor step; full size: {args.rounds} CLI runs x {args.steps - 2} steps "
              f"alternating with {args.repeats} floor steps in a child process")
        for spec in () if args.skip_small else (TINY, MEDIUM):
            compare(spec, work, args.small_steps, args.threads, args.rank, args.rounds)
        if args.full:
            full_size(work, args.checkpoint, args.steps, args.repeats, args.threads, args.rounds)
    return 0


if __name__ == "__main__":
    # glibc reads its allocator settings at start: run the whole benchmark (ours and the floor
    # alike) under the same ones as the full-size children, unless the caller chose their own.
    if any(key not in os.environ for key in MALLOC_ENV):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**MALLOC_ENV, **os.environ})
    sys.exit(main())
