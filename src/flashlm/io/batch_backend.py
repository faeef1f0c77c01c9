"""The "batch" backend of `BundleReader`: whole batches of reads submitted and reaped in C
(`flashlm.io._uring_batch`, io_uring through raw syscalls, the GIL released), so a read costs
no Python work of its own: one thread hop per batch, not per read. What the reader's "auto"
picks where the extension is built and the kernel lets the process set up a ring.

Each range is one READV SQE scattering into its destination rows, its small gaps read through
into scratch, as the threads backend's one `os.preadv` a range: the same ranges, the same
syscall count. Measured on the 2-vCPU VM (2026-12-07, random 32 KiB O_DIRECT, 32 in flight):
CPU per read 31-44 us with the threads backend (one `os.preadv` per worker-thread hop), 15-19 us
here, 6-9 us for fio itself; on this shared machine that CPU time, not the disk, is what held the
threads backend to ~0.7 of fio (docs/io.md).

Four worker threads, each with its own ring, each take one pending call at a time, keep
`in_flight // 2` of its ranges in the kernel until the call is done, then report it. So up to
2 x `in_flight` reads are in the kernel when four calls run at once (unlike the other backends'
hard cap): what the measured figures (docs/io.md) ran with; a batch is done only when its
slowest read is, and the other workers keep the disk busy meanwhile. A short read is finished
with `os.preadv`; an error fails its range. Linux only: without the extension `BatchBackend()`
raises ConfigError naming the fix.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading

import numpy as np

from flashlm.errors import ConfigError
from flashlm.io.backend import DIO_ALIGN, Backend, Range, ReadCall, ShortReadError, _set_done, advance_views


@functools.cache
def available() -> bool:
    """The extension is built and this kernel lets the process set up a ring (a container's
    seccomp profile may refuse io_uring_setup: then the reader's "auto" picks "threads")."""
    try:
        from flashlm.io import _uring_batch
    except ImportError:
        return False
    try:
        _uring_batch.Ring(8).close()
    except OSError:
        return False
    return True


class BatchBackend(Backend):
    name = "batch"
    scatter = True

    def __init__(self, in_flight: int = 32, workers: int = 4):
        super().__init__(in_flight)
        self.workers = workers
        try:
            from flashlm.io import _uring_batch
        except ImportError as e:
            raise ConfigError(f"backend 'batch' needs the C extension flashlm.io._uring_batch ({e}; Linux only): "
                              "build it with `python setup.py build_ext --inplace`, or use backend='threads'") from None
        # several workers, each with its own ring: while one batch waits for its slowest read (the
        # p99 here is 7-8 ms against a ~0.4 ms median) the others keep the disk busy
        self._depth = max(1, self.in_flight // max(1, workers // 2))
        self._rings = [_uring_batch.Ring(1 << max(3, (self._depth - 1).bit_length())) for _ in range(workers)]
        self._cv = threading.Condition()
        self._pending: list[tuple[ReadCall, list[Range]]] = []
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._alive = 0
        self._exited: asyncio.Future[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop, fd: int, dontneed: bool) -> None:
        self.fd, self.dontneed = fd, dontneed
        self._exited = loop.create_future()
        self._alive = len(self._rings)
        for i, ring in enumerate(self._rings):
            t = threading.Thread(target=self._worker, args=(loop, ring), name=f"flashlm-read-batch-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, call: ReadCall, ranges: list[Range]) -> None:
        call.add(len(ranges))
        with self._cv:
            self._pending.append((call, ranges))
            self._cv.notify()

    def abandon(self, call: ReadCall) -> None:
        with self._cv:
            mine = [r for c, r in self._pending if c is call]
            self._pending = [(c, r) for c, r in self._pending if c is not call]
        dropped = sum(len(r) for r in mine)
        if dropped:
            call.done(dropped)

    def _worker(self, loop: asyncio.AbstractEventLoop, ring) -> None:
        try:
            while True:
                with self._cv:
                    while not self._pending and not self._stop:
                        self._cv.wait()
                    if not self._pending:
                        return
                    batch = [self._pending.pop(0)]  # one call a worker: the others take the next ones
                self._run(ring, batch)
        finally:
            with self._cv:
                self._alive -= 1
                last = self._alive == 0
            if last:
                try:
                    loop.call_soon_threadsafe(_set_done, self._exited)
                except RuntimeError:
                    pass

    def _run(self, ring, batch: list[tuple[ReadCall, list[Range]]]) -> None:
        live = [(c, rs) for c, rs in batch if not c.abandoned]
        for c, rs in batch:
            if c.abandoned:
                c.done(len(rs))
        # one READV a range: its parts scatter into the call's destination rows, its gaps into scratch
        offs, first, addrs, lens, owner = [], [0], [], [], []
        for call, ranges in live:
            base = np.frombuffer(call.dest, dtype=np.uint8).ctypes.data
            scratch = np.frombuffer(call.scratch, dtype=np.uint8).ctypes.data
            for r in ranges:
                offs.append(r.offset)
                for o, n in r.parts:
                    addrs.append(base + o if o >= 0 else scratch)
                    lens.append(n)
                first.append(len(addrs))
                owner.append((call, r))
        if not offs:
            return
        o_arr, f_arr, a_arr, l_arr = (np.asarray(x, dtype=np.int64) for x in (offs, first, addrs, lens))
        res = np.empty(len(offs), dtype=np.int64)
        try:
            ring.readv_batch(self.fd, o_arr, f_arr, a_arr, l_arr, res, self._depth)
        except OSError as e:  # the ring itself failed: every call of the batch gets the error
            for call, ranges in live:
                call.done(len(ranges), rng=ranges[0], err=e)
            return
        # per range: ok when read whole; finish short reads here, fail errors
        errs: dict[int, BaseException] = {}
        extra: dict[int, int] = {}  # syscalls a short range took to finish
        for i, (call, r) in enumerate(owner):
            got = int(res[i])
            if got == r.length:
                continue
            try:
                extra[id(r)] = self._finish(call, r, got)
            except BaseException as e:  # noqa: BLE001 - reported to the awaiting coroutine
                errs[id(r)] = e
        for call, ranges in live:
            nbytes = syscalls = ok = 0
            for r in ranges:
                err = errs.get(id(r))
                if self.dontneed and err is None:
                    try:
                        os.posix_fadvise(self.fd, r.offset, r.length, os.POSIX_FADV_DONTNEED)
                    except OSError as e:
                        err = e
                if err is not None:
                    call.done(rng=r, err=err, syscalls=1)
                else:
                    nbytes += r.length
                    syscalls += 1 + extra.get(id(r), 0)
                    ok += 1
            if ok:  # depth: the most reads of this batch the ring held at once
                call.done(ok, syscalls=syscalls, nbytes=nbytes, depth=min(len(offs), self._depth))

    def _finish(self, call: ReadCall, r: Range, got: int) -> int:
        """A range that came back short: resume it with preadv (returns the syscalls it took), or
        raise when it failed or cannot resume (an EOF, or O_DIRECT's unaligned tail)."""
        if got < 0:
            raise OSError(-got, os.strerror(-got))
        views, off, want, calls = call.views(r), r.offset, r.length, 0
        while got < want:
            if got <= 0 or got % DIO_ALIGN:
                raise ShortReadError(off, got, want)
            views, off, want = advance_views(views, got), off + got, want - got
            got = os.preadv(self.fd, views, off)
            calls += 1
        return calls

    async def aclose(self) -> None:
        if not self._threads:
            return
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        assert self._exited is not None
        await self._exited
        for t in self._threads:
            t.join()
        self._threads.clear()
        for ring in self._rings:
            ring.close()
