"""Command-line options that several sub-commands share, defined once so they read the same."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The positional CONFIG of commands that take a training config."""
    parser.add_argument("config", type=Path, help="config file: loralab TOML, sd-scripts TOML or kohya_ss GUI JSON")


def add_override_option(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable), collected into ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (same names and checks as the file, e.g. optimizer_args.growth_rate=1.06); "
        "repeatable",
    )


def resolve_device(requested: str | None) -> str:
    """The torch device a ``--device`` value names: CUDA when available if none is given.

    Raises ``ConfigError`` for a name torch does not know and for a device this machine's torch
    cannot use (no CUDA GPU, a GPU index beyond the ones there, no Apple GPU).
    """
    import torch

    from loralab.errors import ConfigError

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"--device {requested!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {requested}: there are {torch.cuda.device_count()} CUDA GPU(s), counted from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {requested}: no Apple GPU (MPS) is usable here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {requested}: loralab runs on cpu, cuda or mps")
    return str(device)


def output_folder(path: Path, option: str) -> Path:
    """``path`` created (parents too) to hold a command's outputs.

    Raises ``ConfigError`` naming ``option`` when it cannot be (a file of that name, a file on
    the way, no permission).
    """
    from loralab.errors import ConfigError

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot create that folder ({exc.strerror}); choose another {option}") from None
    return path


@contextlib.contextmanager
def new_output_folder(path: Path, option: str) -> Iterator[Path]:
    """:func:`output_folder` for the block (made up front, so a bad ``option`` fails before any
    work); a folder made here is removed again if the block fails before writing into it."""
    existed = path.exists()
    output_folder(path, option)
    try:
        yield path
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):  # not empty: what was written stays
                path.rmdir()
        raise


def add_force_option(parser: argparse.ArgumentParser) -> None:
    """``--force``: let a command replace an existing output file (never one of its inputs)."""
    parser.add_argument("--force", action="store_true", help="replace the output file if it exists (never an input)")


def check_output_file(path: Path, inputs: Iterable[Path], *, force: bool, suffix: str = ".safetensors") -> None:
    """Refuse an output file that is one of the command's ``inputs`` (even with ``force``), has
    another suffix, is a folder, lies under a file, or exists (without ``force``): ``ConfigError``."""
    from loralab.errors import ConfigError

    if path.exists() and any(path.resolve() == Path(source).resolve() for source in inputs):
        raise ConfigError(f"output {path} is one of the inputs; give a different output file")
    if path.is_dir():
        raise ConfigError(f"output {path} is a folder; give a {suffix} file name")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"cannot write {path}: {ancestor} is a file; choose another output path")
    if path.suffix.lower() != suffix:
        raise ConfigError(f"output {path} must be a {suffix} file")
    if path.exists() and not force:
        raise ConfigError(f"output {path} exists; pass --force to replace it")
