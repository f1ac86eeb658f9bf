"""Approvals under load: from the hook firing to the request being visible, and from `approve` to the answer.

Goals (issue 10), with 8 agents waiting at once: from the hook process starting (as Claude Code
starts it) to the request showing in GET /api/approvals and on the WebSocket, p99 < 500 ms; from
`orchestra approve REQ` starting (a new process, as a user types it) to the hook printing "allow"
(after which Claude Code runs the tool), p99 < 1 s. The 8 hooks of a round start at the same
moment (the worst case: 8 Python processes at once); the 8 approvals follow one after another.

The web server runs as its own process (`orchestra web`); this process poses as the supervisor of 8
running agents and starts each round's 8 hooks at once with a synthetic request on stdin, exactly the
command line agents get. A thread polls /api/approvals every 25 ms; another follows the WebSocket.
Run: python3 bench/approvals.py [--rounds 15] [--agents 8]
"""

import argparse
import compileall
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, init_repo, live_supervisor
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import orchestra

API_POLL = (
    0.025  # seconds between GET /api/approvals (more often would load the server it measures)
)
LAUNCH = f"""import sys
sys.path.insert(0, {str(ROOT)!r})
import orchestra
sys.exit(orchestra.main(sys.argv[1:]))
"""


def make_project(root, agents):
    """A repository with running agent records and this process posing as their live supervisor."""
    repo = init_repo(root / "repo")
    project = orchestra.Project.open(repo, os.environ)

    def seed(state):
        state["supervisor"] = live_supervisor()
        for n in range(agents):
            record = dict.fromkeys(orchestra.RECORD_FIELDS)
            record.update(id=f"agent-{n}", task=f"task {n}", state="running", created_at=orchestra.utc_iso(),
                          log=str(project.log_path(f"agent-{n}")))  # fmt: skip
            state["agents"][record["id"]] = record

    project.store.update(seed)
    return project


def orchestra_argv(*args):
    """The command as the installed console script runs it (module from cached bytecode)."""
    return [sys.executable, "-c", LAUNCH, *args]


class Watchers:
    """First-seen times of request ids: on GET /api/approvals and on the WebSocket."""

    def __init__(self, base, token):
        self.base, self.token = base, token
        self.api, self.ws = {}, {}
        self.lock = threading.Lock()  # guards api and ws
        self.stop = threading.Event()
        self.ready = threading.Event()

    def poll_api(self):
        host, port = self.base.split("//")[1].split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        while not self.stop.is_set():
            connection.request(
                "GET", "/api/approvals", headers={"Authorization": f"Bearer {self.token}"}
            )
            document = json.loads(connection.getresponse().read())
            now = (time.monotonic(), time.time())
            with self.lock:
                for request in document["approvals"]:
                    self.api.setdefault(request["id"], now)
            time.sleep(API_POLL)

    def follow_ws(self):
        uri = self.base.replace("http", "ws", 1) + "/ws/status"
        with connect(
            uri, subprotocols=["orchestra", f"token.{self.token}"], origin=self.base, proxy=None
        ) as ws:
            ws.recv(timeout=10)  # the snapshot
            self.ready.set()
            while not self.stop.is_set():
                with contextlib.suppress(TimeoutError, ConnectionClosed):
                    message = json.loads(ws.recv(timeout=0.2))
                    now = (time.monotonic(), time.time())
                    if message["type"] == "approvals":
                        with self.lock:
                            for request in message["approvals"]:
                                self.ws.setdefault(request["id"], now)

    def seen(self, req_id):
        with self.lock:
            return self.api.get(req_id), self.ws.get(req_id)


def start_hook(project, agent_id, command):
    """One hook process, as Claude Code starts it; (process, start time)."""
    started = time.monotonic()
    command = orchestra.hook_command(
        project.repo, agent_id, 120
    )  # exactly what an agent's settings hold
    hook = subprocess.Popen(
        command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    hook.stdin.write(
        json.dumps(
            {"tool_name": "Bash", "tool_input": {"command": command}, "session_id": agent_id}
        )
    )
    hook.stdin.close()
    return hook, started


def one_round(project, watchers, agents, round_no):
    """8 hooks started at the same moment, then `orchestra approve` for each in turn; the latencies."""
    hooks = {
        f"agent-{n}": start_hook(project, f"agent-{n}", f"make round-{round_no}-{n}")
        for n in range(agents)
    }
    box = orchestra.ApprovalBox(project.repo)
    deadline = time.monotonic() + 30
    while True:
        requests = {r["agent"]: r for r in box.pending()}
        ids = [r["id"] for r in requests.values()]
        if len(requests) == agents and all(all(watchers.seen(i)) for i in ids):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"round {round_no}: requests not all visible after 30 s")
        time.sleep(0.005)
    visible_api, visible_ws, recorded = [], [], []
    for agent_id, (_hook, started) in hooks.items():
        req_id = requests[agent_id]["id"]
        api_at, ws_at = watchers.seen(req_id)
        visible_api.append(api_at[0] - started)
        visible_ws.append(ws_at[0] - started)
        written = (
            os.stat(box.dir / f"{req_id}.json").st_mtime_ns / 1e9
        )  # the hook wrote its request
        recorded.append(max(0.0, ws_at[1] - written))
    answered = []

    def approve(agent_id):
        hook, _ = hooks[agent_id]
        started = time.monotonic()
        subprocess.run(orchestra_argv("approve", requests[agent_id]["id"]), cwd=project.repo, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        answer = json.loads(
            hook.stdout.read()
        )  # the hook prints its answer, then Claude Code runs the tool
        elapsed = time.monotonic() - started
        assert answer["hookSpecificOutput"]["decision"]["behavior"] == "allow", answer
        hook.wait(10)
        answered.append(elapsed)

    for agent_id in hooks:  # one after another, as a user answers them; the others keep waiting
        approve(agent_id)
    return visible_api, visible_ws, recorded, answered


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def report(name, values, goal):
    p50, p99 = percentile(values, 0.5) * 1000, percentile(values, 0.99) * 1000
    verdict = "ok" if p99 < goal * 1000 else "MISSED"
    print(f"{name:44} p50 {p50:6.0f} ms  p99 {p99:6.0f} ms  max {max(values) * 1000:6.0f} ms  "
          f"(goal p99 < {goal * 1000:.0f} ms: {verdict}; n={len(values)})")  # fmt: skip
    return p99 < goal * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--agents", type=int, default=8)
    args = parser.parse_args()
    # As installed: pip leaves the module byte-compiled, so no hook pays for compiling it.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_file(str(ROOT / "orchestra.py"), quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ORCHESTRA_CONFIG"] = str(Path(tmp) / "no-user-config.json")
        project = make_project(Path(tmp), args.agents)
        web = subprocess.Popen(orchestra_argv("web", "--port", "0"), cwd=project.repo, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        try:
            base, _, token = web.stdout.readline().strip().partition("/#token=")
            watchers = Watchers(base, token)
            threads = [threading.Thread(target=watchers.poll_api, daemon=True),
                       threading.Thread(target=watchers.follow_ws, daemon=True)]  # fmt: skip
            for t in threads:
                t.start()
            watchers.ready.wait(10)
            api, ws, recorded, answered = [], [], [], []
            for round_no in range(args.rounds):
                a, w, r, d = one_round(project, watchers, args.agents, round_no)
                api, ws, recorded, answered = api + a, ws + w, recorded + r, answered + d
            watchers.stop.set()
        finally:
            web.send_signal(signal.SIGINT)
            web.wait(10)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.agents} agents waiting at once, {args.rounds} rounds, {os.cpu_count()} CPUs, load average {load:.1f}"
    )
    ok = report("hook fired -> visible in GET /api/approvals", api, 0.5)
    ok &= report("hook fired -> pushed on the WebSocket", ws, 0.5)
    report("(request written -> pushed on the WebSocket)", recorded, 0.5)
    ok &= report("orchestra approve -> hook answers allow", answered, 1.0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
