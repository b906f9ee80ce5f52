"""``train(..., base_model=...)``: a run trains on a base model loaded once by its caller (a sweep)
exactly as on one it loads itself, and hands it back as it was lent on every way out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loralab.errors import ConfigError
from loralab.models.loading import load_checkpoint
from loralab.models.tiny import make_tiny
from loralab.network.lora import AdaptedLayer
from loralab.sweep.model_pool import frozen_digest
from loralab.train.faults import NonFiniteLossError
from loralab.train.loop import LoopHooks, StepReport
from loralab.train.run import train
from train_support import lora_tensors, make_dataset, max_tensor_difference, series, tiny_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("lent")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORALAB_CACHE_DIR", str(root / "cache"))
        checkpoint = make_tiny("sd15", "single-file", root / "tiny.safetensors")
        data = make_dataset(root, images=4, repeats=1)
        # Every change a run makes to the model it trains: VAE cast (bf16 weights, fp32 VAE),
        # gradient checkpointing and train mode, the attention kernel, LoRA on UNet and text encoder.
        config = tiny_config(
            checkpoint, data, max_train_epochs=1, mixed_precision="bf16", no_half_vae=True,
            gradient_checkpointing=True, xformers=True,
        )  # fmt: skip
        yield SimpleNamespace(root=root, checkpoint=checkpoint, config=config)


def _lent_model(workspace):
    components = load_checkpoint(workspace.checkpoint, dtype=torch.bfloat16)
    for module in (components.unet, components.vae, *components.text_encoders):
        module.requires_grad_(False)
    return components


def _as_lent(components) -> dict:
    """What must be the same before and after a run."""
    modules = (components.unet, components.vae, *components.text_encoders)
    return {
        "digest": frozen_digest(components),
        "vae_dtype": components.vae.dtype,
        "processors": {name: type(p) for name, p in components.unet.attn_processors.items()},
        "training": [m.training for module in modules for m in module.modules()],
        "requires_grad": [p.requires_grad for module in modules for p in module.parameters()],
        "checkpointing": [components.unet.is_gradient_checkpointing]
        + [encoder.is_gradient_checkpointing for encoder in components.text_encoders],
        "adapted": [m for module in modules for m in module.modules() if isinstance(m, AdaptedLayer)],
    }


def test_a_lent_model_trains_the_same_lora_and_is_handed_back(workspace, tmp_path):
    own = train(workspace.config, run_dir=tmp_path / "own", progress="quiet")
    lent = _lent_model(workspace)
    before = _as_lent(lent)
    seen = []
    encoder = lent.text_encoders[0]
    hooks = LoopHooks(
        after_step=lambda report: seen.append(
            lent.unet.is_gradient_checkpointing
            and getattr(encoder, "is_activation_checkpointing", encoder.is_gradient_checkpointing)
        )
    )
    result = train(workspace.config, run_dir=tmp_path / "lent", progress="quiet", hooks=hooks, base_model=lent)

    assert seen and all(seen)  # the run did switch checkpointing on (UNet and text encoder) for itself
    assert max_tensor_difference(lora_tensors(own.final_lora), lora_tensors(result.final_lora)) == 0.0
    assert series(own.run_dir)["loss/current"] == series(result.run_dir)["loss/current"]
    after = _as_lent(lent)
    assert after == before and not after["adapted"]


@pytest.mark.parametrize("ending", ["exception", "non-finite loss"])
def test_the_model_is_handed_back_when_a_run_fails(workspace, tmp_path, ending):
    lent = _lent_model(workspace)
    before = _as_lent(lent)

    def fail(report: StepReport) -> None:
        raise RuntimeError("stopped by the test")

    if ending == "exception":
        hooks, expected = LoopHooks(after_step=fail), RuntimeError
    else:
        hooks, expected = LoopHooks(loss_transform=lambda step, loss: loss * float("nan")), NonFiniteLossError
    with pytest.raises(expected):
        train(workspace.config, run_dir=tmp_path / "run", progress="quiet", hooks=hooks, base_model=lent)
    assert _as_lent(lent) == before


def test_a_base_model_in_another_dtype_is_refused(workspace, tmp_path):
    fp32 = load_checkpoint(workspace.checkpoint)
    digest = frozen_digest(fp32)
    with pytest.raises(ConfigError, match="bfloat16"):
        train(workspace.config, run_dir=tmp_path / "run", progress="quiet", base_model=fp32)
    assert frozen_digest(fp32) == digest
