"""Config: schema, native TOML, kohya_ss GUI / sd-scripts import, overrides, `loralab config`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loralab.cli.main import main
from loralab.config import TrainConfig, apply_overrides, load_config, read_config, save_config
from loralab.config.kohya_gui import GUI_IGNORED, KNOWN_GUI_KEYS
from loralab.config.loading import config_to_toml
from loralab.config.optimizer_args import format_optimizer_args, parse_optimizer_args
from loralab.errors import ConfigError
from loralab.train.optimizers import (
    OptimizerPackageMissing,
    optimizer_class,
    optimizer_kwargs,
    resolve_optimizer,
    validate_optimizer_args,
)

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "tests" / "data" / "seed"
SEED_CONFIGS = sorted(SEED.glob("config_*.json"))
RUNS = json.loads((SEED / "runs.json").read_text())


def gui_config(**changes: object) -> dict:
    """The seed's SD1.5 GUI config with some keys changed (None removes a key)."""
    data = json.loads((SEED / "config_SD1.5.json").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def write_json(tmp_path: Path, data: dict, name: str = "gui.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def write_toml(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- kohya_ss GUI import ----------------------------------------------------------------------


def test_seed_files_are_present() -> None:
    assert len(SEED_CONFIGS) == 3 and len(RUNS) > 100


@pytest.mark.parametrize("path", SEED_CONFIGS, ids=lambda p: p.stem)
def test_seed_gui_configs_load(path: Path) -> None:
    loaded = read_config(path)
    config = loaded.config
    data = json.loads(path.read_text())
    assert loaded.source_format == "kohya_gui"
    assert config.optimizer_type == "DAdaptAdam"
    assert config.optimizer_args == parse_optimizer_args(data["optimizer_args"])
    assert config.optimizer_args["decouple"] is True
    assert config.max_train_epochs == data["epoch"] and config.max_train_steps is None
    assert config.steps_formula == "kohya_gui"
    assert config.seed == 1234 and config.max_data_loader_n_workers == 0
    size = int(data["max_resolution"].split(",")[0])
    assert config.resolution == (size, size)
    assert config.xformers and not config.sdpa
    assert config.conv_dim is None  # LoRA_type Standard
    assert config.pretrained_model_name_or_path == data["pretrained_model_name_or_path"]  # placeholder kept
    assert config.train_data_dir == Path("<path to img dir>")
    assert config.clip_skip == 2 and config.min_snr_gamma == 5
    assert config.learning_rate == config.unet_lr == config.text_encoder_lr == 1.0
    assert {item.key for item in loaded.ignored} >= {"model_list", "save_model_as", "use_wandb"}


def test_sdxl_gui_config_specifics() -> None:
    config = load_config(SEED / "config_SDXL.json")
    assert config.sdxl and config.full_bf16 and config.mixed_precision == "bf16"
    assert config.network_train_unet_only  # from additional_parameters "--network_train_unet_only"
    assert config.cache_text_encoder_outputs and config.no_half_vae
    assert config.noise_offset == pytest.approx(0.0357)
    assert config.reg_data_dir == Path("<path to regularisation images>")
    assert config.sample_prompts and "--w 1024" in config.sample_prompts[0]


def test_sdxl_only_options_are_ignored_for_sd15() -> None:
    loaded = read_config(SEED / "config_SD1.5.json")
    assert not loaded.config.no_half_vae
    assert "sdxl_no_half_vae" in {item.key for item in loaded.ignored}


def test_every_seed_key_is_mapped_or_ignored() -> None:
    keys = {key for path in SEED_CONFIGS for key in json.loads(path.read_text())}
    keys |= {key for run in RUNS for key in run["config"]}
    assert keys <= KNOWN_GUI_KEYS, sorted(keys - KNOWN_GUI_KEYS)


def test_ignored_gui_keys_are_documented() -> None:
    doc = (ROOT / "docs" / "config.md").read_text()
    missing = [key for key in GUI_IGNORED if f"`{key}`" not in doc]
    assert not missing


def test_every_run_config_loads_and_round_trips(tmp_path: Path) -> None:
    for index, run in enumerate(RUNS):
        source = write_json(tmp_path, run["config"], f"run{index}.json")
        config = load_config(source)
        assert config.max_train_epochs == run["config"]["epoch"], run["run"]
        assert config.optimizer_type == run["config"]["optimizer"], run["run"]
        assert config.network_dim == run["config"]["network_dim"], run["run"]
        assert config.mixed_precision == run["config"]["mixed_precision"], run["run"]
        target = tmp_path / f"run{index}.toml"
        save_config(config, target)
        assert load_config(target) == config, run["run"]


def test_gui_quirks(tmp_path: Path) -> None:
    config = load_config(
        write_json(
            tmp_path,
            gui_config(
                LoRA_type="Kohya LoCon",
                conv_dim=8,
                conv_alpha=4,
                text_encoder_lr="",
                unet_lr="0.5",
                lr_warmup=10,
                lr_scheduler_num_cycles="",
                xformers="sdpa",
                max_token_length="150",
                noise_offset_type="Multires",
                multires_noise_iterations=6,
                multires_noise_discount=0.3,
                noise_offset=0.1,
                sample_prompts="a photo of blh woman\n\n# comment\nblh woman, beach",
            ),
        )
    )
    assert (config.conv_dim, config.conv_alpha) == (8, 4.0)
    assert config.unet_lr == 0.5 and config.text_encoder_lr is None and config.network_train_unet_only
    assert config.lr_warmup_steps == pytest.approx(0.1) and isinstance(config.lr_warmup_steps, float)
    assert config.lr_scheduler_num_cycles == 1  # "" = unset
    assert config.sdpa and not config.xformers
    assert config.max_token_length == 150
    assert config.multires_noise_iterations == 6 and config.noise_offset is None
    assert config.sample_prompts == ["a photo of blh woman", "blh woman, beach"]


def test_gui_warmup_with_constant_scheduler_is_reported(tmp_path: Path) -> None:
    loaded = read_config(write_json(tmp_path, gui_config(lr_scheduler="constant", lr_warmup=5)))
    assert loaded.config.lr_warmup_steps == 0
    assert "lr_warmup" in {item.key for item in loaded.ignored}


def test_gui_max_train_steps_and_epochs_boxes(tmp_path: Path) -> None:
    steps = load_config(write_json(tmp_path, gui_config(max_train_steps="500"), "a.json"))
    assert (steps.max_train_steps, steps.max_train_epochs, steps.steps_formula) == (500, None, "kohya_gui")
    epochs = load_config(write_json(tmp_path, gui_config(max_train_epochs="7"), "b.json"))
    assert (epochs.max_train_epochs, epochs.steps_formula) == (7, "sd-scripts")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"leraning_rate": 1.0}, "did you mean 'learning_rate'"),
        ({"LoRA_type": "LyCORIS/LoHa"}, "LoRA_type 'LyCORIS/LoHa' is not supported"),
        ({"down_lr_weight": "1,1,1"}, "block-wise"),
        ({"optimizer_args": "decouple=True betas0.9,0.99"}, "'betas0.9,0.99'"),
        ({"optimizer_args": "decouple=True growth_rat=1.02"}, "did you mean 'growth_rate'"),
        ({"additional_parameters": "--network_train_unet_onyl"}, "did you mean 'network_train_unet_only'"),
        ({"xformers": "flash"}, "xformers 'flash'"),
    ],
)
def test_gui_errors(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="^.*" + message.replace("(", r"\(")):
        load_config(write_json(tmp_path, gui_config(**changes)))


# --- zero is a value ----------------------------------------------------------------------------


def test_zero_values_are_kept(tmp_path: Path) -> None:
    config = load_config(write_json(tmp_path, gui_config()))
    # sd-scripts' defaults are None (noise offset, min-SNR, dropouts) or 8 (workers); 0 must stay 0.
    assert config.noise_offset == 0 and config.noise_offset is not None
    assert config.adaptive_noise_scale == 0 and config.min_timestep == 0
    assert config.scale_weight_norms == 0 and config.network_dropout == 0
    assert config.max_data_loader_n_workers == 0 and config.lr_warmup_steps == 0
    assert config.sample_every_n_steps == 0 and config.save_every_n_steps == 0

    native = load_config(write_toml(tmp_path, "noise_offset = 0\nmin_snr_gamma = 0\nmax_data_loader_n_workers = 0\n"))
    assert (native.noise_offset, native.min_snr_gamma, native.max_data_loader_n_workers) == (0, 0, 0)
    save_config(native, tmp_path / "again.toml")
    again = load_config(tmp_path / "again.toml")
    assert again.noise_offset == 0 and again.min_snr_gamma == 0
    assert TrainConfig().noise_offset is None and TrainConfig().max_data_loader_n_workers == 8


# --- native TOML, round trips ---------------------------------------------------------------------


def test_native_toml_with_sections_and_optimizer_table(tmp_path: Path) -> None:
    text = """
optimizer_type = "prodigy"
optimizer_args.growth_rate = inf
optimizer_args.betas = [0.9, 0.99]

[dataset]
resolution = 768
enable_bucket = true
"""
    loaded = read_config(write_toml(tmp_path, text))
    config = loaded.config
    assert config.optimizer_type == "Prodigy"  # canonical spelling
    assert config.optimizer_args == {"growth_rate": math.inf, "betas": (0.9, 0.99)}
    assert config.resolution == (768, 768) and config.enable_bucket
    assert loaded.source_format == "sd-scripts"  # sections are sd-scripts' grouping


def test_save_load_round_trip_of_unusual_values(tmp_path: Path) -> None:
    config = TrainConfig(
        optimizer_type="DAdaptAdam",
        optimizer_args={"growth_rate": math.inf, "betas": (0.9, 0.99), "d0": 1e-6, "decouple": True},
        resolution=(768, 512),
        lr_scheduler="cosine_with_restarts",
        lr_warmup_steps=0.05,
        sample_prompts=["one, two --w 512", 'with "quotes"'],
        network_weights=Path("some dir/start.safetensors"),
        training_comment="a=b c",
        max_train_steps=1234,
    )
    path = tmp_path / "nested" / "run.toml"
    save_config(config, path)
    assert load_config(path) == config
    assert [p.name for p in path.parent.iterdir()] == ["run.toml"]  # no temporary file left behind
    assert config_to_toml(load_config(path)) == path.read_text()
    assert load_config(write_toml(tmp_path, 'sample_prompts = "prompts.txt"\n')).sample_prompts == Path("prompts.txt")


def test_unknown_native_key_has_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'netwrok_dim'; did you mean 'network_dim'\?"):
        load_config(write_toml(tmp_path, "netwrok_dim = 8\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("resolution = 720\nenable_bucket = true\n", "not divisible by bucket_reso_steps 64"),
        ('mixed_precision = "bf16"\nfull_fp16 = true\n', "full_fp16 needs mixed_precision=fp16"),
        ("sdxl = true\nv2 = true\n", "sdxl and v2"),
        ("adaptive_noise_scale = 0.01\n", "adaptive_noise_scale needs noise_offset"),
        ("cache_latents = true\ncolor_aug = true\n", "cached latents"),
        ("cache_text_encoder_outputs = true\n", "network_train_unet_only"),
        ("network_train_unet_only = true\nnetwork_train_text_encoder_only = true\n", "nothing would train"),
        ("conv_alpha = 4\n", "conv_alpha is set without conv_dim"),
        ('caption_extension = "txt"\n', "must start with a dot"),
        ("lr_warmup_steps = 2.5\n", "lr_warmup_steps 2.5"),
        ('lr_scheduler = "cosin"\n', "did you mean 'cosine'"),
        ('optimizer_type = "DAdaptAdamm"\n', "did you mean 'DAdaptAdam'"),
        ('optimizer_type = "AdamW"\noptimizer_args = "lr=1"\n', "set learning_rate"),
        ('optimizer_type = "SGDNesterov"\noptimizer_args = "nesterov=False"\n', "always uses nesterov=True"),
        ("train_batch_size = 0\n", "train_batch_size"),
    ],
)
def test_invalid_combinations_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write_toml(tmp_path, text))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_resolution_divisible_without_buckets_is_fine(tmp_path: Path) -> None:
    assert load_config(write_toml(tmp_path, "resolution = 720\n")).resolution == (720, 720)


def test_v_parameterization_with_sdxl_is_allowed() -> None:
    assert TrainConfig(sdxl=True, v_parameterization=True).v_parameterization


# --- sd-scripts TOML --------------------------------------------------------------------------


def test_sd_scripts_toml_import(tmp_path: Path) -> None:
    text = """
[model_arguments]
pretrained_model_name_or_path = "model.safetensors"
[training_arguments]
resolution = "512,512"
save_model_as = "safetensors"
log_with = "tensorboard"
loss_type = "l2"
caption_extention = ".txt"
[optimizer_arguments]
optimizer_type = "Prodigy"
optimizer_args = ["decouple=True", "weight_decay=0.5", "betas=0.9,0.99", "d_coef=2"]
lr_warmup_steps = "5%"
[network_arguments]
network_module = "networks.lora"
network_args = ["conv_dim=4", "conv_alpha=1"]
network_dim = 32
"""
    loaded = read_config(write_toml(tmp_path, text))
    config = loaded.config
    assert loaded.source_format == "sd-scripts"
    assert config.optimizer_args == {"decouple": True, "weight_decay": 0.5, "betas": (0.9, 0.99), "d_coef": 2}
    assert (config.conv_dim, config.conv_alpha) == (4, 1.0)
    assert config.caption_extension == ".txt" and config.lr_warmup_steps == pytest.approx(0.05)
    assert {item.key for item in loaded.ignored} == {"save_model_as", "log_with"}


def test_keep_last_n_saves_are_read_from_gui_and_sd_scripts_configs(tmp_path: Path) -> None:
    gui = read_config(write_json(tmp_path, gui_config(save_last_n_steps=300, save_last_n_steps_state=2)))
    assert gui.config.save_last_n_steps == 300 and gui.config.save_last_n_epochs is None
    assert "save_last_n_steps_state" in {item.key for item in gui.ignored}
    assert read_config(SEED / "config_SD1.5.json").config.save_last_n_steps == 0  # the GUI's 0: keep all
    text = "save_every_n_epochs = 2\nsave_last_n_epochs = 3\nsave_last_n_epochs_state = 1\nlog_with = 'tensorboard'\n"
    loaded = read_config(write_toml(tmp_path, text))
    assert loaded.source_format == "sd-scripts"
    assert (loaded.config.save_last_n_epochs, loaded.config.save_last_n_steps) == (3, None)
    assert {item.key for item in loaded.ignored} == {"save_last_n_epochs_state", "log_with"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('network_module = "lycoris.kohya"\n', "network_module 'lycoris.kohya' is not supported"),
        ('network_args = ["algo=loha"]\n', "network_args 'algo' is not supported"),
        ('loss_type = "huber"\n', "loss_type = 'huber' is not supported"),
        ("[a]\nseed = 1\n[b]\nseed = 2\n", "'seed' is set twice"),
    ],
)
def test_sd_scripts_toml_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write_toml(tmp_path, text))


# --- overrides ----------------------------------------------------------------------------------


def test_overrides_use_the_file_names_and_checks() -> None:
    base = SEED / "config_SD1.5.json"
    config = load_config(
        base,
        [
            "optimizer_args.growth_rate=1.06",
            "optimizer_args.betas=0.9,0.999",
            "optimizer_args.use_bias_correction=",
            "lr_scheduler=cosine_with_restarts",
            "resolution=512,768",
            "network_dim=64",
            "noise_offset=",
        ],
    )
    assert config.optimizer_args == {"decouple": True, "weight_decay": 0.6, "betas": (0.9, 0.999), "growth_rate": 1.06}
    assert config.lr_scheduler == "cosine_with_restarts" and config.resolution == (512, 768)
    assert config.network_dim == 64 and config.noise_offset is None and config.adaptive_noise_scale == 0
    assert apply_overrides(load_config(base), ["optimizer_args.growth_rate=1.06"]).optimizer_args["growth_rate"] == 1.06


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("leraning_rate=1", r"--set: unknown config key 'leraning_rate'; did you mean 'learning_rate'\?"),
        ("train_batch_size=abc", "--set: train_batch_size"),
        ("optimizer_args.growth_rat=1.1", "did you mean 'growth_rate'"),
        ("optimizer_args=betas0.9", "'betas0.9'"),
        ("resolution=700", "not divisible"),
        ("resolution=0", r"with --set resolution: resolution 0x0 must be positive"),
        ("no_equals_sign", "not key=value"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(SEED / "config_SD1.5.json", [override])


# --- optimizer_args syntax ------------------------------------------------------------------------


def test_optimizer_args_syntax() -> None:
    parsed = parse_optimizer_args(
        "decouple=True weight_decay=0.6 betas=0.9,0.99 growth_rate=inf d0=1e-6 one=0.5, flag=false "
        "name=adam quoted=\"'True'\" shell_quoted='True' beta3=None pair=(1,2)"
    )
    assert parsed == {
        "decouple": True,
        "weight_decay": 0.6,
        "betas": (0.9, 0.99),
        "growth_rate": math.inf,
        "d0": 1e-6,
        "one": (0.5,),
        "flag": False,
        "name": "adam",
        "quoted": "True",
        "shell_quoted": True,  # the shell strips these quotes, as when the GUI runs sd-scripts
        "beta3": None,
        "pair": (1, 2),
    }
    assert parse_optimizer_args(format_optimizer_args(parsed)) == parsed
    assert parse_optimizer_args(["betas=0.9,0.99", "eps=1e-8"]) == {"betas": (0.9, 0.99), "eps": 1e-8}
    # A TOML table keeps its types; its strings read as --set and sweep axes read them.
    table = {"betas": "0.9,0.99", "decouple": "True", "d0": 1e-6, "pair": [1, 2], "note": "two words"}
    assert parse_optimizer_args(table) == {
        "betas": (0.9, 0.99), "decouple": True, "d0": 1e-6, "pair": (1, 2), "note": "two words",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("betas0.9", "betas0.9"),
        ("decouple=True =1", "=1"),
        ("weight_decay=0.6.1", "weight_decay=0.6.1"),
        ("betas=0.9,,0.99", "betas=0.9,,0.99"),
        ("decay=", "decay="),
    ],
)
def test_malformed_optimizer_args_name_the_token(text: str, token: str) -> None:
    with pytest.raises(ConfigError, match=f"token '{token}'"):
        parse_optimizer_args(text)


# --- optimizer names ------------------------------------------------------------------------------


def test_optimizer_names_resolve_lazily() -> None:
    import dadaptation
    import prodigyopt
    import torch

    assert optimizer_class("dadaptadam") is dadaptation.DAdaptAdam
    assert optimizer_class("Prodigy") is prodigyopt.Prodigy
    assert optimizer_class("DAdaptation") is dadaptation.experimental.DAdaptAdamPreprint
    assert optimizer_class("RAdam") is torch.optim.RAdam
    assert optimizer_class("torch.optim.Adagrad") is torch.optim.Adagrad
    assert optimizer_kwargs("SGDNesterov", {}) == {"momentum": 0.9, "nesterov": True}
    assert resolve_optimizer("adamw8bit").name == "AdamW8bit"  # resolving imports nothing
    validate_optimizer_args("DAdaptLion", {"betas": (0.9, 0.99), "weight_decay": 0.1})
    with pytest.raises(ConfigError, match="not an argument of DAdaptLion"):
        validate_optimizer_args("DAdaptLion", {"decouple": True})


def test_missing_optional_package_is_a_clear_error_only_when_used() -> None:
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(OptimizerPackageMissing, match="pip install bitsandbytes"):
        optimizer_class("AdamW8bit")
    # Planning or converting such a config does not need the package.
    config = TrainConfig(optimizer_type="AdamW8bit", optimizer_args="weight_decay=0.1")
    assert config.optimizer_args == {"weight_decay": 0.1}


# --- `loralab config` -----------------------------------------------------------------------------


def test_cli_convert_writes_native_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "sd15.toml"
    assert main(["config", "convert", str(SEED / "config_SD1.5.json"), str(target)]) == 0
    out, err = capsys.readouterr()
    assert "wrote" in out and "model_list" in err
    assert load_config(target) == load_config(SEED / "config_SD1.5.json")
    assert read_config(target).source_format == "native"

    assert main(["config", "show", str(target), "--set", "optimizer_args.growth_rate=1.06"]) == 0
    out, _ = capsys.readouterr()
    expected = "decouple=True weight_decay=0.6 betas=0.9,0.99 use_bias_correction=True growth_rate=1.06"
    assert f'optimizer_args = "{expected}"' in out


def _failing_cli_args(case: str, folder: Path) -> list[str]:
    seed, out = str(SEED / "config_SD1.5.json"), str(folder / "o.toml")
    if case == "missing input":
        return ["config", "convert", str(folder / "missing.json"), out]
    if case == "unknown key":
        return ["config", "convert", str(write_json(folder, gui_config(leraning_rate=1))), out]
    if case == "malformed optimizer_args":
        return ["config", "convert", str(write_json(folder, gui_config(optimizer_args="betas0.9"))), out]
    if case == "missing input without suffix":
        return ["config", "convert", str(folder / "my_config"), out]
    if case == "folder as input":
        (folder / "configs").mkdir()
        return ["config", "convert", str(folder / "configs"), out]
    if case == "output is a folder":
        (folder / "out.toml").mkdir()
        return ["config", "convert", seed, str(folder / "out.toml"), "--force"]
    if case == "output under a file":
        (folder / "a_file").write_text("x")
        return ["config", "convert", str(write_json(folder, gui_config())), str(folder / "a_file" / "o.toml")]
    if case == "output not toml":
        return ["config", "convert", seed, str(folder / "o.json")]
    return ["config", "show", seed, "--set", "resolution=700"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing input", "not found"),
        ("missing input without suffix", "my_config not found"),
        ("folder as input", "configs is a folder"),
        ("unknown key", "did you mean 'learning_rate'"),
        ("malformed optimizer_args", "'betas0.9'"),
        ("output not toml", "must be a .toml"),
        ("output is a folder", "is a folder; give a .toml file name"),
        ("output under a file", "cannot write"),
        ("bad override", "divisible"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str) -> None:
    assert main(_failing_cli_args(case, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "o.toml").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train"], "error: loralab train: the following arguments are required: config; see loralab train --help"),
        (["cache", "data", "--vae-batch-size", "x"], "argument --vae-batch-size: invalid int value: 'x'"),
        (["trian"], "invalid choice: 'trian'"),
        (["plan", "c.toml", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_cli_convert_keeps_existing_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out.toml"
    target.write_text("# mine\n")
    assert main(["config", "convert", str(SEED / "config_SD1.5.json"), str(target)]) == 2
    assert target.read_text() == "# mine\n" and "--force" in capsys.readouterr().err
    assert main(["config", "convert", str(SEED / "config_SD1.5.json"), str(target), "--force"]) == 0
    assert load_config(target).network_dim == 192
