"""``loralab demo --quick`` end to end: the LoRA draws the toy subject with the trigger on both toy
checkpoints, not without it, and the report's pages reference only images that exist; and the
demo's class images (prior preservation) on their own."""

from __future__ import annotations

import json
from pathlib import Path
import re

import pytest

from loralab.cli.main import main
from loralab.config import load_config
from loralab.demo.settings import CHECKPOINT_LABELS
from loralab.sweep.evaluate import remove_trigger
from loralab.toy import world

pytestmark = pytest.mark.slow

MIN_GAIN = 0.3  # likeness with the trigger, above the checkpoint alone (same prompts and seeds)
MAX_LEAK = 0.1  # likeness without the trigger, above the checkpoint alone


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORALAB_CACHE_DIR", str(out.parent / "cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        assert main(["demo", "--out", str(out), "--quick"]) == 0
    return out


def _baseline_rows(demo_dir):
    rows = json.loads((demo_dir / "sweep" / "likeness.json").read_text())["likeness"]
    return {row["checkpoint"]: row for row in rows if row["run"] == "baseline" and row["save_point"] == "final"}


def test_subject_appears_with_the_trigger_on_both_checkpoints(demo_dir):
    rows = _baseline_rows(demo_dir)
    assert set(rows) == set(CHECKPOINT_LABELS)
    for checkpoint, row in rows.items():
        assert row["with_trigger"] - row["base_with_trigger"] >= MIN_GAIN, (checkpoint, row)


def test_no_concept_bleed_without_the_trigger(demo_dir):
    for checkpoint, row in _baseline_rows(demo_dir).items():
        assert row["without_trigger"] - row["base_without_trigger"] < MAX_LEAK, (checkpoint, row)


def test_prompts_without_the_trigger_keep_the_class_word(demo_dir):
    # Bleed is judged as a person would: the same prompts and seeds with only the trigger taken out.
    entries = json.loads((demo_dir / "sweep" / "eval" / "baseline" / "final" / "index.json").read_text())
    with_trigger = {(e["checkpoint"], e["prompt"], e["seed"]) for e in entries if e["trigger"]}
    without = [e for e in entries if not e["trigger"]]
    assert without and len(without) == len(with_trigger)
    for entry in without:
        assert f"{world.SUBJECT_TRIGGER} " not in entry["prompt"] and world.SUBJECT_CLASS in entry["prompt"].split()
        assert (entry["checkpoint"], f"{world.SUBJECT_TRIGGER} {entry['prompt']}", entry["seed"]) in with_trigger


def test_training_used_class_images_from_the_base_model(demo_dir):
    captions = sorted(p.read_text().strip() for p in (demo_dir / "dataset" / "img").glob("*/*.caption"))
    class_dir = demo_dir / "class" / f"1_{world.SUBJECT_CLASS}"
    class_captions = sorted(p.read_text().strip() for p in class_dir.glob("*.caption"))
    assert class_captions == sorted(remove_trigger(c, world.SUBJECT_TRIGGER) for c in captions)
    assert len(list(class_dir.glob("*.png"))) == len(captions)
    config = load_config(demo_dir / "config" / "baseline.toml")
    assert config.reg_data_dir == (demo_dir / "class").resolve() and config.prior_loss_weight > 0


def test_scores_reach_the_results(demo_dir):
    results = json.loads((demo_dir / "sweep" / "results.json").read_text())
    rows = results if isinstance(results, list) else results.get("rows", results.get("runs", []))
    baseline = [row for row in rows if row.get("run") == "baseline" and row.get("save_point") == "final"]
    assert baseline and isinstance(baseline[0].get("likeness"), float)


def test_report_references_only_existing_images(demo_dir):
    report = demo_dir / "sweep" / "report"
    pages = sorted(report.rglob("*.html"))
    assert (report / "index.html") in pages
    images = []
    for page in pages:
        for reference in re.findall(r'(?:src|href)="([^"#?]+\.png)"', page.read_text(encoding="utf-8")):
            images.append((page.parent / reference).resolve())
    assert images, "the report shows no images"
    missing = [str(path) for path in images if not path.is_file()]
    assert not missing


def test_sweep_files_work_from_a_relative_output_folder(tmp_path, monkeypatch):
    # `make demo` passes a relative --out: the sweep file must find its baseline from anywhere.
    from loralab.demo.settings import QUICK, write_sweep_files
    from loralab.sweep.expand import expand_sweep
    from loralab.sweep.spec import read_sweep

    monkeypatch.chdir(tmp_path)
    (tmp_path / "img" / "1_blh ring").mkdir(parents=True)
    (tmp_path / "reg" / "1_ring").mkdir(parents=True)
    sweep = write_sweep_files(Path("out/config"), Path("img").resolve(), Path("reg").resolve(), QUICK)
    monkeypatch.chdir(tmp_path / "out")  # the sweep is read from another working directory
    expansion = expand_sweep(read_sweep(Path("config") / sweep.name))
    assert expansion.baseline.train_data_dir == tmp_path / "img"
