"""Fixtures for tests/vm: guests booted with virtme-ng (KVM when a probe
shows it works, else TCG; harness.accel).

A missing prerequisite (root, QEMU, virtme-ng, udev, a fetched kernel)
fails the test with the fix; it is never skipped.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import GUESTS, GuestError, preflight, run_in_guest  # noqa: E402


class GuestSession:
    def __init__(self, guest, tmp_path):
        self.guest = guest
        self.tmp_path = tmp_path

    def run(self, command: str, **kw):
        kw.setdefault("rwdir", str(self.tmp_path))
        return run_in_guest(self.guest, command, **kw)


@pytest.fixture(params=GUESTS, ids=[g.name for g in GUESTS])
def guest(request, tmp_path):
    """One guest configuration of harness.GUESTS; `.run(cmd)` boots it once."""
    try:
        preflight(request.param)
    except GuestError as e:
        pytest.fail(str(e))
    return GuestSession(request.param, tmp_path)


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/vm" in str(item.fspath):
            item.add_marker(pytest.mark.vm)
