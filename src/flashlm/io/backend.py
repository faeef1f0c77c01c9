"""The contract between `BundleReader` and its read backends: the `Backend` interface, the
`Range`s a backend reads and the `ReadCall` it reports to.

A backend (`flashlm.io.threads_backend`: worker threads calling `os.preadv`, the default;
`flashlm.io.uring_backend`: io_uring) takes planned `Range`s of one `ReadCall`, keeps at most
`in_flight` reads in the kernel, and reports back through `ReadCall.done`, which wakes the
awaiting coroutine once per call (not once per read).
"""

from __future__ import annotations

import asyncio
import os
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


def advance_views(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first n bytes of an iovec list (to resume a short read)."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
        else:
            out.append(v[n:])
            n = 0
    return out


def _set_done(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)
