"""Benchmark `orchestra sessions` on a synthetic Claude Code session store.

    python3 bench/sessions.py [MODULE] [--files 5000] [--gb 1] [--runs 7] [--keep DIR]

MODULE is the orchestra.py to run (default: this checkout's). The store is built from real-shaped
2.1.x lines (queue operations, prompts, attachments, assistant blocks sharing a message id,
tool results, hook progress, file-history snapshots, titles), sized like a heavy user's:
5,000 transcripts of about 1 GB in all, log-normally sized, 50 of them touched in the last
4 hours and the rest spread over 90 days. A second store of 1,000 files (same 50 recent
ones) shows how the time grows with the store. Each command runs as the installed `orchestra`
command does (the module imported, bytecode cached), as a subprocess RUNS
times after one warm-up; the median wall time is reported. `ccusage session` (18.0.11, the last
pure-JavaScript release) is timed on the same store, a first run and a second one: found on PATH,
in npm's global prefix, through npx, or else installed with `npm install ccusage@18.0.11` into a
temporary prefix (deleted afterwards) when npm and the registry serve it; --no-install skips that.
The store is deleted afterwards unless --keep names a folder to build it in and keep.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import ORCHESTRA

SEED = 20261124
DAYS_OF_HISTORY = 90
RECENT_FILES = 50
RECENT_HOURS = 4
SIZE_SIGMA = 1.2  # spread of the log-normal file sizes
MAX_FILE_BYTES = 40 * 1024 * 1024
MIN_FILE_BYTES = 2 * 1024
TOOL_RESULT_MAX = 48 * 1024  # characters in one tool result
GOAL_MS = 150
GOAL_GROWTH = 1.5
GOAL_CCUSAGE_RATIO = 20
GOAL_ALL_WARM_RATIO, GOAL_ALL_COLD_RATIO = 10, 4  # sessions --all vs ccusage: second run, first run
CCUSAGE_VERSION = "18.0.11"
WORDS = ("the", "session", "worktree", "branch", "commit", "agent", "parser", "config", "test", "fix",
         "build", "error", "retry", "cache", "file", "value", "index", "table", "route", "handler")  # fmt: skip
PROMPTS = (
    "Fix the failing test in the parser and explain what was wrong",
    "Add input validation to the signup form",
    "Refactor the config loader so that defaults come first",
    "Why does the websocket drop after a minute? Investigate and fix",
    "Write API docs for the sessions endpoint",
)


def iso(ts):
    """ISO 8601 UTC with milliseconds, as Claude Code writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int((ts % 1) * 1000):03d}Z"


class TranscriptWriter:
    """Writes one real-shaped 2.1.x transcript of about `target` bytes."""

    def __init__(self, rng, text_pool, session_id, cwd, branch, start):
        self.rng, self.pool = rng, text_pool
        self.base = {"userType": "external", "entrypoint": "cli", "cwd": cwd, "sessionId": session_id,
                     "version": "2.1.39", "gitBranch": branch, "slug": "synthetic-bench-session"}  # fmt: skip
        self.session_id, self.clock, self.parent = session_id, start, None
        self.lines = []

    def text(self, size):
        """A slice of the text pool of about `size` characters."""
        offset = self.rng.randrange(0, len(self.pool) - size)
        return self.pool[offset : offset + size]

    def emit(self, record, chained=True):
        """Add one line; chained records get uuid, parentUuid and timestamp."""
        self.clock += self.rng.uniform(0.2, 4.0)
        if chained:
            record = {"parentUuid": self.parent, "isSidechain": False, **record, **self.base}
            record["uuid"] = str(uuid.UUID(int=self.rng.getrandbits(128)))
            record["timestamp"] = iso(self.clock)
            self.parent = record["uuid"]
        line = json.dumps(record, separators=(",", ":"))
        self.lines.append(line)
        return len(line) + 1

    def turn(self, prompt, result_max):
        """A user prompt followed by tool calls, tool results, progress and a final answer."""
        size = self.emit({"type": "queue-operation", "operation": "enqueue", "timestamp": iso(self.clock),
                          "sessionId": self.session_id, "content": prompt}, chained=False)  # fmt: skip
        size += self.emit({"type": "user", "message": {"role": "user", "content": prompt}})
        size += self.emit({"type": "file-history-snapshot", "messageId": self.parent,
                           "snapshot": {"trackedFileBackups": {}, "timestamp": iso(self.clock)},
                           "isSnapshotUpdate": False}, chained=False)  # fmt: skip
        for _ in range(self.rng.randint(1, 6)):
            size += self.tool_round(result_max)
        size += self.assistant(
            [{"type": "text", "text": self.text(self.rng.randint(200, 1500))}], "end_turn"
        )
        size += self.emit(
            {"type": "system", "subtype": "turn_duration", "durationMs": 12345, "isMeta": False}
        )
        return size

    def tool_round(self, result_max):
        """One assistant tool call (thinking + tool_use blocks), hook progress, and its result."""
        tool_id = "toolu_" + uuid.UUID(int=self.rng.getrandbits(128)).hex[:24]
        size = self.assistant(
            [{"type": "thinking", "thinking": self.text(300), "signature": "sig"},
             {"type": "tool_use", "id": tool_id, "name": "Bash", "input": {"command": "pytest -q"}}],
            "tool_use",
        )  # fmt: skip
        for _ in range(self.rng.randint(1, 4)):
            size += self.emit({"type": "progress", "data": {"type": "hook_progress", "hookEvent": "PostToolUse",
                               "hookName": "PostToolUse:Bash", "command": "~/.claude/hooks/log.sh"},
                               "parentToolUseID": tool_id, "toolUseID": tool_id})  # fmt: skip
        result = self.text(self.rng.randint(200, max(200, result_max)))
        size += self.emit({"type": "user", "message": {"role": "user", "content": [
            {"tool_use_id": tool_id, "type": "tool_result", "content": result, "is_error": False}]},
            "toolUseResult": {"stdout": result[:2000], "stderr": "", "interrupted": False}})  # fmt: skip
        return size

    def assistant(self, blocks, stop_reason):
        """One API response, written as one line per content block sharing message.id."""
        message_id = "msg_" + uuid.UUID(int=self.rng.getrandbits(128)).hex[:24]
        usage = {"input_tokens": 3, "cache_creation_input_tokens": 1200, "cache_read_input_tokens": 45000,
                 "output_tokens": 420, "service_tier": "standard"}  # fmt: skip
        size = 0
        for block in blocks:
            message = {"model": "claude-opus-4-6", "id": message_id, "type": "message", "role": "assistant",
                       "content": [block], "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}  # fmt: skip
            size += self.emit(
                {"message": message, "requestId": "req_" + message_id[4:], "type": "assistant"}
            )
        return size

    def write(self, path, target):
        """Write turns until the file reaches about `target` bytes, then the title lines."""
        size, prompt = 0, self.rng.choice(PROMPTS)
        result_max = min(
            TOOL_RESULT_MAX, target // 8
        )  # small files get small turns: sizes stay true
        while size < target:
            size += self.turn(prompt, result_max)
            prompt = self.rng.choice(PROMPTS)
        self.emit(
            {"type": "last-prompt", "lastPrompt": prompt, "sessionId": self.session_id},
            chained=False,
        )
        self.emit(
            {"type": "ai-title", "aiTitle": prompt[:40], "sessionId": self.session_id},
            chained=False,
        )
        path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")


def file_sizes(rng, count, total_bytes):
    """Log-normal sizes scaled to add up to about `total_bytes`."""
    raw = [rng.lognormvariate(0, SIZE_SIGMA) for _ in range(count)]
    scale = total_bytes / sum(raw)
    return [int(min(MAX_FILE_BYTES, max(MIN_FILE_BYTES, r * scale))) for r in raw]


def build_store(root, files, total_bytes, now):
    """A CLAUDE_CONFIG_DIR with `files` transcripts in 1 project folder per 25 sessions."""
    rng = random.Random(SEED)
    pool = " ".join(rng.choice(WORDS) for _ in range(TOOL_RESULT_MAX)) * 2
    recent = set(rng.sample(range(files), RECENT_FILES))
    written = 0
    for index, target in enumerate(file_sizes(rng, files, total_bytes)):
        cwd = f"/home/dev/src/project-{index % (files // 25 or 1)}"
        folder = root / "projects" / cwd.replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        session_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        age = (
            rng.uniform(0, RECENT_HOURS * 3600)
            if index in recent
            else rng.uniform(5, DAYS_OF_HISTORY) * 86400
        )
        path = folder / f"{session_id}.jsonl"
        TranscriptWriter(rng, pool, session_id, cwd, "main", now - age - 3600).write(path, target)
        os.utime(path, (now - age, now - age))
        written += path.stat().st_size
    return written


def time_command(argv, env, runs, before=None):
    """(median ms, all ms) of `runs` runs after one warm-up; `before` runs untimed before each."""
    subprocess.run(argv, env=env, check=True, capture_output=True)
    times = []
    for _ in range(runs):
        if before:
            before()
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        times.append((time.perf_counter() - start) * 1000)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return statistics.median(times), times


def ccusage_argv(install_into=None):
    """How to run ccusage: where it is installed (PATH, npm's global prefix, npx), else installed
    into `install_into` with npm when that folder is given and the registry serves it; or None."""
    if shutil.which("ccusage"):
        return ["ccusage"]
    if shutil.which("npm"):
        prefix = subprocess.run(
            ["npm", "prefix", "-g"], capture_output=True, text=True
        ).stdout.strip()
        if prefix and (Path(prefix) / "bin" / "ccusage").exists():
            return [str(Path(prefix) / "bin" / "ccusage")]
    if shutil.which("npx"):
        probe = subprocess.run(
            ["npx", "--no-install", "ccusage", "--version"], capture_output=True, timeout=60
        )
        if probe.returncode == 0:
            return ["npx", "--no-install", "ccusage"]
    if install_into and shutil.which("npm"):
        done = subprocess.run(
            ["npm", "install", "--prefix", str(install_into), "--no-audit", "--no-fund", f"ccusage@{CCUSAGE_VERSION}"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        installed = Path(install_into) / "node_modules" / ".bin" / "ccusage"
        if done.returncode == 0 and installed.exists():
            print(f"installed ccusage {CCUSAGE_VERSION} into {install_into} for this run")
            return [str(installed)]
        print(f"could not install ccusage {CCUSAGE_VERSION}: {done.stderr.strip()[-300:]}")
    return None


def default_module():
    """The orchestra.py of this checkout."""
    return ORCHESTRA


def measure_store(label, module, store, runs, ccusage):
    """Time the listing commands against one store; returns {name: median ms}.

    "cold" runs start with no message-count cache (as a first run does); the others keep
    the cache the warm-up run wrote (as every later run does).
    """
    cache = store / "xdg-cache"
    env = {
        **os.environ,
        "CLAUDE_CONFIG_DIR": str(store),
        "XDG_CACHE_HOME": str(cache),
        "COLUMNS": "120",
    }
    env.pop("ORCHESTRA_DEBUG", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as after `pip install`, which compiles the module
    # As the installed `orchestra` command runs it: the module imported from cached bytecode.
    launch = "import sys; sys.path.insert(0, sys.argv.pop(1)); import orchestra; sys.exit(orchestra.main(sys.argv[1:]))"
    python = [sys.executable, "-c", launch, str(module.parent), "sessions"]
    commands = {
        "startup (python3 -c pass)": ([sys.executable, "-c", "pass"], None),
        "sessions --hours 0.001 (scan only)": ([*python, "--hours", "0.001"], None),
        "sessions --hours 4 (cold)": (
            [*python, "--hours", "4"],
            lambda: shutil.rmtree(cache, True),
        ),
        "sessions --hours 4": ([*python, "--hours", "4"], None),
        "sessions --hours 4 --limit 50": ([*python, "--hours", "4", "--limit", "50"], None),
        "sessions --hours 4 --json": ([*python, "--hours", "4", "--json"], None),
        "sessions --all --limit 50 (cold)": (
            [*python, "--all", "--limit", "50"],
            lambda: shutil.rmtree(cache, True),
        ),
        "sessions --all --limit 50": ([*python, "--all", "--limit", "50"], None),
        "sessions --all --limit 100000 (cold)": (
            [*python, "--all", "--limit", "100000"],
            lambda: shutil.rmtree(cache, True),
        ),
        "sessions --all --limit 100000": ([*python, "--all", "--limit", "100000"], None),
        "python3 orchestra.py sessions --hours 4 (compiled at every start)": (
            [sys.executable, str(module), "sessions", "--hours", "4"],
            None,
        ),
    }
    results = {}
    for name, (argv, before) in commands.items():
        median, times = time_command(argv, env, runs, before)
        results[name] = median
        spread = ", ".join(f"{t:.0f}" for t in times)
        print(f"  {label:>11}  {name:<36} median {median:7.1f} ms   runs: {spread}")
    if ccusage:
        # ccusage keeps no cache: its first and second runs are timed as they come, once each.
        for run in ("first", "second"):
            start = time.perf_counter()
            subprocess.run(
                [*ccusage, "session", "--offline"], env=env, check=True, capture_output=True
            )
            results[f"ccusage session ({run} run)"] = ms = (time.perf_counter() - start) * 1000
            print(f"  {label:>11}  ccusage session ({run} run){'':<14} {ms:7.1f} ms")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "module",
        nargs="?",
        type=Path,
        default=None,
        help="the orchestra.py to run (default: this checkout's)",
    )
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--small-files", type=int, default=1000)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the large store in GB")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="build the stores here and keep them")
    parser.add_argument(
        "--no-install", action="store_true", help="never install ccusage, only look for it"
    )
    args = parser.parse_args(argv)
    module = (args.module or default_module()).resolve()
    print(f"module: {module}\npython: {sys.version.split()[0]}, cores: {os.cpu_count()}")
    base = args.keep or Path(tempfile.mkdtemp(prefix="orchestra-bench-"))
    now = time.time()
    results = {}
    ccusage = ccusage_argv(None if args.no_install else base / "ccusage")
    if not ccusage:
        print("ccusage: not found and not installed; its comparisons are skipped")
    try:
        for label, files in (("large", args.files), ("small", args.small_files)):
            store = base / f"store-{files}"
            total = args.gb * 1e9 * files / args.files
            if not (store / "projects").is_dir():
                started = time.perf_counter()
                written = build_store(store, files, total, now)
                took = time.perf_counter() - started
                print(f"built {files} files, {written / 1e6:.0f} MB in {store} ({took:.0f} s)")
            results[label] = measure_store(
                f"{files} files", module, store, args.runs, ccusage if label == "large" else None
            )
            results[label]["files"] = files
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    report(results)


def report(results):
    """The figures against the issue's goals."""
    large, small = results["large"], results["small"]
    startup = large["startup (python3 -c pass)"]
    for name in (
        "sessions --hours 4",
        "sessions --hours 4 (cold)",
        "sessions --hours 4 --limit 50",
    ):
        ms = large[name]
        verdict = "OK" if ms <= GOAL_MS else "MISSED"
        print(
            f"{name:<32} {ms:6.0f} ms (goal <= {GOAL_MS} ms) {verdict}; {ms - startup:.0f} ms after startup"
        )
    growth = large["sessions --hours 4"] / small["sessions --hours 4"]
    verdict = "OK" if growth <= GOAL_GROWTH else "MISSED"
    print(
        f"growth from {small['files']} to {large['files']} files: {growth:.2f}x (goal <= {GOAL_GROWTH}x) {verdict}"
    )
    print(f"--all --limit 50: {large['sessions --all --limit 50']:.0f} ms warm, "
          f"{large['sessions --all --limit 50 (cold)']:.0f} ms cold")  # fmt: skip
    print(f"--all --limit 100000: {large['sessions --all --limit 100000']:.0f} ms warm, "
          f"{large['sessions --all --limit 100000 (cold)']:.0f} ms cold")  # fmt: skip
    if "ccusage session (first run)" in large:
        first, second = large["ccusage session (first run)"], large["ccusage session (second run)"]
        ratios = (
            ("sessions --hours 4 vs ccusage (second run)", second / large["sessions --hours 4"], GOAL_CCUSAGE_RATIO),
            ("sessions --all --limit 100000 warm vs ccusage second run",
             second / large["sessions --all --limit 100000"], GOAL_ALL_WARM_RATIO),
            ("sessions --all --limit 100000 cold vs ccusage first run",
             first / large["sessions --all --limit 100000 (cold)"], GOAL_ALL_COLD_RATIO),
        )  # fmt: skip
        for name, ratio, goal in ratios:
            verdict = "OK" if ratio >= goal else "MISSED"
            print(f"{name}: ccusage {ratio:.1f}x slower (goal >= {goal}x) {verdict}")


if __name__ == "__main__":
    main()
