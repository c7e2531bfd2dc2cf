"""`memcgscope record` with a stand-in session: the header carries what the
resolver and the probes decided, every episode reaches the file, and a
signal ends the recording without losing episodes or the trailer."""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from memcgscope.collector import record_cmd
from memcgscope.probes.episodes import Visibility, read_recording, visibility
from memcgscope.probes.program import ProbeStatus

pytestmark = pytest.mark.unit

RECORDING = Path(__file__).resolve().parents[1] / "data" / "recordings" / "debian-6.1-v1-kprobe.jsonl"


def episodes():
    lines = RECORDING.read_text().splitlines()
    return [json.loads(x) for x in lines if json.loads(x).get("type") == "episode"]


class FakeSession:
    """Polls hand out the recording's episodes in batches; the second poll
    receives SIGINT before it returns (a user's ^C mid-poll), and finish()
    receives SIGTERM."""

    def __init__(self, mode=None, **kw):
        self.mode = "kprobe"
        self.batches = [episodes()[i:i + 5] for i in range(0, 20, 5)]
        self.polls = 0
        self.events_seen = 0
        self.assembler = SimpleNamespace(memsw=True, orphans=1)
        self.report = SimpleNamespace(
            kernel="6.1.0-56-amd64", kernel_version="#1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2 (2026-11-16)",
            version_signature=None,
            cgroups=SimpleNamespace(v1_memory="/run/memcg-v1", v2_mount="/sys/fs/cgroup", v2_memory=False,
                                    swap_accounting=True))
        self._probes = [ProbeStatus("charge_core", "try_charge_memcg", "kprobe", True),
                        ProbeStatus("page_counter_try_charge", "page_counter_try_charge", "kprobe", True),
                        ProbeStatus("drain_all_stock", "drain_all_stock.part.0", "kprobe", True)]

    def open(self):
        return self

    def close(self):
        pass

    def status(self):
        return list(self._probes)

    def visibility(self) -> Visibility:
        return visibility(self.mode, self._probes)

    def poll(self, timeout_ms=100):
        self.polls += 1
        batch = self.batches.pop(0) if self.batches else []
        if self.polls == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return [SimpleNamespace(to_json=lambda d=d: d) for d in batch]

    def finish(self):
        os.kill(os.getpid(), signal.SIGTERM)
        rest, self.batches = [e for b in self.batches for e in b], []
        return [SimpleNamespace(to_json=lambda d=d: d) for d in rest]

    def lost(self):
        return [0, 2]


def no_hierarchy():
    from memcgscope.collector.cgroups import CgroupError
    raise CgroupError("no memory cgroup hierarchy in /proc/mounts (a test)")


def record(monkeypatch, *argv, session=FakeSession, names=no_hierarchy):
    """`memcgscope record` with a stand-in session; ``names``: what
    record_cmd.host_names does (default: no memory hierarchy, ids only;
    these tests never read the host's cgroupfs)."""
    monkeypatch.setattr("memcgscope.probes.session.Session", session)
    monkeypatch.setattr(record_cmd, "host_names", names)
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    record_cmd.add_parser(sub)
    args = ap.parse_args(["record", *map(str, argv)])
    return args.func(args)


def test_signals_lose_no_episode_and_no_trailer(monkeypatch, tmp_path):
    """Review bug: the SIGINT handler raised from inside poll(), so the
    episodes of that poll (and a trailer, on a signal while finishing) could
    be lost. Now the handler sets an event and the loop stops between polls."""
    out = tmp_path / "rec.jsonl"
    assert record(monkeypatch, "--out", out) == 0
    rec = read_recording(out.read_text(), str(out))
    assert len(rec.episodes) == 20                  # all four batches: two polled, two from finish()
    assert rec.trailer["episodes"] == 20 and rec.trailer["lost_events"] == 2 and rec.trailer["orphan_events"] == 1
    assert rec.lost == {1: 2}
    assert rec.warnings == []


def test_header_carries_the_resolved_profile_and_visibility(monkeypatch, tmp_path):
    out = tmp_path / "rec.jsonl"
    assert record(monkeypatch, "--out", out) == 0
    h = read_recording(out.read_text()).header
    assert h["kernel_version"].endswith("Debian 6.1.192-2 (2026-11-16)")
    assert (h["profile"], h["upstream"]) == ("6.1", "6.1.192")
    assert h["visibility"] == {"mode": "kprobe", "charges": True, "drains": False, "forced_charges": True}
    assert h["forced_charges"] is True


def test_check_runs_the_pipeline(monkeypatch, tmp_path, capsys):
    out = tmp_path / "rec.jsonl"
    assert record(monkeypatch, "--check", "--out", out) == 0
    err = capsys.readouterr().err
    assert "20 episodes" in err and "0 divergences" in err
    # a wrong profile makes the same episodes diverge
    assert record(monkeypatch, "--check", "--profile", "5.15", "--out", out) == 1
    assert "counter_mismatch" in capsys.readouterr().err


def test_without_a_memory_hierarchy_the_recording_holds_ids_only(monkeypatch, tmp_path, capsys):
    out = tmp_path / "rec.jsonl"
    assert record(monkeypatch, "--out", out) == 0
    assert "the recording holds cgroup ids only" in capsys.readouterr().err
    rec = read_recording(out.read_text(), str(out))
    assert rec.header["cgroup_names"] is None and not rec.named and rec.cgroups == {}
    assert len(rec.episodes) == 20 and rec.warnings == []
    assert '"type":"cgroup"' not in out.read_text()


def test_bad_arguments(monkeypatch, tmp_path, capsys):
    assert record(monkeypatch, "--out", tmp_path / "no" / "x.jsonl") == 2
    assert "does not exist" in capsys.readouterr().err
    assert record(monkeypatch) == 2
    assert "--out FILE is required" in capsys.readouterr().err
    assert record(monkeypatch, "--profile", "9.9", "--out", tmp_path / "x") == 2
    assert "--profile" in capsys.readouterr().err
