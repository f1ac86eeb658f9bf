"""Agents on other hosts: this machine plus two ssh hosts at parallel 4 each, 48 two-second agents.

Goals (issue 21): the queue drains within 1.2x of the ideal, ceil(48 / 12) x one agent's own wall
time; `status --json` of the fleet takes at most 1.5x that of a local-only fleet of the same size;
a remote agent's line reaches the local log within 2 s (p99).
The hosts are tests/ssh_hosts.py's: a local account and its own sshd on a loopback port each, so
it needs root. The agent is a small Python program that prints a timestamped stream-json line
every 0.2 s for its two seconds; a thread here tails the local logs and notes when each line lands.
It runs with the system Python itself: a version manager's shim (pyenv's) would start a dozen
shell processes with every agent, on the same two cores as the three machines.
The queue drains first on fresh hosts (orchestra is copied there and compiled on the way), then
three times on hosts that have run orchestra before, their ssh connection closed, each time in a
new repository; the goal is judged on the median of those three (two busy cores vary a lot).
Run (as root): python3 bench/hosts.py [--tasks 48] [--seconds 2] [--parallel 4]
"""

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ORCHESTRA, ROOT, init_repo, median_seconds, use_bench_environment

sys.path.insert(0, str(ROOT / "tests"))
from ssh_hosts import IS_ROOT, SshRig

import orchestra

AGENT = (
    "import json, sys, time\n"
    "end = time.time() + float(sys.argv[1])\n"
    "while time.time() < end:\n"
    "    print(json.dumps({'type': 'assistant', 'message': {'content': [{'type': 'text',"
    " 'text': 'at %.4f' % time.time()}]}}), flush=True)\n"
    "    time.sleep(0.2)\n"
    "print(json.dumps({'type': 'result', 'subtype': 'success', 'is_error': False,"
    " 'result': 'done', 'total_cost_usd': 0.0, 'num_turns': 1}), flush=True)\n"
)


DRAIN_PATIENCE = 150  # seconds: a queue that takes longer is stuck, not slow
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


def make_repo(root, name, seconds, parallel, hosts):
    """A repository whose agents are the timestamping agent, with or without hosts."""
    repo = init_repo(root / name, message="start")
    (repo / ".orchestra").mkdir()
    config = {"agent_command": [PYTHON, "-c", AGENT, str(seconds), "{task}"],
              "default_parallel": parallel, "max_parallel": max(8, parallel),
              "heartbeat_interval": 1.0, "hosts": hosts}  # fmt: skip
    (repo / ".orchestra" / "config.json").write_text(json.dumps(config))
    return repo


class LogWatch(threading.Thread):
    """Tails every agent log of a repository; the delay of each timestamped line on arrival."""

    def __init__(self, repo):
        super().__init__(name="log-watch", daemon=True)
        self.logs, self.offsets, self.partial = repo / ".orchestra" / "logs", {}, {}
        self.delays, self.stop = {"local": [], "remote": []}, threading.Event()
        self.remote_ids = set()

    def run(self):
        while not self.stop.wait(0.05):  # often enough to measure, rarely enough to cost little
            for path in self.logs.glob("*.jsonl"):
                if path.stat().st_size == self.offsets.get(path, 0):
                    continue
                with open(path, "rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    data = f.read()
                self.offsets[path] = self.offsets.get(path, 0) + len(data)
                now = time.time()
                text = self.partial.get(path, b"") + data
                *lines, self.partial[path] = text.split(b"\n")
                for line in lines:
                    if b'"at ' in line:
                        sent = float(json.loads(line)["message"]["content"][0]["text"][3:])
                        kind = "remote" if path.stem in self.remote_ids else "local"
                        self.delays[kind].append(now - sent)


def percentile(values, share):
    """The value below which `share` of the values lie."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def drain(repo, tasks):
    """Spawn the tasks and wait until every agent settled; (seconds, records, watch)."""
    watch = LogWatch(repo)
    watch.start()
    os.chdir(repo)
    start = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):
        assert orchestra.main(["spawn", *tasks, "--json"]) == 0
    project = orchestra.Project.open(repo, os.environ)
    while True:
        agents = project.store.load()["agents"]
        watch.remote_ids = {i for i, r in agents.items() if orchestra.is_remote(r)}
        if all(r["state"] in orchestra.FINISHED_STATES for r in agents.values()):
            break
        if time.monotonic() - start > DRAIN_PATIENCE:
            raise SystemExit(f"the queue did not drain within {DRAIN_PATIENCE} s: {agents}")
        time.sleep(0.1)
    seconds = time.monotonic() - start
    time.sleep(0.5)
    watch.stop.set()
    watch.join()
    return seconds, agents, watch


def status_seconds(repo):
    """Median time of `orchestra status --json` as a user runs it (a fresh process)."""

    def run():
        subprocess.run([sys.executable, str(ORCHESTRA), "status", "--json"], cwd=repo,
                       check=True, capture_output=True)  # fmt: skip

    return median_seconds(run, 5)


def close_ssh_connections():
    """End the shared ssh connections, as if the hosts had not been used for a while."""
    for socket in Path(orchestra.control_folder()).glob("*"):
        subprocess.run(["ssh", "-S", str(socket), "-O", "exit", "host"], capture_output=True)


def drain_figures(root, name, args, hosts, agent_time, what):
    """Drain the queue in a new repository and print how long it took; (its ratio to the ideal,
    agents, watch, repo)."""
    repo = make_repo(root, name, args.seconds, args.parallel, hosts)
    tasks = [f"task {n}" for n in range(args.tasks)]
    seconds, agents, watch = drain(repo, tasks)
    ideal = math.ceil(args.tasks / (3 * args.parallel)) * agent_time
    placed = {}
    for r in agents.values():
        placed[r.get("host") or "local"] = placed.get(r.get("host") or "local", 0) + 1
    for r in agents.values():
        if r["state"] != "done":
            print(f"  {r['id']} on {r.get('host')}: {r['state']}: {r.get('error')}")
    print(f"drain, {what}: {seconds:.1f} s, ideal {ideal:.1f} s ({agent_time:.2f} s per agent): "
          f"{seconds / ideal:.2f}x; placed {placed}")  # fmt: skip
    return seconds / ideal, agents, watch, repo


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()
    if not IS_ROOT:
        sys.exit("bench/hosts.py makes host accounts and sshd: run it as root")
    use_bench_environment()
    root = Path(tempfile.mkdtemp(prefix="bench-hosts-"))
    rig = SshRig(root / "rig", "http://127.0.0.1:9", ["h1", "h2"])
    try:
        hosts = rig.hosts_setting(max_parallel=args.parallel)
        agent = [PYTHON, "-c", AGENT, str(args.seconds)]
        subprocess.run(agent, capture_output=True, check=True)  # warm the disk cache
        start = time.monotonic()
        subprocess.run(agent, capture_output=True, check=True)
        agent_time = time.monotonic() - start
        print(
            f"{args.tasks} agents of {args.seconds:g} s on local + 2 hosts at parallel {args.parallel}"
        )
        drain_figures(root, "first", args, hosts, agent_time, "fresh hosts")
        ratios = []
        for n in range(3):
            close_ssh_connections()
            used = drain_figures(root, f"fleet-{n}", args, hosts, agent_time, "hosts used before")
            ratio, agents, watch, repo = used
            ratios.append(ratio)
        print(
            f"drain on hosts used before: median {statistics.median(ratios):.2f}x the ideal "
            "(goal <= 1.2x)"
        )
        local_only = make_repo(root, "local-only", args.seconds, args.parallel, {})
        os.chdir(local_only)
        state = orchestra.Project.open(local_only, os.environ).store
        state.update(lambda s: s["agents"].update(agents))  # the same records, no hosts
        fleet, alone = status_seconds(repo), status_seconds(local_only)
        print(f"status --json: {fleet * 1000:.0f} ms with hosts, {alone * 1000:.0f} ms local-only: "
              f"{fleet / alone:.2f}x (goal <= 1.5x)")  # fmt: skip
        remote = watch.delays["remote"]
        print(f"remote line to local log: p50 {statistics.median(remote):.2f} s, "
              f"p99 {percentile(remote, 0.99):.2f} s over {len(remote)} lines (goal p99 < 2 s); "
              f"local agents' lines: p99 {percentile(watch.delays['local'], 0.99):.2f} s")  # fmt: skip
        print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        rig.close()


if __name__ == "__main__":
    main()
