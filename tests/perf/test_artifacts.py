"""`make bench` keeps the last few runs under .artifacts/bench, not every run ever made."""

from __future__ import annotations

from pathlib import Path

from tests.perf.bench import KEEP_RUNS, prune_runs


def test_only_the_newest_runs_are_kept(tmp_path: Path) -> None:
    names = [f"202612{day:02d}-120000" for day in range(1, 9)] + ["20261208-120000-4242"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text("{}")
    (tmp_path / "latest").symlink_to(names[-1])
    (tmp_path / "notes").mkdir()  # not a run: left alone
    (tmp_path / "readme.txt").write_text("mine")

    deleted = prune_runs(tmp_path)

    kept = sorted(names)[-KEEP_RUNS:]
    assert sorted(p.name for p in deleted) == sorted(set(names) - set(kept))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "latest", "notes", "readme.txt"])
    assert (tmp_path / "latest").resolve() == (tmp_path / names[-1]).resolve()
    assert prune_runs(tmp_path) == []  # nothing more to delete
