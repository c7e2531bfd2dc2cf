"""tests/host: root on this machine's own kernel. Without root the tests
fail with the fix; they are never skipped."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# shared helpers (promkit) import as top-level modules
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/host" in str(item.fspath):
            item.add_marker(pytest.mark.host)


@pytest.fixture(autouse=True)
def _needs_root():
    if os.geteuid() != 0:
        pytest.fail("tests/host needs root (BPF, tracefs, cgroupfs); run as root: sudo .venv/bin/pytest tests/host")


@pytest.fixture
def workdir(request):
    """A private temporary directory, removed on every exit path."""
    d = Path(tempfile.mkdtemp(prefix=f"memcgscope-{request.node.name[:40]}-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert not d.exists()
