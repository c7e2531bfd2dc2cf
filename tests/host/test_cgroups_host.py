"""cgroup id -> path on this host's real cgroupfs.

Scratch cgroups go below this process's own memory cgroup, get a 64M limit
before anything else, and are removed on every exit path
(this session's processes live below /sys/fs/cgroup/memory/process_api/).
Nothing else in cgroupfs is written to.
"""

from __future__ import annotations

import ctypes
import os
import posixpath
import struct

import pytest

from memcgscope.collector.scratch import pid_alive

from memcgscope.collector.cgroups import CgroupResolver, find_memory_hierarchy

PREFIX = "memcgscope-test-cgroups-"
LIMIT = str(64 << 20)


def kernfs_id(path: str) -> int:
    """The kernel's own id for a cgroup: name_to_handle_at(2) on cgroupfs
    returns a FILEID_KERNFS (0xfe) handle holding the u64 kernfs node id,
    the id tracepoints and BPF report. Independent of stat(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    handle = ctypes.create_string_buffer(8 + 128)
    struct.pack_into("II", handle, 0, 128, 0)
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(-100, path.encode(), handle, ctypes.byref(mount_id), 0) != 0:  # AT_FDCWD
        err = ctypes.get_errno()
        raise OSError(err, f"name_to_handle_at: {os.strerror(err)}", path)
    nbytes, handle_type = struct.unpack_from("II", handle, 0)
    assert (nbytes, handle_type) == (8, 0xFE), f"not a kernfs handle: {nbytes} bytes, type {handle_type:#x}"
    return int.from_bytes(handle.raw[8:16], "little")


def _remove(path: str) -> None:
    # depth first; a scratch cgroup of ours never holds processes
    for name in sorted(os.listdir(path)):
        child = os.path.join(path, name)
        if os.path.isdir(child):
            _remove(child)
    os.rmdir(path)


@pytest.fixture
def scratch():
    h = find_memory_hierarchy()
    own = os.path.join(h.mountpoint, h.own_cgroup.lstrip("/"))
    assert os.path.isdir(own), f"{own}: our own memory cgroup is not in cgroupfs; check /proc/self/cgroup"
    # sweep what a crashed earlier run of this test left below our cgroup
    for name in os.listdir(own):
        pid = name[len(PREFIX):]
        if name.startswith(PREFIX) and pid.isdigit() and not pid_alive(int(pid)):
            _remove(os.path.join(own, name))
    made: list[str] = []

    def mkcg(rel: str) -> str:
        path = os.path.join(own, rel)
        os.mkdir(path)
        made.append(path)
        # the hard limit first, before anything else can use the cgroup
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(LIMIT)
        return path

    try:
        yield h, own, mkcg
    finally:
        for path in reversed(made):
            if os.path.isdir(path):
                os.rmdir(path)
    assert not any(os.path.isdir(p) for p in made)


def test_resolves_scratch_cgroups_to_their_paths(scratch):
    h, own, mkcg = scratch
    assert h.version == 1 and h.mountpoint == "/sys/fs/cgroup/memory"  # this host: a v1 memory hierarchy
    name = f"{PREFIX}{os.getpid()}"
    parent = mkcg(name)
    child = mkcg(f"{name}/inner")
    with open(os.path.join(child, "memory.limit_in_bytes")) as f:
        assert int(f.read()) == 64 << 20

    clock = [0.0]
    r = CgroupResolver(h.mountpoint, rescan_interval=5.0, clock=lambda: clock[0])
    own_rel = h.own_cgroup
    parent_rel = posixpath.join(own_rel, name)
    for path, rel in ((parent, parent_rel), (child, f"{parent_rel}/inner"), (own, own_rel)):
        cid = kernfs_id(path)
        assert cid == os.stat(path).st_ino
        assert r.path(cid) == rel
    assert r.path(kernfs_id(h.mountpoint)) == "/"
    scans = r.scans

    # a removed cgroup drops out on the next walk, and its id is then a miss
    gone = kernfs_id(child)
    os.rmdir(child)
    clock[0] += 5
    r.rescan()
    assert r.path(gone) is None and gone not in r.known()
    assert r.path(kernfs_id(parent)) == parent_rel
    assert r.scans == scans + 1
