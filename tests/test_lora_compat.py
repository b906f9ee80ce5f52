"""diffusers is the judge: our kohya files load in its pipelines and behave exactly like our own code.

For tiny SD1.5 and SDXL models, a LoRA made here (random non-trivial weights, alpha != rank, conv
LoRA with its own rank/alpha) is saved in kohya format and loaded with diffusers'
``load_lora_weights``. The pipeline's text-encoder and UNet outputs must match our own apply, our
own fuse (what ``loralab generate`` renders with) and our own merge to 1e-5 (fp32), at multiplier
1, at 0.5, with per-part strengths and with two LoRAs at once, and diffusers must not warn about
any LoRA key it could not place.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from lora_test_support import LOCON_SPEC, max_difference, model_outputs, random_network
from peft.utils import get_peft_model_state_dict

from loralab.models.family import ModelFamily
from loralab.models.tiny import build_tiny_components
from loralab.network.lora import NetworkSpec
from loralab.network.lora_file import build_lora_metadata, read_lora_file, save_lora_file
from loralab.network.merge import LoraUse, apply_loras, fuse_loras, merge_loras, remove_loras

TOLERANCE = 1e-5
TINY = ("sd15", "sdxl")


def make_pipeline(components):
    """A diffusers pipeline around the very modules of ``components`` (it adapts them in place)."""
    shared = {"vae": components.vae, "unet": components.unet, "scheduler": components.noise_scheduler}
    if components.family is ModelFamily.SDXL:
        return StableDiffusionXLPipeline(
            text_encoder=components.text_encoders[0],
            text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1],
            **shared,
        )
    return StableDiffusionPipeline(
        text_encoder=components.text_encoders[0],
        tokenizer=components.tokenizers[0],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **shared,
    )


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def library_warnings(adapter_name: str | None = None) -> Iterator[list[str]]:
    """Collect warnings that diffusers, peft and transformers log or raise while loading ``adapter_name``.

    Those libraries log through their own non-propagating loggers, so pytest's caplog does not
    see them; a handler is attached to each library logger instead.
    """
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    problems: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield problems
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    problems.extend(lora_key_problems(handler.records, caught, adapter_name))


def lora_key_problems(
    records: list[logging.LogRecord], caught: list[warnings.WarningMessage], adapter_name: str | None
) -> list[str]:
    """Every warning that could mean a LoRA key was not handled.

    transformers 5 logs a "LOAD REPORT" when peft loads a text-encoder adapter, listing as MISSING
    every weight the adapter file does not hold: the base layers' and those of adapters loaded
    before. Those rows are expected; any other row (UNEXPECTED, MISMATCH, a MISSING weight of the
    adapter being loaded) and any other warning (bar deprecations and peft's notice of a second
    adapter) is a problem.
    """
    problems = []
    for record in records:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            problems.append(f"{record.name}: {message}")
            continue
        for row in message.splitlines()[1:]:
            cells = [cell.strip() for cell in row.split("|")]
            if len(cells) < 2 or cells[0] in ("Key", "") or set(cells[0]) <= {"-", "+"}:
                continue
            key, status = cells[0], cells[1]
            if status != "MISSING" or (adapter_name is not None and f".{adapter_name}." in key):
                problems.append(f"{record.name}: {key} {status}")
    problems += [
        f"{item.category.__name__}: {item.message}"
        for item in caught
        if not issubclass(item.category, (DeprecationWarning, FutureWarning))
        # peft's notice that a second adapter joins the first: expected when loading two LoRAs.
        and "Already found a `peft_config` attribute" not in str(item.message)
    ]
    return problems


@dataclass
class TinySetup:
    tiny: str
    files: dict[str, Path]  # "first": conv LoRA, rank 4 alpha 2.5, conv rank 3 alpha 1.5; "second": rank 2 alpha 3
    base_outputs: dict[str, torch.Tensor]
    shared_base: object  # one loaded model that every scenario applies its LoRAs to and removes them from


@pytest.fixture(scope="module", params=TINY)
def setup(request, tmp_path_factory) -> TinySetup:
    tiny = request.param
    components = build_tiny_components(tiny, seed=0)
    folder = tmp_path_factory.mktemp(f"loras-{tiny}")
    files = {}
    for name, spec, seed in (("first", LOCON_SPEC, 1), ("second", NetworkSpec(rank=2, alpha=3.0), 2)):
        network = random_network(components, spec, seed=seed)
        metadata = build_lora_metadata(family=components.family, network=spec, title=name)
        files[name] = save_lora_file(folder / f"{name}.safetensors", network.state_dict(), metadata, "fp32")
    return TinySetup(tiny, files, model_outputs(components), components)


def part_weights(components, unet: float, text_encoder: float) -> dict[str, float]:
    weights = {"unet": unet, "text_encoder": text_encoder}
    if components.family is ModelFamily.SDXL:
        weights["text_encoder_2"] = text_encoder
    return weights


# (diffusers adapters loaded, diffusers adapter weights or None, our LoraUse arguments per file)
SCENARIOS = {
    "one LoRA": (["first"], None, [("first", {})]),
    "multiplier 0.5": (["first"], [0.5], [("first", {"multiplier": 0.5})]),
    "unet 0.5, text encoder 0.8": (
        ["first"],
        [("parts", 0.5, 0.8)],
        [("first", {"unet_multiplier": 0.5, "text_encoder_multiplier": 0.8})],
    ),
    "two LoRAs": (["first", "second"], [1.0, 0.7], [("first", {}), ("second", {"multiplier": 0.7})]),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_diffusers_loads_our_file_and_agrees_with_our_apply_fuse_and_merge(setup: TinySetup, scenario: str) -> None:
    adapters, weights, uses_spec = SCENARIOS[scenario]
    paths = setup.files

    reference = build_tiny_components(setup.tiny, seed=0)
    pipeline = make_pipeline(reference)
    problems = []
    for name in adapters:
        with library_warnings(name) as problems_loading:
            pipeline.load_lora_weights(str(paths[name]), adapter_name=name)
        problems += problems_loading
    if weights is not None:
        resolved = [part_weights(reference, w[1], w[2]) if isinstance(w, tuple) else w for w in weights]
        with library_warnings() as problems_weighting:
            pipeline.set_adapters(adapters, adapter_weights=resolved)
        problems += problems_weighting
    assert problems == []
    expected = model_outputs(reference)
    # The LoRA must visibly change every output, or agreeing would prove nothing.
    assert min(max_difference(expected, setup.base_outputs).values()) > 1e-2

    uses = [LoraUse(read_lora_file(paths[name]), **kwargs) for name, kwargs in uses_spec]
    # Applied LoRAs switch on one loaded base model: apply, compare, remove, and the base is back.
    networks = apply_loras(setup.shared_base, uses)
    try:
        assert max(max_difference(model_outputs(setup.shared_base), expected).values()) <= TOLERANCE
    finally:
        remove_loras(networks)
    assert max(max_difference(model_outputs(setup.shared_base), setup.base_outputs).values()) == 0.0

    # Fused for generation, then restored: the base is back exactly.
    fused = fuse_loras(setup.shared_base, uses)
    try:
        assert max(max_difference(model_outputs(setup.shared_base), expected).values()) <= TOLERANCE
    finally:
        fused.restore()
    assert max(max_difference(model_outputs(setup.shared_base), setup.base_outputs).values()) == 0.0

    merged = build_tiny_components(setup.tiny, seed=0)
    merge_loras(merged, uses)
    assert max(max_difference(model_outputs(merged), expected).values()) <= TOLERANCE


def test_warning_check_catches_a_key_diffusers_cannot_place(tmp_path: Path) -> None:
    """The warning check above is live: a module that exists in no UNet is reported."""
    components = build_tiny_components("sd15", seed=0)
    tensors = random_network(components).state_dict()
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.ones(4, 32)
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.ones(32, 4)
    path = save_lora_file(tmp_path / "extra.safetensors", tensors, {})
    with library_warnings("extra") as problems:
        make_pipeline(components).load_lora_weights(str(path), adapter_name="extra")
    assert any("down_blocks.7" in problem for problem in problems)


@pytest.mark.parametrize("tiny", TINY)
def test_diffusers_peft_format_file_reads_back_as_the_same_kohya_lora(tiny: str, tmp_path: Path) -> None:
    """A file diffusers saves (PEFT keys, alphas in its adapter metadata) converts to kohya on load."""
    components = build_tiny_components(tiny, seed=0)
    ours = save_lora_file(tmp_path / "ours.safetensors", random_network(components).state_dict(), {}, "fp32")
    pipeline = make_pipeline(components)
    pipeline.load_lora_weights(str(ours), adapter_name="a")
    layers = {"unet_lora_layers": pipeline.unet, "text_encoder_lora_layers": pipeline.text_encoder}
    if components.family is ModelFamily.SDXL:
        layers["text_encoder_2_lora_layers"] = pipeline.text_encoder_2
    arguments = {}
    for key, model in layers.items():
        arguments[key] = get_peft_model_state_dict(model, adapter_name="a")
        arguments[key.replace("_layers", "_adapter_metadata")] = model.peft_config["a"].to_dict()
    type(pipeline).save_lora_weights(tmp_path / "diffusers", **arguments)

    converted = read_lora_file(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors", unet_config=components.unet.config)
    original = read_lora_file(ours)
    assert converted.source_format == "diffusers"
    assert converted.family is components.family
    assert converted.unsupported_keys == []
    assert converted.modules().keys() == original.modules().keys()
    for name, (down, up, alpha) in original.modules().items():
        theirs = converted.modules()[name]
        assert theirs.alpha == pytest.approx(alpha), name
        assert torch.equal(theirs.down.reshape(down.shape), down), name
        assert torch.equal(theirs.up.reshape(up.shape), up), name
