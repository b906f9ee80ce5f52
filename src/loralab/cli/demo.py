"""``loralab demo``: the whole workflow on the bundled toy world (prepare, train, sweep, report)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole workflow on the bundled toy model, on CPU, in minutes",
        description=(
            "Render photos of the toy subject, prepare them, train LoRAs from a baseline modelled on "
            "the guide's (DAdaptAdam, cosine), compare network rank and optimizer, render grids on "
            "both toy checkpoints with and without the trigger, score likeness, and write the report."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("demo-output"), metavar="DIR",
                        help="folder to write the demo into (default: demo-output)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs (about a third of the time)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loralab.imports import heavy_imports

    # Imported here so that `loralab --help` does not pay for torch and diffusers.
    with heavy_imports():
        from loralab.demo import run_demo

    result = run_demo(args.out, quick=args.quick, printer=lambda line: print(line, flush=True))
    return 1 if result.failed_runs else 0
