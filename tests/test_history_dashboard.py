"""The dashboard's history of cleaned-up agents, paged from GET /api/history, in headless Chromium."""

import test_dashboard

import orchestra

browser, phone = test_dashboard.browser, test_dashboard.phone  # the fixtures, shared
pytestmark = test_dashboard.pytestmark  # skipped where Chromium or Playwright is missing
serve = test_dashboard.serve

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover - CI installs it
    expect = None


def add_removed(project, count):
    """`count` agents cleaned up long ago, the most recently removed last."""

    def change(state):
        for n in range(count):
            record = dict.fromkeys(orchestra.RECORD_FIELDS)
            record.update(id=f"old-{n:03d}", task=f"old task {n}", state="done", seq=n, cost_usd=0.5,
                          created_at=orchestra.utc_iso())  # fmt: skip
            state["agents"][record["id"]] = record

    project.store.update(change)
    for n in range(count):
        orchestra.mark_removed(project, f"old-{n:03d}", [f"refs/orchestra/archive/old-{n:03d}/x"])


def test_cleaned_up_agents_are_paged_on_the_worktrees_tab(fake_repo, phone):
    server = serve(fake_repo, revive=False)
    try:
        add_removed(server.project, 60)
        phone.goto(server.url)
        expect(phone.locator("#connection")).to_have_attribute("data-state", "live", timeout=15_000)
        expect(phone.locator("#agents .card")).to_have_count(0)  # history is not in the live status
        phone.click("#tab-worktrees")
        items = phone.locator("#history li")
        expect(items).to_have_count(50)
        expect(items.first.locator("strong")).to_have_text("old-059")  # most recently removed first
        expect(items.first).to_contain_text("refs/orchestra/archive/old-059/x")
        phone.click("#history-more")
        expect(items).to_have_count(60)
        expect(items.last.locator("strong")).to_have_text("old-000")
        expect(phone.locator("#history-more")).to_be_hidden()
        assert phone.problems == []
    finally:
        server.stop()
