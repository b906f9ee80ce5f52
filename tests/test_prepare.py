"""``loralab prepare``: every kind of source file a user brings, and the dataset it becomes.

The source folder is built from photos bundled with scikit-image (a real face: ``astronaut.png``;
scenes without faces: coffee, chelsea, rocket, moon, coins, brick), turned into the variants users
have: EXIF-rotated, RGBA, CMYK, 16-bit, float, grayscale, palette GIF, tilted, mirrored, scaled
onto a larger canvas, near an edge, re-encoded duplicates, tiny, truncated, empty, 1x1, a
20000x20000 header, HEIC, junk and caption sidecars (UTF-8 with BOM, Latin-1, empty, shadowed).

Every report row is checked against what the source file is, and the face crops are checked
geometrically: the face box detected in the source lies inside the crop, within 10% of its centre,
and the face is found again, centred, in the written image.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from loralab.cli.main import main
from loralab.data.prepare import PrepareOptions, prepare_dataset
from loralab.data.prepare.box import Box
from loralab.data.prepare.dedupe import NEAR_DUPLICATE_MAX_DISTANCE, hash_distance
from loralab.data.prepare.faces import detect_faces
from loralab.data.prepare.image_io import UnusableImage, load_image

TOKEN, CLASS, REPEATS = "blh", "woman", 10
RESOLUTION, MIN_SIZE = 256, 128
TRAIN_FOLDER = f"img/{REPEATS}_{TOKEN} {CLASS}"
REG_FOLDER = f"reg/1_{CLASS}"
MAX_FACE_OFFSET = 0.10  # the acceptance bound: face centre within 10% of the side from the centre

EXIF_ORIENTATION = 0x0112


def skimage_photo(name: str) -> Image.Image:
    """A photo bundled in scikit-image's wheel, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-image (test extra) is not installed: it provides the test photos")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    with Image.open(path) as image:
        return image.copy()


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _tilted(image: Image.Image, degrees: float) -> Image.Image:
    return image.rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128))


def _with_exif_orientation(upright: Image.Image, orientation: int) -> tuple[Image.Image, Image.Exif]:
    """Pixels stored as a camera would, plus the EXIF tag that makes them upright again."""
    stored = {
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,  # viewer rotates 90 clockwise to undo
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return upright.transpose(stored), exif


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` RGB, followed by one tiny data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@dataclass
class Expectations:
    """What the report must say about each source file.

    ``lines``: relative path -> (status, words its details must contain). Status "family": one of
    several copies of the same photo with the same framing (``family`` names the group); exactly
    one of them is kept (the most pixels, then the largest file, then the first name) and the
    others are reported as its near-duplicates.
    """

    lines: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    family: dict[str, str] = field(default_factory=dict)


def build_sources(root: Path) -> Expectations:
    """Write the test source folder and return what the report must say about each file."""
    expected = Expectations()
    astronaut = skimage_photo("astronaut.png").convert("RGB")  # 512x512, face near the top
    (root / "faces").mkdir(parents=True)
    (root / "scenes").mkdir()
    (root / "bad" / "deeper").mkdir(parents=True)

    def add(
        relative: str,
        data: bytes | Image.Image,
        status: str,
        *words: str,
        family: str | None = None,
        **params,
    ):
        path = root / relative
        if isinstance(data, Image.Image):
            data.save(path, **params)
        else:
            path.write_bytes(data)
        expected.lines[relative] = (status, words)
        if family:
            expected.family[relative] = family

    # Family "upright": the photo as shot, and conversions of it that frame the same face.
    add("faces/astronaut.png", astronaut, "family", "face crop", family="upright")
    add(
        "faces/astronaut_q80.jpg",
        _encoded(astronaut, "JPEG", quality=80),
        "family",
        "face crop",
        family="upright",
    )
    rotated, exif = _with_exif_orientation(astronaut, 6)
    add(
        "faces/astronaut_exif6.jpg",
        rotated,
        "family",
        "rotated 90° clockwise (EXIF orientation 6)",
        "face crop",
        family="upright",
        exif=exif,
        quality=95,
    )
    rgba = astronaut.convert("RGBA")
    alpha = np.full((512, 512), 255, np.uint8)
    alpha[480:, :] = 0  # a transparent strip below the crop
    rgba.putalpha(Image.fromarray(alpha))
    add(
        "faces/astronaut_rgba.png",
        rgba,
        "family",
        "composited transparency (RGBA) on white",
        family="upright",
    )
    add(
        "faces/astronaut_cmyk.jpg",
        astronaut.convert("CMYK"),
        "family",
        "converted CMYK to RGB",
        family="upright",
        quality=95,
    )
    gray16 = Image.fromarray(np.asarray(astronaut.convert("L")).astype(np.uint16) * 257)
    add(
        "faces/astronaut_gray16.png",
        gray16,
        "family",
        "converted 16-bit grayscale (I;16) to 8-bit RGB",
        family="upright",
    )
    add(
        "faces/astronaut_gray.png",
        astronaut.convert("L"),
        "family",
        "converted grayscale (L) to RGB",
        family="upright",
    )
    add(
        "faces/astronaut_768.jpg",
        astronaut.resize((768, 768), Image.Resampling.LANCZOS),
        "family",
        "face crop",
        "resized from",
        family="upright",
        quality=95,
    )
    # Too small once framed: the face is found, but its head-and-shoulders crop is < MIN_SIZE.
    add(
        "faces/astronaut_small.png",
        astronaut.resize((200, 200)),
        "skipped",
        "face crop",
        "too small after cropping",
    )
    add("faces/astronaut_tiny.png", astronaut.resize((64, 64)), "skipped", "too small: 64x64 px")

    # Other framings of the face, each its own family (tilted or mirrored changes the crop).
    # Cut close to the face: the crop must shrink to keep it centred, a tighter framing.
    add("faces/astronaut_cropped.png", astronaut.crop((120, 0, 512, 400)), "kept", "face crop", family="cropped")
    canvas = _noise((1000, 800), seed=1)
    canvas.paste(ImageOps.mirror(astronaut).resize((700, 700)), (150, 120))
    add("faces/mirror_canvas.png", canvas, "kept", "face crop", "resized from", family="mirror")
    tilted_left, exif = _with_exif_orientation(_tilted(astronaut, 12), 8)
    add(
        "faces/tilt_left_exif8.jpg",
        tilted_left,
        "family",
        "rotated 90° counter-clockwise (EXIF orientation 8)",
        "face crop",
        family="tilt-left",
        exif=exif,
        quality=95,
    )
    # A byte-identical copy: the same pixels, so the same output name as the one kept.
    copy = (root / "faces/tilt_left_exif8.jpg").read_bytes()
    add("faces/copy_of_tilt_left.jpg", copy, "family", "face crop", family="tilt-left")
    tilted_right, exif = _with_exif_orientation(_tilted(astronaut, -12), 3)
    add(
        "faces/tilt_right_exif3.jpg",
        tilted_right,
        "kept",
        "rotated 180° (EXIF orientation 3)",
        "face crop",
        family="tilt-right",
        exif=exif,
        quality=95,
    )
    edge = _noise((700, 560), seed=2)
    edge.paste(ImageOps.mirror(_tilted(astronaut, 12)).resize((560, 560)), (140, 0))  # face near the top edge
    add("faces/mirror_tilt_edge.png", edge, "kept", "face crop", family="mirror-tilt")

    # Scenes without a face: centre crops, and the remaining colour modes.
    coffee = skimage_photo("coffee.png").convert("RGBA")
    corners = np.full((400, 600), 255, np.uint8)
    corners[:60, :] = 0
    coffee.putalpha(Image.fromarray(corners))
    add(
        "scenes/coffee_rgba.png",
        coffee,
        "kept",
        "composited transparency (RGBA) on white",
        "centre crop at box",
        "(no face found)",
    )
    chelsea = skimage_photo("chelsea.png").convert("RGB")
    add(
        "scenes/chelsea_cmyk.jpg",
        chelsea.convert("CMYK"),
        "kept",
        "converted CMYK to RGB",
        "(no face found)",
        quality=95,
    )
    add(
        "scenes/chelsea_copy.jpg",
        _encoded(chelsea.resize((400, 266)), "JPEG", quality=85),
        "duplicate",
        "near-duplicate of scenes/chelsea_cmyk.jpg",
    )
    moon16 = Image.fromarray(np.asarray(skimage_photo("moon.png")).astype(np.uint16) * 257)
    add(
        "scenes/moon_16bit.tif",
        moon16,
        "kept",
        "converted 16-bit grayscale (I;16) to 8-bit RGB",
        "no crop needed (no face found; already square)",
    )
    brick = Image.fromarray(np.asarray(skimage_photo("brick.png")).astype(np.float32) / 255.0, mode="F")
    add("scenes/brick_float.tif", brick, "kept", "converted floating-point grayscale (F) to 8-bit RGB")
    add(
        "scenes/coins_gray.png",
        skimage_photo("coins.png"),
        "kept",
        "converted grayscale (L) to RGB",
        "resized from 303x303 to 256x256",
    )
    rocket = skimage_photo("rocket.jpg").convert("RGB").quantize(64)
    frames = [rocket, rocket.rotate(180)]
    add(
        "scenes/rocket_anim.gif",
        frames[0],
        "kept",
        "used the first of 2 frames",
        "composited transparency (P) on white",
        save_all=True,
        append_images=frames[1:],
        transparency=0,
    )

    # Files that cannot become training images.
    add("bad/empty.jpg", b"", "skipped", "empty file (0 bytes)")
    add("bad/one_pixel.png", Image.new("RGB", (1, 1), (200, 10, 10)), "skipped", "too small: 1x1 px")
    add(
        "bad/truncated.png",
        _encoded(astronaut, "PNG")[:150_000],
        "skipped",
        "corrupt or truncated image data",
    )
    add(
        "bad/deeper/truncated.jpg",
        _encoded(chelsea, "JPEG", quality=90)[:9_000],
        "skipped",
        "corrupt or truncated image data",
    )
    add("bad/huge_20000.png", _png_header_only(20000, 20000), "skipped", "too large", "decompression-bomb")
    add("bad/fake.jpg", b"this is not a picture\n" * 10, "skipped", "not an image")
    add("bad/readme.md", b"# notes\n", "skipped", "not an image")
    add("bad/.DS_Store", b"\x00\x00\x00\x01Bud1" + b"\x00" * 64, "skipped", "not an image")
    add("bad/phone.heic", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64, "skipped", "HEIC")
    add("bad/notes.txt", b"remember the lighting", "skipped", "caption file with no image")

    # Caption sidecars (--caption file).
    add(
        "faces/tilt_right_exif3.txt",
        "\ufeffblh woman, tilted head\nsecond line\n".encode(),
        "caption",
        "caption for faces/tilt_right_exif3.jpg",
    )
    add("faces/astronaut_q80.txt", b"blh woman smiling", "caption", "whose image was not kept")
    add(
        "faces/mirror_canvas.caption",
        "blh femme en scaphandre, été".encode("latin-1"),
        "skipped",
        "not UTF-8 text (byte 0xe9",
    )
    add("scenes/coffee_rgba.txt", b"  \n", "skipped", "empty caption file")
    add("scenes/chelsea_cmyk.caption", b"a cat", "caption", "caption for scenes/chelsea_cmyk.jpg")
    add("scenes/chelsea_cmyk.txt", b"a cat (old caption)", "caption", "not used: scenes/chelsea_cmyk.caption")
    return expected


EXPECTED_CAPTIONS = {  # kept image -> caption file text (the rest get "blh woman")
    "faces/tilt_right_exif3.jpg": "blh woman, tilted head",
    "scenes/chelsea_cmyk.jpg": "a cat",
}


def build_reg(root: Path) -> None:
    root.mkdir(parents=True)
    skimage_photo("gravel.png").save(root / "gravel.png")
    skimage_photo("motorcycle_left.png").convert("RGB").save(root / "motorcycle.jpg", quality=90)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the SHA-256 of its bytes."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@dataclass
class Prepared:
    source: Path
    reg: Path
    out: Path
    report: dict  # prepare-report.json as written
    before: tuple[dict[str, str], dict[str, str]]  # source and reg digests before the run
    expected: Expectations


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """The full source folder prepared once, with two worker processes."""
    root = tmp_path_factory.mktemp("prepare")
    source, reg = root / "photos", root / "reg-photos"
    expected = build_sources(source)
    build_reg(reg)
    before = tree_digest(source), tree_digest(reg)
    options = PrepareOptions(
        TOKEN,
        CLASS,
        repeats=REPEATS,
        resolution=RESOLUTION,
        min_size=MIN_SIZE,
        caption="file",
        reg_dir=reg,
        workers=2,
        progress=False,
    )
    prepare_dataset(source, root / "dataset", options)
    report = json.loads((root / "dataset" / "prepare-report.json").read_text(encoding="utf-8"))
    return Prepared(source, reg, root / "dataset", report, before, expected)


def rows_by_source(report: dict, set_name: str = "train") -> dict[str, dict]:
    return {row["source"]: row for row in report["files"] if row["set"] == set_name}


def details(row: dict) -> str:
    return "; ".join(row["actions"] + ([row["reason"]] if row["reason"] else []))


def test_every_source_file_has_the_expected_report_line(prepared):
    rows = rows_by_source(prepared.report)
    assert sorted(rows) == sorted(tree_digest(prepared.source)) == sorted(prepared.expected.lines)
    for relative, (status, words) in prepared.expected.lines.items():
        row = rows[relative]
        if status != "family":
            assert row["status"] == status, (relative, row)
        for word in words:
            assert word in details(row), (relative, word, details(row))
        if row["status"] == "skipped":
            assert row["output"] is None and row["reason"], row


def test_one_copy_of_each_photo_is_kept_and_the_rest_name_it(prepared):
    rows = rows_by_source(prepared.report)
    families: dict[str, list[str]] = {}
    for relative, family in prepared.expected.family.items():
        families.setdefault(family, []).append(relative)

    def preference(member: str) -> tuple[int, int, str]:
        width, height = rows[member]["file_size"]
        return -width * height, -(prepared.source / member).stat().st_size, member

    for family, members in families.items():
        kept = [member for member in members if rows[member]["status"] == "kept"]
        assert len(kept) == 1, (family, [(m, rows[m]["status"]) for m in members])
        best = min(members, key=preference)
        assert kept == [best]
        for member in set(members) - {best}:
            assert rows[member]["status"] == "duplicate"
            assert f"near-duplicate of {best} " in rows[member]["reason"]
    kept_hashes = [row["phash"] for row in rows.values() if row["status"] == "kept"]
    for i, first in enumerate(kept_hashes):
        for second in kept_hashes[i + 1 :]:
            assert hash_distance(first, second) > NEAR_DUPLICATE_MAX_DISTANCE
    assert "near-duplicate of scenes/chelsea_cmyk.jpg" in rows["scenes/chelsea_copy.jpg"]["reason"]


def test_output_is_a_kohya_layout_of_the_kept_images_and_captions(prepared):
    reg, out, report = prepared.reg, prepared.out, prepared.report
    files = sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file())
    expected = {"prepare-report.json"}
    for set_name, folder in (("train", TRAIN_FOLDER), ("reg", REG_FOLDER)):
        for relative, row in rows_by_source(report, set_name).items():
            if row["status"] != "kept":
                assert row["output"] is None
                continue
            output = out / row["output"]
            assert row["output"].startswith(folder + "/")
            assert len(output.stem) == 16 and output.suffix == ".png"
            with Image.open(output) as image:
                assert image.format == "PNG" and image.mode == "RGB"
                assert list(image.size) == row["output_size"]
                assert image.size == (RESOLUTION, RESOLUTION) or (
                    image.width == image.height < RESOLUTION
                )  # square crop mode, never enlarged
                assert (
                    output.stem
                    == hashlib.sha256(
                        f"RGB {image.width}x{image.height}\n".encode() + image.tobytes()
                    ).hexdigest()[:16]
                )
            caption = output.with_suffix(".caption")
            default = f"{TOKEN} {CLASS}" if set_name == "train" else CLASS
            assert caption.read_text(encoding="utf-8") == EXPECTED_CAPTIONS.get(relative, default) + "\n"
            expected |= {row["output"], caption.relative_to(out).as_posix()}
    assert files == sorted(expected)
    assert sorted(rows_by_source(report, "reg")) == sorted(tree_digest(reg))
    assert report["summary"]["train"]["kept"] == 12
    assert report["summary"]["reg"] == {"kept": 2, "skipped": 0, "duplicate": 0, "caption": 0}


def test_transparent_pixels_become_white(prepared):
    out, report = prepared.out, prepared.report
    row = rows_by_source(report)["scenes/coffee_rgba.png"]
    with Image.open(out / row["output"]) as image:
        top_rows = np.asarray(image)[:20]  # the source's transparent band is the top 60 of 400 px
    assert (top_rows == 255).all()


def _map_box(box: Box, crop: Box, output_size: tuple[int, int]) -> Box:
    scale_x, scale_y = output_size[0] / crop.width, output_size[1] / crop.height
    return Box(
        round((box.left - crop.left) * scale_x),
        round((box.top - crop.top) * scale_y),
        round((box.right - crop.left) * scale_x),
        round((box.bottom - crop.top) * scale_y),
    )


def _offset(face: Box, frame: Box) -> tuple[float, float]:
    (face_x, face_y), (frame_x, frame_y) = face.centre, frame.centre
    return abs(face_x - frame_x) / frame.width, abs(face_y - frame_y) / frame.height


def _overlap(first: Box, second: Box) -> float:
    width = min(first.right, second.right) - max(first.left, second.left)
    height = min(first.bottom, second.bottom) - max(first.top, second.top)
    inter = max(0, width) * max(0, height)
    return inter / (first.area + second.area - inter)


def test_face_crops_contain_the_face_centred(prepared):
    source, out, report = prepared.source, prepared.out, prepared.report
    checked = 0
    for relative, row in rows_by_source(report).items():
        if row["face_box"] is None:
            continue
        face, crop = Box(*row["face_box"]), Box(*row["crop_box"])
        upright = load_image(source / relative).image
        assert detect_faces(upright)[0] == face  # the report's box is the largest face in the source
        assert Box(0, 0, *upright.size).contains(crop) and crop.contains(face)
        assert max(_offset(face, crop)) <= MAX_FACE_OFFSET, relative
        if row["status"] != "kept":
            continue
        output_size = tuple(row["output_size"])
        mapped = _map_box(face, crop, output_size)
        frame = Box(0, 0, *output_size)
        assert frame.contains(mapped) and max(_offset(mapped, frame)) <= MAX_FACE_OFFSET
        with Image.open(out / row["output"]) as image:
            found = detect_faces(image.convert("RGB"))
        assert found, f"no face found again in the output of {relative}"
        assert max(_offset(found[0], frame)) <= MAX_FACE_OFFSET, (relative, found[0])
        assert _overlap(found[0], mapped) > 0.5, (relative, found[0], mapped)
        checked += 1
    assert checked == 6  # upright, cropped, mirror, tilt-left, tilt-right, mirror-tilt


def test_source_folders_are_never_modified(prepared):
    source, reg, before = prepared.source, prepared.reg, prepared.before
    assert (tree_digest(source), tree_digest(reg)) == before


def test_plan_accepts_the_output_unchanged(prepared, capsys):
    from loralab.data.discovery import discover_dataset

    out, report = prepared.out, prepared.report
    dataset = discover_dataset(out / "img", out / "reg", ".caption")
    assert [(s.repeats, s.class_tokens, s.num_images) for s in dataset.train] == [
        (REPEATS, f"{TOKEN} {CLASS}", 12)
    ]
    assert [(s.repeats, s.class_tokens, s.num_images) for s in dataset.reg] == [(1, CLASS, 2)]
    assert not dataset.skipped
    captions = {image.path.name: image.caption for image in dataset.train[0].images}
    kept = rows_by_source(report)
    assert captions[Path(kept["scenes/chelsea_cmyk.jpg"]["output"]).name] == "a cat"

    config = Path(__file__).parent / "data" / "seed" / "config_SD1.5.json"
    capsys.readouterr()
    code = main(
        ["plan", str(config), "--train-data", str(out / "img"), "--reg-data", str(out / "reg"), "--json"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan = json.loads(captured.out)
    assert plan["num_train_images"] == 12 * REPEATS
    assert plan["num_reg_images"] == 2
    assert sum(bucket["count"] for bucket in plan["buckets"]) == 12 * REPEATS + plan["reg_images_per_epoch"]


@pytest.fixture
def small_source(tmp_path: Path) -> Path:
    """Three photos (one face, two scenes) and a junk file: quick to prepare."""
    source = tmp_path / "photos"
    source.mkdir()
    canvas = _noise((1000, 600), seed=3)
    canvas.paste(skimage_photo("astronaut.png").convert("RGB").resize((520, 520)), (240, 60))
    canvas.save(source / "portrait.jpg", quality=92)
    skimage_photo("rocket.jpg").save(source / "rocket.jpg")
    skimage_photo("coffee.png").save(source / "coffee.png")
    (source / "Thumbs.db").write_bytes(b"\x00" * 10)
    return source


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    """Exit code, stdout, and stderr without the progress bar's lines."""
    capsys.readouterr()
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    err = "".join(
        line for line in captured.err.split("\n") if line and not line.startswith(("\r", "prepare:"))
    )
    err = err + "\n" if err else err
    return code, captured.out, err


SMALL_ARGS = (
    "--token",
    TOKEN,
    "--class",
    CLASS,
    "--resolution",
    RESOLUTION,
    "--min-size",
    MIN_SIZE,
    "--workers",
    1,
)


def test_dry_run_prints_the_same_table_and_writes_nothing(small_source, tmp_path, capsys):
    out = tmp_path / "dataset"
    code, dry_table, _ = run_cli(capsys, "prepare", small_source, out, *SMALL_ARGS, "--dry-run")
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no output, no staging folder
    code, table, _ = run_cli(capsys, "prepare", small_source, out, *SMALL_ARGS)
    assert code == 0
    dry_lines, lines = dry_table.splitlines(), table.splitlines()
    assert dry_lines[:-1] == lines[:-1]
    assert dry_lines[-1].endswith("dry run: nothing written") and lines[-1].endswith(f"wrote {out}")
    header, *rows = lines[:-1]
    assert header.split() == ["SET", "SOURCE", "RESULT", "DETAILS"]
    assert [row.split()[1:3] for row in rows] == [
        ["Thumbs.db", "skipped"],
        ["coffee.png", "kept"],
        ["portrait.jpg", "kept"],
        ["rocket.jpg", "kept"],
    ]
    assert "face crop at box" in rows[2] and "centre crop at box" in rows[3] and "(no face found)" in rows[3]


def test_rerun_into_a_finished_output_gives_the_same_folder(small_source, tmp_path, capsys):
    out = tmp_path / "dataset"
    args = (*SMALL_ARGS, "--caption", "token", "--face-focus", "off")  # framing is not the point here
    assert run_cli(capsys, "prepare", small_source, out, *args)[0] == 0
    first = tree_digest(out)
    assert run_cli(capsys, "prepare", small_source, out, *args)[0] == 0
    assert tree_digest(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "photos"]  # nothing left beside it
    captions = sorted(out.glob(f"img/1_{TOKEN} {CLASS}/*.caption"))
    assert len(captions) == 3 and {c.read_text(encoding="utf-8") for c in captions} == {f"{TOKEN} {CLASS}\n"}


def test_a_failed_run_leaves_no_partial_output(small_source, tmp_path, monkeypatch):
    from loralab.data.prepare import runner

    out = tmp_path / "dataset"
    options = PrepareOptions(
        TOKEN, CLASS, resolution=RESOLUTION, min_size=MIN_SIZE, face_focus=False, workers=1, progress=False
    )
    prepare_dataset(small_source, out, options)
    finished = tree_digest(out)
    calls = []

    def fail_on_third(task):
        calls.append(task)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return runner.prepare_image(task)

    monkeypatch.setattr(runner, "prepare_image", fail_on_third)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(small_source, out, options)
    assert tree_digest(out) == finished  # the earlier complete output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "photos"]
    calls.clear()
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(small_source, fresh, options)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "photos"]


def test_bucket_crop_writes_images_at_a_bucket_size_around_the_face(small_source, tmp_path):
    from loralab.data.buckets import BucketManager

    out = tmp_path / "dataset"
    options = PrepareOptions(
        TOKEN,
        CLASS,
        resolution=RESOLUTION,
        min_size=MIN_SIZE,
        crop="bucket",
        min_bucket_reso=128,
        max_bucket_reso=512,
        bucket_reso_steps=64,
        workers=1,
        progress=False,
    )
    report = prepare_dataset(small_source, out, options)
    buckets = BucketManager(
        (RESOLUTION, RESOLUTION), min_bucket_reso=128, max_bucket_reso=512, bucket_reso_steps=64
    )
    rows = {row.source: row for row in report.rows}
    for name in ("portrait.jpg", "rocket.jpg", "coffee.png"):
        row = rows[name]
        expected_bucket = buckets.select(*row.file_size).bucket
        assert row.output_size == expected_bucket, name
        assert expected_bucket in buckets.predefined
        assert buckets.select(*row.output_size).bucket == expected_bucket  # training keeps it as is
    portrait = rows["portrait.jpg"]
    assert portrait.output_size[0] > portrait.output_size[1]  # a landscape bucket for a 1000x600 photo
    assert portrait.crop_box.contains(portrait.face_box)
    assert max(_offset(portrait.face_box, portrait.crop_box)) <= MAX_FACE_OFFSET


def test_crop_none_keeps_the_whole_photo_within_the_training_area(small_source, tmp_path):
    options = PrepareOptions(
        TOKEN,
        CLASS,
        resolution=RESOLUTION,
        min_size=MIN_SIZE,
        crop="none",
        dry_run=True,
        workers=1,
        progress=False,
    )
    report = prepare_dataset(small_source, tmp_path / "dataset", options)
    for row in report.rows:
        if row.status != "kept":
            continue
        (width, height), (out_w, out_h) = row.file_size, row.output_size
        assert row.crop_box == Box(0, 0, width, height) and row.face_box is None
        assert out_w * out_h <= RESOLUTION**2 and abs(out_w / out_h - width / height) < 0.01
    assert not (tmp_path / "dataset").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--class", CLASS), "missing --token: prepare names the folder"),
        ((), "missing --token and --class"),
        (("--token", TOKEN, "--class", "wo/man"), "--class 'wo/man' cannot be part of a folder name"),
        (
            ("--token", TOKEN, "--class", CLASS, "--resolution", "500"),
            "--resolution 500 must be a multiple of 8",
        ),
        (  # caption files named like the prepared images would replace them
            ("--token", TOKEN, "--class", CLASS, "--caption-extension", ".png"),
            "--caption-extension .png is an image extension",
        ),
    ],
)
def test_bad_options_are_one_line_errors(small_source, tmp_path, capsys, args, message):
    code, _, err = run_cli(capsys, "prepare", small_source, tmp_path / "out", *args)
    assert code == 2
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_folders_are_one_line_errors(small_source, tmp_path, capsys):
    names = ("--token", TOKEN, "--class", CLASS)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "prepare", empty, tmp_path / "out", *names)
    assert code == 2 and "is empty; put the photos to prepare in it" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "prepare", tmp_path / "missing", tmp_path / "out", *names)
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "prepare", small_source, small_source / "dataset", *names)
    assert code == 2 and "overlaps the source folder" in err
    foreign = tmp_path / "my-files"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "prepare", small_source, foreign, *names)
    assert code == 2 and "is not a finished prepare output" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
    code, _, err = run_cli(capsys, "prepare", small_source, foreign / "keep.txt" / "out", *names)
    assert code == 2 and "cannot create the output folder" in err and err.count("\n") == 1
    assert (foreign / "keep.txt").read_text() == "mine"


def test_a_folder_without_usable_images_shows_the_table_then_one_error(tmp_path, capsys):
    source = tmp_path / "junk"
    source.mkdir()
    (source / "empty.jpg").write_bytes(b"")
    (source / "notes.md").write_text("# todo")
    Image.new("RGB", (1, 1)).save(source / "dot.png")
    code, out, err = run_cli(capsys, "prepare", source, tmp_path / "out", "--token", TOKEN, "--class", CLASS)
    assert code == 2
    assert "dot.png" in out and "too small: 1x1 px" in out and "empty file (0 bytes)" in out
    assert out.rstrip().endswith("; nothing written") and "wrote" not in out
    assert err.startswith("error: none of the 3 files") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_oversized_images_are_decoded_at_reduced_scale_or_refused(tmp_path):
    photo = skimage_photo("astronaut.png").convert("RGB").resize((1600, 1200))
    photo.save(tmp_path / "big.jpg", quality=90)
    photo.save(tmp_path / "big.png")
    loaded = load_image(tmp_path / "big.jpg", max_decode_pixels=600_000)
    assert loaded.image.size == (800, 600) and loaded.file_size == (1600, 1200)
    assert any("decoded at 1/2 scale" in action for action in loaded.actions)
    with pytest.raises(UnusableImage, match="PNG cannot be decoded at a reduced size"):
        load_image(tmp_path / "big.png", max_decode_pixels=600_000)
    (tmp_path / "huge.png").write_bytes(_png_header_only(20000, 20000))
    with pytest.raises(UnusableImage, match="decompression-bomb"):
        load_image(tmp_path / "huge.png")


def test_near_duplicates_keep_the_preferred_copy():
    from loralab.data.prepare.dedupe import HashedImage, find_near_duplicates

    base = 0x0123456789ABCDEF
    images = [
        HashedImage("small.jpg", f"{base:016x}", (100, 5)),
        HashedImage("large.png", f"{base ^ 0b111:016x}", (400, 1)),  # 3 bits away
        HashedImage("other.png", f"{base ^ 0xFFFF:016x}", (100, 1)),  # 16 bits away
    ]
    duplicates = find_near_duplicates(images)
    assert [(d.key, d.kept_key, d.distance) for d in duplicates] == [("small.jpg", "large.png", 3)]


def _renamed_srgb_profile(name: bytes) -> bytes:
    """Pillow's built-in sRGB profile under another description: a stand-in for a camera profile."""
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return profile.replace("sRGB".encode("utf-16-be"), name.decode().encode("utf-16-be"))


def test_embedded_colour_profiles_are_converted_to_srgb(tmp_path):
    photo = Image.new("RGB", (300, 200), (200, 120, 40))
    photo.save(tmp_path / "wide.png", icc_profile=_renamed_srgb_profile(b"wide"))
    photo.save(tmp_path / "srgb.png", icc_profile=_renamed_srgb_profile(b"sRGB"))
    photo.convert("L").save(tmp_path / "gray.png", icc_profile=_renamed_srgb_profile(b"wide"))
    wide = load_image(tmp_path / "wide.png")
    assert wide.actions == ["converted RGB to sRGB using its ICC profile 'wide built-in'"]
    assert wide.image.getpixel((0, 0)) == (200, 120, 40)  # the stand-in profile is sRGB in disguise
    assert load_image(tmp_path / "srgb.png").actions == []
    assert load_image(tmp_path / "gray.png").actions == [
        "converted grayscale (L) to RGB"
    ]  # RGB profile ignored


@pytest.mark.parametrize(
    ("mode", "samples", "expected"),
    [
        ("I", np.array([[0, 32768, 65535]], np.int32), [0, 128, 255]),  # 16-bit values in a 32-bit image
        ("I", np.array([[-55, 0, 200]], np.int32), [0, 55, 255]),  # negative: the range is stretched
        ("I", np.array([[0, 50_000, 100_000]], np.int32), [0, 128, 255]),  # beyond 16 bits: stretched
        ("F", np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # float in [0, 1]
    ],
)
def test_wide_samples_are_rescaled_to_8_bits(tmp_path, mode, samples, expected):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.repeat(samples, 4, axis=0), mode=mode).save(path)
    loaded = load_image(path)
    assert [loaded.image.getpixel((x, 0))[0] for x in range(3)] == expected
    assert "grayscale" in loaded.actions[0] and "to 8-bit RGB" in loaded.actions[0]


@pytest.mark.parametrize("aspect", [1.0, 1.5, 2 / 3])
def test_face_crop_geometry_holds_for_any_face_position(aspect):
    """Always inside the photo and around the whole face; centred always for square crops, and
    for other aspect ratios except beside an edge where centring would cut the face."""
    from loralab.data.prepare.framing import MAX_FACE_OFFSET, face_crop

    rng = np.random.default_rng(7)
    off_centre = 0
    for _ in range(2000):
        height = int(rng.integers(64, 2000))
        width = max(16, round(height * aspect * rng.uniform(0.8, 1.25)))  # photos near the bucket's shape
        # Faces from 5% to 45% of the shorter side, anywhere, including touching the edges.
        side = int(rng.integers(max(4, min(width, height) // 20), min(width, height) * 45 // 100))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        face = Box(left, top, left + side, top + side)
        crop = face_crop((width, height), face, aspect)
        assert Box(0, 0, width, height).contains(crop)
        assert abs(crop.width / crop.height - aspect) <= 2 / min(crop.width, crop.height) + 1e-9
        assert crop.contains(face), (width, height, face, crop)
        offset_x, offset_y = _offset(face, crop)  # within the bound, up to one pixel of rounding
        if max(offset_x - 1 / crop.width, offset_y - 1 / crop.height) > MAX_FACE_OFFSET:
            assert aspect != 1.0, (width, height, face, crop)
            # Off-centre only because a centred crop of this shape would be shorter than the face.
            assert crop.height <= max(face.height, face.width / aspect) + 1, (width, height, face, crop)
            off_centre += 1
    assert off_centre < 200  # the edge cases stay the exception
