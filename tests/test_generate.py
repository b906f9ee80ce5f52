"""Image generation on tiny models: determinism, LoRAs by tag and option, XYZ grids, PNG info, errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_test_support import random_network, weight_digests
from PIL import Image

from loralab.cli.main import main
from loralab.errors import LoralabError
from loralab.models.loading import load_checkpoint
from loralab.models.tiny import build_tiny_components, make_tiny
from loralab.network.lora import NetworkSpec
from loralab.network.lora_file import build_lora_metadata, read_lora_file, save_lora_file
from loralab.sample.generator import GenerationEngine, GenerationError, ImageRequest, LoraRef
from loralab.sample.grids import MIN_FONT_SIZE, draw_grid
from loralab.sample.hashes import lora_short_hash
from loralab.sample.png_info import GenerationParameters, parse_infotext, read_png_parameters
from loralab.sample.request_plan import RequestTemplate
from loralab.sample.samplers import A1111_SAMPLERS, SamplerError, build_scheduler, resolve_sampler
from loralab.sample.wildcards import WildcardError, Wildcards
from loralab.sample.xyz import AxisError, parse_axis, plan_xyz, render_xyz

SPEC = NetworkSpec(rank=4, alpha=2.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Two tiny SD1.5 checkpoints (same family, different weights), tiny SDXL and SD2-v ones, LoRAs for SD1.5 and SDXL."""
    root = tmp_path_factory.mktemp("generate")
    loras = root / "loras"
    loras.mkdir()
    sd15 = build_tiny_components("sd15")
    sdxl = build_tiny_components("sdxl")
    for name, components, seed in (("x", sd15, 3), ("y", sd15, 4), ("xl", sdxl, 5)):
        network = random_network(components, SPEC, seed=seed)
        metadata = build_lora_metadata(family=components.family, network=SPEC, title=name)
        save_lora_file(loras / f"{name}.safetensors", network.state_dict(), metadata)
    return {
        "a": make_tiny("sd15", "single-file", root / "model_a.safetensors", seed=0),
        "b": make_tiny("sd15", "single-file", root / "model_b.safetensors", seed=1),
        "xl": make_tiny("sdxl", "single-file", root / "model_xl.safetensors", seed=0),
        "sd2v": make_tiny("sd2v", "diffusers", root / "model_sd2v", seed=0),
        "loras": loras,
        "root": root,
    }


class CountingLoader:
    """``load_checkpoint`` that counts its calls per checkpoint (or refuses to load at all)."""

    def __init__(self, allow: bool = True) -> None:
        self.calls: list[Path] = []
        self.allow = allow

    def __call__(self, path, **kwargs):
        if not self.allow:
            raise AssertionError(f"a model was loaded: {path}")
        self.calls.append(Path(path))
        return load_checkpoint(path, **kwargs)


def _request(checkpoint: Path, **changes) -> ImageRequest:
    base = ImageRequest(checkpoint, "a photo of a dog, beach", negative_prompt="blurry", width=64, height=64, steps=3, seed=7)
    return replace(base, **changes)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.image if hasattr(image, "image") else image)


def test_same_seed_gives_byte_identical_pngs_and_other_seeds_differ(files, tmp_path: Path) -> None:
    requests = [_request(files["a"]), _request(files["a"], seed=8)]
    first = GenerationEngine().generate(requests)
    second = GenerationEngine().generate(requests[:1])
    first[0].save(tmp_path / "one.png")
    second[0].save(tmp_path / "two.png")
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
    assert not np.array_equal(_pixels(first[0]), _pixels(first[1]))
    assert np.isfinite(_pixels(first[0])).all() and _pixels(first[0]).std() > 0


def test_lora_by_tag_equals_lora_by_option_and_weight_zero_is_no_lora(files) -> None:
    loader = CountingLoader()
    engine = GenerationEngine(lora_dir=files["loras"], loader=loader)
    prompt = "a photo of a dog, beach"
    requests = [
        _request(files["a"]),
        _request(files["a"], prompt=f"{prompt} <lora:x:0.0>"),
        _request(files["a"], prompt=f"{prompt} <lora:x:1.0>"),
        _request(files["a"], loras=(LoraRef("x", 1.0),)),
        _request(files["b"]),
        _request(files["b"], prompt=f"{prompt} <lora:x:1.0>"),
        _request(files["a"]),  # after the LoRA was applied and removed again
    ]
    base_a, zero, tag, option, base_b, tag_b, again = (_pixels(i) for i in engine.generate(requests))
    assert np.array_equal(zero, base_a)
    assert np.array_equal(tag, option)
    assert not np.array_equal(tag, base_a)
    assert not np.array_equal(tag_b, base_b)
    assert np.array_equal(again, base_a)
    # Requests alternate checkpoints, yet each checkpoint loads once (A, then B).
    assert loader.calls == [files["a"], files["b"]]


def test_cli_lora_option_equals_the_same_lora_as_a_prompt_tag(files, tmp_path: Path) -> None:
    common = ["generate", "--checkpoint", str(files["a"]), "--steps", "2", "--width", "64", "--height", "64",
              "--seed", "4", "--lora-dir", str(files["loras"])]  # fmt: skip
    assert main([*common, "--prompt", "a dog <lora:x:1.0>", "--out", str(tmp_path / "tag")]) == 0
    assert main([*common, "--prompt", "a dog", "--lora", "x:1.0", "--out", str(tmp_path / "option")]) == 0
    assert main([*common, "--prompt", "a dog", "--out", str(tmp_path / "none")]) == 0
    tag, option, none = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in ("tag", "option", "none"))
    assert np.array_equal(tag, option) and not np.array_equal(tag, none)


def test_training_samples_are_what_generate_makes(files) -> None:
    from loralab.train.sample_prompts import SamplePrompt
    from loralab.train.sampling import render_samples

    components = load_checkpoint(files["a"])
    prompts = [
        SamplePrompt("a (dog:1.2), beach", "blurry", steps=2, scale=5.0),
        SamplePrompt("a cat", width=56, steps=2),
    ]
    samples = render_samples(components, prompts, sampler="euler_a", resolution=(64, 48), base_seed=10)
    assert [image.size for image in samples] == [(64, 48), (56, 48)]
    made = GenerationEngine().generate([
        _request(files["a"], prompt="a (dog:1.2), beach", steps=2, cfg_scale=5.0, width=64, height=48, seed=10,
                 sampler="Euler a"),
        _request(files["a"], prompt="a cat", negative_prompt="", steps=2, cfg_scale=7.5, width=56, height=48, seed=11,
                 sampler="Euler a"),
    ])  # fmt: skip
    for sample, image in zip(samples, made):
        assert np.array_equal(_pixels(sample), _pixels(image))
        parsed = GenerationParameters.from_text(sample.info["parameters"])
        assert (parsed.prompt, parsed.seed, parsed.steps) == (image.parameters.prompt, image.request.seed, 2)


def test_png_parameters_parse_back_into_the_same_settings(files, tmp_path: Path) -> None:
    engine = GenerationEngine(lora_dir=files["loras"])
    request = _request(
        files["a"],
        prompt="a (photo:1.2) of a dog, beach <lora:y:0.6>",
        loras=(LoraRef(str(files["loras"] / "x.safetensors"), 0.8),),
        sampler="DPM++ 2M Karras",
        cfg_scale=5.5,
        clip_skip=2,
        width=64,
        height=72,
    )
    (image,) = engine.generate([request])
    path = image.save(tmp_path / "params.png")
    text = read_png_parameters(path)
    assert text == image.infotext
    parsed = GenerationParameters.from_text(text)
    assert parsed == image.parameters
    assert parsed.prompt == f"{request.prompt} <lora:x:0.8>"  # option LoRAs are written as tags, as A1111 reads them
    assert parsed.negative_prompt == "blurry"
    assert (parsed.steps, parsed.cfg_scale, parsed.seed, parsed.width, parsed.height, parsed.clip_skip) == (3, 5.5, 7, 64, 72, 2)
    assert (parsed.sampler, parsed.schedule_type) == ("DPM++ 2M", "Karras")
    assert resolve_sampler(parsed.sampler, parsed.schedule_type) == resolve_sampler("DPM++ 2M Karras")
    lora_hash = read_lora_file(files["loras"] / "y.safetensors").metadata["sshs_model_hash"][:12]
    assert parsed.lora_hashes == {"y": lora_hash, "x": lora_short_hash(files["loras"] / "x.safetensors")}
    assert parsed.model == "model_a" and len(parsed.model_hash or "") == 10
    assert 'Lora hashes: "x: ' in text and text.splitlines()[1] == "Negative prompt: blurry"


def test_infotext_of_older_a1111_versions_reads_too() -> None:
    text = (
        "masterpiece, (blh woman:1.1)\nNegative prompt: easynegative, lowres\n"
        'Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, Model hash: 15012c538f, '
        'Model: realisticVisionV51, Lora hashes: "blh: abcdef123456, other: 0123456789ab", ENSD: 31337, Version: v1.6.0'
    )
    parsed = GenerationParameters.from_text(text)
    assert parsed.prompt == "masterpiece, (blh woman:1.1)" and parsed.negative_prompt == "easynegative, lowres"
    assert (parsed.width, parsed.height, parsed.seed, parsed.cfg_scale) == (512, 768, 1234, 6.5)
    assert parsed.lora_hashes == {"blh": "abcdef123456", "other": "0123456789ab"}
    assert parsed.extra == {"ENSD": "31337"}
    assert parse_infotext("just a prompt") == ("just a prompt", "", {})


def test_3x3x2_plot_loads_each_checkpoint_once_and_labels_its_grids(files, tmp_path: Path) -> None:
    loader = CountingLoader()
    engine = GenerationEngine(lora_dir=files["loras"], loader=loader)
    template = RequestTemplate(checkpoints=(str(files["a"]),), prompt="a photo of a dog", loras=("x",), steps="2", size="64x64")
    axes = [parse_axis("cfg=3,5,7"), parse_axis("lora_weight=none,0.5,1"), parse_axis(f"checkpoint={files['a']},{files['b']}")]
    cells = plan_xyz(template, axes, 11, Wildcards())
    assert len(cells) == 18
    result = render_xyz(engine, cells, axes, tmp_path / "xyz")
    assert sorted(loader.calls) == [files["a"], files["b"]]

    index = json.loads(result.index.read_text())
    assert len(index["cells"]) == 18 and index["grids"] == ["grid-00.png", "grid-01.png"]
    assert index["axes"]["z"]["kind"] == "checkpoint"
    baseline = next(c for c in index["cells"] if c["labels"] == ["CFG: 5", "LoRA weight: none", "Checkpoint: model_b"])
    assert baseline["parameters"]["lora_hashes"] == {} and baseline["parameters"]["cfg_scale"] == 5
    for cell in index["cells"]:
        assert (tmp_path / "xyz" / cell["file"]).is_file()

    # Each written grid has the layout of its labels at a legible font size: title and column labels
    # above, row labels to the left, each line of text drawn at least ~60% of the font size tall.
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    for z, path in enumerate(result.grids):
        grid = Image.open(path)
        expected, layout = draw_grid(
            [[blank] * 3] * 3,
            column_labels=["CFG: 3", "CFG: 5", "CFG: 7"],
            row_labels=["LoRA weight: none", "LoRA weight: 0.5", "LoRA weight: 1"],
            title=f"Checkpoint: model_{'ab'[z]}",
        )
        assert grid.size == expected.size and layout.font_size >= MIN_FONT_SIZE
        assert np.array_equal(np.asarray(grid)[: layout.top_band], np.asarray(expected)[: layout.top_band])
        assert np.array_equal(np.asarray(grid)[:, : layout.left_band], np.asarray(expected)[:, : layout.left_band])
        ink = np.asarray(grid.convert("L")) < 100
        assert np.flatnonzero(ink[: layout.top_band].any(axis=1)).size >= 2 * 0.6 * layout.font_size  # 2 lines
        for row in range(3):
            top = layout.top_band + row * 64
            row_ink = ink[top : top + 64, : layout.left_band]
            assert np.flatnonzero(row_ink.any(axis=1)).size >= 0.6 * layout.font_size


def test_grid_labels_are_drawn_at_a_legible_size() -> None:
    cell = Image.new("RGB", (64, 64), (90, 140, 200))
    grid, layout = draw_grid(
        [[cell, cell], [cell, None]],
        column_labels=["CFG: 3", "CFG: 7 with a label long enough to wrap onto more lines"],
        row_labels=["LoRA: blh_final_rv20 (8)", "LoRA: none"],
        title="Checkpoint: realisticVision",
    )
    assert layout.font_size >= MIN_FONT_SIZE
    assert layout.top_band >= 2 * layout.font_size and layout.left_band >= 4 * layout.font_size
    ink = np.asarray(grid.convert("L")) < 100
    rows_with_ink = np.flatnonzero(ink[: layout.top_band].any(axis=1))
    # Each line of text is at least ~60% of the font size tall (capital letters), so it reads at 100%.
    assert rows_with_ink.size >= 0.6 * layout.font_size
    assert ink[layout.top_band :, : layout.left_band].any()  # row labels


def test_every_sampler_renders_and_sde_noise_is_seeded(files) -> None:
    engine = GenerationEngine()
    names = [*A1111_SAMPLERS, "euler_a", "k_dpm_2", "dpmsolver++", "dpmsingle"]
    images = engine.generate([_request(files["a"], sampler=name, steps=2, prompt="x") for name in names])
    for name, image in zip(names, images):
        assert np.isfinite(_pixels(image)).all(), name
    (again,) = engine.generate([_request(files["a"], sampler="DPM++ SDE Karras", steps=2, prompt="x")])
    assert np.array_equal(_pixels(again), _pixels(images[names.index("DPM++ SDE Karras")]))
    components = build_tiny_components("sd2v")
    scheduler = build_scheduler(resolve_sampler("DPM++ 2M Karras"), components.noise_scheduler)
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.use_karras_sigmas


def test_sdxl_v_prediction_long_prompts_and_batches(files) -> None:
    engine = GenerationEngine()
    long_prompt = ", ".join(["a dog on a beach"] * 20)  # 3 chunks; its negative has 1 and is padded
    requests = [
        _request(files["xl"], prompt=long_prompt, seed=1),
        _request(files["xl"], prompt="a cat", negative_prompt="", seed=2),
        _request(files["xl"], prompt="a dog", negative_prompt="", seed=3),
    ]
    batched = engine.generate(requests, batch_size=3)
    singles = engine.generate(requests[1:])
    assert len(batched) == 3 and engine.load_count == 1
    assert all(np.isfinite(_pixels(i)).all() and _pixels(i).std() > 0 for i in batched)
    # The long prompt runs on its own; the two short ones share a call. An image depends on its
    # seed, not on its batch (up to float rounding in the batched call).
    for image, single in zip(batched[1:], singles):
        assert np.abs(_pixels(image).astype(int) - _pixels(single).astype(int)).max() <= 2
    (v_image,) = GenerationEngine().generate([_request(files["sd2v"], steps=2)])
    assert np.isfinite(_pixels(v_image)).all() and _pixels(v_image).std() > 0


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"sampler": "Euler b"}, SamplerError, "known samplers: Euler a, Euler,"),
        ({"prompt": "x <lora:missing:1>"}, LoralabError, "'missing' not found"),
        ({"prompt": "x <lora:xl:1>"}, LoralabError, "LoRA for SDXL but the checkpoint is SD1.x"),
        ({"width": 65}, GenerationError, "width 65 must be a positive multiple of 8"),
        ({"cfg_scale": 0.0}, GenerationError, "CFG scale 0 must be above 0"),
        ({"cfg_scale": float("inf")}, GenerationError, "CFG scale inf must be above 0"),
        ({"width": 100_000}, GenerationError, "width 100000 is above 8192"),
        ({"seed": 2**70}, GenerationError, "outside torch's seed range"),
        ({"negative_prompt": "<lora:x:1>"}, GenerationError, "not in the negative prompt"),
        ({"prompt": "x <hypernet:h:1>"}, LoralabError, "only <lora"),
    ],
)
def test_bad_input_is_one_error_before_any_model_loads(files, changes, error, message) -> None:
    engine = GenerationEngine(lora_dir=files["loras"], loader=CountingLoader(allow=False))
    with pytest.raises(error, match=message) as caught:
        engine.generate([_request(files["a"]), _request(files["a"], **changes)])
    assert "\n" not in str(caught.value)


def test_running_out_of_memory_is_one_error_naming_the_size(files, monkeypatch) -> None:
    from loralab.sample import generator

    class ExhaustedPipeline:
        scheduler = None

        def __call__(self, **kwargs):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(generator, "build_pipeline", lambda components, scheduler: ExhaustedPipeline())
    with pytest.raises(GenerationError, match="out of memory rendering 1 image\\(s\\) of 64x64 on cpu; use a smaller size"):
        GenerationEngine().generate([_request(files["a"], width=64, height=64)])


def test_axes_are_checked_before_rendering(files) -> None:
    with pytest.raises(SamplerError):
        parse_axis("sampler=Euler a,Nope")
    with pytest.raises(AxisError, match="KIND"):
        parse_axis("colour=red")
    template = RequestTemplate(checkpoints=(str(files["a"]),), prompt="a dog")
    with pytest.raises(AxisError, match="not in the prompt"):
        plan_xyz(template, [parse_axis("prompt=cat,bird")], 1, Wildcards())
    with pytest.raises(AxisError, match="needs LoRAs"):
        plan_xyz(template, [parse_axis("lora_weight=0.5,1")], 1, Wildcards())
    with pytest.raises(WildcardError):
        plan_xyz(replace(template, prompt="__nothing__"), [parse_axis("cfg=3,4")], 1, Wildcards())


def test_cli_generates_pngs_and_reports_bad_input_in_one_line(files, tmp_path: Path, capsys) -> None:
    common = ["generate", "--checkpoint", str(files["a"]), "--steps", "2", "--width", "64", "--height", "64"]
    out = tmp_path / "out"
    code = main([*common, "--prompt", "a dog <lora:x:0.7>", "--lora-dir", str(files["loras"]), "--seed", "5",
                 "--batch", "2", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000-5.png", "00001-6.png"]
    parsed = GenerationParameters.from_text(read_png_parameters(out / "00001-6.png"))
    assert (parsed.seed, parsed.prompt) == (6, "a dog <lora:x:0.7>")

    # --count with two checkpoints and variants: each image draws, each checkpoint loads once.
    code = main([*common[:3], "--checkpoint", str(files["b"]), *common[3:], "--prompt", "a {dog|cat} <lora:{x|y}:{0.5|1}>",
                 "--lora-dir", str(files["loras"]), "--cfg", "{3|6}", "--count", "4", "--seed", "9", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert len(list(out.glob("*.png"))) == 6
    assert "4 images" in capsys.readouterr().out

    code = main([*common, "--prompt", "x", "--sampler", "Eular a", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown sampler 'Eular a'; known samplers:") and err.count("\n") == 1

    bad_devices = {"foo": "'foo' is not a device name; use cpu, cuda or cuda:N"}
    if not torch.cuda.is_available():
        bad_devices["cuda"] = "sees no CUDA GPU here; use --device cpu"
    # A run that fails before its first image leaves no folder behind; one that existed stays.
    assert main([*common, "--prompt", "x <lora:nope:1>", "--out", str(tmp_path / "new")]) == 2
    assert "'nope' is not a file" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main([*common, "--prompt", "x <lora:nope:1>", "--out", str(out)]) == 2
    assert "'nope' is not a file" in capsys.readouterr().err and len(list(out.glob("*.png"))) == 6
    (tmp_path / "a_file").write_text("x")
    assert main([*common, "--prompt", "x", "--out", str(tmp_path / "a_file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "cannot create that folder" in err and err.count("\n") == 1
    for device, message in bad_devices.items():
        assert main([*common, "--prompt", "x", "--device", device, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --device ") and message in err and err.count("\n") == 1


def test_cli_xyz_plot_with_a_prompt_file(files, tmp_path: Path, capsys) -> None:
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# one prompt\na photo of a dog --n ugly --s 2 --d 3 --w 64 --h 64\n", encoding="utf-8")
    code = main(["generate", "--checkpoint", str(files["a"]), "--prompt-file", str(prompt_file), "--lora-dir",
                 str(files["loras"]), "--x", "lora=none,x,y", "--y", "seed=1,2", "--out", str(tmp_path / "plot")])  # fmt: skip
    assert code == 0
    index = json.loads((tmp_path / "plot" / "index.json").read_text())
    assert len(index["cells"]) == 6 and (tmp_path / "plot" / "grid.png").is_file()
    assert {c["parameters"]["negative_prompt"] for c in index["cells"]} == {"ugly"}
    assert "grid:" in capsys.readouterr().out


def test_render_prompts_by_seeds_on_a_model_in_memory(files) -> None:
    from loralab.network.lora import AdaptedLayer

    components = load_checkpoint(files["a"])
    engine = GenerationEngine(lora_dir=files["loras"], loader=CountingLoader(allow=False))
    checkpoint = engine.use_components(components, "training")
    images = engine.render(checkpoint, ["a dog", "a dog <lora:x:0.5>"], [1, 2], steps=2, width=64, height=64)
    assert [(i.request.prompt, i.request.seed) for i in images] == [
        ("a dog", 1), ("a dog", 2), ("a dog <lora:x:0.5>", 1), ("a dog <lora:x:0.5>", 2),
    ]  # fmt: skip
    assert images[2].parameters.lora_hashes.keys() == {"x"} and images[0].parameters.model == "training"
    (from_file,) = GenerationEngine().render(files["a"], ["a dog"], [1], steps=2, width=64, height=64)
    assert np.array_equal(_pixels(images[0]), _pixels(from_file))
    engine.close()
    assert not any(isinstance(m, AdaptedLayer) for m in components.unet.modules())  # LoRA taken out again


class UNetWatch:
    """A forward pre-hook on the UNet noting, at each call, the weights that differ from ``before``
    (name, digest) and how many layers carry live LoRA modules; ``fail_at``: raise at that call."""

    def __init__(self, components, before: dict[str, str], fail_at: int | None = None) -> None:
        self.components, self.before, self.fail_at = components, before, fail_at
        self.calls: list[tuple[frozenset[tuple[str, str]], int]] = []
        self.handle = components.unet.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        from loralab.network.lora import AdaptedLayer

        digests = weight_digests(self.components)
        changed = frozenset((key, digest) for key, digest in digests.items() if digest != self.before.get(key))
        self.calls.append((changed, sum(isinstance(m, AdaptedLayer) for m in self.components.unet.modules())))
        if len(self.calls) == self.fail_at:
            raise RuntimeError("interrupted mid-image")


def test_lora_files_are_fused_while_rendering_and_the_weights_restored_bit_exactly(files) -> None:
    from loralab.network.merge import LoraUse, apply_loras, remove_loras

    components = load_checkpoint(files["a"])
    before = weight_digests(components)
    engine = GenerationEngine(lora_dir=files["loras"], loader=CountingLoader(allow=False))
    checkpoint = engine.use_components(components, "model")
    watch = UNetWatch(components, before)
    steps = 2  # with CFG: one UNet call per step
    requests = [
        _request(checkpoint, prompt="a dog", steps=steps),
        _request(checkpoint, prompt="a dog <lora:x:1>", steps=steps),
        _request(checkpoint, prompt="a dog <lora:x:0.5> <lora:y:0.7>", steps=steps),
        _request(checkpoint, prompt="a dog", steps=steps),
    ]
    images, per_image, order = {}, {}, []
    for index, image in engine.iter_generate(requests):
        images[index], per_image[index] = image, {changed for changed, _ in watch.calls[len(order) * steps :]}
        order.append(index)
    assert order == [0, 3, 1, 2]  # images with the same LoRAs in a row: each set is fused once
    assert len(watch.calls) == steps * len(requests)
    assert all(adapted == 0 for _, adapted in watch.calls)  # no LoRA module in any layer
    assert per_image[0] == per_image[3] == {frozenset()}
    (x_changed,), (two_changed,) = per_image[1], per_image[2]
    assert x_changed and two_changed and x_changed != two_changed  # in the weights while they render
    assert weight_digests(components) == before  # and out of them after the call
    plain, x_fused, plain_again = images[0], images[1], images[3]
    assert np.array_equal(_pixels(plain), _pixels(plain_again))

    # The fused image is the image the live LoRA modules make, up to rounding; a network applied as
    # modules (as training applies its own) stays live next to a fused file LoRA.
    network = apply_loras(components, [LoraUse(read_lora_file(files["loras"] / "x.safetensors"))])
    try:
        live = engine.generate([replace(requests[1], prompt="a dog")])[0]
        live_with_y = engine.generate([replace(requests[1], prompt="a dog <lora:y:0.7>")])[0]
        assert watch.calls[-1][1] > 0  # x live as modules, y fused
    finally:
        remove_loras(network)
        watch.handle.remove()
    assert np.abs(_pixels(live).astype(int) - _pixels(x_fused).astype(int)).max() <= 1
    assert not np.array_equal(_pixels(live_with_y), _pixels(live))
    engine.close()
    assert weight_digests(components) == before


def test_an_error_or_an_abandoned_call_mid_generation_restores_the_weights(files) -> None:
    components = load_checkpoint(files["a"])
    before = weight_digests(components)
    engine = GenerationEngine(lora_dir=files["loras"], loader=CountingLoader(allow=False))
    checkpoint = engine.use_components(components, "model")
    watch = UNetWatch(components, before, fail_at=2)
    with pytest.raises(RuntimeError, match="interrupted mid-image"):
        engine.generate([_request(checkpoint, prompt="a dog <lora:x:1> <lora:y:0.5>", steps=3)])
    assert len(watch.calls) == 2 and watch.calls[-1][0]  # it failed with the LoRAs fused
    assert weight_digests(components) == before

    watch.fail_at = None
    images = engine.iter_generate([_request(checkpoint, prompt=f"a dog <lora:x:{w}>", steps=2) for w in (1, 0.5)])
    next(images)
    assert watch.calls[-1][0]
    images.close()  # the caller stops after the first image
    assert weight_digests(components) == before
    watch.handle.remove()
    engine.close()


def test_lora_names_resolve_as_in_a1111s_lora_folder(files, tmp_path: Path) -> None:
    from loralab.sample.lora_library import LoraLibrary

    source = (files["loras"] / "x.safetensors").read_bytes()
    (tmp_path / "people").mkdir()
    (tmp_path / "people" / "Blh_Final.safetensors").write_bytes(source)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "twin.safetensors").write_bytes(source)
    (tmp_path / "people" / "twin.safetensors").write_bytes(source)
    network = random_network(build_tiny_components("sd15"), SPEC, seed=9)
    metadata = build_lora_metadata(family=network.family, network=SPEC, title="t", extra_fields={"ss_output_name": "blh_v2"})
    save_lora_file(tmp_path / "model-000008.safetensors", network.state_dict(), metadata)
    library = LoraLibrary(tmp_path)
    assert library.resolve("people/Blh_Final") == tmp_path / "people" / "Blh_Final.safetensors"
    assert library.resolve("Blh_Final") == library.resolve("blh_final.safetensors") == tmp_path / "people" / "Blh_Final.safetensors"
    assert library.resolve("blh_v2") == tmp_path / "model-000008.safetensors"  # alias from the file's metadata
    assert library.resolve("other/twin") == tmp_path / "other" / "twin.safetensors"
    with pytest.raises(LoralabError, match="ambiguous"):
        library.resolve("twin")
    with pytest.raises(LoralabError, match="did you mean Blh_Final"):
        library.resolve("Blh_Finl")
    # Files that only carry the suffix (their first bytes read as a huge header size) are not
    # LoRAs to match by their metadata, and do not stop the search.
    (tmp_path / "notes.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(LoralabError, match="not found in"):
        LoraLibrary(tmp_path).resolve("unknown_name")
