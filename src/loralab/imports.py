"""Heavy imports (torch, transformers, diffusers) with the cyclic garbage collector paused.

Those imports create several hundred thousand long-lived objects, and the collector rescans the
growing heap again and again while they are created although none of them is garbage: on two CPU
cores that was about a fifth of the time ``loralab train`` spends before its first step. Pausing
it for the imports and then freezing what they created (later collections skip frozen objects) is
the standard remedy; reference counting frees everything as usual meanwhile.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def heavy_imports() -> Iterator[None]:
    """Run the block (its imports) without cyclic garbage collection; freeze the objects alive at
    its end if it imported anything new, so the collector does not scan the libraries later."""
    modules_before = len(sys.modules)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) > modules_before:
            gc.freeze()
        if was_enabled:
            gc.enable()
