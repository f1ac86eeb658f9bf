"""Daily use: every Claude Code a user may have, output you can read, commands that do what they say."""

import contextlib
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import orchestra
from conftest import ROOT, agent_states, git, wait_for, wait_settled
from scripted_api import Step, bash, slow, text

OLD_CLAUDE = "2.1.301"  # the newest release whose PermissionRequest hook never fires in -p mode
OLD_CLAUDE_PREFIX = Path(
    os.environ.get("ORCHESTRA_OLD_CLAUDE_PREFIX")
    or Path.home() / ".cache" / "claude-orchestra-tests" / f"claude-code-{OLD_CLAUDE}"
)


@pytest.fixture(scope="session")
def old_claude():
    """The real Claude Code 2.1.301 from the npm registry, in a prefix of its own (.ci/run installs it)."""
    binary = OLD_CLAUDE_PREFIX / "node_modules" / ".bin" / "claude"
    if not binary.exists():
        subprocess.run(["npm", "install", "--silent", "--no-fund", "--no-audit", "--prefix",
                        str(OLD_CLAUDE_PREFIX), f"@anthropic-ai/claude-code@{OLD_CLAUDE}"],
                       check=True, timeout=600)  # fmt: skip
    return binary


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    """Put a program on PATH as `claude`, in front of the pinned one."""

    def put(binary):
        folder = tmp_path / "claude-bin"
        folder.mkdir(exist_ok=True)
        (folder / "claude").unlink(missing_ok=True)
        (folder / "claude").symlink_to(binary)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")

    return put


NEEDED = (
    f"Claude Code {OLD_CLAUDE} is too old: orchestra needs 2.1.302 or newer (older ones never ask "
    "for approvals in -p mode); update it with "
    "'npm install -g @anthropic-ai/claude-code@2.1.331'"
)


def test_an_older_claude_is_refused_by_doctor_init_and_spawn(repo, cli, old_claude, on_path):
    on_path(old_claude)
    doctor = cli("doctor")
    assert doctor.code == 1
    assert f"MISSING  claude        {NEEDED}" in doctor.out.splitlines()
    init = cli("init")
    assert (init.code, init.out, init.err) == (2, "", f"orchestra: error: {NEEDED}\n")
    spawn = cli("spawn", "add a changelog")
    assert (spawn.code, spawn.out, spawn.err) == (2, "", f"orchestra: error: {NEEDED}\n")
    assert agent_states(repo) == {}


def test_the_pinned_claude_passes_the_gate(repo, cli):
    pinned = subprocess.run(["claude", "--version"], capture_output=True, text=True).stdout
    assert pinned.startswith(orchestra.CLAUDE_PINNED_VERSION + " ")
    doctor = cli("doctor", "--json")
    claude = next(c for c in doctor.json()["checks"] if c["name"] == "claude")
    assert claude == {"name": "claude", "ok": True, "detail": pinned.strip()}
    assert cli("init").code == 0


def test_another_agent_cli_is_not_asked_its_claude_version(repo, cli, old_claude, on_path):
    on_path(old_claude)
    cli("config", "set", "agent_command", '["claude", "-p", "{task}"]')
    assert cli("init").code == 0  # a {task} placeholder: not launched as Claude Code


# ---------------------------------------------------------------------------- output you can read


def spawn_settled(cli, repo, *argv):
    """Spawn with the fake agent and wait until everything has settled; the new ids."""
    run = cli("spawn", "--json", *argv)
    assert run.code == 0, run
    wait_settled(repo)
    return [a["id"] for a in run.json()["agents"]]


def test_logs_show_a_tools_output_and_activity_paths_are_relative(claude_repo, claude_api, cli):
    worktree = claude_repo / ".worktrees" / "task-write-changelog"
    claude_api.script("write-changelog", [
        bash("seq 1 15"),
        bash("seq 101 115; exit 3"),
        Step([{"type": "tool_use", "name": "Write",
               "input": {"file_path": str(worktree / "CHANGELOG.md"), "content": "# Changes\n"}}],
             "tool_use"),
        slow(text("Wrote the changelog."), 1.0),
    ])  # fmt: skip
    assert cli("spawn", "write-changelog").code == 0
    seen = wait_for(lambda: "Write: CHANGELOG.md" in cli("status").out or None, 60,
                    interval=0.05, what="the Write call as the activity")  # fmt: skip
    assert seen
    wait_settled(claude_repo)
    out = cli("logs", "write-changelog").out.splitlines()
    first = out.index("<- 1")
    assert out[first : first + 11] == ["<- 1", *(f"   {n}" for n in range(2, 11)),
                                       "   … 5 more lines (logs --raw shows all)"]  # fmt: skip
    error = out.index("<- Exit code 3")  # an error's output is shown whole
    assert out[error + 1 : error + 16] == [f"   {n}" for n in range(101, 116)]
    assert "-> Write: CHANGELOG.md" in out
    assert out[out.index("-> Write: CHANGELOG.md") + 1].startswith(
        "<- File created successfully at: CHANGELOG.md"
    )


def test_done_with_failed_checks_is_red_in_the_terminal(fake_repo, cli):
    cli("config", "set", "checks", "exit 1")  # a plain string for a list key: a list of one
    spawn_settled(cli, fake_repo, "commit:a.txt add a")
    pid, fd = pty.fork()
    if pid == 0:  # the child: `orchestra status` on a terminal, colour allowed
        os.chdir(fake_repo)
        env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
        os.execve(sys.executable, [sys.executable, str(ROOT / "orchestra.py"), "status"], env)
    shown = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 4096):
            shown += chunk
    os.waitpid(pid, 0)
    assert "\x1b[31mdone ✗" in shown.decode()


def test_status_after_a_cleanup_counts_the_cleaned_up_agents(fake_repo, cli):
    spawn_settled(cli, fake_repo, "commit:a.txt add a", "commit:b.txt add b")
    cli("collect", "--merge")
    assert cli("cleanup").code == 0
    assert cli("status").out == (
        "No live agents; 2 cleaned up (status --all). "
        'Start more with: orchestra spawn "first task" "second task"\n'
    )


def test_agents_that_changed_nothing_are_no_changes(fake_repo, cli):
    (quiet,) = spawn_settled(cli, fake_repo, "think about it")
    merge = cli("collect", "--merge")
    assert "Merged: nothing new" in merge.out
    assert f"No changes (nothing to merge): {quiet}" in merge.out
    assert "merged" not in cli("status").out.split("\n")[1]
    cleanup = cli("cleanup")
    assert cleanup.out.startswith(f"REMOVED {quiet}: no changes: no commits, nothing uncommitted")


def test_the_commit_count_is_refreshed_after_collect_commit(fake_repo, cli):
    (agent,) = spawn_settled(cli, fake_repo, "write:notes.txt leave notes")
    assert cli("status", "--json").json()["agents"][0]["commits"] == 0
    assert cli("collect", "--commit", agent).code == 0
    assert cli("status", "--json").json()["agents"][0]["commits"] == 1
    assert cli("status").out.split("\n")[1].split()[4] == "1"  # the COMMITS column


# ---------------------------------------------------------------------------- commands


def test_ctrl_c_under_spawn_wait_leaves_the_agents_running(fake_repo):
    watcher = subprocess.Popen([sys.executable, str(ROOT / "orchestra.py"), "spawn", "--wait",
                                "--name", "slow", "sleep:30 take a while"], cwd=fake_repo, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert wait_line(watcher.stdout, "running").startswith("slow: running")
    watcher.send_signal(signal.SIGINT)
    _, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 130
    assert err.strip() == "stopped watching; 1 agent keeps running (orchestra stop slow)"
    assert agent_states(fake_repo) == {"slow": "running"}
    subprocess.run([sys.executable, str(ROOT / "orchestra.py"), "stop", "slow"], cwd=fake_repo)


def wait_line(stream, word):
    for line in stream:
        if word in line:
            return line
    raise AssertionError(f"no line with {word!r}")


def test_spawn_from_a_dirty_checkout_says_the_work_is_not_in_the_worktrees(fake_repo, cli):
    (fake_repo / "README.md").write_text("changed\n")
    (fake_repo / "draft.txt").write_text("new\n")
    run = cli("spawn", "commit:a.txt add a")
    assert run.code == 0
    notes = [line for line in run.out.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: your checkout has 2 uncommitted changes; they are not in the agents' worktrees, "
        "which start from the last commit (commit them first if the agents need them)"
    ]
    wait_settled(fake_repo)
    clean = cli("spawn", "--base", "main", "commit:b.txt add b")
    assert "note:" not in clean.out


def test_a_task_may_start_with_a_dash_after_double_dash(claude_repo, claude_api, cli):
    claude_api.script("--dash-task", [text("Done with the dashed task.")])
    run = cli("spawn", "--", "--dash-task with a leading dash")
    assert run.code == 0, run
    wait_settled(claude_repo)
    (record,) = cli("status", "--json").json()["agents"]
    assert (record["id"], record["state"]) == ("dash-task-leading", "done")
    assert record["result"] == "Done with the dashed task."


@pytest.mark.parametrize(
    ("task", "agent_id"),
    [("émoji tâche à faire", "emoji-tache-faire"), ("naïve café fix", "naive-cafe-fix"),
     ("исправить тест входа", "исправить-тест-входа"), ("修复 登录 测试", "修复-登录-测试")],
)  # fmt: skip
def test_non_ascii_tasks_get_readable_ids(fake_repo, cli, task, agent_id):
    assert spawn_settled(cli, fake_repo, task) == [agent_id]
    assert cli("status").out.split("\n")[1].startswith(agent_id)
    assert git(
        "rev-parse", "--verify", "--quiet", f"refs/heads/orchestra/{agent_id}", cwd=fake_repo
    )


def test_prefixes_mean_live_agents_and_cleaned_up_ones_are_read_from_their_archive(fake_repo, cli):
    [gone] = spawn_settled(cli, fake_repo, "--name", "alpha-old", "commit:old.txt old work")
    cli("cleanup", "--force")
    spawn_settled(cli, fake_repo, "--name", "other-thing", "commit:live.txt other thing")
    refused = cli("diff", gone[:3])
    assert refused.code == 2 and refused.err == (
        f"orchestra: error: no live agent '{gone[:3]}'; cleaned up: {gone} "
        "(name one by its whole id; 'orchestra status --all' lists them)\n"
    )
    assert cli("status", "o").out.split("\n")[1].startswith("other-thing")
    diff = subprocess.run([sys.executable, str(ROOT / "orchestra.py"), "diff", gone, "--stat"],
                          cwd=fake_repo, capture_output=True, text=True)  # fmt: skip
    assert diff.returncode == 0 and "old.txt | 1 +" in diff.stdout
    assert (
        f"({gone} was cleaned up: this is its archive refs/orchestra/archive/{gone}/" in diff.stdout
    )
    assert "== spawned on orchestra/" in cli("logs", gone).out
    collect = cli("collect", gone)
    assert collect.code == 0
    assert collect.out.startswith(f"== {gone}: cleaned up")
    assert f"Bring it back with: orchestra restore {gone}" in collect.out
    assert "old.txt | 1 +" in collect.out


def test_retry_takes_an_agent_whose_checks_failed(fake_repo, cli):
    cli("config", "set", "checks", '["test -f never.txt"]')
    (agent,) = spawn_settled(cli, fake_repo, "commit:a.txt add a")
    assert cli("status").out.split("\n")[1].split()[1:3] == ["done", "✗"]
    retried = cli("retry", agent)
    assert retried.code == 0
    assert retried.out.startswith(f"{agent}: retried as {agent}-2 on orchestra/{agent}-2")


def test_prune_archives_lists_then_removes_and_says_how_much(fake_repo, cli):
    spawn_settled(cli, fake_repo, "commit:big.txt add big")
    cli("cleanup", "--force")
    [archive] = cli("cleanup", "--list-archives", "--json").json()["archives"]
    young = cli("cleanup", "--prune-archives")
    assert young.out == "No archives older than 30 days.\n"
    dry = cli("cleanup", "--prune-archives", "--older-than", "0", "--dry-run")
    lines = dry.out.splitlines()
    assert lines[0].startswith(f"WOULD PRUNE {archive['id']}/{archive['saved']} (0 days old): ")
    assert re.fullmatch(r"1 archive older than 0 days hold \d+(\.\d)? [KM]?B nothing else keeps; "
                        r"run without --dry-run to remove them", lines[1])  # fmt: skip
    assert cli("cleanup", "--list-archives", "--json").json()["archives"] == [archive]
    pruned = cli("cleanup", "--prune-archives", "--older-than", "0")
    assert pruned.out.splitlines()[0].startswith(f"PRUNED {archive['id']}/{archive['saved']}")
    assert re.fullmatch(r"1 archive removed: \d+(\.\d)? [KM]?B that 'git gc' can now free",
                        pruned.out.splitlines()[1])  # fmt: skip
    assert cli("cleanup", "--list-archives").out == "No archived work.\n"
    refused = cli("cleanup", "--older-than", "3")
    assert refused.code == 2 and "--older-than goes with --prune-archives" in refused.err


def test_web_qr_on_loopback_says_a_phone_cannot_reach_it(fake_repo):
    server = subprocess.Popen([sys.executable, str(ROOT / "orchestra.py"), "web", "--qr", "--port", "0"],
                              cwd=fake_repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        warning = wait_line(server.stderr, "warning")
    finally:
        server.terminate()
        server.wait(timeout=10)
    address = orchestra.network_address()
    assert warning.strip() == (
        "orchestra: warning: 127.0.0.1 is reachable from this machine only: a phone cannot open "
        f"this code; run 'orchestra web --qr --host {address}' (on a network you trust), or see "
        "the README for an SSH tunnel or Tailscale"
    )


def test_config_set_and_unset_do_what_they_look_like(repo, cli):
    set_one = cli("config", "set", "copy_files", ".env")
    assert set_one.out.startswith('copy_files = [".env"] in ')
    assert cli("config", "--json").json()["copy_files"]["value"] == [".env"]
    typo = cli("config", "set", "defualt_parallel", "4")
    assert typo.code == 2 and typo.err.startswith(
        "orchestra: error: unknown key 'defualt_parallel'; did you mean 'default_parallel'? known keys: "
    )
    assert "did you mean 'model'?" in cli("-c", "modle=x", "status").err
    unset = cli("config", "unset", "model")
    assert unset.code == 0 and unset.out.startswith("model was not set in ")
    assert cli("config", "unset", "copy_files").out.startswith("copy_files removed from ")


# ---------------------------------------------------------------------------- contributors


def test_contributing_drives_a_real_agent_in_three_commands(repo, tmp_path):
    """CONTRIBUTING.md's three commands, as written, with the scripted API run without pytest."""
    guide = (ROOT / "CONTRIBUTING.md").read_text()
    block = re.search(r"commits a file:\n\n```sh\n(.*?)```", guide, re.S).group(1)
    commands = block.strip().splitlines()
    assert len(commands) == 3 and commands[0] == "python3 tests/scripted_api.py --port 8765 &"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    script = "\n".join(
        [
            f'python3 -S "{ROOT}/tests/scripted_api.py" --port {port} &',  # -S: no pytest to import
            "server=$!",
            "trap 'kill $server' EXIT",
            f"until python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}))' 2>/dev/null; do sleep 0.1; done",
            commands[1].replace("8765", port),
            commands[2].replace("orchestra ", f'"{sys.executable}" "{ROOT}/orchestra.py" ', 1),
        ]
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE"))}
    env.update(CLAUDE_CONFIG_DIR=str(tmp_path / "claude"), HOME=str(tmp_path / "home"))
    done = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "say-hello-bash: done - Added hello.txt" in done.stdout
    assert (
        git("log", "-1", "--format=%s", "orchestra/say-hello-bash", cwd=repo).strip() == "Add hello"
    )


# ---------------------------------------------------------------------------- sessions, cold


def test_a_first_sessions_run_reads_on_every_core_and_lists_the_same(cli, tmp_path, monkeypatch):
    store = tmp_path / "claude" / "projects" / "-work-app"
    store.mkdir(parents=True)
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(tmp_path / "claude"))
    for n in range(40):
        session = f"00000000-0000-4000-8000-{n:012d}"
        lines = [
            {"type": "user", "message": {"role": "user", "content": f"task number {n}"},
             "cwd": "/work/app", "sessionId": session, "uuid": f"u{n}", "gitBranch": "main"},
            *({"type": "assistant", "message": {"id": f"m{n}-{k}", "role": "assistant",
               "model": "claude-sonnet-4-5", "content": [{"type": "text", "text": f"reply {k}"}]},
               "cwd": "/work/app", "sessionId": session, "uuid": f"a{n}-{k}"} for k in range(n % 5)),
        ]  # fmt: skip
        (store / f"{session}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    listings, learned = {}, []
    learn = orchestra.CountCache.learn
    monkeypatch.setattr(orchestra.CountCache, "learn",
                        lambda self, file, *read: (learned.append(file.path), learn(self, file, *read)))  # fmt: skip
    for name, least in (("one by one", 10**9), ("on every core", 4)):
        monkeypatch.setattr(orchestra, "SESSION_PARALLEL_MIN", least)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / name))
        run = cli("sessions", "--all", "--limit", "100", "--json")
        assert run.code == 0, run
        listings[name] = [{k: v for k, v in s.items() if k != "age_seconds"}
                          for s in run.json()["sessions"]]  # fmt: skip
    assert len(learned) == 40  # the second listing read every transcript in worker processes
    assert listings["on every core"] == listings["one by one"]
    assert sorted(s["messages"] for s in listings["one by one"]) == sorted(
        1 + n % 5 for n in range(40)
    )


def test_readme_doctor_and_ci_pin_the_same_claude_code(cli, tmp_path, monkeypatch):
    pinned = orchestra.CLAUDE_PINNED_VERSION
    oldest = ".".join(map(str, orchestra.CLAUDE_MIN_VERSION))
    readme = (ROOT / "README.md").read_text()
    installs = re.findall(r"@anthropic-ai/claude-code@([\d.]+)", readme)
    assert installs and set(installs) == {pinned}
    assert f"Tested with Claude Code {pinned} (pinned) and the newest," in " ".join(readme.split())
    assert f"Claude Code {oldest} or newer" in readme
    assert f"CLAUDE_CODE_VERSION={pinned}\n" in (ROOT / ".ci" / "run").read_text()
    monkeypatch.setenv("PATH", str(tmp_path))  # no claude at all: doctor says what to install
    doctor = cli("doctor")
    assert (
        f"not found; install Claude Code with 'npm install -g @anthropic-ai/claude-code@{pinned}'"
        in doctor.out
    )
    readme_lines = readme.splitlines()
    first_screen = readme_lines[
        : readme_lines.index("## Who it is for, and when to pick something else")
    ]
    assert len(first_screen) <= 60 and len(readme_lines) <= 300
    assert any(line.startswith("git clone ") for line in first_screen)
