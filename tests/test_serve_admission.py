"""The server's admission queue: a bounded FIFO in front of the engine, cancel-safe."""

from __future__ import annotations

import asyncio

import pytest

from flashlm.serve.admission import Admission, AdmissionClosedError, QueueFullError


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_slots_go_to_waiters_in_order_and_a_full_queue_refuses():
    adm = Admission(max_active=1, max_queued=2)
    first = await adm.acquire()
    second, third = asyncio.ensure_future(adm.acquire()), asyncio.ensure_future(adm.acquire())
    await settle()
    assert (adm.active, adm.queued) == (1, 2)
    with pytest.raises(QueueFullError, match="1 requests are running and 2 waiting"):
        await adm.acquire()
    first.release()
    first.release()  # idempotent: it does not hand out a second slot
    await settle()
    assert second.done() and not third.done() and (adm.active, adm.queued) == (1, 1)
    (await second).release()
    await settle()
    (await third).release()
    assert (adm.active, adm.queued) == (0, 0)


async def test_a_waiter_that_leaves_gives_its_place_on():
    adm = Admission(max_active=1, max_queued=2)
    held = await adm.acquire()
    leaving, staying = asyncio.ensure_future(adm.acquire()), asyncio.ensure_future(adm.acquire())
    await settle()
    leaving.cancel()
    await settle()
    assert adm.queued == 1
    # handed the slot and cancelled in the same turn of the loop: the slot moves on, not lost
    held.release()
    staying.cancel()
    await settle()
    assert staying.cancelled() and (adm.active, adm.queued) == (0, 0)
    (await adm.acquire()).release()


async def test_close_turns_waiters_and_newcomers_away():
    adm = Admission(max_active=1, max_queued=1)
    held = await adm.acquire()
    waiting = asyncio.ensure_future(adm.acquire())
    await settle()
    adm.close()
    with pytest.raises(AdmissionClosedError):
        await waiting
    with pytest.raises(AdmissionClosedError):
        await adm.acquire()
    held.release()
    assert adm.active == 0
