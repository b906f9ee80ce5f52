"""Captions of a prepared dataset: what each kept image is captioned with, and the sidecar rows.

``--caption none`` writes no caption files (kohya then trains with the folder's class tokens);
``token`` writes the folder's class tokens ("<token> <class>", or "<class>" for regularisation
images); ``file`` copies the first line of the photo's ``.caption`` / ``.txt`` sidecar, and falls
back to the class tokens (saying so) when there is none or it cannot be used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loralab.data.prepare.files import write_text_atomic
from loralab.data.prepare.report import FileRow
from loralab.data.prepare.sources import SourceFile, SourceTree, read_sidecar

CaptionMode = Literal["none", "token", "file"]


@dataclass(frozen=True)
class CaptionSettings:
    mode: CaptionMode
    class_tokens: str  # the folder name's tokens, which kohya also uses when a caption is missing
    extension: str  # of the written caption files, e.g. ".caption"


def caption_kept_image(
    row: FileRow, sidecar: SourceFile | None, settings: CaptionSettings, output_dir: Path | None
) -> None:
    """Decide a kept image's caption, note it in its row, and write it beside the output image."""
    if settings.mode == "none":
        return
    text = settings.class_tokens
    if settings.mode == "token":
        row.actions.append(f"caption '{text}'")
    elif sidecar is None:
        row.actions.append(f"no caption file; caption '{text}'")
    else:
        sidecar_text = read_sidecar(sidecar.path)
        if sidecar_text.text is not None:
            text = sidecar_text.text
            note = f" ({sidecar_text.note})" if sidecar_text.note else ""
            row.actions.append(f"caption from {sidecar.relative}{note}")
        else:
            row.actions.append(
                f"caption file {sidecar.relative} unusable ({sidecar_text.problem}); caption '{text}'"
            )
    row.caption = text
    if output_dir is not None and row.output:
        write_text_atomic(output_dir / (Path(row.output).stem + settings.extension), text + "\n")


def sidecar_rows(
    set_name: Literal["train", "reg"],
    tree: SourceTree,
    image_status: dict[str, str],
    mode: CaptionMode,
) -> list[FileRow]:
    """One report row per caption sidecar (``image_status``: image relative path -> row status)."""
    users: dict[str, list[str]] = {}
    for image, caption in tree.sidecar_of.items():
        users.setdefault(caption.relative, []).append(image)
    files = {caption.relative: caption for caption in tree.sidecar_of.values()}
    rows = []
    for caption in (files[relative] for relative in sorted(files)):
        images = ", ".join(users[caption.relative])
        problem = read_sidecar(caption.path).problem
        if mode != "file":
            actions = [f"caption file for {images}, not used (--caption {mode})"]
            rows.append(
                FileRow(set_name, caption.relative, "caption", actions + ([problem] if problem else []))
            )
        elif problem:
            rows.append(
                FileRow(set_name, caption.relative, "skipped", [f"caption file for {images}"], problem)
            )
        else:
            used = [image for image in users[caption.relative] if image_status[image] == "kept"]
            note = (
                f"caption for {', '.join(used)}"
                if used
                else f"caption file for {images}, whose image was not kept"
            )
            rows.append(FileRow(set_name, caption.relative, "caption", [note]))
    for relative, used in sorted(tree.extra_sidecars.items()):
        note = f"not used: {used.relative} is the caption of the same image"
        rows.append(FileRow(set_name, relative, "caption", [note]))
    for caption in tree.orphan_captions:
        reason = "caption file with no image of the same name beside it"
        rows.append(FileRow(set_name, caption.relative, "skipped", reason=reason))
    return rows
