"""The copy rule on real hardware: one host-to-device link copying one expert at a time.

It is the simulator's rule (sim/costmodel.py), here executed:
- a copy moves one expert and, once started, is never preempted;
- demand copies (experts a layer uses that are not resident, issued once its router
  has run) start before every queued prefetch, in the order issued; prefetches start
  in issue order;
- a queued prefetch that a layer needs is promoted to demand; one whose expert is
  evicted before it starts is dropped;
- a layer computes only once every one of its experts has landed (ExpertCache.wait in
  replay/model.py, which also measures how long layers waited: the replay's stall).

A thread runs the link. On CPU a copy is a tensor copy (torch releases the GIL while
it copies, so compute goes on). On CUDA a copy is submitted on the copy stream and the
thread waits for its done event before submitting the next, so copies stay one at a
time and in queue order; because the host runs ahead of the device, a copy is issued
only once its issue point (an event on the compute stream) has been reached.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import deque

QUEUED, STARTED, LANDED, DROPPED = range(4)


class Copy:
    """One expert's copy: queued -> started -> landed (or dropped before it started)."""
    __slots__ = ("layer", "expert", "slot", "kind", "after", "state", "landed", "submitted", "done", "evicted")

    def __init__(self, layer: int, expert: int, slot, kind: str, after=None):
        self.layer, self.expert, self.slot, self.kind, self.after = layer, expert, slot, kind, after
        self.state = QUEUED
        self.landed = threading.Event()      # the data is in its slot (CPU) / the copy has finished (CUDA)
        self.submitted = threading.Event()   # CUDA: `done` is recorded on the copy stream
        self.done = None                     # CUDA: the copy's done event
        self.evicted = False                 # evicted while in flight: its slot is freed when it lands


class HostLink:
    """The queue and the thread. `cache` does the copy itself (ExpertCache.run_copy) and owns
    the slots; the thread holds it only weakly, so a dropped cache ends the thread."""

    POLL_S = 20e-6        # CUDA: how often to look whether an issue point has been reached

    def __init__(self, cache):
        self.cond = threading.Condition()
        self.demand: deque = deque()
        self.prefetch: deque = deque()
        self.closed = False
        self.counts = dict(demand=0, prefetch=0, promoted=0, dropped=0)
        self.copy_s = 0.0                    # time copies took, summed
        self.landed = 0                      # copies that landed
        self._busy = None                    # the copy in flight
        self.error: BaseException | None = None   # what stopped the thread, raised to whoever waits
        ref = weakref.ref(cache)
        self.thread = threading.Thread(target=_serve, args=(weakref.ref(self), ref), daemon=True,
                                       name="emoe-h2d-link")
        self.thread.start()

    def issue(self, copy: Copy) -> Copy:
        with self.cond:
            (self.demand if copy.kind == "demand" else self.prefetch).append(copy)
            self.counts[copy.kind] += 1
            self.cond.notify()
        return copy

    def promote(self, copy: Copy) -> None:
        """A queued prefetch a layer needs now: to the demand queue."""
        with self.cond:
            if copy.state == QUEUED and copy.kind == "prefetch":
                self.prefetch.remove(copy)
                copy.kind = "demand"
                self.demand.append(copy)
                self.counts["promoted"] += 1
                self.cond.notify()

    def drop(self, copy: Copy) -> bool:
        """Drop a copy that has not started (its expert was evicted); False if it has."""
        with self.cond:
            if copy.state != QUEUED:
                return False
            (self.demand if copy.kind == "demand" else self.prefetch).remove(copy)
            copy.state = DROPPED
            self.counts["dropped"] += 1
            copy.landed.set()
            copy.submitted.set()
            return True

    def idle(self) -> bool:
        with self.cond:
            return not self.demand and not self.prefetch and self._busy is None

    def drain(self) -> None:
        """Wait until every issued copy has landed."""
        while True:
            with self.cond:
                pending = list(self.demand) + list(self.prefetch) + ([self._busy] if self._busy else [])
            if not pending:
                return
            for c in pending:
                self.wait(c)

    def wait(self, copy: Copy) -> None:
        """Block until the copy has landed; raise if the link thread failed."""
        while not copy.landed.wait(0.5):
            self.check()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the host link stopped: {self.error!r}") from self.error

    def _fail(self, error: BaseException) -> None:
        """The thread failed: remember why and release everyone waiting on a copy."""
        with self.cond:
            self.error = error
            self.closed = True
            pending = list(self.demand) + list(self.prefetch) + ([self._busy] if self._busy else [])
            self.demand.clear()
            self.prefetch.clear()
            self.cond.notify_all()
        for c in pending:
            c.submitted.set()
            c.landed.set()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()

    def _next(self):
        """The next copy to start, or None: the first demand copy whose issue point has been
        reached, else the head prefetch if reached (issue order is queue order)."""
        for q in (self.demand, self.prefetch):
            for c in q:
                if c.after is None or c.after.query():
                    q.remove(c)
                    return c
                if q is self.prefetch:
                    break
        return None


def _serve(link_ref, cache_ref):
    """The link thread: start copies one at a time until the cache or the link is gone."""
    while True:
        link = link_ref()
        if link is None:
            return
        with link.cond:
            copy = None
            while copy is None:
                if link.closed or cache_ref() is None:
                    return
                copy = link._next()
                if copy is None:
                    waiting = any(link.demand) or any(link.prefetch)
                    link.cond.wait(HostLink.POLL_S if waiting else 0.5)
            copy.state = STARTED
            link._busy = copy
        cache = cache_ref()
        if cache is None:
            return
        t0 = time.perf_counter()
        try:
            seconds = cache.run_copy(copy)
        except BaseException as e:   # noqa: BLE001 - handed to the waiting compute thread
            link._fail(e)
            return
        with link.cond:
            link.copy_s += seconds if seconds is not None else time.perf_counter() - t0
            link.landed += 1
            copy.state = LANDED
            link._busy = None
            if copy.evicted:
                cache.release_slot(copy.slot)
            link.cond.notify_all()
        copy.landed.set()
        del cache, link, copy
