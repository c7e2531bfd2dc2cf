"""The episode and recording contract: the one module that defines it.

* the **schema version** of recordings (``SCHEMA``) and the ones this
  memcgscope reads;
* the **event layout** shared with the BPF C: event types, reclaim callers,
  limit kinds and ``struct event_t`` are defined here once and generated
  into the C (``c_definitions()``, inserted by probes/program.py where
  memcgscope.bpf.c says ``@EVENT_LAYOUT@``), so the two cannot drift;
* the **episode** JSON form (``Episode.to_json``);
* **what each mode and probe can see** (``Visibility``): the checks read it,
  never the probe list;
* the **recording writer and reader** (header, cgroup lines naming the
  ids, episodes, lost lines, trailer).

`record`, `replay`, `run`, `validate` and the test data's make.py use it.
The format is documented in docs/recording-schema.md.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from typing import IO, Callable, Iterable

__all__ = ["SCHEMA", "SCHEMAS_READ", "SCHEMAS_UNNAMED", "CGROUP_ID_FIELDS", "EV", "CALLERS", "LIMIT_KINDS",
           "EVENT_FIELDS", "EVENT_SIZE",
           "Event", "RawEvent", "decode", "decode_bytes", "decode_fields", "c_definitions", "Episode", "Visibility",
           "visibility", "cgroup_ids", "make_header", "RecordingWriter", "Recording", "RecordingError",
           "read_recording", "load_recording"]

#: schemas this reader accepts, oldest first; the last is the one written.
#: /2 added the cgroup lines (id -> path and identity at recording time)
SCHEMAS_READ = ("memcgscope.episodes/1", "memcgscope.episodes/2")
SCHEMA = SCHEMAS_READ[-1]
#: readable schemas that have no cgroup lines (ids only)
SCHEMAS_UNNAMED = ("memcgscope.episodes/1",)


class EV:
    """Event types (``EV_<NAME>`` in the C)."""
    CHARGE_ENTER = 1
    CHARGE_EXIT = 2
    RECLAIM = 3
    DRAIN = 4
    OOM = 5
    OOM_KILL = 6
    COUNTER_FAIL = 7
    LIMIT_ENTER = 8
    LIMIT_EXIT = 9
    PAGE_CHARGE_FAIL = 10
    TP_RECLAIM = 11
    HIGH_ENTER = 12
    HIGH_EXIT = 13
    #: the episode's last step (an OOM step) happened ``arg0`` more times,
    #: identically, taking ``duration_ns`` in all: the run-length encoded
    #: OOM retry loop (probes/memcgscope.bpf.c on_oom_exit)
    REPEAT = 14


#: reclaim callers (``CALLER_<NAME>`` in the C): code -> the label value
CALLERS = {0: "other", 1: "charge", 2: "v1_limit", 3: "v2_max", 4: "v2_high", 5: "unknown", 6: "high"}
#: limit writes (``LIMIT_<NAME>`` in the C): code -> (C name, control file)
_LIMITS = {1: ("RESIZE_MAX", "memory.limit_in_bytes"), 2: ("MEMORY_MAX", "memory.max"),
           3: ("MEMORY_HIGH", "memory.high")}
LIMIT_KINDS = {code: file for code, (_, file) in _LIMITS.items()}

#: struct event_t, in order: (field, C type, array length or None)
EVENT_FIELDS = (
    ("type", "u32", None), ("cpu", "u32", None), ("pid", "u32", None), ("tid", "u32", None),
    ("ts", "u64", None),
    ("episode", "u64", None),   # start time of the episode the event belongs to (0: none)
    ("cgid", "u64", None),      # cgroup id of the memcg the event is about
    ("arg0", "u64", None), ("arg1", "u64", None), ("arg2", "u64", None),
    ("ret", "s64", None),
    ("usage", "u64", None), ("max", "u64", None), ("memsw_usage", "u64", None),
    ("memsw_max", "u64", None),
    ("duration_ns", "u64", None),
    ("caller", "u32", None), ("flags", "u32", None),
    ("comm", "char", 16), ("data", "char", 24),
)
_STRUCT_CODE = {"u32": "I", "u64": "Q", "s64": "q"}
_CTYPES = {"u32": ctypes.c_uint32, "u64": ctypes.c_uint64, "s64": ctypes.c_int64}

# one precompiled unpack: ctypes field access costs ~10x more per event, and
# the collector decodes every event it receives
_EVENT = struct.Struct("<" + "".join(f"{n}s" if t == "char" else _STRUCT_CODE[t]
                                     for _, t, n in EVENT_FIELDS))
EVENT_SIZE = _EVENT.size


class RawEvent(ctypes.Structure):
    """struct event_t as ctypes (tests and benchmarks build events with it)."""
    _fields_ = [(name, ctypes.c_char * n if t == "char" else _CTYPES[t]) for name, t, n in EVENT_FIELDS]


assert ctypes.sizeof(RawEvent) == EVENT_SIZE, "struct event_t must have no padding"


def c_definitions() -> str:
    """The C side of the layout: #defines and struct event_t."""
    lines = ["// generated from probes/episodes.py (the episode contract); do not edit here"]
    lines += [f"#define EV_{name} {value}" for name, value in vars(EV).items() if name.isupper()]
    lines += [f"#define CALLER_{label.upper()} {code}" for code, label in CALLERS.items()]
    lines += [f"#define LIMIT_{cname} {code}" for code, (cname, _) in _LIMITS.items()]
    lines.append("struct event_t {")
    for name, t, n in EVENT_FIELDS:
        lines.append(f"    {t} {name}{f'[{n}]' if n else ''};")
    lines.append("};")
    return "\n".join(lines) + "\n"


@dataclass(slots=True)
class Event:
    type: int
    cpu: int
    pid: int
    tid: int
    ts: int
    episode: int
    cgid: int
    arg0: int = 0
    arg1: int = 0
    arg2: int = 0
    ret: int = 0
    usage: int = 0
    max: int = 0
    memsw_usage: int = 0
    memsw_max: int = 0
    duration_ns: int = 0
    caller: int = 0
    flags: int = 0
    comm: bytes | str = b""  # NUL-padded as sent; text() when needed
    data: bytes | str = b""


assert tuple(Event.__dataclass_fields__) == tuple(f for f, _, _ in EVENT_FIELDS)


#: decode_fields(buf) -> the event's fields as a tuple, in EVENT_FIELDS
#: order: what EpisodeAssembler.feed_fields and feed_all take. The collector's path:
#: building an Event costs more than the unpack itself
decode_fields = _EVENT.unpack_from


def decode_bytes(buf: bytes) -> Event:
    """An event from the bytes the ring buffer handed over. `comm` and
    `data` stay bytes: only an episode's first event needs them as text."""
    return Event(*_EVENT.unpack_from(buf))


def decode(raw: RawEvent) -> Event:
    return decode_bytes(bytes(raw))


def text(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    return raw.split(b"\0", 1)[0].decode(errors="replace")


@dataclass(slots=True)
class Episode:
    kind: str  # charge | limit_write | page_charge_fail | oom_kill | reclaim | over_high
    ts_ns: int
    pid: int
    tid: int
    comm: str
    cpu: int
    cgroup_id: int
    args: dict
    entry: dict | None = None
    steps: list = field(default_factory=list)
    ret: int | None = None
    exit: dict | None = None
    duration_ns: int | None = None
    complete: bool = True

    def to_json(self) -> dict:
        d = {"type": "episode", "kind": self.kind, "ts_ns": self.ts_ns, "pid": self.pid,
             "tid": self.tid, "comm": self.comm, "cpu": self.cpu, "cgroup_id": self.cgroup_id}
        d.update(self.args)
        if self.entry is not None:
            d["entry"] = self.entry
        d["steps"] = self.steps
        d["ret"] = self.ret
        if self.exit is not None:
            d["exit"] = self.exit
        d["duration_ns"] = self.duration_ns
        if not self.complete:
            d["complete"] = False
        return d


# --- what the probes can see -----------------------------------------------

@dataclass(frozen=True)
class Visibility:
    """What a session's probes (or a recording's) can see; the cross-check
    is told this, so it only holds the kernel to what was observable.

    ``charges``: the charge core is probed (fentry/kprobe), so charge
    episodes exist.  ``drains``: every ``drain_all_stock`` call is seen — the
    function itself is probed, not only a ``.part`` clone entered past its
    mutex trylock (Debian 6.1), and without a caveat (6.12 fentry: callers
    that jump straight to ``drain_all_stock.part.0`` are not seen).
    ``forced_charges``: a charge forced right after its counter failures is
    an episode; that needs the charge core and ``page_counter_try_charge``.
    """
    mode: str | None = None
    charges: bool = False
    drains: bool = False
    forced_charges: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_header(cls, header: dict) -> "Visibility":
        v = header.get("visibility")
        if isinstance(v, dict):
            return cls(**{k: v[k] for k in ("mode", "charges", "drains", "forced_charges") if k in v})
        # recordings from before the header carried it: the same rules over
        # the probe list; forced charges were episodes only if it said so
        seen = visibility(header.get("mode"), header.get("probes") or ())
        return cls(seen.mode, seen.charges, seen.drains, bool(header.get("forced_charges")))


def _get(p, key):
    return p.get(key) if isinstance(p, dict) else getattr(p, key, None)


def visibility(mode: str | None, probes: Iterable) -> Visibility:
    """The rules, over ProbeStatus objects or their JSON form."""
    probes = list(probes)
    attached = {_get(p, "role") for p in probes if _get(p, "attached")}
    drains = any(_get(p, "role") == "drain_all_stock" and _get(p, "attached")
                 and "." not in str(_get(p, "target") or "") and not _get(p, "reason")
                 for p in probes)
    return Visibility(mode, "charge_core" in attached, drains,
                      {"charge_core", "page_counter_try_charge"} <= attached)


# --- recordings ----------------------------------------------------------------

#: the fields of an episode, and of each of its steps, that hold a cgroup id
#: (a /2 recording names each before the line that first mentions it)
CGROUP_ID_FIELDS = ("cgroup_id", "victim_cgroup_id")


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def cgroup_ids(ep: dict) -> list[int]:
    """Every cgroup id an episode (its JSON form) mentions, once each, in
    order: the episode's memcg, an OOM kill's victim, then each step's."""
    out: list[int] = []
    for obj in (ep, *(ep.get("steps") or ())):
        if isinstance(obj, dict):
            for f in CGROUP_ID_FIELDS:
                v = obj.get(f)
                if _is_id(v) and v not in out:
                    out.append(v)
    return out


def make_header(*, kernel: str, kernel_version: str | None, mode: str | None, cgroup: dict,
                memsw: bool, probes: Iterable, profile: str | None = None,
                profile_reason: str | None = None, upstream: str | None = None,
                memcgscope: str = "", machine: str = "", hostname: str = "",
                started_unix: float = 0.0, cgroup_names: dict | None = None, **extra) -> dict:
    """The header line.  ``kernel`` is uname -r, ``kernel_version`` uname -v;
    ``profile`` is what run/record resolved, so replay uses the same.
    ``cgroup_names``: ``{"relative_to": mount, "source": ...}`` when the
    recording names its cgroups (cgroup lines, schema /2), None when it
    holds ids only."""
    probes = [p if isinstance(p, dict) else {"role": p.role, "target": p.target, "kind": p.kind,
                                             "attached": p.attached, "reason": p.reason}
              for p in probes]
    if cgroup_names is not None and not (isinstance(cgroup_names, dict)
                                         and isinstance(cgroup_names.get("relative_to"), str)):
        raise ValueError("cgroup_names must be {'relative_to': <mount point>, ...} or None")
    seen = visibility(mode, probes)
    h = {"type": "header", "schema": SCHEMA, "memcgscope": memcgscope, "kernel": kernel,
         "kernel_version": kernel_version, "upstream": upstream, "profile": profile,
         "profile_reason": profile_reason, "machine": machine, "hostname": hostname, "mode": mode,
         "cgroup": cgroup, "memsw": bool(memsw), "page_size": os.sysconf("SC_PAGE_SIZE"),
         "forced_charges": seen.forced_charges, "visibility": seen.to_json(),
         "cgroup_names": cgroup_names, "started_unix": started_unix, "probes": probes}
    h.update(extra)
    return h


#: what a RecordingWriter asks for a cgroup id: (path relative to the
#: hierarchy's mount, or None when it could not be resolved; identity labels)
Names = Callable[[int], "tuple[str | None, dict]"]


class RecordingWriter:
    """Writes a recording: the header at once, episodes as they come,
    ``finish()`` writes the lost lines and the trailer.  Every line is
    flushed at ``flush()`` (the caller's rhythm: once per poll).

    ``names``: when the header has ``cgroup_names``, the callable that
    names a cgroup id; each id an episode mentions gets its cgroup line
    (once) just before the first line that mentions it, so the name is
    the one at recording time and a streaming reader has it in time."""

    def __init__(self, out: IO[str], header: dict, names: Names | None = None):
        if header.get("type") != "header" or header.get("schema") != SCHEMA:
            raise ValueError("RecordingWriter needs a header from make_header()")
        if bool(header.get("cgroup_names")) != (names is not None):
            raise ValueError("RecordingWriter: give names together with a header that has cgroup_names "
                             "(make_header(cgroup_names=...)), or neither")
        self.out = out
        self.names = names
        self.episodes = 0
        self.cgroups = 0          # cgroup lines written
        self.unresolved = 0       # of which with path null
        self.finished = False
        self._named: set[int] = set()
        self._line(header)
        out.flush()

    def _line(self, obj: dict) -> None:
        self.out.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def name(self, cgid: int) -> None:
        """Writes the cgroup line of ``cgid`` unless it was written already
        (or the recording names no cgroups).  Callers use it for ids they
        write outside episodes (a trailer's), before writing them."""
        if self.names is None or cgid in self._named:
            return
        if not _is_id(cgid) or cgid < 0:
            raise ValueError(f"cgroup id {cgid!r}: must be a non-negative integer")
        path, identity = self.names(cgid)
        identity = {k: v for k, v in (identity or {}).items() if v}
        if path is not None and not (isinstance(path, str) and path.startswith("/")):
            raise ValueError(f"cgroup id {cgid}: path {path!r} must start with '/' (relative to the mount) or be None")
        if path is None:
            identity = {}
            self.unresolved += 1
        self._named.add(cgid)
        self._line({"type": "cgroup", "id": cgid, "path": path, "identity": identity})
        self.cgroups += 1

    def episode(self, ep: Episode | dict) -> None:
        d = ep.to_json() if isinstance(ep, Episode) else ep
        if self.names is not None:
            for cgid in cgroup_ids(d):
                self.name(cgid)
        self._line(d)
        self.episodes += 1

    def flush(self) -> None:
        self.out.flush()

    def finish(self, lost: list[int], *, orphans: int = 0, events: int = 0, ended_unix: float = 0.0,
               **extra) -> dict:
        """Lost lines (CPUs that dropped events) and the trailer; once."""
        if self.finished:
            raise ValueError("recording already finished")
        self.finished = True
        for cpu, n in enumerate(lost):
            if n:
                self._line({"type": "lost", "cpu": cpu, "events": n})
        trailer = {"type": "trailer", "episodes": self.episodes, "lost_events": sum(lost),
                   "orphan_events": orphans, "events": events, "ended_unix": ended_unix}
        if self.names is not None:
            trailer.update(cgroups=self.cgroups, cgroups_unresolved=self.unresolved)
        trailer.update(extra)
        self._line(trailer)
        self.out.flush()
        return trailer


class RecordingError(ValueError):
    """One line: what is wrong, where (file:line), and what to do."""


@dataclass
class Recording:
    name: str
    header: dict
    episodes: list = field(default_factory=list)   # [(line number, episode dict)]
    lost: dict = field(default_factory=dict)       # cpu -> events
    trailer: dict | None = None
    warnings: list = field(default_factory=list)
    #: cgroup id -> {"path": str | None, "identity": dict, "line": n} (schema /2)
    cgroups: dict = field(default_factory=dict)
    #: mentions of an id in an episode before its cgroup line (each id once per episode)
    unnamed_mentions: int = 0

    @property
    def named(self) -> bool:
        """Whether the recording names its cgroups (cgroup lines)."""
        return self.header.get("schema") not in SCHEMAS_UNNAMED and bool(self.header.get("cgroup_names"))

    @property
    def visibility(self) -> Visibility:
        return Visibility.from_header(self.header)

    @property
    def cgroup(self) -> str:
        """"v1" or "v2": the memory controller's hierarchy."""
        cg = self.header.get("cgroup") or {}
        if cg.get("v1_memory"):
            return "v1"
        if cg.get("v2_memory"):
            return "v2"
        raise RecordingError(f"{self.name}:1: the header's 'cgroup' names no memory controller "
                             "(v1_memory, v2_memory); is the header intact?")

    @property
    def memsw(self) -> bool:
        return bool(self.header.get("memsw")) and self.cgroup == "v1"


def _cgroup_line_error(obj: dict) -> str | None:
    """What is wrong with a cgroup line, or None."""
    cgid, path, identity = obj.get("id"), obj.get("path", ...), obj.get("identity", ...)
    if not _is_id(cgid) or cgid < 0:
        return f"cgroup line with id {cgid!r}: the id must be a non-negative integer"
    if path is ...:
        return f"cgroup line for id {cgid} without 'path' (null when it could not be resolved)"
    if path is not None and not (isinstance(path, str) and path.startswith("/")):
        return f"cgroup line for id {cgid}: path {path!r} must start with '/' or be null"
    if not isinstance(identity, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in identity.items()):
        return f"cgroup line for id {cgid}: 'identity' must be an object of strings"
    if path is None and identity:
        return f"cgroup line for id {cgid}: an identity without a path"
    return None


def read_recording(text: str, name: str = "<recording>") -> Recording:
    """Parses a recording; raises RecordingError.  A truncated last line
    (a recording cut short) is a warning, not an error.  A malformed or
    repeated cgroup line is an error; an id mentioned before its cgroup
    line is a counted warning (that id is shown as an id until named)."""
    lines = text.split("\n")
    ends_with_newline = text.endswith("\n")
    if ends_with_newline:
        lines.pop()
    rec = None
    named = False
    first_unnamed = None   # (line, id)
    unnamed_ids: set = set()
    last = len(lines)
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if no == last and not ends_with_newline and rec is not None:
                rec.warnings.append(f"{name}:{no}: last line is truncated (not JSON: {e.msg}); "
                                    f"it was skipped, the rest was read")
                continue
            raise RecordingError(f"{name}:{no}: not JSON ({e.msg} at column {e.colno}); "
                                 f"fix or drop the line") from None
        if not isinstance(obj, dict):
            raise RecordingError(f"{name}:{no}: a JSON {type(obj).__name__}, not an object; fix or drop the line")
        kind = obj.get("type")
        if rec is None:
            if kind != "header":
                raise RecordingError(f"{name}:{no}: the first line must be the header "
                                     f"({{\"type\": \"header\", \"schema\": \"{SCHEMA}\", ...}}), "
                                     f"not type {kind!r}; is this a recording from 'memcgscope record'?")
            if obj.get("schema") not in SCHEMAS_READ:
                raise RecordingError(f"{name}:{no}: schema {obj.get('schema')!r} is not one this memcgscope "
                                     f"reads ({', '.join(SCHEMAS_READ)}); replay it with the memcgscope that "
                                     f"recorded it (or a newer one), or record it again")
            rec = Recording(name, obj)
            named = rec.named
            continue
        if kind == "episode":
            if not isinstance(obj.get("kind"), str):
                raise RecordingError(f"{name}:{no}: episode without a 'kind'; fix or drop the line")
            rec.episodes.append((no, obj))
            if named:
                for cgid in cgroup_ids(obj):
                    if cgid not in rec.cgroups:
                        rec.unnamed_mentions += 1
                        unnamed_ids.add(cgid)
                        if first_unnamed is None:
                            first_unnamed = (no, cgid)
        elif kind == "cgroup":
            if not named:
                why = (f"a {rec.header.get('schema')} recording has none"
                       if rec.header.get("schema") in SCHEMAS_UNNAMED else "the header's cgroup_names is null")
                raise RecordingError(f"{name}:{no}: a cgroup line, but {why}; drop the line, "
                                     f"or record again for names")
            problem = _cgroup_line_error(obj)
            if problem:
                raise RecordingError(f"{name}:{no}: {problem}; fix or drop the line")
            seen = rec.cgroups.get(obj["id"])
            if seen is not None:
                raise RecordingError(f"{name}:{no}: a second cgroup line for id {obj['id']} (the first is "
                                     f"line {seen['line']}); drop one")
            rec.cgroups[obj["id"]] = {"path": obj["path"], "identity": obj["identity"], "line": no}
        elif kind == "lost":
            rec.lost[obj.get("cpu")] = obj.get("events")
        elif kind == "trailer":
            rec.trailer = obj
        elif kind == "header":
            raise RecordingError(f"{name}:{no}: a second header; split the file at this line")
        else:
            raise RecordingError(f"{name}:{no}: unknown line type {kind!r}; fix or drop the line")
    if rec is None:
        raise RecordingError(f"{name}: empty, no header line; is this a recording from 'memcgscope record'?")
    if first_unnamed is not None:
        at, cgid = first_unnamed
        rec.warnings.append(f"{name}:{at}: cgroup id {cgid} is mentioned before its cgroup line "
                            f"({rec.unnamed_mentions} such mentions of {len(unnamed_ids)} ids); "
                            f"they are shown as ids where no later line names them")
    if rec.trailer is None:
        rec.warnings.append(f"{name}: no trailer line: the recording was cut short "
                            "(episodes after the last line are missing)")
    return rec


def load_recording(path: str) -> Recording:
    """read_recording of a file ('-' for stdin), with one-line errors."""
    import sys
    if path == "-":
        return read_recording(sys.stdin.read(), "<stdin>")
    try:
        with open(path, encoding="utf-8") as f:
            data = f.read()
    except FileNotFoundError:
        raise RecordingError(f"{path}: no such file; give the path of a recording") from None
    except IsADirectoryError:
        raise RecordingError(f"{path}: is a directory; give the path of a recording") from None
    except UnicodeDecodeError as e:
        raise RecordingError(f"{path}: not UTF-8 text (byte {e.start}); give a JSON lines recording") from None
    except OSError as e:
        raise RecordingError(f"{path}: {e.strerror}") from None
    return read_recording(data, path)
