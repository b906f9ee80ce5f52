"""``loralab debug``: tools for tests and bug reports.

``make-tiny`` writes a tiny random model in a real layout (a file small enough to attach to
an issue); ``inspect-checkpoint`` says what a checkpoint is without loading its weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from loralab.cli.options import add_force_option, check_output_file

TINY_FAMILIES = ("sd15", "sd2v", "sdxl")
FORMATS = ("single-file", "diffusers")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("debug", help="tools for tests and bug reports")
    commands = parser.add_subparsers(dest="debug_command", metavar="DEBUG_COMMAND", required=True)

    tiny = commands.add_parser(
        "make-tiny",
        help="write a tiny random model with the real architecture classes and file layout",
        description="Write a tiny randomly initialised SD1.5 / SD2-v / SDXL model, as one .safetensors "
        "file in the original (A1111) layout or as a diffusers folder.",
    )
    tiny.add_argument("--family", required=True, choices=TINY_FAMILIES)
    tiny.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    tiny.add_argument("--out", required=True, type=Path, help="output .safetensors file or folder")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    add_force_option(tiny)
    tiny.set_defaults(func=run_make_tiny)

    inspect = commands.add_parser(
        "inspect-checkpoint",
        help="print a checkpoint's family, prediction type and component sizes (reads no weights)",
    )
    inspect.add_argument("path", type=Path, help="single-file checkpoint or diffusers folder")
    inspect.add_argument(
        "--v-parameterization", action="store_true", default=None, help="treat the model as v-prediction"
    )
    inspect.set_defaults(func=run_inspect)


def run_make_tiny(args: argparse.Namespace) -> int:
    from loralab.errors import ConfigError
    from loralab.models.tiny import make_tiny

    if args.fmt == "single-file":
        check_output_file(args.out, [], force=args.force)
    elif args.out.exists():
        raise ConfigError(f"output {args.out} exists; give a new folder for the diffusers layout")
    path = make_tiny(args.family, args.fmt, args.out, seed=args.seed)
    print(f"wrote tiny {args.family} ({args.fmt}) to {path}")
    return 0


def _describe(config: dict[str, Any], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={config[k]}" for k in keys if config.get(k) is not None)


def run_inspect(args: argparse.Namespace) -> int:
    from loralab.models.loading import inspect_checkpoint

    info = inspect_checkpoint(args.path, v_parameterization=args.v_parameterization)
    counts, dtypes = info.parameter_counts, info.dtypes

    def line(name: str, details: str) -> str:
        stored = f", stored {dtypes[name]}" if name in dtypes else ""
        return f"  {name}: {counts.get(name, 0) / 1e6:.1f}M parameters{stored}; {details}"

    print(f"{info.source}")
    print(f"  format: {info.format}")
    print(f"  family: {info.family.label} ({info.family.value})")
    print(f"  prediction type: {'v_prediction' if info.v_prediction else 'epsilon'}")
    unet_keys = ("block_out_channels", "layers_per_block", "transformer_layers_per_block", "attention_head_dim",
                 "cross_attention_dim", "use_linear_projection", "addition_time_embed_dim")  # fmt: skip
    print(line("unet", _describe(info.unet_config, unet_keys)))
    if info.vae_config is None:
        print("  vae: none in this file (pass one with --vae)")
    else:
        print(line("vae", _describe(info.vae_config, ("block_out_channels", "latent_channels", "scaling_factor"))))
    te_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "projection_dim")
    for encoder, config in zip(info.family.spec.text_encoders, info.text_encoder_configs):
        keys = te_keys if encoder.with_projection else te_keys[:-1]
        print(line(encoder.config_name, f"{type_name(encoder.with_projection)}, {_describe(config, keys)}"))
    return 0


def type_name(with_projection: bool) -> str:
    return "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
