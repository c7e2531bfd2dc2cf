"""The BTF reader against bpftool on this kernel's own BTF: every member of
the structs the probes read has the offset bpftool reports."""

from __future__ import annotations

import json
import subprocess

from memcgscope.probes.btf import BTF, STRUCT


def test_member_offsets_match_bpftool():
    dump = subprocess.run(["bpftool", "-j", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
                          capture_output=True, text=True, check=True, timeout=120)
    types = {t["id"]: t for t in json.loads(dump.stdout)["types"]}
    btf = BTF.from_file()
    for name in ("page_counter", "mem_cgroup", "cgroup", "kernfs_node", "cgroup_subsys_state"):
        type_id = btf.find(name, STRUCT)
        theirs = types[type_id]
        assert theirs["kind"] == "STRUCT" and theirs["name"] == name
        ours = btf.members(type_id)
        assert [(m.name or "(anon)", m.bit_offset) for m in ours] == \
               [(m["name"], m["bits_offset"]) for m in theirs["members"]]
    assert btf.func_id("try_charge_memcg") == next(
        i for i, t in types.items() if t["kind"] == "FUNC" and t["name"] == "try_charge_memcg")
