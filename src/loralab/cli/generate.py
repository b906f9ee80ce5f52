"""``loralab generate``: images with LoRAs on any checkpoint, A1111 prompt syntax, wildcards, XYZ grids.

Three modes, one set of options:

- plain: every prompt (``--prompt`` or each line of ``--prompt-file``) on every ``--checkpoint``,
  ``--batch`` images each with seeds ``--seed``, ``--seed + 1``, ...;
- ``--count N``: N images, each drawing its checkpoint, prompt line and every ``{a|b}`` variant
  (in the prompt, ``<lora:...>`` tags, ``--cfg``, ``--sampler``, ``--size``, ``--steps``) at random,
  seeded per image;
- ``--x/--y/--z KIND=V1,V2,...``: an X/Y/Z plot (see ``loralab.sample.xyz``).

Every image is a PNG with A1111's ``parameters`` chunk. Settings, LoRA names and families,
samplers and wildcards are all checked before a model loads; each checkpoint loads once.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loralab.cli.options import new_output_folder, resolve_device

if TYPE_CHECKING:
    from loralab.sample.generator import GenerationEngine, ImageRequest
    from loralab.sample.request_plan import RequestTemplate
    from loralab.sample.wildcards import Wildcards

_NUMBERED = re.compile(r"^(\d{5})-")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="make images with LoRAs on any checkpoint (A1111 prompt syntax, wildcards, XYZ grids)",
        description=(
            "Render prompts on one or more checkpoints with LoRAs, as AUTOMATIC1111 would: <lora:name:w> tags, "
            "(word:1.2) weights, BREAK, embeddings, wildcards (__name__) and {a|b} variants. Text options marked "
            "'variants allowed' may hold {a|b|c} choices, drawn per image from its seed."
        ),
    )
    models = parser.add_argument_group("models")
    models.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                        help="checkpoint file or diffusers folder; repeat for several (all, or drawn with --count)")
    models.add_argument("--vae", type=Path, metavar="FILE", help="VAE to use instead of the checkpoint's")
    models.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                        help="LoRA file or name in --lora-dir, weight 1 unless given; repeatable; variants allowed")
    models.add_argument("--lora-dir", type=Path, metavar="DIR", help="folder where <lora:NAME:w> names are looked up")
    models.add_argument("--embeddings", type=Path, metavar="DIR", help="textual-inversion embeddings folder")

    prompts = parser.add_argument_group("prompts").add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", metavar="TEXT", help="the prompt (A1111 syntax; variants and wildcards allowed)")
    prompts.add_argument("--prompt-file", type=Path, metavar="FILE",
                         help="one prompt per line, with kohya's options (--n --w --h --l --s --d --ss)")
    settings = parser.add_argument_group("settings")
    settings.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    settings.add_argument("--sampler", default="Euler a", metavar="NAME",
                          help="A1111 or kohya sampler name (default: Euler a); variants allowed")
    settings.add_argument("--steps", default="20", metavar="N", help="sampling steps (default 20); variants allowed")
    settings.add_argument("--cfg", default="7", metavar="X", help="CFG scale (default 7); variants allowed")
    settings.add_argument("--seed", type=int, metavar="N", help="seed of the first image (default: random)")
    settings.add_argument("--width", type=int, default=512, metavar="W", help="image width, a multiple of 8 (512)")
    settings.add_argument("--height", type=int, default=512, metavar="H", help="image height, a multiple of 8 (512)")
    settings.add_argument("--size", metavar="WxH", help="size as WIDTHxHEIGHT, overrides --width/--height; variants allowed")
    settings.add_argument("--clip-skip", type=int, metavar="N", help="A1111's clip skip (SD1/SD2; 2 for many anime models)")
    settings.add_argument("--emphasis", default="Original", choices=("Original", "No norm", "Ignore", "None"),
                          help="how (word:1.2) weights act, as A1111's setting (default Original)")
    modes = parser.add_argument_group("modes")
    modes.add_argument("--batch", type=int, default=1, metavar="N",
                       help="images per prompt and checkpoint, rendered N at a time (default 1)")
    modes.add_argument("--count", type=int, metavar="N", help="draw N random combinations of checkpoints and variants")
    modes.add_argument("--wildcards", type=Path, metavar="DIR", help="folder of NAME.txt files for __NAME__")
    for axis in ("x", "y", "z"):
        modes.add_argument(f"--{axis}", metavar="KIND=V1,V2",
                           help=f"{axis.upper()} axis of an X/Y/Z plot (kinds: checkpoint, lora, lora_weight, cfg, "
                                "sampler, steps, seed, prompt, clip_skip, size; 'none' in lora axes = no LoRA)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=Path("outputs"), metavar="DIR", help="output folder (./outputs)")
    output.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    output.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                        help="model precision (default: fp16 on a GPU, fp32 on the CPU)")
    parser.set_defaults(func=run)  # fmt: skip


def _template(args: argparse.Namespace) -> RequestTemplate:
    from loralab.sample.request_plan import RequestTemplate

    return RequestTemplate(
        checkpoints=tuple(args.checkpoint),
        prompt=args.prompt or "",
        negative_prompt=args.negative,
        loras=tuple(args.lora),
        sampler=args.sampler,
        steps=args.steps,
        cfg_scale=args.cfg,
        size=args.size or f"{args.width}x{args.height}",
        clip_skip=str(args.clip_skip) if args.clip_skip is not None else None,
        vae=args.vae,
    )


def _engine(args: argparse.Namespace) -> GenerationEngine:
    from loralab.imports import heavy_imports

    with heavy_imports():
        import torch

        from loralab.sample.embeddings import EmbeddingLibrary
        from loralab.sample.generator import GenerationEngine

    device = resolve_device(args.device)
    precision = args.precision or ("fp16" if device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    embeddings = EmbeddingLibrary.from_folder(args.embeddings) if args.embeddings else None
    return GenerationEngine(lora_dir=args.lora_dir, embeddings=embeddings, emphasis=args.emphasis, device=device, dtype=dtype)


def _plan(args: argparse.Namespace, template: RequestTemplate, wildcards: Wildcards, seed: int) -> list[ImageRequest]:
    """The images of plain and --count mode (checked for syntax and wildcards, nothing loaded)."""
    import random

    from loralab.sample.prompt_file import read_prompt_file
    from loralab.sample.request_plan import plan_images, plan_random
    from loralab.sample.wildcards import derived_seed

    lines = read_prompt_file(args.prompt_file) if args.prompt_file else None
    if args.count is not None:
        if not lines:
            return plan_random(template, args.count, seed, wildcards)
        requests = []
        for offset in range(args.count):  # each image draws its prompt line too
            line = random.Random(derived_seed(seed + offset, "prompt line")).choice(lines)
            requests += plan_random(template.with_prompt_line(line), 1, seed + offset, wildcards)
        return requests
    if not lines:
        return plan_images(template, [seed + i for i in range(args.batch)], wildcards)
    requests = []
    for line in lines:
        first = line.seed if line.seed is not None else seed
        requests += plan_images(template.with_prompt_line(line), [first + i for i in range(args.batch)], wildcards)
    return requests


def _next_number(out: Path) -> int:
    numbers = [int(m.group(1)) for p in out.glob("*.png") if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def run(args: argparse.Namespace) -> int:
    from loralab.sample.generator import GenerationError
    from loralab.sample.request_plan import random_seed
    from loralab.sample.wildcards import Wildcards
    from loralab.sample.xyz import parse_axis, plan_xyz, render_xyz

    axes = [parse_axis(text) if text else None for text in (args.x, args.y, args.z)]
    is_xyz = any(axes)
    if is_xyz and args.count is not None:
        raise GenerationError("--count and --x/--y/--z are separate modes; use one of them")
    wildcards = Wildcards(args.wildcards)
    template = _template(args)
    seed = args.seed if args.seed is not None else random_seed()
    started = time.perf_counter()
    engine = _engine(args)
    with engine, new_output_folder(args.out, "--out"):
        if is_xyz:
            if args.prompt_file:
                from loralab.sample.prompt_file import read_prompt_file

                prompt_lines = read_prompt_file(args.prompt_file)
                if len(prompt_lines) != 1:
                    raise GenerationError("an X/Y/Z plot takes one prompt; use --prompt or a one-line --prompt-file")
                template = template.with_prompt_line(prompt_lines[0])
            cells = plan_xyz(template, axes, seed, wildcards)
            result = render_xyz(engine, cells, axes, args.out, batch_size=args.batch)
            for path in result.grids:
                print(f"grid: {path}")
            print(f"index: {result.index}")
            count = len(result.images)
        else:
            requests = _plan(args, template, wildcards, seed)
            number = _next_number(args.out)
            count = 0
            for index, image in engine.iter_generate(requests, batch_size=args.batch):
                path = image.save(args.out / f"{number + index:05d}-{image.request.seed}.png")
                count += 1
                print(f"[{count}/{len(requests)}] {path}")
    elapsed = time.perf_counter() - started
    print(f"{count} images in {elapsed:.1f} s ({engine.load_count} checkpoint loads, seed {seed})")
    return 0
