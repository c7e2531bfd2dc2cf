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


# --- cgroup names (schema /2) ----------------------------------------------------

NAMES = {"relative_to": "/sys/fs/cgroup", "source": "cgroupfs"}
PATHS = {10: "/a.slice", 11: "/a.slice/b.service", 12: "/a.slice/c.service", 0: "/"}


def fake_names(asked=None):
    """Machine A's resolver: PATHS, anything else already removed."""
    def names(cgid):
        if asked is not None:
            asked.append(cgid)
        path = PATHS.get(cgid)
        return path, ({"unit": path.rsplit("/", 1)[1]} if path and path.endswith(".service") else {})
    return names


def kill_episodes():
    """A charge of b whose OOM (at a) kills a task of c, then b's reclaim
    of a cgroup 99 that is gone, and b again."""
    return [
        {"type": "episode", "kind": "charge", "cgroup_id": 11, "steps": [
            {"kind": "counter_fail", "cgroup_id": 10},
            {"kind": "oom", "cgroup_id": 10},
            {"kind": "oom_kill", "cgroup_id": 10, "victim_pid": 5, "victim_cgroup_id": 12}], "ret": 0},
        {"type": "episode", "kind": "oom_kill", "cgroup_id": 10, "victim_pid": 6, "victim_cgroup_id": 12,
         "steps": [], "ret": 0},
        {"type": "episode", "kind": "charge", "cgroup_id": 11, "steps": [
            {"kind": "reclaim", "cgroup_id": 99}, {"kind": "drain", "cgroup_id": None}], "ret": 0},
        {"type": "episode", "kind": "charge", "cgroup_id": 0, "steps": [], "ret": 0},
    ]


def written(episodes, names=None):
    buf = io.StringIO()
    w = E.RecordingWriter(buf, header(cgroup_names=NAMES), names or fake_names())
    for ep in episodes:
        w.episode(ep)
    w.finish([0])
    return buf.getvalue()


def unnamed_mentions(text):
    """Independent of the writer's list of id fields: every value of a key
    named ``cgroup_id`` or ``*_cgroup_id``, anywhere in a line, must have
    had its cgroup line earlier.  → [(line, id)] that did not."""
    named, missing = set(), []

    def walk(obj, no):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if (k == "cgroup_id" or k.endswith("_cgroup_id")) and isinstance(v, int) and v not in named:
                    missing.append((no, v))
                walk(v, no)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, no)

    for no, line in enumerate(text.splitlines(), 1):
        obj = json.loads(line)
        if obj["type"] == "cgroup":
            named.add(obj["id"])
        else:
            walk(obj, no)
    return missing


def test_every_id_is_named_once_before_its_first_mention():
    asked = []
    text = written(kill_episodes(), fake_names(asked))
    assert unnamed_mentions(text) == []
    lines = [json.loads(x) for x in text.splitlines()]
    cg = [x for x in lines if x["type"] == "cgroup"]
    assert [x["id"] for x in cg] == [11, 10, 12, 99, 0] == asked       # once each, first mention first
    assert cg[0] == {"type": "cgroup", "id": 11, "path": "/a.slice/b.service", "identity": {"unit": "b.service"}}
    assert cg[3] == {"type": "cgroup", "id": 99, "path": None, "identity": {}}   # tried: already removed
    assert [x["type"] for x in lines[:5]] == ["header", "cgroup", "cgroup", "cgroup", "episode"]
    assert lines[-1]["cgroups"] == 5 and lines[-1]["cgroups_unresolved"] == 1
    rec = E.read_recording(text, "x.jsonl")
    assert rec.named and rec.warnings == [] and rec.unnamed_mentions == 0
    assert {i: c["path"] for i, c in rec.cgroups.items()} == {**{i: PATHS[i] for i in (0, 10, 11, 12)}, 99: None}


def test_the_check_catches_a_writer_that_forgets_victims_or_steps(monkeypatch):
    """unnamed_mentions above is what fails if the writer forgets an id field."""
    monkeypatch.setattr(E, "CGROUP_ID_FIELDS", ("cgroup_id",))        # forgets victim_cgroup_id
    text = written(kill_episodes())
    assert unnamed_mentions(text) == [(4, 12), (5, 12)]      # the step's victim, the episode's victim
    monkeypatch.undo()
    rec = E.read_recording(text, "x.jsonl")
    assert rec.unnamed_mentions == 2
    assert "x.jsonl:4: cgroup id 12 is mentioned before its cgroup line" in rec.warnings[0]

    monkeypatch.setattr(E, "cgroup_ids", lambda ep: [ep["cgroup_id"]])   # forgets the steps
    text = written(kill_episodes())
    assert unnamed_mentions(text) == [(3, 10), (3, 10), (3, 10), (3, 12), (5, 12), (6, 99)]
    monkeypatch.undo()
    assert E.read_recording(text, "x.jsonl").unnamed_mentions == 4     # each id once per episode


def test_writer_names_an_id_once_even_when_asked_again():
    asked = []
    buf = io.StringIO()
    w = E.RecordingWriter(buf, header(cgroup_names=NAMES), fake_names(asked))
    ep = {"type": "episode", "kind": "oom_kill", "cgroup_id": 10, "victim_pid": 1, "victim_cgroup_id": 10,
          "steps": [{"kind": "oom_kill", "cgroup_id": 10, "victim_cgroup_id": 10}]}
    for _ in range(3):
        w.episode(ep)
        w.name(10)
    w.name(99)
    w.name(99)
    assert asked == [10, 99]
    assert buf.getvalue().count('"type":"cgroup"') == 2


def test_writer_refuses_names_that_do_not_fit():
    with pytest.raises(ValueError, match="give names together with a header that has cgroup_names"):
        E.RecordingWriter(io.StringIO(), header(cgroup_names=NAMES))
    with pytest.raises(ValueError, match="give names together"):
        E.RecordingWriter(io.StringIO(), header(), fake_names())
    with pytest.raises(ValueError, match="cgroup_names must be"):
        header(cgroup_names={"source": "x"})
    w = E.RecordingWriter(io.StringIO(), header(cgroup_names=NAMES), lambda cgid: ("a.slice", {}))
    with pytest.raises(ValueError, match="path 'a.slice' must start with '/'"):
        w.episode({"type": "episode", "kind": "charge", "cgroup_id": 3, "steps": []})


def test_a_writer_without_names_writes_ids_only():
    buf = io.StringIO()
    w = E.RecordingWriter(buf, header())
    for ep in kill_episodes():
        w.episode(ep)
    w.finish([0])
    rec = E.read_recording(buf.getvalue(), "x.jsonl")
    assert rec.header["schema"] == E.SCHEMA and rec.header["cgroup_names"] is None
    assert not rec.named and rec.cgroups == {} and rec.warnings == []
    assert "cgroups" not in rec.trailer


def test_cgroup_ids_of_an_episode():
    assert [E.cgroup_ids(ep) for ep in kill_episodes()] == [[11, 10, 12], [10, 12], [11, 99], [0]]
    assert E.cgroup_ids({"cgroup_id": True, "steps": [None, {"cgroup_id": "7"}]}) == []


@pytest.mark.parametrize("line,message", [
    ('{"type": "cgroup", "id": "10", "path": "/a", "identity": {}}', "with id '10': the id must be a non-negative"),
    ('{"type": "cgroup", "id": -1, "path": "/a", "identity": {}}', "with id -1"),
    ('{"type": "cgroup", "id": true, "path": "/a", "identity": {}}', "with id True"),
    ('{"type": "cgroup", "id": 10, "identity": {}}', "for id 10 without 'path'"),
    ('{"type": "cgroup", "id": 10, "path": "a.slice", "identity": {}}', "path 'a.slice' must start with '/'"),
    ('{"type": "cgroup", "id": 10, "path": "/a"}', "'identity' must be an object of strings"),
    ('{"type": "cgroup", "id": 10, "path": "/a", "identity": ["x"]}', "'identity' must be an object of strings"),
    ('{"type": "cgroup", "id": 10, "path": "/a", "identity": {"pod": 3}}', "'identity' must be an object"),
    ('{"type": "cgroup", "id": 10, "path": null, "identity": {"unit": "x"}}', "an identity without a path"),
])
def test_a_malformed_cgroup_line_is_an_error(line, message):
    text = json.dumps(header(cgroup_names=NAMES)) + "\n" + line + "\n"
    with pytest.raises(E.RecordingError) as e:
        E.read_recording(text, "x.jsonl")
    assert str(e.value).startswith("x.jsonl:2: cgroup line ") and message in str(e.value)
    assert "fix or drop the line" in str(e.value) and "\n" not in str(e.value)


def test_cgroup_lines_where_the_header_has_none_and_repeated_lines_are_errors():
    line = '{"type": "cgroup", "id": 10, "path": "/a", "identity": {}}'
    v1 = dict(header(), schema="memcgscope.episodes/1")
    del v1["cgroup_names"]
    for h, message in ((v1, "x.jsonl:2: a cgroup line, but a memcgscope.episodes/1 recording has none"),
                       (header(), "x.jsonl:2: a cgroup line, but the header's cgroup_names is null"),
                       (header(cgroup_names=NAMES), "x.jsonl:3: a second cgroup line for id 10 (the first is line 2)")):
        text = json.dumps(h) + "\n" + line + "\n" + line + "\n"
        with pytest.raises(E.RecordingError, match=re.escape(message)):
            E.read_recording(text, "x.jsonl")


def test_an_id_mentioned_before_its_line_is_a_counted_warning():
    lines = written(kill_episodes()).splitlines()
    # move b's line (id 11) below the first episode; drop c's (12) altogether
    b = lines.pop(1)
    lines = [x for x in lines if '"id":12,' not in x]
    first = next(i for i, x in enumerate(lines) if '"type":"episode"' in x)
    lines.insert(first + 1, b)
    rec = E.read_recording("\n".join(lines) + "\n", "x.jsonl")
    assert rec.unnamed_mentions == 3          # 11 and 12 in the first episode, 12 in the second
    (w,) = rec.warnings
    assert w.startswith(f"x.jsonl:{first + 1}: cgroup id 11 is mentioned before its cgroup line "
                        "(3 such mentions of 2 ids)")
    assert rec.cgroups[11]["path"] == "/a.slice/b.service" and 12 not in rec.cgroups


def test_an_unknown_schema_is_one_line_naming_the_file_the_line_and_the_fix():
    h = dict(header(), schema="memcgscope.episodes/3")
    with pytest.raises(E.RecordingError) as e:
        E.read_recording(json.dumps(h) + "\n", "x.jsonl")
    msg = str(e.value)
    assert msg.startswith("x.jsonl:1: schema 'memcgscope.episodes/3' is not one this memcgscope reads "
                          "(memcgscope.episodes/1, memcgscope.episodes/2)")
    assert "record it again" in msg and "\n" not in msg


def test_schema_versions_are_declared_in_one_place():
    assert E.SCHEMA == E.SCHEMAS_READ[-1] == "memcgscope.episodes/2"
    assert set(E.SCHEMAS_UNNAMED) < set(E.SCHEMAS_READ)
    for path in sorted(RECORDINGS.glob("*.jsonl")):      # the committed recordings are /1: ids only
        rec = E.load_recording(str(path))
        assert rec.header["schema"] in E.SCHEMAS_UNNAMED and not rec.named and rec.cgroups == {}
