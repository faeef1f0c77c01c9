"""How `BundleReader` issues reads: long-lived worker threads calling `os.preadv` (here), or
io_uring through `uring-api` (`flashlm.io.uring_backend`).

Both take planned `Range`s of one `ReadCall`, keep at most `in_flight` reads in the kernel,
and report back through `ReadCall.done`, which wakes the awaiting coroutine once per call
(not once per read). They are also the seam for fault injection: subclass `ThreadsBackend` and
override `preadv` (raise `OSError(EIO)` on the n-th call, or block on a `threading.Event`), or
override `open` to refuse O_DIRECT.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from dataclasses import dataclass

from flashlm.errors import ConfigError

DIO_ALIGN = 512  # the device's logical block: the unit a short O_DIRECT read can resume at


@dataclass(slots=True)
class Range:
    """One contiguous stretch of the file, read by one syscall (threads) or by one SQE per
    destination part (uring). `parts` are (byte offset into the flat destination, nbytes);
    offset -1 marks gap bytes that are read through into scratch memory."""

    offset: int
    length: int
    parts: list[tuple[int, int]]
    first: int  # first and last neuron id covered: for error messages
    last: int


class ShortReadError(Exception):
    """Internal: the file ended (or a read returned less) before a range was complete."""

    def __init__(self, offset: int, got: int, wanted: int):
        super().__init__(f"short read at byte {offset}: got {got} of {wanted} bytes")
        self.offset, self.got, self.wanted = offset, got, wanted


class ReadCall:
    """Book-keeping for one `BundleReader.read`: how many units are outstanding, the first
    error, and the counters that become its `ReadStats`. Thread-safe (workers report here)."""

    __slots__ = ("loop", "loop_thread", "future", "lock", "pending", "abandoned", "error", "syscalls",
                 "bytes_read", "max_depth", "dest", "scratch")

    def __init__(self, loop: asyncio.AbstractEventLoop, dest: memoryview, scratch: memoryview):
        self.loop = loop
        self.loop_thread = threading.get_ident()
        self.future: asyncio.Future[None] = loop.create_future()
        self.lock = threading.Lock()
        self.pending = 0
        self.abandoned = False  # set on error, cancellation or close: unstarted reads are dropped
        self.error: tuple[Range, BaseException] | None = None
        self.syscalls = 0
        self.bytes_read = 0
        self.max_depth = 0
        self.dest = dest  # flat byte views; holding them keeps the memory alive while reads run
        self.scratch = scratch

    def views(self, rng: Range) -> list[memoryview]:
        d, s = self.dest, self.scratch
        return [d[o : o + n] if o >= 0 else s[:n] for o, n in rng.parts]

    def add(self, n: int) -> None:
        with self.lock:
            self.pending += n

    def done(self, n: int = 1, *, rng: Range | None = None, err: BaseException | None = None,
             syscalls: int = 0, nbytes: int = 0, depth: int = 0) -> None:
        with self.lock:
            self.pending -= n
            self.syscalls += syscalls
            self.bytes_read += nbytes
            self.max_depth = max(self.max_depth, depth)
            if err is not None and self.error is None:
                assert rng is not None
                self.error = (rng, err)
                self.abandoned = True
            last = self.pending == 0
        if last:
            if threading.get_ident() == self.loop_thread:
                self._resolve()
            else:
                try:
                    self.loop.call_soon_threadsafe(self._resolve)
                except RuntimeError:  # loop already closed: nobody is waiting any more
                    pass

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first n bytes of an iovec list (to resume a short read)."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
        else:
            out.append(v[n:])
            n = 0
    return out


class Backend:
    """What the reader needs from a backend. `open` is a seam too (tests refuse O_DIRECT)."""

    name = "base"
    scatter = True  # one read may scatter into many buffers (and read gaps into scratch)

    def __init__(self, in_flight: int = 32):
        if in_flight < 1:
            raise ConfigError(f"in_flight must be >= 1, got {in_flight}")
        self.in_flight = in_flight
        self.fd = -1
        self.dontneed = False  # drop read pages from the page cache after each read

    def open(self, path: str, flags: int) -> int:
        return os.open(path, flags)

    def start(self, loop: asyncio.AbstractEventLoop, fd: int, dontneed: bool) -> None:
        raise NotImplementedError

    def submit(self, call: ReadCall, ranges: list[Range]) -> None:
        raise NotImplementedError

    def abandon(self, call: ReadCall) -> None:
        """Drop the call's reads that have not reached the kernel (best effort)."""

    async def aclose(self) -> None:
        raise NotImplementedError


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
            views, off, want = _advance(views, n), off + n, want - n
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


def _set_done(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


def make_backend(kind: str | Backend, in_flight: int) -> Backend:
    if isinstance(kind, Backend):
        return kind
    if kind == "threads":
        return ThreadsBackend(in_flight)
    if kind == "uring":
        from flashlm.io.uring_backend import UringBackend

        return UringBackend(in_flight)
    raise ConfigError(f"unknown read backend {kind!r}: use 'threads' or 'uring'")

