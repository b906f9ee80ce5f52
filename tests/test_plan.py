"""The dry-run planner: discovery, steps and epochs, LR schedule, the CLI, and the seed runs.

The acceptance test replays every run of the guide's ``runs.json`` (kohya_ss GUI configs with
the step count and the ``lr/unet`` curve their TensorBoard logs recorded) on synthetic datasets of
the same shape, and requires the exact steps and the same curve.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from loralab.cli.main import main
from loralab.config.loading import load_config
from loralab.data.discovery import discover_dataset
from loralab.errors import ConfigError, DatasetError
from loralab.plan.planner import make_plan
from loralab.train.lr_schedules import build_lr_scheduler

REPO = Path(__file__).resolve().parents[1]
SEED = Path(__file__).parent / "data" / "seed"
RUNS = json.loads((SEED / "runs.json").read_text())
GUI_CONFIG = SEED / "config_SD1.5.json"  # batch 3, 100 epochs, cosine, buckets without upscale


def write_images(folder: Path, sizes: list[tuple[int, int]], suffix: str = ".png") -> list[Path]:
    """Images whose header has the given sizes; 1-bit solid PNGs stay tiny at any size."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, size in enumerate(sizes):
        path = folder / f"{index:03d}{suffix}"
        Image.new("1", size).save(path)
        paths.append(path)
    return paths


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def plan_json(capsys, *argv: str) -> dict:
    code, out, err = run_cli(capsys, "plan", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def gui_config(*overrides: str):
    return load_config(GUI_CONFIG, list(overrides))


# --- acceptance: every logged run of the guide -------------------------------------------------


@pytest.fixture(scope="session")
def seed_dataset(tmp_path_factory):
    """Datasets shaped like each run's ``dataset`` field, written once per distinct shape."""
    made: dict[tuple[int, int, bool], Path] = {}

    def dataset(resolution: int, repeats: int, with_reg: bool) -> Path:
        key = (resolution, repeats, with_reg)
        if key not in made:
            root = tmp_path_factory.mktemp(f"seed_{resolution}_{repeats}_{int(with_reg)}")
            write_images(root / "img" / f"{repeats}_blh woman", [(resolution, resolution)] * 33)
            if with_reg:
                write_images(root / "reg" / "1_woman", [(resolution, resolution)] * 330)
            made[key] = root
        return made[key]

    return dataset


@pytest.mark.parametrize("run", RUNS, ids=[f"{r['topic']}/{r['run']}" for r in RUNS])
def test_seed_run_steps_and_lr_schedule(run, seed_dataset, tmp_path, capsys):
    dataset_info = run["dataset"]
    assert dataset_info["train_images"] == 33 and dataset_info["reg_images"] in (0, 330)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(run["config"]))
    width, height = (int(side) for side in run["config"]["max_resolution"].split(","))
    assert width == height
    root = seed_dataset(width, dataset_info["repeats"], dataset_info["reg_images"] > 0)
    argv = [config_path, "--train-data", root / "img"]
    if dataset_info["reg_images"]:
        argv += ["--reg-data", root / "reg"]

    plan = plan_json(capsys, *argv)

    assert plan["max_train_steps"] == run["steps"]
    assert plan["num_reg_images"] == dataset_info["reg_images"]
    if dataset_info["image_size"].startswith("square"):
        # The uncropped originals ended in epoch 69; a square set gives all epochs (see below).
        assert plan["epochs"] == run["epochs_logged"]
    learning_rate = run["config"]["unet_lr"] or run["config"]["learning_rate"]
    logged = [value / learning_rate for value in run["lr_unet"]]
    schedule = [value / learning_rate for value in plan["lr_schedule"]]
    assert len(schedule) == len(logged)
    assert max(abs(a - b) for a, b in zip(schedule, logged)) < 1e-6


def test_gui_formula_ends_the_last_epoch_early_like_the_uncropped_runs(tmp_path):
    # Uncropped photos fall into several buckets; each bucket's last batch is short, so an epoch
    # has more batches than the GUI's 33 / 3 = 11. Here 24 squares (8 batches) plus 9 photos in 8
    # other buckets (8 batches) give 16: 1100 steps then take ceil(1100 / 16) = 69 epochs.
    sizes = [(768, 768)] * 24 + [(640 + 64 * i, 448) for i in range(7)] + [(448, 640)] * 2
    write_images(tmp_path / "img" / "1_blh woman", sizes)
    plan = make_plan(gui_config(), tmp_path / "img")
    assert plan.batches_per_epoch == 16
    assert plan.max_train_steps == 1100
    logged = next(r for r in RUNS if r["run"].endswith("non_cropped"))
    assert plan.epochs == logged["epochs_logged"] == 69
    assert plan.steps_in_last_epoch == 1100 - 68 * 16
    assert any("last epoch (69) stops after 12 of 16 steps" in note for note in plan.warnings)


# --- steps and epochs ----------------------------------------------------------------------------


@pytest.fixture
def square_33(tmp_path) -> Path:
    write_images(tmp_path / "img" / "1_blh woman", [(768, 768)] * 33)
    return tmp_path / "img"


def test_sd_scripts_max_train_epochs_overrides_max_train_steps(square_33):
    base = ["steps_formula=sd-scripts"]
    both = make_plan(gui_config(*base, "max_train_epochs=5", "max_train_steps=7"), square_33)
    assert (both.max_train_steps, both.epochs) == (55, 5)
    steps_only = make_plan(gui_config(*base, "max_train_epochs=", "max_train_steps=100"), square_33)
    assert (steps_only.max_train_steps, steps_only.epochs, steps_only.steps_in_last_epoch) == (100, 10, 1)
    default = make_plan(gui_config(*base, "max_train_epochs=", "max_train_steps="), square_33)
    assert default.max_train_steps == 1600  # sd-scripts' default
    assert default.epochs == 146


def test_gradient_accumulation(square_33):
    # 11 batches per epoch, 4 per update: ceil(11 / 4) = 3 updates per epoch.
    sd_scripts = make_plan(
        gui_config("steps_formula=sd-scripts", "gradient_accumulation_steps=4", "max_train_epochs=10"), square_33
    )
    assert (sd_scripts.batches_per_epoch, sd_scripts.steps_per_epoch, sd_scripts.max_train_steps) == (11, 3, 30)
    # The GUI divides before rounding: ceil(33 / 3 / 4 * 10) = ceil(27.5) = 28 steps, 10 epochs.
    gui = make_plan(gui_config("gradient_accumulation_steps=4", "max_train_epochs=10"), square_33)
    assert (gui.max_train_steps, gui.epochs, gui.steps_in_last_epoch) == (28, 10, 1)


def test_gui_passes_a_set_max_train_steps_through(square_33):
    plan = make_plan(gui_config("max_train_steps=250"), square_33)
    assert plan.max_train_steps == 250
    assert len(plan.lr_schedule) == 250


def test_gui_formula_counts_only_the_extensions_the_gui_counts(tmp_path):
    # sd-scripts trains on .bmp too, but the GUI's step formula skips it: ceil(32 / 3 * 100) = 1067.
    write_images(tmp_path / "img" / "1_blh woman", [(768, 768)] * 32)
    write_images(tmp_path / "img" / "1_blh woman", [(768, 768)], suffix=".bmp")
    plan = make_plan(gui_config(), tmp_path / "img")
    assert (plan.num_train_images, plan.batches_per_epoch) == (33, 11)
    assert (plan.max_train_steps, plan.epochs) == (1067, 97)


def test_reg_images_are_balanced_to_the_train_count(tmp_path):
    write_images(tmp_path / "img" / "2_blh woman", [(768, 768)] * 10)
    write_images(tmp_path / "reg" / "1_woman", [(768, 768)] * 3)
    plan = make_plan(gui_config("steps_formula=sd-scripts", "max_train_epochs=1"), tmp_path / "img", tmp_path / "reg")
    # 20 training samples; the 3 reg images are repeated 7, 7 and 6 times to match.
    assert (plan.num_train_images, plan.num_reg_images, plan.reg_images_per_epoch) == (20, 3, 20)
    assert plan.buckets[0].count == 40
    assert plan.batches_per_epoch == 14  # ceil(40 / 3)


def test_non_square_images_are_bucketed_like_sd_scripts(tmp_path):
    # resolution 512 with predefined buckets: 1000x1500 -> 384x640, 1920x1080 -> 640x384.
    write_images(tmp_path / "img" / "3_blh woman", [(1000, 1500), (1000, 1500), (1920, 1080), (512, 512)])
    plan = make_plan(
        gui_config("resolution=512", "bucket_no_upscale=false", "max_bucket_reso=1024"), tmp_path / "img"
    )
    assert [(b.resolution, b.count) for b in plan.buckets] == [((384, 640), 6), ((512, 512), 3), ((640, 384), 3)]
    assert plan.batches_per_epoch == 4


def test_bucket_no_upscale_uses_image_sizes(tmp_path):
    write_images(tmp_path / "img" / "1_blh woman", [(700, 500), (1000, 1500), (768, 768)])
    plan = make_plan(gui_config(), tmp_path / "img")  # the seed config: 768, no upscale
    assert [b.resolution for b in plan.buckets] == [(576, 896), (640, 448), (768, 768)]


def test_bucketing_off_notes_resized_images(tmp_path):
    write_images(tmp_path / "img" / "1_blh woman", [(1000, 1500), (768, 768)])
    plan = make_plan(gui_config("enable_bucket=false"), tmp_path / "img")
    assert [(b.resolution, b.count) for b in plan.buckets] == [((768, 768), 2)]
    assert any("1 images are not 768x768" in note for note in plan.warnings)


def test_warmup_ratio_sd_scripts_truncates(square_33):
    plan = make_plan(gui_config("steps_formula=sd-scripts", "lr_warmup_steps=0.1"), square_33)
    assert plan.lr_warmup_steps == 110
    assert plan.lr_schedule[0] == pytest.approx(1 / 110)
    assert plan.lr_schedule[109] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(plan.lr_schedule[109:], plan.lr_schedule[110:]))


def test_warmup_percent_of_a_gui_config_rounds_like_the_gui(square_33):
    # 7 % of 1110 steps = 77.7: the GUI rounds to 78, sd-scripts' ratio truncates to 77.
    gui = make_plan(gui_config("max_train_steps=1110", "lr_warmup_steps=0.07"), square_33)
    sd_scripts = make_plan(
        gui_config("steps_formula=sd-scripts", "max_train_steps=1110", "max_train_epochs=", "lr_warmup_steps=0.07"),
        square_33,
    )
    assert (gui.lr_warmup_steps, sd_scripts.lr_warmup_steps) == (78, 77)


def test_training_scheduler_gives_the_planned_schedule(square_33):
    config = gui_config(
        "lr_scheduler=cosine_with_restarts", "lr_scheduler_num_cycles=3", "lr_warmup_steps=0.1", "unet_lr=2e-4"
    )
    plan = make_plan(config, square_33)
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([parameter], lr=plan.unet_lr)
    scheduler = build_lr_scheduler(optimizer, config, plan.max_train_steps)
    trained = []
    for _ in range(plan.max_train_steps):
        optimizer.step()
        scheduler.step()
        trained.append(optimizer.param_groups[0]["lr"])
    assert trained == pytest.approx(list(plan.lr_schedule), abs=1e-12)
    # Three hard restarts after the warm-up: the lr jumps back to the peak twice.
    assert sum(1 for a, b in zip(trained, trained[1:]) if b - a > plan.unet_lr / 2) == 2


def test_polynomial_schedule_ends_at_diffusers_absolute_end_lr(square_33):
    plan = make_plan(gui_config("lr_scheduler=polynomial", "learning_rate=1e-4", "unet_lr=1e-4"), square_33)
    assert plan.lr_schedule[-1] == pytest.approx(1e-7)
    assert plan.lr_schedule[0] == pytest.approx(1e-7 + (1e-4 - 1e-7) * (1 - 1 / 1100))


def test_constant_schedule_with_warmup_is_refused(square_33):
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        make_plan(gui_config("lr_scheduler=constant", "lr_warmup_steps=10"), square_33)


# --- discovery -----------------------------------------------------------------------------------


def test_discovery_skips_folders_without_repeat_prefix_and_says_why(tmp_path):
    root = tmp_path / "img"
    write_images(root / "1_blh woman", [(512, 512)] * 2)
    write_images(root / "photos", [(512, 512)])
    write_images(root / "0_unused", [(512, 512)])
    (root / "5_empty").mkdir()
    (root / "5_empty" / "notes.txt").write_text("no images here")
    write_images(root, [(512, 512)], suffix=".jpg")  # a loose image next to the folders

    info = discover_dataset(root)

    assert [(s.folder.name, s.repeats, s.class_tokens, s.num_images) for s in info.train] == [
        ("1_blh woman", 1, "blh woman", 2)
    ]
    reasons = {s.path.name: s.reason for s in info.skipped}
    assert "repeat count like '10_blh woman'" in reasons["photos"]
    assert "less than 1" in reasons["0_unused"]
    assert reasons["5_empty"].startswith("no images")
    assert "directly in the training folder" in reasons["img"]


def test_empty_dataset_is_an_error_naming_skipped_folders(tmp_path):
    write_images(tmp_path / "img" / "photos", [(512, 512)])
    with pytest.raises(DatasetError, match="'photos': name does not start with a repeat count"):
        discover_dataset(tmp_path / "img")
    (tmp_path / "bare").mkdir()
    with pytest.raises(DatasetError, match="no sub-folders"):
        discover_dataset(tmp_path / "bare")


def test_caption_file_first_line_else_folder_class_tokens(tmp_path):
    folder = tmp_path / "img" / "4_blh woman"
    captioned, plain, face_crop = write_images(folder, [(512, 512)] * 3)
    captioned.with_suffix(".txt").write_text("blh woman smiling, beach\nsecond line is ignored\n")
    face_crop = face_crop.rename(folder / "portrait_10_20_30_40.png")
    (folder / "portrait.txt").write_text("blh woman, close-up")

    by_name = {image.path.name: image for image in discover_dataset(tmp_path / "img", None, ".txt").train[0].images}

    assert (by_name[captioned.name].caption, by_name[captioned.name].caption_source) == (
        "blh woman smiling, beach",
        "file",
    )
    assert (by_name[plain.name].caption, by_name[plain.name].caption_source) == ("blh woman", "folder")
    assert by_name[face_crop.name].caption == "blh woman, close-up"
    # With the default extension the .txt files are not captions.
    assert {i.caption_source for i in discover_dataset(tmp_path / "img").train[0].images} == {"folder"}


def test_empty_caption_file_is_an_error(tmp_path):
    (image,) = write_images(tmp_path / "img" / "1_blh woman", [(512, 512)])
    image.with_suffix(".caption").write_text("")
    with pytest.raises(DatasetError, match="is empty"):
        discover_dataset(tmp_path / "img")


def test_image_extensions_and_unreadable_images(tmp_path):
    folder = tmp_path / "img" / "1_blh woman"
    write_images(folder, [(512, 512)], suffix=".PNG")
    write_images(folder, [(64, 64)], suffix=".gif")  # not an image type we train on
    Image.new("RGB", (320, 256)).save(folder / "photo.webp")
    Image.new("RGB", (256, 320)).save(folder / "scan.bmp")
    sizes = sorted((i.width, i.height) for i in discover_dataset(tmp_path / "img").train[0].images)
    assert sizes == [(256, 320), (320, 256), (512, 512)]
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="cannot read image .*broken.jpg"):
        discover_dataset(tmp_path / "img")


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_json_has_the_agreed_fields(square_33, capsys):
    plan = plan_json(capsys, GUI_CONFIG, "--train-data", square_33, "--set", "train_batch_size=11")
    assert plan["max_train_steps"] == 300
    assert plan["epochs"] == 100
    assert plan["batches_per_epoch"] == 3
    assert (plan["num_train_images"], plan["num_reg_images"]) == (33, 0)
    assert plan["buckets"] == [{"resolution": [768, 768], "count": 33, "batches": 3}]
    assert len(plan["lr_schedule"]) == 300 and plan["lr_schedule"][-1] == 0.0


def test_cli_text_shows_buckets_totals_and_schedule(square_33, capsys):
    code, out, _ = run_cli(capsys, "plan", GUI_CONFIG, "--train-data", square_33)
    assert code == 0
    assert "768x768" in out and "33 samples" in out
    assert re.search(r"max train steps +1100 \(kohya_ss GUI formula\)", out)
    assert re.search(r"\n  epochs +100\n", out)
    assert "learning rate: cosine, lr/unet = 1 x multiplier" in out
    assert re.search(r"multiplier +1 +0.9755 ", out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train-data", "{tmp}/missing"], "does not exist"),
        (["--train-data", "{tmp}/img", "--set", "resolution=770"], "not divisible by bucket_reso_steps"),
        (["--train-data", "{tmp}/img"], "'photos': name does not start with a repeat count"),
        (["--set", "no_such_key=1", "--train-data", "{tmp}/img"], "no_such_key"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    write_images(tmp_path / "img" / "photos", [(512, 512)])
    code, out, err = run_cli(capsys, "plan", GUI_CONFIG, *(a.format(tmp=tmp_path) for a in argv))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert message in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer_type=AdamW", "optimizer_args=betas=0.9"], "AdamW refused its settings"),
        (["optimizer_type=AdamW", "optimizer_args=weight_decay=-1"], "Invalid weight_decay value: -1"),
        (["sample_prompts={tmp}/missing.txt"], "sample_prompts file .*missing.txt not found"),
        (["sample_prompts={tmp}/latin1.txt"], "not UTF-8 text .*save it as UTF-8"),
    ],
)
def test_cli_reports_what_the_run_would_refuse_at_its_start(overrides, message, tmp_path, capsys):
    """A plan that passes must not hide a run that fails as it starts (the optimizer's own value
    checks, the sample prompts file)."""
    write_images(tmp_path / "img" / "1_blh woman", [(512, 512)])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 photo".encode("latin-1"))
    sets = [arg for override in overrides for arg in ("--set", override.format(tmp=tmp_path))]
    code, out, err = run_cli(capsys, "plan", GUI_CONFIG, "--train-data", str(tmp_path / "img"), *sets)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err)


def test_bundled_example_runs_as_the_readme_says(tmp_path, capsys):
    script = REPO / "examples" / "make_example_dataset.py"
    spec = importlib.util.spec_from_file_location("make_example_dataset", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    image_root = module.make_example_dataset(tmp_path)

    plan = plan_json(capsys, REPO / "examples" / "person_sd15.json", "--train-data", image_root)

    assert plan["buckets"] == [{"resolution": [768, 768], "count": 33, "batches": 11}]
    assert (plan["max_train_steps"], plan["epochs"]) == (1100, 100)
