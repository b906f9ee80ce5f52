"""Read a run's base checkpoint in a background thread while the process is still importing.

Starting ``loralab train`` spends seconds importing diffusers and transformers (pure Python, under
the GIL) and seconds reading and casting the checkpoint (file reads and tensor copies, which
release the GIL). :func:`checkpoint_prefetch` starts the second before the first, so on two or
more cores they overlap (the reading thread keeps to one core, leaving the imports theirs);
:meth:`CheckpointFile.read` then takes the tensors instead of reading them again. The tensors
are exactly what the read would give (same reader, same cast). Only the UNet, VAE and
text-encoder tensors of a single-file safetensors checkpoint are read ahead; any failure leaves
the normal read to load (and report) as if nothing had been read.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from loralab.models.checkpoint_file import _PREFETCHED, CheckpointFile, prefetch_key
from loralab.models.family import LDM_UNET_PREFIX, LDM_VAE_PREFIX, ModelFamily


def _model_prefixes(with_vae: bool) -> tuple[str, ...]:
    encoders = {encoder.ldm_prefix for family in ModelFamily for encoder in family.spec.text_encoders}
    return (LDM_UNET_PREFIX, *sorted(encoders), *((LDM_VAE_PREFIX,) if with_vae else ()))


# While the main thread imports it holds the GIL, and a thread waiting for it gets it only after
# the switch interval (5 ms by default). The reader needs it a few times per tensor (1,100
# tensors in SD1.5), which left it waiting seconds in all; a short interval lets it finish while
# the imports still run.
_READING_SWITCH_INTERVAL = 0.0002


class _ShortSwitchInterval:
    """The short switch interval while any reader runs; the interval from before the first one
    comes back when the last one ends (read-aheads may overlap: a dropped one still finishes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readers = 0
        self._original = sys.getswitchinterval()

    def enter(self) -> None:
        with self._lock:
            if self._readers == 0:
                self._original = sys.getswitchinterval()
                sys.setswitchinterval(min(self._original, _READING_SWITCH_INTERVAL))
            self._readers += 1

    def leave(self) -> None:
        with self._lock:
            self._readers -= 1
            if self._readers == 0:
                sys.setswitchinterval(self._original)


_SHORT_SWITCH_INTERVAL = _ShortSwitchInterval()


def use_one_core_in_this_thread() -> bool:
    """Let this thread's tensor operations run on one core; other threads keep theirs.

    The read-ahead's casts would otherwise split over every core torch uses, taking the core the
    imports run on: measured on two cores, the imports then took as long as importing and reading
    one after the other. ``torch.set_num_threads`` is process-wide, but the OpenMP thread count is
    per thread; torch sets a thread's count from its own setting on the thread's first parallel
    operation (``get_num_threads`` makes that happen), after which this thread's count is set
    alone. Returns False, changing nothing, where torch's OpenMP runtime cannot be reached.
    """
    torch.get_num_threads()
    try:
        set_thread_count = ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError, TypeError):  # no OpenMP symbols in the process (or no dlopen(NULL))
        return False
    set_thread_count(1)
    return torch.get_num_threads() == 1


class _ReadAhead:
    """One checkpoint being read in a background thread; the tensors go to whoever takes them first."""

    def __init__(self, path: Path, dtype: torch.dtype, prefixes: tuple[str, ...]) -> None:
        self._done = threading.Event()
        self._tensors: dict[str, torch.Tensor] | None = None
        self._dropped = False
        _SHORT_SWITCH_INTERVAL.enter()
        threading.Thread(
            target=self._read, args=(path, dtype, prefixes), name="loralab-checkpoint-prefetch", daemon=True
        ).start()

    def _read(self, path: Path, dtype: torch.dtype, prefixes: tuple[str, ...]) -> None:
        try:
            use_one_core_in_this_thread()
            with CheckpointFile(path) as checkpoint:
                tensors = checkpoint.read_from_file([k for k in checkpoint.keys() if k.startswith(prefixes)], dtype)
            if not self._dropped:
                self._tensors = tensors
        except Exception:  # noqa: BLE001 - the normal read reports the problem with its own message
            self._tensors = None
        finally:
            _SHORT_SWITCH_INTERVAL.leave()
            self._done.set()

    def take(self) -> dict[str, torch.Tensor] | None:
        self._done.wait()
        tensors, self._tensors = self._tensors, None
        return tensors

    def discard(self) -> None:
        self._dropped, self._tensors = True, None


@contextmanager
def checkpoint_prefetch(path: Path | str | None, dtype: torch.dtype, *, with_vae: bool = True) -> Iterator[None]:
    """Read ``path``'s model tensors, cast to ``dtype``, in a background thread for the duration of
    the block; whatever was not taken by then is dropped at its end (no memory outlives it)."""
    path = Path(path) if path else None
    if path is None or path.suffix != ".safetensors" or not path.is_file():
        yield
        return
    key = prefetch_key(path, dtype)
    _PREFETCHED[key] = _ReadAhead(path, dtype, _model_prefixes(with_vae))
    try:
        yield
    finally:
        entry = _PREFETCHED.pop(key, None)
        if entry is not None:
            entry.discard()
