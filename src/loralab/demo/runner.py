"""``run_demo``: toy photos -> prepared dataset -> sweep (train, render, score) -> report.

Layout of the demo folder::

    OUT/photos/     toy photos of the subject with .txt captions ("blh ring on ..., top left")
    OUT/dataset/    what ``loralab prepare`` made of them (img/1_blh ring/)
    OUT/class/      class images for prior preservation (1_ring/): the photos' captions without
                    the trigger, drawn by the base checkpoint
    OUT/config/     baseline.toml (the guide's settings, toy-sized) and sweep.toml
    OUT/sweep/      the sweep folder: runs, eval images, scores, results, report/index.html
    OUT/sweep/likeness.json   toy likeness per run and checkpoint, against the checkpoint alone

Each step is safe to repeat: photos and the dataset are rebuilt (they are quick and
deterministic), and the sweep trains and renders only what is missing.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from loralab.data.prepare import PrepareOptions, prepare_dataset
from loralab.demo.class_images import class_prompts, render_class_images
from loralab.demo.likeness_gain import (
    GAINS_FILE,
    LikenessGain,
    add_toy_scores,
    format_gains,
    likeness_gains,
    write_gains,
)
from loralab.demo.settings import (
    CPU_THREADS,
    FULL,
    PHOTO_SIZE,
    QUICK,
    SAMPLE_CFG,
    SAMPLER,
    TOY_CLIP_SKIP,
    DemoSize,
    write_sweep_files,
)
from loralab.errors import LoralabError
from loralab.toy import world

Printer = Callable[[str], None]
PHOTO_SEED = 2024  # the subject's photo shoot: the same photos on every machine


class DemoError(LoralabError):
    """The demo cannot run where asked."""


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its report, and the likeness it measured."""

    out_dir: Path
    report: Path
    gains: list[LikenessGain]
    failed_runs: int


def render_photos(folder: Path, count: int) -> Path:
    """``count`` toy photos of the subject as PNGs with ``.txt`` caption sidecars, in ``folder``."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    examples = world.subject_examples(PHOTO_SEED, count, size=PHOTO_SIZE)
    for number, example in enumerate(tqdm(examples, total=count, desc="photos", unit="photo", file=sys.stderr)):
        Image.fromarray(example.image).save(folder / f"photo_{number:03d}.png")
        (folder / f"photo_{number:03d}.txt").write_text(example.caption + "\n", encoding="utf-8")
    return folder


def prepare_photos(photos: Path, dataset: Path) -> Path:
    """Run ``loralab prepare`` on the photos (no face crop: there are no faces); returns the img folder."""
    options = PrepareOptions(
        token=world.SUBJECT_TRIGGER, class_name=world.SUBJECT_CLASS, resolution=PHOTO_SIZE, face_focus=False,
        min_size=PHOTO_SIZE, caption="file", caption_extension=".caption", workers=1,
    )  # fmt: skip
    prepare_dataset(photos, dataset, options)
    return dataset / "img"


def run_demo(out_dir: Path, quick: bool = False, printer: Printer = print) -> DemoResult:
    """Run the whole demo into ``out_dir`` and return where its report is (see the module docstring).

    ``quick`` trains fewer, shorter runs and renders fewer seeds (for CI and a first look).
    Raises DemoError when ``out_dir`` is a file.
    """
    from loralab.sweep.runner import SweepOptions, run_sweep

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DemoError(f"{out_dir} is a file; give --out a folder to write the demo into")
    size: DemoSize = QUICK if quick else FULL
    stages = tqdm(total=6, desc="demo", unit="stage", file=sys.stderr, position=0)
    try:
        photos = render_photos(out_dir / "photos", size.photos)
        stages.update()
        img_dir = prepare_photos(photos, out_dir / "dataset")
        stages.update()
        reg_dir = render_class_images(
            out_dir / "class", class_prompts(img_dir, ".caption"),
            steps=size.sample_steps, cfg=SAMPLE_CFG, sampler=SAMPLER, clip_skip=TOY_CLIP_SKIP, threads=CPU_THREADS,
        )  # fmt: skip
        stages.update()
        sweep_file = write_sweep_files(out_dir / "config", img_dir.resolve(), reg_dir.resolve(), size)
        sweep_dir = out_dir / "sweep"
        # The toy world's likeness joins the scores the sweep computes (and its report shows).
        options = SweepOptions(file=sweep_file, out=sweep_dir, progress="bar", extra_scores=add_toy_scores)
        summary = run_sweep(options, printer=printer)
        stages.update()
        if summary.interrupted:
            raise KeyboardInterrupt
        if summary.report is None:
            raise DemoError(f"the sweep wrote no report; see the messages above ({sweep_dir})")
        report = summary.report
        stages.update()
        gains = likeness_gains(sweep_dir)
        write_gains(sweep_dir, gains, sweep_dir / GAINS_FILE)
        stages.update()
    finally:
        stages.close()
    printer("toy likeness (0-1; in brackets: change against the checkpoint without the LoRA)")
    printer(format_gains(gains))
    printer(f"demo report: {report.resolve()}")
    return DemoResult(out_dir, report, gains, summary.count("failed"))
