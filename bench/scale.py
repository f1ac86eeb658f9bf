"""Scale: what running hundreds of agents over weeks costs, figure by figure, each with its goal.

    python3 bench/scale.py [FIGURE...] [--orchestra PATH] [--quick]

FIGURE is any of: writes, status, hub, burst, logs, collect, spawn, queue (default: all).
--orchestra measures another orchestra.py (e.g. an older checkout, for before/after figures).
--quick uses small sizes (for trying the bench out); the goals are meant for the full sizes.

  writes   state.json writes/s and bytes/s by the supervisor with 8 agents printing, on 10,000
           cleaned-up agents vs none (goal: within 1.2x of none), and its CPU
  status   `status --json` with 8 live agents on 10,000 cleaned-up ones vs none (goal <= 1.2x)
  hub      the web server's CPU while idle with 10,000 cleaned-up agents (goal < 1%)
  burst    8 agents each writing 100 MB at once: supervisor peak RSS and CPU per MB (goal: bounded
           RSS, CPU/MB as low for 100 MB logs as for 10 MB ones); then 8 agents printing 1 MB/s
           each: lag from a line to state.json (goal p99 < 1 s)
  logs     a 1 GB log: first line of `logs` (goal < 100 ms after start-up), `logs --tail 20`, and
           the peak RSS of streaming the whole log (goal: constant)
  collect  `collect --json` with 10,000 finished agents, first and second run (goal: the second
           costs what it reports, not a git run per agent)
  spawn    96 tasks on a 3,000-file repository at parallel 8: time to the first agent's start and
           the most worktrees on disk (goal: first start at once; disk follows the parallel limit)
  queue    200 one-second agents at parallel 8 vs the ideal 25 s (goal <= 1.15x)

Everything happens in temporary folders, deleted afterwards (the 1 GB log included).
"""

import argparse
import compileall
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ORCHESTRA, git, repo_with_files, use_bench_environment

FIGURES = ("writes", "status", "hub", "burst", "logs", "collect", "spawn", "queue")

# An agent that speaks stream-json: `rate` lines a second of about `size` bytes for `seconds`
# (rate 0: as fast as it can, until `megabytes` are written), each line's text saying when it was
# written, then a result.
AGENT = r"""
import json, sys, time
args = dict(word.split(":", 1) for word in sys.argv[1].split() if ":" in word)
rate, seconds, size = float(args.get("rate", 0)), float(args.get("seconds", 0)), int(args.get("size", 1000))
megabytes = float(args.get("mb", 0))
pad = "x" * size
written, start, n = 0, time.time(), 0
out = sys.stdout
while True:
    now = time.time()
    if (seconds and now - start >= seconds) or (megabytes and written >= megabytes * 1e6):
        break
    n += 1
    message = {"id": f"m{n}", "content": [{"type": "text", "text": f"t={now:.3f} {pad}"}],
               "usage": {"input_tokens": 10, "output_tokens": 5}}
    line = json.dumps({"type": "assistant", "message": message}) + "\n"
    out.write(line)
    written += len(line)
    if rate:
        out.flush()
        time.sleep(max(0.0, start + n / rate - time.time()))
out.write(json.dumps({"type": "result", "subtype": "success", "result": "ok", "total_cost_usd": 0.01,
                      "num_turns": 1, "usage": {"input_tokens": 1, "output_tokens": 1}}) + "\n")
"""


def make_repo(root, files=1, agent=None, **config):
    """A repository with `files` committed files and orchestra configured to run the bench agent."""
    script = root / "agent.py"
    script.write_text(AGENT)
    command = agent or [sys.executable, str(script), "{task}"]
    config = {"agent_command": command, "max_parallel": 8, "heartbeat_interval": 60, **config}
    return repo_with_files(root, files, config)


def old_record(repo, n, state="removed"):
    """A record of about 2 KB, as an agent cleaned up long ago leaves it."""
    agent_id = f"old-agent-{n}"
    return {
        "id": agent_id, "task": f"an old task number {n} " * 4, "state": state, "stale": False,
        "branch": f"orchestra/{agent_id}", "worktree": str(repo / ".worktrees" / f"task-{agent_id}"),
        "base_branch": "main", "base_commit": "0" * 40, "pid": None, "session_id": None,
        "created_at": "2026-01-01T00:00:00Z", "started_at": "2026-01-01T00:00:01Z",
        "finished_at": "2026-01-01T00:10:00Z", "heartbeat_at": None, "last_activity_at": None,
        "exit_code": 0, "result": "finished the work " * 70, "error": None, "cost_usd": 0.5, "turns": 9,
        "input_tokens": 1000, "output_tokens": 100, "activity": "finished the work", "commits": 1,
        "files_changed": 2, "log": str(repo / ".orchestra" / "logs" / f"{agent_id}.jsonl"), "seq": n,
        "ready": True, "copied_files": [], "setup_files": {},
        "launch": {"agent_command": ["claude"], "model": None, "permission_mode": None, "bypass_permissions": []},
        "archive": [f"refs/orchestra/archive/{agent_id}/20260101T001000Z"], "removed_at": "2026-01-02T00:00:00Z",
    }  # fmt: skip


def add_history(module, repo, count, state="removed"):
    """`count` old records in state.json as the previous version kept them, then one update by the
    module under test, so the state is as that version leaves it (moved to history, or not)."""
    agents = {r["id"]: r for r in (old_record(repo, n, state) for n in range(count))}
    document = {"version": 1, "agents": agents, "supervisor": {}, "parallel": None}
    (repo / ".orchestra" / "state.json").write_text(json.dumps(document, indent=2, sort_keys=True))
    prime = (
        "import sys; sys.path.insert(0, sys.argv[1]); import orchestra; "
        "orchestra.StateStore(sys.argv[2], dict).update(lambda state: state.update(parallel=None))"
    )
    subprocess.run([sys.executable, "-c", prime, str(module.parent), str(repo / ".orchestra" / "state.json")],
                   check=True)  # fmt: skip


LAUNCH = "import sys; sys.path.insert(0, sys.argv.pop(1)); from orchestra import main; sys.exit(main(sys.argv[1:]))"


def command(module, *args):
    """argv of one orchestra command as the installed console script runs it (compiled module)."""
    return [sys.executable, "-c", LAUNCH, str(module.parent), *args]


def install(source, folder):
    """The module copied into `folder` and byte-compiled, as pip leaves it; its new path."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, folder / "orchestra.py")
    compileall.compile_file(str(folder / "orchestra.py"), quiet=1)
    return folder / "orchestra.py"


def orchestra(module, repo, *args, **kw):
    """Run one orchestra command of the module under test."""
    return subprocess.run(
        command(module, *args), cwd=repo, check=True, capture_output=True, text=True, **kw
    )


def state(repo):
    """state.json as it is now (retried while a writer replaces it)."""
    return json.loads((repo / ".orchestra" / "state.json").read_text())


def supervisor_pid(repo, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        pid = (state(repo).get("supervisor") or {}).get("pid")
        if pid:
            return pid
        time.sleep(0.02)
    raise SystemExit("no supervisor started")


def wait_idle(repo, timeout=600):
    """Wait until no agent is active and the supervisor has gone."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        current = state(repo)
        active = any(
            a["state"] in ("queued", "running", "paused") for a in current["agents"].values()
        )
        if not active and not (current.get("supervisor") or {}).get("pid"):
            return
        time.sleep(0.1)
    raise SystemExit("agents did not finish in time")


def proc_io(pid):
    """(write syscalls, bytes written, CPU seconds) of a process so far."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return int(fields["syscw"]), int(fields["wchar"]), cpu


def peak_rss_mb(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def verdict(ok):
    return "OK" if ok else "MISSED"


# --- figures -------------------------------------------------------------------------------------


def writes_with(module, root, history, seconds):
    repo = make_repo(root)
    add_history(module, repo, history)
    tasks = [f"agent {n} rate:20 size:500 seconds:{seconds + 6}" for n in range(8)]
    orchestra(module, repo, "spawn", "--parallel", "8", *tasks)
    pid = supervisor_pid(repo)
    time.sleep(3)  # all eight started
    before = proc_io(pid)
    time.sleep(seconds)
    after = proc_io(pid)
    wait_idle(repo)
    return [(b - a) / seconds for a, b in zip(before, after)]


def figure_writes(module, quick):
    seconds, history = (5, 1000) if quick else (20, 10_000)
    with tempfile.TemporaryDirectory() as tmp:
        none = writes_with(module, Path(tmp) / "none", 0, seconds)
    with tempfile.TemporaryDirectory() as tmp:
        full = writes_with(module, Path(tmp) / "full", history, seconds)
    for label, (calls, data, cpu) in (("no history", none), (f"{history} in history", full)):
        print(
            f"writes  {label:>18}: {calls:7.1f} writes/s  {data / 1e6:8.3f} MB/s  supervisor CPU {cpu * 100:5.1f}%"
        )
    ratio = full[1] / none[1] if none[1] else float("inf")
    print(
        f"writes  bytes/s with history vs none: {ratio:.2f}x (goal <= 1.2x) {verdict(ratio <= 1.2)}"
    )
    ratio = full[0] / none[0] if none[0] else float("inf")
    print(
        f"writes  writes/s with history vs none: {ratio:.2f}x (goal <= 1.2x) {verdict(ratio <= 1.2)}"
    )


def status_with(module, root, history, runs):
    repo = make_repo(root)
    add_history(module, repo, history)
    live = {
        f"live-{n}": {**old_record(repo, 20_000 + n, "done"), "id": f"live-{n}"} for n in range(8)
    }
    add = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import orchestra; live = json.loads(sys.argv[3]); "
        "orchestra.StateStore(sys.argv[2], dict).update(lambda state: state['agents'].update(live))"
    )
    subprocess.run([sys.executable, "-c", add, str(module.parent), str(repo / ".orchestra" / "state.json"),
                    json.dumps(live)], check=True)  # fmt: skip
    assert len(json.loads(orchestra(module, repo, "status", "--json").stdout)["agents"]) == 8
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        orchestra(module, repo, "status", "--json")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def figure_status(module, quick):
    runs, history = (5, 1000) if quick else (15, 10_000)
    with tempfile.TemporaryDirectory() as tmp:
        none = status_with(module, Path(tmp) / "none", 0, runs)
        full = status_with(module, Path(tmp) / "full", history, runs)
    print(f"status  --json, 8 live agents, no history: {none * 1000:7.1f} ms")
    print(f"status  --json, 8 live agents, {history} in history: {full * 1000:7.1f} ms")
    print(f"status  ratio: {full / none:.2f}x (goal <= 1.2x) {verdict(full / none <= 1.2)}")


def figure_hub(module, quick):
    seconds, history = (5, 1000) if quick else (20, 10_000)
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp))
        add_history(module, repo, history)
        web = subprocess.Popen(command(module, "web", "--port", "0"), cwd=repo,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        try:
            web.stdout.readline()
            time.sleep(2)
            before = proc_io(web.pid)[2]
            time.sleep(seconds)
            cpu = (proc_io(web.pid)[2] - before) / seconds
        finally:
            web.terminate()
            web.wait()
    print(
        f"hub     idle web server, {history} in history: CPU {cpu * 100:.2f}% (goal < 1%) {verdict(cpu < 0.01)}"
    )


def burst_with(module, root, megabytes):
    repo = make_repo(root)
    orchestra(
        module,
        repo,
        "spawn",
        "--parallel",
        "8",
        *[f"burst {n} mb:{megabytes} size:2000" for n in range(8)],
    )
    pid = supervisor_pid(repo)
    start_cpu, peak = proc_io(pid)[2], 0.0
    cpu = start_cpu
    while True:
        try:
            peak, cpu = max(peak, peak_rss_mb(pid)), proc_io(pid)[2]
        except (FileNotFoundError, ProcessLookupError, IndexError):  # gone, or a zombie
            break
        time.sleep(0.05)
    wait_idle(repo)
    return peak, (cpu - start_cpu) / (8 * megabytes)


def lag_with(module, root, seconds):
    """p50 and p99 seconds from a line written by an agent to its activity in state.json."""
    repo = make_repo(root)
    tasks = [
        f"lag {n} rate:500 size:2000 seconds:{seconds + 4}" for n in range(8)
    ]  # about 1 MB/s each
    orchestra(module, repo, "spawn", "--parallel", "8", *tasks)
    lags, deadline = [], time.time() + seconds + 2
    time.sleep(2)
    while time.time() < deadline:
        with_text = [a.get("activity") or "" for a in state(repo)["agents"].values()]
        now = time.time()
        lags += [now - float(text[2:].split()[0]) for text in with_text if text.startswith("t=")]
        time.sleep(0.1)
    wait_idle(repo)
    lags.sort()
    return lags[len(lags) // 2], lags[int(len(lags) * 0.99)]


def figure_burst(module, quick):
    small, large = (5, 20) if quick else (10, 100)
    results = {}
    for megabytes in (small, large):
        with tempfile.TemporaryDirectory() as tmp:
            results[megabytes] = burst_with(module, Path(tmp), megabytes)
        peak, per_mb = results[megabytes]
        print(f"burst   8 agents x {megabytes} MB at once: supervisor peak RSS {peak:6.1f} MB, "
              f"CPU {per_mb * 1000:6.2f} ms per MB")  # fmt: skip
    growth = results[large][1] / results[small][1]
    print(f"burst   CPU per MB, {large} MB logs vs {small} MB logs: {growth:.2f}x (goal: about 1x, constant) "
          f"{verdict(growth <= 1.5)}; peak RSS {results[large][0]:.0f} MB (goal: bounded, not the logs' size) "
          f"{verdict(results[large][0] < 200)}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        p50, p99 = lag_with(module, Path(tmp), 5 if quick else 20)
    print(f"burst   lag line -> state.json, 8 agents at 1 MB/s: p50 {p50:.2f} s, p99 {p99:.2f} s (goal p99 < 1 s) "
          f"{verdict(p99 < 1)}")  # fmt: skip


def figure_logs(module, quick):
    size = 50e6 if quick else 1e9
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp))
        add_history(module, repo, 0)
        record = {
            **old_record(repo, 0, "done"),
            "id": "big",
            "log": str(repo / ".orchestra" / "logs" / "big.jsonl"),
        }
        add = (
            "import sys, json; sys.path.insert(0, sys.argv[1]); import orchestra; record = json.loads(sys.argv[3]); "
            "orchestra.StateStore(sys.argv[2], dict).update(lambda state: state['agents'].update(big=record))"
        )
        subprocess.run([sys.executable, "-c", add, str(module.parent), str(repo / ".orchestra" / "state.json"),
                        json.dumps(record)], check=True)  # fmt: skip
        (repo / ".orchestra" / "logs").mkdir(exist_ok=True)
        line = {
            "type": "assistant",
            "message": {"content": [{"type": "text", "text": "working " * 120}]},
        }
        block = "".join(json.dumps({**line, "n": n}) + "\n" for n in range(1000)).encode()
        with open(record["log"], "wb") as f:
            while f.tell() < size:
                f.write(block)
        bare = min(timed_first_line(command(module, "status", "--json"), repo) for _ in range(3))
        first = min(timed_first_line(command(module, "logs", "big"), repo) for _ in range(3))
        try:
            tail = min(
                timed_run(command(module, "logs", "big", "--tail", "20"), repo) for _ in range(3)
            )
        except subprocess.CalledProcessError:
            tail = None  # an orchestra without --tail
        whole, peak = timed_peak(command(module, "logs", "big"), repo)
    print(f"logs    {size / 1e9:.2f} GB log: first line after {first * 1000:.0f} ms, "
          f"{(first - bare) * 1000:.0f} ms more than `status --json` takes to its first line "
          f"(goal < 100 ms) {verdict(first - bare < 0.1)}")  # fmt: skip
    tail = "unsupported" if tail is None else f"{tail * 1000:.0f} ms"
    print(f"logs    --tail 20: {tail}; whole log streamed in {whole:.1f} s, peak RSS {peak:.0f} MB "
          f"(goal: constant memory) {verdict(peak < 100)}")  # fmt: skip


def timed_first_line(argv, cwd):
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.readline()
    took = time.perf_counter() - start
    proc.kill()
    proc.wait()
    return took


def timed_run(argv, cwd):
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def timed_peak(argv, cwd):
    """(seconds, peak RSS MB) of a run, read from /proc while it runs."""
    start, peak = time.perf_counter(), 0.0
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL)
    while proc.poll() is None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError):
            peak = max(peak, peak_rss_mb(proc.pid))
        time.sleep(0.05)
    return time.perf_counter() - start, peak


def figure_collect(module, quick):
    count = 500 if quick else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp))
        add_history(module, repo, count, state="done")
        head = git(repo, "rev-parse", "HEAD").strip()
        tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
        commit = git(repo, "commit-tree", tree, "-p", head, "-m", "agent work").strip()
        updates = "".join(
            f"create refs/heads/orchestra/old-agent-{n} {commit}\n" for n in range(count)
        )
        git(repo, "update-ref", "--stdin", input=updates)
        rewrite = (
            "import sys; sys.path.insert(0, sys.argv[1]); import orchestra; "
            "orchestra.StateStore(sys.argv[2], dict).update(lambda state: [r.update(base_commit=sys.argv[3]) "
            "for r in state['agents'].values()])"
        )
        subprocess.run([sys.executable, "-c", rewrite, str(module.parent), str(repo / ".orchestra" / "state.json"),
                        head], check=True)  # fmt: skip
        first = timed_run(command(module, "collect", "--json"), repo)
        second = timed_run(command(module, "collect", "--json"), repo)
    print(f"collect --json, {count} finished agents: first run {first:.2f} s, second run {second:.2f} s "
          f"({second / count * 1000:.2f} ms per agent reported; goal: no git run per agent once known) "
          f"{verdict(second / count < 0.001)}")  # fmt: skip


def figure_spawn(module, quick):
    tasks, files = (24, 500) if quick else (96, 3000)
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp), files=files)
        start = time.time()
        jobs = [f"job {n} rate:1 seconds:1" for n in range(tasks)]
        spawn = subprocess.Popen(
            command(module, "spawn", "--parallel", "8", *jobs), cwd=repo, stdout=subprocess.DEVNULL
        )
        first, most = None, 0
        while first is None or spawn.poll() is None:
            try:
                agents = state(repo)["agents"].values()
            except (OSError, ValueError):
                agents = []
            if first is None and any(a.get("started_at") for a in agents):
                first = time.time() - start
            root = repo / ".worktrees"
            most = max(most, len(os.listdir(root)) if root.is_dir() else 0)
            time.sleep(0.02)
        returned = time.time() - start
        while True:
            agents = list(state(repo)["agents"].values())
            root = repo / ".worktrees"
            running_or_queued = [a for a in agents if a["state"] in ("queued", "running")]
            most = max(most, len(os.listdir(root)) - (len(agents) - len(running_or_queued)))
            if not running_or_queued:
                break
            time.sleep(0.05)
        wait_idle(repo)
    print(f"spawn   {tasks} tasks, {files}-file repository, parallel 8: first agent started after {first:.2f} s; "
          f"spawn returned after {returned:.2f} s; at most {most} worktrees of unfinished agents on disk "
          f"(goal: first start at once, disk follows the parallel limit) {verdict(first < 5 and most <= 16)}")  # fmt: skip


def figure_queue(module, quick):
    tasks, seconds, parallel = (48, 1.0, 8) if quick else (200, 1.0, 8)
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp), agent=["sh", "-c", f"sleep {seconds}", "{task}"])
        start = time.time()
        orchestra(
            module, repo, "spawn", "--parallel", str(parallel), *[f"job {n}" for n in range(tasks)]
        )
        wait_idle(repo, timeout=tasks * seconds * 4)
        took = time.time() - start
    ideal = -(-tasks // parallel) * seconds
    print(f"queue   {tasks} x {seconds:.0f} s agents at parallel {parallel}: {took:.1f} s, ideal {ideal:.0f} s: "
          f"{took / ideal:.2f}x (goal <= 1.15x) {verdict(took / ideal <= 1.15)}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "figures", nargs="*", choices=(*FIGURES, []), metavar="FIGURE", help=", ".join(FIGURES)
    )
    parser.add_argument(
        "--orchestra", type=Path, default=ORCHESTRA, help="the orchestra.py to measure"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, to try the bench out")
    args = parser.parse_args()
    use_bench_environment()
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    print(
        f"module: {args.orchestra.resolve()}; python {sys.version.split()[0]}; {os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as site:
        module = install(args.orchestra.resolve(), Path(site))
        for name in args.figures or FIGURES:
            globals()[f"figure_{name}"](module, args.quick)


if __name__ == "__main__":
    main()
