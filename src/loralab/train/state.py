"""Training state for ``--resume``: everything the next step depends on, written atomically.

A state directory holds:

- ``trainable.safetensors``: the trained (LoRA) weights in full precision, not the LoRA
  file's ``save_precision``, so a resumed run continues from bit-identical weights;
- ``optimizer.pt`` (including D-Adaptation/Prodigy's ``d`` in the param groups),
  ``lr_scheduler.pt``, ``grad_scaler.pt`` (fp16 runs), ``rng.pt`` (torch, CUDA, numpy and
  Python global generators plus named generators such as the data-order one);
- ``progress.json``: global step, epoch, position in the epoch's data order, the loss
  recorder, and free-form ``extra`` data (e.g. the run's planned totals), written last.

The directory is built under a temporary name next to the target and renamed into place,
so a crash never leaves a half-written state under the real name; during the swap the
previous state is kept as ``.<name>.old-*`` and ``find_state_dir`` falls back to it.
Everything is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loralab.errors import LoralabError

STATE_FORMAT_VERSION = 1
PROGRESS_FILE = "progress.json"


class StateError(LoralabError):
    """A training state directory is missing, incomplete or from another format."""


@dataclass(frozen=True)
class TrainingProgress:
    """Where the run stands: steps done and the position in the data order."""

    global_step: int  # optimizer steps finished
    epoch: int  # 0-based epoch in progress
    step_in_epoch: int  # batches of that epoch already consumed


@dataclass
class ResumedState:
    """What ``load_training_state`` gives back besides restoring the objects passed to it."""

    progress: TrainingProgress
    extra: dict[str, Any] = field(default_factory=dict)


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Snapshot of the global RNGs (torch, CUDA, numpy, Python) and of named generators."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": python_version, "internal": list(python_internal), "gauss": python_gauss},
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back what ``capture_rng_state`` saw; named generators must match by name."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss"]))
    saved = state["generators"]
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise StateError(f"the saved state has no random generator {name!r}; it cannot resume this run")
        generator.set_state(saved[name])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_directory_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` into a fresh sibling directory, then swap it in under ``directory``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        for path in tmp.iterdir():
            _fsync(path)
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_training_state(
    directory: Path,
    *,
    progress: TrainingProgress,
    trainable: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    loss_recorder: Any,
    generators: Mapping[str, torch.Generator] | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the training state to ``directory`` atomically (replacing an older one) and return it.

    ``trainable`` is the module holding the trained weights (the LoRA network); ``extra``
    must be JSON data. Call it between optimizer steps, after the scheduler stepped.
    ``loss_recorder`` is anything with ``state_dict()`` / ``load_state_dict()`` of plain data.
    """

    def write(tmp: Path) -> None:
        tensors = {name: t.detach().cpu().contiguous() for name, t in trainable.state_dict().items()}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        torch.save(capture_rng_state(generators), tmp / "rng.pt")
        if grad_scaler is not None:
            torch.save(grad_scaler.state_dict(), tmp / "grad_scaler.pt")
        record = {
            "format_version": STATE_FORMAT_VERSION,
            "progress": asdict(progress),
            "loss_recorder": loss_recorder.state_dict(),
            "extra": dict(extra or {}),
        }
        # Written last: a directory with progress.json is complete.
        (tmp / PROGRESS_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")

    _write_directory_atomically(Path(directory), write)
    return Path(directory)


def find_state_dir(directory: Path) -> Path | None:
    """``directory`` if it holds a complete state, else the previous state kept during a swap, else None."""
    directory = Path(directory)
    if (directory / PROGRESS_FILE).is_file():
        return directory
    if directory.parent.is_dir():
        for candidate in sorted(directory.parent.glob(f".{directory.name}.old-*")):
            if (candidate / PROGRESS_FILE).is_file():
                return candidate
    return None


def load_training_state(
    directory: Path,
    *,
    trainable: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    loss_recorder: Any,
    generators: Mapping[str, torch.Generator] | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> ResumedState:
    """Restore a state saved by ``save_training_state`` into freshly built training objects.

    ``trainable`` is the module whose state dict was saved; the optimizer must hold the same
    parameters in the same groups. Raises ``StateError`` when the state is missing,
    incomplete, of another format, or does not fit the objects (e.g. another network rank).
    """
    found = find_state_dir(Path(directory))
    if found is None:
        raise StateError(f"no complete training state in {directory}; resume from a run directory that saved state")
    record = _read_state_file(found, PROGRESS_FILE, lambda path: json.loads(path.read_text(encoding="utf-8")))
    if not isinstance(record, dict) or record.get("format_version") != STATE_FORMAT_VERSION:
        version = record.get("format_version") if isinstance(record, dict) else None
        raise StateError(
            f"training state in {found} has format {version}, "
            f"expected {STATE_FORMAT_VERSION}; it was written by another loralab version"
        )
    if not all(isinstance(record.get(key), dict) for key in ("progress", "loss_recorder", "extra")):
        raise _damaged(found, PROGRESS_FILE, "entries missing")

    def load_torch(path: Path) -> Any:
        return torch.load(path, weights_only=True)

    weights = _read_state_file(found, "trainable.safetensors", lambda path: load_file(str(path)))
    optimizer_state = _read_state_file(found, "optimizer.pt", load_torch)
    scheduler_state = _read_state_file(found, "lr_scheduler.pt", load_torch)
    rng_state = _read_state_file(found, "rng.pt", load_torch)
    scaler_state = None
    if grad_scaler is not None and (found / "grad_scaler.pt").is_file():
        scaler_state = _read_state_file(found, "grad_scaler.pt", load_torch)
    try:
        trainable.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(scheduler_state)
        if scaler_state is not None:
            grad_scaler.load_state_dict(scaler_state)
        restore_rng_state(rng_state, generators)
        loss_recorder.load_state_dict(record["loss_recorder"])
        progress = TrainingProgress(**record["progress"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise StateError(
            f"training state in {found} does not fit this run's network or optimizer ({_first_detail(exc)}); "
            f"resume with the config the run was started with"
        ) from exc
    return ResumedState(progress=progress, extra=record["extra"])


def _read_state_file(found: Path, name: str, read: Callable[[Path], Any]) -> Any:
    """``read(found / name)``; a missing or unreadable file is a damaged state (``StateError``)."""
    try:
        return read(found / name)
    except FileNotFoundError:
        raise _damaged(found, name, "missing") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in its reader in any way
        raise _damaged(found, name, _first_detail(exc)) from None


def _damaged(found: Path, name: str, detail: str) -> StateError:
    return StateError(
        f"training state in {found} is damaged: {name} is unreadable ({detail}); "
        "resume from a copy of the run folder, or start the run again"
    )


def _first_detail(exc: BaseException) -> str:
    """The first informative line of an exception (``load_state_dict`` opens with a bare
    "Error(s) in loading state_dict for X:"), shortened to its first sentence."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    informative = [line for line in lines if not line.endswith(":")]
    detail = (informative or lines or [type(exc).__name__])[0].split(". ")[0].rstrip(".")
    return detail if len(detail) <= 240 else detail[:237] + "..."
