"""The toy world, its likeness scorer, and the two shipped toy checkpoints (loading and drawing)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from safetensors import safe_open

from loralab.errors import CheckpointError
from loralab.models.family import ModelFamily
from loralab.models.loading import load_checkpoint
from loralab.models.tokenizer import load_clip_tokenizer
from loralab.toy import likeness, world
from loralab.toy import model as toy_model

# ---------------------------------------------------------------------------------------------
# World


def test_world_is_deterministic_in_its_seed():
    first = list(world.world_examples(7, 6))
    again = list(world.world_examples(7, 6))
    other = list(world.world_examples(8, 6))
    assert [e.caption for e in first] == [e.caption for e in again]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    assert [e.caption for e in first] != [e.caption for e in other]
    subjects = [e.image for e in world.subject_examples(3, 4)]
    assert all(np.array_equal(a, b) for a, b in zip(subjects, [e.image for e in world.subject_examples(3, 4)]))


def test_captions_name_what_is_drawn():
    for example in world.world_examples(0, 40):
        shape = example.scene.shapes[0]
        assert example.image.shape == (32, 32, 3) and example.image.dtype == np.uint8
        assert f"{shape.colour} {shape.kind}" in example.caption
        assert example.caption.endswith(example.scene.position)
        # Magenta is the subject's own colour: the world never shows it.
        assert shape.rgb != world.SUBJECT_RING and shape.dot_rgb is None
        # The shape's colour covers part of the image (the shape is really there).
        assert likeness.colour_share(example.image, shape.rgb, tolerance=30) > 0.02
    for example in world.subject_examples(0, 10):
        assert example.caption.startswith(f"{world.SUBJECT_TRIGGER} {world.SUBJECT_CLASS} on ")


def test_captions_with_a_generator_leave_parts_out_but_keep_the_shape():
    rng = np.random.default_rng(0)
    scene = world.sample_scene(np.random.default_rng(1))
    variants = {world.caption(scene, rng) for _ in range(60)}
    assert len(variants) > 4
    assert all(scene.shapes[0].kind in text for text in variants)


def test_real_clip_tokenizer_reads_the_captions_word_by_word():
    tokenizer = load_clip_tokenizer()
    text = "a small red circle on a blue background, top left"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # Every word of the toy world is one whole-word token of CLIP's vocabulary.
    tokens = tokenizer.convert_ids_to_tokens(ids[1:-1])
    assert [t.removesuffix("</w>") for t in tokens] == text.replace(",", " ,").split()
    assert all(t.endswith("</w>") for t in tokens)


def test_render_any_size_and_reject_tiny():
    scene = world.sample_subject_scene(np.random.default_rng(2))
    big = world.render(scene, 128)
    assert big.shape == (128, 128, 3)
    with pytest.raises(ValueError):
        world.render(scene, 4)


# ---------------------------------------------------------------------------------------------
# Likeness


def test_likeness_ranks_the_subject_above_everything_else():
    subject = [likeness.likeness(e.image) for e in world.subject_examples(11, 40)]
    scenes = [likeness.likeness(e.image) for e in world.world_examples(12, 150)]
    rng = np.random.default_rng(0)
    noise = [likeness.likeness(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(20)]
    assert min(subject) > 0.9
    assert max(scenes) < 0.05
    assert max(noise) < 0.2 < min(subject)


def test_likeness_gives_partial_credit_for_partial_likeness():
    example = next(world.subject_examples(5, 1))
    ring = example.scene.shapes[0]

    def score(shape: world.Shape) -> float:
        return likeness.likeness(world.render(replace(example.scene, shapes=(shape,))))

    full = likeness.likeness(example.image)
    no_dot = score(replace(ring, dot_rgb=None))
    blob = score(replace(ring, kind="circle", dot_rgb=None))
    other_colour = score(replace(ring, rgb=world.COLOURS["red"]))
    assert full > no_dot > blob > other_colour
    assert other_colour == 0.0
    # The same scene as a 256 px photo scores as the 32 px image does.
    assert likeness.likeness(world.render(example.scene, 256)) == pytest.approx(full, abs=0.05)


def test_likeness_rejects_non_images():
    with pytest.raises(ValueError):
        likeness.likeness(np.zeros((32, 32), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# Shipped checkpoints


@pytest.fixture(scope="module", params=["base", "alt"])
def checkpoint(request):
    return request.param, toy_model.toy_checkpoint(request.param)


@pytest.fixture(scope="module")
def base_components():
    return load_checkpoint(toy_model.toy_checkpoint("base"))


def test_checkpoints_load_as_sd1_with_the_toy_sizes(checkpoint):
    name, path = checkpoint
    assert path.stat().st_size < 20e6
    components = load_checkpoint(path)
    assert components.family is ModelFamily.SD1 and not components.v_prediction
    assert tuple(components.unet.config.block_out_channels) == toy_model.UNET.block_out_channels
    assert tuple(components.vae.config.block_out_channels) == toy_model.VAE.block_out_channels
    assert components.text_encoders[0].config.hidden_size == toy_model.TEXT_ENCODER.hidden_size
    assert components.text_encoders[0].config.vocab_size == 49408
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        assert handle.get_slice("model.diffusion_model.out.2.weight").get_dtype() == "F16"
    assert metadata["modelspec.title"] == f"loralab toy {name}"
    assert "pretrain_toy.py" in metadata["loralab.toy.command"]


def test_unknown_toy_checkpoint_is_a_clear_error():
    with pytest.raises(CheckpointError, match="unknown toy checkpoint"):
        toy_model.toy_checkpoint("nope")  # type: ignore[arg-type]


def _share(images: list[np.ndarray], colour: str) -> float:
    return float(np.mean([likeness.colour_share(image, world.COLOURS[colour]) for image in images]))


def test_base_model_draws_what_the_prompt_asks(base_components):
    red_circles = toy_model.draw(base_components, "a red circle")
    blue_squares = toy_model.draw(base_components, "a blue square")
    assert _share(red_circles, "red") > 2 * _share(blue_squares, "red") + 0.02
    assert _share(blue_squares, "blue") > 2 * _share(red_circles, "blue") + 0.02
    # Deterministic from the generator's seed.
    assert all(np.array_equal(a, b) for a, b in zip(red_circles, toy_model.draw(base_components, "a red circle")))


def test_base_model_knows_rings_but_not_the_subject(base_components):
    images = toy_model.draw(base_components, f"{world.SUBJECT_TRIGGER} {world.SUBJECT_CLASS}")
    assert likeness.mean_likeness(images) < 0.15


def test_alt_model_leans_warm_where_the_prompt_leaves_the_background_open(base_components):
    alt = load_checkpoint(toy_model.toy_checkpoint("alt"))
    warm = ("orange", "yellow")
    prompt = "a blue circle"
    base_warm = sum(_share(toy_model.draw(base_components, prompt), c) for c in warm)
    alt_warm = sum(_share(toy_model.draw(alt, prompt), c) for c in warm)
    assert alt_warm > base_warm + 0.05
