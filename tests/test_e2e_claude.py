"""End to end with the real `claude` CLI, driven by the scripted Messages API on loopback."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import (
    ROOT,
    agent_states,
    commit_file,
    git,
    load_state,
    process_state,
    take_time,
    wait_for,
    wait_settled,
)
from scripted_api import bash, error, requires_claude, text

pytestmark = requires_claude


def busy(repo, agent_id):
    """True while the agent is inside a take_time() step."""
    activity = load_state(repo)["agents"][agent_id]["activity"] or ""
    return activity.startswith(f"Bash: {sys.executable} -c 'import time")


def session_files(api_env_dir):
    """Session ids that Claude Code wrote under CLAUDE_CONFIG_DIR."""
    return {p.stem for p in (api_env_dir / "projects").glob("*/*.jsonl")}


def test_real_agents_commit_take_time_and_fail(claude_repo, claude_api, cli, tmp_path):
    claude_api.script("write-alpha", [commit_file("alpha.txt", "alpha"), text("Wrote alpha.txt")])
    claude_api.script("write-beta", [commit_file("beta.txt", "beta"), text("Wrote beta.txt")])
    claude_api.script(
        "slow-gamma", [bash("sleep 4"), commit_file("gamma.txt", "gamma"), text("Slow but done")]
    )
    claude_api.script("api-breaks", [error(400, "scripted failure")])
    head = git("rev-parse", "HEAD", cwd=claude_repo)

    run = cli(
        "spawn",
        "--wait",
        "--parallel",
        "4",
        "write-alpha file",
        "write-beta file",
        "slow-gamma job",
        "api-breaks now",
    )

    assert run.code == 1, run  # one agent failed
    assert run.out.rstrip().endswith(
        "failed; total cost " + run.out.rstrip().rsplit("total cost ", 1)[1]
    )
    assert "3 done, 1 failed" in run.out
    agents = load_state(claude_repo)["agents"]
    for agent_id, name in (
        ("write-alpha-file", "alpha"),
        ("write-beta-file", "beta"),
        ("slow-gamma-job", "gamma"),
    ):
        record = agents[agent_id]
        assert record["state"] == "done", record
        assert record["exit_code"] == 0
        assert record["cost_usd"] > 0 and record["turns"] >= 2
        assert record["input_tokens"] > 0 and record["output_tokens"] > 0
        assert record["commits"] == 1 and record["files_changed"] == 1
        assert git("show", f"orchestra/{agent_id}:{name}.txt", cwd=claude_repo) == f"{name}\n"
        assert (
            git("log", "-1", "--format=%s", f"orchestra/{agent_id}", cwd=claude_repo)
            == f"add {name}.txt\n"
        )
    assert agents["slow-gamma-job"]["result"] == "Slow but done"
    started = [agents[i]["started_at"] for i in agents]
    assert len(set(started)) <= 2  # all four ran in parallel, not one after another

    failed = agents["api-breaks-now"]
    assert failed["state"] == "failed" and failed["exit_code"] == 1
    assert failed["error"] == "API Error: 400 scripted failure"

    sessions = session_files(tmp_path / "claude-config")
    assert {r["session_id"] for r in agents.values()} <= sessions
    assert len({r["session_id"] for r in agents.values()}) == 4

    # The user's checkout and HEAD are untouched.
    assert git("rev-parse", "HEAD", cwd=claude_repo) == head
    assert git("status", "--porcelain", cwd=claude_repo) == ""
    assert git("rev-parse", "--abbrev-ref", "HEAD", cwd=claude_repo) == "main\n"

    log = cli("logs", "write-alpha").out
    assert "-> Bash: printf 'alpha\\n' > alpha.txt && git add alpha.txt" in log
    assert "== DONE after" in log and log.rstrip().endswith("Wrote alpha.txt")


def test_supervisor_crash_loses_nothing(claude_repo, claude_api, cli):
    claude_api.script(
        "crash-one",
        [take_time(8, sys.executable), commit_file("one.txt", "one"), text("one finished")],
    )
    claude_api.script(
        "crash-two",
        [take_time(8, sys.executable), commit_file("two.txt", "two"), text("two finished")],
    )
    claude_api.script(
        "crash-paused",
        [take_time(6, sys.executable), commit_file("three.txt", "three"), text("three finished")],
    )
    assert cli("spawn", "crash-one", "crash-two", "crash-paused").code == 0

    def all_busy():
        return all(
            busy(claude_repo, agent_id) for agent_id in ("crash-one", "crash-two", "crash-paused")
        )

    wait_for(all_busy, timeout=60, what="three agents inside their busy step")
    assert cli("pause", "crash-paused").code == 0
    state = load_state(claude_repo)
    paused_pid = state["agents"]["crash-paused"]["pid"]
    os.kill(state["supervisor"]["pid"], signal.SIGKILL)
    wait_for(
        lambda: not _alive(state["supervisor"]["pid"]), timeout=10, what="the supervisor to die"
    )

    # The two running agents finish with nobody watching.
    for agent_id in ("crash-one", "crash-two"):
        pid = state["agents"][agent_id]["pid"]
        wait_for(lambda pid=pid: not _alive(pid), timeout=60, what=f"{agent_id} to finish")
    assert agent_states(claude_repo) == {
        "crash-one": "running",
        "crash-two": "running",
        "crash-paused": "paused",
    }

    # Any command notices the dead supervisor and starts a new one, which adopts and settles.
    run = cli("status")
    assert "the supervisor was not running; restarted it" in run.err
    settled = ("crash-one", "crash-two")
    wait_for(
        lambda: all(agent_states(claude_repo)[i] == "done" for i in settled),
        timeout=30,
        what="settlement",
    )
    agents = load_state(claude_repo)["agents"]
    for agent_id, word in (("crash-one", "one"), ("crash-two", "two")):
        assert agents[agent_id]["state"] == "done"
        assert agents[agent_id]["result"] == f"{word} finished"
        assert agents[agent_id]["cost_usd"] > 0 and agents[agent_id]["commits"] == 1
    assert agents["crash-paused"]["state"] == "paused"
    assert process_state(paused_pid) == "T"

    assert cli("resume", "crash-paused").out == "crash-paused: resumed\n"
    wait_settled(claude_repo)
    paused = load_state(claude_repo)["agents"]["crash-paused"]
    assert paused["state"] == "done" and paused["result"] == "three finished"
    assert git("show", "orchestra/crash-paused:three.txt", cwd=claude_repo) == "three\n"
    assert _stopped_processes(claude_repo) == []


def test_resume_relaunches_a_killed_agent_in_its_session(claude_repo, claude_api, cli):
    claude_api.script("endless-job", [take_time(60, sys.executable), text("never gets here")])
    claude_api.script(
        "Continue the task.", [commit_file("resumed.txt", "resumed"), text("resumed and finished")]
    )
    cli("spawn", "endless-job")
    wait_for(lambda: busy(claude_repo, "endless-job"), timeout=60, what="the agent to be busy")
    record = load_state(claude_repo)["agents"]["endless-job"]
    os.killpg(record["pid"], signal.SIGKILL)  # as a reboot would
    wait_for(
        lambda: agent_states(claude_repo)["endless-job"] == "interrupted",
        timeout=30,
        what="interrupted",
    )

    run = cli("resume", "endless")
    assert run.out == "endless-job: queued to resume its session\n"
    wait_settled(claude_repo)
    resumed = load_state(claude_repo)["agents"]["endless-job"]
    assert resumed["state"] == "done", resumed
    assert resumed["session_id"] == record["session_id"]
    assert resumed["result"] == "resumed and finished"
    assert resumed["cost_usd"] > 0 and resumed["commits"] == 1
    assert git("show", "orchestra/endless-job:resumed.txt", cwd=claude_repo) == "resumed\n"
    # The resumed request carried the original conversation.
    last = claude_api.main_requests[-1]
    assert "endless-job" in str(last["messages"]) and "Continue the task." in str(last["messages"])
    assert "== resumed its session" in cli("logs", "endless-job").out


def test_stop_ends_a_real_agent_and_keeps_its_work(claude_repo, claude_api, cli):
    claude_api.script(
        "stoppable",
        [commit_file("early.txt", "early"), take_time(60, sys.executable), text("never")],
    )
    cli("spawn", "stoppable")
    wait_for(lambda: busy(claude_repo, "stoppable"), timeout=60, what="the agent to be busy")
    pid = load_state(claude_repo)["agents"]["stoppable"]["pid"]
    assert cli("stop", "stoppable").code == 0
    wait_settled(claude_repo)
    record = load_state(claude_repo)["agents"]["stoppable"]
    assert record["state"] == "stopped" and not _alive(pid)
    assert git("show", "orchestra/stoppable:early.txt", cwd=claude_repo) == "early\n"
    assert _stopped_processes(claude_repo) == []


def test_the_real_file_runs_spawn_in_a_subprocess(claude_repo, claude_api):
    claude_api.script(
        "subprocess-task", [commit_file("sub.txt", "sub"), text("done from a subprocess")]
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "orchestra.py"), "spawn", "--wait", "subprocess-task"],
        cwd=claude_repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "subprocess-task: done - done from a subprocess" in done.stdout


def _alive(pid):
    return process_state(pid) is not None


def _stopped_processes(repo):
    """This repository's agent processes left stopped (state T): there must be none."""
    stopped = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and process_state(int(entry)) == "T":
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if b"ORCHESTRA_AGENT_ID=" in environ and cwd.startswith(str(repo)):
                stopped.append(int(entry))
    return stopped
