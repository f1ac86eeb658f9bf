"""Collecting agents' work: the report, committing leftovers, merging, patches and pull requests."""

import os
import stat
import subprocess

from conftest import FAKE_AGENT_COMMAND, git, load_state, make_repo, spawn_and_finish, write_config


def test_collect_reports_commits_diffstat_leftovers_and_overlaps(fake_repo, cli):
    spawn_and_finish(
        cli, fake_repo, "commit:shared.txt first", "commit:shared.txt write:extra.txt second"
    )
    run = cli("collect")
    assert run.code == 0, run
    out = run.out
    assert "== commit-shared-txt: done  (3 turns, $0.2500," in out
    assert "Task: commit:shared.txt first" in out
    assert "Result: all done" in out
    assert "Commits on orchestra/commit-shared-txt:" in out and "add shared.txt" in out
    assert " shared.txt | 1 +" in out
    assert "Uncommitted in its worktree: ?? extra.txt" in out
    assert "Warning: shared.txt was changed by commit-shared-txt and commit-shared-txt-2" in out

    doc = cli("collect", "--json").json()
    first = doc["agents"][0]
    assert first["commits"][0]["subject"] == "add shared.txt"
    assert first["files"] == ["shared.txt"] and first["uncommitted"] == []
    assert doc["agents"][1]["uncommitted"] == [{"status": "??", "path": "extra.txt"}]
    assert doc["overlaps"] == {"shared.txt": ["commit-shared-txt", "commit-shared-txt-2"]}


def test_collect_commit_commits_leftovers_but_not_setup_files(fake_repo, cli):
    (fake_repo / ".env").write_text("SECRET=1\n")  # not ignored: only the copy marks it as setup's
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, copy_files=[".env"])
    spawn_and_finish(cli, fake_repo, "write:draft.md leftovers")
    run = cli("collect", "--commit")
    assert "Committed leftover work of: write-draft-md" in run.out
    branch = "orchestra/write-draft-md"
    assert (
        git("log", "-1", "--format=%s", branch, cwd=fake_repo)
        == "orchestra: commit work write-draft-md left uncommitted\n"
    )
    assert git("ls-tree", "--name-only", branch, cwd=fake_repo).split() == ["README.md", "draft.md"]


def test_merge_in_stable_order(fake_repo, cli):
    spawn_and_finish(
        cli, fake_repo, "commit:a.txt alpha", "commit:b.txt beta", "fail commit:c.txt gamma"
    )
    head_before = git("rev-parse", "HEAD", cwd=fake_repo)
    run = cli("collect", "--merge")
    assert run.code == 0, run
    assert "Merged: commit-txt-alpha, commit-b-txt" in run.out  # failed agents only when named
    subjects = git(
        "log", "--format=%s", f"{head_before.strip()}..HEAD", "--first-parent", cwd=fake_repo
    ).splitlines()
    assert subjects == [  # collect --merge is a short form of land: land's subjects
        "Land orchestra/commit-b-txt",
        "Land orchestra/commit-txt-alpha",
    ]
    assert git("status", "--porcelain", cwd=fake_repo) == ""  # index and files match HEAD
    assert (fake_repo / "a.txt").exists() and not (fake_repo / "c.txt").exists()
    assert "Merged: nothing new" in cli("collect", "--merge").out


def test_a_merge_conflict_parks_the_agent_and_the_others_land(fake_repo, cli):
    spawn_and_finish(
        cli, fake_repo, "commit:a.txt first", "commit:same.txt one", "commit:same.txt two"
    )
    (fake_repo / "same.txt").write_text("mine\n")
    git("add", "same.txt", cwd=fake_repo)
    git("commit", "-qm", "my own same.txt", cwd=fake_repo)
    head = git("rev-parse", "HEAD", cwd=fake_repo)
    run = cli("collect", "--merge")
    assert run.code == 1
    assert "Merged: commit-txt-first" in run.out
    assert ("Not merged: commit-same-txt: conflicts with main in same.txt (it is parked blocked: "
            "send it a follow-up ('orchestra send commit-same-txt ...') and run collect --merge "
            "again, or merge it by hand: git merge orchestra/commit-same-txt)") in run.out  # fmt: skip
    assert "Not merged: commit-same-txt-2: conflicts with main in same.txt" in run.out
    assert git("status", "--porcelain", cwd=fake_repo) == ""
    assert not (fake_repo / ".git" / "MERGE_HEAD").exists()
    assert (fake_repo / "same.txt").read_text() == "mine\n"
    assert git("rev-parse", "HEAD~1", cwd=fake_repo) == head  # only the first merge landed
    assert "blocked" in cli("status").out
    again = cli("collect", "--merge")  # a parked agent waits for a follow-up, as with land
    assert again.code == 0 and "Merged: nothing new" in again.out
    assert ("Not merged: commit-same-txt: blocked: conflicts with main in same.txt (send it a "
            "follow-up ('orchestra send commit-same-txt ...') or name it)") in again.out  # fmt: skip


def test_merge_refuses_a_dirty_checkout(fake_repo, cli):
    spawn_and_finish(cli, fake_repo, "commit:a.txt first")
    (fake_repo / "README.md").write_text("edited\n")
    head = git("rev-parse", "HEAD", cwd=fake_repo)
    run = cli("collect", "--merge")
    assert run.code == 2 and run.out == ""
    assert run.err == (f"orchestra: error: your checkout {fake_repo} has uncommitted changes; "
                       "commit or stash them before merging\n")  # fmt: skip
    assert git("rev-parse", "HEAD", cwd=fake_repo) == head
    assert (fake_repo / "README.md").read_text() == "edited\n"


def test_patch_applies_with_git_am(fake_repo, cli, tmp_path):
    spawn_and_finish(cli, fake_repo, "commit:a.txt first", "commit:b.txt second")
    patch = tmp_path / "all.patch"
    run = cli("collect", "--patch", patch)
    assert f"Wrote 2 commit(s) to {patch} (apply with git am)" in run.out
    other = make_repo(tmp_path / "other")
    git("am", "-q", str(patch), cwd=other)
    assert (other / "a.txt").exists() and (other / "b.txt").exists()


def test_patch_to_a_path_that_cannot_be_written_is_one_line(fake_repo, cli, tmp_path):
    spawn_and_finish(cli, fake_repo, "commit:a.txt first")
    for path, why in (
        (tmp_path / "no" / "such" / "x.patch", "No such file or directory"),
        (tmp_path, "Is a directory"),
    ):
        run = cli("collect", "--patch", path)
        assert run.code == 2
        assert (
            run.err
            == f"orchestra: error: cannot write the patch to {path}: {why}; pick another --patch path\n"
        )


def test_pr_without_remote_prints_the_manual_commands(fake_repo, cli):
    spawn_and_finish(cli, fake_repo, "commit:a.txt feature")
    run = cli("collect", "--pr")
    assert "cannot open pull requests: no git remote is configured. To do it by hand:" in run.out
    assert (
        "git push -u <remote> orchestra/commit-txt-feature && gh pr create --head orchestra/commit-txt-feature"
        in run.out
    )


def test_pr_pushes_and_calls_gh(fake_repo, cli, tmp_path, monkeypatch):
    remote = tmp_path / "remote.git"
    git("init", "-q", "--bare", str(remote), cwd=tmp_path)
    git("remote", "add", "origin", str(remote), cwd=fake_repo)
    spawn_and_finish(cli, fake_repo, "commit:a.txt feature")
    calls = tmp_path / "gh-calls"
    fake_gh = tmp_path / "bin" / "gh"
    fake_gh.parent.mkdir()
    fake_gh.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {calls}\necho https://example.invalid/pull/1\n'
    )
    fake_gh.chmod(fake_gh.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_gh.parent}{os.pathsep}{os.environ['PATH']}")
    run = cli("collect", "--pr")
    assert "commit-txt-feature: https://example.invalid/pull/1" in run.out
    assert git("rev-parse", "orchestra/commit-txt-feature", cwd=remote) == git(
        "rev-parse", "orchestra/commit-txt-feature", cwd=fake_repo
    )
    args = calls.read_text().split("\n")
    assert args[:6] == [
        "pr",
        "create",
        "--head",
        "orchestra/commit-txt-feature",
        "--title",
        "commit:a.txt feature",
    ]
    assert "all done" in args[7] and "$0.2500" in "\n".join(args[7:])


def test_collect_refuses_a_running_agent(fake_repo, cli):
    cli("spawn", "sleep:20 slow")
    run = cli("collect", "sleep-20-slow")
    assert run.code == 2
    assert "sleep-20-slow is " in run.err and "wait for it to finish or stop it first" in run.err


def test_send_needs_a_claude_session(fake_repo, cli):
    spawn_and_finish(cli, fake_repo, "plain")
    run = cli("send", "plain", "one more thing")
    assert run.code == 2
    assert (
        run.err
        == "orchestra: error: plain has no Claude session to continue; spawn its task again\n"
    )
    assert load_state(fake_repo)["agents"]["plain"]["state"] == "done"
    assert (
        cli("send", "plain", "").err
        == "orchestra: error: a message is empty; describe what the agent should do\n"
    )


def test_nothing_to_collect(fake_repo, cli):
    assert cli("collect").out == "No finished agents to collect yet; see 'orchestra status'.\n"


def test_collect_in_a_subprocess(fake_repo):
    import sys

    from conftest import ROOT

    done = subprocess.run(
        [sys.executable, str(ROOT / "orchestra.py"), "collect", "--json"],
        cwd=fake_repo,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and '"agents": []' in done.stdout
