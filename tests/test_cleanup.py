"""Cleanup never loses work: a matrix of agent situations, each removed or kept for a stated reason."""

import json
import shutil
import subprocess

import pytest

from conftest import (
    FAKE_AGENT_COMMAND,
    agent_states,
    git,
    process_state,
    spawn_and_finish,
    wait_for,
    write_config,
)
from conftest import load_state_with_history as load_state


def worktree(repo, agent_id):
    return repo / ".worktrees" / f"task-{agent_id}"


def branch_exists(repo, branch):
    return bool(git("branch", "--list", branch, cwd=repo).strip())


def archives(repo):
    """{ref: commit} under refs/orchestra/archive/."""
    lines = git(
        "for-each-ref", "--format=%(refname) %(objectname)", "refs/orchestra/archive/", cwd=repo
    ).split("\n")
    return dict(line.split() for line in lines if line)


def reachable(repo, commit):
    """True when some branch or archive ref still holds the commit."""
    refs = git("for-each-ref", "--contains", commit, "--format=%(refname)", cwd=repo)
    return bool(refs.strip())


def make_situations(repo, cli):
    """Agents in every situation of the matrix; returns {case: agent id}."""
    (repo / ".gitignore").write_text(".env\nnode_modules/\n")
    git("add", ".gitignore", cwd=repo)
    git("commit", "-qm", "ignore env", cwd=repo)
    (repo / ".env").write_text("SECRET=1\n")
    write_config(
        repo,
        agent_command=FAKE_AGENT_COMMAND,
        copy_files=[".env"],
        setup=["mkdir -p node_modules/x && touch node_modules/x/i.js"],
    )
    spawn_and_finish(
        cli,
        repo,
        "commit:merged.txt merged",
        "commit:ff.txt fastforward",
        "commit:squash.txt squashed",
        "commit:picked.txt rebased",
        "commit:lonely.txt unmerged",
        "write:README.md uncommitted",
        "write:notes.md untracked",
        "write:.env ignored env",
        "only setup files",
        "commit:locked.txt locked",
        "commit:gone.txt folder deleted",
    )
    git("merge", "-q", "--ff-only", "orchestra/commit-ff-txt", cwd=repo)
    git("merge", "-q", "--no-ff", "--no-edit", "orchestra/commit-merged-txt", cwd=repo)
    git("merge", "-q", "--squash", "orchestra/commit-squash-txt", cwd=repo)
    git("commit", "-qm", "squash merge", cwd=repo)
    git("cherry-pick", "orchestra/commit-picked-txt", cwd=repo)
    git("worktree", "lock", str(worktree(repo, "commit-locked-txt")), cwd=repo)
    git("merge", "-q", "--no-ff", "--no-edit", "orchestra/commit-gone-txt", cwd=repo)
    shutil.rmtree(worktree(repo, "commit-gone-txt"))
    return {
        "clean merged": "commit-merged-txt",
        "fast-forward merged": "commit-ff-txt",
        "squash-merged": "commit-squash-txt",
        "rebased": "commit-picked-txt",
        "unmerged commits": "commit-lonely-txt",
        "uncommitted change": "write-readme-md",
        "untracked file": "write-notes-md",
        "ignored .env": "write-env-ignored",
        "only setup files": "only-setup-files",
        "locked worktree": "commit-locked-txt",
        "folder deleted by hand": "commit-gone-txt",
    }


EXPECTED = {
    "clean merged": ("REMOVED", "merged, nothing uncommitted"),
    "fast-forward merged": ("REMOVED", "merged, nothing uncommitted"),
    "squash-merged": ("REMOVED", "merged, nothing uncommitted"),
    "rebased": ("REMOVED", "merged, nothing uncommitted"),
    "unmerged commits": ("KEEP", "1 commit not merged into main"),
    "uncommitted change": ("KEEP", "uncommitted change README.md"),
    "untracked file": ("KEEP", "untracked file notes.md"),
    "ignored .env": ("KEEP", "ignored file .env"),
    "only setup files": ("REMOVED", "no changes: no commits, nothing uncommitted"),
    "locked worktree": ("KEEP", "worktree is locked (git worktree unlock "),
    "folder deleted by hand": ("REMOVED", "merged, nothing uncommitted"),
}


def lines_by_id(output):
    """{agent id: (verb, reason)} from cleanup's output lines."""
    found = {}
    for line in output.splitlines():
        verb, rest = (
            line.split(" ", 1)
            if not line.startswith("WOULD REMOVE")
            else ("WOULD REMOVE", line[13:])
        )
        agent_id, reason = rest.split(": ", 1)
        found[agent_id] = (verb, reason)
    return found


def test_cleanup_matrix(fake_repo, cli):
    cases = make_situations(fake_repo, cli)
    tips = {
        case: git("rev-parse", f"orchestra/{agent_id}", cwd=fake_repo).strip()
        for case, agent_id in cases.items()
    }
    dirty_files = {
        "uncommitted change": "README.md",
        "untracked file": "notes.md",
        "ignored .env": ".env",
    }

    dry = cli("cleanup", "--dry-run")
    assert dry.code == 0, dry
    planned = lines_by_id(dry.out)
    real = cli("cleanup")
    assert real.code == 0, real
    done = lines_by_id(real.out)

    for case, agent_id in cases.items():
        verb, reason = EXPECTED[case]
        assert done[agent_id][0] == verb, (case, done[agent_id])
        assert done[agent_id][1].startswith(reason), (case, done[agent_id])
        # The dry run announced exactly what the real run did.
        assert planned[agent_id][0] == ("WOULD REMOVE" if verb == "REMOVED" else "KEEP")
        assert planned[agent_id][1] == reason or done[agent_id][1].startswith(planned[agent_id][1])
        record = load_state(fake_repo)["agents"][agent_id]
        if verb == "REMOVED":
            assert record["state"] == "removed"
            assert not worktree(fake_repo, agent_id).exists()
            assert not branch_exists(fake_repo, f"orchestra/{agent_id}")
            assert archives(fake_repo)[record["archive"][0]] == tips[case]
        else:
            assert record["state"] == "done"
            assert worktree(fake_repo, agent_id).is_dir()
            assert branch_exists(fake_repo, f"orchestra/{agent_id}")
    for case, name in dirty_files.items():
        assert (worktree(fake_repo, cases[case]) / name).exists(), case

    # Zero lost commits: every agent's tip is still on a branch or in an archive.
    assert all(reachable(fake_repo, tip) for tip in tips.values())
    assert git("worktree", "list", "--porcelain", cwd=fake_repo).count("prunable") == 0
    assert "commit-merged-txt" not in cli("status").out


def test_forced_cleanup_archives_everything_first(fake_repo, cli):
    cases = make_situations(fake_repo, cli)
    tips = {
        case: git("rev-parse", f"orchestra/{agent_id}", cwd=fake_repo).strip()
        for case, agent_id in cases.items()
    }
    run = cli("cleanup", "--force")
    assert run.code == 0, run
    done = lines_by_id(run.out)
    assert done[cases["locked worktree"]][0] == "KEEP"  # never a locked worktree
    assert done[cases["unmerged commits"]] == (
        "REMOVED",
        f"forced past: 1 commit not merged into main (saved as {load_state(fake_repo)['agents'][cases['unmerged commits']]['archive'][0]})",
    )
    refs = archives(fake_repo)
    for case, name in {
        "uncommitted change": "README.md",
        "untracked file": "notes.md",
        "ignored .env": ".env",
    }.items():
        record = load_state(fake_repo)["agents"][cases[case]]
        snapshot = next(ref for ref in record["archive"] if ref.endswith("-worktree"))
        assert (
            git("show", f"{refs[snapshot]}:{name}", cwd=fake_repo) == f"written by {cases[case]}\n"
        )
        assert git("rev-parse", f"{refs[snapshot]}^", cwd=fake_repo).strip() == tips[case]
    assert all(reachable(fake_repo, tip) for tip in tips.values())
    listing = cli("cleanup", "--list-archives", "--json").json()["archives"]
    unmerged = next(a for a in listing if a["id"] == cases["unmerged commits"])
    assert (
        unmerged["restore"] == f"orchestra restore {cases['unmerged commits']}/{unmerged['saved']}"
    )
    assert cli(*unmerged["restore"].split()[1:]).code == 0
    assert git(
        "show", f"orchestra/{cases['unmerged commits']}:lonely.txt", cwd=fake_repo
    ).startswith("written by")


@pytest.mark.parametrize("pause", [False, True])
def test_running_and_paused_agents_are_kept_unless_forced(fake_repo, cli, pause):
    cli("spawn", "sleep:30 busy agent")
    wait_for(lambda: agent_states(fake_repo).get("sleep-30-busy") == "running", what="running")
    if pause:
        cli("pause", "sleep-30-busy")
    state = "paused" if pause else "running"
    kept = cli("cleanup", "--all")
    assert kept.out == f"KEEP sleep-30-busy: still {state}; stop it first or use --force\n"
    pid = load_state(fake_repo)["agents"]["sleep-30-busy"]["pid"]
    forced = cli("cleanup", "--all", "--force")
    assert forced.out.startswith(
        f"REMOVED sleep-30-busy: forced past: still {state}; stop it first or use --force"
    )
    wait_for(lambda: process_state(pid) is None, timeout=15, what="the agent to end")
    assert not worktree(fake_repo, "sleep-30-busy").exists()
    assert load_state(fake_repo)["agents"]["sleep-30-busy"]["state"] == "removed"


def test_default_cleanup_leaves_running_agents_alone(fake_repo, cli):
    cli("spawn", "sleep:30 still going")
    wait_for(lambda: agent_states(fake_repo).get("sleep-30-still") == "running", what="running")
    assert cli("cleanup").out == "Nothing to clean up.\n"


def test_failed_only(fake_repo, cli):
    spawn_and_finish(cli, fake_repo, "fail broken", "fine")
    run = cli("cleanup", "--failed")
    assert run.out.startswith(
        "REMOVED fail-broken: no changes: no commits, nothing uncommitted (saved as refs/orchestra/archive/fail-broken/"
    )
    assert run.out.count("\n") == 1
    assert agent_states(fake_repo)["fine"] == "done"


def test_cleanup_refuses_during_a_merge(fake_repo, cli):
    spawn_and_finish(cli, fake_repo, "commit:README.md conflicting")
    (fake_repo / "README.md").write_text("mine\n")
    git("commit", "-qam", "my change", cwd=fake_repo)
    subprocess_merge = git_fails(fake_repo, "merge", "orchestra/commit-readme-md")
    assert subprocess_merge
    before = git("for-each-ref", cwd=fake_repo)
    run = cli("cleanup", "--force")
    assert run.code == 2
    assert run.err.startswith(
        f"orchestra: error: a merge is in progress in {fake_repo}; finish or abort it"
    )
    assert git("for-each-ref", cwd=fake_repo) == before


def test_unknown_id(fake_repo, cli):
    spawn_and_finish(cli, fake_repo, "one")
    run = cli("cleanup", "nobody")
    assert (
        run.code == 2
        and run.err == "orchestra: error: no agent 'nobody'; 'orchestra status' lists them\n"
    )


def test_cleanup_json_plan(fake_repo, cli):
    spawn_and_finish(cli, fake_repo, "commit:a.txt keep me")
    doc = cli("cleanup", "--dry-run", "--json").json()
    assert doc["applied"] is False
    assert doc["plan"][0]["action"] == "keep" and doc["plan"][0]["reasons"] == [
        "1 commit not merged into main"
    ]
    json.dumps(doc)


def git_fails(repo, *args):
    """Run git expecting it to fail (a merge conflict); True if it did."""
    return subprocess.run(["git", *args], cwd=repo, capture_output=True).returncode != 0


def test_work_written_after_the_plan_is_never_lost(fake_repo, cli, monkeypatch):
    import orchestra

    spawn_and_finish(cli, fake_repo, "tidy up")
    real_plan = orchestra.plan_cleanup

    def plan_then_agent_writes(project, records, force=False):
        plan = real_plan(project, records, force)
        (worktree(fake_repo, "tidy-up") / "late.txt").write_text("written after the plan\n")
        return plan

    monkeypatch.setattr(orchestra, "plan_cleanup", plan_then_agent_writes)
    run = cli("cleanup")
    assert run.out == "KEEP tidy-up: changed since the plan was made; run cleanup again\n"
    assert (worktree(fake_repo, "tidy-up") / "late.txt").exists()
    forced = cli("cleanup", "--force")
    assert forced.out.startswith("REMOVED tidy-up:")
    snapshot = next(
        r for r in load_state(fake_repo)["agents"]["tidy-up"]["archive"] if r.endswith("-worktree")
    )
    assert git("show", f"{snapshot}:late.txt", cwd=fake_repo) == "written after the plan\n"
