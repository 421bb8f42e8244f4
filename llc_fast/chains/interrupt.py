"""Ctrl-C and SIGTERM during sampling: stop at the next step boundary, not in the middle of a kernel.

``StopRequest`` installs handlers for SIGINT and SIGTERM while sampling (main thread only). The first
signal sets ``requested``; the sampling loop then writes a checkpoint and raises ``SamplingInterrupted``
with the partial result. A second signal exits at once (KeyboardInterrupt).
"""
from __future__ import annotations

import signal
import sys
import threading


class SamplingInterrupted(KeyboardInterrupt):
    """Sampling stopped on a signal at a step boundary. ``checkpoint``: where the run was saved (resume with
    ``resume=checkpoint``); ``result``: the partial LLCResult (``config['partial']`` is True) once the
    estimator has built it; ``trace``: the partial chain trace."""

    def __init__(self, message: str, checkpoint: str | None, trace=None, init_loss: float | None = None,
                 signum: int | None = None):
        super().__init__(message)
        self.checkpoint, self.trace, self.init_loss, self.signum = checkpoint, trace, init_loss, signum
        self.result = None


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM ask the loop to stop (see module docstring)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested, self.signum, self._previous = False, None, {}

    def _handle(self, signum, frame):
        if self.requested:  # the second signal: exit now
            for s, h in self._previous.items():
                signal.signal(s, h)
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: exiting at once")
        self.requested, self.signum = True, signum
        print(f"\nllc_fast: {signal.Signals(signum).name} received: stopping at the next step boundary and writing "
              "a checkpoint (send it again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
        return False


def interruption(signum: int | None, fresh: str | None, written: str | None, save_error: str | None, step: int,
                 first_row: int, trace, init_loss: float) -> SamplingInterrupted:
    """The error that ends a run stopped by ``signum`` (None: a signal to another rank) after ``step`` of the row
    batch starting at ``first_row``. fresh: the checkpoint just written (None: the write failed, ``save_error``);
    written: the checkpoint to resume from (fresh, else the last one written, else None); trace: the partial trace."""
    name = signal.Signals(signum).name if signum else "a signal to another rank"
    saved = f"the run is saved in {fresh}" if fresh else \
        f"{save_error}, so the run is saved only as far as its last checkpoint, {written}" if written else \
        f"{save_error}: there is no checkpoint to resume"
    resume = f": resume it with the same call plus resume={written!r} (llc-fast estimate: --resume {written})" \
        if written else ""
    return SamplingInterrupted(
        f"sampling stopped by {name} after step {step} of the group starting at chain {first_row}; "
        f"{saved}{resume}. The partial result is in this exception's .result.",
        written, trace, init_loss, signum)
