"""The benchmark report's plot: a run at one N gets none, and a failed point is marked (the
committed plots are made by ``python -m benchmarks.report``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report

RESULTS = Path(report.__file__).parent / "results"


def _doc(points: list[tuple[str, int, str, float | None]]) -> dict:
    runs = [
        {"backend": b, "scenario": "join", "n": n, "status": status, "seconds": seconds, "cap": 20.0,
         "phases": [], "errors": [] if status == "ok" else ["no worker ready in time"], "trial": 0}
        for b, n, status, seconds in points
    ]
    return {"name": "t", "runs": runs, "settings": {"scenarios": ["join"], "repeat": 1, "procs": 1},
            "machine": {"cpu_count": 2, "cpu_model": "x", "torch": "2.13.0", "git": "abc"}}


def test_a_run_at_one_n_gets_no_plot(tmp_path):
    problem = report.write_plot(tmp_path / "one.png", _doc([("etcd_rdzv", 256, "ok", 2.0)]))
    assert problem is not None and "more than one N" in problem
    assert not (tmp_path / "one.png").exists()


def test_failed_and_capped_points_are_marked_and_equal_times_stay_apart(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append(fig))
    doc = _doc([
        ("etcd_rdzv", 8, "ok", 4.11), ("etcd_rdzv", 32, "ok", 4.12),
        ("c10d_rdzv", 8, "ok", 4.11), ("c10d_rdzv", 32, "error", None),
        ("c10d", 8, "ok", 1.3), ("c10d", 32, "timeout", None),
    ])
    assert report.write_plot(tmp_path / "p.png", doc) is None
    [fig] = saved
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "c10d_rdzv: failed (no time)" in labels and "c10d (torch): timed out at cap" in labels
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    ours, theirs = lines["etcd_rdzv"], lines["c10d_rdzv"]
    assert ours.get_marker() != theirs.get_marker() and ours.get_linestyle() != theirs.get_linestyle()
    assert ours.get_xdata()[0] != theirs.get_xdata()[0]  # the same time at the same N, side by side


def test_committed_results_are_named_for_what_they_hold():
    names = {p.stem for p in RESULTS.glob("*.json")}
    assert names >= {"quick", "join256", "exit256", "join1024-4procs"}
    for path in RESULTS.glob("*.json"):
        doc = json.loads(path.read_text())
        if "settings" in doc:  # the age runs have a format of their own
            assert doc["name"] == path.stem, path
    for path in (RESULTS / "history").glob("*.json"):
        assert json.loads(path.read_text())["name"] == f"history/{path.stem}", path
    assert not list((RESULTS / "history").glob("*.png"))  # earlier code's plots are not kept


def test_what_etcd_paid_is_reported_per_node_as_the_median_of_the_trials():
    committed = json.loads((RESULTS / "quick.json").read_text())
    doc = {**_doc([("etcd_rdzv", 64, "ok", 0.5), ("etcd_rdzv", 64, "ok", 0.6), ("etcd_rdzv", 64, "ok", 0.7)]),
           **{k: committed[k] for k in ("machine", "settings", "created")}}
    for run, raft, cpu in zip(doc["runs"], (192, 200, 256), (0.1, 0.3, 0.2)):
        run["phases"] = [{"counters": {"requests": 256}, "etcd": {"raft_entries": raft, "cpu_seconds": cpu}}]
    [row] = [line for line in report.markdown(doc).splitlines() if line.startswith("| 64 | etcd_rdzv | 0")]
    assert row.rstrip(" |").endswith("| 4.0 | 3.1 | 0.20")  # 200 / 64 raft entries a node; 0.2 CPU s
