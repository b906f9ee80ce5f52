"""Walk a source folder: every file, which ones are caption sidecars, and reading those captions.

Every file under the folder (recursively, hidden files included) is either a *caption sidecar*
(``photo.txt`` / ``photo.caption`` next to a file with the same stem) or a candidate image; the
image loader decides whether a candidate really is one, so nothing is skipped by extension and
every file gets a line in the report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Sidecar caption extensions users have: sd-scripts' default and the kohya_ss tools' default.
SIDECAR_EXTENSIONS = (".caption", ".txt")


@dataclass(frozen=True)
class SourceFile:
    path: Path
    relative: str  # POSIX path relative to the source folder, as the report shows it


@dataclass
class SourceTree:
    """The files of one source folder, split into candidate images and caption sidecars."""

    root: Path
    candidates: list[SourceFile] = field(default_factory=list)
    sidecar_of: dict[str, SourceFile] = field(default_factory=dict)  # image relative -> caption file
    extra_sidecars: dict[str, SourceFile] = field(default_factory=dict)  # shadowed by another sidecar
    orphan_captions: list[SourceFile] = field(default_factory=list)
    unreadable_folders: dict[str, str] = field(default_factory=dict)  # relative folder -> reason
    file_count: int = 0


def scan_source(root: Path, caption_extension: str) -> SourceTree:
    """List every file under ``root`` in sorted order and pair images with their captions.

    ``caption_extension`` (the one the output uses) is the preferred sidecar when an image has
    several; otherwise ``.caption`` beats ``.txt``.
    """
    extensions = tuple(dict.fromkeys((caption_extension.lower(), *SIDECAR_EXTENSIONS)))
    tree = SourceTree(root)
    captions: list[SourceFile] = []

    def unreadable(error: OSError) -> None:
        folder = Path(error.filename).relative_to(root).as_posix() if error.filename else "."
        tree.unreadable_folders[folder] = f"cannot list the folder: {error.strerror or error}"

    for directory, subdirectories, names in os.walk(root, onerror=unreadable):
        subdirectories.sort()
        for name in sorted(names):
            path = Path(directory) / name
            item = SourceFile(path, path.relative_to(root).as_posix())
            tree.file_count += 1
            (captions if path.suffix.lower() in extensions else tree.candidates).append(item)
    by_stem: dict[tuple[Path, str], list[SourceFile]] = {}
    for image in tree.candidates:
        by_stem.setdefault((image.path.parent, image.path.stem), []).append(image)
    captions.sort(key=lambda caption: extensions.index(caption.path.suffix.lower()))
    for caption in captions:
        images = by_stem.get((caption.path.parent, caption.path.stem), [])
        if not images:
            tree.orphan_captions.append(caption)
        for image in images:
            if image.relative in tree.sidecar_of:
                tree.extra_sidecars[caption.relative] = tree.sidecar_of[image.relative]
            else:
                tree.sidecar_of[image.relative] = caption
    tree.orphan_captions.sort(key=lambda caption: caption.relative)
    return tree


@dataclass(frozen=True)
class SidecarText:
    """A sidecar's caption (first non-empty line), or why it cannot be used."""

    text: str | None
    problem: str | None = None
    note: str | None = None


def read_sidecar(path: Path) -> SidecarText:
    """Read a caption sidecar as sd-scripts will: UTF-8, first line.

    Never raises for bad content: a non-UTF-8 or empty file comes back with ``problem`` set, so
    the report can say so and the image can fall back to the token caption.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return SidecarText(None, f"cannot read it: {exc.strerror or exc}")
    try:
        text = data.decode("utf-8-sig")  # a BOM is common from Windows editors and harmless
    except UnicodeDecodeError as exc:
        return SidecarText(
            None,
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); re-save it as UTF-8",
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return SidecarText(None, "empty caption file")
    note = (
        f"used the first of its {len(lines)} lines (training reads only the first)"
        if len(lines) > 1
        else None
    )
    return SidecarText(lines[0], note=note)
