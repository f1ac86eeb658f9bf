"""Approvals over the web API and the WebSocket, with the hook run as Claude Code runs it (synthetic stdin)."""

import http.client
import json
import subprocess
import sys
import time

from websockets.sync.client import connect

import orchestra
from conftest import hook_decision, start_permission_hook


def add_agent(project, agent_id):
    """A running agent's record, as the supervisor would write it."""

    def change(state):
        record = dict.fromkeys(orchestra.RECORD_FIELDS)
        record.update(id=agent_id, task=f"task {agent_id}", state="running", created_at=orchestra.utc_iso(),
                      log=str(project.log_path(agent_id)))  # fmt: skip
        state["agents"][agent_id] = record

    project.store.update(change)


def call(server, method, path, body=None, headers=None, raw=None):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    sent = {"Authorization": f"Bearer {server.gate.token.decode()}", "Content-Type": "application/json",
            **(headers or {})}  # fmt: skip
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers=sent)
    response = connection.getresponse()
    status, document = response.status, json.loads(response.read() or b"null")
    connection.close()
    return status, document


def test_request_is_pushed_listed_and_decided_over_the_web(server, project):
    add_agent(project, "webby")
    host = "{}:{}".format(*server.server_address[:2])
    with connect(f"ws://{host}/ws/status", subprotocols=["orchestra", f"token.{server.gate.token.decode()}"],
                 origin=f"http://{host}", proxy=None, open_timeout=5) as ws:  # fmt: skip
        snapshot = json.loads(ws.recv(timeout=5))
        assert snapshot["type"] == "snapshot" and snapshot["approvals"] == []
        hook = start_permission_hook(
            project.repo, "webby", "Bash", {"command": "pytest -q"}, 60, session_id="s"
        )
        started = time.monotonic()
        while True:
            message = json.loads(ws.recv(timeout=10))
            if message["type"] == "approvals" and message["approvals"]:
                break
        assert time.monotonic() - started < 5
        request = message["approvals"][0]
        assert request["agent"] == "webby" and request["summary"] == "Bash(pytest -q)"
        assert request["input"] == {"command": "pytest -q"}
        status, listed = call(server, "GET", "/api/approvals")
        assert status == 200 and [r["id"] for r in listed["approvals"]] == [request["id"]]
        _, status_doc = call(server, "GET", "/api/status")
        assert status_doc["agents"][0]["approval"]["id"] == request["id"]

        path = f"/api/approvals/{request['id']}"
        assert (
            call(server, "POST", path, {"decision": "allow"}, headers={"Authorization": ""})[0]
            == 401
        )
        assert (
            call(
                server,
                "POST",
                path,
                {"decision": "allow"},
                headers={"Origin": "http://evil.example"},
            )[0]
            == 403
        )
        assert (
            call(
                server, "POST", path, raw=b"decision=allow", headers={"Content-Type": "text/plain"}
            )[0]
            == 415
        )
        assert call(server, "POST", path, {"decision": "maybe"})[0] == 400
        assert call(server, "POST", path, {"decision": "deny", "always": True})[0] == 400
        assert call(server, "POST", path, {"decision": "allow", "extra": 1})[0] == 400
        assert call(server, "POST", "/api/approvals/abcdef", {"decision": "allow"})[0] == 404

        status, decided = call(server, "POST", path, {"decision": "allow", "always": True})
        assert status == 200 and decided["decision"] == "allow" and decided["by"] == "web"
        assert decided["rule"] == "Bash(pytest -q)"
        assert hook_decision(hook) == {"behavior": "allow"}
        while True:
            message = json.loads(ws.recv(timeout=10))
            if message["type"] == "approvals":
                break
        assert message["approvals"] == []
    status, late = call(server, "POST", path, {"decision": "deny"})
    assert (
        status == 409 and "already allowed by web" in late["error"] and "came late" in late["error"]
    )
    again = start_permission_hook(
        project.repo, "webby", "Bash", {"command": "pytest -q"}, 60, session_id="s"
    )  # the --always rule answers it
    assert hook_decision(again) == {"behavior": "allow"}
    log = project.log_path("webby").read_text()
    assert '"by": "rule"' in log and '"by": "web"' in log


def test_a_request_whose_hook_is_gone_is_void(server, project):
    add_agent(project, "gone")
    hook = start_permission_hook(
        project.repo, "gone", "Bash", {"command": "make deploy"}, 60, session_id="s"
    )
    deadline = time.monotonic() + 10
    while not orchestra.ApprovalBox(project.repo).pending():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    request = orchestra.ApprovalBox(project.repo).pending()[0]
    hook.kill()
    hook.wait()
    assert call(server, "GET", "/api/approvals")[1]["approvals"] == []
    status, error = call(server, "POST", f"/api/approvals/{request['id']}", {"decision": "allow"})
    assert status == 409 and "its request" in error["error"] and "is void" in error["error"]


def test_hook_whose_agent_dies_denies_and_leaves(project, tmp_path):
    add_agent(project, "orphaned")
    (tmp_path / "request.json").write_text(
        json.dumps({"tool_name": "Bash", "tool_input": {"command": "ls /"}})
    )
    command = orchestra.hook_command(project.repo, "orphaned", 60)
    agent = subprocess.Popen(
        ["sh", "-c", f"{command} < {tmp_path / 'request.json'} > {tmp_path / 'answer.json'}; true"]
    )
    deadline = time.monotonic() + 10
    while not orchestra.ApprovalBox(project.repo).pending():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    agent.kill()  # the agent (the hook's parent) dies; the hook must not wait for 60 s
    agent.wait()
    deadline = time.monotonic() + 10
    while not (tmp_path / "answer.json").read_text():
        assert time.monotonic() < deadline, "the hook kept waiting for a dead agent"
        time.sleep(0.05)
    decision = json.loads((tmp_path / "answer.json").read_text())["hookSpecificOutput"]["decision"]
    assert decision == {
        "behavior": "deny",
        "message": "the agent ended while it waited for this approval",
    }
    assert orchestra.ApprovalBox(project.repo).pending() == []


def test_doctor_reports_what_works(cli, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    run = cli("doctor", "--json")
    checks = {c["name"]: c for c in run.json()["checks"]}
    assert checks["git"]["ok"] and checks["git"]["detail"].startswith("git version")
    assert checks["claude"]["ok"] and "Claude Code" in checks["claude"]["detail"]
    assert checks["claude login"] == {
        "name": "claude login",
        "ok": True,
        "detail": "logged in (api_key, ANTHROPIC_API_KEY)",
    }
    assert checks["sandbox"] == {
        "name": "sandbox",
        "ok": True,
        "detail": "Claude Code's sandbox can run here",
    }
    assert run.code == 0
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", "/nonexistent-claude-config")
    text = cli("doctor").out
    assert (
        "MISSING  claude login  not logged in; run 'claude' and log in, or set ANTHROPIC_API_KEY"
        in text
    )


def test_claude_argv_carries_the_settings_layer(repo):
    project = orchestra.Project.open(repo, {"ORCHESTRA_CONFIG": "/nonexistent"},
                                     {"approval_timeout": 90, "sandbox_network": ["pypi.org"]})  # fmt: skip
    record = orchestra.new_record(project, "x", "do x", "main", "abc")
    record["launch"]["sandboxed"] = True
    argv = orchestra.agent_argv(record)
    settings = json.loads(argv[argv.index("--settings") + 1])
    hook = settings["hooks"]["PermissionRequest"][0]
    assert hook["matcher"] == "*" and hook["hooks"][0]["timeout"] > 90
    command = hook["hooks"][0]["command"]
    assert command.startswith(sys.executable) and "hook permission-request" in command
    assert f"--repo {repo}" in command and "--agent x --timeout 90" in command
    assert settings["sandbox"].pop("filesystem")["allowRead"] == [
        str(repo / ".worktrees" / "task-x")
    ]
    assert settings["sandbox"] == {"enabled": True, "autoAllowBashIfSandboxed": True,
                                   "allowUnsandboxedCommands": False,
                                   "network": {"allowedDomains": ["pypi.org"]}}  # fmt: skip
    assert "--allowedTools" not in argv  # an argv string Claude Code splits on spaces
    assert settings["permissions"]["allow"] == orchestra.DEFAULT_RULES  # the narrow defaults
    assert any(".orchestra" in rule for rule in settings["permissions"]["deny"])  # containment
    record["launch"]["sandboxed"] = False
    assert "sandbox" not in json.loads(orchestra.agent_argv(record)[argv.index("--settings") + 1])
    assert not (repo / ".claude").exists()  # nothing written into the user's repository


def test_hook_in_process_waits_for_a_decision_and_answers(project):
    """The hook's own code, run in this process (the subprocess runs above are not measured)."""
    import io
    import threading

    add_agent(project, "inproc")
    stdin = io.StringIO(
        json.dumps({"tool_name": "Write", "tool_input": {"file_path": "/etc/x", "content": "y"}})
    )
    stdout = io.StringIO()
    hook = threading.Thread(
        target=orchestra.permission_hook, args=(str(project.repo), "inproc", 30, stdin, stdout)
    )
    hook.start()
    box = orchestra.ApprovalBox(project.repo)
    deadline = time.monotonic() + 10
    while not box.pending():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    request = box.pending()[0]
    assert (
        request["summary"] == "Write(/etc/x)"
        and orchestra.approval_flags(project.repo)["inproc"]["tool"] == "Write"
    )
    orchestra.answer_request(project, request, False, "cli", message="not in /etc")
    hook.join(10)
    decision = json.loads(stdout.getvalue())["hookSpecificOutput"]["decision"]
    assert decision == {"behavior": "deny", "message": "not in /etc"}
    assert box.request(request["id"])[1] == "answered" and box.pending() == []
    stdout = io.StringIO()
    orchestra.permission_hook(
        str(project.repo), "inproc", 0.2, io.StringIO(stdin.getvalue()), stdout
    )
    timed_out = json.loads(stdout.getvalue())["hookSpecificOutput"]["decision"]
    assert timed_out == {
        "behavior": "deny",
        "message": "no decision within approval_timeout (0.2 s); denied",
    }
