"""Files people already have: LoRAs written by sd-scripts load here, and our writer writes the same.

The fixtures (``../shared/fixtures/sd-scripts``, see its README) are real sd-scripts outputs for the
full-size SD1.5 and SDXL architectures, plain and LoCon. Full-size modules are built on the meta
device: only names and shapes matter here, and the LoRA weights themselves are real.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lora_test_support import full_size
from safetensors import safe_open

from loralab.models.family import ModelFamily
from loralab.network.lora import AdaptedLayer, LoRANetwork, NetworkSpec
from loralab.network.lora_file import build_lora_metadata, read_lora_file, safetensors_hashes, save_lora_file

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sd-scripts"
pytestmark = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"sd-scripts LoRA fixtures not found at {FIXTURES} (../shared is absent)"
)


@dataclass(frozen=True)
class Fixture:
    family: ModelFamily
    spec: NetworkSpec  # what sd-scripts was asked for (the fixture README)
    modules: dict[str, int]  # modules per kohya prefix
    dtype: torch.dtype


FIXTURE_FILES = {
    "sd15_lora_r4": Fixture(ModelFamily.SD1, NetworkSpec(4, 2.0), {"lora_unet": 192, "lora_te": 72}, torch.float32),
    "sd15_locon_r4": Fixture(
        ModelFamily.SD1, NetworkSpec(4, 1.0, conv_rank=4, conv_alpha=1.0), {"lora_unet": 278, "lora_te": 72}, torch.float16
    ),
    "sdxl_lora_r4": Fixture(
        ModelFamily.SDXL, NetworkSpec(4, 2.0), {"lora_unet": 722, "lora_te1": 72, "lora_te2": 192}, torch.float16
    ),
    "sdxl_locon_r4": Fixture(
        ModelFamily.SDXL,
        NetworkSpec(4, 2.0, conv_rank=4, conv_alpha=1.0),
        {"lora_unet": 788, "lora_te1": 72, "lora_te2": 192},
        torch.float16,
    ),
}

# The metadata sd-scripts writes even without training information (the SDXL fixtures hold just this).
MINIMUM_METADATA = {
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_base_model_version",
    "ss_v2",
    "sshs_model_hash",
    "sshs_legacy_hash",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.title",
    "modelspec.resolution",
    "modelspec.date",
    "modelspec.prediction_type",
}


def raw_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata())


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_sd_scripts_file_loads_onto_full_size_modules_with_every_key_matched(name: str) -> None:
    fixture = FIXTURE_FILES[name]
    lora_file = read_lora_file(FIXTURES / f"{name}.safetensors")
    assert lora_file.family is fixture.family
    assert lora_file.unsupported_keys == []

    components = full_size(fixture.family)
    network = LoRANetwork.from_lora_file(lora_file, components, strict=True)
    assert network.unmatched == []
    counts = dict.fromkeys(fixture.modules, 0)
    for module_name in network.lora_modules():
        counts[next(prefix for prefix in counts if module_name.startswith(prefix + "_"))] += 1
    assert counts == fixture.modules

    # Every tensor, alphas included (0-dim; 1 on LoCon 3x3 convs), lands in the network unchanged.
    state = network.state_dict()
    assert state.keys() == lora_file.tensors.keys()
    for key, tensor in lora_file.tensors.items():
        assert torch.equal(state[key].to(tensor.dtype), tensor), key

    # And the network applies to the full-size module tree and comes out again.
    network.apply_to(components)
    hosts = [m for model in (components.unet, *components.text_encoders) for m in model.modules() if isinstance(m, AdaptedLayer)]
    assert len(hosts) == sum(fixture.modules.values())
    network.remove()
    assert not any(isinstance(m, AdaptedLayer) for m in components.unet.modules())


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_our_writer_given_the_same_weights_writes_what_sd_scripts_wrote(name: str, tmp_path: Path) -> None:
    fixture = FIXTURE_FILES[name]
    theirs_tensors, theirs_metadata = raw_file(FIXTURES / f"{name}.safetensors")
    network = LoRANetwork.from_lora_file(read_lora_file(FIXTURES / f"{name}.safetensors"), full_size(fixture.family))
    metadata = build_lora_metadata(family=fixture.family, network=fixture.spec, title=name)
    ours_path = save_lora_file(tmp_path / f"{name}.safetensors", network.state_dict(), metadata, fixture.dtype)
    ours_tensors, ours_metadata = raw_file(ours_path)

    assert ours_tensors.keys() == theirs_tensors.keys()
    for key, tensor in theirs_tensors.items():
        assert ours_tensors[key].shape == tensor.shape, key
        assert ours_tensors[key].dtype == tensor.dtype, key
    assert MINIMUM_METADATA <= ours_metadata.keys()
    assert all(isinstance(value, str) for value in ours_metadata.values())
    for key in (
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_base_model_version",
        "ss_v2",
        "modelspec.architecture",
        "modelspec.implementation",
        "modelspec.prediction_type",
        "modelspec.sai_model_spec",
    ):
        assert ours_metadata[key] == theirs_metadata[key], key
    if "ss_network_args" in theirs_metadata:
        assert json.loads(ours_metadata["ss_network_args"]) == json.loads(theirs_metadata["ss_network_args"])
    else:
        assert "ss_network_args" not in ours_metadata
    # Same tensors, same bytes: the tensor-data hash equals the one sd-scripts stored.
    assert ours_metadata["sshs_model_hash"] == theirs_metadata["sshs_model_hash"]


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_model_hashes_are_computed_as_sd_scripts_computes_them(name: str) -> None:
    tensors, metadata = raw_file(FIXTURES / f"{name}.safetensors")
    assert safetensors_hashes(tensors, metadata) == (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"])
