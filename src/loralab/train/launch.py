"""``--num-processes N``: start N training processes on this machine, data parallel.

Each process runs the same :func:`~loralab.train.run.train` as a single-process run; the
environment variables set here (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...) are the ones
``accelerate launch`` and ``torchrun`` set, so accelerate builds the process group from them
(NCCL on GPUs, gloo on CPUs). ``accelerate launch -m loralab train CONFIG`` works the same way
without this module.

The processes are spawned (not forked), so none inherits a half-initialised CUDA or OpenMP
runtime. Ctrl-C reaches every process of the terminal's process group: each finishes its
step, they agree on stopping, and the main one saves; this parent only waits (SIGTERM sent to
it is passed on to the children). A ``LoralabError`` in any process becomes the parent's error.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from loralab.errors import ConfigError, LoralabError
from loralab.imports import heavy_imports
from loralab.models.prefetch import checkpoint_prefetch
from loralab.train.precision import config_precision

_DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def process_started_at() -> float | None:
    """When this process started (Unix time), from the kernel's record of it: a command's launch
    includes its imports, which run before any of its code can take the time. None where the
    system does not say (only Linux's /proc is read)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        # Field 22 (start time, in clock ticks after boot), counted after the ")" that ends the
        # command name, which may itself hold spaces.
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        running = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - running


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _worker(local_rank: int, world_size: int, port: int, results: Any, kwargs: dict[str, Any]) -> None:
    """One training process (runs in a spawned child)."""
    os.environ.update(
        {
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    # accelerate sets torch's threads from OMP_NUM_THREADS (and warns when unset); the run's own
    # num_cpu_threads_per_process still wins.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    with heavy_imports():
        from loralab.train.run import train

    try:
        result = train(**kwargs)
    except LoralabError as exc:
        results.put(("error", exc))
        sys.exit(2)  # a non-zero exit makes the parent stop the other processes
    if local_rank == 0:
        results.put(("ok", result))


def launch_training(num_processes: int, config: Any, *, run_dir: Path | None, **kwargs: Any) -> Any:
    """Run :func:`~loralab.train.run.train` in ``num_processes`` local processes; returns the main
    process's ``RunResult``. One process runs in this process, without spawning.

    Raises ``ConfigError`` for a bad count or when already inside a distributed launch, and
    re-raises a ``LoralabError`` that any process raised.
    """
    if num_processes < 1:
        raise ConfigError(f"--num-processes {num_processes} must be at least 1")
    if num_processes == 1:
        # The checkpoint is read while diffusers and transformers import (see models.prefetch).
        weight_dtype = config_precision(config).base_weight_dtype
        with checkpoint_prefetch(config.pretrained_model_name_or_path, weight_dtype, with_vae=not config.vae):
            with heavy_imports():
                from loralab.train.run import train

            return train(config, run_dir=run_dir, **kwargs)
    from loralab.train.run import default_run_dir
    if any(name in os.environ for name in _DISTRIBUTED_ENV):
        raise ConfigError("already running under a distributed launcher (accelerate/torchrun); leave out --num-processes")

    import torch.multiprocessing as mp

    # Every process must write into the same run directory: fix it before they start.
    if run_dir is None and kwargs.get("resume") is None:
        run_dir = default_run_dir(config)
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    arguments = {"config": config, "run_dir": run_dir, **kwargs}
    processes = mp.start_processes(
        _worker,
        args=(num_processes, _free_port(), results, arguments),
        nprocs=num_processes,
        join=False,
        start_method="spawn",
    )

    def forward(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
        for pid in processes.pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN), signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}
    try:
        while not processes.join():
            pass
    except mp.ProcessExitedException:
        if results.empty():
            raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    outcome = results.get() if not results.empty() else ("error", LoralabError("the training processes ended without a result"))
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]
