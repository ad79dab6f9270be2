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
