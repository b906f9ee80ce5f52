"""A content-addressed, on-disk cache of VAE encodings, shared by every run that can use it.

Each entry is the VAE's posterior for one training image as it is cropped into its bucket: the
mean and log-variance of the diagonal Gaussian (diffusers' ``DiagonalGaussianDistribution``),
stored unscaled as float32 safetensors. A run then draws a fresh latent per epoch and sample
(``mean + exp(logvar / 2) * noise``, seeded; sd-scripts caches a single draw, its #1709) or uses
the mean, and multiplies by the VAE's scaling factor at use time (:func:`draw_latents`).

**Key.** SHA-256 of: the image file's bytes (hash of the *file bytes*, not decoded pixels: a
cache hit must not cost a decode, and every change to the pixels, including an EXIF orientation
tag that would rotate them, changes the bytes; a metadata-only edit costs one needless
re-encode, never a stale hit), the crop geometry (original, resized and bucket sizes, crop
offset), the flip, the identity of the VAE weights, the VAE's dtype, and a format version that
covers the decoding and resizing code. Nothing else goes in, so runs that differ in network
rank, learning rate, optimizer... share every latent; runs that differ in resolution or buckets
share the images whose geometry did not change.

**VAE identity.** SHA-256 over the VAE's state dict (names, dtypes, shapes, bytes). Hashing a
full VAE takes about a second, so the digest is remembered on disk by the identity of the file
it was loaded from (path, size, modification and change times, inode; every file of a folder),
plus the state dict's names, shapes and dtypes: any edit to the file makes a fresh hash.

**Layout.** ``<root>/latents/<2 hex>/<key>.safetensors``; ``<root>/weights/*.txt`` memoised
weight digests. ``root`` defaults to :func:`default_cache_dir`. Every write goes to a temporary
file in the same folder and is renamed into place, so a reader never sees half an entry and two
runs filling the same cache at once only ever write identical files.

Caching needs a fixed image per sample: ``color_aug`` and ``random_crop`` change the pixels
every epoch, so (as in sd-scripts) they cannot be used with cached latents.

Errors: :class:`~loralab.errors.DatasetError` for an image that cannot be read or decoded while
filling; an unreadable entry is re-encoded by :meth:`LatentCache.fill` and reported by
:meth:`LatentCache.load` as a ``DatasetError`` naming the file to delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import get_worker_info
from tqdm import tqdm

from loralab.data.transforms import CropGeometry, to_tensor, training_pixels
from loralab.errors import DatasetError

# Bump when decoding, resizing or the entry layout changes: old entries then simply miss.
CACHE_FORMAT_VERSION = 1
LatentSampling = Literal["sample", "mean"]
_ENTRY_TENSORS = ("mean", "logvar")


def default_cache_dir() -> Path:
    """The cache root: ``$LORALAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/loralab``, else the
    platform's user cache folder (``~/.cache/loralab``, ``~/Library/Caches/loralab``,
    ``%LOCALAPPDATA%\\loralab\\Cache``)."""
    explicit = os.environ.get("LORALAB_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "loralab"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "loralab"
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "loralab" / "Cache"
    return Path.home() / ".cache" / "loralab"


def vae_dtype_for(config: Any) -> torch.dtype:
    """The dtype a run encodes images in (sd-scripts: the weight dtype, float32 with ``no_half_vae``).

    ``loralab cache`` and training must agree on it, or their keys differ.
    """
    if config.no_half_vae or config.mixed_precision == "no":
        return torch.float32
    return torch.float16 if config.mixed_precision == "fp16" else torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Small helpers shared with the text-encoder cache


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save ``tensors`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, temp, metadata=metadata)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def read_safetensors(path: Path, names: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """The named tensors of a cache entry, or None when it is missing, unreadable or incomplete."""
    try:
        with safe_open(str(path), framework="pt") as entry:
            if not set(names) <= set(entry.keys()):
                return None
            return {name: entry.get_tensor(name) for name in names}
    except (OSError, SafetensorError, ValueError):
        return None


def sha256_json(value: Any) -> str:
    """SHA-256 of a canonical JSON encoding (the cache keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def state_dict_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every tensor of ``module.state_dict()``: name, dtype, shape and bytes."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        hasher.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        hasher.update(data.reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def _file_identity(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def source_identity(source: Path) -> list[Any]:
    """What identifies the file (or every file of the folder) weights were loaded from."""
    if source.is_dir():
        return [_file_identity(p) for p in sorted(source.rglob("*")) if p.is_file()]
    return _file_identity(source)


def weights_identity(
    module: torch.nn.Module, root: Path | None, *, source: Path | str | None = None, component: str = ""
) -> str:
    """:func:`state_dict_digest` of ``module``, memoised under ``root/weights`` by the identity of
    ``source`` (the file or folder it was loaded from) and ``component``. Without a ``root`` or
    an existing ``source`` the digest is computed every time."""
    if root is None or source is None or not Path(source).exists():
        return state_dict_digest(module)
    layout = [(name, str(t.dtype), tuple(t.shape)) for name, t in sorted(module.state_dict().items())]
    memo = root / "weights" / f"{sha256_json([source_identity(Path(source)), component, layout])}.txt"
    try:
        remembered = memo.read_text(encoding="ascii").strip()
        if len(remembered) == 64:
            return remembered
    except (OSError, UnicodeDecodeError):
        pass
    digest = state_dict_digest(module)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=".memo.", suffix=".tmp", dir=memo.parent)
        with os.fdopen(handle, "w", encoding="ascii") as file:
            file.write(digest)
        os.replace(temp, memo)
    except OSError:
        pass  # a read-only cache still works; the digest is just computed again next time
    return digest


# ---------------------------------------------------------------------------------------------
# Encoding and drawing latents


def encode_distribution(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior ``(mean, logvar)`` of images ``(B, 3, H, W)`` in [-1, 1], as float32
    on the VAE's device."""
    parameter = next(vae.parameters())
    with torch.no_grad():
        distribution = vae.encode(images.to(parameter.device, parameter.dtype)).latent_dist
    return distribution.mean.float(), distribution.logvar.float()


def draw_latents(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    *,
    seeds: Sequence[int],
    mode: LatentSampling = "sample",
    scaling_factor: float,
    shift_factor: float | None = None,
) -> torch.Tensor:
    """Latents for the UNet from posteriors ``(B, C, h, w)``: one draw per sample from its own
    seed (or the mean), shifted and scaled as the VAE's config says (SD: ``x 0.18215``)."""
    if mode == "mean":
        latents = mean
    elif mode == "sample":
        if len(seeds) != mean.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for {mean.shape[0]} latents")
        noise = torch.stack(
            [torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        )
        latents = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
    else:
        raise ValueError(f"unknown latent sampling mode {mode!r}; use 'sample' or 'mean'")
    if shift_factor:
        latents = latents - shift_factor
    return latents * scaling_factor


def latents_from_images(vae: Any, images: torch.Tensor, *, seeds: Sequence[int], mode: LatentSampling = "sample") -> torch.Tensor:
    """Encode images and draw latents exactly as cached entries are drawn (for uncached runs)."""
    mean, logvar = encode_distribution(vae, images)
    config = vae.config
    return draw_latents(
        mean, logvar, seeds=seeds, mode=mode, scaling_factor=config.scaling_factor,
        shift_factor=getattr(config, "shift_factor", None),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The cache


@dataclass(frozen=True)
class LatentRequest:
    """One latent a dataset needs: an image file, its crop geometry, flipped or not."""

    path: Path
    geometry: CropGeometry
    flipped: bool = False


@dataclass(frozen=True)
class FillStats:
    """What :meth:`LatentCache.fill` did: entries already present, entries encoded now."""

    cached: int
    encoded: int


def content_hash(data: bytes) -> str:
    """The image-content part of a key: SHA-256 of the file's bytes."""
    return hashlib.sha256(data).hexdigest()


def read_image_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read image {path}: {exc.strerror or exc}; check the file") from exc


# Entries a training process has read stay in its memory up to this size, as sd-scripts keeps
# cached latents in RAM: reading a file every step cost more than the rest of a small model's step
# outside the model. Entries are content-addressed, so a remembered one can never be stale.
MEMORY_BUDGET_BYTES = 1 << 30


class _ReadEntries:
    """Entries already read, up to a byte budget; the first ones read stay (an epoch reads each
    entry once, so no eviction order would do better)."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.entries.get(key)

    def keep(self, key: str, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry)
        # Data-loader workers end with their epoch: what they would keep is lost, and it would
        # multiply the memory by the number of workers.
        if self.used + size <= self.budget and get_worker_info() is None:
            self.entries[key] = entry
            self.used += size


@dataclass(frozen=True)
class LatentCache:
    """The cache entries of one VAE (by weights identity) and dtype, under ``root``.

    Holds no model, so a dataset that reads from it can go to data-loader worker processes.
    Build it with :meth:`for_vae`.
    """

    root: Path
    vae_id: str
    dtype: str
    scaling_factor: float
    shift_factor: float | None = None
    _read: _ReadEntries = field(
        default_factory=lambda: _ReadEntries(MEMORY_BUDGET_BYTES), init=False, repr=False, compare=False
    )

    @classmethod
    def for_vae(cls, vae: Any, *, source: Path | str | None = None, root: Path | str | None = None) -> LatentCache:
        """The cache view of ``vae``; ``source`` is the file or folder it was loaded from (the
        ``--vae`` file, else the checkpoint), which lets its weights digest be remembered."""
        base = Path(root) if root is not None else default_cache_dir()
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatasetError(
                f"cannot create the cache folder {base}: {exc.strerror or exc}; pass another with --cache-dir"
            ) from exc
        dtype = next(vae.parameters()).dtype
        return cls(
            root=base,
            vae_id=weights_identity(vae, base, source=source, component="vae"),
            dtype=str(dtype).removeprefix("torch."),
            scaling_factor=float(vae.config.scaling_factor),
            shift_factor=getattr(vae.config, "shift_factor", None),
        )

    def key_for(self, image_hash: str, geometry: CropGeometry, flipped: bool) -> str:
        """The key of one entry (see the module docstring for what goes in)."""
        return sha256_json(
            {
                "format": CACHE_FORMAT_VERSION,
                "image_sha256": image_hash,
                "geometry": geometry.describe(),
                "flipped": bool(flipped),
                "vae": self.vae_id,
                "dtype": self.dtype,
            }
        )

    def keys_for(self, requests: Iterable[LatentRequest]) -> list[str]:
        """Keys of ``requests``, hashing each image file once."""
        hashes: dict[Path, str] = {}
        keys = []
        for request in requests:
            if request.path not in hashes:
                hashes[request.path] = content_hash(read_image_bytes(request.path))
            keys.append(self.key_for(hashes[request.path], request.geometry, request.flipped))
        return keys

    def path_for(self, key: str) -> Path:
        return self.root / "latents" / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """True when the entry exists and its tensors can be read."""
        return read_safetensors(self.path_for(key), _ENTRY_TENSORS) is not None

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)`` of one entry, each ``(C, h, w)`` float32 (shared: do not modify them)."""
        entry = self._read.get(key)
        if entry is not None:
            return entry
        tensors = read_safetensors(self.path_for(key), _ENTRY_TENSORS)
        if tensors is None:
            raise DatasetError(
                f"latent cache entry {self.path_for(key)} is missing or unreadable; run 'loralab cache' "
                f"again (delete the file if it is damaged)"
            )
        entry = (tensors["mean"], tensors["logvar"])
        self._read.keep(key, entry)
        return entry

    def store(self, key: str, mean: torch.Tensor, logvar: torch.Tensor, request: LatentRequest, image_hash: str) -> None:
        """Write one entry atomically; the metadata records where it came from, for people."""
        metadata = {
            "format": f"loralab-latents-{CACHE_FORMAT_VERSION}",
            "image": str(request.path),
            "image_sha256": image_hash,
            "geometry": json.dumps(request.geometry.describe()),
            "flipped": str(bool(request.flipped)).lower(),
            "vae": self.vae_id,
            "dtype": self.dtype,
        }
        try:
            write_safetensors_atomic(self.path_for(key), {"mean": mean, "logvar": logvar}, metadata)
        except OSError as exc:
            raise DatasetError(
                f"cannot write to the latent cache {self.root}: {exc.strerror or exc}; free some space "
                f"or pass another folder with --cache-dir"
            ) from exc

    def fill(
        self, vae: Any, requests: Iterable[LatentRequest], *, batch_size: int = 4, progress: bool = False
    ) -> FillStats:
        """Encode every request whose entry is missing (or unreadable); return the counts.

        ``vae`` must be the model this cache view was built for. Images of one bucket are
        encoded ``batch_size`` at a time; each file is read once, and the key is made from the
        very bytes that are decoded, so an image changing meanwhile cannot be stored under a
        stale key.
        """
        unique = list(dict.fromkeys(requests))
        pending: dict[tuple[int, int], list[tuple[str, LatentRequest, str, torch.Tensor]]] = {}
        cached = encoded = 0
        last: tuple[Path, bytes, str] | None = None
        with tqdm(total=len(unique), desc="caching latents", unit="latent", disable=not progress) as bar:
            for request in unique:
                if last is None or last[0] != request.path:
                    data = read_image_bytes(request.path)
                    last = (request.path, data, content_hash(data))
                _, data, image_hash = last
                key = self.key_for(image_hash, request.geometry, request.flipped)
                if self.has(key):
                    cached += 1
                    bar.update(1)
                    continue
                pixels = to_tensor(training_pixels(data, request.geometry, request.flipped, request.path))
                group = pending.setdefault(request.geometry.bucket, [])
                group.append((key, request, image_hash, pixels))
                if len(group) >= batch_size:
                    encoded += self._encode_group(vae, group)
                    bar.update(len(group))
                    group.clear()
            for group in pending.values():
                if group:
                    encoded += self._encode_group(vae, group)
                    bar.update(len(group))
        return FillStats(cached=cached, encoded=encoded)

    def _encode_group(self, vae: Any, group: list[tuple[str, LatentRequest, str, torch.Tensor]]) -> int:
        means, logvars = encode_distribution(vae, torch.stack([pixels for *_, pixels in group]))
        for (key, request, image_hash, _), mean, logvar in zip(group, means, logvars):
            self.store(key, mean, logvar, request, image_hash)
        return len(group)

    def draw(self, keys: Sequence[str], *, seeds: Sequence[int], mode: LatentSampling = "sample") -> torch.Tensor:
        """Scaled latents ``(B, C, h, w)`` for entries ``keys`` (see :func:`draw_latents`)."""
        loaded = [self.load(key) for key in keys]
        return draw_latents(
            torch.stack([mean for mean, _ in loaded]),
            torch.stack([logvar for _, logvar in loaded]),
            seeds=seeds,
            mode=mode,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
        )
