"""Fixtures shared by the engine's tests."""

import tempfile

import pytest


@pytest.fixture
def work_root(tmp_path, monkeypatch):
    """Host-side working directories of the sandbox go here, so a test can see that none is left behind."""
    root = tmp_path / "work"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield root
    assert list(root.iterdir()) == [], "a host working directory was left behind"
