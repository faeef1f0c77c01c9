"""How a token step's layer loop reaches the layer actors (`StepDriver`, one per `SparseRunner`).

`SparseRunner._layers` is a generator: it computes inline and yields what it needs from the
actors: ("post", layer, msg): deliver, no answer; ("ask", layer, ids): send Ensure, answer
(pending slots, row neurons) once the layer's reads are in flight; ("fetch", layer, ids):
send Ensure(evict=False), no answer (compute thread only); ("wait", layer): answer that
Ensure's LayerStep once every read is committed. The driver runs it one of two ways. On the
compute thread (compute="thread") the whole token runs there back to back, posting to the
actors on the loop thread-safely and blocking only when a layer must wait for its reads (the
actors answer through thread-safe futures); so the loop (actors, reads, bookkeeping) runs
beside it, with no thread hop per layer. Inline (compute="loop") every post and ask is awaited.

When the actors are gone (a crash, or the engine closed) `dead` fails every step waiting on
one, and all later ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from flashlm.errors import EngineClosedError, EngineDeadError
from flashlm.pipeline.actors import Ensure, LayerActor, LayerStep, Prefetch, Tidy, Touch


class StepDriver:
    def __init__(self, actors: list[LayerActor], pool: Any, *, inline: bool) -> None:
        self.actors = actors
        self.inline = inline
        self._pool = pool
        self._replies: set[Any] = set()  # asyncio or concurrent futures the actors will answer
        self._replies_lock = threading.Lock()  # the compute thread adds and removes them too
        self._dead: BaseException | None = None

    async def drive(self, layers: Any, token: int) -> Any:
        """Run the layer loop `layers` (a generator) for step `token` to its end; its return value."""
        if self.inline:
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

    async def _post(self, layer: int, msg: Prefetch | Touch | Tidy) -> None:
        self._check_alive()
        self.actors[layer].sent += 1
        await self.actors[layer].inbox.put(msg)

    async def _ask(self, layer: int, msg_token: int, ids: np.ndarray) -> tuple[Any, asyncio.Future[LayerStep]]:
        """Send Ensure; return once the layer's reads are in flight: ((its pending slots, the
        neuron of each row), the future of its LayerStep, for `_answer`)."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[tuple[np.ndarray, np.ndarray]] = loop.create_future()
        reply: asyncio.Future[LayerStep] = loop.create_future()
        with self._replies_lock:
            self._replies.update((ready, reply))
        try:
            self.actors[layer].sent += 1
            await self.actors[layer].inbox.put(Ensure(msg_token, ids, reply, ready))
            return await ready, reply
        except BaseException:
            with self._replies_lock:
                self._replies.discard(reply)
            reply.cancel()
            raise
        finally:
            with self._replies_lock:
                self._replies.discard(ready)

    async def _answer(self, reply: asyncio.Future[LayerStep]) -> LayerStep:
        try:
            return await reply
        finally:
            with self._replies_lock:
                self._replies.discard(reply)

    async def _drive_here(self, layers: Any, token: int) -> Any:
        answer: Any = None
        reply = None
        while True:
            try:
                op = layers.send(answer)
            except StopIteration as done:
                return done.value
            if op[0] == "post":
                answer = await self._post(op[1], op[2])
            elif op[0] == "ask":
                answer, reply = await self._ask(op[1], token, op[2])
            else:
                answer = await self._answer(reply)

    async def _drive_on_thread(self, layers: Any, token: int) -> Any:
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

    def _drive_sync(self, layers: Any, token: int, loop: asyncio.AbstractEventLoop, abort: threading.Event) -> Any:
        answer: Any = None
        reply = None
        outbox: list[tuple[LayerActor, Prefetch | Touch | Tidy | Ensure]] = []
        try:
            while True:
                if abort.is_set():
                    raise _Aborted
                try:
                    op = layers.send(answer)
                except StopIteration as done:
                    return done.value
                answer = None
                if op[0] == "post":
                    self._post_threadsafe(op[1], op[2], loop, outbox)
                elif op[0] == "ask":
                    answer, reply = self._ask_threadsafe(op[1], token, op[2], loop, outbox)
                elif op[0] == "fetch":
                    reply = self._fetch_threadsafe(op[1], token, op[2], loop, outbox)
                else:
                    try:
                        answer = reply.result()
                    finally:
                        with self._replies_lock:
                            self._replies.discard(reply)
        finally:
            self._flush(outbox, loop)
            layers.close()

    # Bookkeeping (Touch) waits in an outbox for a few layers: each wake-up of the loop from
    # this thread costs a context switch, and on a small machine the two threads share a core.
    # A Prefetch goes at once (its reads should start now), taking the outbox with it. An
    # Ensure does not wait for the outbox (other actors' bookkeeping would run before it).
    OUTBOX = 4

    def _post_threadsafe(self, layer: int, msg: Prefetch | Touch | Tidy | Ensure, loop: asyncio.AbstractEventLoop,
                         outbox: list[tuple[LayerActor, Prefetch | Touch | Tidy | Ensure]]) -> None:
        self._check_alive()
        actor = self.actors[layer]
        actor.sent += 1  # counted before delivery: the actor is not quiescent from now on
        if actor.sent - actor.handled > actor.inbox.maxsize:  # a full inbox pushes back on the compute thread
            self._flush(outbox, loop)
            asyncio.run_coroutine_threadsafe(actor.inbox.put(msg), loop).result()
        elif isinstance(msg, Ensure):  # at once, and ahead of other actors' bookkeeping
            if any(a is actor for a, _ in outbox):  # but after this actor's own messages
                self._flush(outbox, loop)
            loop.call_soon_threadsafe(actor.inbox.put_nowait, msg)
        else:
            outbox.append((actor, msg))  # room for certain: put_nowait cannot fail
            if isinstance(msg, Prefetch) or len(outbox) >= self.OUTBOX:
                self._flush(outbox, loop)

    def _ask_threadsafe(self, layer: int, token: int, ids: np.ndarray, loop: asyncio.AbstractEventLoop,
                        outbox: list[tuple[LayerActor, Prefetch | Touch | Tidy | Ensure]]) -> tuple[Any, Future[LayerStep]]:
        """`_ask` from the compute thread, answered through thread-safe futures: the actor's
        answers wake this thread directly, with no round trip through the loop."""
        ready: Future[tuple[np.ndarray, np.ndarray]] = Future()
        reply: Future[LayerStep] = Future()
        with self._replies_lock:
            self._replies.update((ready, reply))
        try:
            # (checks the engine is alive after registering: `dead` either saw these futures or is seen)
            self._post_threadsafe(layer, Ensure(token, ids, reply, ready), loop, outbox)
            return ready.result(), reply
        except BaseException:
            with self._replies_lock:
                self._replies.discard(reply)
            raise
        finally:
            with self._replies_lock:
                self._replies.discard(ready)

    def _fetch_threadsafe(self, layer: int, token: int, ids: np.ndarray, loop: asyncio.AbstractEventLoop,
                          outbox: list[tuple[LayerActor, Prefetch | Touch | Tidy | Ensure]]) -> Future[LayerStep]:
        """Send Ensure(evict=False) and return at once: the future of its LayerStep (only the
        compute thread's driver does this: see `SparseRunner.fetch_steps`)."""
        reply: Future[LayerStep] = Future()
        with self._replies_lock:
            self._replies.add(reply)
        try:
            self._post_threadsafe(layer, Ensure(token, ids, reply, evict=False), loop, outbox)
        except BaseException:
            with self._replies_lock:
                self._replies.discard(reply)
            raise
        return reply

    @staticmethod
    def _flush(outbox: list[tuple[LayerActor, Prefetch | Touch | Tidy | Ensure]], loop: asyncio.AbstractEventLoop) -> None:
        if outbox:
            batch = outbox.copy()
            outbox.clear()
            loop.call_soon_threadsafe(lambda: [a.inbox.put_nowait(m) for a, m in batch])


class _Aborted(Exception):
    """The step's stream was cancelled: its compute thread stops at the next layer."""
