"""The bounded queue in front of the engine.

At most `max_active` requests run on the engine at once (their token steps interleave there);
up to `max_queued` more wait in arrival order; past that a request is turned away at once
(`QueueFullError`) instead of piling up. Closing (server shutdown) fails every waiter and
every later request with `AdmissionClosedError`.
"""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFullError(Exception):
    pass


class AdmissionClosedError(Exception):
    pass


class Slot:
    """One admitted request's place on the engine; `release()` (idempotent) hands it on."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            admission, self._admission = self._admission, None
            admission._release()


class Admission:
    def __init__(self, max_active: int, max_queued: int) -> None:
        if max_active < 1 or max_queued < 0:
            raise ValueError(f"max_active must be >= 1 and max_queued >= 0, got {max_active}, {max_queued}")
        self.max_active, self.max_queued = max_active, max_queued
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def queued(self) -> int:
        return sum(not w.done() for w in self._waiters)

    async def acquire(self) -> Slot:
        """A slot now, or after the requests ahead of this one; cancel-safe (a waiter that
        leaves the queue, or is handed a slot as it leaves, gives its place on)."""
        if self._closed:
            raise AdmissionClosedError("the server is shutting down")
        if self.active < self.max_active and not self.queued:
            self.active += 1
            return Slot(self)
        if self.queued >= self.max_queued:
            raise QueueFullError(f"{self.active} requests are running and {self.queued} waiting (the most this "
                                 f"server queues); retry later")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # _release hands its slot over: `active` is unchanged
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release()  # handed a slot just as it left: pass it on
            else:
                waiter.cancel()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return Slot(self)

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1

    def close(self) -> None:
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(AdmissionClosedError("the server is shutting down"))
