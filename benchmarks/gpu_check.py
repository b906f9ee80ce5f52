#!/usr/bin/env python3
"""The CUDA paths of ``loralab train``, checked and timed on one NVIDIA GPU.

Usage: ``python benchmarks/gpu_check.py [--out DIR] [--full-steps N] [--skip-full]``

CI has no GPU, so everything here is a check run by hand on a CUDA machine:

1. Tiny SD1.5, SD2-v and SDXL models train a few steps on the GPU under each precision
   (fp32, fp16 autocast with loss scaling, bf16, full_fp16, full_bf16) and with the GPU-only
   optimizers (bitsandbytes AdamW8bit, Lion8bit, PagedAdamW8bit) and D-Adaptation/Prodigy; each
   line says whether every logged loss was finite, the saved LoRA's dtype, and the step time.
   ``xformers = true`` without xformers installed must fall back to SDPA with a warning.
2. Resume and samples on the GPU: a tiny fp16 DAdaptAdam run with offset noise and LoRA
   dropout (CUDA RNG in use) is SIGINT-stopped at step 3 and resumed; the final LoRA and the
   logged losses are compared with the uninterrupted run's, and the samples it rendered every
   3 steps (Euler a, CPU-seeded noise) are listed.
3. A randomly initialised full-size SD1.5 (written in fp16, about 2 GB) trains at 512 px,
   batch 1, rank 32, AdamW8bit, latents cached, UNet and text encoder trained, under fp16 and
   bf16 autocast (and fp16 with gradient checkpointing): s/step (median of the steps after two
   warm-ups), peak GPU memory, and the same-process floor (text-encoder and UNet forward,
   MSE, backward with loss scaling where fp16, optimizer step) with the ratio ours / floor.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import CAPTION, write_dataset


def scalars(run_dir: Path) -> dict[str, list[tuple[float, int, float]]]:
    """Every scalar series of a run as (wall_time, step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.wall_time, e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run_case(name: str, checkpoint: Path, data: Path, work: Path, **settings) -> dict[str, float]:
    from safetensors import safe_open

    from loralab.config.schema import TrainConfig
    from loralab.train.run import train

    values = {
        "pretrained_model_name_or_path": str(checkpoint),
        "train_data_dir": data,
        "resolution": 64,
        "train_batch_size": 2,
        "max_train_steps": 6,
        "learning_rate": 1e-4,
        "network_dim": 4,
        "network_alpha": 4,
        "cache_latents": True,
        "max_data_loader_n_workers": 0,
        "output_name": name,
        "seed": 1,
    }
    values.update(settings)
    run_dir = work / name
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(TrainConfig(**values), run_dir=run_dir, progress="quiet")
    series = scalars(run_dir)
    losses = [value for _, _, value in series["loss/current"]]
    stamps = [wall for wall, _, _ in series["loss/current"]]
    step_seconds = statistics.median(np.diff(stamps[2:])) if len(stamps) > 3 else float("nan")
    with safe_open(str(result.final_lora), "pt") as handle:
        first_key = next(iter(handle.keys()))
        lora_dtype = str(handle.get_tensor(first_key).dtype).replace("torch.", "")
    peak = max(value for _, _, value in series.get("perf/peak_memory_mb", [(0, 0, float("nan"))]))
    d_lr = [value for _, _, value in series.get("lr/d*lr", [])]
    finite = all(np.isfinite(losses))
    print(f"  {name:<34} {result.status:<9} steps {result.global_step:>3}  finite loss {finite!s:<5} "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}  LoRA {lora_dtype:<8} {step_seconds * 1e3:7.1f} ms/step  "
          f"peak {peak:8.1f} MB" + (f"  d*lr {d_lr[0]:.2e} -> {d_lr[-1]:.2e}" if d_lr else ""), flush=True)  # fmt: skip
    return {"step_seconds": step_seconds, "peak_mb": peak, "finite": float(finite)}


def guarded(label: str, function, *args, **kwargs):
    """Run one check; print the failure's last lines and go on with the others."""
    try:
        return function(label, *args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a check script reports every failure and continues
        lines = traceback.format_exception(exc)
        print(f"  {label:<34} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        print("    " + "".join(lines[-3:]).replace("\n", "\n    "), flush=True)
        return None


def tiny_matrix(work: Path) -> None:
    from loralab.models.tiny import make_tiny

    print("\n[1] tiny models on the GPU", flush=True)
    data = write_dataset(work / "tiny-data", 64)
    sd15 = make_tiny("sd15", "single-file", work / "tiny-sd15.safetensors")
    sd2v = make_tiny("sd2v", "single-file", work / "tiny-sd2v.safetensors")
    sdxl = make_tiny("sdxl", "single-file", work / "tiny-sdxl.safetensors")
    cases = [
        ("sd15 fp32 AdamW", sd15, {}),
        ("sd15 fp16 AdamW", sd15, {"mixed_precision": "fp16"}),
        ("sd15 bf16 AdamW", sd15, {"mixed_precision": "bf16"}),
        ("sd15 fp16 full_fp16 AdamW8bit", sd15, {"mixed_precision": "fp16", "full_fp16": True, "optimizer_type": "AdamW8bit"}),
        ("sd15 bf16 full_bf16 AdamW8bit", sd15, {"mixed_precision": "bf16", "full_bf16": True, "optimizer_type": "AdamW8bit"}),
        ("sd15 fp16 Lion8bit", sd15, {"mixed_precision": "fp16", "optimizer_type": "Lion8bit"}),
        ("sd15 fp16 PagedAdamW8bit", sd15, {"mixed_precision": "fp16", "optimizer_type": "PagedAdamW8bit"}),
        ("sd15 bf16 DAdaptAdam", sd15, {"mixed_precision": "bf16", "optimizer_type": "DAdaptAdam", "learning_rate": 1.0}),
        ("sd15 bf16 Prodigy", sd15, {"mixed_precision": "bf16", "optimizer_type": "Prodigy", "learning_rate": 1.0}),
        ("sd15 fp16 save fp16 TE-cache", sd15, {"mixed_precision": "fp16", "save_precision": "fp16", "network_train_unet_only": True, "cache_text_encoder_outputs": True}),
        ("sd15 fp16 xformers->SDPA", sd15, {"mixed_precision": "fp16", "xformers": True}),
        ("sd15 fp16 grad checkpointing", sd15, {"mixed_precision": "fp16", "gradient_checkpointing": True}),
        ("sd2v fp16 AdamW8bit", sd2v, {"mixed_precision": "fp16", "optimizer_type": "AdamW8bit"}),
        ("sdxl bf16 AdamW8bit ckpt", sdxl, {"mixed_precision": "bf16", "optimizer_type": "AdamW8bit", "gradient_checkpointing": True}),
        ("sdxl fp16 AdamW", sdxl, {"mixed_precision": "fp16"}),
    ]  # fmt: skip
    for label, checkpoint, settings in cases:
        guarded(label.replace(" ", "_"), run_case, checkpoint, data, work, **settings)


def resume_and_samples(work: Path) -> None:
    import signal

    from safetensors.torch import load_file

    from loralab.config.schema import TrainConfig
    from loralab.models.tiny import make_tiny
    from loralab.train.loop import LoopHooks, StepReport
    from loralab.train.run import train

    print("\n[2] resume and samples on the GPU (tiny SD1.5, fp16, DAdaptAdam)", flush=True)
    checkpoint = make_tiny("sd15", "single-file", work / "resume-sd15.safetensors")
    data = write_dataset(work / "resume-data", 64)
    config = TrainConfig(
        pretrained_model_name_or_path=str(checkpoint), train_data_dir=data, resolution=64, train_batch_size=2,
        max_train_epochs=3, optimizer_type="DAdaptAdam", learning_rate=1.0, lr_scheduler="cosine",
        network_dim=4, network_alpha=4, network_dropout=0.1, noise_offset=0.05, mixed_precision="fp16",
        save_state=True, save_every_n_steps=2, sample_every_n_steps=3, sample_prompts=["blh woman --w 64 --h 64 --s 8 --d 3"],
        cache_latents=True, max_data_loader_n_workers=0, output_name="resume", seed=3,
    )  # fmt: skip
    reference = train(config, run_dir=work / "resume-reference", progress="quiet")

    def interrupt(report: StepReport) -> None:
        if report.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train(config, run_dir=work / "resume-run", progress="quiet", hooks=LoopHooks(after_step=interrupt))
    resumed = train(config, run_dir=None, resume=work / "resume-run", progress="quiet")
    first, second = load_file(str(reference.final_lora)), load_file(str(resumed.final_lora))
    difference = max((first[k].float() - second[k].float()).abs().max().item() for k in first)
    losses = [[v for _, _, v in scalars(run)["loss/current"]] for run in (reference.run_dir, resumed.run_dir)]
    loss_difference = max(abs(a - b) for a, b in zip(*losses)) if len(losses[0]) == len(losses[1]) else float("inf")
    samples = sorted(path.name for path in (work / "resume-reference" / "samples").rglob("*.png"))
    print(f"  stopped at {stopped.global_step} ({stopped.status}), resumed to {resumed.global_step} ({resumed.status}); "
          f"max |LoRA difference| {difference:.2e}, max |loss difference| {loss_difference:.2e}; samples {samples}",
          flush=True)  # fmt: skip


def floor_seconds(
    checkpoint: Path, resolution: int, rank: int, dtype: torch.dtype | None, repeats: int
) -> tuple[float, float]:
    """The bare GPU step with AdamW8bit: TE and UNet forward under autocast, MSE, backward
    (scaled for fp16), optimizer step. Returns (median seconds, peak MB)."""
    import bitsandbytes

    from loralab.models.loading import load_checkpoint
    from loralab.network.lora import LoRANetwork, NetworkSpec
    from loralab.train.conditioning import encode_text, tokenize_captions

    device = torch.device("cuda")
    components = load_checkpoint(checkpoint)
    for module in (components.unet, *components.text_encoders):
        module.requires_grad_(False)
        module.to(device, dtype=dtype or torch.float32)
    network = LoRANetwork.create(components, NetworkSpec(rank=rank, alpha=rank))
    network.apply_to(components)
    network.to(device)
    optimizer = bitsandbytes.optim.AdamW8bit(network.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
    latent = resolution // 8
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, 4, latent, latent, generator=generator, device=device)
    noise = torch.randn(1, 4, latent, latent, generator=generator, device=device)
    ids = tokenize_captions(components.tokenizers[0], [CAPTION]).to(device)
    timesteps = torch.tensor([500], device=device)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats + 3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            context = encode_text(components.family, components.text_encoders, [ids], eos_token_ids=[49407])
            prediction = components.unet(latents, timesteps, encoder_hidden_states=context.encoder_hidden_states).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**20
    del components, network, optimizer
    torch.cuda.empty_cache()
    return statistics.median(times[3:]), peak


def full_size(work: Path, steps: int) -> None:
    from loralab.models.family import ModelFamily
    from loralab.models.tiny import write_random_full_size

    print("\n[3] random full-size SD1.5, 512 px, batch 1, rank 32, AdamW8bit, latents cached", flush=True)
    started = time.perf_counter()
    checkpoint = write_random_full_size(ModelFamily.SD1, work / "sd15-random.safetensors")
    print(f"  wrote {checkpoint.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - started:.1f} s", flush=True)
    data = write_dataset(work / "full-data", 512)
    common = {"resolution": 512, "train_batch_size": 1, "max_train_steps": steps, "network_dim": 32,
              "network_alpha": 32, "optimizer_type": "AdamW8bit", "save_precision": "fp16"}  # fmt: skip
    for label, precision, dtype, extra in (
        ("full_fp16_autocast", "fp16", torch.float16, {}),
        ("full_bf16_autocast", "bf16", torch.bfloat16, {}),
        ("full_fp16_grad_checkpointing", "fp16", torch.float16, {"gradient_checkpointing": True}),
    ):
        launched = time.perf_counter()
        ours = guarded(label, run_case, checkpoint, data, work, mixed_precision=precision, **common, **extra)
        print(f"    (whole run incl. load and latent caching: {time.perf_counter() - launched:.1f} s)", flush=True)
        if ours is None or extra:
            continue
        try:
            floor, floor_peak = floor_seconds(checkpoint, 512, 32, dtype, repeats=max(steps - 3, 5))
            print(f"    floor {floor * 1e3:.1f} ms/step (peak {floor_peak:.0f} MB); ours {ours['step_seconds'] * 1e3:.1f} "
                  f"ms/step; ratio ours/floor {ours['step_seconds'] / floor:.3f}", flush=True)  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            print(f"    floor FAILED: {type(exc).__name__}: {exc}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="keep run folders here (default: a temporary folder)")
    parser.add_argument("--full-steps", type=int, default=24)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--only-resume", action="store_true", help="run only the resume-and-samples check")
    parser.add_argument("--allow-cpu", action="store_true", help="run the tiny checks on the CPU (tests this script)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("error: no CUDA device; this script checks the GPU paths", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="  log %(levelname)s %(name)s: %(message)s")
    import diffusers
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception as exc:  # noqa: BLE001
        bnb = f"not importable ({exc})"
    print(f"torch {torch.__version__} CUDA {torch.version.cuda}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, diffusers "
          f"{diffusers.__version__}, transformers {transformers.__version__}, bitsandbytes {bnb}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="loralab-gpu-") as folder:
        work = args.out or Path(folder)
        os.environ["LORALAB_CACHE_DIR"] = str(work / "cache")
        if not args.only_resume:
            tiny_matrix(work)
        guarded("resume_and_samples", lambda _label: resume_and_samples(work))
        if not args.skip_full and not args.only_resume:
            full_size(work, args.full_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
