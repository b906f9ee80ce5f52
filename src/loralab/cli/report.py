"""``loralab report``: (re)write a sweep's HTML report and results table from its folder.

Works on a finished, failed or still running sweep. With ``--face-model`` / ``--clip-model``
the save points are scored first (scores computed before with the same images are kept), so
scores can be added to a sweep that ran without the models.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write a sweep's HTML report (plots, grids, scores) and results.csv",
        description=(
            "Write SWEEP_DIR/report/index.html: a summary across comparisons and one page per "
            "comparison with the config differences, loss and d*lr curves, image grids and scores. "
            "Also rewrites results.json and results.csv with a column per score."
        ),
    )
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR", help="the sweep's output folder")
    parser.add_argument("--out", type=Path, help="report folder (default: SWEEP_DIR/report)")
    parser.add_argument(
        "--face-model",
        type=Path,
        help="ArcFace-style .onnx face-identity model: score likeness, face rate, trigger leak",
    )
    parser.add_argument("--clip-model", type=Path, help="local CLIP model folder: score prompt adherence and diversity")
    parser.add_argument("--device", default="cpu", help="device for the CLIP model (default: cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `loralab --help` does not pay for matplotlib, torch and tensorboard.
    from loralab.cli.options import resolve_device
    from loralab.sweep.report import write_report
    from loralab.sweep.scoring import ScoringSettings, build_scorers, score_sweep

    if args.face_model is not None or args.clip_model is not None:
        scorers = build_scorers(ScoringSettings(args.face_model, args.clip_model, resolve_device(args.device)))
        scored = score_sweep(args.sweep_dir, scorers)
        print(f"scored {len(scored)} save points")
    index = write_report(args.sweep_dir, args.out)
    print(f"report: {index}")
    return 0
