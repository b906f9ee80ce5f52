"""Sweep files and their expansion: names, modes, validation, evaluation settings, and the guide's
21 comparisons checked against the configs of the guide's own runs (tests/data/seed/runs.json)."""

from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loralab.cli.main import main
from loralab.config.loading import load_config
from loralab.models.tiny import make_tiny
from loralab.sweep.evaluate import remove_trigger, resolve_evaluation
from loralab.sweep.expand import config_hash, expand_sweep, override_strings, read_expanded, write_expanded
from loralab.sweep.spec import SweepError, parse_sweep, read_sweep
from loralab.train.optimizers import optimizer_class, optimizer_kwargs

ROOT = Path(__file__).resolve().parent.parent
SEED = Path(__file__).parent / "data" / "seed"
GUIDE = ROOT / "examples" / "guide"
GUIDE_FILES = sorted(GUIDE.glob("[0-9][0-9]-*.toml"))

# Settings that say where things are, not what is trained: the guide's configs hold placeholders
# for them. The datasets behind the paths are compared separately (their folder names).
PATH_KEYS = {"output_dir", "logging_dir", "output_name", "resume", "pretrained_model_name_or_path", "train_data_dir", "reg_data_dir"}
GUIDE_BASELINE_DATA = "<path to img dir>"
# Comparisons whose variants the seed data holds under another topic, or not at all.
SEED_TOPIC = {"Base Checkpoint": "Optimizer", "Regularisation Images": "Optimizer"}
NOT_IN_SEED = {"Resolution": "resolution", "Total Steps": "max_train_epochs"}


def write_sweep(folder: Path, text: str, baseline: str = "") -> Path:
    """``folder/sweep.toml`` holding ``text`` and a ``[baseline]`` table (plus ``baseline`` lines)
    on ``folder/base.toml``, a small DAdaptAdam config."""
    (folder / "base.toml").write_text(
        'optimizer_type = "DAdaptAdam"\nlearning_rate = 1.0\nnetwork_dim = 8\nseed = 5\n'
        'optimizer_args = "decouple=True weight_decay=0.6"\n'
    )
    path = folder / "sweep.toml"
    path.write_text(f'{text}\n[baseline]\nconfig = "base.toml"\n{baseline}\n')
    return path


# ---------------------------------------------------------------------------------------------
# Expansion


def test_one_at_a_time_names_values_and_the_shared_baseline(tmp_path):
    path = write_sweep(
        tmp_path,
        '[axes]\nnetwork_dim = [4, 8]\noptimizer = ["DAdaptAdam", "Prodigy"]\n"optimizer_args.growth_rate" = [1.02, "inf"]\n',
        baseline="repeats = 2",
    )
    expansion = expand_sweep(read_sweep(path))
    names = [run.name for run in expansion.runs]
    assert names == [
        "baseline", "baseline-seed2", "network_dim-4", "optimizer-Prodigy",
        "optimizer_args.growth_rate-1.02", "optimizer_args.growth_rate-inf",
    ]  # fmt: skip
    by_name = {run.name: run for run in expansion.runs}
    assert by_name["network_dim-4"].config.network_dim == 4
    assert by_name["optimizer-Prodigy"].config.optimizer_type == "Prodigy"
    assert math.isinf(by_name["optimizer_args.growth_rate-inf"].config.optimizer_args["growth_rate"])
    assert by_name["optimizer_args.growth_rate-1.02"].config.optimizer_args == {
        "decouple": True, "weight_decay": 0.6, "growth_rate": 1.02,
    }  # fmt: skip
    assert by_name["baseline-seed2"].config.seed == 6 and by_name["baseline"].config.seed == 5

    # The baseline (with its repeat) belongs to each comparison, with its value on that axis.
    entries = expansion.to_json()
    baseline_entries = [(e["comparison"], e["value"]) for e in entries if e["name"] == "baseline"]
    assert baseline_entries == [("network_dim", "8"), ("optimizer", "DAdaptAdam"), ("optimizer_args.growth_rate", "unset")]
    assert sum(e["name"] == "baseline-seed2" for e in entries) == 3
    variant = next(e for e in entries if e["name"] == "optimizer_args.growth_rate-inf")
    assert variant["overrides"] == {"optimizer_args.growth_rate": "inf"} and variant["is_baseline"] is False
    assert len({e["config_hash"] for e in entries}) == len(names)


def test_grid_labels_groups_and_baseline_detection(tmp_path):
    path = write_sweep(
        tmp_path,
        'mode = "grid"\n[axes]\nnetwork_dim = { small = 4, base = 8 }\n'
        '[axes.precision]\nfp32 = {}\nfp16 = { mixed_precision = "fp16", save_precision = "fp16" }\n',
    )
    expansion = expand_sweep(read_sweep(path))
    entries = expansion.to_json()
    assert [e["name"] for e in entries] == [
        "network_dim-small+precision-fp32", "network_dim-small+precision-fp16", "network_dim-base+precision-fp16",
        "baseline",
    ]  # fmt: skip
    assert {e["comparison"] for e in entries} == {"sweep"}
    assert entries[1]["values"] == {"network_dim": "small", "precision": "fp16"}
    assert entries[1]["overrides"] == {"network_dim": 4, "mixed_precision": "fp16", "save_precision": "fp16"}
    assert entries[-1]["value"] == "base+fp32" and entries[-1]["is_baseline"]


def test_expanded_json_round_trips(tmp_path):
    expansion = expand_sweep(read_sweep(write_sweep(tmp_path, 'name = "Rank"\n[axes]\nnetwork_dim = [4]\n')))
    assert {entry["comparison"] for entry in expansion.to_json()} == {"Rank"}  # one axis: the sweep's comparison
    write_expanded(expansion, tmp_path / "out")
    assert read_expanded(tmp_path / "out") == json.loads(json.dumps(expansion.to_json()))


def test_config_hash_ignores_only_where_a_run_writes(tmp_path):
    config = load_config(write_sweep(tmp_path, "").with_name("base.toml"))
    moved = config.model_copy(update={"output_dir": tmp_path / "x", "output_name": "other"})
    assert config_hash(moved) == config_hash(config)
    assert config_hash(config.model_copy(update={"num_cpu_threads_per_process": 4})) != config_hash(config)


def test_sweeps_keep_every_save_even_when_the_baseline_prunes(tmp_path, caplog):
    path = write_sweep(tmp_path, "[axes]\nnetwork_dim = [4, 8]\nsave_last_n_steps = [5]\n",
                       baseline='[baseline.set]\nsave_last_n_epochs = 2\nsave_every_n_epochs = 1')  # fmt: skip
    with caplog.at_level("WARNING", logger="loralab.sweep.expand"):
        expansion = expand_sweep(read_sweep(path))
    assert expansion.baseline.save_every_n_epochs == 1
    for run in expansion.runs:
        assert (run.config.save_last_n_epochs, run.config.save_last_n_steps) == (None, None)
    # A variant that only set keep-last-N is the baseline: it would save the same files.
    assert [run.name for run in expansion.runs] == ["baseline", "network_dim-4"]
    assert "save_last_n_epochs ignored; a sweep keeps every saved LoRA" in caplog.text
    assert "variant save_last_n_steps-5: save_last_n_steps ignored" in caplog.text


def test_override_strings_keep_types():
    assert override_strings(
        {"optimizer_args.growth_rate": "inf", "optimizer_args.betas": [0.9, 0.99], "lr_scheduler": "cosine",
         "training_comment": "true", "reg_data_dir": "", "optimizer_args.d_coef": 2}
    ) == [
        "optimizer_args.growth_rate=inf", "optimizer_args.betas=0.9,0.99", 'lr_scheduler="cosine"',
        'training_comment="true"', "reg_data_dir=", "optimizer_args.d_coef=2",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[axes]\nnetwork_dimm = [4]\n", "axis 'network_dimm' is not a setting; did you mean 'network_dim'?"),
        ("[axes]\nnetwork_dim = 4\n", "axes.network_dim: give a list of values, e.g. network_dim = [4, 8], or a table"),
        ("[evaluation]\nseedz = [1]\n", "evaluation.seedz: unknown key; did you mean 'seeds'? (and 1 more problem)"),
        ("[evaluation]\nprompts = { p = { wildcard_file = 'x.txt', cnt = 3 } }\n",
         "evaluation.prompts.p.cnt: unknown key; did you mean 'count'?"),
        ("[evaluation]\nprompts = { p = ['x'] }\ncheckpoints = { a = { pathh = 'x' } }\n",
         "evaluation.checkpoints.a.pathh: unknown key; did you mean 'path'?"),
        ("[evaluation]\nprompts = { p = ['x'] }\ncheckpoints = { a = 3 }\n",
         "checkpoint 'a' must be a path or { path = ..., cfg = ... } (got 3)"),
        ("[scoring]\nface = 'x.onnx'\n", "scoring.face: unknown key; known keys there: clip_model, face_model"),
        ("[evaluation]\nprompts = { p = ['x'] }\nsteps = 'many'\n", "evaluation.steps: Input should be a valid integer"),
        ("[axes]\nnetwork_dim = [0]\n", "variant network_dim-0: network_dim"),
        ("[axes]\nnetwork_dim = { a = 4, A = 8, 'a ' = 16 }\n", "two values labelled 'a'"),
        ("[axes.g]\nx = { network_dimm = 4 }\n", "'network_dimm' is not a setting; did you mean 'network_dim'?"),
        ("[axes]\nnetwork_dim = []\n", "axis 'network_dim' has no values"),
        ('mode = "diagonal"\n', "mode"),
        ("[axes]\noptimizer = ['AdamW']\n", "variant optimizer-AdamW: optimizer_args key 'decouple' is not an argument"),
        ("", "baseline: --set: network_dim"),
        ("[evaluation]\nprompts = { simple = ['a'] }\nwithout_trigger = true\n", "without_trigger needs the trigger"),
    ],
)
def test_bad_sweep_files_fail_with_one_line(tmp_path, text, message):
    path = write_sweep(tmp_path, text, baseline="" if text else "set = { network_dim = -1 }")
    with pytest.raises(SweepError) as caught:
        expand_sweep(read_sweep(path))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not re.search(r"Extra inputs|list\[|dict\[|EvalCheckpoint|RandomPrompts", str(caught.value))


def test_cli_reports_a_bad_sweep_file_as_one_line(tmp_path, capsys):
    path = write_sweep(tmp_path, "[axes]\nrank = [4]\n")
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "'rank' is not a setting" in err


# ---------------------------------------------------------------------------------------------
# Evaluation settings


def test_evaluation_include_random_prompts_and_trigger_removal(tmp_path):
    (tmp_path / "scene.txt").write_text("beach\nforest\n# a comment\ncity street\n")
    (tmp_path / "shared.toml").write_text(
        'seeds = [1, 2]\ncfg = 6.0\ntrigger = "blh"\nwithout_trigger = true\n'
        '[checkpoints]\nds = { path = "ds.safetensors", cfg = 7.0 }\nep = "<path to epiCRealism>"\n'
        "[prompts]\nsimple = ['photo of blh woman']\nrandom = { wildcard_file = 'scene.txt', count = 5 }\n"
    )
    spec = read_sweep(write_sweep(tmp_path, '[evaluation]\ninclude = "shared.toml"\nseeds = [3]\n'))
    with pytest.raises(SweepError, match="evaluation.checkpoints.ds: .*ds.safetensors not found"):
        resolve_evaluation(spec, "base.safetensors")  # found before any run trains
    make_tiny("sd15", "single-file", tmp_path / "ds.safetensors")
    settings = resolve_evaluation(spec, "base.safetensors")
    assert settings.seeds == (3,)  # the sweep file's own key wins
    assert [(c.label, c.path, c.cfg) for c in settings.checkpoints] == [
        ("ds", str(tmp_path / "ds.safetensors"), 7.0), ("ep", "<path to epiCRealism>", 6.0),
    ]  # fmt: skip
    random_prompts = settings.prompt_sets["random"]
    assert len(random_prompts) == 5 and all(p.startswith("blh, ") for p in random_prompts)
    assert {p.removeprefix("blh, ") for p in random_prompts} <= {"beach", "forest", "city street"}
    assert resolve_evaluation(spec, None).prompt_sets == settings.prompt_sets  # drawn the same every time
    assert settings.trigger_modes == (True, False)
    assert settings.images_per_save_point() == 2 * 6 * 1 * 1 * 2


def test_evaluation_checkpoints_that_cannot_render_the_loras_are_refused_before_training(tmp_path):
    base = make_tiny("sd15", "single-file", tmp_path / "base.safetensors")
    make_tiny("sdxl", "single-file", tmp_path / "xl.safetensors")
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}, tmp_path / "a_lora.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    cases = {
        "xl.safetensors": "is an SDXL checkpoint, but the runs train SD1.x LoRAs, which only load on SD1.x checkpoints",
        "a_lora.safetensors": "is a LoRA file, not a model checkpoint",
        "cut.safetensors": "cut.safetensors",
    }
    for name, message in cases.items():
        spec = read_sweep(write_sweep(tmp_path, f'[evaluation]\ncheckpoints = {{ other = "{name}" }}\nprompts = {{ p = ["x"] }}\n'))
        with pytest.raises(SweepError, match="evaluation.checkpoints.other: ") as caught:
            resolve_evaluation(spec, str(base))
        assert message in str(caught.value) and "\n" not in str(caught.value)
    # The same family is fine, and without a readable base checkpoint only the file itself is checked.
    spec = read_sweep(write_sweep(tmp_path, '[evaluation]\ncheckpoints = { other = "xl.safetensors" }\nprompts = { p = ["x"] }\n'))
    assert resolve_evaluation(spec, str(tmp_path / "xl.safetensors")).checkpoints[0].label == "other"
    assert resolve_evaluation(spec, "<path to your base checkpoint>").checkpoints[0].label == "other"


def test_an_empty_wildcard_list_is_named_where_the_user_keeps_it(tmp_path):
    (tmp_path / "scene.txt").write_text("# to fill in\n")
    spec = read_sweep(write_sweep(tmp_path, "[evaluation]\nprompts = { random = { wildcard_file = 'scene.txt', count = 2 } }\n"))
    with pytest.raises(SweepError, match="evaluation.prompts.random: wildcard file .*has no line to choose") as caught:
        resolve_evaluation(spec, "base.safetensors")
    assert str(tmp_path / "scene.txt") in str(caught.value)


def test_an_unknown_evaluation_sampler_is_refused_before_training(tmp_path):
    spec = read_sweep(write_sweep(tmp_path, '[evaluation]\nsampler = "Eular a"\n[evaluation.prompts]\np = ["x"]\n'))
    with pytest.raises(SweepError, match="evaluation.sampler: unknown sampler 'Eular a'"):
        resolve_evaluation(spec, "base.safetensors")


def test_remove_trigger():
    assert remove_trigger("photo of blh woman", "blh") == "photo of woman"
    assert remove_trigger("masterpiece, (blh woman:1.2), beach", "blh") == "masterpiece, (woman:1.2), beach"
    assert remove_trigger("blh, beach", "blh") == "beach"
    assert remove_trigger("blhx woman", "blh") == "blhx woman"


# ---------------------------------------------------------------------------------------------
# The guide's comparisons


def seed_runs() -> list[dict]:
    return json.loads((SEED / "runs.json").read_text())


def effective_optimizer_args(config) -> dict:
    """What the optimizer is built with: its signature's defaults, then the config's arguments."""
    parameters = inspect.signature(optimizer_class(config.optimizer_type)).parameters
    values = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    values.update(optimizer_kwargs(config.optimizer_type, config.optimizer_args))
    return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items() if key != "lr"}


def training_values(config, *, without: tuple[str, ...] = ()) -> dict:
    """The settings that decide what a run trains. A 0 where the setting is unset by default means
    off, as unset does ("0/unset: off"; later kohya_ss GUI versions write v_pred_like_loss = 0)."""
    values = {key: value for key, value in config.model_dump().items() if key not in PATH_KEYS and key not in without}
    for key, value in values.items():
        if value == 0 and not isinstance(value, bool) and type(config).model_fields[key].default is None:
            values[key] = None
    values["optimizer_args"] = effective_optimizer_args(config)
    return values


@pytest.fixture(scope="module")
def seed_configs(tmp_path_factory):
    """Every seed run's config, loaded as loralab loads a kohya_ss GUI file."""
    folder = tmp_path_factory.mktemp("seed")
    configs = []
    for index, run in enumerate(seed_runs()):
        path = folder / f"{index}.json"
        path.write_text(json.dumps(run["config"]))
        configs.append((run, load_config(path)))
    return configs


def test_the_guide_has_21_comparisons_with_the_seed_baseline():
    assert len(GUIDE_FILES) == 21
    assert (GUIDE / "config_SD1.5.json").read_bytes() == (SEED / "config_SD1.5.json").read_bytes()
    assert (GUIDE / "scene.txt").read_bytes() == (SEED / "scene.txt").read_bytes()
    names = [read_sweep(path).title for path in GUIDE_FILES]
    assert names[0] == "Growth Rate" and names[-1] == "Optimizer"
    assert {run["topic"] for run in seed_runs()} <= set(names)


@pytest.mark.parametrize("path", GUIDE_FILES, ids=[p.stem for p in GUIDE_FILES])
def test_guide_sweep_passes_dry_run(path, tmp_path, capsys):
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "fill in before training:" in out and "<path to DreamShaper checkpoint>" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


@pytest.mark.parametrize("path", GUIDE_FILES, ids=[p.stem for p in GUIDE_FILES])
def test_guide_variants_equal_the_guide_runs(path, seed_configs):
    spec = read_sweep(path)
    expansion = expand_sweep(spec)
    runs = expansion.runs
    assert {entry["comparison"] for entry in expansion.to_json()} == {spec.title}
    assert resolve_evaluation(spec, None).images_per_save_point() > 0
    if spec.title in NOT_IN_SEED:
        # No seed run to compare with: each variant changes the baseline in its one setting only.
        baseline = training_values(expansion.baseline)
        for run in runs:
            changed = {k for k, v in training_values(run.config).items() if baseline[k] != v}
            assert changed <= {NOT_IN_SEED[spec.title], "seed"}
            assert bool(changed) != run.is_baseline or run.seed_repeat == 2
        return

    topic = SEED_TOPIC.get(spec.title, spec.title)
    assert matched_seed_runs(expansion, [(seed, c) for seed, c in seed_configs if seed["topic"] == topic])


def matched_seed_runs(expansion, candidates) -> set[str]:
    """The seed runs the expansion's runs equal; fails on a run that equals none of them.

    A seed repeat of the baseline equals the guide's second baseline run but for its seed (the
    guide repeated its baseline with the same seed; loralab's runs are deterministic, so the
    repeat takes the next seed to show the noise floor).
    """
    matched = set()
    for run in expansion.runs:
        repeat = run.seed_repeat is not None and run.seed_repeat > 1
        if repeat:
            assert run.config.seed == expansion.baseline.seed + run.seed_repeat - 1
        without = ("seed",) if repeat else ()
        ours = training_values(run.config, without=without)
        matches = [seed for seed, config in candidates if training_values(config, without=without) == ours]
        assert matches, f"{expansion.spec.title}: run {run.name} matches none of the guide's runs"
        for seed in matches:
            check_dataset(run, seed)
            matched.add(seed["run"])
    return matched


def test_every_guide_run_is_in_a_guide_sweep(seed_configs):
    """Together, the sweep files hold every run of every comparison of the seed data."""
    matched: dict[str, set[str]] = {}
    for path in GUIDE_FILES:
        expansion = expand_sweep(read_sweep(path))
        if expansion.spec.title in NOT_IN_SEED:
            continue
        topic = SEED_TOPIC.get(expansion.spec.title, expansion.spec.title)
        candidates = [(seed, c) for seed, c in seed_configs if seed["topic"] == topic]
        matched.setdefault(topic, set()).update(matched_seed_runs(expansion, candidates))
    expected: dict[str, set[str]] = {}
    for seed in seed_runs():
        expected.setdefault(seed["topic"], set()).add(seed["run"])
    assert matched == expected


def check_dataset(run, seed) -> None:
    """The run trains on the seed run's dataset: its folder (repeats) and regularisation folder."""
    dataset = seed["dataset"]
    train_dir, reg_dir = str(run.config.train_data_dir), run.config.reg_data_dir
    same_as_baseline = dataset["train_folder"] == "1_blh woman" and dataset["image_size"].startswith("square")
    if same_as_baseline:
        assert train_dir == GUIDE_BASELINE_DATA
    else:
        assert train_dir != GUIDE_BASELINE_DATA and dataset["train_folder"] in train_dir
    if dataset["reg_folder"]:
        assert reg_dir is not None and dataset["reg_folder"] in str(reg_dir)
    else:
        assert reg_dir is None


def test_guide_sweep_file_needs_only_paths_filled_in(tmp_path):
    """The guide's evaluation block parses as a whole and its random prompts come from scene.txt."""
    settings = resolve_evaluation(read_sweep(GUIDE / "10-network-rank.toml"), None)
    scenes = set((GUIDE / "scene.txt").read_text().splitlines())
    assert len(settings.prompt_sets["random"]) == 8
    assert all(prompt.rsplit("upper body, ", 1)[1] in scenes for prompt in settings.prompt_sets["random"])
    assert {c.label for c in settings.checkpoints} == {"dreamshaper", "epicrealism"}
    assert parse_sweep((GUIDE / "10-network-rank.toml").read_text(), GUIDE / "x.toml").mode == "grid"
