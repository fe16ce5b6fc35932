"""The staging area between tasks: frames and JSON by path, per run and shared, and clean-up."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from mdsync.staging import Staging


def test_frame_round_trip_keeps_index_types_and_nulls(tmp_path):
    s = Staging(tmp_path, "manual__2026-01-01T00:00:00+00:00")
    frame = pd.DataFrame({"dynamics_type": ["lead", "contact"], "dynamics_id": ["L1", None], "new": [True, False]},
                         index=pd.Index([5, 7], dtype="int64", name="person_id"))
    path = s.write_frame("links", frame)
    assert isinstance(path, str) and path.endswith("links.parquet")
    back = s.read_frame(path)
    pd.testing.assert_frame_equal(back, frame)


def test_run_ids_become_safe_folder_names(tmp_path):
    s = Staging(tmp_path, "scheduled__2026-01-01T00:05:00+00:00/../x")
    path = Path(s.write_frame("a b/c", pd.DataFrame({"x": [1]})))
    assert path.parent.parent == tmp_path  # no escape from the staging root
    assert "/" not in path.parent.name and " " not in path.name


def test_json_round_trip_and_shared_json(tmp_path):
    run1, run2 = Staging(tmp_path, "run-1"), Staging(tmp_path, "run-2")
    data = {"entities": {"lead": [1, 2]}, "at": datetime(2026, 1, 1, tzinfo=timezone.utc)}
    path = run1.write_json("field-access", data)
    assert run1.read_json(path) == {"entities": {"lead": [1, 2]}, "at": "2026-01-01 00:00:00+00:00"}
    assert Path(path).parent == run1.folder
    shared = run1.write_json("field-access-cache", {"v": 1}, shared=True)
    # a shared file lives at the root: another run finds it by name
    assert shared == run2.shared_path("field-access-cache")
    assert run2.read_json(run2.shared_path("field-access-cache")) == {"v": 1}


def test_remove_deletes_only_this_runs_folder_and_is_idempotent(tmp_path):
    run1, run2 = Staging(tmp_path, "run-1"), Staging(tmp_path, "run-2")
    run1.write_frame("a", pd.DataFrame({"x": [1]}))
    kept = run2.write_frame("a", pd.DataFrame({"x": [2]}))
    shared = run1.write_json("cache", {"v": 1}, shared=True)
    run1.remove()
    assert not run1.folder.exists()
    assert Path(kept).exists() and Path(shared).exists()
    run1.remove()  # nothing left to remove: no error
    assert run2.read_frame(kept)["x"].tolist() == [2]
