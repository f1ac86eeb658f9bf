"""The state store: locked atomic updates across processes, and recovery from corruption."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import orchestra
from conftest import (
    FAKE_AGENT_COMMAND,
    ROOT,
    agent_states,
    load_state,
    wait_for,
    wait_settled,
    write_config,
)

COUNTER = """
import sys
sys.path.insert(0, {root!r})
import orchestra

store = orchestra.StateStore({path!r}, dict)
for _ in range({n}):
    store.update(lambda s: s.__setitem__("counter", s.get("counter", 0) + 1))
"""

CHURN = """
import sys
sys.path.insert(0, {root!r})
import orchestra

store = orchestra.StateStore({path!r}, dict)
padding = "x" * 200_000
while True:
    store.update(lambda s: s.update(counter=s.get("counter", 0) + 1, padding=padding))
"""


def test_eight_processes_fifty_updates_each(tmp_path):
    path = tmp_path / "state.json"
    script = COUNTER.format(root=str(ROOT), path=str(path), n=50)
    workers = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(8)]
    assert [w.wait(timeout=120) for w in workers] == [0] * 8
    assert json.loads(path.read_text())["counter"] == 400


def test_kill_during_writes_never_leaves_an_unreadable_file(tmp_path):
    path = tmp_path / "state.json"
    script = CHURN.format(root=str(ROOT), path=str(path))
    for attempt in range(15):
        writer = subprocess.Popen([sys.executable, "-c", script])
        wait_for(path.exists, timeout=30, interval=0.01, what="the first write")
        time.sleep(0.05 + attempt * 0.02)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        state = json.loads(path.read_text())  # never half a file
        assert state["version"] == orchestra.STATE_VERSION
    assert state["counter"] > 0
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("state.json", "state.lock")]
    assert all(
        name.endswith(".tmp") for name in leftovers
    )  # at most the temp file of a killed write


def test_state_is_versioned_sorted_and_compact(tmp_path):
    store = orchestra.StateStore(tmp_path / "state.json", dict)
    store.update(lambda s: s["agents"].update(b={}, a={}))
    text = (tmp_path / "state.json").read_text()
    assert text.startswith('{"agents":{"a":{},"b":{}},') and text.count("\n") == 1
    assert json.loads(text)["version"] == 1


def test_newer_state_version_is_refused(fake_repo, cli):
    cli("init")
    (fake_repo / ".orchestra" / "state.json").write_text('{"version": 2, "agents": {}}')
    run = cli("status")
    assert run.code == 2
    assert "has version 2, this orchestra reads version 1; upgrade orchestra" in run.err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "wrong shape"])
def test_corrupt_state_is_moved_aside_and_rebuilt(fake_repo, cli, damage):
    cli("spawn", "commit:a.txt first job", "fail second job")
    wait_settled(fake_repo)
    path = fake_repo / ".orchestra" / "state.json"
    good = load_state(fake_repo)["agents"]
    text = path.read_text()
    path.write_text(
        {
            "truncate": text[: len(text) // 2],
            "garbage": "\x00\x01 nonsense",
            "empty": "",
            "wrong shape": "[]",
        }[damage]
    )

    run = cli("status", "--json")
    assert run.code == 0
    assert run.err.startswith(
        f"orchestra: warning: {path} was unreadable; moved it to state.json.corrupt-"
    )
    assert "rebuilt 2 agent record(s) from logs and worktrees" in run.err
    rebuilt = {a["id"]: a for a in run.json()["agents"]}
    for agent_id in ("commit-txt-first", "fail-second-job"):
        for key in (
            "task",
            "branch",
            "worktree",
            "base_commit",
            "session_id",
            "cost_usd",
            "result",
        ):
            assert rebuilt[agent_id][key] == good[agent_id][key], key
    assert rebuilt["commit-txt-first"]["state"] == "done"
    assert rebuilt["fail-second-job"]["state"] == "failed"
    assert len(list(path.parent.glob("state.json.corrupt-*"))) == 1
    assert cli("status").err == ""  # reported once


def test_rebuild_keeps_exit_status_stops_and_setup_failures(fake_repo, cli):
    cli("spawn", "--parallel", "1", "crash:9 dies", "sleep:5 never runs")
    cli("stop", "sleep-5-never")
    wait_settled(fake_repo)
    (fake_repo / ".orchestra" / "state.json").write_text("{")
    agents = {a["id"]: a for a in cli("status", "--json").json()["agents"]}
    assert agents["crash-9-dies"]["state"] == "failed"
    assert agents["crash-9-dies"]["error"] == "agent exited with status 9"
    assert agents["sleep-5-never"]["state"] == "stopped"


def test_rebuilt_agent_that_ended_unwatched_is_interrupted(fake_repo, cli):
    cli("spawn", "crash:9 dies")
    wait_settled(fake_repo)
    log = fake_repo / ".orchestra" / "logs" / "crash-9-dies.jsonl"
    log.write_text(
        "".join(line + "\n" for line in log.read_text().splitlines() if '"settled"' not in line)
    )
    (fake_repo / ".orchestra" / "state.json").write_text("{")
    agent = cli("status", "--json").json()["agents"][0]
    assert agent["state"] == "interrupted"


def test_lock_timeout_is_an_error(tmp_path):
    lock = orchestra.FileLock(tmp_path / "x.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl,os,time; fd=os.open({str(tmp_path / 'x.lock')!r}, os.O_RDWR|os.O_CREAT); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == b"held\n"
        assert lock.acquire(timeout=0.3) is False
        assert lock.acquire(blocking=False) is False
    finally:
        holder.kill()
        holder.wait()
    assert lock.acquire(timeout=5) is True
    lock.release()
    assert os.path.exists(tmp_path / "x.lock")


def test_a_state_rebuilt_while_agents_run_keeps_them_running(fake_repo, cli):
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, default_parallel=1)
    assert cli("spawn", "sleep:4 commit:a.txt first", "commit:b.txt second").code == 0
    wait_for(
        lambda: agent_states(fake_repo).get("sleep-4-commit") == "running",
        timeout=30,
        what="running",
    )
    with orchestra.FileLock(fake_repo / ".orchestra" / "state.lock"):
        (fake_repo / ".orchestra" / "state.json").write_text("{ torn")
    states = {a["id"]: a["state"] for a in cli("status", "--json").json()["agents"]}
    assert states == {
        "sleep-4-commit": "running",
        "commit-b-txt": "queued",
    }  # parallel 1 still holds
    wait_settled(fake_repo, timeout=60)
    assert set(agent_states(fake_repo).values()) == {"done"}
