"""How long `orchestra cleanup --force` takes on a big worktree (issue 20's figure).

The worktree holds FILES committed files (in 50 folders) plus 1,000 untracked files and 100
modified ones, so cleanup hashes every file, archives a snapshot, verifies it and deletes the
folder. Each run gets its own fresh repository; the figure is the median wall time of the
`cleanup --force` command alone. Compare two versions of orchestra.py:

    python3 bench/cleanup.py --files 50000 --module /path/to/main/orchestra.py   # before
    python3 bench/cleanup.py --files 50000                                       # after (this checkout)
"""

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ORCHESTRA, repo_with_files, use_bench_environment

UNTRACKED, MODIFIED = 1000, 100


def make_repo(root, files):
    """A repository with `files` committed files and a fake agent that does nothing."""
    config = {"agent_command": ["sh", "-c", "{task}"], "heartbeat_interval": 60}
    return repo_with_files(root, files, config)


def run(module, repo, *args):
    """One orchestra command of the module under test; its completed process."""
    return subprocess.run(
        [sys.executable, str(module), *args], cwd=repo, capture_output=True, text=True, check=True
    )


def one_cleanup(module, files):
    """Seconds `cleanup --force` takes for one agent whose worktree holds `files` files."""
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp), files)
        run(module, repo, "spawn", "--name", "big", "--wait", "true")
        worktree = repo / ".worktrees" / "task-big"
        for n in range(UNTRACKED):
            (worktree / "new" / f"u{n % 10}").mkdir(parents=True, exist_ok=True)
            (worktree / "new" / f"u{n % 10}" / f"n{n}.txt").write_text(f"new {n}\n")
        for n in range(MODIFIED):
            (worktree / f"pkg{n % 50}" / f"file{n}.txt").write_text(f"changed {n}\n")
        cpu_before, start = children_cpu(), time.perf_counter()
        done = run(module, repo, "cleanup", "--force", "big")
        seconds, cpu = time.perf_counter() - start, children_cpu() - cpu_before
        assert "REMOVED big" in done.stdout, done.stdout
        assert not worktree.exists()
        return seconds, cpu


def children_cpu():
    """CPU seconds (user + system) that finished child processes used, git's included: on a
    shared machine a steadier figure than the wall clock."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=50000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--module", type=Path, default=ORCHESTRA, help="the orchestra.py to time")
    args = parser.parse_args()
    use_bench_environment()
    runs = [one_cleanup(args.module.resolve(), args.files) for _ in range(args.runs)]
    wall, cpu = [w for w, _ in runs], [c for _, c in runs]
    print(
        f"cleanup --force, {args.files} committed + {UNTRACKED} untracked + {MODIFIED} modified files, "
        f"{args.module}: median {statistics.median(wall):.2f} s wall, "
        f"{statistics.median(cpu):.2f} s CPU (runs: "
        f"{', '.join(f'{w:.2f}/{c:.2f}' for w, c in runs)})"
    )


if __name__ == "__main__":
    main()
