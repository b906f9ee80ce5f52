"""Safe reading of single-file checkpoints (.safetensors, and .ckpt/.pt through weights-only unpickling).

Pickle files can run arbitrary code when loaded, so they are read only with
``torch.load(weights_only=True)``; one that needs anything more is refused. Every failure
(missing, truncated, corrupt, unsafe) becomes a one-line ``CheckpointError``.

Safetensors data is read with plain file reads into fresh tensors, one tensor at a time,
and can be cast to the caller's dtype as it arrives. safetensors' own ``get_tensor`` copies out
of a memory map whose touched pages stay counted in the process's resident memory until the
file is closed, so loading a 2 GB checkpoint through it costs 2 GB of peak RSS on top of the
weights; plain reads go through the page cache, which does not count.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol

import torch
from safetensors import SafetensorError, safe_open

from loralab.errors import CheckpointError

_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _is_pickle_file(path: Path) -> bool:
    """Whether to read ``path`` with the (weights-only) unpickler rather than safetensors.

    Decided by content first, so renamed files go to the right reader: safetensors starts
    with an 8-byte header length followed by a JSON object; torch files start with a zip
    signature or, in the legacy format, a pickled magic number.
    """
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return False
    return head.startswith((b"PK\x03\x04", _LEGACY_TORCH_MAGIC)) or path.suffix.lower() in _PICKLE_SUFFIXES


def _unsafe_pickle_error(path: Path, exc: Exception) -> CheckpointError:
    found = re.search(r"GLOBAL (\S+)", str(exc))
    what = f" ({found.group(1)})" if found else ""
    return CheckpointError(
        f"refusing to load {path}: it needs arbitrary Python objects unpickled{what}, which can run code; "
        "convert it to .safetensors with a tool you trust and pass that instead"
    )


class CheckpointFile:
    """An opened single-file checkpoint: key names, shapes, and tensors read on demand.

    For safetensors nothing but the header is read until ``read`` asks for tensors, so
    EMA copies and other unused weights in a file never reach memory.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._stack = ExitStack()
        self._safetensors = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._handle: BinaryIO | None = None  # unbuffered file for reading safetensors data
        self._locations: dict[str, tuple[torch.dtype, list[int], int, int]] = {}  # dtype, shape, start, end
        self._scratch = torch.empty(0, dtype=torch.uint8)  # stored bytes of a tensor being cast
        self._ahead: dict[str, torch.Tensor] = {}  # tensors read ahead (see take_prefetched), not yet asked for
        if not self.path.exists():
            raise CheckpointError(f"checkpoint not found: {self.path}")
        if self.path.is_dir():
            raise CheckpointError(f"{self.path} is a folder; expected a .safetensors or .ckpt file")
        try:
            is_pickle = _is_pickle_file(self.path)
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        if is_pickle:
            self._tensors = self._load_pickle()
        else:
            self._open_safetensors()

    def _open_safetensors(self) -> None:
        try:
            self._safetensors = self._stack.enter_context(safe_open(str(self.path), framework="pt", device="cpu"))
        except SafetensorError as exc:
            raise CheckpointError(
                f"{self.path} is not a readable safetensors file ({str(exc).splitlines()[0]}); "
                "it may be truncated or corrupt: download it again"
            ) from None
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        # safe_open has validated the header (offsets inside the file, no overlaps); read it
        # again for the byte ranges, which safe_open does not expose.
        handle = self._stack.enter_context(self.path.open("rb", buffering=0))
        self._handle = handle
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
        for key, entry in header.items():
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype", "")) if key != "__metadata__" else None
            if dtype is not None:  # other dtypes (e.g. float8) are left to safetensors' reader
                start, end = entry["data_offsets"]
                self._locations[key] = (dtype, list(entry["shape"]), 8 + header_size + start, 8 + header_size + end)

    def _load_pickle(self) -> dict[str, torch.Tensor]:
        try:
            # A file object, not a path: torch.load would hand a *.safetensors name to safetensors.
            with self.path.open("rb") as handle:
                loaded = torch.load(handle, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Unsupported global" in str(exc) or "Weights only load failed" in str(exc):
                raise _unsafe_pickle_error(self.path, exc) from None
            raise CheckpointError(f"{self.path} is not a readable checkpoint (corrupt pickle data)") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        except Exception as exc:  # noqa: BLE001 - damaged pickle bytes fail in the unpickler in any way (IndexError, KeyError ...)
            first = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__
            raise CheckpointError(
                f"{self.path} is not a readable checkpoint ({first[:120]}); it may be truncated or corrupt"
            ) from None
        # Lightning-style files wrap the weights in "state_dict" next to counters and the like.
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{self.path} does not hold a state dict (found {type(loaded).__name__})")
        return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}

    def keys(self) -> list[str]:
        if self._safetensors is not None:
            return list(self._safetensors.keys())
        return list(self._tensors)

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor: names, shapes and dtypes without the data."""
        if self._safetensors is None:
            return {k: v.to("meta") for k, v in self._tensors.items()}
        metas = {}
        for key in self._safetensors.keys():
            view = self._safetensors.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(view.get_dtype(), torch.float32)
            metas[key] = torch.empty(view.get_shape(), dtype=dtype, device="meta")
        return metas

    def read(self, keys: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Load these tensors (real data, owned by the returned tensors, not by the file).

        ``dtype``: cast each floating-point tensor to it as it is read, so a half-precision file
        loaded into float32 never holds both precisions of more than one tensor.
        """
        ahead = take_prefetched(self.path, dtype)
        if ahead:
            self._ahead.update(ahead)
        return {key: self._ahead.pop(key) if key in self._ahead else self._read_one(key, dtype) for key in keys}

    def read_from_file(self, keys: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``read``, always from the file (what a read ahead does)."""
        return {key: self._read_one(key, dtype) for key in keys}

    def _read_one(self, key: str, dtype: torch.dtype | None) -> torch.Tensor:
        location = self._locations.get(key)
        if location is None:
            return _cast(self._read_fallback(key), dtype)
        stored, shape, start, end = location
        if dtype is None or dtype == stored or not stored.is_floating_point:
            target = torch.empty(end - start, dtype=torch.uint8)
            self._read_bytes(key, target, start, end)
            return target.view(stored).reshape(shape)
        # A cast: the stored bytes go through one scratch buffer reused for every tensor, so
        # reading allocates (and page-faults) only the result, and the freed source-precision
        # blocks do not fragment the heap between the results.
        if self._scratch.numel() < end - start:
            self._scratch = torch.empty(end - start, dtype=torch.uint8)
        source = self._scratch[: end - start]
        self._read_bytes(key, source, start, end)
        return torch.empty(shape, dtype=dtype).copy_(source.view(stored).reshape(shape))

    def _read_bytes(self, key: str, into: torch.Tensor, start: int, end: int) -> None:
        assert self._handle is not None
        buffer, done = memoryview(into.numpy()), 0
        self._handle.seek(start)
        while done < end - start:  # one call reads at most ~2 GiB on Linux
            count = self._handle.readinto(buffer[done:])
            if not count:
                raise CheckpointError(f"{self.path} is truncated (tensor {key} is cut short); download it again")
            done += count

    def _read_fallback(self, key: str) -> torch.Tensor:
        """Pickled tensors, and safetensors dtypes the plain reader does not know."""
        if self._safetensors is None:
            return self._tensors[key]
        try:
            return self._safetensors.get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(
                f"{self.path} is corrupt ({str(exc).splitlines()[0]}); download it again"
            ) from None

    def read_prefixed(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Load every tensor whose name starts with ``prefix`` (names kept whole); see ``read``."""
        return self.read([k for k in self.keys() if k.startswith(prefix)], dtype)

    def close(self) -> None:
        self._stack.close()
        self._tensors = {}
        self._handle = None
        self._locations = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._ahead = {}

    def __enter__(self) -> CheckpointFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


def read_state_dict(path: Path | str, *, include: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Read a single-file checkpoint's tensors safely (optionally only keys ``include`` accepts)."""
    with CheckpointFile(path) as checkpoint:
        keys = [k for k in checkpoint.keys() if include is None or include(k)]
        return checkpoint.read(keys)


# ---------------------------------------------------------------------------------------------
# Tensors read ahead (loralab.models.prefetch fills this; CheckpointFile.read takes from it)

PrefetchKey = tuple[str, int, int, torch.dtype]  # resolved path, size, mtime, dtype


class Prefetched(Protocol):
    def take(self) -> dict[str, torch.Tensor] | None: ...

    def discard(self) -> None: ...


_PREFETCHED: dict[PrefetchKey, Prefetched] = {}


def prefetch_key(path: Path, dtype: torch.dtype) -> PrefetchKey:
    """What identifies tensors read ahead: the file as it is now, and the dtype they were cast to."""
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, dtype)


def take_prefetched(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor] | None:
    """The tensors of ``path`` read ahead in ``dtype`` (waiting for the reader to finish), once;
    None when none were (or the read ahead failed: the caller reads and reports for itself)."""
    if not _PREFETCHED or dtype is None:
        return None
    try:
        entry = _PREFETCHED.pop(prefetch_key(path, dtype), None)
    except OSError:
        return None
    return entry.take() if entry is not None else None


def discard_prefetched() -> None:
    """Drop every read ahead nobody took (a run whose model came from elsewhere), freeing its memory."""
    while _PREFETCHED:
        _PREFETCHED.popitem()[1].discard()
