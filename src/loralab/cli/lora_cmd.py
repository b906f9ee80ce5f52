"""``loralab lora``: inspect, merge, resize, extract and convert LoRA files.

- ``lora inspect FILE [--json]``: family, rank/alpha per part (unet, te / te1, te2; linear vs 3x3
  conv), module counts, hashes (stored and recomputed) and the file's metadata.
- ``lora merge CHECKPOINT LORA[:W]... --out FILE``: bake LoRAs (strength ``W``, default 1) into a
  checkpoint and save it as one single-file safetensors checkpoint.
- ``lora resize LORA --rank N | --dynamic METHOD=V --out FILE``: lower the rank by SVD.
- ``lora extract BASE TUNED --rank N --out FILE``: a LoRA of the difference of two checkpoints.
- ``lora convert IN OUT --to kohya|peft``: between the kohya format and diffusers' PEFT format.

Bad input (missing, truncated or non-safetensors files, files without LoRA weights, checkpoints
of the wrong family) raises ``LoralabError``; ``loralab.cli.main`` prints it as one ``error:``
line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from loralab.cli.options import add_force_option, check_output_file

# The commands import torch-heavy modules (diffusers, transformers) inside ``run_*`` so that
# ``loralab --help`` and the other command groups start without paying for them.
SAVE_PRECISIONS = ("bf16", "fp16", "fp32")
_PART_OF_PREFIX = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lora`` and its sub-commands."""
    parser = subparsers.add_parser("lora", help="inspect, merge, resize, extract and convert LoRA files")
    commands = parser.add_subparsers(dest="lora_command", metavar="ACTION", required=True)

    inspect = commands.add_parser("inspect", help="show a LoRA file's family, ranks, alphas, hashes and metadata")
    inspect.add_argument("file", type=Path, help="LoRA .safetensors file (kohya or PEFT format)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.set_defaults(func=run_inspect)

    merge = commands.add_parser("merge", help="merge LoRAs into a checkpoint and save it as one .safetensors file")
    merge.add_argument("checkpoint", type=Path, help="base checkpoint: single file or diffusers folder")
    merge.add_argument(
        "loras", nargs="+", metavar="LORA[:W]", help="LoRA file, optionally with its strength (default 1)"
    )
    merge.add_argument("--out", type=Path, required=True, help="merged checkpoint to write (.safetensors)")
    add_force_option(merge)
    merge.add_argument(
        "--save-precision", choices=SAVE_PRECISIONS, help="precision of the saved weights (default: the checkpoint's)"
    )
    merge.set_defaults(func=run_merge)

    resize = commands.add_parser("resize", help="resize a LoRA to a lower rank by SVD")
    resize.add_argument("lora", type=Path, help="LoRA file to resize")
    resize.add_argument("--rank", type=int, help="new rank; with --dynamic, the largest rank kept")
    resize.add_argument("--conv-rank", type=int, help="new rank of 3x3 conv modules (default: --rank)")
    resize.add_argument(
        "--dynamic",
        metavar="METHOD=V",
        help="choose each module's rank from its singular values: sv_ratio=R, sv_fro=F or sv_cumulative=C",
    )
    resize.add_argument("--out", type=Path, required=True, help="resized LoRA file to write")
    add_force_option(resize)
    resize.add_argument(
        "--save-precision", choices=SAVE_PRECISIONS, help="precision of the saved weights (default: the input's)"
    )
    resize.set_defaults(func=run_resize)

    extract = commands.add_parser("extract", help="extract a LoRA from the difference of two checkpoints")
    extract.add_argument("base", type=Path, help="base checkpoint (single file or diffusers folder)")
    extract.add_argument("tuned", type=Path, help="fine-tuned checkpoint of the same family")
    extract.add_argument("--rank", type=int, required=True, help="rank of linear and 1x1 modules")
    extract.add_argument("--conv-rank", type=int, help="also extract 3x3 convs (LoCon) at this rank")
    extract.add_argument(
        "--clamp-quantile",
        type=_quantile,
        default=0.99,
        metavar="Q|none",
        help="clamp the factors to this quantile of their values, as sd-scripts (default 0.99; none: off)",
    )
    extract.add_argument(
        "--min-diff",
        type=float,
        default=0.01,
        help="skip the text encoder(s) when no weight changed by more than this (default 0.01, as sd-scripts)",
    )
    extract.add_argument("--out", type=Path, required=True, help="LoRA file to write")
    add_force_option(extract)
    extract.add_argument("--save-precision", choices=SAVE_PRECISIONS, default="fp32", help="default fp32")
    extract.set_defaults(func=run_extract)

    convert = commands.add_parser("convert", help="convert a LoRA between kohya and PEFT (diffusers) format")
    convert.add_argument("source", type=Path, help="LoRA file in kohya or PEFT format")
    convert.add_argument("target", type=Path, help="file to write")
    add_force_option(convert)
    convert.add_argument("--to", choices=("kohya", "peft"), required=True, help="format to write")
    convert.add_argument(
        "--checkpoint", type=Path, help="a checkpoint of the LoRA's family, to name layers of non-standard models"
    )
    convert.set_defaults(func=run_convert)


def _quantile(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'none', got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# inspect


def describe_lora(path: Path) -> dict[str, Any]:
    """Everything ``lora inspect`` shows, as plain JSON-able data."""
    from loralab.network.lora_file import (
        family_label,
        read_lora_file,
        safetensors_hashes,
    )

    lora = read_lora_file(path)
    modules = lora.modules()
    groups: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for name, (down, _up, alpha) in modules.items():
        part = next((label for prefix, label in _PART_OF_PREFIX if name.startswith(prefix)), "other")
        kind = "conv3x3" if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1) else "linear"
        entry = groups[part].setdefault(kind, {"modules": 0, "ranks": set(), "alphas": set()})
        entry["modules"] += 1
        entry["ranks"].add(int(down.shape[0]))
        entry["alphas"].add(float(alpha))
    parts = {
        part: {kind: {**e, "ranks": sorted(e["ranks"]), "alphas": sorted(e["alphas"])} for kind, e in kinds.items()}
        for part, kinds in groups.items()
    }
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in lora.tensors.values() if t.dim() > 0})
    hashes = {key: lora.metadata[key] for key in ("sshs_model_hash", "sshs_legacy_hash") if key in lora.metadata}
    if lora.source_format == "kohya" and not lora.unsupported_keys:
        # The file's own tensors, so the recomputed hashes show whether the stored ones still fit.
        hashes["computed_model_hash"], hashes["computed_legacy_hash"] = safetensors_hashes(lora.tensors, lora.metadata)
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "format": lora.source_format,
        "family": lora.family.value if lora.family is not None else None,
        "family_label": family_label(lora.family),
        "dtypes": dtypes,
        "modules": len(modules),
        "parts": parts,
        "unsupported_keys": lora.unsupported_keys,
        "hashes": hashes,
        "metadata": dict(sorted(lora.metadata.items())),
    }


def _inspect_text(info: dict[str, Any]) -> str:
    lines = [
        f"{info['file']}  ({info['size_bytes']:,} bytes, {info['format']} format, {', '.join(info['dtypes'])})",
        f"family:  {info['family_label']}",
        f"modules: {info['modules']}",
    ]
    for part, kinds in info["parts"].items():
        for kind, entry in kinds.items():
            ranks = ", ".join(map(str, entry["ranks"]))
            alphas = ", ".join(f"{a:g}" for a in entry["alphas"])
            lines.append(f"  {part:<5} {kind:<8} {entry['modules']:>4} modules  rank {ranks}  alpha {alphas}")
    if info["unsupported_keys"]:
        lines.append(f"not LoRA weights: {len(info['unsupported_keys'])} keys (e.g. {info['unsupported_keys'][0]})")
    lines.append("hashes:")
    lines += [f"  {key}: {value}" for key, value in info["hashes"].items()] or ["  (none stored)"]
    lines.append("metadata:")
    for key, value in info["metadata"].items():
        shown = value if len(value) <= 100 else value[:97] + "..."
        lines.append(f"  {key}: {shown}")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    info = describe_lora(args.file)
    print(json.dumps(info, indent=2) if args.json else _inspect_text(info))
    return 0


# ---------------------------------------------------------------------------------------------
# merge


def parse_lora_weight(text: str) -> tuple[Path, float]:
    """``file.safetensors:0.7`` -> (path, 0.7); a plain path gets strength 1.

    Only a trailing ``:number`` is a strength, so paths with colons (``C:\\loras\\a.safetensors``)
    work unchanged.
    """
    from loralab.sample.lora_library import parse_lora_option

    if Path(text).exists():
        return Path(text), 1.0
    name, weight = parse_lora_option(text)
    return Path(name), weight


def run_merge(args: argparse.Namespace) -> int:
    import torch

    from loralab.models.loading import inspect_checkpoint, load_checkpoint
    from loralab.network.lora_file import read_lora_file
    from loralab.network.merge import LoraUse, merge_loras, save_merged_checkpoint

    weighted = [parse_lora_weight(text) for text in args.loras]
    check_output_file(args.out, [args.checkpoint, *(path for path, _ in weighted)], force=args.force)
    uses = [LoraUse(read_lora_file(path), multiplier=weight) for path, weight in weighted]
    if args.save_precision:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.save_precision]
    else:
        stored = inspect_checkpoint(args.checkpoint).dtypes.get("unet", "float16")
        dtype = getattr(torch, stored, torch.float16)
    # Merge in fp32 so small LoRA deltas are not lost to rounding; the file gets ``dtype``.
    components = load_checkpoint(args.checkpoint, dtype=torch.float32)
    merge_loras(components, uses)
    save_merged_checkpoint(components, args.out, dtype=dtype, merged=uses)
    strengths = ", ".join(f"{use.lora.label} x{use.multiplier:g}" for use in uses)
    print(f"wrote {args.out} ({components.family.label}, {str(dtype).removeprefix('torch.')}): merged {strengths}")
    return 0


# ---------------------------------------------------------------------------------------------
# resize, extract, convert


def run_resize(args: argparse.Namespace) -> int:
    from loralab.network.resize import RankRule, parse_dynamic, resize_lora_file

    method, param = parse_dynamic(args.dynamic) if args.dynamic else (None, None)
    rule = RankRule(rank=args.rank, conv_rank=args.conv_rank, method=method, param=param)
    check_output_file(args.out, [args.lora], force=args.force)
    result = resize_lora_file(args.lora, args.out, rule, save_dtype=args.save_precision)
    print(f"wrote {args.out}: {result.summary()}")
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from loralab.network.extract import extract_lora_file

    check_output_file(args.out, [args.base, args.tuned], force=args.force)
    with tqdm(unit="module", desc="SVD", disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
        result = extract_lora_file(
            args.base,
            args.tuned,
            args.out,
            rank=args.rank,
            conv_rank=args.conv_rank,
            clamp_quantile=args.clamp_quantile,
            min_diff=args.min_diff,
            save_dtype=args.save_precision,
            progress=lambda _name: bar.update(1),
        )
    print(f"wrote {args.out}: {result.summary()}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from loralab.network.convert import convert_lora_file

    inputs = [args.source] + ([args.checkpoint] if args.checkpoint else [])
    check_output_file(args.target, inputs, force=args.force)
    lora = convert_lora_file(args.source, args.target, args.to, checkpoint=args.checkpoint)
    print(f"wrote {args.target}: {len(lora.modules())} modules, {lora.source_format} -> {args.to}")
    return 0

