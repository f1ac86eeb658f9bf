"""Draining a queue: 200 fast agents (the fake agent) at default_parallel 8, with and without checks.

Goal: the queue drains within 1.15x of the ideal time, ceil(tasks / 8) x one agent's own wall time
(plus its checks' own time when checks are configured).
Prints the drain time, the ratio, the supervisor's peak RSS and its state.json writes per second.
The supervisor runs in this process (spawn's detached one is switched off) so its state writes can be
counted exactly; the agents are separate processes, as always.
Run: python3 bench/supervisor.py [--tasks 200] [--seconds 2] [--parallel 8]
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, init_repo, median_seconds, use_bench_environment

import orchestra

FAKE_AGENT = ROOT / "tests" / "fake_agent.py"


def make_repo(root, name, parallel, checks):
    """A one-commit repository whose agents are the fake agent."""
    repo = init_repo(root / name, message="start")
    (repo / ".orchestra").mkdir()
    config = {"agent_command": [sys.executable, str(FAKE_AGENT), "{task}"], "default_parallel": parallel,
              "max_parallel": max(8, parallel), "checks": checks}  # fmt: skip
    (repo / ".orchestra" / "config.json").write_text(json.dumps(config))
    return repo


def agent_seconds(seconds, cwd):
    """One fake agent's own wall time (its sleep plus Python's start), median of three."""
    argv = [sys.executable, str(FAKE_AGENT), f"sleep:{seconds}"]
    return median_seconds(lambda: subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL), 3)


def checks_seconds(checks, cwd):
    """The checks' own wall time in a worktree, median of three (0 without checks)."""

    def run_checks():
        for command in checks:
            subprocess.run(
                command, shell=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )

    return median_seconds(run_checks, 3) if checks else 0.0


def drain(repo, tasks, seconds):
    """Queue the tasks, then time the in-process supervisor until the queue is empty."""
    project = orchestra.Project.open(repo, os.environ)
    orchestra.ensure_supervisor = lambda *args, **kwargs: None  # this process supervises
    orchestra.spawn_agents(project, [f"sleep:{seconds} task {n}" for n in range(tasks)])
    writes = [0]
    write = project.store.write

    def counted(text):
        writes[0] += 1
        write(text)

    project.store.write = counted
    start = time.perf_counter()
    orchestra.Supervisor(project).run()
    elapsed = time.perf_counter() - start
    states = [r["state"] for r in project.records().values()]
    return elapsed, writes[0], states


def run_case(root, name, args, checks):
    repo = make_repo(root, name, args.parallel, checks)
    one = agent_seconds(args.seconds, repo) + checks_seconds(checks, repo)
    elapsed, writes, states = drain(repo, args.tasks, args.seconds)
    ideal = math.ceil(args.tasks / args.parallel) * one
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    done = sum(s == "done" for s in states)
    print(
        f"{name}: {args.tasks} agents of {one:.2f}s at parallel {args.parallel}, checks {checks or 'none'}"
    )
    print(
        f"  drained in {elapsed:.1f}s; ideal {ideal:.1f}s; ratio {elapsed / ideal:.2f}x (goal <= 1.15x)"
    )
    print(f"  {done}/{len(states)} done; supervisor peak RSS {rss_mb:.1f} MB; "
          f"{writes} state writes, {writes / elapsed:.1f}/s")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=2.0, help="each fake agent's sleep")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--only", choices=("plain", "checks"), help="run one case")
    args = parser.parse_args()
    use_bench_environment()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "plain"):
            run_case(Path(tmp), "plain", args, [])
        if args.only in (None, "checks"):
            run_case(
                Path(tmp), "checks", args, ["git diff --quiet HEAD", "test -d .git || test -f .git"]
            )


if __name__ == "__main__":
    main()
