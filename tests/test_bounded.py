"""Issue 19, findings 2 and 3: bounded work for any input, and less in sight of other users."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

import orchestra
from conftest import add_record, load_state, wait_for, wait_settled, write_config
from scripted_api import bash, requires_claude, text

BIG = 60 * 1024 * 1024


def cpu_seconds(action):
    """CPU time (this process) an action takes, and its result."""
    before = time.process_time()
    result = action()
    return time.process_time() - before, result


def write_big_log(path):
    """A log: a spawn-like event, one 60 MB line, then a few short ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b'{"type": "orchestra", "event": "launch"}\n')
        f.write(b'{"type": "assistant", "message": {"content": "' + b"x" * BIG + b'"}}\n')
        for n in range(3):
            f.write(
                json.dumps({"type": "assistant", "message": {"content": f"line {n}"}}).encode()
                + b"\n"
            )


def test_a_60_mb_line_is_tailed_in_linear_time_and_shown_cut(project, cli, server):
    add_record(project, "huge", state="done", log=str(project.log_path("huge")))
    write_big_log(project.log_path("huge"))
    seconds, run = cpu_seconds(lambda: cli("logs", "huge", "--tail", "5"))
    assert run.code == 0 and seconds < 3, seconds  # was 40 s: quadratic
    assert "line 0" in run.out and "line 2" in run.out
    assert f"… [line cut: {BIG + 49} bytes]" in run.out
    assert max(len(line) for line in run.out.splitlines()) < 3000
    started = time.monotonic()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.server_address[1]}/api/agents/huge/log?tail=5",
        headers={"Authorization": f"Bearer {server.gate.token.decode()}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        lines = json.loads(response.read())["lines"]
    assert time.monotonic() - started < 5
    assert lines[-1] == "line 2" and any("[line cut:" in line for line in lines)
    whole, run = cpu_seconds(lambda: cli("logs", "huge"))  # the whole log, streamed
    assert run.code == 0 and whole < 5 and "[line cut:" in run.out and "line 2" in run.out


def test_tail_and_stream_agree_on_every_line_length(tmp_path, monkeypatch):
    monkeypatch.setattr(orchestra, "LOG_LINE_CAP", 100)
    monkeypatch.setattr(orchestra, "LOG_TAIL_BLOCK", 7)
    monkeypatch.setattr(orchestra, "LOG_READ_CHUNK", 5)
    monkeypatch.setattr(orchestra, "LOGS_FIRST_CHUNK", 3)
    raw = orchestra.log_renderer(True)
    lengths = [0, 1, 99, 100, 101, 250, 3, 0, 7]
    path = tmp_path / "a.log"
    path.write_bytes(b"".join(b"a" * n + b"\n" for n in lengths) + b"unfinished")
    streamed = []
    end = orchestra.stream_log(path, 0, raw, streamed.extend)
    tailed, tail_end, _ = orchestra.tail_lines(path, 100, raw)
    assert streamed == tailed and end == tail_end == path.stat().st_size - len("unfinished")
    assert [len(x) for x in streamed[:4]] == [0, 1, 99, 100]
    assert (
        streamed[4].endswith("… [line cut: 101 bytes]") and "[line cut: 250 bytes]" in streamed[5]
    )


def test_a_line_nested_100000_deep_is_unreadable_not_fatal(repo, cli):
    deep = "[" * 100_000 + "]" * 100_000
    write_config(repo, agent_command=["sh", "-c", "{task}"], heartbeat_interval=0.5)
    task = f"{sys.executable} -c \"print('{deep[:1]}' * 100000 + '{deep[-1:]}' * 100000); print('after it')\""
    assert cli("spawn", "--name", "deep", task).code == 0
    wait_settled(repo)
    assert load_state(repo)["agents"]["deep"]["state"] == "done"  # the watcher lived on
    out = cli("logs", "deep")
    assert out.code == 0 and "Traceback" not in out.err + out.out and "after it" in out.out
    assert "[unreadable line: 200000 characters]" in out.out
    state = repo / ".orchestra" / "state.json"
    state.write_text("{broken")
    listed = cli("status", "--json")
    assert listed.code == 0 and [a["id"] for a in listed.json()["agents"]] == ["deep"]
    assert list(state.parent.glob("state.json.corrupt-*"))


def test_a_failed_rebuild_leaves_state_json_in_place(project, monkeypatch):
    state = project.dir / "state.json"
    state.write_text("{broken")
    monkeypatch.setattr(orchestra, "rebuild_state", lambda project: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        project.store.load()
    assert state.read_text() == "{broken"  # nothing moved aside before a new file was written


def test_the_json_depth_check_is_linear():
    hostile = b'"' + b'\\"' * (128 * 1024)  # an unterminated string of escaped quotes, 256 KB
    seconds, ok = cpu_seconds(lambda: orchestra.json_depth_ok(hostile))
    assert ok and seconds < 0.5, seconds  # was 246 s
    quotes = b'["' + b'\\\\\\"' * 60_000 + b'"]'
    assert orchestra.json_depth_ok(quotes)
    assert not orchestra.json_depth_ok(b"[" * 33 + b"]" * 33)
    assert orchestra.json_depth_ok(b'["[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]')
    assert not orchestra.json_depth_ok(b'["\\\\"' + b"[" * 40)


def test_env_files_go_with_a_stopped_or_cleaned_up_agent(fake_repo, cli):
    write_config(fake_repo, default_parallel=1)
    assert cli("spawn", "sleep-30 first", "sleep-30 second").code == 0
    env = fake_repo / ".orchestra" / "env"
    wait_for(lambda: load_state(fake_repo)["agents"]["sleep-30-first"]["state"] == "running",
             what="the first agent to run")  # fmt: skip
    second = next(a for a in load_state(fake_repo)["agents"] if a != "sleep-30-first")
    assert (env / second).exists()  # queued: its environment waits for its launch
    assert cli("stop", second, "sleep-30-first").code == 0
    assert not (env / second).exists() and not list(env.glob("sleep-30*"))
    assert cli("cleanup", "--all", "--force").code in (0, 1)
    assert not [p for p in env.iterdir() if not p.name.startswith(".")]


def test_api_sessions_lists_this_repository_unless_all(server, project, tmp_path, monkeypatch):
    config = tmp_path / "claude"
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(config))
    server.env = dict(os.environ)
    mine, other = str(project.repo), "/elsewhere/secret-project"
    for n, cwd in enumerate((mine, other)):
        folder = config / "projects" / re.sub(r"[^A-Za-z0-9]", "-", cwd)
        folder.mkdir(parents=True)
        sid = f"{n:08x}-0000-4000-8000-{n:012x}"
        line = {"type": "user", "message": {"role": "user", "content": f"prompt in {cwd}"},
                "uuid": f"u{n}", "timestamp": "2026-01-01T00:00:00.000Z", "cwd": cwd,
                "sessionId": sid, "version": "2.1.331", "gitBranch": "main"}  # fmt: skip
        (folder / f"{sid}.jsonl").write_text(json.dumps(line) + "\n")

    def get(path):
        request = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}{path}",
                                         headers={"Authorization": f"Bearer {server.gate.token.decode()}"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    here = get("/api/sessions?hours=8760")
    assert [s["cwd"] for s in here["sessions"]] == [mine]
    everywhere = get("/api/sessions?hours=8760&all=1")
    assert sorted(s["cwd"] for s in everywhere["sessions"]) == sorted([mine, other])


def test_notify_command_may_not_put_the_message_in_argv(repo, cli):
    write_config(repo, notify_command=["ntfy", "publish", "topic", "{message}"])
    run = cli("status")
    assert run.code == 2 and "$ORCHESTRA_MESSAGE" in run.err and "{agent}" in run.err


@requires_claude
def test_the_task_is_not_in_any_command_line(claude_repo, claude_api, cli):
    task = "secret-task-words do the thing"
    claude_api.script(task, [bash("sleep 3"), text("done")])
    assert cli("spawn", "--name", "hidden", task).code == 0

    def agent_pid():
        return load_state(claude_repo)["agents"]["hidden"].get("pid")

    pid = wait_for(agent_pid, what="the agent to start")
    seen = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(pid) and "secret-task-words" not in seen
    wait_settled(claude_repo)
    record = load_state(claude_repo)["agents"]["hidden"]
    assert record["state"] == "done" and record["result"] == "done"
