#!/usr/bin/env python3
"""A sweep against separate training commands: 4 short runs of a rank sweep on a medium model.

Usage: ``python benchmarks/sweep.py [--steps N] [--ranks 4,8,16,32] [--threads T] [--rounds R]``

Writes the medium SD1-layout model of ``benchmarks/train_step.py`` (random weights, single file)
and a 4-image dataset, then times, from launch to exit of each command:

- ``separate``: one ``loralab train BASELINE --set network_dim=R`` per rank (each process imports
  torch and diffusers, loads the model and reads the latent cache by itself);
- ``sweep``: one ``loralab sweep`` over ``network_dim = [ranks]`` (one process; the base model is
  loaded once and lent to every run, the latent cache is filled once; the sweep also writes its
  results and report).

Each side gets its own empty latent cache. With ``--rounds`` above 1 the two alternate (a shared
machine's load drifts) and the medians are compared. Prints the wall times and
``ratio = sweep / separate`` (target <= 0.6).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import MALLOC_ENV, MEDIUM, bench_config, write_dataset, write_model  # noqa: E402

TARGET = 0.6


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def child_env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        **{key: os.environ.get(key, value) for key, value in MALLOC_ENV.items()},
        "LORALAB_CACHE_DIR": str(cache),
        "HF_HUB_OFFLINE": "1",
    }


def separate(work: Path, config: Path, ranks: list[int], label: str) -> float:
    env = child_env(work / f"cache-{label}")
    total = 0.0
    for rank in ranks:
        command = [sys.executable, "-m", "loralab", "train", str(config), "--quiet", "--set", f"network_dim={rank}"]
        total += timed([*command, "--run-dir", str(work / label / f"rank{rank}")], env)
    return total


def sweep(work: Path, sweep_file: Path, label: str) -> float:
    command = [sys.executable, "-m", "loralab", "sweep", str(sweep_file), "--out", str(work / label)]
    return timed(command, child_env(work / f"cache-{label}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4: short runs)")
    parser.add_argument("--ranks", default="4,8,16,32", help="network_dim values, the first is the baseline")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="num_cpu_threads_per_process (default 1: on a shared machine more threads mostly wait for each other)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two this many times")
    args = parser.parse_args()
    ranks = [int(rank) for rank in args.ranks.split(",")]

    from loralab.config.loading import save_config

    with tempfile.TemporaryDirectory(prefix="loralab-sweep-bench-") as folder:
        work = Path(folder)
        checkpoint = write_model(MEDIUM, work / "medium.safetensors")
        data = write_dataset(work / "data", MEDIUM.resolution)
        config = work / "baseline.toml"
        save_config(bench_config(checkpoint, data, MEDIUM.resolution, args.steps, args.threads, ranks[0]), config)
        sweep_file = work / "sweep.toml"
        sweep_file.write_text(
            f'name = "rank"\n[baseline]\nconfig = "{config}"\n[axes]\nnetwork_dim = {ranks}\n'
        )
        print(
            f"medium model ({checkpoint.stat().st_size / 2**20:.0f} MiB), {MEDIUM.resolution}px, {len(ranks)} runs "
            f"x {args.steps} steps, {args.threads} threads",
            flush=True,
        )
        separate_times, sweep_times = [], []
        for round_index in range(args.rounds):
            separate_times.append(separate(work, config, ranks, f"separate{round_index}"))
            sweep_times.append(sweep(work, sweep_file, f"sweep{round_index}"))
            print(f"round {round_index + 1}: separate {separate_times[-1]:6.1f} s   sweep {sweep_times[-1]:6.1f} s", flush=True)
        ratio = statistics.median(sweep_times) / statistics.median(separate_times)
        verdict = "meets" if ratio <= TARGET else "misses"
        print(f"ratio sweep / separate = {ratio:.2f} ({verdict} the target <= {TARGET})")


if __name__ == "__main__":
    main()
