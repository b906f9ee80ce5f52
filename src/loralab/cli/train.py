"""``loralab train``: train a LoRA from a config (native TOML, sd-scripts TOML or kohya_ss GUI JSON).

Writes a run directory (see :mod:`loralab.train.run`): the resolved config, the manifest,
TensorBoard logs, samples, the LoRA files and the state to resume from. Ctrl-C stops after the
current step, saves, and prints the command that resumes the run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loralab.cli.options import add_config_argument, add_override_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a LoRA (kohya_ss/sd-scripts configs run unchanged)",
        description=(
            "Train a LoRA on the config's dataset and base checkpoint. Everything the run writes goes "
            "into one run directory: --run-dir, else the config's output_dir, else runs/<name>-<time>."
        ),
    )
    add_config_argument(parser)
    add_override_option(parser)
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its saved state")
    parser.add_argument("--run-dir", type=Path, help="folder for this run's outputs (must not hold another run)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    output.add_argument("--jsonl", action="store_true", help="print one JSON object per step on stdout instead of a bar")
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel training processes on this machine (each trains train_batch_size samples per batch)",
    )
    parser.add_argument(
        "--on-non-finite",
        choices=("stop", "skip"),
        default="stop",
        help="what a NaN/inf loss does: stop the run keeping the last good LoRA (default), or skip that step",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loralab.imports import heavy_imports

    # Imported here so that `loralab --help` does not pay for torch and diffusers.
    with heavy_imports():
        from loralab.config.loading import load_config
        from loralab.train.launch import launch_training, process_started_at

    config = load_config(args.config, args.overrides)
    progress = "quiet" if args.quiet else "jsonl" if args.jsonl else "bar"
    launch_training(
        args.num_processes,
        config,
        run_dir=args.run_dir,
        resume=args.resume,
        progress=progress,
        on_non_finite=args.on_non_finite,
        launched_at=process_started_at(),
    )
    return 0
