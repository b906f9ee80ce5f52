"""The one place where LoRA names are converted: diffusers module paths <-> kohya names.

Inside loralab a LoRA target is named by its kohya name, the key stem every webui reads:

* ``lora_unet_<path>`` for the UNet. SD1/SD2 use the diffusers module path
  (``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``);
  SDXL uses the original SGM path (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), which is
  what sd-scripts writes for SDXL because it trains on its own SGM-layout UNet.
* ``lora_te_<path>`` for the single text encoder of SD1/SD2, ``lora_te1_``/``lora_te2_`` for SDXL's two.

Foreign files (diffusers' own LoRA format and PEFT adapters, ``unet.<path>.lora_A.weight``) are parsed
here into (component, module path, role) so the reader can give them kohya names on load.

Kohya names replace every ``.`` by ``_`` while module names themselves contain ``_``, so a kohya
name cannot be split back into a path by text alone: going back needs the model's own table of
targets (see ``loralab.network.targets``). Everything here goes path -> name, or SGM path <->
diffusers path, both of which are unambiguous.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from loralab.models.architecture import bundled_config
from loralab.models.family import ModelFamily
from loralab.models.single_file import diffusers_to_ldm_unet_name, unet_module_map

UNET_PREFIX = "lora_unet"
DOWN_SUFFIX = ".lora_down.weight"
UP_SUFFIX = ".lora_up.weight"
ALPHA_SUFFIX = ".alpha"

Component = Literal["unet", "text_encoder", "text_encoder_2"]
Role = Literal["down", "up", "alpha"]


def text_encoder_prefix(index: int, count: int) -> str:
    """Kohya prefix of text encoder ``index`` (0-based) in a model with ``count`` text encoders."""
    return "lora_te" if count == 1 else f"lora_te{index + 1}"


def kohya_name(prefix: str, module_path: str) -> str:
    """``kohya_name("lora_unet", "mid_block.attentions.0.proj_in")`` -> ``lora_unet_mid_block_attentions_0_proj_in``."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def text_encoder_kohya_name(prefix: str, module_path: str) -> str:
    """Kohya name of a text-encoder layer; kohya names always include CLIP's ``text_model.`` level.

    Current transformers builds ``CLIPTextModel`` without that level (``encoder.layers.0...``) while
    ``CLIPTextModelWithProjection`` and every LoRA file in use keep it.
    """
    if not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return kohya_name(prefix, module_path)


def split_lora_key(key: str) -> tuple[str, Role] | None:
    """Split a kohya key into (module name, role); None for keys that are not down/up/alpha."""
    for suffix, role in ((DOWN_SUFFIX, "down"), (UP_SUFFIX, "up"), (ALPHA_SUFFIX, "alpha")):
        if key.endswith(suffix):
            return key[: -len(suffix)], role  # type: ignore[return-value]
    return None


# --- SDXL: diffusers UNet paths <-> SGM (original Stability AI) paths -----------------------------
# The block numbering itself is the models package's (one table for checkpoints and LoRAs alike).


def sdxl_base_unet_config() -> Mapping[str, Any]:
    """The UNet config of every real SDXL UNet (base and fine-tunes), for renaming without a model."""
    return bundled_config(ModelFamily.SDXL, "unet")


def diffusers_unet_path_to_sgm(path: str, unet_config: Mapping[str, Any]) -> str:
    """``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (SDXL base layout).

    Raises ``ValueError`` for a path outside the UNet's blocks.
    """
    try:
        return diffusers_to_ldm_unet_name(path, unet_config)
    except KeyError as exc:
        raise ValueError(f"no SGM name for UNet module {path!r}") from exc


def sgm_unet_path_to_diffusers(path: str, unet_config: Mapping[str, Any]) -> str:
    """Inverse of :func:`diffusers_unet_path_to_sgm`."""
    best: tuple[str, str, tuple[tuple[str, str], ...]] | None = None
    for diffusers_prefix, (sgm_prefix, leaves) in unet_module_map(unet_config).items():
        if (path == sgm_prefix or path.startswith(sgm_prefix + ".")) and (best is None or len(sgm_prefix) > len(best[1])):
            best = (diffusers_prefix, sgm_prefix, leaves)
    if best is None:
        raise ValueError(f"no diffusers name for SGM UNet module {path!r}")
    diffusers_prefix, sgm_prefix, leaves = best
    rest = path[len(sgm_prefix) + 1 :]
    for diffusers_leaf, sgm_leaf in leaves:
        if rest == sgm_leaf or rest.startswith(sgm_leaf + "."):
            rest = diffusers_leaf + rest[len(sgm_leaf) :]
            break
    return f"{diffusers_prefix}.{rest}" if rest else diffusers_prefix


# --- foreign (diffusers / PEFT) LoRA keys ------------------------------------------------------------


@dataclass(frozen=True)
class ForeignKey:
    """One tensor of a diffusers/PEFT-format LoRA file, located in the model."""

    component: Component
    module_path: str
    role: Role


_COMPONENT_PREFIXES: tuple[tuple[str, Component], ...] = (
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
    ("unet.", "unet"),
)

# Role suffixes, most specific first. Covers PEFT (``lora_A``/``lora_B``, optionally with an
# adapter name), diffusers' converted-kohya form (``lora.down``), its old attention-processor form
# (``to_q_lora.down``) and text-encoder form (``lora_linear_layer.down``).
_ROLE_PATTERNS: tuple[tuple[re.Pattern[str], Role], ...] = (
    (re.compile(r"\.lora_A(?:\.[^.]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(?:\.[^.]+)?\.weight$"), "up"),
    (re.compile(r"\.lora_linear_layer\.down\.weight$"), "down"),
    (re.compile(r"\.lora_linear_layer\.up\.weight$"), "up"),
    (re.compile(r"[._]lora\.down\.weight$"), "down"),
    (re.compile(r"[._]lora\.up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),
)

# Old diffusers attention-processor names -> module names, per component kind.
_UNET_PROCESSOR_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_PROCESSOR_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def parse_foreign_key(key: str) -> ForeignKey | None:
    """Locate a diffusers/PEFT LoRA key; None when it is not one (kohya keys included)."""
    body = key.removeprefix("base_model.model.")
    component: Component | None = None
    for prefix, name in _COMPONENT_PREFIXES:
        if body.startswith(prefix):
            component, body = name, body[len(prefix) :]
            break
    if component is None:
        if key == body:  # neither a component prefix nor PEFT's wrapper prefix
            return None
        # A bare PEFT adapter: only the module path tells which model it was made for.
        component = "text_encoder" if body.startswith(("text_model.", "encoder.layers.")) else "unet"
    for pattern, role in _ROLE_PATTERNS:
        if m := pattern.search(body):
            path = body[: m.start()]
            return ForeignKey(component, _clean_module_path(path, component), role)
    return None


def _clean_module_path(path: str, component: Component) -> str:
    path = path.replace(".processor.", ".")
    names = _UNET_PROCESSOR_NAMES if component == "unet" else _TE_PROCESSOR_NAMES
    head, _, last = path.rpartition(".")
    if last in names and (component != "unet" or head.endswith(("attn1", "attn2"))):
        return f"{head}.{names[last]}" if head else names[last]
    return path
