"""The VM tier boots a guest once more only when the first boot ended
before the guest ran anything (tests/vm/conftest.py _never_booted): vng's
255 within a minute, no output, no steps.json. Anything else is a result."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.unit
VM = Path(__file__).resolve().parents[1] / "vm"


@pytest.fixture(scope="module")
def vm_conftest():
    sys.path.insert(0, str(VM))
    try:
        spec = importlib.util.spec_from_file_location("memcgscope_vm_conftest", VM / "conftest.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod      # its dataclasses look their module up
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(VM))


def _r(rc=255, seconds=6.0, stdout=""):
    return SimpleNamespace(returncode=rc, seconds=seconds, stdout=stdout, stderr="")


def test_only_a_guest_that_never_ran_its_script_is_booted_again(vm_conftest, tmp_path):
    never = vm_conftest._never_booted
    assert never(_r(), tmp_path)
    assert not never(_r(rc=1), tmp_path)                      # the script's own failure
    assert not never(_r(seconds=300), tmp_path)               # a panic mid-suite is a result
    assert not never(_r(stdout="rc=0\n"), tmp_path)           # it printed: it ran
    (tmp_path / "steps.json").write_text("{}")
    assert not never(_r(), tmp_path)                          # it wrote steps: it ran
