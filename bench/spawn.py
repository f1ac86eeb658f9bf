"""Spawning 8 agents on a 5,000-file repository, against 8 sequential raw `git worktree add`.

Goal: orchestra spawn at most 1.2x the raw git time. The agents are a no-op command, so this
measures orchestra's own work, until every agent has run: ids, records, the worktrees (spawn
makes the first, the supervisor the others just before they run), starting the supervisor.
Run: python3 bench/spawn.py [--files N] [--rounds N]
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ORCHESTRA, git, repo_with_files, use_bench_environment

AGENTS = 8


def make_repo(root, files):
    """A repository with `files` small files in nested folders, committed."""
    return repo_with_files(
        root,
        files,
        {"agent_command": ["true", "{task}"], "max_parallel": 8},
        path=lambda n: f"pkg{n % 50}/mod{n % 7}/file{n}.py",
        text=lambda n: f"# file {n}\nVALUE = {n}\n",
    )


def reset(repo):
    """Remove every worktree, branch and record the last round made."""
    for folder in (repo / ".worktrees", repo / "raw"):
        shutil.rmtree(folder, ignore_errors=True)
    git(repo, "worktree", "prune")
    branches = subprocess.run(
        ["git", "branch", "--format=%(refname:short)"], cwd=repo, capture_output=True, text=True
    ).stdout.split()
    for branch in branches:
        if branch != "main":
            git(repo, "branch", "-D", branch)
    for name in ("state.json", "logs"):
        path = repo / ".orchestra" / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def time_raw(repo):
    start = time.perf_counter()
    for n in range(AGENTS):
        git(
            repo, "worktree", "add", "-q", "-b", f"raw-{n}", str(repo / "raw" / f"task-{n}"), "main"
        )
    return time.perf_counter() - start


def time_orchestra(repo):
    """Until every agent has run: spawn makes the first worktree, the supervisor the others."""
    tasks = [f"task number {n}" for n in range(AGENTS)]
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(ORCHESTRA), "spawn", "--parallel", str(AGENTS), *tasks],
        cwd=repo,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wait_idle(repo)
    return time.perf_counter() - start


def wait_idle(repo):
    """Let the supervisor finish the no-op agents before the next round."""
    deadline = time.time() + 30
    while time.time() < deadline:
        state = json.loads((repo / ".orchestra" / "state.json").read_text())
        if all(
            a["state"] not in ("queued", "running") for a in state["agents"].values()
        ) and not state["supervisor"].get("pid"):
            return
        time.sleep(0.1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    use_bench_environment()
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp), args.files)
        raw, ours = [], []
        for _ in range(args.rounds):
            reset(repo)
            raw.append(time_raw(repo))
            reset(repo)
            ours.append(time_orchestra(repo))
    raw_median, ours_median = statistics.median(raw), statistics.median(ours)
    print(f"repository: {args.files} files; {AGENTS} worktrees; median of {args.rounds} rounds")
    print(f"8 x git worktree add (sequential): {raw_median * 1000:7.0f} ms")
    print(f"orchestra spawn (8 tasks, all run): {ours_median * 1000:6.0f} ms")
    print(f"ratio: {ours_median / raw_median:.2f}x (goal <= 1.2x)")


if __name__ == "__main__":
    main()
