"""EpisodeAssembler.feed_all (the collector's path: a poll's field tuples
from decode_fields, no Event per event) and feed (Event objects, one at a
time) give the same episodes, and the steps it builds inline have the documented form, key
order included (docs/recording-schema.md)."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest

from memcgscope.probes.assembly import EpisodeAssembler
from memcgscope.probes.episodes import EV, RawEvent, decode_bytes, decode_fields, load_recording

pytestmark = pytest.mark.unit
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import bench_collector  # noqa: E402


def _both(events, memsw, max_open=65536, seed=0):
    """The events through feed_all in polls of random sizes on one
    assembler, and one by one through feed(decode_bytes) on another: their
    episodes (JSON text, in order) and counters."""
    r = random.Random(seed)
    a, b = EpisodeAssembler(memsw=memsw, max_open=max_open), EpisodeAssembler(memsw=memsw, max_open=max_open)
    out_a, out_b = [], []
    k = 0
    while k < len(events):
        n = r.choice([1, 2, 7, 64, 500])
        out_a += [json.dumps(e.to_json()) for e in a.feed_all([decode_fields(buf) for buf in events[k:k + n]])]
        k += n
    for buf in events:
        out_b += [json.dumps(e.to_json()) for e in b.feed(decode_bytes(buf))]
    out_a += [json.dumps(e.to_json()) for e in a.flush()]
    out_b += [json.dumps(e.to_json()) for e in b.flush()]
    return (out_a, (a.orphans, a.unknown, a.steps_dropped)), (out_b, (b.orphans, b.unknown, b.steps_dropped))


@pytest.mark.parametrize("path", sorted(bench_collector.RECORDINGS.glob("*.jsonl")), ids=lambda p: p.stem)
def test_recorded_streams_assemble_alike(path):
    rec = load_recording(str(path))
    events = [raw for _, ep in rec.episodes for raw in bench_collector.to_raw_events(ep)]
    fast, slow = _both(events, rec.header["memsw"])
    assert fast == slow
    assert len(fast[0]) == sum(1 for _, ep in rec.episodes if ep["kind"] in ("charge", "limit_write"))


def _raw(r, ts, open_ts):
    t = r.choice(list(range(1, 15)) + [EV.RECLAIM, EV.OOM, EV.COUNTER_FAIL, EV.DRAIN, EV.OOM_KILL] * 4)
    tid = r.choice([1, 2, 3])
    tag = r.choice([0, 7, ts - 1] + [open_ts] * 6)
    e = RawEvent(type=t, cpu=r.randint(0, 3), pid=tid, tid=tid, ts=ts, episode=tag, cgid=r.choice([0, 5, 9]),
                 arg0=r.randint(0, 4), arg1=r.randint(0, 99), arg2=r.randint(0, 3), ret=r.choice([0, -12, 1]),
                 usage=r.randint(0, 9), max=r.randint(0, 9), memsw_usage=r.randint(0, 9),
                 memsw_max=r.randint(0, 9), duration_ns=r.randint(0, 3), caller=r.randint(0, 8),
                 flags=r.randint(0, 3))
    e.comm = r.choice([b"a", b"bash", b"x" * 15])
    e.data = r.choice([b"", b"100M", b"max"])
    return bytes(e)


@pytest.mark.parametrize("seed", range(40))
def test_random_streams_assemble_alike(seed, monkeypatch):
    """Interleaved tasks, orphans, unknown types, steps past MAX_STEPS, an
    evicting max_open: the same episodes and counters both ways."""
    r = random.Random(seed)
    monkeypatch.setattr(EpisodeAssembler, "MAX_STEPS", r.choice([3, 65536]))
    events, ts, open_ts = [], 1000, 0
    for _ in range(300):
        ts += r.randint(1, 3)
        buf = _raw(r, ts, open_ts)
        if decode_fields(buf)[0] in (EV.CHARGE_ENTER, EV.LIMIT_ENTER, EV.HIGH_ENTER):
            open_ts = ts
        events.append(buf)
    fast, slow = _both(events, memsw=bool(seed % 2), max_open=r.choice([2, 65536]), seed=seed)
    assert fast == slow
    assert any('"steps": [{' in ep for ep in fast[0])


def _event(type_, **kw):
    e = RawEvent(type=type_, cpu=1, pid=2, tid=3, ts=kw.pop("ts", 200), episode=kw.pop("episode", 100), cgid=6,
                 arg0=7, arg1=8, arg2=9, ret=10, usage=11, max=12, memsw_usage=13, memsw_max=14,
                 duration_ns=15, caller=1, flags=kw.pop("flags", 0))
    e.comm = b"task"
    e.data = kw.pop("data", b"")
    assert not kw
    return bytes(e)


@pytest.mark.parametrize("memsw", [False, True])
def test_inline_steps_have_the_documented_form(memsw):
    a = EpisodeAssembler(memsw=memsw)
    cnt = {"usage": 11, "max": 12, **({"memsw_usage": 13, "memsw_max": 14} if memsw else {})}
    a.feed_fields(decode_fields(_event(EV.CHARGE_ENTER, ts=100, episode=0)))
    for t in (EV.OOM, EV.RECLAIM, EV.COUNTER_FAIL, EV.DRAIN):
        a.feed_fields(decode_fields(_event(t)))
    a.feed_fields(decode_fields(_event(EV.OOM_KILL, flags=2, data=b"victim")))
    a.feed_fields(decode_fields(_event(EV.OOM_KILL, flags=0)))
    (ep,) = a.feed_fields(decode_fields(_event(EV.CHARGE_EXIT, ts=300, episode=100)))
    steps = [list(s.items()) for s in ep.to_json()["steps"]]
    assert steps == [
        list({"kind": "oom", "ts_ns": 200, "cgroup_id": 6, "gfp": 7, "order": 8, "result": True,
              "duration_ns": 15, "after": cnt}.items()),
        list({"kind": "reclaim", "ts_ns": 200, "cgroup_id": 6, "nr_pages": 7, "gfp": 8, "options": 9,
              "freed": 10, "caller": "charge", "duration_ns": 15, "after": cnt}.items()),
        list({"kind": "counter_fail", "ts_ns": 200, "cgroup_id": 6, "counter": "memsw", "nr_pages": 8,
              "at": cnt}.items()),
        list({"kind": "drain", "ts_ns": 200, "cgroup_id": 6}.items()),
        list({"kind": "oom_kill", "ts_ns": 200, "cgroup_id": 6, "victim_pid": 7, "victim_cgroup_id": 8,
              "victim_comm": "victim"}.items()),
        list({"kind": "oom_kill", "ts_ns": 200, "cgroup_id": 6, "victim_pid": 7}.items()),
    ]
    j = ep.to_json()
    assert (j["comm"], j["entry"], j["exit"], j["ret"], j["duration_ns"]) == ("task", cnt, cnt, 10, 15)


def test_session_polls_assemble_what_feed_assembles():
    """Session.poll: the ring buffer's records (a short one dropped, as
    before) decoded to field tuples and assembled per poll: the episodes
    feed() gives one event at a time, handed to on_episode too; in_flight
    reads the undelivered ones."""
    import threading

    from memcgscope.probes.episodes import EVENT_SIZE
    from memcgscope.probes.session import Session

    path = sorted(bench_collector.RECORDINGS.glob("*.jsonl"))[2]
    rec = load_recording(str(path))
    records = [raw for _, ep in rec.episodes for raw in bench_collector.to_raw_events(ep)]
    polls = [records[k:k + 50] for k in range(0, len(records), 50)]
    polls[1].insert(3, b"\0" * (EVENT_SIZE - 1))

    class Ring:
        def available(self):
            return 1

        def consume(self, limit=None):
            return polls.pop(0) if polls else []

    s = Session(on_episode=lambda ep: seen.append(ep))
    s._ring_lock = threading.Lock()
    s._ring = Ring()
    s.assembler = EpisodeAssembler(memsw=rec.header["memsw"])
    seen, got = [], []
    first = polls[0]
    edges = {EV.CHARGE_ENTER, EV.CHARGE_EXIT, EV.LIMIT_ENTER, EV.LIMIT_EXIT}
    want_ids = set()
    for e in map(decode_bytes, first):
        if e.type in edges or e.type == EV.OOM_KILL:
            want_ids.add(e.cgid)
        if e.type == EV.OOM_KILL and e.flags & 2:
            want_ids.add(e.arg1)
    assert s.in_flight() == want_ids and want_ids
    assert len(s._pending) == len(first)
    while polls:
        got += s.poll(0)
    ref = EpisodeAssembler(memsw=rec.header["memsw"])
    want = [e for raw in records for e in ref.feed(decode_bytes(raw))]
    assert [json.dumps(e.to_json()) for e in got] == [json.dumps(e.to_json()) for e in want]
    assert seen == got and s.events_seen == len(records) and len(want) > 20
