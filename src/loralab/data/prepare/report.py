"""The prepare report: one row per source file, as JSON (``prepare-report.json``) and as a table.

Row statuses:

* ``kept``: the image was prepared; ``output`` is its path relative to OUT_DIR.
* ``skipped``: not used; ``reason`` says why (not an image, corrupt, too small, ...). A caption
  sidecar that cannot be used (not UTF-8, empty) is ``skipped`` too.
* ``duplicate``: a near-duplicate of a kept image; ``reason`` names it and the hash distance.
* ``caption``: a caption sidecar; ``actions`` says which image it belongs to and whether it was used.

Boxes (``face_box``, ``crop_box``) are ``[left, top, right, bottom]`` in the pixels of the
upright decoded image (after EXIF rotation, and after any reduced-scale decoding that
``actions`` mentions).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loralab.data.prepare.box import Box

Status = Literal["kept", "skipped", "duplicate", "caption"]
REPORT_NAME = "prepare-report.json"
REPORT_VERSION = 1


@dataclass
class FileRow:
    """What happened to one source file."""

    set: Literal["train", "reg"]
    source: str  # path relative to its source folder
    status: Status
    actions: list[str] = field(default_factory=list)
    reason: str | None = None
    output: str | None = None  # kept image, relative to OUT_DIR
    caption: str | None = None  # caption text written next to the output
    file_size: tuple[int, int] | None = None
    output_size: tuple[int, int] | None = None
    face_box: Box | None = None
    crop_box: Box | None = None
    phash: str | None = None

    def details(self) -> str:
        """Everything done to the file, then why it was not used or where it went."""
        parts = list(self.actions)
        if self.reason:
            parts.append(self.reason)
        text = "; ".join(parts)
        if self.output:
            text += f" -> {self.output}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "set": self.set,
            "source": self.source,
            "status": self.status,
            "actions": list(self.actions),
            "reason": self.reason,
            "output": self.output,
            "caption": self.caption,
            "file_size": list(self.file_size) if self.file_size else None,
            "output_size": list(self.output_size) if self.output_size else None,
            "face_box": list(self.face_box.as_tuple()) if self.face_box else None,
            "crop_box": list(self.crop_box.as_tuple()) if self.crop_box else None,
            "phash": self.phash,
        }


@dataclass
class PrepareReport:
    """Every source file of a prepare job and what became of it."""

    source_dir: Path
    reg_dir: Path | None
    out_dir: Path
    dry_run: bool
    options: dict[str, Any]
    rows: list[FileRow]

    def count(self, status: Status, set_name: str = "train") -> int:
        return sum(1 for row in self.rows if row.status == status and row.set == set_name)

    def summary(self) -> dict[str, dict[str, int]]:
        counts: dict[str, Counter[str]] = {"train": Counter(), "reg": Counter()}
        for row in self.rows:
            counts[row.set][row.status] += 1
        return {
            set_name: {status: counter[status] for status in ("kept", "skipped", "duplicate", "caption")}
            for set_name, counter in counts.items()
            if set_name == "train" or self.reg_dir is not None
        }

    def to_json(self) -> dict[str, Any]:
        # No timestamps: preparing the same photos twice gives a byte-identical report.
        return {
            "version": REPORT_VERSION,
            "source_dir": str(self.source_dir),
            "reg_dir": str(self.reg_dir) if self.reg_dir else None,
            "out_dir": str(self.out_dir),
            "options": self.options,
            "summary": self.summary(),
            "files": [row.to_json() for row in self.rows],
        }

    def format_table(self) -> str:
        """A fixed-width table, one line per source file, then a summary line."""
        headers = ("SET", "SOURCE", "RESULT", "DETAILS")
        lines = [(row.set, row.source, row.status, row.details()) for row in self.rows]
        widths = [max(len(header), *(len(line[i]) for line in lines)) for i, header in enumerate(headers[:3])]
        out = []
        for cells in [headers, *lines]:
            out.append(
                "  ".join(cell.ljust(width) for cell, width in zip(cells[:3], widths, strict=True))
                + "  "
                + cells[3]
            )
        out.append(self.summary_line())
        return "\n".join(line.rstrip() for line in out)

    def summary_line(self) -> str:
        parts = [
            f"{set_name}: {counts['kept']} kept, {counts['duplicate']} near-duplicates, "
            f"{counts['skipped']} skipped, {counts['caption']} caption files"
            for set_name, counts in self.summary().items()
        ]
        if self.dry_run:
            where = "dry run: nothing written"
        elif self.count("kept") == 0:  # prepare refuses to publish a dataset without training images
            where = "nothing written"
        else:
            where = f"wrote {self.out_dir}"
        return "; ".join(parts) + f"; {where}"
