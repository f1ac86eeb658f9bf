"""The web server against hostile clients: raw sockets on loopback only, bounded in count and time.
Every attack test also checks that a request with the token still answers quickly meanwhile.
Then agent-controlled text that could break an answer (lone surrogates, controls, bidi overrides)
and the privacy of .orchestra/."""

import contextlib
import http.client
import io
import json
import os
import socket
import stat
import struct
import threading
import time

import pytest

import orchestra
from conftest import add_record, wait_for

QUICK = (
    2.0  # seconds an authenticated request may take while the server is under attack (loaded CI)
)


@pytest.fixture
def hostile(project):
    """A server with a small connection cap and a 1 s header deadline; its log is .test_log."""
    log = io.StringIO()
    srv = orchestra.start_web_server(project, "127.0.0.1", 0, log=log, revive=False, header_deadline=1.0,
                                     max_connections=24)  # fmt: skip
    srv.test_log = log
    yield srv
    srv.stop()


def token(server):
    return server.gate.token.decode()


def authenticated_status(server, timeout=QUICK * 2):
    """GET /api/status with the token: (status, seconds taken)."""
    started = time.monotonic()
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=timeout)
    connection.request("GET", "/api/status", headers={"Authorization": f"Bearer {token(server)}"})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status, time.monotonic() - started


def assert_still_quick(server):
    status, seconds = authenticated_status(server)
    assert status == 200 and seconds < QUICK, (status, seconds)


def raw(server, data=b"", timeout=5):
    sock = socket.create_connection(server.server_address[:2], timeout=timeout)
    if data:
        sock.sendall(data)
    return sock


def reply_of(server, data, timeout=5):
    """Everything the server answers to `data` until it closes the connection."""
    sock, reply = raw(server, data, timeout), b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    sock.close()
    return reply


def host_line(server):
    return b"Host: 127.0.0.1:%d\r\n" % server.server_address[1]


# ---------------------------------------------------------------------------- denial of service


def test_pipelining_clients_that_never_read_cannot_hold_the_server(hostile):
    page = b"GET / HTTP/1.1\r\n" + host_line(hostile) + b"\r\n"
    attackers = [raw(hostile) for _ in range(40)]  # more than the cap of 24
    try:
        for sock in attackers:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.send(page * 2000)  # far more answers than the socket buffers hold; never read
        for _ in range(5):
            assert_still_quick(hostile)
            time.sleep(0.2)
        # the total deadline (1 s from accept) ends every stuck writer: nothing extends it
        wait_for(lambda: all(link.trusted for link in hostile.connections.values()), timeout=5,
                 what="the stuck connections to be dropped")  # fmt: skip
        assert "Traceback" not in hostile.test_log.getvalue()
        assert (
            " 500" not in hostile.test_log.getvalue()
        )  # no error answer was tried on a stuck socket
    finally:
        for sock in attackers:
            sock.close()


def test_idle_unauthenticated_connections_are_evicted_at_the_cap(hostile):
    idle = [raw(hostile) for _ in range(30)]
    try:
        time.sleep(0.2)
        assert len(hostile.connections) <= 24
        assert_still_quick(hostile)
    finally:
        for sock in idle:
            sock.close()


def test_a_slow_reader_cannot_extend_its_deadline_by_reading_a_little(hostile):
    sock = raw(hostile, (b"GET / HTTP/1.1\r\n" + host_line(hostile) + b"\r\n") * 500)
    started, got, dropped_after = time.monotonic(), 0, None
    try:
        while time.monotonic() - started < 3:
            chunk = sock.recv(256)  # a trickle keeps the writer busy but must not keep it alive
            got += len(chunk)
            if dropped_after is None and not hostile.connections:
                dropped_after = time.monotonic() - started
            if not chunk:
                break
            time.sleep(0.01)
    except (ConnectionResetError, socket.timeout):
        pass
    sock.close()
    assert got > 0
    assert dropped_after is not None and dropped_after < 2, dropped_after  # the deadline is 1 s


def upgrade_request(server):
    return (b"GET /ws/status HTTP/1.1\r\n" + host_line(server)
            + b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            + b"Authorization: Bearer " + server.gate.token + b"\r\n\r\n")  # fmt: skip


def test_websockets_have_their_own_lower_cap(hostile, monkeypatch):
    monkeypatch.setattr(orchestra, "WEB_MAX_WEBSOCKETS", 3)
    sockets = []
    try:
        for _ in range(3):
            sock = raw(hostile, upgrade_request(hostile))
            assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
            sockets.append(sock)
        refused = reply_of(hostile, upgrade_request(hostile))
        assert refused.startswith(b"HTTP/1.1 503 "), refused[:200]
        assert_still_quick(hostile)
        sockets.pop().close()
        wait_for(
            lambda: hostile.websockets < 3, timeout=5, what="the closed WebSocket to be counted out"
        )
        again = raw(hostile, upgrade_request(hostile))
        assert again.recv(4096).startswith(b"HTTP/1.1 101 ")
        sockets.append(again)
    finally:
        for sock in sockets:
            sock.close()


def masked(opcode, payload, fin=True):
    first = (0x80 if fin else 0) | opcode
    header = struct.pack("!BB", first, 0x80 | len(payload)) if len(payload) < 126 else \
        struct.pack("!BBH", first, 0x80 | 126, len(payload))  # fmt: skip
    return header + b"\0\0\0\0" + payload  # a zero mask leaves the payload as it is


def test_fragment_count_limit_closes_with_1009(hostile):
    sock = raw(hostile, upgrade_request(hostile))
    sock.recv(4096)
    limit = orchestra.WS_MAX_FRAGMENTS
    sock.sendall(masked(0x1, b"a", fin=False) + masked(0x0, b"a", fin=False) * limit)
    data = b""
    deadline = time.monotonic() + 5
    while b"\x88" not in data and time.monotonic() < deadline:
        data += sock.recv(65536)
    sock.close()
    close = data[data.index(b"\x88") :]
    assert struct.unpack("!H", close[2:4])[0] == orchestra.WS_CLOSE_TOO_BIG
    assert_still_quick(hostile)


def test_a_message_in_the_allowed_number_of_fragments_is_fine(hostile):
    sock = raw(hostile, upgrade_request(hostile))
    sock.recv(65536)
    limit = orchestra.WS_MAX_FRAGMENTS
    sock.sendall(
        masked(0x1, b"a", fin=False)
        + masked(0x0, b"a", fin=False) * (limit - 2)
        + masked(0x0, b"a")
    )
    sock.sendall(masked(0x9, b"still here"))
    data = b""
    deadline = time.monotonic() + 5
    while b"still here" not in data and time.monotonic() < deadline:
        data += sock.recv(65536)
    sock.close()
    assert b"\x8a\x0astill here" in data  # the pong: the connection lived through the message


# ---------------------------------------------------------------------------- strict framing

API = b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
MALFORMED = {
    "two Content-Length": b"POST /api/spawn HTTP/1.1\r\n{host}{api}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}",
    "same Content-Length twice": b"POST /api/spawn HTTP/1.1\r\n{host}{api}Content-Length: 2\r\nContent-Length: 2\r\n\r\n{{}}",
    "space before colon": b"POST /api/spawn HTTP/1.1\r\n{host}{api}Content-Length : 2\r\n\r\n{{}}",
    "bare LF in headers": b"GET /api/status HTTP/1.1\r\n{host}Authorization: Bearer {token}\n\r\n",
    "bare LF request line": b"GET /api/status HTTP/1.1\n{host}\r\n",
    "folded header": b"GET /api/status HTTP/1.1\r\n{host}X-A: 1\r\n  folded\r\n\r\n",
    "non-ASCII digits": "POST /api/spawn HTTP/1.1\r\n{host}{api}Content-Length: \u0662\r\n\r\n{{}}".encode(),
    "signed length": b"POST /api/spawn HTTP/1.1\r\n{host}{api}Content-Length: +2\r\n\r\n{{}}",
    "length and chunked": b"POST /api/spawn HTTP/1.1\r\n{host}{api}Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{{}}",
    "control in a header": b"GET /api/status HTTP/1.1\r\n{host}X-A: a\x01b\r\n\r\n",
    "deeply nested JSON": b"POST /api/spawn HTTP/1.1\r\n{host}{api}Content-Length: 200000\r\n\r\n" + b"[" * 100000 + b"]" * 100000,
    "nested objects": b"POST /api/spawn HTTP/1.1\r\n{host}{api}Content-Length: 400\r\n\r\n" + b'{"a":' * 80 + b"1" + b"}" * 79 + b" " * 14,
}  # fmt: skip


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_requests_are_400_never_500(hostile, name):
    values = {b"{host}": host_line(hostile), b"{api}": API % hostile.gate.token, b"{token}": hostile.gate.token,
              b"{{}}": b"{}"}  # fmt: skip
    data = MALFORMED[name]
    for key, value in values.items():
        data = data.replace(key, value)
    reply = reply_of(hostile, data)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:300]
    json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert "Traceback" not in hostile.test_log.getvalue()
    assert_still_quick(hostile)


def test_no_escape_sequence_reaches_the_log(hostile):
    reply_of(
        hostile,
        b"GET /\x1b[2J\x1b]0;pwned\x07\xe2\x80\xae HTTP/1.1\r\n" + host_line(hostile) + b"\r\n",
    )
    reply_of(hostile, b"\x1b[31mBAD\x1b[0m /x HTTP/1.1\r\n" + host_line(hostile) + b"\r\n")
    reply_of(hostile, b"GET /%1b[2J HTTP/1.1\r\n" + host_line(hostile) + b"\r\n")
    log = hostile.test_log.getvalue()
    assert log.count("\n") >= 3
    assert (
        "\x1b" not in log
        and "\x07" not in log
        and "\u202e" not in log
        and "\xe2\x80\xae" not in log
    )


# ---------------------------------------------------------------------------- any string encodes

SURROGATE = "half \ud83d an emoji"
NASTY = f"{SURROGATE} \x1b[31mred\x1b[0m \u202eevil\u202c \x00nul"


def poison(project, agent_id):
    """A record, its log and its stderr holding lone surrogates in every agent-written field."""
    add_record(project, agent_id, state="done", branch=f"orchestra/{agent_id}", result=NASTY, activity=NASTY, task=NASTY,
               error=NASTY, worktree=str(project.repo / "gone"), base_commit="0" * 40,
               log=str(project.log_path(agent_id)))  # fmt: skip
    with open(project.log_path(agent_id), "w", encoding="utf-8") as f:
        f.write(
            json.dumps(
                {"type": "assistant", "message": {"content": [{"type": "text", "text": NASTY}]}}
            )
            + "\n"
        )
        f.write(
            json.dumps({"type": "result", "subtype": "success", "result": NASTY, "is_error": False})
            + "\n"
        )
    project.stderr_path(agent_id).write_bytes(b"\xed\xa0\xbd bad bytes \x1b[2J\n")


def test_lone_surrogates_in_agent_fields_never_break_an_answer(
    hostile, project, tmp_path, monkeypatch, cli
):
    poison(project, "poisoned")
    transcript = tmp_path / "claude" / "projects" / "-work-app"
    transcript.mkdir(parents=True)
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(tmp_path / "claude"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hostile.env = os.environ
    line = {"type": "user", "message": {"role": "user", "content": NASTY}, "cwd": str(project.repo),
            "sessionId": "00000001-0000-4000-8000-000000000001", "gitBranch": NASTY, "aiTitle": NASTY}  # fmt: skip
    (transcript / "00000001-0000-4000-8000-000000000001.jsonl").write_text(
        json.dumps(line) + "\n" + json.dumps({"type": "ai-title", "aiTitle": NASTY}) + "\n",
        encoding="utf-8",
    )
    for path in (
        "/api/status",
        "/api/agents/poisoned",
        "/api/agents/poisoned/log",
        "/api/sessions?hours=48",
    ):
        connection = http.client.HTTPConnection(*hostile.server_address[:2], timeout=10)
        connection.request("GET", path, headers={"Authorization": f"Bearer {token(hostile)}"})
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (path, body[:300])
        body.decode("ascii")  # escapes, so any client decodes it
        json.loads(body)
    status = json.loads(http_get(hostile, "/api/agents/poisoned"))
    assert status["result"] == NASTY  # the data is kept as it is; only its encoding is safe
    for args in (["status", "--json"], ["status", "poisoned", "--json"], ["sessions", "--json", "--hours", "48"],
                 ["status"], ["status", "poisoned"], ["logs", "poisoned"], ["sessions", "--hours", "48"]):  # fmt: skip
        run = cli(*args)
        assert run.code == 0, (args, run)
        run.out.encode("utf-8")  # what a terminal or pipe must accept
        if (
            args[0] != "logs"
        ):  # logs passes bytes through untouched when piped, cleans them on a terminal
            assert "\x1b" not in run.out and "\u202e" not in run.out and "\x9b" not in run.out, (
                args,
                run.out,
            )
        if "--json" in args:
            assert json.loads(run.out)


def http_get(server, path):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    connection.request("GET", path, headers={"Authorization": f"Bearer {token(server)}"})
    return connection.getresponse().read()


def test_the_websocket_snapshot_carries_lone_surrogates(hostile, project):
    poison(project, "poisoned")
    sock = raw(hostile, upgrade_request(hostile))
    data = b""
    deadline = time.monotonic() + 5
    while b"snapshot" not in data or not data.rstrip().endswith(b"}"):
        data += sock.recv(65536)
        assert time.monotonic() < deadline
    sock.close()
    assert b"\\ud83d" in data


@pytest.mark.parametrize(
    "task", ["bad \ud800 half", "bell \x07 here", "escape \x1b[2J", "nul \x00", "c1 \x9b"]
)
def test_tasks_with_lone_surrogates_or_controls_are_refused(hostile, fake_repo, cli, task):
    connection = http.client.HTTPConnection(*hostile.server_address[:2], timeout=10)
    connection.request("POST", "/api/spawn", body=json.dumps({"tasks": [task]}),
                       headers={"Authorization": f"Bearer {token(hostile)}", "Content-Type": "application/json"})  # fmt: skip
    response = connection.getresponse()
    answer = json.loads(response.read())
    assert response.status == 400 and "U+" in answer["error"], answer
    run = cli("spawn", task)
    assert run.code == 2 and "U+" in run.err
    assert (
        not (fake_repo / ".orchestra" / "state.json").exists()
        or not json.loads((fake_repo / ".orchestra" / "state.json").read_text())["agents"]
    )


def test_multiline_tasks_with_tabs_are_still_accepted():
    orchestra.check_task("first line\n\tsecond line\r\n")


def test_terminal_text_has_no_bidi_overrides_or_surrogates():
    assert orchestra.one_line("a\u202eb\u2066c\u2069 \ud800d") == "abc d"
    assert orchestra.strip_control("x\u200fy\u061cz") == "xyz"


# ---------------------------------------------------------------------------- files


def test_orchestra_files_are_private(fake_repo, cli):
    assert cli("spawn", "write something").code == 0
    folder = fake_repo / ".orchestra"
    wait_for(lambda: any(folder.joinpath("logs").iterdir()), what="a log file")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "logs").stat().st_mode) == 0o700
    for path in folder.rglob("*"):
        if (
            path.is_file() and path.name != "config.json"
        ):  # the user's own file, written by the test
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_existing_folders_are_made_private(fake_repo, cli):
    assert cli("status").code == 0
    os.chmod(fake_repo / ".orchestra", 0o755)
    assert cli("status").code == 0
    assert stat.S_IMODE((fake_repo / ".orchestra").stat().st_mode) == 0o700


def test_threads_left_behind_are_bounded(hostile):
    before = threading.active_count()
    for _ in range(20):
        reply_of(hostile, b"GET / HTTP/1.1\r\n" + host_line(hostile) + b"Connection: close\r\n\r\n")
    wait_for(
        lambda: threading.active_count() <= before + 2, timeout=5, what="connection threads to end"
    )


def test_a_route_failure_logs_no_escape_sequences(hostile, monkeypatch):
    monkeypatch.setattr(orchestra.WebHandler, "route_agent", lambda *a: 1 / 0)
    reply = reply_of(hostile, b"GET /api/agents/\x1b[2J\x1b]0;title\x07 HTTP/1.1\r\n" + host_line(hostile)
                     + b"Authorization: Bearer " + hostile.gate.token + b"\r\n\r\n")  # fmt: skip
    assert reply.startswith(b"HTTP/1.1 500 ")
    log = hostile.test_log.getvalue()
    assert "ZeroDivisionError" in log and "GET /api/agents/" in log
    assert "\x1b" not in log and "\x07" not in log


def test_nothing_is_written_after_a_failed_write():
    class Stuck:
        closed, writes = False, []

        def write(self, data):
            self.writes.append(data)
            raise TimeoutError("timed out")

        def flush(self):
            raise AssertionError("flushed after a failed write")

    raw = Stuck()
    guarded = orchestra.GuardedWriter(raw)
    with pytest.raises(OSError):
        guarded.write(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(OSError):
        guarded.write(b"HTTP/1.1 500 Internal Server Error\r\n")
    guarded.flush()
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n"]


def test_a_client_that_never_reads_gets_only_a_few_answers(hostile):
    sock = raw(hostile, (b"GET / HTTP/1.1\r\n" + host_line(hostile) + b"\r\n") * 2000)
    try:
        time.sleep(1.5)  # past the 1 s deadline: the server has dropped it
        answered = hostile.test_log.getvalue().count('"GET /" 200')
        assert 1 <= answered <= 20, answered  # a small send buffer, not 2000 rendered pages
        assert_still_quick(hostile)
    finally:
        sock.close()
