"""The dashboard in headless Chromium (Debian's, driven by Playwright) on a phone-sized viewport,
with real `claude` agents against the scripted API, and with the fast fake agent."""

import http.client
import io
import json
import os
import shutil
from pathlib import Path

from playwright.sync_api import expect

import orchestra
from conftest import (
    PHONE,
    commit_file,
    load_state,
    process_state,
    take_time,
    wait_settled,
)
from scripted_api import requires_claude, text

SCREENSHOT = Path(
    "/tmp/orchestra-dashboard.png"
)  # a stable place to look at the last run's phone view
XSS = "<img src=x onerror=alert(1)>"


# Records every state each card's badge shows, so a test can tell running -> done happened live.
WATCH_STATES = """() => {
  window.seenStates = {};
  window.sameDocument = true;
  const record = () => {
    for (const card of document.querySelectorAll(".card")) {
      const seen = (window.seenStates[card.dataset.id] ||= []);
      const state = card.querySelector(".badge").dataset.state;
      if (seen[seen.length - 1] !== state) seen.push(state);
    }
  };
  record();
  new MutationObserver(record).observe(document.getElementById("agents"),
    {subtree: true, childList: true, attributes: true, attributeFilter: ["data-state"]});
}"""


def serve(repo, **options):
    project = orchestra.Project.open(repo, os.environ)
    return orchestra.start_web_server(project, "127.0.0.1", 0, log=io.StringIO(), **options)


def post(server, path, body):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    connection.request("POST", path, body=json.dumps(body), headers={
        "Authorization": f"Bearer {server.gate.token.decode()}", "Content-Type": "application/json"})  # fmt: skip
    response = connection.getresponse()
    assert response.status in (200, 201), response.read()
    return json.loads(response.read())


def card(page, agent_id):
    return page.locator(f'.card[data-id="{agent_id}"]')


@requires_claude
def test_phone_dashboard_with_real_agents(claude_repo, claude_api, phone, tmp_path):
    claude_api.script("web-alpha", [commit_file("alpha.txt", "alpha"), text("alpha finished")])
    claude_api.script(
        "web-beta", [take_time(5), commit_file("beta.txt", "beta"), text("beta finished")]
    )
    server = serve(claude_repo)
    try:
        # An agent already exists when the page opens: one whose task is an HTML injection attempt.
        post(server, "/api/spawn", {"tasks": [XSS]})
        phone.goto(server.url)
        expect(phone.locator("#connection")).to_have_attribute("data-state", "live")
        assert phone.url == server.url.split("#")[0]  # the token left the address bar
        phone.evaluate(WATCH_STATES)
        injected = card(phone, "img-src-x")
        expect(injected.locator(".task")).to_have_text(XSS)
        assert phone.locator("main img").count() == 0

        phone.click("#spawn summary")
        phone.fill("textarea[name=tasks]", "web-alpha: write alpha\nweb-beta: write beta slowly")
        phone.fill("input[name=parallel]", "3")
        phone.click("#spawn-form button[type=submit]")
        alpha, beta = card(phone, "web-alpha-write"), card(phone, "web-beta-write")
        expect(beta.locator(".activity")).to_contain_text("Bash: python3 -c", timeout=60_000)

        beta.locator("button[data-action=pause]").click()
        expect(beta.locator(".badge")).to_have_attribute("data-state", "paused")
        expect(beta.locator("button[data-action=resume]")).to_be_visible()
        expect(beta.locator("button[data-action=pause]")).to_be_hidden()
        assert process_state(load_state(claude_repo)["agents"]["web-beta-write"]["pid"]) == "T"
        beta.locator("button[data-action=resume]").click()
        expect(beta.locator(".badge")).to_have_attribute("data-state", "running")

        for agent in (alpha, beta, injected):
            expect(agent.locator(".badge")).to_have_attribute("data-state", "done", timeout=90_000)
        seen = phone.evaluate("window.seenStates")
        for agent_id in ("web-alpha-write", "web-beta-write"):
            states = seen[agent_id]
            assert "running" in states and states[-1] == "done", states
            assert states.index("running") < states.index("done")
        assert seen["web-beta-write"].count("paused") == 1
        assert phone.evaluate("window.sameDocument") is True  # all of it live, without a reload
        expect(phone.locator("#total-done")).to_have_text("3")
        expect(beta.locator(".facts")).to_contain_text("1 commit")
        expect(phone.locator("#total-cost")).not_to_have_text("$0.00")

        beta.locator(".task").click()  # tap the card
        expect(phone.locator("#detail")).to_be_visible()
        expect(phone.locator("#detail-log")).to_contain_text("-> Bash: python3 -c")
        expect(phone.locator("#detail-log")).to_contain_text("beta finished")
        expect(phone.locator("#detail-diff")).to_contain_text("beta.txt | 1 +")
        phone.screenshot(path=str(tmp_path / "dashboard-phone-log.png"))
        phone.click("#detail-close")
        expect(phone.locator("#detail")).to_be_hidden()

        assert (
            phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        )  # nothing sideways
        phone.screenshot(path=str(tmp_path / "dashboard-phone.png"), full_page=True)
        shutil.copyfile(tmp_path / "dashboard-phone.png", SCREENSHOT)
        assert phone.problems == []
    finally:
        server.stop()
    wait_settled(claude_repo)


def test_without_a_token_the_page_says_what_to_do(fake_repo, phone):
    server = serve(fake_repo, revive=False)
    try:
        phone.goto(server.url.split("#")[0])
        expect(phone.locator("#no-token")).to_be_visible()
        expect(phone.locator("#connection")).to_have_text("no token")
        assert phone.problems == []
    finally:
        server.stop()


# Stands in for the browser's Notification so a test can see what the page would show.
RECORD_NOTIFICATIONS = """
window.shown = [];
window.Notification = class { constructor(title, options) { window.shown.push([title, options.body]); } };
window.Notification.permission = "granted";
window.Notification.requestPermission = async () => "granted";
"""


def test_tabs_notifications_reconnect_and_errors_on_a_phone(fake_repo, phone):
    server = serve(fake_repo, revive=False)
    try:
        phone.add_init_script(RECORD_NOTIFICATIONS)
        phone.goto(server.url)
        phone.check("#notify")
        post(server, "/api/spawn", {"tasks": ["sleep:1 commit:notes.txt take notes"]})
        badge = card(phone, "sleep-1-commit").locator(".badge")
        expect(badge).to_have_attribute("data-state", "running", timeout=30_000)
        expect(badge).to_have_attribute("data-state", "done", timeout=30_000)
        assert phone.evaluate("window.shown") == [["sleep-1-commit: done", "all done"]]

        phone.click("#tab-worktrees")
        expect(phone.locator("#worktrees-view")).to_be_visible()
        expect(phone.locator("#agents-view")).to_be_hidden()
        expect(phone.locator("#worktrees")).to_contain_text("sleep-1-commit")
        phone.click("#cleanup-preview")
        plan = phone.locator("#cleanup-plan li")
        expect(plan.locator("strong")).to_have_text("keep sleep-1-commit")
        expect(plan).to_contain_text("1 commit not merged into main")
        phone.click("#tab-sessions")
        expect(phone.locator("#sessions-note")).to_have_text("No sessions in the last day.")
        phone.click("#tab-agents")

        phone.click("#spawn summary")
        phone.fill("textarea[name=tasks]", "x" * 9000)
        phone.click("#spawn-form button[type=submit]")
        expect(phone.locator("#spawn-error")).to_contain_text("over the limit of 8000")

        # The server goes away and comes back on the same port with a new token: the page
        # finds that out by the challenge (before it sends its old token) and says what to do.
        port = server.server_address[1]
        server.stop()
        expect(phone.locator("#connection")).to_have_attribute("data-state", "offline")
        server = orchestra.start_web_server(orchestra.Project.open(fake_repo, os.environ), "127.0.0.1", port,
                                      log=io.StringIO(), revive=False)  # fmt: skip
        expect(phone.locator("#connection")).to_have_text("token not recognised", timeout=15_000)
        expect(phone.locator("#no-token")).to_contain_text("open the new link")
        phone.goto(server.url)
        expect(phone.locator("#connection")).to_have_attribute("data-state", "live", timeout=15_000)
        expected = (
            "WebSocket",
            "status of 400",
        )  # the refused spawn, and the reconnection attempts
        assert [p for p in phone.problems if not any(e in p for e in expected)] == []
    finally:
        server.stop()


def test_dark_mode_at_360_pixels(fake_repo, browser, tmp_path):
    server = serve(fake_repo, revive=False)
    page = browser.new_page(viewport={"width": 360, "height": 740}, color_scheme="dark")
    try:
        post(
            server,
            "/api/spawn",
            {"tasks": ["a task with a rather long description " * 6, "fail on purpose"]},
        )
        wait_settled(fake_repo)
        page.goto(server.url)
        expect(card(page, "fail-purpose").locator(".badge")).to_have_attribute(
            "data-state", "failed"
        )
        expect(card(page, "fail-purpose").locator(".error")).to_have_text("it broke")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(13, 17, 23)"  # the dark palette
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        page.screenshot(path=str(tmp_path / "dashboard-dark-360.png"), full_page=True)
        shutil.copyfile(
            tmp_path / "dashboard-dark-360.png",
            SCREENSHOT.with_name("orchestra-dashboard-dark.png"),
        )
    finally:
        page.close()
        server.stop()
