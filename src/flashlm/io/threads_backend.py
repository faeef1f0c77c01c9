"""The default read backend of `BundleReader`: long-lived worker threads calling `os.preadv`.

It is also the seam for fault injection: subclass `ThreadsBackend` and override `preadv`
(raise `OSError(EIO)` on the n-th call, or block on a `threading.Event`), or override `open`
to refuse O_DIRECT.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading

from flashlm.io.backend import DIO_ALIGN, Backend, Range, ReadCall, ShortReadError, _set_done, advance_views


class ThreadsBackend(Backend):
    """`in_flight` long-lived threads pull ranges from one queue and `os.preadv` each range
    straight into its destination slots (one syscall per range; preadv releases the GIL)."""

    name = "threads"

    def __init__(self, in_flight: int = 32):
        super().__init__(in_flight)
        self._queue: queue.SimpleQueue[tuple[ReadCall, Range] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._depth = 0
        self._exited: asyncio.Future[None] | None = None
        self._n_alive = 0

    def preadv(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        """The one syscall. Runs in a worker thread. Override to inject faults or delays."""
        return os.preadv(fd, buffers, offset)

    def start(self, loop: asyncio.AbstractEventLoop, fd: int, dontneed: bool) -> None:
        self.fd, self.dontneed = fd, dontneed
        self._exited = loop.create_future()
        self._n_alive = self.in_flight
        for i in range(self.in_flight):
            t = threading.Thread(target=self._worker, args=(loop,), name=f"flashlm-read-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, call: ReadCall, ranges: list[Range]) -> None:
        call.add(len(ranges))
        put = self._queue.put
        for r in ranges:
            put((call, r))

    def _worker(self, loop: asyncio.AbstractEventLoop) -> None:
        get = self._queue.get
        try:
            while (job := get()) is not None:
                call, rng = job
                if call.abandoned:
                    call.done()
                    continue
                with self._lock:
                    self._depth += 1
                    depth = self._depth
                syscalls = nbytes = 0
                err: BaseException | None = None
                try:
                    syscalls, nbytes = self._read_range(call, rng)
                except BaseException as e:  # reported to the awaiting coroutine, never lost
                    err = e
                finally:
                    with self._lock:
                        self._depth -= 1
                call.done(rng=rng, err=err, syscalls=syscalls, nbytes=nbytes, depth=depth)
        finally:
            with self._lock:
                self._n_alive -= 1
                last = self._n_alive == 0
            if last:
                try:
                    loop.call_soon_threadsafe(_set_done, self._exited)
                except RuntimeError:
                    pass

    def _read_range(self, call: ReadCall, rng: Range) -> tuple[int, int]:
        views = call.views(rng)
        off, want, calls, got = rng.offset, rng.length, 0, 0
        while True:
            n = self.preadv(self.fd, views, off)
            calls += 1
            got += n
            if n == want:
                break
            if n <= 0 or n > want or n % DIO_ALIGN:
                raise ShortReadError(off, n, want)
            views, off, want = advance_views(views, n), off + n, want - n
        if self.dontneed:
            os.posix_fadvise(self.fd, rng.offset, rng.length, os.POSIX_FADV_DONTNEED)
        return calls, got

    async def aclose(self) -> None:
        """Stop the workers and join them. The reader has drained every read before this."""
        if not self._threads:
            return
        for _ in self._threads:
            self._queue.put(None)
        assert self._exited is not None
        await self._exited
        for t in self._threads:
            t.join()
        self._threads.clear()
