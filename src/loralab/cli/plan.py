"""``loralab plan``: a dry run that shows dataset, buckets, steps, epochs and LR schedule.

No model is loaded; only image headers are read. ``--json`` prints one JSON object (see
``Plan.to_json``) for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from loralab.cli.options import add_config_argument, add_override_option

if TYPE_CHECKING:
    from loralab.plan.planner import Plan

# How many points of the LR schedule the text view shows (first step, then evenly spaced).
_SCHEDULE_POINTS = 11


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="dry run: dataset, buckets, steps, epochs and LR schedule (no model loaded)",
        description=(
            "Plan a training run without loading a model: discover the kohya-layout dataset, "
            "build the aspect-ratio buckets, and compute steps, epochs and the learning rate "
            "after every step."
        ),
    )
    add_config_argument(parser)
    add_override_option(parser)
    parser.add_argument("--train-data", type=Path, help="training images folder (replaces train_data_dir)")
    parser.add_argument("--reg-data", type=Path, help="regularisation images folder (replaces reg_data_dir)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `loralab --help` does not pay for torch and diffusers.
    from loralab.config.loading import load_config
    from loralab.plan.planner import check_run_settings, make_plan

    config = load_config(args.config, args.overrides)
    plan = make_plan(config, args.train_data, args.reg_data)
    check_run_settings(config)
    if args.json:
        print(json.dumps(plan.to_json()))
    else:
        print(format_plan(plan))
    return 0


def format_plan(plan: Plan) -> str:
    """The human-readable plan: folders, buckets, totals, LR schedule, then warnings."""
    lines = ["dataset"]
    for label, folders in (("train", plan.train_folders), ("reg", plan.reg_folders)):
        for folder in folders:
            captions = (
                f"{folder.captions_from_files} captions from files"
                if folder.captions_from_files
                else "caption = folder name"
            )
            lines.append(
                f"  {label:<5} {folder.path}: {folder.images} images x {folder.repeats} repeats"
                f" = {folder.images * folder.repeats} ({captions})"
            )
    for skipped in plan.skipped_folders:
        lines.append(f"  skipped {skipped.path}: {skipped.reason}")

    lines.append("buckets (samples per epoch = images x repeats)")
    for bucket in plan.buckets:
        width, height = bucket.resolution
        batches = bucket.batches(plan.batch_size)
        lines.append(f"  {width:>5}x{height:<5} {bucket.count:>6} samples  {batches:>5} batches")

    formula = "kohya_ss GUI formula" if plan.steps_formula == "kohya_gui" else "sd-scripts"
    totals = [
        ("training images (x repeats)", plan.num_train_images),
        ("regularisation images", plan.num_reg_images),
        ("reg images used per epoch", plan.reg_images_per_epoch),
        ("batch size", plan.batch_size),
        ("batches per epoch", plan.batches_per_epoch),
        ("gradient accumulation", plan.gradient_accumulation_steps),
        ("optimizer steps per epoch", plan.steps_per_epoch),
        ("epochs", plan.epochs),
        ("max train steps", f"{plan.max_train_steps} ({formula})"),
        ("warm-up steps", plan.lr_warmup_steps),
    ]
    lines.append("totals")
    lines += [f"  {name:<28} {value}" for name, value in totals]

    lines.append(f"learning rate: {plan.lr_scheduler}, lr/unet = {plan.unet_lr:g} x multiplier after each step")
    lines += _schedule_table(plan)
    lines += [f"note: {warning}" for warning in plan.warnings]
    return "\n".join(lines)


def _schedule_table(plan: Plan) -> list[str]:
    total = len(plan.lr_schedule)
    if total == 0:
        return []
    steps = sorted({1, *(max(1, round(total * i / (_SCHEDULE_POINTS - 1))) for i in range(1, _SCHEDULE_POINTS))})
    # A zero unet lr (UNet not trained) has no meaningful multiplier; show the zeros as they are.
    scale = plan.unet_lr or 1.0
    step_row = "".join(f"{step:>9}" for step in steps)
    value_row = "".join(f"{plan.lr_schedule[step - 1] / scale:>9.4g}" for step in steps)
    return [f"  step       {step_row}", f"  multiplier {value_row}"]
