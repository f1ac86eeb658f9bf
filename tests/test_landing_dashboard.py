"""Landing from a phone: headless Chromium at 390x844 against a real server and real git."""

import json

from playwright.sync_api import expect
from test_dashboard import card, serve

import orchestra
from conftest import (
    CLAUDE_TOOLS,
    FAKE_AGENT_COMMAND,
    git,
    load_state,
    wait_for,
    wait_settled,
    write_config,
)
from scripted_api import bash, requires_claude, text


def open_detail(page, agent_id):
    card(page, agent_id).locator(".task").click()
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#detail-title")).to_have_text(agent_id)


def test_land_is_primary_and_guards_a_failed_agent(fake_repo, phone):
    write_config(
        fake_repo,
        agent_command=FAKE_AGENT_COMMAND,
        heartbeat_interval=0.5,
        checks=["test -f good.txt"],
    )
    orchestra.main(
        ["spawn", "--name", "good", "commit:good.txt", "--name", "bad", "commit:bad.txt"]
    )
    wait_settled(fake_repo)
    server = serve(fake_repo, revive=False)
    try:
        phone.goto(server.url)
        open_detail(phone, "bad")
        land = phone.locator("#detail-actions [data-do=land]")
        expect(land).to_have_class("primary")
        land.click()
        message = phone.locator("#detail-message")
        expect(message).to_have_text(
            "bad's checks failed: test -f good.txt (exit 1); land it anyway?"
        )
        expect(phone.locator("#detail-actions [data-do=land-anyway]")).to_be_visible()
        assert not (fake_repo / "bad.txt").exists()
        phone.click("#detail-close")

        open_detail(phone, "good")
        phone.click("#detail-actions [data-do=land]")
        expect(message).to_contain_text("good: landed on main at ", timeout=20_000)
        assert (fake_repo / "good.txt").exists()
        phone.click("#detail-close")
        landed = phone.locator('[data-group="landed"]')
        expect(landed.locator('.card[data-id="good"]')).to_be_visible(timeout=10_000)
        expect(landed.locator("h2")).to_have_text("Landed")
        expect(card(phone, "good").locator(".checks")).to_contain_text("landed on main at ")

        open_detail(phone, "bad")
        phone.click("#detail-actions [data-do=land]")
        phone.click("#detail-actions [data-do=land-anyway]")
        expect(message).to_contain_text("bad: landed on main", timeout=20_000)
        assert (fake_repo / "bad.txt").exists()
        assert phone.problems == [] or all(
            "status of 409" in p for p in phone.problems
        ), phone.problems
    finally:
        server.stop()


@requires_claude
def test_line_comments_reach_the_agent_as_one_follow_up(claude_repo, claude_api, phone):
    claude_api.script("write-greeting", [bash("printf 'hello\\nworld\\n' > greet.txt && git add greet.txt && "
                                              "git commit -qm greet"), text("Wrote it")])  # fmt: skip
    claude_api.script("Review comments on your diff", [text("Will do")])
    write_config(
        claude_repo, sandbox="off", bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5
    )
    orchestra.main(["spawn", "--name", "greeter", "write-greeting"])
    wait_settled(claude_repo, timeout=120)
    server = serve(claude_repo)
    try:
        phone.goto(server.url)
        open_detail(phone, "greeter")
        line = phone.locator('#detail-diff span[data-file="greet.txt"][data-line="2"]')
        expect(line).to_have_text("+world\n")
        line.click()
        phone.fill("#detail-diff .comment input", "say 'everyone' instead")
        phone.click("#detail-diff .comment button")
        phone.locator('#detail-diff span[data-file="greet.txt"][data-line="1"]').click()
        phone.fill("#detail-diff .comment input", "capitalise it")
        phone.click("#detail-diff .comment button")
        expect(phone.locator("#comment-list li")).to_have_count(2)
        phone.click("#comments-send")
        expect(phone.locator("#detail-message")).to_contain_text("greeter: queued to continue")
        wait_for(lambda: any("Review comments on your diff" in json.dumps(b) for b in claude_api.main_requests),
                 timeout=120, what="the follow-up to reach the agent")  # fmt: skip
        request = next(
            b for b in claude_api.main_requests if "Review comments on your diff" in json.dumps(b)
        )
        sent = json.dumps(request)
        assert "greet.txt:2 (`+world`): say 'everyone' instead" in sent
        assert "greet.txt:1 (`+hello`): capitalise it" in sent
        assert (
            sum("Review comments on your diff" in json.dumps(b) for b in claude_api.main_requests)
            == 1
        )
        wait_for(lambda: load_state(claude_repo)["agents"]["greeter"]["state"] == "done", timeout=120,
                 what="the agent to finish its follow-up")  # fmt: skip
        assert git("log", "-1", "--format=%s", "orchestra/greeter", cwd=claude_repo) == "greet\n"
    finally:
        server.stop()


def test_spawn_after_from_the_api_refuses_unknown_ids_and_cycles(fake_repo):
    from test_web import call

    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, heartbeat_interval=0.5)
    orchestra.main(["spawn", "--name", "lib", "commit:lib.txt"])
    wait_settled(fake_repo)
    server = serve(fake_repo, revive=False)
    try:
        refused = {
            "unknown": ({"tasks": ["x"], "after": ["nope"]}, "--after nope: no agent 'nope'"),
            "self": (
                {"tasks": ["x"], "name": "me", "after": ["me"]},
                "task 'me' cannot wait for itself",
            ),
            "not ids": ({"tasks": ["x"], "after": "lib"}, "'after' must be list"),
            "empty id": ({"tasks": ["x"], "after": [" "]}, "'after' must be a list of agent ids"),
        }
        for body, words in refused.values():
            answer = call(server, "POST", "/api/spawn", body)
            assert answer.status == 400 and words in answer.json()["error"], answer
        assert list(load_state(fake_repo)["agents"]) == ["lib"]  # nothing was queued
        answer = call(server, "POST", "/api/spawn", {"tasks": ["commit:use.txt"], "after": ["li"]})
        assert answer.status == 201, answer
        (agent,) = answer.json()["agents"]
        assert agent["after"] == ["lib"] and agent["waits_for"] == ["lib"]
    finally:
        server.stop()


def test_spawn_form_takes_after_and_shows_its_errors(fake_repo, phone):
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, heartbeat_interval=0.5)
    orchestra.main(["spawn", "--name", "lib", "commit:lib.txt"])
    wait_settled(fake_repo)
    server = serve(fake_repo, revive=False)
    try:
        phone.goto(server.url)
        phone.click("#spawn summary")
        phone.fill("textarea[name=tasks]", "commit:user.txt use the lib")
        phone.fill("input[name=after]", "nope")
        phone.click("#spawn-form button[type=submit]")
        error = phone.locator("#spawn-error")
        expect(error).to_have_text("--after nope: no agent 'nope'; 'orchestra status' lists them")
        assert list(load_state(fake_repo)["agents"]) == ["lib"]
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390

        phone.fill("input[name=after]", "lib")  # the tasks are kept after a refusal
        phone.click("#spawn-form button[type=submit]")
        expect(phone.locator("#spawn-status")).to_contain_text("Spawned commit-user-txt")
        expect(error).to_be_hidden()
        expect(card(phone, "commit-user-txt")).to_contain_text(
            "waits for lib to land", timeout=10_000
        )
        record = load_state(fake_repo)["agents"]["commit-user-txt"]
        assert record["state"] == "queued" and record["waits_for"] == ["lib"]

        assert orchestra.main(["land", "lib"]) == 0  # it lands: its dependent starts from main
        wait_for(
            lambda: load_state(fake_repo)["agents"]["commit-user-txt"]["state"] == "done",
            timeout=60,
            what="the dependent to run once lib landed",
        )
        worktree = orchestra.Path(load_state(fake_repo)["agents"]["commit-user-txt"]["worktree"])
        assert (worktree / "lib.txt").exists() and (worktree / "user.txt").exists()
        assert phone.problems == [] or all(
            "status of 400" in p for p in phone.problems
        ), phone.problems
    finally:
        server.stop()
