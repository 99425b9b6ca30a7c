"""shimmy_core.admission: the one admission rule every batching backend uses (the real engines
are tested for it in test_batching.py and test_safetensors_backend.py)."""

from __future__ import annotations

import threading

import pytest

from shimmy_core.admission import await_slot, check_room
from shimmy_core.contract.generation import Overloaded


def test_room_is_free_slots_plus_the_queue():
    check_room(waiting=0, busy=4, slots=4, asking=2, queue_size=2)
    check_room(waiting=0, busy=2, slots=4, asking=2, queue_size=0)
    with pytest.raises(Overloaded) as info:
        check_room(waiting=2, busy=4, slots=4, asking=1, queue_size=2)
    assert info.value.retry_after == 1.0 and not info.value.timed_out
    assert "4 requests are generating and 2 are waiting" in str(info.value)


def test_waiting_ends_when_admitted_cancelled_or_timed_out():
    admitted, gave_up = threading.Event(), []
    admitted.set()
    await_slot(admitted, lambda: False, lambda: gave_up.append("x"), timeout=5, poll=0.01)
    assert gave_up == []
    await_slot(threading.Event(), lambda: True, lambda: gave_up.append("cancelled"), timeout=5, poll=0.01)
    assert gave_up == ["cancelled"]
    with pytest.raises(Overloaded) as info:
        await_slot(threading.Event(), lambda: False, lambda: gave_up.append("timed out"), timeout=0.05, poll=0.01)
    assert info.value.timed_out and gave_up == ["cancelled", "timed out"]


def test_a_turnstile_lets_one_in_queues_the_next_and_refuses_past_the_queue():
    from shimmy_core.admission import Turnstile

    gate = Turnstile(1, queue_size=1, timeout=5, poll=0.01)
    assert gate.enter()
    entered = threading.Event()
    waiter = threading.Thread(target=lambda: gate.enter() and entered.set())
    waiter.start()
    while gate.stats()["queued"] == 0:
        pass
    with pytest.raises(Overloaded):  # one busy, one queued: the queue is full
        gate.enter()
    assert not entered.is_set()
    gate.leave()
    waiter.join(5)
    assert entered.is_set() and gate.stats() == {"busy_slots": 1, "queued": 0}
    gate.leave()


def test_a_turnstile_wait_ends_with_the_client_or_the_timeout():
    from shimmy_core.admission import Turnstile

    gate = Turnstile(1, queue_size=4, timeout=0.05, poll=0.01)
    assert gate.enter()
    assert gate.enter(cancelled=lambda: True) is False
    with pytest.raises(Overloaded) as info:
        gate.enter()
    assert info.value.timed_out
    assert gate.stats() == {"busy_slots": 1, "queued": 0}
