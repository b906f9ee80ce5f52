"""Safe reading of single-file checkpoints (.safetensors, and .ckpt/.pt through weights-only unpickling).

Pickle files can run arbitrary code when loaded, so they are read only with
``torch.load(weights_only=True)``; one that needs anything more is refused. Every failure
(missing, truncated, corrupt, unsafe) becomes a one-line ``CheckpointError``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

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

    def _load_pickle(self) -> dict[str, torch.Tensor]:
        try:
            # A file object, not a path: torch.load would hand a *.safetensors name to safetensors.
            with self.path.open("rb") as handle:
                loaded = torch.load(handle, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Unsupported global" in str(exc) or "Weights only load failed" in str(exc):
                raise _unsafe_pickle_error(self.path, exc) from None
            raise CheckpointError(f"{self.path} is not a readable checkpoint (corrupt pickle data)") from None
        except (RuntimeError, EOFError, ValueError, OSError) as exc:
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

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Load these tensors (real data)."""
        if self._safetensors is None:
            return {k: self._tensors[k] for k in keys}
        try:
            return {k: self._safetensors.get_tensor(k) for k in keys}
        except SafetensorError as exc:
            raise CheckpointError(
                f"{self.path} is corrupt ({str(exc).splitlines()[0]}); download it again"
            ) from None

    def read_prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """Load every tensor whose name starts with ``prefix`` (names kept whole)."""
        return self.read([k for k in self.keys() if k.startswith(prefix)])

    def close(self) -> None:
        self._stack.close()
        self._tensors = {}

    def __enter__(self) -> CheckpointFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_state_dict(path: Path | str, *, include: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Read a single-file checkpoint's tensors safely (optionally only keys ``include`` accepts)."""
    with CheckpointFile(path) as checkpoint:
        keys = [k for k in checkpoint.keys() if include is None or include(k)]
        return checkpoint.read(keys)
