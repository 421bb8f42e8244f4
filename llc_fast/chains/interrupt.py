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
