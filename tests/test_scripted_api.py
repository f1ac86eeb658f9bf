"""The scripted Messages API: its own behaviour, then the real claude CLI on it."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from scripted_api import (
    CLAUDE,
    ScriptedAPI,
    bash,
    claude_env,
    error,
    requires_claude,
    text,
)

# -- helpers ------------------------------------------------------------------


def post(api: ScriptedAPI, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    req = urllib.request.Request(
        api.url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def sse(raw: bytes) -> list[dict[str, Any]]:
    events = []
    for chunk in raw.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines() if ": " in line)
        if "data" in lines:
            data = json.loads(lines["data"])
            assert data["type"] == lines["event"]
            events.append(data)
    return events


def agent_body(*messages: dict[str, Any], stream: bool = True) -> dict[str, Any]:
    return {
        "model": "claude-opus-4-1",
        "max_tokens": 1000,
        "stream": stream,
        "system": [{"type": "text", "text": "You are an agent."}],
        "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
        "messages": list(messages),
    }


def user(*blocks: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": b} if isinstance(b, str) else b for b in blocks]
    return {"role": "user", "content": content}


def assistant(s: str = "ok") -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": s}]}


def tool_result(s: str) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": "toolu_x", "content": s}


# -- the server on its own ----------------------------------------------------


def test_choose_picks_latest_keyed_user_text_and_counts_steps() -> None:
    api = ScriptedAPI()
    try:
        api.script("write-hello", [bash("echo hi"), text("Added hello.txt")])
        api.script("Continue the task.", [text("resumed and finished")])
        api.script("write", [text("the shorter key")])

        key, index, step = api.choose(agent_body(user("<ctx/>", "write-hello")))
        assert (key, index, step.stop_reason) == ("write-hello", 0, "tool_use")

        convo = [user("write-hello"), assistant(), user(tool_result("write-hello"))]
        key, index, step = api.choose(agent_body(*convo))
        assert (key, index, step.blocks[0]["text"]) == (
            "write-hello",
            1,
            "Added hello.txt",
        )

        convo += [assistant(), user("Continue the task.")]
        key, index, step = api.choose(agent_body(*convo))
        assert (key, index, step.blocks[0]["text"]) == (
            "Continue the task.",
            0,
            "resumed and finished",
        )

        convo += [assistant(), user(tool_result("x"))]
        key, index, step = api.choose(agent_body(*convo))
        assert (key, index, step.blocks[0]["text"]) == (
            "Continue the task.",
            1,
            "(script finished)",
        )

        key, _, step = api.choose(agent_body(user("nothing known")))
        assert key is None and step.blocks[0]["text"] == "(script finished)"
        key, _, _ = api.choose(agent_body({"role": "user", "content": "write it"}))
        assert key == "write"
    finally:
        api.stop()


def test_http_answers_stream_json_errors_and_side_requests() -> None:
    with ScriptedAPI() as api:
        api.script("write-hello", [bash("echo hi > hello.txt"), text("done")])
        api.script("api-fails", [error(400, "scripted failure")])

        status, ctype, raw = post(api, "/v1/messages?beta=true", agent_body(user("write-hello")))
        assert status == 200 and ctype.startswith("text/event-stream")
        events = sse(raw)
        assert [e["type"] for e in events] == [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
        start = events[0]["message"]
        assert start["model"] == "claude-opus-4-1"
        assert start["usage"]["input_tokens"] > 0
        assert events[1]["content_block"]["name"] == "Bash"
        assert json.loads(events[2]["delta"]["partial_json"]) == {
            "command": "echo hi > hello.txt",
            "description": "Run a scripted shell command",
        }
        assert events[4]["delta"]["stop_reason"] == "tool_use"
        assert events[4]["usage"]["output_tokens"] > 0

        body = agent_body(user("write-hello"), assistant(), stream=False)
        status, ctype, raw = post(api, "/v1/messages", body)
        message = json.loads(raw)
        assert status == 200 and ctype == "application/json"
        assert message["content"] == [{"type": "text", "text": "done"}]
        assert message["stop_reason"] == "end_turn"

        status, _, raw = post(api, "/v1/messages", agent_body(user("api-fails")))
        assert status == 400
        assert json.loads(raw) == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "scripted failure"},
        }

        # Side requests: no script step, harmless answers.
        quota = {"model": "claude-haiku-4-5", "max_tokens": 1, "messages": []}
        quota["messages"] = [{"role": "user", "content": "quota write-hello"}]
        status, _, raw = post(api, "/v1/messages", quota)
        assert status == 200 and json.loads(raw)["content"][0]["type"] == "text"
        titled = dict(quota, max_tokens=100)
        titled["output_config"] = {
            "format": {
                "type": "json_schema",
                "schema": {
                    "type": "object",
                    "properties": {"title": {"type": "string"}},
                },
            }
        }
        status, _, raw = post(api, "/v1/messages", titled)
        answer = json.loads(json.loads(raw)["content"][0]["text"])
        assert status == 200 and isinstance(answer["title"], str)
        status, _, raw = post(api, "/v1/messages/count_tokens", agent_body())
        assert status == 200 and json.loads(raw)["input_tokens"] > 0
        for method in ("HEAD", "GET"):
            req = urllib.request.Request(api.url + "/api/hello", method=method)
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200

        kinds = [e["kind"] for e in api.log]
        assert kinds == [
            "main",
            "main",
            "main",
            "side",
            "side",
            "count_tokens",
            "probe",
            "probe",
        ]
        assert len(api.requests) == 6
        assert len(api.main_requests) == 3


# -- the real CLI ---------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.name", "Scripted Test")
    git("config", "user.email", "scripted@example.invalid")
    (repo / "README.md").write_text("scripted\n")
    git("add", "README.md")
    git("commit", "-qm", "initial")
    return repo


def run_claude(
    repo: Path, env: dict[str, str], *args: str
) -> tuple[int, list[dict[str, Any]], float]:
    assert CLAUDE is not None
    started = time.monotonic()
    proc = subprocess.run(
        [CLAUDE, *args, "--output-format", "stream-json", "--verbose"],
        check=False,
        cwd=repo,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    elapsed = time.monotonic() - started
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    print(f"claude {args[:2]}: exit {proc.returncode} in {elapsed:.2f}s")
    return proc.returncode, lines, elapsed


def first(lines: list[dict[str, Any]], type_: str, subtype: str | None = None) -> dict[str, Any]:
    found = [
        e
        for e in lines
        if e.get("type") == type_ and (subtype is None or e.get("subtype") == subtype)
    ]
    assert found, f"no {type_}/{subtype} line in {lines!r}"
    return found[0]


def blocks(lines: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    out = []
    for e in lines:
        if e.get("type") == role:
            content = e["message"]["content"]
            if isinstance(content, list):
                out.extend(content)
    return out


@requires_claude
def test_real_claude_runs_a_script_commits_and_resumes(repo: Path, tmp_path: Path) -> None:
    with ScriptedAPI() as api:
        api.script(
            "write-hello",
            [
                bash("echo hi > hello.txt && git add hello.txt" " && git commit -qm 'add hello'"),
                text("Added hello.txt"),
            ],
        )
        api.script("Continue the task.", [text("resumed and finished")])
        config = tmp_path / "claude-config"
        env = claude_env(api, config_dir=config)

        code, lines, elapsed = run_claude(repo, env, "-p", "write-hello", "--allowedTools", "Bash")
        assert code == 0, lines
        init = first(lines, "system", "init")
        session_id = init["session_id"]
        assert session_id and init["cwd"] == str(repo)
        tool_uses = [b for b in blocks(lines, "assistant") if b["type"] == "tool_use"]
        assert tool_uses and tool_uses[0]["name"] == "Bash"
        results = [b for b in blocks(lines, "user") if b["type"] == "tool_result"]
        assert results and results[0]["is_error"] is False
        result = lines[-1]
        assert result["type"] == "result" and result["subtype"] == "success"
        assert result["is_error"] is False
        assert result["result"] == "Added hello.txt"
        assert result["session_id"] == session_id
        assert result["total_cost_usd"] > 0
        assert result["num_turns"] >= 2
        log = subprocess.run(
            ["git", "log", "--format=%s", "--name-only"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "add hello" in log and "hello.txt" in log
        assert (repo / "hello.txt").read_text() == "hi\n"
        assert elapsed < 60

        folder = re.sub(r"[^A-Za-z0-9]", "-", str(repo))
        session_file = config / "projects" / folder / (session_id + ".jsonl")
        assert session_file.is_file()

        code, lines, elapsed = run_claude(
            repo, env, "--resume", session_id, "-p", "Continue the task."
        )
        assert code == 0, lines
        result = lines[-1]
        assert result["type"] == "result" and result["is_error"] is False
        assert result["result"] == "resumed and finished"
        assert result["session_id"] == session_id
        assert elapsed < 60

        keys = [e["key"] for e in api.log if e["kind"] == "main"]
        assert keys == ["write-hello", "write-hello", "Continue the task."]
        resumed = api.main_requests[-1]["messages"]
        assert any("write-hello" in json.dumps(m) for m in resumed[:-1])


@requires_claude
def test_real_claude_reports_an_api_error(repo: Path, tmp_path: Path) -> None:
    with ScriptedAPI() as api:
        api.script("api-fails", [error(400, "scripted failure")])
        env = claude_env(api, config_dir=tmp_path / "claude-config")

        code, lines, elapsed = run_claude(repo, env, "-p", "api-fails")

    assert code == 1, lines
    first(lines, "system", "init")
    result = lines[-1]
    assert result["type"] == "result"
    assert result["is_error"] is True
    assert "scripted failure" in result["result"]
    assert result.get("api_error_status") == 400
    assert elapsed < 60
    # On a 400 the CLI retries a few times with fewer beta features; every
    # retry is the same step of the same script.
    assert {e["key"] for e in api.log if e["kind"] == "main"} == {"api-fails"}
