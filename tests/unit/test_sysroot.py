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


def test_kallsyms_wanted_is_the_full_list_filtered(tmp_path):
    """The one-regex pass for wanted names gives what the line loop gives
    (clones, modules, non-text symbols left out)."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "kallsyms").write_text(
        "ffffffff81000000 T try_charge_memcg\n"
        "ffffffff81000010 t drain_all_stock.part.0\n"
        "ffffffff81000020 t drain_all_stock_more\n"
        "ffffffff81000030 d try_charge_memcg_data\n"
        "ffffffff81000040 D drain_all_stock\n"
        "ffffffffc0000000 t memory_max_write\t[somemod]\n"
        "ffffffff81000050 W mem_cgroup_charge.constprop.0\n")
    root = SysRoot(str(tmp_path))
    wanted = {"try_charge_memcg", "drain_all_stock", "memory_max_write", "mem_cgroup_charge"}
    full = [e for e in root.kallsyms() if e.name.split(".", 1)[0] in wanted]
    assert root.kallsyms(wanted) == full
    assert [(e.name, e.kind, e.module) for e in full] == [
        ("try_charge_memcg", "T", None), ("drain_all_stock.part.0", "t", None),
        ("memory_max_write", "t", "somemod"), ("mem_cgroup_charge.constprop.0", "W", None)]
    assert root.kallsyms(set()) == []
