"""Costs that must not grow with history or output: agent logs read in bounded chunks, running totals."""

import json
import subprocess
import sys
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
    path = write_log(
        tmp_path / "b.jsonl", [assistant(f"m{n}", "x" * 100, 1, 1) for n in range(100)]
    )
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
    assert large / small < 12  # was 29x for 5x the lines (totals re-summed on every line)


# --- logs: streamed, tailed from the end -------------------------------------------------------


@pytest.mark.parametrize(
    "content, count, lines, end",
    [
        (b"a\nb\nc\n", 2, ["b", "c"], 6),
        (b"a\nb\nc\n", 10, ["a", "b", "c"], 6),
        (b"a\nb\nc", 2, ["a", "b"], 4),
        (b"", 3, [], 0),
        (b"only partial", 3, [], 0),
        (b"x" * 100 + b"\ny\n", 1, ["y"], 103),
        (b"x" * 100 + b"\ny\n", 2, ["x" * 100, "y"], 103),
        (b"a\n\nb\n", 0, [], 5),
    ],
)
def test_tail_lines_table(tmp_path, monkeypatch, content, count, lines, end):
    path = tmp_path / "log"
    path.write_bytes(content)
    for block in (1, 3, 64 * 1024):
        monkeypatch.setattr(orchestra, "LOG_TAIL_BLOCK", block)
        found, offset, cut = orchestra.tail_lines(path, count, orchestra.log_renderer(True))
        assert (found, offset, cut) == (lines, end, False), block


def text_event(n, padding=0):
    text = f"line {n}" + " " * padding  # trailing blanks: not shown
    return json.dumps(
        {"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}}
    )


def big_log(project, agent_id, lines, padding=0):
    """An agent record whose log holds `lines` text lines (each padded to about `padding` bytes)."""
    record = orchestra.new_record(project, agent_id, "a task", "main", "0" * 40)
    record.update(state="done", ready=True)
    project.store.update(lambda state: state["agents"].__setitem__(agent_id, record))
    with open(project.log_path(agent_id), "w") as f:
        for n in range(lines):
            f.write(text_event(n, padding) + "\n")
    return project.log_path(agent_id)


def test_logs_tail_reads_from_the_end(project, cli):
    big_log(project, "tailed", 1000)
    assert cli("logs", "tailed", "--tail", "3").out == "line 997\nline 998\nline 999\n"
    assert cli("logs", "tailed", "--tail", "0").out == ""
    assert cli("logs", "tailed").out.splitlines()[-1] == "line 999"
    assert len(cli("logs", "tailed").out.splitlines()) == 1000
    assert cli("logs", "tailed", "--tail", "x").code == 2


def test_logs_follow_starts_at_the_end(project, cli):
    big_log(project, "followed", 500)
    out = cli("logs", "-f", "followed").out.splitlines()
    assert out == [f"line {n}" for n in range(450, 500)]
    assert cli("logs", "-f", "--tail", "2", "followed").out == "line 498\nline 499\n"


def test_logs_of_a_large_file_stream_in_constant_memory(project):
    path = big_log(project, "huge", 60_000, padding=1000)  # about 64 MB
    assert path.stat().st_size > 60_000_000
    script = f"import sys; sys.path.insert(0, {str(orchestra.Path(orchestra.__file__).parent)!r}); import orchestra; orchestra.main(['logs', 'huge']); print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=project.repo, capture_output=True, timeout=120
    )
    assert done.stdout.count(b"\n") == 60_000
    assert int(done.stderr.split()[-1]) < 50_000  # KB: an interpreter's worth, not the log's size


def test_web_tail_returns_the_lines_asked_or_says_why(tmp_path, monkeypatch):
    path = tmp_path / "log"
    path.write_text("".join(text_event(n, 2000) + "\n" for n in range(3000)))  # 6 MB
    lines, short = orchestra.readable_tail(path, 2500)
    assert (
        short is None
        and lines[0] == "line 500"
        and lines[-1].startswith("line 2999")
        and len(lines) == 2500
    )
    lines, short = orchestra.readable_tail(path, 5000)
    assert len(lines) == 3000 and short == "the log holds only 3000 line(s)"
    lines, short = orchestra.readable_tail(path, 2500, limit=1024 * 1024)
    assert len(lines) < 2500 and short.startswith(
        f"only {len(lines)} line(s) in the last 1 MB of the log"
    )
    assert orchestra.readable_tail(tmp_path / "none", 5) == ([], "the agent has no log yet")


# --- web: live agents in the status, history paged on request ----------------------------------


def test_status_holds_live_agents_and_history_comes_in_pages(server, project):
    from test_web import add_record, call

    for n in range(5):
        add_record(project, f"agent-{n}", state="done", seq=n)
    for n in (0, 1, 2):
        orchestra.mark_removed(project, f"agent-{n}", [f"refs/orchestra/archive/agent-{n}/x"])
    assert [a["id"] for a in call(server, "GET", "/api/status").json()["agents"]] == [
        "agent-3",
        "agent-4",
    ]
    page = call(server, "GET", "/api/history?limit=2").json()
    assert (page["total"], page["offset"], page["limit"]) == (3, 0, 2)
    assert [a["id"] for a in page["agents"]] == [
        "agent-2",
        "agent-1",
    ]  # most recently removed first
    assert page["agents"][0]["state"] == "removed" and page["agents"][0]["archive"] == [
        "refs/orchestra/archive/agent-2/x"
    ]
    assert [
        a["id"] for a in call(server, "GET", "/api/history?offset=2&limit=2").json()["agents"]
    ] == ["agent-0"]
    assert call(server, "GET", "/api/history?offset=9").json()["agents"] == []
    for bad in ("limit=0", "limit=501", "offset=-1", "offset=x"):
        assert call(server, "GET", f"/api/history?{bad}").status == 400
    assert (
        call(server, "GET", "/api/agents/agent-1").json()["state"] == "removed"
    )  # a named id finds history


def test_status_hub_does_not_parse_an_unchanged_state_file(project, monkeypatch):
    from test_web import add_record

    add_record(project, "alpha", state="running")
    calls = []
    real = orchestra.current_status
    monkeypatch.setattr(orchestra, "current_status", lambda p: calls.append(1) or real(p))
    monkeypatch.setattr(orchestra, "WEB_REFRESH_INTERVAL", 0.0)  # liveness checked on every poll
    hub = orchestra.StatusHub(project, print, revive=False)
    for _ in range(20):
        hub.poll()
    assert len(calls) == 1
    add_record(project, "beta", state="running")
    hub.poll()
    assert len(calls) == 2 and [a["id"] for a in hub.document["agents"]] == ["alpha", "beta"]
    # The supervisor named in the state dies: noticed without a change to the file.
    supervisor = subprocess.Popen(["sleep", "30"])
    start = orchestra.process_start_time(supervisor.pid)
    project.store.update(lambda s: s["supervisor"].update(pid=supervisor.pid, pid_start=start))
    hub.poll()
    assert hub.document["supervisor"]["alive"] is True and len(calls) == 3
    hub.poll()
    supervisor.kill()
    supervisor.wait()
    hub.poll()
    assert hub.document["supervisor"]["alive"] is False and len(calls) == 4


# --- collect: git only for what moved ----------------------------------------------------------


def test_collect_reuses_reports_of_unmoved_branches(fake_repo, cli, monkeypatch):
    from conftest import git, wait_settled

    spawned = cli("spawn", "--json", "commit:a.txt alpha", "commit:b.txt beta")
    alpha = spawned.json()["agents"][0]["id"]
    wait_settled(fake_repo)
    first = cli("collect", "--json").json()
    computed = []
    real = orchestra.committed_work
    monkeypatch.setattr(orchestra, "committed_work", lambda *a: computed.append(a[2]) or real(*a))
    assert cli("collect", "--json").json() == first
    assert computed == []  # commits, diffstat and files of both agents came from the cache

    worktree = fake_repo / ".worktrees" / f"task-{alpha}"
    (worktree / "more.txt").write_text("more\n")
    git("add", "more.txt", cwd=worktree)
    git("commit", "-qm", "add more.txt", cwd=worktree)
    again = cli("collect", "--json").json()["agents"]
    assert [c["subject"] for c in again[0]["commits"]] == ["add a.txt", "add more.txt"]
    assert again[0]["files"] == ["a.txt", "more.txt"] and again[1] == first["agents"][1]
    assert len(computed) == 1  # only the branch that moved


def test_collect_cache_never_hides_a_change_of_base(fake_repo, cli):
    from conftest import wait_settled

    alpha = cli("spawn", "--json", "commit:a.txt alpha").json()["agents"][0]["id"]
    wait_settled(fake_repo)
    assert cli("collect", "--json").json()["agents"][0]["files"] == ["a.txt"]
    cache = json.loads((fake_repo / ".orchestra" / "reports.json").read_text())
    assert list(cache) == [alpha]
    cache[alpha]["work"]["files"] = ["stale.txt"]
    cache[alpha]["key"][0] = "0" * 40  # another base: not this agent's entry
    (fake_repo / ".orchestra" / "reports.json").write_text(json.dumps(cache))
    assert cli("collect", "--json").json()["agents"][0]["files"] == ["a.txt"]


# --- spawn: worktrees made shortly before their agents run ----------------------------------------


def worktree_folders(repo):
    root = repo / ".worktrees"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_spawn_makes_one_batch_of_worktrees_and_the_supervisor_the_rest(fake_repo, cli):
    from conftest import load_state, wait_settled

    tasks = [f"commit:f{n}.txt job {n}" for n in range(14)]
    run = cli("spawn", "--parallel", "2", "--json", *tasks)
    assert run.code == 0
    assert (
        len(worktree_folders(fake_repo)) <= 2 + orchestra.PREPARE_AT_ONCE
    )  # not 14 on disk at once
    later = run.json()["agents"][orchestra.SPAWN_PREPARED_NOW :]
    assert all(a["state"] == "queued" and a["activity"] == "waiting for a worktree" for a in later)
    logs = fake_repo / ".orchestra" / "logs"
    assert all(
        json.loads((logs / f"{a['id']}.jsonl").read_text().splitlines()[0])["event"] == "spawn"
        for a in later
    )
    wait_settled(fake_repo, timeout=120)
    agents = load_state(fake_repo)["agents"]
    assert sorted(r["state"] for r in agents.values()) == ["done"] * 14
    assert all(r["commits"] == 1 for r in agents.values())
    starts = [r["started_at"] for r in sorted(agents.values(), key=lambda r: r["seq"])]
    assert starts == sorted(starts)  # still started in spawn order


def test_a_rebuilt_state_keeps_agents_that_wait_for_their_worktree(fake_repo, cli):
    from conftest import agent_states, load_state, wait_for, wait_settled

    tasks = ["sleep:4 first", *[f"later {n}" for n in range(orchestra.SPAWN_PREPARED_NOW + 8)]]
    cli("spawn", "--parallel", "1", *tasks)
    wait_for(
        lambda: agent_states(fake_repo).get("sleep-4-first") == "running",
        timeout=30,
        what="running",
    )
    with orchestra.FileLock(
        fake_repo / ".orchestra" / "state.lock"
    ):  # not between a read and its write
        (fake_repo / ".orchestra" / "state.json").write_text("{")
    run = cli(
        "status", "--json"
    )  # the rebuild is done (and reported) by whoever reads the file first
    assert list((fake_repo / ".orchestra").glob("state.json.corrupt-*"))
    states = {a["id"]: (a["state"], a["activity"]) for a in run.json()["agents"]}
    assert states["later-8"] == ("queued", "waiting for a worktree")
    wait_settled(fake_repo, timeout=120)
    agents = load_state(fake_repo)["agents"]
    assert (
        agents["later-8"]["state"] == "done"
        and (fake_repo / ".worktrees" / "task-later-8").is_dir()
    )


def test_stopping_an_agent_that_waits_for_its_worktree(fake_repo, cli):
    from conftest import load_state, wait_settled

    tasks = ["sleep:3 first", *[f"later {n}" for n in range(orchestra.SPAWN_PREPARED_NOW + 7)]]
    cli("spawn", "--parallel", "1", *tasks)
    assert cli("stop", "later-7").code == 0
    wait_settled(fake_repo, timeout=120)
    record = load_state(fake_repo)["agents"]["later-7"]
    assert record["state"] == "stopped" and record["started_at"] is None
    assert not (fake_repo / ".worktrees" / "task-later-7").exists()


# --- sessions: a cache as large as the store, an index instead of a scan --------------------------


def test_a_warm_listing_of_thousands_of_transcripts_recounts_none(tmp_path, monkeypatch, cli):
    import uuid

    store = tmp_path / "claude" / "projects" / "-tmp-x"
    store.mkdir(parents=True)
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(tmp_path / "claude"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    line = {"type": "user", "cwd": "/tmp/x", "message": {"role": "user", "content": "hello"}}
    for n in range(2500):  # more than the 2,000 the cache used to keep
        (store / f"{uuid.UUID(int=n)}.jsonl").write_text(
            json.dumps({**line, "uuid": str(n)}) + "\n"
        )
    first = cli("sessions", "--all", "--limit", "100000", "--json")
    assert first.code == 0 and len(first.json()["sessions"]) == 2500
    counted = []
    real = orchestra.count_messages
    monkeypatch.setattr(orchestra, "count_messages", lambda *a: counted.append(a[0]) or real(*a))
    again = cli("sessions", "--all", "--limit", "100000", "--json")

    def counts(run):
        return {s["id"]: s["messages"] for s in run.json()["sessions"]}

    assert counts(again) == counts(first) and counted == []


def test_finding_agents_of_sessions_is_not_quadratic():
    index = orchestra.AgentIndex()
    for n in range(4000):
        record = {"session_id": f"S-{n}", "worktree": f"/w/task-{n}"}
        index.records[f"agent-{n:04d}"] = ("/repo", record)
    index.records["agent-dup"] = ("/repo", {"session_id": "s-7", "worktree": "/w/task-8"})
    start = time.perf_counter()
    found = [index.find(f"s-{n}", None) for n in range(4000)]
    assert time.perf_counter() - start < 1.0  # was seconds: all records sorted for every session
    assert found[:3] == ["agent-0000", "agent-0001", "agent-0002"] and found[7] == "agent-0007"
    assert (
        index.find("unknown", "/w/task-9/") == "agent-0009"
    )  # by worktree when no session matches
    assert index.find("unknown", "/elsewhere") is None
