"""``loralab sweep``: train every variant of a sweep file, evaluate them the same way, write the results.

See :mod:`loralab.sweep.spec` for the sweep file and :mod:`loralab.sweep.runner` for what a
sweep does. Re-running the same command trains and renders only what is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Exit status of a sweep stopped by Ctrl-C (as the shell reports SIGINT), and of one where some
# runs or evaluations failed (the others completed; the report says why each failed) or, in a dry
# run, some runs cannot be planned.
INTERRUPTED = 130
RUNS_FAILED = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="train and compare variants of a baseline config (sweep file)",
        description=(
            "Expand the sweep file's axes into runs, print the plan, train every run that is not "
            "complete (resuming interrupted ones), render each save point on the evaluation "
            "checkpoints, and write results.json/results.csv and the report into the sweep folder."
        ),
    )
    parser.add_argument("file", type=Path, help="sweep file (TOML): baseline, axes, evaluation")
    parser.add_argument("--out", type=Path, metavar="DIR", help="sweep folder (default: sweeps/<file name>)")
    parser.add_argument(
        "--backend", choices=("local", "ray"), default="local",
        help="local: runs one after another in this process (default); ray: runs as Ray tasks",
    )  # fmt: skip
    parser.add_argument("--address", metavar="ADDR", help="Ray cluster to use (default: start a local Ray instance)")
    parser.add_argument(
        "--parallel", type=int, default=1, metavar="N",
        help="runs at once (ray backend; one GPU each where the cluster has GPUs)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check every variant; train nothing")
    parser.epilog = (
        "exit status: 0 all runs complete and evaluated, 1 some runs or evaluations failed (see results.json; "
        "with --dry-run: some runs cannot be planned), 130 interrupted"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loralab.imports import heavy_imports

    # Imported here so that `loralab --help` does not pay for torch and diffusers.
    with heavy_imports():
        from loralab.sweep.runner import SweepOptions, progress_mode, run_sweep

    if args.address and args.backend != "ray":
        from loralab.sweep.spec import SweepError

        raise SweepError("--address names a Ray cluster; add --backend ray")
    options = SweepOptions(
        file=args.file, out=args.out, backend=args.backend, address=args.address, parallel=args.parallel,
        dry_run=args.dry_run, progress=progress_mode(),
    )  # fmt: skip
    summary = run_sweep(options, printer=lambda line: print(line, flush=True))
    if summary.interrupted:
        return INTERRUPTED
    return 0 if summary.all_succeeded else RUNS_FAILED
