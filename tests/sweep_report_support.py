"""A synthetic sweep folder in the agreed layout, for the scoring and report tests.

Fake but well formed: ``expanded.json`` with two one-at-a-time comparisons sharing a repeated
baseline, TensorBoard logs written by the trainer's own ``MetricsLogger``, ``status.json`` files
(one run failed), eval indexes with small PNGs on two eval checkpoints (a one-prompt set, a
three-prompt "random" set, and trigger-free images), images without a LoRA, and a
``results.json`` as the runner writes it. Nothing here trains.

The pictures are drawn so that the "magenta" score (share of magenta pixels, a stand-in for a
likeness model) grows with the epoch and is highest for ``network_dim-8``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from loralab.sweep.layout import RunStatus, write_status
from loralab.train.tb_logging import MetricsLogger, step_scalars

CHECKPOINTS = ("dreamshaper_like", "epicrealism_like")
SAVE_POINTS = ("e000002", "final")
EPOCHS = 4
STEPS_PER_EPOCH = 5
SIMPLE_PROMPT = "photo of blh woman"
RANDOM_PROMPTS = ("blh woman in a forest", "blh woman on a beach", "blh woman in a kitchen")
# run name -> how its pictures and logs look: ring thickness (grows with the epoch), D-adaptation, outcome
RUNS: dict[str, dict[str, Any]] = {
    "baseline": {"thickness": 2, "d_adapt": True, "state": "complete"},
    "baseline-seed2": {"thickness": 3, "d_adapt": True, "state": "complete", "seed": 43},
    "network_dim-8": {"thickness": 4, "d_adapt": True, "state": "complete", "network_dim": 8},
    "optimizer-AdamW": {"thickness": 1, "d_adapt": False, "state": "complete", "optimizer_type": "AdamW"},
    "optimizer-Prodigy": {"d_adapt": True, "state": "failed", "optimizer_type": "Prodigy"},
}
FAILED_ERROR = "loss became NaN at step 7; lower the learning rate or use mixed_precision = 'no'"


def magenta_share(image: Image.Image) -> float:
    """Share of pixels that are clearly magenta (R and B high, G low)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return float(np.mean((r > 150) & (b > 150) & (g < 100)))


def draw_image(path: Path, *, checkpoint: str, thickness: int, epoch: int, shape: int, trigger: bool) -> None:
    """A 64 px picture: checkpoint-coloured background, a magenta ring (the 'subject') whose
    thickness grows with training, a grey mark that differs per prompt."""
    background = (170, 200, 235) if checkpoint == CHECKPOINTS[0] else (235, 225, 160)
    image = Image.new("RGB", (64, 64), background)
    draw = ImageDraw.Draw(image)
    if trigger and thickness:
        width = max(1, thickness * epoch // 2)
        draw.ellipse((14, 14, 50, 50), outline=(230, 20, 220), width=width)
    draw.rectangle((2 + 10 * shape, 54, 10 + 10 * shape, 62), fill=(90, 90, 90))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _epoch_of(save_point: str) -> int:
    return EPOCHS if save_point == "final" else int(save_point[1:])


def write_eval(folder: Path, *, thickness: int, epoch: int, with_lora: bool = True) -> None:
    """``index.json`` and PNGs of one save point (or of one checkpoint without a LoRA)."""
    entries = []
    checkpoints = CHECKPOINTS if with_lora else (folder.name,)
    for checkpoint in checkpoints:
        jobs = [("simple", SIMPLE_PROMPT, 0, True), ("simple", "photo of woman", 0, False)]
        jobs += [("random", prompt, shape, True) for shape, prompt in enumerate(RANDOM_PROMPTS, start=1)]
        for number, (prompt_set, prompt, shape, trigger) in enumerate(jobs):
            name = f"{checkpoint}-{prompt_set}-{number}.png"
            draw_image(
                folder / name,
                checkpoint=checkpoint,
                thickness=thickness if with_lora else 0,
                epoch=epoch,
                shape=shape,
                trigger=trigger,
            )
            entries.append(
                {
                    "image": name,
                    "checkpoint": checkpoint,
                    "prompt_set": prompt_set,
                    "prompt": prompt,
                    "seed": 7 + shape,
                    "lora_weight": 1.0 if with_lora else 0.0,
                    "trigger": trigger,
                }
            )
    (folder / "index.json").write_text(json.dumps(entries, indent=1), encoding="utf-8")


def write_logs(log_dir: Path, *, seed: int, d_adapt: bool, failed: bool) -> None:
    """TensorBoard events of a short run: a falling noisy loss, a constant lr, a growing d*lr."""
    rng = np.random.default_rng(seed)
    total = 7 if failed else EPOCHS * STEPS_PER_EPOCH
    losses = []
    with MetricsLogger(log_dir) as logger:
        for step in range(1, total + 1):
            loss = float("nan") if failed and step == total else 0.2 * math.exp(-step / 10) + 0.05 * rng.random()
            losses.append(loss)
            d_lr = 1e-6 * (1 + step) if d_adapt else None
            logger.log_step(
                step,
                step_scalars(
                    current_loss=loss,
                    average_loss=float(np.mean(losses)),
                    group_lrs={"unet": 1.0 if d_adapt else 1e-4},
                    d_lr=d_lr,
                ),
            )
            if step % STEPS_PER_EPOCH == 0:
                logger.log_epoch(step // STEPS_PER_EPOCH, float(np.mean(losses[-STEPS_PER_EPOCH:])))


def config_toml(train_dir: Path, name: str, spec: dict[str, Any]) -> str:
    return "\n".join(
        [
            f'train_data_dir = "{train_dir.as_posix()}"',
            f'output_dir = "runs/{name}"',
            'output_name = "blh"',
            f"network_dim = {spec.get('network_dim', 4)}",
            f"seed = {spec.get('seed', 42)}",
            f'optimizer_type = "{spec.get("optimizer_type", "DAdaptAdam")}"',
            "learning_rate = 1.0",
            "[optimizer_args]",
            "decouple = true",
            "",
        ]
    )


def expanded_entries() -> list[dict[str, Any]]:
    """Two comparisons, each holding the baseline and its repeat (as expand.py writes them)."""
    entries = []
    for comparison, variants in (
        ("network_dim", ["network_dim-8"]),
        ("optimizer", ["optimizer-AdamW", "optimizer-Prodigy"]),
    ):
        for repeat, name in enumerate(("baseline", "baseline-seed2"), start=1):
            entries.append(
                {
                    "name": name,
                    "comparison": comparison,
                    "axis": comparison,
                    "value": "baseline" if comparison == "optimizer" else "4",
                    "is_baseline": True,
                    "seed_repeat": repeat,
                    "overrides": {} if repeat == 1 else {"seed": 43},
                    "values": {},
                    "config_hash": f"hash-{name}",
                }
            )
        for name in variants:
            value = name.split("-", 1)[1]
            entries.append(
                {
                    "name": name,
                    "comparison": comparison,
                    "axis": comparison,
                    "value": value,
                    "is_baseline": False,
                    "seed_repeat": None,
                    "overrides": {comparison: value},
                    "values": {},
                    "config_hash": f"hash-{name}",
                }
            )
    return entries


def write_lora_files(run_dir: Path) -> None:
    """The LoRA files a run saves (``blh-000002.safetensors``, ``blh.safetensors``), one tiny tensor each,
    and the manifest's plan totals the results table reads steps from."""
    from safetensors.numpy import save_file

    for save_point in SAVE_POINTS:
        name = "blh.safetensors" if save_point == "final" else f"blh-{_epoch_of(save_point):06d}.safetensors"
        save_file({"lora_unet_x.alpha": np.array(4.0, dtype=np.float32)}, str(run_dir / name))
    plan = {"steps_per_epoch": STEPS_PER_EPOCH, "max_train_steps": EPOCHS * STEPS_PER_EPOCH, "epochs": EPOCHS}
    (run_dir / "manifest.json").write_text(json.dumps({"plan": plan, "final_metrics": {}}), encoding="utf-8")


def make_sweep(root: Path) -> Path:
    """Build the synthetic sweep folder under ``root`` and return it."""
    sweep = root / "sweep"
    train_dir = root / "dataset"
    ring = {"checkpoint": CHECKPOINTS[0], "thickness": 4, "epoch": 4, "shape": 0, "trigger": True}
    draw_image(train_dir / "1_blh woman" / "000.png", **ring)
    sweep.mkdir(parents=True)
    (sweep / "sweep.toml").write_text('name = "Synthetic"\n[baseline]\nconfig = "baseline.toml"\n', encoding="utf-8")
    (sweep / "expanded.json").write_text(json.dumps(expanded_entries(), indent=1), encoding="utf-8")
    for seed, (name, spec) in enumerate(RUNS.items()):
        run_dir = sweep / "runs" / name
        run_dir.mkdir(parents=True)
        (run_dir / "config.toml").write_text(config_toml(train_dir, name, spec), encoding="utf-8")
        failed = spec["state"] == "failed"
        write_logs(run_dir / "logs", seed=seed, d_adapt=spec["d_adapt"], failed=failed)
        status = RunStatus(
            state=spec["state"],
            error=FAILED_ERROR if failed else None,
            wall_seconds=95.0 + 10 * seed,
            peak_memory_mb=None if failed else 1234.5,
        )
        write_status(run_dir, status)
        if failed:
            continue
        write_lora_files(run_dir)
        for save_point in SAVE_POINTS:
            write_eval(sweep / "eval" / name / save_point, thickness=spec["thickness"], epoch=_epoch_of(save_point))
    for checkpoint in CHECKPOINTS:
        write_eval(sweep / "eval" / "baseline_models" / checkpoint, thickness=0, epoch=0, with_lora=False)
    return sweep
