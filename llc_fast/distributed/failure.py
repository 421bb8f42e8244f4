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

Ranks that stop answering without raising are found by heartbeats: every poll, each rank's watchdog
publishes a beat, how many sampling steps its main thread has finished, and whether that thread is
waiting inside a collective (``torch.distributed`` on its stack) or running its own code.

* a rank whose beat stops for ``dead_s`` (default max(10 s, 10 polls)) was killed (SIGKILL, OOM) or
  stopped: every other rank names it and stops, within dead_s + grace_s;
* when no rank has finished a step for ``stall_s`` (default 600 s; ``llc-fast estimate
  --stall-timeout``) and some rank is outside every collective, that rank is stuck in its own code (a
  hang in loss_fn, a dead data loader): it is named with the code it is in, and every rank stops, the
  stuck one included. Ranks waiting in a collective are never blamed for waiting.

Under torchrun the launcher also stops all workers once one exits with an error; the guard makes
the same hold for any launcher and for a failing rank that stays alive (a caller catching the
exception). The process group's timeout (``--timeout``) remains the last bound.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time

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

    def __init__(self, store, tag: str, rank: int, world: int, grace_s: float, poll_s: float,
                 dead_s: float | None = None, stall_s: float = 600.0):
        self.store, self.tag, self.rank, self.world = store, tag, rank, world
        self.grace_s, self.poll_s = grace_s, poll_s
        self.dead_s = max(10.0, 10 * poll_s) if dead_s is None else dead_s
        self.stall_s = stall_s
        self._stop = threading.Event()
        self._peer_failed = threading.Event()
        self._published = False
        self.peer_message = ""
        self._thread = None
        self.steps = 0  # sampling steps this rank's main thread finished (check() counts them)
        self._main = threading.main_thread().ident
        self._beats = 0
        self._seen: dict[int, tuple[str, float]] = {}  # peer -> (last beat text, when it changed)
        self._progress = (-1, time.monotonic())  # (sum of every rank's steps, when it last changed)

    # keys
    def _count_key(self) -> str:
        return f"{self.tag}/failed"

    def _msg_key(self, r: int) -> str:
        return f"{self.tag}/error/{r}"

    def _beat_key(self, r: int) -> str:
        return f"{self.tag}/beat/{r}"

    # heartbeats
    def _where(self) -> str:
        """'collective' if the main thread waits inside torch.distributed, else its innermost frame."""
        frame = sys._current_frames().get(self._main)
        inner = frame
        while frame is not None:
            name = frame.f_code.co_filename.replace(os.sep, "/")
            if "torch/distributed/" in name and "llc_fast" not in name:
                return "collective"
            frame = frame.f_back
        if inner is None:
            return "unknown"
        return f"{inner.f_code.co_name} at {inner.f_code.co_filename}:{inner.f_lineno}"

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(self._beat_key(self.rank), f"{self._beats}|{self.steps}|{self._where()}".encode())

    def unanswering_peer(self) -> str:
        """A message naming a peer that stopped answering (dead, or stuck outside every collective), or ""."""
        now = time.monotonic()
        beats = {}
        for r in range(self.world):
            if r == self.rank:
                continue
            try:
                text = self.store.get(self._beat_key(r)).decode() if self.store.check([self._beat_key(r)]) else ""
            except Exception:
                return ""
            last, since = self._seen.get(r, ("", now))
            if text != last:
                self._seen[r] = (text, now)
            elif text and now - since > self.dead_s:
                return (f"rank {r} stopped answering (no heartbeat for {now - since:.0f} s: its process was killed or "
                        "stopped)")
            beats[r] = text
        parsed = {r: t.split("|", 2) for r, t in beats.items() if t.count("|") >= 2}
        total = self.steps + sum(int(p[1]) for p in parsed.values())
        if total != self._progress[0]:
            self._progress = (total, now)
            return ""
        if now - self._progress[1] < self.stall_s:
            return ""
        stuck = [(r, p[2]) for r, p in parsed.items() if p[2] != "collective"]
        if stuck and all(p[2] == "collective" for r, p in parsed.items() if r not in dict(stuck)):
            r, where = stuck[0]
            return (f"rank {r} stopped answering: no rank finished a step for {now - self._progress[1]:.0f} s and "
                    f"rank {r} is not waiting in a collective (it is in {where}; a hang in its own code?)")
        return ""

    def stuck_here(self) -> bool:
        """This rank is the stuck one: no step anywhere for stall_s, and only this rank is outside a collective."""
        return (time.monotonic() - self._progress[1] >= self.stall_s and self._where() != "collective"
                and all(t.split("|", 2)[2] == "collective" for t, _ in self._seen.values() if t.count("|") >= 2))

    def start(self) -> None:
        if self.store is None:
            return
        self._thread = threading.Thread(target=self._watch, name="llc_fast-failure-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the watchdog and wait for it: no store call may outlive the guarded section (the process group
        and its store are destroyed after it, and a thread still inside a store call then aborts the process)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.poll_s + 5.0)

    def check(self) -> None:
        """Raise PeerFailedError if another rank has failed (called between steps; counts the steps)."""
        self.steps += 1
        if self._peer_failed.is_set() and not self._published:
            raise PeerFailedError(f"rank {self.rank} stopped because {self.peer_message}")

    def wait_for_unanswering_peer(self) -> str:
        """After a collective broke without a published error: which peer stopped answering (a killed rank's
        heartbeat stops; waits up to dead_s + 2 polls to see it), or ""."""
        if self.store is None:
            return ""
        deadline = time.monotonic() + self.dead_s + 2 * self.poll_s
        while time.monotonic() < deadline:
            message = self.peer_failures() or self.unanswering_peer()
            if message:
                return message
            time.sleep(self.poll_s)
        return ""

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
            try:
                self._beat()
            except Exception:
                pass
            message = self.peer_failures() or self.unanswering_peer()
            if not message and self.stuck_here():
                print(f"llc_fast [rank {self.rank}]: no rank finished a step for {self.stall_s:g} s and this rank is "
                      f"not in a collective (it is in {self._where()}): stopping it (exit code "
                      f"{PEER_FAILED_EXIT_CODE})", file=sys.stderr, flush=True)
                os._exit(PEER_FAILED_EXIT_CODE)
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
def failure_guard(grace_s: float = 10.0, poll_s: float | None = None, dead_s: float | None = None,
                  stall_s: float | None = None):
    """Guard a section that every rank of the process group enters together (see module docstring).

    poll_s: seconds between the watchdog's looks at the store (default 0.5, longer for very large
    jobs: at most about 500 looks per second reach the store). dead_s, stall_s: the heartbeat bounds
    (defaults max(10 s, 10 polls) and $LLC_FAST_STALL_TIMEOUT or 600 s). Nested guards are one guard (the
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
    if stall_s is None:
        stall_s = float(os.environ.get("LLC_FAST_STALL_TIMEOUT", "600"))
    guard = Guard(_default_store(), f"llc_fast/guard{next(_COUNTER)}", dist.get_rank(), world, grace_s, poll_s,
                  dead_s=dead_s, stall_s=stall_s)
    guard.start()
    _ACTIVE.guard = guard
    try:
        yield guard
    except PeerFailedError:
        raise
    except BaseException as e:
        earlier = (guard.peer_message or guard.peer_failures() or guard.wait_for_unanswering_peer()) \
            if _is_communication_error(e) else ""
        if earlier:  # this rank's collective broke because another rank failed first
            raise PeerFailedError(f"rank {guard.rank} stopped because {earlier} "
                                  f"(here: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        guard.publish(e)
        raise
    finally:
        _ACTIVE.guard = None
        guard.stop()
