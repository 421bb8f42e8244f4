"""A rank that fails stops every rank, with the failing rank's error, in bounded time.

Without care, one rank raising leaves the others blocked in the next collective (an FSDP
all-gather, the final gather of results) until the process group's timeout, 30 minutes by
default, or forever. ``failure_guard`` wraps a distributed section:

* the rank that raises first publishes ``"rank k: Type: message"`` in the process group's
  key-value store (the TCPStore every torch.distributed job has) and re-raises its exception;
* every rank runs a watchdog thread that polls the store (once per ``poll_s``). When another rank
  has failed, it prints that rank's error and marks the failure: the sampling loop checks the mark
  every step and raises ``PeerFailedError``; a rank blocked inside a collective cannot be
  interrupted, so if it has not left the guarded section ``grace_s`` seconds later the watchdog
  ends the process with exit code ``PEER_FAILED_EXIT_CODE`` (3);
* a rank whose own collective fails (gloo reports a closed connection as soon as the failed process
  exits) raises ``PeerFailedError`` naming the rank that failed first. Other exceptions pass through
  unchanged: errors every rank raises alike (invalid arguments, ``AllChainsDivergedError``, a
  refused memory plan) stay what they are on every rank.

Under torchrun the launcher also stops all workers once one exits with an error; the guard makes
the same hold for any launcher and for a failing rank that stays alive (a caller catching the
exception). A rank that hangs without raising is caught by the process group's timeout
(``llc-fast estimate --timeout``).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading

import torch.distributed as dist

PEER_FAILED_EXIT_CODE = 3
_COUNTER = itertools.count()
_ACTIVE = threading.local()


class PeerFailedError(RuntimeError):
    """Another rank of the job failed; this rank stopped. The message names that rank and its error."""


def _is_communication_error(exc: BaseException) -> bool:
    """A failed collective: torch.distributed's own error types, or the plain RuntimeError gloo raises."""
    kinds = tuple(getattr(dist, n) for n in ("DistError", "DistBackendError", "DistNetworkError") if hasattr(dist, n))
    return type(exc) is RuntimeError or isinstance(exc, kinds)


def _default_store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # no store (an unusual init): rely on the launcher and the timeout
        return None


class Guard:
    """The handle ``failure_guard`` yields: ``check()`` raises PeerFailedError once a peer failed."""

    def __init__(self, store, tag: str, rank: int, world: int, grace_s: float, poll_s: float):
        self.store, self.tag, self.rank, self.world = store, tag, rank, world
        self.grace_s, self.poll_s = grace_s, poll_s
        self._stop = threading.Event()
        self._peer_failed = threading.Event()
        self._published = False
        self.peer_message = ""
        self._thread = None

    # keys
    def _count_key(self) -> str:
        return f"{self.tag}/failed"

    def _msg_key(self, r: int) -> str:
        return f"{self.tag}/error/{r}"

    def start(self) -> None:
        if self.store is None:
            return
        self._thread = threading.Thread(target=self._watch, name="llc_fast-failure-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> None:
        """Raise PeerFailedError if another rank has failed (called between steps)."""
        if self._peer_failed.is_set() and not self._published:
            raise PeerFailedError(f"rank {self.rank} stopped because {self.peer_message}")

    def peer_failures(self) -> str:
        """The published errors of other ranks ("" if none)."""
        if self.store is None:
            return ""
        try:
            if self.store.add(self._count_key(), 0) <= 0:
                return ""
            msgs = [self.store.get(self._msg_key(r)).decode() for r in range(self.world)
                    if r != self.rank and self.store.check([self._msg_key(r)])]
        except Exception:
            return ""
        return "; ".join(msgs)

    def publish(self, exc: BaseException) -> None:
        if self.store is None or self._published:
            return
        self._published = True
        text = f"{type(exc).__name__}: {exc}".strip().splitlines()
        msg = f"rank {self.rank} failed with {text[0] if text else type(exc).__name__}"
        try:
            self.store.set(self._msg_key(self.rank), msg.encode())
            self.store.add(self._count_key(), 1)
        except Exception:
            pass

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self._published:
                return
            message = self.peer_failures()
            if not message:
                continue
            self.peer_message = message
            self._peer_failed.set()
            quiet = min(1.0, self.grace_s)  # the main thread usually leaves by itself (its own error, or check())
            if self._stop.wait(quiet):
                return
            print(f"llc_fast [rank {self.rank}]: {message}; stopping this rank", file=sys.stderr, flush=True)
            if self._stop.wait(self.grace_s - quiet):
                return
            print(f"llc_fast [rank {self.rank}]: still blocked {self.grace_s:g} s after the failure of another rank "
                  f"(inside a collective); ending the process (exit code {PEER_FAILED_EXIT_CODE})",
                  file=sys.stderr, flush=True)
            os._exit(PEER_FAILED_EXIT_CODE)


class _NoGuard:
    peer_message = ""

    def check(self) -> None:
        pass


@contextlib.contextmanager
def failure_guard(grace_s: float = 10.0, poll_s: float | None = None):
    """Guard a section that every rank of the process group enters together (see module docstring).

    poll_s: seconds between the watchdog's looks at the store (default 0.5, longer for very large
    jobs: at most about 500 looks per second reach the store). Nested guards are one guard (the
    outermost). Without a process group of several ranks it does nothing.
    """
    if getattr(_ACTIVE, "guard", None) is not None:
        yield _ACTIVE.guard
        return
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield _NoGuard()
        return
    world = dist.get_world_size()
    poll_s = max(0.5, world / 500) if poll_s is None else poll_s
    guard = Guard(_default_store(), f"llc_fast/guard{next(_COUNTER)}", dist.get_rank(), world, grace_s, poll_s)
    guard.start()
    _ACTIVE.guard = guard
    try:
        yield guard
    except PeerFailedError:
        raise
    except BaseException as e:
        earlier = (guard.peer_message or guard.peer_failures()) if _is_communication_error(e) else ""
        if earlier:  # this rank's collective broke because another rank failed first
            raise PeerFailedError(f"rank {guard.rank} stopped because {earlier} "
                                  f"(here: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        guard.publish(e)
        raise
    finally:
        _ACTIVE.guard = None
        guard.stop()
