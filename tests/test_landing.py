"""The merge queue: `orchestra land` with fast fake agents and with the real claude CLI."""

import json
import os
import signal
import subprocess
import sys

from conftest import (
    CLAUDE_TOOLS,
    FAKE_AGENT_COMMAND,
    ROOT,
    git,
    load_state,
    spawn_and_finish,
    wait_for,
    wait_settled,
    write_config,
)
from scripted_api import bash, requires_claude, text

ORCHESTRA = [sys.executable, str(ROOT / "orchestra.py")]


def head(repo, ref="main"):
    return git("rev-parse", ref, cwd=repo).strip()


def test_land_merges_in_queue_order_and_brings_the_clean_checkout_along(fake_repo, cli):
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, checks=["test -f README.md"])
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha", "commit:b.txt beta")
    before = head(fake_repo)
    run = cli("land")
    assert run.code == 0, run
    lines = run.out.splitlines()
    assert lines[0].startswith("commit-txt-alpha: landed on main at ")
    assert lines[1].startswith("commit-b-txt: landed on main at ")
    assert (fake_repo / "a.txt").exists() and (fake_repo / "b.txt").exists()
    assert git("status", "--porcelain", cwd=fake_repo) == ""  # index and files match HEAD
    subjects = git("log", "--format=%s", "--first-parent", f"{before}..main", cwd=fake_repo)
    assert subjects.splitlines() == [
        "Land orchestra/commit-b-txt: commit:b.txt beta",
        "Land orchestra/commit-txt-alpha: commit:a.txt alpha",
    ]
    agents = cli("status", "--json").json()["agents"]
    assert all(a["landed"]["into"] == "main" for a in agents)
    assert "landed" in cli("status").out
    assert cli("land").out == "Nothing to land; see 'orchestra status'.\n"


def test_land_never_moves_the_target_to_a_red_commit(fake_repo, cli):
    # each agent is green alone; together b.txt's check fails (it forbids a.txt)
    write_config(
        fake_repo, agent_command=FAKE_AGENT_COMMAND, checks=["test ! -f a.txt || test ! -f b.txt"]
    )
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha", "commit:b.txt beta")
    run = cli("land")
    assert run.code == 1
    assert "commit-b-txt: blocked: checks fail on main with its work" in run.out
    assert (fake_repo / "a.txt").exists() and not (fake_repo / "b.txt").exists()
    record = load_state(fake_repo)["agents"]["commit-b-txt"]
    assert record["blocked"]["reason"].startswith("checks fail on main")
    assert "blocked" in cli("status").out
    assert cli("land").out.startswith("Nothing to land")  # parked until it runs again


def test_dirty_checkout_keeps_its_changes(fake_repo, cli):
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha")
    (fake_repo / "README.md").write_text("mine\n")
    run = cli("land")
    assert run.code == 0, run
    assert "uncommitted changes kept" in run.out
    assert (fake_repo / "README.md").read_text() == "mine\n" and (fake_repo / "a.txt").exists()
    assert git("status", "--porcelain", "--untracked-files=no", cwd=fake_repo) == " M README.md\n"


def test_checkout_whose_files_are_in_the_way_keeps_them_and_only_the_ref_moves(fake_repo, cli):
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha")
    (fake_repo / "a.txt").write_text("the user's own\n")
    before = head(fake_repo)
    run = cli("land")
    assert run.code == 0, run
    assert "only main moved" in run.out and "git apply -3 mine.patch" in run.out
    assert (fake_repo / "a.txt").read_text() == "the user's own\n"
    assert head(fake_repo) != before


def test_land_into_a_branch_not_checked_out_and_dry_run(fake_repo, cli):
    git("branch", "release", cwd=fake_repo)
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha")
    dry = cli("land", "--into", "release", "--dry-run")
    assert (
        dry.out
        == "commit-txt-alpha: would merge 1 commit(s), run the checks on the result and land\n"
    )
    assert head(fake_repo, "release") == head(fake_repo)
    run = cli("land", "--into", "release")
    assert run.code == 0, run
    assert git("ls-tree", "--name-only", "release", cwd=fake_repo).split() == ["README.md", "a.txt"]
    assert not (fake_repo / "a.txt").exists()  # main, checked out, untouched


def test_bad_strategy_and_branch_exit_2(fake_repo, cli):
    run = cli("land", "--into", "nope")
    assert (
        run.code == 2
        and run.err == "orchestra: error: --into nope: no such branch; name an existing branch\n"
    )
    run = cli("-c", "land_strategy=octopus", "land")
    assert run.code == 2 and "'land_strategy' must be one of merge, rebase, squash" in run.err


def test_squash_and_rebase_strategies(fake_repo, cli):
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha", "commit:b.txt beta")
    assert cli("-c", "land_strategy=squash", "land", "commit-txt-alpha").code == 0
    assert len(git("log", "-1", "--format=%P", cwd=fake_repo).split()) == 1  # squashed: one parent
    assert cli("-c", "land_strategy=rebase", "land", "commit-b-txt").code == 0
    assert git("log", "-1", "--format=%s", cwd=fake_repo) == "add b.txt\n"
    assert (fake_repo / "a.txt").exists() and (fake_repo / "b.txt").exists()


def test_a_second_land_refuses_while_one_runs(fake_repo, cli):
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, checks=["sleep 5"])
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha")
    first = subprocess.Popen([*ORCHESTRA, "land"], cwd=fake_repo, stdout=subprocess.PIPE, text=True)
    wait_for(lambda: (fake_repo / ".orchestra" / "land").exists(), timeout=30, what="land to start")
    second = cli("land")
    assert second.code == 1 and "another land" in second.err
    collect = cli("collect", "--merge")
    assert collect.code == 1 and "another land" in collect.err
    assert first.wait(60) == 0
