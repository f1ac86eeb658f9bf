"""What the bench scripts share: where the checkout is, the bench's git identity and environment,
throwaway repositories, a stand-in live supervisor and a median of timed runs.

Each script runs as `python3 bench/NAME.py`; Python puts bench/ first on sys.path, so
`from common import ...` finds this file, and importing it puts the checkout on sys.path, so that
`import orchestra` finds this checkout's orchestra.py.
"""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORCHESTRA = ROOT / "orchestra.py"
sys.path.insert(0, str(ROOT))

IDENTITY = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@example.com",
            "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@example.com"}  # fmt: skip


def use_bench_environment(**extra):
    """Set the bench's git identity and no user config (plus `extra`) in this process's environment."""
    os.environ.update(IDENTITY, ORCHESTRA_CONFIG="/nonexistent/config.json", **extra)


def git(repo, *args, **kw):
    """Run git in repo and return its stdout."""
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True, **kw
    ).stdout


def init_repo(repo, message="init"):
    """Make the folder a repository on main with one empty commit (by the bench identity)."""
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=b@example.com", "commit", "-q",
                    "--allow-empty", "-m", message], cwd=repo, check=True)  # fmt: skip
    return repo


def repo_with_files(root, files, config, path=None, text=None):
    """`root`/repo on main with `files` small committed files (in 50 folders, or at path(n), holding
    text(n)) and `config` as its .orchestra/config.json."""
    import json

    repo = root / "repo"
    for n in range(files):
        file = repo / (path(n) if path else f"pkg{n % 50}/file{n}.txt")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text(n) if text else f"file {n}\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "files")
    (repo / ".orchestra").mkdir()
    (repo / ".orchestra" / "config.json").write_text(json.dumps(config))
    return repo


def live_supervisor():
    """A state.json supervisor entry naming this process, so nothing starts a real supervisor."""
    import orchestra

    me = os.getpid()
    return {
        "pid": me,
        "pid_start": orchestra.process_start_time(me),
        "heartbeat_at": orchestra.utc_iso(),
    }


def median_seconds(run, times):
    """Median wall time, in seconds, of calling run() `times` times."""
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)
