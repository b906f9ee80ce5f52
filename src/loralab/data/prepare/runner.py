"""The ``loralab prepare`` job: a folder of photos in, a kohya-layout dataset out.

:func:`prepare_dataset` does the whole job:

1. checks the options and folders (missing token/class, empty or missing source, output inside
   the source, an output folder that is not ours: each one clear :class:`PrepareError`);
2. lists every file under the source (and ``reg_dir``) and pairs caption sidecars with images;
3. prepares the images in worker processes (:func:`~loralab.data.prepare.pipeline.prepare_image`:
   orientation, RGB conversion, face or centre crop, resize, pHash, PNG named by content);
4. drops near-duplicates (keeping the copy with the most pixels, then the largest file), writes the
   captions, and builds a report row for every file;
5. writes ``prepare-report.json`` last, into a temporary folder beside OUT_DIR, and renames that
   folder into place. OUT_DIR therefore either does not exist, or is complete; an earlier complete
   output (recognised by its report) is replaced, so re-running gives the same folder.

Nothing under the source folders is ever written. ``dry_run`` runs steps 1-4 without writing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from loralab.data.buckets import BucketManager
from loralab.data.discovery import IMAGE_EXTENSIONS
from loralab.data.prepare.captions import CaptionMode, CaptionSettings, caption_kept_image, sidecar_rows
from loralab.data.prepare.dedupe import NEAR_DUPLICATE_MAX_DISTANCE, HashedImage, find_near_duplicates
from loralab.data.prepare.faces import limit_detector_threads
from loralab.data.prepare.files import write_text_atomic
from loralab.data.prepare.image_io import DEFAULT_MAX_DECODE_PIXELS
from loralab.data.prepare.pipeline import CropMode, FramingSettings, ImageOutcome, ImageTask, prepare_image
from loralab.data.prepare.report import REPORT_NAME, FileRow, PrepareReport
from loralab.data.prepare.sources import SourceFile, SourceTree, scan_source
from loralab.errors import DatasetError

SetName = Literal["train", "reg"]
# Characters that cannot appear in a folder name on Windows or POSIX; the token and class become
# the folder name "<N>_<token> <class>" that every kohya tool reads.
_FORBIDDEN_NAME_CHARACTERS = set('/\\:*?"<>|')
_DEFAULT_MAX_WORKERS = 4  # each worker can hold one large decoded photo; keep the total bounded


class PrepareError(DatasetError):
    """A prepare job that cannot run or produced nothing usable.

    ``report`` is set when files were examined, so the caller can still show every file's reason.
    """

    def __init__(self, message: str, report: PrepareReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class PrepareOptions:
    """Everything ``loralab prepare`` can be told; the defaults are the CLI's."""

    token: str | None
    class_name: str | None
    repeats: int = 1
    resolution: int = 768
    crop: CropMode = "square"
    face_focus: bool = True
    min_size: int = 256
    caption: CaptionMode = "none"
    caption_extension: str = ".caption"
    reg_dir: Path | None = None
    reg_face_focus: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS
    dry_run: bool = False
    workers: int | None = None  # None: one per CPU core, at most _DEFAULT_MAX_WORKERS
    progress: bool = True

    @property
    def train_folder(self) -> str:
        return f"img/{self.repeats}_{self.token} {self.class_name}"

    @property
    def reg_folder(self) -> str:
        return f"reg/1_{self.class_name}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["reg_dir"] = str(self.reg_dir) if self.reg_dir else None
        for runtime_only in ("dry_run", "workers", "progress"):
            del data[runtime_only]  # they do not change the output
        data["near_duplicate_max_distance"] = NEAR_DUPLICATE_MAX_DISTANCE
        data["output_format"] = "png"
        return data


def prepare_dataset(source_dir: Path, out_dir: Path, options: PrepareOptions) -> PrepareReport:
    """Prepare the photos under ``source_dir`` into a kohya dataset at ``out_dir``.

    Returns the report (also written to ``out_dir/prepare-report.json`` unless ``dry_run``).
    Raises PrepareError for bad options or folders, and when no training image is usable (with
    the report attached, so the caller can still show every file's reason).

    With more than one worker the images are prepared in "spawn" worker processes, so a script
    that calls this must do so under ``if __name__ == "__main__":`` (as for any multiprocessing).
    """
    options = _checked_options(options)
    source_dir = Path(source_dir).resolve()
    out_dir = Path(out_dir).resolve()
    reg_dir = options.reg_dir.resolve() if options.reg_dir else None
    trees = {"train": _scan(source_dir, "source", options)}
    if reg_dir is not None:
        trees["reg"] = _scan(reg_dir, "--reg-dir", options)
    _check_output_folder(out_dir, [tree.root for tree in trees.values()])

    staging = None if options.dry_run else _make_staging(out_dir)
    try:
        report = _prepare_into(staging, source_dir, reg_dir, out_dir, trees, options)
        if staging is not None:
            write_text_atomic(staging / REPORT_NAME, json.dumps(report.to_json(), indent=2) + "\n")
            _publish(staging, out_dir)
            staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return report


def _prepare_into(
    staging: Path | None,
    source_dir: Path,
    reg_dir: Path | None,
    out_dir: Path,
    trees: dict[str, SourceTree],
    options: PrepareOptions,
) -> PrepareReport:
    folders = {"train": options.train_folder, "reg": options.reg_folder}
    settings = _framing_settings(options)
    tasks: list[ImageTask] = []
    for set_name, tree in trees.items():
        output_dir = None
        if staging is not None:
            output_dir = staging / folders[set_name]
            output_dir.mkdir(parents=True)
        tasks += [
            ImageTask(item.path, _key(set_name, item), settings[set_name], output_dir)
            for item in tree.candidates
        ]
    outcomes = _run_tasks(tasks, options)
    rows: list[FileRow] = []
    for set_name, tree in trees.items():
        output_dir = staging / folders[set_name] if staging is not None else None
        rows += _set_rows(set_name, tree, outcomes, folders[set_name], output_dir, options)
    report = PrepareReport(source_dir, reg_dir, out_dir, options.dry_run, options.to_json(), rows)
    if report.count("kept") == 0:
        raise PrepareError(
            f"none of the {trees['train'].file_count} files under {source_dir} gave a usable image "
            f"(see the reasons above); add photos of at least {options.min_size} px",
            report,
        )
    return report


def _key(set_name: str, item: SourceFile) -> str:
    return f"{set_name}:{item.relative}"


def _checked_options(options: PrepareOptions) -> PrepareOptions:
    missing = [
        flag for flag, value in (("--token", options.token), ("--class", options.class_name)) if not value
    ]
    if missing:
        raise PrepareError(
            f"missing {' and '.join(missing)}: prepare names the folder '<repeats>_<token> <class>', "
            f"e.g. --token blh --class woman"
        )
    for flag, value in (("--token", options.token), ("--class", options.class_name)):
        assert value is not None
        bad = sorted({c for c in value if c in _FORBIDDEN_NAME_CHARACTERS or not c.isprintable()})
        if bad or value != value.strip():
            raise PrepareError(
                f"{flag} {value!r} cannot be part of a folder name (no leading/trailing spaces, "
                f"no {' '.join(bad) or 'control characters'}); use plain words like 'blh' or 'woman'"
            )
    checks = (
        (options.repeats >= 1, f"--repeats {options.repeats} must be at least 1"),
        (
            options.resolution >= 64 and options.resolution % 8 == 0,
            f"--resolution {options.resolution} must be a multiple of 8 and at least 64 "
            f"(e.g. 512, 768, 1024)",
        ),
        (options.min_size >= 1, f"--min-size {options.min_size} must be at least 1 pixel"),
        (options.workers is None or options.workers >= 1, f"--workers {options.workers} must be at least 1"),
    )
    for ok, message in checks:
        if not ok:
            raise PrepareError(message)
    extension = options.caption_extension
    if not extension.startswith("."):
        extension = "." + extension
    if extension == "." or any(c in _FORBIDDEN_NAME_CHARACTERS for c in extension):
        raise PrepareError(
            f"--caption-extension {options.caption_extension!r} is not a file extension; "
            f"use e.g. .caption or .txt"
        )
    if extension.lower() in IMAGE_EXTENSIONS:  # caption files would replace the prepared images
        raise PrepareError(f"--caption-extension {extension} is an image extension; use e.g. .caption or .txt")
    return replace(options, caption_extension=extension)


def _scan(root: Path, what: str, options: PrepareOptions) -> SourceTree:
    if not root.is_dir():
        raise PrepareError(
            f"{what} folder {root} does not exist or is not a folder; pass the folder of photos"
        )
    tree = scan_source(root, options.caption_extension)
    if "." in tree.unreadable_folders:
        raise PrepareError(f"{what} folder {root}: {tree.unreadable_folders['.']}; check its permissions")
    if tree.file_count == 0:
        raise PrepareError(f"{what} folder {root} is empty; put the photos to prepare in it")
    return tree


def _check_output_folder(out_dir: Path, sources: list[Path]) -> None:
    for source in sources:
        if out_dir == source or out_dir.is_relative_to(source) or source.is_relative_to(out_dir):
            raise PrepareError(
                f"output folder {out_dir} overlaps the source folder {source}; "
                f"choose an output folder outside it (prepare never writes into its sources)"
            )
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise PrepareError(f"output {out_dir} exists and is not a folder; choose another output path")
    if any(out_dir.iterdir()) and not (out_dir / REPORT_NAME).is_file():
        raise PrepareError(
            f"output folder {out_dir} is not empty and holds no {REPORT_NAME}, so it is not a finished "
            f"prepare output; choose a new or empty folder"
        )


def _framing_settings(options: PrepareOptions) -> dict[str, FramingSettings]:
    buckets = None
    if options.crop == "bucket":
        buckets = BucketManager(
            (options.resolution, options.resolution),
            enable_bucket=True,
            min_bucket_reso=options.min_bucket_reso,
            max_bucket_reso=options.max_bucket_reso,
            bucket_reso_steps=options.bucket_reso_steps,
        )
    train = FramingSettings(
        crop=options.crop,
        face_focus=options.face_focus,
        resolution=options.resolution,
        min_size=options.min_size,
        max_decode_pixels=options.max_decode_pixels,
        buckets=buckets,
    )
    return {"train": train, "reg": replace(train, face_focus=options.reg_face_focus)}


def _run_tasks(tasks: list[ImageTask], options: PrepareOptions) -> dict[str, ImageOutcome]:
    workers = options.workers or min(os.cpu_count() or 1, _DEFAULT_MAX_WORKERS)
    workers = min(workers, len(tasks))
    outcomes: dict[str, ImageOutcome] = {}
    with tqdm(
        total=len(tasks), desc="prepare", unit="file", file=sys.stderr, disable=not options.progress
    ) as bar:
        if workers <= 1:
            for task in tasks:
                outcomes[task.key] = prepare_image(task)
                bar.update()
            return outcomes
        try:
            # "spawn": a forked child inherits OpenCV's thread pool in whatever state the parent
            # left it, and hangs in its first detection if the parent had already run one.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=limit_detector_threads) as pool:
                futures = [pool.submit(prepare_image, task) for task in tasks]
                for future in as_completed(futures):
                    outcome = future.result()
                    outcomes[outcome.key] = outcome
                    bar.update()
        except BrokenProcessPool as exc:
            raise PrepareError(
                "a worker process died while preparing images (out of memory?); "
                "rerun with --workers 1 to see which file"
            ) from exc
    return outcomes


def _set_rows(
    set_name: SetName,
    tree: SourceTree,
    outcomes: dict[str, ImageOutcome],
    folder: str,
    output_dir: Path | None,
    options: PrepareOptions,
) -> list[FileRow]:
    """Report rows for one source folder; drops near-duplicates and writes captions."""
    mine = {item.relative: outcomes[_key(set_name, item)] for item in tree.candidates}
    prepared = {relative: outcome for relative, outcome in mine.items() if outcome.output_name}
    duplicates = {
        duplicate.key: duplicate
        for duplicate in find_near_duplicates(
            [
                HashedImage(relative, outcome.phash or "", _keep_preference(outcome))
                for relative, outcome in prepared.items()
            ]
        )
    }
    kept_names = {outcome.output_name for relative, outcome in prepared.items() if relative not in duplicates}
    captions = CaptionSettings(options.caption, _class_tokens(set_name, options), options.caption_extension)
    rows: list[FileRow] = []
    for relative, outcome in mine.items():
        row = _image_row(set_name, relative, outcome)
        if relative in duplicates:
            duplicate = duplicates[relative]
            row.status = "duplicate"
            row.reason = (
                f"near-duplicate of {duplicate.kept_key} (perceptual-hash distance {duplicate.distance}, "
                f"<= {NEAR_DUPLICATE_MAX_DISTANCE} counts as the same photo)"
            )
            # Its file is removed unless a kept image has exactly the same pixels (the same name).
            if output_dir is not None and outcome.output_name and outcome.output_name not in kept_names:
                (output_dir / outcome.output_name).unlink(missing_ok=True)
        elif row.status == "kept":
            row.output = f"{folder}/{outcome.output_name}"
            caption_kept_image(row, tree.sidecar_of.get(relative), captions, output_dir)
        rows.append(row)
    rows += sidecar_rows(set_name, tree, {row.source: row.status for row in rows}, options.caption)
    for relative_folder, reason in sorted(tree.unreadable_folders.items()):
        rows.append(FileRow(set_name, relative_folder + "/", "skipped", reason=reason))
    return sorted(rows, key=lambda row: row.source)


def _class_tokens(set_name: SetName, options: PrepareOptions) -> str:
    # What the output folder's name says after "<repeats>_": the caption kohya falls back to.
    return f"{options.token} {options.class_name}" if set_name == "train" else str(options.class_name)


def _keep_preference(outcome: ImageOutcome) -> tuple[int, int]:
    # Of two copies of one photo keep the one with more pixels, then the larger file: at equal
    # size, the larger file is the one that was compressed less.
    width, height = outcome.file_size or (0, 0)
    return width * height, outcome.file_bytes


def _image_row(set_name: SetName, relative: str, outcome: ImageOutcome) -> FileRow:
    return FileRow(
        set=set_name,
        source=relative,
        status="skipped" if outcome.skip_reason else "kept",
        actions=list(outcome.actions),
        reason=outcome.skip_reason,
        file_size=outcome.file_size,
        output_size=outcome.output_size,
        face_box=outcome.face_box,
        crop_box=outcome.crop_box,
        phash=outcome.phash,
    )


def _make_staging(out_dir: Path) -> Path:
    # Beside OUT_DIR so the final rename stays on one file system; hidden and clearly named so a
    # leftover from a killed run is never mistaken for a dataset.
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.prepare-incomplete-", dir=out_dir.parent))
    except OSError as exc:
        raise PrepareError(f"cannot create the output folder {out_dir} ({exc.strerror}); choose another output path") from None


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished staging folder to ``out_dir``, replacing an earlier prepare output."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        os.replace(staging, out_dir)
        return
    previous = out_dir.with_name(f".{out_dir.name}.prepare-replaced-{uuid.uuid4().hex[:8]}")
    os.replace(out_dir, previous)
    os.replace(staging, out_dir)
    shutil.rmtree(previous, ignore_errors=True)
