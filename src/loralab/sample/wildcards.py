"""Wildcards and variants as the Dynamic Prompts extension expands them, deterministic per seed.

- ``__name__`` is replaced by a random line of ``name.txt`` in the wildcards folder; subfolders
  name their files with slashes (``__checkpoints/photo__`` is ``checkpoints/photo.txt``). Empty
  lines and lines starting with ``#`` are skipped; a chosen line may itself hold wildcards or
  variants. The guide's ``scene.txt`` works as it is.
- ``{a|b|c}`` picks one variant, ``{9::768|1024}`` weights them (9 to 1 here),
  ``{2$$a|b|c}`` picks two, joined by ``, ``. Variants nest and may hold wildcards.

The expansion is Dynamic Prompts' own (the ``dynamicprompts`` package the A1111 extension is built
on), run in its random mode with a ``random.Random`` seeded by the image's seed: the same seed
gives the same prompt, on every machine. A1111's own syntax (``(word:1.2)``, ``<lora:...>``,
``\\(``) passes through unchanged.

A wildcard with no file is an error naming the missing file and the ones there are (Dynamic Prompts
itself would leave the ``__name__`` text in the prompt).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError

_WILDCARD = re.compile(r"__([^\s_][^\s]*?)__")


class WildcardError(LoralabError):
    """A wildcard file is missing, or a template cannot be expanded."""


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for ``purpose`` (one setting of an image) drawn from the image's ``seed``.

    Each setting gets its own stream, so ``{3|7}`` in the CFG and ``{a|b}`` in the prompt are not
    forced to pick the same position. Stable across runs and machines (string seeds hash with SHA-512).
    """
    return random.Random(f"{seed}:{purpose}").getrandbits(32)


class Wildcards:
    """Expands templates with wildcards from ``folder`` (None: variants only, no ``__name__``)."""

    def __init__(self, folder: Path | str | None = None) -> None:
        # Imported here: dynamicprompts pulls in its parser on import, which plain generation skips.
        from dynamicprompts.commands.base import SamplingMethod
        from dynamicprompts.sampling_context import SamplingContext
        from dynamicprompts.wildcards import WildcardManager

        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None and not self.folder.is_dir():
            raise WildcardError(f"wildcards folder not found: {self.folder}")
        self._manager = WildcardManager(self.folder)
        # Dynamic Prompts' random mode, with its generator reseeded per expansion (what its
        # RandomPromptGenerator does); parsed templates are kept, as sweeps expand one many times.
        self._context = SamplingContext(
            wildcard_manager=self._manager, default_sampling_method=SamplingMethod.RANDOM, rand=random.Random()
        )
        self._parsed: dict[str, Any] = {}

    def names(self) -> list[str]:
        """The wildcard names available (``scene``, ``checkpoints/photo`` ...), sorted."""
        return sorted(self._manager.get_collection_names()) if self.folder is not None else []

    def expand(self, template: str, seed: int) -> str:
        """``template`` with every variant and wildcard resolved by a generator seeded with ``seed``.

        Raises ``WildcardError`` for a wildcard without a file, or a template Dynamic Prompts cannot parse.
        """
        if "{" not in template and "__" not in template:
            return template  # nothing to expand: skip the parser
        for name in _WILDCARD.findall(template):  # checked first: Dynamic Prompts would only log it
            if self.folder is None or not self._manager.get_values(name):
                self._check_resolved(f"__{name}__")
        try:
            if template not in self._parsed:
                from dynamicprompts.parser.parse import parse

                self._parsed[template] = parse(template, parser_config=self._context.parser_config)
            self._context.rand.seed(seed)
            expanded = str(next(iter(self._context.sample_prompts(self._parsed[template], 1))))
        except Exception as exc:  # the parser raises its own exception types for malformed syntax
            raise WildcardError(f"cannot expand {template[:80]!r}: {_unclosed_brace(template) or exc}") from None
        self._check_resolved(expanded)
        return expanded

    def _check_resolved(self, text: str) -> None:
        for name in _WILDCARD.findall(text):
            if self.folder is None:
                raise WildcardError(f"__{name}__ needs a wildcards folder (--wildcards DIR) holding {name}.txt")
            if (self.folder / f"{name}.txt").is_file():
                raise WildcardError(
                    f"wildcard file {self.folder / f'{name}.txt'} has no line to choose for __{name}__ "
                    "(only empty lines and # comments); add one choice per line"
                )
            available = ", ".join(self.names()[:12]) or "none"
            raise WildcardError(
                f"wildcard __{name}__ has no file {name}.txt in {self.folder} (wildcards there: {available})"
            )


def _unclosed_brace(template: str) -> str | None:
    """Where a ``{`` is never closed: the usual cause of a template Dynamic Prompts cannot parse,
    which its own message only names as an unexpected ``{``."""
    opened: list[int] = []  # Dynamic Prompts has no escape for braces: every one counts
    for index, char in enumerate(template):
        if char == "{":
            opened.append(index)
        elif char == "}" and opened:
            opened.pop()
    if not opened:
        return None
    return f"the '{{' at character {opened[-1] + 1} is never closed; write variants as {{a|b|c}}"
