"""The cockpit: finishing the job from a phone. Headless Chromium at 390x844 against a real server,
real git and the fast fake agent: attention order, history, review (result, commits, the diff,
checks and denials), every landing action with the CLI's own message, the Sessions tab, and a page
on another local port that must get nothing usable."""

import http.server
import json
import os
import subprocess
import threading
from collections import Counter

import pytest
from playwright.sync_api import expect
from test_dashboard import card, post, serve

import orchestra
from conftest import (
    PHONE,
    add_record,
    commit_file,
    git,
    take_time,
    wait_for,
    wait_settled,
)
from scripted_api import requires_claude, text


def set_fields(project, agent_id, **facts):
    def change(state):
        state["agents"][agent_id].update(facts)

    project.store.update(change)


def spawn_and_settle(server, repo, *tasks):
    ids = [a["id"] for a in post(server, "/api/spawn", {"tasks": list(tasks)})["agents"]]
    wait_settled(repo)
    return ids


def open_detail(page, agent_id):
    card(page, agent_id).locator(".task").click()
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#detail-title")).to_have_text(agent_id)


def detail_action(page, name):
    page.click(f"#detail-actions [data-do={name}]")
    return page.locator("#detail-message")


def card_ids(page):
    return page.eval_on_selector_all("#agents .card", "cards => cards.map(c => c.dataset.id)")


@pytest.fixture
def cockpit(fake_repo, phone):
    server = serve(fake_repo, revive=False)
    phone.server = server
    yield phone
    server.stop()
    assert phone.problems == [] or all("status of 4" in p for p in phone.problems), phone.problems


# ---------------------------------------------------------------------------- attention first


def test_attention_order_history_on_demand_and_totals_as_status(cockpit, fake_repo, project, cli):
    page, server = cockpit, cockpit.server
    older, failed = spawn_and_settle(
        server, fake_repo, "commit:a.txt older finished", "fail on purpose"
    )
    (newer,) = spawn_and_settle(server, fake_repo, "commit:b.txt newer finished")
    for n in range(3):
        add_record(
            project,
            f"old-{n}",
            state="removed",
            created_at=f"2026-01-0{n + 1}T00:00:00Z",
            cost_usd=1.0,
        )
    (runner_id,) = [
        a["id"] for a in post(server, "/api/spawn", {"tasks": ["sleep:60 long runner"]})["agents"]
    ]
    page.goto(server.url)
    runner = card(page, runner_id)
    expect(runner.locator(".badge")).to_have_attribute("data-state", "running", timeout=30_000)
    # failed first, then running, then finished ones newest first; cleaned-up agents are not cards
    assert card_ids(page) == [failed, runner_id, newer, older]
    expect(page.locator("#agents [data-group=trouble] h2")).to_have_text("Failed or stale")

    def totals_as_status():  # a running agent's estimated cost grows: compare one moment's figures
        status = cli("status", "--json").json()
        counts = Counter(a["state"] for a in status["agents"])
        shown = {
            dd.get_attribute("id")[len("total-") :]: dd.text_content()
            for dd in page.locator("#totals dd").all()
        }
        total = sum(a["cost_usd"] or 0 for a in status["agents"])  # the removed agents' $3 are not
        estimated = "~" if any(a.get("cost_estimated") for a in status["agents"]) else ""
        agree = {k: int(v) for k, v in shown.items() if k != "cost" and v != "0"} == dict(counts)
        return (
            status if agree and shown["cost"] == estimated + orchestra.format_cost(total) else None
        )

    status = wait_for(totals_as_status, timeout=30, what="the page's totals to match status")
    assert orchestra.summary_line(status["agents"]) in cli("status").out

    page.click("#history summary")
    history = page.locator("#history-list li")
    expect(history).to_have_count(3)
    assert history.evaluate_all("items => items.map(i => i.dataset.id)") == [
        "old-2",
        "old-1",
        "old-0",
    ]
    expect(page.locator("#history-note")).to_have_text("3 of 3")

    # a new agent from the form: feedback at the form, and its card on top of its group
    page.click("#spawn summary")
    page.fill("textarea[name=tasks]", "sleep:60 fresh runner")
    page.click("#spawn-form button[type=submit]")
    expect(page.locator("#spawn-status")).to_contain_text("Spawned sleep-60-")
    fresh = page.locator("#spawn-status").text_content()[len("Spawned ") :]
    assert fresh not in (runner_id, older, newer, failed)
    expect(page.locator("#agents [data-group=active] .card").first).to_have_attribute(
        "data-id", fresh
    )
    assert card_ids(page)[0] == failed
    cli("stop", runner_id, fresh)


def test_history_pages_through_the_api(server, project):
    for n in range(7):
        add_record(project, f"gone-{n}", state="removed", created_at=f"2026-01-0{n + 1}T00:00:00Z")
    add_record(project, "alive", state="done")
    from test_web import call

    first = call(server, "GET", "/api/history?limit=3").json()
    assert [a["id"] for a in first["agents"]] == ["gone-6", "gone-5", "gone-4"] and first[
        "total"
    ] == 7
    last = call(server, "GET", "/api/history?offset=6&limit=3").json()
    assert [a["id"] for a in last["agents"]] == ["gone-0"]
    assert call(server, "GET", "/api/history?limit=0").status == 400
    assert "gone-0" not in [a["id"] for a in call(server, "GET", "/api/status").json()["agents"]]
    assert call(server, "GET", "/api/agents/gone-3").json()["state"] == "removed"


# ---------------------------------------------------------------------------- review and land


def add_review_material(worktree):
    """A binary file and a long file, committed by 'the agent' on its branch."""
    (worktree / "logo.bin").write_bytes(bytes(range(256)) * 4)
    (worktree / "long.txt").write_text("".join(f"line {n}\n" for n in range(1000)))
    git("add", "logo.bin", "long.txt", cwd=worktree)
    git("commit", "-qm", "add a logo and a long file", cwd=worktree)


def test_review_then_merge_and_a_refused_merge_from_the_phone(cockpit, fake_repo, project):
    page, server = cockpit, cockpit.server
    (agent_id,) = spawn_and_settle(server, fake_repo, "commit:notes.txt write notes")
    record = project.records()[agent_id]
    add_review_material(orchestra.Path(record["worktree"]))
    set_fields(project, agent_id, checks={"status": "passed", "command": "pytest -q", "exit_code": 0,
                                          "tail": "12 passed", "rounds": 1},
               permission_denials=[{"tool_name": "Bash", "tool_input": {"command": "make deploy"}}])  # fmt: skip
    page.goto(server.url)
    open_detail(page, agent_id)
    expect(page.locator("#detail-result")).to_have_text("all done")
    expect(page.locator("#detail-commits li")).to_have_count(2)
    expect(page.locator("#detail-commits")).to_contain_text("add notes.txt")
    expect(page.locator("#detail-checks strong")).to_have_text("passed: pytest -q")
    expect(page.locator("#detail-checks")).to_contain_text("12 passed")
    expect(page.locator("#detail-denials strong")).to_have_text("Bash")
    expect(page.locator("#detail-denials")).to_contain_text("make deploy")
    files = page.locator("#detail-diff details.diff-file")
    expect(files).to_have_count(3)
    logo = files.filter(has_text="logo.bin")
    expect(logo.locator("summary")).to_contain_text("binary file")
    long_file = files.filter(has_text="long.txt")
    expect(long_file.locator("summary")).to_contain_text("+1000")
    long_file.locator("summary").click()
    expect(long_file.locator("pre span")).to_have_count(400)  # paged
    long_file.locator("button").click()
    expect(long_file.locator("pre span")).to_have_count(800)
    added = long_file.locator("pre span.add").first
    assert added.evaluate("e => getComputedStyle(e).color") != added.evaluate(
        "e => getComputedStyle(e.parentElement).color"
    )  # coloured
    expect(files.first).to_have_attribute(
        "open", ""
    )  # the first file is open, the others collapsed
    assert files.filter(has_text="notes.txt").get_attribute("open") is None
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]

    # refused: the user's checkout has uncommitted changes; the CLI's words, nothing merged
    (fake_repo / "README.md").write_text("# edited by hand\n")
    message = detail_action(page, "merge")
    expect(message).to_have_attribute("data-kind", "error")
    expect(message).to_contain_text("has uncommitted changes; commit or stash them before merging")
    assert "Merge" not in git("log", "--oneline", "-1", cwd=fake_repo)

    git("checkout", "README.md", cwd=fake_repo)
    message = detail_action(page, "merge")
    expect(message).to_have_attribute("data-kind", "ok")
    expect(message).to_contain_text(f"Merged: {agent_id}")
    assert f"Land orchestra/{agent_id}" in git("log", "--oneline", "-1", cwd=fake_repo)
    assert git("status", "--porcelain", "--untracked-files=no", cwd=fake_repo) == ""
    assert (fake_repo / "long.txt").exists()

    message = detail_action(page, "pr")
    expect(message).to_contain_text("cannot open pull requests: no git remote is configured")
    expect(message).to_contain_text(f"git push -u <remote> orchestra/{agent_id}")

    # cleanup of this one agent: the plan first, then applied; it moves to history
    message = detail_action(page, "cleanup")
    expect(message).to_contain_text(f"WOULD REMOVE {agent_id}")
    assert (orchestra.Path(record["worktree"])).exists()
    message = detail_action(page, "cleanup-apply")
    expect(message).to_contain_text(f"REMOVED {agent_id}")
    assert not orchestra.Path(record["worktree"]).exists()
    page.click("#detail-close")
    expect(card(page, agent_id)).to_have_count(0, timeout=10_000)
    page.click("#history summary")
    expect(page.locator(f'#history-list li[data-id="{agent_id}"]')).to_be_visible()


def test_a_merge_conflict_is_shown_and_the_checkout_left_as_it_was(cockpit, fake_repo):
    page, server = cockpit, cockpit.server
    (agent_id,) = spawn_and_settle(server, fake_repo, "commit:README.md rewrite the readme")
    (fake_repo / "README.md").write_text("# changed on main\n")
    git("commit", "-qam", "main changes the readme", cwd=fake_repo)
    page.goto(server.url)
    open_detail(page, agent_id)
    message = detail_action(page, "merge")
    expect(message).to_have_attribute("data-kind", "error")
    expect(message).to_contain_text(f"Not merged: {agent_id}: conflicts with main in README.md")
    assert git("status", "--porcelain", cwd=fake_repo) == ""


@requires_claude
def stub_gh(folder, monkeypatch):
    """A `gh` first on the server's PATH that records its arguments (one a line) and prints a PR URL."""
    calls, stub = folder / "gh-calls", folder / "bin" / "gh"
    stub.parent.mkdir()
    stub.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {calls}\necho https://example.invalid/pull/7\n'
    )
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_open_pr_pushes_and_shows_the_url_from_the_phone(
    cockpit, fake_repo, project, tmp_path, monkeypatch
):
    page, server = cockpit, cockpit.server
    remote = tmp_path / "remote.git"
    git("init", "-q", "--bare", str(remote), cwd=tmp_path)
    git("remote", "add", "origin", str(remote), cwd=fake_repo)
    calls = stub_gh(tmp_path, monkeypatch)
    (agent_id,) = spawn_and_settle(server, fake_repo, "commit:pr.txt open a pull request")
    set_fields(project, agent_id, checks={"status": "passed", "command": "pytest -q", "exit_code": 0,
                                          "tail": "3 passed", "rounds": 1})  # fmt: skip
    branch = f"orchestra/{agent_id}"
    assert git("ls-remote", "--heads", str(remote), cwd=fake_repo) == ""
    page.goto(server.url)
    open_detail(page, agent_id)
    message = detail_action(page, "pr")
    expect(message).to_have_attribute("data-kind", "ok")
    expect(message).to_have_text(f"{agent_id}: https://example.invalid/pull/7")
    assert git("rev-parse", branch, cwd=remote) == git("rev-parse", branch, cwd=fake_repo)
    args = calls.read_text().split("\n")
    assert args[:6] == [
        "pr",
        "create",
        "--head",
        branch,
        "--title",
        "commit:pr.txt open a pull request",
    ]
    assert args[6] == "--body"
    body = "\n".join(args[7:])
    assert body.startswith("all done") and "pr.txt" in body  # the agent's result, then its diffstat
    assert "Checks: passed after 1 fix round(s)." in body


def test_follow_up_and_resume_with_real_claude_agents(claude_repo, claude_api, phone):
    claude_api.script("cockpit-one", [commit_file("one.txt", "one"), text("one finished")])
    claude_api.script("cockpit-two", [commit_file("two.txt", "two"), text("two finished")])
    claude_api.script("cockpit-slow", [take_time(30), text("slow finished")])
    server = serve(claude_repo)
    try:
        done = post(server, "/api/spawn", {"tasks": ["cockpit-one: write one"]})["agents"][0]["id"]
        slow = post(server, "/api/spawn", {"tasks": ["cockpit-slow: take your time"]})["agents"][0][
            "id"
        ]
        phone.goto(server.url)
        expect(card(phone, done).locator(".badge")).to_have_attribute(
            "data-state", "done", timeout=90_000
        )
        open_detail(phone, done)
        phone.fill("#send-form textarea", "cockpit-two: now write two")
        phone.click("#send-form button[type=submit]")
        expect(phone.locator("#detail-message")).to_have_text(
            f"{done}: queued to continue with your message\nfollow it with: orchestra logs -f {done}"
        )
        phone.click("#detail-close")
        expect(card(phone, done).locator(".facts")).to_contain_text("2 commits", timeout=90_000)
        expect(card(phone, done).locator(".badge")).to_have_attribute(
            "data-state", "done", timeout=90_000
        )

        expect(card(phone, slow).locator(".activity")).to_contain_text("Bash", timeout=60_000)
        open_detail(phone, slow)
        expect(detail_action(phone, "stop")).to_have_text(
            f"{slow}: stopped (worktree and branch kept)"
        )
        expect(phone.locator("#detail-badge")).to_have_text("stopped", timeout=10_000)
        expect(phone.locator("#detail-actions [data-do=resume]")).to_be_visible()
        expect(detail_action(phone, "resume")).to_have_text(f"{slow}: queued to resume its session")
        expect(phone.locator("#detail-badge")).not_to_have_text("stopped", timeout=30_000)
        phone.click("#detail-close")
        assert phone.problems == []
    finally:
        server.stop()
    wait_settled(claude_repo, timeout=120)


def test_retry_stop_and_refusals_from_the_phone(cockpit, fake_repo, project):
    page, server = cockpit, cockpit.server
    done, failed = spawn_and_settle(
        server, fake_repo, "commit:one.txt first part", "fail on purpose"
    )
    (runner,) = [
        a["id"] for a in post(server, "/api/spawn", {"tasks": ["sleep:60 keeps going"]})["agents"]
    ]
    page.goto(server.url)
    expect(card(page, runner).locator(".badge")).to_have_attribute("data-state", "running",
                                                                                    timeout=30_000)  # fmt: skip
    open_detail(page, done)
    page.fill("#send-form textarea", "commit:two.txt second part")
    page.click("#send-form button[type=submit]")
    message = page.locator(
        "#detail-message"
    )  # the fake agent has no Claude session: the CLI's refusal
    expect(message).to_have_attribute("data-kind", "error")
    expect(message).to_have_text(f"{done} has no Claude session to continue; spawn its task again")
    page.click("#detail-close")

    open_detail(page, failed)
    expect(page.locator("#detail-actions [data-do=resume]")).to_have_text("Retry")
    expect(page.locator("#detail-actions [data-do=merge]")).to_be_visible()
    expect(detail_action(page, "resume")).to_have_text(
        f"{failed} has no Claude session to continue; spawn its task again"
    )
    page.click("#detail-close")

    open_detail(page, runner)
    expect(page.locator("#detail-actions [data-do=merge]")).to_be_hidden()
    expect(page.locator("#send-form")).to_be_visible()  # a running agent gets it when its turn ends
    expect(detail_action(page, "stop")).to_have_text(
        f"{runner}: stopped (worktree and branch kept)"
    )
    expect(page.locator("#detail-badge")).to_have_text("stopped", timeout=10_000)
    page.click("#detail-close")
    wait_settled(fake_repo)


def test_errors_from_actions_are_shown_never_swallowed(cockpit, fake_repo, project):
    page, server = cockpit, cockpit.server
    (agent_id,) = spawn_and_settle(server, fake_repo, "commit:x.txt something")
    page.goto(server.url)
    open_detail(page, agent_id)
    set_fields(project, agent_id, state="done")
    page.fill("#send-form textarea", "x" * 9000)
    page.click("#send-form button[type=submit]")
    expect(page.locator("#detail-message")).to_have_attribute("data-kind", "error")
    expect(page.locator("#detail-message")).to_contain_text("over the limit of 8000")


# ---------------------------------------------------------------------------- sessions


def test_sessions_tab_shows_prompts_and_the_resume_command(
    cockpit, fake_repo, tmp_path, monkeypatch
):
    page, server = cockpit, cockpit.server
    store = tmp_path / "claude" / "projects" / "-work-app"
    store.mkdir(parents=True)
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(tmp_path / "claude"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    session_id = "00000001-0000-4000-8000-000000000001"
    lines = [{"type": "user", "message": {"role": "user", "content": text}, "cwd": str(fake_repo),
              "sessionId": session_id, "uuid": f"u{n}"} for n, text in enumerate(["fix the login bug",
                                                                                 "now add a test \u202eevil"])]  # fmt: skip
    (store / f"{session_id}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    server.env = dict(os.environ)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto(server.url)
    page.click("#tab-sessions")
    page.click(f'#sessions li[data-id="{session_id}"]')
    expect(page.locator("#session-prompts li")).to_have_count(2)
    expect(page.locator("#session-prompts li").first).to_have_text("fix the login bug")
    expect(page.locator("#session-prompts li").last).to_have_text(
        "now add a test evil"
    )  # no bidi override
    expect(page.locator("#session-resume")).to_have_text(
        f"cd {fake_repo} && claude --resume {session_id}"
    )
    page.click("#session-copy")
    expect(page.locator("#session-note")).not_to_have_text("")


# ---------------------------------------------------------------------------- agent text and the token


def test_agent_text_cannot_steer_the_page(cockpit, fake_repo, project):
    page, server = cockpit, cockpit.server
    add_record(project, "tricky", state="done", task="<b>bold</b> \u202eexe.txt", activity="a\u2066b\u2069c\x1b[31m",
               result="half \ud83d emoji", created_at=orchestra.utc_iso())  # fmt: skip
    page.goto(server.url)
    tricky = card(page, "tricky")
    expect(tricky.locator(".task")).to_have_text("<b>bold</b> exe.txt")
    expect(tricky.locator(".activity")).to_have_text("abc[31m")
    assert page.locator("main b").count() == 0


EVIL_PAGE = """<!doctype html><script>
(async () => {
  const target = "http://127.0.0.1:%d";
  const result = {cookie: document.cookie, storage: JSON.stringify(localStorage), answers: []};
  for (const [path, init] of [["/api/status", {credentials: "include"}],
                              ["/api/spawn", {method: "POST", credentials: "include", body: '{"tasks": ["evil"]}'}],
                              ["/api/spawn", {method: "POST", mode: "no-cors", credentials: "include",
                                             headers: {"Content-Type": "text/plain"}, body: '{"tasks": ["evil"]}'}]]) {
    try { const r = await fetch(target + path, init); result.answers.push(r.status + " " + r.type); }
    catch (e) { result.answers.push("refused"); }
  }
  window.result = result;
})();
</script>"""


def test_a_page_on_another_local_port_gets_nothing_usable(browser, fake_repo):
    server = serve(fake_repo, revive=False)
    context = browser.new_context(
        viewport=PHONE
    )  # one browser profile: cookies of 127.0.0.1 are shared
    page = context.new_page()
    page.goto(server.url)  # the user opens the dashboard: the token is stored by the page
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    assert page.evaluate("sessionStorage.getItem('orchestra-token')") == server.gate.token.decode()
    assert page.evaluate("localStorage.length") == 0  # never localStorage: it outlives the server
    assert page.evaluate("document.cookie") == ""

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = (EVIL_PAGE % server.server_address[1]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    evil = http.server.HTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    other = context.new_page()
    try:
        other.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
        other.wait_for_function("window.result !== undefined")
        result = other.evaluate("window.result")
        assert server.gate.token.decode() not in json.dumps(result)
        assert result["cookie"] == "" and result["storage"] == "{}"
        assert all(
            a == "refused" or a.startswith(("401", "403", "0 opaque")) for a in result["answers"]
        ), result
        assert not any(a.startswith("2") for a in result["answers"])
    finally:
        context.close()
        evil.shutdown()
        server.stop()
    assert "evil" not in json.dumps(orchestra.Project.open(fake_repo, os.environ).records())


def test_the_cli_refuses_the_same_tasks(fake_repo):
    done = subprocess.run([orchestra.sys.executable, str(orchestra.Path(orchestra.__file__)), "spawn", "bell \x07"],
                          cwd=fake_repo, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "U+0007" in done.stderr


def test_the_detail_in_dark_and_light_mode(browser, fake_repo):
    server = serve(fake_repo, revive=False)
    try:
        (agent_id,) = spawn_and_settle(server, fake_repo, "commit:notes.txt write notes")
        colours = {}
        for scheme in ("light", "dark"):
            page = browser.new_page(viewport=PHONE, color_scheme=scheme)
            page.goto(server.url)
            open_detail(page, agent_id)
            expect(page.locator("#detail-diff details.diff-file")).to_have_count(1)
            colours[scheme] = page.evaluate("""() => [
                getComputedStyle(document.getElementById("detail")).backgroundColor,
                getComputedStyle(document.querySelector(".diff-file")).backgroundColor,
                getComputedStyle(document.querySelector(".diff-file .add")).color]""")
            assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            page.close()
        assert (
            colours["dark"][0] == "rgb(13, 17, 23)" and colours["light"][0] == "rgb(245, 246, 248)"
        )
        assert (
            colours["dark"][1] != colours["light"][1] and colours["dark"][2] != colours["light"][2]
        )
    finally:
        server.stop()
