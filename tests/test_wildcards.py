"""Wildcards and Dynamic Prompts variants: deterministic per seed, the guide's scene list as it is."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from loralab.sample.prompt_syntax import extract_lora_tags
from loralab.sample.request_plan import RequestTemplate, plan_images, plan_random
from loralab.sample.wildcards import WildcardError, Wildcards

SEED_DATA = Path(__file__).parent / "data" / "seed"
SCENES = [line.strip() for line in (SEED_DATA / "scene.txt").read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    shutil.copy(SEED_DATA / "scene.txt", tmp_path / "scene.txt")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "photo.txt").write_text("rv20\n# a comment\n\n28d28\n", encoding="utf-8")
    (tmp_path / "outfit.txt").write_text("{red|blue} dress\n__checkpoints/photo__ jacket\n", encoding="utf-8")
    return tmp_path


def test_scene_list_works_as_it_is_and_is_deterministic_per_seed(folder: Path) -> None:
    wildcards = Wildcards(folder)
    drawn = [wildcards.expand("photo of blh woman, __scene__", seed) for seed in range(300)]
    assert all(text.startswith("photo of blh woman, ") for text in drawn)
    scenes = {text.removeprefix("photo of blh woman, ") for text in drawn}
    assert scenes <= set(SCENES)
    assert len(scenes) > 100  # 300 draws from 200 lines reach most of them
    assert drawn == [Wildcards(folder).expand("photo of blh woman, __scene__", seed) for seed in range(300)]


def test_subfolders_comments_and_nesting(folder: Path) -> None:
    wildcards = Wildcards(folder)
    assert {wildcards.expand("__checkpoints/photo__", s) for s in range(40)} == {"rv20", "28d28"}
    outfits = {wildcards.expand("__outfit__", s) for s in range(80)}
    assert outfits == {"red dress", "blue dress", "rv20 jacket", "28d28 jacket"}
    assert "checkpoints/photo" in wildcards.names()


def test_weighted_variants_follow_their_weights() -> None:
    wildcards = Wildcards()
    counts = Counter(wildcards.expand("{9::768|1024}", seed) for seed in range(1000))
    assert set(counts) == {"768", "1024"}
    assert 0.85 < counts["768"] / 1000 < 0.95


def test_several_picks_and_a1111_syntax_passes_through() -> None:
    wildcards = Wildcards()
    picked = wildcards.expand("{2$$a|b|c}", 7).split(",")
    assert len(picked) == 2 and len(set(picked)) == 2 and set(picked) <= {"a", "b", "c"}
    a1111 = "(masterpiece:1.2), [blurry], \\(x\\) <lora:blh:0.8> BREAK [a|b]"
    assert wildcards.expand(a1111, 3) == a1111


def test_guides_random_lora_tag_expands_to_a_valid_tag() -> None:
    wildcards = Wildcards()
    template = "photo <lora:blh_final_{rv20|28d28} ({8|9|10}):{0.9|1.0|1.1}>"
    tags = [extract_lora_tags(wildcards.expand(template, seed))[1][0] for seed in range(200)]
    names = {tag.name for tag in tags}
    assert names == {f"blh_final_{model} ({epochs})" for model in ("rv20", "28d28") for epochs in (8, 9, 10)}
    assert {tag.te_multiplier for tag in tags} == {0.9, 1.0, 1.1}


def test_missing_wildcard_names_the_file(folder: Path) -> None:
    with pytest.raises(WildcardError, match=r"__colour__ has no file colour.txt .*scene"):
        Wildcards(folder).expand("a __colour__ dress", 1)
    with pytest.raises(WildcardError, match="--wildcards"):
        Wildcards().expand("a __scene__", 1)
    with pytest.raises(WildcardError, match="not found"):
        Wildcards(folder / "absent")


def test_an_empty_wildcard_file_and_an_unclosed_variant_say_what_is_wrong(folder: Path) -> None:
    (folder / "blank.txt").write_text("# nothing yet\n\n")
    with pytest.raises(WildcardError, match=r"blank.txt has no line to choose for __blank__ .*add one choice per line"):
        Wildcards(folder).expand("a __blank__ dress", 1)
    with pytest.raises(WildcardError, match=r"the '\{' at character 7 is never closed; write variants as \{a\|b\|c\}"):
        Wildcards(folder).expand("photo {red|blue dress", 1)


def test_random_mode_draws_every_setting_independently_and_reproducibly(folder: Path) -> None:
    template = RequestTemplate(
        checkpoints=("a.safetensors", "b.safetensors"),
        prompt="blh woman, __scene__ <lora:blh_{rv20|28d28}:{0.9|1.1}>",
        sampler="{Euler a|DPM++ 2M Karras}",
        cfg_scale="{3|4|5|6|7}",
        size="{512x768|768x512}",
    )
    wildcards = Wildcards(folder)
    requests = plan_random(template, 60, 1000, wildcards)
    assert requests == plan_random(template, 60, 1000, wildcards)
    assert [r.seed for r in requests] == list(range(1000, 1060))
    assert {r.checkpoint.name for r in requests} == {"a.safetensors", "b.safetensors"}
    assert {r.cfg_scale for r in requests} == {3.0, 4.0, 5.0, 6.0, 7.0}
    assert {(r.width, r.height) for r in requests} == {(512, 768), (768, 512)}
    assert {r.sampler for r in requests} == {"Euler a", "DPM++ 2M Karras"}
    # Independent draws: CFG is not a function of the size choice.
    assert len({(r.cfg_scale, r.width) for r in requests}) == 10


def test_plain_mode_renders_each_checkpoint_with_each_seed() -> None:
    template = RequestTemplate(checkpoints=("a.safetensors", "b.safetensors"), prompt="x", loras=("blh:0.7",), size="64x96")
    requests = plan_images(template, [5, 6], Wildcards())
    assert [(r.checkpoint.name, r.seed) for r in requests] == [
        ("a.safetensors", 5), ("a.safetensors", 6), ("b.safetensors", 5), ("b.safetensors", 6),
    ]  # fmt: skip
    assert requests[0].loras[0].name == "blh" and requests[0].loras[0].te_multiplier == 0.7
    assert (requests[0].width, requests[0].height) == (64, 96)
