"""What a user sees for bad input: one line on stderr, exit status 2, nothing changed."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, git, make_repo, write_config


def snapshot(repo):
    """Everything a failed command must leave as it was."""
    state = repo / ".orchestra" / "state.json"
    return (
        git("for-each-ref", cwd=repo),
        git("worktree", "list", "--porcelain", cwd=repo),
        git("status", "--porcelain", "--ignored", cwd=repo),
        state.read_text() if state.exists() else None,
    )


def assert_one_line_error(run, expected):
    assert run.code == 2, run
    assert run.out == ""
    assert run.err.startswith("orchestra: error: "), run.err
    assert run.err.count("\n") == 1, run.err
    assert expected in run.err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["spawn", ""], "a task is empty; describe what the agent should do"),
        (["spawn", "   "], "a task is empty"),
        (["spawn", "x" * 20_000], "a task is 20000 characters long, over the limit of 8000"),
        (["spawn", "--parallel", "0", "task"], "argument --parallel: must be at least 1, not 0"),
        (["spawn", "--parallel", "9", "task"], "--parallel must be between 1 and max_parallel (8)"),
        (["spawn", "--parallel", "many", "task"], "'many' is not a whole number"),
        (
            ["spawn", "--base", "no-such-branch", "task"],
            "base 'no-such-branch' is not a commit in this repository",
        ),
        (["spawn", "--name", "Bad Name", "task"], "--name 'Bad Name' is not a valid id"),
        (
            ["spawn", "--name", "one", "task a", "task b"],
            "--name names one task each, in order: 2 task(s) but 1 name(s)",
        ),
        (["spawn"], "the following arguments are required: TASK"),
        (["status", "nobody"], "no agent 'nobody'; 'orchestra status' lists them"),
        (["logs", "nobody"], "no agent 'nobody'"),
        (["pause", "nobody"], "no agent 'nobody'"),
        (["frobnicate"], "'frobnicate' is not an orchestra command"),
        (
            ["-c", "colour=blue", "status"],
            "-c expects KEY=VALUE with a known key, not 'colour=blue'",
        ),
        (
            ["-c", "default_parallel=three", "status"],
            "-c: 'default_parallel' must be an integer, not \"three\"",
        ),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(fake_repo, cli, argv, expected):
    cli("init")
    before = snapshot(fake_repo)
    assert_one_line_error(cli(*argv), expected)
    assert snapshot(fake_repo) == before


def test_existing_branch_for_a_named_agent(fake_repo, cli):
    cli("init")
    git("branch", "orchestra/auth", cwd=fake_repo)
    before = snapshot(fake_repo)
    run = cli("spawn", "--name", "auth", "implement auth")
    assert_one_line_error(
        run,
        "branch 'orchestra/auth' already exists; pick another name or run 'orchestra cleanup auth'",
    )
    assert snapshot(fake_repo) == before


def test_existing_worktree_folder_for_a_named_agent(fake_repo, cli):
    (fake_repo / ".worktrees" / "task-auth").mkdir(parents=True)
    run = cli("spawn", "--name", "auth", "implement auth")
    assert_one_line_error(
        run, ".worktrees/task-auth already exists; pick another name or remove it"
    )
    assert git("branch", "--list", "orchestra/*", cwd=fake_repo) == ""


def test_unknown_and_ambiguous_ids(fake_repo, cli):
    cli("spawn", "fix login", "fix logout")
    assert_one_line_error(
        cli("stop", "fix-log"), "'fix-log' matches fix-login, fix-logout; type more of the id"
    )
    assert_one_line_error(cli("resume", "zzz"), "no agent 'zzz'")


def test_not_a_git_repository(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    run = cli("status")
    assert_one_line_error(
        run, f"{tmp_path} is not inside a git repository; cd into one or run 'git init'"
    )
    assert not (tmp_path / ".orchestra").exists()


def test_repository_without_commits(tmp_path, monkeypatch, cli):
    git("init", "-q", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, agent_command=[sys.executable, "{task}"])
    run = cli("spawn", "first task")
    assert_one_line_error(
        run, "this repository has no commits yet; make a first commit, then spawn agents"
    )
    assert not (tmp_path / ".orchestra" / "state.json").exists()


def test_bad_config_json(fake_repo, cli):
    (fake_repo / ".orchestra" / "config.json").write_text('{"default_parallel": 3,}')
    run = cli("spawn", "task")
    assert_one_line_error(run, f"{fake_repo}/.orchestra/config.json: not valid JSON (")
    assert "fix or remove it" in run.err


def test_real_file_in_a_subprocess_reports_errors_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "orchestra.py"), "status"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "ORCHESTRA_CONFIG": str(tmp_path / "none.json")},
    )
    assert done.returncode == 2
    assert (
        done.stderr
        == f"orchestra: error: {tmp_path} is not inside a git repository; cd into one or run 'git init'\n"
    )


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    import orchestra

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ORCHESTRA_DEBUG", "1")
    with pytest.raises(orchestra.OrchestraError):
        orchestra.main(["status"])


COMMANDS = ["init", "config", "spawn", "status", "pause", "resume", "stop", "logs", "diff", "worktrees", "collect", "land", "send",
            "cleanup", "restore", "sessions", "web", "supervise", "approvals", "approve", "deny", "doctor",
            "hook", "retry"]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_help_for_every_command_has_an_example(command, capsys):
    import orchestra

    with pytest.raises(SystemExit) as exit_info:
        orchestra.main([command, "--help"])
    assert exit_info.value.code == 0
    example = capsys.readouterr().out.split("example: ", 1)[1]
    assert f"orchestra {command}" in example


def test_every_command_is_documented():
    import orchestra

    listed = orchestra.build_parser()._subparsers._group_actions[0].choices
    assert sorted(listed) == sorted(COMMANDS)
    readme = (ROOT / "README.md").read_text()
    for command in COMMANDS:
        assert f"orchestra {command}" in orchestra.__doc__ or command in (
            "pause",
            "resume",
            "stop",
        ), command
        assert f"orchestra {command}" in readme or command in ("pause", "resume", "stop"), command


def test_version(capsys):
    import orchestra

    with pytest.raises(SystemExit):
        orchestra.main(["--version"])
    assert capsys.readouterr().out == f"orchestra {orchestra.__version__}\n"


def test_status_runs_from_inside_an_agent_worktree(fake_repo, cli, monkeypatch):
    cli("spawn", "quick one")
    worktree = fake_repo / ".worktrees" / "task-quick-one"
    monkeypatch.chdir(worktree)
    doc = cli("status", "--json").json()
    assert doc["repo"] == str(fake_repo)
    assert [a["id"] for a in doc["agents"]] == ["quick-one"]


def test_second_repository_is_independent(tmp_path, monkeypatch, cli):
    other = make_repo(tmp_path / "other")
    monkeypatch.chdir(other)
    assert cli("status").out.startswith("No agents yet.")


def test_status_watch_redraws_until_ctrl_c(fake_repo, cli):
    import signal
    import time

    cli("spawn", "quick one")
    watcher = subprocess.Popen([sys.executable, str(ROOT / "orchestra.py"), "status", "--watch"], cwd=fake_repo,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(2.5)
    watcher.send_signal(signal.SIGINT)
    out, err = watcher.communicate(timeout=10)
    assert watcher.returncode == 130
    assert out.count("ID  ") >= 2 and out.count("(Ctrl-C to leave)") >= 2
    assert "Traceback" not in err
