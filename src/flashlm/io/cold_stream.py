"""The cold stream: the same byte ranges of ffn.bin read over and over, in order, into a ring of
aligned buffers, by long-lived reader threads.

Exact mode (`flashlm.pipeline.streaming`) computes every neuron of every layer, so the bytes it
needs from flash do not depend on the token: each token reads the same *cycle* of chunks (the
cold suffix of layer 0, of layer 1, ..., of the last layer; each cut into reads of a few MiB) in
the same order. The readers therefore never wait for the model to say what to read: they read
the cycle round and round, as far ahead as the ring has free slots (layer l+1's chunks, and the
next token's first chunks, are read while layer l computes), and the consumer takes the chunks
in order, releasing each slot when its FFN part is computed.

One read is one `os.preadv` of a whole chunk (>= 4 MiB by default) into one page-aligned slot,
O_DIRECT unless `direct=False` (then buffered, and the chunk's pages are dropped after the read
so the page cache does not hold the model: `posix_fadvise(DONTNEED)`). MACHINE.md: reads of 4 MiB
reach the disk's sequential ceiling from one Python thread; the GIL is released in the syscall.
Each chunk's bundles are checked against the store's CRC32s the first time it is read.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flashlm.errors import BundleChecksumError, NeuronReadError, ReaderClosedError
from flashlm.io.buffers import PAGE, aligned_empty
from flashlm.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Chunk:
    """Neurons [start, start + n) of `layer`: file bytes [offset, offset + nbytes) (nbytes the
    aligned read; the bundles are its first n * stride bytes)."""

    layer: int
    start: int
    n: int
    offset: int
    nbytes: int


def cut_chunks(layers: Sequence[tuple[int, int, int]], stride: int, chunk_neurons: int) -> list[Chunk]:
    """The cycle: `layers[l]` = (layer l's offset in the file, its first cold neuron, its neuron
    count); each layer's cold neurons cut into chunks of `chunk_neurons`. A chunk must start on a
    page (the caller rounds the hot prefix and the chunk to whole pages of bundles)."""
    out = []
    for layer, (base, hot, n) in enumerate(layers):
        for a in range(hot, n, chunk_neurons):
            k = min(chunk_neurons, n - a)
            off = base + a * stride
            if off % PAGE:
                raise ValueError(f"chunk of layer {layer} at neuron {a} starts at {off}, not page-aligned")
            out.append(Chunk(layer, a, k, off, -(-k * stride // PAGE) * PAGE))
    return out


@dataclass
class StreamStats:
    reads: int = 0  # preadv calls
    read_bytes: int = 0
    read_s: float = 0.0  # summed over threads
    busy_s: float = 0.0  # wall time at least one read was in the kernel (the disk's busy time)
    wait_s: float = 0.0  # consumer blocked on a chunk not yet read (read time compute did not hide)
    events: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, bytes) when recording


class ColdStream:
    """`start()`, then per chunk of the cycle in order: `rows = take()` ... `release()`."""

    def __init__(self, path: str | os.PathLike[str], chunks: Sequence[Chunk], *, stride: int, n_slots: int,
                 n_threads: int = 2, direct: bool = True, crcs: list[np.ndarray] | None = None,
                 bundle_bytes: int | None = None) -> None:
        if not chunks:
            raise ValueError("a cold stream needs at least one chunk")
        self.path = str(path)
        self.chunks = list(chunks)
        self.stride = stride
        self.slot_bytes = max(c.nbytes for c in self.chunks)
        self.n_slots = max(1, min(n_slots, len(self.chunks)))
        self._slots = [aligned_empty(1, self.slot_bytes)[0] for _ in range(self.n_slots)]
        self._crcs = crcs
        self._bundle_bytes = bundle_bytes or stride
        self._checked = [crcs is None] * len(self.chunks)
        self._n_threads = max(1, min(n_threads, self.n_slots))
        self._direct = direct
        self._cv = threading.Condition()
        self._next = 0  # next sequence number a reader claims
        self._taken = 0  # next sequence number the consumer takes
        self._released = 0  # sequence numbers below this are free slots again
        self._ready: dict[int, float] = {}  # seq -> time its read finished
        self._error: BaseException | None = None
        self._closed = False
        self._threads: list[threading.Thread] = []
        self.stats = StreamStats()
        self.record = False
        self._fd = -1
        self._active = 0  # reads in the kernel now
        self._busy_since = 0.0

    @property
    def ring_bytes(self) -> int:
        return self.n_slots * self.slot_bytes

    def start(self) -> None:
        flags = os.O_RDONLY
        if self._direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.path, flags | os.O_DIRECT)
            except OSError:
                log.info("O_DIRECT refused; cold stream reads buffered and drops the pages", path=self.path)
                self._direct = False
        if self._fd < 0:
            self._direct = False
            self._fd = os.open(self.path, flags)
        for i in range(self._n_threads):
            t = threading.Thread(target=self._run, name=f"flashlm-cold-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    # -- readers --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and self._error is None and self._next >= self._released + self.n_slots:
                    self._cv.wait()
                if self._closed or self._error is not None:
                    return
                seq = self._next
                self._next += 1
            try:
                self._read(seq)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                return
            with self._cv:
                self._ready[seq] = time.perf_counter()
                self._cv.notify_all()

    def _read(self, seq: int) -> None:
        k = seq % len(self.chunks)
        c = self.chunks[k]
        buf = self._slots[seq % self.n_slots]
        view = memoryview(buf)[: c.nbytes]
        need = c.n * self.stride
        with self._cv:
            t0 = time.perf_counter()
            if not self._active:
                self._busy_since = t0
            self._active += 1
        got = 0
        try:
            while got < need:
                try:
                    n = os.preadv(self._fd, [view[got:]], c.offset + got)
                except OSError as e:
                    raise NeuronReadError(f"{self.path}: reading layer {c.layer} neurons {c.start}-"
                                          f"{c.start + c.n - 1} failed ({e})") from None
                if n <= 0:
                    break
                got += n
        finally:
            with self._cv:
                t1 = time.perf_counter()
                self._active -= 1
                if not self._active:
                    self.stats.busy_s += t1 - self._busy_since
        if got < need:
            raise NeuronReadError(f"{self.path}: layer {c.layer} neurons {c.start}-{c.start + c.n - 1}: short read "
                                  f"({got} of {need} bytes); the store is truncated, run `flashlm verify`")
        if not self._direct:
            os.posix_fadvise(self._fd, c.offset, c.nbytes, os.POSIX_FADV_DONTNEED)
        if not self._checked[k]:
            self._check(c, buf)
            self._checked[k] = True
        with self._cv:
            st = self.stats
            st.reads += 1
            st.read_bytes += need
            st.read_s += t1 - t0
            if self.record:
                st.events.append((t0, t1, need))

    def _check(self, c: Chunk, buf: np.ndarray) -> None:
        crcs = self._crcs[c.layer]
        rows = buf[: c.n * self.stride].reshape(c.n, self.stride)
        for i in range(c.n):
            if zlib.crc32(rows[i, : self._bundle_bytes]) != int(crcs[c.start + i]):
                raise BundleChecksumError(f"{self.path}: layer {c.layer} neuron {c.start + i} fails its checksum "
                                          f"(damaged); run `flashlm verify` and re-convert the store")

    # -- consumer -------------------------------------------------------------------------

    def take(self) -> tuple[Chunk, np.ndarray]:
        """The next chunk of the cycle and its bytes (n * stride, a view into its slot), once read."""
        seq = self._taken
        t0 = time.perf_counter()
        with self._cv:
            while seq not in self._ready:
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise ReaderClosedError("the cold stream is closed")
                self._cv.wait()
            del self._ready[seq]
        self.stats.wait_s += time.perf_counter() - t0
        self._taken += 1
        c = self.chunks[seq % len(self.chunks)]
        return c, self._slots[seq % self.n_slots][: c.n * self.stride]

    def release(self) -> None:
        """The oldest taken chunk's slot is free for the readers again."""
        with self._cv:
            self._released += 1
            assert self._released <= self._taken
            self._cv.notify_all()

    @property
    def position(self) -> int:
        """Where the consumer is in the cycle (0: at a token's first chunk)."""
        return self._taken % len(self.chunks)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)
        self._threads.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
