"""The trace sink: per-token, per-layer events of an engine run as JSON lines (docs/trace.md).

Off by default (`EngineConfig(trace=None)`). When on, the hot path only appends a tuple to a
`collections.deque` (thread-safe, no lock, no I/O, no JSON); a writer thread wakes every
`flush_s`, turns the queued events into JSON lines (orjson: ~10x cheaper than the standard
library's encoder, which matters because the writer shares the one core with the compute
thread) and writes them in one buffered write. The event loop and the compute thread never
wait on the file. `close()` drains and closes.

Timestamps are `time.perf_counter()` seconds (monotonic, the same clock the engine's
timings use); the header records a (perf_counter, wall time) pair to place them in time.
The request id comes from structlog's contextvars (`request_id`, bound by the engine per
request) when the runner starts a token; events of that token emitted elsewhere (layer
actors, whose tasks were started before the request) get it through the token number.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

from flashlm.errors import ConfigError, TraceFormatError

SCHEMA = "flashlm-trace"
SCHEMA_VERSION = 1

# Fields every event of a kind carries (besides "ev", "token", "rid"). docs/trace.md explains them.
FIELDS: dict[str, tuple[str, ...]] = {
    "header": ("schema", "version", "clock", "perf_counter", "wall_time", "pid", "config", "model"),
    "token_start": ("t", "tokens_in"),
    "request": ("t", "prompt_tokens", "cached_tokens"),
    "token": ("start", "end", "read_bytes", "spec_read_bytes", "hits", "needed", "read_wait_ms", "compute_ms",
              "spec_hits", "spec_needed"),
    "attn": ("layer", "start", "end"),
    "predict": ("layer", "start", "end", "speculative", "n"),
    "cache": ("layer", "phase", "start", "end", "speculative", "requested", "hits", "missing", "evicted",
              "appended", "hole_fills", "moved", "num_used"),
    "read": ("layer", "issued", "completed", "speculative", "bundles", "bytes", "bytes_requested", "ranges",
             "syscalls", "depth"),
    "wait": ("layer", "start", "end"),
    "compute": ("layer", "start", "end", "rows"),
    "spec": ("layer", "predicted", "needed", "hits"),
}
LAYER_KINDS = ("attn", "predict", "cache", "read", "wait", "compute", "spec")
# The fields that are not numbers (every other field of FIELDS is an int or a float); a cache
# "commit" is of no one speculative kind (None).
_OTHER_FIELDS: dict[str, tuple[type, ...]] = {"schema": (str,), "clock": (str,), "model": (str,), "phase": (str,),
                                              "config": (dict,), "speculative": (bool, type(None))}


class TraceSink:
    """`sink.emit(kind, token, **fields)` from any thread; `sink.close()` at the end."""

    def __init__(self, path: str | os.PathLike[str], *, config: dict[str, Any] | None = None, model: str = "",
                 flush_s: float = 0.2, max_bytes: int = 256 * 2**20) -> None:
        self.path = Path(path)
        # A long run rotates: past max_bytes the file becomes PATH.1 (replacing an older one)
        # and a new PATH starts with the header again, so a trace holds at most 2 x max_bytes.
        self.max_bytes = max_bytes
        self.rotations = 0
        if not self.path.parent.is_dir():  # a typo'd directory is the user's to fix, not ours to create
            raise ConfigError(f"trace file {self.path}: its directory {self.path.parent} does not exist; "
                              f"create it or choose another --trace FILE")
        self._file = open(self.path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in close()
        self._q: deque[tuple[str, int, dict[str, Any]]] = deque()
        self._rid: dict[int, Any] = {}  # token -> request id
        self._flush_s = flush_s
        self._stop = threading.Event()
        self.emitted = 0
        self._header = dict(schema=SCHEMA, version=SCHEMA_VERSION, clock="perf_counter",
                            perf_counter=time.perf_counter(), wall_time=time.time(), pid=os.getpid(),
                            config=config or {}, model=model)
        self.emit("header", -1, **self._header)
        self._thread = threading.Thread(target=self._writer, name="flashlm-trace", daemon=True)
        self._thread.start()

    def begin_token(self, token: int, rid: Any, tokens_in: int) -> None:
        """A runner starts token step `token` for request `rid` (later events of it inherit the id)."""
        self._rid[token] = rid
        self._rid.pop(token - 4096, None)  # events of a token are written within a flush: keep the map bounded
        self.emit("token_start", token, t=time.perf_counter(), tokens_in=tokens_in)

    def begin_request(self, rid: Any, prompt_tokens: int, cached_tokens: int) -> None:
        """A request is admitted: `cached_tokens` of its prompt come from a kept prefix (not
        prefilled). Of no token step: token -1, its own request id."""
        self._q.append(("request", -1, {"rid": rid, "t": time.perf_counter(), "prompt_tokens": prompt_tokens,
                                        "cached_tokens": cached_tokens}))

    def emit(self, kind: str, token: int, **fields: Any) -> None:
        self._q.append((kind, token, fields))  # deque.append is atomic: no lock on the hot path

    # -- the writer thread ----------------------------------------------------------------

    def _drain(self) -> None:
        q, rid, lines, size = self._q, self._rid, [], self._file.tell()
        while q:
            kind, token, fields = q.popleft()
            line = _line({"ev": kind, "token": token, "rid": rid.get(token), **fields})
            if size + len(line) > self.max_bytes and kind != "header":
                self._file.write(b"".join(lines))
                self._rotate()
                lines, size = [], self._file.tell()
            lines.append(line)
            size += len(line)
            self.emitted += 1
        if lines:
            self._file.write(b"".join(lines))

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._file = open(self.path, "wb", buffering=1 << 20)  # noqa: SIM115
        self._file.write(_line({"ev": "header", "token": -1, "rid": None, **self._header}))
        self.rotations += 1

    def _writer(self) -> None:
        while not self._stop.wait(self._flush_s):
            self._drain()
        self._drain()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._drain()  # anything appended after the thread's last drain
        self._file.close()

    def __enter__(self) -> TraceSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemorySink:
    """The trace sink's interface, keeping the events in memory as the dicts `load` would return:
    for a bench or a test that reads them back while the engine runs (`SparseRunner.set_trace`).
    Not bounded: attach it for a measured stretch only."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._rid: dict[int, Any] = {}  # token -> request id

    def begin_token(self, token: int, rid: Any, tokens_in: int) -> None:
        self._rid[token] = rid
        self.emit("token_start", token, t=time.perf_counter(), tokens_in=tokens_in)

    def begin_request(self, rid: Any, prompt_tokens: int, cached_tokens: int) -> None:
        self.events.append({"ev": "request", "token": -1, "rid": rid, "t": time.perf_counter(),
                            "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens})

    def emit(self, kind: str, token: int, **fields: Any) -> None:
        # list.append is atomic: from any thread, no lock
        self.events.append({"ev": kind, "token": token, "rid": self._rid.get(token), **fields})

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The events of one kind ("read", "wait", "compute" ...: FIELDS), in the order emitted."""
        return [e for e in self.events if e["ev"] == kind]

    def close(self) -> None:
        pass


def _line(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event, default=_plain, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)


def _plain(o: Any) -> Any:
    """numpy scalars and other stragglers."""
    if hasattr(o, "item"):
        return o.item()
    return repr(o)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def load(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every event of a trace file; raises TraceFormatError naming the line if one is not a JSON
    object of a known kind with its kind's fields, each of its type."""
    events = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    events.append(_event(line, f"{path}:{n}"))
    except UnicodeDecodeError as e:
        raise TraceFormatError(f"{path}: not a flashlm trace (not UTF-8 text: {e})") from None
    if not events or events[0]["ev"] != "header" or events[0]["schema"] != SCHEMA:
        raise TraceFormatError(f"{path}: not a flashlm trace (no {SCHEMA} header on the first line)")
    if events[0]["version"] != SCHEMA_VERSION:
        raise TraceFormatError(f"{path}: trace schema version {events[0]['version']}, this flashlm reads "
                               f"{SCHEMA_VERSION}")
    return events


def _event(line: str, where: str) -> dict[str, Any]:
    try:
        ev = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceFormatError(f"{where}: not a JSON line ({e})") from None
    if not isinstance(ev, dict):
        raise TraceFormatError(f"{where}: a trace line is a JSON object, this is {type(ev).__name__} {line.strip()[:60]}")
    kind = ev.get("ev")
    missing = [k for k in ("ev", "token", "rid", *FIELDS.get(kind, ())) if k not in ev]  # type: ignore[arg-type]
    if kind not in FIELDS or missing:
        raise TraceFormatError(f"{where}: event {kind!r} is not in the schema or lacks {missing}")
    if not isinstance(ev["token"], int) or isinstance(ev["token"], bool):
        raise TraceFormatError(f"{where}: token {ev['token']!r} is not an integer")
    for k in FIELDS[kind]:
        want = _OTHER_FIELDS.get(k)
        if not (isinstance(ev[k], want) if want is not None else _number(ev[k])):
            kinds = "a number" if want is None else " or ".join(t.__name__ for t in want)
            raise TraceFormatError(f"{where}: {kind} field {k} is {ev[k]!r}, not {kinds}")
    return ev
