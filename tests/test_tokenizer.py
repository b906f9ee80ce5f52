"""The offline SD CLIP tokenizer: exact ids, padding per text encoder, local folders."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.errors import CheckpointError
from loralab.models.tokenizer import MAX_LENGTH, _bpe_file, load_clip_tokenizer

BOS, EOS = 49406, 49407
PROMPTS = [
    "a photo of sks dog",
    "blh woman, portrait, 85mm, (smiling:1.2), bokeh!!",
    "Ünïcödé café — naïve façade 東京 🙂",
    "it's a   multi\tspace\nprompt with numbers 1234 and symbols #$%&",
]


def _reference_clip_tokenizer():
    """CLIP's own SimpleTokenizer, loaded from its file without running the ``clip`` package
    (whose __init__ imports torchvision)."""
    path = _bpe_file().parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(_bpe_file()))


def test_known_prompt_gives_the_sd_ids():
    tokenizer = load_clip_tokenizer()
    assert tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == MAX_LENGTH


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_clips_own_tokenizer(prompt):
    reference = _reference_clip_tokenizer()
    ours = load_clip_tokenizer()(prompt).input_ids
    assert ours == [BOS, *reference.encode(prompt), EOS]


def test_padding_follows_the_text_encoder():
    sd1 = load_clip_tokenizer()(["a dog"], padding="max_length", max_length=MAX_LENGTH).input_ids[0]
    assert sd1[:4] == [BOS, 320, 1929, EOS] and set(sd1[4:]) == {EOS} and len(sd1) == MAX_LENGTH
    openclip = load_clip_tokenizer(pad_with_eos=False)
    ids = openclip(["a dog"], padding="max_length", max_length=MAX_LENGTH).input_ids[0]
    assert ids[:4] == [BOS, 320, 1929, EOS] and set(ids[4:]) == {0}
    assert openclip.pad_token == "!" and openclip.pad_token_id == 0


def test_long_prompts_truncate_to_77_with_eos():
    ids = load_clip_tokenizer()("dog " * 200, truncation=True, max_length=MAX_LENGTH).input_ids
    assert len(ids) == MAX_LENGTH and ids[0] == BOS and ids[-1] == EOS


def test_local_tokenizer_folder(tmp_path):
    load_clip_tokenizer(pad_with_eos=False).save_pretrained(str(tmp_path / "tok"))
    from_folder = load_clip_tokenizer(tmp_path / "tok")
    assert from_folder("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert from_folder.pad_token_id == 0  # the folder's own padding is kept...
    assert load_clip_tokenizer(tmp_path / "tok", pad_with_eos=True).pad_token_id == EOS  # ...unless asked


def test_missing_or_broken_tokenizer_folder_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer folder not found") as missing:
        load_clip_tokenizer(tmp_path / "nope")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "vocab.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load a CLIP tokenizer") as broken:
        load_clip_tokenizer(tmp_path / "broken")
    assert "\n" not in str(missing.value) and "\n" not in str(broken.value)


def test_vocabulary_is_found_without_importing_clip_or_torchvision():
    code = (
        "import sys; from loralab.models.tokenizer import load_clip_tokenizer; "
        "assert load_clip_tokenizer()('sks').input_ids == [49406, 48136, 49407]; "
        "assert 'clip' not in sys.modules and 'torchvision' not in sys.modules, sorted(sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(_bpe_file()).name == "bpe_simple_vocab_16e6.txt.gz"
