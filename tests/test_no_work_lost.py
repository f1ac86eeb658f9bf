"""No work lost, whatever git holds: cleanup, collect and merge judged from everything a worktree keeps.

Every case inventories the repository before (refs, reflogs, stashes, worktrees, every file with
its blob hash, nested repositories' files included) and checks afterwards that every commit is
still reachable from a ref and every file is still in place or its bytes are reachable from a ref.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import orchestra
from conftest import (
    FAKE_AGENT_COMMAND,
    ROOT,
    git,
    process_state,
    wait_for,
    wait_settled,
    write_config,
)
from conftest import load_state_with_history as load_state
from scripted_api import bash, requires_claude, text

ORCHESTRA = [sys.executable, str(ROOT / "orchestra.py")]


# --- the inventory --------------------------------------------------------------------


def git_ok(*args, cwd):
    """Run git; stdout, or '' when it fails (a missing reflog)."""
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else ""


def blob_hash(data):
    """The git blob id of these bytes."""
    return (
        subprocess.run(
            ["git", "hash-object", "--stdin", "--no-filters"],
            input=data,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )


def all_files(root, skip_top_git, skip=()):
    """{absolute path bytes: blob hash} of every file and symlink under root (nested .git included),
    other worktrees (`skip`) left out: they are inventoried on their own."""
    found, skip = {}, {os.fsencode(str(s)) for s in skip}
    for folder, dirs, files in os.walk(os.fsencode(str(root))):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
        if skip_top_git and folder == os.fsencode(str(root)):
            dirs[:] = [d for d in dirs if d not in (b".git", b".orchestra")]
            files = [f for f in files if f != b".git"]
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                found[path] = blob_hash(os.readlink(path))
            elif os.path.isfile(path):
                found[path] = blob_hash(Path(os.fsdecode(path)).read_bytes())
    return found


def inventory(repo):
    """Everything a repository holds: refs, reflog and stash commits, worktrees, files."""
    repo = Path(repo)
    worktrees = [line.split(" ", 1)[1] for line in git("worktree", "list", "--porcelain", cwd=repo).splitlines()
                 if line.startswith("worktree ")]  # fmt: skip
    commits = set(git_ok("rev-list", "--all", "--reflog", cwd=repo).split())
    commits |= set(git_ok("log", "-g", "--format=%H", "refs/stash", cwd=repo).split())
    files = {}
    for wt in worktrees:
        if os.path.isdir(wt):
            commits |= set(git_ok("rev-list", "--walk-reflogs", "HEAD", cwd=wt).split())
            files.update(all_files(wt, skip_top_git=True, skip=set(worktrees) - {wt}))
    refs = dict(
        line.split(" ", 1)[::-1]
        for line in git("for-each-ref", "--format=%(objectname) %(refname)", cwd=repo).splitlines()
    )
    setup = {}  # files copy_files and setup left, unchanged: cleanup may drop them, by design
    if (repo / ".orchestra" / "state.json").exists():
        for record in load_state(repo)["agents"].values():
            for name, sha in (record.get("setup_files") or {}).items():
                setup[os.fsencode(os.path.join(record["worktree"], name))] = sha
    return {"refs": refs, "commits": commits, "worktrees": worktrees, "files": files, "setup": setup,
            "stashes": git_ok("log", "-g", "--format=%H", "refs/stash", cwd=repo).split()}  # fmt: skip


def reachable_objects(repo):
    """(commits, blobs) reachable from refs now (archive refs included)."""
    objects = subprocess.run(
        ["git", "rev-list", "--objects", "--all"], cwd=repo, capture_output=True, check=True
    )
    commits = set(git("rev-list", "--all", cwd=repo).split())
    return commits, {
        line.split(b" ", 1)[0].decode() for line in objects.stdout.split(b"\n") if line
    }


def assert_nothing_lost(repo, before):
    """Every commit of `before` reachable from a ref; every file in place or its bytes reachable."""
    commits, objects = reachable_objects(repo)
    lost = sorted(
        before["commits"] - commits - inventory(repo)["commits"]
    )  # a ref, or a reflog still in place
    assert not lost, f"commits no ref holds any more: {lost}"
    for path, sha in before["files"].items():
        if before["setup"].get(path) == sha or (
            os.path.lexists(path) and all_files_one(path) == sha
        ):
            continue
        assert (
            sha in objects
        ), f"{os.fsdecode(path)}: its bytes are neither in place nor under any ref"


def all_files_one(path):
    return (
        blob_hash(os.readlink(path))
        if os.path.islink(path)
        else blob_hash(Path(os.fsdecode(path)).read_bytes())
    )


# --- helpers --------------------------------------------------------------------------


def sh(command, cwd):
    """A shell line in a worktree (the tests' stand-in for what an agent does)."""
    subprocess.run(command, shell=True, cwd=cwd, check=True, capture_output=True)


def spawn_one(cli, repo, name, task="a quiet task"):
    """Spawn one fake agent named `name` and wait until it has finished; its worktree."""
    run = cli("spawn", "--name", name, task)
    assert run.code == 0, run
    wait_settled(repo)
    return repo / ".worktrees" / f"task-{name}"


def line_for(out, agent_id):
    """The cleanup line about one agent."""
    return next(line for line in out.splitlines() if f" {agent_id}: " in line)


# --- the matrix: (prepare the repository, do in the worktree, expected KEEP reason or None) ---


def commit_in(wt, name, text="work"):
    sh(f"printf '{text}\\n' > {name} && git add {name} && git commit -qm 'add {name}'", wt)


def c_detached_one(repo, wt):
    sh("git checkout -q --detach", wt)
    commit_in(wt, "d.txt")


def c_detached_two(repo, wt):
    sh("git checkout -q --detach", wt)
    commit_in(wt, "d1.txt")
    commit_in(wt, "d2.txt")


def c_other_branch(repo, wt):
    sh("git switch -q -c side", wt)
    commit_in(wt, "side.txt")


def c_reset_after_commit(repo, wt):
    commit_in(wt, "r.txt")
    sh("git reset -q --hard HEAD~1", wt)


def c_amend(repo, wt):
    commit_in(wt, "a.txt", "first")
    sh("printf 'second\\n' > a.txt && git commit -q -a --amend -m amended", wt)


def c_stash(repo, wt):
    sh("printf 'stashed\\n' >> README.md && git stash -q", wt)


def c_two_stashes(repo, wt):
    sh(
        "printf 'one\\n' >> README.md && git stash -q && printf 'two\\n' >> README.md && git stash -q",
        wt,
    )


def c_stash_untracked(repo, wt):
    sh("printf 'new\\n' > u.txt && git stash -q -u", wt)


def c_staged(repo, wt):
    sh("printf 'staged\\n' > s.txt && git add s.txt", wt)


def c_staged_then_changed(repo, wt):
    sh(
        "printf 'staged version\\n' > README.md && git add README.md && printf 'disk version\\n' > README.md",
        wt,
    )


def c_deep_untracked(repo, wt):
    sh("mkdir -p a/b/c && printf 'deep\\n' > a/b/c/d.txt", wt)


def c_ignored(repo, wt):
    sh("printf 'log\\n' > x.log", wt)


def c_ignored_deep(repo, wt):
    sh("mkdir -p build/out && printf 'bin\\n' > build/out/a.bin", wt)


def c_global_excludes(repo, wt):
    (repo.parent / "global-ignore").write_text("*.secret\n")
    git("config", "core.excludesFile", str(repo.parent / "global-ignore"), cwd=repo)
    sh("printf 'key\\n' > k.secret", wt)


def c_status_hidden(repo, wt):
    git("config", "status.showUntrackedFiles", "no", cwd=wt)  # an agent changing the shared config
    sh("printf 'hidden\\n' > hidden.txt", wt)


def c_assume_unchanged(repo, wt):
    sh("printf 'changed\\n' >> README.md && git update-index --assume-unchanged README.md", wt)


def c_skip_worktree(repo, wt):
    sh("printf 'changed\\n' >> README.md && git update-index --skip-worktree README.md", wt)


def c_deleted(repo, wt):
    sh("rm README.md", wt)


def c_modified(repo, wt):
    sh("printf 'more\\n' >> README.md", wt)


def c_exec_bit(repo, wt):
    sh("chmod +x README.md", wt)


def c_symlink(repo, wt):
    sh("ln -s README.md link", wt)


def c_nested_repo(repo, wt):
    sh(
        "git init -q nested && cd nested && printf 'n\\n' > f.txt && git add f.txt && git commit -qm nested",
        wt,
    )


def c_nested_clean(repo, wt):
    sh(
        "git init -q inner && cd inner && printf 'i\\n' > g.txt && git add g.txt && git commit -qm inner",
        wt,
    )


def c_submodule(repo, wt):
    lib = repo.parent / "lib"
    if not lib.exists():
        sh(
            f"git init -q {lib} && cd {lib} && printf 'lib\\n' > l.txt && git add l.txt && git commit -qm lib",
            repo.parent,
        )
    sh(f"git -c protocol.file.allow=always submodule --quiet add {lib} sub", wt)
    sh(
        "cd sub && printf 'local\\n' > local.txt && git add local.txt && git commit -qm 'unpushed'",
        wt,
    )


def c_setup_unchanged(repo, wt):
    pass


def c_setup_file_changed(repo, wt):
    sh("printf 'edited\\n' > node_modules/x/i.js", wt)


def c_setup_file_added(repo, wt):
    sh("printf 'new\\n' > node_modules/x/new.js", wt)


def c_copy_changed(repo, wt):
    sh("printf 'SECRET=2\\n' > .env", wt)


def c_non_utf8(repo, wt):
    (wt / os.fsdecode(b"caf\xe9.txt")).write_text("latin-1 name\n")


def c_newline_name(repo, wt):
    (wt / "two\nlines.txt").write_text("odd name\n")


def c_branch_deleted(repo, wt):
    sh("git checkout -q --detach", wt)
    commit_in(wt, "kept.txt")
    git("branch", "-D", "orchestra/case", cwd=repo)


def c_branch_renamed(repo, wt):
    commit_in(wt, "renamed.txt")
    git("branch", "-m", "orchestra/case", "mine", cwd=repo)


def c_empty_dir(repo, wt):
    sh("mkdir empty", wt)


def c_fifo(repo, wt):
    sh("mkfifo pipe", wt)


def c_binary(repo, wt):
    (wt / "blob.bin").write_bytes(os.urandom(300_000))


def c_file_to_dir(repo, wt):
    sh("rm README.md && mkdir README.md && printf 'x\\n' > README.md/inside", wt)


def c_conflict(repo, wt):
    sh(
        "git switch -q -c theirs && printf 'a\\n' > README.md && git commit -qam a && git switch -q orchestra/case",
        wt,
    )
    sh("printf 'b\\n' > README.md && git commit -qam b && (git merge -q theirs || true)", wt)


def c_unmerged(repo, wt):
    commit_in(wt, "u.txt")


def c_merged(repo, wt):
    commit_in(wt, "m.txt")
    git("merge", "-q", "--no-ff", "--no-edit", "orchestra/case", cwd=repo)


def c_user_stash(repo, wt):
    sh(
        "printf 'user\\n' >> README.md && git stash -q", repo
    )  # the user's own stash, not the agent's


def c_checked_out_elsewhere(repo, wt):
    sh("git checkout -q --detach", wt)
    git("worktree", "add", "-q", str(repo.parent / "elsewhere"), "orchestra/case", cwd=repo)


def c_user_prunable(repo, wt):
    git("worktree", "add", "-q", "--detach", str(repo.parent / "users-own"), cwd=repo)
    sh(f"rm -rf {repo.parent / 'users-own'}", repo)


def c_folder_deleted_unmerged(repo, wt):
    commit_in(wt, "gone.txt")
    sh(f"rm -rf {wt}", repo)


def c_index_only_delete(repo, wt):
    sh("git rm -q --cached README.md", wt)


def c_gitattributes_filter(repo, wt):
    sh("printf '* text eol=crlf\\n' > .git-attrs-test && printf 'a\\r\\nb\\n' > crlf.txt", wt)


def c_many_files(repo, wt):
    sh('mkdir -p many && for i in $(seq 1 150); do printf "$i\\n" > many/f$i.txt; done', wt)


def c_hooks_path(repo, wt):
    git("config", "core.hooksPath", "/nonexistent", cwd=wt)
    sh("printf 'x\\n' > hook-free.txt", wt)


def c_fsmonitor(repo, wt):
    git("config", "core.fsmonitor", "true", cwd=wt)
    sh("printf 'x\\n' > watched.txt", wt)


def c_sparse(repo, wt):
    git("config", "core.sparseCheckout", "true", cwd=wt)
    sh("printf 'x\\n' > sparse.txt", wt)


MATRIX = {
    "clean, nothing done": (c_setup_unchanged, None),
    "merged commit": (c_merged, None),
    "unmerged commit": (c_unmerged, "1 commit not merged into main"),
    "detached HEAD, 1 commit": (c_detached_one, "HEAD is detached with 1 commit not on any branch"),
    "detached HEAD, 2 commits": (c_detached_two, "HEAD is detached with 2 commits not on any branch"),
    "other branch checked out": (c_other_branch, "its worktree has branch side checked out instead of orchestra/case"),
    "reset after commit": (c_reset_after_commit, "1 commit only in the worktree's reflog"),
    "amend after commit": (c_amend, "1 commit only in the worktree's reflog"),
    "one stash": (c_stash, "1 stash made in the worktree"),
    "two stashes": (c_two_stashes, "2 stashes made in the worktree"),
    "stash with untracked": (c_stash_untracked, "1 stash made in the worktree"),
    "staged new file": (c_staged, "staged changes in the index"),
    "staged, then changed on disk": (c_staged_then_changed, "staged changes in the index"),
    "untracked file deep": (c_deep_untracked, "untracked file a/b/c/d.txt"),
    "ignored file": (c_ignored, "ignored file x.log"),
    "ignored file in ignored folder": (c_ignored_deep, "ignored file build/out/a.bin"),
    "core.excludesFile hides it": (c_global_excludes, "k.secret"),
    "status.showUntrackedFiles=no": (c_status_hidden, "untracked file hidden.txt"),
    "assume-unchanged": (c_assume_unchanged, "uncommitted change README.md"),
    "skip-worktree": (c_skip_worktree, "uncommitted change README.md"),
    "tracked file deleted": (c_deleted, "deleted file README.md"),
    "tracked file modified": (c_modified, "uncommitted change README.md"),
    "executable bit": (c_exec_bit, "uncommitted change README.md"),
    "untracked symlink": (c_symlink, "untracked file link"),
    "nested repository": (c_nested_repo, "nested repository nested"),
    "nested repository, all committed": (c_nested_clean, "nested repository inner"),
    "submodule with unpushed commit": (c_submodule, "nested repository sub"),
    "setup files unchanged": (c_setup_unchanged, None),
    "setup folder file changed": (c_setup_file_changed, "ignored file node_modules/x/i.js"),
    "setup folder file added": (c_setup_file_added, "ignored file node_modules/x/new.js"),
    "copied .env changed": (c_copy_changed, "ignored file .env"),
    "non-UTF-8 file name": (c_non_utf8, "untracked file caf\ufffd.txt"),
    "newline in file name": (c_newline_name, "untracked file two\\nlines.txt"),
    "branch deleted, worktree holds commit": (c_branch_deleted, "branch orchestra/case was renamed or deleted; its worktree holds 1 commit"),
    "branch renamed": (c_branch_renamed, "branch orchestra/case was renamed or deleted; its worktree has mine checked out"),
    "empty folder only": (c_empty_dir, None),
    "fifo only": (c_fifo, None),
    "binary file": (c_binary, "untracked file blob.bin"),
    "tracked file became a folder": (c_file_to_dir, "untracked file README.md/inside"),
    "merge conflict in the worktree": (c_conflict, "unresolved conflicts in the index"),
    "user's own stash": (c_user_stash, None),
    "branch checked out in another worktree": (c_checked_out_elsewhere, None),
    "user's prunable worktree": (c_user_prunable, None),
    "folder deleted, commit unmerged": (c_folder_deleted_unmerged, "1 commit not merged into main"),
    "removed from the index only": (c_index_only_delete, "staged changes in the index"),
    "CRLF bytes": (c_gitattributes_filter, "crlf.txt"),
    "150 untracked files": (c_many_files, "and 147 more"),
    "core.hooksPath set by the agent": (c_hooks_path, "untracked file hook-free.txt"),
    "core.fsmonitor set by the agent": (c_fsmonitor, "untracked file watched.txt"),
    "core.sparseCheckout set by the agent": (c_sparse, "untracked file sparse.txt"),
}  # fmt: skip


@pytest.fixture
def case_repo(repo):
    """A repository with ignore rules, a copied .env and a setup-made folder, like a real project."""
    exclude = repo / ".git" / "info" / "exclude"
    exclude.write_text("*.log\nbuild/\n.env\nnode_modules/\n")
    (repo / ".env").write_text("SECRET=1\n")
    write_config(repo, agent_command=FAKE_AGENT_COMMAND, copy_files=[".env"],
                 setup=["mkdir -p node_modules/x && printf 'made by setup\\n' > node_modules/x/i.js"])  # fmt: skip
    return repo


@pytest.mark.parametrize("case", list(MATRIX))
def test_matrix(case_repo, cli, case):
    do, keep_reason = MATRIX[case]
    wt = spawn_one(cli, case_repo, "case")
    do(case_repo, wt)
    before = inventory(case_repo)

    plain = cli("cleanup", "case")
    assert plain.code == 0, plain
    line = line_for(plain.out, "case")
    if keep_reason is None:
        assert line.startswith(("REMOVED case: no changes: no commits, nothing uncommitted",
                                "REMOVED case: merged, nothing uncommitted")), line  # fmt: skip
    else:
        assert line.startswith("KEEP case: ") and keep_reason in line, line
        assert_nothing_lost(case_repo, before)
        assert os.path.lexists(wt) == os.path.lexists(before["worktrees"][-1]) or not wt.exists()
        forced = cli("cleanup", "--force", "case")
        assert forced.code == 0, forced
        assert line_for(forced.out, "case").startswith("REMOVED case: forced past: "), forced.out
    assert_nothing_lost(case_repo, before)
    assert not wt.exists()
    assert load_state(case_repo)["agents"]["case"]["state"] == "removed"
    if case == "user's prunable worktree":  # never `git worktree prune` what orchestra did not make
        assert "users-own" in git("worktree", "list", "--porcelain", cwd=case_repo)
    if case == "branch checked out in another worktree":
        assert git("rev-parse", "--verify", "orchestra/case", cwd=case_repo)
        assert (case_repo.parent / "elsewhere" / "README.md").exists()
    if case == "user's own stash":
        assert git("stash", "list", cwd=case_repo).count("\n") == 1


RESTORED_FILES = {
    "tracked file modified": ("README.md", "# demo\nmore\n"),
    "untracked file deep": ("a/b/c/d.txt", "deep\n"),
    "ignored file in ignored folder": ("build/out/a.bin", "bin\n"),
    "setup folder file changed": ("node_modules/x/i.js", "edited\n"),
    "nested repository": ("nested/f.txt", "n\n"),
    "untracked symlink": ("link", "# demo\n"),
    "submodule with unpushed commit": ("sub/local.txt", "local\n"),
}


@pytest.mark.parametrize("case", list(RESTORED_FILES))
def test_restore_brings_back_files(case_repo, cli, case):
    do, _ = MATRIX[case]
    wt = spawn_one(cli, case_repo, "case")
    do(case_repo, wt)
    assert cli("cleanup", "--force", "case").code == 0
    assert not wt.exists()
    restored = cli("restore", "case")
    assert restored.code == 0, restored
    assert restored.out.startswith("case: restored branch, worktree, ")
    assert "files as branch orchestra/case in " in restored.out
    name, content = RESTORED_FILES[case]
    assert (wt / name).read_text() == content
    assert load_state(case_repo)["agents"]["case"]["state"] == "done"
    if case == "nested repository":
        assert git("log", "--format=%s", cwd=wt / "nested").strip() == "nested"
    if case == "submodule with unpushed commit":  # its git dir lived in the removed admin folder
        assert git("log", "-1", "--format=%s", cwd=wt / "sub").strip() == "unpushed"
        assert git("status", "--porcelain", cwd=wt / "sub") == ""
    again = cli("restore", "case")
    assert again.code == 2 and "already exists" in again.err


def test_restore_of_stash_index_and_detached_head(case_repo, cli):
    wt = spawn_one(cli, case_repo, "case")
    c_detached_one(case_repo, wt)
    sh(
        "printf 'stashed\\n' >> README.md && git stash -q && printf 'staged\\n' > s.txt && git add s.txt",
        wt,
    )
    assert cli("cleanup", "--force", "case").code == 0
    listing = cli("cleanup", "--list-archives")
    assert all(len(line) <= 80 for line in listing.out.splitlines()), listing.out
    assert "restore: orchestra restore case/" in listing.out
    doc = cli("cleanup", "--list-archives", "--json").json()["archives"][0]
    assert set(doc["refs"]) == {"tip", "head", "stash", "index", "worktree"}
    restored = cli("restore", "case")
    assert restored.code == 0
    assert git("show", ":s.txt", cwd=wt) == "staged\n"  # the index came back
    assert git("show", f"{doc['refs']['head']}:d.txt", cwd=case_repo) == "work\n"
    assert "stashed" in git("show", doc["refs"]["stash"], cwd=case_repo)


def test_restore_refuses_an_unknown_id(case_repo, cli):
    run = cli("restore", "nobody")
    assert run.code == 2 and run.err.startswith("orchestra: error: no archive of 'nobody'")


def test_resume_and_send_of_a_removed_agent_point_at_restore(case_repo, cli):
    spawn_one(cli, case_repo, "case")
    assert cli("cleanup", "case").code == 0
    for argv in (("resume", "case"), ("send", "case", "more please")):
        run = cli(*argv)
        assert run.code == 2
        assert "was cleaned up; its work is saved under refs/orchestra/archive/case/" in run.err
        assert "'orchestra restore case'" in run.err and "fsck" not in run.err
    diff = cli("diff", "case")  # read from its archive
    assert diff.code == 0 and "case was cleaned up: this is its archive" in diff.out
    assert "'orchestra restore case' brings it back" in diff.out


def test_the_id_of_a_removed_agent_never_means_a_live_one_it_prefixes(case_repo, cli):
    spawn_one(cli, case_repo, "case")
    assert cli("cleanup", "case").code == 0
    assert cli("spawn", "--name", "case-2", "sleep:30 still working").code == 0
    for argv in (
        ("stop", "case"),
        ("pause", "case"),
        ("retry", "case"),
        ("approve", "case"),
        ("deny", "case"),
    ):
        run = cli(*argv)
        assert run.code == 2, (argv, run)
        assert (
            "case was cleaned up; its work is saved under refs/orchestra/archive/case/" in run.err
        ), argv
    assert cli("status", "--json").json()["agents"][0]["state"] in ("queued", "running")
    assert cli("stop", "case-2").code == 0


# --- collect --merge: the user's checkout is sacred ----------------------------------------


@pytest.fixture
def merge_repo(case_repo, cli):
    """One finished agent that committed new.txt and build/gen.txt, not merged yet."""
    wt = spawn_one(cli, case_repo, "case")
    sh("printf 'agent\\n' > new.txt && mkdir -p build && printf 'gen\\n' > build/gen.txt && "
       "git add -f new.txt build/gen.txt && git commit -qm work", wt)  # fmt: skip
    return case_repo


@pytest.mark.parametrize("path", ["new.txt", "build/gen.txt"])
def test_merge_never_overwrites_untracked_or_ignored_files(merge_repo, cli, path):
    (merge_repo / path).parent.mkdir(exist_ok=True)
    (merge_repo / path).write_text("the user's own\n")
    before = inventory(merge_repo)
    run = cli("collect", "--merge")
    assert run.code == 1, run
    assert f"would overwrite your untracked or ignored {path}" in run.out
    assert (merge_repo / path).read_text() == "the user's own\n"
    assert git("rev-parse", "HEAD", cwd=merge_repo) == before["refs"]["refs/heads/main"] + "\n"
    assert_nothing_lost(merge_repo, before)


@pytest.mark.parametrize("mark", ["--assume-unchanged", "--skip-worktree"])
def test_merge_refuses_a_change_git_status_is_told_to_hide(case_repo, cli, mark):
    wt = spawn_one(cli, case_repo, "case")
    sh("printf 'agent\\n' > README.md && git commit -qam 'agent edits the readme'", wt)
    sh(f"git update-index {mark} README.md && printf 'the user own\\n' > README.md", case_repo)
    before = inventory(case_repo)
    run = cli("collect", "--merge")
    assert run.code == 2, run
    assert "has changes git status does not show (uncommitted change README.md" in run.err
    assert (case_repo / "README.md").read_text() == "the user own\n"
    assert_nothing_lost(case_repo, before)


@pytest.mark.parametrize(
    "start, name",
    [
        ("git checkout -q -b topic && printf 'x\\n' > README.md && git commit -qam x && git checkout -q main && "
         "printf 'y\\n' > README.md && git commit -qam y && git checkout -q topic && (git rebase main || true)", "a rebase"),
        ("git checkout -q -b t2 && printf 'x\\n' > README.md && git commit -qam x && git checkout -q main && "
         "printf 'y\\n' > README.md && git commit -qam y && (git cherry-pick t2 || true)", "a cherry-pick"),
        ("printf 'x\\n' > README.md && git commit -qam x && printf 'y\\n' > README.md && git commit -qam y && "
         "(git revert --no-edit HEAD~1 || true)", "a revert"),
        ("git bisect start", "a bisect"),
        ("git checkout -q -b t3 && printf 'x\\n' > README.md && git commit -qam x && git checkout -q main && "
         "printf 'y\\n' > README.md && git commit -qam y && (git merge t3 || true)", "a merge"),
    ],
)  # fmt: skip
def test_merge_refuses_during_an_operation(merge_repo, cli, start, name):
    sh(start, merge_repo)
    run = cli("collect", "--merge")
    assert run.code == 2
    assert run.err.startswith(f"orchestra: error: {name} is in progress in {merge_repo}"), run.err


def test_merge_from_a_linked_worktree_needs_into(merge_repo, cli, monkeypatch):
    git("worktree", "add", "-q", "--detach", str(merge_repo.parent / "linked"), cwd=merge_repo)
    monkeypatch.chdir(merge_repo.parent / "linked")
    run = cli("collect", "--merge")
    assert run.code == 2 and "pass --into main to confirm" in run.err
    wrong = cli("collect", "--merge", "--into", "other")
    assert wrong.code == 2 and "check out other there first" in wrong.err
    right = cli("collect", "--merge", "--into", "main")
    assert right.code == 0, right
    assert (merge_repo / "new.txt").exists()


def test_merge_conflict_exits_1_and_status_shows_landed_and_blocked(case_repo, cli):
    wt = spawn_one(cli, case_repo, "case")
    commit_in(wt, "README.md", "agent")
    wt2 = spawn_one(cli, case_repo, "good")
    commit_in(wt2, "good.txt")
    commit_in(case_repo, "README.md", "user")
    run = cli("collect", "--merge")
    assert run.code == 1 and "Not merged: case: conflicts with main in README.md" in run.out
    assert "Merged: good" in run.out  # the queue goes on past a conflict
    assert not (case_repo / ".git" / "MERGE_HEAD").exists()
    assert cli("collect", "--merge", "good").out.count("Merged: nothing new") == 1
    doc = {a["id"]: a for a in cli("status", "--json").json()["agents"]}
    assert doc["good"]["merged"] is True and doc["case"]["merged"] is False
    assert doc["good"]["landed"]["into"] == "main" and doc["case"]["blocked"]["reason"]
    assert "done landed" in cli("status").out and "blocked" in cli("status").out


def test_ctrl_c_during_merge_leaves_the_checkout_as_before(case_repo, cli):
    # collect --merge lands: the merge and its checks happen in the scratch worktree, so Ctrl-C
    # there leaves the user's checkout, its index and the branch exactly as they were
    pid_file = case_repo.parent / "check.pid"
    slow_when_landing = f'case "$PWD" in */.orchestra/land) test -f {pid_file} || {{ echo $$ > {pid_file}; sleep 30; }};; esac'
    write_config(case_repo, agent_command=FAKE_AGENT_COMMAND, checks=[slow_when_landing])
    wt = spawn_one(cli, case_repo, "case")
    commit_in(wt, "new.txt", "agent")
    start = git("rev-parse", "HEAD", cwd=case_repo)
    proc = subprocess.Popen([*ORCHESTRA, "collect", "--merge"], cwd=case_repo, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=60,
             what="the checks on the merged result to start")  # fmt: skip
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the whole foreground group
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert b"Traceback" not in err
    assert git("rev-parse", "HEAD", cwd=case_repo) == start
    assert not (case_repo / ".git" / "MERGE_HEAD").exists()
    assert not (case_repo / "new.txt").exists()
    assert git("status", "--porcelain", "--untracked-files=no", cwd=case_repo) == ""
    again = subprocess.run(  # the check passes at once now that the pid file exists
        [*ORCHESTRA, "collect", "--merge"], cwd=case_repo, capture_output=True, text=True
    )
    assert again.returncode == 0, again
    assert (case_repo / "new.txt").read_text() == "agent\n"
    assert git("status", "--porcelain", "--untracked-files=no", cwd=case_repo) == ""


def test_pr_without_a_remote_exits_1(merge_repo, cli):
    run = cli("collect", "--pr")
    assert run.code == 1 and "cannot open pull requests: no git remote is configured" in run.out


def test_uncommitted_only_gets_a_commit_hint_and_commit_handles_non_utf8(case_repo, cli):
    wt = spawn_one(cli, case_repo, "case")
    c_non_utf8(case_repo, wt)
    run = cli("collect")
    assert "case: all the work is uncommitted; 'orchestra collect --commit'" in run.out
    committed = cli("collect", "--commit")
    assert committed.code == 0, committed
    names = subprocess.run(["git", "ls-tree", "--name-only", "-z", "orchestra/case"], cwd=case_repo,
                           capture_output=True).stdout.split(b"\0")  # fmt: skip
    assert b"caf\xe9.txt" in names


@pytest.mark.parametrize("mark", ["--assume-unchanged", "--skip-worktree"])
def test_commit_takes_changes_git_status_is_told_to_hide(case_repo, cli, mark):
    wt = spawn_one(cli, case_repo, "case")
    sh(f"git update-index {mark} README.md && printf 'agent work\\n' > README.md", wt)
    committed = cli("collect", "--commit")
    assert committed.code == 0, committed
    assert git("show", "orchestra/case:README.md", cwd=case_repo) == "agent work\n"


# --- stopping, interrupting, faults ---------------------------------------------------------


STUBBORN = (
    "import os, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', "
    "'import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    'open("child.pid", "w").write(str(__import__("os").getpid()))\\n'
    'while True:\\n    open("out.txt", "a").write("x")\\n    time.sleep(0.05)\'])\n'
    "time.sleep(600)\n"
)


def test_force_kills_children_that_ignore_sigterm_before_archiving(case_repo, cli):
    write_config(case_repo, agent_command=[sys.executable, "-c", STUBBORN, "{task}"])
    assert cli("spawn", "--name", "stubborn", "write forever").code == 0
    wt = case_repo / ".worktrees" / "task-stubborn"
    pid = int(
        wait_for(
            lambda: (wt / "child.pid").exists() and (wt / "child.pid").read_text(), what="the child"
        )
    )
    run = cli("cleanup", "--all", "--force", "stubborn")
    assert run.code == 0, run
    assert line_for(run.out, "stubborn").startswith("REMOVED stubborn: forced past: still running")
    assert process_state(pid) is None
    refs = load_state(case_repo)["agents"]["stubborn"]["archive"]
    snapshot = next(r for r in refs if r.endswith("-worktree"))
    assert git("show", f"{snapshot}:out.txt", cwd=case_repo).startswith("x")


def test_ctrl_c_during_spawn_of_8_leaves_nothing_half_prepared(case_repo):
    write_config(
        case_repo, agent_command=FAKE_AGENT_COMMAND, setup=["sleep 8"]
    )  # still preparing at Ctrl-C
    proc = subprocess.Popen([*ORCHESTRA, "spawn", *(f"task number {i}" for i in range(8))], cwd=case_repo,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    # Spawn makes the first worktree itself (the supervisor the rest, once spawn hands them over).
    wait_for(
        lambda: len(list((case_repo / ".worktrees").glob("task-*"))) >= 1,
        timeout=30,
        what="worktrees",
    )
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: spawn, its git and its setup shells
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err, err
    agents = load_state(case_repo)["agents"]
    assert len(agents) == 8
    assert {a["state"] for a in agents.values()} == {"failed"}, agents
    assert {a["error"] for a in agents.values()} == {
        "spawn was interrupted before the agent started"
    }
    assert not list((case_repo / ".worktrees").glob("task-*"))  # no half-checked-out worktree left
    run = subprocess.run(
        [*ORCHESTRA, "cleanup", "--all"], cwd=case_repo, capture_output=True, text=True
    )
    assert run.returncode == 0 and "KEEP" not in run.stdout, run
    assert run.stdout.count("REMOVED task-number-") == 8, run


def test_killed_spawn_is_rolled_back_by_the_next_command(case_repo):
    write_config(case_repo, agent_command=FAKE_AGENT_COMMAND, setup=["sleep 30"])
    proc = subprocess.Popen([*ORCHESTRA, "spawn", "one", "two"], cwd=case_repo, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for(
        lambda: len(list((case_repo / ".worktrees").glob("task-*"))) == 1,
        timeout=30,
        what="worktrees",
    )
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run = subprocess.run([*ORCHESTRA, "cleanup"], cwd=case_repo, capture_output=True, text=True)
    assert run.returncode == 0, run
    agents = load_state(case_repo)["agents"]
    assert {a["state"] for a in agents.values()} <= {"failed", "removed"}, agents
    assert not list((case_repo / ".worktrees").glob("task-*"))


def test_ctrl_c_during_forced_cleanup_then_rerun(case_repo, cli):
    for i in range(6):
        wt = spawn_one(cli, case_repo, f"agent-{i}")
        c_deep_untracked(case_repo, wt)
        c_binary(case_repo, wt)
    before = inventory(case_repo)
    proc = subprocess.Popen([*ORCHESTRA, "cleanup", "--force"], cwd=case_repo, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    wait_for(
        lambda: git("for-each-ref", "refs/orchestra/archive/", cwd=case_repo),
        timeout=30,
        what="an archive",
    )
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130) and b"Traceback" not in err, err
    assert_nothing_lost(case_repo, before)
    for agent_id, record in load_state(case_repo)["agents"].items():
        if not Path(record["worktree"]).exists():
            assert record.get(
                "archive"
            ), agent_id  # never a removed worktree without a recorded archive
    rerun = subprocess.run(
        [*ORCHESTRA, "cleanup", "--force"], cwd=case_repo, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun
    assert {r["state"] for r in load_state(case_repo)["agents"].values()} == {"removed"}
    assert_nothing_lost(case_repo, before)


def test_two_cleanups_at_once(case_repo, cli):
    for i in range(4):
        wt = spawn_one(cli, case_repo, f"agent-{i}")
        c_binary(case_repo, wt)
    before = inventory(case_repo)
    procs = [subprocess.Popen([*ORCHESTRA, "cleanup", "--force"], cwd=case_repo, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    text = "".join(out + err for out, err in outs)
    assert "git is not installed" not in text and "Traceback" not in text
    assert text.count("REMOVED") == 4, text
    assert_nothing_lost(case_repo, before)


def test_cleanup_during_spawn_keeps_what_spawn_prepares(case_repo, cli):
    write_config(case_repo, agent_command=FAKE_AGENT_COMMAND, setup=["sleep 4"])
    proc = subprocess.Popen([*ORCHESTRA, "spawn", "--name", "slow", "slow setup"], cwd=case_repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    wait_for(
        lambda: (case_repo / ".worktrees" / "task-slow").exists(), timeout=30, what="the worktree"
    )
    run = subprocess.run(
        [*ORCHESTRA, "cleanup", "--all", "--force"], cwd=case_repo, capture_output=True, text=True
    )
    assert (
        run.returncode == 0
        and run.stdout == "KEEP slow: its worktree is still being prepared by spawn\n"
    ), run
    assert proc.wait(timeout=60) == 0


@pytest.fixture
def tiny_orchestra_dir(case_repo):
    """.orchestra/ on a small tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    folder = case_repo / ".orchestra"
    saved = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)], check=True)
    for name, data in saved.items():
        (folder / name).write_bytes(data)
    (folder / "logs").mkdir()
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_full_or_read_only_orchestra_dir(case_repo, cli, tiny_orchestra_dir, fault):
    write_config(case_repo, agent_command=FAKE_AGENT_COMMAND)
    wt = spawn_one(cli, case_repo, "case")
    c_deep_untracked(case_repo, wt)
    before = inventory(case_repo)
    if fault == "full":
        with open(tiny_orchestra_dir / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
    else:  # a supervisor still exiting holds supervisor.log open for writing: mount would refuse
        wait_for(lambda: not cli("status", "--json").json()["supervisor"]["alive"], timeout=60,
                 what="the supervisor to exit")  # fmt: skip
        wait_for(lambda: subprocess.run(["mount", "-o", "remount,ro", str(tiny_orchestra_dir)],
                                        capture_output=True).returncode == 0,
                 timeout=30, interval=0.5, what="the folder to be remounted read-only")  # fmt: skip
    run = subprocess.run(
        [*ORCHESTRA, "cleanup", "--force"], cwd=case_repo, capture_output=True, text=True
    )
    assert run.returncode == 1, run
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("orchestra: error: ")
    assert wt.is_dir() and (wt / "a/b/c/d.txt").exists()  # never removed without a recorded archive
    assert_nothing_lost(case_repo, before)
    if fault == "read-only":
        subprocess.run(["mount", "-o", "remount,rw", str(tiny_orchestra_dir)], check=True)
    else:
        (tiny_orchestra_dir / "filler").unlink()
    again = subprocess.run(
        [*ORCHESTRA, "cleanup", "--force"], cwd=case_repo, capture_output=True, text=True
    )
    assert again.returncode == 0 and again.stdout.startswith("REMOVED case:"), again
    assert_nothing_lost(case_repo, before)


def test_status_json_has_merged_for_every_agent(case_repo, cli):
    spawn_one(cli, case_repo, "case")
    doc = cli("status", "--json").json()
    assert doc["agents"][0]["merged"] is False
    assert json.dumps(doc)


# --- the real claude CLI does it itself -------------------------------------------------------


# A real agent's new branch or stash changes refs it shares with the user: the containment guard
# asks, and the integrity check puts them back (kept under refs/orchestra/tampered/). Cleanup of
# worktrees in those states is covered above by agents that are not contained.
REAL_AGENT_CASES = {
    "detaches HEAD and commits": (
        "git checkout -q --detach && printf 'd\\n' > d.txt && git add d.txt && git commit -qm detached",
        "HEAD is detached with 1 commit not on any branch",
    ),
    "resets after committing": (
        "printf 'r\\n' > r.txt && git add r.txt && git commit -qm r && git reset -q --hard HEAD~1",
        "1 commit only in the worktree's reflog",
    ),
}


@requires_claude
@pytest.mark.parametrize("case", list(REAL_AGENT_CASES))
def test_real_claude_agent(claude_repo, claude_api, cli, case):
    command, reason = REAL_AGENT_CASES[case]
    claude_api.script("scripted-git", [bash(command), text("did it")])
    assert cli("spawn", "--name", "real", "scripted-git work").code == 0

    def settled_after_approving():  # the containment guard asks before git stash or a new branch
        if cli("approvals", "--json").json()["approvals"]:
            cli("approve", "real")
        return load_state(claude_repo)["agents"]["real"]["state"] == "done"

    wait_for(settled_after_approving, timeout=120, what="the agent to finish")
    wait_settled(claude_repo)
    before = inventory(claude_repo)
    kept = cli("cleanup", "real")
    assert kept.out.startswith("KEEP real: ") and reason in kept.out, kept.out
    forced = cli("cleanup", "--force", "real")
    assert forced.out.startswith("REMOVED real: forced past: "), forced.out
    assert_nothing_lost(claude_repo, before)
    assert cli("restore", "real").code == 0
    assert (claude_repo / ".worktrees" / "task-real").is_dir()


def test_sessions_resume_of_a_cleaned_up_agent_points_at_restore(case_repo, cli):
    import orchestra

    wt = spawn_one(cli, case_repo, "case")
    commit_in(wt, "c.txt")
    assert cli("cleanup", "--force", "case").code == 0
    plan = orchestra.ResumePlan("0" * 36, str(wt), ["claude", "--resume", "0" * 36])
    lines = orchestra.recovery_lines(plan, "orchestra/case", str(case_repo))
    assert f"cd {case_repo} && orchestra restore case" in lines
    assert not any("fsck" in line for line in lines)


def test_full_disk_under_the_whole_repository(tmp_path, cli, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        repo = disk / "repo"
        subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
        (repo / "README.md").write_text("# demo\n")
        git("add", "README.md", cwd=repo)
        git("commit", "-qm", "initial commit", cwd=repo)
        monkeypatch.chdir(repo)
        write_config(repo, agent_command=FAKE_AGENT_COMMAND)
        wt = spawn_one(cli, repo, "case")
        (wt / "big.bin").write_bytes(os.urandom(1_000_000))
        before = inventory(repo)
        with open(disk / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        run = subprocess.run(
            [*ORCHESTRA, "cleanup", "--force"], cwd=repo, capture_output=True, text=True
        )
        assert run.returncode == 1, run
        assert "Traceback" not in run.stderr + run.stdout
        assert (wt / "big.bin").exists()
        (disk / "filler").unlink()
        again = subprocess.run(
            [*ORCHESTRA, "cleanup", "--force"], cwd=repo, capture_output=True, text=True
        )
        assert again.returncode == 0 and again.stdout.startswith("REMOVED case:"), again
        assert_nothing_lost(repo, before)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_collect_names_what_the_branch_does_not_show(case_repo, cli):
    wt = spawn_one(cli, case_repo, "case")
    c_detached_one(case_repo, wt)
    sh("printf 'x\\n' >> README.md && git stash -q", wt)
    run = cli("collect")
    assert "No commits on orchestra/case." in run.out
    assert "Note: HEAD is detached with 1 commit not on any branch" in run.out
    assert "Note: 1 stash made in the worktree" in run.out
    assert cli("collect", "--json").json()["agents"][0]["notes"] == [
        "HEAD is detached with 1 commit not on any branch",
        "1 stash made in the worktree",
    ]


# --- round two: what a second tester found past the matrix (issue 20), one test per class ------


def archived_blob(repo, data):
    """True when a blob of exactly these bytes is reachable from a ref."""
    return blob_hash(data) in reachable_objects(repo)[1]


@pytest.mark.parametrize(
    "broken", ["git init in place of .git", ".git file gone", "another owner", "HEAD unreadable"]
)
def test_1_a_git_failure_keeps_the_agent_and_the_others_go_on(case_repo, cli, broken):
    bad, good = spawn_one(cli, case_repo, "bad"), spawn_one(cli, case_repo, "good")
    sh(
        "git checkout -q --detach && printf 'd\\n' > d.txt && git add d.txt && git commit -qm d",
        bad,
    )
    detached = git("rev-parse", "HEAD", cwd=bad).strip()
    sh("printf 'mine\\n' > notes.txt", bad)
    if broken == "git init in place of .git":
        sh("rm -f .git && git init -q", bad)
    elif broken == ".git file gone":  # what a delete killed half-way used to leave
        os.unlink(bad / ".git")
    elif broken == "another owner":  # git refuses: "detected dubious ownership"
        os.chown(bad, 4242, 4242)
    else:  # the worktree looks like ours, but git dies reading it
        admin = git("rev-parse", "--absolute-git-dir", cwd=bad).strip()
        Path(admin, "HEAD").write_text("garbage\n")
    forced = cli("cleanup", "--force")
    assert forced.code == 1, forced
    assert line_for(forced.out, "bad").startswith("KEEP bad: "), forced.out
    assert "kept as it is" in line_for(forced.out, "bad")
    assert line_for(forced.out, "good").startswith("REMOVED good: "), forced.out
    assert (bad / "notes.txt").read_text() == "mine\n" and not good.exists()
    assert git_ok("cat-file", "-t", detached, cwd=case_repo).strip() == "commit"
    collected = cli("collect")
    assert collected.code == 1 and "Error: bad: " in collected.out, collected
    named = cli("cleanup", "--force", "bad")
    assert named.code == 1 and "KEEP bad: " in named.out, named
    assert (bad / "notes.txt").exists()


@pytest.fixture
def linked_worktree_dir(case_repo, tmp_path):
    """`.worktrees` is a symlink to a folder elsewhere: git records the real paths."""
    real = tmp_path / "real-worktrees"
    real.mkdir()
    (case_repo / ".worktrees").symlink_to(real)
    return case_repo


def test_2_paths_are_compared_with_symlinks_resolved(linked_worktree_dir, cli):
    repo = linked_worktree_dir
    locked = spawn_one(cli, repo, "locked")
    done = spawn_one(cli, repo, "done")
    sh("printf 'keep\\n' > k.txt", locked)
    git("worktree", "lock", str(locked), cwd=repo)
    sh("printf 'w\\n' > w.txt", done)
    forced = cli("cleanup", "--force")
    assert line_for(forced.out, "locked").startswith("KEEP locked: worktree is locked"), forced.out
    assert (locked / "k.txt").exists()
    assert line_for(forced.out, "done").startswith("REMOVED done: "), forced.out
    assert not git("branch", "--list", "orchestra/done", cwd=repo).strip()
    restored = cli("restore", "done")
    assert restored.code == 0, restored
    assert (done / "w.txt").read_text() == "w\n"


@pytest.fixture
def sparse_repo(case_repo):
    """A base with two folders, so a sparse checkout can leave one out."""
    for folder in ("keep", "other"):
        (case_repo / folder).mkdir()
        (case_repo / folder / "f.txt").write_text(f"{folder}\n")
    git("add", "keep", "other", cwd=case_repo)
    git("commit", "-qm", "two folders", cwd=case_repo)
    return case_repo


def test_3_collect_commit_honours_a_sparse_checkout(sparse_repo, cli):
    wt = spawn_one(cli, sparse_repo, "sparse")
    sh("git sparse-checkout set keep", wt)
    assert not (wt / "other").exists()
    report = cli("collect", "sparse")
    assert "Uncommitted" not in report.out and "--commit" not in report.out, report.out
    assert cli("collect", "--commit", "sparse").code == 0
    assert git("ls-tree", "-r", "--name-only", "orchestra/sparse", cwd=sparse_repo).count("other/")
    assert line_for(cli("cleanup", "sparse").out, "sparse").startswith("REMOVED sparse: ")


def test_3_collect_commit_commits_only_onto_the_agents_own_branch(case_repo, cli):
    git("checkout", "-q", "-b", "dev", cwd=case_repo)
    wt = spawn_one(cli, case_repo, "wander")
    main_tip = git("rev-parse", "main", cwd=case_repo)
    sh("git checkout -q main && printf 'x\\n' > x.txt", wt)
    run = cli("collect", "--commit", "wander")
    assert run.code == 1, run
    assert "wander: its worktree has branch main checked out" in run.out, run.out
    assert git("rev-parse", "main", cwd=case_repo) == main_tip
    assert (wt / "x.txt").exists()


def test_3_collect_commit_keeps_a_staged_version_that_differs_from_the_disk(case_repo, cli):
    wt = spawn_one(cli, case_repo, "staged")
    sh("printf 'v1\\n' > s.txt && git add s.txt && printf 'v2\\n' > s.txt", wt)
    run = cli("collect", "--commit", "staged")
    assert run.code == 0, run
    assert "refs/orchestra/staged/staged/1" in run.out, run.out
    assert git("show", "refs/orchestra/staged/staged/1:s.txt", cwd=case_repo) == "v1\n"
    assert git("show", "orchestra/staged:s.txt", cwd=case_repo) == "v2\n"


def test_4_git_variables_in_the_environment_are_ignored(case_repo, cli, monkeypatch):
    write_config(case_repo, agent_command=["sh", "-c", "{task}"])
    (case_repo / "user.txt").write_text("staged by the user\n")
    git("add", "user.txt", cwd=case_repo)
    user_tip = git("rev-parse", "main", cwd=case_repo)
    monkeypatch.setenv("GIT_DIR", str(case_repo / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(case_repo))
    monkeypatch.setenv("GIT_INDEX_FILE", str(case_repo / ".git" / "index"))
    task = "printf 'a\\n' > a.txt && git add a.txt && git commit -qm agent"
    assert cli("spawn", "--name", "envy", task).code == 0
    wait_settled(case_repo)
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(name)
    assert git("rev-parse", "main", cwd=case_repo) == user_tip
    assert "user.txt" in git("diff", "--cached", "--name-only", cwd=case_repo)
    assert git("log", "-1", "--format=%s", "orchestra/envy", cwd=case_repo).strip() == "agent"


def test_5_a_write_after_the_last_look_keeps_the_worktree(case_repo, cli, monkeypatch):
    wt = spawn_one(cli, case_repo, "late")
    sh("printf 'early\\n' > early.txt", wt)
    original = orchestra.record_archive

    def then_an_editor_saves(*args):
        original(*args)
        (wt / "late.txt").write_text("saved by an editor\n")  # its cwd is elsewhere

    monkeypatch.setattr(orchestra, "record_archive", then_an_editor_saves)
    run = cli("cleanup", "--force", "late")
    line = line_for(run.out, "late")
    assert line.startswith("KEEP late: ") and "changed while cleanup ran" in line, run.out
    assert (wt / "late.txt").read_text() == "saved by an editor\n"
    monkeypatch.setattr(orchestra, "record_archive", original)
    assert cli("cleanup", "--force", "late").code == 0
    assert archived_blob(case_repo, b"saved by an editor\n")


def test_5_objects_pruned_under_a_fresh_archive_are_written_again(case_repo, cli, monkeypatch):
    wt = spawn_one(cli, case_repo, "pruned")
    sh("printf 'precious\\n' > p.txt", wt)
    original, sha = orchestra.write_refs, blob_hash(b"precious\n")
    calls = []

    def then_gc_prunes(repo, refs):
        original(repo, refs)
        calls.append(refs)
        if len(calls) == 1:  # what `git gc --prune=now` racing the archive did
            (case_repo / ".git" / "objects" / sha[:2] / sha[2:]).unlink()

    monkeypatch.setattr(orchestra, "write_refs", then_gc_prunes)
    assert cli("cleanup", "--force", "pruned").code == 0
    monkeypatch.setattr(orchestra, "write_refs", original)
    restored = cli("restore", "pruned")
    assert restored.code == 0, restored
    assert (wt / "p.txt").read_text() == "precious\n"


ODD_NAMES = [b"out.txt\r", b"-n", b"--help", b"caf\xe9.txt", b"two\nlines", b'"quoted"', b"x" * 250]


def test_6_odd_file_names_are_archived_with_their_own_bytes(case_repo, cli):
    wt = spawn_one(cli, case_repo, "odd")
    root = os.fsencode(str(wt))
    (wt / "out.txt").write_text("the other file\n")
    for i, name in enumerate(ODD_NAMES):
        Path(os.fsdecode(os.path.join(root, name))).write_bytes(b"bytes of %d\n" % i)
    assert cli("cleanup", "--force", "odd").code == 0
    assert not wt.exists()
    assert cli("restore", "odd").code == 0
    for i, name in enumerate(ODD_NAMES):
        assert Path(os.fsdecode(os.path.join(root, name))).read_bytes() == b"bytes of %d\n" % i
    assert (wt / "out.txt").read_text() == "the other file\n"


KILL_DURING_DELETE = """
import os, signal, sys
sys.path.insert(0, {root!r})
import orchestra
def delete_then_die(path):
    folder = os.fsdecode(path)
    if os.path.isfile(os.path.join(folder, "a.txt")):  # the worktree's own folder
        os.unlink(os.path.join(folder, ".git"))  # the delete got this far
        os.unlink(os.path.join(folder, "a.txt"))
        os.kill(os.getpid(), signal.{signal})
    original(path)  # a signal held back until the step is done: the delete goes on
original, orchestra.delete_tree = orchestra.delete_tree, delete_then_die
sys.exit(orchestra.main(["cleanup", "--force", "dying"]))
"""


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM", "SIGHUP"])
def test_7_a_signal_during_the_delete_then_a_rerun(case_repo, cli, signal_name):
    wt = spawn_one(cli, case_repo, "dying")
    sh("printf 'a\\n' > a.txt && mkdir -p deep && printf 'b\\n' > deep/b.txt", wt)
    before = inventory(case_repo)
    script = KILL_DURING_DELETE.format(root=str(ROOT), signal=signal_name)
    subprocess.run([sys.executable, "-c", script], cwd=case_repo, capture_output=True, timeout=120)
    assert_nothing_lost(case_repo, before)
    rerun = cli("cleanup", "--force")  # SIGTERM and SIGHUP wait until the step is done
    assert rerun.code == 0, rerun
    assert not wt.exists() and load_state(case_repo)["agents"]["dying"]["state"] == "removed"
    assert not [p for p in wt.parent.iterdir() if "dying" in p.name]
    assert_nothing_lost(case_repo, before)
    restored = cli("restore", "dying")
    assert restored.code == 0, restored
    assert (wt / "a.txt").read_text() == "a\n" and (wt / "deep" / "b.txt").read_text() == "b\n"


def test_8_archives_are_ordered_by_sequence_not_by_the_clock(case_repo, cli, monkeypatch):
    wt = spawn_one(cli, case_repo, "clock")
    sh("printf 'first\\n' > f.txt", wt)
    real_gmtime = time.gmtime
    monkeypatch.setattr(orchestra.time, "gmtime", lambda *a: real_gmtime(1900000000))
    assert cli("cleanup", "--force", "clock").code == 0
    assert cli("restore", "clock").code == 0
    sh("printf 'second\\n' > f.txt && printf 'more\\n' > g.txt", wt)
    monkeypatch.setattr(orchestra.time, "gmtime", lambda *a: real_gmtime(1500000000))  # clock back
    assert cli("cleanup", "--force", "clock").code == 0
    monkeypatch.setattr(orchestra.time, "gmtime", real_gmtime)
    assert cli("restore", "clock").code == 0
    assert (wt / "f.txt").read_text() == "second\n"


def test_8_a_restored_agent_survives_a_state_rebuild(case_repo, cli):
    wt = spawn_one(cli, case_repo, "back")
    sh("printf 'w\\n' > w.txt", wt)
    assert cli("cleanup", "--force", "back").code == 0
    assert cli("restore", "back").code == 0
    sh("printf 'new work\\n' > new.txt", wt)
    (case_repo / ".orchestra" / "state.json").write_text("{")
    status = cli("status", "--json")
    assert [a["id"] for a in status.json()["agents"]] == ["back"], status
    diff = cli("diff", "back", "--stat")
    assert "saved under" not in diff.out + diff.err, diff
    cleanup = cli("cleanup", "back")
    assert line_for(cleanup.out, "back").startswith("KEEP back: "), cleanup.out
    assert (wt / "new.txt").exists()


def test_9_a_worktree_the_agent_moved_is_kept(case_repo, cli, tmp_path):
    wt = spawn_one(cli, case_repo, "mover")
    moved = tmp_path / "moved-away"
    sh("printf 'w\\n' > w.txt", wt)
    git("worktree", "move", str(wt), str(moved), cwd=case_repo)
    forced = cli("cleanup", "--force", "mover")
    line = line_for(forced.out, "mover")
    assert line.startswith("KEEP mover: its worktree was moved to "), forced.out
    assert (moved / "w.txt").read_text() == "w\n"
    assert git("rev-parse", "--verify", "orchestra/mover", cwd=case_repo)


def test_9_commits_of_a_nested_worktree_are_archived(case_repo, cli):
    wt = spawn_one(cli, case_repo, "nest")
    sh("git worktree add -q --detach .claude/worktrees/inner", wt)
    inner = wt / ".claude" / "worktrees" / "inner"
    commit_in(inner, "inner.txt")
    lost = git("rev-parse", "HEAD", cwd=inner).strip()
    plain = cli("cleanup", "nest")
    assert "1 commit only in a worktree nested inside it" in line_for(plain.out, "nest"), plain.out
    assert cli("cleanup", "--force", "nest").code == 0
    git("worktree", "prune", cwd=case_repo)
    git("gc", "-q", "--prune=now", cwd=case_repo)
    assert lost in reachable_objects(case_repo)[0]


def test_10_filtered_files_equal_to_their_commit_are_no_change(case_repo, cli):
    (case_repo / ".gitattributes").write_text(
        "*.up filter=up\n*.u16 working-tree-encoding=UTF-16LE\n"
    )
    git("config", "filter.up.clean", "tr a-z A-Z", cwd=case_repo)
    git("config", "filter.up.smudge", "tr A-Z a-z", cwd=case_repo)
    (case_repo / "a.up").write_text("hello\n")
    (case_repo / "w.u16").write_bytes("héllo\n".encode("utf-16-le"))
    git("add", ".gitattributes", "a.up", "w.u16", cwd=case_repo)
    git("commit", "-qm", "filtered files", cwd=case_repo)
    wt = spawn_one(cli, case_repo, "filtered")
    assert (wt / "a.up").read_text() == "hello\n"
    run = cli("cleanup", "filtered")
    assert line_for(run.out, "filtered").startswith("REMOVED filtered: "), run.out
    other = spawn_one(cli, case_repo, "edited")
    (other / "a.up").write_text("changed\n")
    kept = cli("cleanup", "edited")
    assert "uncommitted change a.up" in line_for(kept.out, "edited"), kept.out
