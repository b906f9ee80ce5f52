"""Shared helpers for the LoRA network tests: non-trivial LoRAs and fixed-input model outputs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from loralab.models.architecture import build_empty_model, bundled_config
from loralab.models.family import ModelFamily
from loralab.network.lora import LoRANetwork, NetworkSpec

# alpha != rank everywhere, and a conv rank/alpha of their own, so every scale is exercised.
LOCON_SPEC = NetworkSpec(rank=4, alpha=2.5, conv_rank=3, conv_alpha=1.5)


def random_network(components, spec: NetworkSpec = LOCON_SPEC, seed: int = 1, strength: float = 0.4) -> LoRANetwork:
    """A network with random up and down weights (a new one has zero up weights).

    ``strength`` scales them: 0.4 changes every output clearly (by ~0.1-1) while staying, like a
    trained LoRA, a correction to the model rather than a replacement of it.
    """
    network = LoRANetwork.create(components, spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.lora_modules().values():
            for weight in (module.lora_down.weight, module.lora_up.weight):
                fan_in = weight[0].numel()
                weight.normal_(0.0, strength * fan_in**-0.5, generator=generator)
    return network


@torch.no_grad()
def model_outputs(components, seed: int = 0) -> dict[str, torch.Tensor]:
    """Text-encoder hidden states and one UNet prediction for fixed random inputs."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49408, (1, 6), generator=generator)
    outputs: dict[str, torch.Tensor] = {}
    states = []
    for index, encoder in enumerate(components.text_encoders):
        result = encoder(ids)
        outputs[f"text_encoder_{index}"] = result.last_hidden_state
        states.append(result.last_hidden_state)
        if getattr(result, "text_embeds", None) is not None:
            outputs[f"text_embeds_{index}"] = result.text_embeds
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    extra = {}
    if components.family is ModelFamily.SDXL:
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        extra["added_cond_kwargs"] = {"text_embeds": outputs["text_embeds_1"], "time_ids": time_ids}
    outputs["unet"] = components.unet(sample, 10, encoder_hidden_states=torch.cat(states, dim=-1), **extra).sample
    return outputs


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference per output."""
    assert first.keys() == second.keys()
    return {key: (first[key] - second[key]).abs().max().item() for key in first}


def weight_digests(components) -> dict[str, str]:
    """SHA-256 of every tensor of the UNet, text encoders and VAE (bytes, dtype and shape), by name."""
    models = {"unet": components.unet, "vae": components.vae}
    models.update({f"text_encoder_{i}": encoder for i, encoder in enumerate(components.text_encoders)})
    digests = {}
    for model_name, model in models.items():
        for name, tensor in model.state_dict(keep_vars=False).items():
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            digest = hashlib.sha256(data).hexdigest()
            digests[f"{model_name}.{name}"] = f"{digest} {tensor.dtype} {tuple(tensor.shape)}"
    return digests


@dataclass
class MetaComponents:
    """Full-size, weightless modules of one family: all that target discovery and LoRA loading need."""

    family: ModelFamily
    unet: nn.Module
    text_encoders: list[nn.Module]


@cache
def full_size(family: ModelFamily) -> MetaComponents:
    """The published architecture of ``family`` on the meta device (shapes only, built in a second)."""
    encoders = [
        build_empty_model("text_encoder", bundled_config(family, spec.config_name), spec)
        for spec in family.spec.text_encoders
    ]
    return MetaComponents(family, build_empty_model("unet", bundled_config(family, "unet")), encoders)
