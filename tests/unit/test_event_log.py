"""The checkpoint event log keeps every whole record when a writer died mid-line."""

import json

from elastickit.checkpoint.events import EventLog, read_events


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / "events.jsonl"
    whole = json.dumps({"type": "checkpoint", "step": 1}) + "\n"
    path.write_text(whole + '{"type":"checkpoint","st')  # a writer killed mid-append
    EventLog(str(path)).emit("checkpoint", step=2)
    assert [e["step"] for e in read_events(str(path))] == [1, 2]


def test_a_damaged_byte_spoils_its_line_only(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"type":"a"}\n{"type":"\xff"}\n{"type":"b"}\n')
    assert [e["type"] for e in read_events(str(path))] == ["a", "\ufffd", "b"]


def test_records_wait_in_memory_until_the_log_can_be_written(tmp_path, caplog):
    gone = tmp_path / "gone"
    log = EventLog(str(gone / "events.jsonl"))
    gone.rmdir()  # the directory vanished (or the disk turned read-only, or filled up)
    log.emit("checkpoint", step=1)
    log.emit("checkpoint", step=2)
    assert "keeping its records in memory" in caplog.text
    gone.mkdir()
    assert log.flush()
    log.emit("checkpoint", step=3)
    assert [e["step"] for e in read_events(str(gone / "events.jsonl"))] == [1, 2, 3]


def test_a_log_that_requires_the_root_lock_waits_while_it_is_gone(tmp_path):
    lock = tmp_path / ".elastickit.lock"
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path), requires=str(lock))
    log.emit("checkpoint", step=1)
    assert not path.exists()  # an unmounted root's mount point gets no new log
    lock.touch()
    log.emit("checkpoint", step=2)
    assert [e["step"] for e in read_events(str(path))] == [1, 2]
