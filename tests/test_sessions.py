"""Sessions: listing and resuming the user's own Claude Code sessions.

Golden values per real transcript fixture, the tolerance cases of the issue, --project across
real git worktrees, resume (including recreating a removed worktree), bad input, the message
count cache, and one end-to-end run of the real claude CLI against a scripted API.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import orchestra
from conftest import ROOT, git, make_repo
from scripted_api import CLAUDE, ScriptedAPI, bash, claude_env, requires_claude, text

FIXTURES = ROOT / "tests" / "fixtures" / "claude-sessions"  # written by tests/fixtures/make_*.py
NOW = float(int(time.time()))  # the clock the time-window tests stop at
HOUR = 3600
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SHOP = "/home/dev/shop"
REAL_CLI = (
    "9186e66c-cc25-4ce9-8411-82cb7d2033fa"  # written by claude 2.1.331 (make_real_session.py)
)

# fixture file -> its session id; listed newest first. Sub-agent transcripts go along (copy_fixtures).
FIXTURE_IDS = {
    "v2.1/21000000-0000-4000-8000-000000000002.jsonl": "21000000-0000-4000-8000-000000000002",
    "v2.1/21000000-0000-4000-8000-000000000001.jsonl": "21000000-0000-4000-8000-000000000001",
    "v2.0/20000000-0000-4000-8000-000000000001.jsonl": "20000000-0000-4000-8000-000000000001",
    "v1.0/10000000-0000-4000-8000-000000000002.jsonl": "10000000-0000-4000-8000-000000000002",
    "v1.0/10000000-0000-4000-8000-000000000001.jsonl": "10000000-0000-4000-8000-000000000001",
    f"real-cli/{REAL_CLI}.jsonl": REAL_CLI,
}
# id -> (title, first prompt, cwd, branch, messages, model, version), as the files were written.
# Messages are prompts and replies only (see make_claude_sessions.py for which line is which).
GOLDEN = {
    "21000000-0000-4000-8000-000000000002": (
        # A /rename title; the interruption, the command output and the <synthetic> model do not count.
        "login redirect fix", "fix the login redirect", f"{SHOP}/.worktrees/task-fix-login", "orchestra/fix-login",
        5, "claude-opus-4-6", "2.1.331"),
    "21000000-0000-4000-8000-000000000001": (
        # The last "model" in the file is a sub-agent's, nested in a progress line; the compact summary
        # and the tool results are not messages.
        "Payment module refactor", "Refactor the payment module", SHOP, "main", 4, "claude-opus-4-6", "2.1.39"),
    "20000000-0000-4000-8000-000000000001": (
        "Run the test suite and fix what fails", "Run the test suite and fix what fails", SHOP, "main", 5,
        "claude-sonnet-4-5-20250929", "2.0.28"),
    "10000000-0000-4000-8000-000000000002": (
        # Its leading summary describes the session before it.
        "Explain the checkout flow", "Explain the checkout flow", SHOP, None, 2, "claude-sonnet-4-20250514",
        "1.0.98"),
    "10000000-0000-4000-8000-000000000001": (
        # Titled by the summary the next session's first line holds; inline sidechain lines say nothing.
        "Signup form validation", "Add input validation to the signup form", SHOP, None, 3,
        "claude-sonnet-4-20250514", "1.0.98"),
    REAL_CLI: (
        # One prompt, one tool call, one reply: 2 messages.
        "please list-files", "please list-files", "/tmp/orchestra-fixture/shop", "main", 2, "claude-opus-5-5",
        "2.1.331"),
}  # fmt: skip


# --- helpers -------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def session_env(tmp_path, monkeypatch):
    """An empty Claude Code store and cache of our own, and a terminal 100 columns wide."""
    config = tmp_path / "claude"
    (config / "projects").mkdir(parents=True)
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(config))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "100")
    return config


@pytest.fixture
def store(session_env):
    return session_env


@pytest.fixture
def run(cli):
    """The shared in-process runner, under the name these tests use."""
    return cli


def folder_name(cwd):
    """Claude Code's project folder for a cwd."""
    return re.sub(r"[^A-Za-z0-9]", "-", cwd)


def put_session(store, cwd, session_id, data, age_hours=1.0):
    """Write a transcript into the store, last modified `age_hours` before NOW."""
    folder = store / "projects" / folder_name(cwd)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{session_id}.jsonl"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    os.utime(path, (NOW - age_hours * HOUR, NOW - age_hours * HOUR))
    return path


def lines(*records):
    """JSONL text of records."""
    return "".join(json.dumps(r) + "\n" for r in records)


def user(text, cwd="/work/app", session_id="", **extra):
    """A 2.1.x user prompt line."""
    return {"parentUuid": None, "isSidechain": False, "type": "user", "message": {"role": "user", "content": text},
            "uuid": f"u-{abs(hash(text)) % 10**8}", "timestamp": "2027-01-15T07:00:00.000Z", "cwd": cwd,
            "sessionId": session_id, "version": "2.1.331", "gitBranch": "main", **extra}  # fmt: skip


def assistant(reply, message_id="msg_1", cwd="/work/app"):
    """A 2.1.x assistant line with one text block."""
    return {"parentUuid": None, "isSidechain": False, "type": "assistant", "cwd": cwd, "version": "2.1.331",
            "message": {"id": message_id, "model": "claude-opus-4-6", "role": "assistant",
                        "content": [{"type": "text", "text": reply}]}, "gitBranch": "main"}  # fmt: skip


def new_id(n):
    """A valid session id, distinct for each n."""
    return f"{n:08x}-0000-4000-8000-{n:012x}"


def sessions_json(run, *args):
    """`sessions --json ARGS` as {id: session} without the clock's `age_seconds`, and the whole
    document (two listings a second apart describe the same sessions)."""
    result = run("sessions", "--json", *args)
    assert result.code == 0, result
    document = result.json()
    return {s["id"]: without_age(s) for s in document["sessions"]}, document


def without_age(session):
    """A listed session without `age_seconds`, which depends on when it was listed."""
    assert isinstance(session.get("age_seconds"), int) and session["age_seconds"] >= 0, session
    return {k: v for k, v in session.items() if k != "age_seconds"}


def copy_fixtures(store):
    """All the fixture transcripts in a store, each modified a minute apart, newest first as listed.

    Sub-agent transcripts go where their Claude Code version put them: 2.1.x in <session>/subagents/,
    2.0.x as agent-*.jsonl beside the sessions; 1.0.x kept them inline.
    """
    for index, (name, session_id) in enumerate(FIXTURE_IDS.items()):
        source = FIXTURES / name
        cwd = GOLDEN[session_id][2]
        path = put_session(store, cwd, session_id, source.read_bytes(), age_hours=1 + index / 60)
        if (source.parent / session_id).is_dir():
            shutil.copytree(source.parent / session_id, path.parent / session_id)
        for agent in source.parent.glob("agent-*.jsonl"):
            shutil.copy(agent, path.parent)


@pytest.fixture
def fixture_store(store):
    copy_fixtures(store)
    return store


# --- golden listing of the fixtures ---------------------------------------------


@pytest.mark.parametrize("session_id", sorted(GOLDEN))
def test_golden_fields_of_each_fixture(fixture_store, run, session_id, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: NOW)
    found, _ = sessions_json(run, "--all", "--limit", "50")
    title, prompt, cwd, branch, messages, model, version = GOLDEN[session_id]
    got = found[session_id]
    assert (got["title"], got["first_prompt"], got["cwd"], got["branch"]) == (
        title,
        prompt,
        cwd,
        branch,
    )
    assert (got["messages"], got["model"], got["version"]) == (messages, model, version)
    path = fixture_store / "projects" / folder_name(cwd) / f"{session_id}.jsonl"
    assert got["size"] == path.stat().st_size and got["path"] == str(path)
    assert got["last_activity"] == orchestra.utc_iso(path.stat().st_mtime)
    assert got["agent"] is None and got["cwd_exists"] is Path(cwd).is_dir()


def test_only_uuid_files_are_sessions_and_subagents_never_are(fixture_store, run):
    found, document = sessions_json(run, "--all", "--limit", "50")
    assert set(found) == set(GOLDEN)
    assert document["total_files"] == len(GOLDEN) and document["skipped"] == 0
    for session in found.values():
        assert "agent-" not in session["path"] and "subagents" not in session["path"]


def test_a_legacy_summary_needs_the_session_that_wrote_it(store, run):
    """Alone, the first 1.0.x session has no summary of its own: its first prompt is its title."""
    source = FIXTURES / "v1.0/10000000-0000-4000-8000-000000000001.jsonl"
    put_session(store, SHOP, "10000000-0000-4000-8000-000000000001", source.read_bytes())
    found, _ = sessions_json(run, "--all")
    assert (
        found["10000000-0000-4000-8000-000000000001"]["title"]
        == "Add input validation to the signup form"
    )


def test_table_is_newest_first_and_fits_the_terminal(fixture_store, run, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = run("sessions", "--all", "--limit", "50")
    assert result.code == 0, result
    rows = result.out.splitlines()
    assert rows[0].split()[:3] == ["ID", "AGE", "MSGS"]
    assert all(len(row) <= 80 for row in rows)
    ids = [row.split()[0] for row in rows[1:] if not row.startswith(" ")]
    assert ids == [session_id[:8] for session_id in FIXTURE_IDS.values()]
    assert "> Add input validation to the signup form" in result.out  # first prompt under its title
    assert "~" not in rows[1]


def test_wide_terminal_shows_activity_time_and_model(store, run, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    put_session(
        store,
        "/work/app",
        new_id(1),
        lines(user("fix the parser"), assistant("done")),
        age_hours=0.5,
    )
    result = run("sessions")
    header, row = result.out.splitlines()
    assert header.split() == ["ID", "ACTIVE", "AGE", "MSGS", "MODEL", "BRANCH", "PROJECT", "TITLE"]
    active = time.strftime(
        "%m-%d %H:%M", time.localtime(os.path.getmtime(next(store.rglob("*.jsonl"))))
    )
    assert row.split()[:2] == [new_id(1)[:8], active.split()[0]] and "opus-4-6" in row
    assert row.endswith("fix the parser")


# --- time window, limit, project folder ----------------------------------------------


def test_hours_window_and_all(store, run, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: NOW)
    put_session(store, "/a", new_id(1), lines(user("recent one", cwd="/a")), age_hours=2)
    put_session(store, "/a", new_id(2), lines(user("yesterday", cwd="/a")), age_hours=30)
    assert list(sessions_json(run)[0]) == [new_id(1)]
    assert list(sessions_json(run, "--hours", "48")[0]) == [new_id(1), new_id(2)]
    assert list(sessions_json(run, "--all")[0]) == [new_id(1), new_id(2)]
    assert list(sessions_json(run, "--hours", "0.5")[0]) == []
    result = run("sessions", "--hours", "0.5")
    assert result.code == 0 and result.out == ""
    assert (
        result.err
        == "orchestra: no sessions in the last 0.5 hours among 2; --all or --hours N shows older ones\n"
    )


def test_limit_keeps_the_newest_and_says_so(store, run):
    for n in range(1, 6):
        put_session(store, "/a", new_id(n), lines(user(f"task {n}", cwd="/a")), age_hours=n)
    found, document = sessions_json(run, "--limit", "2")
    assert list(found) == [new_id(1), new_id(2)] and document["truncated"] is True
    result = run("sessions", "--limit", "2")
    assert (
        "showing the 2 most recent sessions in the last 24 hours; --limit N shows more"
        in result.err
    )


def test_missing_config_dir_lists_nothing_with_a_note(tmp_path, run, monkeypatch):
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(tmp_path / "nowhere"))
    result = run("sessions", "--json")
    assert result.code == 0
    assert result.json()["sessions"] == [] and result.json()["projects_dir"] == str(
        tmp_path / "nowhere" / "projects"
    )
    assert (
        result.err.startswith("orchestra: no Claude Code sessions yet:")
        and result.err.count("\n") == 1
    )
    human = run("sessions")
    assert human.code == 0 and human.out == "" and "does not exist" in human.err


def test_home_config_dir_is_the_default(tmp_path, run, monkeypatch):
    monkeypatch.delenv("CLAUDE_CONFIG_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    put_session(
        tmp_path / "home" / ".claude",
        "/a",
        new_id(7),
        lines(user("from home", cwd="/a")),
        age_hours=0,
    )
    assert list(sessions_json(run)[0]) == [new_id(7)]


# --- tolerance -----------------------------------------------------------------------


def test_half_written_last_line(store, run):
    text = lines(user("first prompt"), assistant("answer")) + json.dumps(user("second"))[:40]
    put_session(store, "/work/app", new_id(1), text)
    session = sessions_json(run)[0][new_id(1)]
    assert (session["title"], session["messages"], session["cwd"]) == (
        "first prompt",
        2,
        "/work/app",
    )


def test_invalid_utf8_is_replaced_not_fatal(store, run):
    data = lines(user("caf\u00e9 PROMPT")).encode().replace(b"PROMPT", b"\xff\xfe bad bytes")
    put_session(store, "/work/app", new_id(1), data + lines(assistant("ok")).encode())
    session = sessions_json(run)[0][new_id(1)]
    assert session["title"] == "caf\u00e9 \ufffd\ufffd bad bytes" and session["messages"] == 2


def test_a_50_mb_single_line(store, run):
    huge = user("x" * (50 * 1024 * 1024), cwd="/work/big")
    huge["cwd"] = huge.pop("cwd")  # last, as 2.1.331 writes it: beyond the head window
    put_session(store, "/work/big", new_id(1), lines(huge))
    started = time.monotonic()
    session = sessions_json(run)[0][new_id(1)]
    assert time.monotonic() - started < 20
    assert (
        session["cwd"] == "/work/big" and session["branch"] == "main" and session["messages"] == 1
    )
    assert session["title"] == new_id(1)[:8]  # the prompt is in neither whole-line window


def test_zero_byte_file_is_no_session(store, run):
    put_session(store, "/a", new_id(1), b"")
    put_session(store, "/a", new_id(2), lines(user("real", cwd="/a")))
    found, document = sessions_json(run)
    assert list(found) == [new_id(2)] and document["skipped"] == 0


def test_crlf_line_endings(store, run):
    text = lines(user("windows prompt"), assistant("a", "msg_1"), assistant("b", "msg_1")).replace(
        "\n", "\r\n"
    )
    put_session(store, "/work/app", new_id(1), text)
    session = sessions_json(run)[0][new_id(1)]
    assert (session["title"], session["messages"], session["model"]) == (
        "windows prompt",
        2,
        "claude-opus-4-6",
    )


def test_unknown_line_types_and_junk_lines_are_skipped(store, run):
    text = lines({"type": "hologram", "cwd": "/nope", "sessionId": "x"}, user("the prompt"),
                 {"type": "ai-title", "aiTitle": "An AI title"}, {"type": "tag", "tag": "x"})  # fmt: skip
    text += "[1, 2]\nnull\n{not json\n\n" + lines({"type": "mystery", "message": {"content": 5}})
    put_session(store, "/work/app", new_id(1), text)
    session = sessions_json(run)[0][new_id(1)]
    assert (session["title"], session["first_prompt"], session["messages"]) == (
        "An AI title",
        "the prompt",
        1,
    )
    assert session["cwd"] == "/nope"  # the first cwd in the file, whatever its line type


def test_missing_and_odd_fields(store, run):
    text = lines({"type": "user"}, {"type": "user", "message": None}, {"type": "user", "message": {"content": 7}},
                 {"type": "user", "message": {"content": [None, 3, {"type": "text"}]}},
                 {"type": "assistant", "message": "not a dict"}, {"type": "assistant"})  # fmt: skip
    put_session(store, "/somewhere", new_id(1), text)
    session = sessions_json(run)[0][new_id(1)]
    assert session["cwd"] is None and session["branch"] is None and session["model"] is None
    assert (session["title"], session["first_prompt"], session["messages"]) == (
        new_id(1)[:8],
        "",
        0,
    )  # no text
    result = run("sessions")
    assert result.code == 0 and "?" in result.out.splitlines()[1]


def test_title_order_of_claude_code(store, run):
    cases = {
        1: [],
        2: [{"type": "last-prompt", "lastPrompt": "the last prompt"}],
        3: [{"type": "summary", "summary": "A summary", "leafUuid": "leaf-3"}],
        4: [
            {"type": "ai-title", "aiTitle": "AI title"},
            {"type": "summary", "summary": "S", "leafUuid": "other"},
        ],
        5: [
            {"type": "custom-title", "customTitle": "Renamed"},
            {"type": "ai-title", "aiTitle": "AI title"},
        ],
        6: [
            {"type": "agent-name", "agentName": "reviewer"},
            {"type": "custom-title", "customTitle": "Renamed"},
        ],
    }
    for n, extra in cases.items():
        base = [
            user("first thing asked", uuid=f"first-{n}"),
            user("later prompt", uuid=f"leaf-{n}"),
        ]
        put_session(store, "/a", new_id(n), lines(*base, *extra))
    found, _ = sessions_json(run)
    titles = [found[new_id(n)]["title"] for n in cases]
    assert titles == [
        "first thing asked",
        "the last prompt",
        "A summary",
        "AI title",
        "Renamed",
        "reviewer",
    ]


def test_a_summary_from_another_file_titles_only_an_untitled_session(store, run):
    put_session(store, "/a", new_id(1), lines(user("plain prompt", uuid="leaf-1")))
    put_session(
        store,
        "/a",
        new_id(2),
        lines(user("prompt", uuid="leaf-2"), {"type": "ai-title", "aiTitle": "Kept"}),
    )
    summaries = [
        {"type": "summary", "summary": f"About {n}", "leafUuid": f"leaf-{n}"} for n in (1, 2)
    ]
    put_session(store, "/a", new_id(3), lines(*summaries, user("the writer", uuid="leaf-3")))
    found, _ = sessions_json(run)
    assert [found[new_id(n)]["title"] for n in (1, 2, 3)] == ["About 1", "Kept", "the writer"]


def test_meaningful_prompt_rules(store, run):
    skipped = [
        user(
            "<command-message>init is analyzing</command-message>\n<command-name>/init</command-name>"
        ),
        user("Expanded command text", isMeta=True),
        user("[Request interrupted by user for tool use]"),
        user("<local-command-stdout>done</local-command-stdout>"),
        user("Warmup"),
        user("sidechain task", isSidechain=True),
        user("summary of earlier context", isCompactSummary=True),
        {
            **user(""),
            "message": {"role": "user", "content": [{"type": "tool_result", "content": "ok"}]},
        },
    ]
    put_session(store, "/a", new_id(1), lines(*skipped, user("  the   real\n prompt  ")))
    put_session(store, "/a", new_id(2), lines(*skipped))
    put_session(store, "/a", new_id(3), lines(user("<bash-input>ls -la</bash-input>")))
    put_session(store, "/a", new_id(4), lines(user("\x1b[31mred\x1b[0m " + "word " * 100)))
    found, _ = sessions_json(run)
    assert found[new_id(1)]["first_prompt"] == "the real prompt"
    assert found[new_id(2)]["first_prompt"] == "/init"  # only a slash command: it is the fallback
    assert found[new_id(3)]["first_prompt"] == "! ls -la"
    long_prompt = found[new_id(4)]["first_prompt"]
    assert (
        long_prompt.startswith("red word")
        and len(long_prompt) <= 200
        and long_prompt.endswith("word…")
    )


def test_unreadable_files_are_skipped_with_a_count(store, run, monkeypatch):
    put_session(store, "/a", new_id(1), lines(user("readable", cwd="/a")), age_hours=3)
    locked = put_session(store, "/a", new_id(2), lines(user("locked", cwd="/a")), age_hours=2)
    dangling = store / "projects" / "-a" / f"{new_id(3)}.jsonl"
    dangling.symlink_to(store / "gone.jsonl")
    os.mkfifo(store / "projects" / "-a" / f"{new_id(4)}.jsonl")  # never opened: it could block
    locked.chmod(0)
    real_open = open

    def refusing_open(path, *args, **kwargs):  # root reads mode-0 files: refuse like a locked file
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(orchestra, "open", refusing_open, raising=False)
    found, document = sessions_json(run)
    assert list(found) == [new_id(1)] and document["skipped"] == 2
    result = run("sessions")
    assert result.code == 0 and "orchestra: skipped 2 unreadable session file(s)" in result.err


# --- the message count cache ---------------------------------------------------------


def test_counts_are_cached_and_extended_as_a_file_grows(store, run, monkeypatch, tmp_path):
    path = put_session(
        store, "/a", new_id(1), lines(user("one", cwd="/a"), assistant("a", "msg_1"))
    )
    assert sessions_json(run)[0][new_id(1)]["messages"] == 2
    cache = json.loads(
        (tmp_path / "cache" / "claude-orchestra" / "session-counts.json").read_text()
    )
    assert cache["files"][str(path)]["total"] == 2

    reads = []
    real_count = orchestra.count_messages
    monkeypatch.setattr(orchestra, "count_messages", lambda *a: reads.append(a) or real_count(*a))
    assert sessions_json(run)[0][new_id(1)]["messages"] == 2 and reads == []  # unchanged: not read

    with open(path, "a") as f:  # the same response goes on, then a new one
        f.write(lines(assistant("b", "msg_1"), user("two", cwd="/a"), assistant("c", "msg_2")))
    assert sessions_json(run)[0][new_id(1)]["messages"] == 4
    state, total = real_count(str(path), path.stat().st_size, cache["files"][str(path)])
    assert total == 4 and state["offset"] == path.stat().st_size

    half = lines(user("three", cwd="/a"))
    with open(path, "a") as f:  # a line being written while we list
        f.write(half[:30])
    assert sessions_json(run)[0][new_id(1)]["messages"] == 4
    with open(path, "a") as f:
        f.write(half[30:])
    assert sessions_json(run)[0][new_id(1)]["messages"] == 5

    path.write_text(
        lines(user("rewritten", cwd="/a")) + " " * 400
    )  # shorter and different: recount
    assert sessions_json(run)[0][new_id(1)]["messages"] == 1


def test_a_damaged_or_unwritable_cache_changes_nothing(store, run, tmp_path):
    put_session(store, "/a", new_id(1), lines(user("one", cwd="/a")))
    cache = tmp_path / "cache" / "claude-orchestra" / "session-counts.json"
    cache.parent.mkdir(parents=True)
    cache.write_text('{"version": 1, "files": {"x": 5, "' + str(store) + '": {"offset": "bad"}}')
    assert sessions_json(run)[0][new_id(1)]["messages"] == 1
    cache.unlink()
    cache.mkdir()  # a folder where the file should be: the cache cannot be written
    assert sessions_json(run)[0][new_id(1)]["messages"] == 1


# --- the description cache: a warm listing reads nothing unchanged ------------------------


def opened_transcripts(monkeypatch, store):
    """The transcripts `orchestra` opens from now on (a list that fills as it runs)."""
    opened, real_open = [], open

    def recording_open(path, *args, **kwargs):
        if str(path).startswith(str(store / "projects")):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(orchestra, "open", recording_open, raising=False)
    return opened


def test_a_warm_listing_reads_no_transcript(store, run, monkeypatch):
    put_session(
        store, "/a", new_id(1), lines(user("one", cwd="/a"), assistant("a", "msg_1", cwd="/a"))
    )
    put_session(
        store,
        "/b",
        new_id(2),
        lines(user("two", cwd="/b"), {"type": "ai-title", "aiTitle": "Named"}),
    )
    put_session(
        store, "/c", new_id(3), lines(user("three", cwd="/c")) + '{"half a line', age_hours=30
    )
    cold = sessions_json(run, "--all")[0]
    opened = opened_transcripts(monkeypatch, store)
    assert sessions_json(run, "--all")[0] == cold and opened == []
    assert run("sessions", "--all").code == 0 and opened == []  # the table too
    assert (
        sessions_json(run, "--project", str(store))[0] == {} and opened == []
    )  # no probe of cached cwds
    assert [cold[new_id(n)]["title"] for n in (1, 2, 3)] == ["one", "Named", "three"]


def test_a_changed_transcript_is_described_again(store, run, monkeypatch):
    path = put_session(
        store, "/a", new_id(1), lines(user("one", cwd="/a"), {"type": "ai-title", "aiTitle": "Old"})
    )
    other = put_session(store, "/b", new_id(2), lines(user("two", cwd="/b")), age_hours=2)
    assert sessions_json(run)[0][new_id(1)]["title"] == "Old"
    opened = opened_transcripts(monkeypatch, store)

    with open(path, "a") as f:  # grown: read again, and its count goes on from where it was
        f.write(lines({"type": "ai-title", "aiTitle": "New"}, assistant("hi", "msg_9", cwd="/a")))
    found = sessions_json(run)[0]
    assert (found[new_id(1)]["title"], found[new_id(1)]["messages"]) == ("New", 2)
    assert str(other) not in opened and str(path) in opened

    before = path.stat()  # rewritten at the same size, only the mtime tells: read again
    path.write_text(path.read_text().replace('"New"', '"Neu"'))
    os.utime(path, (before.st_mtime + 5, before.st_mtime + 5))
    assert path.stat().st_size == before.st_size
    assert sessions_json(run)[0][new_id(1)]["title"] == "Neu"


def test_legacy_summaries_title_the_same_sessions_from_the_cache(fixture_store, run, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: NOW)
    cold = sessions_json(run, "--all", "--limit", "50")[0]
    assert sessions_json(run, "--all", "--limit", "50")[0] == cold
    assert all(cold[i]["title"] == GOLDEN[i][0] for i in GOLDEN)


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_counting_in_blocks_of_any_size_gives_the_same_count(store, monkeypatch, chunk):
    data = lines(user("one"), assistant("a" * 300, "msg_1"), assistant("tool call only", "msg_1"), user("two"),
                 {"type": "user", "message": {"content": [{"type": "tool_result", "content": "x"}]}},
                 assistant("b", "msg_2"))  # fmt: skip
    path = put_session(store, "/a", new_id(1), data + json.dumps(user("three"))[:20])
    expected = orchestra.count_messages(str(path), path.stat().st_size)
    monkeypatch.setattr(orchestra, "SESSION_COUNT_CHUNK", chunk)
    assert orchestra.count_messages(str(path), path.stat().st_size) == expected
    assert expected[1] == 4 and expected[0]["offset"] == len(data.encode())


# --- --project across worktrees ------------------------------------------------------


@pytest.fixture
def worktrees(tmp_path, monkeypatch):
    """A repository with a worktree inside it, one beside it, one removed, and a stranger repo."""
    repo = make_repo(tmp_path / "repo")
    inside = repo / ".worktrees" / "task-auth"
    beside = tmp_path / "repo-feature"
    gone = tmp_path / "repo-gone"
    git("worktree", "add", "-q", "-b", "orchestra/auth", str(inside), cwd=repo)
    git("worktree", "add", "-q", "-b", "feature", str(beside), cwd=repo)
    git("worktree", "add", "-q", "-b", "gone", str(gone), cwd=repo)
    shutil.rmtree(gone)  # removed by hand: git still registers it until pruned
    other = make_repo(tmp_path / "other")
    (repo / "src").mkdir()
    monkeypatch.chdir(repo)
    return {"repo": repo, "inside": inside, "beside": beside, "gone": gone, "other": other,
            "subdir": repo / "src", "removed-inside": repo / ".worktrees" / "task-old",
            "plain": tmp_path}  # fmt: skip


def put_sessions_in(store, places):
    """One session per named folder; returns {name: session id}."""
    ids = {}
    for n, (name, folder) in enumerate(places.items(), start=1):
        ids[name] = new_id(n)
        put_session(
            store,
            str(folder),
            new_id(n),
            lines(user(f"work in {name}", cwd=str(folder))),
            age_hours=n / 10,
        )
    return ids


def test_project_matches_every_worktree_of_the_repository(store, run, worktrees):
    ids = put_sessions_in(store, worktrees)
    ours = {ids[k] for k in ("repo", "inside", "beside", "gone", "subdir", "removed-inside")}
    found, document = sessions_json(run, "--project")
    assert set(found) == ours and document["project"] == str(worktrees["repo"].resolve())
    # The same from inside a worktree, or naming any of them.
    os.chdir(worktrees["beside"])
    assert set(sessions_json(run, "--project")[0]) == ours
    assert set(sessions_json(run, "--project", worktrees["inside"])[0]) == ours
    assert set(sessions_json(run, "--project", worktrees["other"])[0]) == {ids["other"]}


def test_project_outside_git_is_that_folder(store, run, worktrees, tmp_path):
    plain = tmp_path / "notes"
    plain.mkdir()
    put_session(store, str(plain), new_id(50), lines(user("notes", cwd=str(plain))))
    put_session(
        store, str(plain / "deep"), new_id(51), lines(user("deep", cwd=str(plain / "deep")))
    )
    put_session(store, str(tmp_path), new_id(52), lines(user("above", cwd=str(tmp_path))))
    assert set(sessions_json(run, "--project", plain)[0]) == {new_id(50), new_id(51)}


def test_project_that_does_not_exist(run, tmp_path):
    result = run("sessions", "--project", tmp_path / "nope")
    assert result.code == 2 and result.out == ""
    assert (
        result.err
        == f"orchestra: error: --project: no folder {tmp_path / 'nope'}; give a folder inside the repository\n"
    )


def test_project_uses_the_git_files_not_a_git_process_per_session(
    store, run, worktrees, monkeypatch
):
    for n in range(40):
        folder = worktrees["subdir"] / f"pkg{n}"
        put_session(store, str(folder), new_id(100 + n), lines(user("x", cwd=str(folder))))
    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    assert len(sessions_json(run, "--project", "--limit", "50")[0]) == 40
    assert len(calls) <= 2  # finding the repository itself, not one call per session


def test_sessions_of_orchestra_agents_are_marked(store, run, worktrees):
    repo = worktrees["repo"]
    (repo / ".orchestra").mkdir()
    records = {"auth": {"id": "auth", "session_id": new_id(2), "worktree": str(worktrees["inside"]),
                        "branch": "orchestra/auth"},
               "docs": {"id": "docs", "session_id": None, "worktree": str(worktrees["beside"]), "branch": "feature"}}  # fmt: skip
    (repo / ".orchestra" / "state.json").write_text(json.dumps({"version": 1, "agents": records}))
    ids = put_sessions_in(
        store, {"repo": repo, "inside": worktrees["inside"], "beside": worktrees["beside"]}
    )
    found, _ = sessions_json(run, "--project")
    assert {found[i]["agent"] for i in ids.values()} == {None, "auth", "docs"}
    assert found[ids["inside"]]["agent"] == "auth" and found[ids["beside"]]["agent"] == "docs"
    assert found[ids["repo"]]["agent"] is None
    os.chdir(worktrees["plain"])  # without --project, from anywhere: still marked
    result = run("sessions")
    assert re.search(r"^" + ids["inside"][:8] + r" .* auth ", result.out, re.M), result.out


# --- resume --------------------------------------------------------------------------


@pytest.fixture
def execs(monkeypatch, tmp_path):
    """Record exec calls instead of replacing the test process; report the cwd they ran in."""
    calls = []
    monkeypatch.setattr(orchestra.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(
        orchestra.os, "execvp", lambda file, argv: calls.append((os.getcwd(), file, argv))
    )
    monkeypatch.chdir(tmp_path)  # exec_in changes directory: pytest puts it back afterwards
    return calls


def test_resume_execs_claude_in_the_session_cwd(store, run, execs, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    put_session(store, str(work), new_id(1), lines(user("hello", cwd=str(work))))
    result = run("sessions", "--resume", new_id(1)[:6])
    assert result.code == 0 and result.out == "" and result.err == ""
    assert execs == [(str(work), "claude", ["claude", "--resume", new_id(1)])]


def test_resume_print_shows_the_command(store, run, execs, tmp_path):
    work = tmp_path / "my work"
    work.mkdir()
    put_session(store, str(work), new_id(1), lines(user("hello", cwd=str(work))))
    result = run("sessions", "--resume", new_id(1).upper(), "--print")
    assert result.code == 0 and execs == []
    assert result.out == f"cd '{work}' && claude --resume {new_id(1)}\n"


def test_resume_refuses_unknown_and_ambiguous_ids(store, run, execs):
    put_session(store, "/a", "abcd0000-0000-4000-8000-000000000001", lines(user("one", cwd="/a")))
    put_session(store, "/a", "abcd0000-0000-4000-8000-000000000002", lines(user("two", cwd="/a")))
    unknown = run("sessions", "--resume", "zzz")
    assert unknown.code == 2 and unknown.out == ""
    assert (
        unknown.err
        == "orchestra: error: no session matches 'zzz'; run 'orchestra sessions --all' to list them\n"
    )
    ambiguous = run("sessions", "--resume", "abcd")
    assert (
        ambiguous.code == 2
        and "'abcd' matches 2 sessions (abcd0000-0000-4000-8000-000000000001" in ambiguous.err
    )
    assert "type more of the id" in ambiguous.err and execs == []


def test_resume_without_cwd_and_without_claude(store, run, execs, monkeypatch, tmp_path):
    put_session(store, "/a", new_id(1), lines({"type": "user", "message": {"content": "no cwd"}}))
    result = run("sessions", "--resume", new_id(1))
    assert result.code == 1 and "records no working directory" in result.err
    put_session(store, str(tmp_path), new_id(2), lines(user("x", cwd=str(tmp_path))))
    monkeypatch.setattr(orchestra.shutil, "which", lambda name: None)
    result = run("sessions", "--resume", new_id(2))
    assert result.code == 1 and result.err.startswith("orchestra: error: claude is not on PATH;")


def test_resume_by_agent_id(store, run, execs, worktrees):
    repo = worktrees["repo"]
    (repo / ".orchestra").mkdir()
    record = {
        "id": "auth",
        "session_id": new_id(9),
        "worktree": str(worktrees["inside"]),
        "branch": "orchestra/auth",
    }
    (repo / ".orchestra" / "state.json").write_text(
        json.dumps({"version": 1, "agents": {"auth": record}})
    )
    put_session(
        store, str(worktrees["inside"]), new_id(9), lines(user("x", cwd=str(worktrees["inside"])))
    )
    assert run("sessions", "--resume", "auth").code == 0
    assert execs == [(str(worktrees["inside"]), "claude", ["claude", "--resume", new_id(9)])]


@pytest.fixture
def removed_worktree(store, worktrees):
    """A session that ran in a worktree (outside the repo) that has since been removed."""
    path = worktrees["beside"]
    put_session(
        store,
        str(path),
        new_id(1),
        lines({**user("feature work", cwd=str(path)), "gitBranch": "feature"}),
    )
    git("worktree", "remove", "--force", str(path), cwd=worktrees["repo"])
    return path


def test_resume_print_recreates_a_removed_worktree(run, execs, worktrees, removed_worktree):
    result = run("sessions", "--resume", new_id(1), "--print")
    assert result.code == 0 and execs == []
    assert result.out.splitlines() == [
        f"git -C {worktrees['repo']} worktree add {removed_worktree} feature",
        f"cd {removed_worktree} && claude --resume {new_id(1)}",
    ]
    assert not removed_worktree.exists()


def test_resume_without_a_terminal_only_shows_what_it_would_do(
    run, execs, worktrees, removed_worktree, monkeypatch
):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    result = run("sessions", "--resume", new_id(1))
    assert result.code == 1 and execs == [] and not removed_worktree.exists()
    assert result.out.splitlines()[0] == "would run:"
    assert (
        f"  git -C {worktrees['repo']} worktree add {removed_worktree} feature"
        in result.out.splitlines()
    )
    assert "no terminal to confirm recreating it" in result.err and result.err.count("\n") == 1


def test_resume_asks_then_recreates_the_worktree_and_execs(
    run, execs, worktrees, removed_worktree, monkeypatch
):
    questions = []
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda q: questions.append(q) or "y")
    result = run("sessions", "--resume", new_id(1))
    assert result.code == 0, result
    assert questions == [
        f"{removed_worktree} no longer exists. Run 'git -C {worktrees['repo']} worktree add "
        f"{removed_worktree} feature' and resume? [y/N] "
    ]
    assert git("branch", "--show-current", cwd=removed_worktree).strip() == "feature"
    assert execs == [(str(removed_worktree), "claude", ["claude", "--resume", new_id(1)])]


def test_resume_declined_does_nothing(run, execs, removed_worktree, monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda q: "n")
    result = run("sessions", "--resume", new_id(1))
    assert result.code == 1 and execs == [] and not removed_worktree.exists()
    assert result.err.startswith("orchestra: error: not resumed; to do it yourself: git -C ")


def test_resume_prunes_a_worktree_deleted_by_hand(store, run, execs, worktrees):
    gone = worktrees["gone"]  # its folder was deleted, git still registers it
    put_session(
        store, str(gone), new_id(3), lines({**user("x", cwd=str(gone)), "gitBranch": "gone"})
    )
    result = run("sessions", "--resume", new_id(3), "--print")
    assert result.out.splitlines()[:2] == [f"git -C {worktrees['repo']} worktree remove --force {gone}",
                                           f"git -C {worktrees['repo']} worktree add {gone} gone"]  # fmt: skip


def test_resume_recreates_a_worktree_inside_the_repository(store, run, execs, worktrees):
    inside = worktrees["inside"]
    put_session(
        store,
        str(inside),
        new_id(4),
        lines({**user("x", cwd=str(inside)), "gitBranch": "orchestra/auth"}),
    )
    git("worktree", "remove", str(inside), cwd=worktrees["repo"])
    os.chdir(worktrees["plain"])  # not in the repository: found from the vanished folder's parents
    result = run("sessions", "--resume", new_id(4), "--print")
    assert (
        result.out.splitlines()[0]
        == f"git -C {worktrees['repo']} worktree add {inside} orchestra/auth"
    )


def test_resume_when_the_branch_is_gone_too(run, execs, worktrees, removed_worktree):
    git("branch", "-D", "feature", cwd=worktrees["repo"])
    result = run("sessions", "--resume", new_id(1))
    assert result.code == 1 and execs == []
    out = result.out.splitlines()
    assert f"git -C {worktrees['repo']} fsck --unreachable --no-reflogs" in out
    assert (
        f"git -C {worktrees['repo']} worktree add -b feature {removed_worktree} '<commit>'" in out
    )
    assert (
        out[-1]
        == f"mkdir -p {removed_worktree} && cd {removed_worktree} && claude --resume {new_id(1)}"
    )
    assert result.err == (
        f"orchestra: error: session {new_id(1)[:8]} ran in {removed_worktree}, which no longer exists, "
        "and branch 'feature' is gone too; the commands above would recover it\n"
    )


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hours", "-1"], "argument --hours: must be more than 0, not -1"),
        (["--hours", "0"], "argument --hours: must be more than 0, not 0"),
        (["--hours", "soon"], "argument --hours: 'soon' is not a number of hours"),
        (["--limit", "0"], "argument --limit: must be at least 1, not 0"),
        (["--limit", "many"], "argument --limit: 'many' is not a whole number"),
        (["--all", "--hours", "3"], "argument --hours: not allowed with argument --all"),
        (["--print"], "--print goes with --resume ID"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run, argv, message):
    result = run("sessions", *argv)
    assert result.code == 2 and result.out == ""
    assert result.err.startswith(f"orchestra: error: {message}") and result.err.count("\n") == 1


# --- the real claude CLI -------------------------------------------------------------


@requires_claude
def test_real_session_in_a_removed_worktree_is_recreated_and_resumed(
    tmp_path, run, execs, monkeypatch
):
    """A session made by the real CLI in a worktree; the worktree is removed, recreated, resumed."""
    repo = make_repo(tmp_path / "repo")
    worktree = repo / ".worktrees" / "task-notes"
    git("worktree", "add", "-q", "-b", "orchestra/notes", str(worktree), cwd=repo)
    with ScriptedAPI() as api:
        api.script("write-notes", [bash("echo hi > notes.txt && git add notes.txt && git commit -qm notes"),
                                   text("Committed notes.txt")])  # fmt: skip
        api.script("carry-on", [text("Carried on")])
        env = claude_env(api, config_dir=tmp_path / "claude")
        monkeypatch.setenv("CLAUDE_CONFIG_DIR", env["CLAUDE_CONFIG_DIR"])
        first = subprocess.run([CLAUDE, "-p", "please write-notes", "--output-format", "stream-json", "--verbose",
                                "--allowedTools", "Bash"], cwd=worktree, env=env, capture_output=True, text=True,
                               timeout=120)  # fmt: skip
        assert first.returncode == 0, first.stderr
        session_id = json.loads(first.stdout.splitlines()[0])["session_id"]

        found, _ = sessions_json(run)
        session = found[session_id]
        assert (session["cwd"], session["branch"]) == (str(worktree), "orchestra/notes")
        assert (
            session["title"] == "please write-notes" and session["messages"] == 2
        )  # prompt, reply
        assert session["version"] == subprocess.run([CLAUDE, "--version"], capture_output=True, text=True,
                                                    env=env).stdout.split()[0]  # fmt: skip

        git("worktree", "remove", "--force", str(worktree), cwd=repo)
        monkeypatch.chdir(repo)
        monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
        monkeypatch.setattr("builtins.input", lambda q: "yes")
        result = run("sessions", "--resume", session_id[:8])
        assert result.code == 0, result
        assert (worktree / "notes.txt").read_text() == "hi\n"  # recreated from its branch
        [(cwd, _, argv)] = execs
        assert cwd == str(worktree) and argv == ["claude", "--resume", session_id]

        # What exec would have started, headless: the conversation goes on in the recreated folder.
        resumed = subprocess.run([CLAUDE, *argv[1:], "-p", "please carry-on", "--output-format", "json"],
                                 cwd=cwd, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout)["result"] == "Carried on"
        history = json.dumps(api.main_requests[-1]["messages"])
        assert "please write-notes" in history and "please carry-on" in history


# --- what counts as a message, and where the fixtures come from -------------------------


def test_one_prompt_and_twelve_tool_calls_are_two_messages(store, run):
    """Tool calls and their results are tool traffic, not messages; the sub-agent's model is not the session's."""
    records = [user("tidy the repo")]
    for n in range(12):
        call = assistant("", message_id=f"msg_{n}")
        call["message"]["content"] = [
            {"type": "tool_use", "id": f"t{n}", "name": "Bash", "input": {"command": "ls"}}
        ]
        result = user(
            "",
            message={"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{n}"}]},
        )
        records += [call, result]
    nested = {
        "type": "assistant",
        "message": {"model": "claude-haiku-4-5", "content": [{"type": "text", "text": "x"}]},
    }
    records += [
        assistant("All tidy.", message_id="msg_last"),
        {"type": "progress", "data": {"message": nested}},
    ]
    put_session(store, "/work/app", new_id(1), lines(*records))
    session = sessions_json(run)[0][new_id(1)]
    assert (session["messages"], session["model"]) == (2, "claude-opus-4-6")
    assert (
        "tool\ncalls, tool results, compact summaries"
        in orchestra.build_parser().commands.choices["sessions"].format_help()
    )


def test_fixtures_are_what_their_script_writes(tmp_path, monkeypatch):
    sys.path.insert(0, str(FIXTURES.parent))
    try:
        import make_claude_sessions
    finally:
        sys.path.remove(str(FIXTURES.parent))
    monkeypatch.setattr(make_claude_sessions, "OUT", tmp_path)
    make_claude_sessions.main()
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.jsonl"))
    assert written and all(
        (FIXTURES / p).read_bytes() == (tmp_path / p).read_bytes() for p in written
    )
    assert not any("shared" in str(p) for p in FIXTURES.rglob("*"))
