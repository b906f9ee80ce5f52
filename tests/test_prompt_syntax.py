"""A1111 prompt syntax: attention weights, BREAK, <lora:...> tags, chunking, emphasis, embeddings."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import safetensors.torch
import torch

from loralab.models.tiny import build_tiny_components
from loralab.models.tokenizer import load_clip_tokenizer
from loralab.sample.embeddings import (
    EmbeddingError,
    EmbeddingLibrary,
    PromptEncoder,
    apply_emphasis,
    load_embedding,
)
from loralab.sample.prompt_file import parse_prompt_line, parse_prompt_lines
from loralab.sample.prompt_syntax import (
    ChunkTokens,
    LoraTag,
    PromptSyntaxError,
    chunk_prompt,
    comma_token_id,
    extract_lora_tags,
    parse_prompt_attention,
    tokenize_pieces,
)
from loralab.sample.samplers import SamplerError


R = 1.1  # A1111's round-bracket multiplier
S = 1 / 1.1  # its square-bracket multiplier

# (prompt, expected pieces). Weights are written as the products A1111 forms, in its order:
# a closing bracket multiplies everything since its opener; unclosed round brackets act to the
# end first, then unclosed square ones. The first six are A1111's own documented examples.
ATTENTION_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("(word:1.2)", [("word", 1.2)]),
    ("(word: 1.2 )", [("word", 1.2)]),
    ("[word]", [("word", S)]),
    ("[[word]]", [("word", 1.0 * S * S)]),
    ("((word))", [("word", 1.0 * R * R)]),
    ("((word:1.5))", [("word", 1.5 * R)]),
    ("(a (b:2) c)", [("a ", R), ("b", 2.0 * R), (" c", R)]),
    ("[a (b) c]", [("a ", S), ("b", R * S), (" c", S)]),
    ("(masterpiece:1.2), (best quality), [blurry]",
     [("masterpiece", 1.2), (", ", 1.0), ("best quality", R), (", ", 1.0), ("blurry", S)]),
    ("(a)(b:1.1)", [("ab", 1.1)]),
    ("(word:0)", [("word", 0.0)]),
    ("(word:-1)", [("word", -1.0)]),
    ("(word:.5)", [("word", 0.5)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("a BREAKfast break", [("a BREAKfast break", 1.0)]),
    ("(a BREAK b)", [("a", R), ("BREAK", -1.0 * R), ("b", R)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("\\(a\\)", [("(a)", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("word:1.2)", [("word:1.2)", 1.0)]),
    ("a) b]", [("a) b]", 1.0)]),
    ("[a:b:0.5]", [("a:b:0.5", S)]),
    ("(a [b", [("a ", R), ("b", R * S)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
]  # fmt: skip


@pytest.mark.parametrize(("prompt", "expected"), ATTENTION_CASES, ids=[c[0] or "<empty>" for c in ATTENTION_CASES])
def test_attention_weights_follow_a1111(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(prompt) == expected


@pytest.mark.parametrize("prompt", ["(word:1.2.3)", "(word:" + "9" * 400 + ")"])
def test_malformed_weight_is_one_clear_error(prompt: str) -> None:
    with pytest.raises(PromptSyntaxError, match="not a finite number"):
        parse_prompt_attention(prompt)


@pytest.mark.parametrize(
    ("prompt", "text", "tags"),
    [
        ("a photo <lora:blh:0.8>", "a photo ", [LoraTag("blh", 0.8, 0.8)]),
        ("<lora:blh>x", "x", [LoraTag("blh", 1.0, 1.0)]),
        ("<lora:blh_final_rv20 (8):0.9>, (red:1.2)", ", (red:1.2)", [LoraTag("blh_final_rv20 (8)", 0.9, 0.9)]),
        ("<lora:a:0.5:0.2> <LyCORIS-free <lyco:b:te=0.3:unet=0.6>", " <LyCORIS-free ",
         [LoraTag("a", 0.5, 0.2), LoraTag("b", 0.3, 0.6)]),
    ],
)  # fmt: skip
def test_lora_tags_are_taken_out_before_weights(prompt: str, text: str, tags: list[LoraTag]) -> None:
    assert extract_lora_tags(prompt) == (text, tags)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<lora:x:strong>", "not a finite number"),
        ("<lora:x:nan>", "'nan' in <lora:x:nan> is not a finite number"),
        ("<lora:x:1:unet=inf>", "unet strength 'inf'"),
        ("<hypernet:x:1>", "only <lora"),
        ("<lora:x:1:1:16>", "only a name"),
    ],
)
def test_bad_tags_are_one_clear_error(prompt: str, message: str) -> None:
    with pytest.raises(PromptSyntaxError, match=message):
        extract_lora_tags(prompt)


def test_tag_written_back_as_a1111_writes_it() -> None:
    assert LoraTag("x", 0.8, 0.8).as_tag() == "<lora:x:0.8>"
    assert LoraTag("x", 1.0, 0.5).as_tag() == "<lora:x:1:0.5>"


# --- chunks -----------------------------------------------------------------------------------


@cache
def _tokenizer():
    return load_clip_tokenizer()


def _chunks(prompt: str, **kwargs):
    tokenizer = _tokenizer()
    parsed = parse_prompt_attention(prompt)
    special = ChunkTokens(tokenizer.bos_token_id, tokenizer.eos_token_id, comma_token_id(tokenizer))
    return chunk_prompt(parsed, tokenize_pieces(tokenizer, [t for t, _ in parsed]), special, **kwargs)


def _text_tokens(chunk) -> list[int]:
    eos = _tokenizer().eos_token_id
    return [t for t in chunk.tokens[1:-1] if t != eos]


def test_every_chunk_is_start_75_tokens_end() -> None:
    chunks = _chunks(" ".join(["dog"] * 80))
    assert [len(c.tokens) for c in chunks] == [77, 77]
    assert [len(_text_tokens(c)) for c in chunks] == [75, 5]
    for chunk in chunks:
        assert chunk.tokens[0] == _tokenizer().bos_token_id and chunk.tokens[-1] == _tokenizer().eos_token_id
        assert len(chunk.multipliers) == 77


def test_full_chunk_moves_the_text_after_a_near_comma_to_the_next() -> None:
    # 70 words, a comma (position 70), then 10 more: the chunk fills at 75 with the comma 5 back.
    chunks = _chunks(" ".join(["dog"] * 70) + ", " + " ".join(["cat"] * 10))
    assert len(_text_tokens(chunks[0])) == 71  # 70 dogs and the comma
    assert len(_text_tokens(chunks[1])) == 10
    # With backtracking off the chunk is cut at 75 tokens exactly.
    plain = _chunks(" ".join(["dog"] * 70) + ", " + " ".join(["cat"] * 10), comma_backtrack=0)
    assert len(_text_tokens(plain[0])) == 75


def test_a_comma_further_back_than_20_tokens_does_not_move_text() -> None:
    chunks = _chunks(" ".join(["dog"] * 50) + ", " + " ".join(["cat"] * 40))
    assert len(_text_tokens(chunks[0])) == 75


def test_break_starts_a_new_chunk_and_weights_follow_their_tokens() -> None:
    chunks = _chunks("(red:1.5) dog BREAK [cat]")
    assert len(chunks) == 2
    red, dog = _tokenizer()("red dog", add_special_tokens=False)["input_ids"]
    assert chunks[0].tokens[1:3] == [red, dog] and chunks[0].multipliers[1:3] == [1.5, 1.0]
    assert chunks[1].multipliers[1] == pytest.approx(1 / 1.1)
    assert all(m == 1.0 for m in chunks[0].multipliers[3:])


def test_emphasis_scales_vectors_and_restores_the_mean() -> None:
    hidden = torch.randn(77, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    multipliers = torch.ones(77)
    multipliers[3] = 1.5
    original = apply_emphasis(hidden, multipliers, "Original")
    assert original.mean().item() == pytest.approx(hidden.mean().item(), rel=1e-5)
    ratio = original / hidden
    assert ratio[3].mean().item() == pytest.approx(1.5 * ratio[4].mean().item(), rel=1e-5)
    assert torch.equal(apply_emphasis(hidden, multipliers, "No norm")[3], hidden[3] * 1.5)
    assert torch.equal(apply_emphasis(hidden, multipliers, "Ignore"), hidden)
    assert torch.equal(apply_emphasis(hidden, torch.ones(77), "Original"), hidden)


# --- encoding -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_components("sd15")


def test_weights_change_only_what_they_weigh(sd15) -> None:
    encoder = PromptEncoder(sd15)
    plain = encoder.encode("a red dog")
    weighted = encoder.encode("a (red:1.4) dog")
    assert plain.hidden.shape == weighted.hidden.shape == (1, 77, 32)
    assert not torch.equal(plain.hidden, weighted.hidden)
    # Same tokens, so the weighted prompt is the plain one with "red" (position 2) weighted 1.4.
    multipliers = torch.ones(77)
    multipliers[2] = 1.4
    assert torch.allclose(weighted.hidden[0], apply_emphasis(plain.hidden[0], multipliers, "Original"))
    assert torch.equal(PromptEncoder(sd15, emphasis="Ignore").encode("a (red:1.4) dog").hidden, plain.hidden)


def test_long_prompts_make_one_77_block_per_chunk(sd15) -> None:
    encoder = PromptEncoder(sd15)
    embedding = encoder.encode(", ".join(["dog"] * 60) + " BREAK cat")
    assert embedding.num_chunks == 3 and embedding.hidden.shape == (1, 231, 32)


def _save_embedding(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


def test_embedding_files_in_every_format(tmp_path: Path) -> None:
    vectors = torch.randn(2, 32)
    files = {
        "a1111.safetensors": {"emb_params": vectors},
        "single.safetensors": {"whatever": vectors},
        "xl.safetensors": {"clip_l": vectors, "clip_g": torch.randn(2, 64)},
    }
    for name, tensors in files.items():
        _save_embedding(tmp_path / name, tensors)
    torch.save({"string_to_param": {"*": vectors}, "name": "old", "step": 100}, tmp_path / "old.pt")
    torch.save({"<concept>": vectors[0]}, tmp_path / "concept.bin")
    library = EmbeddingLibrary.from_folder(tmp_path)
    assert library.names == ["a1111", "concept", "old", "single", "xl"]
    assert torch.equal(library.get("old").vectors[0], vectors)
    assert library.get("concept").num_vectors == 1
    assert [v.shape for v in library.get("xl").vectors] == [(2, 32), (2, 64)]


def test_embedding_needing_arbitrary_unpickling_is_refused(tmp_path: Path) -> None:
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(1, 32))})}, tmp_path / "bad.pt")
    with pytest.raises(EmbeddingError, match="safely"):
        load_embedding(tmp_path / "bad.pt")


def test_embedding_vectors_enter_where_its_name_is_and_match_diffusers(tmp_path: Path) -> None:
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    path = _save_embedding(tmp_path / "myconcept.safetensors", {"emb_params": vectors})
    components = build_tiny_components("sd15")
    encoder = PromptEncoder(components, embeddings=EmbeddingLibrary([path]))
    ours = encoder.encode("a photo of myconcept, beach")
    token_module = components.text_encoders[0].embeddings.token_embedding
    assert isinstance(token_module, torch.nn.Embedding)  # put back after encoding
    assert [e.name for e in ours.embeddings] == ["myconcept"]
    chunk = encoder.chunks("a photo of myconcept, beach")[0]
    assert chunk.embeddings == {4: "myconcept"} and chunk.tokens[4:6] == [0, 0]

    # diffusers' own textual-inversion loader, on a separate copy, is the judge.
    from diffusers import StableDiffusionPipeline

    other = build_tiny_components("sd15")
    pipeline = StableDiffusionPipeline(
        vae=other.vae, text_encoder=other.text_encoders[0], tokenizer=other.tokenizers[0], unet=other.unet,
        scheduler=other.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.load_textual_inversion(str(path), token="<myconcept>")
    with torch.no_grad():
        reference, _ = pipeline.encode_prompt("a photo of <myconcept>, beach", "cpu", 1, False)
    assert torch.allclose(ours.hidden, reference, atol=1e-6)


def test_embedding_of_another_family_is_refused_when_used(tmp_path: Path, sd15) -> None:
    path = _save_embedding(tmp_path / "wide.safetensors", {"emb_params": torch.randn(1, 768)})
    encoder = PromptEncoder(sd15, embeddings=EmbeddingLibrary([path]))
    encoder.encode("no embedding here")
    with pytest.raises(EmbeddingError, match="width"):
        encoder.encode("a wide photo")


# --- kohya prompt lines ---------------------------------------------------------------------------


def test_kohya_prompt_line_options() -> None:
    line = parse_prompt_line("a photo of blh woman, beach --n low quality, blurry --w 515 --h 768 --l 7.5 --s 28 --d 42 --ss euler_a")
    assert line.prompt == "a photo of blh woman, beach"
    assert line.negative_prompt == "low quality, blurry"
    assert (line.width, line.height, line.cfg_scale, line.steps, line.seed, line.sampler) == (512, 768, 7.5, 28, 42, "euler_a")
    assert parse_prompt_line("plain").steps is None
    assert parse_prompt_line("x --s 5000").steps == 1000
    assert [p.prompt for p in parse_prompt_lines(["# comment", "", "one", "two --zz 3"])] == ["one", "two"]
    with pytest.raises(SamplerError, match="known samplers"):
        parse_prompt_line("x --ss nonsense")
