"""Regularisation ("class") images for the demo, drawn by the base model itself (prior preservation).

A LoRA trained only on "blh ring ..." captions learns that ring prompts draw the subject, with or
without the trigger: the concept bleeds into the class word. The DreamBooth remedy a kohya_ss user
knows is a ``reg_data_dir`` of class images: the training captions with the trigger taken out
("ring on a green background, top left"), rendered by the base checkpoint, trained next to the
photos at ``prior_loss_weight``. They teach the LoRA to leave the class word's images as the base
model drew them, so only the trigger carries the subject.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from loralab.data.discovery import discover_dataset
from loralab.sample.generator import GenerationEngine, ImageRequest
from loralab.sample.png_info import save_png
from loralab.sweep.evaluate import remove_trigger
from loralab.toy import world
from loralab.toy.model import RESOLUTION, toy_checkpoint

# Seeds far from the evaluation's (1, 2, 3): the LoRA must not be shown the base model's answer to
# the very prompt and seed it is judged on.
CLASS_IMAGE_SEED = 10_000
_BATCH = 8


def class_prompts(img_dir: Path, caption_extension: str) -> list[str]:
    """The training captions with the trigger removed, in the dataset's order."""
    info = discover_dataset(img_dir, None, caption_extension)
    return [remove_trigger(entry.caption, world.SUBJECT_TRIGGER) for subset in info.train for entry in subset.images]


def render_class_images(
    reg_root: Path, prompts: list[str], *, steps: int, cfg: float, sampler: str, clip_skip: int, threads: int
) -> Path:
    """Render one base-model image per prompt into ``reg_root/1_<class>/`` with ``.caption`` files.

    Returns ``reg_root`` (the config's ``reg_data_dir``). The folder is rebuilt each time: with
    fixed seeds the images are the same, and a stale folder from another prompt list would mislead.
    ``threads``: torch threads while rendering (the training's count: on a shared CPU more threads
    than that wait on each other and make the toy model several times slower).
    """
    if reg_root.exists():
        shutil.rmtree(reg_root)
    folder = reg_root / f"1_{world.SUBJECT_CLASS}"
    folder.mkdir(parents=True)
    engine = GenerationEngine()
    checkpoint = toy_checkpoint("base")  # the checkpoint the LoRA trains on: its own prior
    requests = [
        ImageRequest(
            checkpoint, prompt, sampler=sampler, steps=steps, cfg_scale=cfg, seed=CLASS_IMAGE_SEED + number,
            width=RESOLUTION, height=RESOLUTION, clip_skip=clip_skip,
        )
        for number, prompt in enumerate(prompts)
    ]  # fmt: skip
    progress = tqdm(total=len(requests), desc="class images", unit="image", file=sys.stderr)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for number, image in engine.iter_generate(requests, batch_size=_BATCH):
            save_png(image.image, folder / f"class_{number:03d}.png", image.infotext)
            (folder / f"class_{number:03d}.caption").write_text(requests[number].prompt + "\n", encoding="utf-8")
            progress.update()
    finally:
        torch.set_num_threads(previous_threads)
        progress.close()
        engine.close()
    return reg_root
