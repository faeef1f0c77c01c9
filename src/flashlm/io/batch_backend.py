"""The "batch" backend of `BundleReader`: whole batches of reads submitted and reaped in C
(`flashlm.io._uring_batch`, io_uring through raw syscalls, the GIL released), so a read costs
no Python work of its own: one thread hop per batch, not per read.

Measured on the 2-vCPU VM (2026-12-07, random 32 KiB O_DIRECT, 32 in flight): CPU per read
31-44 us with the threads backend (one `os.preadv` per worker-thread hop), 13-16 us with "uring"
(uring-api, a Python reaper), 6-7 us for fio itself. On this shared machine that CPU time, not
the disk, is what held the reader to ~0.3 of fio (docs/io.md).

Four worker threads, each with its own ring, each take one pending call at a time, turn each
destination part into a read (no readv in a batch: like "uring", gaps are never read through,
`scatter = False`), keep `in_flight // 2` of them in the kernel until the call is done, then
report it. So up to 2 x `in_flight` reads are in the kernel when four calls run at once (unlike
the other backends' hard cap): what the measured figures (docs/io.md) ran with; a batch is done
only when its slowest read is, and the other workers keep the disk busy meanwhile. A short read
is finished with `os.preadv`; an error fails its call. Linux only: without the extension
`BatchBackend()` raises ConfigError naming the fix.
"""

from __future__ import annotations

import asyncio
import os
import threading

import numpy as np

from flashlm.errors import ConfigError
from flashlm.io.backend import DIO_ALIGN, Backend, Range, ReadCall, ShortReadError, _set_done


def available() -> bool:
    try:
        from flashlm.io import _uring_batch  # noqa: F401
    except ImportError:
        return False
    return True


class BatchBackend(Backend):
    name = "batch"
    scatter = False

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
        offs, lens, addrs, owner = [], [], [], []  # owner: (call, range) of each read
        for call, ranges in live:
            base = np.frombuffer(call.dest, dtype=np.uint8).ctypes.data
            for r in ranges:
                off = r.offset
                for o, n in r.parts:
                    assert o >= 0, "batch ranges carry no gap parts"
                    offs.append(off)
                    lens.append(n)
                    addrs.append(base + o)
                    owner.append((call, r))
                    off += n
        if not offs:
            return
        o_arr, l_arr, a_arr = (np.asarray(x, dtype=np.int64) for x in (offs, lens, addrs))
        res = np.empty(len(offs), dtype=np.int64)
        try:
            ring.read_batch(self.fd, o_arr, l_arr, a_arr, res, self._depth)
        except OSError as e:  # the ring itself failed: every call of the batch gets the error
            for call, ranges in live:
                call.done(len(ranges), rng=ranges[0], err=e)
            return
        # per range: ok when every part read whole; finish short reads here, fail errors
        errs: dict[int, BaseException] = {}
        for i, (call, r) in enumerate(owner):
            got, want = int(res[i]), int(l_arr[i])
            if got == want or id(r) in errs:
                continue
            try:
                self._finish(call, int(o_arr[i]), int(a_arr[i]) - np.frombuffer(call.dest, dtype=np.uint8).ctypes.data,
                             got, want)
            except BaseException as e:  # noqa: BLE001 - reported to the awaiting coroutine
                errs[id(r)] = e
        for call, ranges in live:
            nbytes = 0
            for r in ranges:
                err = errs.get(id(r))
                if self.dontneed and err is None:
                    try:
                        os.posix_fadvise(self.fd, r.offset, r.length, os.POSIX_FADV_DONTNEED)
                    except OSError as e:
                        err = e
                if err is not None:
                    call.done(rng=r, err=err, syscalls=len(r.parts))
                else:
                    nbytes += r.length
            ok = len(ranges) - sum(id(r) in errs for r in ranges)
            if ok:
                call.done(ok, syscalls=sum(len(r.parts) for r in ranges), nbytes=nbytes)

    def _finish(self, call: ReadCall, offset: int, at: int, got: int, want: int) -> None:
        """A part that came back short (resume with preadv) or failed (raise)."""
        if got < 0:
            raise OSError(-got, os.strerror(-got))
        while got < want:
            if got % DIO_ALIGN:
                raise ShortReadError(offset, got, want)
            n = os.preadv(self.fd, [call.dest[at + got: at + want]], offset + got)
            if n <= 0:
                raise ShortReadError(offset, got, want)
            got += n

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
