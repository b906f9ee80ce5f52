"""``manifest.json``: what a run was made from and how it went, next to its outputs.

It records the loralab version and git commit (when loralab runs from a git checkout; read
from ``.git`` directly, no ``git`` process), the SHA-256 of every dataset file (images and
captions), a cheap identity of the base checkpoint and VAE, the seed, platform, device,
timings and final metrics. The manifest is rewritten atomically whenever the run's status
changes (running, completed, interrupted, failed).

**Timings.** ``setup_seconds``: from the ``train()`` call to the loop's start (model, LoRA, data,
optimizer). ``launch_to_first_step_seconds`` and ``total_seconds``: from the launch, which for
``loralab train`` is its process's start (imports included, as the user waits for them) and
otherwise the ``train()`` call.

**Base checkpoint hash.** Hashing a whole 2-7 GB checkpoint costs sd-scripts 10+ seconds per
run, so the manifest records instead: size, modification time, A1111's old "model hash"
(SHA-256 of the 64 KiB at offset 1 MiB, the value sd-scripts writes as ``ss_sd_model_hash``)
and a SHA-256 of the first and last MiB plus the size. For a diffusers folder, each weights
file gets the same record. That identifies a file reliably in practice and costs milliseconds;
it is not a cryptographic guarantee of the whole content.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from loralab import __version__
from loralab.config.loading import write_text_atomic
from loralab.data.discovery import DatasetInfo

MANIFEST_FILE = "manifest.json"
_MIB = 1 << 20
_LEGACY_OFFSET, _LEGACY_SIZE = 0x100000, 0x10000
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def legacy_model_hash(path: Path) -> str:
    """A1111's old model hash: the first 8 hex digits of SHA-256 of the 64 KiB at 1 MiB."""
    with open(path, "rb") as handle:
        handle.seek(_LEGACY_OFFSET)
        return hashlib.sha256(handle.read(_LEGACY_SIZE)).hexdigest()[:8]


def quick_file_identity(path: Path) -> dict[str, Any]:
    """Size, mtime, legacy hash and SHA-256 of (first MiB, last MiB, size) of one file."""
    stat = path.stat()
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        hasher.update(handle.read(_MIB))
        handle.seek(max(0, stat.st_size - _MIB))
        hasher.update(handle.read(_MIB))
    hasher.update(str(stat.st_size).encode())
    return {
        "size": stat.st_size,
        "mtime": stat.st_mtime,
        "legacy_hash": legacy_model_hash(path),
        "edges_sha256": hasher.hexdigest(),
    }


def model_identity(path: Path | str | None) -> dict[str, Any] | None:
    """:func:`quick_file_identity` of a single file, or of every weights file in a folder."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
        return {
            "path": str(path),
            "hash_method": "quick",
            "files": {str(p.relative_to(path)): quick_file_identity(p) for p in files},
        }
    return {"path": str(path), "hash_method": "quick", **quick_file_identity(path)}


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_MIB), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def dataset_hashes(dataset: DatasetInfo, caption_extension: str) -> dict[str, str]:
    """SHA-256 of every image and caption file the run trains on, by path."""
    hashes = {}
    for subset in dataset.train + dataset.reg:
        for image in subset.images:
            hashes[str(image.path)] = file_sha256(image.path)
            caption = image.path.with_name(image.path.stem + caption_extension)
            if caption.is_file():
                hashes[str(caption)] = file_sha256(caption)
    return hashes


def git_commit(start: Path | None = None) -> str | None:
    """The commit of the git checkout loralab runs from, read from ``.git``; None when there is none."""
    here = (start or Path(__file__)).resolve()
    for folder in here.parents:
        git = folder / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = git.read_text(encoding="utf-8").strip()
            if not text.startswith("gitdir:"):
                return None
            git = (folder / text.partition(":")[2].strip()).resolve()
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text(encoding="utf-8").strip()
            if not head.startswith("ref:"):
                return head or None
            ref = head.partition(":")[2].strip()
            if (git / ref).is_file():
                return (git / ref).read_text(encoding="utf-8").strip()
            packed = git / "packed-refs"
            if packed.is_file():
                for line in packed.read_text(encoding="utf-8").splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0]
        except OSError:
            return None
        return None
    return None


def platform_info() -> dict[str, str]:
    """Python, OS and the versions of the libraries that decide the numbers."""
    import accelerate
    import diffusers
    import transformers

    return {
        "python": sys.version.split()[0],
        "system": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def device_info(device: torch.device, num_processes: int) -> dict[str, Any]:
    """The device the run trains on, with its name when it is a GPU."""
    info: dict[str, Any] = {"type": device.type, "num_processes": num_processes, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    return info


def build_manifest(
    *,
    config: Any,
    dataset: DatasetInfo,
    device: torch.device,
    num_processes: int,
    plan_totals: Mapping[str, Any],
) -> dict[str, Any]:
    """The manifest of a run that is starting (status "running")."""
    return {
        "loralab_version": __version__,
        "git_commit": git_commit(),
        "status": "running",
        "config": "config.toml",
        "base_model": model_identity(config.pretrained_model_name_or_path),
        "vae": model_identity(config.vae),
        "dataset": {
            "train_data_dir": str(config.train_data_dir),
            "reg_data_dir": str(config.reg_data_dir) if config.reg_data_dir else None,
            "files": dataset_hashes(dataset, config.caption_extension),
        },
        "seeds": {"seed": config.seed},
        "platform": platform_info(),
        "device": device_info(device, num_processes),
        "plan": dict(plan_totals),
        "timings": {},
        "final_metrics": {},
        "lora_files": [],
        "resumed": [],
    }


def write_manifest(run_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` in ``run_dir`` atomically."""
    path = Path(run_dir) / MANIFEST_FILE
    write_text_atomic(path, json.dumps(manifest, indent=1, default=str) + "\n")
    return path


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's manifest, or None when it has none (or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def relative_names(paths: Iterable[Path], run_dir: Path) -> list[str]:
    """Paths as the manifest lists them: relative to the run directory."""
    return [str(Path(p).relative_to(run_dir)) if Path(p).is_relative_to(run_dir) else str(p) for p in paths]
