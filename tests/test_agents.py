"""Agent lifecycle with the fast fake agent: spawn, supervise, pause, resume, stop, logs."""

import json
import os
import shutil
import signal
import time

import orchestra
from conftest import (
    FAKE_AGENT_COMMAND,
    agent_states,
    git,
    load_state,
    process_state,
    wait_for,
    wait_settled,
    write_config,
)


def test_spawn_creates_branch_and_worktree_and_finishes(fake_repo, cli):
    head_before = git("rev-parse", "HEAD", cwd=fake_repo)
    run = cli("spawn", "commit:notes.txt add some notes")
    assert run.code == 0, run
    assert run.out.startswith(
        "commit-notes-txt  queued  .worktrees/task-commit-notes-txt\nEach agent works on branch orchestra/<id>"
    )
    assert "orchestra status --watch" in run.out
    wait_settled(fake_repo)

    record = load_state(fake_repo)["agents"]["commit-notes-txt"]
    assert record["state"] == "done"
    assert record["result"] == "all done"
    assert record["cost_usd"] == 0.25 and record["turns"] == 3
    assert record["input_tokens"] == 120 and record["output_tokens"] == 30
    assert record["commits"] == 1 and record["files_changed"] == 1
    assert record["exit_code"] == 0 and record["session_id"]
    worktree = fake_repo / ".worktrees" / "task-commit-notes-txt"
    assert record["worktree"] == str(worktree)
    assert (worktree / "notes.txt").read_text() == "written by commit-notes-txt\n"
    assert "add notes.txt" in git("log", "--oneline", "orchestra/commit-notes-txt", cwd=fake_repo)
    # The user's checkout is untouched.
    assert git("rev-parse", "HEAD", cwd=fake_repo) == head_before
    assert git("status", "--porcelain", cwd=fake_repo) == ""
    assert not (fake_repo / "notes.txt").exists()


def test_init_is_idempotent_and_excludes_its_folders(repo, cli):
    assert cli("init").code == 0
    second = cli("init")
    assert second.code == 0
    assert "default_parallel" in second.out and "default" in second.out
    exclude = (repo / ".git" / "info" / "exclude").read_text().splitlines()
    assert exclude.count("/.orchestra/") == 1 and exclude.count("/.worktrees/") == 1
    assert git("status", "--porcelain", cwd=repo) == ""


def test_status_json_has_the_documented_shape(fake_repo, cli):
    cli("spawn", "first", "second")
    wait_settled(fake_repo)
    doc = cli("status", "--json").json()
    assert set(doc) == {"repo", "supervisor", "agents", "rate_limited_until", "batches"}
    assert doc["repo"] == str(fake_repo)
    assert set(doc["supervisor"]) == {"pid", "alive", "heartbeat_at"}
    assert [a["id"] for a in doc["agents"]] == ["first", "second"]
    for agent in doc["agents"]:
        assert tuple(sorted(agent)) == tuple(sorted(orchestra.RECORD_FIELDS))
        assert agent["created_at"].endswith("Z")


def test_status_table_shows_state_cost_and_activity(fake_repo, cli):
    cli("spawn", "fail at this")
    wait_settled(fake_repo)
    table = cli("status").out
    header, row = table.splitlines()[:2]
    assert header.split() == ["ID", "STATE", "ELAPSED", "COST", "COMMITS", "FILES", "ACTIVITY"]
    assert row.split()[:2] == ["fail-this", "failed"]
    assert "$0.2500" in row and "it broke" in row
    assert "1 failed; total cost $0.2500" in table


def test_parallel_limit_queues_the_rest(fake_repo, cli):
    run = cli("spawn", "--parallel", "1", "sleep:1 one", "sleep:1 two", "sleep:1 three")
    assert run.code == 0
    most_running = 0
    while any(s in orchestra.ACTIVE_STATES for s in agent_states(fake_repo).values()):
        most_running = max(most_running, list(agent_states(fake_repo).values()).count("running"))
        time.sleep(0.05)
    assert most_running == 1
    assert set(agent_states(fake_repo).values()) == {"done"}


def test_spawn_wait_shows_progress_and_fails_when_an_agent_fails(fake_repo, cli):
    run = cli("spawn", "--wait", "ok task", "fail task")
    assert run.code == 1
    assert "ok-task: done" in run.out and "fail-task: failed - it broke" in run.out
    assert run.out.rstrip().endswith("1 done, 1 failed; total cost $0.5000")


def test_spawn_wait_json_prints_one_document(fake_repo, cli):
    run = cli("spawn", "--wait", "--json", "ok task")
    assert run.code == 0
    assert [a["state"] for a in run.json()["agents"]] == ["done"]


def test_ids_are_unique_against_records_branches_and_folders(fake_repo, cli):
    git("branch", "orchestra/fix-bug", cwd=fake_repo)
    (fake_repo / ".worktrees" / "task-fix-bug-2").mkdir(parents=True)
    run = cli("spawn", "--json", "Fix bug", "fix  BUG!")
    assert [a["id"] for a in run.json()["agents"]] == ["fix-bug-3", "fix-bug-4"]


def test_tasks_with_newlines_and_emoji_get_valid_ids(fake_repo, cli):
    run = cli("spawn", "--json", "Add 🚀 rocket\nlaunch", "🎉🎉")
    ids = [a["id"] for a in run.json()["agents"]]
    assert ids == ["add-rocket-launch", "task"]
    for agent_id in ids:
        git("check-ref-format", "--branch", f"orchestra/{agent_id}", cwd=fake_repo)
    wait_settled(fake_repo)
    assert load_state(fake_repo)["agents"]["add-rocket-launch"]["task"] == "Add 🚀 rocket\nlaunch"


def test_worktreeinclude_and_copy_files_are_copied(fake_repo, cli):
    (fake_repo / ".gitignore").write_text(".env*\nsecrets/\n")
    git("add", ".gitignore", cwd=fake_repo)
    git("commit", "-qm", "ignore env", cwd=fake_repo)
    (fake_repo / ".env").write_text("TOKEN=1\n")
    (fake_repo / ".env.local").write_text("LOCAL=1\n")
    (fake_repo / "secrets").mkdir()
    (fake_repo / "secrets" / "key.pem").write_text("key\n")
    (fake_repo / "scratch.txt").write_text("not copied\n")
    (fake_repo / ".worktreeinclude").write_text("# copy env files\n.env\n")
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, copy_files=[".env.local", "secrets/"])
    run = cli("spawn", "--json", "copy things")
    record = run.json()["agents"][0]
    worktree = fake_repo / ".worktrees" / "task-copy-things"
    assert (worktree / ".env").read_text() == "TOKEN=1\n"
    assert (worktree / ".env.local").read_text() == "LOCAL=1\n"
    assert (worktree / "secrets" / "key.pem").read_text() == "key\n"
    assert not (worktree / "scratch.txt").exists()
    saved = load_state(fake_repo)["agents"][record["id"]]
    assert sorted(saved["copied_files"]) == [".env", ".env.local", "secrets/key.pem"]


def test_setup_output_goes_to_the_log_and_runs_in_the_worktree(fake_repo, cli):
    write_config(
        fake_repo, agent_command=FAKE_AGENT_COMMAND, setup=["echo set up in $(basename $PWD)"]
    )
    cli("spawn", "with setup")
    wait_settled(fake_repo)
    log = cli("logs", "setup").out
    assert "$ echo set up in $(basename $PWD)  (exit 0)" in log
    assert "  set up in task-setup" in log
    assert load_state(fake_repo)["agents"]["setup"]["state"] == "done"


def test_failing_setup_fails_the_agent_visibly(fake_repo, cli):
    write_config(
        fake_repo,
        agent_command=FAKE_AGENT_COMMAND,
        setup=["echo installing; echo 'npm ERR! missing' >&2; exit 3"],
    )
    run = cli("spawn", "needs setup")
    assert run.code == 1
    assert "needs-setup  failed" in run.out
    assert (
        "setup command 'echo installing; echo 'npm ERR! missing' >&2; exit 3' failed with exit 3"
        in run.out
    )
    assert "npm ERR! missing" in run.out
    record = load_state(fake_repo)["agents"]["needs-setup"]
    assert record["state"] == "failed" and "npm ERR! missing" in record["error"]
    assert "npm ERR! missing" in cli("logs", "needs-setup").out


def test_spawning_eight_creates_worktrees_concurrently(fake_repo, cli, tmp_path):
    marks = tmp_path / "setup-times"
    marks.mkdir()
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, max_parallel=8,
                 setup=[f"date +%s.%N > {marks}/$(basename $PWD).start; sleep 0.5; date +%s.%N > {marks}/$(basename $PWD).end"])  # fmt: skip
    run = cli("spawn", "--parallel", "8", *[f"task {n}" for n in range(8)])
    assert run.code == 0
    wait_settled(fake_repo)  # spawn makes the first worktree, the supervisor the others
    names = sorted(p.stem for p in marks.glob("*.start"))
    assert len(names) == 8
    spans = [
        (float((marks / f"{n}.start").read_text()), float((marks / f"{n}.end").read_text()))
        for n in names
    ]
    # Concurrent: some setup started before another one ended.
    assert any(s1 < s2 < e1 for i, (s1, e1) in enumerate(spans) for s2, _ in spans[i + 1 :])


def test_pause_resume_and_stop(fake_repo, cli):
    cli("spawn", "sleep:30 long job")
    wait_for(lambda: agent_states(fake_repo).get("sleep-30-long") == "running", what="running")
    record = load_state(fake_repo)["agents"]["sleep-30-long"]
    pid = record["pid"]

    assert cli("pause", "sleep").out == "sleep-30-long: paused\n"
    assert process_state(pid) == "T"
    assert agent_states(fake_repo)["sleep-30-long"] == "paused"

    assert cli("resume", "sleep-30").out == "sleep-30-long: resumed\n"
    assert process_state(pid) in ("S", "R")

    cli("pause", "sleep-30-long")
    run = cli("stop", "sleep-30-long")
    assert run.out == "sleep-30-long: stopped (worktree and branch kept)\n"
    wait_for(lambda: process_state(pid) is None, timeout=10, what="the agent to end")
    wait_settled(fake_repo)
    record = load_state(fake_repo)["agents"]["sleep-30-long"]
    assert record["state"] == "stopped"
    assert (fake_repo / ".worktrees" / "task-sleep-30-long").is_dir()
    git("rev-parse", "--verify", "orchestra/sleep-30-long", cwd=fake_repo)


def test_pause_of_finished_agent_is_refused(fake_repo, cli):
    cli("spawn", "quick")
    wait_settled(fake_repo)
    run = cli("pause", "quick")
    assert run.code == 2
    assert run.err == "orchestra: error: quick is done; only a running agent can be paused\n"


def test_stop_queued_agent_never_starts_it(fake_repo, cli):
    cli("spawn", "--parallel", "1", "sleep:3 first", "second")
    assert cli("stop", "second").code == 0
    wait_settled(fake_repo)
    record = load_state(fake_repo)["agents"]["second"]
    assert record["state"] == "stopped" and record["started_at"] is None


def test_agent_exit_code_is_tracked_without_stream_json(fake_repo, cli):
    cli("spawn", "quiet ok", "quiet crash:4")
    wait_settled(fake_repo)
    agents = load_state(fake_repo)["agents"]
    assert agents["quiet-ok"]["state"] == "done" and agents["quiet-ok"]["exit_code"] == 0
    assert agents["quiet-crash-4"]["state"] == "failed"
    assert agents["quiet-crash-4"]["error"] == "agent exited with status 4"


def test_stale_flag_after_quiet_period(fake_repo, cli):
    write_config(
        fake_repo, agent_command=FAKE_AGENT_COMMAND, heartbeat_interval=0.2, stale_threshold=1
    )
    cli("spawn", "quiet sleep:4 hush")
    wait_for(
        lambda: load_state(fake_repo)["agents"]["quiet-sleep-4"]["stale"], timeout=10, what="stale"
    )
    assert "running stale" in cli("status").out
    wait_settled(fake_repo)
    assert load_state(fake_repo)["agents"]["quiet-sleep-4"]["stale"] is False


def test_logs_are_readable_and_cleaned_of_escapes(fake_repo, cli):
    cli("spawn", "ansi commit:a.txt")
    wait_settled(fake_repo)
    lines = cli("logs", "ansi").out.splitlines()
    assert lines[0] == "== spawned on orchestra/ansi-commit-txt from main: ansi commit:a.txt"
    assert lines[1] == "== agent started"
    assert lines[2].startswith("session ") and lines[2].endswith("started (model fake-model)")
    assert "red \x1b[31malert\x1b[0m\x07 bell" in lines  # not a terminal: printed as written
    assert lines[-1] == "== DONE after 1.2s, 3 turns, $0.2500: all done"
    assert orchestra.strip_control("red \x1b[31malert\x1b[0m\x07 bell") == "red alert bell"
    raw = cli("logs", "--raw", "ansi").out.splitlines()
    assert all(json.loads(line) for line in raw)


def test_logs_follow_ends_when_agent_finishes(fake_repo, cli):
    cli("spawn", "sleep:1 follow me")
    run = cli("logs", "-f", "sleep-1-follow")
    assert run.code == 0
    assert run.out.splitlines()[-1].startswith("== DONE")


def test_worktrees_joins_records_and_marks_orphans_and_missing(fake_repo, cli):
    cli("spawn", "kept", "vanished")
    wait_settled(fake_repo)
    git(
        "worktree",
        "add",
        "-q",
        "-b",
        "stray",
        str(fake_repo / ".worktrees" / "task-stray"),
        cwd=fake_repo,
    )
    shutil.rmtree(fake_repo / ".worktrees" / "task-vanished")
    rows = {r["path"]: r for r in cli("worktrees", "--json").json()["worktrees"]}
    assert rows[str(fake_repo)]["notes"] == ["main"]
    assert rows[str(fake_repo / ".worktrees" / "task-kept")]["id"] == "kept"
    assert rows[str(fake_repo / ".worktrees" / "task-stray")]["notes"] == ["orphan"]
    vanished = rows[str(fake_repo / ".worktrees" / "task-vanished")]
    assert vanished["id"] == "vanished" and "missing" in vanished["notes"]
    table = cli("worktrees").out
    assert "orphan" in table and "missing" in table


def test_claude_argv_carries_permissions_model_and_branch(repo):
    project = orchestra.Project.open(repo, {"ORCHESTRA_CONFIG": "/nonexistent"},
                                     {"model": "opus", "permission_mode": "acceptEdits"})  # fmt: skip
    record = orchestra.new_record(project, "x", "do x", "main", "abc")
    argv = orchestra.agent_argv(record)
    assert argv[:5] == ["claude", "-p", "--output-format", "stream-json", "--verbose"]
    assert "do x" not in argv and orchestra.agent_prompt(record) == "do x"  # on stdin: not in ps
    assert "orchestra/x" in argv[argv.index("--append-system-prompt") + 1]
    assert argv[argv.index("--model") + 1] == "opus"
    assert argv[argv.index("--permission-mode") + 1] == "acceptEdits"
    assert "--allowedTools" not in argv
    settings = json.loads(argv[argv.index("--settings") + 1])
    assert settings["permissions"]["allow"] == orchestra.DEFAULT_RULES  # the narrow defaults
    record["session_id"] = "s-1"
    resumed = orchestra.agent_argv(record, "Continue the task.")
    assert orchestra.agent_prompt(record, "Continue the task.") == "Continue the task."
    assert resumed[resumed.index("--resume") + 1] == "s-1"


def test_other_agent_command_gets_the_task_in_place(repo):
    project = orchestra.Project.open(
        repo,
        {"ORCHESTRA_CONFIG": "/nonexistent"},
        {"agent_command": ["aider", "--message", "{task}"]},
    )
    record = orchestra.new_record(project, "x", "do x", "main", "abc")
    assert orchestra.agent_argv(record) == ["aider", "--message", "do x"]


def test_missing_claude_is_a_clear_error(repo, cli):
    write_config(repo, agent_command=["claude-not-installed-here"])
    run = cli("spawn", "anything")
    assert run.code == 2
    assert run.err.startswith(
        "orchestra: error: 'claude-not-installed-here' was not found on PATH; install Claude Code"
    )
    assert "agent_command" in run.err and run.err.count("\n") == 1
    assert not (repo / ".orchestra" / "state.json").exists()


def test_signal_is_never_sent_to_a_recycled_pid():
    assert orchestra.signal_group(os.getpid(), "not-my-start-time", signal.SIGSTOP) is False


def test_concurrent_worktree_creation_never_races(fake_repo, cli):
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, max_parallel=8)
    for round_number in range(3):
        run = cli("spawn", "--json", *[f"round {round_number} task {n}" for n in range(8)])
        assert run.code == 0, run
        assert {a["state"] for a in run.json()["agents"]} == {"queued"}
    wait_settled(fake_repo)
    assert set(agent_states(fake_repo).values()) == {"done"}
    for agent in load_state(fake_repo)["agents"].values():
        assert (
            fake_repo / ".worktrees" / f"task-{agent['id']}" / "README.md"
        ).read_text() == "# demo\n"


def test_include_patterns_match_like_gitignore():
    cases = [
        (".env", [".env"], True),
        ("config/.env", [".env"], True),
        (".env.local", [".env*"], True),
        ("secrets/key.pem", ["secrets/"], True),
        ("deep/secrets/key.pem", ["secrets/"], True),
        ("secrets", ["secrets/"], False),
        ("config/local.json", ["config/*.json"], True),
        ("other/config/local.json", ["/config/*.json"], False),
        ("notes.txt", [".env", "secrets/"], False),
    ]
    for path, patterns, expected in cases:
        assert orchestra.matches_include(path, patterns) is expected, (path, patterns)
