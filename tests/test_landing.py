"""The merge queue: `orchestra land` with fast fake agents and with the real claude CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys

import orchestra
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
        "Land orchestra/commit-b-txt",
        "Land orchestra/commit-txt-alpha",
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


def test_collect_merge_is_land_checks_run_on_the_merged_result(fake_repo, cli):
    # each agent green alone; together b.txt's check fails: collect --merge never moves main there
    write_config(
        fake_repo, agent_command=FAKE_AGENT_COMMAND, checks=["test ! -f a.txt || test ! -f b.txt"]
    )
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha", "commit:b.txt beta")
    dry = cli("collect", "--merge", "--dry-run")
    assert dry.code == 0, dry
    assert ("Dry run, nothing changed:\n"
            "commit-txt-alpha: would merge 1 commit(s), run the checks on the result and land\n"
            "commit-b-txt: would merge 1 commit(s), run the checks on the result and land") in dry.out  # fmt: skip
    assert not (fake_repo / "a.txt").exists() and "landed" not in cli("status").out
    run = cli("collect", "--merge")
    assert run.code == 1
    assert "Merged: commit-txt-alpha\n" in run.out
    assert "Not merged: commit-b-txt: checks fail on main with its work" in run.out
    assert (fake_repo / "a.txt").exists() and not (fake_repo / "b.txt").exists()
    assert git("status", "--porcelain", cwd=fake_repo) == ""  # index and files match HEAD
    assert git("log", "-1", "--format=%s", cwd=fake_repo) == "Land orchestra/commit-txt-alpha\n"
    # named, it lands as collect --merge always merged a named agent: past the checks, and says so
    named = cli("collect", "--merge", "commit-b-txt")
    assert named.code == 0, named
    assert "Merged: commit-b-txt" in named.out
    assert "landed, without checks on the result: collect --merge lands a named agent" in named.out
    assert (fake_repo / "b.txt").exists() and git("status", "--porcelain", cwd=fake_repo) == ""


def test_collect_merge_dry_run_needs_merge_alone(fake_repo, cli):
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha")
    for argv in (["--dry-run"], ["--merge", "--commit", "--dry-run"]):
        run = cli("collect", *argv)
        assert run.code == 2 and "--dry-run shows what --merge would do" in run.err, run
    assert cli("collect", "--merge", "--dry-run", "--json").json()["landing"][0]["outcome"] == (
        "would land"
    )


def test_web_land_and_merge_refuse_while_a_cli_land_runs(fake_repo, cli):
    from test_dashboard import serve
    from test_web import call

    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, checks=["sleep 5"])
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha", "commit:b.txt beta")
    server = serve(fake_repo, revive=False)
    try:
        first = subprocess.Popen([*ORCHESTRA, "land", "commit-txt-alpha"], cwd=fake_repo,
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        wait_for(lambda: (fake_repo / ".orchestra" / "land").exists(), timeout=30, what="land")
        for action in ("land", "merge"):
            answer = call(server, "POST", f"/api/agents/commit-b-txt/{action}", {})
            assert answer.status == 409 and "another land" in answer.json()["error"], answer
        assert first.wait(60) == 0
        assert git("status", "--porcelain", cwd=fake_repo) == ""  # index and files match HEAD
        assert not (fake_repo / "b.txt").exists()  # the refused ones changed nothing
        answer = call(server, "POST", "/api/agents/commit-b-txt/merge", {})
        assert answer.status == 200 and "Merged: commit-b-txt" in answer.json()["message"], answer
        assert (fake_repo / "b.txt").exists() and git("status", "--porcelain", cwd=fake_repo) == ""
    finally:
        server.stop()


def test_dry_run_never_parks_an_agent_whose_branch_is_gone(fake_repo, cli):
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha")
    git("worktree", "remove", "--force", ".worktrees/task-commit-txt-alpha", cwd=fake_repo)
    git("branch", "-D", "orchestra/commit-txt-alpha", cwd=fake_repo)
    dry = cli("land", "--dry-run")
    assert dry.out == (
        "commit-txt-alpha: would be blocked: its branch orchestra/commit-txt-alpha is gone\n"
    )
    assert not load_state(fake_repo)["agents"]["commit-txt-alpha"].get("blocked")
    assert "blocked" in cli("land").out  # the real run parks it


def test_kill_9_during_land_then_a_rerun_continues(fake_repo, cli):
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, checks=["sleep 2"])
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha", "commit:b.txt beta")
    before = head(fake_repo)
    proc = subprocess.Popen([*ORCHESTRA, "land"], cwd=fake_repo, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    wait_for(lambda: head(fake_repo) != before, timeout=60, what="the first landing")
    os.killpg(proc.pid, signal.SIGKILL)  # during the second agent's checks
    proc.wait()
    admin = fake_repo / ".git" / "worktrees" / "land"
    (admin / "index.lock").write_text("")  # as a land killed inside `git reset` leaves it
    first = head(fake_repo)
    assert git("status", "--porcelain", cwd=fake_repo) == ""  # checkout matches its HEAD
    assert (fake_repo / "a.txt").exists()
    rerun = cli("land")
    assert rerun.code == 0, rerun
    assert "commit-b-txt: landed on main" in rerun.out
    assert git("rev-parse", "main~1", cwd=fake_repo).strip() == first
    assert git("status", "--porcelain", cwd=fake_repo) == ""
    agents = {a["id"]: a for a in cli("status", "--json").json()["agents"]}
    assert all(a["landed"] for a in agents.values())


CHECK = (
    'for f in caller.txt user.txt; do [ ! -f $f ] || [ "$(cat $f)" = "$(cat api.txt)" ] || '
    '{ echo "$f calls $(cat $f) but the api is $(cat api.txt)"; exit 1; }; done'
)


def green_at_every_step(repo, since):
    """Run the check on every commit the target pointed to since `since`, each in a clean tree."""
    commits = git("rev-list", "--first-parent", f"{since}..main", cwd=repo).split()
    for commit in commits:
        folder = repo.parent / f"at-{commit[:8]}"
        git("worktree", "add", "-q", "--detach", str(folder), commit, cwd=repo)
        done = subprocess.run(["sh", "-c", CHECK], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0, (commit, done.stdout)
        git("worktree", "remove", "--force", str(folder), cwd=repo)
    return commits


@requires_claude
def test_real_claude_conflict_and_red_result_get_fix_rounds_and_land(claude_repo, claude_api, cli):
    (claude_repo / "api.txt").write_text("old\n")
    (claude_repo / "caller.txt").write_text("old\n")
    git("add", "api.txt", "caller.txt", cwd=claude_repo)
    git("commit", "-qm", "an api and its caller", cwd=claude_repo)
    write_config(claude_repo, sandbox="off", bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5, checks=[CHECK],
                 fix_rounds=1)  # fmt: skip
    claude_api.script("rename-the-api", [bash("echo new > api.txt && echo new > caller.txt && echo A > notes.txt && "
                                              "git add -A && git commit -qm 'rename the api'"), text("Renamed")])  # fmt: skip
    claude_api.script("write-notes", [bash("echo B > notes.txt && git add notes.txt && git commit -qm notes"),
                                      text("Wrote notes")])  # fmt: skip
    claude_api.script("add-a-user", [bash("echo old > user.txt && git add user.txt && git commit -qm 'a user'"),
                                     text("Added a user")])  # fmt: skip
    claude_api.script("conflicts in notes.txt", [
        bash("git merge -q main; printf 'A\\nB\\n' > notes.txt && git add notes.txt && git commit -qm resolve"),
        text("Resolved")])  # fmt: skip
    claude_api.script("user.txt calls old but the api is new", [
        bash("git merge -q --no-edit main && cat api.txt > user.txt && git commit -qam 'follow the rename'"),
        text("Fixed")])  # fmt: skip
    for name, task in (
        ("rename", "rename-the-api"),
        ("notes", "write-notes"),
        ("user", "add-a-user"),
    ):
        assert cli("spawn", "--name", name, task).code == 0
    wait_settled(claude_repo, timeout=180)
    agents = load_state(claude_repo)["agents"]
    assert all(a["checks"]["status"] == "passed" for a in agents.values()), agents  # green alone
    before = head(claude_repo)
    run = cli("land")
    assert run.code == 0, run
    out = run.out
    assert "rename: landed on main" in out
    assert "notes: conflicts with main in notes.txt; sent back for fix round 1" in out
    assert "user: checks fail on main with its work" in out and "sent back for fix round 1" in out
    assert "notes: landed on main" in out and "user: landed on main" in out
    assert (claude_repo / "notes.txt").read_text() == "A\nB\n"
    assert (claude_repo / "user.txt").read_text() == "new\n"
    assert git("status", "--porcelain", cwd=claude_repo) == ""
    assert len(green_at_every_step(claude_repo, before)) == 3
    prompts = json.dumps(claude_api.main_requests)
    assert "cannot land on main" in prompts and "fails the checks" in prompts


@requires_claude
def test_real_claude_agent_that_cannot_be_fixed_is_parked_while_others_land(
    claude_repo, claude_api, cli
):
    write_config(
        claude_repo,
        sandbox="off",
        bypass_permissions=CLAUDE_TOOLS,
        heartbeat_interval=0.5,
        fix_rounds=1,
    )
    claude_api.script(
        "first-notes",
        [bash("echo A > notes.txt && git add notes.txt && git commit -qm a"), text("A")],
    )
    claude_api.script(
        "second-notes",
        [bash("echo B > notes.txt && git add notes.txt && git commit -qm b"), text("B")],
    )
    claude_api.script(
        "third-file", [bash("echo C > c.txt && git add c.txt && git commit -qm c"), text("C")]
    )
    claude_api.script("cannot land on main", [text("I will not change anything")])
    for name in ("first-notes", "second-notes", "third-file"):
        cli("spawn", "--name", name, name)
    wait_settled(claude_repo, timeout=180)
    run = cli("land")
    assert run.code == 1, run
    assert "second-notes: blocked: conflicts with main in notes.txt after 1 fix round(s)" in run.out
    assert "third-file: landed on main" in run.out and "first-notes: landed on main" in run.out
    status = cli("status", "--json").json()["agents"]
    blocked = next(a for a in status if a["id"] == "second-notes")
    assert blocked["blocked"]["reason"].startswith("conflicts with main in notes.txt")
    assert not blocked["landed"]
    # a follow-up that resolves it, then it lands
    claude_api.script("please-resolve", [
        bash("git merge -q main; printf 'A\\nB\\n' > notes.txt && git add notes.txt && git commit -qm resolve"),
        text("Resolved")])  # fmt: skip
    assert cli("send", "second-notes", "please-resolve").code == 0
    wait_settled(claude_repo, timeout=120)
    again = cli("land")
    assert again.code == 0, again
    assert "second-notes: landed on main" in again.out
    assert (claude_repo / "notes.txt").read_text() == "A\nB\n"


def write_tasks(repo, tasks):
    path = repo.parent / "tasks.json"
    path.write_text(json.dumps(tasks))
    return path


def test_tasks_file_errors_come_before_anything_is_queued(fake_repo, cli):
    cycle = write_tasks(
        fake_repo,
        [{"id": "a", "task": "x", "after": ["b"]}, {"id": "b", "task": "y", "after": ["a"]}],
    )
    run = cli("spawn", "--file", cycle)
    assert run.code == 2 and "make a cycle" in run.err
    itself = write_tasks(fake_repo, [{"id": "a", "task": "x", "after": ["a"]}])
    assert "task 'a' cannot wait for itself" in cli("spawn", "--file", itself).err
    unknown = write_tasks(fake_repo, [{"id": "a", "task": "x", "after": ["zzz"]}])
    assert cli("spawn", "--file", unknown).err == (
        "orchestra: error: --after zzz: no agent 'zzz'; 'orchestra status' lists them\n"
    )
    assert "no agent 'nope'" in cli("spawn", "--after", "nope", "task").err
    far = write_tasks(
        fake_repo, [{"id": "a", "task": "x"}, {"id": "b", "task": "y", "host": "far"}]
    )
    assert cli("spawn", "--file", far).err == (
        "orchestra: error: unknown host 'far'; known hosts: local (add one under 'hosts' in the "
        "config)\n"
    )
    odd = write_tasks(fake_repo, [{"task": "x", "host": 7}])
    assert "task 1: 'host' must be the name of a host" in cli("spawn", "--file", odd).err
    assert cli("status", "--json").json()["agents"] == []
    local = write_tasks(fake_repo, [{"id": "a", "task": "sleep:0 x", "host": "local"}])
    assert cli("spawn", "--file", local).code == 0
    assert cli("status", "--json").json()["agents"][0]["host"] == "local"


def test_after_waits_for_the_landing_and_starts_from_the_target(fake_repo, cli):
    plan = write_tasks(fake_repo, [
        {"id": "base", "task": "commit:base.txt"},
        {"id": "next", "task": "commit:next.txt", "after": ["base"], "checks": ["test -f base.txt"]},
    ])  # fmt: skip
    assert cli("spawn", "--file", plan).code == 0
    wait_for(lambda: load_state(fake_repo)["agents"]["base"]["state"] == "done", what="base done")
    wait_for(
        lambda: not orchestra.supervisor_alive(load_state(fake_repo)), what="an idle supervisor"
    )
    status = cli("status")
    row = next(line for line in status.out.splitlines() if line.startswith("next"))
    assert "queued" in row and "waits for base to land" in row
    agents = cli("status", "--json").json()["agents"]
    assert next(a for a in agents if a["id"] == "next")["waits_for"] == ["base"]
    assert cli("land").code == 0
    wait_for(lambda: load_state(fake_repo)["agents"]["next"]["state"] == "done", what="next done")
    record = load_state(fake_repo)["agents"]["next"]
    assert (fake_repo / ".worktrees" / "task-next" / "base.txt").exists()
    assert record["checks"]["status"] == "passed"
    assert cli("land").code == 0 and (fake_repo / "next.txt").exists()


def test_a_blocked_dependency_holds_its_dependent(fake_repo, cli):
    write_config(
        fake_repo, agent_command=FAKE_AGENT_COMMAND, checks=["test ! -f a.txt || test ! -f b.txt"]
    )
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha", "commit:b.txt beta")
    assert cli("spawn", "--name", "after-b", "--after", "commit-b-txt", "commit:c.txt").code == 0
    assert cli("land").code == 1  # b is blocked: red together with a
    status = cli("status").out
    row = next(line for line in status.splitlines() if line.startswith("after-b"))
    assert "held: waits for commit-b-txt (blocked" in row
    assert load_state(fake_repo)["agents"]["after-b"]["state"] == "queued"
    assert not (fake_repo / ".worktrees" / "task-after-b").exists()


@requires_claude
def test_real_claude_after_starts_once_its_dependency_landed_with_its_code(
    claude_repo, claude_api, cli
):
    claude_api.script("write-the-lib", [bash("echo 'def helper(): pass' > lib.py && git add lib.py && "
                                             "git commit -qm lib"), text("Wrote the lib")])  # fmt: skip
    claude_api.script("use-the-lib", [bash("grep helper lib.py > uses.txt && git add uses.txt && git commit -qm use"),
                                      text("Used it")])  # fmt: skip
    assert cli("spawn", "--name", "lib", "write-the-lib").code == 0
    assert cli("spawn", "--name", "user", "--after", "lib", "use-the-lib").code == 0
    wait_for(
        lambda: load_state(claude_repo)["agents"]["lib"]["state"] == "done", timeout=120, what="lib"
    )
    wait_for(
        lambda: not orchestra.supervisor_alive(load_state(claude_repo)), what="an idle supervisor"
    )
    user = load_state(claude_repo)["agents"]["user"]
    assert user["state"] == "queued" and user["waits_for"] == ["lib"]
    assert not (claude_repo / ".worktrees" / "task-user").exists()
    assert not any(
        "use-the-lib" in json.dumps(b) for b in claude_api.main_requests
    )  # never started
    assert cli("land", "lib").code == 0
    wait_for(
        lambda: load_state(claude_repo)["agents"]["user"]["state"] == "done",
        timeout=120,
        what="user",
    )
    assert git("show", "orchestra/user:uses.txt", cwd=claude_repo) == "def helper(): pass\n"
    assert cli("land").code == 0
    assert (claude_repo / "uses.txt").exists() and (claude_repo / "lib.py").exists()


def test_notify_command_hears_landed_and_blocked(fake_repo, cli):
    heard = fake_repo.parent / "heard.txt"
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, checks=["test ! -f a.txt || test ! -f b.txt"],
                 notify_command=["sh", "-c", f"echo \"$0 $1\" >> {heard}", "{agent}", "{event}"])  # fmt: skip
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha", "commit:b.txt beta")
    cli("land")
    wait_for(lambda: heard.exists() and "blocked" in heard.read_text(), what="notifications")
    lines = heard.read_text().splitlines()
    assert "commit-txt-alpha landed" in lines and "commit-b-txt blocked" in lines


def test_land_wait_lands_a_whole_plan_unattended(fake_repo, cli):
    write_config(
        fake_repo,
        agent_command=FAKE_AGENT_COMMAND,
        heartbeat_interval=0.5,
        checks=["test -f README.md"],
    )
    plan = write_tasks(fake_repo, [
        {"id": "one", "task": "commit:one.txt sleep:1"},
        {"id": "two", "task": "commit:two.txt", "after": ["one"], "checks": ["test -f one.txt"]},
        {"id": "three", "task": "commit:three.txt", "after": ["two"]},
        {"id": "side", "task": "commit:side.txt"},
    ])  # fmt: skip
    assert cli("spawn", "--file", plan).code == 0
    run = cli("land", "--wait")
    assert run.code == 0, run
    landed = [line.split(":")[0] for line in run.out.splitlines() if ": landed on main" in line]
    assert sorted(landed) == ["one", "side", "three", "two"]
    assert landed.index("one") < landed.index("two") < landed.index("three")
    for name in ("one", "two", "three", "side"):
        assert (fake_repo / f"{name}.txt").exists()
    assert git("status", "--porcelain", cwd=fake_repo) == ""
    assert cli("land", "--wait", "one").code == 2


def test_a_rebuilt_state_keeps_landed_blocked_and_what_waits(fake_repo, cli):
    write_config(
        fake_repo, agent_command=FAKE_AGENT_COMMAND, checks=["test ! -f a.txt || test ! -f b.txt"]
    )
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha", "commit:b.txt beta")
    assert cli("spawn", "--name", "after-b", "--after", "commit-b-txt", "commit:c.txt").code == 0
    cli("land")
    wait_for(
        lambda: not orchestra.supervisor_alive(load_state(fake_repo)), what="an idle supervisor"
    )
    (fake_repo / ".orchestra" / "state.json").write_text("{broken")
    agents = {a["id"]: a for a in cli("status", "--json").json()["agents"]}
    assert agents["commit-txt-alpha"]["landed"]["into"] == "main"
    assert agents["commit-b-txt"]["blocked"]["reason"].startswith("checks fail on main")
    assert agents["after-b"]["state"] == "queued" and agents["after-b"]["waits_for"] == [
        "commit-b-txt"
    ]


def test_the_land_worktree_gets_copy_files_and_setup_like_an_agents(fake_repo, cli):
    (fake_repo / ".env").write_text("TOKEN=1\n")
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, copy_files=[".env"],
                 setup=["mkdir -p deps && echo installed > deps/marker"],
                 checks=["grep -q TOKEN .env", "test -f deps/marker"])  # fmt: skip
    (fake_repo / ".gitignore").write_text("deps/\n.env\n")
    git("add", ".gitignore", cwd=fake_repo)
    git("commit", "-qm", "ignore", cwd=fake_repo)
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha", "commit:b.txt beta")
    run = cli("land")
    assert run.code == 0, run
    scratch = fake_repo / ".orchestra" / "land"
    assert (scratch / ".env").read_text() == "TOKEN=1\n" and (scratch / "deps" / "marker").exists()
    assert "landed on main" in run.out and run.out.count("landed on main") == 2
    shutil.rmtree(scratch)  # removed by hand: made again at the next land
    spawn_and_finish(cli, fake_repo, "commit:c.txt gamma")
    assert cli("land").code == 0 and (scratch / "deps" / "marker").exists()


def test_rebuilding_the_land_worktree_drops_only_its_own_entry(fake_repo, cli):
    """The scratch worktree made again never prunes other worktrees: one whose folder is away
    for a moment (an unmounted disk) keeps its entry, its index and its HEAD."""
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha")
    assert cli("land").code == 0
    scratch = fake_repo / ".orchestra" / "land"
    other, away = fake_repo.parent / "other", fake_repo.parent / "other-away"
    git("worktree", "add", "-q", "-b", "mine", str(other), cwd=fake_repo)
    (other / "mine.txt").write_text("staged work\n")
    git("add", "mine.txt", cwd=other)
    other.rename(away)
    shutil.rmtree(scratch)  # its folder gone, its entry stale: land makes it again
    spawn_and_finish(cli, fake_repo, "commit:b.txt beta")
    run = cli("land")
    assert run.code == 0 and "commit-b-txt: landed on main" in run.out, run
    away.rename(other)
    listing = git("worktree", "list", "--porcelain", cwd=fake_repo)
    assert f"worktree {other}\n" in listing and listing.count("/.orchestra/land\n") == 1
    assert "prunable" not in listing
    assert git("status", "--porcelain", cwd=other) == "A  mine.txt\n"  # its index is still there
    assert git("branch", "--show-current", cwd=other) == "mine\n"


def test_ctrl_c_during_the_checks_ends_them_and_a_rerun_lands(fake_repo, cli, monkeypatch):
    pid_file = fake_repo.parent / "check.pid"
    slow_when_landing = f'case "$PWD" in */.orchestra/land) test -f {pid_file} || {{ echo $$ > {pid_file}; sleep 30; }};; esac'
    write_config(fake_repo, agent_command=FAKE_AGENT_COMMAND, checks=[slow_when_landing])
    spawn_and_finish(cli, fake_repo, "commit:a.txt alpha")
    before = head(fake_repo)
    proc = subprocess.Popen([*ORCHESTRA, "land"], cwd=fake_repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    wait_for(
        lambda: pid_file.exists() and pid_file.read_text().strip(),
        timeout=60,
        what="the check to start",
    )
    check_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    wait_for(lambda: not os.path.exists(f"/proc/{check_pid}"), timeout=10, what="the check to end")
    assert head(fake_repo) == before and git("status", "--porcelain", cwd=fake_repo) == ""
    rerun = cli("land")  # the check passes at once now that the pid file exists
    assert rerun.code == 0 and "commit-txt-alpha: landed on main" in rerun.out


def test_a_rebase_conflict_parks_an_agent_without_a_session_and_nothing_new_is_said(fake_repo, cli):
    spawn_and_finish(
        cli, fake_repo, "commit:same.txt one", "commit:same.txt two", "sleep:0 nothing"
    )
    run = cli("-c", "land_strategy=rebase", "land")
    assert run.code == 1, run
    assert "commit-same-txt: landed on main" in run.out
    assert "commit-same-txt-2: blocked: conflicts with main in same.txt;" in run.out
    assert "sleep-0-nothing: landed on main" in run.out and "nothing new to land" in run.out
    scratch = fake_repo / ".orchestra" / "land"
    assert git("status", "--porcelain", cwd=scratch) == ""  # the conflicted rebase was aborted
