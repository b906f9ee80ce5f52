"""LoRA networks: targets and names, the LoRA formula and dropouts, applying/switching/merging,
the file format (precision, metadata, atomic writes, clear errors) and family checks."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from lora_test_support import LOCON_SPEC, full_size, max_difference, model_outputs, random_network, weight_digests
from torch import nn

from loralab.errors import ConfigError, LoraFileError
from loralab.models.family import ModelFamily
from loralab.models.loading import load_checkpoint
from loralab.models.tiny import build_tiny_components, make_tiny
from loralab.network.kohya_names import diffusers_unet_path_to_sgm, parse_foreign_key, sgm_unet_path_to_diffusers
from loralab.network.lora import AdaptedLayer, LoRAModule, LoRANetwork, NetworkSpec, lora_delta_weight
from loralab.network.lora_file import build_lora_metadata, read_lora_file, save_lora_file
from loralab.network.merge import (
    LoraUse,
    apply_loras,
    fuse_loras,
    merge_loras,
    remove_loras,
    save_merged_checkpoint,
)
from loralab.network.targets import find_lora_target_details, find_lora_targets


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_components("sd15", seed=0)


@pytest.fixture(scope="module")
def sd15_outputs(sd15):
    return model_outputs(sd15)


def save(network: LoRANetwork, path: Path, family: ModelFamily = ModelFamily.SD1, dtype="fp32") -> Path:
    spec = network.spec or LOCON_SPEC
    return save_lora_file(path, network.state_dict(), build_lora_metadata(family=family, network=spec, title="t"), dtype)


def adapted_layers(components) -> list[AdaptedLayer]:
    models = [components.unet, *components.text_encoders]
    return [module for model in models for module in model.modules() if isinstance(module, AdaptedLayer)]


# --- targets and names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "conv", "expected"),
    [
        (ModelFamily.SD1, False, {"lora_unet": 192, "lora_te": 72}),
        (ModelFamily.SD1, True, {"lora_unet": 278, "lora_te": 72}),
        (ModelFamily.SDXL, False, {"lora_unet": 722, "lora_te1": 72, "lora_te2": 192}),
        (ModelFamily.SDXL, True, {"lora_unet": 788, "lora_te1": 72, "lora_te2": 192}),
    ],
)
def test_full_size_module_counts_match_sd_scripts(family, conv, expected) -> None:
    counts = dict.fromkeys(expected, 0)
    for name in find_lora_targets(full_size(family), conv=conv):
        counts[next(prefix for prefix in counts if name.startswith(prefix + "_"))] += 1
    assert counts == expected


def test_tiny_targets_use_diffusers_names_for_sd1_and_sgm_names_for_sdxl(sd15) -> None:
    sd1 = find_lora_targets(sd15, conv=True)
    assert isinstance(sd1["lora_unet_down_blocks_0_attentions_0_proj_in"], nn.Conv2d)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0" in sd1
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in sd1
    assert isinstance(sd1["lora_te_text_model_encoder_layers_1_self_attn_q_proj"], nn.Linear)

    sdxl = find_lora_targets(build_tiny_components("sdxl"), conv=True)
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q",
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_output_blocks_2_2_conv",  # upsampler after an attention row
        "lora_unet_input_blocks_3_0_op",  # downsampler
        "lora_unet_middle_block_2_emb_layers_1",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
        "lora_te2_text_model_encoder_layers_1_self_attn_out_proj",
    ):
        assert name in sdxl, name
    assert not any(name.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks")) for name in sdxl)


def test_sgm_names_round_trip_for_every_full_size_sdxl_target() -> None:
    components = full_size(ModelFamily.SDXL)
    config = components.unet.config
    examples = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
    }
    for diffusers_path, sgm_path in examples.items():
        assert diffusers_unet_path_to_sgm(diffusers_path, config) == sgm_path
    unet_paths = [t.module_path for t in find_lora_target_details(components, conv=True).values() if t.component == "unet"]
    assert len(unet_paths) == 788
    for path in unet_paths:
        assert sgm_unet_path_to_diffusers(diffusers_unet_path_to_sgm(path, config), config) == path


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("unet.mid_block.attentions.0.proj_in.lora_A.weight", ("unet", "mid_block.attentions.0.proj_in", "down")),
        ("unet.down_blocks.1.attentions.0.proj_out.lora_B.default.weight", ("unet", "down_blocks.1.attentions.0.proj_out", "up")),
        (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight",
            ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "down"),
        ),
        ("unet.up_blocks.1.resnets.0.conv1.lora.up.weight", ("unet", "up_blocks.1.resnets.0.conv1", "up")),
        ("unet.up_blocks.1.resnets.0.conv1.alpha", ("unet", "up_blocks.1.resnets.0.conv1", "alpha")),
        (
            "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight",
            ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", "up"),
        ),
        (
            "text_encoder_2.text_model.encoder.layers.3.mlp.fc1.lora_linear_layer.down.weight",
            ("text_encoder_2", "text_model.encoder.layers.3.mlp.fc1", "down"),
        ),
        ("base_model.model.encoder.layers.0.mlp.fc2.lora_A.weight", ("text_encoder", "encoder.layers.0.mlp.fc2", "down")),
        ("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight", None),
    ],
)
def test_diffusers_and_peft_keys_are_located(key, expected) -> None:
    parsed = parse_foreign_key(key)
    if expected is None:
        assert parsed is None
    else:
        assert (parsed.component, parsed.module_path, parsed.role) == expected


# --- the LoRA module -----------------------------------------------------------------------------------


def random_module(layer: nn.Module, rank: int, alpha: float | None, **dropouts) -> LoRAModule:
    module = LoRAModule(layer, rank, alpha, **dropouts)
    with torch.no_grad():
        module.lora_up.weight.normal_(0, 0.5)
    return module


def test_lora_module_computes_the_documented_formula() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = random_module(base, rank=3, alpha=1.5)
    lora.multiplier = 0.7
    host = AdaptedLayer(base)
    host.adapters["a"] = lora
    x = torch.randn(2, 4, 6)
    expected = base(x) + 0.7 * (1.5 / 3) * lora.lora_up(lora.lora_down(x))
    torch.testing.assert_close(host(x), expected)
    assert host.weight is base.weight  # code reading the layer's weight sees the original

    for missing_alpha in (0, None):  # alpha 0 or missing means alpha = rank: scale 1
        assert LoRAModule(base, 3, missing_alpha).scale == 1.0
    assert lora.state_dict().keys() == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert lora.state_dict()["alpha"].dim() == 0


def test_conv_lora_equals_the_conv_with_its_merged_weight() -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    lora = random_module(base, rank=2, alpha=3.0)
    host = AdaptedLayer(base)
    host.adapters["a"] = lora
    x = torch.randn(1, 4, 9, 9)
    merged = F.conv2d(x, base.weight + lora.delta_weight(), base.bias, stride=2, padding=1)
    torch.testing.assert_close(host(x), merged, rtol=1e-5, atol=1e-5)
    assert lora.lora_down.weight.shape == (2, 4, 3, 3) and lora.lora_up.weight.shape == (6, 2, 1, 1)
    # Linear and 1x1-conv deltas have the layer's shape as well.
    assert lora_delta_weight(torch.ones(2, 4), torch.ones(6, 2), 0.5).shape == (6, 4)
    assert lora_delta_weight(torch.ones(2, 4, 1, 1), torch.ones(6, 2, 1, 1), 0.5).shape == (6, 4, 1, 1)


def test_dropouts_act_only_in_training() -> None:
    torch.manual_seed(0)
    lora = random_module(nn.Linear(8, 8), rank=4, alpha=2.0, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    x = torch.randn(3, 5, 8)
    plain = lora.lora_up(lora.lora_down(x)) * lora.scale
    lora.eval()
    torch.testing.assert_close(lora(x), plain)
    lora.train()
    outputs = [lora(x) for _ in range(10)]
    assert any(out is None or not torch.allclose(out, plain) for out in outputs)


def test_network_dropout_acts_on_the_rank_channels() -> None:
    torch.manual_seed(0)
    lora = random_module(nn.Linear(8, 8), rank=4, alpha=2.0, dropout=0.25).train()
    x = torch.randn(3, 5, 8)
    torch.manual_seed(7)
    out = lora(x)
    torch.manual_seed(7)
    expected = lora.lora_up(F.dropout(lora.lora_down(x), p=0.25)) * lora.scale
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(("layer", "x"), [(nn.Linear(8, 6), (3, 5, 8)), (nn.Conv2d(8, 6, 3, padding=1), (3, 8, 4, 4))])
def test_rank_dropout_masks_ranks_per_sample_and_rescales(layer, x) -> None:
    torch.manual_seed(0)
    lora = random_module(layer, rank=4, alpha=2.0, rank_dropout=0.5).train()
    x = torch.randn(*x)
    torch.manual_seed(3)
    out = lora(x)
    torch.manual_seed(3)
    keep = (torch.rand(3, 4) > 0.5).float()
    hidden = lora.lora_down(x)
    hidden = hidden * (keep[:, None, :] if hidden.dim() == 3 else keep[:, :, None, None])
    torch.testing.assert_close(out, lora.lora_up(hidden) * lora.scale / (1 - 0.5))


def test_module_dropout_skips_the_whole_lora_at_its_rate() -> None:
    torch.manual_seed(0)
    lora = random_module(nn.Linear(8, 8), rank=4, alpha=2.0, module_dropout=0.3).train()
    skipped = sum(lora(torch.randn(2, 8)) is None for _ in range(400))
    assert 80 < skipped < 160  # 0.3 * 400 = 120


def test_network_spec_sets_sd_scripts_ranks_alphas_and_dropouts(sd15) -> None:
    spec = NetworkSpec(rank=4, alpha=2.5, conv_rank=3, conv_alpha=1.5, dropout=0.1, rank_dropout=0.2, module_dropout=0.3)
    network = LoRANetwork.create(sd15, spec)
    targets = find_lora_target_details(sd15, conv=True)
    assert network.lora_modules().keys() == targets.keys()
    for name, module in network.lora_modules().items():
        conv3x3 = targets[name].is_conv3x3
        assert (module.rank, float(module.alpha)) == ((3, 1.5) if conv3x3 else (4, 2.5)), name
        assert (module.dropout, module.rank_dropout, module.module_dropout) == (0.1, 0.2, 0.3)
        assert torch.count_nonzero(module.lora_up.weight) == 0  # a new LoRA changes nothing yet
    # ResNet linear/1x1 layers take the network rank, as in sd-scripts' conv mode.
    assert network.lora_modules()["lora_unet_down_blocks_0_resnets_0_time_emb_proj"].rank == 4
    assert json.loads(spec.to_metadata()["ss_network_args"]) == {
        "conv_dim": "3", "conv_alpha": "1.5", "rank_dropout": "0.2", "module_dropout": "0.3", "dropout": 0.1
    }


def test_train_unet_only_or_text_encoder_only(sd15) -> None:
    unet_only = LoRANetwork.create(sd15, NetworkSpec(train_text_encoder=False))
    assert unet_only.lora_modules() and all(n.startswith("lora_unet_") for n in unet_only.lora_modules())
    te_only = LoRANetwork.create(sd15, NetworkSpec(train_unet=False))
    assert te_only.lora_modules() and all(n.startswith("lora_te_") for n in te_only.lora_modules())
    groups = random_network(sd15).param_groups(default_lr=1e-4, text_encoder_lr=5e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("text_encoder", 5e-5), ("unet", 1e-4)]
    for bad in ({"rank": 0}, {"dropout": 1.0}, {"train_unet": False, "train_text_encoder": False}):
        with pytest.raises(ConfigError):
            NetworkSpec(**bad)


# --- applying, switching, merging -------------------------------------------------------------------------


def test_apply_remove_and_switch_without_reloading_the_base(sd15, sd15_outputs) -> None:
    originals = dict(sd15.unet.named_modules())
    first, second = random_network(sd15, seed=1), random_network(sd15, NetworkSpec(rank=2, alpha=4.0), seed=2)

    first.apply_to(sd15, adapter_name="first")
    with_first = model_outputs(sd15)
    assert min(max_difference(with_first, sd15_outputs).values()) > 1e-2
    first.remove()
    assert max_difference(model_outputs(sd15), sd15_outputs) == dict.fromkeys(sd15_outputs, 0.0)
    assert adapted_layers(sd15) == []
    assert all(module is originals[name] for name, module in sd15.unet.named_modules())

    # Two at once equal both merged; removing them in any order restores the base.
    second.apply_to(sd15, adapter_name="second")
    first.apply_to(sd15, adapter_name="first")
    both = model_outputs(sd15)
    merged = build_tiny_components("sd15", seed=0)
    merge_loras(merged, [LoraUse(first), LoraUse(second)])
    assert max(max_difference(both, model_outputs(merged)).values()) < 1e-5
    second.remove()
    assert max(max_difference(model_outputs(sd15), with_first).values()) < 1e-6
    first.remove()
    assert max_difference(model_outputs(sd15), sd15_outputs) == dict.fromkeys(sd15_outputs, 0.0)


def test_multipliers_scale_each_part(sd15, sd15_outputs) -> None:
    network = random_network(sd15)
    network.apply_to(sd15)
    try:
        network.set_multiplier(0.5, unet=0.4, text_encoder=2.0)
        for name, module in network.lora_modules().items():
            assert module.multiplier == pytest.approx(0.2 if name.startswith("lora_unet_") else 1.0)
        network.set_multiplier(0.0)
        assert max_difference(model_outputs(sd15), sd15_outputs) == dict.fromkeys(sd15_outputs, 0.0)
        network.set_multiplier(1.0, unet=0.0, text_encoder=1.0)  # text encoder LoRA only
        te_only = model_outputs(sd15)
    finally:
        network.remove()
    merged = build_tiny_components("sd15", seed=0)
    merge_loras(merged, [LoraUse(network, unet_multiplier=0.0)])
    assert max(max_difference(te_only, model_outputs(merged)).values()) < 1e-5
    assert te_only["text_encoder_0"].ne(sd15_outputs["text_encoder_0"]).any()


def test_lora_made_on_checkpoint_a_applies_to_checkpoint_b(tmp_path: Path) -> None:
    a = load_checkpoint(make_tiny("sd15", "single-file", tmp_path / "a.safetensors", seed=0))
    b = load_checkpoint(make_tiny("sd15", "diffusers", tmp_path / "b", seed=1))
    path = save(random_network(a), tmp_path / "lora.safetensors")
    before = model_outputs(b)
    networks = apply_loras(b, [LoraUse(read_lora_file(path))])
    after = model_outputs(b)
    remove_loras(networks)
    assert min(max_difference(after, before).values()) > 1e-2
    merge_loras(b, [LoraUse(read_lora_file(path))])
    assert max(max_difference(model_outputs(b), after).values()) < 1e-5


def _conv3x3_only(network: LoRANetwork) -> LoRANetwork:
    """The network's LoRAs on 3x3 convs only (ResNet blocks, down/upsamplers)."""
    modules = {
        name: module
        for name, module in network.lora_modules().items()
        if isinstance(module.lora_down, nn.Conv2d) and module.lora_down.kernel_size != (1, 1)
    }
    assert modules
    return LoRANetwork(modules, family=network.family)


def _fuse_cases(components) -> dict[str, list[LoraUse]]:
    linear = random_network(components, NetworkSpec(rank=4, alpha=2.5), seed=3)  # Linear and 1x1-conv layers
    return {
        "linear": [LoraUse(linear, multiplier=0.8)],
        "conv3x3": [LoraUse(_conv3x3_only(random_network(components, seed=4)))],
        "two_at_once": [
            LoraUse(random_network(components, seed=1), multiplier=0.7),
            LoraUse(
                random_network(components, NetworkSpec(rank=2, alpha=4.0), seed=2),
                unet_multiplier=1.3,
                text_encoder_multiplier=0.5,
            ),
        ],
    }


@pytest.mark.parametrize("case", ["linear", "conv3x3", "two_at_once"])
def test_fused_loras_give_the_live_adapters_outputs_and_restore_bit_exactly(case: str) -> None:
    components = build_tiny_components("sd15", seed=0)
    base_outputs, before = model_outputs(components), weight_digests(components)
    uses = _fuse_cases(components)[case]
    live = apply_loras(components, uses)
    expected = model_outputs(components)
    remove_loras(live)
    assert max(max_difference(expected, base_outputs).values()) > 1e-2  # the LoRAs change the outputs

    fused = fuse_loras(components, uses)
    assert adapted_layers(components) == []  # the LoRAs are in the weights, not next to them
    changed = {key for key, digest in weight_digests(components).items() if digest != before[key]}
    layers = {name for use in uses for name in use.lora.lora_modules()}
    assert len(changed) == fused.layer_count == len(layers) > 0
    assert all(key.endswith(".weight") for key in changed)  # biases untouched
    outputs = model_outputs(components)
    for key, value in expected.items():  # fp32: only the order of the sums differs
        assert (outputs[key] - value).abs().max() <= 1e-5 * value.abs().max(), key

    merged = build_tiny_components("sd15", seed=0)
    merge_loras(merged, uses)
    assert weight_digests(merged) == weight_digests(components)  # one delta computation for both

    fused.restore()
    assert weight_digests(components) == before and fused.layer_count == 0
    fused.restore()  # a second restore changes nothing
    assert weight_digests(components) == before


def test_fusing_at_weight_zero_touches_nothing_and_fp16_restores_bit_exactly(monkeypatch) -> None:
    components = build_tiny_components("sd15", seed=0)
    for model in (components.unet, *components.text_encoders):
        model.to(torch.float16)
    before = weight_digests(components)
    network = random_network(components, seed=5)
    assert fuse_loras(components, [LoraUse(network, multiplier=0.0)]).layer_count == 0
    assert weight_digests(components) == before

    text_encoder_only = fuse_loras(components, [LoraUse(network, unet_multiplier=0.0)])
    assert text_encoder_only.layer_count == len(network.lora_modules("text_encoder"))
    assert all(digest == before[key] for key, digest in weight_digests(components).items() if key.startswith("unet."))
    name = next(iter(network.lora_modules("text_encoder")))
    assert find_lora_targets(components)[name].weight.dtype == torch.float16  # fused in the weight's dtype
    assert weight_digests(components) != before
    text_encoder_only.restore()
    assert weight_digests(components) == before  # copied back, not subtracted (fp16 would not round-trip)

    # A failure part way (here: the 5th layer's delta) restores the layers fused before it.
    calls = {"count": 0}
    original = LoRAModule.delta_weight

    def failing(self: LoRAModule, multiplier: float | None = None) -> torch.Tensor:
        calls["count"] += 1
        if calls["count"] == 5:
            raise RuntimeError("out of memory")
        return original(self, multiplier)

    monkeypatch.setattr(LoRAModule, "delta_weight", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        fuse_loras(components, [LoraUse(network)])
    assert calls["count"] == 5 and weight_digests(components) == before


def test_lora_for_another_family_is_refused_naming_both(sd15, tmp_path: Path) -> None:
    sdxl = build_tiny_components("sdxl")
    sd1_lora = read_lora_file(save(random_network(sd15), tmp_path / "sd1.safetensors"))
    sdxl_lora = read_lora_file(save(random_network(sdxl), tmp_path / "sdxl.safetensors", ModelFamily.SDXL))
    assert (sd1_lora.family, sdxl_lora.family) == (ModelFamily.SD1, ModelFamily.SDXL)
    for lora, components in ((sd1_lora, sdxl), (sdxl_lora, sd15)):
        with pytest.raises(LoraFileError) as error:
            apply_loras(components, [LoraUse(lora)])
        message = str(error.value)
        assert "SD1.x" in message and "SDXL" in message and "\n" not in message
    assert adapted_layers(sd15) == [] and adapted_layers(sdxl) == []


@pytest.mark.parametrize(("tiny", "family"), [("sd15", ModelFamily.SD1), ("sd2v", ModelFamily.SD2), ("sdxl", ModelFamily.SDXL)])
def test_family_is_read_from_keys_and_shapes_alone(tiny, family, tmp_path: Path) -> None:
    network = random_network(build_tiny_components(tiny), NetworkSpec())
    path = save_lora_file(tmp_path / "lora.safetensors", network.state_dict(), {})  # no metadata to go by
    assert read_lora_file(path).family is family


def test_modules_that_match_nothing_are_reported_never_dropped(sd15, tmp_path: Path, caplog) -> None:
    tensors = random_network(sd15).state_dict()
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.ones(4, 32)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.ones(32, 4)
    lora = read_lora_file(save_lora_file(tmp_path / "extra.safetensors", tensors, {}))
    with pytest.raises(LoraFileError, match="down_blocks_9"):
        LoRANetwork.from_lora_file(lora, sd15)
    with caplog.at_level(logging.WARNING, logger="loralab.network.lora"):
        network = LoRANetwork.from_lora_file(lora, sd15, strict=False)
    assert network.unmatched == ["lora_unet_down_blocks_9_attentions_0_proj_in"]
    assert "down_blocks_9" in caplog.text


def test_merged_checkpoint_saves_as_single_file_and_reloads(sd15, tmp_path: Path) -> None:
    components = build_tiny_components("sd15", seed=0)
    lora_path = save(random_network(components), tmp_path / "lora.safetensors")
    uses = [LoraUse(read_lora_file(lora_path), multiplier=0.8)]
    networks = apply_loras(components, uses)
    with pytest.raises(RuntimeError):
        save_merged_checkpoint(components, tmp_path / "merged.safetensors")
    remove_loras(networks)
    merge_loras(components, uses)
    path = save_merged_checkpoint(components, tmp_path / "merged.safetensors", dtype=torch.float32, merged=uses)
    reloaded = load_checkpoint(path)
    assert reloaded.family is ModelFamily.SD1
    assert max(max_difference(model_outputs(reloaded), model_outputs(components)).values()) == 0.0
    with safetensors.safe_open(path, "pt") as handle:
        assert json.loads(handle.metadata()["loralab_merged_loras"])[0]["multiplier"] == 0.8


# --- the file ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_file_holds_only_lora_tensors_in_the_save_precision(sd15, tmp_path: Path, precision, dtype) -> None:
    network = random_network(sd15)
    path = save(network, tmp_path / "lora.safetensors", dtype=precision)
    with safetensors.safe_open(path, "pt") as handle:
        keys = list(handle.keys())
        assert all(key.startswith(("lora_unet_", "lora_te_")) for key in keys)
        assert {handle.get_tensor(key).dtype for key in keys} == {dtype}
        assert all(isinstance(value, str) for value in handle.metadata().values())
        assert handle.get_tensor("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha").shape == ()
    loaded = read_lora_file(path)
    assert loaded.tensors.keys() == network.state_dict().keys()
    for key, tensor in network.state_dict().items():
        torch.testing.assert_close(loaded.tensors[key].float(), tensor.to(dtype).float())
    with pytest.raises(ValueError):
        save_lora_file(tmp_path / "bad.safetensors", {"unet.conv_in.weight": torch.ones(1)}, {})
    with pytest.raises(TypeError):
        save_lora_file(tmp_path / "bad.safetensors", network.state_dict(), {"ss_steps": 3})


def test_write_is_atomic(sd15, tmp_path: Path, monkeypatch) -> None:
    path = save(random_network(sd15), tmp_path / "lora.safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save(random_network(sd15, seed=5), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_old_file_without_alpha_means_alpha_equals_rank(sd15, tmp_path: Path) -> None:
    tensors = {k: v for k, v in random_network(sd15).state_dict().items() if not k.endswith(".alpha")}
    lora = read_lora_file(save_lora_file(tmp_path / "old.safetensors", tensors, {}))
    network = LoRANetwork.from_lora_file(lora, sd15)
    assert all(module.scale == 1.0 for module in network.lora_modules().values())
    assert all(weights.alpha == weights.down.shape[0] for weights in lora.modules().values())


def test_metadata_has_what_lora_cards_show() -> None:
    training = {
        "ss_output_name": "blh",
        "ss_steps": 1100,
        "ss_learning_rate": 1.0,
        "ss_unet_lr": None,
        "ss_resolution": (512, 512),
        "ss_tag_frequency": {"1_blh woman": {"blh woman": 33}},
        "ss_noise_offset": 0.05,
    }
    metadata = build_lora_metadata(
        family=ModelFamily.SD1,
        network=NetworkSpec(rank=32, alpha=16.0),
        title="blh",
        resolution=(512, 768),
        clip_skip=2,
        extra_fields=training,
        timestamp=0,
    )
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("32", "16.0")
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sd_v1", "False")
    assert metadata["ss_steps"] == "1100" and metadata["ss_unet_lr"] == "None"
    assert metadata["ss_resolution"] == "(512, 512)"
    assert json.loads(metadata["ss_tag_frequency"]) == training["ss_tag_frequency"]
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.resolution"] == "512x768"
    assert metadata["modelspec.encoder_layer"] == "2"
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["modelspec.date"] == datetime.datetime.fromtimestamp(0).isoformat()

    sd2v = build_lora_metadata(family=ModelFamily.SD2, network=NetworkSpec(), title="x", v_prediction=True)
    assert (sd2v["ss_base_model_version"], sd2v["ss_v2"]) == ("sd_v2_v", "True")
    assert sd2v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert (sd2v["modelspec.prediction_type"], sd2v["modelspec.resolution"]) == ("v", "768x768")
    sdxl = build_lora_metadata(family=ModelFamily.SDXL, network=NetworkSpec(), title="x")
    assert sdxl["ss_base_model_version"] == "sdxl_base_v1-0"
    assert sdxl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert sdxl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert "ss_network_args" not in sdxl


def test_hashes_follow_the_saved_tensors(sd15, tmp_path: Path) -> None:
    first = save(random_network(sd15, seed=1), tmp_path / "a.safetensors")
    second = save(random_network(sd15, seed=2), tmp_path / "b.safetensors")
    hashes = [read_lora_file(p).metadata for p in (first, second)]
    assert hashes[0]["sshs_model_hash"] != hashes[1]["sshs_model_hash"]
    assert len(hashes[0]["sshs_model_hash"]) == 64 and len(hashes[0]["sshs_legacy_hash"]) == 8


def _error_line(path: Path) -> str:
    with pytest.raises(LoraFileError) as error:
        read_lora_file(path)
    message = str(error.value)
    assert "\n" not in message and path.name in message
    return message


def test_broken_files_give_one_clear_line(sd15, tmp_path: Path) -> None:
    good = save(random_network(sd15), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated" in _error_line(truncated)
    header_cut = tmp_path / "header_cut.safetensors"
    header_cut.write_bytes(good.read_bytes()[:100])
    assert "truncated" in _error_line(header_cut)

    pickle = tmp_path / "lora.safetensors"
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(1)}, pickle)
    assert "not a safetensors file" in _error_line(pickle)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    assert "not a safetensors file" in _error_line(text)

    checkpoint = tmp_path / "checkpoint.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.out.2.weight": torch.ones(2, 2)}, checkpoint)
    assert "no LoRA weights" in _error_line(checkpoint)

    assert "not found" in _error_line(tmp_path / "missing.safetensors")

