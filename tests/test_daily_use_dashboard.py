"""Daily use on the phone (Chromium at 390x844): done ✗ is red, check output keeps its lines, a
finished agent says "no commits", sessions show ages and short ids, one task may span lines."""

import json
import os

import pytest
from playwright.sync_api import expect
from test_cockpit import open_detail, spawn_and_settle
from test_dashboard import card, serve

from conftest import write_config

RED = "rgb(207, 34, 46)"


@pytest.fixture
def page(fake_repo, phone):
    server = serve(fake_repo, revive=False)
    phone.server = server
    yield phone
    server.stop()
    assert phone.problems == [], phone.problems


def background(locator):
    return locator.evaluate("e => getComputedStyle(e).backgroundColor")


@pytest.fixture
def checked_repo(fake_repo):
    """The fake repository with a check that fails after printing two lines."""
    config = json.loads((fake_repo / ".orchestra" / "config.json").read_text())
    write_config(fake_repo, **config, checks=["printf 'first line\\nsecond line\\n'; exit 1"])
    return fake_repo


def test_failed_checks_are_red_with_their_output_on_lines(checked_repo, page, fake_repo):
    (agent,) = spawn_and_settle(page.server, fake_repo, "commit:a.txt add a")
    page.goto(page.server.url)
    badge = card(page, agent).locator(".badge")
    expect(badge).to_have_text("done ✗")
    bad = page.evaluate("getComputedStyle(document.documentElement).getPropertyValue('--bad')")
    good = page.evaluate("getComputedStyle(document.documentElement).getPropertyValue('--good')")
    assert bad.strip() != good.strip()
    red = page.evaluate(f"(() => {{ const e = document.createElement('i'); e.style.color = '{bad.strip()}'; document.body.append(e); return getComputedStyle(e).color; }})()")  # fmt: skip
    assert background(badge) == red
    open_detail(page, agent)
    expect(page.locator("#detail-badge")).to_have_text("done ✗")
    assert background(page.locator("#detail-badge")) == red
    output = page.locator("#detail-checks li .muted")
    expect(output).to_contain_text("first line\nsecond line")
    lines = output.evaluate("e => e.getClientRects().length && e.offsetHeight")
    assert lines > 3 * 12  # one line per field and per output line, not one long run


def test_a_finished_agent_without_commits_says_no_commits(page, fake_repo):
    (agent,) = spawn_and_settle(page.server, fake_repo, "think it over")
    page.goto(page.server.url)
    open_detail(page, agent)
    expect(page.locator("#detail-commits li")).to_have_text("no commits")


def test_sessions_show_ages_and_short_ids(page, fake_repo, tmp_path, monkeypatch):
    store = tmp_path / "claude" / "projects" / "-work-app"
    store.mkdir(parents=True)
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(tmp_path / "claude"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    session_id = "3f2a9c1e-0000-4000-8000-000000000001"
    line = {"type": "user", "message": {"role": "user", "content": "fix the login bug"},
            "cwd": str(fake_repo), "sessionId": session_id, "uuid": "u1"}  # fmt: skip
    path = store / f"{session_id}.jsonl"
    path.write_text(json.dumps(line) + "\n")
    old = os.stat(path).st_mtime - 3 * 3600 - 60
    os.utime(path, (old, old))
    page.server.env = dict(os.environ)
    page.goto(page.server.url)
    page.click("#tab-sessions")
    details = page.locator(f'#sessions li[data-id="{session_id}"] .muted')
    expect(details).to_contain_text("3f2a9c1e · 3h ago · ")
    assert session_id not in details.text_content()


def test_one_task_may_span_several_lines(page, fake_repo):
    page.goto(page.server.url)
    page.click("#spawn summary")
    page.fill("textarea[name=tasks]", "commit:notes.txt write notes\nthen read them twice")
    page.check("input[name=whole]")
    page.click("#spawn-form button[type=submit]")
    expect(page.locator("#spawn-status")).to_contain_text("Spawned commit-notes-txt")
    expect(page.locator("#agents .card")).to_have_count(1)
    task = card(page, "commit-notes-txt").locator(".task")
    expect(task).to_have_text("commit:notes.txt write notes\nthen read them twice")
