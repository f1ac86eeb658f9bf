"""The first ten minutes: short ids, tables that fit the terminal, a forgiving command line, the
running cost, `diff`, and agents that start with the environment of the command that made them."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest

import orchestra
from conftest import ROOT, agent_states, git, load_state, wait_for, wait_settled, write_config
from scripted_api import bash, requires_claude, text

PRINT_ENV = (
    "import os, sys, time\n"
    "if sys.argv[1] == 'hold':\n"
    "    time.sleep(30)\n"
    "print('SECRET=' + os.environ.get('ORCHESTRA_TEST_SECRET', 'unset'), flush=True)\n"
)


# --- ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("add input validation to the signup form", "add-input-validation"),
        ("write API docs for /users", "write-api-docs"),
        ("fix the flaky date test", "fix-flaky-date"),
        ("Refactor", "refactor"),
        ("internationalisation-and-localisation everywhere", "internationalisation"),
        ("the a", "the-a"),
        ("🚀 !!!", "task"),
    ],
)
def test_ids_are_a_few_words_of_the_task(task, expected):
    assert orchestra.slugify(task) == expected
    assert len(orchestra.slugify(task)) <= orchestra.ID_CHARS


def test_same_task_twice_gets_a_suffix_and_any_unique_prefix_works(fake_repo, cli):
    run = cli(
        "spawn", "add input validation to the signup form", "add input validation to the login form"
    )
    assert run.code == 0, run
    assert [line.split()[0] for line in run.out.splitlines()[:2]] == [
        "add-input-validation",
        "add-input-validation-2",
    ]
    wait_settled(fake_repo)
    assert (
        cli("status", "add-input-validation-2").out.splitlines()[1].split()[0]
        == "add-input-validation-2"
    )
    ambiguous = cli("logs", "add-input")
    assert (
        ambiguous.code == 2
        and "matches add-input-validation, add-input-validation-2" in ambiguous.err
    )


# --- tables fit the terminal --------------------------------------------------------------


LONG_TASKS = [
    "commit:alpha.txt write the alpha module with a very long description of what it should do in detail",
    "commit:beta.txt write the beta module and explain every single step it takes along the way",
    "fail on purpose so that the error message shows up in the activity column of the table",
]


@pytest.mark.parametrize("columns", [80, 120])
def test_every_table_fits_the_terminal(fake_repo, cli, monkeypatch, columns):
    cli("spawn", *LONG_TASKS)
    wait_settled(fake_repo)
    monkeypatch.setenv("COLUMNS", str(columns))
    ids = sorted(load_state(fake_repo)["agents"])

    status = cli("status").out.splitlines()
    rows = [line for line in status if line.split() and line.split()[0] in ids]
    assert len(rows) == 3 and all(len(line) <= columns for line in status)
    assert {row.split()[0] for row in rows} == set(ids)  # ids are never cut
    assert status[0].split() == ["ID", "STATE", "ELAPSED", "COST", "COMMITS", "FILES", "ACTIVITY"]

    config = cli("config").out.splitlines()
    table = [
        line for line in config if not line.startswith("file ")
    ]  # file paths: their own lines, whole
    assert config[0].split() == ["KEY", "SOURCE", "VALUE"] and all(
        len(line) <= columns for line in table
    )

    worktrees = cli("worktrees").out.splitlines()
    table = [line for line in worktrees if not line.startswith("    ")]
    assert all(len(line) <= columns for line in table)
    assert (
        f"    .worktrees/task-{ids[0]}  (orchestra/{ids[0]})" in worktrees
    )  # paths whole, on their own line

    assert cli("cleanup", "--force").code == 0
    archives = cli("cleanup", "--list-archives").out.splitlines()
    restores = [line.strip() for line in archives if line.startswith("    restore: ")]
    expected = [
        a["restore"] for a in cli("cleanup", "--list-archives", "--json").json()["archives"]
    ]
    assert restores == [f"restore: {r}" for r in expected] and len(restores) == 3  # commands whole
    assert all(len(line) <= columns for line in archives if not line.startswith("    "))


def test_render_table_cuts_only_the_last_column_and_drops_it_when_no_room():
    rows = [["an-id-that-is-long", "running", "x" * 200]]
    lines = orchestra.render_table(
        ["ID", "STATE", "ACTIVITY"], rows, sys.stdout, width=40
    ).splitlines()
    assert all(len(line) <= 40 for line in lines) and lines[1].startswith(
        "an-id-that-is-long  running  x"
    )
    narrow = orchestra.render_table(
        ["ID", "STATE", "ACTIVITY"], rows, sys.stdout, width=30
    ).splitlines()
    assert narrow[1] == "an-id-that-is-long  running"


# --- a forgiving command line ----------------------------------------------------------


def test_bare_orchestra_prints_the_help(capsys):
    assert orchestra.main([]) == 0
    assert capsys.readouterr().out.startswith("usage: orchestra")
    done = subprocess.run(
        [sys.executable, str(ROOT / "orchestra.py")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "    spawn " in done.stdout and done.stderr == ""


@pytest.mark.parametrize(
    ("argv", "hint"),
    [(["statsu"], "did you mean 'status'?"), (["-c", "model=x", "sesions"], "did you mean 'sessions'"),
     (["clean"], "did you mean 'cleanup'"), (["zzzz"], "see 'orchestra --help'")],
)  # fmt: skip
def test_a_mistyped_command_suggests_the_nearest(cli, argv, hint):
    run = cli(*argv)
    assert run.code == 2 and run.out == "" and run.err.count("\n") == 1
    assert f"'{argv[-1]}' is not an orchestra command" in run.err and hint in run.err


def test_spawn_names_pair_with_tasks_in_order(fake_repo, cli):
    run = cli("spawn", "--name", "alpha", "first task", "--name", "beta", "second task", "--json")
    assert run.code == 0, run
    assert [(a["id"], a["task"]) for a in run.json()["agents"]] == [
        ("alpha", "first task"),
        ("beta", "second task"),
    ]
    wrong = cli("spawn", "--name", "gamma", "one", "two")
    assert wrong.code == 2 and "2 task(s) but 1 name(s)" in wrong.err
    assert cli("spawn", "one", "--bogus").err.startswith(
        "orchestra: error: unrecognized arguments: --bogus"
    )


def test_status_watch_until_done_exits_when_nothing_runs(fake_repo, cli):
    cli("spawn", "sleep:2 short job")
    watcher = subprocess.run([sys.executable, str(ROOT / "orchestra.py"), "status", "--watch", "--until-done"],
                             cwd=fake_repo, capture_output=True, text=True, timeout=90)  # fmt: skip
    assert watcher.returncode == 0, watcher.stderr
    assert agent_states(fake_repo)["sleep-2-short"] == "done"
    assert watcher.stdout.rstrip().endswith("1 done; total cost $0.2500")
    assert cli("status", "--until-done").err.startswith(
        "orchestra: error: --until-done goes with --watch"
    )


def test_sessions_resume_takes_an_agent_id_prefix(fake_repo, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(tmp_path / "claude"))
    cli("spawn", "fix the login redirect")
    wait_settled(fake_repo)
    record = load_state(fake_repo)["agents"]["fix-login-redirect"]
    folder = tmp_path / "claude" / "projects" / "x"
    folder.mkdir(parents=True)
    line = {"type": "user", "cwd": record["worktree"], "sessionId": record["session_id"],
            "message": {"role": "user", "content": "fix the login redirect"}}  # fmt: skip
    (folder / f"{record['session_id']}.jsonl").write_text(json.dumps(line) + "\n")
    run = cli("sessions", "--resume", "fix-log", "--print")
    assert run.code == 0, run
    assert f"claude --resume {record['session_id']}" in run.out


# --- cost while running ----------------------------------------------------------------


def test_cost_is_estimated_from_usage_until_the_result(tmp_path):
    log = tmp_path / "agent.jsonl"
    usage = {"input_tokens": 1000, "cache_read_input_tokens": 10000, "output_tokens": 2000}
    events = [{"type": "system", "subtype": "init", "session_id": "s", "model": "claude-sonnet-4-5-20250929"},
              {"type": "assistant", "message": {"id": "m1", "content": [{"type": "text", "text": "hi"}], "usage": usage}},
              {"type": "assistant", "message": {"id": "m1", "content": [{"type": "tool_use", "name": "Bash", "input": {}}],
                                                "usage": usage}}]  # fmt: skip
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    reader = orchestra.AgentLog(log)
    reader.read_new()
    expected = (1000 * 3 + 10000 * 3 * 0.1 + 2000 * 15) / 1_000_000  # one response, counted once
    assert (
        reader.facts["cost_usd"] == pytest.approx(expected)
        and reader.facts["cost_estimated"] is True
    )
    record = {"cost_usd": reader.facts["cost_usd"], "cost_estimated": True}
    assert orchestra.record_cost(record) == "~$0.0360"
    with log.open("a") as f:
        f.write(
            json.dumps(
                {"type": "result", "subtype": "success", "total_cost_usd": 0.05, "num_turns": 1}
            )
            + "\n"
        )
    reader.read_new()
    assert reader.facts["cost_usd"] == 0.05 and reader.facts["cost_estimated"] is False
    assert (
        orchestra.estimated_cost("claude-opus-4-1-20250805", {"output_tokens": 1_000_000}) == 75.0
    )
    assert orchestra.estimated_cost("claude-haiku-4-5", {"input_tokens": 1_000_000}) == 1.0


# --- diff --------------------------------------------------------------------------------


def test_diff_shows_commits_and_uncommitted_work_against_the_base(fake_repo, capfd):
    assert orchestra.main(["spawn", "commit:done.txt write:draft.txt finish up"]) == 0
    wait_settled(fake_repo)
    record = load_state(fake_repo)["agents"]["commit-done-txt"]
    worktree = record["worktree"]
    with open(os.path.join(worktree, "README.md"), "a") as f:
        f.write("edited, not committed\n")
    capfd.readouterr()
    assert orchestra.main(["diff", "commit-done"]) == 0
    out = capfd.readouterr().out
    assert (
        "+++ b/done.txt" in out and "+edited, not committed" in out
    )  # commits and uncommitted work
    assert "Untracked in its worktree (not in the diff): draft.txt" in out
    assert orchestra.main(["diff", "commit-done", "--stat"]) == 0
    stat_out = capfd.readouterr().out
    assert (
        re.search(r"done.txt +\| 1 \+", stat_out)
        and "README.md | 1 +" in stat_out
        and "+++" not in stat_out
    )
    git("worktree", "remove", "--force", worktree, cwd=fake_repo)
    assert (
        orchestra.main(["diff", "commit-done", "--stat"]) == 0
    )  # from the branch once the worktree is gone
    assert "done.txt | 1 +" in capfd.readouterr().out


def test_diff_pages_like_git_on_a_terminal(fake_repo, cli):
    """Under a pseudo-terminal git starts its pager (here a `sed` that marks every line)."""
    pty = pytest.importorskip("pty")
    cli("spawn", "commit:paged.txt page me")
    wait_settled(fake_repo)
    env = dict(os.environ, GIT_PAGER="sed 's/^/PAGED:/'")
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.chdir(fake_repo)
        os.execve(
            sys.executable,
            [sys.executable, str(ROOT / "orchestra.py"), "diff", "commit-paged"],
            env,
        )
    output = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.waitpid(pid, 0)
    assert b"PAGED:+++ b/paged.txt" in re.sub(rb"\x1b\[[0-9;]*m", b"", output)


# --- environment -------------------------------------------------------------------------


def test_agents_get_the_environment_of_the_spawning_command(fake_repo, cli, monkeypatch):
    """A supervisor already runs (started without the variable); the new agent still sees it."""
    write_config(
        fake_repo, agent_command=[sys.executable, "-c", PRINT_ENV, "{task}"], heartbeat_interval=0.5
    )
    monkeypatch.delenv("ORCHESTRA_TEST_SECRET", raising=False)
    cli("spawn", "hold")
    wait_for(lambda: agent_states(fake_repo).get("hold") == "running", what="hold running")
    supervisor = load_state(fake_repo)["supervisor"]["pid"]
    monkeypatch.setenv("ORCHESTRA_TEST_SECRET", "s3cret-only-in-my-shell")
    cli("spawn", "show env")
    wait_for(
        lambda: agent_states(fake_repo).get("show-env") == "done", timeout=60, what="show-env done"
    )
    assert (
        load_state(fake_repo)["supervisor"]["pid"] == supervisor
    )  # the same supervisor launched it
    assert (
        "SECRET=s3cret-only-in-my-shell"
        in (fake_repo / ".orchestra" / "logs" / "show-env.jsonl").read_text()
    )
    folder = fake_repo / ".orchestra" / "env"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in (fake_repo / ".orchestra").rglob("*"):
        if (
            path.is_file() and path.name != "show-env.jsonl"
        ):  # the agent's own output holds what it printed
            assert b"s3cret-only-in-my-shell" not in path.read_bytes(), path
    cli("stop", "hold")


CLAUDE_LIKE = (  # stands in for `claude -p ...` (task on stdin): fails "Not logged in" without a key
    "import json, os, sys, time\n"
    "task = sys.stdin.read()\n"
    "print(json.dumps({'type': 'system', 'subtype': 'init', 'session_id': 'fake-session'}), flush=True)\n"
    "if task == 'hold':\n"
    "    time.sleep(30)\n"
    "key = os.environ.get('ORCHESTRA_TEST_SECRET')\n"
    "print('SEEN=' + (key or 'none') + ' TASK=' + task, flush=True)\n"
    "sys.exit(0 if key else 'Not logged in')\n"
)


def test_resume_and_send_take_the_environment_of_their_command(fake_repo, cli, monkeypatch):
    write_config(
        fake_repo, agent_command=[sys.executable, "-c", CLAUDE_LIKE], heartbeat_interval=0.5
    )
    monkeypatch.delenv("ORCHESTRA_TEST_SECRET", raising=False)
    cli("spawn", "hold", "login please")
    wait_for(
        lambda: agent_states(fake_repo).get("login") == "failed", timeout=60, what="login failed"
    )
    assert agent_states(fake_repo)["hold"] == "running"  # the supervisor is still there
    monkeypatch.setenv("ORCHESTRA_TEST_SECRET", "key-set-later")
    assert cli("resume", "login").out == "login: queued to resume its session\n"
    wait_for(
        lambda: agent_states(fake_repo).get("login") == "done", timeout=60, what="login resumed"
    )
    log = (fake_repo / ".orchestra" / "logs" / "login.jsonl").read_text()
    assert "SEEN=none" in log and "SEEN=key-set-later TASK=Continue the task." in log
    monkeypatch.setenv("ORCHESTRA_TEST_SECRET", "newer-key")
    cli("send", "login", "one more thing")
    wait_for(lambda: "SEEN=newer-key TASK=one more thing" in (fake_repo / ".orchestra" / "logs" / "login.jsonl").read_text(),
             timeout=60, what="the message ran with the newer key")  # fmt: skip
    assert "key-set-later" not in (fake_repo / ".orchestra" / "state.json").read_text()
    assert (
        not list((fake_repo / ".orchestra" / "env").iterdir())
        or agent_states(fake_repo)["login"] != "done"
    )
    cli("stop", "hold")


def test_saved_environment_is_private_and_read_once(project):
    orchestra.save_agent_env(project, ["one"], {"ANTHROPIC_API_KEY": "sk-test", "PATH": "/bin"})
    path = project.dir / "env" / "one"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert orchestra.take_agent_env(project, "one") == {
        "ANTHROPIC_API_KEY": "sk-test",
        "PATH": "/bin",
    }
    assert not path.exists() and orchestra.take_agent_env(project, "one") is None


# --- the real claude CLI ---------------------------------------------------------------


@requires_claude
def test_real_agent_gets_a_message_sent_while_it_runs_and_shows_an_estimate(
    claude_repo, claude_api, cli
):
    claude_api.script(
        "long-job",
        [bash(f"{sys.executable} -c 'import time; time.sleep(6)'"), text("first part done")],
    )
    claude_api.script("second-part", [text("second part done")])
    agent = cli("spawn", "please do the long-job", "--json").json()["agents"][0]["id"]
    wait_for(lambda: (load_state(claude_repo)["agents"][agent]["activity"] or "").startswith("Bash:"), timeout=90,
             what="the agent is busy")  # fmt: skip
    running = load_state(claude_repo)["agents"][agent]
    assert (
        running["state"] == "running"
        and running["cost_estimated"] is True
        and running["cost_usd"] > 0
    )
    row = cli("status").out.splitlines()[1]
    assert f"~{orchestra.format_cost(running['cost_usd'])}" in row or "~$" in row
    sent = cli("send", agent[:8], "now the second-part please")
    assert (
        sent.code == 0 and "your message waits and is sent when its current turn ends" in sent.out
    )
    wait_for(lambda: load_state(claude_repo)["agents"][agent]["result"] == "second part done", timeout=120,
             what="the message was delivered")  # fmt: skip
    wait_settled(claude_repo)
    done = load_state(claude_repo)["agents"][agent]
    assert (
        done["state"] == "done"
        and done["cost_estimated"] is False
        and done["pending_messages"] == []
    )
    history = json.dumps(claude_api.main_requests[-1]["messages"])
    assert "long-job" in history and "second-part" in history  # the same session went on


# --- the dashboard shows the estimate too (real Chromium) -----------------------------------


def test_dashboard_marks_a_running_cost_as_an_estimate(fake_repo, cli, phone):
    from playwright.sync_api import expect
    from test_dashboard import card, serve

    cli("spawn", "sleep:6 priced while running")
    server = serve(fake_repo)
    try:
        phone.goto(server.url)
        running = card(phone, "sleep-6-priced")
        expect(running).to_contain_text("~$", timeout=30_000)
        expect(phone.locator("#total-cost")).to_have_text(re.compile(r"^~\$"))
        expect(running).to_contain_text("$0.2500", timeout=60_000)  # the result's own figure
        expect(running).not_to_contain_text("~$")
    finally:
        server.stop()


def test_an_agent_whose_setup_fails_keeps_no_saved_environment(fake_repo, cli):
    write_config(fake_repo, agent_command=[sys.executable, "-c", "", "{task}"], setup=["exit 3"])
    run = cli("spawn", "never launched")
    assert run.code == 1 and agent_states(fake_repo)["never-launched"] == "failed"
    assert not (fake_repo / ".orchestra" / "env" / "never-launched").exists()
