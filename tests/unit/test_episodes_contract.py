"""The episode contract (probes/episodes.py): one definition of the event
layout shared with the C, the visibility rules, and the recording writer
and reader."""

from __future__ import annotations

import ctypes
import io
import json
import re
from pathlib import Path

import pytest

from memcgscope.probes import episodes as E
from memcgscope.probes.assembly import EpisodeAssembler
from memcgscope.probes.program import SOURCE, source_text

pytestmark = pytest.mark.unit

RECORDINGS = Path(__file__).resolve().parent / "data" / "recordings"


def test_the_c_gets_its_layout_from_python_only():
    raw = Path(SOURCE).read_text()
    # no second definition in the C file itself
    assert not re.search(r"#define\s+(EV|CALLER|LIMIT)_[A-Z_]+\s+\d", raw)
    assert "struct event_t {" not in raw
    text = source_text()
    assert text.count("struct event_t {") == 1
    for name, value in vars(E.EV).items():
        if name.isupper():
            assert f"#define EV_{name} {value}\n" in text
    fields = re.search(r"struct event_t \{\n(.*?)\n\};", text, re.S).group(1)
    assert [line.split()[1].split("[")[0].rstrip(";") for line in fields.splitlines()] == \
        [f for f, _, _ in E.EVENT_FIELDS]


def test_layout_sizes_and_decode_round_trip():
    assert ctypes.sizeof(E.RawEvent) == E.EVENT_SIZE == 160
    raw = E.RawEvent(type=E.EV.RECLAIM, cpu=1, pid=2, tid=3, ts=4, episode=5, cgid=6, arg0=7, ret=-12,
                     comm=b"dd", data=b"16M")
    ev = E.decode(raw)
    assert (ev.type, ev.ret, E.text(ev.comm), E.text(ev.data)) == (E.EV.RECLAIM, -12, "dd", "16M")


@pytest.mark.parametrize("stem,drains,forced", [
    ("debian-6.1-v1-kprobe", False, True),    # only drain_all_stock.part.0, entered past the trylock
    ("debian-6.12-v2-fentry", False, True),   # attached, but calls straight to the .part.0 clone are missed
    ("debian-6.12-v2-kprobe", True, True),    # every clone kprobed
])
def test_visibility_rules_over_recorded_probe_lists(stem, drains, forced):
    header = json.loads((RECORDINGS / f"{stem}.jsonl").read_text().splitlines()[0])
    seen = E.visibility(header["mode"], header["probes"])
    assert (seen.charges, seen.drains, seen.forced_charges) == (True, drains, forced)
    # a header that carries the verdict is read back as written
    h = dict(header, visibility=seen.to_json())
    assert E.Visibility.from_header(h) == seen


def test_tracepoint_mode_sees_no_charges():
    probes = [{"role": "mark_victim", "target": "oom:mark_victim", "kind": "tracepoint", "attached": True,
               "reason": ""}]
    assert E.visibility("tracepoint", probes) == E.Visibility("tracepoint", False, False, False)


def header(**kw):
    base = dict(kernel="6.1.0-56-amd64", kernel_version="#1 SMP Debian 6.1.192-2 (2026-11-16)", mode="kprobe",
                cgroup={"v1_memory": "/m", "v2_mount": None, "v2_memory": False, "swap_accounting": True},
                memsw=True, probes=[], profile="6.1", profile_reason="6.1.192 (from uname -v)", upstream="6.1.192")
    base.update(kw)
    return E.make_header(**base)


def test_writer_and_reader_round_trip():
    buf = io.StringIO()
    w = E.RecordingWriter(buf, header())
    eps = [{"type": "episode", "kind": "charge", "cgroup_id": i, "steps": [], "ret": 0} for i in range(3)]
    for ep in eps:
        w.episode(ep)
    trailer = w.finish([0, 4], orphans=2, events=9, ended_unix=1.0)
    with pytest.raises(ValueError):
        w.finish([0])
    rec = E.read_recording(buf.getvalue(), "x.jsonl")
    assert [e for _, e in rec.episodes] == eps and [n for n, _ in rec.episodes] == [2, 3, 4]
    assert rec.lost == {1: 4} and rec.trailer == trailer and trailer["episodes"] == 3
    assert rec.header["profile"] == "6.1" and rec.header["kernel_version"].endswith("(2026-11-16)")
    assert (rec.cgroup, rec.memsw, rec.warnings) == ("v1", True, [])


@pytest.mark.parametrize("lines,message", [
    ([], "empty, no header line"),
    (['{"type": "episode", "kind": "charge"}'], "x.jsonl:1: the first line must be the header"),
    (['{"type": "header", "schema": "other/9"}'], "x.jsonl:1: schema 'other/9'"),
    (["HEADER", "HEADER"], "x.jsonl:2: a second header"),
    (["HEADER", '{"type": "gossip"}'], "x.jsonl:2: unknown line type 'gossip'"),
    (["HEADER", '{"type": "episode"}'], "x.jsonl:2: episode without a 'kind'"),
    (["HEADER", "[1]"], "x.jsonl:2: a JSON list, not an object"),
    (["HEADER", '{"type": "episode",', "TRAILER"], "x.jsonl:2: not JSON"),
])
def test_reader_errors_name_the_line(lines, message):
    h = json.dumps(header())
    text = "".join(x.replace("HEADER", h).replace("TRAILER", '{"type": "trailer"}') + "\n" for x in lines)
    with pytest.raises(E.RecordingError) as e:
        E.read_recording(text, "x.jsonl")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_cut_recording_is_read_with_warnings():
    h = json.dumps(header())
    rec = E.read_recording(h + '\n{"type": "episode", "kind": "charge", "cgroup_id": 1}\n{"type": "epi', "x.jsonl")
    assert len(rec.episodes) == 1
    assert any("x.jsonl:3: last line is truncated" in w for w in rec.warnings)
    assert any("no trailer line" in w for w in rec.warnings)


def test_load_recording_errors(tmp_path):
    for path, message in ((tmp_path / "nope", "no such file"), (tmp_path, "is a directory")):
        with pytest.raises(E.RecordingError, match=message):
            E.load_recording(str(path))
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    with pytest.raises(E.RecordingError, match="not UTF-8"):
        E.load_recording(str(tmp_path / "bin"))


def test_committed_recordings_read_and_assemble():
    for path in sorted(RECORDINGS.glob("*.jsonl")):
        rec = E.load_recording(str(path))
        assert rec.episodes and rec.trailer is not None and rec.warnings == [], path.name
    assert EpisodeAssembler(memsw=False).flush() == []
