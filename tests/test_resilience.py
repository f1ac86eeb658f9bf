"""Agents that outlive rate limits, overload and network errors; batch budgets; retry."""

import json
import re
import time

import pytest

import orchestra
from conftest import (
    FAKE_AGENT_COMMAND,
    agent_states,
    git,
    load_state,
    wait_for,
    wait_settled,
    write_config,
)
from scripted_api import bash, error, overloaded, rate_limited, requires_claude, slow, text


def claude_config(repo, **values):
    """Add settings to the claude_repo fixture's config."""
    config = json.loads((repo / ".orchestra" / "config.json").read_text())
    write_config(repo, **{**config, **values})


def log_events(repo, agent_id, kind):
    lines = (repo / ".orchestra" / "logs" / f"{agent_id}.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines if line.startswith("{")]
    return [e for e in parsed if e.get("type") == "orchestra" and e.get("event") == kind]


def wait_state(repo, agent_id, state, timeout=60):
    return wait_for(
        lambda: agent_states(repo).get(agent_id) == state, timeout, 0.05, f"{agent_id} {state}"
    )


# -- pure helpers ---------------------------------------------------------------------


def test_api_error_reasons_from_what_the_cli_writes():
    cases = [
        ({"api_error_status": 429, "api_error_type": "rate_limit_error", "result": "API Error: Request rejected (429)"}, "rate_limit"),
        ({"api_error_status": 529, "api_error_type": "overloaded_error", "result": "API Error: 529 Overloaded."}, "overloaded"),
        ({"api_error_status": None, "api_error": "connection_failed", "result": "API Error: Connection refused"}, "network"),
        ({"api_error_status": 503, "result": "API Error: 503"}, "server_error"),
        ({"result": "Claude AI usage limit reached|1767225600"}, "usage_limit"),
        ({"api_error_status": 429, "result": "You've hit your limit · resets 3pm (Europe/Paris)"}, "usage_limit"),
        ({"subtype": "error_max_turns", "result": "max turns limit reached"}, None),
        ({"api_error_status": 400, "result": "API Error: 400 bad request"}, None),
        ({"result": "the tests fail"}, None),
    ]  # fmt: skip
    for result, reason in cases:
        assert orchestra.api_error_reason(result) == reason, result
    assert orchestra.usage_reset_time("Claude AI usage limit reached|1767225600") == 1767225600.0
    noon = 1767268800  # 2026-01-01 12:00 UTC
    paris = orchestra.usage_reset_time(
        "You've hit your limit · resets 3pm (Europe/Paris)", now=noon
    )
    assert paris == noon + 2 * 3600  # 15:00 in Paris is 14:00 UTC
    utc = orchestra.usage_reset_time("5-hour limit reached · resets 11am (UTC)", now=noon)
    assert utc == noon + 23 * 3600  # 11:00 has passed today: tomorrow
    assert orchestra.usage_reset_time("resets 25pm", now=noon) is None
    assert (
        orchestra.epoch_seconds(1700000000000) == 1700000000
        and orchestra.epoch_seconds(1771390800) == 1771390800
    )


def test_backoff_doubles_with_jitter_and_is_capped():
    assert orchestra.backoff_seconds(1, 10, 1000, jitter=0) == 10
    assert orchestra.backoff_seconds(3, 10, 1000, jitter=0) == 40
    assert orchestra.backoff_seconds(3, 10, 1000, jitter=1) == 40 * (1 + orchestra.API_JITTER)
    assert orchestra.backoff_seconds(20, 10, 1000, jitter=0.5) == 1000


def test_last_api_failure_reads_the_reset_of_a_rate_limit_event(tmp_path):
    log = tmp_path / "a.jsonl"
    reset = int(time.time()) + 3600
    lines = [
        {"type": "orchestra", "event": "launch"},
        {"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": reset}},
        {"type": "result", "subtype": "success", "is_error": True, "api_error_status": 429,
         "result": "API Error: Request rejected (429) · rate limited"},
    ]  # fmt: skip
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert orchestra.last_api_failure(log) == (
        "rate_limit",
        reset,
        "API Error: Request rejected (429) · rate limited",
    )
    log.write_text(
        "".join(
            json.dumps(line) + "\n" for line in [*lines, {"type": "orchestra", "event": "launch"}]
        )
    )
    assert orchestra.last_api_failure(log) is None  # a newer run has not failed


# -- budgets with the fake agent -------------------------------------------------------------


def test_batch_budget_stops_the_batch(fake_repo, cli):
    write_config(
        fake_repo, agent_command=FAKE_AGENT_COMMAND, heartbeat_interval=0.5, default_parallel=2
    )
    run = cli("spawn", "--budget", "0.4", "one", "sleep:3 two", "sleep:30 three", "four")
    assert run.code == 0, run
    wait_settled(fake_repo, timeout=60)
    agents = load_state(fake_repo)["agents"]
    summary = {
        i: (a["state"], a["started_at"], a["finished_at"], a["cost_usd"]) for i, a in agents.items()
    }
    assert agents["one"]["state"] == "done" and agents["sleep-3-two"]["state"] == "done", summary
    for agent_id in ("sleep-30-three", "four"):
        assert agents[agent_id]["state"] == "stopped", agents[agent_id]
        assert agents[agent_id]["stop_reason"] == "budget"
    assert not agents["four"][
        "started_at"
    ]  # three usually ran (and was stopped); see the claude test
    assert (fake_repo / ".worktrees" / "task-sleep-30-three").is_dir()
    assert git("branch", "--list", "orchestra/four", cwd=fake_repo).strip()
    doc = cli("status", "--json").json()
    (batch,) = doc["batches"].values()
    # two results of $0.25, plus what the stopped agent's tokens are estimated to have cost
    assert batch["budget"] == 0.4 and 0.5 <= batch["spent"] < 0.6 and batch["agents"] == 4
    assert {a["batch"] for a in doc["agents"]} == set(doc["batches"])
    assert re.search(r"spent \$0\.5\d+ of \$0\.4000; reached", cli("status").out)
    assert re.search(
        r"stopped: batch spent \$0\.5\d+ of its \$0\.4000 budget", cli("logs", "four").out
    )


def test_a_state_rebuilt_from_the_logs_keeps_batches_and_budgets(fake_repo, cli):
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, heartbeat_interval=0.5)
    assert cli("spawn", "--budget", "2", "one", "two").code == 0
    wait_settled(fake_repo, timeout=60)
    before = cli("status", "--json").json()
    (fake_repo / ".orchestra" / "state.json").write_text("{ torn")
    after = cli("status", "--json").json()
    assert after["batches"] == before["batches"] and len(after["batches"]) == 1
    assert [a["batch"] for a in after["agents"]] == [a["batch"] for a in before["agents"]]
    assert next(iter(after["batches"].values()))["budget"] == 2


def test_bad_budget_exits_2(fake_repo, cli):
    for value in ("abc", "0", "-1", "nan"):
        run = cli("spawn", "--budget", value, "task")
        assert run.code == 2 and "--budget" in run.err, run
    assert agent_states(fake_repo) == {}


def test_per_agent_budget_is_passed_to_claude(repo, cli):
    write_config(repo, max_budget_usd=1.5)
    record = orchestra.new_record(
        orchestra.Project.open(repo, {"ORCHESTRA_CONFIG": "/nonexistent"}),
        "a",
        "t",
        "main",
        "0" * 40,
    )
    argv = orchestra.agent_argv(record)
    assert argv[argv.index("--max-budget-usd") + 1] == "1.5"


# -- retry -------------------------------------------------------------------------------------


def test_retry_starts_a_fresh_worktree_and_keeps_the_old_one(fake_repo, cli):
    cli("spawn", "--name", "flaky", "commit:a.txt fail")
    wait_settled(fake_repo)
    run = cli("retry", "flaky")
    assert run.code == 0, run
    assert "retried as flaky-2 on orchestra/flaky-2" in run.out
    wait_settled(fake_repo)
    agents = load_state(fake_repo)["agents"]
    assert (
        agents["flaky"]["state"] == "failed"
        and agents["flaky-2"]["task"] == agents["flaky"]["task"]
    )
    assert agents["flaky-2"]["base_commit"] == agents["flaky"]["base_commit"]
    assert (fake_repo / ".worktrees" / "task-flaky").is_dir() and (
        fake_repo / ".worktrees" / "task-flaky-2"
    ).is_dir()
    done = cli("retry", "flaky-2")
    assert done.code == 0  # it failed too (same task)
    assert (
        cli("retry", "flaky", "--resume-session").code == 2
    )  # the fake agent has no Claude session
    cli("spawn", "--name", "fine", "ok")
    wait_settled(fake_repo)
    refused = cli("retry", "fine")
    assert (
        refused.code == 2
        and "only failed, interrupted or stopped agents and done ones whose checks failed"
        in refused.err
    )


# -- the real claude CLI against the scripted API --------------------------------------------------


@requires_claude
def test_rate_limited_twice_then_done_in_the_same_session(claude_repo, claude_api, cli):
    claude_config(claude_repo, api_backoff=1, api_backoff_max=2)
    claude_api.script("limited-task", [rate_limited(2, bash("echo ok > ok.txt && git add ok.txt && git commit -qm ok")),
                                       text("finished after the limit")])  # fmt: skip
    assert cli("spawn", "--name", "limited", "limited-task").code == 0
    seen = wait_for(
        lambda: load_state(claude_repo)["agents"]["limited"].get("waiting"), 60, 0.05, "a wait"
    )
    assert seen["reason"] == "rate_limit" and seen["attempt"] == 1 and seen["until"].endswith("Z")
    wait_settled(claude_repo, timeout=120)
    record = load_state(claude_repo)["agents"]["limited"]
    assert record["state"] == "done", record
    assert record["result"] == "finished after the limit" and record["waiting"] is None
    assert record["commits"] == 1
    assert claude_api.errors_answered("limited-task") == 2
    waits = log_events(claude_repo, "limited", "waiting")
    assert [(w["reason"], w["attempt"]) for w in waits] == [("rate_limit", 1), ("rate_limit", 2)]
    launches = log_events(claude_repo, "limited", "launch")
    assert [e["resume"] for e in launches] == [False, True, True]
    session = record["session_id"]
    assert all(session in e["argv"] for e in launches[1:])  # "Continue the task." on stdin
    assert not any("Continue the task." in e["argv"] for e in launches)
    logs = cli("logs", "limited").out
    assert "== rate_limit: waiting until" in logs and "(attempt 2)" in logs


@requires_claude
def test_no_new_agent_starts_while_the_account_is_limited(claude_repo, claude_api, cli):
    claude_config(claude_repo, api_backoff=4, api_backoff_max=4)
    claude_api.script("first-limited", [rate_limited(1, text("first done"))])
    claude_api.script("second-task", [text("second done")])
    cli("spawn", "--name", "first", "first-limited")
    wait_state(claude_repo, "first", "waiting")
    cli("spawn", "--name", "second", "second-task")
    status = cli("status")
    assert "Rate-limited until" in status.out and "no new agents start" in status.out
    assert cli("status", "--json").json()["rate_limited_until"]
    time.sleep(2)
    assert agent_states(claude_repo) == {"first": "waiting", "second": "queued"}
    wait_settled(claude_repo, timeout=120)
    agents = load_state(claude_repo)["agents"]
    assert agents["first"]["state"] == "done" and agents["second"]["state"] == "done"
    first_wait = log_events(claude_repo, "first", "waiting")[0]["until"]
    assert agents["second"]["started_at"] >= first_wait[:19]


@requires_claude
def test_overload_storm_is_retried_then_given_up(claude_repo, claude_api, cli, monkeypatch):
    monkeypatch.setenv("CLAUDE_CODE_MAX_RETRIES", "0")  # the CLI gives up at once: orchestra's turn
    claude_config(claude_repo, api_backoff=0.3, api_backoff_max=0.5, api_retries=2)
    claude_api.script("storm-task", [overloaded(100, text("never"))])
    cli("spawn", "--name", "storm", "storm-task")
    wait_settled(claude_repo, timeout=120)
    record = load_state(claude_repo)["agents"]["storm"]
    assert record["state"] == "failed"
    assert "529" in record["error"] and "gave up after 2 API retries" in record["error"]
    assert [w["reason"] for w in log_events(claude_repo, "storm", "waiting")] == ["overloaded"] * 2
    assert len(log_events(claude_repo, "storm", "launch")) == 3


@requires_claude
def test_waiting_agent_survives_a_rebuild_and_resume_retries_at_once(claude_repo, claude_api, cli):
    claude_config(claude_repo, api_backoff=600, api_backoff_max=600)
    claude_api.script("long-wait", [rate_limited(1, text("went on"))])
    cli("spawn", "--name", "patient", "long-wait")
    waiting = wait_for(
        lambda: load_state(claude_repo)["agents"]["patient"].get("waiting"), 60, 0.05, "a wait"
    )
    time.sleep(1)
    assert orchestra.supervisor_alive(
        load_state(claude_repo)
    )  # it does not exit while an agent waits
    (claude_repo / ".orchestra" / "state.json").write_text("{torn")
    record = cli("status", "--json").json()["agents"][0]
    assert record["state"] == "waiting" and record["waiting"]["until"] == waiting["until"]
    assert cli("resume", "patient").code == 0
    wait_settled(claude_repo, timeout=120)
    record = load_state(claude_repo)["agents"]["patient"]
    assert record["state"] == "done" and record["result"] == "went on"


@requires_claude
def test_batch_budget_stops_running_claude_agents(claude_repo, claude_api, cli):
    claude_config(claude_repo, default_parallel=2)
    claude_api.script("cheap-task", [text("cheap done")])
    # a slow stream, then a long command (Claude Code refuses a long standalone `sleep`)
    claude_api.script(
        "slow-task", [slow(bash("python3 -c 'import time; time.sleep(60)'"), 0.2), text("never")]
    )
    claude_api.script("later-task", [text("later done")])
    run = cli("spawn", "--budget", "0.001", "cheap-task", "slow-task", "later-task")
    assert run.code == 0, run
    wait_settled(claude_repo, timeout=120)
    agents = load_state(claude_repo)["agents"]
    # Whichever agent reports usage first spends the budget: under load that may be slow-task's
    # first streamed message, before cheap-task's result. Either way the batch stops at the budget.
    cheap = agents["cheap-task"]
    assert (cheap["state"], cheap["stop_reason"]) in (("done", None), ("stopped", "budget")), cheap
    assert (
        agents["slow-task"]["state"] == "stopped" and agents["slow-task"]["stop_reason"] == "budget"
    )
    assert agents["later-task"]["state"] == "stopped" and agents["later-task"]["started_at"] is None
    assert (claude_repo / ".worktrees" / "task-slow-task").is_dir()


@requires_claude
def test_retry_resume_session_continues_a_failed_claude_agent(claude_repo, claude_api, cli):
    claude_api.script("breaks-once", [error(400, "scripted failure")])
    claude_api.script("Continue the task.", [text("recovered")])
    cli("spawn", "--name", "broke", "breaks-once")
    wait_settled(claude_repo, timeout=120)
    record = load_state(claude_repo)["agents"]["broke"]
    assert (
        record["state"] == "failed" and record["waiting"] is None
    )  # a 400 is not worth waiting out
    run = cli("retry", "broke", "--resume-session")
    assert run.code == 0 and "queued to continue its session" in run.out
    wait_settled(claude_repo, timeout=120)
    after = load_state(claude_repo)["agents"]["broke"]
    assert after["state"] == "done" and after["result"] == "recovered"
    assert after["session_id"] == record["session_id"]


def test_pull_request_body_has_the_check_results():
    report = {"result": "Added it", "diffstat": " a.txt | 1 +", "turns": 3, "cost_usd": 0.1}
    failed = {
        "status": "failed",
        "command": "pytest -q",
        "exit_code": 1,
        "tail": "1 failed",
        "rounds": 1,
    }
    body = orchestra.pull_request_body({**report, "checks": failed})
    assert "Checks: failed: pytest -q (exit 1) after 1 fix round(s)." in body and "1 failed" in body
    passed = {"status": "passed", "command": None, "exit_code": 0, "tail": "", "rounds": 0}
    assert "Checks: passed." in orchestra.pull_request_body({**report, "checks": passed})
    assert "Checks" not in orchestra.pull_request_body({**report, "checks": None})


def test_scripted_api_answers_429_with_headers_then_the_next_step():
    import urllib.error
    import urllib.request

    from scripted_api import ScriptedAPI

    body = {
        "model": "m",
        "stream": False,
        "tools": [],
        "messages": [{"role": "user", "content": "limited-key"}],
    }
    with ScriptedAPI() as api:
        api.script(
            "limited-key", [rate_limited(2, text("through"), retry_after=3600, reset=2000000000)]
        )
        answers = []
        for _ in range(3):
            request = urllib.request.Request(api.url + "/v1/messages", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    answers.append(
                        (response.status, json.loads(response.read())["content"][0]["text"])
                    )
            except urllib.error.HTTPError as e:
                headers = e.headers
                answers.append((e.code, json.loads(e.read())["error"]["type"]))
        assert (
            headers["retry-after"] == "3600"
            and headers["anthropic-ratelimit-unified-reset"] == "2000000000"
        )
        assert answers == [(429, "rate_limit_error"), (429, "rate_limit_error"), (200, "through")]
        assert api.errors_answered("limited-key") == 2
        api.script("busy-key", [overloaded(1, text("ok"))])
        body["messages"][0]["content"] = "busy-key"
        request = urllib.request.Request(api.url + "/v1/messages", data=json.dumps(body).encode())
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=10)
        assert (
            raised.value.code == 529
            and json.loads(raised.value.read())["error"]["type"] == "overloaded_error"
        )


@requires_claude
def test_a_whole_batch_that_hits_the_limit_carries_on_by_itself(claude_repo, claude_api, cli):
    claude_config(claude_repo, api_backoff=1, api_backoff_max=2, default_parallel=3)
    tasks = [f"batch-task-{n}" for n in range(3)]
    for task in tasks:
        claude_api.script(task, [rate_limited(1, text(f"{task} finished"))])
    assert cli("spawn", *tasks).code == 0
    wait_settled(claude_repo, timeout=180)
    agents = load_state(claude_repo)["agents"]
    for task in tasks:
        assert (
            agents[task]["state"] == "done" and agents[task]["result"] == f"{task} finished"
        ), agents[task]
        assert [w["attempt"] for w in log_events(claude_repo, task, "waiting")] == [1]
