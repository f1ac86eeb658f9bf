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

ALLOWED = ["Edit", "Write", "Bash(git *)"]  # the rules before containment: anything else asks


def commit_step(name):
    """Write a file and commit it (git is allowed; the write is a separate, allowed step)."""
    return [bash(f"git add {name}"), bash(f"git commit -qm 'add {name}'")]


def ask_repo(repo, **config):
    """A project whose agents run the real claude with only the default rules."""
    config.setdefault("sandbox", "off")  # sandboxed Bash would not ask
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
    written = (repo / ".orchestra" / "approvals" / f"{request['id']}.json").stat().st_mtime
    assert time.time() - written < 1.0  # listed within a second of the hook recording it
    assert request["tool"] == "Bash" and request["summary"] == "Bash(printf 'ok\\n' > approved.txt)"
    assert request["input"]["command"] == "printf 'ok\\n' > approved.txt"
    status = cli("status", "--json").json()["agents"][0]
    assert status["state"] == "running" and status["approval"]["id"] == request["id"]
    assert status["approval"]["tool"] == "Bash" and status["sandboxed"] is False
    table = cli("status").out
    assert "running approval" in table
    assert f"waiting for approval {request['id']} (2 lines, 56 bytes" in table, table
    assert "    command: printf 'ok\\n' > approved.txt" in table
    listing = cli("approvals").out
    assert request["id"] in listing and "needs-ok" in listing
    assert "command: printf 'ok\\n' > approved.txt" in listing
    assert time.monotonic() - started < 60

    run = cli("approve", request["id"][:4])  # a unique prefix of the request id will do
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
    events = [
        json.loads(line)
        for line in Path(record["log"]).read_text().splitlines()
        if '"approval"' in line
    ]
    assert events[-1]["by"] == "cli" and events[-1]["decision"] == "allow" and events[-1]["at"]
    assert pending(cli) == []
    late = cli("approve", request["id"])
    assert late.code == 1 and "already allowed by cli" in late.err and "came late" in late.err


def notifier(tmp_path):
    """A notify_command that appends each call's arguments to a file, and that file."""
    script, events = tmp_path / "notify.py", tmp_path / "events.jsonl"
    script.write_text(
        f"import json, sys\nwith open({str(events)!r}, 'a') as f:\n    f.write(json.dumps([*sys.argv[1:], sys.stdin.read()]) + '\\n')\n"
    )
    return [sys.executable, str(script), "{agent}", "{event}"], events


def notified(events):
    """The (agent, event, message) triples the notify command received."""
    return (
        [tuple(json.loads(line)) for line in events.read_text().splitlines()]
        if events.exists()
        else []
    )


def test_deny_message_reaches_the_agent_and_the_record(repo, claude_api, cli, tmp_path):
    command, events = notifier(tmp_path)
    ask_repo(repo, notify_command=command)
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
    assert "allow them next time" not in out  # the user denied it: no hint to allow it
    collected = cli("collect", "no-tests").out
    assert "1 tool call denied: Bash(pytest -q)" in collected
    assert "allow them next time" not in collected
    ended = cli("deny", "no-tests")
    assert ended.code == 1 and "has ended (done)" in ended.err
    wait_for(lambda: len(notified(events)) == 2, timeout=30, what="two notifications")
    (agent, event, message), done = notified(events)
    assert (
        (agent, event) == ("no-tests", "approval")
        and "  command: pytest -q\n" in message  # the whole input, on stdin: never in argv
        and "Bash: 2 lines, 37 bytes" in message
        and "orchestra approve" in message
    )
    assert done[:2] == ("no-tests", "done")


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
    assert "every agent of this project may now run Bash(echo other > other.txt)" in run.out
    wait_settled(repo)
    log = cli("logs", "twice-job").out
    assert log.count("?? waiting for approval") == 2
    assert "== allowed by rule Bash(echo same > twice.txt): Bash(echo same > twice.txt)" in log
    config = json.loads((repo / ".orchestra" / "config.json").read_text())
    assert config["bypass_permissions"] == ALLOWED  # saved rules are orchestra's own, signed
    rules = cli("approvals", "--json").json()["project_rules"]
    assert rules == ["Bash(echo other > other.txt)"]


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
    claude_api.script(
        "crash-wait", [bash("touch survived.txt"), *commit_step("survived.txt"), text("ok")]
    )
    assert cli("spawn", "crash-wait").code == 0
    request = wait_request(cli, "crash-wait")
    supervisor = load_state(repo)["supervisor"]["pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not orchestra.process_alive(supervisor, load_state(repo)["supervisor"].get("pid_start")),
             timeout=10, what="the supervisor to die")  # fmt: skip
    time.sleep(0.5)
    assert [r["id"] for r in pending(cli)] == [
        request["id"]
    ]  # the hook (the agent's child) still waits
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
            outcomes.append(
                ("won", orchestra.answer_request(project, request, allow, "cli")["decision"])
            )
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
    assert (
        decision["behavior"] == "deny"
        and "could not read the permission request" in decision["message"]
    )
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
    assert match("Edit", "Edit", {"file_path": "/x"}) and not match(
        "Edit", "Write", {"file_path": "/x"}
    )
    assert match("Edit(src/*)", "Edit", {"file_path": "src/a.py"})


def test_sandboxed_agent_runs_bash_without_rules_and_cannot_write_outside(
    repo, claude_api, cli, tmp_path
):
    write_config(repo, bypass_permissions=[], heartbeat_interval=0.5, approval_timeout=20)
    outside = tmp_path / "outside.txt"
    claude_api.script("boxed-job", [
        bash("echo inside > inside.txt"), bash("git add inside.txt"), bash("git commit -qm inside"),
        bash(f"{sys.executable} -c \"open('{outside}', 'w').write('escaped')\""), text("tried both"),
    ])  # fmt: skip
    run = cli("spawn", "--sandbox", "boxed-job")
    assert run.code == 0, run
    wait_settled(repo)
    record = load_state(repo)["agents"]["boxed-job"]
    assert record["state"] == "done" and record["sandboxed"] is True and record["commits"] == 1
    assert git("show", "orchestra/boxed-job:inside.txt", cwd=repo) == "inside\n"
    assert not outside.exists()
    assert any("Read-only file system" in result_text(b) for b in tool_results(claude_api))
    assert "approval" not in Path(record["log"]).read_text().replace('"approval_timeout"', "")
    assert "boxed-job  done sandboxed" in cli("status").out
    launch = json.loads(Path(record["log"]).read_text().splitlines()[0])["launch"]
    assert launch["sandboxed"] is True
    (repo / ".orchestra" / "state.json").write_text(
        "{broken"
    )  # rebuilt from the logs: still sandboxed
    assert cli("status", "--json").json()["agents"][0]["sandboxed"] is True


def path_without_sandbox(tmp_path):
    """A PATH holding git and claude but neither bwrap nor socat."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for program in ("git", "claude"):
        (folder / program).symlink_to(
            subprocess.run(["which", program], capture_output=True, text=True).stdout.strip()
        )
    return str(folder)


def test_sandbox_on_without_bubblewrap_refuses_naming_the_package(
    repo, claude_api, cli, tmp_path, monkeypatch
):
    monkeypatch.setenv("PATH", path_without_sandbox(tmp_path))
    write_config(repo, sandbox="on")
    run = cli("spawn", "anything")
    assert run.code == 2
    assert (
        "sandbox is 'on'" in run.err
        and "bubblewrap" in run.err
        and "apt-get install bubblewrap socat" in run.err
    )
    assert "--no-sandbox" in run.err and not (repo / ".worktrees").exists()
    assert cli("spawn", "--no-sandbox", "--name", "free", "anything").code == 0
    assert load_state(repo)["agents"]["free"]["sandboxed"] is False
    wait_settled(repo)
    doctor = cli("doctor")
    assert (
        "MISSING  sandbox" in doctor.out and "bubblewrap and socat are not installed" in doctor.out
    )


def test_notify_command_hears_finished_failed_and_stale_agents(fake_repo, cli, tmp_path):
    from conftest import FAKE_AGENT_COMMAND

    command, events = notifier(tmp_path)
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, heartbeat_interval=0.2, stale_threshold=1.5,
                 notify_command=command)  # fmt: skip
    assert (
        cli(
            "spawn",
            "--parallel",
            "3",
            "--name",
            "ends-well",
            "ends-well",
            "--name",
            "ends-badly",
            "ends-badly fail",
            "--name",
            "goes-quiet",
            "goes-quiet quiet sleep:6",
        ).code
        == 0
    )
    wait_settled(fake_repo)
    expected = {("ends-well", "done"), ("ends-badly", "failed"), ("goes-quiet", "stale"), ("goes-quiet", "done")}  # fmt: skip

    def heard():  # a loaded machine may make a fast agent stale too: more may come, in any order
        return {(agent, event) for agent, event, _ in notified(events)}

    wait_for(lambda: expected <= heard(), timeout=30, what="the four notifications")
    failed = next(m for a, e, m in notified(events) if e == "failed")
    assert "it broke" in failed


def test_failing_notify_command_is_logged_never_fatal(fake_repo, cli):
    from conftest import FAKE_AGENT_COMMAND

    write_config(
        fake_repo,
        agent_command=FAKE_AGENT_COMMAND,
        notify_command=["/nonexistent/notify", "{event}"],
    )
    assert cli("spawn", "still-fine").code == 0
    wait_settled(fake_repo)
    assert load_state(fake_repo)["agents"]["still-fine"]["state"] == "done"
    notify_log = fake_repo / ".orchestra" / "notify.log"

    def logged():  # the line may still be on its way when the file appears
        return (
            notify_log.exists()
            and "notify_command /nonexistent/notify failed" in notify_log.read_text()
        )

    wait_for(logged, timeout=10, what="the failure in notify.log")


def test_config_set_and_unset_check_like_loading(repo, cli, tmp_path):
    assert cli("config", "set", "approval_timeout", "60").code == 0
    assert cli("config", "set", "sandbox_network", '["pypi.org", "*.npmjs.org"]').code == 0
    assert cli("config", "set", "model", "opus").code == 0
    saved = json.loads((repo / ".orchestra" / "config.json").read_text())
    assert saved == {
        "approval_timeout": 60,
        "sandbox_network": ["pypi.org", "*.npmjs.org"],
        "model": "opus",
    }
    bad = cli("config", "set", "sandbox", "maybe")
    assert bad.code == 2 and "'sandbox' must be one of off, auto, on" in bad.err
    bad = cli("config", "set", "bypass_permissions", "[1]")
    assert bad.code == 2 and "'bypass_permissions' must be a list of strings" in bad.err
    bad = cli("config", "set", "no_such_key", "1")
    assert bad.code == 2 and "unknown key 'no_such_key'" in bad.err
    assert cli("config", "unset", "model").code == 0
    assert "model" not in json.loads((repo / ".orchestra" / "config.json").read_text())
    assert cli("config", "set", "sandbox", "auto", "--user").code == 0
    assert json.loads((tmp_path / "user-config.json").read_text()) == {"sandbox": "auto"}
    shown = cli("config", "--json").json()
    assert shown["sandbox"] == {"value": "auto", "source": str(tmp_path / "user-config.json")}
    assert shown["approval_timeout"]["value"] == 60
    init = cli("init").out
    assert (
        "orchestra config set KEY VALUE" in init
        and "bypass_permissions" in init
        and "approvals" in init
    )
