"""Checks after `done`, fix rounds, merge gating and bad settings (fake agent and real claude)."""

import json

import orchestra
from conftest import CLAUDE_TOOLS, FAKE_AGENT_COMMAND, git, load_state, wait_settled, write_config
from scripted_api import bash, requires_claude, text

PASSING = "test -f notes.txt"
FAILING = "echo 'AssertionError: notes.txt is empty' && exit 3"


def checked_repo(repo, checks, **more):
    write_config(
        repo, agent_command=FAKE_AGENT_COMMAND, heartbeat_interval=0.5, checks=checks, **more
    )
    return repo


def events(repo, agent_id, kind):
    """Orchestra events of one kind in an agent's log."""
    lines = (repo / ".orchestra" / "logs" / f"{agent_id}.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines if line.startswith("{")]
    return [e for e in parsed if e.get("type") == "orchestra" and e.get("event") == kind]


def test_checks_pass_in_the_agents_worktree(repo, cli):
    checked_repo(repo, [PASSING, "git log --oneline -1"])
    assert cli("spawn", "--name", "good", "commit:notes.txt").code == 0
    wait_settled(repo)
    record = load_state(repo)["agents"]["good"]
    assert record["state"] == "done"
    assert record["checks"] == {
        "status": "passed",
        "command": None,
        "exit_code": 0,
        "tail": "",
        "rounds": 0,
    }
    runs = events(repo, "good", "check")
    assert [(e["command"], e["exit_code"]) for e in runs] == [
        (PASSING, 0),
        ("git log --oneline -1", 0),
    ]
    assert "add notes.txt" in runs[1]["output"]  # ran in the worktree, on the agent's branch
    assert not (repo / "notes.txt").exists()
    status = cli("status")
    assert "done ✓" in status.out
    logs = cli("logs", "good").out
    assert f"$ {PASSING}  (check, exit 0)" in logs and "== checks passed" in logs
    agent = cli("status", "--json").json()["agents"][0]
    assert agent["checks"]["status"] == "passed"


def test_failing_check_is_recorded_with_its_tail_and_blocks_merge(repo, cli):
    checked_repo(repo, ["true", FAILING])
    cli("spawn", "--name", "bad", "commit:bad.txt")
    wait_settled(repo)
    record = load_state(repo)["agents"]["bad"]
    assert record["state"] == "done"
    checks = record["checks"]
    assert (
        checks["status"] == "failed" and checks["command"] == FAILING and checks["exit_code"] == 3
    )
    assert "AssertionError: notes.txt is empty" in checks["tail"] and checks["rounds"] == 0
    row = next(line for line in cli("status").out.splitlines() if line.startswith("bad"))
    assert "done ✗" in row and "checks failed" in row
    assert f"checks FAILED: {FAILING} (exit 3)" in cli("logs", "bad").out

    write_config(
        repo, agent_command=FAKE_AGENT_COMMAND, heartbeat_interval=0.5
    )  # no checks for the next one
    cli("spawn", "--name", "plain", "commit:plain.txt")
    wait_settled(repo)
    merged = cli("collect", "--merge")
    assert merged.code == 0, merged
    assert "Merged: plain" in merged.out
    assert f"Not merged: bad: checks failed: {FAILING} (exit 3)" in merged.out
    assert "Checks: failed" in merged.out
    assert (repo / "plain.txt").exists() and not (repo / "bad.txt").exists()

    forced = cli("collect", "--merge", "--include-failing", "--json").json()
    assert forced["merged"] == ["bad"] and forced["not_merged"] == []
    assert (repo / "bad.txt").exists()


def test_naming_an_agent_overrides_the_gate(repo, cli):
    checked_repo(repo, [FAILING])
    cli("spawn", "--name", "named", "commit:named.txt")
    wait_settled(repo)
    doc = cli("collect", "--merge", "named", "--json").json()
    assert doc["merged"] == ["named"]
    assert doc["agents"][0]["checks"]["status"] == "failed"


def test_failed_agent_has_checks_not_run_and_is_not_merged(repo, cli):
    checked_repo(repo, [PASSING])
    cli("spawn", "--name", "broken", "commit:x.txt fail")
    wait_settled(repo)
    record = load_state(repo)["agents"]["broken"]
    assert record["state"] == "failed" and record["checks"]["status"] == "not run"
    assert events(repo, "broken", "check") == []


def test_check_timeout_fails_the_check(repo, cli):
    checked_repo(repo, ["sleep 30"], check_timeout=1)
    cli("spawn", "--name", "slow", "commit:notes.txt")
    record = wait_settled(repo, timeout=30) and load_state(repo)["agents"]["slow"]
    assert record["checks"]["status"] == "failed" and record["checks"]["exit_code"] is None
    assert "timed out after 1s" in record["checks"]["tail"]


def test_checks_hold_a_slot_of_the_parallel_limit(repo, cli):
    checked_repo(repo, ["sleep 2"], default_parallel=1)
    cli("spawn", "first", "second")
    wait_for_checking = orchestra_wait(repo, lambda a: a["first"]["activity"] == "checks: sleep 2")
    assert wait_for_checking["first"]["state"] == "running"
    assert wait_for_checking["second"]["state"] == "queued"
    wait_settled(repo)


def orchestra_wait(repo, predicate, timeout=30):
    from conftest import wait_for

    def look():
        agents = load_state(repo)["agents"]
        return agents if agents and predicate(agents) else None

    return wait_for(look, timeout, interval=0.05, what="agent state")


def test_supervisor_killed_during_checks_leaves_them_to_the_next_one(repo, cli):
    import contextlib
    import os
    import signal

    checked_repo(repo, ["sleep 3 && test -f notes.txt"])
    cli("spawn", "--name", "crashy", "commit:notes.txt")
    orchestra_wait(repo, lambda a: (a["crashy"].get("checks") or {}).get("status") == "running")
    supervisor = load_state(repo)["supervisor"]["pid"]
    os.kill(supervisor, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(
            supervisor, 0
        )  # this test process started it (in-process spawn): reap the zombie
    record = load_state(repo)["agents"]["crashy"]
    assert record["state"] == "running" and record["checks"]["status"] == "running"
    assert cli("status").code == 0  # revives the supervisor
    wait_settled(repo, timeout=60)
    assert load_state(repo)["agents"]["crashy"]["checks"]["status"] == "passed"


def test_state_rebuilt_from_logs_keeps_the_checks_result(repo, cli):
    checked_repo(repo, [FAILING])
    cli("spawn", "--name", "rebuilt", "commit:r.txt")
    wait_settled(repo)
    (repo / ".orchestra" / "state.json").write_text("{broken")
    record = cli("status", "--json").json()["agents"][0]
    assert record["state"] == "done" and record["checks"]["status"] == "failed"


def test_bad_settings_exit_2_naming_the_key(repo, cli):
    write_config(repo, checks="pytest")
    run = cli("status")
    assert run.code == 2 and "'checks' must be a list of strings" in run.err
    write_config(repo, checks=["pytest", 3])
    assert "'checks' must be a list of strings" in cli("status").err
    write_config(repo, fix_rounds=-1)
    run = cli("status")
    assert run.code == 2 and "'fix_rounds' must be at least 0, not -1" in run.err
    write_config(repo, check_timeout=0)
    assert "'check_timeout' must be a number above 0" in cli("status").err
    write_config(repo, max_budget_usd=-2)
    assert "'max_budget_usd' must be a number above 0" in cli("status").err
    write_config(repo)
    run = cli("-c", "fix_rounds=-1", "status")
    assert run.code == 2 and "'fix_rounds'" in run.err


@requires_claude
def test_real_claude_fails_checks_then_fixes_them_in_one_round(claude_repo, claude_api, cli):
    config = json.loads((claude_repo / ".orchestra" / "config.json").read_text())
    write_config(claude_repo, **config, checks=["grep -q fixed answer.txt"], fix_rounds=1)
    claude_api.script("write-answer", [bash("echo wrong > answer.txt && git add answer.txt && git commit -qm answer"),
                                       text("Wrote the answer")])  # fmt: skip
    claude_api.script("checks orchestra runs after you finish failed", [
        bash("echo fixed > answer.txt && git commit -qam 'fix the answer'"), text("Fixed it")])  # fmt: skip
    assert cli("spawn", "--name", "fixer", "write-answer").code == 0
    wait_settled(claude_repo, timeout=120)
    record = load_state(claude_repo)["agents"]["fixer"]
    assert record["state"] == "done", record
    assert record["checks"] == {
        "status": "passed",
        "command": None,
        "exit_code": 0,
        "tail": "",
        "rounds": 1,
    }
    assert record["turns"] >= 4  # both runs add up
    fix_request = next(
        b for b in claude_api.main_requests if "checks orchestra runs" in json.dumps(b)
    )
    assert "grep -q fixed answer.txt" in json.dumps(fix_request)  # the failing command is quoted
    launches = events(claude_repo, "fixer", "launch")
    assert [e["resume"] for e in launches] == [False, True]
    assert record["session_id"] in launches[1]["argv"]
    assert [e["exit_code"] for e in events(claude_repo, "fixer", "check")] == [1, 0]
    assert "fix the answer" in git("log", "--format=%s", "orchestra/fixer", cwd=claude_repo)
    assert "== fix round 1" in cli("logs", "fixer").out


@requires_claude
def test_real_claude_check_failure_without_fix_rounds(claude_repo, claude_api, cli):
    config = json.loads((claude_repo / ".orchestra" / "config.json").read_text())
    write_config(claude_repo, **config, checks=["grep -q fixed answer.txt"])
    claude_api.script("write-wrong", [bash("echo wrong > answer.txt && git add answer.txt && git commit -qm a"),
                                      text("Done")])  # fmt: skip
    cli("spawn", "--name", "wrong", "write-wrong")
    wait_settled(claude_repo, timeout=120)
    record = load_state(claude_repo)["agents"]["wrong"]
    assert record["state"] == "done" and record["checks"]["status"] == "failed"
    assert record["checks"]["rounds"] == 0
    assert len(events(claude_repo, "wrong", "launch")) == 1
    assert CLAUDE_TOOLS  # the fixture allowed the tools the script uses


def test_dashboard_shows_checks_on_a_phone(repo, phone):
    from playwright.sync_api import expect
    from test_dashboard import card, serve

    checked_repo(repo, [PASSING])
    orchestra.main(
        [
            "spawn",
            "--name",
            "good",
            "commit:notes.txt good",
            "--name",
            "bad",
            "commit:other.txt bad",
        ]
    )
    wait_settled(repo)
    server = serve(repo, revive=False)
    try:
        phone.goto(server.url)
        good, bad = card(phone, "good"), card(phone, "bad")
        expect(good.locator(".badge")).to_have_text("done ✓", timeout=15_000)
        expect(good.locator(".checks")).to_have_text("checks passed")
        expect(bad.locator(".badge")).to_have_text("done ✗")
        expect(bad.locator(".checks")).to_have_text(f"checks failed: {PASSING} (exit 1)")
        assert phone.problems == []
    finally:
        server.stop()
