"""Load on `orchestra web`: WebSocket fan-out, API latency, memory, and slowloris.

Goals (issue 5): with 50 WebSocket clients while 8 agent records change several times a second,
p99 update latency < 250 ms; GET /api/status p50 < 5 ms; the web process's RSS < 40 MB; with
200 slowloris sockets open, an authenticated request still answers in < 1 s.
Goals (issue 12): authenticated GET /api/status p99 < 100 ms, never refused, while 130
unauthenticated clients pipeline requests and never read; the dashboard's first render in
Chromium < 300 ms with 200 agents in history.

The web server runs as its own process, as a user starts it; this process plays the supervisor,
rewriting state.json through orchestra's state store, and all the clients. Loopback only.
Goals (issue 19): the log view (GET /api/agents/ID/log?tail=50 and `orchestra logs ID --tail 50`)
of a 100 MB single-line log and of a log of 10 M short lines in < 1 s and < 100 MB; also the
supervisor's fold of the same logs (read_log: CPU and peak RSS), and the same for a 2 GB line.
Run: python3 bench/web.py [--clients 50] [--seconds 10] [--writes 5] [--slowloris 200]
                          [--pipeliners 130] [--history 200]
                          [--big-line-mb 100] [--short-lines 10000000] [--huge-line-mb 2048]
                          [--logs-only]
"""

import argparse
import asyncio
import contextlib
import http.client
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, init_repo, live_supervisor, use_bench_environment
from websockets.asyncio.client import connect

import orchestra

# `orchestra web` as the installed console script runs it: the module imported (so from cached
# bytecode), then main().
LAUNCH = f"""import sys
sys.path.insert(0, {str(ROOT)!r})
import orchestra
sys.exit(orchestra.main(["web", "--port", "0"]))
"""
AGENTS = 8


def make_project(root):
    """A repository with 8 running agent records and this process posing as their live supervisor."""
    repo = init_repo(root / "repo")
    project = orchestra.Project.open(repo, os.environ)

    def seed(state):
        state["supervisor"] = live_supervisor()  # so the web server does not start a real one
        for n in range(AGENTS):
            record = dict.fromkeys(orchestra.RECORD_FIELDS)
            record.update(id=f"agent-{n}", task=f"benchmark task number {n} " * 4, state="running",
                          branch=f"orchestra/agent-{n}", worktree=str(repo / ".worktrees" / f"task-agent-{n}"),
                          created_at=orchestra.utc_iso(), started_at=orchestra.utc_iso(), cost_usd=0.0,
                          commits=0, files_changed=0, turns=0, input_tokens=0, output_tokens=0)  # fmt: skip
            state["agents"][record["id"]] = record

    project.store.update(seed)
    return project


def start_web(repo, pycache):
    """`orchestra web --port 0` in its own process, bytecode cached as pip would; (process, base URL, token)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    subprocess.run([sys.executable, "-c", LAUNCH.replace('main(["web", "--port", "0"])', 'main(["--version"])')],
                   env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    url = proc.stdout.readline().strip()
    base, _, token = url.partition("/#token=")
    return proc, base, token


def source_rss(repo):
    """Idle RSS in MB of `python3 orchestra.py web`, which compiles the file from source every start."""
    script = ROOT / "orchestra.py"
    proc = subprocess.Popen([sys.executable, str(script), "web", "--port", "0"], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})  # fmt: skip
    try:
        proc.stdout.readline()
        time.sleep(0.5)
        return rss_mb(proc.pid)[0]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)


def write_updates(project, seconds, per_second, stop):
    """Rewrite all agent records `per_second` times a second; each activity carries its write time."""
    tick, interval = 0, 1.0 / per_second
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        tick += 1

        def change(state, tick=tick):
            stamp = time.time()
            for record in state["agents"].values():
                record.update(activity=f"tick {tick} at {stamp:.6f}", cost_usd=record["cost_usd"] + 0.001,
                              output_tokens=record["output_tokens"] + 7)  # fmt: skip

        project.store.update(change)
        time.sleep(interval)
    return tick


async def client(uri, token, origin, latencies, ready, done):
    """One dashboard: wait for the snapshot, then time every update from its write."""
    async with connect(uri, subprotocols=["orchestra", f"token.{token}"], origin=origin, proxy=None,
                       compression=None, max_size=None) as ws:  # fmt: skip
        json.loads(await ws.recv())
        ready()
        while not done.is_set():
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
            except asyncio.TimeoutError:
                continue
            now = time.time()
            stamps = {
                float(a["activity"].rsplit(" ", 1)[1])
                for a in message.get("agents", ())
                if a["activity"]
            }
            latencies.extend(now - stamp for stamp in stamps)


async def websocket_load(project, base, token, clients, seconds, per_second):
    """Connect the clients, run the writer, and return the update latencies in seconds."""
    uri, latencies, connected = base.replace("http://", "ws://") + "/ws/status", [], []
    all_ready, done = asyncio.Event(), asyncio.Event()

    def ready():
        connected.append(1)
        if len(connected) == clients:
            all_ready.set()

    tasks = [
        asyncio.create_task(client(uri, token, base, latencies, ready, done))
        for _ in range(clients)
    ]
    await asyncio.wait_for(all_ready.wait(), 30)
    stop = threading.Event()
    writes = await asyncio.to_thread(write_updates, project, seconds, per_second, stop)
    await asyncio.sleep(1.0)  # let the last update arrive
    done.set()
    await asyncio.gather(*tasks)
    return latencies, writes


def rss_mb(pid):
    """(current, peak) resident memory of a process in MB, from /proc."""
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def status_latencies(base, token, count):
    """Milliseconds per GET /api/status over one keep-alive connection."""
    host, port = base.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request("GET", "/api/status", headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        response.read()
        times.append((time.perf_counter() - started) * 1000)
        assert response.status == 200
    connection.close()
    return times


def slowloris(base, token, count):
    """Open `count` sockets that send a request one byte at a time; time an authenticated request."""
    host, port = base.split("//")[1].split(":")
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: ")
        sockets.append(sock)
    time.sleep(1.0)
    for sock in sockets:  # still trickling
        with contextlib.suppress(OSError):
            sock.sendall(b"x")
    answered = status_latencies(base, token, 1)[0]
    dropped = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            dropped += sock.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            dropped += 1
        sock.close()
    return answered, dropped


def pipeliner(host, port, stop, counts):
    """An unauthenticated client: pipelines requests for the page and never reads; when the
    server drops it, it connects again."""
    request = b"GET / HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (host.encode(), port)
    while not stop.is_set():
        try:
            sock = socket.create_connection((host, port), timeout=5)
        except OSError:
            counts["refused"] += 1
            time.sleep(0.1)
            continue
        counts["connections"] += 1
        sock.setblocking(False)
        try:
            while not stop.is_set():
                with contextlib.suppress(BlockingIOError):
                    sock.send(request * 50)
                time.sleep(0.05)
        except OSError:
            pass  # dropped by the server: come back
        finally:
            sock.close()


def pipeliners(host, port, attackers, stop, connections):
    """The attackers, in a process of their own so that their threads do not slow the measuring one."""
    counts = {"connections": 0, "refused": 0}
    threads = [threading.Thread(target=pipeliner, args=(host, port, stop, counts), daemon=True)
               for _ in range(attackers)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    connections.value = counts["connections"]


def pipelining(base, token, attackers, seconds):
    """Authenticated GET /api/status latencies (ms, each on a new connection) and refusals while
    `attackers` clients pipeline and never read."""
    host, port = base.split("//")[1].split(":")
    stop, connections = multiprocessing.Event(), multiprocessing.Value("i", 0)
    attack = multiprocessing.Process(
        target=pipeliners, args=(host, int(port), attackers, stop, connections)
    )
    attack.start()
    time.sleep(1.0)
    times, refused, deadline = [], 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            times.append(status_latencies(base, token, 1)[0])
        except (OSError, AssertionError):
            refused += 1
        time.sleep(0.02)
    stop.set()
    attack.join(30)
    return times, refused, connections.value


def add_history(project, count):
    """`count` cleaned-up agents, as a long-used repository has."""

    def change(state):
        for n in range(count):
            record = dict.fromkeys(orchestra.RECORD_FIELDS)
            record.update(id=f"old-{n}", task=f"an old task number {n} " * 3, state="removed", cost_usd=0.5,
                          created_at=f"2026-01-01T00:{n // 60 % 60:02d}:{n % 60:02d}Z", branch=f"orchestra/old-{n}")  # fmt: skip
            state["agents"][record["id"]] = record

    project.store.update(change)


# Records when the agent cards first all stand on the page, in ms since navigation started.
TIME_FIRST_RENDER = """
new MutationObserver((changes, observer) => {
  if (document.querySelectorAll(".card").length >= %d) {
    window.firstRender = performance.now();
    observer.disconnect();
  }
}).observe(document, {subtree: true, childList: true});
"""


def first_render(base, token, cards, runs=5):
    """Milliseconds from navigation to the first full list of cards, in Chromium at 390x844 (best and median)."""
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=["--headless", "--no-sandbox"]
        )
        for _ in range(runs + 1):  # the first run warms the browser's caches up
            page = browser.new_page(viewport={"width": 390, "height": 844})
            page.add_init_script(TIME_FIRST_RENDER % cards)
            page.goto(f"{base}/#token={token}")
            page.wait_for_function("() => window.firstRender !== undefined", timeout=30_000)
            times.append(page.evaluate("window.firstRender"))
            page.close()
        browser.close()
    return min(times[1:]), statistics.median(times[1:])


# A child that runs one action and reports its own peak RSS (VmHWM: its memory after exec only;
# wait4's ru_maxrss would count the bench process it was forked from).
CHILD = """import os, sys
sys.path.insert(0, {root!r})
import orchestra
try:
    {action}
finally:
    peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
    os.write(2, ("VmHWM " + peak + "\\n").encode())
"""
LOGS_ACTION = (
    "sys.stdout = open(os.devnull, 'w'); orchestra.main(['logs', sys.argv[1], '--tail', '50'])"
)
FOLD_ACTION = "orchestra.read_log(sys.argv[1])"


def write_logs(folder, big_mb, short_lines, huge_mb):
    """The three logs: one line of big_mb MB, short_lines short lines, one line of huge_mb MB."""
    logs = {}
    for name, megabytes in (("big-line", big_mb), ("huge-line", huge_mb)):
        if not megabytes:
            continue
        path = logs[name] = folder / f"{name}.jsonl"
        with open(path, "wb") as f:
            f.write(
                b'{"type": "orchestra", "event": "launch"}\n{"type": "assistant", "message": {"content": "'
            )
            block = b"x" * (1024 * 1024)
            for _ in range(megabytes):
                f.write(block)
            f.write(b'"}}\n{"type": "assistant", "message": {"content": "after the long line"}}\n')
    if short_lines:
        path = logs["short-lines"] = folder / "short-lines.jsonl"
        line = b'{"type": "assistant", "message": {"content": "a short line"}}\n'
        with open(path, "wb") as f:
            f.write(b'{"type": "orchestra", "event": "launch"}\n')
            batch = line * 100_000
            for _ in range(short_lines // 100_000):
                f.write(batch)
            f.write(line * (short_lines % 100_000))
    return logs


def child_cost(action, arg, cwd=None):
    """(wall seconds, CPU seconds, peak RSS MB) of a child that runs `action` to its end."""
    argv = [sys.executable, "-c", CHILD.format(root=str(ROOT), action=action), arg]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, err
    peak = int(err.rpartition("VmHWM ")[2].split()[0]) / 1024
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime, peak


def proc_cpu(pid):
    """CPU seconds a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_views(root, big_mb, short_lines, huge_mb):
    """Lines of figures: the log views and the supervisor's fold of each log."""
    repo = init_repo(root / "logs-repo")
    project = orchestra.Project.open(repo, os.environ)
    project.dir.mkdir(exist_ok=True)
    logs = write_logs(project.dir / "logs", big_mb, short_lines, huge_mb)

    def seed(state):
        state["supervisor"] = live_supervisor()
        for name in logs:
            record = dict.fromkeys(orchestra.RECORD_FIELDS)
            record.update(id=name, task=name, state="done", log=str(logs[name]),
                          created_at=orchestra.utc_iso())  # fmt: skip
            state["agents"][name] = record

    project.store.update(seed)
    sizes = {name: path.stat().st_size / 1e6 for name, path in logs.items()}
    out = []
    proc, base, token = start_web(repo, root / "pycache-logs")
    try:
        host, port = base.split("//")[1].split(":")
        for name in logs:
            cpu, started = proc_cpu(proc.pid), time.perf_counter()
            connection = http.client.HTTPConnection(host, int(port), timeout=600)
            connection.request("GET", f"/api/agents/{name}/log?tail=50",
                               headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            answer = json.loads(connection.getresponse().read())
            wall, cpu = time.perf_counter() - started, proc_cpu(proc.pid) - cpu
            out.append(f"web GET /api/agents/{name}/log?tail=50 ({sizes[name]:.0f} MB log): "
                       f"{wall * 1000:.0f} ms, {cpu * 1000:.0f} ms CPU, {len(answer['lines'])} lines, "
                       f"web RSS peak so far {rss_mb(proc.pid)[1]:.1f} MB")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    for name in logs:
        wall, cpu, peak = child_cost(LOGS_ACTION, name, cwd=repo)
        out.append(f"orchestra logs {name} --tail 50 ({sizes[name]:.0f} MB log): {wall * 1000:.0f} ms, "
                   f"{cpu * 1000:.0f} ms CPU, peak RSS {peak:.1f} MB (goal < 1 s, < 100 MB)")  # fmt: skip
        wall, cpu, peak = child_cost(FOLD_ACTION, str(logs[name]))
        out.append(f"supervisor's fold of {name} (read_log, {sizes[name]:.0f} MB): {wall:.2f} s, "
                   f"{cpu:.2f} s CPU, peak RSS {peak:.1f} MB")  # fmt: skip
    return out


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--writes", type=float, default=5.0, help="state.json rewrites per second")
    parser.add_argument("--slowloris", type=int, default=200)
    parser.add_argument("--pipeliners", type=int, default=130)
    parser.add_argument("--pipeline-seconds", type=float, default=10.0)
    parser.add_argument("--history", type=int, default=200)
    parser.add_argument("--big-line-mb", type=int, default=100)
    parser.add_argument("--short-lines", type=int, default=10_000_000)
    parser.add_argument("--huge-line-mb", type=int, default=0, help="e.g. 2048 for a 2 GB line")
    parser.add_argument("--logs-only", action="store_true", help="only the log-view figures")
    args = parser.parse_args()
    use_bench_environment(NO_COLOR="1")
    with tempfile.TemporaryDirectory() as tmp:
        for line in log_views(Path(tmp), args.big_line_mb, args.short_lines, args.huge_line_mb):
            print(line, flush=True)
    if args.logs_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp))
        proc, base, token = start_web(project.repo, Path(tmp) / "pycache")
        try:
            idle_rss = rss_mb(proc.pid)[0]
            latencies, writes = asyncio.run(
                websocket_load(project, base, token, args.clients, args.seconds, args.writes)
            )
            loaded_rss, peak_rss = rss_mb(proc.pid)
            times = status_latencies(base, token, 500)
            answered, dropped = slowloris(base, token, args.slowloris)
            piped, refused, reconnects = pipelining(
                base, token, args.pipeliners, args.pipeline_seconds
            )
            add_history(project, args.history)
            render_best, render_median = first_render(base, token, AGENTS)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
        from_source = source_rss(project.repo)
    ms = [x * 1000 for x in latencies]
    expected = writes * args.clients
    print(f"WebSocket: {args.clients} clients, {AGENTS} agents, {writes} writes in {args.seconds:.0f} s: "
          f"{len(ms)}/{expected} updates received")  # fmt: skip
    print(f"  update latency p50 {statistics.median(ms):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms, "
          f"max {max(ms):.1f} ms (goal p99 < 250 ms)")  # fmt: skip
    print(f"GET /api/status: 500 requests, p50 {statistics.median(times):.2f} ms, "
          f"p99 {percentile(times, 0.99):.2f} ms (goal p50 < 5 ms)")  # fmt: skip
    print(f"web process RSS: {idle_rss:.1f} MB idle, {loaded_rss:.1f} MB with {args.clients} clients, "
          f"peak {peak_rss:.1f} MB (goal < 40 MB); {from_source:.1f} MB idle when compiled from source "
          "(python3 orchestra.py web)")  # fmt: skip
    print(f"slowloris: {args.slowloris} sockets trickling a request; an authenticated GET /api/status "
          f"answered in {answered:.1f} ms (goal < 1 s); the server had dropped {dropped} of them")  # fmt: skip
    print(f"pipelining: {args.pipeliners} unauthenticated clients pipelining and never reading "
          f"({reconnects} connections in {args.pipeline_seconds:.0f} s); authenticated GET /api/status on new "
          f"connections: {len(piped)} answered, {refused} refused, p50 {statistics.median(piped):.1f} ms, "
          f"p99 {percentile(piped, 0.99):.1f} ms (goal p99 < 100 ms, none refused)")  # fmt: skip
    print(f"dashboard first render in Chromium at 390x844 with {AGENTS} agents and {args.history} in history: "
          f"best {render_best:.0f} ms, median {render_median:.0f} ms (goal < 300 ms)")  # fmt: skip


if __name__ == "__main__":
    main()
