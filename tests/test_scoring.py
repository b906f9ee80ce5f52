"""Sweep scoring: likeness / face rate / trigger leak through a real ONNX face embedder, CLIP
adherence / diversity through a real (tiny) CLIPModel folder, missing models, and score files.

The models are built here in the formats users bring: an ONNX file with ArcFace's signature
(``N x 3 x 112 x 112`` float in, ``N x 512`` out; made with the ``onnx`` helper API from a small
conv net with fixed random weights) and a ``CLIPModel.save_pretrained`` folder of a tiny config.
Faces are real photos shipped in scikit-image's wheel (the astronaut, the cameraman).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from loralab.sweep.scoring import (
    BUILTIN_SCORES,
    SavePointImages,
    ScoringError,
    ScoringSettings,
    build_scorers,
    compute_scores,
    per_image_mean,
    read_scores,
    score_save_point,
    scores_path,
)
from loralab.sweep.scoring.base import EvalImage, ScoreUnavailable
from loralab.sweep.scoring.builtin import mean_pairwise_similarity
from loralab.sweep.scoring.eval_index import read_eval_index
from loralab.sweep.scoring.registry import ScorerRegistry

onnx = pytest.importorskip("onnx", reason="scoring tests need the 'scoring' extra (onnx, onnxruntime)")
pytest.importorskip("onnxruntime", reason="scoring tests need the 'scoring' extra (onnx, onnxruntime)")

SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").origin).parent / "data"  # found without importing it


# ---------------------------------------------------------------------------------------------
# Models of the users' formats


def make_tiny_arcface(path: Path, *, batch: int | str = 1, input_size: int = 112, seed: int = 0) -> Path:
    """An ONNX face embedder with ArcFace's signature: average-pool to 14 x 14, 3x3 conv, ReLU, linear to 512."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    pool = input_size // 14
    conv = rng.normal(0.0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    linear = rng.normal(0.0, 0.1, (512, 8 * 7 * 7)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
            helper.make_node(
                "Conv", ["pooled", "conv_w"], ["conv"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
            ),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("Flatten", ["relu"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc_w"], ["fc1"], transB=1),
        ],
        "tiny_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, input_size, input_size])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, 512])],
        [numpy_helper.from_array(conv, "conv_w"), numpy_helper.from_array(linear, "fc_w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime of the last years
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_tiny_clip(folder: Path, *, vocab_size: int = 49408, preprocessor: dict | None = None) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def arcface(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_arcface(tmp_path_factory.mktemp("models") / "tiny_arcface.onnx")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("models") / "clip")


# ---------------------------------------------------------------------------------------------
# A sweep folder with face images


def photo(name: str, variant: int) -> Image.Image:
    """A 256 px copy of a scikit-image photo, shifted, brightened and noised by ``variant``."""
    image = Image.open(SKIMAGE_DATA / name).convert("RGB")
    rng = np.random.default_rng(variant)
    shift = int(rng.integers(0, 24))
    side = image.width - 24
    image = image.crop((shift, shift, shift + side, shift + side)).resize((256, 256), Image.Resampling.BILINEAR)
    image = ImageEnhance.Brightness(image).enhance(0.85 + 0.3 * rng.random())
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 6.0, (256, 256, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def no_face(variant: int) -> Image.Image:
    ramp = np.linspace(0, 255, 128, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (128, 1)), np.full((128, 128), 40.0 * variant)], -1)
    return Image.fromarray(pixels.astype(np.uint8))


def write_index(folder: Path, images: list[tuple[Image.Image, bool, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for number, (image, trigger, prompt) in enumerate(images):
        image.save(folder / f"{number:02d}.png")
        entries.append(
            {
                "image": f"{number:02d}.png",
                "checkpoint": "ckpt",
                "prompt_set": "simple",
                "prompt": prompt,
                "seed": number,
                "lora_weight": 1.0,
                "trigger": trigger,
            }
        )
    (folder / "index.json").write_text(json.dumps(entries), encoding="utf-8")


def make_face_sweep(root: Path) -> Path:
    """Training photos of the astronaut; run "near" renders her, run "far" renders the cameraman.

    "near" also has one image without a face (face-found rate 3/4) and, without the trigger,
    the cameraman (a low leak); "far", without the trigger, renders the astronaut (a high leak).
    """
    train = root / "train" / "1_blh woman"
    train.mkdir(parents=True)
    for variant in range(3):
        photo("astronaut.png", variant).save(train / f"{variant}.png")
    sweep = root / "sweep"
    entries = []
    for name in ("near", "far"):
        (sweep / "runs" / name).mkdir(parents=True)
        (sweep / "runs" / name / "config.toml").write_text(f'train_data_dir = "{(root / "train").as_posix()}"\n')
        entries.append(
            {
                "name": name,
                "comparison": "c",
                "axis": "a",
                "value": name,
                "is_baseline": name == "near",
                "seed_repeat": 1 if name == "near" else None,
                "overrides": {},
                "values": {},
                "config_hash": name,
            }
        )
    (sweep / "expanded.json").write_text(json.dumps(entries), encoding="utf-8")
    prompt = "photo of blh woman"
    near = [(photo("astronaut.png", 10 + v), True, prompt) for v in range(3)] + [(no_face(1), True, prompt)]
    near += [(photo("camera.png", 30 + v), False, "photo of woman") for v in range(2)]
    far = [(photo("camera.png", 20 + v), True, prompt) for v in range(3)]
    far += [(photo("astronaut.png", 40 + v), False, "photo of woman") for v in range(2)]
    write_index(sweep / "eval" / "near" / "final", near)
    write_index(sweep / "eval" / "far" / "final", far)
    return sweep


# ---------------------------------------------------------------------------------------------
# Identity scores


def test_likeness_ranks_images_near_the_reference_above_far_ones(tmp_path: Path, arcface: Path) -> None:
    sweep = make_face_sweep(tmp_path)
    scorers = build_scorers(ScoringSettings(face_model=arcface))
    near = score_save_point(sweep, "near", "final", scorers)
    far = score_save_point(sweep, "far", "final", scorers)

    assert near.values["likeness"] > far.values["likeness"] + 0.2, (near.values, far.values)
    assert near.values["face_found_rate"] == pytest.approx(3 / 4)  # the gradient image has no face
    assert far.values["face_found_rate"] == 1.0
    # Without the trigger "far" renders the astronaut: the identity leaks; "near" does not.
    assert far.values["trigger_leak"] > near.values["trigger_leak"] + 0.2
    # No CLIP model: those scores are missing with the reason, not a number.
    assert set(near.missing) == {"prompt_adherence", "diversity"}
    assert "no CLIP model" in near.missing["diversity"]
    on_disk = json.loads(scores_path(sweep, "near", "final").read_text())
    assert on_disk["likeness"] == pytest.approx(near.values["likeness"])
    assert on_disk["prompt_adherence"] is None and "no CLIP model" in on_disk["missing"]["prompt_adherence"]


def test_likeness_is_the_mean_cosine_to_the_training_centroid(tmp_path: Path, arcface: Path) -> None:
    """The number itself, recomputed from the embedder's parts by hand."""
    from loralab.data.prepare.faces import detect_faces
    from loralab.sweep.scoring.face_model import FaceEmbedder, square_face_crop

    sweep = make_face_sweep(tmp_path)
    embedder = FaceEmbedder(arcface)

    def embed(path: Path) -> np.ndarray:
        image = Image.open(path).convert("RGB")
        face = square_face_crop(image, detect_faces(image)[0], 112)
        vector = embedder.embed_faces([face])[0]
        return vector / np.linalg.norm(vector)

    reference = [embed(path) for path in sorted((tmp_path / "train" / "1_blh woman").glob("*.png"))]
    centroid = np.mean(reference, axis=0)
    centroid /= np.linalg.norm(centroid)
    generated = [embed(sweep / "eval" / "near" / "final" / f"{n:02d}.png") for n in range(3)]
    expected = float(np.mean([vector @ centroid for vector in generated]))

    scores = score_save_point(sweep, "near", "final", build_scorers(ScoringSettings(face_model=arcface)))
    assert scores.values["likeness"] == pytest.approx(expected, abs=1e-5)


def test_face_crop_feeds_the_model_rgb_scaled_to_minus_one_one(arcface: Path) -> None:
    from loralab.sweep.scoring.face_model import FaceEmbedder

    embedder = FaceEmbedder(arcface)
    face = Image.new("RGB", (112, 112), (255, 0, 127))
    tensor = embedder.face_tensor(face)
    assert tensor.shape == (1, 3, 112, 112) and tensor.dtype == np.float32
    assert tensor[0, :, 0, 0] == pytest.approx([1.0, -1.0, -0.5 / 127.5])


def test_models_with_a_free_batch_size_embed_many_faces_in_one_call(tmp_path: Path, arcface: Path) -> None:
    from loralab.sweep.scoring.face_model import FaceEmbedder

    fixed = FaceEmbedder(arcface)
    free = FaceEmbedder(make_tiny_arcface(tmp_path / "batched.onnx", batch="N"))
    faces = [photo("astronaut.png", v).resize((112, 112)) for v in range(3)]
    together = free.embed_faces(faces)
    one_by_one = np.concatenate([fixed.embed_faces([face]) for face in faces])
    assert together.shape == (3, 512)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)


def test_face_models_that_cannot_be_used_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ScoringError, match="face-identity model not found"):
        build_scorers(ScoringSettings(face_model=tmp_path / "absent.onnx"))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ScoringError, match="cannot load face-identity model .*; give the path of an ArcFace .onnx") as error:
        build_scorers(ScoringSettings(face_model=garbage))
    assert "\n" not in str(error.value)
    with pytest.raises(ScoringError, match="not a face-identity model"):
        build_scorers(ScoringSettings(face_model=_grey_model(tmp_path)))


def _grey_model(tmp_path: Path) -> Path:
    """An ONNX model of the wrong kind: a 1-channel image in, a 1-D vector out."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["y"], axis=0)],
        "grey",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 784])],
    )
    path = tmp_path / "grey.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_no_training_face_makes_likeness_missing_with_the_reason(tmp_path: Path, arcface: Path) -> None:
    sweep = make_face_sweep(tmp_path)
    for path in (tmp_path / "train" / "1_blh woman").glob("*.png"):
        no_face(2).save(path)
    scores = score_save_point(sweep, "near", "final", build_scorers(ScoringSettings(face_model=arcface)))
    assert "likeness" not in scores.values
    assert scores.missing["likeness"] == "no face found in any of the 3 training images"
    assert scores.values["face_found_rate"] == pytest.approx(3 / 4)  # needs no reference


# ---------------------------------------------------------------------------------------------
# CLIP scores


def test_clip_preprocessing_matches_transformers_image_processor(clip_folder: Path) -> None:
    from transformers import CLIPImageProcessorPil

    from loralab.sweep.scoring.clip_model import ClipEmbedder

    embedder = ClipEmbedder(clip_folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    reference = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = reference(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(embedder.pixel_values(image), expected, atol=1e-4)


def test_clip_folder_preprocessor_config_sets_size_and_normalisation(tmp_path: Path) -> None:
    from loralab.sweep.scoring.clip_model import ClipEmbedder

    folder = make_tiny_clip(
        tmp_path / "clip",
        preprocessor={
            "size": {"shortest_edge": 40},
            "crop_size": {"height": 32, "width": 32},
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    )
    embedder = ClipEmbedder(folder)
    pixels = embedder.pixel_values(Image.new("RGB", (50, 60), (255, 0, 255)))
    assert pixels.shape == (3, 32, 32)
    assert pixels[:, 5, 5] == pytest.approx([1.0, -1.0, 1.0])


def test_prompt_adherence_is_the_clip_score_of_each_image_and_its_prompt(tmp_path: Path, clip_folder: Path) -> None:
    import torch

    from loralab.sweep.scoring.clip_model import ClipEmbedder, plain_prompt_text

    sweep = make_face_sweep(tmp_path)
    scores = score_save_point(sweep, "near", "final", build_scorers(ScoringSettings(clip_model=clip_folder)))
    assert set(scores.values) == {"prompt_adherence", "diversity"}
    assert "no face-identity model" in scores.missing["likeness"]

    # The same number from the model's own forward pass (its image_embeds / text_embeds).
    embedder = ClipEmbedder(clip_folder)
    images = [image for image in read_eval_index(sweep / "eval" / "near" / "final" / "index.json") if image.trigger]
    pixels = torch.from_numpy(np.stack([embedder.pixel_values(Image.open(image.path)) for image in images]))
    tokens = embedder.tokenizer(
        [plain_prompt_text(image.prompt) for image in images], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = embedder.model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels
        )
    image_embeds = torch.nn.functional.normalize(output.image_embeds, dim=-1)
    text_embeds = torch.nn.functional.normalize(output.text_embeds, dim=-1)
    cosine = (image_embeds * text_embeds).sum(-1).clamp(min=0)
    assert scores.values["prompt_adherence"] == pytest.approx(float(100 * cosine.mean()), abs=1e-3)


def test_diversity_is_zero_for_identical_images_and_positive_for_different_ones(
    tmp_path: Path, clip_folder: Path
) -> None:
    scorers = build_scorers(ScoringSettings(clip_model=clip_folder))
    same = [(photo("astronaut.png", 1), True, "p")] * 3
    different = [(photo("astronaut.png", 1), True, "p"), (photo("camera.png", 2), True, "p"), (no_face(3), True, "p")]
    write_index(tmp_path / "same", same)
    write_index(tmp_path / "different", different)

    def diversity(folder: Path) -> float:
        images = SavePointImages(read_eval_index(folder / "index.json"))
        return compute_scores(images, scorers).values["diversity"]

    assert diversity(tmp_path / "same") == pytest.approx(0.0, abs=1e-5)
    assert diversity(tmp_path / "different") > 0.01


def test_diversity_needs_two_images_of_one_checkpoint_and_prompt_set(tmp_path: Path, clip_folder: Path) -> None:
    write_index(tmp_path / "one", [(photo("astronaut.png", 1), True, "p")])
    images = SavePointImages(read_eval_index(tmp_path / "one" / "index.json"))
    scores = compute_scores(images, build_scorers(ScoringSettings(clip_model=clip_folder)))
    assert "diversity" not in scores.values
    assert "fewer than 2 images" in scores.missing["diversity"]


def test_mean_pairwise_similarity_averages_the_pairs() -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert mean_pairwise_similarity(vectors) == pytest.approx((0.0 + 1.0 + 0.0) / 3)


def test_prompt_text_for_clip_drops_lora_tags_and_weights() -> None:
    from loralab.sweep.scoring.clip_model import plain_prompt_text

    prompt = "a photo of <lora:blh:0.8> (blh woman:1.2), [smiling] BREAK in a park"
    assert plain_prompt_text(prompt) == "a photo of blh woman, smiling in a park"


def test_clip_folders_that_cannot_be_used_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ScoringError, match="no CLIP model in"):
        build_scorers(ScoringSettings(clip_model=tmp_path / "absent"))
    small = make_tiny_clip(tmp_path / "small_vocab", vocab_size=1000)
    with pytest.raises(ScoringError, match="add the model's own tokenizer files"):
        build_scorers(ScoringSettings(clip_model=small))


# ---------------------------------------------------------------------------------------------
# Registry, missing models, score files


def test_without_models_every_builtin_score_is_missing_with_its_reason(tmp_path: Path) -> None:
    sweep = make_face_sweep(tmp_path)
    scores = score_save_point(sweep, "near", "final", build_scorers(ScoringSettings()))
    assert scores.values == {}
    assert set(scores.missing) == set(BUILTIN_SCORES)
    on_disk = json.loads(scores_path(sweep, "near", "final").read_text())
    assert all(on_disk[name] is None for name in BUILTIN_SCORES)
    assert "ArcFace" in on_disk["missing"]["likeness"] and "CLIP" in on_disk["missing"]["diversity"]


def test_a_named_callable_plugs_in_as_a_score(tmp_path: Path) -> None:
    sweep = make_face_sweep(tmp_path)
    scorers = build_scorers(ScoringSettings())

    def brightness(image: Image.Image) -> float:
        return float(np.asarray(image.convert("L")).mean() / 255)

    scorers.add("likeness", per_image_mean(brightness, trigger=True))  # replaces the built-in's entry
    scorers.add("brightness_leak", per_image_mean(brightness, trigger=False))
    scores = score_save_point(sweep, "near", "final", scorers)
    folder = sweep / "eval" / "near" / "final"
    expected = np.mean([brightness(Image.open(folder / f"{n:02d}.png")) for n in range(4)])
    assert scores.values["likeness"] == pytest.approx(expected)
    assert 0 < scores.values["brightness_leak"] < 1
    assert list(scorers.names)[-1] == "brightness_leak"


def test_scores_without_a_value_are_missing_not_made_up() -> None:
    scorers = ScorerRegistry()
    scorers.add("nan", lambda images: float("nan"))
    scorers.add("nothing", per_image_mean(lambda image: 1.0, trigger=False))

    def refuses(images: SavePointImages) -> float:
        raise ScoreUnavailable("the judge is out")

    scorers.add("refuses", refuses)
    image = EvalImage(Path("x.png"), "ckpt", "simple", "p", 0, 1.0, True)
    scores = compute_scores(SavePointImages((image,)), scorers)
    assert scores.values == {}
    assert scores.missing == {
        "nan": "the score came out as nan",
        "nothing": "no evaluation images without the trigger",
        "refuses": "the judge is out",
    }
    with pytest.raises(ValueError, match="reserved"):
        scorers.add("missing", refuses)


def test_rescoring_reuses_files_of_the_same_images_and_keeps_scores_of_absent_models(
    tmp_path: Path, arcface: Path
) -> None:
    sweep = make_face_sweep(tmp_path)
    with_face = build_scorers(ScoringSettings(face_model=arcface))
    first = score_save_point(sweep, "near", "final", with_face)
    path = scores_path(sweep, "near", "final")
    stamp = path.stat().st_mtime_ns

    calls = []
    counting = build_scorers(ScoringSettings(face_model=arcface))
    counting.add("likeness", lambda images: calls.append(1) or 0.5)
    counting_first = score_save_point(sweep, "near", "final", counting)  # same names, same images: reused
    assert calls == [] and path.stat().st_mtime_ns == stamp
    assert counting_first.values["likeness"] == first.values["likeness"]

    # A later report run without the face model keeps the face scores of the same images.
    without = score_save_point(sweep, "near", "final", build_scorers(ScoringSettings()))
    assert without.values["likeness"] == pytest.approx(first.values["likeness"])
    assert "likeness" not in without.missing

    # New images (a prompt added): the index changed, everything available is computed again.
    index = sweep / "eval" / "near" / "final" / "index.json"
    entries = json.loads(index.read_text())
    index.write_text(json.dumps(entries[:3]))
    again = score_save_point(sweep, "near", "final", with_face)
    assert again.values["face_found_rate"] == 1.0  # the face-less image is gone
    assert read_scores(path).values["face_found_rate"] == 1.0


def test_bad_eval_indexes_are_one_line_errors(tmp_path: Path) -> None:
    sweep = make_face_sweep(tmp_path)
    scorers = build_scorers(ScoringSettings())
    with pytest.raises(ScoringError, match="no evaluation images for near at e000001"):
        score_save_point(sweep, "near", "e000001", scorers)
    index = sweep / "eval" / "near" / "final" / "index.json"
    index.write_text(json.dumps([{"image": "00.png", "checkpoint": "c"}]))
    with pytest.raises(ScoringError, match="entry 0 of .* lacks prompt_set, prompt, seed, lora_weight, trigger"):
        score_save_point(sweep, "near", "final", scorers)
    index.write_text(
        json.dumps(
            [
                {
                    "image": "gone.png",
                    "checkpoint": "c",
                    "prompt_set": "s",
                    "prompt": "p",
                    "seed": 1,
                    "lora_weight": 1,
                    "trigger": True,
                }
            ]
        )
    )
    with pytest.raises(ScoringError, match="1 evaluation image.* missing"):
        score_save_point(sweep, "near", "final", scorers)


def test_eval_checkpoints_without_a_lora_are_scored_against_the_baseline_run(tmp_path: Path, arcface: Path) -> None:
    from loralab.sweep.scoring import score_sweep

    sweep = make_face_sweep(tmp_path)
    write_index(sweep / "eval" / "baseline_models" / "ckpt", [(photo("camera.png", 50), True, "photo of woman")])
    results = score_sweep(sweep, build_scorers(ScoringSettings(face_model=arcface)))
    assert set(results) == {("near", "final"), ("far", "final"), ("baseline_models", "ckpt")}
    assert results[("baseline_models", "ckpt")].values["likeness"] < results[("near", "final")].values["likeness"]
    assert scores_path(sweep, "baseline_models", "ckpt").is_file()
    assert os.path.basename(scores_path(sweep, "baseline_models", "ckpt")) == "ckpt.json"


def test_one_broken_save_point_does_not_stop_the_others(tmp_path: Path) -> None:
    from loralab.sweep.scoring import score_sweep

    sweep = make_face_sweep(tmp_path)
    (sweep / "eval" / "far" / "final" / "00.png").unlink()
    with pytest.raises(ScoringError, match="evaluation image.* of far at final are missing"):
        score_sweep(sweep, build_scorers(ScoringSettings()))
    assert scores_path(sweep, "near", "final").is_file()  # scored although "far" came first
