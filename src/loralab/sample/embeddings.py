"""Prompt text to UNet conditioning as A1111 computes it, with textual-inversion embeddings.

:class:`PromptEncoder` turns one prompt into the tensors diffusers' pipelines take as
``prompt_embeds`` (and SDXL's ``pooled_prompt_embeds``):

1. ``prompt_syntax`` splits the prompt into weighted pieces and lays its tokens out in 77-token
   chunks (A1111's rules: BREAK, comma backtracking, embeddings kept whole).
2. Each chunk goes through the text encoder(s) on its own, through the training code's
   ``encode_text`` (``loralab.train.conditioning``), so clip skip and SDXL's layer choice and pooled
   output are the ones training uses. Where the tokenizer pads with a token other than the end
   token (SD2, SDXL's second encoder), positions after the first end token are that pad token.
3. Weights are applied per chunk and per encoder as A1111's default "Original" emphasis does:
   multiply each position's vector by its weight, then rescale the chunk so its mean is what it
   was before. ("No norm" skips the rescaling, "Ignore" the weights, "None" the parsing.)
4. The chunks are concatenated (77 positions each, start and end tokens included, as A1111 does);
   SDXL's pooled embedding comes from the first chunk.

A plain prompt of up to 75 tokens gives exactly the embeddings diffusers' own ``encode_prompt``
makes. An empty SDXL negative prompt gives zeros, as both A1111 and diffusers do for SDXL.

Textual-inversion embeddings (:class:`EmbeddingLibrary`) are found by their file name's tokens in
the prompt (``easynegative`` in a negative prompt). Files: ``.safetensors`` with ``emb_params``,
``clip_l``/``clip_g`` (SDXL) or a single tensor; ``.pt``/``.bin`` (A1111's ``string_to_param``,
diffusers' ``{token: tensor}``) read with ``torch.load(weights_only=True)`` only. Their vectors enter
through token rows added after the vocabulary for the duration of one encoding; the loaded text
encoder is left as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from loralab.errors import LoralabError
from loralab.models.family import ModelFamily
from loralab.sample.hashes import embedding_short_hash
from loralab.sample.prompt_syntax import (
    COMMA_BACKTRACK,
    ChunkTokens,
    EmbeddingMatch,
    PromptChunk,
    chunk_prompt,
    comma_token_id,
    parse_prompt_attention,
    tokenize_pieces,
)
from loralab.train.conditioning import encode_text

Emphasis = Literal["Original", "No norm", "Ignore", "None"]
EMPHASIS_MODES: tuple[str, ...] = ("Original", "No norm", "Ignore", "None")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


class EmbeddingError(LoralabError):
    """A textual-inversion embedding cannot be read or does not fit the model."""


# --------------------------------------------------------------------------------------------
# Textual-inversion files


@dataclass(frozen=True)
class TextualInversion:
    """One embedding: its vectors per text encoder it was made for (SD1/SD2: one; SDXL: CLIP-L, CLIP-G)."""

    name: str
    path: Path
    vectors: tuple[torch.Tensor, ...]  # each (num_vectors, width)

    @property
    def num_vectors(self) -> int:
        return int(self.vectors[0].shape[0])

    @property
    def short_hash(self) -> str:
        return embedding_short_hash(self.path)

    def check_fits(self, widths: Sequence[int]) -> None:
        """Raise ``EmbeddingError`` unless there is one vector set per encoder, of its width."""
        have = [int(v.shape[1]) for v in self.vectors]
        if have != list(widths):
            raise EmbeddingError(
                f"embedding {self.name} ({self.path.name}) has vectors of width {have} but this model's "
                f"text encoders take {list(widths)}; use an embedding made for this model family"
            )


def _as_matrix(tensor: Any, path: Path) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2):
        raise EmbeddingError(f"{path.name} is not a textual-inversion embedding (no vector tensor found)")
    matrix = tensor.detach().float()
    return matrix.unsqueeze(0) if matrix.dim() == 1 else matrix


def _read_embedding_data(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EmbeddingError(f"embedding file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        import safetensors.torch

        try:
            return dict(safetensors.torch.load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise EmbeddingError(f"{path.name} cannot be read as safetensors ({exc})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler refuses anything beyond tensors and plain data
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise EmbeddingError(
            f"{path.name} cannot be read safely (weights-only): {first}; convert it to .safetensors"
        ) from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path.name} is not a textual-inversion embedding (holds a {type(data).__name__})")
    return data


def load_embedding(path: Path | str, name: str | None = None) -> TextualInversion:
    """Read one textual-inversion file (formats in the module docstring). Raises ``EmbeddingError``."""
    path = Path(path)
    data = _read_embedding_data(path)
    name = name or path.stem
    if "clip_l" in data and "clip_g" in data:  # SDXL: one set per encoder
        vectors = (_as_matrix(data["clip_l"], path), _as_matrix(data["clip_g"], path))
    elif isinstance(data.get("string_to_param"), dict):  # A1111's own .pt
        params = list(data["string_to_param"].values())
        if len(params) != 1:
            raise EmbeddingError(f"{path.name} holds {len(params)} embeddings; one per file is supported")
        vectors = (_as_matrix(params[0], path),)
    elif "emb_params" in data:
        vectors = (_as_matrix(data["emb_params"], path),)
    else:
        tensors = [value for value in data.values() if isinstance(value, torch.Tensor)]
        if len(tensors) != 1:
            raise EmbeddingError(
                f"{path.name} is not a textual-inversion embedding (expected emb_params, string_to_param, "
                f"clip_l/clip_g or one tensor; found {sorted(data)[:5]})"
            )
        vectors = (_as_matrix(tensors[0], path),)
    if len({v.shape[0] for v in vectors}) != 1:
        raise EmbeddingError(f"{path.name}: its clip_l and clip_g parts have different vector counts")
    return TextualInversion(name, path, vectors)


class EmbeddingLibrary:
    """The embeddings a prompt may name: files by name (their stem), read when first used."""

    def __init__(self, files: Iterable[Path | str] = ()) -> None:
        self._paths: dict[str, Path] = {}
        for file in files:
            path = Path(file)
            self._paths[path.stem] = path
        self._loaded: dict[str, TextualInversion] = {}
        self._finders: dict[int, _TokenIndex] = {}

    @classmethod
    def from_folder(cls, folder: Path | str) -> EmbeddingLibrary:
        """Every embedding file in ``folder`` and its subfolders (A1111's ``embeddings`` folder)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise EmbeddingError(f"embeddings folder not found: {folder}")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES)
        return cls(files)

    @property
    def names(self) -> list[str]:
        return sorted(self._paths)

    def get(self, name: str) -> TextualInversion:
        if name not in self._loaded:
            if name not in self._paths:
                raise EmbeddingError(f"no embedding named {name!r}; known: {', '.join(self.names) or 'none'}")
            self._loaded[name] = load_embedding(self._paths[name], name)
        return self._loaded[name]

    def finder(self, tokenizer: Any) -> _TokenIndex:
        """Finds these embeddings' names in token sequences of ``tokenizer``."""
        key = id(tokenizer)
        if key not in self._finders:
            self._finders[key] = _TokenIndex(self, tokenizer)
        return self._finders[key]


class _TokenIndex:
    """Embedding names as token sequences, grouped by first token, longest first (A1111's lookup)."""

    def __init__(self, library: EmbeddingLibrary, tokenizer: Any) -> None:
        self._library = library
        self._by_first: dict[int, list[tuple[list[int], str]]] = {}
        names = library.names
        for name, ids in zip(names, tokenize_pieces(tokenizer, names)):
            if ids:
                self._by_first.setdefault(ids[0], []).append((ids, name))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda item: len(item[0]), reverse=True)

    def __call__(self, tokens: Sequence[int], position: int) -> EmbeddingMatch | None:
        for ids, name in self._by_first.get(tokens[position], ()):
            if list(tokens[position : position + len(ids)]) == ids:
                return EmbeddingMatch(name, self._library.get(name).num_vectors, len(ids))
        return None


# --------------------------------------------------------------------------------------------
# Encoding


@dataclass
class PromptEmbedding:
    """Conditioning for one prompt: ``hidden`` (1, 77 * chunks, width), SDXL's ``pooled`` (1, dim)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None
    embeddings: tuple[TextualInversion, ...] = ()  # the textual inversions the prompt used

    @property
    def num_chunks(self) -> int:
        return self.hidden.shape[1] // 77


class _TokenEmbeddingWithExtras(nn.Module):
    """A text encoder's token embedding plus rows after its vocabulary (textual-inversion vectors)."""

    def __init__(self, base: nn.Embedding, extra: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("extra", extra.to(base.weight.device, base.weight.dtype), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the embedding sees the original
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vocab = self.base.num_embeddings
        is_extra = ids >= vocab
        out = self.base(ids.clamp(max=vocab - 1))
        if bool(is_extra.any()):
            out[is_extra] = self.extra[ids[is_extra] - vocab]
        return out


def _embeddings_module(text_encoder: Any) -> nn.Module:
    # transformers 5 dropped the ``text_model`` wrapper from CLIPTextModel, not from the projection model.
    return getattr(text_encoder, "text_model", text_encoder).embeddings


@contextmanager
def _extra_token_rows(text_encoder: Any, extra: torch.Tensor) -> Iterator[int]:
    """Within the block, ids from the returned vocabulary size on read rows of ``extra``."""
    embeddings = _embeddings_module(text_encoder)
    original = embeddings.token_embedding
    embeddings.token_embedding = _TokenEmbeddingWithExtras(original, extra)
    try:
        yield original.num_embeddings
    finally:
        embeddings.token_embedding = original


def apply_emphasis(hidden: torch.Tensor, multipliers: torch.Tensor, emphasis: str) -> torch.Tensor:
    """Weight one chunk's vectors ``(77, width)`` by ``multipliers`` ``(77,)`` as A1111's ``emphasis`` does."""
    if emphasis in ("Ignore", "None") or bool((multipliers == 1).all()):
        return hidden  # all weights 1: exactly unchanged (also when the mean is 0, where 0/0 would be NaN)
    # In float32 whatever the model's precision (A1111's float32 multipliers promote it the same way).
    original = hidden.float()
    weighted = original * multipliers.to(hidden.device, torch.float32).unsqueeze(-1)
    new_mean = weighted.mean()
    if emphasis == "No norm" or new_mean == 0:
        return weighted
    # "Original": restore the chunk's mean (A1111: "it seems to work well to prevent artifacts").
    return weighted * (original.mean() / new_mean)


class PromptEncoder:
    """Encodes prompts for one loaded model, as A1111 does (see the module docstring).

    ``clip_skip``: A1111's "Clip skip" (1 or None = last layer; SD1/SD2 only, SDXL always uses the
    penultimate layer). ``embeddings``: textual inversions the prompts may name. ``emphasis``:
    A1111's emphasis mode. Raises ``EmbeddingError`` when a prompt names an embedding made for
    another model family, ``ConfigError`` for a clip skip deeper than the encoder.
    """

    def __init__(
        self,
        components: Any,
        *,
        clip_skip: int | None = None,
        embeddings: EmbeddingLibrary | None = None,
        emphasis: str = "Original",
        comma_backtrack: int = COMMA_BACKTRACK,
    ) -> None:
        if emphasis not in EMPHASIS_MODES:
            raise EmbeddingError(f"unknown emphasis mode {emphasis!r}; use one of {', '.join(EMPHASIS_MODES)}")
        self.family: ModelFamily = components.family
        self.text_encoders = list(components.text_encoders)
        self.tokenizers = list(components.tokenizers)
        self.clip_skip = None if self.family is ModelFamily.SDXL else clip_skip
        self.embeddings = embeddings
        self.emphasis = emphasis
        self.comma_backtrack = comma_backtrack
        first = self.tokenizers[0]
        self._special = ChunkTokens(first.bos_token_id, first.eos_token_id, comma_token_id(first))
        self._widths = [_embeddings_module(te).token_embedding.embedding_dim for te in self.text_encoders]

    def chunks(self, prompt: str) -> list[PromptChunk]:
        """The prompt's 77-token chunks (before encoding): useful to count tokens and check layout."""
        parsed = parse_prompt_attention(prompt) if self.emphasis != "None" else [(prompt, 1.0)]
        tokenized = tokenize_pieces(self.tokenizers[0], [text for text, _ in parsed])
        finder = self.embeddings.finder(self.tokenizers[0]) if self.embeddings else None
        return chunk_prompt(parsed, tokenized, self._special, find_embedding=finder, comma_backtrack=self.comma_backtrack)

    @torch.no_grad()
    def encode(self, prompt: str, *, negative: bool = False) -> PromptEmbedding:
        """Conditioning for ``prompt``; ``negative`` marks a negative prompt (empty ones are zeros on SDXL)."""
        if negative and not prompt and self.family is ModelFamily.SDXL:
            return self._zeros()
        chunks = self.chunks(prompt)
        used = self._used_embeddings(chunks)
        with ExitStack() as stack:
            token_ids = []
            for index, (encoder, tokenizer) in enumerate(zip(self.text_encoders, self.tokenizers)):
                first_extra_id = 0
                if used:
                    extra = torch.cat([emb.vectors[index] for emb in used])
                    first_extra_id = stack.enter_context(_extra_token_rows(encoder, extra))
                token_ids.append(self._token_ids(chunks, tokenizer, used, first_extra_id).unsqueeze(1))
            conditioning = encode_text(
                self.family,
                self.text_encoders,
                token_ids,
                eos_token_ids=[t.eos_token_id for t in self.tokenizers],
                clip_skip=self.clip_skip,
            )
        hidden = conditioning.encoder_hidden_states  # (chunks, 77, sum of widths)
        multipliers = torch.tensor([chunk.multipliers for chunk in chunks], dtype=torch.float32)
        # Each encoder's output is weighted on its own (A1111 weights before SDXL concatenates them).
        parts = []
        for part in hidden.split(self._output_widths(hidden), dim=-1):
            # Contiguous: each encoder's part is averaged as a tensor of its own, as in A1111.
            part = part.contiguous()
            parts.append(torch.stack([apply_emphasis(z, m, self.emphasis).to(z.dtype) for z, m in zip(part, multipliers)]))
        weighted = torch.cat(parts, dim=-1)
        pooled = conditioning.pooled[:1] if conditioning.pooled is not None else None
        return PromptEmbedding(weighted.reshape(1, -1, weighted.shape[-1]), pooled, tuple(used))

    def _output_widths(self, hidden: torch.Tensor) -> list[int]:
        if self.family is ModelFamily.SDXL:
            return self._widths
        return [hidden.shape[-1]]

    def _used_embeddings(self, chunks: Sequence[PromptChunk]) -> list[TextualInversion]:
        names = sorted({name for chunk in chunks for name in chunk.embeddings.values()})
        if not names:
            return []
        assert self.embeddings is not None
        used = [self.embeddings.get(name) for name in names]
        for embedding in used:
            embedding.check_fits(self._widths)
        return used

    def _token_ids(
        self, chunks: Sequence[PromptChunk], tokenizer: Any, used: Sequence[TextualInversion], first_extra_id: int
    ) -> torch.Tensor:
        """(chunks, 77) ids for one encoder: its padding rule, and extra-row ids where embeddings go."""
        starts, next_id = {}, first_extra_id
        for embedding in used:
            starts[embedding.name] = next_id
            next_id += embedding.num_vectors
        rows = []
        for chunk in chunks:
            ids = list(chunk.tokens)
            if tokenizer.pad_token_id != tokenizer.eos_token_id:
                end = ids.index(tokenizer.eos_token_id)
                ids[end + 1 :] = [tokenizer.pad_token_id] * (len(ids) - end - 1)
            for offset, name in chunk.embeddings.items():
                count = self.embeddings.get(name).num_vectors  # type: ignore[union-attr]
                ids[offset : offset + count] = range(starts[name], starts[name] + count)
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long)

    def _zeros(self) -> PromptEmbedding:
        encoder = self.text_encoders[-1]
        dtype = next(encoder.parameters()).dtype
        device = next(encoder.parameters()).device
        projection = getattr(encoder, "text_projection", None)
        pooled_width = projection.out_features if projection is not None else self._widths[-1]
        return PromptEmbedding(
            torch.zeros(1, 77, sum(self._widths), dtype=dtype, device=device),
            torch.zeros(1, pooled_width, dtype=dtype, device=device),
        )
