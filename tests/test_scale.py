"""Costs that must not grow with history or output: agent logs read in bounded chunks, running totals."""

import json
import time

import pytest

import orchestra


def assistant(message_id, text, inputs, outputs):
    usage = {"input_tokens": inputs, "cache_read_input_tokens": 1, "output_tokens": outputs}
    return {
        "type": "assistant",
        "message": {"id": message_id, "content": [{"type": "text", "text": text}], "usage": usage},
    }


def write_log(path, events, tail=""):
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + tail)
    return path


EVENTS = [
    {"type": "orchestra", "event": "launch"},
    {"type": "system", "subtype": "init", "session_id": "s-1"},
    assistant("m1", "thinking", 10, 1),
    assistant("m1", "still the same response", 10, 4),  # one response spans lines: counted once
    {"type": "user", "message": {"content": [{"type": "tool_result", "content": "x" * 5000}]}},
    assistant("m2", "second response", 20, 2),
    {"type": "result", "subtype": "success", "result": "ok", "total_cost_usd": 0.5, "num_turns": 2},
    {"type": "orchestra", "event": "launch"},  # resumed: a second run adds up
    assistant("m3", "resumed", 5, 5),
]


def test_chunked_reading_folds_exactly_what_one_read_does(tmp_path, monkeypatch):
    path = write_log(tmp_path / "a.jsonl", EVENTS, tail='{"type":"assistant"')
    whole = orchestra.read_log(path).facts
    assert (whole["input_tokens"], whole["output_tokens"]) == (11 + 21 + 6, 4 + 2 + 5)
    assert whole["session_id"] == "s-1" and whole["activity"] == "resumed" and whole["turns"] == 2
    monkeypatch.setattr(orchestra, "LOG_READ_CHUNK", 7)  # lines split across many chunks
    log = orchestra.AgentLog(path)
    steps = 0
    while log.read_new(budget=100):
        steps += 1
    assert steps > 10 and log.facts == {**whole, "last_activity_at": log.facts["last_activity_at"]}
    assert log.partial == b'{"type":"assistant"'


def test_result_usage_replaces_the_stream_counts_of_its_run(tmp_path):
    result = {
        "type": "result",
        "subtype": "success",
        "result": "ok",
        "usage": {"input_tokens": 100, "output_tokens": 7},
    }
    facts = orchestra.read_log(write_log(tmp_path / "r.jsonl", [*EVENTS[:6], result])).facts
    assert (facts["input_tokens"], facts["output_tokens"]) == (100, 7)


def test_a_line_longer_than_the_cap_is_skipped_not_buffered(tmp_path, monkeypatch):
    monkeypatch.setattr(orchestra, "LOG_MAX_LINE", 1000)
    monkeypatch.setattr(orchestra, "LOG_READ_CHUNK", 256)
    huge = json.dumps(assistant("big", "y" * 5000, 1, 1))
    path = tmp_path / "h.jsonl"
    path.write_text(huge + "\n" + json.dumps(assistant("m9", "after the huge line", 3, 3)) + "\n")
    log = orchestra.AgentLog(path)
    while log.read_new(budget=300):
        assert len(log.partial) <= 1000 + 256
    assert log.facts["activity"] == "after the huge line" and log.facts["input_tokens"] == 4


def test_budget_stops_a_read_and_says_it_is_behind(tmp_path):
    path = write_log(tmp_path / "b.jsonl", [assistant(f"m{n}", "x" * 100, 1, 1) for n in range(100)])
    log = orchestra.AgentLog(path)
    assert log.read_new(budget=1000) and not log.caught_up
    log.read_to_end()
    assert log.caught_up and log.facts["input_tokens"] == 200


@pytest.mark.parametrize("lines", [4000])
def test_folding_cost_is_linear_in_lines(tmp_path, lines):
    def seconds(n):
        path = write_log(tmp_path / f"{n}.jsonl", [assistant(f"m{i}", "t", 1, 1) for i in range(n)])
        start = time.perf_counter()
        facts = orchestra.read_log(path).facts
        assert facts["output_tokens"] == n
        return time.perf_counter() - start

    small, large = min(seconds(lines) for _ in range(3)), min(seconds(5 * lines) for _ in range(3))
    assert large / small < 10  # was 29x for 5x the lines (totals re-summed on every line)
