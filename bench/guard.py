"""The containment guard's cost: its added time per tool call, and an ordinary agent's wall time.

Goals (issue 18): the PreToolUse hook, started exactly as Claude Code starts it (the command an
agent's --settings layer holds, module from cached bytecode), adds p99 < 100 ms per tool call; an
ordinary 20-tool-call agent (Write, Edit, Read, git status/add/commit...) run by the real claude
CLI against a scripted API takes at most 1.1x its time without the guard.

Part 1 times the hook alone on a mix of calls (allowed writes and git, and refusals, which also
append to the agent's log): as installed, answered by the supervisor's guard server, and judging
each call itself, as it does when no supervisor runs. Part 2 runs the same scripted agent with
orchestra's full settings layer, then with the PreToolUse hook taken out, alternating, and
compares medians.
Run: python3 bench/guard.py [--calls 200] [--runs 3]
"""

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import IDENTITY, ROOT, git, init_repo

import orchestra

sys.path.insert(0, str(ROOT / "tests"))
from scripted_api import ScriptedAPI, bash, call, claude_env, slow, text


def make_agent(root):
    """A repository with one agent's worktree and record, as spawn leaves them."""
    repo = init_repo(root / "repo")
    project = orchestra.Project.open(repo, os.environ)
    record = orchestra.new_record(
        project, "bench", "bench", "main", git(repo, "rev-parse", "HEAD").strip()
    )
    git(repo, "worktree", "add", "-q", "-b", record["branch"], record["worktree"])
    project.dir.mkdir(exist_ok=True)
    (project.dir / "logs").mkdir(exist_ok=True)
    return project, record


def hook_calls(record):
    """Typical tool calls: mostly allowed ones, a few the guard refuses."""
    worktree = Path(record["worktree"])
    allowed = [
        ("Write", {"file_path": str(worktree / "src" / "a.py"), "content": "x = 1\n"}),
        (
            "Edit",
            {"file_path": str(worktree / "src" / "a.py"), "old_string": "1", "new_string": "2"},
        ),
        ("Read", {"file_path": str(worktree / "README.md")}),
        ("Bash", {"command": "git add -A && git commit -qm 'work'"}),
        ("Bash", {"command": "pytest -q 2>&1 | tail -5"}),
        ("Grep", {"pattern": "def ", "path": str(worktree)}),
    ]
    refused = [
        ("Write", {"file_path": str(worktree.parent.parent / "README.md"), "content": "x"}),
        ("Bash", {"command": "git -C ../.. checkout -- README.md"}),
    ]
    return allowed * 4 + refused


def time_hook(record, calls):
    """Seconds each hook process took, from start to exit, as Claude Code runs it."""
    command = orchestra.guard_command(Path(record["log"]).parent.parent.parent, record, 60)
    seconds = []
    mix = hook_calls(record)
    for n in range(calls):
        tool, tool_input = mix[n % len(mix)]
        payload = json.dumps(
            {"tool_name": tool, "tool_input": tool_input, "cwd": record["worktree"]}
        )
        started = time.perf_counter()
        subprocess.run(
            command, shell=True, input=payload, capture_output=True, text=True, check=True
        )
        seconds.append(time.perf_counter() - started)
    return seconds


def baseline_python(calls):
    """Seconds a bare `python3 -I -S -c pass` takes here: the floor any hook pays."""
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
        seconds.append(time.perf_counter() - started)
    return seconds


def ordinary_steps(worktree, think):
    """20 tool calls of an ordinary agent, then its final answer; each answer streamed over `think` s."""
    steps = []
    for n in range(4):
        path = str(worktree / f"mod{n}.py")
        steps += [
            call("Write", file_path=path, content=f"value = {n}\n"),
            call("Edit", file_path=path, old_string=f"= {n}", new_string=f"= {n + 1}"),
            call("Read", file_path=path),
            bash(f"git add mod{n}.py"),
            bash(f"git commit -qm 'mod{n}'"),
        ]
    steps = [*steps, text("done")]
    return [slow(step, think / 5) for step in steps] if think else steps  # about 5 events a step


def run_agent(project, record, api, env, guarded, n, think):
    """One run of the ordinary agent in a fresh worktree; its wall time in seconds."""
    record = dict(record, id=f"run{n}", branch=f"orchestra/run{n}")
    record["worktree"] = str(project.worktree_root / f"task-run{n}")
    git(project.repo, "worktree", "add", "-q", "-b", record["branch"], record["worktree"])
    key = f"ordinary-{n}"
    api.script(key, ordinary_steps(Path(record["worktree"]), think))
    argv = orchestra.agent_argv(dict(record, task=key), env=env)
    if not guarded:
        index = argv.index("--settings") + 1
        settings = json.loads(argv[index])
        del settings["hooks"]["PreToolUse"]
        argv[index] = json.dumps(settings)
    started = time.perf_counter()
    done = subprocess.run(
        argv, input=key, cwd=record["worktree"], env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    commits = git(project.repo, "rev-list", "--count", f"main..{record['branch']}").strip()
    if done.returncode or commits != "4":
        raise SystemExit(
            f"run {n} failed ({done.returncode}, {commits} commits): {done.stderr[-500:]}"
        )
    return elapsed


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def report_hook(how, seconds):
    p50, p99 = percentile(seconds, 0.5) * 1000, percentile(seconds, 0.99) * 1000
    verdict = "ok" if p99 < 100 else "MISSED"
    print(
        f"guard hook per tool call, {how}: p50 {p50:.0f} ms  p99 {p99:.0f} ms  "
        f"max {max(seconds) * 1000:.0f} ms (goal p99 < 100 ms: {verdict}; n={len(seconds)})"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="hook calls timed in part 1")
    parser.add_argument("--runs", type=int, default=3, help="agent runs each way in part 2")
    parser.add_argument(
        "--think",
        type=float,
        default=0.0,
        help="seconds the scripted model takes per answer (0: at once, the worst case)",
    )
    args = parser.parse_args()
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_file(str(ROOT / "orchestra.py"), quiet=1)  # as pip installs it
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(IDENTITY, ORCHESTRA_CONFIG=str(Path(tmp) / "no-user-config.json"))
        project, record = make_agent(Path(tmp))
        floor = statistics.median(baseline_python(20)) * 1000
        print(f"bare python -I -S: {floor:.0f} ms")
        report_hook("judging itself (no supervisor)", time_hook(record, args.calls))
        server = orchestra.GuardServer(project.repo).start()
        report_hook("as installed (supervisor's guard server)", time_hook(record, args.calls))
        with ScriptedAPI() as api:
            env = {**claude_env(api, config_dir=Path(tmp) / "claude-config"), **IDENTITY}
            env["ORCHESTRA_CONFIG"] = os.environ["ORCHESTRA_CONFIG"]
            times = {True: [], False: []}
            for n in range(args.runs * 2):
                guarded = n % 2 == 0
                times[guarded].append(run_agent(project, record, api, env, guarded, n, args.think))
        server.stop()
        with_guard, without = statistics.median(times[True]), statistics.median(times[False])
        ratio = with_guard / without
        print(
            f"ordinary 20-call agent: {with_guard:.2f} s with the guard, {without:.2f} s without "
            f"(x{ratio:.2f}; goal <= 1.1: {'ok' if ratio <= 1.1 else 'MISSED'}; {args.runs} runs each, model answers in {args.think:g} s)"
        )


if __name__ == "__main__":
    main()
