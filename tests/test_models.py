"""Checkpoint loading: single files and diffusers folders of tiny SD1.5 / SD2-v / SDXL models,
full-size layouts on the meta device, a full-size SD1.5 file (slow), and bad inputs."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loralab.cli.main import main
from loralab.errors import CheckpointError
from loralab.models.architecture import (
    build_empty_model,
    bundled_config,
    infer_text_encoder_sizes,
    infer_unet_sizes,
    infer_vae_sizes,
    text_encoder_config,
    unet_config,
    vae_config,
)
from loralab.models.checkpoint_file import read_state_dict
from loralab.models.family import LDM_UNET_PREFIX, LDM_VAE_PREFIX, ModelFamily, detect_family
from loralab.models.loading import inspect_checkpoint, load_checkpoint
from loralab.models.single_file import (
    diffusers_to_ldm_unet_name,
    text_encoder_ldm_to_diffusers,
    to_single_file_state_dict,
    unet_ldm_to_diffusers,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
)
from loralab.models.tiny import build_tiny_components, make_tiny, write_random_full_size

TINY = {"sd15": (ModelFamily.SD1, False), "sd2v": (ModelFamily.SD2, True), "sdxl": (ModelFamily.SDXL, False)}


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    """(name, single-file path, diffusers folder) of one tiny model, same weights in both."""
    root = tmp_path_factory.mktemp(request.param)
    single = make_tiny(request.param, "single-file", root / f"{request.param}.safetensors", seed=7)
    folder = make_tiny(request.param, "diffusers", root / "diffusers", seed=7)
    return request.param, single, folder


@pytest.fixture(scope="module")
def loaded(tiny):
    """The tiny model loaded from its single file and from its diffusers folder (read-only use)."""
    _, single, folder = tiny
    return load_checkpoint(single), load_checkpoint(folder)


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    return make_tiny("sd15", "single-file", tmp_path_factory.mktemp("sd15") / "sd15.safetensors", seed=3)


def _state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@torch.no_grad()
def _denoise_once(components) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt -> text encoders -> one UNet step (with SDXL's size conditioning) -> VAE decode."""
    ids = [
        t(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        for t in components.tokenizers
    ]
    outputs = [encoder(i) for encoder, i in zip(components.text_encoders, ids)]
    states = torch.cat([o.last_hidden_state for o in outputs], dim=-1)
    added = None
    if components.family is ModelFamily.SDXL:
        added = {"text_embeds": outputs[1].text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prediction = components.unet(latents, 10, encoder_hidden_states=states, added_cond_kwargs=added).sample
    image = components.vae.decode(latents / components.vae.config.scaling_factor).sample
    return prediction, image


# ---------------------------------------------------------------------------------------------
# Tiny models: both formats load into the same modules


def test_single_file_and_diffusers_folder_load_the_same_model(tiny, loaded):
    name = tiny[0]
    family, v_prediction = TINY[name]
    a, b = loaded
    for loaded in (a, b):
        assert loaded.family is family and loaded.v_prediction is v_prediction
        assert loaded.noise_scheduler.config.prediction_type == ("v_prediction" if v_prediction else "epsilon")
        assert len(loaded.text_encoders) == len(loaded.tokenizers) == (2 if family is ModelFamily.SDXL else 1)
    assert _public(a.unet.config) == _public(b.unet.config)
    assert _public(a.vae.config) == _public(b.vae.config)
    for model_a, model_b in [(a.unet, b.unet), (a.vae, b.vae), *zip(a.text_encoders, b.text_encoders)]:
        assert type(model_a) is type(model_b) and _state_dicts_equal(model_a, model_b)
    (pred_a, image_a), (pred_b, image_b) = _denoise_once(a), _denoise_once(b)
    assert torch.equal(pred_a, pred_b) and torch.equal(image_a, image_b)
    assert pred_a.std() > 0
    # The comparison can fail: another seed's model predicts something else.
    other = build_tiny_components(name, seed=8)
    assert not torch.allclose(_denoise_once(other)[0], pred_a)


def test_a_diffusers_folder_loads_into_aligned_memory(loaded):
    # diffusers leaves tensors at the file's 8-byte offsets; CPU kernels may then compute otherwise.
    for components in loaded:
        modules = (components.unet, components.vae, *components.text_encoders)
        tensors = [t for module in modules for t in (*module.parameters(), *module.buffers())]
        assert [t.data_ptr() % 64 for t in tensors] == [0] * len(tensors)


def test_diffusers_own_single_file_reader_round_trips_our_files(tiny, loaded):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    name, single, folder = tiny
    pipeline_class = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    theirs = pipeline_class.from_single_file(str(single), config=str(folder), local_files_only=True)
    ours = loaded[1]
    their_encoders = [theirs.text_encoder] + ([theirs.text_encoder_2] if name == "sdxl" else [])
    for model_a, model_b in [
        (theirs.unet, ours.unet),
        (theirs.vae, ours.vae),
        *zip(their_encoders, ours.text_encoders),
    ]:
        assert _state_dicts_equal(model_a, model_b), type(model_a).__name__


def test_tokenizers_pad_as_each_text_encoder_expects(tiny, loaded):
    expected = {"sd15": [49407], "sd2v": [0], "sdxl": [49407, 0]}[tiny[0]]
    for components in loaded:  # built in for the single file, the folder's own for diffusers
        assert [t.pad_token_id for t in components.tokenizers] == expected


def test_sdxl_tiny_keeps_the_real_block_structure(tmp_path):
    components = build_tiny_components("sdxl")
    config = components.unet.config
    assert config.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert config.addition_embed_type == "text_time" and config.transformer_layers_per_block == [1, 2]
    assert [type(t).__name__ for t in components.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    keys = read_state_dict(make_tiny("sdxl", "single-file", tmp_path / "xl.safetensors")).keys()
    # The SGM names real SDXL files (and kohya's SDXL LoRA names) use.
    for key in (
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
    ):
        assert key in keys, key


def test_tiny_weights_depend_on_the_seed_only():
    a, b, c = build_tiny_components("sd15", 1), build_tiny_components("sd15", 1), build_tiny_components("sd15", 2)
    assert _state_dicts_equal(a.unet, b.unet) and not _state_dicts_equal(a.unet, c.unet)


def test_make_tiny_and_inspect_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "sd2v.safetensors"
    assert main(["debug", "make-tiny", "--family", "sd2v", "--format", "single-file", "--out", str(out)]) == 0
    assert main(["debug", "inspect-checkpoint", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "family: SD2.x" in printed and "prediction type: v_prediction" in printed
    assert "cross_attention_dim=32" in printed
    # An existing file (here the one just written) is kept unless --force.
    before = out.read_bytes()
    assert main(["debug", "make-tiny", "--family", "sd15", "--format", "single-file", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Loading options


def test_ckpt_loads_through_weights_only_unpickling(sd15_file, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": read_state_dict(sd15_file), "global_step": 3, "epoch": 1}, ckpt)
    assert _state_dicts_equal(load_checkpoint(ckpt).unet, load_checkpoint(sd15_file).unet)


def test_files_are_read_by_content_not_by_name(sd15_file, tmp_path):
    state = read_state_dict(sd15_file)
    (tmp_path / "renamed.ckpt").write_bytes(sd15_file.read_bytes())
    torch.save(state, tmp_path / "pickled.safetensors")
    for path in (tmp_path / "renamed.ckpt", tmp_path / "pickled.safetensors"):
        reread = read_state_dict(path)
        assert reread.keys() == state.keys() and all(torch.equal(reread[k], state[k]) for k in state)


def test_dtype_and_legacy_position_ids(sd15_file, tmp_path):
    state = read_state_dict(sd15_file)
    # Many SD1 files carry this (non-persistent in current transformers) buffer.
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, tmp_path / "with_ids.safetensors")
    loaded = load_checkpoint(tmp_path / "with_ids.safetensors", dtype=torch.float16)
    assert loaded.unet.dtype == loaded.vae.dtype == loaded.text_encoders[0].dtype == torch.float16


def test_v_prediction_comes_from_marker_or_argument(tiny):
    name, single, folder = tiny
    family, marked = TINY[name]
    for path in (single, folder):  # inspect_checkpoint decides exactly as load_checkpoint does
        assert inspect_checkpoint(path).v_prediction is marked
        assert inspect_checkpoint(path, v_parameterization=False).v_prediction is False  # explicit wins
        if family is not ModelFamily.SD1:
            assert inspect_checkpoint(path, v_parameterization=True).v_prediction is True


def test_vae_override_file_and_folder(sd15_file, tmp_path):
    replacement = build_tiny_components("sd15", seed=99).vae
    # Like vae-ft-mse-840000-ema-pruned.safetensors: original VAE keys without first_stage_model.
    ldm = vae_diffusers_to_ldm(replacement.state_dict(), replacement.config, prefix="")
    assert "encoder.down.0.block.0.conv1.weight" in ldm and "encoder.mid.attn_1.q.weight" in ldm
    vae_file = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.items()}, vae_file)
    replacement.save_pretrained(str(tmp_path / "vae_folder"))

    own = load_checkpoint(sd15_file).vae
    for override in (vae_file, tmp_path / "vae_folder"):
        loaded = load_checkpoint(sd15_file, vae_path=override).vae
        assert _state_dicts_equal(loaded, replacement) and not _state_dicts_equal(loaded, own)


def test_tokenizer_path_overrides_the_built_in_one(sd15_file, tmp_path):
    build_tiny_components("sd15").tokenizers[0].save_pretrained(str(tmp_path / "tok"))
    loaded = load_checkpoint(sd15_file, tokenizer_path=tmp_path / "tok")
    assert loaded.tokenizers[0]("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]


# ---------------------------------------------------------------------------------------------
# Full-size layouts, on the meta device (shapes only)


@pytest.mark.parametrize("family", list(ModelFamily))
def test_full_size_layouts_round_trip_and_give_back_the_published_configs(family):
    unet_cfg, vae_cfg = bundled_config(family, "unet"), bundled_config(family, "vae")
    encoders = family.spec.text_encoders
    te_cfgs = [bundled_config(family, e.config_name) for e in encoders]
    unet = build_empty_model("unet", unet_cfg).state_dict()
    vae = build_empty_model("vae", vae_cfg).state_dict()
    tes = [build_empty_model("text_encoder", c, e).state_dict() for e, c in zip(encoders, te_cfgs)]
    ldm = to_single_file_state_dict((unet, unet_cfg), (vae, vae_cfg), list(zip(tes, encoders)))
    assert detect_family(ldm) is family

    def same_layout(converted, original):
        return converted.keys() == original.keys() and all(
            converted[k].shape == original[k].shape for k in original
        )

    # Our original-layout writer is inverted exactly by diffusers' readers...
    assert same_layout(
        unet_ldm_to_diffusers({k: v for k, v in ldm.items() if k.startswith(LDM_UNET_PREFIX)}, unet_cfg), unet
    )
    assert same_layout(
        vae_ldm_to_diffusers({k: v for k, v in ldm.items() if k.startswith(LDM_VAE_PREFIX)}, vae_cfg), vae
    )
    for encoder, state in zip(encoders, tes):
        assert same_layout(text_encoder_ldm_to_diffusers(ldm, encoder), state)
    # ...and the sizes read back from the shapes rebuild the published configs.
    pooled = te_cfgs[-1]["projection_dim"] if family is ModelFamily.SDXL else None
    unet_sizes = infer_unet_sizes({k.removeprefix(LDM_UNET_PREFIX): v for k, v in ldm.items()})
    assert unet_config(family, unet_sizes, pooled_dim=pooled) == unet_cfg
    vae_sizes = infer_vae_sizes({k.removeprefix(LDM_VAE_PREFIX): v for k, v in ldm.items()})
    assert vae_config(family, vae_sizes) == vae_cfg
    for encoder, config in zip(encoders, te_cfgs):
        sizes = infer_text_encoder_sizes(text_encoder_ldm_to_diffusers(ldm, encoder))
        assert text_encoder_config(family, encoder, sizes) == config


def test_sd2_files_last_openclip_layer_is_left_out():
    """SD2 conditions on OpenCLIP's penultimate layer: real files hold 24 layers, the model 23."""
    family, encoder = ModelFamily.SD2, ModelFamily.SD2.spec.text_encoders[0]
    config = bundled_config(family, "text_encoder")
    ldm = to_single_file_state_dict(
        (build_empty_model("unet", bundled_config(family, "unet")).state_dict(), bundled_config(family, "unet")),
        (build_empty_model("vae", bundled_config(family, "vae")).state_dict(), bundled_config(family, "vae")),
        [(build_empty_model("text_encoder", config, encoder).state_dict(), encoder)],
    )
    last = {k.replace("resblocks.22.", "resblocks.23."): v for k, v in ldm.items() if "resblocks.22." in k}
    sizes = infer_text_encoder_sizes(text_encoder_ldm_to_diffusers({**ldm, **last}, encoder))
    assert sizes.num_hidden_layers == 23


def test_sgm_names_of_sdxl_unet_modules():
    config = bundled_config(ModelFamily.SDXL, "unet")
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
        ),
        "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "mid_block.attentions.0.transformer_blocks.9.attn2.to_k": "middle_block.1.transformer_blocks.9.attn2.to_k",
        "up_blocks.0.attentions.2.proj_out": "output_blocks.2.1.proj_out",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    assert {name: diffusers_to_ldm_unet_name(name, config) for name in expected} == expected


def test_family_detection_without_text_encoders():
    sd1 = build_empty_model("unet", bundled_config(ModelFamily.SD1, "unet")).state_dict()
    sd2 = build_empty_model("unet", bundled_config(ModelFamily.SD2, "unet")).state_dict()
    assert detect_family(sd1) is ModelFamily.SD1 and detect_family(sd2) is ModelFamily.SD2
    assert detect_family({f"unet.{k}": v for k, v in sd2.items()}) is ModelFamily.SD2
    assert detect_family({"model.diffusion_model.label_emb.0.0.weight": torch.empty(1, 1)}) is ModelFamily.SDXL
    with pytest.raises(CheckpointError, match="refiner"):
        detect_family({"conditioner.embedders.0.model.positional_embedding": torch.empty(77, 1280)})


@pytest.mark.slow
def test_full_size_sd15_single_file_loads_and_is_detected(tmp_path):
    path = write_random_full_size(ModelFamily.SD1, tmp_path / "sd15-full.safetensors", dtype=torch.float16)
    try:
        info = inspect_checkpoint(path)
        assert info.family is ModelFamily.SD1 and info.dtypes["unet"] == "float16"
        assert info.parameter_counts["unet"] == 859_520_964  # the published SD1.5 UNet size
        loaded = load_checkpoint(path, dtype=torch.float16)
        assert loaded.family is ModelFamily.SD1 and not loaded.v_prediction
        assert loaded.unet.config.block_out_channels == [320, 640, 1280, 1280]
        assert loaded.text_encoders[0].config.hidden_size == 768 and loaded.unet.dtype == torch.float16
        key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        with safe_open(str(path), "pt") as handle:  # weights land where they belong
            stored = handle.get_tensor(key)
        assert torch.equal(
            loaded.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight, stored
        )
    finally:
        path.unlink()  # 2 GB: do not leave it among pytest's kept temporary folders


# ---------------------------------------------------------------------------------------------
# Bad input: one line, and exit 2 from the command line


class _RunsCodeWhenUnpickled:
    """Pickles as a call to ``open(marker, "w")``: unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_inputs(tmp_path, sd15_file):
    data = sd15_file.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    lora["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"] = torch.tensor(4.0)
    save_file(lora, tmp_path / "my_lora.safetensors")
    save_file({"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)}, tmp_path / "unknown.safetensors")
    vae_only = {
        k.removeprefix(LDM_VAE_PREFIX): v
        for k, v in read_state_dict(sd15_file).items()
        if k.startswith(LDM_VAE_PREFIX)
    }
    save_file(vae_only, tmp_path / "a_vae.safetensors")
    torch.save({"state_dict": {}, "payload": _RunsCodeWhenUnpickled(tmp_path / "pwned")}, tmp_path / "evil.ckpt")
    (tmp_path / "damaged.ckpt").write_bytes(b"\x80\x02R.")  # protocol 2, then REDUCE on an empty stack
    return {
        "missing": (tmp_path / "nope.safetensors", {}, "not found"),
        "truncated": (tmp_path / "truncated.safetensors", {}, "truncated or corrupt"),
        "lora": (tmp_path / "my_lora.safetensors", {}, "is a LoRA file, not a model checkpoint; give a full checkpoint here and apply the LoRA"),
        "unknown keys": (tmp_path / "unknown.safetensors", {}, "not a Stable Diffusion checkpoint"),
        "vae as checkpoint": (tmp_path / "a_vae.safetensors", {}, "is a VAE.*--vae, or vae in a training config"),
        "malicious pickle": (tmp_path / "evil.ckpt", {}, r"refusing to load.*\(io\.open\).*safetensors"),
        "damaged pickle": (tmp_path / "damaged.ckpt", {}, "not a readable checkpoint.*truncated or corrupt"),
        "v-pred on SD1": (sd15_file, {"v_parameterization": True}, "SD1.x checkpoint.*epsilon"),
        "folder without model_index": (tmp_path, {}, "without model_index.json"),
    }


BAD_INPUTS = [
    "missing", "truncated", "lora", "unknown keys", "vae as checkpoint", "malicious pickle", "damaged pickle",
    "v-pred on SD1", "folder without model_index",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_clear_line(case, tmp_path, sd15_file, capsys):
    path, options, message = _bad_inputs(tmp_path, sd15_file)[case]
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path, **options)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "pwned").exists()  # the refused pickle ran nothing

    argv = ["debug", "inspect-checkpoint", str(path)] + (["--v-parameterization"] if options else [])
    assert main(argv) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: ")
