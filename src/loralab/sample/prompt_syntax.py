"""AUTOMATIC1111's prompt syntax: ``<lora:...>`` tags, attention weights, ``BREAK`` and 75-token chunks.

What A1111 users write, and what it means here (the same as in A1111):

- ``<lora:name:0.8>`` applies a LoRA and is removed from the text. ``<lora:name>`` means 1.0;
  ``<lora:name:0.8:0.5>`` sets the text-encoder and UNet strengths apart (also ``te=``/``unet=``).
  ``<lyco:...>`` is the same tag. Tags are taken out before the weights below are parsed, so a
  LoRA name may hold brackets (``<lora:blh_final_rv20 (8):0.9>``).
- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1,
  ``(text:1.3)`` multiplies it by 1.3; brackets nest and multiply. An unclosed bracket acts to the
  end of the prompt; a closing one without its opener is plain text. ``\\(``, ``\\)``, ``\\[``,
  ``\\]`` and ``\\\\`` stand for the characters themselves; any other backslash is dropped.
- ``BREAK`` (a whole word, upper case) ends the current 75-token chunk.
- A prompt longer than 75 tokens is encoded in chunks of 75 (each with its own start and end
  token). When a chunk fills up, the text after its last comma (if that comma is at most 20 tokens
  back) moves to the next chunk, so a phrase is not cut in two.
- Textual-inversion embeddings are found by their name's tokens anywhere in the prompt; their
  vectors never straddle two chunks.

Prompt editing (``[from:to:0.5]``), alternation (``[a|b]``) and ``AND`` are not supported: they
are read as text with the rules above, and a warning says so.

Why not compel: compel has its own syntax (``word++``, ``(word)1.2``) and weights a word by
blending with an embedding of the prompt without it, not by scaling its vectors; it does not
chunk at commas. A1111's images are only reproduced with A1111's own rules, so they are
implemented here, in one place. ``parse_prompt_attention`` follows A1111's documented behaviour
(its ``parse_prompt_attention`` doctests), including the order of the float multiplications, so
weights such as ``(((house:1.3))`` come out bit-for-bit as A1111's 1.5730000000000004.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from loralab.errors import LoralabError

logger = logging.getLogger(__name__)

CHUNK_LENGTH = 75  # prompt tokens per chunk; with the start and end token a chunk fills CLIP's 77
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)  # the marker parse_prompt_attention leaves where BREAK was written

WeightedText = tuple[str, float]


class PromptSyntaxError(LoralabError):
    """A prompt cannot be read (a malformed tag or weight)."""


# --------------------------------------------------------------------------------------------
# <lora:...> tags


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:name:te:unet>`` tag: the LoRA's name as written and its two strengths."""

    name: str
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0

    def as_tag(self) -> str:
        """The tag as A1111 writes it back (one number when both strengths agree)."""
        if self.te_multiplier == self.unet_multiplier:
            return f"<lora:{self.name}:{_number(self.te_multiplier)}>"
        return f"<lora:{self.name}:{_number(self.te_multiplier)}:{_number(self.unet_multiplier)}>"


# A1111's extra-network tag: a word, a colon, then anything up to the next ">".
_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
_LORA_KINDS = ("lora", "lyco")


def _number(value: float) -> str:
    return f"{value:g}"


def _finite_number(text: str) -> float | None:
    """``text`` as a float; None when it is not a number or not finite (``nan``, ``inf``, a number
    too long for a float)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _float(text: str, what: str, tag: str) -> float:
    value = _finite_number(text)
    if value is None:
        raise PromptSyntaxError(f"{what} {text!r} in {tag} is not a finite number; write e.g. <lora:name:0.8>")
    return value


def _lora_tag(items: list[str], tag: str) -> LoraTag:
    """A1111's reading of a tag's ``:``-separated items: positional name, te, unet, dyn; or ``te=``/``unet=``."""
    positional = [item for item in items if "=" not in item]
    named = dict(item.split("=", 1) for item in items if "=" in item)
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown or len(positional) > 3:
        raise PromptSyntaxError(
            f"{tag}: only a name and te/unet strengths are supported (<lora:name:te:unet>), not {unknown or positional[3:]}"
        )
    if not positional or not positional[0].strip():
        raise PromptSyntaxError(f"{tag} names no LoRA; write <lora:name:weight>")
    te = _float(positional[1], "strength", tag) if len(positional) > 1 else 1.0
    te = _float(named["te"], "te strength", tag) if "te" in named else te
    unet = _float(positional[2], "unet strength", tag) if len(positional) > 2 else te
    unet = _float(named["unet"], "unet strength", tag) if "unet" in named else unet
    return LoraTag(positional[0], te, unet)


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Remove every ``<lora:...>`` tag from ``prompt``; returns the remaining text and the tags in order.

    Raises ``PromptSyntaxError`` for a malformed tag and for other extra networks
    (``<hypernet:...>``), which loralab does not load.
    """
    tags: list[LoraTag] = []

    def take(match: re.Match[str]) -> str:
        kind = match.group(1).lower()
        if kind not in _LORA_KINDS:
            raise PromptSyntaxError(f"{match.group(0)}: only <lora:...> tags are supported, not <{match.group(1)}:...>")
        tags.append(_lora_tag(match.group(2).split(":"), match.group(0)))
        return ""

    return _EXTRA_NETWORK_TAG.sub(take, prompt), tags


# --------------------------------------------------------------------------------------------
# Attention weights

# One token of the weight syntax per match, tried in this order (the order is the grammar).
_ATTENTION_TOKEN = re.compile(
    r"""
    \\(?P<escaped>[()\[\]\\])          # \( \) \[ \] \\ : the character itself
    | (?P<backslash>\\)                # any other backslash: dropped
    | (?P<open_round>\()
    | (?P<open_square>\[)
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\) # ":1.3)" closes a round bracket with that multiplier
    | (?P<close_round>\))
    | (?P<close_square>])
    | (?P<text>[^\\()\[\]:]+)
    | (?P<colon>:)
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[WeightedText]:
    """Split ``text`` into (text, weight) pieces with A1111's attention rules (see the module docstring).

    Neighbouring pieces of equal weight are joined; ``BREAK`` becomes the piece ``("BREAK", -1.0)``.
    An empty prompt gives ``[("", 1.0)]``.
    """
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    open_round: list[int] = []  # index of the first piece inside each open bracket
    open_square: list[int] = []

    def scale_from(start: int, multiplier: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= multiplier

    def add_text(chunk: str) -> None:
        for index, part in enumerate(_BREAK_WORD.split(chunk)):
            if index:
                pieces.append(list(BREAK))
            pieces.append([part, 1.0])

    for match in _ATTENTION_TOKEN.finditer(text):
        kind = match.lastgroup
        if kind == "escaped":
            pieces.append([match.group("escaped"), 1.0])
        elif kind == "backslash":
            pieces.append(["", 1.0])
        elif kind == "open_round":
            open_round.append(len(pieces))
        elif kind == "open_square":
            open_square.append(len(pieces))
        elif kind == "weight" and open_round:
            multiplier = _finite_number(match.group("weight"))
            if multiplier is None:
                raise PromptSyntaxError(f"attention weight {match.group(0)!r} is not a finite number; write e.g. (word:1.2)")
            scale_from(open_round.pop(), multiplier)
        elif kind == "close_round" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif kind == "close_square" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # text, a lone colon, or a bracket/weight with nothing to close
            add_text(match.group(0))

    # Unclosed brackets reach to the end: all round ones first, then the square ones (A1111's order).
    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    if not pieces:
        return [("", 1.0)]
    merged: list[list] = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(piece_text, weight) for piece_text, weight in merged]


_UNSUPPORTED = (
    (re.compile(r"(?<!\\)\[[^\[\]]*(?<!\\):[^\[\]]*(?<!\\)\]"), "prompt editing [from:to:when]"),
    (re.compile(r"(?<!\\)\[[^\[\]]*\|[^\[\]]*(?<!\\)\]"), "alternation [a|b]"),
    (re.compile(r"\bAND\b"), "AND (composable prompts)"),
)


def warn_unsupported_syntax(prompt: str) -> list[str]:
    """Log (and return) the A1111 features in ``prompt`` that are read as plain text here."""
    found = [name for pattern, name in _UNSUPPORTED if pattern.search(prompt)]
    if found:
        logger.warning("%s: %s not supported; read as text with attention weights", prompt[:60], ", ".join(found))
    return found


# --------------------------------------------------------------------------------------------
# Chunks


@dataclass(frozen=True)
class EmbeddingMatch:
    """A textual-inversion embedding found in the prompt's tokens."""

    name: str
    num_vectors: int  # vectors it puts into the chunk
    num_tokens: int  # prompt tokens (its name's tokens) it replaces


EmbeddingFinder = Callable[[Sequence[int], int], EmbeddingMatch | None]
"""``find(tokens, position)``: the embedding whose name's tokens start at ``position``, if any."""


@dataclass
class PromptChunk:
    """77 token ids (start, 75 prompt or end tokens, end), a weight per position, and where
    textual-inversion vectors go (offset in ``tokens`` -> embedding name)."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    embeddings: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkTokens:
    """The special tokens chunking needs from the tokenizer."""

    bos: int
    eos: int
    comma: int | None


def chunk_prompt(
    parsed: Sequence[WeightedText],
    tokenized: Sequence[Sequence[int]],
    special: ChunkTokens,
    *,
    find_embedding: EmbeddingFinder | None = None,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> list[PromptChunk]:
    """Lay out a parsed prompt (``tokenized[i]`` are the tokens of ``parsed[i]``'s text, without start
    and end tokens) as A1111 does: chunks of 75, cut at ``BREAK``, moved back to the last comma when
    it is at most ``comma_backtrack`` tokens back, end-token padding. Embedding vectors get the
    placeholder token 0 and an entry in the chunk's ``embeddings``.
    """
    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    last_comma = -1

    def close_chunk() -> None:
        nonlocal chunk, last_comma
        padding = CHUNK_LENGTH - len(chunk.tokens)
        chunk.tokens = [special.bos, *chunk.tokens, *[special.eos] * padding, special.eos]
        chunk.multipliers = [1.0, *chunk.multipliers, *[1.0] * padding, 1.0]
        chunk.embeddings = {offset + 1: name for offset, name in chunk.embeddings.items()}
        chunks.append(chunk)
        chunk = PromptChunk()
        last_comma = -1

    for tokens, (text, weight) in zip(tokenized, parsed, strict=True):
        if (text, weight) == BREAK:
            close_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == special.comma:
                last_comma = len(chunk.tokens)
            elif (
                comma_backtrack
                and len(chunk.tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= comma_backtrack
            ):
                # Full, and a comma close behind: everything after the comma starts the next chunk.
                cut = last_comma + 1
                moved = PromptChunk(
                    chunk.tokens[cut:],
                    chunk.multipliers[cut:],
                    {offset - cut: name for offset, name in chunk.embeddings.items() if offset >= cut},
                )
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                chunk.embeddings = {offset: name for offset, name in chunk.embeddings.items() if offset < cut}
                close_chunk()
                chunk = moved
            if len(chunk.tokens) == CHUNK_LENGTH:
                close_chunk()

            found = find_embedding(tokens, position) if find_embedding else None
            if found is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            if len(chunk.tokens) + found.num_vectors > CHUNK_LENGTH:
                close_chunk()
            chunk.embeddings[len(chunk.tokens)] = found.name
            chunk.tokens += [0] * found.num_vectors
            chunk.multipliers += [weight] * found.num_vectors
            position += found.num_tokens

    if chunk.tokens or not chunks:
        close_chunk()
    return chunks


def comma_token_id(tokenizer: object) -> int | None:
    """The id of ``,`` as a word of its own in a CLIP tokenizer (what chunking backtracks to)."""
    return tokenizer.get_vocab().get(",</w>")  # type: ignore[attr-defined]


def tokenize_pieces(tokenizer: object, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without start/end tokens and untruncated (chunking splits them)."""
    if not texts:
        return []
    # verbose=False: a prompt longer than 77 tokens is expected here (it is chunked), not a mistake.
    return tokenizer(list(texts), truncation=False, add_special_tokens=False, verbose=False)["input_ids"]  # type: ignore[operator]
