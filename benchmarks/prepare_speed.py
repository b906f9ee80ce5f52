"""Benchmark ``loralab prepare``: throughput on 1024 px photos and peak memory with huge inputs.

Builds a source folder of N (default 100) 1024x1024 JPEGs, each a noise background with
scikit-image's astronaut photo pasted at a random size, position, tilt and mirroring (so every
image has a face to find), plus two oversized files: a 20000x20000 JPEG (Pillow's decompression-
bomb guard refuses it from its header) and a 12000x9000 JPEG (over the decode budget: decoded at
reduced scale). Then runs ``python -m loralab prepare`` on it in a subprocess and prints the wall
time, images per second, and the peak resident memory of the whole process tree (parent and
workers, sampled from /proc) and of its largest process.

Targets (issue 4): under 60 s for 100 images on 2 CPU cores; peak memory under 1.5 GB.

    python benchmarks/prepare_speed.py [--images 100] [--workers N] [--no-huge]

Needs scikit-image (the ``test`` extra) for the astronaut photo.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SIDE = 1024
TARGET_SECONDS = 60.0
TARGET_PEAK_BYTES = 1.5 * 1024**3


def astronaut() -> Image.Image:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("scikit-image is not installed (pip install -e '.[test]'): it provides the face photo")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "astronaut.png"
    with Image.open(path) as image:
        return image.convert("RGB")


def build_sources(folder: Path, count: int, with_huge: bool) -> None:
    face = astronaut()
    rng = np.random.default_rng(0)
    for index in range(count):
        canvas = Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
        size = int(rng.integers(450, 900))
        photo = face.rotate(
            float(rng.uniform(-8, 8)), resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128)
        )
        if rng.random() < 0.5:
            photo = ImageOps.mirror(photo)
        photo = photo.resize((size, size), Image.Resampling.LANCZOS)
        position = (int(rng.integers(0, SIDE - size + 1)), int(rng.integers(0, SIDE - size + 1)))
        canvas.paste(photo, position)
        canvas.save(folder / f"photo_{index:03d}.jpg", quality=90)
    if with_huge:
        # Real files, not just headers: the memory figure must hold for what a user could have.
        Image.new("L", (20000, 20000), 128).save(folder / "huge_20000x20000.jpg", quality=75)
        Image.new("L", (12000, 9000), 160).save(folder / "large_12000x9000.jpg", quality=75)


def _tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, parent = int(entry), int(fields[1])
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        children.setdefault(parent, []).append(pid)
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_prepare(source: Path, out: Path, workers: int | None) -> tuple[float, int, int, str]:
    """Wall seconds, peak tree RSS, peak single-process RSS (bytes), and the table's summary line."""
    command = [
        sys.executable,
        "-m",
        "loralab",
        "prepare",
        str(source),
        str(out),
        "--token",
        "blh",
        "--class",
        "woman",
    ]
    if workers:
        command += ["--workers", str(workers)]
    peak = 0
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            if Path("/proc").is_dir():
                peak = max(peak, _tree_rss_bytes(process.pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = process.communicate()
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode != 0:
        sys.exit(f"prepare failed with exit code {process.returncode}:\n{stdout}")
    # ru_maxrss of children: the largest single process that has exited (KiB on Linux).
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return elapsed, peak, largest, stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100, help="number of 1024x1024 photos (default 100)")
    parser.add_argument("--workers", type=int, help="passed to prepare --workers (default: its own)")
    parser.add_argument(
        "--no-huge", action="store_true", help="leave out the 20000x20000 and 12000x9000 files"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as temporary:
        source, out = Path(temporary) / "photos", Path(temporary) / "dataset"
        source.mkdir()
        started = time.perf_counter()
        build_sources(source, args.images, not args.no_huge)
        print(
            f"built {args.images} photos of {SIDE}x{SIDE}"
            + ("" if args.no_huge else " + 2 huge JPEGs")
            + f" in {time.perf_counter() - started:.1f} s; {os.cpu_count()} CPU cores"
        )
        elapsed, peak, largest, summary = run_prepare(source, out, args.workers)

    rate = args.images / elapsed
    print(f"prepare: {elapsed:.1f} s total, {rate:.2f} images/s (target < {TARGET_SECONDS:.0f} s)")
    print(
        f"peak RSS, all processes together: {peak / 1024**2:.0f} MiB; largest single process: "
        f"{largest / 1024**2:.0f} MiB (target < {TARGET_PEAK_BYTES / 1024**3:.1f} GiB)"
    )
    print(f"report: {summary}")
    ok = elapsed < TARGET_SECONDS and max(peak, largest) < TARGET_PEAK_BYTES
    print("within targets" if ok else "OUTSIDE TARGETS")


if __name__ == "__main__":
    main()
