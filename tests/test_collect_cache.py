"""collect's cache of what each finished agent holds (.orchestra/reports.json): a second collect asks
git a few questions for all agents, and after any change to a worktree, its reflogs or the refs the
report is exactly what a collect without the cache says."""

import json
import os

import pytest

import orchestra
from conftest import git, wait_settled


def collect(cli):
    run = cli("collect", "--json")
    assert run.code == 0, run
    return json.loads(run.out)


def fresh(cli, repo):
    """The report as a collect without the cache gives it."""
    (repo / ".orchestra" / orchestra.REPORT_CACHE_FILE).unlink()
    return collect(cli)


def alone(repo):
    """Each agent's report as worktree_holdings and unmerged_reason find it, agent by agent."""
    project = orchestra.Project.open(repo, os.environ)
    records = orchestra.finished_agents(project.records(), [])
    return json.loads(json.dumps([orchestra.agent_report(project, r) for r in records]))


@pytest.fixture
def two(fake_repo, cli, monkeypatch):
    """Two finished agents, each with a commit; mtimes trusted at once (no racy wait in tests)."""
    monkeypatch.setattr(orchestra, "REPORT_RACY_SECONDS", 0)
    assert cli("spawn", "commit:a.txt one", "commit:b.txt two").code == 0
    wait_settled(fake_repo)
    records = orchestra.Project.open(fake_repo, os.environ).records()
    return {r["task"].split()[-1]: orchestra.Path(r["worktree"]) for r in records.values()}


def git_calls(monkeypatch):
    calls = []
    for name in ("run_git", "git_bytes"):
        real = getattr(orchestra, name)
        monkeypatch.setattr(
            orchestra,
            name,
            lambda args, *a, real=real, **k: calls.append(args) or real(args, *a, **k),
        )
    return calls


def test_a_second_collect_asks_git_the_same_few_questions_for_any_number_of_agents(
    two, fake_repo, cli, monkeypatch
):
    first = collect(cli)
    calls = git_calls(monkeypatch)
    assert collect(cli) == first
    assert (
        len(calls) <= 8
    ), calls  # refs, worktrees, common dir, one rev-list, the merge target and its tip
    assert not any(
        c[0] in ("status", "write-tree", "diff", "log", "hash-object") for c in calls
    ), calls


def changes(one, two, repo):
    """(what, change) pairs, applied in order, each one something a report must show."""

    def retouch():  # same size, mtime put back: only the change time tells
        before = os.stat(one / "a.txt")
        (one / "a.txt").write_text("A" * before.st_size)
        os.utime(one / "a.txt", ns=(before.st_atime_ns, before.st_mtime_ns))

    yield "untracked file", lambda: (one / "new.txt").write_text("new\n")
    yield "retouched file", retouch
    yield "staged change (the report leaves the index to cleanup)", lambda: git(
        "add", "a.txt", cwd=one
    )
    yield "stash", lambda: git("stash", "-q", cwd=one)
    yield "commit reset away", lambda: (
        (one / "c.txt").write_text("c\n"),
        git("add", "c.txt", cwd=one),
        git("commit", "-qm", "c", cwd=one),
        git("reset", "-q", "--hard", "HEAD~1", cwd=one),
    )
    yield "detached commit", lambda: (git("checkout", "-q", "--detach", cwd=two),
                                      git("commit", "-q", "--allow-empty", "-m", "loose", cwd=two))  # fmt: skip
    yield "back on its branch", lambda: git("checkout", "-q", git("branch", "--format=%(refname:short)",
                                                                   "--contains", "HEAD~1", cwd=two).split()[-1], cwd=two)  # fmt: skip
    yield "merged into main", lambda: git(
        "merge", "-q", "--no-edit", "--no-ff", git("rev-parse", "HEAD", cwd=two).strip(), cwd=repo
    )
    yield "stash dropped", lambda: git("stash", "drop", "-q", cwd=one)
    yield "worktree removed", lambda: (git("worktree", "remove", "--force", str(two), cwd=repo))


def test_every_change_shows_as_a_collect_without_the_cache_shows_it(two, fake_repo, cli):
    before = collect(cli)
    seen = [before]
    for what, change in changes(two["one"], two["two"], fake_repo):
        change()
        cached = collect(cli)
        assert cached == fresh(cli, fake_repo), what
        assert cached["agents"] == alone(fake_repo), what
        assert cached != seen[-1] or "staged" in what, f"{what} changed nothing in the report"
        seen.append(cached)
