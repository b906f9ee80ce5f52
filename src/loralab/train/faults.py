"""What stops a training run early: stop signals and non-finite losses.

- **SIGINT / SIGTERM** (Ctrl-C, ``kill``, a cluster preempting the job): :class:`StopSignals`
  records the signal instead of raising; the loop finishes the optimizer step in progress,
  saves the training state and a LoRA, and the run ends normally (exit code 0) with a message
  that says how to resume. A second signal while the run is finishing raises
  ``KeyboardInterrupt`` as usual, so a stuck run can still be killed.
- **A non-finite loss** (NaN/inf, usually a learning rate far too high or fp16 overflow):
  by default the run stops with :class:`NonFiniteLossError` before the bad step touches the
  weights and without writing anything, so the last saved LoRA is the last good one. With
  ``on_non_finite="skip"`` the step's update is dropped and training goes on.

The handlers are installed for the duration of a run only and the previous handlers are put
back afterwards, so nothing outlives the run (several runs can follow each other in one
process). Handlers can only be installed from the main thread; elsewhere signals keep their
default behaviour.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from loralab.errors import LoralabError

logger = logging.getLogger(__name__)

NonFinitePolicy = Literal["stop", "skip"]
NON_FINITE_POLICIES: tuple[str, ...] = ("stop", "skip")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class NonFiniteLossError(LoralabError):
    """The loss became NaN or infinite; the run stopped without saving the bad step."""


class StopSignals:
    """Remembers a SIGINT/SIGTERM so the loop can stop at the next step boundary."""

    def __init__(self) -> None:
        self.received: int | None = None

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.received is not None

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask the run to stop after the current step (what the signal handler does)."""
        self.received = signum

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        if self.requested:
            raise KeyboardInterrupt  # second signal: the user really wants out
        self.request(signum)
        logger.warning(
            "received %s: finishing the current step, then saving state and a LoRA (send it again to abort)",
            signal.Signals(signum).name,
        )

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle SIGINT/SIGTERM while the block runs; restore the previous handlers after it."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def non_finite_message(*, global_step: int, epoch: int, last_save: str | None) -> str:
    """The one-line message of a run stopped by a non-finite loss."""
    kept = f"the last good LoRA is {last_save}" if last_save else "nothing was saved yet"
    return (
        f"loss became NaN or infinite at step {global_step} (epoch {epoch}); the run stopped before updating the "
        f"weights and {kept}; lower the learning rate, use bf16 instead of fp16, or set "
        f"--on-non-finite skip to drop such steps"
    )


def check_policy(policy: str) -> NonFinitePolicy:
    """Validate an ``on_non_finite`` value; raises ``LoralabError`` for anything else."""
    if policy not in NON_FINITE_POLICIES:
        raise LoralabError(f"on_non_finite={policy!r} is unknown; use one of {', '.join(NON_FINITE_POLICIES)}")
    return policy  # type: ignore[return-value]
