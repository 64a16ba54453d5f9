"""Small files written whole or not at all (summary, W&B run id, benchmark images)."""
from __future__ import annotations

import json

import pytest

from dino_dist.atomic_file import write_atomically
from dino_dist.observe.summary import SUMMARY_NAME, write_summary


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "figures.json"
    path.write_text("old")
    assert write_atomically(path, lambda f: f.write(b"new")) == path
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["figures.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "figures.json"
    path.write_text("old")

    def half_then_fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["figures.json"]


def test_the_summary_is_written_through_it(tmp_path):
    (tmp_path / SUMMARY_NAME).write_text("{}")
    write_summary(tmp_path, {"stop_reason": "completed", "steps": 3})
    assert json.loads((tmp_path / SUMMARY_NAME).read_text())["steps"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [SUMMARY_NAME]
