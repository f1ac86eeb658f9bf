"""The state file at scale: live records in state.json, cleaned-up ones in history.jsonl, rare writes."""

import json
import os
import subprocess
import sys
import time

import orchestra
from conftest import FAKE_AGENT_COMMAND, ROOT, load_state, wait_for, wait_settled, write_config

HISTORY_WRITER = """
import sys
sys.path.insert(0, {root!r})
import orchestra

store = orchestra.StateStore({path!r}, dict)
for n in range({n}):
    agent_id = "w{w}-" + str(n)
    store.update(lambda s: s["agents"].__setitem__(agent_id, {{"id": agent_id, "state": "done"}}))
    store.update(lambda s: s["agents"][agent_id].update(state="removed"))
    store.update(lambda s: s.__setitem__("counter", s.get("counter", 0) + 1))
"""


def history_path(repo):
    return repo / ".orchestra" / "history.jsonl"


def spawn_and_clean(cli, fake_repo, *tasks):
    """Spawn agents that commit nothing, wait, and clean them up (nothing to lose)."""
    run = cli("spawn", "--json", *tasks)
    assert run.code == 0
    wait_settled(fake_repo)
    assert cli("cleanup", *[a["id"] for a in run.json()["agents"]]).code == 0


def test_removed_agents_move_to_history(fake_repo, cli):
    cli("spawn", "sleep:1 stays")
    spawn_and_clean(cli, fake_repo, "first gone", "second gone")
    assert set(load_state(fake_repo)["agents"]) == {"sleep-1-stays"}
    lines = history_path(fake_repo).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["first-gone", "second-gone"]
    assert all(json.loads(line)["state"] == "removed" for line in lines)

    assert [a["id"] for a in cli("status", "--json").json()["agents"]] == ["sleep-1-stays"]
    everything = cli("status", "--all", "--json").json()["agents"]
    assert [(a["id"], a["state"]) for a in everything] == [
        ("sleep-1-stays", "done"),
        ("first-gone", "removed"),
        ("second-gone", "removed"),
    ]
    prefix = cli("status", "--json", "first")  # a prefix means live agents only
    assert prefix.code == 2 and "cleaned up: first-gone" in prefix.err
    named = cli("status", "--json", "first-gone").json()["agents"]
    assert [(a["id"], a["state"]) for a in named] == [("first-gone", "removed")]
    assert "first-gone" in cli("status", "--all").out and "first-gone" not in cli("status").out
    again = cli("cleanup", "first-gone")
    assert again.code == 2 and "first-gone was already removed" in again.err
    collected = cli("collect", "second-gone")  # read from its archive
    assert collected.code == 0 and "== second-gone: cleaned up" in collected.out
    assert "orchestra restore second-gone" in collected.out
    assert "spawned on" in cli("logs", "first-gone").out


def test_a_removed_id_is_not_given_to_a_new_agent(fake_repo, cli):
    spawn_and_clean(cli, fake_repo, "same task")
    cli("spawn", "same task")
    wait_settled(fake_repo)
    assert set(load_state(fake_repo)["agents"]) == {"same-task-2"}
    assert cli("status", "same-task", "--json").json()["agents"][0]["state"] == "removed"


def test_spawn_order_keeps_growing_after_records_move_out(fake_repo, cli):
    spawn_and_clean(cli, fake_repo, "one", "two")
    cli("spawn", "three")
    wait_settled(fake_repo)
    seqs = {r["id"]: r["seq"] for r in orchestra.read_history(history_path(fake_repo)).values()}
    assert load_state(fake_repo)["agents"]["three"]["seq"] > max(seqs.values())


def test_old_state_file_with_removed_records_is_migrated_on_first_write(fake_repo, cli):
    spawn_and_clean(cli, fake_repo, "old one", "old two")
    cli("spawn", "sleep:30 live")
    path, history = fake_repo / ".orchestra" / "state.json", history_path(fake_repo)
    state = load_state(fake_repo)
    for record in orchestra.read_history(history).values():
        state["agents"][record["id"]] = record
    path.write_text(
        json.dumps(state, indent=2, sort_keys=True) + "\n"
    )  # the previous version's file
    history.unlink()

    assert [a["id"] for a in cli("status", "--json").json()["agents"]] == [
        "sleep-30-live"
    ]  # read: hidden
    assert sorted(a["id"] for a in cli("status", "--all", "--json").json()["agents"]) == [
        "old-one",
        "old-two",
        "sleep-30-live",
    ]
    cli("stop", "sleep-30-live")  # the first write moves them
    assert set(load_state(fake_repo)["agents"]) == {"sleep-30-live"}
    assert sorted(orchestra.read_history(history)) == ["old-one", "old-two"]
    assert "\n" not in path.read_text().rstrip("\n")  # compact now


def test_a_torn_last_history_line_is_skipped_and_closed(fake_repo, cli):
    spawn_and_clean(cli, fake_repo, "before tear")
    history = history_path(fake_repo)
    with open(history, "a") as f:
        f.write('{"id": "half-writ')  # a writer killed mid-line
    assert sorted(a["id"] for a in cli("status", "--all", "--json").json()["agents"]) == [
        "before-tear"
    ]
    spawn_and_clean(cli, fake_repo, "after tear")
    assert sorted(orchestra.read_history(history)) == ["after-tear", "before-tear"]
    assert history.read_text().splitlines()[1] == '{"id": "half-writ'


def test_rebuild_from_logs_keeps_removed_agents_in_history(fake_repo, cli):
    spawn_and_clean(cli, fake_repo, "was cleaned")
    cli("spawn", "still here")
    wait_settled(fake_repo)
    (fake_repo / ".orchestra" / "state.json").write_text("{")
    run = cli("status", "--json")
    assert "rebuilt 1 agent record(s)" in run.err
    assert [(a["id"], a["state"]) for a in run.json()["agents"]] == [("still-here", "done")]
    named = cli("status", "was-cleaned", "--json").json()["agents"]
    assert [(a["id"], a["state"]) for a in named] == [("was-cleaned", "removed")]


def test_eight_writers_lose_no_update_and_no_history_line(tmp_path):
    path = tmp_path / "state.json"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", HISTORY_WRITER.format(root=str(ROOT), path=str(path), n=15, w=w)]
        )
        for w in range(8)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0] * 8
    state = json.loads(path.read_text())
    assert state["counter"] == 120 and state["agents"] == {}
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == 120 and len({json.loads(line)["id"] for line in lines}) == 120


def test_an_update_that_changes_nothing_writes_nothing(tmp_path):
    store = orchestra.StateStore(tmp_path / "state.json", dict)
    store.update(lambda s: s["agents"].update(a={"id": "a", "state": "done"}))
    before = os.stat(tmp_path / "state.json")
    assert store.update(lambda s: s["agents"]["a"].update(state="done")) is None
    after = os.stat(tmp_path / "state.json")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_an_idle_supervisor_does_not_write(fake_repo, cli):
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, heartbeat_interval=60)
    cli("spawn", "quiet sleep:6 idle")
    path = fake_repo / ".orchestra" / "state.json"
    wait_for(
        lambda: load_state(fake_repo)["agents"]["quiet-sleep-6"]["state"] == "running", timeout=20
    )
    time.sleep(1.5)  # the start and its first facts are written
    inode = os.stat(path).st_ino
    time.sleep(2.5)  # five ticks, with the agent running and printing nothing
    assert os.stat(path).st_ino == inode
    wait_settled(fake_repo)
