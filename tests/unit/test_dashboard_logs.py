"""The dashboard reads a run's logs as they grow: torn lines wait, bad lines are counted, a
replaced file is read again, and every snapshot says which version it is."""

from __future__ import annotations

import json
import os

from elastickit.dashboard.logs import JsonlTail, RunReader, RunSources


def _line(**kw) -> str:
    return json.dumps(kw) + "\n"


def test_tail_reads_only_complete_lines_and_counts_bad_ones(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(_line(type="a", time=1.0) + "not json\n" + "[1, 2]\n" + '{"type": "b", "ti')
    tail = JsonlTail(str(path))
    assert tail.read() is True
    assert [r["type"] for r in tail.records] == ["a"]
    assert tail.bad_lines == 2  # the text and the list; the torn line is not read yet
    with open(path, "a") as f:
        f.write('me": 2.0}\n')
    assert tail.read() is True
    assert [r["type"] for r in tail.records] == ["a", "b"]
    assert [r["type"] for r in tail.appended] == ["b"]
    assert tail.read() is False  # nothing new


def test_tail_starts_over_when_the_file_is_replaced_or_shrinks(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    path.write_text(_line(step=1, time=1.0) + _line(step=2, time=2.0))
    tail = JsonlTail(str(path))
    tail.read()
    generation = tail.generation
    tmp = tmp_path / "new"
    tmp.write_text(_line(step=7, time=7.0))
    os.replace(tmp, path)  # a new inode
    assert tail.read() is True
    assert [r["step"] for r in tail.records] == [7]
    assert tail.generation == generation + 1
    path.write_text("")  # truncated in place
    assert tail.read() is True
    assert tail.records == []


def test_tail_of_a_missing_file_is_empty_until_it_appears(tmp_path) -> None:
    tail = JsonlTail(str(tmp_path / "later.jsonl"))
    assert tail.read() is False and tail.records == []
    (tmp_path / "later.jsonl").write_text(_line(x=1))
    assert tail.read() is True and tail.records == [{"x": 1}]


def test_tail_keeps_the_newest_records_within_its_bound(tmp_path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text("".join(_line(i=i) for i in range(10)))
    tail = JsonlTail(str(path), max_records=4)
    tail.read()
    assert [r["i"] for r in tail.records] == [6, 7, 8, 9] and tail.dropped == 6


def _summary(rank: int, step: int, t: float) -> dict:
    return {"rank": rank, "step": step, "time_s": t, "step_time_s": 0.1, "wait_s": 0.02,
            "num_ops": 1, "num_errors": 0, "groups": [], "peers": []}


def test_reader_merges_event_logs_by_time_and_versions_snapshots(tmp_path) -> None:
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    (run / "events.jsonl").write_text(_line(type="crash", time=5.0, ranks=[1]) + _line(type="x"))
    (run / "ckpt" / "events.jsonl").write_text(_line(type="checkpoint", time=3.0, step=4))
    (run / "steps.jsonl").write_text(_line(step=1, time=1.0) + _line(step="two", time=2.0))
    (run / "ranks.jsonl").write_text(json.dumps(_summary(0, 1, 1.0)) + "\n" + _line(rank=-1))
    (run / "nodes.json").write_text(json.dumps({"nodes": [{"node": 0, "state": "running"}]}))
    reader = RunReader(RunSources.from_run_dir(str(run)))
    logs = reader.read()
    assert [e["type"] for e in logs.events] == ["checkpoint", "crash"]
    assert [s["step"] for s in logs.steps] == [1]
    assert [(s.rank, s.step) for s in logs.summaries] == [(0, 1)]
    assert logs.nodes == ({"node": 0, "state": "running"},)
    # Every unusable line is counted where it was: no time, a step that is no number, a bad summary.
    assert dict(logs.bad_lines) == {"events.jsonl": 1, "steps.jsonl": 1, "ranks.jsonl": 1}
    assert reader.read().version == logs.version  # nothing changed
    with open(run / "ranks.jsonl", "a") as f:
        f.write(json.dumps(_summary(1, 1, 1.1)) + "\n")
    again = reader.read()
    assert again.version == logs.version + 1
    assert [(s.rank, s.step) for s in again.summaries] == [(0, 1), (1, 1)]


def test_a_checkpoint_root_inside_the_run_is_not_read_twice(tmp_path) -> None:
    sources = RunSources.from_run_dir(str(tmp_path), ckpt=str(tmp_path))
    assert sources.events == (os.path.join(str(tmp_path), "events.jsonl"),)


def test_an_events_file_alone_brings_the_per_rank_log_beside_it(tmp_path) -> None:
    sources = RunSources.from_events_file(str(tmp_path / "ev.jsonl"))
    assert sources.events == (str(tmp_path / "ev.jsonl"),)
    assert sources.ranks == str(tmp_path / "ranks.jsonl")
    assert sources.steps == "" and sources.ckpt_root == ""


def test_per_rank_log_in_the_checkpoint_root_is_found_when_the_run_has_none(tmp_path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "ranks.jsonl").write_text("")
    assert RunSources.from_run_dir(str(tmp_path)).ranks == str(tmp_path / "ckpt" / "ranks.jsonl")
    (tmp_path / "ranks.jsonl").write_text("")
    assert RunSources.from_run_dir(str(tmp_path)).ranks == str(tmp_path / "ranks.jsonl")
