"""The web server: its JSON API over real HTTP with fake agents, the auth matrix, request limits,
slowloris, security headers, the token file and `orchestra web` as a user runs it."""

import base64
import hashlib
import http.client
import io
import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

import orchestra
from conftest import ROOT, add_record, git, load_state, wait_for, wait_settled

WEB_CLI = [sys.executable, str(ROOT / "orchestra.py")]


def host(server):
    return "{}:{}".format(*server.server_address[:2])


def bearer(server):
    return {"Authorization": f"Bearer {server.gate.token.decode()}"}


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"Answer({self.status}, {self.body[:300]!r})"


def call(server, method, path, body=None, headers=None, auth=True, raw_body=None):
    """One request as a browser or script would send it."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    sent = {**(bearer(server) if auth else {}), **(headers or {})}
    data = raw_body if raw_body is not None else None if body is None else json.dumps(body).encode()
    if data is not None and "Content-Type" not in sent:
        sent["Content-Type"] = "application/json"
    connection.request(method, path, body=data, headers=sent)
    response = connection.getresponse()
    answer = Answer(response.status, response.headers, response.read().decode("utf-8", "replace"))
    connection.close()
    return answer


def raw_request(server, data, timeout=5):
    """Send bytes, return everything the server answers until it closes."""
    sock = socket.create_connection(server.server_address[:2], timeout=timeout)
    sock.sendall(data)
    reply = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    sock.close()
    return reply.decode("latin-1")


# ---------------------------------------------------------------------------- the API


def test_status_is_what_status_json_prints(server, cli, fake_repo):
    assert cli("spawn", "commit:one.txt first", "second").code == 0
    wait_settled(fake_repo)
    answer = call(server, "GET", "/api/status")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json() == cli("status", "--json").json()
    assert [a["state"] for a in answer.json()["agents"]] == ["done", "done"]


def test_spawn_takes_the_cli_path_and_the_agents_finish(server, fake_repo):
    answer = call(
        server,
        "POST",
        "/api/spawn",
        {"tasks": ["commit:hello.txt say hello", "sleep:0.2 wait"], "parallel": 2},
    )
    assert answer.status == 201, answer
    agents = answer.json()["agents"]
    assert [a["id"] for a in agents] == ["commit-hello-txt", "sleep-0-2"]
    assert set(agents[0]) == set(orchestra.RECORD_FIELDS)
    state = wait_settled(fake_repo) and load_state(fake_repo)
    assert state["parallel"] == 2
    assert git("show", "orchestra/commit-hello-txt:hello.txt", cwd=fake_repo).startswith(
        "written by"
    )

    record = call(server, "GET", "/api/agents/commit-hello").json()  # a unique prefix works too
    assert record["state"] == "done" and record["commits"] == 1 and record["result"] == "all done"

    log = call(server, "GET", "/api/agents/commit-hello/log?tail=2").json()
    assert log["lines"] == ["finished the task", "== DONE after 1.2s, 3 turns, $0.2500: all done"]

    diff = call(server, "GET", "/api/agents/commit-hello-txt/diff").json()
    assert "hello.txt | 1 +" in diff["stat"] and "+written by commit-hello-txt" in diff["patch"]
    assert diff["truncated"] is False and diff["untracked"] == []


def test_spawn_with_a_model_records_it_for_the_launch(server, fake_repo):
    answer = call(server, "POST", "/api/spawn", {"tasks": ["model check"], "model": "fake-model-9"})
    assert answer.status == 201, answer
    wait_settled(fake_repo)
    assert load_state(fake_repo)["agents"]["model-check"]["launch"]["model"] == "fake-model-9"


@pytest.mark.parametrize(
    "body, message",
    [
        ([], "must be a JSON object"),
        ({}, "'tasks' must be list (required)"),
        ({"tasks": "one"}, "'tasks' must be list"),
        ({"tasks": []}, "'tasks' must be a list of 1 to 32 strings"),
        ({"tasks": [1]}, "'tasks' must be a list of 1 to 32 strings"),
        ({"tasks": ["x"] * 33}, "'tasks' must be a list of 1 to 32 strings"),
        ({"tasks": ["x"], "parallel": "2"}, "'parallel' must be int"),
        ({"tasks": ["x"], "parallel": True}, "'parallel' must be int"),
        ({"tasks": ["x"], "parallel": 99}, "--parallel must be between 1 and max_parallel (8)"),
        ({"tasks": ["x"], "colour": "red"}, "unknown field 'colour'"),
        ({"tasks": ["  "]}, "a task is empty"),
        (
            {"tasks": ["a", "b"], "name": "both"},
            "--name names one task each, in order: 2 task(s) but 1 name(s)",
        ),
        ({"tasks": ["x"], "base": "no-such-branch"}, "base 'no-such-branch' is not a commit"),
    ],
)
def test_spawn_refuses_bad_input_and_records_nothing(server, fake_repo, body, message):
    answer = call(server, "POST", "/api/spawn", body)
    assert answer.status == 400, answer
    assert message in answer.json()["error"]
    assert (
        not (fake_repo / ".orchestra" / "state.json").exists()
        or not load_state(fake_repo)["agents"]
    )


def test_bad_json_and_bad_lengths(server):
    assert call(server, "POST", "/api/spawn", raw_body=b"{not json").status == 400
    assert call(server, "POST", "/api/spawn", raw_body=b"\xff\xfe").status == 400
    reply = raw_request(server, b"POST /api/spawn HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                        b"Content-Type: application/json\r\n\r\n" % (host(server).encode(), server.gate.token))  # fmt: skip
    assert reply.startswith("HTTP/1.1 411 ")
    reply = raw_request(server, b"POST /api/spawn HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                        % (host(server).encode(), server.gate.token))  # fmt: skip
    assert reply.startswith("HTTP/1.1 411 ")


def test_pause_resume_stop_through_the_api(server, fake_repo):
    assert call(server, "POST", "/api/spawn", {"tasks": ["sleep:20 long job"]}).status == 201
    wait_for(
        lambda: load_state(fake_repo)["agents"]["sleep-20-long"]["pid"],
        timeout=30,
        what="the agent to start",
    )

    answer = call(server, "POST", "/api/agents/sleep-20/pause", {})
    assert answer.status == 200 and answer.json() == {
        "outcomes": [{"id": "sleep-20-long", "result": "paused"}],
        "message": "sleep-20-long: paused",  # what `orchestra pause` prints
    }
    assert load_state(fake_repo)["agents"]["sleep-20-long"]["state"] == "paused"
    answer = call(
        server, "POST", "/api/agents/sleep-20-long/resume", raw_body=b""
    )  # an empty body is {}
    assert answer.json()["outcomes"][0]["result"] == "resumed"
    answer = call(server, "POST", "/api/agents/sleep-20-long/resume", {})
    assert (
        answer.status == 400
        and "only paused, stopped, failed or interrupted agents resume" in answer.json()["error"]
    )
    answer = call(server, "POST", "/api/agents/sleep-20-long/stop", {})
    assert answer.json()["outcomes"][0]["result"] == "stopped (worktree and branch kept)"
    assert load_state(fake_repo)["agents"]["sleep-20-long"]["state"] == "stopped"
    answer = call(server, "POST", "/api/agents/sleep-20-long/stop", {})
    assert answer.status == 400 and answer.json() == {"error": "sleep-20-long is already stopped"}
    assert call(server, "POST", "/api/agents/sleep-20-long/stop", {"force": True}).status == 400


def test_unknown_and_ambiguous_ids(server, cli, fake_repo):
    assert cli("spawn", "alpha one", "alpha two").code == 0
    for path in ("/api/agents/nobody", "/api/agents/nobody/log", "/api/agents/nobody/diff"):
        answer = call(server, "GET", path)
        assert answer.status == 404 and answer.json() == {"error": "no agent 'nobody'"}
    assert call(server, "POST", "/api/agents/nobody/stop", {}).status == 404
    answer = call(server, "GET", "/api/agents/alpha")
    assert answer.status == 400 and "matches alpha-one, alpha-two" in answer.json()["error"]
    assert (
        call(server, "GET", "/api/agents/alpha%2Done").json()["id"] == "alpha-one"
    )  # percent-decoded
    wait_settled(fake_repo)


def test_log_tail_reads_only_the_end_of_the_file(server, project, monkeypatch):
    path = project.log_path("big")
    with open(path, "wb") as f:
        f.truncate(200 * 1024 * 1024)  # 200 MB of nothing before the lines that matter
        f.seek(0, os.SEEK_END)
        for n in range(10):
            f.write(
                json.dumps(
                    {
                        "type": "assistant",
                        "message": {"content": [{"type": "text", "text": f"line {n}"}]},
                    }
                ).encode()
                + b"\n"
            )
        f.write(b'{"type": "assistant", "message": {"content": [{"type": "text", "text": "half wri')
    add_record(project, "big", state="running")
    read = []

    class Counting(io.FileIO):
        def read(self, size=-1):
            data = super().read(size)
            read.append(len(data))
            return data

    monkeypatch.setattr(orchestra, "open", lambda p, mode: Counting(p, "r"), raising=False)
    answer = call(server, "GET", "/api/agents/big/log?tail=3")
    assert answer.json()["lines"] == ["line 7", "line 8", "line 9"]  # not the half-written line
    assert sum(read) <= orchestra.WEB_TAIL_BLOCK


@pytest.mark.parametrize(
    "content, count, expected",
    [
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc\n", 10, b"a\nb\nc\n"),
        (b"a\nb\nc", 2, b"a\nb\n"),
        (b"", 3, b""),
        (b"only partial", 3, b""),
        (b"x" * 100 + b"\n" + b"y\n", 1, b"y\n"),
    ],
)
def test_log_tail_table(tmp_path, content, count, expected):
    path = tmp_path / "log"
    path.write_bytes(content)
    for block in (1, 3, 64 * 1024):
        assert orchestra.log_tail(path, count, block=block) == expected


def test_log_tail_parameter_is_checked(server, project):
    add_record(project, "quiet", state="running")
    for tail in ("0", "abc", "5001", "-1"):
        answer = call(server, "GET", f"/api/agents/quiet/log?tail={tail}")
        assert (
            answer.status == 400
            and "'tail' must be a whole number from 1 to 5000" in answer.json()["error"]
        )
    assert call(server, "GET", "/api/agents/quiet/log").json()["lines"] == []  # no log yet


def test_diff_is_capped_and_needs_something_to_compare(server, fake_repo, monkeypatch):
    assert (
        call(server, "POST", "/api/spawn", {"tasks": ["commit:a.txt write:b.txt two files"]}).status
        == 201
    )
    wait_settled(fake_repo)
    monkeypatch.setattr(orchestra, "WEB_MAX_DIFF", 40)
    diff = call(server, "GET", "/api/agents/commit-txt/diff").json()
    assert diff["truncated"] is True and len(diff["patch"]) == 40
    assert diff["untracked"] == ["b.txt"]
    worktree = load_state(fake_repo)["agents"]["commit-txt-write"]["worktree"]
    git("worktree", "remove", "--force", worktree, cwd=fake_repo)
    assert (
        "a.txt | 1 +" in call(server, "GET", "/api/agents/commit-txt/diff").json()["stat"]
    )  # from the branch
    git("branch", "-D", "orchestra/commit-txt-write", cwd=fake_repo)
    answer = call(server, "GET", "/api/agents/commit-txt/diff")
    assert answer.status == 409 and "has no worktree or branch left" in answer.json()["error"]


def test_worktrees_sessions_and_cleanup_pass_through(server, cli, fake_repo, monkeypatch):
    assert cli("spawn", "one tree").code == 0
    wait_settled(fake_repo)
    assert call(server, "GET", "/api/worktrees").json() == cli("worktrees", "--json").json()

    calls = []
    monkeypatch.setattr(
        orchestra,
        "sessions_document",
        lambda env, hours, limit, repo: calls.append((hours, limit, repo)) or {"sessions": []},
    )
    assert call(server, "GET", "/api/sessions").json() == {"sessions": []}
    assert call(server, "GET", "/api/sessions?hours=4&limit=7&all=1").status == 200
    assert call(server, "GET", "/api/sessions?limit=0").status == 400
    assert call(server, "GET", "/api/sessions?all=2").status == 400
    assert calls == [(24, 50, fake_repo), (4, 7, None)]  # this repository's, unless all=1

    plans = []
    monkeypatch.setattr(
        orchestra,
        "cleanup_agents",
        lambda p, ids=None, apply=False: plans.append((ids, apply))
        or {"plan": [], "applied": apply},
    )
    assert call(server, "POST", "/api/cleanup", {}).json() == {
        "plan": [],
        "applied": False,
        "message": "Nothing to clean up.",
    }
    assert (
        call(server, "POST", "/api/cleanup", {"ids": ["one-tree"], "apply": True}).json()["applied"]
        is True
    )
    assert call(server, "POST", "/api/cleanup", {"apply": "yes"}).status == 400
    assert call(server, "POST", "/api/cleanup", {"ids": [3]}).status == 400
    assert plans == [(None, False), (["one-tree"], True)]


# ---------------------------------------------------------------------------- the gate

TOKENS = ("none", "wrong", "non-ascii", "query", "bearer", "cookie")
ORIGINS = ("none", "same", "evil", "null")
HOSTS = ("good", "rebinding")
KINDS = ("GET", "POST JSON", "POST text", "WS")


def expected_status(token, origin, host_kind, kind):
    """The policy of the issue, stated independently of the server's code."""
    if host_kind == "rebinding" or origin in ("evil", "null"):
        return 403
    if token != "bearer":
        return 401  # a cookie never carries the token: other local ports could read it
    if kind == "POST text":
        return 415
    return 200


def matrix_request(server, token, origin, host_kind, kind):
    good = server.gate.token
    port = server.server_address[1]
    path = {"GET": b"/api/status", "WS": b"/ws/status"}.get(kind, b"/api/spawn")
    lines = [b"%s %s%s HTTP/1.1" % (b"POST" if kind.startswith("POST") else b"GET", path,
                                     b"?token=" + good if token == "query" else b"")]  # fmt: skip
    lines.append(
        b"Host: " + (host(server).encode() if host_kind == "good" else b"evil.example:%d" % port)
    )
    lines.append(b"Connection: close")
    auth = {
        "wrong": b"Bearer " + b"x" * len(good),
        "non-ascii": "Bearer tökén€".encode(),
        "bearer": b"Bearer " + good,
    }
    if token in auth:
        lines.append(b"Authorization: " + auth[token])
    if token == "cookie":
        lines.append(b"Cookie: other=1; orchestra_token_%d=%s" % (port, good))
    origins = {
        "same": b"http://" + host(server).encode(),
        "evil": b"http://evil.example",
        "null": b"null",
    }
    if origin in origins:
        lines.append(b"Origin: " + origins[origin])
    if kind == "WS":
        lines += [b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Version: 13",
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]  # fmt: skip
    body = b""
    if kind.startswith("POST"):
        body = b'{"tasks": ["x"]}'
        lines += [b"Content-Type: " + (b"application/json" if kind == "POST JSON" else b"text/plain"),
                  b"Content-Length: %d" % len(body)]  # fmt: skip
    reply = raw_request(server, b"\r\n".join(lines) + b"\r\n\r\n" + body)
    return int(reply.split(" ", 2)[1])


def test_auth_matrix(server, monkeypatch):
    reached = []
    for _, _, name in orchestra.ROUTES:
        monkeypatch.setattr(
            orchestra.WebHandler,
            name,
            lambda self, *a, _name=name: reached.append(_name) or (200, {}),
        )
    wrong = []
    for cell in itertools.product(TOKENS, ORIGINS, HOSTS, KINDS):
        reached.clear()
        status, expected = matrix_request(server, *cell), expected_status(*cell)
        if status != expected or bool(reached) != (expected == 200):
            wrong.append((cell, status, expected, list(reached)))
    assert not wrong, "\n".join(map(str, wrong))


@pytest.mark.parametrize(
    "headers, status",
    [
        ({"Host": "LOCALHOST:{port}"}, 200),
        ({"Host": "localhost.:{port}"}, 200),
        ({"Host": "[::1]:{port}"}, 200),
        ({"Host": "127.0.0.1.evil.example:{port}"}, 403),
        ({"Host": "localhost:{port} 'unsafe-inline'"}, 403),
        ({"Host": "localhost;evil:{port}"}, 403),
        ({"Host": "user@localhost:{port}"}, 403),
        ({"Host": "localhost:{port}", "Origin": "http://127.0.0.1:{port}"}, 403),
        ({"Host": "127.0.0.1:{port}", "Origin": "https://127.0.0.1:{port}"}, 403),
        ({"Host": "127.0.0.1:{port}", "Origin": "HTTP://127.0.0.1:{port}"}, 200),
    ],
)
def test_host_and_origin_details(server, headers, status):
    port = server.server_address[1]
    sent = {k: v.format(port=port) for k, v in headers.items()}
    assert call(server, "GET", "/api/status", headers=sent).status == status


def test_two_host_headers_are_refused(server):
    reply = raw_request(
        server, b"GET / HTTP/1.1\r\nHost: %s\r\nHost: evil.example\r\n\r\n" % host(server).encode()
    )
    assert reply.startswith("HTTP/1.1 400 ")


def test_allowed_hosts():
    hosts = orchestra.allowed_hosts("0.0.0.0", ["Phone.LAN", "[fd00::1]"])
    assert {
        "localhost",
        "127.0.0.1",
        "::1",
        socket.gethostname().lower(),
        "phone.lan",
        "fd00::1",
    } <= hosts
    assert "0.0.0.0" not in hosts
    assert "192.168.1.5" in orchestra.allowed_hosts("192.168.1.5")
    assert "fd00::2" in orchestra.allowed_hosts("fd00::2")


def test_allow_host_lets_a_name_in(project):
    srv = orchestra.start_web_server(
        project, "127.0.0.1", 0, allow_hosts=["phone.lan"], log=None, revive=False
    )
    try:
        port = srv.server_address[1]
        assert call(srv, "GET", "/api/status", headers={"Host": f"phone.lan:{port}"}).status == 200
        assert call(srv, "GET", "/api/status", headers={"Host": f"tablet.lan:{port}"}).status == 403
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- limits and slowloris


def test_request_limits(server):
    token = server.gate.token
    long_line = b"GET /api/status?" + b"a" * orchestra.WEB_MAX_REQUEST_LINE + b" HTTP/1.1\r\n\r\n"
    assert raw_request(server, long_line).startswith("HTTP/1.1 414 ")
    big_headers = (
        b"GET /api/status HTTP/1.1\r\nHost: %s\r\n" % host(server).encode()
        + b"X-Pad: %s\r\n" % (b"p" * 9000) * 2
    )
    reply = raw_request(server, big_headers + b"\r\n")
    assert reply.startswith("HTTP/1.1 431 ") and '"error"' in reply
    many = b"GET /api/status HTTP/1.1\r\nHost: %s\r\n" % host(server).encode() + b"X: y\r\n" * 101
    assert raw_request(server, many + b"\r\n").startswith("HTTP/1.1 431 ")
    started = time.monotonic()
    huge = (b"POST /api/spawn HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n{" % (host(server).encode(), token))  # fmt: skip
    reply = raw_request(server, huge)
    assert (
        reply.startswith("HTTP/1.1 413 ") and time.monotonic() - started < 1
    )  # answered without the body
    for nonsense in (b"GARBAGE\r\n\r\n", b"GET /\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"):
        reply = raw_request(server, nonsense)
        assert reply.startswith(("HTTP/1.1 400 ", "HTTP/1.1 505 ")) and '"error"' in reply, reply


def test_expect_100_continue_invites_only_accepted_bodies(server):
    head = (b"POST /api/spawn HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: 15\r\n"
            b"Expect: 100-continue\r\n" % host(server).encode())  # fmt: skip
    reply = raw_request(server, head + b"\r\n")
    assert reply.startswith("HTTP/1.1 401 ") and "100 Continue" not in reply
    sock = socket.create_connection(server.server_address[:2], timeout=5)
    sock.sendall(head + b"Authorization: Bearer %s\r\n\r\n" % server.gate.token)
    assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
    sock.sendall(b'{"tasks": [""]}')
    assert b" 400 " in sock.recv(4096)
    sock.close()


def test_unknown_paths_methods_and_no_static_files(server):
    for path in ("/api/nothing", "/static/dashboard.html", "/dashboard.html", "/../orchestra.py", "/%2e%2e/orchestra.py",
                 "/favicon.ico", "/ws/other"):  # fmt: skip
        answer = call(server, "GET", path)
        assert answer.status == 404, (path, answer)
        assert answer.json() == {"error": f"nothing at {path}"}
    answer = call(server, "GET", "/api/spawn")
    assert answer.status == 405 and answer.headers["Allow"] == "POST"
    answer = call(
        server,
        "OPTIONS",
        "/api/status",
        headers={"Origin": f"http://{host(server)}", "Access-Control-Request-Method": "POST"},
    )
    assert answer.status == 405 and not any(
        h.lower().startswith("access-control") for h in answer.headers
    )
    assert call(server, "DELETE", "/api/status").status == 405


def test_half_sent_request_is_closed_by_the_deadline(server):
    sock = socket.create_connection(server.server_address[:2], timeout=5)
    sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    started = time.monotonic()
    assert sock.recv(1024) == b""
    assert 0.5 < time.monotonic() - started < 3
    sock.close()


def test_slowloris_cannot_starve_an_authenticated_request(project):
    srv = orchestra.start_web_server(
        project, "127.0.0.1", 0, log=None, revive=False, max_connections=20
    )
    sockets = []
    try:
        for _ in range(60):
            sock = socket.create_connection(srv.server_address[:2], timeout=5)
            sock.sendall(b"GET /api/status HTTP/1.1\r\nX-a: ")
            sockets.append(sock)
        time.sleep(0.2)
        started = time.monotonic()
        assert call(srv, "GET", "/api/status").status == 200
        assert time.monotonic() - started < 1
        assert len(srv.connections) <= 20
    finally:
        for sock in sockets:
            sock.close()
        srv.stop()


def test_keep_alive_serves_several_requests_on_one_connection(server):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=5)
    for _ in range(3):
        connection.request("GET", "/api/status", headers=bearer(server))
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["agents"] == []
    connection.close()


# ---------------------------------------------------------------------------- headers, errors, logs


def test_security_headers(server):
    page = call(server, "GET", "/", auth=False)
    assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = page.headers["Content-Security-Policy"]
    assert (
        "unsafe-inline" not in policy
        and "default-src 'none'" in policy
        and "frame-ancestors 'none'" in policy
    )
    for tag in ("script", "style"):
        (block,) = re.findall(
            rf"<{tag}>(.*?)</{tag}>", re.sub(r"<!--.*?-->", "", page.body, flags=re.S), re.S
        )
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}';" in policy
    markup = re.sub(r"<script>.*?</script>|<!--.*?-->", "", page.body, flags=re.S)
    assert not re.search(
        r"\s(on[a-z]+|style)\s*=", markup
    )  # inline handlers and styles would be blocked
    assert "http://" not in page.body and "https://" not in page.body  # nothing from the network
    api = call(server, "GET", "/api/status")
    for answer in (page, api, call(server, "GET", "/api/status", auth=False)):
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
        assert not any(h.lower().startswith("access-control") for h in answer.headers)
    assert api.headers["Cache-Control"] == "no-store"
    assert api.headers["Server"] == f"orchestra/{orchestra.__version__}"


def test_a_crash_is_a_500_without_a_traceback(server, monkeypatch):
    def broken(project):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(orchestra, "current_status", broken)
    answer = call(server, "GET", "/api/status")
    assert answer.status == 500 and answer.json() == {"error": orchestra.WEB_INTERNAL_ERROR}
    assert (
        "Traceback" in server.test_log.getvalue()
        and "secret internals" in server.test_log.getvalue()
    )


def test_access_log_has_no_query_strings(server):
    call(server, "GET", "/api/status?token=SECRET-IN-QUERY", auth=False)
    call(server, "GET", "/api/sessions?hours=5")
    raw_request(server, b"GET /?token=SECRET-TWO HTTP/1.1 extra\r\n\r\n")
    log = server.test_log.getvalue()
    assert '"GET /api/status" 401' in log and '"GET /api/sessions" 200' in log
    assert "SECRET" not in log and "?" not in log


def test_missing_dashboard_says_where_to_put_it(server, monkeypatch, tmp_path):
    monkeypatch.setattr(
        orchestra, "dashboard_candidates", lambda: [tmp_path / "nowhere" / "dashboard.html"]
    )
    page = call(server, "GET", "/", auth=False)
    assert page.status == 404 and page.headers["Content-Type"].startswith("text/plain")
    assert str(tmp_path / "nowhere" / "dashboard.html") in page.body
    assert call(server, "GET", "/api/status").status == 200


def test_dashboard_is_found_beside_orchestra():
    assert orchestra.dashboard_candidates()[0] == ROOT / "static" / "dashboard.html"
    assert orchestra.dashboard_candidates()[0].is_file()


# ---------------------------------------------------------------------------- token and TLS


def test_token_file_is_private_reused_and_rotated(project):
    first = orchestra.start_web_server(project, "127.0.0.1", 0, log=None, revive=False)
    first.stop()
    path = project.dir / "web.json"
    assert path.stat().st_mode & 0o777 == 0o600
    token = json.loads(path.read_text())["token"]
    assert len(base64.urlsafe_b64decode(token + "=")) == 32
    assert first.url.endswith(f"/#token={token}")
    assert orchestra.web_token(project.dir) == token
    second = orchestra.start_web_server(project, "127.0.0.1", 0, log=None, revive=False)
    second.stop()  # every start makes a new token: one taken while web was down is worthless
    assert json.loads(path.read_text())["token"] != token
    token = json.loads(path.read_text())["token"]
    rotated = orchestra.web_token(project.dir, rotate=True)
    assert rotated != token and json.loads(path.read_text())["token"] == rotated
    path.write_text("{broken")
    assert orchestra.web_token(project.dir) not in (token, rotated)


def make_certificate(folder):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)  # fmt: skip
    return str(cert), str(key)


def test_tls(project, tmp_path):
    srv = orchestra.start_web_server(
        project, "127.0.0.1", 0, tls=make_certificate(tmp_path), log=None, revive=False
    )
    try:
        assert srv.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        connection = http.client.HTTPSConnection(
            *srv.server_address[:2], context=context, timeout=5
        )
        origin = "https://{}:{}".format(*srv.server_address[:2])
        connection.request("GET", "/api/status", headers={**bearer(srv), "Origin": origin})
        assert connection.getresponse().status == 200
        connection.close()
        plain = socket.create_connection(srv.server_address[:2], timeout=5)
        plain.sendall(b"GET /api/status HTTP/1.1\r\n\r\n")  # plain HTTP to a TLS port: refused
        assert b"200 OK" not in plain.recv(1024)
        plain.close()
        connection = http.client.HTTPSConnection(
            *srv.server_address[:2], context=context, timeout=5
        )
        connection.request("GET", "/api/status", headers=bearer(srv))
        assert connection.getresponse().status == 200  # and the server carries on
        connection.close()
    finally:
        srv.stop()


def test_bad_tls_files_are_a_clear_error(project, tmp_path):
    with pytest.raises(orchestra.OrchestraError, match="cannot load --tls-cert"):
        orchestra.start_web_server(
            project, "127.0.0.1", 0, tls=(str(tmp_path / "no.pem"), str(tmp_path / "no.key"))
        )


# ---------------------------------------------------------------------------- the supervisor


def test_the_server_restarts_a_dead_supervisor(project, fake_repo, cli):
    assert cli("spawn", "sleep:3 outlives its supervisor").code == 0
    pid = wait_for(
        lambda: load_state(fake_repo)["supervisor"].get("pid"), timeout=30, what="the supervisor"
    )
    wait_for(
        lambda: load_state(fake_repo)["agents"]["sleep-3-outlives"]["pid"],
        timeout=30,
        what="the agent",
    )
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: not orchestra.supervisor_alive(load_state(fake_repo)),
        timeout=10,
        what="the supervisor to die",
    )
    log = io.StringIO()
    srv = orchestra.start_web_server(project, "127.0.0.1", 0, log=log)
    try:
        wait_for(
            lambda: "restarted it" in log.getvalue(),
            timeout=10,
            what="the server to restart the supervisor",
        )
        wait_settled(fake_repo)
        assert load_state(fake_repo)["agents"]["sleep-3-outlives"]["state"] == "done"
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- the command line


def run_web(args, cwd, **kwargs):
    return subprocess.Popen([*WEB_CLI, "web", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)  # fmt: skip


def test_orchestra_web_prints_the_url_first_and_stops_on_ctrl_c(fake_repo):
    proc = run_web(["--port", "0"], fake_repo)
    try:
        url = proc.stdout.readline().strip()
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/#token=([A-Za-z0-9_-]{43})", url)
        assert match, url
        connection = http.client.HTTPConnection("127.0.0.1", int(match[1]), timeout=5)
        connection.request("GET", "/api/status", headers={"Authorization": f"Bearer {match[2]}"})
        assert json.loads(connection.getresponse().read())["repo"] == str(fake_repo)
        connection.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert out == "" and "Traceback" not in err
    assert "GET /api/status" in err and match[2] not in err


def test_orchestra_web_warns_when_reachable_from_other_machines(fake_repo):
    proc = run_web(["--host", "0.0.0.0", "--port", "0", "--allow-host", "phone.lan"], fake_repo)
    try:
        url = proc.stdout.readline()
        warning = proc.stderr.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
    assert url.startswith(f"http://{socket.gethostname()}:")
    assert warning.startswith(
        "orchestra: warning: listening on 0.0.0.0, reachable from other machines"
    )
    assert "phone.lan" in warning and "localhost" in warning


def test_orchestra_web_bad_input(fake_repo):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [
        (["--port", str(busy.getsockname()[1])], 1, "cannot listen on 127.0.0.1:"),
        (["--port", "70000"], 2, "is not a port number"),
        (["--tls-cert", "c.pem"], 2, "--tls-cert and --tls-key go together"),
    ]
    for args, code, message in cases:
        proc = run_web(args, fake_repo)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == code, (args, err)
        assert err.startswith("orchestra: error: ") and message in err and err.count("\n") == 1
    busy.close()
