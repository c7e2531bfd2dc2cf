"""Session without a kernel: reads from another thread (a scrape) and
close() exclude each other, so no read runs on freed maps."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from memcgscope.probes.session import Session, SessionError

pytestmark = pytest.mark.unit


class SlowMaps:
    """A stand-in BPF object whose map reads take time and notice cleanup."""

    def __init__(self):
        self.reading = 0
        self.cleaned = False
        self.read_after_cleanup = False
        self.entered = threading.Event()

    def __getitem__(self, name):
        maps = self

        class Table:
            def items(self):
                maps.reading += 1
                maps.entered.set()
                time.sleep(0.2)
                if maps.cleaned:
                    maps.read_after_cleanup = True
                maps.reading -= 1
                return []

            def keys(self):
                return []

            def __getitem__(self, key):   # per-CPU arrays: one value per CPU
                return [0, 0]

        return Table()

    def cleanup(self):
        if self.reading:
            self.read_after_cleanup = True   # freed while a reader was inside
        self.cleaned = True


def test_close_waits_for_a_scrape_in_flight_and_later_reads_fail_cleanly():
    """Review bug: an in-flight scrape could read the BPF session while
    close() freed it."""
    s = Session()
    s.bpf = bpf = SlowMaps()
    s._btf = SimpleNamespace(enumerators=lambda name: {})
    errors = []

    def scrape():
        try:
            s.aggregates()
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=scrape)
    t.start()
    assert bpf.entered.wait(5)
    s.close()
    t.join()
    assert bpf.cleaned and not bpf.read_after_cleanup and errors == []
    with pytest.raises(SessionError, match="closed"):
        s.aggregates()
    assert s.lost() == [] and s.contexts_lost() == 0 and s.map_full() == {} and s.program_stats() == {}
