"""Approvals and the sandbox, end to end: the real claude CLI asks, orchestra's hook waits, a user decides."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orchestra
from conftest import ROOT, git, load_state, wait_for, wait_settled, write_config
from scripted_api import bash, requires_claude, text

pytestmark = requires_claude

ALLOWED = ["Edit", "Write", "Bash(git *)"]  # the default rules: anything else asks


def commit_step(name):
    """Write a file and commit it (git is allowed; the write is a separate, allowed step)."""
    return [bash(f"git add {name}"), bash(f"git commit -qm 'add {name}'")]


def ask_repo(repo, **config):
    """A project whose agents run the real claude with only the default rules."""
    write_config(repo, bypass_permissions=ALLOWED, heartbeat_interval=0.5, **config)
    return repo


def pending(cli):
    """The pending requests as `orchestra approvals --json` lists them."""
    run = cli("approvals", "--json")
    assert run.code == 0, run
    return run.json()["approvals"]


def wait_request(cli, agent_id, timeout=60):
    """The first pending request of an agent."""

    def found():
        return [r for r in pending(cli) if r["agent"] == agent_id]

    return wait_for(found, timeout=timeout, what=f"{agent_id} to ask for approval")[0]


def tool_results(api):
    """Every tool_result block the CLI sent back to the scripted API."""
    results = []
    for body in api.main_requests:
        for message in body.get("messages", []):
            if isinstance(message.get("content"), list):
                results += [b for b in message["content"] if b.get("type") == "tool_result"]
    return results


def result_text(block):
    content = block.get("content")
    if isinstance(content, list):
        return " ".join(b.get("text", "") for b in content if isinstance(b, dict))
    return content or ""


def test_approve_lets_the_command_run_and_commit(repo, claude_api, cli):
    ask_repo(repo)
    claude_api.script(
        "needs-ok",
        [bash("printf 'ok\\n' > approved.txt"), *commit_step("approved.txt"), text("committed it")],
    )
    assert cli("spawn", "needs-ok").code == 0
    started = time.monotonic()
    request = wait_request(cli, "needs-ok")
    assert request["tool"] == "Bash" and request["summary"] == "Bash(printf 'ok\\n' > approved.txt)"
    assert request["input"]["command"] == "printf 'ok\\n' > approved.txt"
    status = cli("status", "--json").json()["agents"][0]
    assert status["state"] == "running" and status["approval"]["id"] == request["id"]
    assert status["approval"]["tool"] == "Bash" and status["sandboxed"] is False
    table = cli("status").out
    assert "running approval" in table and f"waiting for approval {request['id']}: Bash(printf" in table
    listing = cli("approvals").out
    assert request["id"] in listing and "needs-ok" in listing
    assert time.monotonic() - started < 60

    run = cli("approve", request["id"])
    assert run.code == 0 and f"allowed {request['id']}" in run.out
    wait_settled(repo)
    record = load_state(repo)["agents"]["needs-ok"]
    assert record["state"] == "done" and record["commits"] == 1, record
    assert git("show", "orchestra/needs-ok:approved.txt", cwd=repo) == "ok\n"
    assert not record.get("permission_denials")
    log = cli("logs", "needs-ok").out
    assert (
        f"?? waiting for approval: Bash(printf 'ok\\n' > approved.txt) (orchestra approve {request['id']})"
        in log
    )
    assert "== allowed by cli: Bash(printf" in log
    events = [json.loads(line) for line in Path(record["log"]).read_text().splitlines() if '"approval"' in line]
    assert events[-1]["by"] == "cli" and events[-1]["decision"] == "allow" and events[-1]["at"]
    assert pending(cli) == []
    late = cli("approve", request["id"])
    assert late.code == 1 and "already allowed by cli" in late.err and "came late" in late.err


def test_deny_message_reaches_the_agent_and_the_record(repo, claude_api, cli):
    ask_repo(repo)
    claude_api.script("no-tests", [bash("pytest -q"), text("could not run the tests")])
    assert cli("spawn", "no-tests").code == 0
    wait_request(cli, "no-tests")
    run = cli("deny", "no-tests", "--message", "not now: use the staging database")
    assert run.code == 0 and "denied" in run.out
    wait_settled(repo)
    results = [b for b in tool_results(claude_api) if "staging" in result_text(b)]
    assert results and results[0]["is_error"] is True
    assert result_text(results[0]) == "not now: use the staging database"
    record = load_state(repo)["agents"]["no-tests"]
    assert record["state"] == "done"
    assert record["permission_denials"] == [{"tool_name": "Bash", "tool_input": {"command": "pytest -q",
                                             "description": "Run a scripted shell command"}}]  # fmt: skip
    out = cli("status").out
    assert "no-tests: 1 tool call denied: Bash(pytest -q)" in out
    assert "orchestra config set bypass_permissions '[\"Bash(pytest -q)\"]'" in out
    assert "1 tool call denied: Bash(pytest -q)" in cli("collect", "no-tests").out
    ended = cli("deny", "no-tests")
    assert ended.code == 1 and "has ended (done)" in ended.err


def test_always_answers_the_next_matching_request(repo, claude_api, cli):
    ask_repo(repo)
    step = bash("echo same > twice.txt")
    claude_api.script("twice-job", [step, step, bash("echo other > other.txt"), text("all done")])
    assert cli("spawn", "twice-job").code == 0
    first = wait_request(cli, "twice-job")
    run = cli("approve", "twice-job", "--always")
    assert run.code == 0 and "without asking for the rest of its run" in run.out
    second = wait_request(cli, "twice-job")  # the third call is another command: it asks
    assert second["id"] != first["id"] and second["summary"] == "Bash(echo other > other.txt)"
    run = cli("approve", second["id"], "--always=project")
    assert "added Bash(echo other > other.txt) to bypass_permissions" in run.out
    wait_settled(repo)
    log = cli("logs", "twice-job").out
    assert log.count("?? waiting for approval") == 2
    assert "== allowed by rule Bash(echo same > twice.txt): Bash(echo same > twice.txt)" in log
    config = json.loads((repo / ".orchestra" / "config.json").read_text())
    assert config["bypass_permissions"] == [*ALLOWED, "Bash(echo other > other.txt)"]


def test_timeout_denies_with_a_message(repo, claude_api, cli):
    ask_repo(repo, approval_timeout=1)
    claude_api.script("slow-user", [bash("make deploy"), text("gave up")])
    assert cli("spawn", "slow-user").code == 0
    wait_settled(repo)
    results = [result_text(b) for b in tool_results(claude_api)]
    assert any("no decision within approval_timeout (1 s); denied" in r for r in results), results
    record = load_state(repo)["agents"]["slow-user"]
    assert record["permission_denials"][0]["tool_input"]["command"] == "make deploy"
    assert "== denied by timeout: Bash(make deploy)" in cli("logs", "slow-user").out


def test_supervisor_killed_while_waiting_then_approved(repo, claude_api, cli):
    ask_repo(repo)
    claude_api.script("crash-wait", [bash("touch survived.txt"), *commit_step("survived.txt"), text("ok")])
    assert cli("spawn", "crash-wait").code == 0
    request = wait_request(cli, "crash-wait")
    supervisor = load_state(repo)["supervisor"]["pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not orchestra.process_alive(supervisor, load_state(repo)["supervisor"].get("pid_start")),
             timeout=10, what="the supervisor to die")  # fmt: skip
    time.sleep(0.5)
    assert [r["id"] for r in pending(cli)] == [request["id"]]  # the hook (the agent's child) still waits
    assert cli("approve", request["id"]).code == 0
    cli("status")  # revives the supervisor
    wait_settled(repo)
    record = load_state(repo)["agents"]["crash-wait"]
    assert record["state"] == "done" and record["commits"] == 1


def test_two_concurrent_approvers_first_wins(repo, claude_api, cli):
    ask_repo(repo)
    claude_api.script("race-job", [bash("echo raced > race.txt"), text("ok")])
    assert cli("spawn", "race-job").code == 0
    request = wait_request(cli, "race-job")
    project = orchestra.Project.open(repo, os.environ)
    outcomes, barrier = [], threading.Barrier(2)

    def decide(allow):
        barrier.wait()
        try:
            outcomes.append(("won", orchestra.answer_request(project, request, allow, "cli")["decision"]))
        except orchestra.OrchestraError as e:
            outcomes.append(("late", str(e)))

    threads = [threading.Thread(target=decide, args=(allow,)) for allow in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(kind for kind, _ in outcomes) == ["late", "won"], outcomes
    winner = next(d for kind, d in outcomes if kind == "won")
    late = next(m for kind, m in outcomes if kind == "late")
    assert "came late" in late and ("allowed" if winner == "allow" else "denied") in late
    wait_settled(repo)
    assert ((repo / ".worktrees" / "task-race-job" / "race.txt").exists()) == (winner == "allow")


def test_unknown_agent_or_broken_request_is_denied(repo, cli):
    """The hook never allows when in doubt."""
    cli("init")

    def hook(stdin, agent="ghost"):
        done = subprocess.run(
            [sys.executable, str(ROOT / "orchestra.py"), "hook", "permission-request", "--repo", str(repo),
             "--agent", agent, "--timeout", "1"], input=stdin, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done
        return json.loads(done.stdout)["hookSpecificOutput"]["decision"]

    request = json.dumps({"tool_name": "Bash", "tool_input": {"command": "rm -rf /"}})
    decision = hook(request)
    assert decision["behavior"] == "deny" and "cannot find agent 'ghost'" in decision["message"]
    decision = hook("not json")
    assert decision["behavior"] == "deny" and "could not read the permission request" in decision["message"]
    decision = subprocess.run(
        [sys.executable, str(ROOT / "orchestra.py"), "hook", "permission-request", "--repo", str(repo / "nowhere"),
         "--agent", "x"], input=request, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert json.loads(decision.stdout)["hookSpecificOutput"]["decision"]["behavior"] == "deny"


def test_rules_match_like_claude_code():
    match = orchestra.rule_matches
    assert match("Bash(pytest -q)", "Bash", {"command": "pytest -q"})
    assert not match("Bash(pytest -q)", "Bash", {"command": "pytest -q -x"})
    assert match("Bash(npm test:*)", "Bash", {"command": "npm test --watch"})
    assert match("Bash(git *)", "Bash", {"command": "git status"})
    assert not match("Bash(git *)", "Bash", {"command": "git status && rm -rf /"})
    assert match("Edit", "Edit", {"file_path": "/x"}) and not match("Edit", "Write", {"file_path": "/x"})
    assert match("Edit(src/*)", "Edit", {"file_path": "src/a.py"})
