from __future__ import annotations

import gzip

from memcgscope.probes.sysroot import SysRoot


def test_mounts_config_and_cgroup(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/mounts").write_text(
        "cgroup /sys/fs/cgroup/my\\040memory cgroup rw,relatime,memory 0 0\nbad line\n")
    with gzip.open(tmp_path / "proc/config.gz", "wt") as f:
        f.write("CONFIG_KPROBES=y\n# CONFIG_MEMCG_V1 is not set\nCONFIG_LOCALVERSION=\"-x\"\n")
    (tmp_path / "proc/self").mkdir()
    (tmp_path / "proc/self/cgroup").write_text("4:memory,cpu:/a/b\n0::/c\n")
    (tmp_path / "proc/swaps").write_text("Filename Type Size Used Priority\n/dev/zram0 partition 1 0 -2\n")
    s = SysRoot(str(tmp_path))
    (m,) = s.mounts()
    assert m.mountpoint == "/sys/fs/cgroup/my memory" and "memory" in m.options
    config, where = s.kernel_config()
    assert where == "/proc/config.gz"
    assert config == {"CONFIG_KPROBES": "y", "CONFIG_MEMCG_V1": "n", "CONFIG_LOCALVERSION": "-x"}
    assert s.proc_self_cgroup() == {"memory": "/a/b", "cpu": "/a/b", "": "/c"}
    assert s.swaps() == ["/dev/zram0"]
    assert s.kernel_release() == "unknown"
    assert not s.live and SysRoot("/").live


def test_missing_files_read_as_none(tmp_path):
    s = SysRoot(str(tmp_path))
    assert s.read_text("/proc/kallsyms") is None
    assert s.kallsyms() is None
    assert s.kernel_config() == ({}, None)
    assert s.mounts() == [] and s.tracing_dir() is None
