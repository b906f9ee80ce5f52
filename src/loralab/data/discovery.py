"""Discover a kohya-layout dataset: ``N_token class`` folders of images with optional captions.

The layout is the one kohya_ss and sd-scripts users already have::

    train_data_dir/
        10_blh woman/          # 10 repeats per epoch, class tokens "blh woman"
            001.png
            001.caption        # optional: first line is the caption
        photos/                # skipped: the name has no repeat count

Rules (sd-scripts' DreamBooth-style dataset, which kohya_ss drives):

* A sub-folder is used when its name is ``<int>_<class tokens>``; the integer is the number of
  repeats per epoch and must be at least 1. Anything else is skipped, and the skip is reported
  with its reason instead of being silent.
* Images are the files (not recursive) whose extension is in :data:`IMAGE_EXTENSIONS`, matched
  without regard to case, in sorted order.
* An image's caption is the first line of ``<stem><caption_extension>`` next to it; without such
  a file the folder's class tokens are the caption. sd-scripts also accepts the caption file of a
  face-crop name (``name_cx_cy_w_h.png`` -> ``name.caption``); so do we.
* No image is decoded: only its header is read (Pillow opens lazily) to learn the size that
  aspect-ratio bucketing needs.

Errors: :class:`~loralab.errors.DatasetError` for a missing folder, an unreadable image, an empty
caption file, or a dataset with no usable image (its message names what was skipped and why).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from loralab.errors import DatasetError

# The extensions sd-scripts globs for (it lists each in lower and upper case; we ignore case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# A face-crop file name carries four trailing numbers (``name_cx_cy_w_h``); sd-scripts also looks
# for the caption of the name without them.
_FACE_CROP_SUFFIX_TOKENS = 4

CaptionSource = Literal["file", "folder", "none"]


@dataclass(frozen=True)
class ImageEntry:
    """One image file: where it is, its pixel size, and the caption it trains with."""

    path: Path
    width: int
    height: int
    caption: str
    caption_source: CaptionSource


@dataclass(frozen=True)
class Subset:
    """One ``N_token class`` folder: its repeats, class tokens and images."""

    folder: Path
    repeats: int
    class_tokens: str
    is_reg: bool
    images: tuple[ImageEntry, ...]

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_images_with_repeats(self) -> int:
        return self.repeats * len(self.images)


@dataclass(frozen=True)
class SkippedFolder:
    """A folder (or a data-root with loose images) that was not used, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class DatasetInfo:
    """Everything discovery found: usable subsets, skipped folders, and non-fatal warnings."""

    train: tuple[Subset, ...]
    reg: tuple[Subset, ...]
    skipped: tuple[SkippedFolder, ...]
    warnings: tuple[str, ...] = ()

    @property
    def num_train_images(self) -> int:
        """Training images counted with their folder's repeats (sd-scripts' ``num_train_images``)."""
        return sum(s.num_images_with_repeats for s in self.train)

    @property
    def num_reg_images(self) -> int:
        """Regularisation images counted with their folder's repeats (before balancing)."""
        return sum(s.num_images_with_repeats for s in self.reg)


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """Split a kohya folder name ``"10_blh woman"`` into ``(10, "blh woman")``.

    Returns None when the part before the first underscore is not an integer (sd-scripts skips
    such folders). The repeat count is returned as written, so a caller can reject ``0_x``.
    """
    head, _, tail = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, tail


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def read_image_size(path: Path) -> tuple[int, int]:
    """Return ``(width, height)`` from the image header without decoding the pixels."""
    try:
        # A huge image is fine to size: we never decode it, so the bomb check is noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"cannot read image {path}: {exc}; replace it with a valid image or remove it"
        ) from exc


def read_caption(image_path: Path, caption_extension: str) -> str | None:
    """First line of the image's caption file, or None when there is none."""
    candidates = [image_path.with_name(image_path.stem + caption_extension)]
    tokens = image_path.stem.split("_")
    if len(tokens) > _FACE_CROP_SUFFIX_TOKENS:
        face_crop_stem = "_".join(tokens[:-_FACE_CROP_SUFFIX_TOKENS])
        candidates.append(image_path.with_name(face_crop_stem + caption_extension))
    for candidate in candidates:
        if candidate.is_file():
            try:
                lines = candidate.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"caption file {candidate} is not UTF-8 text; re-save it as UTF-8"
                ) from exc
            if not lines:
                raise DatasetError(
                    f"caption file {candidate} is empty; write a caption in it or delete it"
                )
            return lines[0].strip()
    return None


def _normalise_extension(caption_extension: str) -> str:
    # sd-scripts accepts "caption" for ".caption"; an empty value means its default.
    if not caption_extension:
        return ".caption"
    return caption_extension if caption_extension.startswith(".") else "." + caption_extension


def _load_subset(folder: Path, repeats: int, class_tokens: str, is_reg: bool, caption_extension: str) -> Subset:
    entries = []
    for path in sorted(p for p in folder.iterdir() if is_image_file(p)):
        width, height = read_image_size(path)
        caption = read_caption(path, caption_extension)
        if caption is not None:
            source: CaptionSource = "file"
        elif class_tokens:
            caption, source = class_tokens, "folder"
        else:
            caption, source = "", "none"
        entries.append(ImageEntry(path, width, height, caption, source))
    return Subset(folder, repeats, class_tokens, is_reg, tuple(entries))


def _scan_root(
    root: Path, is_reg: bool, caption_extension: str
) -> tuple[list[Subset], list[SkippedFolder], list[str]]:
    role = "regularisation" if is_reg else "training"
    if not root.is_dir():
        setting, flag = ("reg_data_dir", "--reg-data") if is_reg else ("train_data_dir", "--train-data")
        raise DatasetError(
            f"{role} data folder {root} does not exist or is not a folder; point {setting} (or {flag}) "
            f"at the folder that holds the 'N_token class' sub-folders"
        )
    subsets: list[Subset] = []
    skipped: list[SkippedFolder] = []
    notes: list[str] = []
    loose_images = [p for p in root.iterdir() if is_image_file(p)]
    if loose_images:
        skipped.append(
            SkippedFolder(
                root,
                f"{len(loose_images)} images lie directly in the {role} folder; "
                f"move them into a sub-folder named like '10_blh woman'",
            )
        )
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        parsed = parse_folder_name(folder.name)
        if parsed is None:
            skipped.append(
                SkippedFolder(folder, "name does not start with a repeat count like '10_blh woman'")
            )
            continue
        repeats, class_tokens = parsed
        if repeats < 1:
            skipped.append(SkippedFolder(folder, f"repeat count {repeats} is less than 1"))
            continue
        subset = _load_subset(folder, repeats, class_tokens, is_reg, caption_extension)
        if not subset.images:
            skipped.append(SkippedFolder(folder, "no images (" + " ".join(IMAGE_EXTENSIONS) + ")"))
            continue
        uncaptioned = sum(1 for image in subset.images if image.caption_source == "none")
        if uncaptioned:
            notes.append(
                f"{uncaptioned} images in {folder} have no caption file and the folder name has no "
                f"class tokens: they train with an empty caption"
            )
        subsets.append(subset)
    return subsets, skipped, notes


def discover_dataset(
    train_dir: Path | str,
    reg_dir: Path | str | None = None,
    caption_extension: str = ".caption",
) -> DatasetInfo:
    """Find the training (and regularisation) subsets under kohya-layout data folders.

    Raises DatasetError when a folder is missing, an image or caption cannot be read, or no
    training image is usable (the message lists the skipped folders and why).
    """
    extension = _normalise_extension(caption_extension)
    train, skipped, notes = _scan_root(Path(train_dir), False, extension)
    if not train:
        raise DatasetError(_empty_dataset_message(Path(train_dir), skipped))
    reg: list[Subset] = []
    if reg_dir is not None:
        reg, reg_skipped, reg_notes = _scan_root(Path(reg_dir), True, extension)
        skipped += reg_skipped
        notes += reg_notes
        if not reg:
            notes.append(f"regularisation folder {reg_dir} has no usable images: training without them")
    return DatasetInfo(tuple(train), tuple(reg), tuple(skipped), tuple(notes))


def _empty_dataset_message(root: Path, skipped: list[SkippedFolder]) -> str:
    if not skipped:
        return (
            f"no training images in {root}: it has no sub-folders; put the images in a sub-folder "
            f"named like '10_blh woman' (10 repeats, caption 'blh woman')"
        )
    reasons = "; ".join(f"'{s.path.name}': {s.reason}" for s in skipped)
    return (
        f"no training images in {root}: skipped {reasons}; kohya layout needs sub-folders named "
        f"like '10_blh woman' (10 repeats, caption 'blh woman')"
    )
