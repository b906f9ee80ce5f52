"""``loralab lora`` tools on tiny models: resize, extract, merge, convert, inspect, bad input.

The references are independent of the code under test: exact SVDs from ``torch.linalg.svd``,
singular-value spectra built by hand, LoRA deltas from ``lora_delta_weight``, and diffusers' own
``load_lora_weights`` as the judge of the PEFT files we write.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loralab.cli.lora_cmd import parse_lora_weight
from loralab.cli.main import main
from loralab.errors import LoraFileError
from loralab.models.loading import load_checkpoint
from loralab.models.tiny import build_tiny_components, make_tiny
from loralab.network.extract import extract_lora, factor_delta
from loralab.network.lora import LoRANetwork, NetworkSpec, lora_delta_weight
from loralab.network.lora_file import build_lora_metadata, read_lora_file, safetensors_hashes, save_lora_file
from loralab.network.resize import RankRule, dynamic_rank, resize_module
from loralab.network.targets import find_lora_target_details

FAMILIES = {"sd15": "sd1", "sdxl": "sdxl"}
TRAINING_FIELDS = {"ss_output_name": "blh", "ss_steps": 1100, "ss_learning_rate": 1.0, "ss_clip_skip": 1}


# ---------------------------------------------------------------------------------------------
# helpers


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_random_lora(
    components, path: Path, *, rank=8, alpha=4.0, conv_rank=4, conv_alpha=2.0, std=0.2, seed=1
) -> Path:
    """A LoRA for ``components`` with non-trivial random down and up weights, saved in fp32."""
    spec = NetworkSpec(rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha)
    network = LoRANetwork.create(components, spec)
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        key: torch.randn(value.shape, generator=generator) * std if key.endswith(".weight") else value
        for key, value in network.state_dict().items()
    }
    metadata = build_lora_metadata(
        family=components.family, network=spec, title=path.stem, extra_fields=TRAINING_FIELDS
    )
    return save_lora_file(path, tensors, metadata, torch.float32)


def module_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Kohya name -> the module's weight delta ``alpha/rank * up @ down`` as a 2-d matrix."""
    return {
        name: lora_delta_weight(down, up, alpha / down.shape[0]).reshape(up.shape[0], -1)
        for name, (down, up, alpha) in read_lora_file(path).modules().items()
    }


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora_tools")


@pytest.fixture(scope="module")
def tiny_checkpoints(workdir: Path) -> dict[str, Path]:
    return {name: make_tiny(name, "single-file", workdir / f"{name}.safetensors") for name in FAMILIES}


@pytest.fixture(scope="module")
def tiny_loras(workdir: Path) -> dict[str, Path]:
    """A rank-8 (conv 4) LoRA per family, alpha != rank, for the seed-0 tiny model."""
    return {
        name: write_random_lora(build_tiny_components(name), workdir / f"{name}_lora.safetensors")
        for name in FAMILIES
    }


# ---------------------------------------------------------------------------------------------
# resize

SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5]


@pytest.mark.parametrize(
    ("method", "param", "expected"),
    [
        # sv_ratio R keeps every S > S[0]/R.
        ("sv_ratio", 3.0, 2),  # > 2.67: 8, 4
        ("sv_ratio", 10.0, 4),  # > 0.8: 8, 4, 2, 1
        ("sv_ratio", 100.0, 5),
        # sv_cumulative T: smallest k with sum(S[:k])/sum(S) >= T; fractions .516 .774 .903 .968 1.
        ("sv_cumulative", 0.5, 1),
        ("sv_cumulative", 0.9, 3),
        ("sv_cumulative", 0.97, 5),
        # sv_fro T: smallest k with sqrt(sum(S[:k]^2)/sum(S^2)) >= T; fractions .866 .969 .993 .9985 1.
        ("sv_fro", 0.9, 2),
        ("sv_fro", 0.99, 3),
        ("sv_fro", 0.999, 5),
    ],
)
def test_dynamic_rank_follows_the_sd_scripts_definitions(method: str, param: float, expected: int) -> None:
    assert dynamic_rank(torch.tensor(SPECTRUM), method, param) == expected
    # The same through a module whose delta has exactly this spectrum (scale 2/5 only rescales it).
    generator = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(24, 5, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(40, 5, generator=generator))
    up, down = left * torch.tensor(SPECTRUM), right.T
    resized = resize_module(down, up, 2.0, RankRule(method=method, param=param))
    assert resized.new_rank == expected
    assert resized.alpha == pytest.approx(2.0 / 5 * expected)  # the module's alpha/rank scale is kept


def test_dynamic_rank_is_capped_and_zero_deltas_keep_rank_one() -> None:
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(6, 20, generator=generator), torch.randn(10, 6, generator=generator)
    assert resize_module(down, up, 6.0, RankRule(rank=3, method="sv_ratio", param=1e6)).new_rank == 3
    assert resize_module(down, up, 6.0, RankRule(rank=16)).new_rank == 6  # never grows
    assert resize_module(down, torch.zeros(10, 6), 6.0, RankRule(rank=4)).new_rank == 1


def test_resize_to_fixed_rank_is_the_truncated_svd(capsys, workdir: Path, tiny_loras: dict[str, Path]) -> None:
    source = tiny_loras["sd15"]
    target = workdir / "sd15_r4.safetensors"
    code, out, err = run_cli(capsys, "lora", "resize", source, "--rank", "4", "--conv-rank", "2", "--out", target)
    assert code == 0, err
    assert target.stat().st_size < source.stat().st_size

    original, resized = module_deltas(source), module_deltas(target)
    assert set(resized) == set(original)
    modules = read_lora_file(target).modules()
    for name, delta in original.items():
        is_conv3x3 = modules[name].down.dim() == 4 and modules[name].down.shape[-1] == 3
        rank = 2 if is_conv3x3 else 4
        assert modules[name].down.shape[0] == rank, name
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert relative_error(resized[name].double(), best) < 1e-4, name
        # ... so what is lost is exactly the tail of the spectrum (Eckart-Young).
        lost = float((delta.double() - resized[name].double()).norm())
        assert lost == pytest.approx(float(s[rank:].norm()), rel=1e-4, abs=1e-7), name

    lora = read_lora_file(target)
    assert lora.metadata["ss_network_dim"] == "4"
    assert lora.metadata["ss_network_alpha"] == "2.0"  # alpha 4 at rank 8: same scale 0.5 at rank 4
    args = json.loads(lora.metadata["ss_network_args"])
    assert (args["conv_dim"], args["conv_alpha"]) == ("2", "1.0")
    assert json.loads(lora.metadata["loralab_resize"])["from_rank"] == 8
    assert (lora.metadata["sshs_model_hash"], lora.metadata["sshs_legacy_hash"]) == safetensors_hashes(
        lora.tensors, lora.metadata
    )


def test_resize_dynamic_picks_ranks_per_module(capsys, workdir: Path) -> None:
    """Every module gets a spectrum built by hand; the file's ranks must be what the definition says."""
    components = build_tiny_components("sd15")
    source = write_random_lora(components, workdir / "spectra.safetensors")
    lora = read_lora_file(source)
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for name, (down, up, alpha) in lora.modules().items():
        rank = down.shape[0]
        spectrum = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625][:rank])
        left, _ = torch.linalg.qr(torch.randn(up.shape[0], rank, generator=generator))
        right, _ = torch.linalg.qr(torch.randn(down[0].numel(), rank, generator=generator))
        tensors[f"{name}.lora_up.weight"] = (left * spectrum).reshape(up.shape)
        tensors[f"{name}.lora_down.weight"] = right.T.reshape(down.shape)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_lora_file(source, tensors, lora.metadata, torch.float32)

    target = workdir / "spectra_dynamic.safetensors"
    code, _, err = run_cli(capsys, "lora", "resize", source, "--dynamic", "sv_cumulative=0.9", "--out", target)
    assert code == 0, err
    # Cumulative fractions: rank-8 spectrum .502 .753 .878 .941 -> 4; rank-4 (conv) .533 .8 .933 -> 3.
    resized = read_lora_file(target)
    for name, (down, _up, alpha) in resized.modules().items():
        old_rank = lora.modules()[name].down.shape[0]
        assert down.shape[0] == {8: 4, 4: 3}[old_rank], name
        assert alpha == pytest.approx(lora.modules()[name].alpha / old_rank * down.shape[0])
    assert resized.metadata["ss_network_dim"] == "Dynamic"


@pytest.mark.parametrize(
    ("options", "message"),
    [([], "--rank N or --dynamic"), (["--rank", 8], "lowers no module"), (["--dynamic", "sv_fro=2"], "(0, 1]")],
)
def test_resize_refuses_unusable_targets(capsys, options, message, tiny_loras, workdir: Path) -> None:
    out = workdir / "never.safetensors"
    code, _, err = run_cli(capsys, "lora", "resize", tiny_loras["sd15"], *options, "--out", out)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert message in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# merge and extract


def test_parse_lora_weight() -> None:
    assert parse_lora_weight("style.safetensors:0.7") == (Path("style.safetensors"), 0.7)
    assert parse_lora_weight("style.safetensors") == (Path("style.safetensors"), 1.0)
    assert parse_lora_weight(r"C:\loras\style.safetensors") == (Path(r"C:\loras\style.safetensors"), 1.0)
    # A weight that is not a finite number would write a NaN checkpoint (and render NaN images).
    from loralab.sample.lora_library import parse_lora_option

    for parse in (parse_lora_weight, parse_lora_option):
        for weight in ("inf", "nan", "-inf"):
            with pytest.raises(LoraFileError, match=f"'{weight}' .* must be a finite number"):
                parse(f"style.safetensors:{weight}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_extract_recovers_a_merged_lora(capsys, family: str, workdir: Path, tiny_checkpoints, tiny_loras) -> None:
    base, lora = tiny_checkpoints[family], tiny_loras[family]
    tuned = workdir / f"{family}_tuned.safetensors"
    code, _, err = run_cli(capsys, "lora", "merge", base, f"{lora}:1", "--out", tuned, "--save-precision", "fp32")
    assert code == 0, err

    extracted = workdir / f"{family}_extracted.safetensors"
    code, _, err = run_cli(
        capsys, "lora", "extract", base, tuned, "--rank", 8, "--conv-rank", 4, "--clamp-quantile", "none",
        "--out", extracted,
    )
    assert code == 0, err
    original, recovered = module_deltas(lora), module_deltas(extracted)
    assert set(recovered) == set(original)
    worst = max(relative_error(recovered[name], delta) for name, delta in original.items())
    assert worst < 1e-4
    metadata = read_lora_file(extracted).metadata
    assert metadata["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("8", "8.0")


def test_merge_applies_the_strength(capsys, workdir: Path, tiny_checkpoints, tiny_loras) -> None:
    merged = workdir / "sd15_half.safetensors"
    code, out, err = run_cli(
        capsys, "lora", "merge", tiny_checkpoints["sd15"], f"{tiny_loras['sd15']}:0.5",
        "--out", merged, "--save-precision", "fp32",
    )
    assert code == 0, err
    base_layers = find_lora_target_details(load_checkpoint(tiny_checkpoints["sd15"]), conv=True)
    merged_layers = find_lora_target_details(load_checkpoint(merged), conv=True)
    for name, delta in module_deltas(tiny_loras["sd15"]).items():
        change = (merged_layers[name].module.weight - base_layers[name].module.weight).reshape(delta.shape)
        assert relative_error(change.detach(), 0.5 * delta) < 1e-5, name


def test_extract_skips_an_unchanged_text_encoder() -> None:
    base, tuned = build_tiny_components("sd15"), build_tiny_components("sd15")
    layers = find_lora_target_details(tuned)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for target in layers.values():
            size = 0.05 if target.part == "unet" else 0.005  # text encoder below the 0.01 threshold
            target.module.weight.add_(torch.rand(target.module.weight.shape, generator=generator) * size)
    skipped = extract_lora(base, tuned, rank=2, clamp_quantile=None)
    assert skipped.text_encoder_skipped
    assert not any(name.startswith("lora_te_") for name in skipped.modules)
    unet_layers = sum(t.part == "unet" for t in layers.values())
    assert sum(name.startswith("lora_unet_") for name in skipped.modules) == unet_layers
    kept = extract_lora(base, tuned, rank=2, clamp_quantile=None, min_diff=0.001)
    assert len(kept.modules) == len(layers)


def test_extract_clamps_factors_to_the_quantile() -> None:
    delta = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    exact = factor_delta(delta, 4, clamp_quantile=None)
    clamped = factor_delta(delta, 4, clamp_quantile=0.9)
    pooled = torch.cat([exact.up.flatten(), exact.down.flatten()]).numpy()
    high = float(np.quantile(pooled, 0.9))
    assert float(torch.cat([clamped.up.flatten(), clamped.down.flatten()]).abs().max()) == pytest.approx(high)
    u, s, vh = torch.linalg.svd(delta)
    assert relative_error(exact.up @ exact.down, (u[:, :4] * s[:4]) @ vh[:4]) < 1e-5
    assert not torch.equal(clamped.up, exact.up)


def test_extract_merge_and_convert_refuse_other_families(capsys, workdir: Path, tiny_checkpoints, tiny_loras) -> None:
    out = workdir / "mixed.safetensors"
    sd15, sdxl = tiny_checkpoints["sd15"], tiny_checkpoints["sdxl"]
    code, _, err = run_cli(capsys, "lora", "extract", sd15, sdxl, "--rank", 4, "--out", out)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "SD1.x" in err and "SDXL" in err
    assert not out.exists()

    for argv in (
        ["merge", sd15, tiny_loras["sdxl"], "--out", out],
        ["convert", tiny_loras["sdxl"], out, "--to", "peft", "--checkpoint", sd15],
    ):
        code, _, err = run_cli(capsys, "lora", *argv)
        assert code == 2 and err.count("\n") == 1 and "SD1.x" in err and "SDXL" in err, argv
        assert not out.exists()


# ---------------------------------------------------------------------------------------------
# inspect and bad input


def test_inspect_json_lists_metadata_ranks_and_hashes(capsys, tiny_loras) -> None:
    code, out, err = run_cli(capsys, "lora", "inspect", tiny_loras["sd15"], "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["family"], info["format"]) == ("sd1", "kohya")
    metadata = info["metadata"]
    for key in (
        "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
        "ss_v2", "ss_output_name", "ss_steps", "ss_learning_rate", "sshs_model_hash", "sshs_legacy_hash",
        "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.title", "modelspec.resolution",
    ):  # fmt: skip
        assert key in metadata, key
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_network_dim"] == "8"
    assert info["hashes"]["computed_model_hash"] == metadata["sshs_model_hash"]
    assert info["hashes"]["computed_legacy_hash"] == metadata["sshs_legacy_hash"]
    unet, te = info["parts"]["unet"], info["parts"]["te"]
    assert (unet["linear"]["ranks"], unet["linear"]["alphas"]) == ([8], [4.0])
    assert (unet["conv3x3"]["ranks"], unet["conv3x3"]["alphas"]) == ([4], [2.0])
    layers = find_lora_target_details(build_tiny_components("sd15"), conv=True)
    assert unet["conv3x3"]["modules"] == sum(t.is_conv3x3 for t in layers.values())
    assert te["linear"]["modules"] == sum(t.part == "text_encoder" for t in layers.values())
    assert info["modules"] == len(layers)

    code, text, _ = run_cli(capsys, "lora", "inspect", tiny_loras["sdxl"])
    assert code == 0 and "SDXL" in text and "te2" in text and "sshs_model_hash" in text


@pytest.fixture(scope="module")
def bad_files(workdir: Path, tiny_loras) -> dict[str, Path]:
    good = tiny_loras["sd15"].read_bytes()
    truncated = workdir / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    text = workdir / "notes.safetensors"
    text.write_text("these are not weights\n")
    no_lora = workdir / "no_lora.safetensors"
    # A checkpoint-like file: valid safetensors, but not one LoRA weight in it.
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4, 3, 3)}, no_lora)
    missing = workdir / "absent.safetensors"
    return {"truncated": truncated, "not-safetensors": text, "no-lora-keys": no_lora, "missing": missing}


@pytest.mark.parametrize("kind", ["truncated", "not-safetensors", "no-lora-keys", "missing"])
@pytest.mark.parametrize("command", ["inspect", "resize", "convert"])
def test_bad_files_give_one_error_line(capsys, kind: str, command: str, bad_files, workdir: Path) -> None:
    path = bad_files[kind]
    out = workdir / f"out_{kind}_{command}.safetensors"
    argv = {
        "inspect": ["lora", "inspect", path, "--json"],
        "resize": ["lora", "resize", path, "--rank", 2, "--out", out],
        "convert": ["lora", "convert", path, out, "--to", "peft"],
    }[command]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2
    assert stdout == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert path.name in err
    assert not out.exists()


def test_outputs_never_replace_inputs_and_existing_files_need_force(capsys, tiny_checkpoints, tiny_loras, tmp_path):
    import hashlib

    base, lora = tiny_checkpoints["sd15"], tiny_loras["sd15"]
    digests = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in (base, lora)}
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"mine")
    (tmp_path / "a_file").write_text("x")
    writers = {
        "merge": lambda out, *force: ["lora", "merge", base, f"{lora}:1", "--out", out, *force],
        "resize": lambda out, *force: ["lora", "resize", lora, "--rank", 2, "--out", out, *force],
        "extract": lambda out, *force: ["lora", "extract", base, base, "--rank", 2, "--out", out, *force],
        "convert": lambda out, *force: ["lora", "convert", lora, out, "--to", "peft", *force],
    }
    an_input = {"merge": base, "resize": lora, "extract": base, "convert": lora}
    for command, argv in writers.items():
        cases = [
            (argv(an_input[command], "--force"), "is one of the inputs"),
            (argv(existing), "exists; pass --force to replace it"),
            (argv(tmp_path), "is a folder"),
            (argv(tmp_path / "a_file" / "out.safetensors"), "a_file is a file"),
            (argv(tmp_path / "out.txt"), "must be a .safetensors file"),
        ]
        for arguments, message in cases:
            code, _, err = run_cli(capsys, *arguments)
            assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, (command, err)
    assert {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in (base, lora)} == digests
    assert existing.read_bytes() == b"mine"
    code, _, err = run_cli(capsys, *writers["resize"](existing, "--force"))
    assert code == 0 and existing.stat().st_size > 4


# ---------------------------------------------------------------------------------------------
# convert


def _diffusers_pipeline(components):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if components.family.value == "sdxl":
        return StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoders[0], text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0], tokenizer_2=components.tokenizers[1], unet=components.unet,
            scheduler=components.noise_scheduler,
        )  # fmt: skip
    return StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
        unet=components.unet, scheduler=components.noise_scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_convert_kohya_peft_kohya_round_trip(capsys, family: str, workdir: Path, tiny_checkpoints, tiny_loras) -> None:
    source = tiny_loras[family]
    peft = workdir / f"{family}_peft.safetensors"
    # SD1.5 names its layers from the full-size table; SDXL from the given checkpoint's own.
    checkpoint = ["--checkpoint", tiny_checkpoints[family]] if family == "sdxl" else []
    code, _, err = run_cli(capsys, "lora", "convert", source, peft, "--to", "peft", *checkpoint)
    assert code == 0, err

    with safe_open(peft, framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)

    # diffusers reads it natively: fused into the tiny model, every layer equals base + our delta.
    components = build_tiny_components(family)
    pipeline = _diffusers_pipeline(components)
    pipeline.load_lora_weights(str(peft))
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    base_layers = find_lora_target_details(build_tiny_components(family), conv=True)
    fused_layers = find_lora_target_details(components, conv=True)
    for name, delta in module_deltas(source).items():
        change = (fused_layers[name].module.weight - base_layers[name].module.weight).detach().reshape(delta.shape)
        assert relative_error(change, delta) < 1e-5, name

    back = workdir / f"{family}_back.safetensors"
    code, _, err = run_cli(capsys, "lora", "convert", peft, back, "--to", "kohya")
    assert code == 0, err
    original, restored = read_lora_file(source), read_lora_file(back)
    assert set(restored.tensors) == set(original.tensors)
    for key, tensor in original.tensors.items():
        torch.testing.assert_close(restored.tensors[key].reshape(tensor.shape), tensor, rtol=1e-6, atol=1e-8)
    assert restored.family == original.family
