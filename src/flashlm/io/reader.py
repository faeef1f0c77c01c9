"""Async bundled neuron reads: `await reader.read(layer, ids, dest, slots)`.

One call reads the bundles of some neurons of one layer from `ffn.bin` straight into rows of a
preallocated, aligned destination (the neuron cache's slots): no intermediate `bytes`, no copy.
Inside, ids are sorted (slot pairing kept), neighbours are coalesced into ranges (exact
neighbours always; small gaps are read through into scratch memory when a range is still short,
see `plan_ranges`), and each range is one `os.preadv` whose iovecs point at the destination
rows (backend "threads": a worker thread's `os.preadv`; "batch", what "auto" picks where it can:
one READV SQE a range, a call's ranges handed to io_uring in one C call, `flashlm.io.batch_backend`;
"uring" issues one read SQE per destination part, see `flashlm.io.uring_backend`). At most `in_flight` reads are in the kernel at once, shared by
every concurrent `read`.

Contract:
- Duplicate neuron ids (or two ids into one slot) are rejected with `DuplicateNeuronError`:
  deduplicating would leave a slot the caller believes filled unwritten.
- On an I/O error or short read the call raises `NeuronReadError` (layer, neuron range, file)
  after its reads already in the kernel have finished; its unstarted reads are dropped. The
  reader stays usable.
- When `read` returns or raises, including `CancelledError`, no read of that call is still
  writing into `dest`: cancellation drops unstarted reads and waits for those already in a
  syscall (one device latency). The slots of a failed or cancelled read hold undefined bytes:
  the caller must not mark them valid.
- O_DIRECT unless `direct=False` or `page_cache=True`. If the filesystem refuses O_DIRECT the
  reader falls back to buffered reads followed by `posix_fadvise(DONTNEED)` (so the page cache
  still does not flatter later reads) and logs that once. `page_cache=True` reads buffered and
  keeps the pages.
- A reader belongs to the event loop that started it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from flashlm.errors import (
    AlignmentError,
    BundleChecksumError,
    ConfigError,
    DuplicateNeuronError,
    NeuronReadError,
    ReaderClosedError,
    ReadRequestError,
)
from flashlm.io.backend import Backend, Range, ReadCall, ShortReadError
from flashlm.io.buffers import PAGE, aligned_empty, is_aligned, slots_as_tensor
from flashlm.io.format import FFNLayout
from flashlm.io.threads_backend import ThreadsBackend
from flashlm.log import get_logger

__all__ = ["BundleReader", "ReadStats", "aligned_empty", "plan_ranges", "slots_as_tensor",
           "DEFAULT_BACKEND", "DEFAULT_MAX_GAP_BYTES", "DEFAULT_MIN_READ_BYTES", "backend_name"]

log = get_logger(__name__)

# "auto": the "batch" backend where its extension is built and the kernel allows io_uring, else
# "threads". Both read a range as one scattering request (through small gaps into scratch); batch
# hands the kernel a whole call's ranges in one C call where threads pays a Python thread hop per
# range, the CPU cost that held the reader below fio on 2 vCPUs (docs/io.md, `flashlm bench io`).
DEFAULT_BACKEND = "auto"
DEFAULT_MIN_READ_BYTES = 32 * 1024
# Reading through a gap vs splitting ("gap" in io.json): single 3.5 KiB bundles, 32 in flight,
# one read over the gap / two reads, in useful MiB/s, at gaps of 1/2/3/4/6/8/12/16 bundles:
# io.json 1.15 1.61 1.35 1.17 0.87 1.05 0.63 0.61; an earlier full run 1.44 1.12 1.25 1.06 0.84
# 0.88 0.83 0.50; quick runs (1/2/4/8): 1.53 1.46 1.06 0.76 and 1.59 1.42 1.32 1.09. Up to 4
# bundles (14 KiB) always paid, 6 and more mostly did not: 16 KiB.
DEFAULT_MAX_GAP_BYTES = 16 * 1024
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

_warned_buffered: set[str] = set()


@dataclass(frozen=True)
class ReadStats:
    """What one `read` did (or, summed, everything a reader did: `reader.stats`)."""

    calls: int = 0
    bundles: int = 0
    bytes_requested: int = 0  # bundles * stride
    bytes_read: int = 0  # from the file, including gaps read through
    syscalls: int = 0  # read operations issued: preadv calls or io_uring SQEs
    ranges: int = 0  # contiguous stretches of the file
    max_in_flight: int = 0  # deepest in-flight count (all calls of this reader) seen by this call
    latency_s: float = 0.0

    def __add__(self, other: ReadStats) -> ReadStats:
        vals = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        vals["max_in_flight"] = max(self.max_in_flight, other.max_in_flight)
        return ReadStats(**vals)


def plan_ranges(ids: np.ndarray, slots: np.ndarray, *, stride: int, base: int, min_read_bytes: int,
                max_gap_bytes: int, max_iov: int = IOV_MAX) -> list[Range]:
    """Coalesce sorted, distinct `ids` (slot `slots[j]` for `ids[j]`) into file ranges.

    Exact neighbours always join a range. A gap of at most `max_gap_bytes` is read through (into
    scratch) when the range built so far or the run after the gap is shorter than
    `min_read_bytes`: small reads are the expensive ones, ranges already at an efficient size are
    not padded with waste. A range holds at most `max_iov` iovecs (one per run of consecutive
    slots, one per gap).
    """
    n = len(ids)
    if n == 0:
        return []
    # Segments: maximal runs where both the neuron id and the slot go up by one.
    brk_id = np.flatnonzero(np.diff(ids) != 1) + 1
    brk = np.union1d(brk_id, np.flatnonzero(np.diff(slots) != 1) + 1)
    starts = np.concatenate(([0], brk)).astype(np.int64)
    lens = np.diff(np.concatenate((starts, [n])))
    # Rows from each segment's start to the end of its run of consecutive ids.
    run_end = np.concatenate((brk_id, [n]))[np.searchsorted(brk_id, starts, side="right")]
    rest = (run_end - starts).tolist()
    seg_ids, seg_slots, seg_lens = ids[starts].tolist(), slots[starts].tolist(), lens.tolist()

    ranges: list[Range] = []
    first = seg_ids[0]
    parts = [(seg_slots[0] * stride, seg_lens[0] * stride)]
    end = first + seg_lens[0]  # one past the last id in the range
    for k in range(1, len(seg_ids)):
        i, s, m = seg_ids[k], seg_slots[k], seg_lens[k]
        gap = (i - end) * stride
        if gap == 0 and len(parts) < max_iov:
            parts.append((s * stride, m * stride))
        elif (0 < gap <= max_gap_bytes and len(parts) + 2 <= max_iov
              and ((end - first) * stride < min_read_bytes or rest[k] * stride < min_read_bytes)):
            parts.append((-1, gap))
            parts.append((s * stride, m * stride))
        else:
            ranges.append(Range(base + first * stride, (end - first) * stride, parts, first, end - 1))
            first, parts = i, [(s * stride, m * stride)]
        end = i + m
    ranges.append(Range(base + first * stride, (end - first) * stride, parts, first, end - 1))
    return ranges


def backend_name(kind: str) -> str:
    """The backend a name stands for: "auto" resolved on this machine, any other name itself."""
    if kind != "auto":
        return kind
    from flashlm.io.batch_backend import available

    return "batch" if available() else "threads"


def make_backend(kind: str | Backend, in_flight: int) -> Backend:
    """The backend `kind` names ("auto", "threads", "uring" or "batch"), or `kind` itself when it is one."""
    if isinstance(kind, Backend):
        return kind
    kind = backend_name(kind)
    if kind == "threads":
        return ThreadsBackend(in_flight)
    if kind == "uring":
        from flashlm.io.uring_backend import UringBackend

        return UringBackend(in_flight)
    if kind == "batch":
        from flashlm.io.batch_backend import BatchBackend

        return BatchBackend(in_flight)
    raise ConfigError(f"unknown read backend {kind!r}: use 'auto', 'threads', 'uring' or 'batch'")


class BundleReader:
    """Reads neuron bundles of `ffn.bin` into aligned destination rows. See the module doc."""

    def __init__(self, path: str | os.PathLike[str], layout: FFNLayout, *, backend: str | Backend = DEFAULT_BACKEND,
                 in_flight: int = 32, direct: bool = True, page_cache: bool = False,
                 min_read_bytes: int = DEFAULT_MIN_READ_BYTES, max_gap_bytes: int = DEFAULT_MAX_GAP_BYTES,
                 crcs: Sequence[np.ndarray] | None = None):
        if min_read_bytes < 0 or max_gap_bytes < 0:
            raise ConfigError(f"min_read_bytes and max_gap_bytes must be >= 0, got {min_read_bytes}, {max_gap_bytes}")
        self.path = str(Path(path))
        self.layout = layout
        self.crcs = crcs  # per layer, each bundle's CRC32 (FlashStore.bundle_crcs()): checked after every read
        self._backend = make_backend(backend, in_flight)
        self.backend = self._backend.name
        self.in_flight = self._backend.in_flight
        self.page_cache = page_cache
        self.direct = direct and not page_cache  # may turn False in start() (filesystem refuses)
        self.min_read_bytes = min_read_bytes
        self.max_gap_bytes = max_gap_bytes if self._backend.scatter else 0
        self._scratch = memoryview(aligned_empty(1, max(self.max_gap_bytes, PAGE))).cast("B")
        self._fd = -1
        self._state = "new"  # new -> open -> closed
        self._calls: set[ReadCall] = set()
        self.stats = ReadStats()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> BundleReader:
        if self._state == "open":
            return self
        if self._state == "closed":
            raise ReaderClosedError(f"{self.path}: bundle reader is closed; open a new one")
        loop = asyncio.get_running_loop()
        fd = self._open()
        try:
            self._backend.start(loop, fd, dontneed=not self.direct and not self.page_cache)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._state = fd, "open"
        log.debug("reader_started", path=self.path, backend=self.backend, in_flight=self.in_flight,
                  direct=self.direct, max_gap_bytes=self.max_gap_bytes, min_read_bytes=self.min_read_bytes)
        return self

    def _open(self) -> int:
        if not self.direct:
            return self._backend.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fd = self._backend.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:  # this filesystem has no O_DIRECT
                raise
            return self._fall_back(str(e))
        # Some filesystems accept the flag and refuse the read: probe one block.
        probe = aligned_empty(1, self.layout.block_size)
        try:
            os.preadv(fd, [probe], 0)
        except OSError as e:
            os.close(fd)
            if e.errno != errno.EINVAL:
                raise
            return self._fall_back(str(e))
        return fd

    def _fall_back(self, why: str) -> int:
        self.direct = False
        if self.path not in _warned_buffered:
            _warned_buffered.add(self.path)
            log.warning("o_direct_unavailable", path=self.path, reason=why,
                        fallback="buffered reads + posix_fadvise(DONTNEED)")
        return self._backend.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    async def aclose(self) -> None:
        """Close: reads in flight are abandoned (their `read` raises `ReaderClosedError`) after
        the syscalls already running finish; workers are joined; the fd is closed. Idempotent."""
        if self._state == "closed":
            return
        was_open, self._state = self._state == "open", "closed"
        if not was_open:
            return
        for call in list(self._calls):
            call.abandoned = True
            self._backend.abandon(call)
        while self._calls:
            await asyncio.wait([c.future for c in self._calls])
            self._calls = {c for c in self._calls if not c.future.done()}
        try:
            await self._backend.aclose()
        finally:
            os.close(self._fd)
            self._fd = -1

    async def __aenter__(self) -> BundleReader:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the one call --------------------------------------------------------------------

    async def read(self, layer: int, ids: Sequence[int] | np.ndarray, dest: np.ndarray,
                   slots: Sequence[int] | np.ndarray) -> ReadStats:
        """Read bundle `ids[j]` of `layer` into row `dest[slots[j]]`, for every j."""
        t0 = time.perf_counter()
        if self._state == "new":
            await self.start()  # opening is not a read: the request is checked before any read
        ids_s, slots_s = self._validate(layer, ids, dest, slots)
        lay, stride = self.layout.layers[layer], self.layout.stride
        ranges = plan_ranges(ids_s, slots_s, stride=stride, base=lay.offset, min_read_bytes=self.min_read_bytes,
                             max_gap_bytes=self.max_gap_bytes)
        call = ReadCall(asyncio.get_running_loop(), memoryview(dest).cast("B"), self._scratch)
        if ranges:
            self._calls.add(call)
            try:
                self._backend.submit(call, ranges)
                await self._wait(call)
            finally:
                self._calls.discard(call)
        if call.error is not None:
            raise self._read_error(layer, *call.error)
        if call.abandoned:  # not by an error, not by cancellation: by aclose()
            raise ReaderClosedError(f"{self.path}: bundle reader closed during a read of layer {layer}")
        if self.crcs is not None:
            self._check_crcs(layer, ids_s, slots_s, dest)
        st = ReadStats(calls=1, bundles=len(ids_s), bytes_requested=len(ids_s) * stride, bytes_read=call.bytes_read,
                       syscalls=call.syscalls, ranges=len(ranges), max_in_flight=call.max_depth,
                       latency_s=time.perf_counter() - t0)
        self.stats = self.stats + st
        return st

    async def _wait(self, call: ReadCall) -> None:
        try:
            await asyncio.shield(call.future)
        except asyncio.CancelledError:
            # Drop what has not started, then wait (uncancellably) for reads inside a syscall:
            # after we return nothing writes into the caller's memory any more.
            call.abandoned = True
            self._backend.abandon(call)
            while not call.future.done():
                try:
                    await asyncio.shield(call.future)
                except asyncio.CancelledError:
                    continue
            raise

    def _check_crcs(self, layer: int, ids: np.ndarray, slots: np.ndarray, dest: np.ndarray) -> None:
        """Each landed bundle against its CRC32 (~1 us per 3.5 KiB bundle): a flipped bit on the
        disk becomes a named error, never a silently wrong answer."""
        want, n = self.crcs[layer], self.layout.bundle_bytes
        bad = [int(i) for i, s in zip(ids, slots) if zlib.crc32(dest[s, :n]) != want[i]]
        if bad:
            e = BundleChecksumError(
                f"layer {layer} neurons {bad[:5]}{' ...' if len(bad) > 5 else ''} of {self.path} fail their CRC32: "
                "the file is damaged. Run `flashlm verify` and re-run `flashlm convert`")
            e.filename = self.path
            e.layer, e.neurons = layer, (bad[0], bad[-1])  # type: ignore[attr-defined]
            raise e

    def _read_error(self, layer: int, rng: Range, err: BaseException) -> NeuronReadError:
        if isinstance(err, ShortReadError):
            try:
                size = os.fstat(self._fd).st_size
            except OSError:
                size = -1
            what = (f"short read at byte {err.offset} ({err.got} of {err.wanted} bytes): the file is {size} bytes, "
                    f"the layout says {self.layout.file.size}; the file was truncated or replaced")
            code = errno.EIO
        elif isinstance(err, OSError):
            what, code = f"{err.strerror or err} (errno {err.errno})", err.errno
        else:
            what, code = f"{type(err).__name__}: {err}", None
        msg = (f"reading layer {layer} neurons {rng.first}..{rng.last} (bytes {rng.offset}..{rng.offset + rng.length})"
               f" of {self.path} failed: {what}. Check the disk; if the file changed, re-run `flashlm convert` "
               "(`flashlm verify` checks a store)")
        # OSError's (errno, strerror, filename) form: str() is "[Errno N] <msg>: '<file>'".
        e = NeuronReadError(code, msg, self.path) if code is not None else NeuronReadError(msg)
        e.filename = self.path
        e.layer, e.neurons = layer, (rng.first, rng.last)  # type: ignore[attr-defined]
        e.__cause__ = err
        return e

    def _validate(self, layer: int, ids: Sequence[int] | np.ndarray, dest: np.ndarray,
                  slots: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._state == "closed":
            raise ReaderClosedError(f"{self.path}: bundle reader is closed; open a new one")
        n_layers = len(self.layout.layers)
        if not (isinstance(layer, (int, np.integer)) and 0 <= layer < n_layers):
            raise ReadRequestError(f"layer {layer!r} out of range: the store has layers 0..{n_layers - 1}")
        stride = self.layout.stride
        if not isinstance(dest, np.ndarray) or dest.dtype != np.uint8 or dest.ndim != 2 or dest.shape[1] != stride \
                or not dest.flags.c_contiguous or not dest.flags.writeable:
            got = (f"{type(dest).__name__} {getattr(dest, 'dtype', '?')} {getattr(dest, 'shape', '?')}"
                   if isinstance(dest, np.ndarray) else type(dest).__name__)
            raise ReadRequestError(f"dest must be a writeable C-contiguous uint8 array of shape (capacity, {stride}); "
                                   f"got {got}: allocate it with flashlm.io.reader.aligned_empty(capacity, {stride})")
        if self.direct and not is_aligned(dest, PAGE):
            raise AlignmentError(f"dest starts at address {dest.ctypes.data:#x}, not a multiple of {PAGE}: O_DIRECT "
                                 f"needs aligned memory; allocate it with aligned_empty(capacity, {stride}) "
                                 "(and do not slice off leading rows)")
        ids_a, slots_a = np.asarray(ids), np.asarray(slots)
        if ids_a.ndim != 1 or slots_a.ndim != 1 or len(ids_a) != len(slots_a):
            raise ReadRequestError(f"ids and slots must be 1-D and of equal length; got shapes {ids_a.shape}, "
                                   f"{slots_a.shape}")
        if len(ids_a) == 0:
            return ids_a.astype(np.int64), slots_a.astype(np.int64)
        if ids_a.dtype.kind not in "iu" or slots_a.dtype.kind not in "iu":
            raise ReadRequestError(f"ids and slots must be integers; got {ids_a.dtype}, {slots_a.dtype}")
        order = np.argsort(ids_a, kind="stable")
        ids_s, slots_s = ids_a[order].astype(np.int64), slots_a[order].astype(np.int64)
        n = self.layout.layers[layer].n_neurons
        if ids_s[0] < 0 or ids_s[-1] >= n:
            bad = ids_s[0] if ids_s[0] < 0 else ids_s[-1]
            raise ReadRequestError(f"neuron id {bad} out of range for layer {layer} (0..{n - 1})")
        if slots_s.min() < 0 or slots_s.max() >= dest.shape[0]:
            bad = slots_s.min() if slots_s.min() < 0 else slots_s.max()
            raise ReadRequestError(f"slot {bad} out of range: dest has {dest.shape[0]} rows")
        if (dup := np.flatnonzero(np.diff(ids_s) == 0)).size:
            raise DuplicateNeuronError(f"neuron id {ids_s[dup[0]]} requested twice for layer {layer}: "
                                       "pass each id once (duplicates are rejected, not merged)")
        if len(np.unique(slots_s)) != len(slots_s):
            raise DuplicateNeuronError(f"two neuron ids of layer {layer} target the same slot: give each id its own slot")
        return ids_s, slots_s
