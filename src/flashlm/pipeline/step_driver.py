"""How a token step's layer loop reaches the layer actors: the requests it makes (below) and
the `StepDriver` that carries them out (one per `SparseRunner`).

`SparseRunner._layers` is a generator: it computes inline and yields a request whenever it needs
an actor; the driver sends the actor its message and sends the generator the answer:

- `StartPrefetch(layer, ids)`: the actor gets `Prefetch` (start reading a speculative set);
  answered None at once.
- `Ask(layer, ids)`: `Ensure` (place the set, evicting outside the window, read what is
  missing); answered None once the reads are in flight.
- `AppendMissing(layer, ids)`: `Ensure(evict=False)` (read the missing neurons into free slots
  past the used ones: no row moves); answered None at once.
- `WaitLayer(layer)`: nothing is sent; answered with that layer's last Ensure's `LayerStep`
  once every read is committed.
- `AfterFFN(layer, message)`: the `Touch`, `Tidy`, `Mark` or `Clear` (bookkeeping after the
  layer's FFN); answered None at once.

The driver runs the generator one of two ways. On the compute thread (compute="thread") the
whole token runs there back to back, posting to the actors on the loop thread-safely and blocking
only on `Ask` and `WaitLayer` (the actors answer through thread-safe futures); so the loop
(actors, reads, bookkeeping) runs beside it, with no thread hop per layer. On the loop
(compute="loop") every request is awaited there.

The driver counts what it sends each actor (the actor counts what it handled) and answers the
layer loop's questions about an actor from the two (`idle`, `quiescent`). A `Mark` (a lazy cache's
cached layer: mark the set used) moves no row and nothing waits for it, so the driver holds it:
the held marks go ahead of the actor's next message (its cache then sees them before any change),
or as one `Marks` at the end of the step that held `HOLD` of them. In the steady state, every
layer cached, the loop so wakes for the caches once every HOLD tokens, not every token; a cache's
hit counts (`NeuronCache.stats`) lag by as many tokens at most.

When the actors are gone (a crash, or the engine closed) `dead` fails every step waiting on
one, and all later ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Generator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flashlm.errors import EngineClosedError, EngineDeadError
from flashlm.pipeline.actors import Clear, Ensure, LayerActor, LayerStep, Mark, Marks, Message, Prefetch, Tidy, Touch


@dataclass(frozen=True)
class StartPrefetch:
    """Layer `layer`'s speculative set (predicted one layer early): its actor starts the reads."""

    layer: int
    ids: np.ndarray = field(compare=False)


@dataclass(frozen=True)
class Ask:
    """The layer's exact set: its actor places it (evicting outside the window) and starts reading
    what is missing; the step goes on once the reads are in flight."""

    layer: int
    ids: np.ndarray = field(compare=False)


@dataclass(frozen=True)
class AppendMissing:
    """The layer's exact set, the missing neurons appended past the used rows (no row moves, the
    eviction left for a `Tidy` after the FFN); the step goes on at once."""

    layer: int
    ids: np.ndarray = field(compare=False)


@dataclass(frozen=True)
class WaitLayer:
    """Until every read of the layer's `Ask` / `AppendMissing` is committed: its LayerStep."""

    layer: int


@dataclass(frozen=True)
class AfterFFN:
    """The layer's FFN ran: its cache's bookkeeping now (rows may move while another layer computes)."""

    layer: int
    message: Touch | Tidy | Mark | Clear


Request = StartPrefetch | Ask | AppendMissing | WaitLayer | AfterFFN
LayerLoop = Generator[Request, Any, Any]


class StepDriver:
    def __init__(self, actors: list[LayerActor], pool: Any, *, compute: str) -> None:
        self.actors = actors
        if compute not in ("thread", "loop"):
            raise ValueError(f"compute {compute!r}: 'thread' or 'loop'")
        self.on_loop = compute == "loop"
        self._pool = pool
        self._replies: set[Any] = set()  # asyncio or concurrent futures the actors will answer
        self._replies_lock = threading.Lock()  # the compute thread adds and removes them too
        self._dead: BaseException | None = None
        # Messages posted to each actor (written by the thread driving the step: one step at a
        # time), every kind and apart those that may change its cache's slots (all but Mark).
        self._sent = [0] * len(actors)
        self._changes = [0] * len(actors)
        self._held: list[list[Mark]] = [[] for _ in actors]  # Marks not sent yet (the module doc)

    HOLD = 16  # marks held per actor before they go on their own

    def sent(self, layer: int) -> int:
        """How many messages this driver has posted to layer `layer`'s actor."""
        return self._sent[layer]

    def idle(self, layer: int) -> bool:
        """Layer `layer`'s actor has handled every message that may change its cache's slots."""
        return self.actors[layer].idle(self._changes[layer])

    def quiescent(self, layer: int) -> bool:
        """`idle`, and no read of that actor in flight or uncommitted: its cache's slots stay as
        they are until this driver sends it more work."""
        return self.actors[layer].quiescent(self._changes[layer])

    async def drive(self, layers: LayerLoop, token: int) -> Any:
        """Run the layer loop `layers` for step `token` to its end; its return value."""
        if self.on_loop:
            return await self._drive_here(layers, token)
        return await self._drive_on_thread(layers, token)

    def dead(self, error: BaseException) -> None:
        """The actors are gone (crashed, or the engine closed: EngineClosedError): fail every
        step waiting on one, and all later ones."""
        self._dead = error
        with self._replies_lock:
            waiting = list(self._replies)
        for reply in waiting:
            if not reply.done():
                reply.set_exception(self._failure())

    def _failure(self) -> Exception:
        if isinstance(self._dead, EngineClosedError):
            return EngineClosedError(str(self._dead))
        return EngineDeadError(f"a layer actor crashed ({self._dead!r}); open a new engine")

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise self._failure()

    def _register(self, *futures: Any) -> None:
        with self._replies_lock:
            self._replies.update(futures)

    def _forget(self, *futures: Any) -> None:
        with self._replies_lock:
            self._replies.difference_update(futures)

    @contextlib.contextmanager
    def _sending(self, reply: Any, ready: Any) -> Iterator[None]:
        """An Ensure's futures, registered (for `dead`) while it is sent and its reads start; the
        post checks the engine is alive after this, so `dead` either saw them or is seen. If the
        sending fails the reply is forgotten (an asyncio one cancelled: nobody will read it);
        `ready` is forgotten either way."""
        self._register(reply, *([ready] if ready is not None else []))
        try:
            yield
        except BaseException:
            if isinstance(reply, asyncio.Future):  # (a thread-safe one the actor may be answering: left)
                reply.cancel()
            self._forget(reply)
            raise
        finally:
            if ready is not None:
                self._forget(ready)

    @staticmethod
    def _message(req: StartPrefetch | AfterFFN, token: int) -> Message:
        return Prefetch(token, req.ids) if isinstance(req, StartPrefetch) else req.message

    # -- on the loop (compute="loop") --------------------------------------------------------

    async def _drive_here(self, layers: LayerLoop, token: int) -> Any:
        answer: Any = None
        waiting: tuple[int, asyncio.Future[LayerStep]] | None = None  # the last Ensure's layer and reply
        while not isinstance(req := _next(layers, answer), _Done):
            answer = None
            if isinstance(req, StartPrefetch | AfterFFN):
                await self._post(req.layer, self._message(req, token))
            elif isinstance(req, Ask | AppendMissing):
                waiting = (req.layer, await self._ensure_here(req, token))
            else:
                answer, waiting = await self._wait(req, waiting), None
        for layer, marks in self._due():
            await self._post(layer, marks)
        return req.value

    async def _ensure_here(self, req: Ask | AppendMissing, token: int) -> asyncio.Future[LayerStep]:
        """Send the Ensure of `req`; for an `Ask` return once the reads are in flight. Returns the
        future of its LayerStep."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[LayerStep] = loop.create_future()
        ready = loop.create_future() if isinstance(req, Ask) else None
        with self._sending(reply, ready):
            await self._post(req.layer, Ensure(token, req.ids, reply, ready, evict=isinstance(req, Ask)))
            if ready is not None:
                await ready
        return reply

    async def _wait(self, req: WaitLayer, waiting: tuple[int, asyncio.Future[LayerStep]] | None) -> LayerStep:
        assert waiting is not None and waiting[0] == req.layer, (req, waiting)
        try:
            return await waiting[1]
        finally:
            self._forget(waiting[1])

    def _count(self, layer: int, msg: Message) -> None:
        """One more message for `layer`'s actor, counted before delivery: from now on the actor
        is not quiescent (unless it is a Mark)."""
        self._sent[layer] += 1
        if not isinstance(msg, Mark | Marks):
            self._changes[layer] += 1

    def _ahead(self, layer: int, msg: Message) -> list[Message]:
        """What to send `layer`'s actor for `msg`: nothing for a Mark (held), else the held marks
        and then `msg`."""
        held = self._held[layer]
        if isinstance(msg, Mark):
            held.append(msg)
            return []
        if not held:
            return [msg]
        self._held[layer] = []
        return [Marks(tuple(held)), msg]

    def _due(self) -> list[tuple[int, Marks]]:
        """At a step's end: the held marks of each actor that holds HOLD of them, taken."""
        due = [(layer, Marks(tuple(h))) for layer, h in enumerate(self._held) if len(h) >= self.HOLD]
        for layer, _ in due:
            self._held[layer] = []
        return due

    async def _post(self, layer: int, msg: Message) -> None:
        self._check_alive()
        for m in self._ahead(layer, msg):
            self._count(layer, m)
            await self.actors[layer].inbox.put(m)

    # -- on the compute thread (compute="thread") ----------------------------------------------

    async def _drive_on_thread(self, layers: LayerLoop, token: int) -> Any:
        loop = asyncio.get_running_loop()
        abort = threading.Event()
        done = loop.run_in_executor(self._pool, self._drive_sync, layers, token, loop, abort)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            # The token cannot stop mid-layer on its thread: stop it at the next layer and
            # wait, so no later step runs while this one still touches the caches or KV cache.
            abort.set()
            with contextlib.suppress(BaseException):
                await done
            raise

    def _drive_sync(self, layers: LayerLoop, token: int, loop: asyncio.AbstractEventLoop,
                    abort: threading.Event) -> Any:
        answer: Any = None
        waiting: tuple[int, Future[LayerStep]] | None = None
        outbox: list[tuple[LayerActor, Message]] = []
        try:
            while not abort.is_set():
                if isinstance(req := _next(layers, answer), _Done):
                    for layer, marks in self._due():
                        self._post_threadsafe(layer, marks, loop, outbox)
                    return req.value
                answer = None
                if isinstance(req, StartPrefetch | AfterFFN):
                    self._post_threadsafe(req.layer, self._message(req, token), loop, outbox)
                elif isinstance(req, Ask | AppendMissing):
                    waiting = (req.layer, self._ensure_threadsafe(req, token, loop, outbox))
                else:
                    assert waiting is not None and waiting[0] == req.layer, (req, waiting)
                    try:
                        answer = waiting[1].result()
                    finally:
                        self._forget(waiting[1])
                        waiting = None
            raise _Aborted
        finally:
            self._flush(outbox, loop)
            layers.close()

    # Bookkeeping (Touch, Tidy, Marks) waits in an outbox for a few layers: each wake-up of the
    # loop from this thread costs a context switch, and on a small machine the two threads share
    # a core. A Prefetch goes at once (its reads should start now), taking the outbox with it. An
    # Ensure does not wait for the outbox (other actors' bookkeeping would run before it).
    OUTBOX = 4

    def _post_threadsafe(self, layer: int, msg: Message, loop: asyncio.AbstractEventLoop,
                         outbox: list[tuple[LayerActor, Message]]) -> None:
        self._check_alive()
        for m in self._ahead(layer, msg):
            self._deliver(layer, m, loop, outbox)

    def _deliver(self, layer: int, msg: Message, loop: asyncio.AbstractEventLoop,
                 outbox: list[tuple[LayerActor, Message]]) -> None:
        actor = self.actors[layer]
        self._count(layer, msg)
        if actor.backlog(self._sent[layer]) > actor.inbox.maxsize:  # a full inbox pushes back on the compute thread
            self._flush(outbox, loop)
            asyncio.run_coroutine_threadsafe(actor.inbox.put(msg), loop).result()
        elif isinstance(msg, Ensure):  # at once, and ahead of other actors' bookkeeping
            if any(a is actor for a, _ in outbox):  # but after this actor's own messages
                self._flush(outbox, loop)
            loop.call_soon_threadsafe(actor.inbox.put_nowait, msg)
        else:
            outbox.append((actor, msg))  # room for certain: put_nowait cannot fail
            if isinstance(msg, Prefetch) or (not isinstance(msg, Marks) and len(outbox) >= self.OUTBOX):
                self._flush(outbox, loop)

    def _ensure_threadsafe(self, req: Ask | AppendMissing, token: int, loop: asyncio.AbstractEventLoop,
                           outbox: list[tuple[LayerActor, Message]]) -> Future[LayerStep]:
        """Send the Ensure of `req` from the compute thread; for an `Ask` return once the reads are
        in flight. The actor answers through thread-safe futures: its answers wake this thread
        directly, with no round trip through the loop. Returns the future of its LayerStep."""
        reply: Future[LayerStep] = Future()
        ready: Future[Any] | None = Future() if isinstance(req, Ask) else None
        with self._sending(reply, ready):
            self._post_threadsafe(req.layer, Ensure(token, req.ids, reply, ready, evict=isinstance(req, Ask)),
                                  loop, outbox)
            if ready is not None:
                ready.result()
        return reply

    @staticmethod
    def _flush(outbox: list[tuple[LayerActor, Message]], loop: asyncio.AbstractEventLoop) -> None:
        if outbox:
            batch = outbox.copy()
            outbox.clear()
            loop.call_soon_threadsafe(lambda: [a.inbox.put_nowait(m) for a, m in batch])


@dataclass(frozen=True)
class _Done:
    """The layer loop returned `value`."""

    value: Any


def _next(layers: LayerLoop, answer: Any) -> Request | _Done:
    """The layer loop's next request, `answer` sent to it for its last one; or _Done when it returns."""
    try:
        return layers.send(answer)
    except StopIteration as done:
        return _Done(done.value)


class _Aborted(Exception):
    """The step's stream was cancelled: its compute thread stops at the next layer."""
