"""The io_uring backend of `BundleReader`, through `uring-api` (`liburing` on PyPI crashes here).

`uring-api` 0.1.0rc5 has read SQEs but no readv, so a range that scatters into several
destination parts becomes one SQE per part, and gaps are never read through. Its
`Ring.break_wait()` did not wake a blocked `wait()` here, so the reaper is stopped with a
zero-length read instead.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
from dataclasses import dataclass
from typing import Any

from flashlm.errors import ConfigError
from flashlm.io.backend import DIO_ALIGN, Backend, Range, ReadCall, ShortReadError, _set_done


@dataclass(slots=True)
class _Op:
    call: ReadCall | None  # None: the stop marker
    rng: Range | None
    view: memoryview
    offset: int


class UringBackend(Backend):
    """io_uring through `uring-api`. Submitters (the event loop) prepare and submit read SQEs
    themselves, up to `in_flight`; one reaper thread blocks in `ring.wait()` (GIL released),
    refills the ring from the pending queue as completions arrive, then does the book-keeping.
    So the disk stays busy while the event loop computes. `uring-api` has no readv: each
    destination part of a range is its own SQE and gaps are not read through (adjacent SQEs of
    one batch may still be merged by the block layer)."""

    name = "uring"
    scatter = False

    def __init__(self, in_flight: int = 32):
        super().__init__(in_flight)
        try:
            import uring_api
        except ImportError as e:
            raise ConfigError(
                f"backend 'uring' needs the uring-api package ({e}): `pip install uring-api==0.1.0rc5`, "
                "or use backend='threads'"
            ) from None
        self._uring = uring_api
        self._ring: Any = None
        self._lock = threading.Lock()  # guards _pending, _depth and SQE preparation
        self._pending: collections.deque[_Op] = collections.deque()
        self._depth = 0
        self._thread: threading.Thread | None = None
        self._exited: asyncio.Future[None] | None = None

    def prepare_read(self, fd: int, buf: memoryview, offset: int, op: _Op) -> None:
        """Queue one read SQE (called with the backend lock held). Override to inject faults."""
        self._ring.prepare_read(fd, buf, offset, op)

    def start(self, loop: asyncio.AbstractEventLoop, fd: int, dontneed: bool) -> None:
        self.fd, self.dontneed = fd, dontneed
        entries = 1 << max(3, (2 * self.in_flight - 1).bit_length())
        self._ring = self._uring.Ring(entries=entries, auto_submit=False)
        self._exited = loop.create_future()
        self._thread = threading.Thread(target=self._reap, args=(loop,), name="flashlm-read-uring", daemon=True)
        self._thread.start()

    def submit(self, call: ReadCall, ranges: list[Range]) -> None:
        dest = call.dest
        ops = []
        for r in ranges:
            off = r.offset
            for o, n in r.parts:
                assert o >= 0, "uring ranges carry no gap parts"
                ops.append(_Op(call, r, dest[o : o + n], off))
                off += n
        call.add(len(ops))
        with self._lock:
            self._pending.extend(ops)
            failed = self._fill()
        self._fail(failed)

    def abandon(self, call: ReadCall) -> None:
        with self._lock:
            keep = collections.deque(op for op in self._pending if op.call is not call)
            dropped = len(self._pending) - len(keep)
            self._pending = keep
        if dropped:
            call.done(dropped)

    def _fill(self) -> list[tuple[_Op, BaseException]]:
        """Prepare SQEs up to `in_flight` and submit them. Caller holds the lock."""
        q, n, failed = self._pending, 0, []
        while q and self._depth < self.in_flight:
            op = q.popleft()
            assert op.call is not None
            if op.call.abandoned:
                failed.append((op, None))
                continue
            try:
                self.prepare_read(self.fd, op.view, op.offset, op)
            except Exception as e:  # a refused SQE fails its call, not the reader
                failed.append((op, e))
                continue
            self._depth += 1
            if self._depth > op.call.max_depth:
                op.call.max_depth = self._depth
            n += 1
        if n:
            self._ring.submit()
        return failed

    @staticmethod
    def _fail(failed: list[tuple[_Op, BaseException | None]]) -> None:
        for op, err in failed:  # outside the lock: done() may wake the loop
            assert op.call is not None
            op.call.done(rng=op.rng, err=err)

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            stop = False
            while not stop:
                comps = self._ring.wait(timeout=None)
                if not comps:
                    continue
                ops: list[_Op] = [c.take_user_data() for c in comps]
                results = [c.res for c in comps]
                real = sum(op.call is not None for op in ops)
                with self._lock:  # refill first: completions come in batches, keep the device busy
                    self._depth -= real
                    failed = self._fill()
                self._fail(failed)
                ok: dict[ReadCall, list[int]] = {}
                for op, res in zip(ops, results):
                    if op.call is None:
                        stop = True
                        continue
                    want = len(op.view)
                    if res == want and not self.dontneed:
                        acc = ok.get(op.call)
                        if acc is None:
                            ok[op.call] = acc = [0, 0]
                        acc[0] += 1
                        acc[1] += res
                    else:
                        self._complete_odd(op, res, want)
                for call, (n, nbytes) in ok.items():
                    call.done(n, syscalls=n, nbytes=nbytes)
        finally:
            try:
                loop.call_soon_threadsafe(_set_done, self._exited)
            except RuntimeError:
                pass

    def _complete_odd(self, op: _Op, res: int, want: int) -> None:
        """A completion that is an error, a short read, or needs a page-cache drop."""
        assert op.call is not None
        if res == want:
            err = None
            try:
                os.posix_fadvise(self.fd, op.offset, want, os.POSIX_FADV_DONTNEED)
            except OSError as e:
                err = e
            op.call.done(rng=op.rng, err=err, syscalls=1, nbytes=res)
        elif res < 0:
            op.call.done(rng=op.rng, err=OSError(-res, os.strerror(-res)), syscalls=1)
        elif 0 < res < want and res % DIO_ALIGN == 0:  # resume a short read
            op.call.done(0, syscalls=1, nbytes=res)
            with self._lock:
                self._pending.appendleft(_Op(op.call, op.rng, op.view[res:], op.offset + res))
                failed = self._fill()
            self._fail(failed)
        else:
            op.call.done(rng=op.rng, err=ShortReadError(op.offset, res, want), syscalls=1, nbytes=res)

    async def aclose(self) -> None:
        """Stop the reaper (a zero-length read is its stop marker), join it, close the ring."""
        if self._ring is None:
            return
        assert self._depth == 0, "the reader drains every read before closing the backend"
        with self._lock:
            self._ring.prepare_read(self.fd, memoryview(bytearray(0)), 0, _Op(None, None, memoryview(b""), 0))
            self._ring.submit()
        assert self._exited is not None and self._thread is not None
        await self._exited
        self._thread.join()
        self._ring.close()
        self._ring = None
