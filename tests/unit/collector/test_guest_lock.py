"""One guest at a time per machine: a second boot waits for the first's
lock and says so."""

from __future__ import annotations

import threading
import time

import pytest

from memcgscope.collector import guest

pytestmark = pytest.mark.unit


def test_a_second_guest_waits_for_the_first(tmp_path, monkeypatch):
    monkeypatch.setattr(guest, "GUEST_LOCK", str(tmp_path / "lock" / "guest.lock"))
    order, said = [], []
    holding = threading.Event()

    def first():
        with guest.one_guest_at_a_time():
            holding.set()
            time.sleep(0.3)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    holding.wait(5)
    with guest.one_guest_at_a_time(said.append):
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"]
    assert len(said) == 1 and "another guest is running" in said[0] and "guest.lock" in said[0]
    # free again: no wait, nothing said
    with guest.one_guest_at_a_time(said.append):
        pass
    assert len(said) == 1
