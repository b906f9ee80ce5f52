"""``loralab prepare``: a folder of photos in, a kohya-layout dataset out, with a report.

Prints one table line per source file (what was done, or why it was skipped) on stdout and a
progress bar on stderr; ``--dry-run`` prints the same table and writes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="turn a folder of photos into a kohya dataset (face crops, RGB, dedupe, report)",
        description=(
            "Read every file under SRC_DIR and write OUT_DIR/img/<repeats>_<token> <class>/ with "
            "upright RGB PNGs framed around the face (or centre-cropped), near-duplicates and "
            "unusable files dropped, and OUT_DIR/prepare-report.json saying what happened to each "
            "file. SRC_DIR is never modified; OUT_DIR appears only when complete."
        ),
    )
    parser.add_argument("source", type=Path, metavar="SRC_DIR", help="folder of photos (read recursively)")
    parser.add_argument("output", type=Path, metavar="OUT_DIR", help="dataset folder to create or replace")
    # Not argparse-required: a missing token/class gets one clear line instead of a usage dump.
    parser.add_argument("--token", help="the subject's trigger word, e.g. blh")
    parser.add_argument("--class", dest="class_name", help="the subject's class, e.g. woman")
    parser.add_argument(
        "--repeats", type=int, default=1, help="repeats per epoch in the folder name (default 1)"
    )
    parser.add_argument("--resolution", type=int, default=768, help="training resolution in px (default 768)")
    parser.add_argument(
        "--crop",
        choices=("square", "bucket", "none"),
        default="square",
        help="square: RESOLUTION x RESOLUTION; bucket: the nearest aspect-ratio bucket; none: whole photo, "
        "downscaled to RESOLUTION^2 pixels (default square)",
    )
    parser.add_argument(
        "--face-focus", choices=("on", "off"), default="on", help="crop around the largest face (default on)"
    )
    parser.add_argument(
        "--min-size",
        type=int,
        default=256,
        help="drop images whose crop is smaller than this in px (default 256)",
    )
    parser.add_argument(
        "--caption",
        choices=("none", "token", "file"),
        default="none",
        help="none: no caption files (kohya uses the folder name); token: '<token> <class>'; "
        "file: copy the photo's .txt/.caption sidecar (default none)",
    )
    parser.add_argument(
        "--caption-extension",
        default=".caption",
        help="extension of written caption files; match your config's caption_extension (default .caption)",
    )
    parser.add_argument(
        "--reg-dir", type=Path, help="folder of regularisation photos -> OUT_DIR/reg/1_<class>/"
    )
    parser.add_argument(
        "--reg-face-focus",
        choices=("on", "off"),
        default="off",
        help="face crop the regularisation photos too (default off)",
    )
    parser.add_argument(
        "--min-bucket-reso", type=int, default=256, help="--crop bucket: smallest bucket side (default 256)"
    )
    parser.add_argument(
        "--max-bucket-reso", type=int, default=1024, help="--crop bucket: largest bucket side (default 1024)"
    )
    parser.add_argument(
        "--bucket-reso-steps", type=int, default=64, help="--crop bucket: bucket side step (default 64)"
    )
    parser.add_argument(
        "--workers", type=int, help="parallel worker processes (default: CPU cores, at most 4)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `loralab --help` does not load OpenCV.
    from loralab.data.prepare import PrepareError, PrepareOptions, prepare_dataset

    options = PrepareOptions(
        token=args.token,
        class_name=args.class_name,
        repeats=args.repeats,
        resolution=args.resolution,
        crop=args.crop,
        face_focus=args.face_focus == "on",
        min_size=args.min_size,
        caption=args.caption,
        caption_extension=args.caption_extension,
        reg_dir=args.reg_dir,
        reg_face_focus=args.reg_face_focus == "on",
        min_bucket_reso=args.min_bucket_reso,
        max_bucket_reso=args.max_bucket_reso,
        bucket_reso_steps=args.bucket_reso_steps,
        dry_run=args.dry_run,
        workers=args.workers,
    )
    try:
        report = prepare_dataset(args.source, args.output, options)
    except PrepareError as exc:
        if exc.report is not None:  # show every file's reason before the one-line error
            print(exc.report.format_table())
        raise
    print(report.format_table())
    return 0
