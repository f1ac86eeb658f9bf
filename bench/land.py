"""The merge queue's cost: landing agents next to running their checks.

Goals (issue 22): land 20 agents with a 2-second check, none conflicting, in at most 1.3x the time
of their 20 checks run back to back; land one agent, apart from its checks, in under 1 s on a
repository of 5,000 files. Agents here are records with a branch each (one commit adding one file,
made with git plumbing); `land` is the same code the CLI runs: a merge in the scratch worktree,
the checks there, the compare-and-swap, and the user's clean checkout brought along.
Run: python3 bench/land.py [--agents 20] [--check-seconds 2] [--files 5000]
"""

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import git, init_repo, live_supervisor, use_bench_environment

import orchestra


def big_repo(root, files):
    """A repository on main holding `files` small files in 50 folders, one commit."""
    repo = init_repo(root / "repo")
    for n in range(files):
        folder = repo / f"src{n % 50:02d}"
        folder.mkdir(exist_ok=True)
        (folder / f"file{n:05d}.txt").write_text(f"line {n}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", f"{files} files")
    return repo


def agent_branch(repo, name):
    """Branch orchestra/NAME: main plus one commit adding NAME.txt, made without a checkout."""
    env = dict(os.environ, GIT_INDEX_FILE=str(repo / ".git" / f"index-{name}"))
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=repo, input=f"{name}\n",
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    git(repo, "read-tree", "main", env=env)
    git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{name}.txt", env=env)
    tree = git(repo, "write-tree", env=env).strip()
    commit = git(repo, "commit-tree", tree, "-p", "main", "-m", f"add {name}.txt").strip()
    git(repo, "update-ref", f"refs/heads/orchestra/{name}", commit)
    os.unlink(env["GIT_INDEX_FILE"])


def seed(project, names, checks):
    """Done agents with passed checks and the given checks fixed at spawn."""
    base = git(project.repo, "rev-parse", "main").strip()

    def change(state):
        state["supervisor"] = live_supervisor()
        for seq, name in enumerate(names):
            record = dict.fromkeys(orchestra.RECORD_FIELDS)
            record.update(id=name, task=f"add {name}.txt", state="done", seq=seq, branch=f"orchestra/{name}",
                          base_branch="main", base_commit=base, created_at=orchestra.utc_iso(),
                          worktree=str(project.worktree_path(name)), log=str(project.log_path(name)),
                          checks={"status": "passed", "command": None, "exit_code": 0, "tail": "", "rounds": 0},
                          launch={"agent_command": ["claude"], "checks": checks})  # fmt: skip
            state["agents"][name] = record

    project.store.update(change)


def timed_land(project, names):
    start = time.perf_counter()
    document = orchestra.land_agents(project, names)
    seconds = time.perf_counter() - start
    assert all(r["outcome"] == "landed" for r in document["results"]), document["results"]
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--check-seconds", type=float, default=2.0)
    parser.add_argument("--files", type=int, default=5000)
    args = parser.parse_args()
    use_bench_environment()
    with tempfile.TemporaryDirectory() as folder:
        repo = big_repo(Path(folder), args.files)
        project = orchestra.Project.open(repo, os.environ)
        project.init()
        singles = [f"one-{n}" for n in range(4)]
        batch = [f"agent-{n:02d}" for n in range(args.agents)]
        for name in singles + batch:
            agent_branch(repo, name)
        seed(project, singles, [])
        cold = timed_land(project, singles[:1])  # makes the scratch worktree: a full checkout
        warm = sorted(timed_land(project, [name]) for name in singles[1:])
        print(f"repository: {args.files} files; one agent landed apart from its checks:")
        print(f"  first land (creates the scratch worktree): {cold:.2f} s")
        print(f"  next lands (median of {len(warm)}): {warm[len(warm) // 2]:.2f} s  (goal < 1 s)")
        seed(project, batch, [f"sleep {args.check_seconds}"])
        total = timed_land(project, batch)
        serial = args.agents * args.check_seconds
        print(
            f"{args.agents} agents, a {args.check_seconds:g}-second check each, none conflicting:"
        )
        print(f"  land: {total:.1f} s; the checks back to back: {serial:.1f} s; "
              f"ratio {total / serial:.2f}x  (goal <= 1.3x)")  # fmt: skip
        assert git(repo, "status", "--porcelain") == ""


if __name__ == "__main__":
    main()
