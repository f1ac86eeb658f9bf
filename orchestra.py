#!/usr/bin/env python3
"""claude-orchestra: run several Claude Code agents in parallel, each on its own branch/worktree.

Every agent works in `<repo>/.worktrees/task-<id>/` on branch `orchestra/<id>`, and is contained
there: a guard that Claude Code runs before every tool call refuses writes outside the worktree,
reads of orchestra's files and other agents' worktrees, and git beyond the agent's own branch;
what slips past is found and put back when the agent settles (docs/containment.md). A detached
supervisor starts queued agents up to the parallel limit, here or on other hosts over ssh,
follows their stream-json output, and keeps `.orchestra/state.json` true.

Commands:
  orchestra init                      create .orchestra/ and show the effective configuration
  orchestra config [--json]           show each setting and where its value came from
  orchestra config set KEY VALUE      write a setting (--user: your own file); config unset KEY
  orchestra doctor [--host NAME]      what works here (or on a host): git, claude, login, sandbox
  orchestra hosts [--json]            the machines agents run on: slots, agents, reachability
  orchestra spawn TASK... [--wait]    queue agents, one worktree and branch per task
  orchestra status [ID...] [--watch]  what every agent is doing, its cost and its commits
  orchestra logs ID [-f] [--tail N]   an agent's activity as readable lines
  orchestra diff ID [--stat]          an agent's commits and uncommitted work against its base
  orchestra approvals [--json]        tool calls agents wait to have approved
  orchestra approve REQ [--always]    allow one (REQ or an agent id); orchestra deny REQ refuses it
  orchestra pause|resume|stop ID...   suspend, continue (or relaunch) and end agents
  orchestra send ID MESSAGE           a follow-up in the agent's own session (after its turn)
  orchestra retry ID                  a failed or stopped agent's task again (ID-2), or its session
  orchestra worktrees [--json]        git worktrees joined with agent records
  orchestra collect [--merge] [--pr]  report finished agents' work and bring it home
  orchestra land [ID...] [--dry-run]  merge queue: land agents whose checks pass on the result
  orchestra cleanup [--dry-run]       remove worktrees and branches, archiving unsaved work first
  orchestra restore ID                bring a cleaned-up agent back from its archive
  orchestra sessions [--hours N]      your recent Claude Code sessions; --resume ID continues one
  orchestra web [--port N] [--qr]     the phone-friendly dashboard, JSON API and live WebSocket
  orchestra supervise [--foreground]  the supervisor itself (started for you by spawn)
  orchestra hook permission-request   (internal) what Claude Code runs when an agent asks
  orchestra host-agent ACTION         (internal) what a host runs when home calls it over ssh
  orchestra hook pre-tool-use         (internal) the containment guard, before every tool call

Every ID also accepts a unique prefix; every listing takes --json. Agents start with the environment
of the command that spawned, resumed or messaged them (kept for their launch in .orchestra/env/<id>,
readable by you alone, and deleted once read or when the agent is stopped or removed).

State lives in `<repo>/.orchestra/` (readable by you alone): state.json (live agent records),
history.jsonl (cleaned-up agents, one record a line), logs/<id>.jsonl (each agent's stream-json
output plus orchestra's own events), logs/<id>.stderr, supervisor.log, web.json (the dashboard's
access token, new on every start), approvals/ (requests waiting, decisions, --always rules, each
signed with approval.key), integrity/ (what each agent must not change), guard.sock (the
supervisor answering the guard) and the lock files. Work saved before a cleanup:
refs/orchestra/archive/<id>/.
Configuration: built-in defaults, then the user file (~/.config/claude-orchestra/
config.json), then `.orchestra/config.json`, then command-line flags.

Map of this file. Each section sits under a `# ===` banner with a paragraph that teaches its
rule, and names only what sections above it define (tests/test_layout.py keeps this true):
  Constants                       the shared defaults, states and exit codes
  Errors                          OrchestraError and GitError, the expected failures
  Utilities                       time, text, JSON, atomic writes, file locks, processes
  Configuration                   defaults, user file, project file, flags; value checks
  Git                             run_git(), the one way to git; branches, worktrees, commits
  What a worktree holds           every file hashed, every commit reachable: the truth for cleanup
  State store                     state.json and history.jsonl: locked, atomic, versioned
  Agent records and logs          a record, its log folded into facts, rebuilding from logs
  Approvals and the sandbox       the PermissionRequest hook, --always rules, notify_command
  Containment                     the guard: what an agent's tool calls may touch, by path
  Containment: reading a command line   bash's expansions, here-documents, substitutions
  Containment: paths in a command   words as paths, known writers, links, inline code
  Containment: shell commands and git   Bash split into commands; git judged option by option
  Containment: the hook and the settings layer   PreToolUse hook, deny rules, sandbox limits
  Launching agents                worktree, argv, --settings layer, environment, process groups
  Integrity check                 refs, .git config, hooks and info recorded, verified, put back
  Project                         a repository under orchestra: paths, config, state store
  Spawning agents                 unique ids, reserving agents, worktrees now or later, rollback
  Results you can trust           checks, fix rounds, API waits, budgets (Resilience)
  Hosts                           other machines over ssh: placement, transport, following
  Hosts: sessions and polling     one serving process per host; one poll per host for all its agents
  Supervisor                      the detached process that starts, watches and adopts agents
  Operations                      spawn, pause, resume, stop, retry, approve: CLI and web alike
  Reading logs                    an agent's log as readable lines, streamed and tailed
  Sessions: transcripts           where Claude Code's sessions live and what they say, cheaply
  Sessions: listing               which sessions to show, their repositories, the table
  Sessions: resuming              `claude --resume` in the session's own (recreated) cwd
  Collect: reports                what each finished agent did, cached by RepoFacts
  Collect: commits, merges and pull requests   bringing work home
  Landing                         the merge queue: scratch merges, checks, compare-and-swap
  Cleanup and archives            remove only what is saved; archive refs; restore
  WebSocket                       RFC 6455 by hand: handshake, frames, one connection
  HTTP server: the gate           Host, Origin, token and size checks before any route
  HTTP server: API routes         the JSON API, the dashboard page, the StatusHub
  HTTP server: serving            the threading server, TLS, web.json and the URL
  QR code                         ISO/IEC 18004 for `web --qr`, drawn in the terminal
  Command line: shared parts      the parser class, tables, colours, number types
  Command line: setting up        init, config, doctor
  Command line: agents            spawn, status, pause/resume/stop, logs, retry, send, diff...
  Command line: results           collect, land, cleanup, restore
  Command line: sessions, web and internals   sessions, web, supervise, hook
  Command line: hosts             hosts, and host-agent: what a host runs for home
  Command line: the parser        PARSER_BUILDERS and build_parser()
  Main                            main(): an OrchestraError becomes a message and an exit status
New code joins the section whose story it tells. A new story gets its own banner, below every
section it names, and a line in this map; a section that passes 900 lines is split where its
story divides.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import itertools
import json
import math
import os
import re
import select
import shlex
import signal
import site
import stat
import struct
import sys
import threading
import time
import unicodedata
import zlib
from fnmatch import fnmatchcase
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit


class LazyModule:
    """A module imported on first use: every command's start-up, and the guard hook's before each
    tool call, pays for the imports it never needs."""

    def __init__(self, name):
        self.name = name

    def __getattr__(self, attribute):
        import importlib

        return getattr(importlib.import_module(self.name), attribute)


hashlib, hmac, secrets = LazyModule("hashlib"), LazyModule("hmac"), LazyModule("secrets")
socket, socketserver = LazyModule("socket"), LazyModule("socketserver")
base64, queue, random = LazyModule("base64"), LazyModule("queue"), LazyModule("random")
shutil, subprocess = LazyModule("shutil"), LazyModule("subprocess")
tempfile, traceback = LazyModule("tempfile"), LazyModule("traceback")

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt

__version__ = "0.1.0"

# ======================================================================================
# Constants
# --------------------------------------------------------------------------------------
# Shared defaults, states and exit codes. A constant that one section alone uses lives under
# that section's banner, beside its users; function bodies name constants, never bare numbers.
# ======================================================================================

ORCHESTRA_DIR = ".orchestra"
WORKTREE_PREFIX = "task-"

# What an agent may do without asking: edit inside its worktree, git on its own branch (the
# containment guard refuses anything beyond, whatever a rule allows)
DEFAULT_RULES = [
    "Edit(./**)",
    "Write(./**)",
    "Bash(git status:*)",
    "Bash(git diff:*)",
    "Bash(git log:*)",
    "Bash(git show:*)",
    "Bash(git add:*)",
    "Bash(git commit:*)",
    "Bash(git rm:*)",
    "Bash(git mv:*)",
    "Bash(git restore:*)",
    "Bash(git ls-files:*)",
    "Bash(git rev-parse:*)",
    "Bash(git grep:*)",
    "Bash(git blame:*)",
    "Bash(git branch --show-current)",
]
CONFIG_DEFAULTS = {
    "default_parallel": 3,
    "max_parallel": 8,
    "worktree_dir": ".worktrees",
    "branch_prefix": "orchestra",
    "heartbeat_interval": 60,
    "stale_threshold": 300,
    "bypass_permissions": DEFAULT_RULES,
    "agent_command": ["claude"],
    "permission_mode": None,
    "model": None,
    "base_branch": None,
    "copy_files": [],
    "setup": [],
    "sandbox": "auto",
    "sandbox_network": [],
    "protected_paths": [],
    "approval_timeout": 1800,
    "notify_command": [],
    "checks": [],
    "check_timeout": 900,
    "fix_rounds": 0,
    "max_budget_usd": None,
    "api_retries": 5,
    "api_backoff": 60,
    "api_backoff_max": 3600,
    "hosts": {},
    "placement": "local-first",
    "land_strategy": "merge",
}
# What each key must hold: "int", "number", "str", "str?" (string or null) or "list".
CONFIG_TYPES = {
    "default_parallel": "int",
    "max_parallel": "int",
    "worktree_dir": "str",
    "branch_prefix": "str",
    "heartbeat_interval": "number",
    "stale_threshold": "number",
    "bypass_permissions": "list",
    "agent_command": "list",
    "permission_mode": "str?",
    "model": "str?",
    "base_branch": "str?",
    "copy_files": "list",
    "setup": "list",
    "sandbox": "str",
    "sandbox_network": "list",
    "protected_paths": "list",
    "approval_timeout": "number",
    "notify_command": "list",
    "checks": "list",
    "check_timeout": "number",
    "fix_rounds": "int",
    "max_budget_usd": "number?",
    "api_retries": "int",
    "api_backoff": "number",
    "api_backoff_max": "number",
    "hosts": "hosts",
    "placement": "str",
    "land_strategy": "str",
}
LAND_STRATEGIES = ("merge", "rebase", "squash")  # how `land` puts an agent's work on the target
LAND_LOCK = "land.lock"  # in .orchestra/: one land (land, the web, collect --merge) at a time
LAND_BUSY = (
    "another land (orchestra land, collect --merge or the dashboard) is running in this "
    "repository; wait for it to end and run this again"
)
# Agent states (see DESIGN.md, "An agent") and exit statuses (0 ok, 1 failed, 2 bad input, Ctrl-C)
ACTIVE_STATES = ("queued", "running", "paused", "waiting")
FINISHED_STATES = ("done", "failed", "stopped", "interrupted")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# What cleanup saves, and how much of a file list or of some output a message quotes
ARCHIVE_REFS = "refs/orchestra/archive"  # branch tips saved before cleanup removes anything
NESTED_GIT_NAME = ".git~orchestra"  # a nested repository's .git, as stored in a snapshot tree
MAX_LISTED_FILES = 3  # files named in a KEEP reason before "and N more"
TAIL_CHARS = 2000  # of setup output and stderr kept in an error message
LOG_READ_CHUNK = 1024 * 1024  # bytes of an agent's log read at a time: memory stays bounded

# Claude Code: its program, where it keeps sessions, how to install it, how to nudge it on
CLAUDE_EXECUTABLE = "claude"
CLAUDE_CONFIG_ENV = "CLAUDE_CONFIG_DIR"
CLAUDE_PINNED_VERSION = "2.1.331"  # what the tests run and the README pins
CLAUDE_INSTALL_COMMAND = f"npm install -g @anthropic-ai/claude-code@{CLAUDE_PINNED_VERSION}"
CLAUDE_INSTALL_HINT = (
    f"install Claude Code with '{CLAUDE_INSTALL_COMMAND}', "
    "or set agent_command in the config to run another agent"
)
RESUME_PROMPT = "Continue the task."
NOTIFY_TIMEOUT = 30.0  # seconds a notify command may run before it is killed
SANDBOX_PROBE_TIMEOUT = 10.0
SESSION_DEFAULT_HOURS = 24.0
SESSION_DEFAULT_LIMIT = 30
SESSION_ID_SHORT = 8  # characters of a session id shown in tables and used as a last-resort title

# Web: where it listens by default, and limits shared by the server and `web`'s options
WEB_DEFAULT_HOST = "127.0.0.1"
WEB_DEFAULT_PORT = 8888
WEB_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WEB_WILDCARD_HOSTS = ("", "0.0.0.0", "::")
WEB_MAX_WEBSOCKETS = 64  # open at once, half of WEB_MAX_CONNECTIONS; more are answered 503
WEB_MAX_JSON_DEPTH = 32  # nesting of a POST body; deeper is 400 (the dashboard sends 2)


# ======================================================================================
# Errors
# --------------------------------------------------------------------------------------
# Expected failures. Only main() turns them into a message and an exit status.
# ======================================================================================


class OrchestraError(Exception):
    """A failure the user can act on: bad input (status 2) or a refused operation (status 1)."""

    def __init__(self, message, status=EXIT_USAGE):
        super().__init__(message)
        self.status = status


class GitError(OrchestraError):
    """git refused a command; the message carries git's own words."""

    def __init__(self, message):
        super().__init__(message, EXIT_FAILURE)


# ======================================================================================
# Utilities
# --------------------------------------------------------------------------------------
# Small pure helpers: time, text, JSON, processes, file locks. Nothing here knows git.
# ======================================================================================

ID_WORDS = 3  # words of the task an id is made from
# an id made from a task is at most this long (before a -2 suffix), so tables fit 80 columns
ID_CHARS = 20
ID_SKIP_WORDS = frozenset(("a", "an", "the", "to", "of", "for", "in", "on", "at", "by", "and", "or", "with",
                           "from", "into", "onto", "my", "our", "your", "please"))  # fmt: skip
MAX_ACTIVITY_LENGTH = 200
LOCK_TIMEOUT = 30.0  # seconds to wait for the state lock before giving up
# Escape sequences, C0/C1 controls but newline and tab, bidirectional overrides and isolates
# (they can make shown text read differently from what it is), and lone surrogates (half an
# emoji as JavaScript writes it; they cannot be encoded as UTF-8).
CONTROL_CHARS = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
    "|[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]|[\ud800-\udfff]"
)
# Written as \\uXXXX in JSON output: the same data, but nothing a terminal acts on or cannot encode.
JSON_ESCAPED = re.compile(
    "[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
SURROGATES = re.compile("[\ud800-\udfff]")


def utc_iso(ts=None):
    """Format a Unix time (default: now) as ISO 8601 UTC with a Z, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if ts is None else ts))


def parse_iso(text):
    """Turn utc_iso() output back into a Unix time; None for None or garbage."""
    if not text:
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    except (ValueError, TypeError):
        return None


def format_duration(seconds):
    """Render seconds as a short duration: 45s, 12m05s, 3h20m, 2d4h."""
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"


def format_age(seconds):
    """A short age: 40s, 5m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_cost(usd):
    """Render a dollar amount, or '-' when unknown."""
    return "-" if usd is None else f"${usd:.4f}" if usd < 1 else f"${usd:.2f}"


def strip_control(text):
    """Remove terminal escape sequences and control characters (newlines and tabs stay)."""
    return CONTROL_CHARS.sub("", text)


def encodable(text):
    """Text with its lone surrogates (which no output encoding accepts) made U+FFFD."""
    return SURROGATES.sub("\ufffd", text)


def one_line(text, limit=MAX_ACTIVITY_LENGTH):
    """The first non-blank line of text, cleaned of control characters and shortened."""
    for line in strip_control(str(text)).splitlines():
        if line.strip():
            line = " ".join(line.split())
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


def tail_text(text, limit=TAIL_CHARS):
    """The end of a long text, which is where errors are."""
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def slugify(text, limit=ID_CHARS, words=ID_WORDS):
    """A short readable id made from a task: its first few meaningful words, lowercase, '-'-joined.

    'add input validation to the signup form' -> 'add-input-validation'. Safe as a branch and a
    folder name; small words ('the', 'to', ...) are skipped unless the task has nothing else.
    """
    # Accents go (é -> e, so 'émoji tâche' -> 'emoji-tache'); letters of other scripts stay.
    plain = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    found = re.findall(r"[^\W_]+", plain.lower())
    meaningful = [w for w in found if w not in ID_SKIP_WORDS] or found
    slug = ""
    for word in meaningful[:words]:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > limit:
            break
        slug = candidate
    return slug or (meaningful[0][:limit] if meaningful else "task")


def json_text(obj, **options):
    """JSON of any data, as readable as UTF-8 allows: lone surrogates (which UTF-8 cannot hold),
    C1 controls and bidirectional overrides are written as \\uXXXX escapes, as ensure_ascii would.
    """
    text = json.dumps(obj, ensure_ascii=False, **options)
    return JSON_ESCAPED.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def print_json(obj, out=None):
    """Write one JSON document to stdout: sorted, indented, newline-terminated."""
    out = out or sys.stdout
    out.write(json_text(obj, indent=2, sort_keys=True) + "\n")
    out.flush()


def use_colour(stream):
    """Colour only on a terminal, and never when NO_COLOR is set."""
    return stream.isatty() and "NO_COLOR" not in os.environ


def private_opener(path, flags):
    """An `opener` for open() that creates files readable by their owner only (logs, state)."""
    return os.open(path, flags, 0o600)


def write_atomic(path, text, durable=True):
    """Replace a file so that readers see either the old or the new whole content.

    durable=False skips the fsync, for a cache that a crash may lose (never damage: readers
    of a cache treat a missing or empty one as empty).
    """
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, str(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class FileLock:
    """An exclusive lock shared by every thread and process that uses the same file.

    flock() excludes other processes; a thread lock makes this process's threads take turns.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.thread_lock = threading.Lock()  # guards self.fd: one holder in this process at a time
        self.fd = None

    def acquire(self, blocking=True, timeout=LOCK_TIMEOUT):
        """Take the lock; False if not blocking (or timed out) and someone else holds it."""
        deadline = time.monotonic() + timeout
        if not self.thread_lock.acquire(blocking, timeout if blocking else -1):
            return False
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o600)
        while True:
            try:
                lock_fd(fd)
                self.fd = fd
                return True
            except OSError:
                if not blocking or time.monotonic() > deadline:
                    os.close(fd)
                    self.thread_lock.release()
                    return False
                time.sleep(0.01)

    def release(self):
        """Let go of the lock (closing the file releases it too, even on a crash)."""
        fd, self.fd = self.fd, None
        os.close(fd)
        self.thread_lock.release()

    def __enter__(self):
        if not self.acquire():
            raise OrchestraError(f"timed out waiting for the lock {self.path}", EXIT_FAILURE)
        return self

    def __exit__(self, *exc):
        self.release()


def lock_fd(fd):
    """Take a non-blocking exclusive lock on an open file or raise OSError."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:  # pragma: no cover - Windows
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def process_start_time(pid):
    """An opaque token for when process `pid` started, or None if it is gone or a zombie.

    A pid is only trusted together with this token, so a recycled pid is never signalled.
    """
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None if os.path.isdir("/proc") else ps_start_time(pid)
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def ps_start_time(pid):  # pragma: no cover - macOS and BSDs have no /proc
    """Start time and state of a process from ps(1), for systems without /proc."""
    found = subprocess.run(
        ["ps", "-o", "stat=,lstart=", "-p", str(pid)], capture_output=True, text=True
    ).stdout.strip()
    return None if not found or found.startswith("Z") else found.split(None, 1)[-1]


def process_alive(pid, start_token):
    """True when `pid` is still the very process that started at `start_token`."""
    return bool(pid and start_token) and process_start_time(pid) == start_token


def signal_group(pid, start_token, sig):
    """Send a signal to an agent's process group after verifying its leader; False if gone."""
    if not process_alive(pid, start_token):
        return False
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    return True


# ======================================================================================
# Configuration
# --------------------------------------------------------------------------------------
# Defaults, then the user file, then the project file, then flags; each value remembers
# where it came from, and a wrong key or type is named with its file.
# ======================================================================================

TYPE_NAMES = {
    "int": "an integer",
    "number": "a number",
    "str": "a string",
    "str?": "a string or null",
    "number?": "a number or null",
    "list": "a list of strings",
    "hosts": 'an object of hosts, {"NAME": {"ssh": "user@host", ...}}',
}
# Approvals and the sandbox (see the section "Approvals and the sandbox").
SANDBOX_MODES = ("off", "auto", "on")
# Hosts (see the section "Hosts"): what each host's settings must hold, and how agents are placed.
HOST_KEYS = {
    "ssh": "str",
    "ssh_options": "list",
    "max_parallel": "int",
    "workdir": "str",
    "python": "str",
    "env": "list",
}
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")
PLACEMENTS = ("local-first", "spread")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_hosts_value(hosts, where):
    """Each host of the `hosts` setting: a fair name, an ssh target and well-typed settings."""
    for name, host in hosts.items():
        if name == "local" or not HOST_NAME.fullmatch(name):
            raise OrchestraError(
                f"{where}: host name {json.dumps(name)} is not allowed; use letters, digits, '.', '_' and '-' "
                "('local' is this machine)"
            )
        if not isinstance(host, dict) or "ssh" not in host:
            raise OrchestraError(
                f"{where}: host '{name}' must be an object with at least \"ssh\" (user@host, ssh://user@host:port or an ~/.ssh/config alias)"
            )
        for key, value in host.items():
            if key not in HOST_KEYS:
                raise OrchestraError(
                    f"{where}: host '{name}' has unknown key '{key}'; known keys: {', '.join(HOST_KEYS)}"
                )
            check_config_value(key, value, f"{where}: host '{name}'", HOST_KEYS[key])
        if str(host["ssh"]).startswith("-") or any(c.isspace() for c in host["ssh"]):
            raise OrchestraError(
                f"{where}: host '{name}': 'ssh' {json.dumps(host['ssh'])} is not an ssh target; "
                "give user@host, ssh://user@host:port or an ~/.ssh/config alias"
            )
        if host.get("max_parallel", 1) < 1:
            raise OrchestraError(f"{where}: host '{name}': 'max_parallel' must be at least 1")
        if str(host.get("workdir", "~/")).startswith("~") and not str(
            host.get("workdir", "~/")
        ).startswith("~/"):
            raise OrchestraError(
                f"{where}: host '{name}': 'workdir' must be absolute or start with '~/'"
            )
        for variable in host.get("env", ()):
            if not ENV_NAME.fullmatch(variable):
                raise OrchestraError(
                    f"{where}: host '{name}': 'env' lists {json.dumps(variable)}, not a variable name"
                )


def check_resilience_values(values, sources):
    """Check, fix-round, retry and budget settings that are well typed but out of range."""
    for key, low in (("fix_rounds", 0), ("api_retries", 0)):
        if values[key] < low:
            raise OrchestraError(
                f"{sources[key]}: '{key}' must be at least {low}, not {values[key]}"
            )
    for key in ("check_timeout", "api_backoff", "api_backoff_max", "max_budget_usd"):
        if values[key] is not None and not values[key] > 0:
            raise OrchestraError(
                f"{sources[key]}: '{key}' must be a number above 0, not {values[key]}"
            )


def user_config_path(env):
    """Where the user's own configuration file lives."""
    if env.get("ORCHESTRA_CONFIG"):
        return Path(env["ORCHESTRA_CONFIG"])
    base = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME", "~"), ".config")
    return Path(base).expanduser() / "claude-orchestra" / "config.json"


def check_config_value(key, value, where, kind=None):
    """Raise a clear error when a config value has the wrong type."""
    kind = kind or CONFIG_TYPES[key]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value),
        "str": isinstance(value, str) and value != "",
        "str?": value is None or isinstance(value, str),
        "number?": value is None
        or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ),
        "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "hosts": isinstance(value, dict),
    }[kind]
    if not ok:
        raise OrchestraError(
            f"{where}: '{key}' must be {TYPE_NAMES[kind]}, not {json.dumps(value)}"
        )
    if key == "notify_command" and any("{message}" in part for part in value):
        raise OrchestraError(
            f"{where}: notify_command no longer takes {{message}} (every local user can read a "
            "command line): read the message from stdin or $ORCHESTRA_MESSAGE; {agent} and "
            "{event} still work"
        )


def read_config_file(path):
    """The settings in one JSON config file ({} if it does not exist), checked."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise OrchestraError(f"{path}: cannot read the config file: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise OrchestraError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix or remove it"
        ) from None
    if not isinstance(data, dict):
        raise OrchestraError(f"{path}: must hold a JSON object of settings")
    for key, value in data.items():
        if key not in CONFIG_TYPES:
            raise OrchestraError(
                f"{path}: unknown key '{key}'; known keys: {', '.join(CONFIG_TYPES)}"
            )
        check_config_value(key, value, path)
    return data


class Config:
    """The effective settings and, for each, where its value came from."""

    def __init__(self, values, sources):
        self.values = values
        self.sources = sources

    def __getitem__(self, key):
        return self.values[key]

    @classmethod
    def load(cls, repo, env, flags=None):
        """Merge defaults, the user file, the project file and flags ({key: value})."""
        values, sources = dict(CONFIG_DEFAULTS), dict.fromkeys(CONFIG_DEFAULTS, "default")
        user = user_config_path(env)
        layers = [(user, read_config_file(user))]
        if repo is not None:
            project = repo / ORCHESTRA_DIR / "config.json"
            layers.append((project, read_config_file(project)))
        for path, data in layers:
            values.update(data)
            sources.update(dict.fromkeys(data, str(path)))
        for key, value in (flags or {}).items():
            if value is not None:
                values[key], sources[key] = value, "flag"
        cls.check_consistency(values, sources)
        return cls(values, sources)

    @staticmethod
    def check_consistency(values, sources):
        """Values that are each well typed but do not make sense together."""
        for key in ("default_parallel", "max_parallel"):
            if values[key] < 1:
                raise OrchestraError(f"{sources[key]}: '{key}' must be at least 1")
        if not values["agent_command"]:
            raise OrchestraError(f"{sources['agent_command']}: 'agent_command' must not be empty")
        if values["sandbox"] not in SANDBOX_MODES:
            raise OrchestraError(
                f"{sources['sandbox']}: 'sandbox' must be one of {', '.join(SANDBOX_MODES)}, not {json.dumps(values['sandbox'])}"
            )
        if values["land_strategy"] not in LAND_STRATEGIES:
            raise OrchestraError(
                f"{sources['land_strategy']}: 'land_strategy' must be one of {', '.join(LAND_STRATEGIES)}, not {json.dumps(values['land_strategy'])}"
            )
        for key in ("heartbeat_interval", "stale_threshold"):
            if values[key] <= 0:
                raise OrchestraError(f"{sources[key]}: '{key}' must be more than 0 seconds")
        if not is_branch_prefix(values["branch_prefix"]):
            raise OrchestraError(
                f"{sources['branch_prefix']}: 'branch_prefix' {json.dumps(values['branch_prefix'])} cannot start a "
                "git branch name; use letters, digits and '-', with '/' between parts (for example 'orchestra')"
            )
        folder = Path(values["worktree_dir"])
        if folder.parts[:1] == (".git",) or folder in (Path("/"), Path(".")):
            raise OrchestraError(
                f"{sources['worktree_dir']}: 'worktree_dir' {json.dumps(values['worktree_dir'])} would put worktrees "
                "inside .git, the root folder or the checkout itself; use a folder of their own such as '.worktrees'"
            )
        if values["approval_timeout"] <= 0:
            raise OrchestraError(
                f"{sources['approval_timeout']}: 'approval_timeout' must be more than 0 seconds"
            )
        check_resilience_values(values, sources)
        check_hosts_value(values["hosts"], sources["hosts"])
        if values["placement"] not in PLACEMENTS:
            raise OrchestraError(
                f"{sources['placement']}: 'placement' must be one of {', '.join(PLACEMENTS)}, not {json.dumps(values['placement'])}"
            )

    def parallel_limit(self, requested=None):
        """How many agents may run at once: the request or default, capped by max_parallel."""
        return min(requested or self["default_parallel"], self["max_parallel"])


def is_branch_prefix(prefix):
    """True when '<prefix>/<id>' is a branch name git accepts (git check-ref-format's rules)."""
    parts = prefix.split("/")
    return not (
        prefix.startswith(("-", "refs/"))
        or "" in parts
        or ".." in prefix
        or "@{" in prefix
        or any(c in prefix for c in " ~^:?*[\\")
        or any(ord(c) < 32 or ord(c) == 127 for c in prefix)
        or any(part.startswith(".") or part.endswith(".lock") for part in parts)
    )


def write_config_value(path, key, value, unset=False):
    """Set (or unset) one key in a config file, checked as loading it would check it."""
    path = Path(path)
    if key not in CONFIG_TYPES:
        raise OrchestraError(f"unknown key '{key}'; known keys: {', '.join(CONFIG_TYPES)}")
    data = read_config_file(path)
    if unset:
        data.pop(key, None)
    else:
        check_config_value(key, value, path)
        data[key] = value
    Config.check_consistency({**CONFIG_DEFAULTS, **data}, dict.fromkeys(CONFIG_DEFAULTS, str(path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


# ======================================================================================
# Git
# --------------------------------------------------------------------------------------
# Every git call goes through run_git(): an argv list, never a shell, and failures
# carry git's own stderr.
# ======================================================================================


# Variables that tell git which repository, index or object store to use instead of the one
# `cwd` is in (what `git rev-parse --local-env-vars` prints, plus the discovery ones). An exported
# GIT_DIR (a script, direnv) must never send orchestra's git, or an agent's, to the user's checkout.
GIT_LOCATING_VARS = (
    "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_CONFIG", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT",
    "GIT_OBJECT_DIRECTORY", "GIT_DIR", "GIT_WORK_TREE", "GIT_IMPLICIT_WORK_TREE", "GIT_GRAFT_FILE",
    "GIT_INDEX_FILE", "GIT_NO_REPLACE_OBJECTS", "GIT_REPLACE_REF_BASE", "GIT_PREFIX",
    "GIT_INTERNAL_SUPER_PREFIX", "GIT_SHALLOW_FILE", "GIT_COMMON_DIR", "GIT_NAMESPACE",
    "GIT_CEILING_DIRECTORIES", "GIT_DISCOVERY_ACROSS_FILESYSTEM",
)  # fmt: skip
_probed_git_vars = []  # what this git says it honours, asked once per process


def git_locating_vars():
    """The repository-locating variables: GIT_LOCATING_VARS and whatever this git adds to them."""
    if not _probed_git_vars:
        try:
            done = subprocess.run(
                ["git", "rev-parse", "--local-env-vars"],
                capture_output=True,
                text=True,
                env={k: v for k, v in os.environ.items() if k not in GIT_LOCATING_VARS},
                cwd=os.sep,
            )
            names = done.stdout.split() if done.returncode == 0 else []
        except OSError:
            names = []
        _probed_git_vars.append(frozenset(GIT_LOCATING_VARS) | frozenset(names))
    return _probed_git_vars[0]


def clean_env(env=None):
    """`env` (default: this process's) without the variables that point git elsewhere."""
    drop = git_locating_vars()
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in drop}


def run_git(args, cwd, check=True, env=None, input=None):
    """Run git with `args` in `cwd` (and `env`, `input`); raise GitError with git's stderr when it fails."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=str(cwd),
            capture_output=True,
            text=True,
            errors="replace",
            env=clean_env() if env is None else env,
            input=input,
        )
    except FileNotFoundError:
        raise missing_git_or_folder(cwd) from None
    if check and done.returncode != 0:
        detail = one_line(done.stderr or done.stdout, limit=TAIL_CHARS) or f"exit {done.returncode}"
        raise GitError(f"git {args[0]} failed: {detail}")
    return done


def page_git(args, cwd):
    """Run git with its output on this terminal, paged and coloured as git itself decides
    (a pager only when stdout is a terminal: core.pager, $GIT_PAGER, $PAGER); its exit status."""
    sys.stdout.flush()
    try:
        return subprocess.run(["git", *args], cwd=str(cwd), env=clean_env()).returncode
    except FileNotFoundError:
        raise OrchestraError("git is not installed or not on PATH; install git first") from None


def find_repo(cwd):
    """The main worktree of the repository holding `cwd`, from any of its worktrees.

    Reads .git files directly (no subprocess), falling back to git for unusual layouts.
    """
    here = Path(cwd).resolve()
    # GIT_DIR and its kin are ignored (see clean_env): the folder decides
    for folder in (here, *here.parents):
        dot_git = folder / ".git"
        if dot_git.is_dir():
            return folder
        if dot_git.is_file():
            main = main_worktree_from_gitfile(folder, dot_git)
            if main is not None:
                return main
            break
    done = run_git(["rev-parse", "--path-format=absolute", "--git-common-dir"], here, check=False)
    if done.returncode != 0:
        raise OrchestraError(
            f"{here} is not inside a git repository; cd into one or run 'git init'"
        )
    common = Path(done.stdout.strip())
    if common.name != ".git":
        raise OrchestraError(f"{common} is a bare repository; run orchestra in a checkout")
    return common.parent


def main_worktree_from_gitfile(folder, dot_git):
    """Follow a linked worktree's `.git` file to its main worktree; None if unsure."""
    text = dot_git.read_text(encoding="utf-8", errors="replace").strip()
    if not text.startswith("gitdir:"):
        return None
    git_dir = (folder / text[len("gitdir:") :].strip()).resolve()
    commondir = git_dir / "commondir"
    if not commondir.is_file():
        return folder  # a submodule: its git dir is its own
    common = (git_dir / commondir.read_text(encoding="utf-8").strip()).resolve()
    return common.parent if common.name == ".git" else None


def current_branch(repo):
    """The branch checked out in `repo`, or None when HEAD is detached."""
    done = run_git(["symbolic-ref", "--quiet", "--short", "HEAD"], repo, check=False)
    return done.stdout.strip() or None


def resolve_commit(repo, ref):
    """The commit a ref names, or a clear error when it names none."""
    done = run_git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], repo, check=False)
    if done.returncode != 0:
        raise OrchestraError(
            f"base '{ref}' is not a commit in this repository; "
            "pass an existing branch, tag or commit with --base"
        )
    return done.stdout.strip()


def has_commits(repo):
    """True once the repository has at least one commit."""
    return run_git(["rev-parse", "--verify", "--quiet", "HEAD"], repo, check=False).returncode == 0


def local_branches(repo, prefix):
    """Names of local branches under `prefix/`, without the prefix."""
    done = run_git(["for-each-ref", "--format=%(refname:short)", f"refs/heads/{prefix}/"], repo)
    return {line[len(prefix) + 1 :] for line in done.stdout.splitlines()}


def branch_exists(repo, branch):
    """True when a local branch of that name exists."""
    return (
        run_git(
            ["show-ref", "--verify", "--quiet", f"refs/heads/{branch}"], repo, check=False
        ).returncode
        == 0
    )


def is_valid_branch_name(name):
    """True when git accepts `name` as a branch name."""
    return run_git(["check-ref-format", "--branch", name], ".", check=False).returncode == 0


def real_path(path):
    """`path` with symlinks resolved, as git records worktree paths (a relative one: from `.`)."""
    return os.path.realpath(str(path))


def list_worktrees(repo):
    """`git worktree list --porcelain` as a list of dicts (path, real, head, branch, flags).

    `real` is the path with symlinks resolved: compare worktree paths by it, never by `path`.
    """
    worktrees, current = [], None
    for line in run_git(["worktree", "list", "--porcelain"], repo).stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "worktree":
            current = {
                "path": value,
                "real": real_path(os.path.join(str(repo), value)),
                "head": None,
                "branch": None,
                "bare": False,
                "detached": False,
                "locked": False,
                "prunable": False,
            }
            worktrees.append(current)
        elif current is None:
            continue
        elif key == "HEAD":
            current["head"] = value if value.strip("0") else None  # all zeros: an unreadable HEAD
        elif key == "branch":
            current["branch"] = (
                value[len("refs/heads/") :] if value.startswith("refs/heads/") else value
            )
        elif key in ("bare", "detached", "locked", "prunable"):
            current[key] = True
    return worktrees


def untracked_files(repo, skip):
    """Untracked files (ignored ones included) in `repo`, minus paths under `skip` folders."""
    done = run_git(["ls-files", "--others", "-z"], repo)
    return [p for p in done.stdout.split("\0") if p and not any(p.startswith(s) for s in skip)]


def change_counts(worktree, base_commit):
    """(commits since base, files changed vs base including uncommitted and untracked)."""
    commits = run_git(["rev-list", "--count", f"{base_commit}..HEAD"], worktree).stdout.strip()
    changed = run_git(["diff", "--name-only", "-z", base_commit], worktree).stdout.split("\0")
    new = run_git(["ls-files", "--others", "--exclude-standard", "-z"], worktree).stdout.split("\0")
    return int(commits or 0), len({p for p in changed + new if p})


def worktree_status(worktree):
    """[(XY code, path)] of everything not committed: changes, untracked ('??') and ignored ('!!')."""
    fields = run_git(["status", "--porcelain=v1", "-z", "--ignored"], worktree).stdout.split("\0")
    entries, skip_next = [], False
    for field in fields:
        if skip_next or not field:
            skip_next = False
            continue
        code, path = field[:2], field[3:]
        entries.append((code, path))
        skip_next = "R" in code or "C" in code  # a rename's source path follows
    return entries


def commits_between(repo, base, tip):
    """[(short hash, subject)] of commits on tip that base lacks, oldest first."""
    done = run_git(["log", "--reverse", "--format=%h%x00%s", f"{base}..{tip}"], repo)
    return [tuple(line.split("\0", 1)) for line in done.stdout.splitlines()]


def ref_commit(repo, ref):
    """The commit a ref points at, or None when it does not exist."""
    done = run_git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], repo, check=False)
    return done.stdout.strip() or None


def is_ancestor(repo, older, newer):
    """True when `older` is reachable from `newer`."""
    return run_git(["merge-base", "--is-ancestor", older, newer], repo, check=False).returncode == 0


def all_patches_upstream(repo, upstream, tip):
    """True when every commit of tip has a patch-equivalent commit in upstream (`git cherry`)."""
    lines = run_git(["cherry", upstream, tip], repo).stdout.split()
    return all(mark == "-" for mark in lines[::2])


def diff_already_in(repo, upstream, tip):
    """True when merging tip into upstream would change nothing (a squash merge landed it).

    Needs `git merge-tree --write-tree` (git 2.38); without it, the answer is a safe False.
    """
    merged = run_git(["merge-tree", "--write-tree", upstream, tip], repo, check=False)
    if merged.returncode != 0:
        return False  # a conflict (exit 1), or a git too old for --write-tree
    upstream_tree = run_git(["rev-parse", f"{upstream}^{{tree}}"], repo).stdout.strip()
    return merged.stdout.split("\n", 1)[0].strip() == upstream_tree


def merge_in_progress(repo):
    """True while the user's checkout is in the middle of a merge."""
    git_dir = Path(run_git(["rev-parse", "--absolute-git-dir"], repo).stdout.strip())
    return (git_dir / "MERGE_HEAD").exists()


def add_exclude_lines(repo, lines):
    """Append lines to .git/info/exclude (never a tracked file) unless already there."""
    common = Path(
        run_git(["rev-parse", "--path-format=absolute", "--git-common-dir"], repo).stdout.strip()
    )
    exclude = common / "info" / "exclude"
    existing = exclude.read_text(encoding="utf-8").splitlines() if exclude.exists() else []
    missing = [line for line in lines if line not in existing]
    if missing:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with open(exclude, "a", encoding="utf-8") as f:
            if existing and existing[-1] != "":
                f.write("\n")
            f.write("\n".join(missing) + "\n")


def missing_git_or_folder(cwd):
    """The right error when git could not start: its folder is gone, or git is missing."""
    if not os.path.isdir(cwd):
        return GitError(
            f"folder {cwd} no longer exists (another orchestra command may have removed it)"
        )
    return OrchestraError("git is not installed or not on PATH; install git first")


# ======================================================================================
# What a worktree holds
# --------------------------------------------------------------------------------------
# Judged from git's objects and the filesystem, never from one porcelain view: `git status`
# hides what status.*, core.excludesFile, assume-unchanged or skip-worktree say, shows an
# untracked folder as one entry, and knows nothing of the worktree's own HEAD, reflog or
# nested repositories. So these helpers walk the folder themselves and hash every file (a
# file is clean only when its bytes and mode equal the committed blob, or the blob setup left
# there), and collect every commit the worktree can reach (HEAD, its reflog, the branch's
# reflog, its stashes) to find those no ref outside the worktree holds. Git runs with
# SEE_ALL_GIT. worktree_holdings() is the one answer cleanup and collect trust.
# ======================================================================================

GIT_DIED = 128  # git's exit status when it dies (die()): it could not answer at all

# Config overrides for every git call that judges what a worktree holds: whatever the user's
# (or an agent's) git config says, git then hides nothing and runs nothing of the user's.
SEE_ALL_GIT = (
    "-c", "core.excludesFile=/dev/null", "-c", "status.showUntrackedFiles=all",
    "-c", "core.fsmonitor=false", "-c", "core.untrackedCache=false", "-c", "core.ignoreStat=false",
    "-c", "core.sparseCheckout=false", "-c", "diff.ignoreSubmodules=none", "-c", "gc.auto=0",
    "-c", "core.hooksPath=/dev/null", "-c", "core.quotePath=false",
)  # fmt: skip


def git_bytes(args, cwd, input=b"", env=None, check=True):
    """Run git with SEE_ALL_GIT overrides, bytes in and out; raise GitError when it fails."""
    try:
        done = subprocess.run(
            ["git", *SEE_ALL_GIT, *args],
            cwd=str(cwd),
            input=input,
            capture_output=True,
            env=clean_env() if env is None else env,
        )
    except FileNotFoundError:
        raise missing_git_or_folder(cwd) from None
    if check and done.returncode != 0:
        detail = one_line(done.stderr.decode("utf-8", "replace"), limit=TAIL_CHARS)
        raise GitError(f"git {args[0]} failed: {detail or f'exit {done.returncode}'}")
    return done


def worktree_admin_dir(worktree):
    """The worktree's private folder under .git/worktrees/, from its .git file; None if unsure."""
    dot_git = Path(worktree) / ".git"
    try:
        text = dot_git.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    if not text.startswith("gitdir:"):
        return None
    admin = (Path(worktree) / text[len("gitdir:") :].strip()).resolve()
    return admin if admin.is_dir() else None


def own_admin_dirs(repo, worktree):
    """Administrative folders (.git/worktrees/<name>) that belong to this worktree path."""
    common = Path(
        run_git(["rev-parse", "--path-format=absolute", "--git-common-dir"], repo).stdout.strip()
    )
    found, wanted = [], real_path(worktree)
    for admin in sorted((common / "worktrees").glob("*")):
        with contextlib.suppress(OSError):
            pointer = (admin / "gitdir").read_text(encoding="utf-8", errors="replace").strip()
            if real_path(os.path.dirname(os.path.join(str(admin), pointer))) == wanted:
                found.append(admin)
    return found


def admin_worktree_path(admin):
    """The worktree path an administrative folder (.git/worktrees/<name>) points at, or None."""
    try:
        pointer = (Path(admin) / "gitdir").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    return real_path(os.path.dirname(os.path.join(str(admin), pointer)))


def rev_lines(args, cwd):
    """Hashes printed by a git command that may find none (a missing reflog, an unborn HEAD): a
    list, maybe empty. git dying (exit 128: unreadable, dubious ownership) is a GitError, never [].
    """
    done = git_bytes(args, cwd, check=False)
    if done.returncode >= GIT_DIED:
        detail = one_line(done.stderr.decode("utf-8", "replace"), limit=TAIL_CHARS)
        raise GitError(f"git {args[0]} failed: {detail or f'exit {done.returncode}'}")
    return done.stdout.decode().split()


def check_worktree(repo, record):
    """Refuse, naming the agent, when git cannot read its worktree as one of this repository's
    (dubious ownership, a `.git` deleted or replaced by `git init`): what it holds is unknown,
    so it must be kept, never read as empty."""
    worktree, agent = Path(record["worktree"]), record["id"]
    admin = worktree_admin_dir(worktree)
    with contextlib.suppress(OSError):
        if (
            admin is not None
            and real_path(admin.parent) == real_path(Path(repo) / ".git" / "worktrees")
            and admin_worktree_path(admin) == real_path(worktree)
            and os.stat(worktree).st_uid == os.geteuid()
        ):
            return  # plainly ours: no need to ask git (collect asks nothing per agent)
    done = git_bytes(
        ["rev-parse", "--path-format=absolute", "--git-common-dir", "--show-toplevel"],
        worktree,
        check=False,
    )
    lines = done.stdout.decode("utf-8", "surrogateescape").splitlines()
    if done.returncode != 0 or len(lines) != 2:
        detail = one_line(done.stderr.decode("utf-8", "replace"), limit=TAIL_CHARS)
        raise GitError(
            f"{agent}: git cannot read its worktree {worktree} ({detail or 'no answer'}); "
            "it is kept as it is. Fix the folder (owner, permissions), then run the command again"
        )
    common, top = (real_path(line) for line in lines)
    if common != real_path(Path(repo) / ".git") or top != real_path(worktree):
        raise GitError(
            f"{agent}: {worktree} is no longer a git worktree of this repository (its .git was "
            "removed or replaced); it is kept as it is. Copy out what you need, then delete it by hand"
        )


def moved_worktree(repo, record):
    """Where git says the agent's worktree lives when it is not at the record's path (an agent
    ran `git worktree move`), else None."""
    if Path(record["worktree"]).is_dir():
        return None
    name = re.compile(re.escape(f"{WORKTREE_PREFIX}{record['id']}") + r"[0-9]*")
    for admin in sorted((Path(repo) / ".git" / "worktrees").glob(f"{WORKTREE_PREFIX}*")):
        where = admin_worktree_path(admin) if name.fullmatch(admin.name) else None
        if where and where != real_path(record["worktree"]) and os.path.isdir(where):
            return where
    for listed in list_worktrees(repo):
        if listed["branch"] == record["branch"] and os.path.isdir(listed["real"]):
            return listed["real"]
    return None


def nested_worktrees(repo, worktree):
    """Real paths of other worktrees of this repository that live inside `worktree` (Claude
    Code's `.claude/worktrees/`): deleting the folder deletes them too."""
    mine = real_path(worktree)
    return [
        w["real"]
        for w in list_worktrees(repo)
        if w["real"].startswith(mine + os.sep) and os.path.isdir(w["real"])
    ]


def nested_worktree_commits(worktrees):
    """Every commit nested worktrees reach by name: their HEADs and HEAD reflogs."""
    commits = []
    for nested in worktrees:
        commits += rev_lines(["rev-parse", "--verify", "--quiet", "HEAD"], nested)
        commits += rev_lines(["rev-list", "--walk-reflogs", "--ignore-missing", "HEAD"], nested)
    return list(dict.fromkeys(commits))


def worktree_commits(repo, worktree, branch):
    """Every commit the worktree can reach by name: HEAD, HEAD's reflog, the branch's reflog."""
    commits = rev_lines(["rev-parse", "--verify", "--quiet", "HEAD"], worktree)
    commits += rev_lines(["rev-list", "--walk-reflogs", "--ignore-missing", "HEAD"], worktree)
    commits += rev_lines(
        ["rev-list", "--walk-reflogs", "--ignore-missing", f"refs/heads/{branch}"], repo
    )
    return list(dict.fromkeys(commits))


def worktree_branch_names(worktree, branch):
    """Branches the worktree has had checked out: the agent's, and every `checkout: moving ... to X`."""
    names = {branch, "(no branch)"}
    moves = (
        git_bytes(["log", "--walk-reflogs", "--format=%gs", "HEAD"], worktree, check=False)
        if worktree.is_dir()
        else None
    )
    for line in (moves.stdout.decode("utf-8", "replace").splitlines() if moves else []):
        if line.startswith("checkout: moving from "):
            names.add(line.rsplit(" to ", 1)[-1])
    return names


def worktree_stashes(repo, worktree, commits, branch):
    """Stash entries made in this worktree: on a branch it had checked out (detached: on one of its
    commits), or on a commit of its own that the user's checkout never had."""
    lines = git_bytes(
        ["log", "--walk-reflogs", "--format=%H %P%x00%gs", "refs/stash"], repo, check=False
    )
    names = worktree_branch_names(Path(worktree), branch)
    users = set(rev_lines(["rev-list", "--walk-reflogs", "--ignore-missing", "HEAD"], repo))
    users |= set(rev_lines(["rev-parse", "--verify", "--quiet", "HEAD"], repo))
    known, found = set(commits), []
    for line in lines.stdout.decode("utf-8", "replace").splitlines():
        hashes, _, subject = line.partition("\0")
        stash, *parents = hashes.split()
        parent = parents[0] if parents else None
        match = re.match(r"(?:WIP on|On) (.+?):", subject)
        named = match.group(1) if match else None
        if named in names - {"(no branch)"} or (
            parent in known and (named == "(no branch)" or parent not in users)
        ):
            found.append(stash)
    return found


def outside_tips(repo, worktree, skip_refs):
    """Commits every ref holds except `skip_refs`, plus every other worktree's HEAD."""
    out = git_bytes(["for-each-ref", "--format=%(objectname) %(refname)"], repo).stdout.decode()
    tips = [
        sha
        for sha, ref in (line.split(" ", 1) for line in out.splitlines())
        if ref not in skip_refs
    ]
    mine = real_path(worktree)
    for other in list_worktrees(repo):
        inside = other["real"] == mine or other["real"].startswith(mine + os.sep)
        if not inside and other["head"]:  # a worktree nested in this one goes with it
            tips.append(other["head"])
    return tips


def commits_only_in(repo, wanted, tips):
    """Commits reachable from `wanted` that none of `tips` reaches, newest first."""
    if not wanted:
        return []
    lines = [*wanted, *(f"^{t}" for t in tips)]
    done = git_bytes(["rev-list", "--stdin"], repo, input="\n".join(lines).encode() + b"\n")
    return done.stdout.decode().split()


def independent_commits(repo, commits):
    """The fewest commits from which all of `commits` are reachable."""
    if len(commits) < 2:
        return list(commits)
    return run_git(["merge-base", "--independent", *commits], repo).stdout.split()


def walk_files(root, skip_top_git=True, stats=None):
    """(relative path bytes, absolute path, kind) of every file under root, nested .git included.

    kind: "file", "exec", "link", or "special" (fifo, socket, device: cannot be saved). A `stats`
    dict gets each file's and link's lstat by absolute path (the walk makes that call anyway).
    """
    root_b = os.fsencode(str(root))
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        try:
            entries = sorted(
                os.scandir(os.path.join(root_b, rel_dir) if rel_dir else root_b),
                key=lambda e: e.name,
            )
        except OSError:
            yield rel_dir, os.path.join(root_b, rel_dir), "unreadable"
            continue
        for entry in entries:
            rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
            if skip_top_git and not rel_dir and entry.name == b".git":
                continue
            yield from walk_entry(entry, rel, stack, stats)


def walk_entry(entry, rel, stack, stats=None):
    """One directory entry of walk_files: folders are queued, files yielded with their kind."""
    if entry.is_symlink():
        if stats is not None:
            with contextlib.suppress(OSError):
                stats[entry.path] = entry.stat(follow_symlinks=False)
        yield rel, entry.path, "link"
    elif entry.is_dir(follow_symlinks=False):
        stack.append(rel)
    elif entry.is_file(follow_symlinks=False):
        info = entry.stat(follow_symlinks=False)
        if stats is not None:
            stats[entry.path] = info
        yield rel, entry.path, "exec" if info.st_mode & 0o111 else "file"
    else:
        yield rel, entry.path, "special"


def snapshot_path(rel):
    """A file's path inside a snapshot tree: a nested `.git` is renamed, git refuses that name."""
    return b"/".join(
        NESTED_GIT_NAME.encode() if part == b".git" else part for part in rel.split(b"/")
    )


def line_safe(path):
    """True when `--stdin-paths` reads this path back as it is: one line per path, where git strips a
    trailing CR and unquotes a leading double quote (NUL-separated input it does not offer)."""
    return b"\n" not in path and b"\r" not in path and not path.startswith(b'"')


def hash_blobs(repo, items, write):
    """{relative path: blob hash} of (rel, absolute path, kind) items; bytes as they are on disk."""
    hashes = {}
    plain = [(rel, path) for rel, path, kind in items if kind != "link" and line_safe(path)]
    if plain:
        args = ["hash-object", "--no-filters", "--stdin-paths", *(["-w"] if write else [])]
        out = git_bytes(
            args, repo, input=b"".join(path + b"\n" for _, path in plain)
        ).stdout.split()
        hashes.update({rel: sha.decode() for (rel, _), sha in zip(plain, out)})
    for rel, path, kind in items:
        if rel in hashes:
            continue
        data = os.readlink(path) if kind == "link" else Path(os.fsdecode(path)).read_bytes()
        args = ["hash-object", "--no-filters", "--stdin", *(["-w"] if write else [])]
        hashes[rel] = git_bytes(args, repo, input=data).stdout.decode().strip()
    return hashes


def tree_entries(repo, treeish):
    """{path bytes: (mode, hash)} of every blob, link and gitlink in a commit's tree."""
    if not treeish:
        return {}
    out = git_bytes(["ls-tree", "-r", "-z", "--full-tree", treeish], repo).stdout
    entries = {}
    for field in out.split(b"\0"):
        if field:
            meta, path = field.split(b"\t", 1)
            mode, _, sha = meta.decode().split(" ")
            entries[path] = (mode, sha)
    return entries


FILE_MODES = {"file": "100644", "exec": "100755", "link": "120000"}


def gitfile_target(path):
    """The folder a nested `.git` file points to, or None."""
    try:
        text = Path(os.fsdecode(path)).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    if not text.startswith("gitdir:"):
        return None
    target = (Path(os.fsdecode(path)).parent / text[len("gitdir:") :].strip()).resolve()
    return target if target.is_dir() else None


def worktree_files(repo, worktree, admin, stats=None):
    """Every file the worktree holds, as (rel, path, kind), with nested repositories' private
    git folders that live in the worktree's admin folder (and vanish with it) added in place
    (`stats`: see walk_files)."""
    items = []
    for rel, path, kind in walk_files(worktree, stats=stats):
        items.append((rel, path, kind))
        if admin and rel.endswith(b"/.git") and kind == "file":
            target = gitfile_target(path)
            if target and str(target).startswith(str(admin) + os.sep):
                prefix = rel[: -len(b".git")] + b".git-dir"
                items += [
                    (prefix + b"/" + r, p, k)
                    for r, p, k in walk_files(target, skip_top_git=False, stats=stats)
                ]
    return items


def setup_blob_matches(fingerprint, path, sha):
    """True when a setup-made file is still what setup left: same blob (or, for records made
    before blobs were kept, same [size, mtime_ns])."""
    if isinstance(fingerprint, str):
        return fingerprint == sha
    if isinstance(fingerprint, list):
        with contextlib.suppress(OSError):
            info = os.stat(path, follow_symlinks=False)
            return [info.st_size, info.st_mtime_ns] == fingerprint
    return False


def file_changes(repo, worktree, head, setup, admin=None):
    """What in the worktree differs from HEAD's tree and from setup's files.

    {"changed": [(kind, path str, rel, mode, hash)], "deleted": [...], "special": [...] (fifos,
    sockets: nothing to save), "unreadable": [...]} (paths as str)
    where kind is "modified", "untracked", "nested" (inside a nested repository) or "link".
    """
    committed = tree_entries(repo, head)
    walked = {}
    items = worktree_files(repo, worktree, admin, walked)
    special = [os.fsdecode(rel) for rel, _, kind in items if kind == "special"]
    unreadable = [os.fsdecode(rel) for rel, _, kind in items if kind == "unreadable"]
    items = [i for i in items if i[2] in FILE_MODES]
    stats = file_stats(items, walked)  # before hashing: a later write shows as a changed stat
    hashes = hash_blobs(repo, items, write=False)
    stored = stored_hashes(worktree, items, hashes, committed)
    changed, present, paths = [], set(), {}
    for rel, path, kind in items:
        present.add(rel)
        mode, sha, name = FILE_MODES[kind], hashes[rel], os.fsdecode(rel)
        if committed.get(rel) in ((mode, sha), (mode, stored.get(rel))) or setup_blob_matches(
            setup.get(name), path, sha
        ):
            continue
        nested = b"/.git/" in b"/" + rel or b".git-dir/" in rel
        what = "nested" if nested else ("modified" if rel in committed else "untracked")
        changed.append((what, name, rel, mode, sha))
        paths[rel] = (path, kind)
    deleted = [
        rel
        for rel, (mode, _) in committed.items()
        if rel not in present
        and not (mode == "160000" and not any(p.startswith(rel + b"/") for p in present))
    ]
    outside = skip_worktree_paths(worktree) if deleted else set()
    deleted = [os.fsdecode(rel) for rel in deleted if rel not in outside]
    return {
        "changed": changed,
        "deleted": deleted,
        "special": special,
        "unreadable": unreadable,
        "stats": stats,
        "paths": paths,
    }


def file_stats(items, walked):
    """{rel: (mode, size, mtime, ctime, inode)} of (rel, path, kind) items, from the lstat the
    walk made (`walked`, by path): any write since changes it."""
    stats = {}
    for rel, path, _ in items:
        info = walked.get(path)
        if info is not None:
            stats[rel] = (
                info.st_mode,
                info.st_size,
                info.st_mtime_ns,
                info.st_ctime_ns,
                info.st_ino,
            )
    return stats


def skip_worktree_paths(worktree):
    """Paths (bytes) the worktree's index marks skip-worktree (sparse checkout, or by hand): their
    absence from the disk is no deletion, git neither checks them out nor looks at them."""
    out = git_bytes(["ls-files", "-t", "-z"], worktree).stdout
    return {entry[2:] for entry in out.split(b"\0") if entry.startswith(b"S ")}


def stored_hashes(worktree, items, hashes, committed):
    """{rel: blob} of what git would store for tracked files whose raw bytes differ from the
    committed blob (clean filters, working-tree-encoding, eol rules applied): a filtered file
    equal to its commit is no change. Nested repositories' files are not the worktree's."""
    root, suspects = os.fsencode(str(worktree)) + b"/", []
    for rel, path, kind in items:
        entry = committed.get(rel)
        differs = kind != "link" and entry and entry[1] != hashes[rel] and path.startswith(root)
        if differs and entry[0] == FILE_MODES[kind] and b".git/" not in b"/" + rel + b"/":
            suspects.append(rel)
    found, plain = {}, [rel for rel in suspects if line_safe(rel)]
    if plain:
        done = git_bytes(
            ["hash-object", "--stdin-paths"], worktree, input=b"".join(r + b"\n" for r in plain)
        )
        found.update(zip(plain, done.stdout.decode().split()))
    for rel in (r for r in suspects if not line_safe(r)):
        data = Path(os.fsdecode(os.path.join(root, rel))).read_bytes()
        args = ["hash-object", f"--path={os.fsdecode(rel)}", "--stdin"]
        found[rel] = git_bytes(args, worktree, input=data).stdout.decode().strip()
    return found


def setup_fingerprints(worktree):
    """{path: blob hash} of every file copying and setup left beside or over the fresh checkout,
    so cleanup can later trust each one exactly while it is unchanged (folders file by file).

    Right after orchestra's own checkout, git's index knows the other files are untouched, so
    only untracked and ignored files and modified tracked ones are hashed (not the whole tree).
    """
    others = git_bytes(["ls-files", "-z", "--others"], worktree).stdout.split(b"\0")
    changed = git_bytes(["diff", "--name-only", "-z", "--no-renames"], worktree).stdout.split(b"\0")
    root, items = os.fsencode(str(worktree)), []
    for rel in (p for p in dict.fromkeys(others + changed) if p and not p.endswith(b"/")):
        path = os.path.join(root, rel)
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            kind = (
                "link" if stat.S_ISLNK(info.st_mode) else "exec" if info.st_mode & 0o111 else "file"
            )
            if stat.S_ISREG(info.st_mode) or kind == "link":
                items.append((rel, path, kind))
    return {os.fsdecode(rel): sha for rel, sha in hash_blobs(worktree, items, write=False).items()}


def ignored_among(worktree, paths):
    """Which of these untracked paths the repository's own ignore rules ignore (for messages)."""
    if not paths:
        return set()
    done = git_bytes(
        ["check-ignore", "-z", "--stdin"],
        worktree,
        input=b"\0".join(os.fsencode(p) for p in paths),
        check=False,
    )
    return {os.fsdecode(p) for p in done.stdout.split(b"\0") if p}


def staged_tree(worktree, head):
    """The index's tree when it differs from HEAD's ("staged"), None when equal; "conflict" when
    the index holds unmerged entries."""
    done = git_bytes(["write-tree"], worktree, check=False)
    if done.returncode != 0:
        return "conflict"
    tree = done.stdout.decode().strip()
    head_tree = (
        git_bytes(["rev-parse", f"{head}^{{tree}}"], worktree, check=False).stdout.decode().strip()
        if head
        else None
    )
    return None if tree == head_tree else tree


def snapshot_commit(repo, head, changes, message):
    """A commit of the worktree as it is: HEAD's tree with every changed file written over it and
    deleted ones left out; nested .git folders stored under NESTED_GIT_NAME. Parent: HEAD."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(clean_env(), GIT_INDEX_FILE=os.path.join(tmp, "index"))
        git_bytes(["read-tree", head] if head else ["read-tree", "--empty"], repo, env=env)
        zero = "0" * len(head or "0" * 40)
        lines = [f"0 {zero}\t".encode() + os.fsencode(p) for p in changes["deleted"]]
        lines += [
            f"{mode} {sha}\t".encode() + snapshot_path(rel)
            for _, _, rel, mode, sha in changes["changed"]
        ]
        if lines:
            git_bytes(
                ["update-index", "-z", "--index-info"],
                repo,
                input=b"\0".join(lines) + b"\0",
                env=env,
            )
        tree = git_bytes(["write-tree"], repo, env=env).stdout.decode().strip()
    parents = ["-p", head] if head else []
    return git_bytes(["commit-tree", tree, *parents, "-m", message], repo).stdout.decode().strip()


def write_changed_blobs(repo, worktree, admin, changes):
    """Store the changed files' bytes in the object database (hashes were computed without -w)."""
    wanted, paths = {rel for _, _, rel, _, _ in changes["changed"]}, changes.get("paths")
    items = (
        [(rel, *paths[rel]) for rel in wanted]
        if paths is not None
        else [i for i in worktree_files(repo, worktree, admin) if i[0] in wanted]
    )
    items = [i for i in items if i[2] in FILE_MODES]
    written = hash_blobs(repo, items, write=True)
    for entry in changes["changed"]:
        if written.get(entry[2]) != entry[4]:
            raise GitError(f"{entry[1]} changed while it was being saved; run cleanup again")


def octopus_commit(repo, parents, message):
    """A commit with an empty tree whose parents are `parents`: one ref that keeps them all."""
    empty = git_bytes(["mktree"], repo, input=b"").stdout.decode().strip()
    args = ["commit-tree", empty, *(x for p in parents for x in ("-p", p)), "-m", message]
    return git_bytes(args, repo).stdout.decode().strip()


def write_refs(repo, refs):
    """Create refs {name: commit} in one transaction: all of them or none."""
    lines = "".join(f"create {name} {commit}\n" for name, commit in refs.items())
    git_bytes(["update-ref", "--stdin"], repo, input=lines.encode())


def delete_tree(path):
    """Remove a folder and everything in it, read-only files and folders included."""

    def allow_and_retry(func, target, _exc):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
        func(target)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=allow_and_retry)


def delete_worktree(repo, worktree):
    """Remove a worktree folder and its own administrative entries, by name (never `prune`)."""
    admins = own_admin_dirs(repo, worktree)
    delete_tree(worktree)
    for admin in admins:
        delete_tree(admin)


@contextlib.contextmanager
def shield_interrupts():
    """Hold Ctrl-C (SIGINT), a closed terminal (SIGHUP), SIGTERM and SIGQUIT back while a step
    runs, git children included (they inherit the blocked mask), so a step happens wholly or not
    at all; the signal arrives after it. (kill -9 cannot be held: steps that delete are also
    safe to be cut short, see delete_worktree_safely.)"""
    can = (
        hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    )
    held = {
        getattr(signal, n) for n in ("SIGINT", "SIGHUP", "SIGTERM", "SIGQUIT") if hasattr(signal, n)
    }
    if can:
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        if can:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def operation_in_progress(repo):
    """'a merge', 'a rebase', ... when the checkout is in the middle of one; else None."""
    git_dir = Path(run_git(["rev-parse", "--absolute-git-dir"], repo).stdout.strip())
    for name, what in (
        ("rebase-merge", "a rebase"), ("rebase-apply", "a rebase or git am"), ("MERGE_HEAD", "a merge"),
        ("CHERRY_PICK_HEAD", "a cherry-pick"), ("REVERT_HEAD", "a revert"), ("BISECT_LOG", "a bisect"),
    ):  # fmt: skip
        if (git_dir / name).exists():
            return what
    return None


def processes_using(folder):
    """[(pid, command name)] of processes whose cwd, root or an open file is inside `folder`."""
    if not os.path.isdir("/proc"):
        return []  # pragma: no cover - macOS: nothing to scan without lsof
    inside, found = str(Path(folder).resolve()), []
    for pid in (p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
        links = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
        with contextlib.suppress(OSError):
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        if any(points_inside(link, inside) for link in links):
            found.append((int(pid), process_name(pid)))
    return found


def points_inside(link, folder):
    """True when a /proc symlink resolves to `folder` or below."""
    try:
        target = os.readlink(link)
    except OSError:
        return False
    return target == folder or target.startswith(folder + os.sep)


def process_name(pid):
    """The short command name of a process, '?' if it is gone."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def setup_map(record):
    """{path: blob hash (or old [size, mtime_ns])} of the files copying and setup left."""
    return record.get("setup_files") or {}


def display_path(path):
    """A path as text a terminal and JSON can show, even when its bytes are not UTF-8."""
    text = os.fsencode(path).decode("utf-8", "replace")
    return (
        text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
        if "\n" in text or "\t" in text
        else text
    )


def nested_root(rel):
    """The folder of the nested repository a snapshot path lies in (`a/b` for `a/b/.git/x`)."""
    text = os.fsdecode(rel)
    for marker in ("/.git-dir/", "/.git/"):
        if marker in "/" + text:
            return ("/" + text).split(marker, 1)[0].lstrip("/") or "."
    return text


def branch_tip(project, record):
    """The commit the agent's branch points at, None if the branch is gone."""
    return ref_commit(project.repo, f"refs/heads/{record['branch']}")


def describe_files(entries):
    """Reasons like 'untracked file notes.md' for a worktree's leftovers, the first few named."""
    kinds = {
        "??": "untracked file",
        "!!": "ignored file",
        " D": "deleted file",
        "NR": "nested repository",
    }
    named = [
        f"{kinds.get(code, 'uncommitted change')} {display_path(path)}"
        for code, path in entries[:MAX_LISTED_FILES]
    ]
    more = len(entries) - MAX_LISTED_FILES
    return ", ".join(named) + (f" and {more} more" if more > 0 else "")


def worktree_leftovers(record, changes):
    """[(XY code, path)] like git status: ' M', ' D', '??', '!!', and 'NR' for a nested repository."""
    worktree = record["worktree"]
    untracked = [name for what, name, *_ in changes["changed"] if what == "untracked"]
    ignored = ignored_among(worktree, untracked)
    entries, nested = [], []
    for what, name, rel, *_ in changes["changed"]:
        if what == "nested":
            nested.append(nested_root(rel))
        else:
            code = {"modified": " M", "untracked": "!!" if name in ignored else "??"}[what]
            entries.append((code, name))
    entries += [(" D", name) for name in changes["deleted"]]
    entries += [("NR", name) for name in dict.fromkeys(nested)]
    return sorted(entries, key=lambda e: e[1])


def uncommitted_work(repo, record):
    """[(XY code, path)] the agent's worktree holds beyond its HEAD commit and setup's files."""
    worktree = Path(record["worktree"])
    if not worktree.is_dir():
        return []
    check_worktree(repo, record)
    head = rev_lines(["rev-parse", "--verify", "--quiet", "HEAD"], worktree)
    changes = file_changes(
        worktree,
        worktree,
        head[0] if head else None,
        setup_map(record),
        worktree_admin_dir(worktree),
    )
    return worktree_leftovers(record, changes)


def worktree_head(worktree):
    """(the commit HEAD names or None, the branch checked out or None when HEAD is detached)."""
    head = rev_lines(["rev-parse", "--verify", "--quiet", "HEAD"], worktree)
    symbolic = (
        git_bytes(["symbolic-ref", "--quiet", "HEAD"], worktree, check=False)
        .stdout.decode()
        .strip()
    )
    branch = symbolic[len("refs/heads/") :] if symbolic.startswith("refs/heads/") else None
    return (head[0] if head else None), branch


def worktree_holdings(project, record):
    """Everything removing the agent's worktree and branch could lose.

    {tip, head, head_branch, detached_lost, reflog_lost, stashes, staged, changes, leftovers}:
    commits are those no ref outside the worktree (its branch and refs/stash not counted) holds.
    """
    repo, worktree, branch = project.repo, Path(record["worktree"]), record["branch"]
    held = {
        "tip": branch_tip(project, record),
        "head": None,
        "head_branch": None,
        "staged": None,
        "changes": None,
        "leftovers": [],
        "detached_lost": [],
        "reflog_lost": [],
    }
    nested = []
    if worktree.is_dir():
        check_worktree(repo, record)
        held["head"], held["head_branch"] = worktree_head(worktree)
        held["staged"] = staged_tree(worktree, held["head"])
        held["changes"] = file_changes(
            repo, worktree, held["head"], setup_map(record), worktree_admin_dir(worktree)
        )
        held["leftovers"] = worktree_leftovers(record, held["changes"])
        commits = worktree_commits(repo, worktree, branch)
        nested = nested_worktree_commits(nested_worktrees(repo, worktree))
    else:
        commits = rev_lines(
            ["rev-list", "--walk-reflogs", "--ignore-missing", f"refs/heads/{branch}"], repo
        )
    held["stashes"] = worktree_stashes(repo, worktree, commits, branch)
    tips = [*outside_tips(repo, worktree, {f"refs/heads/{branch}", "refs/stash"}), held["tip"]]
    tips = [t for t in tips if t]
    held["detached_lost"] = commits_only_in(repo, [held["head"]], tips) if held["head"] else []
    lost = commits_only_in(repo, commits, tips)
    held["reflog_lost"] = [c for c in lost if c not in set(held["detached_lost"])]
    held["nested_lost"] = commits_only_in(repo, nested, tips + commits)
    return held


def plural(count, noun):
    """'1 commit', '2 commits', '2 stashes'."""
    return f"{count} {noun}{'' if count == 1 else ('es' if noun.endswith(('s', 'sh')) else 's')}"


def holdings_reasons(record, held):
    """Why removing the worktree could lose something, in words, or [] when it could not."""
    reasons, branch = [], record["branch"]
    on_branch = held["head_branch"]
    if held["tip"] is None and (held["head"] or held["detached_lost"] or held["reflog_lost"]):
        where = (
            f"; its worktree has {on_branch} checked out"
            if on_branch and on_branch != branch
            else ""
        )
        count = len(set(held["detached_lost"]) | set(held["reflog_lost"]))
        holds = f"; its worktree holds {plural(count, 'commit')}" if count else ""
        reasons.append(f"branch {branch} was renamed or deleted{where}{holds}")
    elif on_branch and on_branch != branch:
        reasons.append(f"its worktree has branch {on_branch} checked out instead of {branch}")
    if held["head"] and not on_branch and held["detached_lost"]:
        reasons.append(
            f"HEAD is detached with {plural(len(held['detached_lost']), 'commit')} not on any branch"
        )
    if held["tip"] is not None and held["reflog_lost"]:
        reasons.append(
            f"{plural(len(held['reflog_lost']), 'commit')} only in the worktree's reflog (reset or amended away)"
        )
    if held.get("nested_lost"):
        reasons.append(
            f"{plural(len(held['nested_lost']), 'commit')} only in a worktree nested inside it"
        )
    if held["stashes"]:
        reasons.append(f"{plural(len(held['stashes']), 'stash')} made in the worktree")
    if held["staged"] == "conflict":
        reasons.append("unresolved conflicts in the index")
    elif held["staged"]:
        reasons.append("staged changes in the index")
    if held["leftovers"]:
        reasons.append(describe_files(held["leftovers"]))
    return reasons


def unsaveable(held):
    """Folders cleanup cannot read, so cannot archive: a reason to keep even when forced."""
    unreadable = (held["changes"] or {}).get("unreadable", [])
    return (
        f"cannot read {', '.join(unreadable[:MAX_LISTED_FILES])} to archive it; fix its permissions"
        if unreadable
        else None
    )


# ======================================================================================
# State store
# --------------------------------------------------------------------------------------
# state.json is shared by the CLI, the supervisor and the web server. Every change is a
# read-modify-write under an exclusive lock, written atomically; readers need no lock.
# ======================================================================================

STATE_VERSION = 1


def spawn_order(record):
    """Sort key: the order agents were spawned in (seq), then time and id for older records."""
    return record.get("seq", 0), record.get("created_at") or "", record["id"]


def empty_state():
    """A state document with no agents."""
    return {"version": STATE_VERSION, "agents": {}, "supervisor": {}, "parallel": None}


def state_text(state):
    """state.json's content: compact and sorted (indent would force json's slow pure-Python encoder)."""
    return json.dumps(state, separators=(",", ":"), sort_keys=True) + "\n"


def read_history(path):
    """{id: record} of the history file, later lines winning; unreadable lines (a torn end) skipped."""
    history = {}
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                history[record["id"]] = record
    return history


def append_history(path, records):
    """Append records to the history file, one line each, and fsync; a torn last line is closed first."""
    if not records:
        return
    lines = "".join(json.dumps(r, separators=(",", ":"), sort_keys=True) + "\n" for r in records)
    with open(path, "ab+") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                # a writer died mid-line: keep its fragment on a line of its own
                lines = "\n" + lines
        f.write(lines.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def move_removed(state):
    """Take removed records out of the live document; the moved records, oldest spawn first."""
    moved = sorted(
        (r for r in state["agents"].values() if r.get("state") == "removed"), key=spawn_order
    )
    for record in moved:
        del state["agents"][record["id"]]
        state["next_seq"] = max(state.get("next_seq") or 0, record.get("seq", 0) + 1)
    return moved


def next_seq(state):
    """The spawn order number of a new agent (ever increasing, though records move to history)."""
    seq = max(
        [state.get("next_seq") or 0, *(r.get("seq", 0) + 1 for r in state["agents"].values())]
    )
    state["next_seq"] = seq + 1
    return seq


class StateStore:
    """The versioned JSON state file with locked updates and recovery from corruption.

    state.json holds live agents only; an update that turns a record `removed` moves it to the
    append-only history.jsonl beside it (history first, so a crash between the two leaves a
    duplicate, never a loss; the later line wins). An update that changes nothing writes nothing.
    """

    def __init__(self, path, rebuild):
        self.path = Path(path)
        self.history_path = self.path.with_name("history.jsonl")
        self.lock = FileLock(self.path.with_name("state.lock"))
        self.rebuild = rebuild  # () -> {"agents": {id: record}, ...}, when state.json is unreadable
        self.history_cache = (None, {})  # (history.jsonl's (inode, size, mtime), its records)

    def load(self):
        """The current state, live agents only; a corrupt file is moved aside and rebuilt first."""
        try:
            state = self.read()
        except ValueError:
            with self.lock:
                state, _ = self.read_or_recover()
        move_removed(state)  # a file from before history.jsonl: the next update moves them for good
        return state

    def update(self, change):
        """Apply `change(state)` under the lock and save the result if it changed; returns what it returns."""
        with self.lock:
            state, before = self.read_or_recover()  # the text as read: no second json.dumps
            moved = move_removed(state)
            result = change(state)
            moved += move_removed(state)
            append_history(self.history_path, moved)
            text = state_text(state)
            if text != before:
                self.write(text)
            return result

    def stamp(self):
        """What changes whenever state.json is written (it is replaced whole): inode and mtime."""
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns

    def history(self):
        """{id: record} of cleaned-up agents: history.jsonl plus any not yet moved out of state.json."""
        history = dict(self.read_history_file())
        with contextlib.suppress(ValueError, OrchestraError):
            state = self.read()
            history.update({r["id"]: r for r in move_removed(state)})
        return history

    def read_history_file(self):
        """history.jsonl's records, parsed again only when the file changed (it only grows)."""
        try:
            info = os.stat(self.history_path)
            key = (info.st_ino, info.st_size, info.st_mtime_ns)
        except FileNotFoundError:
            key = None
        if key != self.history_cache[0]:
            self.history_cache = (key, read_history(self.history_path) if key else {})
        return self.history_cache[1]

    def read(self):
        """Parse state.json; ValueError when it is corrupt."""
        return self.read_with_text()[0]

    def read_with_text(self):
        """(state, the file's text, which is state_text(state) when orchestra wrote it)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            state = empty_state()
            return state, state_text(state)
        state = json.loads(text)
        if not isinstance(state, dict) or not isinstance(state.get("agents"), dict):
            raise ValueError("state.json does not hold a state document")
        if state.get("version") != STATE_VERSION:
            raise OrchestraError(
                f"{self.path} has version {state.get('version')!r}, this orchestra reads "
                f"version {STATE_VERSION}; upgrade orchestra (pip install -U claude-orchestra)"
            )
        return state, text

    def write(self, text):
        """Save the state's text atomically: the one place state.json is written."""
        write_atomic(self.path, text)

    def read_or_recover(self):
        """Read under the lock, (state, its text); move a corrupt file aside and rebuild it from
        logs and worktrees."""
        try:
            return self.read_with_text()
        except (ValueError, RecursionError):
            # Rebuilt first, kept aside second: a rebuild that fails leaves state.json in place
            aside = self.path.with_name(f"state.json.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            state = empty_state()
            state.update(self.rebuild())
            os.link(str(self.path), str(aside))
            self.write(state_text(state))
            print(
                f"orchestra: warning: {self.path} was unreadable; moved it to {aside.name} "
                f"and rebuilt {len(state['agents'])} agent record(s) from logs and worktrees",
                file=sys.stderr,
            )
            return state, state_text(state)


def load_agent_records(repo):
    """{agent_id: record} of any repository, history included, read without lock or recovery."""
    folder = Path(repo) / ORCHESTRA_DIR
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        state = None
    agents = state.get("agents") if isinstance(state, dict) else None
    agents = agents if isinstance(agents, dict) else {}
    return {**read_history(folder / "history.jsonl"), **agents}


# ======================================================================================
# Agent records and logs
# --------------------------------------------------------------------------------------
# An agent's record and its log. The log (stream-json plus orchestra's own events) is the
# source of truth: AgentLog folds it into the record's facts, and rebuild_state() makes the
# records again from the logs alone. The functions here change one record in memory (the
# caller holds the state lock and writes it back); none starts or ends a process.
# ======================================================================================

LAUNCH_KEYS = (
    "agent_command",
    "model",
    "permission_mode",
    "bypass_permissions",
    "sandbox_network",
    "approval_timeout",
    "protected_paths",
)  # fixed at spawn; "sandboxed" is added then too
RECORD_FIELDS = (
    "id", "task", "state", "stale", "branch", "worktree", "base_branch", "base_commit",
    "pid", "session_id", "created_at", "started_at", "finished_at", "heartbeat_at",
    "last_activity_at", "exit_code", "result", "error", "cost_usd", "turns",
    "input_tokens", "output_tokens", "activity", "commits", "files_changed", "log",
    "cost_estimated", "pending_messages", "sandboxed", "approval", "permission_denials", "merged",
    "checks", "waiting", "batch", "stop_reason", "landed", "blocked", "after", "waits_for",
    "host", "contained", "tampered",
)  # fmt: skip
CONTAINED_KEPT = 20  # calls refused by containment a record lists (the log keeps them all)
# Estimated cost while an agent runs: USD per million tokens (input, output) by model name prefix,
# first match wins; cache writes cost 1.25x input, cache reads 0.1x. The result's figure replaces it.
MODEL_PRICES = (
    ("claude-opus-4-0", 15.0, 75.0), ("claude-opus-4-1", 15.0, 75.0), ("claude-opus-4-2", 15.0, 75.0),
    ("claude-3-opus", 15.0, 75.0), ("claude-opus", 5.0, 25.0), ("claude-sonnet", 3.0, 15.0),
    ("claude-3-5-sonnet", 3.0, 15.0), ("claude-3-7-sonnet", 3.0, 15.0), ("claude-haiku", 1.0, 5.0),
    ("claude-3-5-haiku", 0.8, 4.0), ("claude-3-haiku", 0.25, 1.25), ("opus", 5.0, 25.0), ("haiku", 1.0, 5.0),
)  # fmt: skip
DEFAULT_PRICE = (3.0, 15.0)  # an unknown model is priced as Sonnet
CACHE_WRITE_FACTOR = 1.25
CACHE_READ_FACTOR = 0.1
# bytes folded per read_new call, so facts reach state.json during a burst
LOG_READ_BUDGET = 8 * 1024 * 1024
LOG_MAX_LINE = 16 * 1024 * 1024  # a longer line (no event orchestra needs) is skipped, not buffered
LOG_IGNORED_PREFIXES = (b'{"type":"user"', b'{"type":"stream_event"')  # events no fact comes from
# Checks, fix rounds, API errors and budgets (see "Results you can trust" below)
RESILIENCE_KEYS = (
    "checks",
    "check_timeout",
    "fix_rounds",
    "max_budget_usd",
    "api_retries",
    "api_backoff",
    "api_backoff_max",
)  # fixed at spawn in the record's launch, like LAUNCH_KEYS
CHECK_RESULT_FIELDS = ("status", "command", "exit_code", "tail", "rounds")


def new_record(project, agent_id, task, base_branch, base_commit):
    """A queued agent's record, not yet ready to start (its worktree is being made)."""
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(
        id=agent_id,
        task=task,
        state="queued",
        stale=False,
        branch=project.branch_name(agent_id),
        worktree=str(project.worktree_path(agent_id)),
        base_branch=base_branch,
        base_commit=base_commit,
        created_at=utc_iso(),
        activity="preparing worktree",
        log=str(project.log_path(agent_id)),
        ready=False,
        copied_files=[],
        launch={key: project.config[key] for key in LAUNCH_KEYS},
    )
    record["launch"].update({key: project.config[key] for key in RESILIENCE_KEYS})
    return record


def public_record(record):
    """A record as `status --json` shows it: the documented fields only."""
    shown = {key: record.get(key) for key in RECORD_FIELDS}
    if shown["host"] is None and record["state"] != "queued":
        shown["host"] = "local"  # a queued agent not pinned to a host is not placed yet
    return shown


def elapsed_seconds(record, now):
    """How long the agent has run (or ran)."""
    started = parse_iso(record.get("started_at"))
    if started is None:
        return None
    return (parse_iso(record.get("finished_at")) or now) - started


def unique_id(slug, taken, separator="-"):
    """The slug itself, or the slug with -2, -3... (another separator: .2, .3) when it is taken."""
    candidate, n = slug, 1
    while candidate in taken:
        n += 1
        candidate = f"{slug}{separator}{n}"
    return candidate


def select_agents(records, wanted):
    """Records named by ids or unique id prefixes, in the order given (all when none given)."""
    if not wanted:
        return sorted(records.values(), key=spawn_order)
    chosen = []
    for name in wanted:
        if not name:
            raise OrchestraError("an agent id cannot be empty; 'orchestra status' lists them")
        if name in records:
            chosen.append(records[name])
            continue
        # A prefix means one of the agents `status` shows; a cleaned-up one needs its whole id.
        matches = sorted(
            i for i, r in records.items() if i.startswith(name) and r["state"] != "removed"
        )
        gone = sorted(i for i in records if i.startswith(name) and i not in matches)
        if not matches and gone:
            raise OrchestraError(
                f"no live agent '{name}'; cleaned up: {', '.join(gone[:MAX_LISTED_FILES])} "
                "(name one by its whole id; 'orchestra status --all' lists them)"
            )
        if not matches:
            raise OrchestraError(f"no agent '{name}'; 'orchestra status' lists them")
        if len(matches) > 1:
            raise OrchestraError(f"'{name}' matches {', '.join(matches)}; type more of the id")
        chosen.append(records[matches[0]])
    return chosen


def append_event(path, event):
    """Add one of orchestra's own events to an agent's log."""
    event = {"type": "orchestra", "time": utc_iso(), **event}
    with open(path, "a", encoding="utf-8", opener=private_opener) as f:
        f.write(json_text(event) + "\n")


def describe_tool_use(block, cwd=None):
    """One line for a tool call: its name and the input that says most about it.

    Paths inside `cwd` (the agent's worktree) are shown relative to it: `Write: CHANGELOG.md`.
    """
    name = block.get("name") or "tool"
    args = block.get("input") if isinstance(block.get("input"), dict) else {}
    for key in ("command", "file_path", "path", "pattern", "url", "description", "prompt"):
        if isinstance(args.get(key), str):
            said = args[key]
            if cwd:
                said = "." if said.rstrip("/") == cwd.rstrip("/") else said
                said = said.replace(cwd.rstrip("/") + "/", "")
            return one_line(f"{name}: {said}")
    return name


def fold_resilience_event(memory, event):
    """Remember the latest checks outcome, API wait and budget stop from an orchestra log event."""
    what = event.get("event")
    if what == "checks":
        memory["checks"] = event
    elif what == "waiting":
        memory["waiting"] = event
        memory["api_attempts"] = event.get("attempt") or 0
    elif what in ("launch", "settled"):
        memory.pop("waiting", None)
    elif what == "budget_stop":
        memory["stop_reason"] = "budget"
    elif what == "landed":  # see Landing
        memory["landed"] = {key: event.get(key) for key in ("into", "commit", "at")}
        memory.pop("blocked", None)
    elif what == "blocked":
        memory["blocked"] = {key: event.get(key) for key in ("reason", "at")}


class AgentLog:
    """An agent's log file read incrementally and folded into record facts.

    The facts are a pure function of the file, so any supervisor can rebuild them.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.offset = 0
        self.partial = b""
        self.skipping = False  # inside a line longer than LOG_MAX_LINE: drop bytes until its end
        self.caught_up = True  # the last read reached the end of the file
        self.launched = False  # a launch event was seen: the agent ran at least once
        self.process = None  # (pid, start token) of the latest run, from its "started" event
        self.host = None  # the host the agent was placed on, from its latest "placed" event
        self.settled = None  # the last "settled" event: how the latest run ended
        self.run_usage = {}  # message id -> (input, output) tokens; one response spans lines
        self.run_totals = (0, 0)  # the sum of run_usage, kept as it changes (never re-summed)
        self.past_tokens = (0, 0)  # tokens of earlier runs (resumed agents add up)
        self.resilience = {}  # the latest checks result and API wait (see fold_resilience_event)
        self.model = None  # of the current run, from system/init or the messages, to price tokens
        self.cwd = None  # the agent's worktree, from system/init: activity paths are shown relative
        self.run_estimate = {}  # message id -> estimated USD of the current run, until its result
        self.estimate_total = 0.0  # the sum of run_estimate, kept as it changes (never re-summed)
        self.paid = None  # USD the results of finished runs reported
        self.facts = {
            "session_id": None,
            "activity": None,
            "last_activity_at": None,
            "cost_usd": None,
            "turns": None,
            "result": None,
            "error": None,
            "outcome": None,
            "input_tokens": None,
            "output_tokens": None,
            "cost_estimated": None,
            "permission_denials": None,
            "contained": None,
            "tampered": None,
        }

    def read_new(self, budget=LOG_READ_BUDGET):
        """Fold lines appended since the last call, in bounded chunks; True if any arrived.

        At most `budget` bytes per call; `caught_up` says whether the end of the file was reached.
        """
        read = 0
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                while read < budget:
                    chunk = f.read(LOG_READ_CHUNK)
                    if not chunk:
                        break
                    read += len(chunk)
                    self.offset += len(chunk)
                    self.fold_chunk(chunk)
        except FileNotFoundError:
            return False
        self.caught_up = read < budget
        if read:
            self.facts["last_activity_at"] = utc_iso()
        return bool(read)

    def fold_chunk(self, chunk):
        """Fold the complete lines of a chunk; keep (or skip, when too long) the unfinished one."""
        *lines, rest = chunk.split(b"\n")
        if lines:
            lines[0], skipped = (b"", True) if self.skipping else (self.partial + lines[0], False)
            self.partial, self.skipping = b"", False
            for line in lines[skipped:]:
                self.apply_line(line)
        if self.skipping:
            return
        self.partial += rest
        if len(self.partial) > LOG_MAX_LINE:
            self.partial, self.skipping = b"", True

    def read_to_end(self):
        """Fold what an ended agent wrote last, including a final line with no newline."""
        while self.read_new() and not self.caught_up:
            pass
        if self.partial and not self.skipping:
            self.apply_line(self.partial)
            self.partial = b""

    def apply_line(self, raw):
        """Fold one line; lines that are not JSON objects are ignored."""
        if raw.startswith(LOG_IGNORED_PREFIXES):
            return
        try:
            event = json.loads(raw.decode("utf-8", "replace"))
            if isinstance(event, dict):
                handler = getattr(self, f"on_{event.get('type')}", None)
                if handler:
                    handler(event)
        except ValueError:
            return  # not JSON: a line of plain output, or a torn end
        except (RecursionError, TypeError, AttributeError, KeyError):
            # one unreadable line (nested too deep, odd types) is skipped, never the watcher's end
            self.facts["unreadable_lines"] = (self.facts.get("unreadable_lines") or 0) + 1

    def on_orchestra(self, event):
        """A new run starts with no result yet; a failed setup is the agent's error."""
        if event.get("event") == "launch":
            self.launched, self.settled, self.process = True, None, None
            self.settle_run_tokens()
            self.run_estimate, self.estimate_total = {}, 0.0
            self.facts.update(result=None, error=None, outcome=None)
        elif event.get("event") == "settled":
            self.settled = event
        elif event.get("event") == "started":
            self.process = (event.get("pid"), event.get("pid_start"))
        elif event.get("event") == "placed":
            self.host = event.get("host")
        elif event.get("event") == "contained":
            blocked = [
                *(self.facts["contained"] or []),
                {"tool": event.get("tool"), "message": event.get("message")},
            ]
            self.facts["contained"] = blocked[-CONTAINED_KEPT:]
        elif event.get("event") == "tampered" and isinstance(event.get("found"), list):
            self.facts["tampered"] = [*(self.facts["tampered"] or []), *event["found"]]
        fold_resilience_event(self.resilience, event)

    def on_system(self, event):
        """system/init names the session."""
        if event.get("subtype") == "init" and event.get("session_id"):
            self.facts["session_id"] = event["session_id"]
        if event.get("subtype") == "init" and isinstance(event.get("model"), str):
            self.model = event["model"]
        if event.get("subtype") == "init" and isinstance(event.get("cwd"), str):
            self.cwd = event["cwd"]

    def on_assistant(self, event):
        """Text or a tool call becomes the activity line; usage gives running token counts."""
        message = event.get("message") if isinstance(event.get("message"), dict) else {}
        for block in message.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and one_line(block.get("text", "")):
                self.facts["activity"] = one_line(block["text"])
            elif block.get("type") == "tool_use":
                self.facts["activity"] = describe_tool_use(block, self.cwd)
        if isinstance(message.get("usage"), dict):
            key = message.get("id") or len(self.run_usage)
            self.count_usage(key, message["usage"])
            self.estimate_cost(key, message.get("model") or self.model, message["usage"])

    def estimate_cost(self, key, model, usage):
        """Running cost of the current run from its token usage, marked as an estimate."""
        cost = estimated_cost(model, usage)
        self.estimate_total += cost - self.run_estimate.get(key, 0.0)
        self.run_estimate[key] = cost
        self.facts["cost_usd"] = (self.paid or 0) + self.estimate_total
        self.facts["cost_estimated"] = True

    def on_result(self, event):
        """The run's outcome; cost, turns and tokens add up across resumed runs.

        An API error ends with is_error true even when subtype says "success".
        """
        is_error = bool(event.get("is_error")) or event.get("subtype", "success") != "success"
        result = event.get("result")
        self.facts.update(
            result=result if isinstance(result, str) else None,
            outcome="error" if is_error else "success",
            error=(
                one_line(result or event.get("subtype") or "error", TAIL_CHARS)
                if is_error
                else None
            ),
            turns=(self.facts["turns"] or 0) + (event.get("num_turns") or 0),
            permission_denials=permission_denials(event),
        )
        self.paid = (self.paid or 0) + (event.get("total_cost_usd") or 0)
        self.run_estimate, self.estimate_total = {}, 0.0
        self.facts.update(cost_usd=self.paid, cost_estimated=False)
        if isinstance(event.get("usage"), dict):
            self.run_usage, self.run_totals = {}, (0, 0)  # the result's totals are exact
            self.count_usage("result", event["usage"])
        self.settle_run_tokens()
        if is_error:
            self.facts["activity"] = one_line(f"error: {self.facts['error']}")

    def count_usage(self, key, usage):
        """Token counts of the current run, each API response counted once."""
        inputs = sum(
            usage.get(k) or 0
            for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        old_in, old_out = self.run_usage.get(key, (0, 0))
        new_in, new_out = self.run_usage[key] = (inputs, usage.get("output_tokens") or 0)
        self.run_totals = (
            self.run_totals[0] - old_in + new_in,
            self.run_totals[1] - old_out + new_out,
        )
        self.facts["input_tokens"] = self.past_tokens[0] + self.run_totals[0]
        self.facts["output_tokens"] = self.past_tokens[1] + self.run_totals[1]

    def settle_run_tokens(self):
        """Close the current run's token counts so the next run adds to them."""
        if self.run_usage:
            self.past_tokens = (self.facts["input_tokens"], self.facts["output_tokens"])
            self.run_usage, self.run_totals = {}, (0, 0)


def permission_denials(result):
    """The tool calls a run's result says were denied: [{tool_name, tool_input}]."""
    denials = result.get("permission_denials")
    if not isinstance(denials, list):
        return []
    return [
        {"tool_name": d.get("tool_name"), "tool_input": d.get("tool_input")}
        for d in denials
        if isinstance(d, dict)
    ]


def estimated_cost(model, usage):
    """USD an API response's usage costs at list prices for its model family (an estimate)."""
    name = str(model or "").lower()
    price_in, price_out = next(
        ((i, o) for prefix, i, o in MODEL_PRICES if name.startswith(prefix)), DEFAULT_PRICE
    )
    tokens_in = (
        (usage.get("input_tokens") or 0)
        + CACHE_WRITE_FACTOR * (usage.get("cache_creation_input_tokens") or 0)
        + CACHE_READ_FACTOR * (usage.get("cache_read_input_tokens") or 0)
    )
    return (tokens_in * price_in + (usage.get("output_tokens") or 0) * price_out) / 1_000_000


def read_log(path):
    """The facts of a whole log file."""
    log = AgentLog(path)
    log.read_to_end()
    return log


def settled_state(log, exit_code, stderr_tail):
    """Final (state, error) of an agent whose process is gone, from its log and exit status."""
    if log.facts["outcome"] == "success":
        return "done", None
    if log.facts["outcome"] == "error":
        return "failed", log.facts["error"]
    if exit_code is None:
        return (
            "interrupted",
            "the agent ended while no supervisor watched it, leaving no final result",
        )
    if exit_code < 0:
        return "interrupted", f"the agent was killed by signal {-exit_code} before it finished"
    if exit_code == 0:
        return "done", None
    detail = f": {one_line(stderr_tail, TAIL_CHARS)}" if stderr_tail.strip() else ""
    return "failed", f"agent exited with status {exit_code}{detail}"


def is_claude_command(command):
    """True unless agent_command uses a {task} placeholder (then it is some other CLI agent)."""
    return not any("{task}" in part for part in command)


def queue_session(record, prompt, activity):
    """Queue a relaunch of the agent's Claude session with a new prompt, in its own worktree."""
    if not record.get("session_id") or not is_claude_command(record["launch"]["agent_command"]):
        raise OrchestraError(
            f"{record['id']} has no Claude session to continue; spawn its task again"
        )
    if not Path(record["worktree"]).is_dir():
        raise OrchestraError(
            f"{record['id']}'s worktree {record['worktree']} is gone; its session cannot continue there"
        )
    record.update(
        state="queued",
        ready=True,
        resume_prompt=prompt,
        pid=None,
        finished_at=None,
        activity=activity,
    )


def finish_record(record, log, exit_code, stderr_tail, counts):
    """Settle a record whose process has ended (a stop request keeps its state 'stopped')."""
    record.update(without_none(log.facts))
    record.update(
        exit_code=exit_code,
        pid=None,
        stale=False,
        finished_at=record.get("finished_at") or utc_iso(),
    )
    if counts:
        record["commits"], record["files_changed"] = counts
    if record["state"] in ("running", "paused"):
        record["state"], record["error"] = settled_state(log, exit_code, stderr_tail)
    note_settlement(record)
    deliver_pending_messages(record)


def deliver_pending_messages(record):
    """Queue the messages `send` left for an agent whose turn has just ended (one prompt)."""
    messages = record.get("pending_messages")
    if not messages or record["state"] not in ("done", "failed"):
        return
    record["pending_messages"] = []
    try:
        queue_session(record, "\n\n".join(messages), "continuing with your message")
    except OrchestraError as e:
        record["error"] = f"{record.get('error') or ''} your message could not be sent: {e}".strip()


def note_settlement(record):
    """Write an agent's final state into its log, so a rebuilt state.json knows it exactly."""
    settled = {
        key: record.get(key) for key in ("state", "exit_code", "error", "commits", "files_changed")
    }
    append_event(record["log"], {"event": "settled", **settled})


def request_stop(record):
    """Mark an active agent stopped; (id, its process) so the caller can end the process."""
    if record["state"] not in ACTIVE_STATES:
        raise OrchestraError(f"{record['id']} is already {record['state']}")
    process = (record["pid"], record.get("pid_start"))
    record.update(
        state="stopped", finished_at=utc_iso(), activity="stopped", stale=False, waiting=None
    )
    if not record["pid"]:
        note_settlement(record)  # no watcher will settle an agent that never started
    return record["id"], process


def without_none(facts):
    """The facts that are known, so an unknown never overwrites a known value."""
    return {k: v for k, v in facts.items() if v is not None and k != "outcome"}


def read_tail(path, limit=TAIL_CHARS):
    """The last characters of a text file, '' if it does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def resilience_setting(record, key):
    """A check/retry/budget setting fixed in the record at spawn (the default for older records)."""
    return (record.get("launch") or {}).get(key, CONFIG_DEFAULTS[key])


def restore_resilience(record, log):
    """Give a record rebuilt from its log its checks result, its API wait and its stop reason."""
    memory = log.resilience
    if memory.get("checks"):
        record["checks"] = {key: memory["checks"].get(key) for key in CHECK_RESULT_FIELDS}
        if record["checks"]["status"] == "running" and record["state"] == "done":
            record.update(
                state="running", pid=None
            )  # the supervisor died during checks: run them again
    if memory.get("waiting"):
        waiting = {
            key: memory["waiting"].get(key) for key in ("reason", "until", "attempt", "message")
        }
        record.update(state="waiting", waiting=waiting, error=None, finished_at=None)
    record["api_attempts"] = memory.get("api_attempts", 0)
    if memory.get("stop_reason"):
        record["stop_reason"] = memory["stop_reason"]
    record.update(landed=memory.get("landed"), blocked=memory.get("blocked"))
    if record["landed"]:
        record["merged"] = True


def rebuild_state(project):
    """Records recovered from each log's spawn event, settled from the rest of the log, and the
    batches (with their budgets) those agents were spawned in."""
    live = {w["real"] for w in list_worktrees(project.repo) if not w["prunable"]}
    # A cleaned-up agent stays history, unless its worktree is live again (restored): that wins.
    history = project.history()
    records, batches = {}, {}
    for log_path in sorted(project.logs.glob("*.jsonl")):
        spawn = first_spawn_event(log_path)
        if spawn is None or (spawn["id"] in history and real_path(spawn["worktree"]) not in live):
            continue
        record = record_from_log(project, spawn, read_log(log_path), live)
        if spawn.get("batch"):
            batches[spawn["batch"]] = {
                "budget": spawn.get("batch_budget"),
                "created_at": spawn.get("time"),
            }
        records[record["id"]] = record
    for record in records.values():  # an agent not started yet still waits for what has not landed
        if record["after"] and record["state"] == "queued":
            known = {**history, **records}
            record["waits_for"] = [
                i for i in record["after"] if not (known.get(i) or {}).get("landed")
            ]
    return {"agents": records, "batches": batches}


def record_from_log(project, spawn, log, live):
    """One agent's record made again from its spawn event and the facts its log holds."""
    record = new_record(
        project, spawn["id"], spawn["task"], spawn.get("base_branch"), spawn.get("base_commit")
    )
    record.update(
        branch=spawn["branch"], worktree=spawn["worktree"], created_at=spawn.get("time"), ready=True
    )
    record.update(launch=spawn.get("launch") or record["launch"], seq=spawn.get("seq", 0))
    record["sandboxed"] = bool(record["launch"].get("sandboxed"))
    record.update(without_none(log.facts))
    record["host"] = log.host
    settle_rebuilt_record(record, log)
    restore_resilience(record, log)
    if spawn.get("batch"):
        record["batch"] = spawn["batch"]
    if real_path(record["worktree"]) not in live and record["state"] == "queued":
        if not log.launched:
            record.update(
                ready=False,
                worktree_later=True,
                spawn_logged=True,
                activity="waiting for a worktree",
            )
        else:
            record["state"] = "failed"
            record["error"] = "worktree missing after state.json was rebuilt"
    record["after"] = spawn.get("after")
    return record


def settle_rebuilt_record(record, log):
    """A rebuilt record's state: as its log settled it, running where its process lives, or ended."""
    if log.settled:
        keys = ("state", "exit_code", "error", "commits", "files_changed")
        record.update({k: log.settled.get(k) for k in keys})
        record["finished_at"] = log.settled.get("time")
    elif log.host not in (None, "local"):  # on another host: its supervisor follows it again
        record.update(state="running", host_launched=True)
    elif log.launched and log.process and process_alive(*log.process):
        record.update(state="running", pid=log.process[0], pid_start=log.process[1])  # adopted
    elif log.launched:
        record["state"], record["error"] = settled_state(log, None, "")


def first_spawn_event(path):
    """The spawn event that opens an agent's log, or None."""
    with open(path, "rb") as f:
        first = f.readline()
    try:
        event = json.loads(first)
    except (ValueError, RecursionError):
        return None
    return event if isinstance(event, dict) and event.get("event") == "spawn" else None


# ======================================================================================
# Approvals and the sandbox
# --------------------------------------------------------------------------------------
# How an approval travels. Every Claude agent is launched with a --settings layer (argv,
# never a file) whose PermissionRequest hook runs `orchestra hook permission-request`, a
# child of the agent, so it outlives a supervisor crash. Claude Code calls it only for a
# tool call its own rules do not allow already. The hook:
#   1. allows at once what an --always rule allows: the agent's own (approvals/rules/<id>.json),
#      the project's (rules/@project.json), or bypass_permissions as config.json holds it now.
#      A saved rule is the exact input the user was shown (a `*` in it is a `*`), or a Bash
#      prefix the user asked for by name; never a glob, never more than one tool's calls;
#   2. else writes approvals/<req>.json atomically: the request is now pending, and the
#      CLI, the status hub and the dashboard see it;
#   3. polls for approvals/decisions/<req>.json. A decision is a complete file linked into
#      place (the O_EXCL rule of link(2)), so the first decider wins and a later one is told
#      it came late; at approval_timeout the hook itself decides "deny" the same way;
#   4. moves the request to approvals/answered/ and prints Claude Code's answer.
# Every request, decision and rule file carries an HMAC under .orchestra/approval.key: a file
# without a valid one is ignored and reported, and a decision is bound to the SHA-256 of the
# input it was taken on. What a person decides on is shown whole (shown_request()).
# When in doubt the hook denies, with a message that says why: unreadable state, an unknown
# or ended agent, a broken request. A pending request whose hook has gone (its agent was
# stopped) is void: never listed, never answerable.
# The sandbox is Claude Code's own (bubblewrap and socat on Linux): with it, Bash runs
# without asking, writes only inside the worktree, and reaches only sandbox_network.
# ======================================================================================

APPROVALS_DIR = "approvals"  # in .orchestra/: <req>.json pending, decisions/, answered/, rules/
APPROVAL_POLL = 0.05  # seconds between the waiting hook's looks for a decision
APPROVAL_HOOK_MARGIN = 60  # seconds Claude Code gives the hook beyond approval_timeout
APPROVAL_ID_BYTES = 3  # random bytes of a request id (6 hex digits), unique by O_EXCL
APPROVAL_INPUT_LIMIT = 64 * 1024  # characters of a tool input kept in a request
APPROVAL_KEY_FILE = (
    "approval.key"  # in .orchestra/ (0600): the HMAC key of requests, decisions, rules
)
APPROVAL_KEY_BYTES = 32
PROJECT_RULES = (
    "@project.json"  # in approvals/rules/: --always=project rules (no agent id has an @)
)
# input fields an exact rule does not compare: they change nothing run
RULE_IGNORED = ("description",)
# Fields that change what a call means, shown before the command or content
SHOWN_FIRST = ("dangerouslyDisableSandbox", "replace_all", "run_in_background", "file_path", "path",
               "notebook_path", "url", "timeout")  # fmt: skip
SHOWN_INLINE = 120  # a field value shorter than this, on one line, is shown beside its name
# Shown as escapes: every C0/C1 control but newline, DEL, bidirectional marks, line separators
SHOWN_ESCAPED = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff\n]"
)
SANDBOX_PACKAGES = {
    "bwrap": "bubblewrap",
    "socat": "socat",
}  # what Claude Code's Linux sandbox runs
SANDBOX_PROBE = ("bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--unshare-net", "true")


def read_json_file(path):
    """A JSON object from a file, or None when it is missing, half written or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


SHELL_OPERATORS = re.compile(r"[;&|<>$`\n()]")  # a wildcard rule never allows a compound command


def rule_matches(rule, tool, tool_input):
    """True when a permission rule ('Bash(git *)', 'Bash(npm test:*)', 'Edit') allows this call."""
    name, paren, content = rule.partition("(")
    if name.strip() != tool:
        return False
    if not paren:
        return True
    content = content[:-1] if content.endswith(")") else content
    tool_input = tool_input if isinstance(tool_input, dict) else {}
    subject = (
        tool_input.get("command")
        if tool == "Bash"
        else tool_input.get("file_path") or tool_input.get("path")
    )
    if not isinstance(subject, str):
        return False
    if "*" not in content:
        return subject == content
    if tool == "Bash" and SHELL_OPERATORS.search(subject):
        return False
    if content.endswith(":*"):
        return subject == content[:-2] or subject.startswith(content[:-2] + " ")
    return fnmatchcase(subject, content)


def escape_controls(text, newlines=False):
    """Text with every control character shown as an escape (\\x1b, \\u202e); newlines stay unless asked."""
    return SHOWN_ESCAPED.sub(
        lambda m: (
            m.group()
            if m.group() == "\n" and not newlines
            else {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(m.group())
            or (
                f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}"
            )
        ),
        text,
    )


def tool_summary(tool, tool_input):
    """'Bash(pytest -q)', 'Edit(src/app.py)': a tool call on one line, every newline and control escaped."""
    tool_input = tool_input if isinstance(tool_input, dict) else {}
    for key in ("command", "file_path", "path", "url", "pattern", "prompt"):
        if isinstance(tool_input.get(key), str):
            return f"{tool}({escape_controls(tool_input[key], newlines=True)})"
    return tool


def input_size(tool_input):
    """(lines, bytes) of a tool input's text: every string field, as the call would use it."""
    texts = [v for v in tool_input.values() if isinstance(v, str)] if tool_input else []
    data = "".join(texts).encode("utf-8", "surrogatepass")
    return (sum(line_count(t) for t in texts), len(data))


def line_count(text):
    """Lines as `wc -l` counts them, plus an unfinished last line."""
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def shown_request(request):
    """Every line a person is shown before deciding: the size, the fields that change what the
    call means, then the whole input, control characters escaped. Never cut."""
    tool, tool_input = request.get("tool") or "tool", request.get("input")
    if request.get("truncated") or not isinstance(tool_input, dict):
        size = request.get("input_bytes") or 0
        return [
            f"{tool}: an input of {size} bytes, too long to show whole; "
            "it can be approved once, never as a rule",
            *(
                "  " + line
                for line in escape_controls(str(request.get("input_head") or "")).split("\n")
            ),
        ]
    lines, size = input_size(tool_input)
    shown = [f"{tool}: {lines} line{'s' if lines != 1 else ''}, {size} bytes"]
    first = [k for k in SHOWN_FIRST if k in tool_input]
    if tool in ("Write", "Edit", "MultiEdit", "NotebookEdit") and "file_path" in tool_input:
        first = ["file_path", *[k for k in first if k != "file_path"]]
    for key in [*first, *sorted(k for k in tool_input if k not in first)]:
        value = tool_input[key]
        text = value if isinstance(value, str) else json.dumps(value)
        body = escape_controls(text[:-1] if text.endswith("\n") else text).split("\n")
        if len(body) == 1 and len(body[0]) <= SHOWN_INLINE and not text.endswith("\n"):
            shown.append(f"  {key}: {body[0]}")
        else:
            count = line_count(text)
            shown.append(
                f"  {key} ({count} line{'s' if count != 1 else ''}, "
                f"{len(text.encode('utf-8', 'surrogatepass'))} bytes):"
            )
            shown += [f"    {line}" for line in body]
    return shown


def input_digest(tool_input):
    """SHA-256 of a tool input as JSON: what a decision is bound to."""
    return hashlib.sha256(
        json.dumps(tool_input, sort_keys=True).encode("utf-8", "surrogatepass")
    ).hexdigest()


def approval_key(repo):
    """The HMAC key of decisions and rules (.orchestra/approval.key, 0600), made on first use."""
    path = Path(repo) / ORCHESTRA_DIR / APPROVAL_KEY_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=".key.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(APPROVAL_KEY_BYTES) + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, str(path))  # the first writer's key wins
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return bytes.fromhex(path.read_text().strip())


def approval_mac(key, kind, name, payload):
    """HMAC-SHA256 of one approval file's content, bound to its kind and name."""
    body = json.dumps({k: v for k, v in payload.items() if k != "mac"}, sort_keys=True)
    message = f"orchestra-{kind}\0{name}\0{body}".encode("utf-8", "surrogatepass")
    return hmac.new(key, message, "sha256").hexdigest()


def exact_rule(tool, tool_input):
    """The rule --always saves: this tool with exactly this input (its description aside)."""
    return {"tool": tool, "input": {k: v for k, v in tool_input.items() if k not in RULE_IGNORED}}


def prefix_rule(tool, tool_input, prefix):
    """A rule for Bash commands that start with `prefix` (a word boundary), asked for by name."""
    command = tool_input.get("command")
    if tool != "Bash" or not isinstance(command, str):
        raise OrchestraError(f"a prefix rule is for Bash commands; this call is {tool}")
    prefix = prefix.strip()
    if not prefix or "\n" in prefix or not (command == prefix or command.startswith(prefix + " ")):
        raise OrchestraError(
            f"--prefix must be the start of the command, whole words: {tool_summary(tool, tool_input)}"
        )
    if SHELL_OPERATORS.search(prefix):
        raise OrchestraError("a prefix with shell operators (; & | < > $ ` ( )) cannot be a rule")
    return {"tool": tool, "prefix": prefix}


def rule_label(rule):
    """A rule as a person reads it: 'Bash(pytest -q)', 'Bash(touch *) [prefix]', 'Write(a.txt) [exact input]'."""
    if isinstance(rule, str):
        return rule
    if "prefix" in rule:
        return f"Bash({escape_controls(rule['prefix'], newlines=True)} *) [prefix: no ; & | < > $ ` ( ) after it]"
    tool_input = rule.get("input") or {}
    if not tool_input:
        return f"{rule['tool']} [every call, whatever its input]"
    if rule["tool"] == "Bash" and set(tool_input) == {"command"}:
        return tool_summary("Bash", tool_input)
    return f"{tool_summary(rule['tool'], tool_input)} [exactly this input]"


def whole_tool(rule):
    """True when a rule allows every call of its tool."""
    return "prefix" not in rule and not rule.get("input")


def stored_rule_matches(rule, tool, tool_input):
    """True when a rule --always saved allows this call: the exact input, or a Bash prefix."""
    if not isinstance(rule, dict) or rule.get("tool") != tool:
        return False
    if "prefix" in rule:
        command, prefix = tool_input.get("command"), rule["prefix"]
        if not isinstance(command, str) or not isinstance(prefix, str) or not prefix:
            return False
        rest = command[len(prefix) :] if command.startswith(prefix) else None
        return rest is not None and (
            rest == "" or (rest[0] == " " and not SHELL_OPERATORS.search(rest))
        )
    return rule.get("input") == {k: v for k, v in tool_input.items() if k not in RULE_IGNORED}


def denial_lines(denials, allowed=()):
    """'2 tool calls denied: Bash(pytest -q), Write(x)'. No "allow them next time": a denial may
    be the user's own, and a rule is only ever made from a call the user saw and allowed."""
    if not denials:
        return []
    named = [tool_summary(d.get("tool_name") or "tool", d.get("tool_input")) for d in denials]
    count = f"{len(denials)} tool call{'s' if len(denials) != 1 else ''} denied"
    return [f"{count}: {', '.join(named)}"]


class ApprovalBox:
    """One repository's approval requests, decisions and --always rules, as files in .orchestra/approvals/.

    Each file carries an HMAC ("mac") under the key in .orchestra/approval.key; a file without a
    valid one was not written by orchestra: it is ignored, and named in `ignored`.
    """

    def __init__(self, repo):
        self.repo = Path(repo)
        self.dir = self.repo / ORCHESTRA_DIR / APPROVALS_DIR
        self.decisions = self.dir / "decisions"
        self.answered = self.dir / "answered"
        self.rules_dir = self.dir / "rules"
        self.ignored = []  # files read without a valid mac
        self._key = None

    @property
    def key(self):
        if self._key is None:
            self._key = approval_key(self.repo)
        return self._key

    def signed(self, kind, name, payload):
        """The payload with its mac, as JSON text."""
        data = {**payload, "mac": approval_mac(self.key, kind, name, payload)}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def verified(self, path, kind, name):
        """A file's payload when orchestra wrote it; None when missing, and reported when forged."""
        data = read_json_file(path)
        if data is None:
            return None
        mac = data.get("mac")
        if isinstance(mac, str) and hmac.compare_digest(
            mac, approval_mac(self.key, kind, name, data)
        ):
            return {k: v for k, v in data.items() if k != "mac"}
        self.ignored.append(str(path))
        return None

    def stamp(self):
        """Changes whenever a request appears or goes: the folder's (inode, mtime)."""
        try:
            info = os.stat(str(self.dir))
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns

    def submit(self, request):
        """Record a pending request (a dict without id); its id, unique by O_EXCL."""
        for folder in (self.decisions, self.answered, self.rules_dir):
            folder.mkdir(parents=True, exist_ok=True)
        while True:
            req_id = secrets.token_hex(APPROVAL_ID_BYTES)
            try:
                os.close(
                    os.open(
                        str(self.dir / f"{req_id}.json"),
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                        0o600,
                    )
                )
            except FileExistsError:
                continue
            if (self.answered / f"{req_id}.json").exists():
                continue  # the empty reservation stays behind; readers skip it
            request = {"id": req_id, **request}
            write_atomic(self.dir / f"{req_id}.json", self.signed("request", req_id, request))
            return request

    def pending(self):
        """Requests still waiting, oldest first (void ones, whose hook has gone, left out)."""
        found = []
        for path in self.dir.glob("*.json"):
            request = self.verified(path, "request", path.stem)
            if (
                request
                and process_alive(request.get("pid"), request.get("pid_start"))
                and not (self.decisions / path.name).exists()
            ):
                found.append(request)
        return sorted(found, key=lambda r: (r.get("since") or "", r["id"]))

    def request(self, req_id):
        """(request, 'pending'|'answered') for an id, or (None, None)."""
        if not re.fullmatch(r"[0-9a-f]+", req_id):
            return None, None
        request = self.verified(self.dir / f"{req_id}.json", "request", req_id)
        if request:
            return request, "pending"
        request = read_json_file(self.answered / f"{req_id}.json")
        return (request, "answered") if request else (None, None)

    def decision(self, req_id):
        """The decision taken on a request, or None (a forged one counts as none)."""
        return self.verified(self.decisions / f"{req_id}.json", "decision", req_id)

    def decide(self, req_id, decision):
        """Record the decision if it is the first; False when another came first."""
        self.decisions.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=str(self.decisions), prefix=f".{req_id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.signed("decision", req_id, decision))
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, str(self.decisions / f"{req_id}.json"))  # fails if it exists: first wins
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def wait(self, req_id, timeout, parent=None, digest=None, report=None):
        """The decision once one is taken; None after `timeout` seconds or once `parent` (the agent) is gone.

        A decision file without a valid mac, or an "allow" taken on another input than `digest`,
        is no decision: it is moved aside (decisions/.forged-*), `report()` is called, and the
        wait goes on, so the user can still decide.
        """
        deadline = time.monotonic() + timeout
        path = self.decisions / f"{req_id}.json"
        while True:
            decision, forged = self.decision(req_id), False
            if decision is None and path.exists():
                decision = self.decision(req_id)  # linked in between the looks: whole by now
                forged = decision is None
            allowed = decision and decision.get("decision") == "allow"
            if allowed and digest is not None and decision.get("input_sha256") != digest:
                self.ignored.append(str(path))
                decision, forged = None, True
            if decision or time.monotonic() >= deadline or (parent and os.getppid() != parent):
                return decision
            if forged:  # unsigned, half written by another hand, or on another input
                if str(path) not in self.ignored:
                    self.ignored.append(str(path))
                aside = self.decisions / f".forged-{req_id}-{time.time_ns()}.json"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(str(path), str(aside))
                if report:
                    report()
                continue
            time.sleep(APPROVAL_POLL)

    def close(self, request, decision):
        """Move an answered request out of the pending folder, its decision beside it."""
        write_atomic(
            self.answered / f"{request['id']}.json",
            json.dumps({**request, "decision": decision}, indent=2) + "\n",
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(self.dir / f"{request['id']}.json"))

    def audit(self):
        """Verify every rule file and every decision on a pending request; `ignored` names the forged."""
        for path in self.rules_dir.glob("*.json"):
            self.verified(path, "rules", path.stem)
        for path in self.decisions.glob("*.json"):
            if (self.dir / path.name).exists():
                self.verified(path, "decision", path.stem)
        return list(dict.fromkeys(self.ignored))

    def rules_path(self, agent_id):
        return self.rules_dir / (PROJECT_RULES if agent_id is None else f"{agent_id}.json")

    def rules(self, agent_id):
        """The rules --always saved: this agent's for the rest of its run, or (None) the project's."""
        name = PROJECT_RULES if agent_id is None else agent_id
        data = self.verified(self.rules_path(agent_id), "rules", name) or {}
        return [r for r in data.get("rules", []) if isinstance(r, dict)]

    def forget_rules(self, agent_id):
        """A new run of the agent starts without the --always rules of its last run."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(self.rules_path(agent_id)))

    def add_rule(self, agent_id, rule):
        """Allow `rule` for the rest of this agent's run (agent_id None: for the project's agents)."""
        self.rules_dir.mkdir(parents=True, exist_ok=True)
        name = PROJECT_RULES if agent_id is None else agent_id
        with FileLock(self.rules_dir / f"{name}.lock"):
            rules = self.rules(agent_id)
            if rule not in rules:
                write_atomic(
                    self.rules_path(agent_id), self.signed("rules", name, {"rules": [*rules, rule]})
                )
        return self.rules_path(agent_id)


def approval_flags(repo):
    """{agent id: {id, tool, summary, since, shown}} of the oldest request each agent waits on
    (`shown`: the whole input as shown_request() shows it)."""
    flags = {}
    for request in ApprovalBox(repo).pending():
        if request["agent"] not in flags:
            flags[request["agent"]] = {
                **{k: request.get(k) for k in ("id", "tool", "summary", "since")},
                "shown": shown_request(request),
            }
    return flags


HOOK_LAUNCH = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import orchestra; sys.exit(orchestra.main())"
)


def hook_command(repo, agent_id, timeout):
    """The shell command Claude Code runs for a permission request: this very orchestra.

    Imported rather than run as a script, so its cached bytecode is used: every waiting agent
    starts one, and a script would be compiled afresh each time. -I -S: no environment or site
    packages can change which orchestra answers.
    """
    argv = [
        sys.executable,
        "-I",
        "-S",
        "-c",
        HOOK_LAUNCH,
        str(Path(__file__).resolve().parent),
        "hook",
        "permission-request",
        "--repo",
        str(repo),
        "--agent",
        agent_id,
        "--timeout",
        f"{timeout:g}",
    ]
    return " ".join(shlex.quote(part) for part in argv)


def claude_settings(repo, agent_id, launch):
    """The --settings layer of a Claude agent: orchestra's approval hook, and the sandbox when on."""
    timeout = launch.get("approval_timeout") or CONFIG_DEFAULTS["approval_timeout"]
    hook = {
        "type": "command",
        "command": hook_command(repo, agent_id, timeout),
        "timeout": int(timeout + APPROVAL_HOOK_MARGIN),
    }
    settings = {"hooks": {"PermissionRequest": [{"matcher": "*", "hooks": [hook]}]}}
    if launch.get("bypass_permissions"):  # an array: never split on spaces as --allowedTools is
        settings["permissions"] = {"allow": list(launch["bypass_permissions"])}
    if launch.get("sandboxed"):
        settings["sandbox"] = {
            "enabled": True,
            "autoAllowBashIfSandboxed": True,
            "allowUnsandboxedCommands": False,  # dangerouslyDisableSandbox is ignored
        }
        if launch.get("sandbox_network"):
            settings["sandbox"]["network"] = {"allowedDomains": list(launch["sandbox_network"])}
    return settings


def hook_answer(decision):
    """What the hook prints for Claude Code: allow, or deny with the message the agent will read."""
    body = {"behavior": decision["decision"]}
    if decision["decision"] == "deny":
        body["message"] = (
            decision.get("message")
            or f"denied by the user (through orchestra, {decision.get('by')})"
        )
    return {"hookSpecificOutput": {"hookEventName": "PermissionRequest", "decision": body}}


def denied(message):
    """A decision the hook takes on its own: deny, saying why."""
    return {"decision": "deny", "by": "orchestra", "at": utc_iso(), "message": message}


def project_rules(repo):
    """bypass_permissions as the project's config file holds it now ([] when unset or unreadable)."""
    try:
        return read_config_file(Path(repo) / ORCHESTRA_DIR / "config.json").get(
            "bypass_permissions", []
        )
    except OrchestraError:
        return []


def permission_hook(repo, agent_id, timeout, stdin, stdout):
    """`orchestra hook permission-request`: answer one Claude Code permission request."""
    try:
        asked = json.loads(stdin.read())
        tool, tool_input = asked["tool_name"], asked.get("tool_input") or {}
        if not isinstance(tool, str) or not isinstance(tool_input, dict):
            raise ValueError("tool_name or tool_input has the wrong type")
    except (ValueError, KeyError, TypeError) as e:
        stdout.write(
            json.dumps(
                hook_answer(
                    denied(f"orchestra could not read the permission request ({e}); denied")
                )
            )
        )
        return EXIT_OK
    try:
        decision = await_decision(Path(repo), agent_id, timeout, tool, tool_input, asked)
    except Exception as e:  # whatever went wrong, the answer is a denial that says so
        decision = denied(
            f"orchestra could not handle this permission request ({e!r}); denied for safety"
        )
    stdout.write(json.dumps(hook_answer(decision)))
    stdout.flush()
    return EXIT_OK


def await_decision(repo, agent_id, timeout, tool, tool_input, asked):
    """Allow by rule, or record the request and wait for the first decision (or the timeout)."""
    record = load_agent_records(repo).get(agent_id)
    if record is None:
        return denied(
            f"orchestra cannot find agent '{agent_id}' in {repo / ORCHESTRA_DIR}; denied for safety"
        )
    if record.get("state") not in ACTIVE_STATES:
        return denied(f"orchestra records agent '{agent_id}' as {record.get('state')}; denied")
    box, summary = ApprovalBox(repo), tool_summary(tool, tool_input)
    log = repo / ORCHESTRA_DIR / "logs" / f"{agent_id}.jsonl"
    saved = [*box.rules(agent_id), *box.rules(None)]
    rule = next((rule_label(r) for r in saved if stored_rule_matches(r, tool, tool_input)), None)
    rule = rule or next((r for r in project_rules(repo) if rule_matches(r, tool, tool_input)), None)
    report_ignored(box, log)
    if rule:
        append_event(
            log,
            {"event": "approval", "tool": summary, "decision": "allow", "by": "rule", "rule": rule},
        )
        return {"decision": "allow", "by": "rule", "rule": rule, "at": utc_iso()}
    request = box.submit(approval_request(agent_id, timeout, tool, tool_input, summary, asked))
    append_event(log, {"event": "approval_requested", "request": request["id"], "tool": summary})
    shown = "\n".join(shown_request(request))
    notifier = notify(
        repo,
        agent_id,
        "approval",
        f"{agent_id} asks to run:\n{shown}\n(orchestra approve {request['id']})",
    )
    decision = box.wait(
        request["id"],
        timeout,
        parent=os.getppid(),
        digest=request["input_sha256"],
        report=lambda: report_ignored(box, log),
    )
    if decision is None:
        decision = decide_unanswered(box, request, timeout, log, summary)
    box.close(request, decision)
    if notifier:
        notifier.join(NOTIFY_TIMEOUT)
    return decision


def approval_request(agent_id, timeout, tool, tool_input, summary, asked):
    """A request as the hook files it: the whole input, or its head when it is too long to show."""
    text = json.dumps(tool_input)
    whole = len(text) <= APPROVAL_INPUT_LIMIT
    return {
        "agent": agent_id,
        "tool": tool,
        "summary": summary if len(summary) <= APPROVAL_INPUT_LIMIT else tool,
        "input": tool_input if whole else None,
        **({} if whole else {"truncated": True, "input_head": text[:APPROVAL_INPUT_LIMIT]}),
        "input_bytes": len(text.encode("utf-8", "surrogatepass")),
        "input_sha256": input_digest(tool_input),
        "suggestions": asked.get("permission_suggestions") or [] if whole else [],
        "session_id": asked.get("session_id"),
        "since": utc_iso(),
        "timeout": timeout,
        "pid": os.getpid(),
        "pid_start": process_start_time(os.getpid()),
        "parent": os.getppid(),
    }


def decide_unanswered(box, request, timeout, log, summary):
    """Deny a request nobody answered in time (or whose agent ended), unless a decision won the race."""
    ended = os.getppid() != request["parent"]
    late = denied(
        "the agent ended while it waited for this approval"
        if ended
        else f"no decision within approval_timeout ({timeout:g} s); denied"
    )
    late["by"] = "orchestra" if ended else "timeout"
    decision = late if box.decide(request["id"], late) else box.decision(request["id"]) or late
    if decision is late:
        append_event(log, {"event": "approval", "request": request["id"], "tool": summary, **late})
    return decision


def report_ignored(box, log):
    """Say in the agent's log which approval files were ignored for want of a valid signature."""
    for path in dict.fromkeys(box.ignored):
        append_event(log, {"event": "approval_ignored", "file": path,
                           "reason": "no valid orchestra signature: not written by orchestra"})  # fmt: skip
    box.ignored.clear()


def notify(repo, agent_id, event, message):
    """Run notify_command in the background with {agent} and {event} filled in; the message goes
    on its stdin and in $ORCHESTRA_MESSAGE (never in argv, which every local user can read).

    A failing command is written to .orchestra/notify.log, never raised; returns its thread or None.
    """
    try:
        command = Config.load(Path(repo), os.environ)["notify_command"]
    except OrchestraError:
        return None
    if not command:
        return None
    values = {"agent": agent_id, "event": event}
    argv = [re.sub(r"\{(agent|event)\}", lambda m: values[m.group(1)], part) for part in command]
    env = dict(
        os.environ, ORCHESTRA_AGENT=agent_id, ORCHESTRA_EVENT=event, ORCHESTRA_MESSAGE=message
    )
    thread = threading.Thread(
        target=run_notify,
        args=(Path(repo), argv, message, env),
        name=f"notify-{event}",
        daemon=True,
    )
    thread.start()
    return thread


def run_notify(repo, argv, message="", env=None):
    """Run one notify command, the message on its stdin; log why it failed, if it did."""
    try:
        done = subprocess.run(
            argv,
            input=message,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=NOTIFY_TIMEOUT,
            text=True,
            errors="replace",
        )
        problem = f"exit {done.returncode}: {tail_text(done.stdout)}" if done.returncode else None
    except (OSError, subprocess.SubprocessError) as e:
        problem = str(e)
    if problem:
        with (
            contextlib.suppress(OSError),
            open(repo / ORCHESTRA_DIR / "notify.log", "a", encoding="utf-8") as f,
        ):
            f.write(f"{utc_iso()} notify_command {argv[0]} failed: {one_line(problem)}\n")


def sandbox_problem(env):
    """Why Claude Code's sandbox cannot run here, naming what to install; None when it can."""
    if sys.platform == "darwin":
        return None  # Seatbelt is built in
    if not sys.platform.startswith("linux"):
        return f"Claude Code's sandbox does not run on {sys.platform} (use WSL2)"
    path = env.get("PATH", os.defpath)
    missing = [
        package
        for program, package in SANDBOX_PACKAGES.items()
        if shutil.which(program, path=path) is None
    ]
    if missing:
        return (
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; install "
            f"{'it' if len(missing) == 1 else 'them'} (Debian/Ubuntu: apt-get install {' '.join(missing)})"
        )
    try:
        probe = subprocess.run(
            [shutil.which("bwrap", path=path), *SANDBOX_PROBE[1:]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=SANDBOX_PROBE_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"bubblewrap cannot run: {e}"
    if probe.returncode:
        return (
            f"bubblewrap is installed but cannot make a sandbox here ({one_line(probe.stderr) or probe.returncode}); "
            "unprivileged user namespaces may be off (sysctl kernel.unprivileged_userns_clone=1) or the container forbids them"
        )
    return None


def sandbox_for(config, env):
    """Whether new agents run in Claude Code's sandbox, by the 'sandbox' setting.

    "auto" sandboxes where the sandbox can run; "on" refuses to start agents where it cannot.
    """
    mode = config["sandbox"]
    if mode == "off":
        return False
    if not is_claude_command(config["agent_command"]):
        if mode == "on":
            raise OrchestraError(
                "sandbox is 'on' but agent_command is not Claude Code, whose sandbox orchestra uses; "
                "use --no-sandbox or set sandbox to auto"
            )
        return False
    problem = sandbox_problem(env)
    if problem and mode == "on":
        raise OrchestraError(
            f"sandbox is 'on' but Claude Code's sandbox cannot run here: {problem}; "
            "or start the agents with --no-sandbox"
        )
    return problem is None


# ======================================================================================
# Containment
# --------------------------------------------------------------------------------------
# An agent is untrusted: it may change its own worktree and its own branch, nothing else.
# Every Claude agent runs with a PreToolUse hook, `orchestra hook pre-tool-use`, which
# Claude Code calls before EVERY tool call, even one an allow rule pre-approves. The hook
# asks guard(), a pure function of the call and the agent's Boundary (its worktree and
# branch, the repository's .git, .orchestra/, the other agents' worktrees, the user's
# config and secrets), for a verdict:
#   ALLOW (no objection: Claude Code's own rules and the approval hook decide as before),
#   DENY  "blocked by containment: <what>" (the agent reads it; the log, status, collect,
#         the dashboard and notify_command show it, apart from a user's denial), or
#   ASK   a real approval request in the ApprovalBox, waited for; never an allow by rule.
# Paths are judged after realpath (`..` and symlinks) and, on a case-insensitive
# filesystem, casefolded. Bash is split with shlex into simple commands; git is judged
# option by option (another git dir, work tree, config, alias, hook, another branch's
# ref, the network are refused), and whatever the guard cannot read surely, it asks.
# The same layer adds permissions.deny rules and sandbox filesystem limits, so sandboxed
# Bash cannot read .orchestra/ or other agents' worktrees either.
# ======================================================================================

ALLOW, DENY, ASK = "allow", "deny", "ask"
GIT_GUARDED = ("config", "hooks", "info")  # in the common .git folder: no agent writes them
CONTAINED = "blocked by containment"
# Tools that write the file they name, and the input key naming it
WRITE_TOOLS = {
    "Write": "file_path",
    "Edit": "file_path",
    "MultiEdit": "file_path",
    "NotebookEdit": "notebook_path",
}
READ_TOOLS = ("Read", "Glob", "Grep", "LS", "NotebookRead")  # tools that only read paths
# Tools with no path in their input (anything else is judged by its path-like inputs)
PATHLESS_TOOLS = (
    "Bash",
    "BashOutput",
    "KillShell",
    "KillBash",
    "TodoWrite",
    "Task",
    "Agent",
    "WebFetch",
    "WebSearch",
    "ExitPlanMode",
    "ToolSearch",
    "Skill",
    "SlashCommand",
    "AskUserQuestion",
    "TaskOutput",
    "TaskStop",
    "EnterPlanMode",
)
# Credential locations under $HOME whose reads become approval requests
SECRET_PATHS = (
    ".ssh",
    ".aws",
    ".config/gh",
    ".netrc",
    ".docker/config.json",
    ".gnupg",
    ".git-credentials",
    ".config/git/credentials",
    ".kube",
    ".npmrc",
    ".pypirc",
    ".claude/.credentials.json",
    ".config/gcloud",
    ".azure",
)
SHELLS = ("sh", "bash", "dash", "zsh", "ksh", "fish")
# Commands that name a folder without reading what is inside it
NAMING_PROGRAMS = (
    "cd",
    "pushd",
    "stat",
    "test",
    "[",
    "realpath",
    "readlink",
    "dirname",
    "basename",
    "echo",
    "printf",
    "pwd",
    "mkdir",
    "git",
    "ls",  # names only; `ls -R` walks, and is judged as a search
)
# Commands that only run the rest of their arguments as a command
COMMAND_WRAPPERS = (
    "command",
    "builtin",
    "exec",
    "nice",
    "nohup",
    "time",
    "sudo",
    "doas",
    "env",
    "stdbuf",
    "timeout",
    "ionice",
    "chronic",
    "unbuffer",
    "setsid",
    "chrt",
    "taskset",
    "flock",
    "busybox",
    "xvfb-run",
    "su",
    "runuser",
    "pkexec",
    "setpriv",
)
# Wrappers' options that take the next word as their value, and operands before the command
WRAPPER_VALUE_OPTIONS = {
    "timeout": ("-s", "--signal", "-k", "--kill-after"),
    "env": ("-u", "--unset"),
    "stdbuf": ("-i", "-o", "-e"),
    "ionice": ("-c", "-n", "-p", "-P", "-u", "--class", "--classdata"),
    "nice": ("-n", "--adjustment"),
    "flock": ("-w", "--timeout", "-E", "--conflict-exit-code"),
    "taskset": ("-p",),
}
WRAPPER_OPERANDS = {"timeout": 1, "chrt": 1, "taskset": 1, "flock": 1, "busybox": 0}
OTHER_USER_WRAPPERS = ("sudo", "doas", "su", "runuser", "pkexec", "setpriv")
# Programs whose words may be code: with no sandbox, a path they spell is judged
INLINE_CODE = ("python", "python3", "node", "perl", "ruby", "php", "awk", "gawk", "mawk", "vim",
               "vi", "nvim", "ex", "ed", "lua", "Rscript", "deno", "bun", "sqlite3")  # fmt: skip
GIT_IN_TEXT = re.compile(r"(^|[\s;&|(`'\"])git(\s|$)")
# Commands that write every path they are given / only their last one (the destination)
WRITERS_ALL = (
    "rm",
    "rmdir",
    "touch",
    "mkdir",
    "chmod",
    "chown",
    "chgrp",
    "truncate",
    "tee",
    "shred",
    "unlink",
    "sed",
    "perl",
    "patch",
    "dd",
    "mv",  # its sources go, and its destination is written
    "mkfifo",
    "mknod",
    "ed",
    "ex",
    "dos2unix",
    "unix2dos",
)
WRITERS_LAST = ("cp", "ln", "link", "install", "rsync", "scp", "uniq", "xxd", "split")
# Options whose value is a file the command writes, per program
WRITE_OPTIONS = {
    "sort": ("-o", "--output"),
    "curl": ("-o", "--output", "--output-dir"),
    "wget": ("-O", "--output-document", "-P", "--directory-prefix", "-o", "--output-file"),
    "unzip": ("-d",),
    "tar": ("-C", "--directory"),
    "git": ("--output", "--output-directory"),
    "openssl": ("-out",),
    "ssh-keygen": ("-f",),
    "csplit": ("-f", "--prefix"),
}
# Commands whose words are only printed or compared: a variable in them hides no path
PURE_PROGRAMS = (
    "echo",
    "printf",
    "test",
    "[",
    "[[",
    "true",
    "false",
    ":",
    "exit",
    "return",
    "sleep",
)
# Shell words that start a command without being one; `for NAME in` is skipped in full
SHELL_KEYWORDS = frozenset(
    ["if", "then", "else", "elif", "do", "while", "until", "!", "{", "}", "done", "fi", "esac"]
)
# Variables that change where programs look or what they run: assigning one asks
RISKY_VARIABLES = re.compile(
    r"(HOME|XDG_\w+|PATH|CDPATH|IFS|EDITOR|VISUAL|PAGER|BASH_ENV|ENV|LD_\w+|PROMPT_COMMAND|"
    r"SHELLOPTS|BASHOPTS|PYTHONSTARTUP|PERL5OPT|NODE_OPTIONS|GIT_\w+|PWD|OLDPWD|REPLY|MAPFILE|"
    r"BASH_\w+|HIST\w+|TMPDIR)"
)
ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\+?=(.*)", re.S)
# Builtins that change how later words are read or what later runs (aliases, traps, shopt...)
SHELL_STATE_BUILTINS = frozenset(
    ["shopt", "alias", "unalias", "hash", "trap", "enable", "coproc", "function", "bind"]
)
FUNCTION_DEFINITION = re.compile(r"(^|[;&|\n{(]|\bfunction)\s*[A-Za-z_][\w.:-]*\s*\(\s*\)")
GIT_ENV = re.compile(
    r"\bGIT_(DIR|WORK_TREE|COMMON_DIR|CONFIG\w*|EXEC_PATH|SSH\w*|ASKPASS|"
    r"PROXY_COMMAND|NAMESPACE|OBJECT_DIRECTORY|ALTERNATE_OBJECT_DIRECTORIES|"
    r"INDEX_FILE|EXTERNAL_DIFF|EDITOR|SEQUENCE_EDITOR|PAGER|TEMPLATE_DIR)\b"
)
GIT_DIR_MENTION = re.compile(r"(^|[\s/'\"=:(])\.git(/|$|[\s'\";|&)<>])")
ORCHESTRA_MENTION = re.compile(r"\.orchestra\b|claude-orchestra", re.IGNORECASE)
GIT_MERGE_STRATEGIES = ("ort", "recursive", "resolve", "octopus", "ours", "subtree")
# sed commands that write or run: w FILE, W FILE, e COMMAND, and s///w
SED_WRITES = re.compile(
    r"(?:^|[;{}\n])\s*(?:(?:\d+|\$|/[^/]*/)(?:,(?:\d+|\$|/[^/]*/))?)?\s*[wWe](?:\s|$)"
    r"|s(.)(?:(?!\1).)*\1(?:(?!\1).)*\1[a-zA-Z0-9]*[we]"
)
HIDDEN_WORD = "$ORCHESTRA_SUBSTITUTION"  # stands for a substitution's output, unknown till run
HEREDOC_WORD = "orchestra-here-document"  # stands for $(cat <<'EOF' ... EOF): plain text
# git subcommands that may put symlinks into the worktree from a tree the guard cannot see
GLOB_DEPTH_MAX = 3  # wildcard path components the guard expands; more asks
GLOB_MATCHES_MAX = 1000  # matches of one glob the guard judges
LITERAL_DOLLAR = "\ue024"  # a `$` bash takes as itself ('$', \\$): no variable, for the guard
QUOTED_HEREDOC_TEXT = re.compile(
    r"\$\(\s*cat\s*<<-?[ \t]*(?P<q>['\"])(?P<d>\w+)(?P=q)[ \t]*\n(?:.*?\n)??[ \t]*(?P=d)[ \t]*\n\s*\)",
    re.S,
)
BRACE_EXPANSION = re.compile(r"\{[^\s{}]*(,|\.\.)[^\s{}]*\}")
SHELL_OPERATOR_TOKENS = re.compile(r"&>>|&>|>>|>\||>&|<&|<>|<<<|&&|\|\||;;|\|&|[<>|;&()\n]")
REDIRECTS = frozenset([">", ">>", ">|", ">&", "&>", "&>>", "<", "<>", "<&", "<<<"])
# git's global options: those that take a value, and those that reach another repository
GIT_VALUE_OPTIONS = (
    "-C",
    "-c",
    "--git-dir",
    "--work-tree",
    "--namespace",
    "--exec-path",
    "--config-env",
    "--super-prefix",
    "--list-cmds",
    "--attr-source",
)
GIT_SAFE_CONFIG = re.compile(
    r"(user\.(name|email)|color\.[\w.]+|advice\.\w+|core\.quotepath|"
    r"i18n\.\w+|log\.date|init\.defaultbranch|commit\.gpgsign)=.*",
    re.IGNORECASE,
)
# git subcommands that only read, or change only the agent's own worktree, index and branch
GIT_OWN = frozenset(
    [
        "add",
        "am",
        "annotate",
        "apply",
        "bisect",
        "blame",
        "cat-file",
        "check-attr",
        "check-ignore",
        "check-mailmap",
        "check-ref-format",
        "cherry",
        "cherry-pick",
        "clean",
        "commit",
        "commit-tree",
        "count-objects",
        "describe",
        "diff",
        "diff-files",
        "diff-index",
        "diff-tree",
        "difftool",
        "fsck",
        "format-patch",
        "grep",
        "hash-object",
        "help",
        "index-pack",
        "log",
        "ls-files",
        "ls-tree",
        "merge",
        "merge-base",
        "merge-file",
        "merge-tree",
        "mergetool",
        "mktree",
        "mv",
        "name-rev",
        "pack-objects",
        "read-tree",
        "reset",
        "restore",
        "rev-list",
        "rev-parse",
        "revert",
        "rm",
        "shortlog",
        "show",
        "show-branch",
        "show-ref",
        "status",
        "stripspace",
        "unpack-objects",
        "update-index",
        "var",
        "verify-commit",
        "verify-pack",
        "verify-tag",
        "version",
        "whatchanged",
        "write-tree",
        "range-diff",
        "interpret-trailers",
        "for-each-ref",
        "mktag",
        "get-tar-commit-id",
        "column",
        "patch-id",
    ]
)
GIT_NETWORK = frozenset(
    [
        "push",
        "fetch",
        "pull",
        "clone",
        "ls-remote",
        "send-email",
        "archimport",
        "cvsimport",
        "cvsexportcommit",
        "cvsserver",
        "svn",
        "p4",
        "daemon",
        "http-backend",
        "http-fetch",
        "http-push",
        "upload-pack",
        "upload-archive",
        "receive-pack",
        "remote-http",
        "remote-https",
        "remote-ext",
        "remote-fd",
        "request-pull",
        "instaweb",
        "imap-send",
        "shell",
    ]
)
GIT_FORBIDDEN = frozenset(
    [
        "update-ref",
        "filter-branch",
        "filter-repo",
        "gc",
        "prune",
        "prune-packed",
        "repack",
        "maintenance",
        "pack-refs",
        "replace",
        "fast-import",
        "fast-export",
        "hook",
        "credential",
        "credential-store",
        "credential-cache",
        "update-server-info",
        "init-db",
        "submodule",
        "sparse-checkout",
        "quiltimport",
        "bundle",
    ]
)
BRANCH_LIST_FLAGS = frozenset(
    [
        "-a",
        "--all",
        "-r",
        "--remotes",
        "-l",
        "--list",
        "-v",
        "-vv",
        "--verbose",
        "--show-current",
        "--no-color",
        "--color",
        "-q",
        "--quiet",
        "--ignore-case",
        "-i",
        "--omit-empty",
        "--no-column",
        "--column",
    ]
)
BRANCH_VALUE_FLAGS = (
    "--contains",
    "--no-contains",
    "--merged",
    "--no-merged",
    "--points-at",
    "--sort",
    "--format",
)  # --column and --abbrev take a value only after "=": the next word is a new branch
CONFIG_READ_FLAGS = frozenset(
    [
        "--get",
        "--get-all",
        "--get-regexp",
        "--get-urlmatch",
        "--get-color",
        "--get-colorbool",
        "-l",
        "--list",
        "--show-origin",
        "--show-scope",
        "--name-only",
        "-z",
        "--null",
        "--type",
        "--bool",
        "--int",
        "--bool-or-int",
        "--path",
        "--expiry-date",
        "--default",
        "--includes",
        "--no-includes",
        "--local",
        "--worktree",
        "--global",
        "--system",
        "get",
        "list",
    ]
)


class Verdict(NamedTuple):
    """What the guard says about one tool call: ALLOW, DENY or ASK, and why."""

    decision: str
    reason: str = ""


ALLOWED = Verdict(ALLOW)


class Boundary(NamedTuple):
    """What one agent may touch: real (resolved) paths, and its branch."""

    worktree: str
    branch: str
    repo: str  # the user's checkout (the main worktree)
    git_dir: str  # the repository's common .git folder
    orchestra: str  # <repo>/.orchestra
    worktrees: str  # the folder of every agent's worktree
    home: str
    control: tuple  # orchestra's user config, ~/.claude: never written, never read by Bash
    secrets: tuple  # credential locations and protected_paths: reads ask
    casefold: bool = False  # the filesystem ignores case
    sandboxed: bool = False  # its Bash runs in Claude Code's sandbox, a wall besides the guard


def real(path):
    """A path with `~`, `..` and symlinks resolved (what the call would really touch)."""
    return os.path.realpath(os.path.expanduser(str(path)))


def case_insensitive(folder):
    """True when the filesystem holding `folder` ignores case (macOS and Windows by default)."""
    swapped = str(folder).swapcase()
    if swapped == str(folder):
        return False
    try:
        return os.path.samefile(str(folder), swapped)
    except OSError:
        return False


def worktree_links(record):
    """{path: text} of the files that tell git in the worktree where its repository is: the
    worktree's .git file and, in the folder it names, commondir and gitdir. Whoever rewrites
    them picks the config and hooks git obeys there."""
    link = Path(record["worktree"]) / ".git"
    try:
        text = link.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    found = {str(link): text}
    admin = Path(text.split("gitdir:", 1)[-1].strip())
    admin = admin if admin.is_absolute() else link.parent / admin
    for name in ("commondir", "gitdir"):
        with contextlib.suppress(OSError):
            found[str(admin / name)] = (admin / name).read_text(encoding="utf-8", errors="replace")
    return found


def make_boundary(repo, worktree, branch, worktrees, env, protected=(), sandboxed=False):
    """The Boundary of an agent of `repo` working in `worktree` on `branch`."""
    repo = real(repo)
    home = real(env.get("HOME") or os.path.expanduser("~"))
    git_dir = os.path.join(repo, ".git")
    if os.path.isfile(git_dir):
        git_dir = gitfile_target(Path(git_dir)) or git_dir
    secrets_ = [os.path.join(home, rel) for rel in SECRET_PATHS]
    secrets_ += [real(os.path.join(repo, os.path.expanduser(p))) for p in protected]
    control = (real(user_config_path(env)), os.path.join(home, ".claude"))
    return Boundary(
        worktree=real(worktree),
        branch=branch,
        repo=repo,
        git_dir=real(git_dir),
        orchestra=os.path.join(repo, ORCHESTRA_DIR),
        worktrees=real(os.path.join(repo, worktrees)),
        home=home,
        control=tuple(control),
        secrets=tuple(real(s) for s in secrets_),
        casefold=case_insensitive(repo),
        sandboxed=sandboxed,
    )


def within(path, folder, casefold=False):
    """True when `path` is `folder` or inside it (both already real)."""
    if casefold:
        path, folder = path.casefold(), folder.casefold()
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def place_of(path, b):
    """Where a real path lies for this agent: 'worktree', 'worktree-git', 'orchestra',
    'other-agent', 'git-dir', 'control', 'secret', 'checkout' or 'outside'."""
    inside = lambda folder: within(path, folder, b.casefold)  # noqa: E731
    if inside(b.orchestra):
        return "orchestra"
    if inside(os.path.join(b.worktree, ".git")):
        return "worktree-git"
    if any(inside(s) for s in b.secrets):
        return "secret"
    if inside(b.worktree):
        return "worktree"
    if inside(b.worktrees):
        return "other-agent"
    if inside(b.git_dir):
        return "git-dir"
    if any(inside(c) for c in b.control):
        return "control"
    if inside(b.repo):
        return "checkout"
    return "outside"


PLACE_NAMES = {
    "orchestra": "orchestra's own files (.orchestra/)",
    "worktree-git": "the worktree's .git link",
    "other-agent": "another agent's worktree",
    "git-dir": "the repository's .git folder",
    "control": "orchestra's or Claude Code's configuration",
    "secret": "a credential location",
    "checkout": "your checkout, outside the agent's worktree",
    "outside": "a path outside the agent's worktree",
}


def path_verdict(path, b, writing, what):
    """The verdict on touching one real path: writes only inside the worktree; reads anywhere
    but orchestra's files, other agents' worktrees and the configuration; secrets ask."""
    where = place_of(path, b)
    if where == "worktree":
        return ALLOWED
    named = f"{what} {path} ({PLACE_NAMES[where]})"
    if where == "secret":
        return Verdict(ASK, f"{named} may expose credentials")
    if where in ("orchestra", "other-agent") or (where == "control" and not writing):
        return Verdict(DENY, f"{CONTAINED}: {named}")
    if writing:
        return Verdict(DENY, f"{CONTAINED}: {named}")
    return ALLOWED


def strictest(verdicts):
    """DENY beats ASK beats ALLOW; the first reason of the strictest kind."""
    verdicts = list(verdicts)
    for kind in (DENY, ASK):
        found = next((v for v in verdicts if v.decision == kind), None)
        if found:
            return found
    return ALLOWED


def read_tool_verdict(tool, tool_input, b, cwd):
    """Read, Glob, Grep, LS: any path but orchestra's files and other agents' worktrees; a search
    whose root holds those (the repository itself, $HOME, /) is refused too."""
    verdicts = []
    for key in ("file_path", "path", "notebook_path", "pattern"):
        value = tool_input.get(key)
        if not isinstance(value, str) or not value or (key == "pattern" and tool == "Grep"):
            continue
        if key == "pattern":  # the folder a glob starts searching from
            fixed = re.split(r"[*?\[{]", value, maxsplit=1)[0]
            value = fixed if fixed == value or fixed.endswith("/") else os.path.dirname(fixed)
            value = value or "."
        path = real(os.path.join(cwd, value))
        verdicts.append(path_verdict(path, b, False, f"{tool} reads"))
        holds = [p for p in (b.orchestra, b.worktrees) if within(p, path, b.casefold)]
        if tool in ("Glob", "Grep") and holds:
            reason = f"{CONTAINED}: {tool} searches {path}, which holds {holds[0]}"
            verdicts.append(Verdict(DENY, reason))
        secrets = [p for p in b.secrets if within(p, path, b.casefold) and p != path]
        if tool in ("Glob", "Grep") and secrets:
            verdicts.append(Verdict(ASK, f"{tool} searches {path}, which holds {secrets[0]}"))
    return strictest(verdicts)


# ======================================================================================
# Containment: reading a command line
# --------------------------------------------------------------------------------------
# Bash is read as bash would read it, before anything is judged: line continuations joined,
# here-document bodies set aside as input, each substitution's command taken out to be judged
# on its own (its output becomes a word whose value is unknown), operators split apart. What
# bash would expand and shlex would not ($'...', ${x/y}, {a,b}, ~user, a here-document that
# expands) makes the command unreadable, and the guard asks.
# ======================================================================================


# --- substitutions and here-documents ------------------------------------------------


class ShellText(NamedTuple):
    """A Bash command as the guard reads it (see read_shell)."""

    text: str  # continuations joined, here-document bodies dropped, substitutions replaced
    substitutions: list  # the commands inside $(...), `...`, <(...) and >(...)
    unreadable: str = ""  # why the guard cannot read it surely; "" when it can


def read_shell(command):
    """The command with what shlex cannot see made plain, or why it cannot be read surely.

    A substitution becomes HIDDEN_WORD (its output is unknown) and its command is kept to be
    judged on its own; `$(cat <<'EOF' ... EOF)`, the way Claude Code writes commit messages, is
    plain text. Here-document bodies are input, not commands; one whose delimiter is unquoted
    and that expands something, ${...} with an operator, $'...', brace expansion and ~+ or ~user
    are what bash would expand and the guard would not: the command is unreadable.
    """
    out, subs, heredocs, quote, i = [], [], [], None, 0
    while i < len(command):
        c = command[i]
        if quote == "'":
            quote = None if c == "'" else quote
            out.append(LITERAL_DOLLAR if c == "$" else c)
            i += 1
            continue
        if c == "#" and quote is None and (not out or out[-1][-1] in " \t\n;&|()"):
            end = command.find("\n", i)  # a comment, to the end of its line
            i = len(command) if end < 0 else end
            continue
        if c == "\\" and i + 1 < len(command):
            if command[i + 1] == "$":
                out.append(LITERAL_DOLLAR)
            elif command[i + 1] != "\n":
                out.append(command[i : i + 2])
            i += 2
            continue
        if c == "\n" and heredocs and quote is None:
            end, why = skip_heredoc_bodies(command, i + 1, heredocs)
            if why:
                return ShellText("", [], why)
            out.append("\n")
            heredocs, i = [], end
            continue
        step = read_expansion(command, i, quote, out, subs, heredocs)
        if isinstance(step, str):
            return ShellText("", [], step)
        if step:
            i = step
            continue
        if c in "'\"" and quote is None:
            quote = c
        elif c == '"' and quote == '"':
            quote = None
        out.append(c)
        i += 1
    if quote:
        return ShellText("", [], "a quote is never closed")
    if heredocs:
        return ShellText("", [], "a here-document is never ended")
    return ShellText("".join(out), subs)


def read_expansion(command, i, quote, out, subs, heredocs):
    """At command[i]: the index after an expansion read into `out`, 0 for none, or why the
    command cannot be read surely."""
    rest = command[i:]
    if rest.startswith("$(") or rest[0] == "`" or (quote is None and rest[:2] in ("<(", ">(")):
        return read_substitution(command, i, out, subs)
    if rest.startswith("${"):
        name = re.match(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", rest)
        if not name:
            return f"{rest.split('}', 1)[0]}}} transforms a value the guard cannot follow"
        out.append(name.group(0))
        return i + len(name.group(0))
    if rest[0] == "$" and not re.match(r"\$[A-Za-z0-9_@*#?$!'\"-]", rest):
        out.append(LITERAL_DOLLAR)  # `$` before nothing a name can start with is itself
        return i + 1
    if quote is not None:
        return 0
    if rest[:2] in ("$'", '$"'):
        return "$'...' quoting hides what the words are"
    if rest.startswith("<<<"):
        out.append("<<<")
        return i + 3
    if rest.startswith("<<"):
        return read_heredoc_start(rest, i, heredocs)
    at_word_start = not out or out[-1][-1] in " \t\n;&|(<>="
    if re.match(r"[?*+@!]\(", rest):
        return f"{rest[:2]}...) is a pattern bash may match against file names (extglob)"
    braces = BRACE_EXPANSION.match(rest) if rest[0] == "{" else None
    if braces:
        return f"brace expansion ({braces.group(0)}) makes words the guard cannot see"
    if rest[0] == "~" and at_word_start and not re.match(r"~(/|$|[\s;&|)<>:])", rest):
        return f"{rest.split()[0]} names a folder the guard cannot know"
    return 0


def read_heredoc_start(rest, i, heredocs):
    """`<<WORD` or `<<-WORD` at the start of `rest` (at index i): the delimiter is WORD with its
    quotes removed, and any quote in it (E"OF", \\EOF) makes the body plain text."""
    found = re.match(r"<<(-?)[ \t]*([^\s;&|()<>]+)", rest)
    if not found:
        return "a here-document the guard cannot read"
    word = found.group(2)
    quoted = any(c in word for c in "'\"\\")
    delimiter = re.sub(r"[\\'\"]", "", word)
    if "$" in delimiter or "`" in delimiter or not delimiter:
        return f"the here-document delimiter {word} is not a plain word"
    heredocs.append((delimiter, found.group(1) == "-", quoted))
    return i + len(found.group(0))


def read_substitution(command, i, out, subs):
    """A $(...), `...`, <(...) or >(...) at command[i]: its command kept in `subs`, HIDDEN_WORD
    in `out` (plain text for a quoted here-document given to cat); the index after it."""
    text = QUOTED_HEREDOC_TEXT.match(command, i)
    if text:
        out.append(HEREDOC_WORD)
        return text.end()
    if command[i] == "`":
        end = command.find("`", i + 1)
        inner = command[i + 1 : end]
    else:
        start = i + 2  # after $( or <( or >(
        end = closing_parenthesis(command, start)
        inner = command[start:end] if end is not None else ""
    if end is None or end < 0:
        return "a substitution is never closed"
    subs.append(inner)
    out.append(HIDDEN_WORD)
    return end + 1


def closing_parenthesis(command, start):
    """The index of the `)` closing a `(` just before `start`, quotes respected; None if none."""
    depth, quote, i = 1, None, start
    while i < len(command):
        c = command[i]
        if quote:
            quote = None if c == quote else quote
        elif c == "\\":
            i += 1
        elif c in "'\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def skip_heredoc_bodies(command, start, heredocs):
    """The index after the bodies of the here-documents opened on the line just ended; and why
    the command is unreadable ("" if it is not): a body that expands something runs code."""
    lines, i = command[start:].split("\n"), 0
    position = start
    for delimiter, strip_tabs, quoted in heredocs:
        body = []
        while True:
            if i >= len(lines):
                return position, f"the here-document {delimiter} is never ended"
            line = lines[i]
            position += len(line) + 1
            i += 1
            if (line.lstrip("\t") if strip_tabs else line) == delimiter:
                break
            body.append(line)
        if not quoted and any(c in "\n".join(body) for c in "$`"):
            return position, f"the here-document {delimiter} expands what the guard cannot see"
    return min(position, len(command)), ""


def shell_words(command):
    """shlex tokens of a command line; each operator (; && | > >| ...) and newline a token of its own."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars="();<>|&\n")
    lexer.whitespace, lexer.whitespace_split, lexer.commenters = " \t", True, ""  # \r: a letter
    words = []
    for token in lexer:  # shlex glues neighbouring operators: `)>`, `;>`, `>|`
        glued = bool(token) and set(token) <= set("();<>|&\n")
        words += SHELL_OPERATOR_TOKENS.findall(token) if glued else [token]
    return words


def simple_commands(words):
    """[(words, [(redirect operator, target)], the operator after it)] of each simple command of
    a token list ("" after the last)."""
    commands, current, redirects, pending = [], [], [], None
    for word in words:
        if pending:
            redirects.append((pending, word))
            pending = None
        elif word in REDIRECTS:
            pending = word
        elif word and set(word) <= set("();|&\n"):
            commands.append((current, redirects, word))
            current, redirects = [], []
        else:
            current.append(word)
    commands.append((current, redirects, ""))
    return [(c, r, end) for c, r, end in commands if c or r]


# ======================================================================================
# Containment: paths in a command
# --------------------------------------------------------------------------------------
# Each word of a command that may name a file is expanded as bash would (~, $HOME, $PWD, a
# glob) and judged like a file tool's path, from the cwd it runs in. Programs known to write
# (rm, mv, cp, tee, sed -i, sort -o, zip, openssl -out...) may write only in the worktree or
# the temporary folder; a link may only point into the worktree; a folder holding what the
# guard protects may be named, not searched; without the sandbox, code given on the command
# line (python -c, awk's program) may not spell a path the guard would refuse.
# ======================================================================================


def expand_word(word, b, cwd):
    """A word as the path it names: ~, $HOME and $PWD expanded; None when a variable hides it."""
    if word.startswith("~"):
        word = b.home + word[1:] if word == "~" or word.startswith("~/") else word
    word = re.sub(r"\$(?:HOME\b|\{HOME\})", lambda m: b.home, word)
    word = re.sub(r"\$(?:PWD\b|\{PWD\})", lambda m: cwd, word)
    return None if "$" in word else word


def path_like(word):
    """True for a word that may name a file: it has a slash, starts with ~ or a dot, or is a glob."""
    return bool(word) and ("/" in word or word[0] in "~." or any(c in word for c in "*?["))


def word_paths(word, b, cwd):
    """The real paths a shell word can reach (a glob expanded); None when it cannot be known."""
    if "=" in word and not path_like(word.split("=", 1)[0]):
        word = word.split("=", 1)[1]  # --output=FILE, of=FILE
    if not path_like(word):
        return []
    expanded = expand_word(word, b, cwd)
    if expanded is None:
        return None
    full = os.path.join(cwd, expanded)
    if any(c in expanded for c in "*?["):
        import glob

        if sum(any(c in part for c in "*?[") for part in full.split(os.sep)) > GLOB_DEPTH_MAX:
            return None  # too many folders to walk before the hook's time is up
        matches = list(itertools.islice(glob.iglob(full), GLOB_MATCHES_MAX))
        return [real(m) for m in matches] + [real(re.split(r"[*?\[]", full, maxsplit=1)[0] or "/")]
    return [real(full)]


def option_values(argv, names):
    """The values given to any of the options `names` (-o FILE, -oFILE, --output=FILE, and a
    long option shortened as git and GNU tools accept: --out FILE, --index-o=FILE)."""
    values, words = [], argv[1:]
    for i, word in enumerate(words):
        key, eq, attached = word.partition("=")
        for name in names:
            if name.startswith("--") and is_long_option(key, name):
                values += [attached] if eq else words[i + 1 : i + 2]
            elif word == name and i + 1 < len(words):
                values.append(words[i + 1])
            elif not name.startswith("--") and word.startswith(name) and len(word) > len(name):
                values.append(word[len(name) :])
    return values


def is_long_option(word, name):
    """True when `word` is the long option `name`, whole or shortened (--exe for --exec)."""
    key = word.split("=", 1)[0]
    return key.startswith("--") and len(key) > 3 and name.startswith(key)


def written(word, b, cwd, what):
    """The verdict on a word a command writes (the temporary folder is fine)."""
    paths = word_paths(word if path_like(word) else "./" + word, b, cwd)
    if paths is None:
        return Verdict(ASK, f"a variable hides which file {word!r} names")
    return strictest(path_verdict(p, b, True, f"{what} writes") for p in paths if not scratch(p, b))


def scratch(path, b):
    """True for the temporary folder (outside the repository and $HOME), where any command may write."""
    return (
        place_of(path, b) == "outside"
        and within(path, tempfile.gettempdir())
        and not within(path, b.home)
    )


def ancestor_verdict(program, word, path, b):
    """A folder holding .orchestra/ or the worktrees (the repository, $HOME, /) may be named, not
    searched: `find ../..`, `grep -r x ~`, `tar c /` would read what the guard protects."""
    if program in NAMING_PROGRAMS or within(path, b.worktree, b.casefold):
        return ALLOWED
    if any(within(held, path, b.casefold) for held in (b.orchestra, b.worktrees)):
        return Verdict(
            DENY,
            f"{CONTAINED}: {program} {word} reaches a folder holding orchestra's files "
            "or other agents' worktrees",
        )
    if any(within(secret, path, b.casefold) for secret in b.secrets):
        return Verdict(ASK, f"{program} {word} reaches a folder holding your credentials")
    return ALLOWED


def skip_wrapper(argv):
    """The command a wrapper (env, timeout, nice...) runs: its options, their values and its own
    operands (timeout's duration, chrt's priority, taskset's mask) dropped."""
    program, rest = os.path.basename(argv[0]), argv[1:]
    takes_value = WRAPPER_VALUE_OPTIONS.get(program, ())
    while rest and (rest[0].startswith("-") or (program == "env" and "=" in rest[0])):
        rest = rest[2:] if rest[0] in takes_value else rest[1:]
    return rest[WRAPPER_OPERANDS.get(program, 0) :]


def redirect_verdict(op, target, b, cwd):
    """A redirection: `> FILE` writes it, `< FILE` reads it; `2>&1` names a descriptor."""
    if (re.fullmatch(r"\d+|-", target) and "&" in op) or op == "<<<":  # <<< gives text, no file
        return ALLOWED
    paths = word_paths(target if path_like(target) else "./" + target, b, cwd)
    if paths is None:
        return Verdict(ASK, f"a variable hides which file {target!r} names")
    writing, verdicts = ">" in op, []
    for path in paths:  # bash expands a glob in a target too: `> .gi[t]`
        if (writing and within(path, "/dev", b.casefold)) or path == os.devnull:
            continue
        if writing and scratch(path, b):
            continue
        what = "the command writes" if writing else "the command reads"
        verdicts.append(path_verdict(path, b, writing, what))
    return strictest(verdicts)


def cd_verdict(target, b, cwd):
    """cd only within the worktree: git and relative paths after it must mean the agent's own."""
    expanded = expand_word(target, b, cwd)
    if expanded is None or target.startswith(("-", "+")):
        return Verdict(ASK, f"orchestra cannot tell where cd {target} leads")
    path = real(os.path.join(cwd, expanded))
    if place_of(path, b) == "worktree":
        return ALLOWED
    return Verdict(DENY, f"{CONTAINED}: cd {path} leaves the agent's worktree")


def writer_verdict(program, argv, b, cwd):
    """Commands known to write files (rm, cp, mv, tee, sed -i, sort -o...) write only inside the
    worktree or the temporary folder; a link may only point at what is in the worktree."""
    verdicts = [
        written(value, b, cwd, program)
        for value in option_values(argv, WRITE_OPTIONS.get(program, ()))
    ]
    if program == "tar" and any(
        w == "--absolute-names" or re.fullmatch(r"-[A-Za-z]*P[A-Za-z]*", w) for w in argv[1:]
    ):
        verdicts.append(Verdict(ASK, "tar -P writes wherever its archive's names say"))
    if program in ("sed", "perl"):
        return strictest([*verdicts, in_place_verdict(program, argv, b, cwd)])
    operands = [w for w in argv[1:] if not w.startswith("-") or w.startswith("of=")]
    if program == "zip":  # the archive comes first
        verdicts += [written(word, b, cwd, program) for word in operands[:1]]
    if program in ("awk", "gawk") and "inplace" in option_values(argv, ("-i",)):
        verdicts += [written(word, b, cwd, f"{program} -i inplace") for word in operands[2:]]
    if program in ("ln", "link") or (program == "cp" and cp_links(argv)):
        verdicts += [linked_verdict(program, word, b, cwd) for word in operands[:-1]]
    if program in WRITERS_ALL:
        verdicts += [written(word, b, cwd, program) for word in operands]
    elif program in WRITERS_LAST:
        targets = option_values(argv, ("-t", "--target-directory")) or operands[-1:]
        verdicts += [written(word, b, cwd, program) for word in targets]
    return strictest(verdicts)


def cp_links(argv):
    """True when cp makes links (-l, -s, --link, --symbolic-link) instead of copies."""
    return any(
        w in ("--link", "--symbolic-link")
        or (re.fullmatch(r"-[A-Za-z]+", w) and set(w) & set("ls"))
        for w in argv[1:]
    )


def linked_verdict(program, word, b, cwd):
    """A link's source must lie in the worktree: a link to anything else lets the agent edit it."""
    for path in word_paths(word if path_like(word) else "./" + word, b, cwd) or [None]:
        if path is None or place_of(path, b) != "worktree":
            return Verdict(ASK, f"{program} {word} makes a link to what is out of the worktree")
    return ALLOWED


def in_place_verdict(program, argv, b, cwd):
    """sed/perl change files only with -i (alone or in a cluster: -Ei, -pi) or --in-place, and
    sed writes with its w/W commands and s///w; then every file operand is a write."""
    clusters = [w for w in argv[1:] if re.fullmatch(r"-[A-Za-z0-9.]+", w)]
    in_place = any("i" in w.split(".", 1)[0][1:] for w in clusters) or any(
        w.startswith("--in-place") for w in argv[1:]
    )
    words = [w for w in argv[1:] if not w.startswith("-")]
    given = option_values(argv, ("-e", "--expression", "-f", "--file"))
    scripts, files = (
        (given, [w for w in words if w not in given]) if given else (words[:1], words[1:])
    )
    if program == "sed" and any(SED_WRITES.search(w) for w in scripts):
        return Verdict(ASK, "the sed script writes files (w, W or e)")
    if not in_place:
        return ALLOWED
    return strictest(written(word, b, cwd, f"{program} -i") for word in files)


def code_words(program, argv):
    """The words of a command that are code: -c/-e/-r values, awk's program, vim's -c and +cmd."""
    if program in ("awk", "gawk", "mawk"):
        return [w for w in argv[1:] if not w.startswith("-")][:1]
    if program == "sqlite3":  # dot-commands write files: .output, .once, .save, .backup
        return [w for w in argv[2:] if not w.startswith("-")]
    if program in ("vim", "vi", "nvim", "ex", "ed"):
        return [w[1:] for w in argv[1:] if w.startswith("+")] + option_values(argv, ("-c",))
    options = ("-c", "-e", "-E", "-p", "-r", "--eval", "--print")
    return option_values(argv, options)


def inline_code_verdict(program, argv, b, cwd):
    """Code given on the command line (python -c, node -e, awk's program, vim -c...): with no
    sandbox, any path it spells that the guard would refuse to write makes it ask."""
    if b.sandboxed:
        return ALLOWED
    verdicts = []
    for word in code_words(program, argv):
        for spelled in re.findall(r"(?<![\w.~-])(?:(?:~|\.\.?)?/[^\s'\"(),;]*|~|\.\.)", word):
            for path in word_paths(spelled, b, cwd) or [None]:
                refused = path is None or (
                    not scratch(path, b) and path_verdict(path, b, True, "").decision != ALLOW
                )
                if refused:
                    verdicts.append(Verdict(ASK, f"{program} is given code that names {spelled}"))
    return strictest(verdicts)


def is_git_program(word, b, cwd):
    """True when a word names the git executable (a glob like /usr/bin/gi[t] included)."""
    git = shutil.which("git")
    return bool(git) and real(git) in (word_paths(word, b, cwd) or [])


# ======================================================================================
# Containment: shell commands and git
# --------------------------------------------------------------------------------------
# A command line read as above is judged command by command, from every cwd a cd may have
# left the shell in (a `cd x &&` chain trusts its cd). Each command's words are judged as
# paths (see above); a shell's -c string, find -exec, xargs and every substitution are
# commands of their own; builtins that change how later words are read, risky assignments
# (HOME, PATH, GIT_*...) and, without the sandbox, a word whose value is hidden ($VAR) ask;
# a write after a command that may unpack links the guard cannot see asks. git is judged
# option by option, spelled as git reads it (shortened long options, clustered short ones,
# refs after --): -C, --git-dir, --work-tree, -c but for harmless keys, config writes,
# aliases (an unknown subcommand asks), worktree, update-ref, branch and tag changes, another
# branch checked out or named, files written out of the worktree, reflog expiry, gc and the
# network are refused.
# ======================================================================================


# --- a command line, command by command ----------------------------------------------


def bash_verdict(command, b, cwd):
    """The verdict on a Bash command line: every word that names a path, every git call, and
    every command a substitution runs; what the guard cannot read surely, it asks."""
    reading = read_shell(command)
    if reading.unreadable:
        return Verdict(ASK, f"orchestra cannot read this command surely: {reading.unreadable}")
    text = reading.text
    if GIT_ENV.search(text):
        return Verdict(DENY, f"{CONTAINED}: the command sets git's environment (GIT_DIR and kin)")
    if ORCHESTRA_MENTION.search(text):
        return Verdict(DENY, f"{CONTAINED}: the command names orchestra's own files")
    if GIT_DIR_MENTION.search(text):
        return Verdict(DENY, f"{CONTAINED}: the command reaches into a .git folder")
    try:
        words = shell_words(text)
    except ValueError as e:
        return Verdict(ASK, f"orchestra cannot parse this command ({e})")
    hidden = bool(reading.substitutions)
    if hidden and re.search(r"\bgit\b", text):
        return Verdict(ASK, "command substitution hides part of a git command")
    if FUNCTION_DEFINITION.search(text):
        return Verdict(ASK, "the command defines a shell function, which orchestra cannot follow")
    verdicts = [bash_verdict(inner, b, cwd) for inner in reading.substitutions]
    cwds, before = [cwd], []  # where the next command may run; where it runs if a cd failed
    links = ""  # what earlier in the line may have made links the guard could not see
    for argv, redirects, end in simple_commands(words):
        verdicts += [command_verdict(argv, redirects, b, here, hidden) for here in cwds]
        argv = without_keywords(argv)
        if links and writes_files(argv, redirects):
            verdicts.append(Verdict(ASK, f"{links} may make links that a later write follows"))
        links = links or makes_links(argv, b)
        if argv and os.path.basename(argv[0]) in ("cd", "pushd", "popd"):
            target = argv[1] if len(argv) > 1 else "~"
            reached = [expand_word(target, b, here) for here in cwds]
            before = list(dict.fromkeys(before + cwds))
            cwds = [real(os.path.join(h, t)) for h, t in zip(cwds, reached) if t is not None]
            cwds = cwds or before
        if end != "&&":  # past `cd x && ...`, a failed cd, or a subshell's, leaves the old cwd
            cwds, before = list(dict.fromkeys(cwds + before)), []
    return strictest(verdicts)


def makes_links(argv, b):
    """What in a command may make symlinks the guard cannot see before it runs: files taken from
    a tree or a commit that is not a branch (which the agent could have crafted), an archive
    unpacked, a copy that keeps links; "" when nothing."""
    if not argv:
        return ""
    program, words = os.path.basename(argv[0]), argv[1:]
    if program == "git":
        sub = next((w for w in words if not w.startswith("-")), "")
        rest = words[words.index(sub) + 1 :] if sub else []
        sources = option_values(["git", *rest], ("--source", "-s")) if sub == "restore" else []
        if sub == "checkout" and "--" in rest:
            sources = positionals(rest[: rest.index("--")])
        crafted = [t for t in sources if t != "HEAD" and not names_branch(b, t)]
        return f"git {sub}" if crafted or sub in ("read-tree", "checkout-index") else ""
    if program in ("tar", "unzip", "bsdtar", "cpio", "7z", "ln", "link"):
        return program
    if program in ("cp", "rsync") and any(re.match(r"-[A-Za-z]*[aPdRrl]", w) for w in words):
        return program
    return ""


def writes_files(argv, redirects):
    """True when a command writes: a redirection into a file, or a program that writes files."""
    if any(">" in op and not re.fullmatch(r"\d+|-", target) for op, target in redirects):
        return True
    program = os.path.basename(argv[0]) if argv else ""
    return program in (*WRITERS_ALL, *WRITERS_LAST, *WRITE_OPTIONS) and program != "git"


def without_keywords(argv):
    """A simple command without the shell keywords before it (`then`, `do`, `for NAME in`...)."""
    while argv and argv[0] in SHELL_KEYWORDS:
        argv = argv[1:]
    if argv[:1] == ["for"]:
        argv = argv[3:] if argv[2:3] == ["in"] else []
        return ["for", *argv] if argv else []  # the loop's words are judged as any command's
    return argv


def command_verdict(argv, redirects, b, cwd, hidden):
    """The verdict on one simple command (its words and redirections)."""
    verdicts = [redirect_verdict(op, target, b, cwd) for op, target in redirects]
    argv = without_keywords(argv)
    while argv and ASSIGNMENT.fullmatch(argv[0]):
        verdicts.append(assignment_verdict(argv[0], b, cwd))
        argv = argv[1:]
    while argv and os.path.basename(argv[0]) in COMMAND_WRAPPERS:
        if os.path.basename(argv[0]) in OTHER_USER_WRAPPERS:
            return Verdict(ASK, f"{argv[0]} runs a command as another user")
        if os.path.basename(argv[0]) == "env":
            verdicts.append(env_verdict(argv, b, cwd))
        argv = skip_wrapper(argv)
    if not argv:
        return strictest(verdicts)
    if "$" in argv[0]:
        return Verdict(ASK, f"a variable or a substitution names the command ({argv[0]})")
    program = os.path.basename(argv[0])
    verdicts.append(hidden_words_verdict(program, argv, b, cwd))
    recursive = any(re.fullmatch(r"-[A-Za-z]*R[A-Za-z]*|--recursive", w) for w in argv[1:])
    searcher = f"{program} -R" if program == "ls" and recursive else program  # ls names, -R walks
    for word in argv[1:]:
        paths = word_paths(word, b, cwd)
        if paths is None:
            verdicts.append(Verdict(ASK, f"a variable hides which path {word!r} names"))
            continue
        named_only = searcher in NAMING_PROGRAMS  # ls .. lists the agents' folders by name
        paths = [p for p in paths if not (named_only and p == b.worktrees)]
        verdicts += [path_verdict(p, b, False, "the command reaches") for p in paths]
        verdicts += [ancestor_verdict(searcher, word, p, b) for p in paths]
    verdicts.append(program_verdict(program, argv, b, cwd, hidden))
    return strictest(verdicts)


def program_verdict(program, argv, b, cwd, hidden):
    """What the program itself does with its words: cd, a shell, find, xargs, git, a writer."""
    if program in ("cd", "pushd"):
        return cd_verdict(argv[1] if len(argv) > 1 else "~", b, cwd)
    if program == "popd":
        return Verdict(ASK, "popd goes back to a folder orchestra did not follow")
    if program in SHELL_STATE_BUILTINS or shell_state_change(program, argv):
        return Verdict(ASK, f"{program} changes how the shell reads or runs later commands")
    if program in ("source", ".") and any(expand_word(w, b, cwd) is None for w in argv[1:]):
        return Verdict(ASK, f"{program} runs text orchestra cannot see")
    if program in ("export", "declare", "typeset", "local", "readonly"):
        return strictest(assignment_verdict(w, b, cwd) for w in argv[1:] if ASSIGNMENT.fullmatch(w))
    if program in SHELLS:
        return shell_verdict(argv, b, cwd)
    if program == "eval":
        return Verdict(ASK, "eval runs text orchestra cannot check")
    if program == "find":
        return find_verdict(argv, b, cwd)
    if program == "xargs":
        return xargs_verdict(argv, b, cwd)
    if program == "git" or program.startswith("git-"):
        if hidden:
            return Verdict(
                ASK, f"command substitution hides part of a git command: {' '.join(argv)}"
            )
        return git_verdict(argv, b, cwd)
    if "git" in (os.path.basename(w) for w in argv[1:]):
        return Verdict(ASK, f"{program} runs git with arguments orchestra cannot see")
    if program not in PURE_PROGRAMS and any(GIT_IN_TEXT.search(w) for w in argv[1:]):
        return Verdict(ASK, f"{program} is given text that runs git, which orchestra cannot check")
    if program in ("cp", "ln", "install") and any(is_git_program(w, b, cwd) for w in argv[1:]):
        return Verdict(ASK, f"{program} copies git itself, to run it under another name")
    code = inline_code_verdict(program, argv, b, cwd) if program in INLINE_CODE else ALLOWED
    return strictest([code, writer_verdict(program, argv, b, cwd)])


def shell_state_change(program, argv):
    """True for a builtin that would change a variable the guard relies on ($PWD, $HOME, PATH...):
    read, mapfile, printf -v, or declare of a function or a reference."""
    names = [w for w in argv[1:] if not w.startswith("-")]
    if program in ("read", "mapfile", "readarray"):
        return any(RISKY_VARIABLES.fullmatch(n) for n in names) or not names
    if program == "printf" and "-v" in argv:
        return True
    return program in ("export", "declare", "typeset", "local", "readonly") and any(
        w.startswith("-") and set(w[1:]) & set("fn") for w in argv[1:]
    )


def hidden_words_verdict(program, argv, b, cwd):
    """Without the sandbox the guard alone stands between a command and your files, so a word
    whose value it cannot know ($VAR, a substitution's output) makes it ask, but for commands
    that only print or compare their words."""
    if b.sandboxed or program in PURE_PROGRAMS:
        return ALLOWED
    hidden = next((w for w in argv[1:] if expand_word(w, b, cwd) is None), None)
    if hidden is None:
        return ALLOWED
    return Verdict(ASK, f"a variable hides what {hidden!r} names (no sandbox runs this command)")


def assignment_verdict(word, b, cwd):
    """NAME=value: its value is judged as a path; a variable that changes where programs look
    (HOME, PATH, CDPATH, EDITOR, GIT_*...) makes the guard ask."""
    name, value = ASSIGNMENT.fullmatch(word).groups()
    if RISKY_VARIABLES.fullmatch(name):
        return Verdict(ASK, f"{name}= changes where programs look or what they run")
    paths = word_paths(value, b, cwd)
    if paths is None:
        return ALLOWED if b.sandboxed else Verdict(ASK, f"a variable hides what {word!r} holds")
    return strictest(path_verdict(p, b, False, f"{name}= names") for p in paths)


def env_verdict(argv, b, cwd):
    """env's own words: -S splits a string into a command the guard cannot see; NAME=value
    assignments are judged as the shell's are."""
    verdicts = []
    for word in argv[1:]:
        if word.startswith(("-S", "--split-string", "-C", "--chdir")):
            return Verdict(ASK, f"env {word} runs a command orchestra cannot place or see")
        if ASSIGNMENT.fullmatch(word):
            verdicts.append(assignment_verdict(word, b, cwd))
        elif not word.startswith("-"):
            break
    return strictest(verdicts)


def shell_verdict(argv, b, cwd):
    """sh/bash: -c STRING is judged as a command line; a shell reading commands from its input
    (a pipe, a here-string) runs what the guard cannot see; a script is a program like any."""
    words, i = argv[1:], 0
    while i < len(words):
        word = words[i]
        if word in ("-o", "+o", "-O", "+O", "--rcfile", "--init-file"):
            i += 2  # an option's value, not a script
            continue
        if word.startswith("-") and not word.startswith("--") and "c" in word[1:]:
            rest = [w for w in words[i + 1 :] if not w.startswith("-")]
            return bash_verdict(rest[0], b, cwd) if rest else ALLOWED
        if not word.startswith(("-", "+")):
            if expand_word(word, b, cwd) is None:
                return Verdict(ASK, f"{argv[0]} runs a script orchestra cannot see ({word})")
            return ALLOWED  # a script file
        i += 1
    return Verdict(ASK, f"{argv[0]} reads commands from its input, which orchestra cannot check")


def find_verdict(argv, b, cwd):
    """find: its roots are read; -exec/-ok run a command (judged, {} left out) on what it
    finds, and that or -delete/-fprint may write there, so the roots are judged as writes too."""
    roots = list(itertools.takewhile(lambda w: not w.startswith(("-", "(", "!")), argv[1:]))
    verdicts, i, acting = [], 0, False
    while i < len(argv):
        word = argv[i]
        if word in ("-exec", "-execdir", "-ok", "-okdir"):
            sub = list(itertools.takewhile(lambda w: w not in (";", "+", "\\;"), argv[i + 1 :]))
            verdicts.append(command_verdict([w for w in sub if w != "{}"], [], b, cwd, False))
            acting, i = True, i + len(sub) + 1
        elif word in ("-delete", "-fprint", "-fprint0", "-fprintf", "-fls"):
            acting = True
            if word != "-delete" and i + 1 < len(argv):
                verdicts.append(written(argv[i + 1], b, cwd, f"find {word}"))
        i += 1
    if acting:
        verdicts += [written(root, b, cwd, "find acts on") for root in roots or ["."]]
    return strictest(verdicts)


def xargs_verdict(argv, b, cwd):
    """xargs runs a command on words the guard cannot see: a shell, git or a writer asks."""
    rest = argv[1:]
    while rest and rest[0].startswith("-"):
        rest = rest[2:] if rest[0] in ("-I", "-n", "-P", "-L", "-d", "-E", "-s") else rest[1:]
    if not rest:
        return ALLOWED
    program = os.path.basename(rest[0])
    if (
        program in SHELLS
        or program.startswith("git")
        or program in (*WRITERS_ALL, *WRITERS_LAST, "mv")
    ):
        return Verdict(ASK, f"xargs runs {program} on names orchestra cannot see")
    return command_verdict(rest, [], b, cwd, False)


def git_verdict(argv, b, cwd):
    """git in the agent's worktree on its own branch; anything reaching further is refused."""
    program = os.path.basename(argv[0])
    if program.startswith("git-"):
        argv = ["git", program[4:], *argv[1:]]
    if place_of(cwd, b) != "worktree":
        return Verdict(DENY, f"{CONTAINED}: git runs in {cwd}, outside the agent's worktree")
    words, i = argv[1:], 0
    while i < len(words) and words[i].startswith("-"):
        option, _, value = words[i].partition("=")
        if option in GIT_VALUE_OPTIONS and not value:
            i += 1
            value = words[i] if i < len(words) else ""
        verdict = git_global_option(option, value, b, cwd)
        if verdict.decision != ALLOW:
            return verdict
        if option == "-C":
            cwd = real(os.path.join(cwd, value))
        i += 1
    if i >= len(words):
        return ALLOWED
    sub, args = words[i], words[i + 1 :]
    what = f"git {sub}"
    verdict = strictest(
        [git_output_verdict(sub, args, b, cwd, what), other_agents_refs(args, b, what)]
    )
    if verdict.decision != ALLOW:
        return verdict
    if sub in GIT_NETWORK:
        return Verdict(DENY, f"{CONTAINED}: {what} reaches the network or another repository")
    if sub in GIT_FORBIDDEN:
        return Verdict(
            DENY, f"{CONTAINED}: {what} changes the repository beyond the agent's branch"
        )
    checker = GIT_CHECKERS.get(sub)
    if checker is not None:
        return checker(args, b, cwd, what)
    if sub in GIT_OWN:
        if sub == "grep" and any(
            a.startswith("-O") or is_long_option(a, "--open-files-in-pager") for a in args
        ):
            return Verdict(ASK, "git grep -O runs a program")
        return ALLOWED
    return Verdict(ASK, f"{what} is not a git command orchestra knows (an alias?)")


def git_global_option(option, value, b, cwd):
    """git's own options before the subcommand: only -C into the worktree and harmless -c."""
    if option == "-C":
        target = expand_word(value, b, cwd)
        if target is not None and place_of(real(os.path.join(cwd, target)), b) == "worktree":
            return ALLOWED
        return Verdict(DENY, f"{CONTAINED}: git -C {value} reaches outside the agent's worktree")
    if option == "-c":
        if GIT_SAFE_CONFIG.fullmatch(value):
            return ALLOWED
        return Verdict(
            DENY, f"{CONTAINED}: git -c {value} can run commands or change git's behaviour"
        )
    if option in GIT_VALUE_OPTIONS or option in ("--bare",):
        return Verdict(DENY, f"{CONTAINED}: git {option} reaches another git dir or work tree")
    return ALLOWED


def positionals(args, value_flags=()):
    """The arguments of a git subcommand that are not options (nor an option's value)."""
    found, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--":
            break
        elif arg.startswith("-"):
            skip = arg in value_flags
        else:
            found.append(arg)
    return found


def all_operands(args, value_flags=()):
    """A subcommand's operands on both sides of `--` (for tag and symbolic-ref, refs all)."""
    return positionals([a for a in args if a != "--"], value_flags)


def short_cluster(arg, letters):
    """True for a cluster of short options holding one of `letters` (-fBmain, -qb, -Cx): git
    reads its letters as options until one that takes a value, which is the rest."""
    cluster = re.match(r"-([A-Za-z]+)", arg)
    return bool(cluster) and any(c in letters for c in cluster.group(1))


def git_branch(args, b, cwd, what):
    """git branch: listing only; creating, moving, deleting or retracking a branch is refused."""
    value_flags = BRANCH_VALUE_FLAGS
    for arg in args:
        option = arg.split("=", 1)[0]
        if re.fullmatch(r"-[a-zA-Z]{2,}", arg) and all(
            f"-{c}" in BRANCH_LIST_FLAGS for c in arg[1:]
        ):
            continue  # -av: listing flags together
        if arg.startswith("-") and option not in BRANCH_LIST_FLAGS and option not in value_flags:
            return Verdict(DENY, f"{CONTAINED}: git branch {arg} changes a branch")
    listing = any(a in ("-l", "--list") for a in args)
    if positionals(args, value_flags) and not listing:
        return Verdict(DENY, f"{CONTAINED}: git branch {' '.join(args)} creates a branch")
    return ALLOWED


def git_tag(args, b, cwd, what):
    """git tag: listing only (tags are the user's refs)."""
    listing = not all_operands(args, BRANCH_VALUE_FLAGS) or any(a in ("-l", "--list") for a in args)
    long_changing = ("--delete", "--force", "--annotate", "--sign", "--message", "--file", "--edit")
    changing = any(
        short_cluster(a, "dfasumFe") or any(is_long_option(a, o) for o in long_changing)
        for a in args
        if a.startswith("-") and a not in ("-l", "--list")
    )
    if listing and not changing:
        return ALLOWED
    return Verdict(DENY, f"{CONTAINED}: git tag {' '.join(args)} changes the user's tags")


def git_config(args, b, cwd, what):
    """git config: reading only; a write changes the repository's config for the user too."""
    words = positionals(args, ("--type", "--default", "--file", "-f", "--blob"))
    reads = all(a.split("=", 1)[0] in CONFIG_READ_FLAGS for a in args if a.startswith("-"))
    if words[:1] in (["set"], ["unset"], ["edit"], ["rename-section"], ["remove-section"]):
        reads = False  # git 2.46's subcommand forms
    if reads and (words[:1] in (["get"], ["list"]) or len(words) <= 1):
        return ALLOWED
    return Verdict(DENY, f"{CONTAINED}: git config {' '.join(args)} writes git's configuration")


def git_checkout(args, b, cwd, what):
    """git checkout: files, or the agent's own branch; never another branch or a new one."""
    for arg in args:
        if short_cluster(arg, "bBt") or any(
            is_long_option(arg, o) for o in ("--orphan", "--track")
        ):
            return Verdict(DENY, f"{CONTAINED}: git checkout {arg} makes or moves a branch")
        if is_long_option(arg, "--detach"):
            return Verdict(ASK, "git checkout --detach leaves the agent's branch")
        if arg == "-" or arg.startswith("@{-") or is_long_option(arg, "--ignore-other-worktrees"):
            return Verdict(DENY, f"{CONTAINED}: git checkout {arg} leaves the agent's branch")
    words = positionals(args, ("--conflict", "--pathspec-from-file"))
    files_named = "--" in args and args.index("--") < len(args) - 1
    if files_named:  # git checkout TREE -- FILES: files from a tree, the branch stays
        return ALLOWED
    return branch_or_files(words, b, cwd, what)


def branch_or_files(words, b, cwd, what):
    """A checkout's first word is the agent's own branch, or files: never another branch."""
    own = (b.branch, f"refs/heads/{b.branch}", "HEAD")
    if not words or words[0] in own:
        return ALLOWED
    if any(c in words[0] for c in "*?["):  # bash expands it first: `mai?` may become main
        import glob

        expanded = [os.path.basename(m) for m in glob.glob(os.path.join(cwd, words[0]))]
        if any(names_branch(b, name) and name != b.branch for name in expanded):
            return Verdict(DENY, f"{CONTAINED}: {what} {words[0]} names another branch")
    files = all(os.path.lexists(os.path.join(cwd, w)) or any(c in w for c in "*?[") for w in words)
    if files and not names_branch(b, words[0]):
        return ALLOWED
    return Verdict(
        DENY,
        f"{CONTAINED}: {what} {words[0]} leaves the agent's branch {b.branch} "
        "(name files after --)",
    )


def git_switch(args, b, cwd, what):
    """git switch: only to the agent's own branch."""
    long_forms = ("--create", "--force-create", "--orphan", "--detach", "--ignore-other-worktrees")
    if any(short_cluster(a, "cCd") or any(is_long_option(a, o) for o in long_forms) for a in args):
        return Verdict(DENY, f"{CONTAINED}: git switch {' '.join(args)} leaves the agent's branch")
    words = [a for a in args if a == "-" or not a.startswith("-")]  # `--` hides no branch
    if not words or words[0] == b.branch:
        return ALLOWED
    return Verdict(DENY, f"{CONTAINED}: git switch {words[0]} leaves the agent's branch {b.branch}")


def git_rebase(args, b, cwd, what):
    """git rebase of the agent's own branch; --exec runs commands git would hide from the guard."""
    if any(a.startswith("-x") or is_long_option(a, "--exec") for a in args):
        return Verdict(ASK, "git rebase --exec runs commands")
    if any(is_long_option(a, "--update-refs") for a in args):
        return Verdict(DENY, f"{CONTAINED}: git rebase --update-refs moves other branches")
    value_flags = ("--onto", "-s", "--strategy", "-X", "--strategy-option")
    words = all_operands(args, value_flags)
    branches = words if "--root" in args else words[1:]  # a branch it would check out first
    other = next((w for w in branches if w != b.branch), None)  # an option's value counts too
    if other is not None:
        return Verdict(DENY, f"{CONTAINED}: git rebase {other} rebases another branch")
    return ALLOWED


def git_subcommands_reading(allowed, ask=()):
    """A checker that allows a subcommand's read-only forms ('list', 'show' ...) and refuses the rest."""

    def check(args, b, cwd, what):
        words = positionals(args)
        first = words[0] if words else ""
        reading = first in allowed or (not words and "" in allowed)
        if reading and not any(a in ("-d", "--delete", "--expire") for a in args):
            return ALLOWED
        if first in ask:
            return Verdict(ASK, f"{what} {first} changes refs the user shares with the agent")
        return Verdict(
            DENY,
            f"{CONTAINED}: {what} {' '.join(args)} changes the repository beyond the agent's branch",
        )

    return check


def git_symbolic_ref(args, b, cwd, what):
    """git symbolic-ref NAME reads; with a target or -d it would repoint HEAD elsewhere."""
    deleting = any(a == "--delete" or short_cluster(a, "d") for a in args if a.startswith("-"))
    if len(all_operands(args, ("-m",))) <= 1 and not deleting:
        return ALLOWED
    return Verdict(DENY, f"{CONTAINED}: git symbolic-ref {' '.join(args)} repoints a ref")


def git_init(args, b, cwd, what):
    """git init makes a new repository: asked (it can carry its own hooks and config)."""
    return Verdict(ASK, "git init makes a new repository")


def other_agents_refs(args, b, what):
    """Another agent's branch named in git's arguments (orchestra/other, other:file, a..b): its
    committed work is that agent's, as its worktree is."""
    namespace = b.branch.rsplit("/", 1)[0] + "/"
    for arg in args:
        for token in re.split(r"\.\.\.?|[:=\s]", arg):
            ref = re.sub(r"^(refs/)?(heads/|remotes/[^/]+/)?|[\^~@].*$", "", token)
            if ref.startswith(namespace) and ref != b.branch:
                return Verdict(DENY, f"{CONTAINED}: {what} {arg} names another agent's branch")
    return ALLOWED


def git_output_verdict(sub, args, b, cwd, what):
    """--output FILE (log, show, diff...) and format-patch -o DIR write where they say."""
    names = ("--output", "--output-directory", "-o") if sub == "format-patch" else ("--output",)
    return strictest(written(v, b, cwd, what) for v in option_values(["git", *args], names))


def git_file_writer(args, b, cwd, what):
    """merge-file, interpret-trailers, read-tree --index-output, index-pack -o, pack-objects,
    apply: the files they name may be written, so they must lie in the worktree."""
    if any(is_long_option(a, "--unsafe-paths") for a in args):
        return Verdict(
            DENY, f"{CONTAINED}: {what} --unsafe-paths patches files out of the worktree"
        )
    if any(is_long_option(a, "--directory") for a in args):
        return Verdict(ASK, f"{what} --directory places the patch where orchestra cannot see")
    values = option_values(["git", *args], ("--index-output", "-o"))
    words = [a for a in args if not a.startswith("-") and a not in values]
    return strictest(written(word, b, cwd, what) for word in [*values, *words])


def git_runs_programs(options):
    """A checker for subcommands that run a program an option names (merge -s, difftool -x)."""

    def check(args, b, cwd, what):
        named = option_values(["git", *args], options)
        shorts = "".join(o[1] for o in options if len(o) == 2)
        if shorts and any(short_cluster(a, shorts) and len(a) > 2 for a in args):
            named.append("")  # -yx./x.sh: a value in a cluster
        if any(name not in GIT_MERGE_STRATEGIES for name in named):
            return Verdict(ASK, f"{what} {' '.join(args)} runs a program orchestra cannot check")
        return ALLOWED

    return check


def git_bisect(args, b, cwd, what):
    """git bisect in the worktree; `bisect reset BRANCH` would check out another branch."""
    words = positionals(args)
    if words[:1] == ["reset"] and len(words) > 1 and words[1] != b.branch:
        return Verdict(DENY, f"{CONTAINED}: {what} reset {words[1]} leaves the agent's branch")
    if words[:1] == ["run"]:
        return command_verdict(args[args.index("run") + 1 :], [], b, cwd, False)
    return ALLOWED


def git_update_index(args, b, cwd, what):
    """git update-index may mark files; --cacheinfo and --index-info craft entries (a symlink
    out of the worktree, checked out next) that the guard would not see: they ask."""
    if any(is_long_option(a, o) for a in args for o in ("--cacheinfo", "--index-info")):
        return Verdict(ASK, f"{what} {' '.join(args)} writes index entries orchestra cannot check")
    return ALLOWED


def names_branch(b, word):
    """True when `word` is one of the repository's branches (a loose or a packed ref)."""
    if os.path.isfile(os.path.join(b.git_dir, "refs", "heads", word)):
        return True
    try:
        with open(os.path.join(b.git_dir, "packed-refs"), encoding="utf-8") as f:
            return f" refs/heads/{word}\n" in f.read()
    except OSError:
        return False


GIT_CHECKERS = {
    "branch": git_branch,
    "tag": git_tag,
    "config": git_config,
    "checkout": git_checkout,
    "switch": git_switch,
    "rebase": git_rebase,
    "symbolic-ref": git_symbolic_ref,
    "init": git_init,
    "update-index": git_update_index,
    "bisect": git_bisect,
    "merge": git_runs_programs(("-s", "--strategy")),
    "difftool": git_runs_programs(("-x", "--extcmd", "-t", "--tool")),
    "cherry-pick": git_runs_programs(("--strategy",)),
    "revert": git_runs_programs(("--strategy",)),
    "mergetool": git_runs_programs(("-t", "--tool")),
    **dict.fromkeys(
        ("merge-file", "interpret-trailers", "read-tree", "index-pack", "pack-objects", "apply"),
        git_file_writer,
    ),
    "stash": git_subcommands_reading(
        ("list", "show"),
        ask=("", "push", "save", "pop", "apply", "drop", "clear", "create", "store", "branch"),
    ),
    "worktree": git_subcommands_reading(("list",)),
    "remote": git_subcommands_reading(("", "get-url")),
    "notes": git_subcommands_reading(("", "list", "show")),
    "reflog": git_subcommands_reading(("", "show", "exists")),
}


def guard(tool, tool_input, b, cwd=None):
    """The containment verdict on one tool call of the agent bounded by `b` (pure but for realpath)."""
    tool_input = tool_input if isinstance(tool_input, dict) else {}
    cwd = real(cwd) if cwd else b.worktree
    if tool == "Bash":
        command = tool_input.get("command")
        if not isinstance(command, str):
            return Verdict(DENY, f"{CONTAINED}: Bash was given no command line orchestra can read")
        if tool_input.get("dangerouslyDisableSandbox"):
            b = b._replace(sandboxed=False)  # judged as the command would run if Claude Code let it
        return bash_verdict(command, b, cwd)
    if tool in WRITE_TOOLS:
        target = tool_input.get(WRITE_TOOLS[tool]) or tool_input.get("file_path")
        if not isinstance(target, str) or not target:
            return Verdict(ASK, f"{tool} names no file orchestra can check")
        return path_verdict(tool_path(target, b, cwd), b, True, f"{tool} writes")
    if tool in READ_TOOLS:
        return read_tool_verdict(tool, tool_input, b, cwd)
    if tool in PATHLESS_TOOLS:
        return ALLOWED
    return unknown_tool_verdict(tool, tool_input, b, cwd)


def tool_path(value, b, cwd):
    """A path a tool names, as it would be opened: relative to the cwd, ~ being your home."""
    if value == "~" or value.startswith("~/"):
        value = b.home + value[1:]
    return real(os.path.join(cwd, value))


def unknown_tool_verdict(tool, tool_input, b, cwd):
    """An unknown or MCP tool: any path among its inputs, however deeply nested, is a possible
    write; a command among them runs what the guard cannot see."""
    verdicts = []
    for key, value in input_leaves(tool_input):
        value = re.sub(r"^file://", "", value.strip())
        if re.search(r"command|cmd|script|code|shell|argv|program|exec", key, re.IGNORECASE) or (
            os.path.basename(value) in (*SHELLS, "git")
        ):
            verdicts.append(Verdict(ASK, f"{tool} runs {key}, which orchestra cannot check"))
        elif names_branch(b, value) and value != b.branch:
            verdicts.append(Verdict(ASK, f"{tool} names the branch {value}, not the agent's own"))
        elif re.search(r"path|file|dir|source|destination|target|uri|url", key, re.IGNORECASE) or (
            not re.search(r"\s", value) and ("/" in value or value[:1] in "~.")
        ):
            verdicts.append(path_verdict(tool_path(value, b, cwd), b, True, f"{tool} uses"))
    return strictest(verdicts)


def input_leaves(value, key=""):
    """(the nearest key, text) of every non-empty string in a tool's input, lists and dicts opened."""
    if isinstance(value, dict):
        for name, inner in value.items():
            yield from input_leaves(inner, str(name))
    elif isinstance(value, list):
        for inner in value:
            yield from input_leaves(inner, key)
    elif isinstance(value, str) and value:
        yield key, value


# ======================================================================================
# Containment: the hook and the settings layer
# --------------------------------------------------------------------------------------
# The PreToolUse hook carries the agent's worktree and branch in its argv, so the common case,
# no objection, reads no state at all. It is a few lines of Python that ask the supervisor's
# GuardServer (a Unix socket in .orchestra/), or else load orchestra as the approval hook does
# and judge the call themselves: the two give the same verdict. A refusal is logged as an orchestra `contained` event and sent to notify_command;
# an ASK becomes an ApprovalBox request the hook waits on, never an allow by rule. The same
# --settings layer denies Read and Edit of orchestra's files, other worktrees and ~/.claude,
# and limits the sandbox's filesystem to match.
# ======================================================================================


GUARD_SOCKET = "guard.sock"  # in .orchestra/: the supervisor's GuardServer
GUARD_SERVER_WAIT = 10  # seconds a hook waits for the GuardServer's answer before judging itself
GUARD_SOCKET_PATH_MAX = 104  # bytes in a Unix socket's path on Linux and macOS, with its NUL
GUARD_BACKLOG = 64  # hooks that may wait to be accepted at once
GUARD_ACCEPT_TICK = 1.0  # seconds between the server's looks at whether it was stopped
GUARD_REQUEST_MAX = 64 * 1024 * 1024  # bytes of one tool call; a larger one is judged by its hook
GUARD_CHUNK = 65536

# The guard runs before every tool call. Its hook first asks the supervisor's GuardServer, which
# has orchestra loaded already; with no server, or for a call that needs an approval, it loads
# orchestra itself and judges the call there (guard_entry skips main()'s parser of every command).
GUARD_LAUNCH = """\
import json, os, socket, sys
folder, server, argv, asked = sys.argv[1], sys.argv[2], sys.argv[3:], sys.stdin.read()
env = {k: os.environ[k] for k in ("HOME", "ORCHESTRA_CONFIG", "XDG_CONFIG_HOME") if k in os.environ}
answer = None
try:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(%d)
        s.connect(server)
        s.sendall(json.dumps({"argv": argv, "asked": asked, "env": env}).encode())
        s.shutdown(socket.SHUT_WR)
        answer = json.loads(b"".join(iter(lambda: s.recv(65536), b"")))
except (OSError, ValueError):
    pass
if isinstance(answer, dict) and isinstance(answer.get("stdout"), str):
    sys.stdout.write(answer["stdout"])
    sys.exit(0)
sys.path.insert(0, folder)
import io, orchestra
sys.exit(orchestra.guard_entry(argv, io.StringIO(asked)))
""" % GUARD_SERVER_WAIT  # noqa: UP031 (its braces are Python's, not format fields)


def guard_socket(repo):
    """Where the supervisor's GuardServer listens: in .orchestra/, which no agent may reach."""
    return Path(repo) / ORCHESTRA_DIR / GUARD_SOCKET


def guard_command(repo, record, timeout, sandboxed=False):
    """The shell command of the agent's PreToolUse hook: GUARD_LAUNCH, which asks the supervisor's
    GuardServer or else this very orchestra, launched as cheaply as hook_command launches the
    approval hook (-I -S, cached bytecode)."""
    launch = record.get("launch") or {}
    argv = [
        sys.executable,
        "-I",
        "-S",
        "-c",
        GUARD_LAUNCH,
        str(Path(__file__).resolve().parent),
        str(guard_socket(repo)),
        "--repo",
        str(repo),
        "--agent",
        record["id"],
        "--worktree",
        str(record["worktree"]),
        "--branch",
        record["branch"],
        "--timeout",
        f"{timeout:g}",
    ]
    for path in launch.get("protected_paths") or ():
        argv += ["--protect", path]
    if sandboxed:
        argv.append("--sandboxed")
    return " ".join(shlex.quote(part) for part in argv)


def add_containment(settings, repo, record, env):
    """Add the guard hook, the deny rules and the sandbox's filesystem limits to a --settings layer."""
    launch = record.get("launch") or {}
    timeout = launch.get("approval_timeout") or CONFIG_DEFAULTS["approval_timeout"]
    hook = {
        "type": "command",
        "command": guard_command(repo, record, timeout, "sandbox" in settings),
        "timeout": int(timeout + APPROVAL_HOOK_MARGIN),
    }
    settings.setdefault("hooks", {})["PreToolUse"] = [{"matcher": "*", "hooks": [hook]}]
    worktree = Path(record["worktree"])
    b = make_boundary(repo, worktree, record["branch"], worktree.parent, env)
    siblings = [
        str(p) for p in Path(b.worktrees).glob("*") if p.is_dir() and str(p.resolve()) != b.worktree
    ]
    folders = [b.orchestra, *siblings]  # never read, never written
    files = [real(user_config_path(env))]
    # .git's config is left to the guard, Claude Code's own sandbox rules and the integrity check:
    # a sandbox rule on it binds its lock file too, and a lock another git process drops meanwhile
    # makes bubblewrap fail ("Can't find source path .git/config.lock"). Its hooks/ and info/ are
    # folders, bound as they are.
    claude_home = os.path.join(b.home, ".claude")
    rules = [f"Read(/{p}/**)" for p in folders] + [f"Read(/{p})" for p in files]
    rules += [f"Edit(/{p}/**)" for p in [*folders, claude_home]] + [f"Edit(/{p})" for p in files]
    permissions = settings.setdefault("permissions", {})
    permissions["deny"] = [*permissions.get("deny", []), *rules]
    if "sandbox" in settings:
        git_folders = [os.path.join(b.git_dir, name) for name in ("hooks", "info")]
        links = list(worktree_links(record))  # where git in the worktree finds its repository
        settings["sandbox"]["filesystem"] = {
            "denyRead": [b.orchestra, *files, b.worktrees, *filter(os.path.exists, b.secrets)],
            "allowRead": [b.worktree],
            "denyWrite": [
                b.orchestra,
                *files,
                claude_home,
                *filter(os.path.isdir, git_folders),
                *filter(os.path.isfile, links),
            ],
        }
    return settings


def split_denials(record):
    """(denials a user's rule could lift, calls containment refused): Claude Code lists both as
    permission denials; those its deny rules or the guard refused are containment's, not the user's.
    """
    listed = {c.get("tool") for c in record.get("contained") or []}
    contained, users = list(record.get("contained") or []), []
    try:
        worktree = Path(record["worktree"])
        repo = Path(record["log"]).parent.parent.parent
        b = make_boundary(repo, worktree, record["branch"], worktree.parent, os.environ)
    except (KeyError, TypeError, OSError, OrchestraError):
        b = None
    for denial in record.get("permission_denials") or []:
        tool, tool_input = denial.get("tool_name") or "tool", denial.get("tool_input") or {}
        summary = tool_summary(tool, tool_input)
        verdict = guard(tool, tool_input, b) if b else ALLOWED
        if summary in listed:
            continue
        if verdict.decision == DENY:
            contained.append({"tool": summary, "message": verdict.reason})
        else:
            users.append(denial)
    return users, contained


def user_denials(record):
    """The record's permission denials that a rule could lift (see split_denials)."""
    return split_denials(record)[0]


def containment_lines(config, env):
    """What contains an agent on this machine with this configuration, and what is missing."""
    claude = is_claude_command(config["agent_command"])
    problem = sandbox_problem(env) if claude else "agent_command is not Claude Code"
    sandbox = config["sandbox"] != "off" and problem is None
    lines = [
        "guard: "
        + (
            "on: every tool call is checked before it runs (writes only in the agent's "
            "worktree, no .orchestra/ or other worktrees, git only on its own branch)"
            if claude
            else "off: agent_command is not Claude Code, whose hooks orchestra uses"
        ),
        "sandbox: "
        + (
            "on: Bash writes only in the worktree and reaches only sandbox_network"
            if sandbox
            else f"off ({problem or 'sandbox is off'}): Bash is checked by the guard alone"
        ),
        "integrity check: on: refs, .git config, hooks and info are put back when an agent settles",
        f"rules: {json.dumps(config['bypass_permissions'])} run without asking",
    ]
    if (
        claude
        and not sandbox
        and any(r in ("Bash", "Bash(*)") for r in config["bypass_permissions"])
    ):
        lines.append(
            "missing: Bash is allowed outright with no sandbox, so a script an agent writes and "
            "runs can reach what you can; turn the sandbox on or narrow the Bash rule"
        )
    return [f"  {line}" for line in lines]


def guard_answer(decision, reason):
    """What the PreToolUse hook prints: Claude Code's permissionDecision with its reason."""
    return {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": decision,
            "permissionDecisionReason": reason,
        }
    }


def note_containment(repo, agent_id, summary, reason):
    """A refused call in the agent's log (status, logs, collect, the dashboard) and notify_command."""
    log = Path(repo) / ORCHESTRA_DIR / "logs" / f"{agent_id}.jsonl"
    append_event(log, {"event": "contained", "tool": summary, "message": reason, "at": utc_iso()})
    notifier = notify(repo, agent_id, "contained", f"{agent_id}: {reason} ({summary})")
    if notifier:
        notifier.join(NOTIFY_TIMEOUT)


def guard_arguments(argv):
    """The options of `orchestra hook pre-tool-use` as the hook command passes them."""
    parser = argparse.ArgumentParser(prog="orchestra hook pre-tool-use")
    for option in ("--repo", "--agent", "--worktree", "--branch"):
        parser.add_argument(option, required=True)
    parser.add_argument("--protect", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=CONFIG_DEFAULTS["approval_timeout"])
    parser.add_argument("--sandboxed", action="store_true")
    return parser.parse_args(argv)


def guard_entry(argv, stdin):
    """`orchestra hook pre-tool-use` as the hook command runs it when no GuardServer answered."""
    return guard_hook(guard_arguments(argv), stdin, sys.stdout, os.environ)


def guard_hook(args, stdin, stdout, env, may_ask=True):
    """`orchestra hook pre-tool-use`: judge one tool call before it runs (see guard()).

    Without may_ask (in the GuardServer), a call that needs an approval is left undecided: None,
    and the hook process asks itself, so the request names the process that waits for it.
    """
    try:
        asked = json.loads(stdin.read())
        tool, tool_input = asked["tool_name"], asked.get("tool_input") or {}
        if not isinstance(tool, str) or not isinstance(tool_input, dict):
            raise ValueError("tool_name or tool_input has the wrong type")
    except (ValueError, KeyError, TypeError) as e:
        reason = f"{CONTAINED}: orchestra could not read the tool call ({e})"
        stdout.write(json.dumps(guard_answer(DENY, reason)))
        return EXIT_OK
    summary = tool_summary(tool, tool_input)
    try:
        worktrees = Path(args.worktree).parent
        b = make_boundary(
            args.repo, args.worktree, args.branch, worktrees, env, args.protect, args.sandboxed
        )
        cwd = asked.get("cwd") if isinstance(asked.get("cwd"), str) else None
        verdict = guard(tool, tool_input, b, cwd)
    except Exception as e:  # a guard that fails refuses, saying why
        verdict = Verdict(DENY, f"{CONTAINED}: orchestra's guard failed ({e!r})")
    if verdict.decision == ALLOW:
        return EXIT_OK  # no objection: Claude Code's rules and the approval hook decide
    if verdict.decision == ASK and not may_ask:
        return None
    if verdict.decision == ASK:
        decision = guard_approval(
            Path(args.repo), args.agent, args.timeout, tool, tool_input, verdict.reason, asked
        )
        if decision["decision"] == "allow":
            stdout.write(json.dumps(guard_answer(ALLOW, f"allowed by {decision.get('by')}")))
            return EXIT_OK
        verdict = Verdict(DENY, decision.get("message") or f"denied by {decision.get('by')}")
    else:
        note_containment(args.repo, args.agent, summary, verdict.reason)
    stdout.write(json.dumps(guard_answer(DENY, verdict.reason)))
    stdout.flush()
    return EXIT_OK


def guard_approval(repo, agent_id, timeout, tool, tool_input, reason, asked):
    """An approval request for a call the guard cannot judge; the first decision, or a denial."""
    record = load_agent_records(repo).get(agent_id)
    if record is None or record.get("state") not in ACTIVE_STATES:
        return denied(f"{CONTAINED}: orchestra does not know agent '{agent_id}' as active; denied")
    box, summary = ApprovalBox(repo), tool_summary(tool, tool_input)
    log = repo / ORCHESTRA_DIR / "logs" / f"{agent_id}.jsonl"
    text = json.dumps(tool_input)
    request = box.submit(
        {
            "agent": agent_id,
            "tool": tool,
            "summary": summary,
            "reason": reason,
            "input": (
                tool_input
                if len(text) <= APPROVAL_INPUT_LIMIT
                else {"truncated": text[:APPROVAL_INPUT_LIMIT]}
            ),
            "suggestions": [],
            "session_id": asked.get("session_id"),
            "since": utc_iso(),
            "timeout": timeout,
            "pid": os.getpid(),
            "pid_start": process_start_time(os.getpid()),
            "parent": os.getppid(),
        }
    )
    append_event(
        log,
        {
            "event": "approval_requested",
            "request": request["id"],
            "tool": summary,
            "reason": reason,
        },
    )
    notifier = notify(
        repo,
        agent_id,
        "approval",
        f"{agent_id} asks to run {summary}: {reason} (orchestra approve {request['id']})",
    )
    decision = box.wait(request["id"], timeout, parent=os.getppid())
    if decision is None:
        late = denied(f"no decision within approval_timeout ({timeout:g} s); denied")
        late["by"] = "timeout"
        decision = late if box.decide(request["id"], late) else box.decision(request["id"])
        if decision is late:
            append_event(
                log, {"event": "approval", "request": request["id"], "tool": summary, **late}
            )
    box.close(request, decision)
    if notifier:
        notifier.join(NOTIFY_TIMEOUT)
    return decision


class GuardServer:
    """Answers the guard hooks of this repository's agents over a Unix socket in .orchestra/, from
    the supervisor, which has orchestra loaded: a hook then costs a bare Python start, not an
    import of the whole module before every tool call.

    It answers only this repository's calls, and only those judged without a person; for the rest
    the hook judges itself. Anything amiss (no socket, a path too long for one, a server gone
    mid-call) leaves the hook to judge itself too, so the server changes no verdict, only its speed.
    """

    def __init__(self, repo):
        self.repo, self.path = real(repo), str(guard_socket(repo))
        self.listener = None

    def start(self):
        """Listen, unless a live server answers there already or the path is too long for a socket."""
        if len(os.fsencode(self.path)) >= GUARD_SOCKET_PATH_MAX or self.answering():
            return self
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a server that died left it
        listener = socket.socket(socket.AF_UNIX)
        try:
            listener.bind(self.path)
            os.chmod(self.path, 0o600)
            listener.listen(GUARD_BACKLOG)
            listener.settimeout(GUARD_ACCEPT_TICK)  # so accept() notices stop()
        except OSError:
            listener.close()
            return self
        self.listener = listener
        threading.Thread(target=self.accept, args=(listener,), name="guard", daemon=True).start()
        return self

    def answering(self):
        """True when some server already answers at the socket's path."""
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(GUARD_ACCEPT_TICK)
            try:
                probe.connect(self.path)
            except OSError:
                return False
            return True

    def stop(self):
        """Stop listening and remove the socket; a hook then judges its calls itself."""
        if self.listener is not None:
            self.listener, listener = None, self.listener
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def accept(self, listener):
        """Answer each hook that connects, each in a thread of its own."""
        while self.listener is listener:
            try:
                connection, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self.answer, args=(connection,), daemon=True).start()

    def answer(self, connection):
        """Read one hook's request to the end, and send back its answer ({} when it must judge)."""
        with connection:
            connection.settimeout(GUARD_SERVER_WAIT)
            try:
                request = json.loads(receive_to_end(connection, GUARD_REQUEST_MAX))
                reply = self.judge(request["argv"], request["asked"], request["env"])
            except (Exception, SystemExit):  # argparse exits: whatever fails, the hook judges
                reply = {}
            with contextlib.suppress(OSError):
                connection.sendall(json.dumps(reply).encode())

    def judge(self, argv, asked, env):
        """{"stdout": what the hook prints} for a call of this repository's agents; else {}.

        `env` is the hook's HOME and where it finds your orchestra config: the paths it protects.
        """
        args = guard_arguments(argv)
        if real(args.repo) != self.repo or not all(isinstance(v, str) for v in env.values()):
            return {}
        printed = io.StringIO()
        if guard_hook(args, io.StringIO(asked), printed, env, may_ask=False) is None:
            return {}
        return {"stdout": printed.getvalue()}


def receive_to_end(connection, limit):
    """The bytes a peer sends until it shuts its side; ValueError past `limit` bytes."""
    chunks, size = [], 0
    while True:
        chunk = connection.recv(GUARD_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise ValueError(f"a request of over {limit} bytes")
        chunks.append(chunk)


# ======================================================================================
# Launching agents
# --------------------------------------------------------------------------------------
# From a queued record to a running process: the worktree (made from the base commit, with
# copy_files and setup), the agent's argv and --settings layer, the environment it inherits
# (kept in .orchestra/env/<id> until its launch), and ending its whole process group.
# Agents run in their own process group with files, not pipes, for output, so they outlive
# the supervisor that started them.
# ======================================================================================

# .orchestra/env/<id> (mode 0600, folder 0700): the environment of an agent's next launch
AGENT_ENV_DIR = "env"
SYSTEM_PROMPT = (
    "You are one of several agents started by claude-orchestra. You work in your own git "
    "worktree on branch '{branch}'. Stay on this branch, and commit your work to it with clear "
    "messages before you finish; uncommitted work may be lost. Do not push. A command that "
    "fails with a 'bwrap:' error before it runs met the sandbox starting beside another agent's: "
    "run it again."
)
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
# The oldest Claude Code with every flag and hook orchestra uses, found by trying each release
# against tests/scripted_api.py: 2.1.301 and older never fire the PermissionRequest hook in -p mode.
CLAUDE_MIN_VERSION = (2, 1, 302)
CLAUDE_VERSION_TIMEOUT = 10.0
CLAUDE_VERSIONS_SEEN = {}  # (path, mtime) -> version: one `claude --version` per process


def agent_argv(record, prompt=None, env=None):
    """The argv that starts (or, with a prompt and a session, resumes) an agent.

    Uses the settings saved in the record at spawn, so flags given to spawn still apply.
    """
    config = record["launch"]
    command = config["agent_command"]
    task = prompt or record["task"]
    if not is_claude_command(command):
        return [part.replace("{task}", task) for part in command]
    # The task goes on stdin (agent_prompt()), where `ps` does not show it: `claude -p` reads
    # its prompt from stdin when argv holds none (checked with 2.1.331).
    argv = [*command, "-p", "--output-format", "stream-json", "--verbose"]
    if prompt and record.get("session_id"):
        argv += ["--resume", record["session_id"]]
    argv += ["--append-system-prompt", SYSTEM_PROMPT.format(branch=record["branch"])]
    if config["model"]:
        argv += ["--model", config["model"]]
    if config["permission_mode"]:
        argv += ["--permission-mode", config["permission_mode"]]
    repo = Path(record["log"]).parent.parent.parent  # <repo>/.orchestra/logs/<id>.jsonl
    settings = claude_settings(repo, record["id"], config)
    settings = add_containment(settings, repo, record, os.environ if env is None else env)
    argv += ["--settings", json.dumps(settings)]
    if config.get("max_budget_usd"):
        argv += ["--max-budget-usd", str(config["max_budget_usd"])]
    return argv  # bypass_permissions: claude_settings()' permissions.allow, one rule an item


def agent_prompt(record, prompt=None):
    """What a Claude agent reads on stdin: its task (or the follow-up); None for other CLIs."""
    if not is_claude_command(record["launch"]["agent_command"]):
        return None
    return prompt or record["task"]


def prompt_file(project, agent_id, text):
    """A private file holding `text`, already unlinked: an agent's stdin that no one else sees."""
    folder = project.dir / AGENT_ENV_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(folder), prefix=f".{agent_id}.", suffix=".prompt")
    os.unlink(tmp)
    os.write(fd, text.encode("utf-8", "surrogatepass"))
    os.lseek(fd, 0, os.SEEK_SET)
    return os.fdopen(fd, "rb")


def check_agent_command(config):
    """Refuse early, with the way out, when the agent's program is not installed."""
    program = config["agent_command"][0]
    if shutil.which(program) is None:
        if is_claude_command(config["agent_command"]):
            raise OrchestraError(f"'{program}' was not found on PATH; {CLAUDE_INSTALL_HINT}")
        raise OrchestraError(
            f"agent_command program '{program}' was not found on PATH; install it or fix agent_command"
        )
    problem = claude_version_problem(config["agent_command"], os.environ)
    if problem:
        raise OrchestraError(problem)


def claude_version(program, env):
    """The (major, minor, patch) that `program --version` reports, or None when it cannot say."""
    path = shutil.which(program, path=env.get("PATH", os.defpath))
    try:
        key = (path, os.stat(path).st_mtime_ns) if path else None
    except OSError:
        key = None
    if key is None:
        return None
    if key not in CLAUDE_VERSIONS_SEEN:
        try:
            done = subprocess.run([path, "--version"], env=dict(env), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, errors="replace",
                                  timeout=CLAUDE_VERSION_TIMEOUT)  # fmt: skip
            found = re.match(r"\s*(\d+)\.(\d+)\.(\d+)", done.stdout)
        except (OSError, subprocess.SubprocessError):
            found = None
        CLAUDE_VERSIONS_SEEN[key] = tuple(map(int, found.groups())) if found else None
    return CLAUDE_VERSIONS_SEEN[key]


def claude_version_problem(command, env):
    """Why the Claude Code that agent_command runs is too old for orchestra, or None.

    None too for another agent CLI, a missing program (check_agent_command says that) and a
    version it cannot read: only a version known to be too old is refused.
    """
    if not is_claude_command(command):
        return None
    found = claude_version(command[0], env)
    if found is None or found >= CLAUDE_MIN_VERSION:
        return None
    have, need = ".".join(map(str, found)), ".".join(map(str, CLAUDE_MIN_VERSION))
    return (
        f"Claude Code {have} is too old: orchestra needs {need} or newer (older ones never ask "
        f"for approvals in -p mode); update it with '{CLAUDE_INSTALL_COMMAND}'"
    )


def launch_agent(project, record, prompt=None):
    """Start the agent's process in its worktree, in its own process group, output to files."""
    env = dict(
        clean_env(take_agent_env(project, record["id"]) or os.environ),
        ORCHESTRA_AGENT_ID=record["id"],
        ORCHESTRA_REPO=str(project.repo),
    )
    if record["launch"].get("sandboxed"):
        env.update(sandbox_git_env(record, env))
    argv = agent_argv(record, prompt, env)
    changed = (
        agent_wrote_settings(record) if is_claude_command(record["launch"]["agent_command"]) else []
    )
    if changed:
        argv[1:1] = ["--setting-sources", "user", "--strict-mcp-config"]
    append_event(
        project.log_path(record["id"]),
        {"event": "launch", "resume": bool(prompt), "argv": argv, "ignored_settings": changed},
    )
    if changed:
        message = f"{record['id']} changed {', '.join(changed)}: relaunched without project and local settings"
        append_event(
            project.log_path(record["id"]),
            {"event": "settings_ignored", "files": changed, "message": message},
        )
        notify(project.repo, record["id"], "settings_ignored", message)
    ApprovalBox(project.repo).forget_rules(record["id"])
    text = agent_prompt(record, prompt)
    with (
        open(project.log_path(record["id"]), "ab", opener=private_opener) as out,
        open(project.stderr_path(record["id"]), "ab", opener=private_opener) as err,
        (
            prompt_file(project, record["id"], text) if text is not None else open(os.devnull, "rb")
        ) as stdin,
    ):
        proc = subprocess.Popen(
            argv,
            cwd=record["worktree"],
            stdin=stdin,
            stdout=out,
            stderr=err,
            env=env,
            start_new_session=True,
        )
    # Which process runs it, for a state rebuilt from the logs while it still runs.
    started = {"event": "started", "pid": proc.pid, "pid_start": process_start_time(proc.pid)}
    append_event(project.log_path(record["id"]), started)
    return proc


# What Claude Code loads from its cwd at start that can run commands or change its rules
AGENT_LOADED = (".claude", ".mcp.json")
# What Claude Code's sandbox mounts /dev/null over in the cwd when missing: `git add -A` must skip them
SANDBOX_PLACEHOLDERS = (
    ".bash_profile",
    ".bashrc",
    ".gitconfig",
    ".gitmodules",
    ".idea",
    ".mcp.json",
    ".profile",
    ".ripgreprc",
    ".vscode",
    ".zprofile",
    ".zshrc",
    ".claude",
)
SANDBOX_EXCLUDE = "orchestra-exclude"  # in the worktree's own folder under .git/worktrees/


def sandbox_git_env(record, env):
    """Environment for a sandboxed agent's git: an excludes file (yours, plus the sandbox's
    placeholders, which are character devices `git add -A` refuses) given as core.excludesFile
    through GIT_CONFIG_COUNT, so nothing in the repository's config changes."""
    admin = worktree_admin_dir(record["worktree"])
    if admin is None:
        return {}
    yours = run_git(["config", "--path", "core.excludesFile"], record["worktree"], check=False)
    default = (
        Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME", "~")) / ".config") / "git/ignore"
    )
    source = Path(yours.stdout.strip() or default).expanduser()
    kept = source.read_text(encoding="utf-8", errors="replace") if source.is_file() else ""
    placeholders = "\n".join(
        f"/{name}"
        for name in SANDBOX_PLACEHOLDERS
        if not (Path(record["worktree"]) / name).exists()
        or Path(record["worktree"], name).is_char_device()
    )
    write_atomic(
        admin / SANDBOX_EXCLUDE, f"{kept}\n# placed by Claude Code's sandbox\n{placeholders}\n"
    )
    count = int(env.get("GIT_CONFIG_COUNT") or 0)
    return {
        "GIT_CONFIG_COUNT": str(count + 1),
        f"GIT_CONFIG_KEY_{count}": "core.excludesFile",
        f"GIT_CONFIG_VALUE_{count}": str(admin / SANDBOX_EXCLUDE),
    }


def agent_wrote_settings(record):
    """Files of .claude/ and .mcp.json that differ from the base commit (and from the copies
    orchestra made at spawn): settings the agent may have written, which a relaunch must not obey.
    """
    worktree, base = Path(record["worktree"]), record.get("base_commit")
    if not base or not worktree.is_dir():
        return []
    on_disk = []
    for name in AGENT_LOADED:
        top = worktree / name
        if top.is_file() or top.is_symlink():
            on_disk.append(name)
        for folder, _dirs, files in os.walk(str(top)):
            on_disk += [Path(folder, f).relative_to(worktree).as_posix() for f in files]
    listed = run_git(
        ["ls-tree", "-r", "-z", base, "--", *AGENT_LOADED], worktree, check=False
    ).stdout
    in_base = {}
    for entry in filter(None, listed.split("\0")):
        meta, _, path = entry.partition("\t")
        in_base[path] = meta.split()[-1]
    hashes = {}
    if on_disk:
        done = run_git(
            ["hash-object", "--no-filters", "--stdin-paths"],
            worktree,
            check=False,
            input="\n".join(on_disk) + "\n",
        )
        hashes = dict(zip(on_disk, done.stdout.split()))
    repo = Path(record["log"]).parent.parent.parent
    copied = set(record.get("copied_files") or ())
    changed = []
    for rel in sorted(set(hashes) | set(in_base)):
        if hashes.get(rel) == in_base.get(rel):
            continue
        if (
            rel in copied
            and (repo / rel).is_file()
            and (worktree / rel).read_bytes() == (repo / rel).read_bytes()
        ):
            continue
        changed.append(rel)
    return changed


def save_agent_env(project, agent_ids, env):
    """Keep the environment of the command that spawned, resumed or messaged agents for their launch.

    The supervisor may have been started by another shell long ago; agents must start with the
    caller's environment (an API key set since, a PATH) instead. Secrets never go into state.json:
    each agent gets a file only its owner can read, which the launch reads and deletes.
    """
    folder = project.dir / AGENT_ENV_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    text = json.dumps(dict(env))
    for agent_id in agent_ids:
        temp = folder / f".{agent_id}.{secrets.token_hex(6)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temp, folder / agent_id)


def take_agent_env(project, agent_id):
    """The environment saved for an agent's launch, deleted once read; None when there is none."""
    path = project.dir / AGENT_ENV_DIR / agent_id
    try:
        text = path.read_text(encoding="utf-8")
        path.unlink()
        env = json.loads(text)
    except (OSError, ValueError):
        return None
    return {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else None


def drop_agent_env(project, agent_ids):
    """Forget saved environments no launch will read (an agent resumed in place by SIGCONT)."""
    for agent_id in agent_ids:
        with contextlib.suppress(OSError):
            (project.dir / AGENT_ENV_DIR / agent_id).unlink()


def include_patterns(project):
    """Globs of untracked files to copy into new worktrees: .worktreeinclude plus copy_files."""
    patterns = list(project.config["copy_files"])
    include = project.repo / ".worktreeinclude"
    if include.is_file():
        for line in include.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                patterns.append(line)
    return patterns


def matches_include(path, patterns):
    """True when any include pattern matches `path` (gitignore-like, without negation)."""
    return any(matches_pattern(path, pattern) for pattern in patterns)


def matches_pattern(path, pattern):
    """'dir/' matches a folder at any depth; a pattern with a slash the whole path; else any name."""
    parts = path.split("/")
    if pattern.endswith("/"):
        return any(fnmatchcase(part, pattern.rstrip("/")) for part in parts[:-1])
    if "/" in pattern:
        return fnmatchcase(path, pattern.lstrip("/"))
    return any(fnmatchcase(part, pattern) for part in parts)


def files_to_copy(project, patterns):
    """Untracked files of the user's checkout that match the include patterns."""
    if not patterns:
        return []
    skip = [f"{ORCHESTRA_DIR}/"]
    with contextlib.suppress(ValueError):
        skip.append(
            project.worktree_root.resolve().relative_to(project.repo.resolve()).as_posix() + "/"
        )
    return [p for p in untracked_files(project.repo, skip) if matches_include(p, patterns)]


# held by every `git worktree add` of this process (prepare_worktree; Hosts' fetch_home)
WORKTREE_REGISTER_LOCK = threading.Lock()


def prepare_worktree(project, record, copies, register_lock):
    """Create the agent's branch and worktree, copy files in and run setup; error or None.

    Concurrent `git worktree add` can read another one's half-written admin files, so only
    the registration (no checkout) holds `register_lock`; the checkout itself runs in parallel.
    """
    worktree = Path(record["worktree"])
    log = project.log_path(record["id"])
    if not record.get("spawn_logged"):
        append_spawn_event(project, record)
    add = [
        "worktree",
        "add",
        "--no-checkout",
        "--quiet",
        "-b",
        record["branch"],
        str(worktree),
        record["base_commit"],
    ]
    try:
        with register_lock:
            run_git(add, project.repo)
        run_git(["reset", "--hard", "--quiet"], worktree)
    except GitError as e:
        return str(e)
    for rel in copies:
        target = worktree / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project.repo / rel, target, follow_symlinks=False)
    record["copied_files"] = copies
    error = run_setup(project.config["setup"], worktree, log)
    # What copying and setup left is theirs, not the agent's work: cleanup may delete it while unchanged.
    record["setup_files"] = setup_fingerprints(worktree)
    return error


def append_spawn_event(project, record):
    """Open an agent's log with the facts a rebuilt state.json needs."""
    spawn_facts = (
        "id",
        "task",
        "branch",
        "worktree",
        "base_branch",
        "base_commit",
        "launch",
        "seq",
    )
    batch = {"batch": record.get("batch"), "batch_budget": record.get("batch_budget")}
    after = {"after": record["after"]} if record.get("after") else {}  # see Landing
    append_event(
        project.log_path(record["id"]),
        {"event": "spawn", **{k: record[k] for k in spawn_facts}, **batch, **after},
    )


def run_setup(commands, worktree, log):
    """Run the setup commands (the user's own shell lines) in the worktree; error or None."""
    for command in commands:
        done = subprocess.run(
            command,
            shell=True,
            cwd=str(worktree),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            text=True,
            errors="replace",
        )
        append_event(
            log,
            {
                "event": "setup",
                "command": command,
                "exit_code": done.returncode,
                "output": done.stdout,
            },
        )
        if done.returncode != 0:
            return f"setup command '{command}' failed with exit {done.returncode}: {tail_text(done.stdout) or '(no output)'}"
    return None


def file_fingerprint(path):
    """[size, mtime_ns] of a file, to notice a later change; None for a folder (git lists it as one)."""
    info = os.stat(path)
    return None if stat.S_ISDIR(info.st_mode) else [info.st_size, info.st_mtime_ns]


def pause_agent(record):
    """SIGSTOP a running agent's process group; its id."""
    if record["state"] != "running":
        raise OrchestraError(
            f"{record['id']} is {record['state']}; only a running agent can be paused"
        )
    if not signal_group(record["pid"], record.get("pid_start"), signal.SIGSTOP):
        raise OrchestraError(
            f"{record['id']}'s process is gone; the supervisor will settle it shortly", EXIT_FAILURE
        )
    record.update(state="paused", activity="paused")
    return record["id"]


def stop_process(pid, start_token, grace=STOP_GRACE):
    """SIGCONT then SIGTERM the group, and SIGKILL every member still alive after `grace` seconds
    (children that ignore SIGTERM or outlive the leader included); wait until none is left."""
    signal_group(pid, start_token, signal.SIGCONT)
    if not signal_group(pid, start_token, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not process_alive(pid, start_token) and not group_members(pid):
            return
        time.sleep(0.05)
    for _ in range(int(grace / 0.05) + 1):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # the group id cannot be reused while a member lives
        if not group_members(pid):
            return
        time.sleep(0.05)


def group_members(pgid):
    """Pids of live (not zombie) processes in process group `pgid`; [] where /proc is missing."""
    if not os.path.isdir("/proc"):
        return []  # pragma: no cover - macOS: the leader's death is all we can check
    members = []
    for name in (n for n in os.listdir("/proc") if n.isdigit()):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().decode("ascii", "replace").rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(name))
    return members


# ======================================================================================
# Integrity check
# --------------------------------------------------------------------------------------
# Any rule can have a hole, so what an agent must not change is also checked after the fact.
# Before each launch orchestra records, in .orchestra/integrity/<id>.json, the refs outside
# its own namespace (the user's branches, tags, stash, remotes, other agents' branches; the
# agent's own branch excepted), the repository's config, hooks/ and info/, and the worktree's
# .git link (where git there finds its repository, so the config it obeys). When the agent
# settles, and before `collect`, it verifies them: a moved or new ref is put back (its new
# value kept under refs/orchestra/tampered/<id>/), a changed file restored (the changed
# version kept in .orchestra/integrity/<id>/<time>/), and the agent is marked `tampered` with
# what changed (once per run: `collect` checks only runs no supervisor settled). Another
# agent's branch may move while that agent runs, and orchestra's own merges move the target
# branch: those are accepted (see accept_refs). So is the branch your
# checkout has out when its HEAD log shows you moving it there (a commit or pull you made while
# the agent ran). Any other change you made meanwhile is put back too, and kept, never lost.
# ======================================================================================

INTEGRITY_DIR = "integrity"  # in .orchestra/: <id>.json baselines, <id>/<time>/ changed files
TAMPERED_REFS = "refs/orchestra/tampered"


GIT_COMMON_DIRS = {}  # repository path -> its shared .git folder, asked of git once


def common_git_dir(repo):
    """The repository's shared .git folder."""
    if str(repo) not in GIT_COMMON_DIRS:
        out = run_git(["rev-parse", "--git-common-dir"], repo).stdout.strip()
        GIT_COMMON_DIRS[str(repo)] = (Path(repo) / out).resolve()
    return GIT_COMMON_DIRS[str(repo)]


def current_refs(repo):
    """{ref: object id} of every ref of the repository."""
    out = run_git(["for-each-ref", "--format=%(refname) %(objectname)"], repo).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def guarded_refs(refs, record):
    """The refs an agent must not move: all but orchestra's own and the agent's branch."""
    own = f"refs/heads/{record['branch']}"
    return {r: sha for r, sha in refs.items() if not r.startswith("refs/orchestra/") and r != own}


def guarded_files(git_dir):
    """{path relative to .git: [mode, base64 content]} of config, hooks/ and info/."""
    found = {}
    for name in GIT_GUARDED:
        top = git_dir / name
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in paths:
            with contextlib.suppress(OSError):
                data = path.read_bytes()
                found[path.relative_to(git_dir).as_posix()] = [
                    stat.S_IMODE(path.stat().st_mode),
                    base64.b64encode(data).decode("ascii"),
                ]
    return found


def restore_links(project, record, baseline, stamp):
    """The worktree's links to its repository, if the agent rewrote one (to a git dir of its
    own, whose config would run code in the next git command there): put back, the changed one
    kept."""
    found, kept = [], project.dir / INTEGRITY_DIR / record["id"] / stamp / "links"
    for path, old in (baseline.get("links") or {}).items():
        file = Path(path)
        try:
            new = file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            new = None
        if new == old:
            continue
        kept.mkdir(parents=True, exist_ok=True)
        if file.is_dir() and not file.is_symlink():
            file.rename(kept / f"{len(found)}-{file.name}-folder")
        elif new is not None:
            (kept / f"{len(found)}-{file.name}").write_text(new, encoding="utf-8")
            file.unlink()
        file.write_text(old, encoding="utf-8")
        found.append(
            f"changed {path}, which tells git where the worktree's repository is (put back)"
        )
    return found


def baseline_path(project, agent_id):
    """Where an agent's integrity baseline is kept."""
    return project.dir / INTEGRITY_DIR / f"{agent_id}.json"


def record_integrity(project, record):
    """Record what the agent must not change, just before it is launched."""
    folder = project.dir / INTEGRITY_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    baseline = {
        "version": 1,
        "at": utc_iso(),
        "refs": guarded_refs(current_refs(project.repo), record),
        "files": guarded_files(common_git_dir(project.repo)),
        "links": worktree_links(record),
    }
    write_atomic(baseline_path(project, record["id"]), json.dumps(baseline, sort_keys=True))


def accept_refs(project, refs):
    """orchestra itself moved these refs (a merge): every baseline takes their new values."""
    now = current_refs(project.repo)
    for path in (project.dir / INTEGRITY_DIR).glob("*.json"):
        baseline = read_json_file(path)
        if not baseline:
            continue
        for ref in refs:
            if ref in now:
                baseline["refs"][ref] = now[ref]
        write_atomic(path, json.dumps(baseline, sort_keys=True))


def moved_by_owner(ref, records, since, prefix):
    """True when `ref` is another agent's branch that may have moved lawfully: its agent ran since
    `since`, or orchestra cleaned it up (no live record owns it any more)."""
    if not ref.startswith(f"refs/heads/{prefix}/"):
        return False
    owner = next((r for r in records.values() if f"refs/heads/{r.get('branch')}" == ref), None)
    if owner is None:
        return True
    return owner.get("state") in ACTIVE_STATES or (owner.get("finished_at") or "") >= since


def verify_integrity(project, record, records, unverified_only=False):
    """Put back what the agent changed outside its worktree and branch; what was found, as lines.

    A run is verified once, when it settles: what changes later (your own commits) is not its
    doing. `unverified_only` (collect) checks only runs no supervisor settled.
    """
    path = baseline_path(project, record["id"])
    baseline = read_json_file(path)
    if not baseline or (unverified_only and baseline.get("verified_at")):
        return []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    prefix = record["branch"].rsplit("/", 1)[0]
    found = restore_links(project, record, baseline, stamp)
    found += restore_refs(project, record, baseline, records, stamp, prefix)
    found += restore_files(project, record, baseline, stamp)
    baseline["verified_at"] = utc_iso()
    write_atomic(path, json.dumps(baseline, sort_keys=True))
    return found


def moved_in_checkout(repo, ref, new, since):
    """True when `ref` is the branch your checkout has out and your checkout's HEAD log shows it
    reaching `new` since `since`: a commit, merge or pull you made there while the agent ran. The
    guard and the sandbox keep agents out of your checkout, so that is your doing, not theirs."""
    head = run_git(["symbolic-ref", "-q", "HEAD"], repo, check=False).stdout.strip()
    if head != ref:
        return False
    start = parse_iso(since) or 0
    try:
        log = (common_git_dir(repo) / "logs" / "HEAD").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    entries = (line.split("\t", 1)[0].split() for line in log.splitlines())
    return any(
        len(e) >= 4 and e[1] == new and e[-2].isdigit() and int(e[-2]) >= start for e in entries
    )


def restore_refs(project, record, baseline, records, stamp, prefix):
    """Refs moved, made or deleted since the baseline: kept under tampered/, then put back."""
    now = guarded_refs(current_refs(project.repo), record)
    found, keep = [], f"{TAMPERED_REFS}/{record['id']}/{stamp}/"
    for ref in sorted(set(now) | set(baseline["refs"])):
        old, new = baseline["refs"].get(ref), now.get(ref)
        if old == new or moved_by_owner(ref, records, baseline["at"], prefix):
            continue
        if old is None and ref.startswith(f"refs/heads/{prefix}/"):
            continue  # a newer agent's branch
        if new and moved_in_checkout(project.repo, ref, new, baseline["at"]):
            continue
        if new:
            run_git(["update-ref", keep + ref[len("refs/") :], new], project.repo)
        if old:
            back = run_git(["update-ref", ref, old, new or ""], project.repo, check=False)
            if back.returncode:  # it moved again as we looked: whoever did it, it is kept
                found.append(f"{'moved' if new else 'deleted'} {ref} (moving still: left as is)")
                continue
            found.append(f"{'moved' if new else 'deleted'} {ref} (put back to {old[:12]})")
        else:
            run_git(["update-ref", "-d", ref], project.repo)
            found.append(f"created {ref} (removed; kept as {keep}{ref[len('refs/'):]})")
    return found


def restore_files(project, record, baseline, stamp):
    """.git config, hooks and info files changed since the baseline: kept, then restored."""
    git_dir = common_git_dir(project.repo)
    now, found = guarded_files(git_dir), []
    kept = project.dir / INTEGRITY_DIR / record["id"] / stamp
    for rel in sorted(set(now) | set(baseline["files"])):
        old, new = baseline["files"].get(rel), now.get(rel)
        if old == new:
            continue
        target = git_dir / rel
        if new:
            copy = kept / rel
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(base64.b64decode(new[1]))
        if old:
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            target.write_bytes(base64.b64decode(old[1]))
            os.chmod(target, old[0])
            found.append(f"{'changed' if new else 'deleted'} .git/{rel} (restored)")
        else:
            target.unlink()
            found.append(f"added .git/{rel} (removed)")
    if found:
        found = [f"{line}; the changed version is in {kept}" for line in found]
    return found


def note_tampering(project, record, found):
    """Mark the record, log the finding and tell notify_command."""
    record["tampered"] = [*(record.get("tampered") or []), *found]
    message = f"{record['id']} changed what it must not: {'; '.join(found)}"
    append_event(
        project.log_path(record["id"]), {"event": "tampered", "found": found, "message": message}
    )
    notify(project.repo, record["id"], "tampered", message)


# ======================================================================================
# Project
# --------------------------------------------------------------------------------------
# A repository under orchestra: its paths, its configuration and its state store.
# ======================================================================================


class Project:
    """One repository's orchestra folder, configuration and state."""

    def __init__(self, repo, config):
        self.repo = repo
        self.config = config
        self.dir = repo / ORCHESTRA_DIR
        self.logs = self.dir / "logs"
        self.store = StateStore(self.dir / "state.json", self.rebuild_state)

    @classmethod
    def open(cls, cwd, env, flags=None):
        """Find the repository holding `cwd`, load its configuration and initialise it."""
        repo = find_repo(cwd)
        project = cls(repo, Config.load(repo, env, flags))
        project.init()
        return project

    @property
    def worktree_root(self):
        """The folder that holds the agents' worktrees (worktree_dir may be absolute)."""
        return self.repo / self.config["worktree_dir"]

    def init(self):
        """Create .orchestra/ and keep it and the worktree folder out of git; idempotent."""
        if self.logs.is_dir():
            with contextlib.suppress(OSError):
                os.chmod(str(self.dir), 0o700)  # folders made by earlier versions were 0755
            return
        root = self.worktree_root
        if root.exists() and not root.is_dir():
            raise OrchestraError(
                f"worktree_dir {root} exists and is not a folder; move it or change worktree_dir"
            )
        self.logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in (self.dir, self.logs):  # agents' output and the web token: the owner's only
            os.chmod(str(folder), 0o700)
        excluded = [f"/{ORCHESTRA_DIR}/"]
        with contextlib.suppress(ValueError):
            excluded.append(f"/{root.resolve().relative_to(self.repo.resolve()).as_posix()}/")
        add_exclude_lines(self.repo, excluded)

    def log_path(self, agent_id):
        """The agent's stream-json log, which also holds orchestra's own events."""
        return self.logs / f"{agent_id}.jsonl"

    def stderr_path(self, agent_id):
        """Where the agent's stderr goes."""
        return self.logs / f"{agent_id}.stderr"

    def worktree_path(self, agent_id):
        """Where the agent's worktree lives."""
        return self.worktree_root / f"{WORKTREE_PREFIX}{agent_id}"

    def branch_name(self, agent_id):
        """The agent's branch."""
        return f"{self.config['branch_prefix']}/{agent_id}"

    def records(self):
        """{id: record} of live agents, as state.json holds them now."""
        return self.store.load()["agents"]

    def history(self):
        """{id: record} of cleaned-up agents, read from history.jsonl on demand."""
        return self.store.history()

    def all_records(self):
        """{id: record} of every agent ever spawned here: history, then live records."""
        return {**self.history(), **self.records()}

    def rebuild_state(self):
        """Agent records and batches recovered from the logs and the live worktrees."""
        return rebuild_state(self)


# ======================================================================================
# Spawning agents
# --------------------------------------------------------------------------------------
# Turning tasks into queued agents: ids that are unique against records, history, branches
# and folders; reserving them in the state before any worktree exists; making worktrees now
# or leaving them to the supervisor; and rolling back a spawn that was interrupted. The
# supervisor calls prepare_agents() too, so this section sits above it.
# ======================================================================================

MAX_TASK_LENGTH = 8000  # characters; longer instructions belong in a file the task names
MAX_ID_LENGTH = 40  # of an id given with --name
WORKTREE_THREADS = 8
TASK_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def check_task(task, noun="task"):
    """Refuse a task (or follow-up message) an agent could not be given as one argument."""
    if not task.strip():
        raise OrchestraError(f"a {noun} is empty; describe what the agent should do")
    if len(task) > MAX_TASK_LENGTH:
        raise OrchestraError(
            f"a {noun} is {len(task)} characters long, over the limit of {MAX_TASK_LENGTH}; "
            f"put long instructions in a file and name that file in the {noun}"
        )
    bad = TASK_FORBIDDEN.search(task)
    if bad:
        raise OrchestraError(
            f"a {noun} contains the character U+{ord(bad.group()):04X} (a control character or half of a "
            "surrogate pair); remove it"
        )


def resolve_base(project, requested):
    """(base branch name or None, base commit) for new agents."""
    if not has_commits(project.repo):
        raise OrchestraError(
            "this repository has no commits yet; make a first commit, then spawn agents"
        )
    ref = requested or project.config["base_branch"] or current_branch(project.repo) or "HEAD"
    commit = resolve_commit(project.repo, ref)
    return (ref if ref != "HEAD" else None), commit


def taken_ids(project, records):
    """Ids no new agent may take: records, logs (cleaned-up agents keep theirs), branches and folders."""
    taken = set(records) | local_branches(project.repo, project.config["branch_prefix"])
    with contextlib.suppress(FileNotFoundError):
        taken |= {
            name[: -len(".jsonl")] for name in os.listdir(project.logs) if name.endswith(".jsonl")
        }
    if project.worktree_root.is_dir():
        taken |= {
            p.name[len(WORKTREE_PREFIX) :]
            for p in project.worktree_root.iterdir()
            if p.name.startswith(WORKTREE_PREFIX)
        }
    return taken


def check_explicit_name(project, name, taken):
    """An id given with --name must be a valid, unused branch and folder name."""
    if (
        not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name)
        or len(name) > MAX_ID_LENGTH
        or not is_valid_branch_name(project.branch_name(name))
    ):
        raise OrchestraError(
            f"--name '{name}' is not a valid id; use lowercase letters, digits, '-', '.' and '_'"
        )
    if branch_exists(project.repo, project.branch_name(name)):
        raise OrchestraError(
            f"branch '{project.branch_name(name)}' already exists; pick another name or run 'orchestra cleanup {name}'"
        )
    if project.worktree_path(name).exists():
        raise OrchestraError(
            f"worktree folder {project.worktree_path(name)} already exists; pick another name or remove it"
        )
    if name in taken:
        raise OrchestraError(f"an agent named '{name}' already exists; pick another name")


def reserve_agents(project, tasks, names, base_branch, base_commit, parallel, host=None):
    """Record new queued agents under the lock, each with a unique id; their records. `host`:
    one host for all, or a list with each task's (None: the supervisor places it)."""
    hosts = host if isinstance(host, list) else [host] * len(tasks)

    def reserve(state):
        taken = taken_ids(project, state["agents"])
        for name in names:
            check_explicit_name(project, name, taken)
            taken.add(name)
        created = []
        for task, name, pinned in itertools.zip_longest(tasks, names, hosts):
            agent_id = name or unique_id(slugify(task), taken)
            taken.add(agent_id)
            record = new_record(project, agent_id, task, base_branch, base_commit)
            record["seq"] = next_seq(state)
            record["host"] = (
                pinned  # by spawn --host or a tasks file; else the supervisor places it
            )
            record["preparer"] = [os.getpid(), process_start_time(os.getpid())]
            state["agents"][agent_id] = record
            created.append(record)
        if parallel:
            state["parallel"] = parallel
        return created

    return project.store.update(reserve)


def check_dependencies(known, names, deps):
    """Each task's dependencies as agent ids, refusing unknown ids, self-dependencies and cycles
    before anything is queued. `known`: existing agents (live and cleaned up) by id; `names`:
    the new tasks' ids (None where unnamed); `deps`: one list of ids or prefixes per task."""
    resolved = []
    for name, wanted in zip(names, deps):
        ids = []
        for dep in wanted:
            if dep in names and dep is not None:
                if dep == name:
                    raise OrchestraError(
                        f"task '{name}' cannot wait for itself; remove it from its own 'after'"
                    )
                ids.append(dep)
                continue
            try:
                ids.append(select_agents(known, [dep])[0]["id"])
            except OrchestraError as e:
                raise OrchestraError(f"--after {dep}: {e}") from None
        resolved.append(list(dict.fromkeys(ids)))
    graph = {name: ids for name, ids in zip(names, resolved) if name is not None}
    for start in graph:
        seen, path = set(), [start]
        while path:
            node = path.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    raise OrchestraError(
                        f"the tasks' 'after' make a cycle through '{start}'; break it"
                    )
                if dep not in seen:
                    seen.add(dep)
                    path.append(dep)
    return resolved


def mark_plan(project, records, deps, checks):
    """Fix each new agent's dependencies (`after`, and `waits_for`: those not landed yet) and its
    own checks (from a tasks file) before its spawn event is written."""

    def mark(state):
        landed = {i for i, r in {**project.history(), **state["agents"]}.items() if r.get("landed")}
        for record, after, own_checks in zip(records, deps, checks):
            facts = {}
            if after:
                waits = [i for i in after if i not in landed]
                facts.update(after=after, waits_for=waits)
                if waits:
                    facts["activity"] = f"waiting for {', '.join(waits)} to land"
            if own_checks is not None:
                facts["launch"] = dict(record["launch"], checks=own_checks)
            record.update(facts)
            state["agents"][record["id"]].update(facts)

    if any(deps) or any(c is not None for c in checks):
        project.store.update(mark)


def prepare_agents(project, records):
    """Create all worktrees concurrently, then mark each agent ready or failed."""
    if not records:
        return
    copies = files_to_copy(project, include_patterns(project))
    project.worktree_root.mkdir(parents=True, exist_ok=True)
    register_lock = WORKTREE_REGISTER_LOCK  # serialises `git worktree add` (see prepare_worktree)
    from concurrent.futures import (
        ThreadPoolExecutor,
    )  # here: only spawn needs it, 4 ms at every start

    with ThreadPoolExecutor(max_workers=min(WORKTREE_THREADS, len(records))) as pool:
        errors = list(
            pool.map(lambda r: prepare_worktree(project, r, copies, register_lock), records)
        )

    def mark(state):
        for record, error in zip(records, errors):
            saved = state["agents"][record["id"]]
            saved["copied_files"] = record["copied_files"]
            saved["setup_files"] = record.get("setup_files", {})
            if error:
                saved.update(
                    state="failed", error=error, activity="setup failed", finished_at=utc_iso()
                )
                note_settlement(saved)
            else:
                saved.update(ready=True, activity="waiting for a free slot")
            record.update(saved)

    project.store.update(mark)


def change_agents(project, ids, change):
    """Apply `change(record)` to each named agent under the state lock; what each returned."""
    return project.store.update(
        lambda state: [change(r) for r in select_agents(state["agents"], ids)]
    )


def defer_worktrees(project, records):
    """Leave these agents' worktrees to the supervisor, which makes each shortly before it can run.

    Their logs open with the spawn event now, so a rebuilt state.json still knows them.
    """
    if not records:
        return
    for record in records:
        append_spawn_event(project, record)

    def mark(state):
        for record in records:
            facts = dict(worktree_later=True, spawn_logged=True, activity="waiting for a worktree")
            record.update(facts)  # spawn stays its preparer until hand_over_worktrees
            state["agents"][record["id"]].update(facts)

    project.store.update(mark)


def hand_over_worktrees(project, records):
    """Give deferred agents to the supervisor: until now a killed spawn rolls them back with the rest."""

    def release(state):
        for record in records:
            saved = state["agents"].get(record["id"])
            if saved and saved["state"] == "queued" and saved.get("worktree_later"):
                saved["preparer"] = record["preparer"] = None

    if records:
        project.store.update(release)


def mark_sandboxed(project, records, sandboxed):
    """Fix at spawn whether the agents run in the sandbox: in their records and launch settings."""

    def mark(state):
        for record in records:
            for target in (record, state["agents"][record["id"]]):
                target["sandboxed"] = sandboxed
                target["launch"]["sandboxed"] = sandboxed

    project.store.update(mark)


def roll_back_spawn(project, records, why):
    """Undo half-prepared agents (none has run): remove their worktree and fresh branch, mark
    them failed. Their worktrees hold only the base checkout, copies and setup output."""
    for record in records:
        worktree, branch = record["worktree"], f"refs/heads/{record['branch']}"
        delete_worktree(project.repo, worktree)
        run_git(["update-ref", "-d", branch, record["base_commit"]], project.repo, check=False)

    def mark(state):
        for record in records:
            saved = state["agents"].get(record["id"])
            if saved and saved["state"] == "queued" and not saved.get("ready"):
                saved.update(
                    state="failed", error=why, activity="spawn interrupted", finished_at=utc_iso()
                )
                note_settlement(saved)

    project.store.update(mark)
    drop_agent_env(project, [record["id"] for record in records])  # its keys go with it


def roll_back_stalled_spawns(project):
    """Roll back agents whose spawn process died while preparing them (Ctrl-C, kill); their ids."""
    stalled = [
        r
        for r in project.records().values()
        if r["state"] == "queued"
        and not r.get("ready")
        and r.get("preparer")
        and not process_alive(*r["preparer"])
    ]
    if stalled:
        with shield_interrupts():
            roll_back_spawn(project, stalled, "its spawn was interrupted before the agent started")
    return [r["id"] for r in stalled]


# ======================================================================================
# Results you can trust
# --------------------------------------------------------------------------------------
# An agent that says "done" is not trusted until the configured `checks` (shell commands)
# pass in its own worktree. The supervisor runs them right after the agent's process ends:
# the agent stays `running` (activity "checks: <command>"), so checks take a slot of the
# parallel limit, and `checks` in the record says "running". Each command's output goes
# into the agent's log as a `check` event, the outcome as a `checks` event. On failure,
# up to `fix_rounds` times, the agent's own session is resumed with the failing command
# and the tail of its output, and the checks run again when it finishes. A supervisor that
# dies while checks run leaves the record `running` with checks "running"; the next one
# settles it from the log and runs them again.
#
# An agent whose run ends on an API error it may outlive (HTTP 429 or a usage limit, 529
# overloaded, a 5xx or a network failure: the CLI's `api_error_status`, `api_error` and
# result text) does not fail: it becomes `waiting` with `waiting` = {reason, until,
# attempt}. `until` is the reset time when the CLI tells it (a `rate_limit_event`), else an
# exponential backoff (`api_backoff` doubling per attempt, capped at `api_backoff_max`,
# with jitter). After `api_retries` attempts it stays failed. While any agent waits for a
# rate or usage limit, the account is limited: no agent starts. When the wait ends, the
# agent's session is resumed with "Continue the task." The `waiting` event in the log lets
# a rebuilt state.json restore the wait.
#
# Every spawn makes a batch (`batch` on each record, `batches` in the state); `spawn
# --budget USD` gives it a ceiling. When the batch's agents together have spent it, its
# queued agents never start and its active ones are stopped (`stop_reason` "budget"),
# worktrees and branches kept.
# ======================================================================================

CHECK_POLL = 0.2  # seconds between looks at a running check (its timeout, a stop request)
CHECK_STOP_POLL = 1.0  # seconds between looks at the record for a stop while a check runs
CHECK_OUTPUT_LIMIT = 64 * 1024  # characters of a check's output kept in the agent's log
CHECK_TAIL_CHARS = 1500  # of a failing check's output kept in the record and quoted to the agent
FIX_PROMPT = (
    "The checks orchestra runs after you finish failed. The command `{command}` exited with "
    "{exit_code}. The end of its output:\n\n```\n{tail}\n```\n\nFix the cause, commit the fix, and finish."
)
# a backoff wait is stretched by up to this fraction, so agents do not retry in step
API_JITTER = 0.2
API_SCAN_BYTES = 256 * 1024  # of the end of a log searched for the last run's API error
ACCOUNT_LIMIT_REASONS = (
    "rate_limit",
    "usage_limit",
)  # waits that hold every new start, not one agent
BATCH_ID_FORMAT = "b%Y%m%dT%H%M%S"
# A subscription's usage limit, as Claude Code words it across versions (never a max-turns or budget end)
USAGE_LIMIT_RE = re.compile(
    r"usage limit|hit your (?:usage )?limit|limit reached\W.*\bresets?\b|out of (?:extra )?usage",
    re.IGNORECASE,
)
USAGE_RESET_RE = re.compile(r"\|(\d{10})\b")  # "Claude AI usage limit reached|1767225600"
USAGE_RESET_CLOCK_RE = re.compile(
    r"resets(?: at)? (\d{1,2})(?::(\d{2}))?\s*([ap]m)?(?:\s*\(([^)]+)\))?", re.I
)


def checks_running(record):
    """True while the supervisor runs the agent's checks (a long check is not a stale agent)."""
    return (record.get("checks") or {}).get("status") == "running"


def json_object(line):
    """A log line as a dict, or None."""
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return event if isinstance(event, dict) else None


def last_run_result(path):
    """(the result event of the agent's latest run or None, a rate-limit reset time or None)."""
    result, reset = None, None
    for line in reversed(read_tail(path, API_SCAN_BYTES).splitlines()):
        event = json_object(line) or {}
        if event.get("type") == "orchestra" and event.get("event") == "launch":
            break
        if event.get("type") == "result" and result is None:
            result = event
        info = event.get("rate_limit_info") if event.get("type") == "rate_limit_event" else None
        if (
            isinstance(info, dict)
            and reset is None
            and info.get("status") not in ("allowed", "allowed_warning")
        ):
            reset = epoch_seconds(info.get("resetsAt"))
    return result, reset


def epoch_seconds(value):
    """A Unix time given in seconds or milliseconds (CLI versions differ), as seconds; None if not a number."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return value / 1000 if value > 1e11 else float(value)


def last_api_failure(path):
    """(reason, reset time or None, message) when the last run ended on an API error worth waiting out."""
    result, reset = last_run_result(path)
    if not result or not (result.get("is_error") or result.get("subtype") != "success"):
        return None
    reason = api_error_reason(result)
    if reason is None:
        return None
    reset = reset or usage_reset_time(result.get("result") or "")
    return reason, reset, one_line(result.get("result") or reason)


def api_error_reason(result):
    """'rate_limit', 'usage_limit', 'overloaded', 'server_error' or 'network' for an error result; else None.

    What 2.1.331 writes: api_error_status 429 / api_error_type rate_limit_error; 529 /
    overloaded_error; api_error "connection_failed" with status null for a network failure.
    """
    status, kind = result.get("api_error_status"), result.get("api_error_type") or ""
    text = result.get("result") if isinstance(result.get("result"), str) else ""
    if USAGE_LIMIT_RE.search(text):
        return "usage_limit"
    if status == 429 or kind == "rate_limit_error":
        return "rate_limit"
    if status == 529 or kind == "overloaded_error":
        return "overloaded"
    if isinstance(status, int) and status >= 500:
        return "server_error"
    if status is None and (result.get("api_error") or text.startswith("API Error: Connection")):
        return "network"
    return None


def usage_reset_time(text, now=None):
    """The reset time a usage-limit message gives ("...|<unix time>", "resets 3pm (Europe/Paris)"), or None."""
    match = USAGE_RESET_RE.search(text)
    if match:
        return float(match.group(1))
    clock = USAGE_RESET_CLOCK_RE.search(text)
    if not clock:
        return None
    hour, minute, half = (
        int(clock.group(1)),
        int(clock.group(2) or 0),
        (clock.group(3) or "").lower(),
    )
    if (half and not 1 <= hour <= 12) or hour > 23 or minute > 59:
        return None
    hour = hour % 12 + (12 if half == "pm" else 0) if half else hour
    return next_clock_time(hour, minute, clock.group(4), time.time() if now is None else now)


def next_clock_time(hour, minute, zone_name, now):
    """The next Unix time at hour:minute in a named time zone (the local one when unknown)."""
    import datetime  # here: only a usage-limit message needs it

    zone = None
    with contextlib.suppress(Exception):  # no zoneinfo before 3.9 or no tz database: local time
        from zoneinfo import ZoneInfo

        zone = ZoneInfo(zone_name) if zone_name else None
    current = (
        datetime.datetime.fromtimestamp(now, zone) if zone else datetime.datetime.fromtimestamp(now)
    )
    reset = current.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if reset <= current:
        reset += datetime.timedelta(days=1)
    return reset.timestamp()


def backoff_seconds(attempt, base, cap, jitter=None):
    """base, 2 x base, 4 x base... per attempt, stretched by up to API_JITTER, never above cap."""
    jitter = random.random() if jitter is None else jitter
    return min(cap, base * 2 ** (attempt - 1) * (1 + API_JITTER * jitter))


def plan_wait(record, failure, now):
    """Turn a record whose run failed on the API into a waiting one; False when retries are used up."""
    reason, reset, message = failure
    attempt, limit = (record.get("api_attempts") or 0) + 1, resilience_setting(
        record, "api_retries"
    )
    if attempt > limit:
        record["error"] = f"{record['error']} (gave up after {limit} API retries)"
        return False
    delay = backoff_seconds(
        attempt,
        resilience_setting(record, "api_backoff"),
        resilience_setting(record, "api_backoff_max"),
    )
    until = reset if reset and reset > now else now + delay
    waiting = {"reason": reason, "until": utc_iso(until), "attempt": attempt, "message": message}
    clock = time.strftime("%H:%M:%S", time.gmtime(until))
    record.update(
        state="waiting",
        waiting=waiting,
        api_attempts=attempt,
        error=None,
        finished_at=None,
        activity=f"{reason.replace('_', ' ')}: retrying at {clock} UTC (attempt {attempt} of {limit})",
    )
    append_event(record["log"], {"event": "waiting", **waiting})
    return True


def account_wait(state, now):
    """The Unix time until which the account is rate- or usage-limited (no new starts), or None.

    The account is shared by every host: a wait on any of them counts (a remote agent's
    `waiting` comes home while its record here stays active), and a host keeps the hold home
    sends it with each poll (`hold_until`).
    """
    untils = [
        parse_iso(r["waiting"]["until"])
        for r in state["agents"].values()
        if r["state"] in ACTIVE_STATES
        and (r.get("waiting") or {}).get("reason") in ACCOUNT_LIMIT_REASONS
    ]
    untils.append(parse_iso(state.get("hold_until")))
    latest = max((u for u in untils if u), default=None)
    return latest if latest and latest > now else None


def run_check(command, worktree, timeout, cancelled):
    """Run one check in the worktree: (exit code or None, output, 'timeout'|'cancelled'|None)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            command,
            shell=True,
            cwd=str(worktree),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            start_new_session=True,
        )
        deadline, next_look, why = (
            time.monotonic() + timeout,
            time.monotonic() + CHECK_STOP_POLL,
            None,
        )
        while not check_ended(proc):
            if time.monotonic() >= deadline:
                why = "timeout"
            elif time.monotonic() >= next_look:
                why, next_look = (
                    "cancelled" if cancelled() else None
                ), time.monotonic() + CHECK_STOP_POLL
            if why:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
        out.seek(0)
        output = out.read().decode("utf-8", "replace")
    return (None if why else proc.returncode), output, why


def check_ended(proc):
    """Wait up to CHECK_POLL for a check's process; True once it has ended. Ctrl-C here ends
    the check's whole process group before it propagates (`land` runs checks in the foreground)."""
    try:
        proc.wait(CHECK_POLL)
    except subprocess.TimeoutExpired:
        return False
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return True


def fix_prompt(checks):
    """What a fix round tells the agent: the failing command and the end of its output."""
    code = "timed out" if checks["exit_code"] is None else f"status {checks['exit_code']}"
    return FIX_PROMPT.format(
        command=checks["command"], exit_code=code, tail=checks["tail"] or "(no output)"
    )


def assign_batch(project, records, budget):
    """Give newly spawned agents one batch id, and the batch its budget; the id."""

    def change(state):
        batches = state.setdefault("batches", {})
        batch_id = unique_id(time.strftime(BATCH_ID_FORMAT, time.gmtime()), set(batches))
        batches[batch_id] = {"budget": budget, "created_at": utc_iso()}
        for record in records:
            state["agents"][record["id"]]["batch"] = record["batch"] = batch_id
        return batch_id

    for record in records:  # for the spawn event: a state rebuilt from the logs keeps the batch
        record["batch_budget"] = budget
    return project.store.update(change)


def batch_spending(state):
    """{batch id: {"budget", "spent", "agents"}} of every batch."""
    totals = {
        bid: {"budget": info.get("budget"), "spent": 0.0, "agents": 0}
        for bid, info in (state.get("batches") or {}).items()
    }
    for record in state["agents"].values():
        if record.get("batch") in totals:
            totals[record["batch"]]["spent"] += record.get("cost_usd") or 0
            totals[record["batch"]]["agents"] += 1
    return totals


def over_budget(state):
    """{batch id: (spent, budget)} of batches that have spent their budget."""
    return {
        bid: (t["spent"], t["budget"])
        for bid, t in batch_spending(state).items()
        if t["budget"] is not None and t["spent"] >= t["budget"]
    }


def stop_for_budget(record, spent, budget):
    """Stop one active agent of a batch over budget; its (pid, start token) to end, or None."""
    _, process = request_stop(record)
    record.update(
        stop_reason="budget", activity=f"stopped: batch budget {format_cost(budget)} reached"
    )
    append_event(
        record["log"],
        {"event": "budget_stop", "batch": record.get("batch"), "spent": spent, "budget": budget},
    )
    return process if process[0] else None


def resilience_status(state, now=None):
    """The account's rate-limit wait and each batch's spending, for `status --json`."""
    until = account_wait(state, now or time.time())
    return {
        "rate_limited_until": utc_iso(until) if until else None,
        "batches": batch_spending(state),
    }


def state_label(record):
    """The state as status shows it: 'done ✓' when checks passed, 'done ✗' when they failed."""
    checks = (record.get("checks") or {}).get("status")
    if record["state"] == "done" and checks in ("passed", "failed"):
        return "done " + ("✓" if checks == "passed" else "✗")
    return record["state"]


def resilience_notes(state, records, now):
    """Lines under the status table: the account's rate limit and the batches' spending."""
    lines = []
    until = account_wait(state, now)
    if until:
        clock = time.strftime("%H:%M:%S", time.gmtime(until))
        lines.append(f"Rate-limited until {clock} UTC: no new agents start before then.")
    shown = {r.get("batch") for r in records}
    for batch_id, t in sorted(batch_spending(state).items()):
        if batch_id in shown and t["budget"] is not None:
            reached = "; reached, its agents were stopped" if t["spent"] >= t["budget"] else ""
            lines.append(
                f"Batch {batch_id}: spent {format_cost(t['spent'])} of {format_cost(t['budget'])}{reached}"
            )
    return lines


def render_resilience_event(event):
    """Readable lines for check, checks, fix_round, waiting and budget_stop events."""
    what = event.get("event")
    if what == "check":
        code = (
            f"timed out after {event.get('timeout')}s"
            if event.get("why") == "timeout"
            else f"exit {event.get('exit_code')}"
        )
        output = (event.get("output") or "").rstrip().splitlines()
        return [f"$ {event.get('command')}  (check, {code})", *(f"  {line}" for line in output)]
    if what == "checks":
        status = event.get("status")
        if status == "failed":
            return [f"== checks FAILED: {event.get('command')} (exit {event.get('exit_code')})"]
        return ["== checks started" if status == "running" else f"== checks {status}"]
    if what == "fix_round":
        return [
            f"== fix round {event.get('round')}: resumed the session to fix {event.get('command')}"
        ]
    if what == "waiting":
        return [
            f"== {event.get('reason')}: waiting until {event.get('until')} (attempt {event.get('attempt')})"
        ]
    if what == "budget_stop":
        return [
            f"== stopped: batch spent {format_cost(event.get('spent'))} of its {format_cost(event.get('budget'))} budget"
        ]
    return []


def checks_line(checks):
    """One line about a checks result: 'passed', 'failed: CMD (exit 1)', 'not run'."""
    if not checks:
        return "none configured"
    rounds = f" after {checks['rounds']} fix round(s)" if checks.get("rounds") else ""
    if checks["status"] == "failed":
        code = "timed out" if checks["exit_code"] is None else f"exit {checks['exit_code']}"
        return f"failed: {checks['command']} ({code}){rounds}"
    return f"{checks['status']}{rounds}"


def checks_markdown(checks):
    """The checks paragraph of a pull request body ('' when none ran)."""
    if not checks:
        return ""
    text = f"\n\nChecks: {checks_line(checks)}."
    if checks["status"] == "failed" and checks.get("tail"):
        text += f"\n\n```\n{checks['tail']}\n```"
    return text


def gate_on_checks(records, override):
    """(records to merge, [{id, reason}] left out): only agents whose checks passed or had none."""
    chosen, skipped = [], []
    for record in records:
        checks = record.get("checks")
        configured = resilience_setting(record, "checks")
        if override or (checks or {}).get("status") == "passed" or (not checks and not configured):
            chosen.append(record)
        else:
            skipped.append(
                {
                    "id": record["id"],
                    "reason": f"checks {checks_line(checks or {'status': 'not run'})}",
                }
            )
    return chosen, skipped


class Resilience:
    """The supervisor's part in checks, fix rounds, API waits and budgets.

    Given what it works with: the state store, the supervisor's `queue` (facts for the next
    state write) and `announce` (notify_command), the event that says the supervisor is
    stopping, and `stop_elsewhere(record)`, which has an agent's host end it (a budget is
    the whole fleet's: the cost of remote agents comes home in their logs). It owns the
    agents whose checks are due.
    """

    def __init__(self, store, queue, announce, stopping, stop_elsewhere=None):
        self.store = store
        self.queue = queue
        self.announce = announce
        self.stopping = stopping
        self.stop_elsewhere = stop_elsewhere
        # agent id -> record whose checks review() asked for; its thread pops it
        self.due_checks = {}

    def review(self, record):
        """Right after an agent's process ends (under the state lock): wait out an API error, or check it."""
        configured = resilience_setting(record, "checks")
        if record["state"] == "failed":
            failure = last_api_failure(record["log"])
            if failure and plan_wait(record, failure, time.time()):
                return
        if record["state"] == "done":
            record["api_attempts"] = 0
            if configured:
                rounds = (record.get("checks") or {}).get("rounds") or 0
                record["checks"] = {
                    "status": "running",
                    "command": None,
                    "exit_code": None,
                    "tail": None,
                    "rounds": rounds,
                }
                first = one_line(f"checks: {configured[0]}")
                record.update(state="running", finished_at=None, activity=first)
                append_event(record["log"], {"event": "checks", **record["checks"]})
                self.due_checks[record["id"]] = dict(record)
        elif configured and not record.get("checks") and record["state"] in FINISHED_STATES:
            record["checks"] = {
                "status": "not run",
                "command": None,
                "exit_code": None,
                "tail": None,
                "rounds": 0,
            }

    def run_due_checks(self, agent_id):
        """In the agent's watcher thread: run its checks if review() asked for them."""
        record = self.due_checks.pop(agent_id, None)
        if record:
            self.run_checks(record)

    def check_cancelled(self, agent_id):
        """True once the supervisor is stopping or the agent was stopped while its checks ran."""
        if self.stopping.is_set():
            return True
        record = self.store.load()["agents"].get(agent_id)
        return not record or record["state"] != "running"

    def run_checks(self, record):
        """Run every check in the agent's worktree, stop at the first failure, and conclude."""
        agent_id, rounds = record["id"], record["checks"]["rounds"]
        result = {"status": "passed", "command": None, "exit_code": 0, "tail": "", "rounds": rounds}
        timeout = resilience_setting(record, "check_timeout")
        for index, command in enumerate(resilience_setting(record, "checks")):
            if index:  # review() named the first command already
                self.queue(agent_id, {"activity": one_line(f"checks: {command}")})
            code, output, why = run_check(
                command, record["worktree"], timeout, lambda: self.check_cancelled(agent_id)
            )
            if why == "cancelled":
                return  # stopped, or the supervisor is exiting (the next one runs the checks again)
            append_event(
                record["log"],
                {
                    "event": "check",
                    "command": command,
                    "exit_code": code,
                    "why": why,
                    "timeout": timeout,
                    "output": output[-CHECK_OUTPUT_LIMIT:],
                },
            )
            if code != 0:
                tail = (
                    tail_text(output, CHECK_TAIL_CHARS)
                    if why is None
                    else f"timed out after {timeout}s"
                )
                result = {
                    "status": "failed",
                    "command": command,
                    "exit_code": code,
                    "tail": tail,
                    "rounds": rounds,
                }
                break
        concluded = self.store.update(
            lambda state: self.conclude_checks(state["agents"][agent_id], result)
        )
        if concluded:
            self.announce(concluded)  # notify_command hears "done" only once the checks have run

    def conclude_checks(self, record, result):
        """Record the checks outcome; on failure with fix rounds left, resume the session to fix it.

        Returns a copy of the record once it is done (None while a fix round or a stop is under way).
        """
        if record["state"] != "running":
            return None  # stopped while the checks ran
        wants_fix = result["status"] == "failed" and result["rounds"] < resilience_setting(
            record, "fix_rounds"
        )
        if (
            wants_fix
            and record.get("session_id")
            and is_claude_command(record["launch"]["agent_command"])
        ):
            result = dict(result, rounds=result["rounds"] + 1)
            record["checks"] = result
            append_event(record["log"], {"event": "checks", **result})
            append_event(
                record["log"],
                {"event": "fix_round", "round": result["rounds"], "command": result["command"]},
            )
            queue_session(
                record, fix_prompt(result), f"fix round {result['rounds']}: waiting for a free slot"
            )
            return None
        record["checks"] = result
        append_event(record["log"], {"event": "checks", **result})
        record.update(
            state="done", finished_at=utc_iso(), activity=one_line(f"checks {checks_line(result)}")
        )
        return dict(record)

    def hold_starts(self, state):
        """Each pass: enforce batch budgets, wake agents whose wait is over; True while the account is limited."""
        now = time.time()
        self.enforce_budgets(state)
        self.wake_waiting(state, now)
        return account_wait(state, now) is not None

    def wake_waiting(self, state, now):
        """Queue the session of each waiting agent whose wait has ended ("Continue the task.")."""
        for record in state["agents"].values():
            if (
                record["state"] != "waiting"
                or (parse_iso((record.get("waiting") or {}).get("until")) or 0) > now
            ):
                continue
            attempt = record["waiting"].get("attempt")
            record["waiting"] = None
            try:
                queue_session(
                    record, RESUME_PROMPT, f"resuming after the API wait (attempt {attempt})"
                )
            except OrchestraError as e:
                record.update(state="failed", error=str(e), finished_at=utc_iso())
                note_settlement(record)

    def enforce_budgets(self, state):
        """Stop the queued and active agents of every batch that has spent its budget."""
        for batch_id, (spent, budget) in over_budget(state).items():
            for record in state["agents"].values():
                if record.get("batch") != batch_id or record["state"] not in ACTIVE_STATES:
                    continue
                if (
                    record["state"] == "running"
                    and (record["pid"] or record.get("host_launched"))
                    and last_run_result(record["log"])[0]
                ):
                    continue  # it has finished and is exiting: its watcher settles it as it ended
                process = stop_for_budget(record, spent, budget)
                if record.get("host_launched") and self.stop_elsewhere:  # Hosts: its host ends it
                    self.stop_elsewhere(dict(record))
                if process:  # ending a process may take STOP_GRACE: never under the state lock
                    threading.Thread(
                        target=stop_process,
                        args=process,
                        name=f"budget-stop-{record['id']}",
                        daemon=True,
                    ).start()


# ======================================================================================
# Hosts
# --------------------------------------------------------------------------------------
# Other machines, reached with ssh and git only: nothing new listens on any port. A host is
# a name in the `hosts` setting; the local machine is `local`. orchestra copies itself to a
# host once per content hash (<workdir>/bin/<hash>/orchestra.py), pushes the agent's base
# commit into the host's copy of the repository (`git push` over ssh) and runs `host-agent
# spawn` there, so the host's own supervisor runs the agent and it survives a dropped link.
# Every remote command is an argv list joined with shlex.join, never text pasted into a
# shell; payloads (the task, forwarded environment variables) travel as JSON on stdin. The
# local supervisor follows a remote agent by polling: the host's log is appended to the
# local log by byte offset, each chunk with a `host_offset` marker written in the same
# write, so a dropped link or a restarted supervisor neither loses nor doubles a line, and
# the local log stays the source of truth. The branch comes home with `git fetch`.
# ======================================================================================

HOSTS_WORKDIR = "~/.orchestra-hosts"
HOST_SSH_TIMEOUT = 10  # seconds ssh may take to connect
HOST_CALL_TIMEOUT = 300.0  # seconds one remote call may take (a push of a large repository)
HOST_CONTROL_PERSIST = 120  # seconds the shared ssh connection outlives its last use
HOST_POLL = 0.5  # seconds between tries of a host out of reach (polls pace: HOST_POLL_ROUND)
HOST_LOG_MIN_CHUNK = 64 * 1024  # bytes of one agent's log a poll may always fetch
HOST_FETCH_PATIENCE = (
    120.0  # seconds a settled agent's fetch home is retried while its host is away
)
HOST_PUSH_ATTEMPTS = 3
HOST_MIN_PYTHON = (3, 9)
HOST_MIN_FREE = 1024**3  # bytes free in a host's workdir below which doctor warns
HOST_SSH_FAILED = 255  # ssh's exit status when the connection itself failed
# Facts a remote agent's record gives the local one (the local log gives the rest).
HOST_RECORD_FACTS = ("commits", "files_changed", "checks", "waiting", "approval", "stop_reason")
# A small program run with the host's Python: its version and the free space of a folder.
HOST_PROBE = (
    "import os, shutil, sys; os.umask(0o077); p = sys.argv[1]; os.makedirs(p, 0o700, exist_ok=True); "
    "print(sys.version_info[0], sys.version_info[1], shutil.disk_usage(p).free)"
)
# Writes stdin to <folder>/orchestra.py (0600 in 0700 folders) unless it is there, whole, already:
# a file is kept only when its content hash is the folder's name (a full disk cuts writes short).
HOST_INSTALL = (
    "import hashlib, os, sys; os.umask(0o077); d, h = sys.argv[1], sys.argv[2]\n"
    "f = os.path.join(d, 'orchestra.py')\n"
    "def whole(p):\n"
    "    return os.path.exists(p) and hashlib.sha256(open(p, 'rb').read()).hexdigest()[:16] == h\n"
    "if not whole(f):\n"
    "    data = sys.stdin.buffer.read(); os.makedirs(d, 0o700, exist_ok=True); t = f + '.%d' % os.getpid()\n"
    "    try:\n"
    "        with open(t, 'wb') as out:\n"
    "            out.write(data); out.flush(); os.fsync(out.fileno())\n"
    "        os.replace(t, f)\n"
    "    except OSError as e:\n"
    "        os.path.exists(t) and os.unlink(t); sys.exit('cannot write %s: %s' % (f, e.strerror))\n"
    "    if not whole(f):\n"
    "        sys.exit('%s arrived damaged' % f)\n"
)

# Runs orchestra on a host as a module, so its cached bytecode is used (a script is compiled anew
# at every run, which costs more than the call itself).
HOST_IMPORT = (
    "import os, sys; os.umask(0o077); sys.path.insert(0, sys.argv.pop(1)); import orchestra; "
    "sys.exit(orchestra.main(sys.argv[1:]))"
)
# (ssh target, options, remote repository, source hash) this process has installed and prepared
PREPARED_HOSTS = set()
PREPARED_LOCK = threading.Lock()  # guards PREPARING
PREPARING = {}  # the key of PREPARED_HOSTS -> the lock its one preparation holds
SOURCE_HASH = []  # this file's content hash, computed once
# host name -> (time.monotonic() until which it gets no agents, why): this process's view
HOST_DOWN = {}
HOST_RETRY = 30.0  # seconds a host that failed to take an agent is given no new ones


class HostError(OrchestraError):
    """A host could not be reached or refused: status 1, the reason and what to do."""

    def __init__(self, message):
        super().__init__(message, EXIT_FAILURE)


class HostUnheard(HostError):
    """A call the host may have carried out before the link failed: ask it again, there only."""


def host_names(config):
    """Every host agents may run on: 'local' first, then the configured ones."""
    return ["local", *config["hosts"]]


def check_host_name(config, name):
    """A host name the config knows, or a clear error naming the known ones."""
    if name not in host_names(config):
        raise OrchestraError(
            f"unknown host '{name}'; known hosts: {', '.join(host_names(config))} "
            "(add one under 'hosts' in the config)"
        )
    return name


def host_limit(config, name):
    """How many agents may run on a host at once."""
    if name == "local":
        return config["max_parallel"]
    return config["hosts"][name].get("max_parallel", config["default_parallel"])


def control_folder():
    """Where the shared ssh connections' sockets live: short paths, readable by us alone."""
    folder = Path(tempfile.gettempdir()) / f"orchestra-ssh-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or stat.S_IMODE(folder.stat().st_mode) != 0o700:
        raise HostError(f"{folder} is not private to you; remove it and try again")
    return folder


def source_hash():
    """The content hash of this very file: a host runs exactly the version that talks to it."""
    if not SOURCE_HASH:
        SOURCE_HASH.append(hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16])
    return SOURCE_HASH[0]


class Host:
    """One configured host: its ssh command line, its work folder and calls into its orchestra."""

    def __init__(self, name, settings):
        self.name = name
        self.target = settings["ssh"]
        self.options = list(settings.get("ssh_options", ()))
        self.python = settings.get("python", "python3")
        self.env_names = list(settings.get("env", ()))
        workdir = settings.get("workdir", HOSTS_WORKDIR)
        # ssh starts commands in the remote home: '~/x' is simply 'x' (quoted, '~' would not expand)
        self.workdir = workdir[2:] or "." if workdir.startswith("~/") else workdir

    @classmethod
    def named(cls, config, name):
        """The configured host called `name`."""
        check_host_name(config, name)
        return cls(name, config["hosts"][name])

    def ssh_command(self):
        """ssh with one shared (multiplexed) connection per host, then the host's own options."""
        return [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={HOST_SSH_TIMEOUT}",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={control_folder()}/%C",
            "-o",
            f"ControlPersist={HOST_CONTROL_PERSIST}",
            *self.options,
        ]

    def run(self, argv, data=b"", timeout=HOST_CALL_TIMEOUT):
        """Run argv on the host (quoted with shlex.join: never interpreted by its shell)."""
        try:
            return subprocess.run(
                [*self.ssh_command(), self.target, shlex.join(argv)],
                input=data,
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise HostError(
                f"host '{self.name}' did not answer within {timeout:.0f}s; check it with "
                f"'orchestra doctor --host {self.name}'"
            ) from None
        except OSError as e:
            raise HostError(
                f"cannot run ssh for host '{self.name}': {e}; install openssh-client"
            ) from None

    def connect_soon(self):
        """Open the shared ssh connection in the background (a `true` run there), so the first
        real call finds it up; a host out of reach says so later, when it is called."""
        with contextlib.suppress(OSError, HostError):
            subprocess.Popen(
                [*self.ssh_command(), self.target, "true"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )

    def failure(self, done, doing):
        """The error for a failed remote command: unreachable, or what the host said."""
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        said = (
            one_line(lines[-1][-TAIL_CHARS:]) if lines else "no message"
        )  # the last line says why
        if done.returncode == HOST_SSH_FAILED:
            return HostError(
                f"host '{self.name}' is unreachable over ssh ({said}); check 'ssh {self.target}' works "
                "without a password prompt"
            )
        if done.returncode == EXIT_USAGE:  # the host's orchestra refused the request itself
            return OrchestraError(f"host '{self.name}' could not {doing}: {said}", EXIT_FAILURE)
        return HostError(f"host '{self.name}' could not {doing}: {said}")

    def probe(self):
        """(Python version, free bytes in the workdir) of the host; a HostError if it cannot tell."""
        done = self.run([self.python, "-c", HOST_PROBE, self.workdir], timeout=HOST_SSH_TIMEOUT * 3)
        if done.returncode != 0:
            if done.returncode == 127 or b"not found" in done.stderr:
                raise HostError(
                    f"host '{self.name}' has no '{self.python}'; install Python 3.9 or newer there "
                    "(apt-get install python3) or set its 'python'"
                )
            raise self.failure(done, "run Python")
        major, minor, free = (int(x) for x in done.stdout.split()[:3])
        return (major, minor), free

    def install(self):
        """Copy this file to the host once per content hash; the folder that holds it there."""
        folder = f"{self.workdir}/bin/{source_hash()}"
        done = self.run(
            [self.python, "-c", HOST_INSTALL, folder, source_hash()],
            data=Path(__file__).read_bytes(),
        )
        if done.returncode != 0:
            raise self.failure(done, f"store orchestra.py in {folder} (is its disk full?)")
        return folder

    def call(self, action, payload, timeout=HOST_CALL_TIMEOUT):
        """Run `orchestra host-agent ACTION` on the host with a JSON payload on stdin; its JSON answer."""
        folder = f"{self.workdir}/bin/{source_hash()}"
        argv = [self.python, "-c", HOST_IMPORT, folder, "host-agent", action]
        done = self.run(argv, json.dumps(payload).encode(), timeout)
        if done.returncode != 0 and b"No module named 'orchestra'" in done.stderr:
            self.install()
            done = self.run(argv, json.dumps(payload).encode(), timeout)
        if done.returncode != 0:
            raise self.failure(done, f"run '{action}'")
        try:
            return json.loads(done.stdout)
        except ValueError:
            raise HostError(
                f"host '{self.name}' answered '{action}' with something not JSON"
            ) from None

    def git_env(self):
        """The environment that makes git reach the host through the same shared connection."""
        return {**os.environ, "GIT_SSH_COMMAND": shlex.join(self.ssh_command())}

    def git_url(self, path):
        """The git URL of a path on the host (relative paths start in the remote home)."""
        if self.target.startswith("ssh://"):
            return f"{self.target.rstrip('/')}/{path if path.startswith('/') else '~/' + path}"
        return f"{self.target}:{path}"

    def repo_path(self, repo):
        """Where this repository's copy lives on the host: one per local repository."""
        key = hashlib.sha256(str(repo).encode()).hexdigest()[:12]
        return f"{self.workdir}/repos/{slugify(repo.name) or 'repo'}-{key}"


def connect_hosts_soon(config, pinned):
    """Open the ssh connections of the hosts new agents may go to (their pinned hosts, or every
    host for agents the supervisor places), while the supervisor starts."""
    names = set(config["hosts"]) if None in pinned else pinned - {"local"}
    for name in sorted(names):
        Host.named(config, name).connect_soon()


def host_doctor(config, name):
    """(name, ok, detail) for each thing a host needs, stopping at the first that blocks the rest."""
    host = Host.named(config, name)
    try:
        version, free = host.probe()
    except HostError as e:
        return [("ssh", False, str(e))]
    checks = [("ssh", True, f"reached {host.target}")]
    python_ok = version >= HOST_MIN_PYTHON
    checks.append(
        (
            "python",
            python_ok,
            f"{host.python} {version[0]}.{version[1]}"
            + ("" if python_ok else "; orchestra needs Python 3.9 or newer there"),
        )
    )
    checks.append(
        (
            "disk",
            free >= HOST_MIN_FREE,
            f"{free / 1024**3:.1f} GiB free in {host.workdir}"
            + ("" if free >= HOST_MIN_FREE else "; free some space on the host"),
        )
    )
    if not python_ok:
        return checks
    try:
        host.install()
        remote = host.call("doctor", {})
    except HostError as e:
        return [*checks, ("orchestra", False, str(e))]
    return checks + [
        (c["name"], c["ok"], c["detail"]) for c in remote["checks"] if c["name"] != "gh"
    ]


def hosts_overview(project):
    """Each host's slots, running agents and (for remote hosts) whether ssh reaches it now."""
    config = project.config
    rows = fleet_overview(config, project.store.load())
    for row in rows:
        row.update(ssh=None, reachable=True, error=None)
        if row["name"] == "local":
            continue
        host = Host.named(config, row["name"])
        row["ssh"] = host.target
        try:
            host.probe()
            row.update(unreachable_since=None, why=None)
        except HostError as e:
            row.update(reachable=False, error=str(e), why=str(e))
    return rows


def fleet_overview(config, state):
    """Each machine as the dashboard and `status --json` show it, from the state alone (no ssh):
    slots, how many are used and free, the agents running there or queued there, and whether
    home reaches it (what its supervisor last saw, and what its agents' followers see)."""
    rows = []
    counts = host_counts(state)
    for name in host_names(config):
        here = [
            r
            for r in state["agents"].values()
            if (r.get("host") or "local") == name
            and r["state"] in ("running", "paused")
            and not r.get("host_released")
        ]
        slots = config.parallel_limit(state.get("parallel")) if name == "local" else None
        slots = slots or host_limit(config, name)
        used = counts.get(name, 0) - sum(bool(r.get("host_queued")) for r in here)
        lost = [r["host_unreachable"] for r in here if r.get("host_unreachable")]
        seen = (state.get("host_reach") or {}).get(name)
        if seen and seen.get("unreachable_since"):
            lost.append({"since": seen["unreachable_since"], "why": seen.get("why")})
        first = min(lost, key=lambda x: x["since"]) if lost else None
        rows.append(
            {
                "name": name,
                "slots": slots,
                "used": used,
                "free": max(0, slots - used),
                "running": [r["id"] for r in here if not r.get("host_queued")],
                "queued_there": [r["id"] for r in here if r.get("host_queued")],
                "reachable": first is None,
                "unreachable_since": first and first["since"],
                "why": first and first["why"],
            }
        )
    return rows


def place_agent(config, free, pinned=None):
    """The host for the next agent (None: no free slot). free: host -> slots free now.

    A pinned agent waits for its own host. local-first fills this machine, then the hosts in
    config order; spread takes the host with the most free slots (ties: config order, local first).
    """
    if pinned:
        return pinned if free.get(pinned, 0) > 0 else None
    open_hosts = [name for name in host_names(config) if free.get(name, 0) > 0]
    if not open_hosts:
        return None
    if config["placement"] == "spread":
        return max(open_hosts, key=lambda name: free[name])
    return open_hosts[0]


def queue_ahead(config, name):
    """How many agents a host is given beyond its slots, to queue there: its own supervisor
    starts the next the moment one ends, with no round trip home. As many as its slots."""
    return host_limit(config, name)


def host_counts(state):
    """How many agents run (or hold a slot) on each host: one whose run ended there while its
    branch comes home holds none (see release_host_slot)."""
    counts = {}
    for r in state["agents"].values():
        if r.get("host_released"):
            continue
        if r["state"] in ("running", "paused") or (r["state"] == "waiting" and r.get("host")):
            name = r.get("host") or "local"
            counts[name] = counts.get(name, 0) + 1
    return counts


def forwarded_env(host, env):
    """The variables named in the host's `env` that are set here: nothing else crosses."""
    return {k: env[k] for k in host.env_names if k in env}


def log_offset_of(path, host_name):
    """How many bytes of the host's log the local log already holds (its last host_offset)."""
    offset = 0
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        for line in f:
            if b'"host_offset"' in line:
                event = json_object(line)
                if event and event.get("event") == "host_offset" and event.get("host") == host_name:
                    offset = int(event.get("offset") or 0)
    return offset


def relayed_lines(chunk):
    """A remote log's complete lines as the local log keeps them: the host's own spawn event
    is left out (the local one is the agent's), and no remote process id is kept."""
    kept = []
    for line in chunk.split(b"\n"):
        if b'"orchestra"' in line:
            event = json_object(line)
            if event and event.get("type") == "orchestra":
                if event.get("event") == "spawn":
                    continue
                if "pid" in event or "pid_start" in event:
                    line = json_text(
                        {k: v for k, v in event.items() if k not in ("pid", "pid_start")}
                    ).encode()
        kept.append(line + b"\n")
    return b"".join(kept)


def append_remote_chunk(path, chunk, host_name, new_offset):
    """Append a remote chunk and its offset marker in one write, so both land or neither does."""
    marker = {"type": "orchestra", "event": "host_offset", "host": host_name, "offset": new_offset}
    data = relayed_lines(chunk) + (json_text(marker) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def is_remote(record):
    """True for an agent placed on (or pinned to) another host."""
    return record.get("host") not in (None, "local")


def on_host(record):
    """True for an agent launched on another host: its host acts on it (stop, pause, send...)."""
    return is_remote(record) and bool(record.get("host_launched"))


def hosts_down():
    """The hosts that failed to take an agent a moment ago: they get none for a while."""
    return {name for name, (until, _) in HOST_DOWN.items() if until > time.monotonic()}


def end_of_queue(config, counts, local_free, waiting, ahead):
    """When fewer agents wait than the fleet has slots, cut each host's room to queue ahead to
    its share of what is left, in proportion to its slots: this machine keeps its share, to
    start as its own slots free, and every machine's last agents end about together."""
    down = hosts_down()
    limits = {name: host_limit(config, name) for name in config["hosts"] if name not in down}
    slots = local_free + counts.get("local", 0) + sum(limits.values())
    if waiting >= slots:
        return
    queued_there = {name: max(0, counts.get(name, 0) - limits[name]) for name in limits}
    left = waiting + sum(queued_there.values())
    for name in limits:
        ahead[name] = min(ahead[name], left * limits[name] // slots - queued_there[name])


def place_each(config, records, free, ahead, evenly=False):
    """(record, host) for those of the records a host with room in `free` takes (each taken
    place is taken from `ahead` too); evenly: the host with the most room, whatever the placement.
    """
    chosen = []
    for record in records:
        roomy = [name for name in free if free[name] > 0]
        if evenly and roomy and not record.get("host"):
            host = max(roomy, key=lambda name: free[name])
        else:
            host = place_agent(config, free, record.get("host"))
        if host is None or (host == "local" and not record.get("ready")):
            continue
        free[host] -= 1
        if host in ahead:
            ahead[host] -= 1
        chosen.append((record, host))
    return chosen


def placements(config, state, local_free):
    """(record, host) for each queued agent that can start now, oldest first.

    A pinned agent waits for its own host. An agent goes to `local` only once its worktree is
    ready (spawn or the supervisor makes it); a host needs no local worktree. Once every slot
    is taken, hosts are given more to queue there (queue_ahead), evenly; at the end of the
    queue only their share of what is left (end_of_queue), the rest waits for the first slot.
    """
    counts = host_counts(state)
    free = {"local": local_free}
    free.update({name: host_limit(config, name) - counts.get(name, 0) for name in config["hosts"]})
    ahead = {name: free[name] + queue_ahead(config, name) for name in config["hosts"]}
    for name in hosts_down():
        free[name] = ahead[name] = 0  # it failed to take an agent: none for a while
    queued = sorted(
        (r for r in state["agents"].values() if r["state"] == "queued"), key=spawn_order
    )
    placeable = [
        r for r in queued if r.get("ready") or (r.get("worktree_later") and not r.get("preparer"))
    ]
    chosen = place_each(config, placeable, free, ahead)
    placed = {id(record) for record, _ in chosen}
    budgets = {
        b for b, info in (state.get("batches") or {}).items() if info.get("budget") is not None
    }
    # an agent whose batch has a budget starts only once home has checked it (not queued ahead)
    rest = [r for r in placeable if id(r) not in placed and r.get("batch") not in budgets]
    end_of_queue(config, counts, local_free, len(rest), ahead)
    return chosen + place_each(config, rest, ahead, {}, evenly=True)


def release_host_slot(record):
    """A remote agent that has settled on its host frees its slot there at once, while its
    branch is still being fetched home (settle_remote, or a new run, takes the mark away)."""
    if record["state"] in ACTIVE_STATES:
        record["host_released"] = True


def relay_to_host(project, record, action, message=None, env=None):
    """Have a remote agent's host stop, pause, resume or message it (its supervisor acts there)."""
    agent = RemoteAgent(project, record)
    payload = {"repo": agent.remote_repo, "id": record["id"], "action": action, "message": message}
    payload["env"] = forwarded_env(agent.host, os.environ if env is None else env)
    return agent.host.call("signal", payload)["outcome"]


def requeue_from_host(record, problem):
    """An agent its host could not take: queued again, for its pinned host or any other."""
    ready = Path(record["worktree"]).is_dir()
    record.update(
        state="queued",
        host=record.get("pinned"),
        ready=ready,
        worktree_later=not ready,
        started_at=None,
        activity=f"waiting for a host: {problem}",
    )


def continue_on_host(record):
    """A settled remote agent whose host now continues its session: followed again from home."""
    record.update(
        state="queued",
        ready=True,
        host_launched=True,
        pid=None,
        finished_at=None,
        error=None,
        host_released=None,
        activity=f"continuing its session on host {record['host']}",
    )


def fetch_home_patiently(agent, stopping):
    """Fetch a settled agent's branch home, retrying while its host is out of reach; None, or
    why it could not be fetched (diff and collect try again)."""
    deadline = time.monotonic() + HOST_FETCH_PATIENCE
    while True:
        try:
            agent.fetch_home()
            return None
        except HostError as e:
            problem = f"its branch could not be fetched home yet: {e}"
        except OrchestraError as e:
            return f"its branch could not be fetched home: {e}"
        if time.monotonic() > deadline or stopping.wait(HOST_POLL):
            return problem


def settle_remote(record, log, remote, problem):
    """Write a remote agent's final record from the local log and the host's last word."""
    record.update(pid=None, stale=False, host_unreachable=None, host_released=None)
    if log is None:  # it never started there
        record.update(state="failed", error=problem, finished_at=utc_iso())
        note_settlement(record)
        return
    record.update(without_none(log.facts))
    remote = remote or {
        "state": "interrupted",
        "error": f"host '{record['host']}' no longer knows this agent",
    }
    record.update({k: remote.get(k) for k in HOST_RECORD_FACTS if remote.get(k) is not None})
    if record["state"] in ("running", "paused"):
        record["state"] = remote["state"]
    record.update(
        exit_code=remote.get("exit_code"), finished_at=remote.get("finished_at") or utc_iso()
    )
    record["error"] = "; ".join(e for e in (remote.get("error"), problem) if e) or None
    note_settlement(record)


class RemoteAgent:
    """One agent on a host, seen from home: launch it there, poll it, bring its branch home."""

    def __init__(self, project, record, session=None):
        self.project = project
        self.record = record
        self.host = Host.named(project.config, record["host"])
        self.call = (session or self.host).call  # the supervisor's HostSession, else one ssh each
        self.remote_repo = self.host.repo_path(project.repo)
        self.offset = log_offset_of(project.log_path(record["id"]), self.host.name)
        self.limit = HOST_LOG_MIN_CHUNK  # bytes of its log the next poll may bring
        self.mirrored = {}  # request id -> the host's approval request, as mirrored at home

    def spawn_request(self, env):
        """What the host's `spawn` needs to start this agent under home's settings."""
        record, config = self.record, self.project.config
        launch = dict(record["launch"])
        settings = {k: launch[k] for k in LAUNCH_KEYS if k in launch}
        settings.update({k: launch[k] for k in RESILIENCE_KEYS if k in launch})
        settings.update(
            branch_prefix=config["branch_prefix"],
            max_parallel=host_limit(config, self.host.name),
            default_parallel=host_limit(config, self.host.name),
            sandbox=config["sandbox"],
        )
        return {
            "id": record["id"],
            "task": record["task"],
            "base": record["base_commit"],
            "config": settings,
            "env": forwarded_env(self.host, env or {}),
        }

    def prepare_host(self):
        """Make the host ready for the agent, once each: orchestra copied there, the repository's
        copy made and its supervisor started, and the agent's base commit pushed."""
        ready = (self.host.target, tuple(self.host.options), self.remote_repo, source_hash())
        with PREPARED_LOCK:
            preparing = PREPARING.setdefault(ready, threading.Lock())
        with preparing:  # the agents placed at once wait for one preparation, not make four
            if ready not in PREPARED_HOSTS:  # once per host and repository in this process
                settings = self.spawn_request(None)["config"]  # its supervisor runs under them
                self.call("prepare", {"repo": self.remote_repo, "config": settings})
                PREPARED_HOSTS.add(ready)
            base = f"refs/orchestra/base/{self.record['base_commit']}"
            if (*ready, base) not in PREPARED_HOSTS:  # each base commit goes to a host once
                self.push_base(base)
                PREPARED_HOSTS.add((*ready, base))

    def push_base(self, ref):
        """Push the base commit into the host's repository (retried: a push can race with the
        host's own worktree changes there)."""
        for attempt in range(HOST_PUSH_ATTEMPTS):
            try:
                run_git(
                    [
                        "push",
                        "--quiet",
                        "--force",
                        self.host.git_url(self.remote_repo),
                        f"{self.record['base_commit']}:{ref}",
                    ],
                    self.project.repo,
                    env=self.host.git_env(),
                )
                return
            except GitError as e:
                if attempt + 1 == HOST_PUSH_ATTEMPTS:
                    raise HostError(f"host '{self.host.name}': {e}") from None
                time.sleep(HOST_POLL)

    def take(self, answer):
        """Append the log bytes a poll brought (whole lines only) and mirror its approval
        requests; (the remote record or None if the host lost the agent, more to fetch)."""
        data = base64.b64decode(answer.get("data") or "")
        complete = data[: data.rfind(b"\n") + 1]  # whole lines only: the rest comes next time
        if complete:
            append_remote_chunk(
                self.project.log_path(self.record["id"]),
                complete[:-1],
                self.host.name,
                self.offset + len(complete),
            )
            self.offset += len(complete)
        self.mirror_requests(answer.get("approvals") or [])
        more = bool(answer.get("more"))
        # a line longer than a whole chunk: ask for twice as much until it fits
        self.limit = len(data) * 2 if more and not complete else HOST_LOG_MIN_CHUNK
        return answer.get("record"), more

    def mirror_requests(self, asked):
        """Show the host's approval requests at home (approvals, dashboard, notify_command) and
        send home's decisions back while the agent waits. Home's supervisor stands in for the
        host's hook: a mirrored request lives as long as this process follows the agent."""
        box = ApprovalBox(self.project.repo)
        for request in asked:
            if request["id"] in self.mirrored:
                continue
            for folder in (box.decisions, box.answered, box.rules_dir):
                folder.mkdir(parents=True, exist_ok=True)
            mirror = {
                **request,
                "host": self.host.name,
                "pid": os.getpid(),
                "parent": None,
                "pid_start": process_start_time(os.getpid()),
            }
            write_atomic(
                box.dir / f"{request['id']}.json", box.signed("request", request["id"], mirror)
            )
            self.mirrored[request["id"]] = mirror
            agent_id = self.record["id"]
            summary = request.get("summary")
            message = f"{agent_id} asks to run {summary} on host {self.host.name} (orchestra approve {request['id']})"
            notify(self.project.repo, agent_id, "approval", message)
        waiting = {r["id"] for r in asked}
        for req_id, mirror in list(self.mirrored.items()):
            decision = box.decision(req_id)
            if decision and req_id in waiting:
                self.host.call(
                    "answer", {"repo": self.remote_repo, "request": req_id, "decision": decision}
                )
            elif not decision and req_id in waiting:
                continue
            box.close(mirror, decision or {"decision": "deny", "by": f"host {self.host.name}"})
            del self.mirrored[req_id]

    def fetch(self, remote_ref, local_ref):
        """Fetch one ref of the host's repository into local_ref (moved, whatever it held)."""
        fetch = ["fetch", "--quiet", "--no-tags", self.host.git_url(self.remote_repo)]
        try:
            run_git(
                [*fetch, f"+{remote_ref}:{local_ref}"], self.project.repo, env=self.host.git_env()
            )
        except GitError as e:
            raise HostError(f"host '{self.host.name}': {e}") from None
        return local_ref

    def fetch_home(self):
        """Fetch the agent's branch home; the local worktree (made now if missing) follows it."""
        record = self.record
        # through a ref of its own: what git refuses here is git's word, not the host's
        temp = self.fetch(f"refs/heads/{record['branch']}", f"refs/orchestra/hosts/{record['id']}")
        worktree = Path(record["worktree"])
        if worktree.exists():
            run_git(["merge", "--ff-only", "--quiet", temp], worktree)
        else:
            run_git(["branch", "--force", record["branch"], temp], self.project.repo)
            with WORKTREE_REGISTER_LOCK:  # another add could read this one's half-written files
                run_git(
                    ["worktree", "add", "--quiet", str(worktree), record["branch"]],
                    self.project.repo,
                )
        run_git(["update-ref", "-d", temp], self.project.repo)

    def bring_leftovers_home(self):
        """Copy what the host's worktree holds uncommitted into the local worktree, unstaged
        changes and untracked files alike, so cleanup at home sees (and archives) them."""
        answer = self.host.call("leftovers", {"repo": self.remote_repo, "id": self.record["id"]})
        if not answer.get("ref"):
            return False
        temp = self.fetch(answer["ref"], f"refs/orchestra/hosts/{self.record['id']}-leftovers")
        run_git(["checkout", temp, "--", "."], self.record["worktree"])
        run_git(["reset", "--quiet"], self.record["worktree"])
        run_git(["update-ref", "-d", temp], self.project.repo)
        return True


def bring_home_for_cleanup(project, records):
    """Fetch remote agents' branches and uncommitted work home before cleanup judges them;
    {id: why it must stay} for those whose host cannot be reached (nothing there is judged)."""
    problems = {}
    for record in records:
        if not on_host(record) or record["state"] == "removed":
            continue
        agent = RemoteAgent(project, record)
        try:
            if record["state"] not in ACTIVE_STATES:
                agent.fetch_home()
                agent.bring_leftovers_home()
        except OrchestraError as e:
            problems[record["id"]] = f"its host could not be asked what it holds: {e}"
    return problems


def fetch_remote_branches(project, records):
    """Fetch remote agents' branches home now (diff, collect); why each that failed could not."""
    problems = []
    for record in records:
        if on_host(record) and record["state"] not in ("removed", "queued"):
            try:
                RemoteAgent(project, record).fetch_home()
            except OrchestraError as e:
                problems.append(f"{record['id']}: showing what is home; {e}")
    return problems


def remove_on_host(project, record):
    """After cleanup at home archived everything: remove the agent's worktree on its host."""
    agent = RemoteAgent(project, record)
    agent.host.call("cleanup", {"repo": agent.remote_repo, "id": record["id"]})


# ======================================================================================
# Hosts: sessions and polling
# --------------------------------------------------------------------------------------
# How home keeps up with its hosts cheaply. Every ssh call starts Python on the host, so the
# supervisor keeps one long-lived `host-agent serve` per host (HostSession) and asks it one
# JSON line at a time. A HostPoller polls each host once per round for all the agents
# followed there (their records, the log bytes after each one's offset, their approval
# requests) and hands each follower its part; the follower folds it into the agent's record.
# ======================================================================================

HOST_POLL_ROUND = 0.1  # seconds between a host's polls while its agents write (a line each way)
HOST_POLL_QUIET = 0.5  # ... growing to this, doubling each round, while nothing is new there
HOST_POLL_TIMEOUT = 30.0  # seconds one poll may take before the host counts as out of reach
HOST_SUPERVISOR_LINGER = 10.0  # seconds a host's supervisor, started early, waits for agents
HOST_POLLER_IDLE = 5.0  # seconds a host's poller thread waits for a follower before it ends
HOST_LOG_CHUNK = 512 * 1024  # bytes of remote logs fetched per poll, shared by its agents


class HostSession:
    """One long-lived `host-agent serve` on a host, asked one JSON line at a time.

    A call over ssh starts Python and imports orchestra on the host, a tenth of a second of its
    CPU each time; the supervisor's polls and launches share this one process per host
    instead, so a poll costs a line each way. A failure or a silence longer than the call's
    timeout ends the process (a dropped link, a restarted host); the next call starts another.
    """

    def __init__(self, host):
        self.host = host
        self.lock = threading.Lock()  # guards the process and its buffer: one request at a time
        self.proc, self.errors, self.buffer = None, None, bytearray()
        self.timed_out, self.ended_with = None, None  # how the last process ended

    def call(self, action, payload, timeout=HOST_CALL_TIMEOUT):
        """Run `host-agent ACTION` in the session; its JSON answer (errors as Host.call's)."""
        if os.name == "nt":  # no select() on pipes: one ssh call each
            return self.host.call(action, payload, timeout)
        with self.lock:
            answer = self.ask(action, payload, timeout)
            if answer is None and b"No module named 'orchestra'" in self.ended_with.stderr:
                self.host.install()
                answer = self.ask(action, payload, timeout)
        if answer is None:
            raise self.host.failure(self.ended_with, f"run '{action}'")
        if "error" in answer:  # the host's orchestra refused the request itself
            raise OrchestraError(
                f"host '{self.host.name}' could not run '{action}': {answer['error']}",
                EXIT_FAILURE,
            )
        return answer["answer"]

    def ask(self, action, payload, timeout):
        """One request and its answer line; None when the process ended (see ended_with)."""
        if self.proc is None:
            folder = f"{self.host.workdir}/bin/{source_hash()}"
            argv = [self.host.python, "-c", HOST_IMPORT, folder, "host-agent", "serve"]
            # stderr of the whole session, read when it ends (closed then, in close())
            self.errors, self.buffer = tempfile.TemporaryFile(), bytearray()
            self.proc = subprocess.Popen(
                [*self.host.ssh_command(), self.host.target, shlex.join(argv)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.errors,
            )
        with contextlib.suppress(OSError):  # a dead process: its answer's absence says why
            self.proc.stdin.write(json.dumps({"action": action, "payload": payload}).encode())
            self.proc.stdin.write(b"\n")
            self.proc.stdin.flush()
        line = self.read_line(timeout)
        if line is None:
            self.close()
            return None
        try:
            return json.loads(line)
        except ValueError:  # a login script that prints: the session cannot be trusted
            self.close()
            raise HostError(
                f"host '{self.host.name}' answered '{action}' with something not JSON; make its "
                "shell start-up files print nothing for commands run over ssh"
            ) from None

    def read_line(self, timeout):
        """The next answer line, or None at the end of the output or after `timeout` seconds."""
        deadline, fd = time.monotonic() + timeout, self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.timed_out = timeout
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.timed_out = None
                return None
            self.buffer += chunk
        end = self.buffer.index(b"\n")
        line, self.buffer = bytes(self.buffer[:end]), self.buffer[end + 1 :]
        return line

    def end(self):
        """End the session (the supervisor is done with the host): at once, even while a
        request waits for a host that stopped answering (its reader then sees the end)."""
        if self.lock.acquire(timeout=1.0):
            try:
                self.close()
            finally:
                self.lock.release()
        elif self.proc is not None:
            with contextlib.suppress(OSError, AttributeError):  # it may end meanwhile
                self.proc.kill()

    def close(self):
        """End the process; ended_with says how it ended (for Host.failure)."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        self.errors.seek(0)
        stderr = self.errors.read()
        self.errors.close()
        code = self.proc.returncode
        if self.timed_out:
            code, stderr = (
                HOST_SSH_FAILED,
                stderr + f"\nno answer within {self.timed_out:.0f}s".encode(),
            )
        self.ended_with = subprocess.CompletedProcess([], code, b"", stderr)
        self.proc = None


class HostTicket:
    """One agent's place in a host's next call (a poll or a launch): its answer or its error,
    once the call is done."""

    def __init__(self):
        self.done = threading.Event()
        self.answer, self.error = None, None

    def settle(self, answer=None, error=None):
        """Hand the follower its answer (or the error that stands for it)."""
        self.answer, self.error = answer, error
        self.done.set()


class HostLauncher:
    """Starts agents on one host: every agent waiting to start there goes in one `spawn` call.

    The agents placed in one scheduling pass ask at once. Whoever gets the call takes everyone
    waiting with it, so the host records them and makes their worktrees in one go, in spawn
    order, instead of one round trip and one state write each; the rest queue there.
    """

    def __init__(self, session):
        self.session = session
        self.lock = threading.Lock()  # guards self.waiting
        self.calling = threading.Lock()  # one spawn call at a time
        self.waiting = []  # (RemoteAgent, its environment, its HostTicket)

    @staticmethod
    def prepared(item):
        """True once the host is ready for the item's agent; else its ticket hears why."""
        agent, _, ticket = item
        try:
            agent.prepare_host()
        except OrchestraError as e:
            ticket.settle(error=e)
            return False
        return True

    @staticmethod
    def fail_all(batch, error):
        """Every ticket of the batch not settled yet hears `error`, so none waits for ever; an
        error that is not orchestra's own (a bug) goes on up."""
        for *_, ticket in batch:
            if not ticket.done.is_set():
                ticket.settle(error=error)
        if not isinstance(error, OrchestraError):
            raise error

    def spawn(self, batch):
        """One `spawn` call for the agents of the batch the host is ready for; each ticket
        settled with its agent's answer, or with the error that stands for it."""
        try:
            ready = [item for item in batch if self.prepared(item)]
            if not ready:
                return
            payload = {"repo": ready[0][0].remote_repo}
            payload["agents"] = [agent.spawn_request(env) for agent, env, _ in ready]
            try:
                answers = self.session.call("spawn", payload)["agents"]
            except HostError as e:  # the host may have started them: never start them elsewhere
                raise HostUnheard(str(e)) from None
        except Exception as e:  # every agent of the batch hears it
            self.fail_all(batch, e)
            return
        for agent, _, ticket in ready:
            answer = answers.get(agent.record["id"]) or {"error": "the host did not answer"}
            if "error" in answer:
                ticket.settle(error=OrchestraError(answer["error"], EXIT_FAILURE))
            else:
                ticket.settle(answer)

    def spawn_with(self, first):
        """Prepare the host for `first` (meanwhile the agents placed with it join), then spawn
        everyone waiting; a host out of reach is out of reach for all of them."""
        failure = None
        try:
            first.prepare_host()
        except Exception as e:  # every agent waiting hears it: none waits forever
            failure = e
        with self.lock:
            batch, self.waiting = self.waiting, []
        if isinstance(failure, OrchestraError) and not isinstance(failure, HostError):
            failure = None  # a refusal is `first`'s alone: spawn() asks again and tells it
        if failure is None:
            self.spawn(sorted(batch, key=lambda item: spawn_order(item[0].record)))
        else:
            self.fail_all(batch, failure)

    def launch(self, agent, env):
        """Start the agent on the host (again: nothing new); its record there."""
        ticket = HostTicket()
        with self.lock:
            self.waiting.append((agent, env, ticket))
        with self.calling:
            if not ticket.done.is_set():  # else an earlier call took this agent along
                self.spawn_with(agent)
        if ticket.error:
            raise ticket.error
        return ticket.answer

    def end(self):
        """End the host session the launches use."""
        self.session.end()


def follow_remote_agent(agent, report, stopping, poll):
    """Poll a remote agent until it settles (or we stop): (its last remote record, the local log).

    poll(agent) answers from the host's next poll (see HostPoller), which sets the pace.
    Facts go to report(agent_id, facts); a host out of reach is reported, never fatal.
    """
    agent_id = agent.record["id"]
    log = AgentLog(agent.project.log_path(agent_id))
    remote, unreachable = None, None
    while not stopping.is_set():
        try:
            answer = poll(agent)
        except HostError as e:
            unreachable = unreachable or utc_iso()
            report(agent_id, {"host_unreachable": {"since": unreachable, "why": str(e)}})
            stopping.wait(HOST_POLL)
            continue
        if answer is None:
            continue  # we are stopping
        remote, more = answer
        if unreachable:
            unreachable = None
            report(agent_id, {"host_unreachable": None})
        if log.read_new():
            report(agent_id, without_none(log.facts))
        if remote:
            report(agent_id, remote_facts(remote, agent.host.name))
        settled = remote is None or (
            remote["state"] in FINISHED_STATES and not checks_running(remote)
        )  # the host runs the agent's checks: their result comes home too
        if settled and not more:
            break
    log.read_to_end()
    return remote, log


def remote_facts(remote, host_name):
    """What a host's record of an agent tells its record at home (what the host does not know,
    such as why home stopped it, stays); one the host queued (its slots are busy, see
    queue_ahead) says so."""
    facts = {k: remote.get(k) for k in HOST_RECORD_FACTS if remote.get(k) is not None}
    facts.update(waiting=remote.get("waiting"), approval=remote.get("approval"))  # None: over
    facts["host_queued"] = remote["state"] == "queued" or None
    if facts["host_queued"]:
        facts["activity"] = f"queued on host {host_name} until one of its slots frees"
    elif remote["state"] == "waiting":  # a rate limit there holds the whole fleet (account_wait)
        facts["activity"] = f"{remote.get('activity')} on host {host_name}"
    return facts


class HostPoller:
    """Polls one host for every agent followed there: one ssh call per round, not one per agent.

    Followers call poll(agent) and wait for the next round; the thread starts rounds at most
    every HOST_POLL_ROUND while the host's agents write (at once while a log has more to fetch),
    less often while nothing is new there (HOST_POLL_QUIET), and ends once nobody asks.
    hold() is the fleet's rate-limit hold, sent along so the host starts nothing before it;
    note(host name, why or None) hears whether the host answered.
    """

    def __init__(self, session, remote_repo, stopping, hold=lambda: None, note=lambda *_: None):
        self.session, self.host, self.note = session, session.host, note
        self.launcher = HostLauncher(HostSession(session.host))  # launches never wait for polls
        self.remote_repo, self.stopping, self.hold = remote_repo, stopping, hold
        self.lock = threading.Lock()  # guards self.asking and self.thread
        self.asking = {}  # agent id -> (RemoteAgent, HostTicket) waiting for the next round
        self.seen = {}  # agent id -> its state and requests at the last round (news if they change)
        self.thread = None
        self.wake = threading.Event()  # set when a follower asks

    def poll(self, agent):
        """(remote record, more) for the agent from the next round; None when we stop."""
        ticket = HostTicket()
        with self.lock:
            self.asking[agent.record["id"]] = (agent, ticket)
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self.run, name=f"poll-{self.host.name}", daemon=True
                )
                self.thread.start()
        self.wake.set()
        while not ticket.done.wait(HOST_POLL):
            if self.stopping.is_set():
                return None
        if ticket.error:
            raise ticket.error
        return ticket.answer

    def run(self):
        """Rounds until the supervisor stops or no follower asked for HOST_POLLER_IDLE seconds."""
        last, hurry, interval = 0.0, False, HOST_POLL_ROUND
        while not self.stopping.is_set():
            asked = self.wake.wait(HOST_POLLER_IDLE)
            with self.lock:
                if not asked and not self.asking:
                    self.thread = None
                    return
            pause = last + interval - time.monotonic()
            if pause > 0 and not hurry:
                self.stopping.wait(pause)  # every follower of the host joins this round
            with self.lock:
                batch, self.asking = self.asking, {}
                self.wake.clear()
            last = time.monotonic()
            hurry, news = self.round(batch) if batch else (False, False)
            interval = HOST_POLL_ROUND if news else min(HOST_POLL_QUIET, interval * 2)

    def round(self, batch):
        """One ssh call for the batch's agents; each ticket settled. (a log has more, news: a
        line, a request or a new state came)."""
        agents = [agent for agent, _ in batch.values()]
        share = max(HOST_LOG_MIN_CHUNK, HOST_LOG_CHUNK // len(agents))
        payload = {"repo": self.remote_repo, "hold_until": self.hold()}
        payload["agents"] = [
            {"id": a.record["id"], "offset": a.offset, "limit": max(share, a.limit)} for a in agents
        ]
        more = news = False
        self.seen = {i: self.seen[i] for i in batch if i in self.seen}  # agents still followed
        try:
            try:
                answers = self.session.call("poll", payload, timeout=HOST_POLL_TIMEOUT)["agents"]
            except HostError as e:
                self.note(self.host.name, str(e))
                raise
            self.note(self.host.name, None)
            for agent_id, (agent, ticket) in batch.items():
                asked = answers.get(agent_id) or {}
                seen = (
                    (asked.get("record") or {}).get("state"),
                    sorted(r.get("id") or "" for r in asked.get("approvals") or []),
                )
                news = news or bool(asked.get("data")) or self.seen.get(agent_id) != seen
                self.seen[agent_id] = seen
                try:
                    answer = agent.take(asked)
                except (OrchestraError, OSError) as e:
                    ticket.settle(error=e)
                    continue
                more = more or answer[1]
                ticket.settle(answer)
        except Exception as e:  # a follower must never wait forever: each hears the error
            if not isinstance(e, OrchestraError):
                traceback.print_exc()
            for _, ticket in batch.values():
                if not ticket.done.is_set():
                    ticket.settle(error=e)
        return more, news


# ======================================================================================
# Supervisor
# --------------------------------------------------------------------------------------
# One detached process per repository, unique by supervisor.lock: starts queued agents up
# to the parallel limit, watches each with a thread, beats a heartbeat, adopts what a dead
# supervisor left, and exits when nothing is queued, running or paused.
# ======================================================================================

SUPERVISOR_TICK = 0.5  # seconds between the supervisor's scheduling passes and state writes
NAP_SLICE = 0.05  # seconds between looks, while it naps, at whether state.json changed
WATCH_POLL = 0.2  # seconds between a watcher's reads of its agent's log
PREPARE_AT_ONCE = 2  # worktrees the supervisor makes at a time: checkouts compete for the disk
COUNTS_INTERVAL = 5.0  # seconds between refreshes of a running agent's commit and file counts


class Supervisor:
    """Runs and watches a repository's agents until there is nothing left to do (and, started
    with `linger`, not before that many seconds: a host's starts before its first agents come)."""

    def __init__(self, project, linger=0.0):
        self.project = project
        self.linger_until = time.monotonic() + linger
        self.store = project.store
        self.stopping = threading.Event()
        self.pending_lock = threading.Lock()  # guards self.pending
        self.pending = {}  # agent id -> facts or final record changes waiting for the next write
        self.watchers = {}  # agent id -> watcher thread; touched by the main thread only
        # the thread making the next worktrees; touched by the main thread only
        self.preparer = None
        self.notifiers = []  # notify_command threads, waited for before the supervisor exits
        self.slot_freed = (
            threading.Event()
        )  # set when an agent ends, so the next one starts at once
        self.resilience = Resilience(
            self.store, self.queue, self.announce, self.stopping, self.stop_on_host
        )
        self.pollers_lock = threading.Lock()  # guards self.pollers
        self.pollers = {}  # host name -> its HostPoller (Hosts)
        self.reach = {}  # host name -> None (it answers) or why it does not, as last noted
        self.hold_until = None  # the fleet's rate-limit hold, sent to every host with its polls

    def run(self):
        """Hold the supervisor lock and serve; re-check for work after letting go of it."""
        lock = FileLock(self.project.dir / "supervisor.lock")
        while lock.acquire(timeout=1.0):
            try:
                self.serve()
            finally:
                lock.release()
            if self.stopping.is_set() or not self.has_work(self.store.load()):
                break
        return EXIT_OK

    def serve(self):
        """Answer the agents' guard hooks while scheduling (see GuardServer)."""
        guard = GuardServer(self.project.repo).start()
        try:
            self.schedule()
        finally:
            guard.stop()

    def schedule(self):
        """Adopt, then schedule and flush until idle or asked to stop."""
        self.store.update(self.register)
        self.adopt()
        heartbeat = threading.Thread(target=self.beat, name="heartbeat", daemon=True)
        heartbeat.start()
        while not self.stopping.is_set():
            self.reap_watchers()
            state = self.store.load()  # read without the lock; lock and write only to start someone
            hold = account_wait(state, time.time())
            self.hold_until = utc_iso(math.ceil(hold)) if hold else None
            if self.startable(state):  # first: a free slot waits for nothing else
                self.store.update(self.start_queued)
                state = self.store.load()
            self.flush()
            self.prepare_ahead(state)
            if self.idle(state):
                break
            self.nap(SUPERVISOR_TICK)
        self.flush()
        self.store.update(lambda state: state["supervisor"].update(pid=None))
        for poller in list(self.pollers.values()):
            poller.session.end()
            poller.launcher.end()
        for thread in self.notifiers:
            thread.join(NOTIFY_TIMEOUT)

    def idle(self, state):
        """True when nothing is left to run, watch or prepare, and the linger is over."""
        return (
            not self.watchers
            and not self.has_work(state)
            and not self.preparing()
            and time.monotonic() >= self.linger_until
        )

    def register(self, state):
        """Write this process into the state as the live supervisor."""
        state["supervisor"] = {
            "pid": os.getpid(),
            "pid_start": process_start_time(os.getpid()),
            "started_at": utc_iso(),
            "heartbeat_at": utc_iso(),
        }

    @staticmethod
    def has_work(state):
        """True while some agent is ready to start (or waits for its worktree), running or paused."""
        return any(
            r["state"] in ("running", "paused", "waiting")
            or (
                r["state"] == "queued"
                and (r.get("ready") or r.get("worktree_later"))
                and not r.get("waits_for")  # its dependencies land first (see Landing)
            )
            for r in state["agents"].values()
        )

    @staticmethod
    def waits_for_worktree(record):
        """True for a queued agent whose worktree spawn left to the supervisor (and handed over)."""
        return (
            record["state"] == "queued"
            and bool(record.get("worktree_later"))
            and not record.get("preparer")
            and not record.get("waits_for")
        )

    def preparing(self):
        """True while worktrees are being made for queued agents."""
        return self.preparer is not None and self.preparer.is_alive()

    def prepare_ahead(self, state):
        """Make the next worktrees in the background, keeping at most the parallel limit ready ahead.

        Spawn makes the first one itself; the rest are made here just before they can run, so
        the first agents start at once and disk use follows the parallel limit, not the queue.
        """
        if self.preparing():
            return
        agents = state["agents"].values()
        if not any(self.waits_for_worktree(r) for r in agents):
            return
        ready = sum(r["state"] == "queued" and bool(r.get("ready")) for r in agents)
        count = min(
            PREPARE_AT_ONCE, self.project.config.parallel_limit(state.get("parallel")) - ready
        )
        if count > 0:
            self.preparer = threading.Thread(
                target=self.prepare_next, args=(count,), name="prepare", daemon=True
            )
            self.preparer.start()

    def prepare_next(self, count):
        """Claim the next `count` waiting agents under the lock, make their worktrees, wake the loop."""

        def claim(state):
            waiting = (r for r in state["agents"].values() if self.waits_for_worktree(r))
            chosen = sorted(waiting, key=spawn_order)[:count]
            preparer = [
                os.getpid(),
                process_start_time(os.getpid()),
            ]  # a crash mid-prepare is rolled back
            for record in chosen:
                record.update(
                    worktree_later=False, activity="preparing worktree", preparer=preparer
                )
                if record.get("after"):  # from the target, with the work of what it waited for
                    target = record.get("land_base") or record.get("base_branch")
                    tip = target and ref_commit(self.project.repo, f"refs/heads/{target}")
                    record["base_commit"] = tip or record["base_commit"]
            return [dict(r) for r in chosen]

        try:
            claimed = self.store.update(claim)
            if claimed:
                prepare_agents(self.project, claimed)
                drop_agent_env(self.project, [r["id"] for r in claimed if r["state"] == "failed"])
        except Exception:  # reported, and the loop goes on: the agents stay queued, visibly
            traceback.print_exc()
        self.slot_freed.set()

    def adopt(self):
        """Watch agents a dead supervisor left running; settle the ones whose process is gone."""
        for record in self.store.load()["agents"].values():
            if record["state"] not in ("running", "paused") or record["id"] in self.watchers:
                continue
            if is_remote(record):  # Hosts: a remote agent is followed over ssh, never by its pid
                self.watch_remote(record)
                continue
            if process_alive(record["pid"], record.get("pid_start")):
                self.watch(record, None)
            else:
                self.settle_orphan(record["id"])

    def settle_orphan(self, agent_id):
        """Settle an agent that ended unwatched: its log says done or failed, else interrupted."""
        log = read_log(self.project.log_path(agent_id))
        found = self.check_integrity(agent_id)

        def settle(state):
            record = state["agents"][agent_id]
            if found:
                note_tampering(self.project, record, found)
            finish_record(record, log, None, "", self.counts(record))
            self.resilience.review(record)
            return dict(record)

        self.announce(self.store.update(settle))
        self.after_done_in_thread(agent_id)

    def check_integrity(self, agent_id):
        """What the settling agent changed outside its worktree and branch, put back (see Integrity check)."""
        records = self.store.load()["agents"]
        if agent_id not in records:
            return []
        try:
            return verify_integrity(self.project, records[agent_id], records)
        except (OrchestraError, OSError) as e:
            return [f"orchestra could not check what {agent_id} changed: {e}"]

    def free_slots(self, state):
        """How many more agents may run now."""
        limit = self.project.config.parallel_limit(state.get("parallel"))
        return max(
            0,
            limit
            - sum(
                r["state"] in ("running", "paused") and not is_remote(r)
                for r in state["agents"].values()
            ),
        )

    def startable(self, state):
        """True when this pass needs the lock (checked without it): a ready agent can start, or a
        waiting agent may be woken, or a batch has spent its budget (see hold_starts)."""
        agents = state["agents"].values()
        if any(r["state"] == "waiting" for r in agents) or over_budget(state):
            return True
        ready = any(r["state"] == "queued" and r.get("ready") for r in agents)
        if self.project.config["hosts"]:  # Hosts: a queued agent may go to a host with a free slot
            return bool(placements(self.project.config, state, self.free_slots(state)))
        return ready and self.free_slots(state) > 0

    def start_queued(self, state):
        """Launch ready queued agents, oldest first, while fewer than the limit run."""
        if self.resilience.hold_starts(state):
            return  # the account is rate-limited: no new starts until it resets
        if self.project.config["hosts"]:  # Hosts: each queued agent to a host with a free slot
            for record, host in placements(self.project.config, state, self.free_slots(state)):
                self.start(record) if host == "local" else self.start_remote(record, host)
            return
        agents = state["agents"].values()
        queued = sorted(
            (r for r in agents if r["state"] == "queued" and r.get("ready")), key=spawn_order
        )
        for record in queued[: self.free_slots(state)]:
            self.start(record)

    def start(self, record):
        """Launch one agent (a fresh task, or a resumed session) and watch it."""
        prompt = record.pop("resume_prompt", None)
        try:
            record_integrity(self.project, record)
        except (OrchestraError, OSError) as e:
            print(f"{utc_iso()} integrity baseline of {record['id']} failed: {e}", flush=True)
        try:
            proc = launch_agent(self.project, record, prompt)
        except OSError as e:
            record.update(
                state="failed",
                error=f"could not start {record['launch']['agent_command'][0]}: {e}",
                finished_at=utc_iso(),
            )
            return
        record.update(
            state="running",
            pid=proc.pid,
            pid_start=process_start_time(proc.pid),
            exit_code=None,
            started_at=record.get("started_at") or utc_iso(),
            finished_at=None,
            error=None,
            activity="starting",
            last_activity_at=utc_iso(),
        )
        self.watch(record, proc)

    def watch(self, record, proc):
        """Start the named watcher thread of one agent."""
        thread = threading.Thread(
            target=self.guarded,
            args=(self.follow, record["id"], dict(record), proc),
            name=f"watch-{record['id']}",
            daemon=True,
        )
        self.watchers[record["id"]] = thread
        thread.start()

    # --- Hosts: a remote agent is started and followed by a thread of its own -----------------

    def start_remote(self, record, host):
        """Mark an agent running on `host`; its follower thread launches it there."""
        record.setdefault("pinned", record.get("host"))
        append_event(record["log"], {"event": "placed", "host": host})  # rebuilding reads it
        record.update(
            state="running",
            host=host,
            host_released=None,
            worktree_later=False,
            pid=None,
            started_at=record.get("started_at") or utc_iso(),
            finished_at=None,
            error=None,
            activity=f"starting on host {host}",
            last_activity_at=utc_iso(),
        )
        self.watch_remote(record)

    def watch_remote(self, record):
        """Start the named follower thread of one remote agent."""
        thread = threading.Thread(
            target=self.guarded,
            args=(self.follow_remote, record["id"], dict(record)),
            name=f"host-{record['id']}",
            daemon=True,
        )
        self.watchers[record["id"]] = thread
        thread.start()

    def host_failed(self, host, why):
        """A host could not take an agent: say why, and give it no new agents for a while."""
        self.note_host(host, why)
        HOST_DOWN[host] = (time.monotonic() + HOST_RETRY, why)

    def launch_remote(self, launcher, agent):
        """Start a placed agent on its host; False when it did not start there (it waits for a
        host again, or failed, or we stop). A launch the host may have carried out before the
        link failed is asked again there, and only there: the host's spawn is idempotent."""
        agent_id, host = agent.record["id"], agent.record["host"]
        env = take_agent_env(self.project, agent_id)
        while True:
            try:
                launcher.launch(agent, env)
                return True
            except HostUnheard as e:
                self.host_failed(host, str(e))
                self.queue(agent_id, {"activity": f"starting on host {host}, asked again soon"})
                if self.stopping.wait(HOST_RETRY):
                    return False
            except OrchestraError as e:
                problem = e
                break
        why = str(problem)
        if isinstance(problem, HostError):  # away or broken, and it started nothing: any host
            self.host_failed(host, why)
            if env is not None:  # kept for its next launch, wherever that is
                save_agent_env(self.project, [agent_id], env)
            self.store.update(lambda state: requeue_from_host(state["agents"][agent_id], why))
            self.slot_freed.set()
            return False
        why = f"could not start on host '{host}': {why}"
        self.finish(agent_id, lambda r: settle_remote(r, None, None, why))
        return False

    def follow_remote(self, agent_id, record):
        """Launch the agent on its host if not yet done, follow it until it settles, fetch it home."""
        poller = self.poller(record["host"])
        agent = RemoteAgent(self.project, record, poller.launcher.session)
        if not record.get("host_launched"):
            if not self.launch_remote(poller.launcher, agent):
                return
            self.queue(agent_id, {"host_launched": True})
            if self.store.load()["agents"][agent_id]["state"] == "stopped":
                self.stop_on_host(
                    record
                )  # stopped (a budget, `stop`) while its launch was on the way
        remote, log = follow_remote_agent(agent, self.queue, self.stopping, poller.poll)
        if self.stopping.is_set():
            return  # the agent runs on at its host; the next supervisor follows it again
        self.store.update(  # its cost first: a budget is judged before the slot is given again
            lambda state: (self.apply_pending(state), release_host_slot(state["agents"][agent_id]))
        )
        self.slot_freed.set()  # its host slot is free while its branch comes home
        problem = fetch_home_patiently(agent, self.stopping)
        self.finish(agent_id, lambda r: settle_remote(r, log, remote, problem))

    def stop_on_host(self, record):
        """Have a remote agent's host stop it (a budget spent), retrying while the host is away."""

        def relay():
            while not self.stopping.is_set():
                try:
                    return relay_to_host(self.project, record, "stop")
                except HostError:
                    self.stopping.wait(HOST_POLL)
                except OrchestraError:
                    return None  # it has ended there already

        thread = threading.Thread(target=relay, name=f"host-stop-{record['id']}", daemon=True)
        thread.start()

    def poller(self, host_name):
        """The one poller (and session) of a host in this process, made on first use."""
        with self.pollers_lock:
            if host_name not in self.pollers:
                host = Host.named(self.project.config, host_name)
                self.pollers[host_name] = HostPoller(
                    HostSession(host),
                    host.repo_path(self.project.repo),
                    self.stopping,
                    lambda: self.hold_until,
                    self.note_host,
                )
            return self.pollers[host_name]

    def note_host(self, name, why):
        """Keep in the state whether a host answers (`host_reach`: since when it does not, and
        why), written only when that changes; the dashboard and `status --json` show it."""
        with self.pollers_lock:
            known = self.reach.get(name, "unknown")
            if (known is None) == (why is None) and known != "unknown":
                return
            self.reach[name] = why

        def change(state):
            reach = state.setdefault("host_reach", {})
            reach[name] = why and {"unreachable_since": utc_iso(), "why": why}

        self.store.update(change)

    def after_done(self, agent_id):
        """In the agent's watcher thread: run its due checks, then free its slot."""
        self.resilience.run_due_checks(agent_id)
        self.slot_freed.set()

    def after_done_in_thread(self, agent_id):
        """From the main thread (adopting): run the agent's checks in a named thread of their own."""
        thread = threading.Thread(
            target=self.guarded,
            args=(lambda i: self.after_done(i), agent_id),
            name=f"checks-{agent_id}",
            daemon=True,
        )
        self.watchers[agent_id] = thread
        thread.start()

    def nap(self, seconds):
        """Wait for the next scheduling pass: `seconds`, or less when an agent's end frees a slot
        or another process changes the state (a spawn, or home giving this host an agent)."""
        deadline, seen = time.monotonic() + seconds, self.store.stamp()
        while not self.slot_freed.wait(max(0.0, min(NAP_SLICE, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or self.store.stamp() != seen:
                break
        self.slot_freed.clear()

    def guarded(self, target, agent_id, *args):
        """Run a thread body; an exception reaches the supervisor log and the agent's record."""
        try:
            target(agent_id, *args)
        except Exception as e:  # a watcher must report, never vanish silently
            traceback.print_exc()
            with self.pending_lock:
                self.pending.setdefault(agent_id, {})["error"] = f"orchestra watcher failed: {e!r}"

    def follow(self, agent_id, record, proc):
        """Tail one agent's log into pending facts until its process ends, then settle it."""
        log = AgentLog(self.project.log_path(agent_id))
        with ExitWaiter(proc) as waiter:
            self.tail_until_exit(agent_id, record, proc, log, waiter)
        if self.stopping.is_set():
            return  # the agent runs on; the next supervisor adopts it
        log.read_to_end()
        exit_code = proc.returncode if proc else None
        stderr_tail = read_tail(self.project.stderr_path(agent_id))
        counts = self.counts(record)
        found = self.check_integrity(agent_id)
        self.finish(
            agent_id,
            lambda r: (
                found and note_tampering(self.project, r, found),
                finish_record(r, log, exit_code, stderr_tail, counts),
                self.resilience.review(r),
            ),
        )
        self.after_done(agent_id)

    def tail_until_exit(self, agent_id, record, proc, log, waiter):
        """Fold the log into pending facts (and refresh counts) until the process ends or we stop."""
        # counts change only when the agent does something, which it logs; none in its first
        # seconds (its record holds what it started with), so a short agent is counted once, at its end
        next_counts, active = time.monotonic() + COUNTS_INTERVAL, True
        while not self.stopping.is_set():
            exited = (
                proc.poll() is not None
                if proc
                else not process_alive(record["pid"], record.get("pid_start"))
            )
            if log.read_new():
                self.queue(agent_id, without_none(log.facts))
                active = True
            if exited:
                return
            if active and time.monotonic() >= next_counts:
                self.queue(
                    agent_id, dict(zip(("commits", "files_changed"), self.counts(record) or ()))
                )
                next_counts, active = time.monotonic() + COUNTS_INTERVAL, False
            if log.caught_up:  # during a burst, read on at once (in budgeted steps) instead
                waiter.wait(WATCH_POLL)

    def counts(self, record):
        """(commits, files changed) of an agent's worktree, or None if git cannot tell."""
        try:
            return change_counts(record["worktree"], record["base_commit"])
        except (OrchestraError, OSError):
            return None

    def queue(self, agent_id, facts):
        """Keep facts for the next batched write."""
        if facts:
            with self.pending_lock:
                self.pending.setdefault(agent_id, {}).update(facts)

    def finish(self, agent_id, settle):
        """Write an agent's final record now, with whatever facts were still pending."""

        def change(state):
            self.apply_pending(state)
            settle(state["agents"][agent_id])
            return dict(state["agents"][agent_id])

        self.announce(self.store.update(change))
        self.slot_freed.set()  # a slot is free: start the next agent now, not at the next tick

    def announce(self, record, event=None):
        """Run notify_command for an agent that finished, failed or went stale."""
        event = event or {"done": "done", "failed": "failed", "interrupted": "failed"}.get(
            record["state"]
        )
        if event:
            message = f"{record['id']} is {event}: {record.get('error') or record.get('result') or record.get('activity') or ''}"
            thread = notify(self.project.repo, record["id"], event, one_line(message))
            if thread:
                self.notifiers.append(thread)

    def flush(self):
        """Write all pending facts in one state update (a few writes a second at most)."""
        with self.pending_lock:
            if not self.pending:
                return
        self.store.update(self.apply_pending)

    def apply_pending(self, state):
        """Move pending facts into the records they belong to."""
        with self.pending_lock:
            pending, self.pending = self.pending, {}
        for agent_id, facts in pending.items():
            record = state["agents"].get(agent_id)
            if record and record["state"] in ("running", "paused", "stopped"):
                record.update(facts)
                record["stale"] = False

    def reap_watchers(self):
        """Forget watcher threads that have finished."""
        for agent_id in [i for i, t in self.watchers.items() if not t.is_alive()]:
            del self.watchers[agent_id]

    def beat(self):
        """Every heartbeat_interval: mark the supervisor and running agents alive, flag stale ones."""
        interval = self.project.config["heartbeat_interval"]
        while not self.stopping.wait(min(interval, self.project.config["stale_threshold"])):
            for record in self.store.update(self.mark_heartbeat) or ():
                self.announce(record, "stale")

    def mark_heartbeat(self, state):
        """Stamp heartbeats and set the stale flag of agents quiet for stale_threshold; the newly stale.

        An agent waiting for an approval is quiet because of the user, not stale.
        """
        now = time.time()
        threshold = self.project.config["stale_threshold"]
        waiting = approval_flags(self.project.repo)
        state["supervisor"]["heartbeat_at"] = utc_iso(now)
        newly_stale = []
        for record in state["agents"].values():
            if record["state"] == "running":
                record["heartbeat_at"] = utc_iso(now)
                quiet_since = parse_iso(record.get("last_activity_at")) or now
                was_stale = record.get("stale")
                record["stale"] = (
                    now - quiet_since >= threshold
                    and record["id"] not in waiting
                    and not checks_running(record)
                )
                if record["stale"] and not was_stale:
                    newly_stale.append(dict(record))
        return newly_stale


class ExitWaiter:
    """Waits between a watcher's reads, ending the wait the moment the agent's process exits.

    Linux's pidfd becomes readable at exit; elsewhere a child is polled, an adopted process slept on.
    """

    def __init__(self, proc):
        self.proc, self.fd = proc, None
        if proc is not None and hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                self.fd = os.pidfd_open(proc.pid)

    def wait(self, timeout):
        """Sleep up to `timeout` seconds, less if the process exits."""
        if self.fd is not None:
            select.select([self.fd], [], [], timeout)
        elif self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        else:
            time.sleep(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)


def supervisor_alive(state):
    """True while the supervisor named in the state is still that same process."""
    info = state.get("supervisor") or {}
    return process_alive(info.get("pid"), info.get("pid_start"))


def supervisor_argv(linger=None):
    """How to run `orchestra supervise --foreground`: this module imported (its cached bytecode
    used, as the installed command does), not run as a script that is compiled at every start."""
    here = Path(__file__).resolve()
    launch = "import sys; sys.path.insert(0, sys.argv.pop(1)); import orchestra; sys.exit(orchestra.main(sys.argv[1:]))"
    argv = [sys.executable, "-c", launch, str(here.parent), "supervise", "--foreground"]
    return argv + (["--linger", f"{linger:g}"] if linger else [])


def ensure_supervisor(project, state=None, linger=None):
    """Start a detached supervisor when there is work (or it is to wait `linger` seconds for
    some) and none is alive; its pid or None."""
    state = state or project.store.load()
    if supervisor_alive(state) or not (linger or Supervisor.has_work(state)):
        return None
    with open(project.dir / "supervisor.log", "ab", opener=private_opener) as log:
        proc = subprocess.Popen(
            supervisor_argv(linger),
            cwd=str(project.repo),
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc.pid


# ======================================================================================
# Operations
# --------------------------------------------------------------------------------------
# What the command line and the web server both do to agents: spawn, pause, resume, stop,
# and the views of status, logs and worktrees. Handlers format; these decide.
# ======================================================================================

# worktrees spawn makes itself; the supervisor makes the rest just before they run
SPAWN_PREPARED_NOW = 1


def status_document(project, state, records):
    """What `status --json` prints."""
    info = state.get("supervisor") or {}
    return {
        "repo": str(project.repo),
        "supervisor": {
            "pid": info.get("pid"),
            "alive": supervisor_alive(state),
            "heartbeat_at": info.get("heartbeat_at"),
        },
        "agents": [
            public_record(r) for r in with_merged_flags(project, with_approvals(project, records))
        ],
        **resilience_status(state),
        **({"hosts": fleet_overview(project.config, state)} if project.config["hosts"] else {}),
    }


def with_approvals(project, records):
    """Copies of the records with their 'approval' flag: the request each one waits on, or None."""
    flags = approval_flags(project.repo)
    return [
        dict(r, approval=flags.get(r["id"]) if r["state"] in ACTIVE_STATES else None)
        for r in records
    ]


def with_merged_flags(project, records):
    """Copies of the records with `merged` true for finished agents whose commits are all in
    their base branch (one git call per base branch), or that collect --merge merged."""
    finished = [r for r in records if r["state"] in FINISHED_STATES]
    checked_out = (
        current_branch(project.repo) if any(not r.get("base_branch") for r in finished) else None
    )
    targets = {id(r): r.get("base_branch") or checked_out for r in finished}
    merged_tips = {}
    for target in set(targets.values()) - {None}:
        fmt = [
            "for-each-ref",
            f"--merged={target}",
            "--format=%(refname) %(objectname)",
            "refs/heads/",
        ]
        done = run_git(fmt, project.repo, check=False)
        merged_tips[target] = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    flagged = []
    for r in records:
        tip = merged_tips.get(targets.get(id(r)), {}).get(f"refs/heads/{r['branch']}")
        on_base = tip is not None and tip != r.get("base_commit")
        flagged.append(dict(r, merged=bool(r.get("merged") or on_base)))
    return flagged


def check_not_removed(project, names):
    """Refuse to continue a cleaned-up agent, pointing at its archive and `orchestra restore`."""
    live, gone = project.records(), project.history()
    for name in names:
        matches = [i for i in gone if i == name] or [i for i in gone if i.startswith(name)]
        if (name in live and live[name]["state"] != "removed") or len(matches) != 1:
            continue
        record = gone[matches[0]]
        saved = (record.get("archive") or [f"{ARCHIVE_REFS}/{record['id']}/"])[0]
        raise OrchestraError(
            f"{record['id']} was cleaned up; its work is saved under {saved}. "
            f"Bring it back with 'orchestra restore {record['id']}', then try again"
        )


def spawn_agents(
    project,
    tasks,
    parallel=None,
    name=None,
    base=None,
    env=None,
    budget=None,
    after=None,
    checks=None,
    host=None,
    ready_now=SPAWN_PREPARED_NOW,
):
    """Check the request, record the agents, make their worktrees and wake the supervisor.

    The one way agents come to be, from the command line or the web; their records. The agents
    start with `env` (default: this process's environment). `after`: per task, the ids it waits
    for (it starts once they landed, from the target with their work); `checks`: per task, its
    own checks or None; `host`: one for all, or each task's (None: placed by the supervisor).
    `ready_now`: how many worktrees to make before returning (the supervisor makes the rest).
    """
    for task in tasks:
        check_task(task)
    names = [name] if isinstance(name, str) else list(name or [])
    if names and len(names) != len(tasks):
        raise OrchestraError(
            f"--name names one task each, in order: {len(tasks)} task(s) but {len(names)} name(s); "
            "give one --name per task or none"
        )
    if parallel is not None and not 1 <= parallel <= project.config["max_parallel"]:
        raise OrchestraError(
            f"--parallel must be between 1 and max_parallel ({project.config['max_parallel']})"
        )
    check_agent_command(project.config)
    pinned = set(host if isinstance(host, list) else [host])
    for name in pinned - {None}:
        check_host_name(project.config, name)
    sandboxed = sandbox_for(project.config, os.environ if env is None else env)
    connect_hosts_soon(project.config, pinned)
    base_branch, base_commit = resolve_base(project, base)
    known = {**project.history(), **project.records()}
    deps = check_dependencies(known, names or [None] * len(tasks), after or [[]] * len(tasks))
    roll_back_stalled_spawns(project)
    records = reserve_agents(project, tasks, names, base_branch, base_commit, parallel, host)
    mark_sandboxed(project, records, sandboxed)
    mark_plan(project, records, deps, checks or [None] * len(tasks))
    assign_batch(project, records, budget)
    save_agent_env(project, [r["id"] for r in records], os.environ if env is None else env)
    now = [r for r in records if not r.get("waits_for")][:ready_now]
    later = [r for r in records if r not in now]
    try:
        defer_worktrees(project, later)
        prepare_agents(project, now)
        hand_over_worktrees(project, later)
    except BaseException:
        with shield_interrupts():
            roll_back_spawn(project, records, "spawn was interrupted before the agent started")
            drop_agent_env(project, [r["id"] for r in records])
        raise
    drop_agent_env(
        project, [r["id"] for r in records if r["state"] == "failed"]
    )  # setup failed: no launch
    ensure_supervisor(project)
    return records


def pause_agents(project, ids):
    """Pause running agents; (id, what happened) for each."""
    remote = [r for r in select_agents(project.records(), ids) if on_host(r)]
    if remote:  # Hosts: paused by their host, marked paused here
        for record in remote:
            if record["state"] != "running":
                raise OrchestraError(
                    f"{record['id']} is {record['state']}; only a running agent can be paused"
                )
            relay_to_host(project, record, "pause")
        change_agents(project, [r["id"] for r in remote], lambda r: r.update(state="paused"))
        ids = [r["id"] for r in select_agents(project.records(), ids) if not on_host(r)]
        if not ids:
            return [(r["id"], f"paused on host {r['host']}") for r in remote]
    return [(agent_id, "paused") for agent_id in change_agents(project, ids, pause_agent)]


def resume_agents(project, ids, env=None):
    """Continue paused agents or queue relaunches (with `env`, default this process's); (id, what happened)."""
    remote = [r for r in select_agents(project.records(), ids) if on_host(r)]
    if remote:  # Hosts: resumed (or relaunched) by their host, followed again from here
        for record in remote:
            if record["state"] in ("running", "queued", "done"):
                raise OrchestraError(
                    f"{record['id']} is {record['state']}; only paused, stopped, failed or interrupted agents resume"
                )
            relay_to_host(project, record, "resume", env=env)
        change_agents(project, [r["id"] for r in remote], resume_remote)
        ensure_supervisor(project)
        ids = [r["id"] for r in select_agents(project.records(), ids) if not on_host(r)]
        if not ids:
            return [(r["id"], f"resumed on host {r['host']}") for r in remote]
    chosen = [r["id"] for r in select_agents(project.records(), ids)]
    save_agent_env(project, chosen, os.environ if env is None else env)
    try:
        outcomes = change_agents(project, ids, lambda record: (record["id"], resume_agent(record)))
    except OrchestraError:
        drop_agent_env(project, chosen)
        raise
    drop_agent_env(project, [agent_id for agent_id, what in outcomes if what == "resumed"])
    ensure_supervisor(project)
    return outcomes


def resume_remote(record):
    """The local record of a remote agent its host resumed: running again, or continuing."""
    if record["state"] == "paused":
        record.update(state="running", activity="resumed")
    else:
        continue_on_host(record)


def stop_agents(project, ids):
    """Stop agents and end their processes; worktrees and branches stay. (id, what happened)."""
    outcomes = []
    remote = {r["id"]: r for r in select_agents(project.records(), ids) if on_host(r)}
    for agent_id, (pid, start_token) in change_agents(project, ids, request_stop):
        if agent_id in remote:  # Hosts: its host's supervisor ends it; its follower fetches it
            relay_to_host(project, remote[agent_id], "stop")
        stop_process(pid, start_token)
        outcomes.append((agent_id, "stopped (worktree and branch kept)"))
    drop_agent_env(project, [agent_id for agent_id, _ in outcomes])  # no launch will read it
    return outcomes


def resume_agent(record):
    """Continue a paused agent, or queue a relaunch of its session when its process is gone."""
    if record["state"] in ("running", "queued", "done"):
        raise OrchestraError(
            f"{record['id']} is {record['state']}; only paused, stopped, failed or interrupted agents resume"
        )
    if record["state"] == "paused" and signal_group(
        record["pid"], record.get("pid_start"), signal.SIGCONT
    ):
        record.update(state="running", activity="resumed")
        return "resumed"
    record["waiting"] = None  # a waiting agent is retried at once
    queue_session(record, RESUME_PROMPT, "waiting to resume")
    return "queued to resume its session"


def retry_agent(project, record, resume_session):
    """Start a failed, interrupted or stopped agent's task again (or a done one whose checks
    failed, `done ✗`); what happened."""
    checks_failed = (
        record["state"] == "done" and (record.get("checks") or {}).get("status") == "failed"
    )
    if record["state"] not in ("failed", "interrupted", "stopped") and not checks_failed:
        raise OrchestraError(
            f"{record['id']} is {state_label(record)}; only failed, interrupted or stopped agents "
            "and done ones whose checks failed (done ✗) can be retried"
        )
    if resume_session and on_host(record):  # Hosts: its session lives on its host
        relay_to_host(project, record, "resume")
        change_agents(project, [record["id"]], continue_on_host)
        ensure_supervisor(project)
        return f"{record['id']}: queued to continue its session on host {record['host']}"
    if resume_session:
        change_agents(
            project,
            [record["id"]],
            lambda r: queue_session(r, RESUME_PROMPT, "retrying its session"),
        )
        ensure_supervisor(project)
        return f"{record['id']}: queued to continue its session"
    taken = taken_ids(project, project.records())
    new_id = unique_id(record["id"], taken | {record["id"]})
    # Hosts: an agent pinned to a host is retried there; one placed by the supervisor is placed anew
    pin = record["pinned"] if "pinned" in record else record.get("host")
    fresh = spawn_agents(
        project, [record["task"]], name=new_id, base=record["base_commit"], host=pin
    )[0]
    return f"{record['id']}: retried as {fresh['id']} on {fresh['branch']} (the old worktree and branch are kept)"


def find_requests(project, name):
    """The pending requests a name means: one request id, or every request of one agent."""
    box = ApprovalBox(project.repo)
    request, where = box.request(name)
    if where == "answered":
        raise OrchestraError(late_message(name, request["decision"]), EXIT_FAILURE)
    if request is not None:
        return [request]
    check_not_removed(project, [name])
    pending = box.pending()
    by_prefix = [r for r in pending if r["id"].startswith(name)]
    if len(by_prefix) == 1 and not any(i.startswith(name) for i in project.records()):
        return by_prefix
    records = project.records()
    if not any(i.startswith(name) for i in records):
        raise OrchestraError(
            f"no request or agent '{name}'; 'orchestra approvals' lists the requests"
        )
    agent = select_agents(records, [name])[0]
    mine = [r for r in pending if r["agent"] == agent["id"]]
    if mine:
        return mine
    if agent["state"] not in ACTIVE_STATES:
        raise OrchestraError(
            f"{agent['id']} has ended ({agent['state']}); it waits for no approval", EXIT_FAILURE
        )
    raise OrchestraError(
        f"{agent['id']} is not waiting for an approval; 'orchestra approvals' lists the requests"
    )


def late_message(req_id, decision):
    """What a decider is told when another decision came first."""
    verb = "allowed" if decision.get("decision") == "allow" else "denied"
    return f"request {req_id} was already {verb} by {decision.get('by')} at {decision.get('at')}; your decision came late"


def request_rule(request, prefix=None, whole=False):
    """The rule --always saves for a request: its exact input, or the Bash prefix asked for.

    Refused on an input too long to show whole, and, unless `whole`, when it would allow every
    call of a tool (the error says so in words, before anything is saved).
    """
    if request.get("truncated") or not isinstance(request.get("input"), dict):
        raise OrchestraError(
            f"request {request['id']}'s input is {request.get('input_bytes')} bytes, too long to show "
            "whole: it can be approved once (without --always), never as a rule"
        )
    tool, tool_input = request["tool"], request["input"]
    rule = exact_rule(tool, tool_input) if prefix is None else prefix_rule(tool, tool_input, prefix)
    if whole_tool(rule) and not whole:
        raise OrchestraError(
            f"this rule would allow every {tool} call, whatever its input; "
            "add --whole-tool to save it anyway, or approve once without --always"
        )
    return rule


def answer_request(
    project, request, allow, by, message=None, always=None, prefix=None, whole=False
):
    """Decide one pending request (first decision wins); the decision as recorded.

    always: None, "agent" (the rule holds for the rest of the agent's run) or "project" (for
    every agent of the project, in approvals/rules/@project.json). The rule is the exact input
    shown unless `prefix` asks for a Bash prefix rule.
    """
    box = ApprovalBox(project.repo)
    if not process_alive(request.get("pid"), request.get("pid_start")):
        state = project.records().get(request["agent"], {}).get("state", "gone")
        raise OrchestraError(
            f"{request['agent']} has ended ({state}); its request {request['id']} is void",
            EXIT_FAILURE,
        )
    rule = request_rule(request, prefix, whole) if allow and always else None
    decision = {
        "decision": "allow" if allow else "deny",
        "by": by,
        "at": utc_iso(),
        "message": message,
        "always": always if rule else None,
        "rule": rule_label(rule) if rule else None,
        "input_sha256": request.get("input_sha256"),
    }
    if rule:  # before the decision, so the agent's very next request already finds it
        path = box.add_rule(None if always == "project" else request["agent"], rule)
        if always == "project":
            decision["config"] = str(path)
    if not box.decide(request["id"], decision):
        raise OrchestraError(
            late_message(request["id"], box.decision(request["id"]) or {}), EXIT_FAILURE
        )
    event = {
        "event": "approval",
        "request": request["id"],
        "tool": request.get("summary"),
        **decision,
    }
    append_event(
        project.log_path(request["agent"]), {k: v for k, v in event.items() if v is not None}
    )
    return decision


def approvals_document(project):
    """What `approvals --json` prints and GET /api/approvals answers: each request with the
    lines it is shown as (`shown`), the project's saved rules, and files ignored as forged."""
    box = ApprovalBox(project.repo)
    requests = [{**r, "shown": shown_request(r)} for r in box.pending()]
    rules = [rule_label(r) for r in box.rules(None)]
    return {
        "approvals": requests,
        "project_rules": rules,
        "ignored": box.audit(),
    }


def worktree_rows(project, records):
    """git's worktrees joined with agent records, orphans and missing folders marked."""
    by_path = {real_path(r["worktree"]): r for r in records.values() if r["state"] != "removed"}
    root = real_path(project.worktree_root)
    rows = []
    for wt in list_worktrees(project.repo):
        record = by_path.pop(wt["real"], None)
        ours = os.path.dirname(wt["real"]) == root and os.path.basename(wt["real"]).startswith(
            WORKTREE_PREFIX
        )
        notes = [
            n
            for n, on in (
                ("main", wt["real"] == real_path(project.repo)),
                ("orphan", ours and not record),
                ("missing", wt["prunable"] or not os.path.isdir(wt["path"])),
                ("locked", wt["locked"]),
            )
            if on
        ]
        rows.append(worktree_row(wt["path"], wt["branch"], record, notes))
    for record in by_path.values():
        rows.append(worktree_row(record["worktree"], record["branch"], record, ["missing"]))
    return rows


def worktree_row(path, branch, record, notes):
    """One row of `orchestra worktrees`."""
    record = record or {}
    return {
        "path": path,
        "branch": branch,
        "id": record.get("id"),
        "task": record.get("task"),
        "state": record.get("state"),
        "notes": notes,
    }


# ======================================================================================
# Reading logs
# --------------------------------------------------------------------------------------
# An agent's log as lines a person reads: each stream-json event and orchestra event rendered
# on its own line, streamed in chunks so memory stays bounded, and the last N lines found by
# reading backwards from the end. `logs`, `logs -f` and the dashboard's log view share it.
# ======================================================================================

LOGS_FIRST_CHUNK = 64 * 1024  # bytes read first, so the first lines show at once on a huge log
LOG_TAIL_BLOCK = 64 * 1024  # bytes read at a time, backwards from the end of a log
LOG_LINE_CAP = 1024 * 1024  # a log line longer than this is shown cut, with its size
LOG_CUT_SHOWN = 2000  # bytes of a cut line shown
LOGS_TOOL_OUTPUT_LINES = 10  # of a tool's output `logs` shows (an error's output is shown whole)


def render_event(event):
    """Readable lines for one log event (text, tool calls, results, orchestra's own steps)."""
    kind = event.get("type")
    if kind == "orchestra":
        return render_orchestra_event(event)
    if kind == "system" and event.get("subtype") == "init":
        return [f"session {event.get('session_id')} started (model {event.get('model')})"]
    if kind in ("assistant", "user"):
        message = event.get("message") if isinstance(event.get("message"), dict) else {}
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        return [line for block in blocks if isinstance(block, dict) for line in render_block(block)]
    if kind == "result":
        cost, turns = format_cost(event.get("total_cost_usd")), event.get("num_turns")
        seconds = (event.get("duration_ms") or 0) / 1000
        mark = "FAILED" if event.get("is_error") else "DONE"
        return [
            f"== {mark} after {seconds:.1f}s, {turns} turns, {cost}: {event.get('result') or ''}"
        ]
    return []


def render_block(block):
    """Lines for one content block of an assistant or user message."""
    if block.get("type") == "text" and block.get("text", "").strip():
        return block["text"].strip().splitlines()
    if block.get("type") == "tool_use":
        return [f"-> {describe_tool_use(block)}"]
    if block.get("type") == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            content = "\n".join(b.get("text", "") for b in content if isinstance(b, dict))
        return tool_output_lines(content, bool(block.get("is_error")))
    return []


def tool_output_lines(content, is_error):
    """A tool's output: its first LOGS_TOOL_OUTPUT_LINES lines (an error whole), then how many more."""
    lines = [line.rstrip() for line in strip_control(str(content or "")).strip("\n").splitlines()]
    if not any(line.strip() for line in lines):
        return ["<- (no output)"]
    shown = lines if is_error else lines[:LOGS_TOOL_OUTPUT_LINES]
    more = len(lines) - len(shown)
    return [
        f"<- {shown[0]}",
        *(f"   {line}" for line in shown[1:]),
        *(
            [f"   … {more} more line{'s' if more != 1 else ''} (logs --raw shows all)"]
            if more
            else []
        ),
    ]


def render_orchestra_event(event):
    """Lines for orchestra's own events in an agent's log."""
    what = event.get("event")
    if what == "spawn":
        return [
            f"== spawned on {event.get('branch')} from {event.get('base_branch') or event.get('base_commit')}: {event.get('task')}"
        ]
    if what == "setup":
        output = (event.get("output") or "").rstrip().splitlines()
        return [
            f"$ {event.get('command')}  (exit {event.get('exit_code')})",
            *(f"  {line}" for line in output),
        ]
    if what == "launch":
        return ["== resumed its session" if event.get("resume") else "== agent started"]
    if what == "approval_requested":
        return [
            f"?? waiting for approval: {event.get('tool')} (orchestra approve {event.get('request')})"
        ]
    if what in ("contained", "settings_ignored"):
        return [f"!! {event.get('message')}" + (f": {event['tool']}" if event.get("tool") else "")]
    if what == "tampered":
        return [f"!! tampered: {line}" for line in event.get("found") or []]
    if what == "approval":
        verb = "allowed" if event.get("decision") == "allow" else "denied"
        why = f" by rule {event['rule']}" if event.get("rule") else f" by {event.get('by')}"
        note = f": {event['message']}" if event.get("message") and event.get("by") != "rule" else ""
        return [f"== {verb}{why}: {event.get('tool')}{note}"]
    if what == "approval_ignored":
        return [f"!! ignored {event.get('file')}: {event.get('reason')}"]
    return render_resilience_event(event)


def readable_lines(chunk, raw):
    """Turn complete log lines into what `logs` prints."""
    lines = []
    for line in chunk.decode("utf-8", "replace").splitlines():
        if raw:
            lines.append(line)
            continue
        try:
            event = json.loads(line)
            lines.extend(render_event(event) if isinstance(event, dict) else [line])
        except ValueError:
            lines.append(line)
        except (RecursionError, TypeError, AttributeError, KeyError):
            lines.append(f"[unreadable line: {len(line)} characters]")
    return lines


def log_renderer(raw):
    """line bytes -> the lines `logs` prints for it."""
    if raw:
        return lambda line: [line.decode("utf-8", "replace")]
    return lambda line: readable_lines(line, False)


def cut_line(head, size):
    """What a log view shows of a line over LOG_LINE_CAP bytes: its start, cut, and its size."""
    text = strip_control(head[:LOG_CUT_SHOWN].decode("utf-8", "replace"))
    return [f"{text}… [line cut: {size} bytes]"]


def stream_log(path, offset, render, show):
    """Show the complete lines from `offset` on, a chunk at a time; the offset after the last one.

    Linear in the bytes read: a line longer than LOG_LINE_CAP keeps only its start in memory
    and is shown cut, with its size."""
    head, length, size = [], 0, LOGS_FIRST_CHUNK  # the unfinished line: its start, its length
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        f.seek(offset)
        while True:
            chunk = f.read(size)
            if not chunk:
                break
            size = LOG_READ_CHUNK
            offset += len(chunk)
            start, shown = 0, []
            while True:
                newline = chunk.find(b"\n", start)
                if newline < 0:
                    break
                piece = chunk[start:newline]
                if length + len(piece) <= LOG_LINE_CAP:
                    shown += render(b"".join([*head, piece]))
                else:
                    shown += cut_line(b"".join([*head, piece[:LOG_CUT_SHOWN]]), length + len(piece))
                head, length, start = [], 0, newline + 1
            rest = chunk[start:]
            if length + len(rest) <= LOG_LINE_CAP:
                head.append(rest)  # it may yet be shown whole
            else:  # it will be cut: keep its start only
                head = [b"".join([*head, rest[:LOG_CUT_SHOWN]])[:LOG_CUT_SHOWN]]
            length += len(rest)
            show(shown)
    return offset - length


def tail_lines(path, count, render, limit=None):
    """(the last `count` rendered lines, offset after the last complete line, True if `limit` cut it).

    Reads backwards from the end in blocks, looking at each byte once (linear, whatever the
    line lengths); a line over LOG_LINE_CAP bytes is read only for its start and shown cut.
    An unfinished last line is left for later.
    """
    found, end, cut = [], None, False
    with open(path, "rb") as f:
        pos = size = f.seek(0, os.SEEK_END)
        line_end, block = None, b""  # where the line being looked for ends (its newline)
        while len(found) < count:
            if pos == 0:
                if end is not None and line_end <= len(block):
                    found[:0] = render(block[:line_end])  # the file's first line
                elif end is not None:
                    found[:0] = render_span(f, 0, line_end, render)
                break
            if limit is not None and size - pos >= limit:
                cut = True
                break
            step = min(LOG_TAIL_BLOCK, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            at = len(block)
            while len(found) < count:
                newline = block.rfind(b"\n", 0, at)
                if newline < 0:
                    break
                if end is None:
                    end = pos + newline + 1
                elif line_end - pos <= len(block):  # the whole line is in this block
                    found[:0] = render(block[newline + 1 : line_end - pos])
                else:  # a line across blocks: read again, its start only when it is long
                    found[:0] = render_span(f, pos + newline + 1, line_end, render)
                line_end, at = pos + newline, newline
    return (found[-count:] if count else []), (pos if end is None else end), cut


def render_span(f, start, stop, render):
    """The rendered lines of the bytes [start, stop) of a log, cut when over LOG_LINE_CAP."""
    f.seek(start)
    if stop - start <= LOG_LINE_CAP:
        return render(f.read(stop - start))
    return cut_line(f.read(min(LOG_CUT_SHOWN, stop - start)), stop - start)


# ======================================================================================
# Sessions: transcripts
# --------------------------------------------------------------------------------------
# The user's own Claude Code sessions: list the recent ones, resume one in its cwd. A
# listing stats every transcript, sorts by mtime, and reads only the first and last
# SESSION_WINDOW_BYTES of the few it shows, plus one pass over those to count messages.
# What it learns is kept in the user's cache folder by size and mtime (CountCache), so
# the next listing reads only transcripts that are new or changed, and of one that only
# grew, only what was appended. Nothing here writes to the session store.
# ======================================================================================

SESSION_WINDOW_BYTES = 64 * 1024  # of each end of a transcript, as Claude Code's own picker reads
SESSION_PROMPT_LIMIT = 200  # characters of a prompt kept, as Claude Code does for titles
SESSION_CACHE_FILE = "claude-orchestra/session-counts.json"  # under $XDG_CACHE_HOME or ~/.cache
SESSION_CACHE_VERSION = 3  # 2: messages are prompts and replies; 3: whole descriptions kept
# transcripts remembered (the most recent): every one a store holds, in practice
SESSION_CACHE_LIMIT = 200_000
SESSION_RECENT_IDS = 8  # assistant message ids remembered to count each API response once
SESSION_MARK_BYTES = 64  # bytes before a saved offset that must be unchanged to count on from it
SESSION_ID_RE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)
# Claude Code's picker skips prompts that open with a lowercase XML-like tag (<command-message>,
# <local-command-stdout>, <system-reminder>...) and interruption notices; "Warmup" is 2.0's probe.
SESSION_SKIP_PROMPT_RE = re.compile(
    r"^(?:\s*<[a-z][\w-]*[\s>]|\[Request interrupted by user[^\]]*\])"
)
SESSION_SKIP_PROMPTS = ("Warmup",)
SESSION_COMMAND_RE = re.compile(r"<command-name>(.*?)</command-name>", re.DOTALL)
SESSION_BASH_INPUT_RE = re.compile(r"<bash-input>(.*?)</bash-input>", re.DOTALL)
SESSION_SYNTHETIC_MODEL = "<synthetic>"  # what Claude Code writes for its own error messages
SESSION_USER_MARKERS = ('"type":"user"', '"type": "user"')
# A line holding a tool result is never a message, and these markers occur only as JSON structure
# (inside a string value the quotes would be escaped), so such lines need no parsing.
SESSION_NOT_MESSAGE_MARKERS = (b'"type":"tool_result"', b'"type": "tool_result"')
SESSION_MESSAGE_RE = re.compile(rb'"type": ?"(?:user|assistant)"')  # a user or an assistant line
# An assistant line is a message only if it holds text: a text block or a string content.
SESSION_PROMPT_OR_REPLY_MARKERS = (
    *(m.encode() for m in SESSION_USER_MARKERS),
    *(b'"type":"text"', b'"type": "text"', b'"content":"', b'"content": "'),
)
SESSION_COUNT_CHUNK = 1024 * 1024  # bytes of a transcript read at a time to count its messages
SESSION_TITLE_FIELDS = (
    ("agent-name", "agentName"),
    ("custom-title", "customTitle"),
    ("ai-title", "aiTitle"),
)
# The metadata keys a window is searched for once, in one pass: most transcripts hold few of them.
SESSION_METADATA_KEY_RE = re.compile(
    '"(' + "|".join([*(key for _, key in SESSION_TITLE_FIELDS), "lastPrompt", "summary"]) + ')(?=")'
)


class SessionFile(NamedTuple):
    """A transcript in the store, known from its name and a stat alone."""

    path: str
    session_id: str
    size: int
    mtime: float


class SessionWindow(NamedTuple):
    """The decoded first and last bytes of a transcript, and their whole lines."""

    head: str  # may end inside a line
    tail: str  # may start inside a line
    head_lines: list
    tail_lines: list
    whole: bool  # the head is the whole file (and so is the tail)
    keys: frozenset  # the SESSION_METADATA_KEY_RE keys the head or tail mentions

    def parts(self, tail_first=False):
        """The line lists to search: one when the file fits in the head."""
        if self.whole:
            return [self.head_lines]
        return (
            [self.tail_lines, self.head_lines] if tail_first else [self.head_lines, self.tail_lines]
        )


class Session(NamedTuple):
    """What a listing shows about one session (None where the file does not say)."""

    session_id: str
    path: str
    size: int
    mtime: float
    cwd: str
    branch: str
    title: str
    first_prompt: str
    model: str
    version: str
    messages: int = None
    agent: str = None


class Found(NamedTuple):
    """A session to show, with what a legacy summary in another shown file needs of it."""

    session: Session
    summaries: dict  # {leaf uuid: text} of the summary lines this file holds
    untitled: bool  # it has no better title: a summary whose leaf is at its end may title it


# --- where sessions live -------------------------------------------------------------


def claude_projects_dir(env):
    """$CLAUDE_CONFIG_DIR/projects, else ~/.claude/projects."""
    configured = env.get(CLAUDE_CONFIG_ENV)
    if configured:
        return Path(os.path.expanduser(configured)) / "projects"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".claude" / "projects"


def is_session_file_name(name):
    """Only <uuid>.jsonl files are sessions (agent-*.jsonl are subagent transcripts)."""
    return name.endswith(".jsonl") and SESSION_ID_RE.fullmatch(name[: -len(".jsonl")]) is not None


def scan_session_files(projects_dir):
    """(every session file directly inside a project folder, how many could not be read)."""
    try:
        folders = [e.path for e in os.scandir(projects_dir) if e.is_dir()]
    except OSError:
        return [], 1
    files, skipped = [], 0
    for folder in folders:
        skipped += session_files_in(folder, files)
    return files, skipped


def session_files_in(folder, files):
    """Append a project folder's session files to `files`; how many could not be read."""
    try:
        entries = [e for e in os.scandir(folder) if is_session_file_name(e.name)]
    except OSError:
        return 1
    skipped = 0
    for entry in entries:
        try:
            info = entry.stat()
        except OSError:  # a dangling link, or removed since the listing
            skipped += 1
            continue
        # Never open a FIFO or a device (it could block); an empty file holds no session yet.
        if stat.S_ISREG(info.st_mode) and info.st_size > 0:
            session_id = entry.name[: -len(".jsonl")].lower()
            files.append(SessionFile(entry.path, session_id, info.st_size, info.st_mtime))
    return skipped


def newest_first(files, cutoff):
    """Files touched at or after `cutoff` (all when None), most recent first."""
    chosen = [f for f in files if cutoff is None or f.mtime >= cutoff]
    chosen.sort(key=lambda f: (-f.mtime, f.session_id))
    return chosen


# --- reading a transcript cheaply ----------------------------------------------------


def read_window(path, size, window=SESSION_WINDOW_BYTES):
    """The first and last `window` bytes of a transcript, decoded, with their whole lines."""
    with open(path, "rb") as f:
        head_bytes = f.read(window)
        whole = len(head_bytes) < window
        if not whole:
            f.seek(max(size - window, 0))
        tail_bytes = head_bytes if whole else f.read(window)
    head = head_bytes.decode("utf-8", "replace")
    tail = head if whole else tail_bytes.decode("utf-8", "replace")
    # Split on "\n" alone: JSON text may hold a raw U+2028, which str.splitlines() would cut.
    head_lines, tail_lines = head.split("\n"), tail.split("\n")
    if not whole:
        head_lines.pop()  # ends inside a line
        tail_lines.pop(0)  # starts inside a line
    keys = SESSION_METADATA_KEY_RE.findall(head) + (
        [] if whole else SESSION_METADATA_KEY_RE.findall(tail)
    )
    return SessionWindow(head, tail, head_lines, tail_lines, whole, frozenset(keys))


def parse_line(line):
    """One JSONL record as a dict; None for a half-written, corrupt or non-object line."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def records_with(lines, markers):
    """Parse only the lines holding one of `markers`: a substring test is far cheaper than JSON."""
    for line in lines:
        for marker in markers:
            if marker in line:
                record = parse_line(line)
                if record is not None:
                    yield record
                break


_FIELD_PATTERNS = {}


def field_pattern(key):
    """A regex for `"key": "<string>"` in raw JSON text; group 1 is the escaped string.

    An unescaped `"key":"` occurs only as JSON structure, never inside a string value,
    so this is safe on raw lines, even partial ones (the head of a 50 MB line).
    """
    if key not in _FIELD_PATTERNS:
        _FIELD_PATTERNS[key] = re.compile(rf'"{re.escape(key)}"\s*:\s*"((?:[^"\\\n]|\\.)*)"')
    return _FIELD_PATTERNS[key]


def unescape(raw):
    """The value of an escaped JSON string body."""
    try:
        return json.loads(f'"{raw}"')
    except ValueError:
        return raw


def last_in_lines(lines, key, skip=()):
    """The last value of a string field in `lines`, searched from the end, one line at a time."""
    pattern = field_pattern(key)
    for line in reversed(lines):
        for raw in reversed(pattern.findall(line)):
            value = unescape(raw)
            if value not in skip:
                return value
    return None


def first_field(window, key):
    """A string field's first value in the head, else its last in the tail."""
    match = field_pattern(key).search(window.head)
    if match:
        return unescape(match.group(1))
    return last_in_lines(window.tail_lines, key) or last_in_lines([window.tail], key)


def last_field(window, key, skip=()):
    """A string field's last value in the tail, else its first in the head."""
    value = last_in_lines(window.tail_lines, key, skip) or last_in_lines([window.tail], key, skip)
    if value is None:
        value = next(
            (v for v in map(unescape, field_pattern(key).findall(window.head)) if v not in skip),
            None,
        )
    return value


# --- titles and prompts --------------------------------------------------------------


def flatten(text, limit=SESSION_PROMPT_LIMIT):
    """Text on one line: control characters gone, whitespace runs collapsed, cut to `limit`."""
    text = " ".join(strip_control(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def message_texts(record):
    """The text parts of a user record; None when it carries a tool result."""
    message = record.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return [content]
    texts = []
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            return None
        if (
            isinstance(block, dict)
            and block.get("type") == "text"
            and isinstance(block.get("text"), str)
        ):
            texts.append(block["text"])
    return texts


def prompt_of(record):
    """(prompt, slash command) a user record offers as its session's first prompt.

    As Claude Code's picker: meta, sidechain, compact-summary and tool-result lines say
    nothing; a <command-name> is only a fallback; <bash-input> reads as "! cmd"; tagged
    text, interruption notices and "Warmup" are skipped.
    """
    if record.get("type") != "user" or record.get("isMeta") or record.get("isSidechain"):
        return None, None
    if record.get("isCompactSummary"):
        return None, None
    command = None
    for text in message_texts(record) or []:
        text = text.strip()
        named = SESSION_COMMAND_RE.search(text)
        bash_input = SESSION_BASH_INPUT_RE.search(text)
        if named:
            command = command or flatten(named.group(1))
        elif bash_input:
            return flatten("! " + bash_input.group(1).strip()), command
        elif text and text not in SESSION_SKIP_PROMPTS and not SESSION_SKIP_PROMPT_RE.match(text):
            return flatten(text), command
    return None, command


def first_prompt(window):
    """The first meaningful user prompt, else the first slash command: head, then tail."""
    for lines in window.parts():
        fallback = None
        for record in records_with(lines, SESSION_USER_MARKERS):
            prompt, command = prompt_of(record)
            if prompt:
                return prompt
            fallback = fallback or command
        if fallback:
            return fallback
    return ""


def metadata_value(window, kind, key):
    """The latest non-empty `key` of a `kind` metadata line, tail before head."""
    if key not in window.keys:  # the usual case, known without a loop over the lines
        return None
    marker = f'"{key}"'
    for lines in window.parts(tail_first=True):
        for record in records_with(reversed(lines), (marker,)):
            value = record.get(key)
            if record.get("type") == kind and isinstance(value, str) and value.strip():
                return value
    return None


def legacy_summaries(window):
    """{leaf uuid: text} of the 1.0.x `summary` lines in a transcript's head and tail."""
    found = {}
    if "summary" not in window.keys:
        return found
    for lines in window.parts():
        for record in records_with(lines, ('"summary"',)):
            text = record.get("summary")
            if record.get("type") == "summary" and isinstance(text, str) and text.strip():
                found[str(record.get("leafUuid", ""))] = text
    return found


def window_uuids(window, tail_only=False):
    """The uuids of the records in a transcript's head and tail (or tail alone)."""
    texts = (window.tail,) if tail_only or window.whole else (window.head, window.tail)
    return {uuid for text in texts for uuid in field_pattern("uuid").findall(text)}


def own_summary(window):
    """A legacy summary about this very transcript: one whose leaf it holds.

    1.0.x wrote a session's summary into the *next* session's file, so a summary whose
    leaf is elsewhere describes another session and must not title this one.
    """
    summaries = legacy_summaries(window)
    uuids = window_uuids(window) if summaries else ()
    return next((text for leaf, text in summaries.items() if leaf in uuids), None)


def named_title(window):
    """A title the session was given (agent name, custom or AI title, own summary), if any."""
    for kind, key in SESSION_TITLE_FIELDS:
        value = metadata_value(window, kind, key)
        if value:
            return value
    return own_summary(window)


def choose_title(window, session_id):
    """Claude Code's title order: agent name, custom title, AI title, legacy summary,
    last prompt or first meaningful prompt, id prefix."""
    title = named_title(window) or metadata_value(window, "last-prompt", "lastPrompt")
    return flatten(title or "") or first_prompt(window) or session_id[:SESSION_ID_SHORT]


def describe_session(file, window=None):
    """What the head and tail of a transcript say about its session (no message count)."""
    window = window or read_window(file.path, file.size)
    return Session(
        session_id=file.session_id,
        path=file.path,
        size=file.size,
        mtime=file.mtime,
        cwd=first_field(window, "cwd"),
        branch=last_field(window, "gitBranch"),
        title=choose_title(window, file.session_id),
        first_prompt=first_prompt(window),
        model=session_model(window),
        version=last_field(window, "version"),
    )


def own_assistant_model(record):
    """The model of a top-level assistant record of the session itself, else None.

    Sidechain (sub-agent) lines and the assistant messages nested in `progress` lines
    name other models; Claude Code's own error messages name `<synthetic>`.
    """
    if record.get("type") != "assistant" or record.get("isSidechain"):
        return None
    message = record.get("message")
    model = message.get("model") if isinstance(message, dict) else None
    return model if isinstance(model, str) and model and model != SESSION_SYNTHETIC_MODEL else None


def session_model(window):
    """The model of the session's own latest assistant reply: tail first, then head."""
    for lines in window.parts(tail_first=True):
        for record in records_with(reversed(lines), ('"model"',)):
            model = own_assistant_model(record)
            if model:
                return model
    return None


def has_reply_text(message):
    """True when an assistant message holds text a user reads (not only tool calls or thinking)."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return bool(content.strip())
    return any(
        isinstance(b, dict) and b.get("type") == "text" and str(b.get("text", "")).strip()
        for b in content or []
        if isinstance(content, list)
    )


def is_counted_message(record, recent_ids):
    """True for a message a user would recognise that has not been counted yet.

    Messages are the user's prompts (typed text or a slash command; not tool results,
    meta lines, compact summaries or sub-agent lines) and the assistant's replies (API
    responses holding text; tool calls are not messages). One API response is written
    as one assistant line per content block, all sharing message.id: it counts once.
    """
    if record is None or record.get("isSidechain") or record.get("isMeta"):
        return False
    if record.get("type") == "user":
        return any(prompt_of(record))
    if record.get("type") != "assistant" or not has_reply_text(record.get("message")):
        return False
    message_id = record["message"].get("id")
    if not isinstance(message_id, str):
        return True
    if message_id in recent_ids:
        return False
    recent_ids[:] = [*recent_ids[1 - SESSION_RECENT_IDS :], message_id]
    return True


def read_mark(f, offset):
    """A checksum of the bytes just before `offset`: unchanged means the file only grew."""
    f.seek(max(0, offset - SESSION_MARK_BYTES))
    return zlib.crc32(f.read(min(offset, SESSION_MARK_BYTES)))


def resume_point(f, size, previous):
    """(count, offset, recent ids) to go on from: `previous` if the file only grew since."""
    try:
        offset, count, recent = (
            int(previous["offset"]),
            int(previous["count"]),
            list(previous["recent"]),
        )
        if 0 < offset <= size and read_mark(f, offset) == previous["mark"]:
            return count, offset, [str(i) for i in recent]
    except (KeyError, TypeError, ValueError):  # no previous run, or a damaged cache entry
        pass
    return 0, 0, []


def line_blocks(f, unfinished):
    """Blocks of whole lines read from `f` in order; the bytes after the last newline go to `unfinished`."""
    pieces = []
    for chunk in iter(lambda: f.read(SESSION_COUNT_CHUNK), b""):
        cut = chunk.rfind(b"\n") + 1
        if cut == 0:  # inside a long line: keep it in pieces, joined once (not regrown per chunk)
            pieces.append(chunk)
            continue
        yield b"".join([*pieces, chunk[:cut]])
        pieces = [chunk[cut:]]
    unfinished.append(b"".join(pieces))


def may_be_message(line):
    """False for a line that cannot be a message, known without parsing it."""
    for marker in SESSION_NOT_MESSAGE_MARKERS:  # loops, not any(): this runs for most lines
        if marker in line:
            return False
    for marker in SESSION_PROMPT_OR_REPLY_MARKERS:  # noqa: SIM110
        if marker in line:
            return True
    return False


def message_lines(block):
    """The lines of a block of whole lines that may be messages, found by a search, not a line loop."""
    pos = 0
    while True:
        match = SESSION_MESSAGE_RE.search(block, pos)
        if match is None:
            return
        start = max(pos, block.rfind(b"\n", pos, match.start()) + 1)
        pos = block.index(b"\n", match.end()) + 1
        if may_be_message(block[start:pos]):
            yield block[start:pos]


def count_messages(path, size, previous=None):
    """(state to remember, message count) of a transcript, in one streaming pass.

    Only lines holding a user or assistant type marker (and, for a reply, text) are
    parsed; the progress, snapshot, tool and request lines that make up most of a
    transcript are not. Given the state of an earlier pass, only what was appended
    since is read. A last line without its newline is counted but not remembered: it
    may still be being written.
    """
    with open(path, "rb") as f:
        count, offset, recent = resume_point(f, size, previous or {})
        f.seek(offset)
        unfinished = []
        for block in line_blocks(f, unfinished):
            for line in message_lines(block):
                count += int(
                    is_counted_message(parse_line(line.decode("utf-8", "replace")), recent)
                )
            offset += len(block)
        last = unfinished[0].decode("utf-8", "replace")
        pending = int(is_counted_message(parse_line(last), list(recent))) if last else 0
        state = {"count": count, "offset": offset, "recent": recent, "mark": read_mark(f, offset)}
    return state, count + pending


def session_cache_path(env):
    """Where message counts are kept between runs: the user's cache folder."""
    base = env.get("XDG_CACHE_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".cache"
    )
    return Path(base) / SESSION_CACHE_FILE


class CountCache:
    """Descriptions and message counts of transcripts kept between runs, by size and mtime.

    A listing then reads nothing of an unchanged transcript, and of one that grew only
    what was appended since the last run (its description is read again). The cache
    only saves time: a missing, damaged or unwritable cache changes no output.
    """

    def __init__(self, path, entries):
        self.path, self.entries, self.changed = path, entries, False

    @classmethod
    def load(cls, env):
        """The cache of the user's cache folder; empty if missing or damaged."""
        path = session_cache_path(env)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        ok = isinstance(data, dict) and data.get("version") == SESSION_CACHE_VERSION
        entries = data.get("files") if ok else None
        return cls(path, entries if isinstance(entries, dict) else {})

    def entry(self, file):
        """(the entry of a transcript, whether it was made at the file's current size and mtime)."""
        entry = self.entries.get(file.path)
        entry = entry if isinstance(entry, dict) else {}
        return entry, entry.get("size") == file.size and entry.get("mtime") == file.mtime

    def count(self, file):
        """The message count of a transcript, reading as little of it as possible."""
        entry, unchanged = self.entry(file)
        if unchanged and isinstance(entry.get("total"), int):
            return entry["total"]
        state, total = count_messages(file.path, file.size, entry)
        kept = {"about": entry["about"]} if unchanged and "about" in entry else {}
        self.entries[file.path] = {
            **kept,
            **state,
            "size": file.size,
            "mtime": file.mtime,
            "total": total,
        }
        self.changed = True
        return total

    def about(self, file):
        """The Found an earlier run described for an unchanged transcript (no count); else None."""
        entry, unchanged = self.entry(file)
        about = entry.get("about") if unchanged else None
        try:
            cwd, branch, title, prompt, model, version, summaries, untitled = about
            session = Session(
                file.session_id,
                file.path,
                file.size,
                file.mtime,
                cwd,
                branch,
                title,
                prompt,
                model,
                version,
            )
            return Found(session, dict(summaries), bool(untitled))
        except (TypeError, ValueError):  # not described yet, or a damaged entry
            return None

    def learn(self, file, found, state, total):
        """What describing and counting a transcript found elsewhere (read_in_parallel)."""
        self.remember(file, found)
        self.entries[file.path].update(state, total=total)

    def remember(self, file, found):
        """Keep what the head and tail of a transcript said, for the runs to come."""
        entry, unchanged = self.entry(file)
        entry = entry if unchanged else {"size": file.size, "mtime": file.mtime}
        session = found.session
        entry["about"] = [
            session.cwd,
            session.branch,
            session.title,
            session.first_prompt,
            session.model,
            session.version,
            found.summaries,
            found.untitled,
        ]
        self.entries[file.path] = entry
        self.changed = True

    def save(self, files):
        """Keep the entries of transcripts still in the store, the most recent first."""
        if not self.changed:
            return
        mtimes = {f.path: f.mtime for f in files}
        kept = sorted((p for p in self.entries if p in mtimes), key=lambda p: -mtimes[p])
        document = {
            "version": SESSION_CACHE_VERSION,
            "files": {p: self.entries[p] for p in kept[:SESSION_CACHE_LIMIT]},
        }
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(document, separators=(",", ":")), durable=False)


# ======================================================================================
# Sessions: listing
# --------------------------------------------------------------------------------------
# Which sessions a listing shows and how: the repository a session's cwd belongs to (even a
# worktree since deleted), which of them are orchestra's own agents, the newest first within
# --hours and --limit, and a table that fits the terminal (only the last column is cut).
# ======================================================================================

SESSION_CWD_PROBE_BYTES = 8 * 1024  # enough to reach the first line that names a cwd
# A listing with at least this many transcripts to read (a first run) reads them on every core.
SESSION_PARALLEL_MIN = 200
SESSION_PARALLEL_CHUNK = 8  # transcripts a worker reads per task: few, so the big ones spread out
SESSION_TABLE_GAP = "  "
SECONDS_PER_HOUR = 3600
# Table columns: (name, widest it gets; None: as wide as its widest cell). The title then takes
# whatever room is left.
SESSION_COLUMNS = (
    ("ID", None),
    ("ACTIVE", None),
    ("AGE", None),
    ("MSGS", None),
    ("MODEL", None),
    ("AGENT", 24),
    ("BRANCH", 28),
    ("PROJECT", 40),
    ("TITLE", 40),
)
# How a table too wide for the terminal is fitted, step by step, until it fits:
# (column, width to cut it to; None: leave the column out).
SESSION_FIT_STEPS = (
    ("ACTIVE", None),
    ("PROJECT", 24),
    ("MODEL", None),
    ("TITLE", 30),
    ("PROJECT", 12),
    ("BRANCH", 10),
    ("AGENT", 10),
    ("MSGS", None),
    ("TITLE", 16),
)
SESSION_RIGHT_ALIGNED = ("AGE", "MSGS")
SESSION_ACTIVE_FORMAT = "%m-%d %H:%M"
SESSION_MODEL_DATE_RE = re.compile(r"-\d{8}$")


class ProjectFilter(NamedTuple):
    """One repository with all its worktrees, or a plain folder outside git."""

    root: str  # main worktree of the repository, or the folder itself
    common_dir: str  # real path of the git common dir; None outside git
    worktrees: tuple  # worktree paths git or orchestra still knows, even if their folder is gone


class Listing(NamedTuple):
    """A listing's rows and what the user should be told about the rest."""

    sessions: list
    total: int  # session files in the store
    in_window: int  # of those, touched inside the time window
    skipped: int  # files that could not be read
    truncated: bool  # more sessions may match than were shown


# --- which repository a directory belongs to -----------------------------------------


def nearest_existing(directory):
    """The directory itself or its nearest ancestor that exists; None if none does."""
    path = os.path.abspath(directory)
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path


def common_dir_of_gitfile(dot_git):
    """The common dir a linked worktree's `.git` file leads to (a submodule's own git dir)."""
    try:
        with open(dot_git, encoding="utf-8", errors="replace") as f:
            text = f.readline().strip()
    except OSError:
        return None
    if not text.startswith("gitdir:"):
        return None
    git_dir = os.path.join(os.path.dirname(dot_git), text[len("gitdir:") :].strip())
    try:
        with open(os.path.join(git_dir, "commondir"), encoding="utf-8") as f:
            return os.path.realpath(os.path.join(git_dir, f.read().strip()))
    except OSError:
        return os.path.realpath(git_dir)


def git_common_dir(directory, cache):
    """Real path of the git common dir of `directory`'s repository, without running git.

    Walks up from the nearest existing folder as git does, so a vanished worktree under
    the main one (.worktrees/task-x) still resolves to its repository. `cache` maps
    every folder visited to its answer: sessions share few distinct folders.
    """
    path, visited, found = nearest_existing(directory), [], None
    while path is not None and path not in cache:
        visited.append(path)
        dot_git = os.path.join(path, ".git")
        if os.path.isdir(dot_git):
            found = os.path.realpath(dot_git)
            break
        if os.path.isfile(dot_git):
            found = common_dir_of_gitfile(dot_git)
            break
        parent = os.path.dirname(path)
        path = parent if parent != path else None
    else:
        found = cache[path] if path is not None else None
    for folder in visited:
        cache[folder] = found
    return found


def main_worktree_of(common_dir):
    """The main worktree of a repository, from its common dir (<repo>/.git)."""
    return os.path.dirname(common_dir) if os.path.basename(common_dir) == ".git" else common_dir


def registered_worktrees(common_dir):
    """Worktree paths git still registers, including ones whose folder has gone."""
    admin, paths = os.path.join(common_dir, "worktrees"), []
    try:
        names = sorted(os.listdir(admin))
    except OSError:
        return paths
    for name in names:
        try:
            with open(os.path.join(admin, name, "gitdir"), encoding="utf-8") as f:
                paths.append(os.path.dirname(f.read().strip()))
        except OSError:
            continue
    return paths


def is_within(path, folder):
    """True if `path` is `folder` or lies under it (plain path comparison)."""
    path, folder = os.path.normpath(path), os.path.normpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def project_filter(path):
    """The repository holding `path` with all its worktrees; outside git, the folder itself."""
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise OrchestraError(f"--project: no folder {path}; give a folder inside the repository")
    common = git_common_dir(real, {})
    if common is None:
        return ProjectFilter(real, None, (real,))
    repo = str(find_repo(Path(real)))
    records = load_agent_records(Path(repo))
    worktrees = [repo, *registered_worktrees(common)]
    worktrees += [
        str(r["worktree"]) for r in records.values() if isinstance(r, dict) and r.get("worktree")
    ]
    return ProjectFilter(repo, common, tuple(dict.fromkeys(worktrees)))


def in_project(cwd, project, cache):
    """True if a session's recorded cwd belongs to the project's repository."""
    if not cwd:
        return False
    if project.common_dir is None:
        return is_within(os.path.realpath(cwd), project.root)
    if git_common_dir(cwd, cache) == project.common_dir:
        return True
    # A removed worktree outside the main one: git (until pruned) or orchestra still knows it.
    return not os.path.isdir(cwd) and any(is_within(cwd, w) for w in project.worktrees)


def probe_cwd(file):
    """A transcript's cwd from a small read of its head; None when not found there."""
    with open(file.path, "rb") as f:
        match = field_pattern("cwd").search(
            f.read(SESSION_CWD_PROBE_BYTES).decode("utf-8", "replace")
        )
    return unescape(match.group(1)) if match else None


# --- orchestra agents ----------------------------------------------------------------


class AgentIndex:
    """Orchestra agents of the repositories met so far, to mark and find their sessions."""

    def __init__(self):
        self.records = {}  # agent id -> (main worktree, record)
        self.loaded = set()  # main worktrees whose state has been read
        self.lookup = None  # ({session id: agent id}, {worktree: agent id}), rebuilt after a load

    def load(self, repo):
        """Add the agents of one repository's state, once."""
        if repo not in self.loaded:
            self.loaded.add(repo)
            for agent_id, record in load_agent_records(Path(repo)).items():
                if isinstance(record, dict):
                    self.records[str(agent_id)] = (repo, record)
            self.lookup = None

    def load_for(self, cwd, cache):
        """Add the agents of the repository a directory belongs to."""
        common = git_common_dir(cwd, cache) if cwd else None
        if common:
            self.load(main_worktree_of(common))

    def find(self, session_id, cwd):
        """The agent that ran a session: by session id, else by worktree (the first id in order wins)."""
        if self.lookup is None:
            by_session, by_worktree = {}, {}
            for agent_id, (_, record) in sorted(self.records.items()):
                by_session.setdefault(str(record.get("session_id") or "").lower(), agent_id)
                if record.get("worktree"):
                    by_worktree.setdefault(os.path.normpath(str(record["worktree"])), agent_id)
            self.lookup = by_session, by_worktree
        by_session, by_worktree = self.lookup
        found = by_session.get(session_id) if session_id else None
        return found or (by_worktree.get(os.path.normpath(cwd)) if cwd else None)

    def record(self, agent_id):
        """(main worktree, record) of an agent; (None, {}) when unknown."""
        return self.records.get(agent_id or "", (None, {}))

    def session_of(self, agent_id):
        """The session id an agent recorded, if any."""
        return str(self.record(agent_id)[1].get("session_id") or "").lower() or None


# --- listing -------------------------------------------------------------------------


def describe_found(file):
    """The Found of a transcript, from its head and tail (no message count)."""
    window = read_window(file.path, file.size)
    untitled = not named_title(window)
    return Found(describe_session(file, window), legacy_summaries(window), untitled)


def read_transcript(job):
    """A worker's part of read_in_parallel: (path, (Found, count state, total) or None)."""
    file, entry = job
    try:
        found = describe_found(file)
        state, total = count_messages(file.path, file.size, entry)
    except OSError:  # unreadable, or removed since the scan: the listing says so itself
        return file.path, None
    return file.path, (found, state, total)


def read_in_parallel(files, counts):
    """Describe and count the new or changed transcripts among `files` on every core, into
    `counts`, when there are enough of them to pay for starting processes (a first run).

    Only where processes can fork (the workers inherit the module as it is), and only from a
    process with no other thread (the web server has them): a lock another thread holds at the
    fork stays held in the child for ever. Elsewhere, and when anything goes wrong, the listing
    simply reads them itself, one by one.
    """
    todo = [f for f in files if counts.about(f) is None or not counts.entry(f)[1]]
    workers = min(os.cpu_count() or 1, len(todo) // SESSION_PARALLEL_MIN + 1)
    if len(todo) < SESSION_PARALLEL_MIN or workers < 2 or threading.active_count() > 1:
        return
    import multiprocessing  # here, not at the top: only a first run over many files needs it

    if "fork" not in multiprocessing.get_all_start_methods():
        return
    by_path = {f.path: f for f in todo}
    jobs = [(f, counts.entry(f)[0]) for f in todo]
    with contextlib.suppress(OSError), multiprocessing.get_context("fork").Pool(workers) as pool:
        for path, read in pool.imap_unordered(read_transcript, jobs, SESSION_PARALLEL_CHUNK):
            if read is not None:
                counts.learn(by_path[path], *read)


def session_for(file, project, cache, counts):
    """The Found of a file if it belongs to the project, with its message count; else None.

    An unchanged transcript is described from the cache; only a new or changed one is read.
    """
    found = counts.about(file)
    if found is None:
        if project is not None:
            cwd = probe_cwd(file)
            if cwd is not None and not in_project(cwd, project, cache):
                return None
        found = describe_found(file)
        counts.remember(file, found)
    if project is not None and not in_project(found.session.cwd, project, cache):
        return None
    return found._replace(session=found.session._replace(messages=counts.count(file)))


def collect_sessions(candidates, project, limit, counts):
    """([Found] for up to `limit` candidates, how many were unreadable, whether more remain)."""
    cache, found, skipped = {}, [], 0
    for file in candidates:
        if len(found) == limit:
            return found, skipped, True
        try:
            described = session_for(file, project, cache, counts)
        except OSError:  # unreadable, or removed since the scan
            skipped += 1
            continue
        if described is not None:
            found.append(described)
    return found, skipped, False


def end_uuids(session):
    """The uuids at the end of a transcript, where a legacy summary's leaf is; empty if unreadable."""
    try:
        return window_uuids(read_window(session.path, session.size), tail_only=True)
    except OSError:
        return set()


def apply_legacy_summaries(found):
    """The sessions, titled by 1.0.x summaries that another shown transcript wrote about them.

    Only when a shown transcript holds such a summary are the ends of the untitled ones read.
    """
    by_leaf = {leaf: text for item in found for leaf, text in item.summaries.items()}
    sessions = []
    for session, _, untitled in found:
        leaves = sorted(end_uuids(session)) if by_leaf and untitled else ()
        summary = next((by_leaf[leaf] for leaf in leaves if leaf in by_leaf), None)
        sessions.append(session._replace(title=flatten(summary)) if summary else session)
    return sessions


def list_sessions(projects_dir, now, hours, project, limit, counts):
    """The newest sessions of the store, described and marked with their orchestra agents."""
    files, unreadable = scan_session_files(projects_dir)
    candidates = newest_first(files, None if hours is None else now - hours * SECONDS_PER_HOUR)
    if project is None:  # each candidate is shown, up to the limit: read them all at once
        read_in_parallel(candidates[:limit], counts)
    found, skipped, truncated = collect_sessions(candidates, project, limit, counts)
    counts.save(files)
    agents, cache, sessions = AgentIndex(), {}, []
    for session in apply_legacy_summaries(found):
        agents.load_for(session.cwd, cache)
        sessions.append(session._replace(agent=agents.find(session.session_id, session.cwd)))
    return Listing(sessions, len(files), len(candidates), unreadable + skipped, truncated)


# --- output --------------------------------------------------------------------------


def session_json(session, now):
    """One session as `sessions --json` shows it."""
    return {
        "id": session.session_id,
        "title": session.title,
        "first_prompt": session.first_prompt,
        "cwd": session.cwd,
        "cwd_exists": bool(session.cwd) and os.path.isdir(session.cwd),
        "branch": session.branch or None,
        "last_activity": utc_iso(session.mtime),
        "age_seconds": max(0, int(now - session.mtime)),
        "messages": session.messages,
        "model": session.model,
        "version": session.version,
        "size": session.size,
        "path": session.path,
        "agent": session.agent,
    }


def listing_json(listing, projects_dir, now, hours, project):
    """The whole `sessions --json` document."""
    return {
        "projects_dir": str(projects_dir),
        "hours": hours,
        "project": project.root if project else None,
        "sessions": [session_json(s, now) for s in listing.sessions],
        "total_files": listing.total,
        "in_window": listing.in_window,
        "skipped": listing.skipped,
        "truncated": listing.truncated,
    }


def cut_end(text, width):
    """Text cut to `width` with an ellipsis at the end."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def cut_start(text, width):
    """Text cut to `width` keeping its end, the telling part of a path."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def home_relative(path, env):
    """A path with the home folder written as ~."""
    home = env.get("HOME", "")
    if path and home and home != os.sep and is_within(path, home):
        return "~" + path[len(home.rstrip(os.sep)) :]
    return path or "?"


def short_model(model):
    """A model name without the claude- prefix and the date suffix."""
    model = model or ""
    return SESSION_MODEL_DATE_RE.sub(
        "", model[len("claude-") :] if model.startswith("claude-") else model
    )


def table_cells(session, now, env):
    """The text of each table column for one session."""
    return {
        "ID": session.session_id[:SESSION_ID_SHORT],
        "ACTIVE": time.strftime(SESSION_ACTIVE_FORMAT, time.localtime(session.mtime)),
        "AGE": format_age(now - session.mtime),
        "MSGS": "" if session.messages is None else str(session.messages),
        "MODEL": short_model(session.model),
        "AGENT": session.agent or "",
        "BRANCH": strip_control(session.branch or ""),
        "PROJECT": strip_control(home_relative(session.cwd, env)),
        "TITLE": session.title,
    }


def table_overflow(widths, total):
    """How many characters a row of these column widths exceeds `total` by."""
    return sum(widths.values()) + len(SESSION_TABLE_GAP) * (len(widths) - 1) - total


def column_widths(rows, total):
    """{column: width} for a table that fits `total` characters, if it can (SESSION_FIT_STEPS)."""
    names = [n for n, _ in SESSION_COLUMNS if n != "AGENT" or any(r["AGENT"] for r in rows)]
    natural = {n: max(len(n), *(len(r[n]) for r in rows)) for n in names}
    widths = {
        n: min(natural[n], widest or natural[n]) for n, widest in SESSION_COLUMNS if n in natural
    }
    for name, width in SESSION_FIT_STEPS:
        overflow = table_overflow(widths, total)
        if overflow <= 0 or name not in widths:
            continue
        if width is None:
            del widths[name]
        else:
            widths[name] = max(min(width, widths[name]), widths[name] - overflow)
    spare = -table_overflow(widths, total)
    widths["TITLE"] = max(widths["TITLE"], min(natural["TITLE"], widths["TITLE"] + spare))
    return widths


def table_row(cells, widths):
    """One aligned table line."""
    parts = []
    for name, width in widths.items():
        text = cut_start(cells[name], width) if name == "PROJECT" else cut_end(cells[name], width)
        parts.append(text.rjust(width) if name in SESSION_RIGHT_ALIGNED else text.ljust(width))
    return SESSION_TABLE_GAP.join(parts).rstrip()


def session_table(sessions, now, env, total):
    """The table's lines; a first prompt that is not the title gets a line of its own."""
    rows = [table_cells(s, now, env) for s in sessions]
    widths = column_widths(rows, total)
    lines = [table_row({n: n for n in widths}, widths)]
    indent = " " * (widths["ID"] + len(SESSION_TABLE_GAP))
    for session, cells in zip(sessions, rows):
        lines.append(table_row(cells, widths))
        if session.first_prompt and session.first_prompt != session.title:
            lines.append(cut_end(f"{indent}> {session.first_prompt}", total))
    return lines


def print_note(message):
    """A one-line remark on stderr, so stdout stays the table or the JSON."""
    print(f"orchestra: {message}", file=sys.stderr)


def listing_notes(listing, hours, project, limit):
    """What to tell the user beside the table: unreadable files, rows left out."""
    notes = []
    if listing.skipped:
        notes.append(f"skipped {listing.skipped} unreadable session file(s)")
    span = "" if hours is None else f" in the last {hours:g} hours"
    if listing.truncated:
        notes.append(f"showing the {limit} most recent sessions{span}; --limit N shows more")
    elif not listing.sessions and listing.total:
        where = f" of {project.root}" if project else ""
        hint = "; --all or --hours N shows older ones" if hours is not None else ""
        notes.append(f"no sessions{where}{span} among {listing.total}{hint}")
    return notes


# ======================================================================================
# Sessions: resuming
# --------------------------------------------------------------------------------------
# `sessions --resume ID` runs `claude --resume` in the session's own cwd, because Claude Code
# looks for a session only in the current directory's project folder. A cwd that was an
# agent's worktree is made again from its branch (or its archive) first; when nothing can
# bring it back, the user is told exactly what to run.
# ======================================================================================

SESSION_AMBIGUOUS_SHOWN = 5  # ids listed when a prefix matches several sessions
SESSION_DETAIL_PROMPTS = 200  # prompts of one session shown by the dashboard
SESSION_DETAIL_BYTES = 8 * 1024 * 1024  # of a transcript read for them


class ResumePlan(NamedTuple):
    """How to resume a session: git commands to run in `repo` first, then argv in cwd."""

    session_id: str
    cwd: str
    argv: list
    repo: str = None
    setup: tuple = ()  # git argument tuples


# --- resuming ------------------------------------------------------------------------


def match_session(files, wanted, agents):
    """The one session whose id is `wanted` or starts with it, or the session of an agent id."""
    key = wanted.strip().lower()
    matches = [f for f in files if f.session_id == key]
    matches = matches or [f for f in files if key and f.session_id.startswith(key)]
    agent_session = agents.session_of(wanted) or agent_prefix_session(agents, wanted)
    if not matches and agent_session:
        matches = [f for f in files if f.session_id == agent_session]
    ids = sorted({f.session_id for f in matches})
    if not ids:
        raise OrchestraError(
            f"no session matches '{wanted}'; run 'orchestra sessions --all' to list them"
        )
    if len(ids) > 1:
        shown = ", ".join(ids[:SESSION_AMBIGUOUS_SHOWN])
        raise OrchestraError(
            f"'{wanted}' matches {len(ids)} sessions ({shown}); type more of the id"
        )
    return max(matches, key=lambda f: f.mtime)  # one id stored in two folders: the newest copy


def agent_prefix_session(agents, prefix):
    """The session of the one agent whose id starts with prefix (as every other command accepts)."""
    sessions = {
        agents.session_of(i)
        for i in agents.records
        if i.startswith(prefix) and agents.session_of(i)
    }
    if len(sessions) > 1:
        raise OrchestraError(
            f"'{prefix}' matches the sessions of several agents; type more of the id"
        )
    return sessions.pop() if sessions else None


def candidate_repos(session, here, agents):
    """Repositories a vanished worktree may belong to, likeliest first: its agent's, the one
    around its nearest surviving folder, the current one."""
    agent_repo = agents.record(agents.find(session.session_id, session.cwd))[0]
    common = git_common_dir(session.cwd, {})
    repos = [agent_repo, main_worktree_of(common) if common else None, here]
    return list(dict.fromkeys(r for r in repos if r))


def session_branch(session, agents):
    """The branch a session worked on, as recorded, else its agent's; None if detached."""
    branch = session.branch or agents.record(agents.find(session.session_id, session.cwd))[1].get(
        "branch"
    )
    return str(branch) if branch and branch != "HEAD" else None


def is_registered(repo, path):
    """True if git still registers a worktree at `path` (whose folder may be gone)."""
    common = git_common_dir(repo, {})
    wanted = os.path.normpath(path)
    return any(
        os.path.normpath(p) == wanted for p in (registered_worktrees(common) if common else [])
    )


def plan_resume(session, here, agents):
    """How to resume a session: straight away, or after recreating its worktree."""
    if not session.cwd:
        raise OrchestraError(
            f"session {session.session_id} records no working directory, so it cannot be resumed",
            EXIT_FAILURE,
        )
    plan = ResumePlan(
        session.session_id, session.cwd, [CLAUDE_EXECUTABLE, "--resume", session.session_id]
    )
    if os.path.isdir(session.cwd):
        return plan
    branch = session_branch(session, agents)
    repos = candidate_repos(session, here, agents)
    for repo in repos if branch else []:
        if branch_exists(repo, branch):
            setup = [("worktree", "add", session.cwd, branch)]
            if is_registered(repo, session.cwd):
                # else git refuses: "already registered". Only this entry: never a global prune.
                setup.insert(0, ("worktree", "remove", "--force", session.cwd))
            return plan._replace(repo=repo, setup=tuple(setup))
    fail_unrecoverable(plan, branch, repos)


def git_command_line(repo, args):
    """A git command as a user would type it."""
    return shlex.join(["git", "-C", repo, *args])


def resume_command_lines(plan):
    """The shell commands a plan stands for, in order."""
    lines = [git_command_line(plan.repo, args) for args in plan.setup]
    return [*lines, f"cd {shlex.quote(plan.cwd)} && {shlex.join(plan.argv)}"]


def recovery_lines(plan, branch, repo):
    """Commands that would bring back a session whose folder and branch are both gone."""
    resume = f"cd {shlex.quote(plan.cwd)} && {shlex.join(plan.argv)}"
    lines = []
    archived = archived_agent_of(repo, branch)
    if archived:
        lines += [
            f"# {branch} was orchestra agent {archived}, cleaned up; its work is archived under "
            f"{ARCHIVE_REFS}/{archived}/. Bring it back with:",
            f"cd {shlex.quote(str(repo))} && orchestra restore {archived}",
            resume,
            "# or resume the conversation without its files:",
        ]
    elif branch:
        lines += [
            f"# find the last commit of {branch} among the commits no branch holds:",
            git_command_line(repo, ("fsck", "--unreachable", "--no-reflogs")),
            git_command_line(repo, ("worktree", "add", "-b", branch, plan.cwd, "<commit>")),
            resume,
            "# or resume the conversation without its files:",
        ]
    return [*lines, f"mkdir -p {shlex.quote(plan.cwd)} && {resume}"]


def archived_agent_of(repo, branch):
    """The id of the cleaned-up orchestra agent whose branch this was, if an archive holds it."""
    if not branch or "/" not in branch or not os.path.isdir(str(repo)):
        return None
    agent_id = branch.rsplit("/", 1)[1]
    done = run_git(
        ["for-each-ref", "--count=1", "--format=%(refname)", f"{ARCHIVE_REFS}/{agent_id}/"],
        repo,
        check=False,
    )
    return agent_id if done.stdout.strip() else None


def fail_unrecoverable(plan, branch, repos):
    """Print the commands that would recover a session whose folder is gone for good, and fail."""
    print("\n".join(recovery_lines(plan, branch, repos[0] if repos else "<repo>")))
    if not branch:
        why = "no branch was recorded to recreate it from"
    elif repos:
        why = f"branch '{branch}' is gone too"
    else:
        why = f"no repository with branch '{branch}' was found (run this inside the repository)"
    raise OrchestraError(
        f"session {plan.session_id[:SESSION_ID_SHORT]} ran in {plan.cwd}, which no longer exists, and {why}; "
        "the commands above would recover it",
        EXIT_FAILURE,
    )


def confirm(question):
    """Ask a yes/no question on the terminal; anything but yes is no."""
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def recreate_worktree(plan, interactive):
    """Run a plan's git commands once the user agrees; without a terminal, show them and fail."""
    lines = resume_command_lines(plan)
    if not interactive:
        print("would run:\n" + "\n".join(f"  {line}" for line in lines))
        raise OrchestraError(
            f"{plan.cwd} no longer exists and there is no terminal to confirm recreating it; "
            "run the commands above",
            EXIT_FAILURE,
        )
    question = f"{plan.cwd} no longer exists. Run '{lines[-2]}' and resume? [y/N] "
    if not confirm(question):
        raise OrchestraError(f"not resumed; to do it yourself: {' && '.join(lines)}", EXIT_FAILURE)
    for args in plan.setup:
        run_git(list(args), plan.repo)


def exec_in(cwd, argv):
    """Replace this process with `argv` run in `cwd`, so the terminal belongs to it."""
    if shutil.which(argv[0]) is None:
        raise OrchestraError(
            f"{argv[0]} is not on PATH; install Claude Code, then run: {shlex.join(argv)}",
            EXIT_FAILURE,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(cwd)
    os.execvp(argv[0], argv)


def current_repo():
    """The main worktree of the repository around the current directory; None outside git."""
    if git_common_dir(os.getcwd(), {}) is None:
        return None
    try:
        return str(find_repo(Path.cwd()))
    except OrchestraError:
        return None


def locate_session(env, wanted):
    """The session `wanted` names (an id, a prefix of one, or an agent id): (file, session, the
    repository around the current directory, the agents that can own it)."""
    projects_dir = claude_projects_dir(env)
    files = scan_session_files(projects_dir)[0] if projects_dir.is_dir() else []
    here, agents = current_repo(), AgentIndex()
    if here:
        agents.load(here)
    file = match_session(files, wanted, agents)
    try:
        session = describe_session(file)
    except OSError as e:
        raise OrchestraError(f"cannot read {file.path}: {e.strerror}", EXIT_FAILURE) from None
    agents.load_for(session.cwd, {})
    return file, session, here, agents


def resume_session(wanted, print_only, env):
    """`sessions --resume`: exec `claude --resume <id>` in the session's recorded cwd."""
    _file, session, here, agents = locate_session(env, wanted)
    plan = plan_resume(session, here, agents)
    if print_only:
        print("\n".join(resume_command_lines(plan)))
        return EXIT_OK
    if plan.setup:
        recreate_worktree(plan, sys.stdin.isatty())
    exec_in(plan.cwd, plan.argv)
    return EXIT_OK  # reached only when a test stands in for exec


# --- the subcommand ------------------------------------------------------------------


def session_listing(env, now, hours, project=None, limit=SESSION_DEFAULT_LIMIT):
    """The recent sessions in the store `env` names (an empty listing when there is no store)."""
    projects_dir = claude_projects_dir(env)
    if not projects_dir.is_dir():
        return Listing([], 0, 0, 0, False)
    return list_sessions(projects_dir, now, hours, project, limit, CountCache.load(env))


def session_prompts(path, limit=SESSION_DETAIL_PROMPTS, budget=SESSION_DETAIL_BYTES):
    """The prompts a user typed in a transcript, oldest first (at most `limit`, from its first `budget` bytes)."""
    prompts = []
    with open(path, "rb") as f:
        for raw in f.read(budget).splitlines():
            record = parse_line(raw.decode("utf-8", "replace"))
            prompt = prompt_of(record)[0] if record else None
            if prompt:
                prompts.append(prompt)
                if len(prompts) >= limit:
                    break
    return prompts


def session_detail(env, wanted):
    """One session for the dashboard: its prompts and the commands that resume it."""
    file, session, here, agents = locate_session(env, wanted)
    try:
        prompts = session_prompts(file.path)
    except OSError as e:
        raise OrchestraError(f"cannot read {file.path}: {e.strerror}", EXIT_FAILURE) from None
    try:
        resume, note = resume_command_lines(plan_resume(session, here, agents)), None
    except OrchestraError as e:
        resume, note = [], str(e)
    return {
        "id": session.session_id,
        "title": session.title,
        "cwd": session.cwd,
        "prompts": prompts,
        "resume": resume,
        "note": note,
        "command": f"orchestra sessions --resume {session.session_id}",
    }


def sessions_document(
    env, hours=SESSION_DEFAULT_HOURS, limit=SESSION_DEFAULT_LIMIT, now=None, repo=None
):
    """What `orchestra sessions --json` prints, for the web API: the sessions of `repo` (its
    worktrees included), or of every project when repo is None."""
    now = time.time() if now is None else now
    project = project_filter(str(repo)) if repo is not None else None
    listing = session_listing(env, now, hours, project, limit)
    return listing_json(listing, claude_projects_dir(env), now, hours, project)


# ======================================================================================
# Collect: reports
# --------------------------------------------------------------------------------------
# What each finished agent did, as collect reports it: its commits, what its worktree still
# holds, its checks, and the files two agents both changed. RepoFacts answers for every agent
# at once and caches what did not change, never reporting less than worktree_holdings would.
# ======================================================================================

REPORT_CACHE_FILE = "reports.json"  # in .orchestra/: what finished agents committed, by branch tip
# a worktree touched this recently is not cached: a write may share its mtime
REPORT_RACY_SECONDS = 2.0


def finished_agents(records, ids):
    """The named agents (each must have finished), else every finished agent."""
    if not ids:
        return [r for r in select_agents(records, []) if r["state"] in FINISHED_STATES]
    chosen = select_agents(records, ids)
    for record in chosen:
        if record["state"] not in FINISHED_STATES:
            raise OrchestraError(
                f"{record['id']} is {record['state']}; wait for it to finish or stop it first"
            )
    return chosen


def merge_target(project, record):
    """The branch an agent's work must have reached to count as merged."""
    for name in (record.get("base_branch"), current_branch(project.repo)):
        if name and ref_commit(project.repo, name):
            return name
    return record["base_commit"]


def unmerged_reason(project, record, tip):
    """Why the branch is not merged, or None when its work is in the base already.

    Merged: the tip is an ancestor of the base, every commit is patch-equivalent upstream
    (a rebase or cherry-pick landed it), or merging would change nothing (a squash merge).
    """
    target = merge_target(project, record)
    repo = project.repo
    if (
        is_ancestor(repo, tip, target)
        or all_patches_upstream(repo, target, tip)
        or diff_already_in(repo, target, tip)
    ):
        return None
    count = int(run_git(["rev-list", "--count", f"{target}..{tip}"], repo).stdout.strip() or 0)
    return f"{count} commit{'s' if count != 1 else ''} not merged into {target}"


def named_error(record, error):
    """A git failure as a message that starts with the agent's id."""
    text = str(error)
    return text if text.startswith(f"{record['id']}: ") else f"{record['id']}: {text}"


def agent_report(project, record, tip=False, cache=None, held=None, facts=None):
    """What one agent produced: its result, cost, commits, diffstat and leftovers.

    `tip` (the branch tip, when the caller looked it up already) and `cache` (a ReportCache) spare
    git the commits, diffstat and files of a branch whose tip has not moved since the last report;
    `held` (its worktree_holdings) and `facts` (a RepoFacts) are what agent_reports found for many.
    """
    tip = branch_tip(project, record) if tip is False else tip
    committed = cache.get(record, tip) if cache else None
    if committed is None:
        committed = committed_work(project, record["base_commit"], tip)
        if cache:
            cache.put(record, tip, committed)
    commits = committed["commits"]
    held = held or worktree_holdings(project, record)
    leftovers = [(code, display_path(path)) for code, path in held["leftovers"]]
    changed = set(committed["files"]) | {
        path for code, path in leftovers if code not in ("!!", "NR")
    }
    notes = [
        r for r in holdings_reasons(record, dict(held, leftovers=[])) if not r.startswith("staged")
    ]
    return {
        **{
            key: record.get(key)
            for key in (
                "id",
                "task",
                "state",
                "result",
                "error",
                "cost_usd",
                "turns",
                "branch",
                "checks",
            )
        },
        "permission_denials": split_denials(record)[0],
        "contained": split_denials(record)[1],
        "tampered": record.get("tampered") or [],
        "bypass_permissions": (record.get("launch") or {}).get("bypass_permissions", []),
        "duration_seconds": elapsed_seconds(record, time.time()),
        "commits": committed["commits"],
        "diffstat": committed["diffstat"],
        "files": sorted(changed - {""}),
        "uncommitted": [{"status": code, "path": path} for code, path in leftovers],
        "merged": bool(commits)
        and (
            facts.merged(record, tip, cache)
            if facts
            else unmerged_reason(project, record, tip) is None
        ),
        "notes": notes,
    }


def committed_work(project, base, tip):
    """{commits, diffstat, files} of a branch at `tip` against its base (all empty without a branch)."""
    if not tip:
        return {"commits": [], "diffstat": "", "files": []}
    diff = ["diff", base, tip]
    files = run_git([*diff, "--name-only", "-z"], project.repo).stdout.split("\0")
    return {
        "commits": [
            {"hash": h, "subject": subject}
            for h, subject in commits_between(project.repo, base, tip)
        ],
        "diffstat": run_git([*diff, "--stat"], project.repo).stdout.rstrip(),
        "files": sorted(set(files) - {""}),
    }


def branch_tips(project):
    """{branch name: commit} of every local branch, from one git call."""
    out = run_git(
        ["for-each-ref", "--format=%(objectname) %(refname)", "refs/heads/"], project.repo
    ).stdout
    return {
        ref[len("refs/heads/") :]: commit
        for commit, ref in (line.split(" ", 1) for line in out.splitlines())
    }


class ReportCache:
    """What each finished agent committed, kept in .orchestra/reports.json by (base, branch tip).

    A branch's commits, diffstat and files are a function of its base and tip, so a report is
    recomputed only when the tip moved; `collect` then costs git calls only for what changed.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.changed = False
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = {}
        self.entries = entries if isinstance(entries, dict) else {}

    def get(self, record, tip):
        """The cached committed work of an agent at this tip, or None."""
        entry = self.entries.get(record["id"])
        if isinstance(entry, dict) and entry.get("key") == [record["base_commit"], tip]:
            return entry.get("work")
        return None

    def put(self, record, tip, work):
        """Remember an agent's committed work at this tip."""
        entry = self.entries.get(record["id"])
        kept = entry if isinstance(entry, dict) else {}
        self.entries[record["id"]] = {**kept, "key": [record["base_commit"], tip], "work": work}
        self.changed = True

    def get_part(self, agent_id, name, key):
        """Another cached fact of an agent ('holdings', 'merged') if it was found under `key`, else None."""
        part = (self.entries.get(agent_id) or {}).get(name)
        return part.get("value") if isinstance(part, dict) and part.get("key") == key else None

    def put_part(self, agent_id, name, key, value):
        """Remember another fact of an agent under `key` (kept beside its committed work)."""
        entry = self.entries.get(agent_id)
        if not isinstance(entry, dict):
            entry = self.entries[agent_id] = {}
        entry[name] = {"key": key, "value": value}
        self.changed = True

    def save(self, keep):
        """Write the cache (atomically) holding only the agents in `keep`, if anything changed."""
        stale = set(self.entries) - set(keep)
        if self.changed or stale:
            for agent_id in stale:
                del self.entries[agent_id]
            write_atomic(self.path, json.dumps(self.entries, separators=(",", ":")))


def agent_reports(project, records, errors=None):
    """Reports of many agents: a few git calls for all of them, cached parts for unchanged agents.

    An agent git cannot answer for is left out, its error in `errors` ({id: message}) when given
    (else the GitError is raised): one broken agent never hides the others' reports."""
    cache = ReportCache(project.dir / REPORT_CACHE_FILE)
    facts = RepoFacts(project) if records else None
    failed = {}
    held = facts.holdings(records, cache, failed) if records else {}
    if failed and errors is None:
        raise GitError(next(iter(failed.values())))
    (errors if errors is not None else {}).update(failed)
    reports = [
        agent_report(project, r, facts.tip(r["branch"]), cache, held=held[r["id"]], facts=facts)
        for r in records
        if r["id"] not in failed
    ]
    cache.save(
        set(cache.entries) & {r["id"] for r in project.records().values()}
        | {r["id"] for r in records}
    )
    return reports


# What removing a worktree could lose (worktree_holdings) costs a dozen git runs per agent, and
# `collect` reports every finished agent each time. RepoFacts makes that cost proportional to what
# changed, without ever reporting less than worktree_holdings would:
#   - refs, worktrees and the checked-out branch are read once per run, for all agents;
#   - an agent's HEAD, index, files and reflog commits are cached under a fingerprint of the
#     files they come from (HEAD, index, reflogs, every worktree file's stat, the ignore rules):
#     any change to them, or a write too recent to trust its mtime, means asking git again;
#   - which commits only the worktree holds depends on every ref, so it is asked anew each run,
#     but in one `rev-list` for all agents: a commit of an agent that no ref reaches is in that
#     answer, so an agent none of whose commits is in it has lost nothing (the usual case);
#     the others, and any agent on a detached HEAD no ref holds, get worktree_holdings' own calls;
#   - stashes are looked for only when refs/stash exists;
#   - the merged flag is cached by (target branch, target tip, branch tip).
# A repository whose refs live in reftable (no loose reflog files to stat) is never cached.


class RepoFacts:
    """What one `collect` run reads once for all agents: refs, worktrees, merge targets."""

    def __init__(self, project):
        self.project, repo = project, project.repo
        out = git_bytes(["for-each-ref", "--format=%(objectname) %(refname)"], repo).stdout.decode()
        self.refs = dict(reversed(line.split(" ", 1)) for line in out.splitlines())
        self.worktrees = list_worktrees(repo)
        common = run_git(
            ["rev-parse", "--path-format=absolute", "--git-common-dir"], repo
        ).stdout.strip()
        self.common = Path(common)
        self.cacheable = not (self.common / "reftable").exists()
        self.targets = {}
        self.ref_tips = {sha for ref, sha in self.refs.items() if ref != "refs/stash"}
        self.heads = {}  # worktree path -> the HEADs git lists for it
        for listed in self.worktrees:
            self.heads.setdefault(listed["real"], []).append(listed["head"])

    def tip(self, branch):
        """The commit a branch points at, None if it does not exist."""
        return self.refs.get(f"refs/heads/{branch}")

    def merged(self, record, tip, cache):
        """True when the agent's work is in its merge target (unmerged_reason), cached by tips."""
        target = self.targets.get(record.get("base_branch")) or merge_target(self.project, record)
        if (
            target != record["base_commit"]
        ):  # a branch name, the same for every agent with this base
            self.targets[record.get("base_branch")] = target
        target_tip = self.targets.get(("tip", target)) or ref_commit(self.project.repo, target)
        self.targets[("tip", target)] = target_tip
        key = [target, target_tip, tip]
        found = cache.get_part(record["id"], "merged", key)
        if found is None:
            found = unmerged_reason(self.project, record, tip) is None
            cache.put_part(record["id"], "merged", key, found)
        return found

    def holdings(self, records, cache, failed):
        """{id: worktree_holdings(record)} of many agents, from cached parts where nothing changed;
        an agent git cannot answer for goes into `failed` ({id: message}) instead."""
        local = {}
        for record in records:
            try:
                local[record["id"]] = self.local_holdings(record, cache)
            except GitError as e:
                failed[record["id"]] = named_error(record, e)
        records = [r for r in records if r["id"] not in failed]
        wanted = {
            c for held in local.values() if held for c in [*held["commits"], held["head"]] if c
        }
        shared = [*self.ref_tips, *(w["head"] for w in self.worktrees if w["head"])]
        lost = set(commits_only_in(self.project.repo, sorted(wanted), shared))
        found = {}
        for record in records:
            held = local[record["id"]]
            if held is None or set(held["commits"] + [held["head"]]) & lost:
                try:
                    found[record["id"]] = worktree_holdings(self.project, record)
                except GitError as e:
                    failed[record["id"]] = named_error(record, e)
                continue
            stashes = []
            if "refs/stash" in self.refs:
                stashes = worktree_stashes(
                    self.project.repo, record["worktree"], held["commits"], record["branch"]
                )
            found[record["id"]] = dict(held, stashes=stashes, detached_lost=[], reflog_lost=[])
        return found

    def local_holdings(self, record, cache):
        """The parts of an agent's holdings that depend on its worktree and reflogs only
        ({tip, head, head_branch, staged, leftovers, commits}), or None when only
        worktree_holdings can tell (a detached HEAD no ref holds)."""
        key = self.fingerprint(record)
        held = cache.get_part(record["id"], "holdings", key) if key else None
        if held is None:
            held = self.read_local_holdings(record)
            if key and self.fingerprint(record) == key:
                cache.put_part(record["id"], "holdings", key, held)
        held = dict(held, tip=self.tip(record["branch"]), changes=None)
        held["leftovers"] = [tuple(item) for item in held["leftovers"]]
        # The one rev-list counts every worktree's HEAD as held; worktree_holdings does not count
        # the agent's own (even a stale one of a deleted folder), so that must be on a ref too.
        mine = real_path(record["worktree"])
        own = self.heads.get(mine, [])
        if any(head and head not in self.ref_tips for head in [held["head"], *own]):
            return None
        if any(w["real"].startswith(mine + os.sep) for w in self.worktrees):
            return None  # a worktree nested in it: only worktree_holdings weighs its commits
        return held

    def read_local_holdings(self, record):
        """What worktree_holdings asks git about the agent's own worktree and reflogs."""
        worktree, held = Path(record["worktree"]), {
            "head": None,
            "head_branch": None,
            "staged": None,
            "leftovers": [],
        }
        if not worktree.is_dir():
            held["commits"] = rev_lines(
                [
                    "rev-list",
                    "--walk-reflogs",
                    "--ignore-missing",
                    f"refs/heads/{record['branch']}",
                ],
                self.project.repo,
            )
            return held
        held["head"], held["head_branch"] = worktree_head(worktree)
        held["staged"] = staged_tree(worktree, held["head"])
        changes = file_changes(
            self.project.repo,
            worktree,
            held["head"],
            setup_map(record),
            worktree_admin_dir(worktree),
        )
        held["leftovers"] = [list(item) for item in worktree_leftovers(record, changes)]
        held["commits"] = worktree_commits(self.project.repo, worktree, record["branch"])
        return held

    def fingerprint(self, record):
        """A digest of every file the agent's local holdings come from, or None when they must
        not be cached (reftable, unreadable folders, or something written in the last moments)."""
        if not self.cacheable:
            return None
        worktree, common = Path(record["worktree"]), self.common
        paths = [
            common / "logs" / "refs" / "heads" / record["branch"],
            common / "info" / "exclude",
            common / "info" / "attributes",
            common / "config",
        ]
        parts = [
            record["id"],
            record["base_commit"],
            record["branch"],
            record["worktree"],
            json.dumps(setup_map(record), sort_keys=True),
            self.tip(record["branch"]),
            worktree.is_dir(),
        ]
        if worktree.is_dir():
            admin, head = worktree_admin_dir(worktree), None
            if admin is None:
                return None
            paths += [worktree / ".git", admin / "HEAD", admin / "index", admin / "logs" / "HEAD"]
            with contextlib.suppress(OSError):
                head = (admin / "HEAD").read_text(encoding="utf-8", errors="replace").strip()
            parts += [str(admin), head, self.refs.get((head or "").removeprefix("ref: ").strip())]
            for _, path, kind in worktree_files(self.project.repo, worktree, admin):
                if kind == "unreadable":
                    return None
                paths.append(path)
        newest, now = 0, time.time_ns()
        for path in paths:
            try:
                info = os.lstat(path)
            except OSError:
                parts.append(None)
                continue
            parts.append(os.fsdecode(path))
            parts += [info.st_mode, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
            newest = max(newest, info.st_mtime_ns, info.st_ctime_ns)
        if now - newest < REPORT_RACY_SECONDS * 1e9:
            return None
        return hashlib.sha256(json.dumps(parts).encode("utf-8", "surrogateescape")).hexdigest()


def report_text(report):
    """One agent's part of the collect report."""
    minutes = format_duration(report["duration_seconds"])
    lines = [
        f"== {report['id']}: {report['state']}  ({report['turns'] or 0} turns, {format_cost(report['cost_usd'])}, {minutes})",
        f"Task: {report['task']}",
    ]
    if report.get("checks"):
        lines.append(f"Checks: {checks_line(report['checks'])}")
    if report["result"] or report["error"]:
        lines.append(f"Result: {strip_control(report['result'] or report['error']).strip()}")
    lines.append(
        f"Commits on {report['branch']}:"
        if report["commits"]
        else f"No commits on {report['branch']}."
    )
    lines += [f"  {c['hash']} {c['subject']}" for c in report["commits"]]
    if report.get("merged"):
        lines.append("Its commits are merged already.")
    lines += [f"Note: {note}" for note in report.get("notes", [])]
    if report["diffstat"]:
        lines.append(report["diffstat"])
    if report["uncommitted"]:
        lines.append(
            "Uncommitted in its worktree: "
            + ", ".join(f"{u['status'].strip()} {u['path']}" for u in report["uncommitted"])
        )
    lines += [f"TAMPERED: {line}" for line in report.get("tampered") or []]
    lines += [f"{c['message']}: {c['tool']}" for c in report.get("contained") or []]
    lines += denial_lines(report.get("permission_denials"), report.get("bypass_permissions", ()))
    return "\n".join(lines)


def overlapping_files(reports):
    """{file: [agent ids]} for every file more than one agent changed."""
    owners = {}
    for report in reports:
        for path in report["files"]:
            owners.setdefault(path, []).append(report["id"])
    return {path: ids for path, ids in sorted(owners.items()) if len(ids) > 1}


# ======================================================================================
# Collect: commits, merges and pull requests
# --------------------------------------------------------------------------------------
# Bringing work home. --commit commits a worktree's leftovers on the agent's own branch.
# --merge is a short form of land (collect_agents lives in Landing, below): the checks here
# refuse a checkout with anything in progress or with hidden changes, and find the untracked or
# ignored files a landing would overwrite.
# --pr pushes and opens a pull request; --patch writes `git am` input; `send` queues a
# follow-up in the agent's own session.
# ======================================================================================

GIT_ARGS_BATCH = 500  # paths per git command line, well under the system's argument limit
STAGED_REFS = "refs/orchestra/staged"  # where --commit keeps a staged version it would replace


def commit_leftovers(project, record):
    """Commit the agent's uncommitted work on its branch (not ignored, setup or nested-repository
    files); True if any. File names are passed as bytes, so names that are not UTF-8 work."""
    leftovers = uncommitted_work(project.repo, record)
    nested = [path + "/" for code, path in leftovers if code == "NR"]
    work = [
        path
        for code, path in leftovers
        if code in (" M", " D", "??") and not any(path.startswith(n) for n in nested)
    ]
    if not work:
        return False
    worktree = record["worktree"]
    check_own_branch(record)
    kept = keep_staged_version(project, record)
    tracked = [path for code, path in leftovers if code in (" M", " D") and path in work]
    for start in range(
        0, len(tracked), GIT_ARGS_BATCH
    ):  # marks that would make `git add` skip a change
        batch = tracked[start : start + GIT_ARGS_BATCH]
        for mark in (
            "--no-assume-unchanged",
            "--no-skip-worktree",
        ):  # one per call: git keeps only the last
            git_bytes(["update-index", mark, "--", *batch], worktree)
    specs = b"\0".join(b":(literal)" + os.fsencode(path) for path in work) + b"\0"
    git_bytes(["add", "-A", "--pathspec-from-file=-", "--pathspec-file-nul"], worktree, input=specs)
    message = f"orchestra: commit work {record['id']} left uncommitted\n\nTask: {record['task']}"
    git_bytes(["commit", "--quiet", "--no-verify", "-m", message], worktree)
    return kept or True


def check_own_branch(record):
    """Refuse to commit unless the worktree has the agent's own branch checked out: a commit on
    another branch (the user's main) or a detached HEAD is not where collect looks for work."""
    on_branch = worktree_head(Path(record["worktree"]))[1]
    if on_branch != record["branch"]:
        where = f"branch {on_branch}" if on_branch else "a detached HEAD"
        raise GitError(
            f"{record['id']}: its worktree has {where} checked out, not its own branch "
            f"{record['branch']}; nothing was committed. Switch back (git -C {record['worktree']} "
            f"switch {record['branch']}) or commit it by hand"
        )


def keep_staged_version(project, record):
    """Save the index under refs/orchestra/staged/<id>/<n> when a staged file differs from the
    file on disk (`git add` would replace the staged version); the ref, or None."""
    worktree = record["worktree"]
    staged = git_bytes(["diff", "--cached", "--name-only", "-z", "--no-renames"], worktree)
    on_disk = git_bytes(["diff", "--name-only", "-z", "--no-renames"], worktree)
    both = (set(staged.stdout.split(b"\0")) & set(on_disk.stdout.split(b"\0"))) - {b""}
    if not both:
        return None
    head = worktree_head(Path(worktree))[0]
    tree = git_bytes(["write-tree"], worktree, check=False)
    if tree.returncode != 0:
        raise GitError(
            f"{record['id']}: its index has unresolved conflicts; resolve them in "
            f"{worktree} before collect --commit"
        )
    message = f"orchestra: {record['id']}'s staged version before collect --commit"
    args = ["commit-tree", tree.stdout.decode().strip(), *(["-p", head] if head else [])]
    commit = git_bytes([*args, "-m", message], worktree).stdout.decode().strip()
    prefix = f"{STAGED_REFS}/{record['id']}/"
    taken = git_bytes(["for-each-ref", "--format=%(refname)", prefix], project.repo).stdout
    ref = f"{prefix}{len(taken.splitlines()) + 1}"
    write_refs(project.repo, {ref: commit})
    return ref


def collect_problem(project, record):
    """Why collect cannot read this agent's worktree (so it leaves the agent alone), or None."""
    if not Path(record["worktree"]).is_dir():
        moved = moved_worktree(project.repo, record)
        return (
            f"{record['id']}: its worktree was moved to {moved}; move it back with "
            f"'git worktree move {moved} {record['worktree']}'"
            if moved
            else None
        )
    try:
        check_worktree(project.repo, record)
    except GitError as e:
        return str(e)
    return None


def refresh_change_counts(project, records):
    """Count these agents' commits and changed files again (after collect --commit committed)."""
    counts = {r["id"]: change_counts(r["worktree"], r["base_commit"]) for r in records}

    def change(state):
        for agent_id, (commits, files) in counts.items():
            if agent_id in state["agents"]:
                state["agents"][agent_id].update(commits=commits, files_changed=files)

    if counts:
        project.store.update(change)


def check_checkout_clean(repo, doing):
    """Refuse to touch the user's checkout while it has changes or an operation in progress."""
    operation = operation_in_progress(repo)
    if operation:
        raise OrchestraError(
            f"{operation} is in progress in {repo}; finish or abort it before {doing}"
        )
    status = ["status", "--porcelain", "--untracked-files=no", "--ignore-submodules=none"]
    if git_bytes(status, repo).stdout.strip():
        raise OrchestraError(
            f"your checkout {repo} has uncommitted changes; commit or stash them before {doing}"
        )
    hidden = hidden_changes(repo)
    if hidden:
        raise OrchestraError(
            f"your checkout {repo} has changes git status does not show "
            f"({describe_files([(' M', path) for path in hidden])}: marked "
            f"assume-unchanged or skip-worktree); commit or stash them, or clear the mark with 'git "
            f"update-index --no-assume-unchanged --no-skip-worktree FILE', before {doing}"
        )


def hidden_changes(repo):
    """Tracked files whose assume-unchanged or skip-worktree mark hides a change on disk from
    `git status`: a merge would write over them. Compared by content, file by file."""
    marked, unhashable = [], []  # --stdin-paths reads one path a line
    for entry in git_bytes(["ls-files", "-v", "-z"], repo).stdout.split(b"\0"):
        tag, _, path = entry.partition(b" ")
        if tag and (tag.islower() or tag == b"S") and (Path(repo) / os.fsdecode(path)).is_file():
            (marked if line_safe(path) else unhashable).append(path)
    if not marked:
        return [os.fsdecode(path) for path in unhashable]
    staged = git_bytes(
        ["ls-files", "-s", "-z", "--", *(os.fsdecode(p) for p in marked)], repo
    ).stdout
    in_index = {}
    for entry in staged.split(b"\0"):
        if entry:
            info, _, path = entry.partition(b"\t")
            in_index[path] = info.split()[1]
    on_disk = git_bytes(["hash-object", "--stdin-paths"], repo, input=b"\n".join(marked) + b"\n")
    changed = [
        path for path, blob in zip(marked, on_disk.stdout.split()) if in_index.get(path) != blob
    ]
    return [os.fsdecode(path) for path in changed + unhashable]


def check_merge_target(project, cwd, into):
    """Refuse `collect --merge` from a linked worktree unless --into names the branch of the
    user's checkout, which is where the merge happens."""
    here = git_bytes(["rev-parse", "--show-toplevel"], cwd, check=False).stdout.decode().strip()
    target = current_branch(project.repo)
    if into is not None and into != target:
        raise OrchestraError(
            f"--into {into}: the checkout at {project.repo} has {target or 'a detached HEAD'} checked out; "
            f"check out {into} there first"
        )
    if into is None and here and Path(here).resolve() != project.repo.resolve():
        raise OrchestraError(
            f"you are in the linked worktree {here}, but collect --merge merges into the checkout at "
            f"{project.repo} (branch {target}); run it there, or pass --into {target} to confirm"
        )


def tracked_paths(repo):
    """Paths (bytes) the user's index tracks."""
    return set(git_bytes(["ls-files", "-z"], repo).stdout.split(b"\0")) - {b""}


def overwritten_by_merge(repo, tip):
    """The user's untracked or ignored files (or folders) a merge of `tip` would write over."""
    base = run_git(["merge-base", "HEAD", tip], repo, check=False).stdout.strip()
    diff = ["diff", "--name-only", "-z", "--no-renames", "--diff-filter=AMTCR", base or "HEAD", tip]
    incoming = [p for p in git_bytes(diff, repo).stdout.split(b"\0") if p]
    tracked, root, hits = tracked_paths(repo), os.fsencode(str(repo)), []
    for path in incoming:
        parts = path.split(b"/")
        for depth in range(1, len(parts) + 1):
            prefix = b"/".join(parts[:depth])
            blocking = depth == len(parts) or not os.path.isdir(os.path.join(root, prefix))
            if prefix not in tracked and blocking and os.path.lexists(os.path.join(root, prefix)):
                hits.append(display_path(os.fsdecode(prefix)))
                break
    return sorted(set(hits))


def check_before_collect(project, records):
    """Run the integrity check of each agent before its work is reported or merged; the records, updated."""
    live = project.store.load()["agents"]
    checked = []
    for record in records:
        found = verify_integrity(project, record, live, True) if record["id"] in live else []
        if found:

            def mark(state, agent_id=record["id"], found=found):
                note_tampering(project, state["agents"][agent_id], found)
                return dict(state["agents"][agent_id])

            record = project.store.update(mark)
        checked.append(record)
    return checked


def gate_on_integrity(records, force):
    """(records to merge, [{id, reason}] left out): an agent that tampered is merged only when named with --force."""
    chosen, skipped = [], []
    for record in records:
        if record.get("tampered") and not force:
            reason = f"tampered ({record['tampered'][-1]}); name it with --force to merge anyway"
            skipped.append({"id": record["id"], "reason": reason})
        else:
            chosen.append(record)
    return chosen, skipped


def commit_all_leftovers(project, records, errors):
    """Commit each agent's leftovers on its branch: ([ids committed], {id: ref of a kept staged
    version}); an agent git failed for goes into `errors` and the others go on."""
    committed, staged_kept = [], {}
    for record in records:
        try:
            done = commit_leftovers(project, record)
        except GitError as e:
            errors[record["id"]] = str(e)
            continue
        if done:
            committed.append(record["id"])
        if isinstance(done, str):
            staged_kept[record["id"]] = done
    return committed, staged_kept


def pull_request_body(report):
    """The pull request text: the agent's result, its diffstat and its cost."""
    return (
        f"{report['result'] or '(no result text)'}\n\n```\n{report['diffstat']}\n```\n\n"
        f"Opened by claude-orchestra: {report['turns'] or 0} turns, {format_cost(report['cost_usd'])}."
        f"{checks_markdown(report.get('checks'))}"
    )


def open_pull_requests(project, reports):
    """Push each branch and open a pull request with gh; lines saying what happened or what to run."""
    remotes = run_git(["remote"], project.repo).stdout.split()
    remote = "origin" if "origin" in remotes else (remotes[0] if remotes else None)
    with_commits = [r for r in reports if r["commits"]]
    if remote is None or shutil.which("gh") is None:
        missing = (
            "no git remote is configured"
            if remote is None
            else "the GitHub CLI (gh) is not installed"
        )
        manual = [
            f"  git push -u {remote or '<remote>'} {r['branch']} && gh pr create --head {r['branch']} "
            f"--title {shlex.quote(one_line(r['task'], 72))}"
            for r in with_commits
        ]
        return [f"cannot open pull requests: {missing}. To do it by hand:", *manual]
    lines = []
    for report in with_commits:
        run_git(["push", "--quiet", "-u", remote, report["branch"]], project.repo)
        argv = [
            "gh",
            "pr",
            "create",
            "--head",
            report["branch"],
            "--title",
            one_line(report["task"], 72),
            "--body",
            pull_request_body(report),
        ]
        done = subprocess.run(argv, cwd=str(project.repo), capture_output=True, text=True)
        outcome = (
            done.stdout.strip() if done.returncode == 0 else f"gh failed: {one_line(done.stderr)}"
        )
        lines.append(f"{report['id']}: {outcome}")
    return lines


def write_patch(project, records, path):
    """Write every agent's commits, in spawn order, as one series `git am` can apply; how many."""
    parts, count = [], 0
    for record in sorted(records, key=spawn_order):
        tip = branch_tip(project, record)
        if tip:
            span = f"{record['base_commit']}..{tip}"
            count += len(commits_between(project.repo, record["base_commit"], tip))
            parts.append(run_git(["format-patch", "--stdout", span], project.repo).stdout)
    try:
        Path(path).write_text("".join(parts), encoding="utf-8")
    except OSError as e:
        raise OrchestraError(
            f"cannot write the patch to {path}: {e.strerror}; pick another --patch path"
        ) from None
    return count


def collect_text(document):
    """The human collect report: each agent, overlaps, and what the options did."""
    parts = [report_text(r) for r in document["agents"]]
    for path, ids in document["overlaps"].items():
        parts.append(
            f"Warning: {path} was changed by {' and '.join(ids)}; expect a conflict when merging"
        )
    if document["committed"]:
        parts.append("Committed leftover work of: " + ", ".join(document["committed"]))
    parts += [
        f"Kept {i}'s staged version (it differed from the files on disk) as {ref}"
        for i, ref in document.get("staged_kept", {}).items()
    ]
    parts += [f"Error: {e['error']}" for e in document.get("errors", [])]
    if "merged" in document:
        parts += merge_text(document)
    if "patch" in document:
        parts.append(
            f"Wrote {document['patch']['commits']} commit(s) to {document['patch']['path']} (apply with git am)"
        )
    parts += document.get("pull_requests", [])
    only_uncommitted = [
        r["id"] for r in document["agents"] if not r["commits"] and r["uncommitted"]
    ]
    if only_uncommitted and not document["committed"]:
        parts.append(
            f"{', '.join(only_uncommitted)}: all the work is uncommitted; "
            "'orchestra collect --commit' commits it on the agent's branch"
        )
    return "\n\n".join(parts)


def merge_text(document):
    """collect --merge's part of the report: what landed (or, with --dry-run, would), what not and why."""
    if document.get("dry_run"):
        lines = [r["line"] for r in document["landing"]] or ["nothing to merge"]
        parts = ["Dry run, nothing changed:\n" + "\n".join(lines)]
    else:
        parts = ["Merged: " + (", ".join(document["merged"]) or "nothing new")]
        parts += document.get("notes", [])
    unchanged = [r["id"] for r in document["agents"] if not r["commits"] and not r["uncommitted"]]
    if unchanged:
        parts.append("No changes (nothing to merge): " + ", ".join(unchanged))
    gate_hint = "name it or add --include-failing to merge it anyway"
    parts += [
        f"Not merged: {s['id']}: {s['reason']} ({s.get('hint') or gate_hint})"
        for s in document.get("not_merged", [])
    ]
    return parts


def sent_text(agent_id, waits):
    """What `send` says once a message is on its way (the web answers the same)."""
    if waits:
        first = (
            f"{agent_id}: still working; your message waits and is sent when its current turn ends"
        )
    else:
        first = f"{agent_id}: queued to continue with your message"
    return f"{first}\nfollow it with: orchestra logs -f {agent_id}"


def send_message(project, agent_id, message, env=None):
    """Continue an agent's session with a follow-up message, in its own worktree: (id, waits).

    A finished agent is queued at once; for a queued, running or paused one the message waits in
    its record (`pending_messages`) and the supervisor sends it when the agent's turn ends.
    """
    check_task(message, "message")

    def queue(state):
        record = select_agents(state["agents"], [agent_id])[0]
        if record["state"] in ACTIVE_STATES:
            record["pending_messages"] = [*(record.get("pending_messages") or []), message]
            return record["id"], True
        if record["state"] not in FINISHED_STATES:
            raise OrchestraError(f"{record['id']} is {record['state']}; it cannot take a message")
        queue_session(record, message, "waiting to continue with your message")
        return record["id"], False

    [record] = select_agents(project.records(), [agent_id])
    if on_host(record):  # Hosts: its host keeps the message or continues the session there
        relay_to_host(project, record, "send", message=message, env=env)
        if record["state"] in ACTIVE_STATES:
            return record["id"], True
        change_agents(project, [record["id"]], continue_on_host)
        ensure_supervisor(project)
        return record["id"], False
    save_agent_env(project, [record["id"]], os.environ if env is None else env)
    try:
        sent_to = project.store.update(queue)
    except OrchestraError:
        drop_agent_env(project, [record["id"]])
        raise
    ensure_supervisor(project)
    return sent_to


# ======================================================================================
# Landing
# --------------------------------------------------------------------------------------
# The target branch only ever moves to a commit whose checks passed on exactly that commit
# (bors' "not rocket science" rule). `land` takes finished agents in queue (spawn) order and,
# one at a time, merges each branch onto the target's tip in a scratch worktree of its own
# (.orchestra/land, detached; never the user's checkout), runs the agent's `checks` there, and
# moves the target with a compare-and-swap: `git merge --ff-only` in the user's checkout when
# it has the target checked out (git writes its files, then the ref, only if it still points
# where it did), else `git update-ref <ref> <new> <old>`. A checkout with changes the landing
# would overwrite keeps its files; only the ref moves, and land says so. A conflict or red
# checks send the agent a fix round in its own session (the target commit and the conflicting
# files, or the failing command and its output); land retries it when the round ends, and
# after `fix_rounds` tries parks it `blocked` while the queue goes on. One land at a time:
# land.lock is held by land and collect --merge alike (a second one refuses); collect --merge is
# one pass of the queue that lands only where the user's checkout follows. Before moving
# the ref the record notes the commit it lands (`landing.commit`), so a rerun after Ctrl-C or
# kill -9 recognises a landing that happened and otherwise starts the item again.
# ======================================================================================

LAND_WORKTREE = "land"  # in .orchestra/: the scratch worktree where merges and their checks run
LAND_READY = "land.ready"  # in .orchestra/: written once the land worktree is made and set up
LAND_SETUP_LOG = "land-setup.jsonl"  # in .orchestra/: the setup commands' output there
LAND_POLL = 0.5  # seconds between looks at agents whose fix round is under way
LAND_CONFLICT_PROMPT = (
    "Your branch {branch} cannot land on {target}: merging it onto {target} at commit {commit} "
    "conflicts in {files}. Bring your branch up to date with that commit (git merge {commit}), "
    "resolve the conflicts keeping both sides' intent, make sure the checks pass, commit, and finish."
)
LAND_RED_PROMPT = (
    "Your branch {branch} merged onto {target} at commit {commit} fails the checks: the command "
    "`{command}` exited with {exit_code}. The end of its output:\n\n```\n{tail}\n```\n\n"
    "Bring your branch up to date with that commit (git merge {commit}), make the checks pass "
    "on the result, commit, and finish."
)


LAND_UNCHECKED_NOTE = (
    "landed, without checks on the result: collect --merge lands a named agent (and, with "
    "--include-failing, one whose own checks failed) as it always merged them; 'orchestra land' runs them"
)


class LandPlan(NamedTuple):
    """How one run of the queue goes: `land`'s defaults, or its short form `collect --merge`."""

    strategy: str  # land_strategy: merge, rebase or squash
    dry_run: bool = False
    follow: bool = False  # collect --merge: land only what the user's checkout can follow
    unchecked: frozenset = (
        frozenset()
    )  # ids landed without checks on the result (named past the gate)
    wait_fixes: bool = True  # wait for fix rounds and retry (land); collect --merge makes one pass


@contextlib.contextmanager
def holding_land_lock(project):
    """Hold land.lock for one land, web Land or collect --merge; a second one refuses at once."""
    lock = FileLock(project.dir / LAND_LOCK)
    if not lock.acquire(blocking=False):
        raise OrchestraError(LAND_BUSY, EXIT_FAILURE)
    try:
        yield
    finally:
        lock.release()


def landing_target(project, into):
    """The branch land moves: --into, else base_branch, else the branch checked out in the repo."""
    target = into or project.config["base_branch"] or current_branch(project.repo)
    if not target:
        raise OrchestraError(
            "HEAD is detached; check out the branch to land on, or pass --into BRANCH"
        )
    if not ref_commit(project.repo, f"refs/heads/{target}"):
        raise OrchestraError(f"--into {target}: no such branch; name an existing branch")
    return target


def land_candidates(project, ids, include_failing=False):
    """(records to land in queue order, [{id, reason}] left out): the named finished agents, or
    every done agent not landed yet whose checks passed (a blocked one only after it ran again)."""
    state = project.store.load()["agents"]
    if ids:
        chosen = finished_agents(state, ids)
        return sorted(chosen, key=spawn_order), []
    fresh = [
        r
        for r in select_agents(state, [])
        if r["state"] == "done" and not r.get("landed") and not blocked_still(r)
    ]
    chosen, skipped = gate_on_checks(fresh, include_failing)
    return chosen, skipped


def blocked_still(record):
    """True for an agent parked blocked that has not run again since (a follow-up clears it)."""
    blocked = record.get("blocked") or {}
    return bool(blocked) and (record.get("finished_at") or "") <= (blocked.get("at") or "")


def scratch_worktree(project, commit):
    """The scratch worktree, reset to `commit` whatever an interrupted land left in it.

    Made once like an agent's (copy_files copied, `setup` run; `ready` marks it complete) and
    reused: a reset keeps ignored files (what setup installed), and the copies are made again.
    """
    path, ready = project.dir / LAND_WORKTREE, project.dir / LAND_READY
    copies = files_to_copy(project, include_patterns(project))
    if not ready.exists() or not (path / ".git").is_file():
        delete_worktree(project.repo, path)  # its own entry only: never `git worktree prune`
        git_bytes(["worktree", "add", "--quiet", "--detach", str(path), commit], project.repo)
        copy_into(project, path, copies)
        error = run_setup(project.config["setup"], path, project.dir / LAND_SETUP_LOG)
        if error:
            raise OrchestraError(f"cannot prepare the land worktree {path}: {error}", EXIT_FAILURE)
        ready.touch()
        return path
    remove_stale_locks(path)
    if operation_in_progress(path):
        for what in (["merge", "--abort"], ["rebase", "--abort"]):
            git_bytes(what, path, check=False)
    git_bytes(["reset", "--quiet", "--hard"], path)
    git_bytes(["clean", "-q", "-ffd"], path)
    git_bytes(["checkout", "--quiet", "--force", "--detach", commit], path)
    copy_into(project, path, copies)
    return path


def remove_stale_locks(path):
    """Remove the lock files a land killed mid-git left in the scratch worktree's own git folder
    (index.lock, HEAD.lock): the caller holds land.lock, so no other git runs there."""
    admin = git_bytes(["rev-parse", "--absolute-git-dir"], path).stdout.decode().strip()
    for name in ("index.lock", "HEAD.lock"):
        with contextlib.suppress(FileNotFoundError):
            (Path(admin) / name).unlink()


def copy_into(project, path, copies):
    """Copy the user's untracked files named by copy_files into the land worktree."""
    for rel in copies:
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project.repo / rel, target, follow_symlinks=False)


def combine(path, strategy, record, tip, onto):
    """Put the agent's work onto the scratch worktree's HEAD: (new commit, conflicting files or None)."""
    message = f"Land {record['branch']}"  # never the task: later agents' sessions show subjects
    if strategy == "rebase":
        git_bytes(["checkout", "--quiet", "--force", "--detach", tip], path)
        done = git_bytes(["rebase", "--quiet", onto], path, check=False)
    elif strategy == "squash":
        done = git_bytes(["merge", "--squash", "--quiet", tip], path, check=False)
        if done.returncode == 0:
            done = git_bytes(
                ["commit", "--quiet", "--allow-empty", "-m", message], path, check=False
            )
    else:
        done = git_bytes(
            ["merge", "--quiet", "--no-ff", "--no-edit", "-m", message, tip], path, check=False
        )
    if done.returncode == 0:
        return ref_commit(path, "HEAD"), None
    files = git_bytes(["diff", "--name-only", "--diff-filter=U", "-z"], path).stdout.decode()
    files = [name for name in files.split("\0") if name]
    for abort in (["merge", "--abort"], ["rebase", "--abort"]):  # leave nothing half done
        git_bytes(abort, path, check=False)
    return None, files or [one_line(done.stderr.decode("utf-8", "replace") or "git refused")]


def checks_on(path, record):
    """Run the agent's checks on the scratch worktree: None when they pass, else the failure."""
    timeout = resilience_setting(record, "check_timeout")
    for command in resilience_setting(record, "checks"):
        code, output, why = run_check(command, path, timeout, lambda: False)
        if code != 0:
            tail = (
                tail_text(output, CHECK_TAIL_CHARS)
                if why is None
                else f"timed out after {timeout}s"
            )
            return {"command": command, "exit_code": code, "tail": tail}
    return None


def checkout_of(project, target):
    """The worktree that has `target` checked out, or None."""
    listing = git_bytes(["worktree", "list", "--porcelain", "-z"], project.repo).stdout.decode()
    path = None
    for field in listing.split("\0"):
        if field.startswith("worktree "):
            path = field[len("worktree ") :]
        elif field == f"branch refs/heads/{target}":
            return Path(path)
    return None


def checkout_stop(checkout, new):
    """Why a fast-forward of the user's checkout to `new` could overwrite something of theirs, or
    None: an operation in progress, hidden (assume-unchanged, skip-worktree) changes, untracked
    or ignored files in the way (git itself refuses only for overlapping uncommitted changes)."""
    operation = operation_in_progress(checkout)
    if operation:
        return f"{operation} is in progress in your checkout {checkout}"
    hidden = hidden_changes(checkout)
    if hidden:
        return (
            f"your checkout {checkout} has changes git status does not show "
            f"({', '.join(hidden[:MAX_LISTED_FILES])}: marked assume-unchanged or skip-worktree)"
        )
    in_the_way = overwritten_by_merge(checkout, new)
    if in_the_way:
        return f"it would overwrite your untracked or ignored {', '.join(in_the_way[:MAX_LISTED_FILES])}"
    return None


def move_target(project, target, old, new, follow=False):
    """Compare-and-swap the target from `old` to `new`: (moved, note about the user's checkout);
    moved is None when `follow` asks for the user's checkout to come along and it cannot (the
    note says why; nothing moved).

    Running agents' integrity baselines take the new target (orchestra moved it, not they)."""
    moved, note = swap_target(project, target, old, new, follow)
    if moved:
        accept_refs(project, [f"refs/heads/{target}"])
    return moved, note


def swap_target(project, target, old, new, follow=False):
    """move_target's compare-and-swap itself, through the user's checkout when it can follow."""
    checkout = checkout_of(project, target)
    stop = checkout_stop(checkout, new) if checkout is not None else None
    if follow and (checkout is None or stop):
        return None, stop or f"{target} is no longer checked out in {project.repo}"
    if checkout is not None and not stop:
        dirty = git_bytes(["status", "--porcelain", "--untracked-files=no"], checkout).stdout
        done = git_bytes(["merge", "--quiet", "--ff-only", new], checkout, check=False)
        if done.returncode == 0:
            kept = (
                f"your checkout {checkout} was brought up to date and its uncommitted changes kept"
            )
            return True, kept if dirty.strip() else None
        if ref_commit(project.repo, f"refs/heads/{target}") != old:
            return False, None
        if follow:
            said = one_line(done.stderr.decode("utf-8", "replace"), TAIL_CHARS)
            return None, f"your checkout {checkout} changed meanwhile and cannot follow ({said})"
    done = git_bytes(
        ["update-ref", "-m", "orchestra land", f"refs/heads/{target}", new, old],
        project.repo,
        check=False,
    )
    if done.returncode != 0:
        return False, None
    if checkout is None:
        return True, None
    return True, (
        f"your checkout {checkout} has changes the landing would overwrite, so only {target} moved "
        f"(to {new[:12]}) and its files stay as they were at {old[:12]}; keep your changes and catch "
        f"up with: git diff {old[:12]} > mine.patch && git reset --hard && git apply -3 mine.patch"
    )


def set_landing(project, agent_id, **facts):
    """Write landing facts into an agent's record; the record after the change."""

    def change(state):
        record = state["agents"][agent_id]
        record.update(facts)
        return dict(record)

    return project.store.update(change)


def mark_landed(project, record, target, commit, note=None):
    """Remember that the agent landed (status, --json, the dashboard), log it and tell notify_command."""
    landed = {"into": target, "commit": commit, "at": utc_iso()}
    set_landing(project, record["id"], landed=landed, landing=None, blocked=None, merged=True)
    release_dependents(project, record["id"], target)
    append_event(record["log"], {"event": "landed", **landed})
    notify(
        project.repo, record["id"], "landed", f"{record['id']} landed on {target} at {commit[:12]}"
    )
    return {"id": record["id"], "outcome": "landed", "into": target, "commit": commit, "note": note}


def release_dependents(project, agent_id, target):
    """An agent landed: the agents waiting for it wait for one fewer, and start from `target`
    once they wait for none (the supervisor makes their worktrees then)."""

    def change(state):
        freed = False
        for record in state["agents"].values():
            waits = record.get("waits_for") or []
            if agent_id in waits:
                record["waits_for"] = [i for i in waits if i != agent_id]
                record["land_base"] = target
                rest = record["waits_for"]
                record["activity"] = (
                    f"waiting for {', '.join(rest)} to land" if rest else "waiting for a worktree"
                )
                freed = freed or not rest
        return freed

    if project.store.update(change):
        ensure_supervisor(project)


def waits_line(record, agents):
    """What a queued agent waits for, as status shows it: 'held: waits for a (blocked: ...) to land'."""
    parts, held = [], False
    for agent_id in record["waits_for"]:
        dep = agents.get(agent_id) or {}
        if dep.get("blocked"):
            parts.append(f"{agent_id} (blocked: {dep['blocked']['reason']})")
        elif dep.get("state") in ("failed", "stopped", "interrupted"):
            parts.append(f"{agent_id} ({dep['state']})")
        else:
            parts.append(agent_id)
            continue
        held = True
    return ("held: " if held else "") + f"waits for {', '.join(parts)} to land"


def park(project, record, reason):
    """Park the agent `blocked` with the reason; the queue goes on without it."""
    blocked = {"reason": reason, "at": utc_iso()}
    set_landing(project, record["id"], blocked=blocked, landing=None)
    append_event(record["log"], {"event": "blocked", **blocked})
    notify(project.repo, record["id"], "blocked", f"{record['id']} is blocked: {reason}")
    return {"id": record["id"], "outcome": "blocked", "reason": reason}


def send_back(project, record, prompt, reason, commit):
    """Give the agent a fix round in its own session, or park it when its rounds are used up.
    `commit` is the target commit it is asked to merge."""
    agent_id, limit = record["id"], resilience_setting(record, "fix_rounds")
    if on_host(record):
        return send_back_on_host(project, record, (prompt, reason), commit, limit)

    def change(state):
        live = state["agents"][agent_id]
        rounds = (live.get("landing") or {}).get("rounds", 0)
        if rounds >= limit:
            return None
        try:
            queue_session(live, prompt, f"land fix round {rounds + 1}: waiting for a free slot")
        except OrchestraError:
            return None
        live["landing"] = {"status": "fixing", "rounds": rounds + 1, "reason": reason}
        append_event(
            live["log"], {"event": "land_fix_round", "round": rounds + 1, "reason": reason}
        )
        return rounds + 1

    rounds = project.store.update(change)
    if rounds is None:
        tries = f" after {limit} fix round(s)" if limit else ""
        return park(project, record, reason + tries)
    ensure_supervisor(project)
    return {"id": agent_id, "outcome": "fixing", "round": rounds, "reason": reason}


def send_back_on_host(project, record, prompt_reason, commit, limit):
    """A fix round for an agent on another host: the target commit pushed to the host's
    repository (so `git merge COMMIT` works there), the prompt sent through the host, which
    continues the session, and the agent followed again from home; parked when the rounds are
    used up or the host cannot take it."""
    (prompt, reason), agent_id = prompt_reason, record["id"]
    rounds = (record.get("landing") or {}).get("rounds", 0)
    if rounds >= limit:
        return park(project, record, reason + (f" after {limit} fix round(s)" if limit else ""))
    try:
        RemoteAgent(project, dict(record, base_commit=commit)).push_base(
            f"refs/orchestra/base/{commit}"
        )
        relay_to_host(project, record, "send", message=prompt)
    except OrchestraError as e:
        return park(project, record, f"{reason}; its host could not take a fix round: {e}")

    def change(state):
        live = state["agents"][agent_id]
        continue_on_host(live)
        live["landing"] = {"status": "fixing", "rounds": rounds + 1, "reason": reason}
        append_event(
            live["log"], {"event": "land_fix_round", "round": rounds + 1, "reason": reason}
        )

    project.store.update(change)
    ensure_supervisor(project)
    return {"id": agent_id, "outcome": "fixing", "round": rounds + 1, "reason": reason}


def land_one(project, record, target, plan):
    """Try to land one agent on the target's current tip; what happened, as a dict with `outcome`."""
    repo, agent_id = project.repo, record["id"]
    old = ref_commit(repo, f"refs/heads/{target}")
    pending = (record.get("landing") or {}).get("commit")
    if pending and not plan.dry_run and is_ancestor(repo, pending, old):
        return mark_landed(project, record, target, pending)  # a landing an interruption cut short
    problems = fetch_remote_branches(project, [record])  # Hosts: its latest commits come home
    if problems:
        reason = problems[0].split("; ", 1)[-1]
        return {"id": agent_id, "outcome": "stopped", "reason": f"{reason}; land it again later"}
    tip = branch_tip(project, record)
    if tip is None:
        reason = f"its branch {record['branch']} is gone"
        return (
            {"id": agent_id, "outcome": "would be blocked: " + reason}
            if plan.dry_run
            else park(project, record, reason)
        )
    if is_ancestor(repo, tip, old):
        if plan.dry_run:
            return {"id": agent_id, "outcome": f"nothing new: its commits are in {target} already"}
        note = f"nothing new to land: its commits are in {target} already"
        return dict(mark_landed(project, record, target, old, note), nothing_new=True)
    stop = checkout_stop(repo, tip) if plan.follow else None
    if stop:
        return {"id": agent_id, "outcome": "stopped", "reason": stop}
    if plan.dry_run:
        return dict(dry_run_one(repo, record, tip, old), unchecked=agent_id in plan.unchecked)
    path = scratch_worktree(project, old)
    new, conflicts = combine(path, plan.strategy, record, tip, old)
    if conflicts:
        prompt = LAND_CONFLICT_PROMPT.format(
            branch=record["branch"], target=target, commit=old, files=", ".join(conflicts)
        )
        return send_back(
            project, record, prompt, f"conflicts with {target} in {', '.join(conflicts)}", old
        )
    failure = None if agent_id in plan.unchecked else checks_on(path, record)
    if failure:
        return send_back_red(project, record, target, old, failure)
    return move_landed(project, record, target, (old, new), plan)


def send_back_red(project, record, target, old, failure):
    """Checks failed on the merged result: a fix round that says which command and how."""
    code = "timed out" if failure["exit_code"] is None else f"status {failure['exit_code']}"
    prompt = LAND_RED_PROMPT.format(
        branch=record["branch"],
        target=target,
        commit=old,
        command=failure["command"],
        exit_code=code,
        tail=failure["tail"] or "(no output)",
    )
    reason = f"checks fail on {target} with its work: {failure['command']} ({code})"
    return send_back(project, record, prompt, reason, old)


def move_landed(project, record, target, old_new, plan):
    """Move the target to the landed commit (noted in the record first, for a rerun after an
    interruption); the outcome: landed, retry (the target moved meanwhile) or stopped."""
    (old, new), agent_id, before = old_new, record["id"], record.get("landing")
    with shield_interrupts():
        set_landing(
            project, agent_id, landing={**(before or {}), "status": "moving", "commit": new}
        )
        moved, note = move_target(project, target, old, new, plan.follow)
        if moved is None:  # collect --merge: the user's checkout cannot follow; nothing moved
            set_landing(project, agent_id, landing=before)
            return {"id": agent_id, "outcome": "stopped", "reason": note}
        if not moved:
            set_landing(project, agent_id, landing=before)
            return {"id": agent_id, "outcome": "retry"}  # the target moved: again on its new tip
        if agent_id in plan.unchecked:
            unchecked = LAND_UNCHECKED_NOTE
            note = unchecked + (f"; {note}" if note else "")
        return mark_landed(project, record, target, new, note)


def dry_run_one(repo, record, tip, old):
    """What land would do with one agent, from `git merge-tree` alone (no checks run)."""
    done = run_git(["merge-tree", "--write-tree", "--name-only", old, tip], repo, check=False)
    if done.returncode not in (0, 1):  # git before 2.38 has no merge-tree --write-tree
        return {
            "id": record["id"],
            "outcome": "would try to land (this git cannot predict conflicts)",
        }
    if done.returncode == 1:  # 1: conflicts; the names follow the tree, up to an empty line
        files = list(itertools.takewhile(bool, done.stdout.splitlines()[1:]))
        return {"id": record["id"], "outcome": "would conflict", "files": files}
    count = len(commits_between(repo, old, tip))
    return {"id": record["id"], "outcome": "would land", "commits": count}


def land_agents(
    project, ids, into=None, dry_run=False, include_failing=False, progress=None, wait=False
):
    """What `land` does (the CLI's and the web's): land agents one by one in queue order,
    waiting for their fix rounds; with `wait`, also every agent that finishes while others are
    still at work (dependents included), until none is. {"into", "results", "not_landed"}."""
    target = landing_target(project, into)
    plan = LandPlan(project.config["land_strategy"], dry_run)
    with holding_land_lock(project):
        report, results = progress or (lambda result: None), []
        while True:
            chosen, skipped = land_candidates(project, ids, include_failing)
            queue = [r["id"] for r in chosen]
            results += run_queue(project, queue, target, plan, report)
            if not wait or dry_run:
                break
            if not chosen and not still_working(project.store.load()["agents"]):
                break
            if not chosen:
                time.sleep(LAND_POLL)
    return {
        "into": target,
        "strategy": plan.strategy,
        "dry_run": dry_run,
        "results": results,
        "not_landed": skipped,
    }


def still_working(agents):
    """True while some agent is at work or will start: not one held by a dependency that has
    not landed (blocked, failed, or still to come: when it lands, its dependents wake)."""
    return any(r["state"] in ACTIVE_STATES and not r.get("waits_for") for r in agents.values())


def run_queue(project, queue, target, plan, progress):
    """Land the queue's agents in order; an agent in a fix round is retried once it ends (when
    the plan waits for fix rounds)."""
    results, waiting = {}, []
    while queue or waiting:
        for agent_id in list(waiting):
            record = project.store.load()["agents"][agent_id]
            if record["state"] in ACTIVE_STATES:
                continue
            waiting.remove(agent_id)
            if record["state"] != "done":
                results[agent_id] = park(project, record, f"its fix round ended {record['state']}")
                progress(results[agent_id])
            else:
                queue.insert(0, agent_id)
        if not queue:
            time.sleep(LAND_POLL)
            continue
        agent_id = queue.pop(0)
        record = project.store.load()["agents"][agent_id]
        result = land_one(project, record, target, plan)
        if result["outcome"] == "retry":
            queue.insert(0, agent_id)
            continue
        if result["outcome"] == "fixing" and plan.wait_fixes:
            waiting.append(agent_id)
        results[agent_id] = result
        progress(result)
    return [results[i] for i in results]


def land_guard(record):
    """Why landing this agent deserves a second thought (its checks failed, it has no commits),
    or None. The dashboard asks before it lands such an agent."""
    checks = record.get("checks") or {}
    if checks.get("status") == "failed":
        return f"{record['id']}'s checks {checks_line(checks)}; land it anyway?"
    if record.get("commits") == 0:
        return f"{record['id']} has no commits, so there is nothing to land; land it anyway?"
    return None


def land_line(result, target):
    """One line about what land did (or would do) with an agent."""
    outcome, agent_id = result["outcome"], result["id"]
    if outcome == "landed":
        line = f"{agent_id}: landed on {target} at {result['commit'][:12]}"
        return line + (f"\n  {result['note']}" if result.get("note") else "")
    if outcome == "fixing":
        return f"{agent_id}: {result['reason']}; sent back for fix round {result['round']}"
    if outcome == "blocked":
        return f"{agent_id}: blocked: {result['reason']}; send it a follow-up ('orchestra send {agent_id} ...'), then land it again"
    if outcome == "would conflict":
        return f"{agent_id}: would conflict in {', '.join(result['files']) or 'some files'} and get a fix round"
    if outcome == "would land" and result.get("unchecked"):
        return f"{agent_id}: would merge {result['commits']} commit(s) and land, {LAND_UNCHECKED_NOTE[len('landed, '):]}"
    if outcome == "would land":
        return f"{agent_id}: would merge {result['commits']} commit(s), run the checks on the result and land"
    if outcome == "stopped":
        return f"{agent_id}: not landed: {result['reason']}"
    return f"{agent_id}: {outcome}"


def collect_agents(
    project,
    ids,
    commit=False,
    merge=False,
    patch=None,
    pr=False,
    into=None,
    cwd=None,
    include_failing=False,
    force=False,
    dry_run=False,
):
    """What `collect` does (the CLI's and the web's): reports, and optionally commits leftovers,
    merges (land's short form: done agents whose checks passed, or the named ones), writes a patch
    and opens pull requests. `cwd` is where the command runs: a merge from a linked worktree
    needs `into`. It lives here, below Landing, because --merge is a run of the queue."""
    if dry_run and (not merge or commit or patch or pr):
        raise OrchestraError(
            "--dry-run shows what --merge would do; use it with --merge alone (no --commit, --patch or --pr)"
        )
    records = finished_agents(project.all_records() if ids else project.records(), ids)
    if merge:
        check_merge_target(project, cwd or project.repo, into)
        check_checkout_clean(project.repo, "merging")
    elif into:
        raise OrchestraError("--into names where --merge merges; add --merge")
    records = check_before_collect(project, records)
    errors = {r["id"]: collect_problem(project, r) for r in records}
    errors = {i: e for i, e in errors.items() if e}
    records = [r for r in records if r["id"] not in errors]
    committed, staged_kept = commit_all_leftovers(project, records if commit else [], errors)
    accept_refs(project, [f"refs/heads/{r['branch']}" for r in records if r["id"] in committed])
    refresh_change_counts(project, [r for r in records if r["id"] in committed])
    reports = agent_reports(project, records, errors)
    document = {"agents": reports, "overlaps": overlapping_files(reports), "committed": committed}
    document["errors"] = [{"id": i, "error": e} for i, e in errors.items()]
    document["staged_kept"] = staged_kept
    if merge:
        chosen = [r for r in records if r["id"] not in errors]  # reports may have added some
        chosen = chosen if ids else [r for r in chosen if r["state"] == "done"]
        land_collected(project, chosen, document, (bool(ids), include_failing, force), dry_run)
    if patch:
        document["patch"] = {"path": patch, "commits": write_patch(project, records, patch)}
    if pr:
        document["pull_requests"] = open_pull_requests(project, reports)
        document["pr_failed"] = any(
            line.startswith("cannot open") or ": gh failed:" in line
            for line in document["pull_requests"]
        )
    return document


def land_collected(project, chosen, document, overrides, dry_run=False):
    """collect --merge: one pass of the queue into the branch checked out in the user's checkout,
    for the agents the checks gate and the integrity check let through. `overrides` is (named,
    include_failing, force): named agents, and with --include-failing those whose own checks
    failed, land without checks on the result (as collect --merge always merged them); a
    tampered agent only named with --force; a parked (blocked) one only named or after it ran
    again. A branch the checkout cannot follow does not move, and an agent sent back for a fix
    round is landed by the next `land` or collect --merge. The document says it all."""
    named, include_failing, force = overrides
    chosen, parked = (chosen, []) if named else leave_parked(chosen)
    chosen, document["not_merged"] = gate_on_checks(chosen, named or include_failing)
    document["not_merged"] += parked
    chosen, refused = gate_on_integrity(chosen, named and force)
    document["not_merged"] += refused
    target = current_branch(project.repo)
    if target is None:
        raise OrchestraError("HEAD is detached; check out the branch to merge the agents into")
    past_gate = chosen if named else gate_on_checks(chosen, False)[1]
    unchecked = frozenset(r["id"] for r in past_gate)
    strategy = project.config["land_strategy"]
    plan = LandPlan(strategy, dry_run, follow=True, unchecked=unchecked, wait_fixes=False)
    with holding_land_lock(project):
        results = run_queue(project, [r["id"] for r in chosen], target, plan, lambda result: None)
    document.update(into=target, dry_run=dry_run)
    document["landing"] = [dict(r, line=land_line(r, target)) for r in results]
    landed = [r for r in results if r["outcome"] == "landed" and not r.get("nothing_new")]
    document["merged"] = [r["id"] for r in landed]
    document["notes"] = [f"{r['id']}: {r['note']}" for r in landed if r.get("note")]
    held = [not_merged_entry(r, record_branch(chosen, r["id"])) for r in results]
    document["not_merged"] += [entry for entry in held if entry]
    document["conflict"] = next((entry for entry in held if entry), None)


def leave_parked(records):
    """(records to land, [{id, reason, hint}] left out): as land does, an agent parked blocked
    waits until it runs again (a follow-up) or is named."""
    parked = [r for r in records if blocked_still(r)]
    hints = [
        {
            "id": r["id"],
            "reason": f"blocked: {r['blocked']['reason']}",
            "hint": f"send it a follow-up ('orchestra send {r['id']} ...') or name it",
        }
        for r in parked
    ]
    return [r for r in records if r not in parked], hints


def record_branch(records, agent_id):
    """The branch of the agent with this id among records."""
    return next(r["branch"] for r in records if r["id"] == agent_id)


def not_merged_entry(result, branch):
    """collect --merge's {id, reason, hint} for an agent land did not land, or None."""
    agent_id, outcome = result["id"], result["outcome"]
    if outcome == "blocked":
        hint = (
            f"it is parked blocked: send it a follow-up ('orchestra send {agent_id} ...') and "
            f"run collect --merge again, or merge it by hand: git merge {branch}"
        )
    elif outcome == "fixing":
        hint = (
            f"sent back for fix round {result['round']}; 'orchestra land' lands it once that ends"
        )
    elif outcome == "stopped":
        hint = "nothing moved; clear that from your checkout, then run collect --merge again"
    else:
        return None
    return {"id": agent_id, "reason": result["reason"], "hint": hint}


# ======================================================================================
# Cleanup and archives
# --------------------------------------------------------------------------------------
# Cleanup never loses work. Each agent's plan is judged from worktree_holdings(): a worktree
# is removed only when everything it holds is elsewhere, or is first saved under
# refs/orchestra/archive/<id>/<stamp>[-head|-lost|-stash|-index|-worktree] in one ref
# transaction, recorded before anything is deleted. `restore` brings an archive back as the
# agent's branch, worktree and files. Only worktrees and branches orchestra made are touched.
# ======================================================================================

ARCHIVE_KINDS = ("head", "lost", "stash", "index", "worktree")  # suffixes of one archive's refs
ARCHIVE_SEQ_DIGITS = 4  # an archive's name: <sequence>-<UTC stamp>, the sequence zero-padded
# A worktree being deleted is renamed aside first: checked (may go back), then deleting (goes)
CHECKING_PREFIX, DELETING_PREFIX = ".checking-", ".deleting-"
WRITER_GRACE = 3.0  # seconds to wait for processes still using a worktree before keeping it
CLEANUP_LOCK_TIMEOUT = 300.0  # seconds one cleanup waits for another to finish


def cleanup_targets(records, ids, everything=False, failed_only=False):
    """Which agents a cleanup looks at: the named ones, else finished ones (or all, or failed)."""
    if ids:
        chosen = select_agents(records, ids)
        for record in chosen:
            if record["state"] == "removed":
                raise OrchestraError(
                    f"{record['id']} was already removed; 'orchestra cleanup --list-archives' shows its archive"
                )
        return chosen
    present = [r for r in select_agents(records, []) if r["state"] != "removed"]
    if failed_only:
        return [r for r in present if r["state"] in ("failed", "interrupted")]
    return present if everything else [r for r in present if r["state"] in FINISHED_STATES]


def is_our_worktree(project, record):
    """True when the record's worktree is where orchestra makes them, named for the agent."""
    path = Path(record["worktree"])
    return real_path(path.parent) == real_path(project.worktree_root) and path.name == (
        f"{WORKTREE_PREFIX}{record['id']}"
    )


def checked_out_elsewhere(record, worktrees):
    """Another worktree where the agent's branch is checked out, or None (paths compared real)."""
    for wt in worktrees.values():
        if wt["branch"] == record["branch"] and wt["real"] != real_path(record["worktree"]):
            return wt["path"]
    return None


def worktrees_by_path(repo):
    """git's worktrees keyed by their real path (symlinks resolved, as git records them)."""
    return {w["real"]: w for w in list_worktrees(repo)}


def plan_agent_cleanup(project, record, worktrees, force):
    """What cleanup does with one agent: {id, action, reasons, forced, stop_first, tip}.

    Never the main worktree, one orchestra did not make, a locked one, one a spawn is still
    preparing, or one holding files cleanup cannot read, even with force.
    """
    step = {
        "id": record["id"],
        "action": "remove",
        "reasons": [],
        "forced": False,
        "stop_first": False,
    }
    path = str(Path(record["worktree"]))
    listed = worktrees.get(real_path(path))
    if not is_our_worktree(project, record) or real_path(path) == real_path(project.repo):
        return dict(step, action="keep", reasons=[f"worktree {path} is not one orchestra made"])
    moved = moved_worktree(project.repo, record)
    if moved:
        return dict(
            step,
            action="keep",
            reasons=[f"its worktree was moved to {moved}; git worktree move {moved} {path}"],
        )
    if listed and listed["locked"]:
        return dict(
            step, action="keep", reasons=[f"worktree is locked (git worktree unlock {path})"]
        )
    if record["state"] == "queued" and not record.get("ready") and not record.get("pid"):
        return dict(step, action="keep", reasons=["its worktree is still being prepared by spawn"])
    soft = []
    if record["state"] in ACTIVE_STATES:
        soft.append(f"still {record['state']}; stop it first or use --force")
        step["stop_first"] = True
    held = worktree_holdings(project, record)
    if unsaveable(held):
        return dict(step, action="keep", reasons=[unsaveable(held)])
    soft += holdings_reasons(record, held)
    step["tip"] = tip = held["tip"]
    unmerged = unmerged_reason(project, record, tip) if tip else None
    if unmerged:
        soft.append(unmerged)
    if soft and not force:
        return dict(step, action="keep", reasons=soft)
    gone = tip is None and not Path(path).is_dir()
    nothing = (
        ["nothing left: its branch and worktree are gone"]
        if gone
        else (
            ["no changes: no commits, nothing uncommitted"]
            if tip == record.get("base_commit")
            else ["merged, nothing uncommitted"]
        )
    )
    return dict(step, reasons=soft or nothing, forced=bool(soft))


def plan_cleanup(project, records, force=False):
    """The cleanup plan for these agents; the dry run prints it and the real run carries it out."""
    operation = operation_in_progress(project.repo)
    if operation:
        raise OrchestraError(
            f"{operation} is in progress in {project.repo}; finish or abort it before cleaning up"
        )
    worktrees = worktrees_by_path(project.repo)
    return [plan_or_keep(project, r, worktrees, force) for r in records]


def plan_or_keep(project, record, worktrees, force):
    """One agent's plan; when git cannot answer for it, a KEEP with the error (exit 1), so one
    broken agent never stops the others from being cleaned up."""
    try:
        return plan_agent_cleanup(project, record, worktrees, force)
    except GitError as e:
        message = (
            str(e)
            if str(e).startswith(f"{record['id']}: ")
            else f"{e}; it is kept as it is (git could not tell what it holds)"
        )
        reason = message.removeprefix(f"{record['id']}: ")
        return {"id": record["id"], "action": "keep", "reasons": [reason], "error": True,
                "forced": False, "stop_first": False}  # fmt: skip


def archive_stamp(repo, agent_id):
    """<sequence>-<UTC stamp>: the sequence (one more than this agent's last archive) orders
    archives whatever the clock says; the stamp is for people."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    mine = [a for a in list_archives(repo) if a["id"] == agent_id]
    seq = max((a["seq"] for a in mine), default=0) + 1
    return f"{seq:0{ARCHIVE_SEQ_DIGITS}d}-{stamp}"


def archive_holdings(project, record, held):
    """Save everything the worktree holds under refs/orchestra/archive/<id>/<stamp>[-kind]; the refs.

    <stamp>: the branch tip (else HEAD); -head: a HEAD elsewhere; -lost: commits only the
    reflogs reached; -stash: its stashes; -index: the staged tree; -worktree: a snapshot of
    every file not provably committed or left by setup (parent: HEAD). One transaction.
    """
    repo, agent_id, head = project.repo, record["id"], held["head"]
    if archived_already(project, record, held):
        return list(record["archive"])
    base = f"{ARCHIVE_REFS}/{agent_id}/{archive_stamp(repo, agent_id)}"
    main, refs = held["tip"] or head, {}
    if main:
        refs[base] = main
    if head and head != main:
        refs[f"{base}-head"] = head
    kept_by_name = held["reflog_lost"] + held["detached_lost"] + held.get("nested_lost", [])
    lost = [
        c
        for c in independent_commits(repo, kept_by_name)
        if not any(is_ancestor(repo, c, kept) for kept in refs.values())
    ]
    if lost:
        refs[f"{base}-lost"] = (
            lost[0]
            if len(lost) == 1
            else octopus_commit(
                repo, lost, f"orchestra: commits only {agent_id}'s worktree reflogs held"
            )
        )
    if held["stashes"]:
        stashes = held["stashes"]
        refs[f"{base}-stash"] = (
            stashes[0]
            if len(stashes) == 1
            else octopus_commit(
                repo, stashes, f"orchestra: {len(stashes)} stashes made in {agent_id}'s worktree"
            )
        )
    if held["staged"] and held["staged"] != "conflict":
        args = [
            "commit-tree",
            held["staged"],
            *(["-p", head] if head else []),
            "-m",
            f"orchestra: {agent_id}'s index",
        ]
        refs[f"{base}-index"] = git_bytes(args, repo).stdout.decode().strip()
    changes = held["changes"]
    if changes and (changes["changed"] or changes["deleted"]):
        worktree = Path(record["worktree"])
        write_changed_blobs(repo, worktree, worktree_admin_dir(worktree), changes)
        message = f"orchestra: snapshot of {agent_id}'s worktree before cleanup"
        refs[f"{base}-worktree"] = snapshot_commit(repo, head, changes, message)
    if refs:
        write_refs(repo, refs)
        verify_archive(repo, refs, held)
    return list(refs)


def archived_already(project, record, held):
    """True when an interrupted cleanup archived this agent and only its branch is left (the
    folder is gone): the archive it recorded holds that tip, so no second, emptier one is made."""
    saved = record.get("archive") or []
    only_tip = not Path(record["worktree"]).is_dir() and not (
        held["stashes"] or held["reflog_lost"] or held["detached_lost"] or held["staged"]
    )
    return bool(saved) and only_tip and ref_commit(project.repo, saved[0]) == held["tip"]


def verify_archive(repo, refs, held):
    """Check that every object the new archive refs reach is in the repository; else delete
    those refs and raise. (A `git gc --prune=now` running meanwhile drops objects written
    moments before a ref held them.) Objects the branch and HEAD hold are not walked again."""
    known = [c for c in (held["tip"], held["head"]) if c]
    args = ["rev-list", "--objects", "--no-object-names", "--stdin"]
    lines = [*refs.values(), *(f"^{c}" for c in known)]
    done = git_bytes(args, repo, input="\n".join(lines).encode() + b"\n", check=False)
    if done.returncode != 0:
        git_bytes(
            ["update-ref", "--stdin"],
            repo,
            input="".join(f"delete {name}\n" for name in refs).encode(),
            check=False,
        )
        raise GitError("the archive could not be verified (objects missing); nothing was removed")


def wait_for_writers(worktree, grace=WRITER_GRACE):
    """Processes still using the worktree after `grace` seconds, as a reason; None when none."""
    deadline = time.monotonic() + grace
    while True:
        users = processes_using(worktree)
        if not users or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not users:
        return None
    named = ", ".join(f"{pid} ({name})" for pid, name in users[:MAX_LISTED_FILES])
    return f"process {named} still uses the worktree; end it and run cleanup again"


def record_archive(project, agent_id, refs):
    """Write the archive refs into the agent's record before anything is removed."""

    def change(state):
        state["agents"][agent_id]["archive"] = refs

    try:
        project.store.update(change)
    except OSError as e:
        raise OrchestraError(
            f"cannot record {agent_id}'s archive in {project.dir} ({e.strerror}); nothing was removed. "
            f"Its work is saved under {refs[0] if refs else ARCHIVE_REFS}; fix the problem and run cleanup again",
            EXIT_FAILURE,
        ) from None


def remove_agent(project, record, step):
    """Carry out one 'remove' step: stop, check, archive, record, then delete; the archive refs.

    Looks again after stopping the agent: an unforced step whose worktree or branch changed
    since the plan is not carried out (None). A string is a reason to keep it after all.
    """
    if step["stop_first"]:
        stop_agents(project, [record["id"]])
    if Path(record["worktree"]).is_dir():
        busy = wait_for_writers(record["worktree"])
        if busy:
            return busy
    held = worktree_holdings(project, record)
    if unsaveable(held):
        return unsaveable(held)
    if not step["forced"] and (holdings_reasons(record, held) or held["tip"] != step["tip"]):
        return None
    try:
        refs = archive_holdings(project, record, held)
    except GitError:  # once more, objects written afresh: a gc may have raced the first
        refs = archive_holdings(project, record, held)
    record_archive(project, record["id"], refs)
    with shield_interrupts():
        changed = delete_worktree_safely(project, record, held)
        if changed:
            return changed
        worktrees = worktrees_by_path(project.repo)
        if held["tip"] and not checked_out_elsewhere(record, worktrees):
            delete = [
                "update-ref",
                "-d",
                f"refs/heads/{record['branch']}",
                held["tip"],
            ]  # only if still at tip
            run_git(delete, project.repo)
        mark_removed(project, record["id"], refs)
    drop_agent_env(project, [record["id"]])
    return refs


def cleanup_agents(
    project, ids=None, apply=False, everything=False, failed_only=False, force=False
):
    """Plan a cleanup and, with apply, carry it out: {"plan": [...], "applied": bool}.

    One cleanup at a time: a second waits for the first, then plans from what is left.
    """
    lock = FileLock(project.dir / "cleanup.lock")
    project.dir.mkdir(parents=True, exist_ok=True)
    if apply and not lock.acquire(timeout=CLEANUP_LOCK_TIMEOUT):
        raise OrchestraError(
            "another orchestra cleanup is still running; try again when it has finished",
            EXIT_FAILURE,
        )
    try:
        if apply:
            roll_back_stalled_spawns(project)
            finish_interrupted_deletes(project)
        live = project.records()
        records = cleanup_targets(
            project.all_records() if ids else live, ids, everything, failed_only
        )
        away = bring_home_for_cleanup(project, records)  # Hosts: their work comes home first
        plan = plan_cleanup(project, records, force)
        for step in (s for s in plan if s["id"] in away):
            step.update(action="keep", reasons=[away[step["id"]]])
        if apply:
            by_id = {r["id"]: r for r in records}
            for step in (s for s in plan if s["action"] == "remove"):
                apply_step(project, by_id[step["id"]], step)
                if step["action"] == "remove" and on_host(by_id[step["id"]]):
                    with contextlib.suppress(OrchestraError):  # home holds it all already
                        remove_on_host(project, by_id[step["id"]])
    finally:
        if apply:
            lock.release()
    return {"plan": plan, "applied": apply}


def apply_step(project, record, step):
    """Carry out one step of the plan, turning it into a KEEP when something stands in the way."""
    try:
        outcome = remove_agent(project, record, step)
    except GitError as e:
        outcome, step["error"] = f"not removed: {e}", True
    if outcome is None:
        step.update(action="keep", reasons=["changed since the plan was made; run cleanup again"])
    elif isinstance(outcome, str):
        step.update(action="keep", reasons=[outcome])
    else:
        step["archive"] = outcome


def delete_worktree_safely(project, record, held):
    """Delete the agent's worktree so that no file is lost and any interruption (kill -9
    included) leaves a state the next cleanup finishes: the folder is renamed aside to
    `.checking-…`, every file's stat is compared with what was archived (a write since, from any
    process, puts it back: a reason to keep), renamed to `.deleting-…`, then removed.
    None when done, else why it was kept."""
    worktree = Path(record["worktree"])
    admins = own_admin_dirs(project.repo, worktree)
    if not worktree.is_dir():
        for admin in admins:
            delete_tree(admin)
        return None
    admin = worktree_admin_dir(worktree)
    aside = worktree.parent / f"{CHECKING_PREFIX}{worktree.name}.{os.getpid()}"
    try:
        os.rename(worktree, aside)
    except OSError as e:
        return f"cannot move its worktree aside to delete it ({e.strerror}); nothing was removed"
    walked = {}
    items = [i for i in worktree_files(project.repo, aside, admin, walked) if i[2] in FILE_MODES]
    if file_stats(items, walked) != (held["changes"] or {}).get("stats", {}):
        os.rename(aside, worktree)
        return "a file in its worktree changed while cleanup ran; run cleanup again"
    doomed = worktree.parent / f"{DELETING_PREFIX}{worktree.name}.{os.getpid()}"
    os.rename(aside, doomed)
    for admin in admins:
        delete_tree(admin)
    delete_tree(doomed)
    return None


def finish_interrupted_deletes(project):
    """Finish what an interrupted cleanup left: `.deleting-…` folders were archived and checked,
    so they go; `.checking-…` folders were not yet checked, so they move back into place."""
    root = project.worktree_root
    for doomed in sorted(root.glob(f"{DELETING_PREFIX}{WORKTREE_PREFIX}*")):
        delete_tree(doomed)
    for aside in sorted(root.glob(f"{CHECKING_PREFIX}{WORKTREE_PREFIX}*")):
        home = root / aside.name[len(CHECKING_PREFIX) :].rsplit(".", 1)[0]
        if not os.path.lexists(home):
            os.rename(aside, home)


def mark_removed(project, agent_id, archive):
    """Record that an agent's worktree and branch are gone, and where its work was saved."""

    def change(state):
        record = state["agents"][agent_id]
        record.update(
            state="removed",
            archive=archive,
            removed_at=utc_iso(),
            pid=None,
            state_before_removal=record["state"],
        )

    project.store.update(change)


def list_archives(repo):
    """Archives of cleaned-up agents, one per cleanup: [{id, saved, ref, commit, subject, refs, restore}].

    `refs` maps each kind ("tip", "head", "lost", "stash", "index", "worktree") to its ref.
    """
    fmt = "%(refname)%00%(objectname:short)%00%(subject)"
    groups = {}
    for line in run_git(
        ["for-each-ref", f"--format={fmt}", f"{ARCHIVE_REFS}/"], repo
    ).stdout.splitlines():
        ref, commit, subject = line.split("\0")
        agent_id, leaf = ref[len(ARCHIVE_REFS) + 1 :].rsplit("/", 1)
        stamp, kind = leaf, "tip"
        for suffix in ARCHIVE_KINDS:
            if leaf.endswith(f"-{suffix}"):
                stamp, kind = leaf[: -len(suffix) - 1], suffix
        group = groups.setdefault(
            (agent_id, stamp),
            {
                "id": agent_id,
                "saved": stamp,
                "ref": ref,
                "commit": commit,
                "subject": subject,
                "refs": {},
            },
        )
        group["refs"][kind] = ref
        if kind == "tip":
            group.update(ref=ref, commit=commit, subject=subject)
    for group in groups.values():
        group["restore"] = f"orchestra restore {group['id']}/{group['saved']}"
        seq = re.match(r"([0-9]+)-", group["saved"])
        group["seq"] = int(seq.group(1)) if seq else 0  # archives made before sequences: 0
        group["stamp"] = group["saved"][seq.end() :] if seq else group["saved"]
    return sorted(groups.values(), key=lambda g: (g["id"], g["seq"], g["saved"]))


def find_archive(repo, name):
    """The archive `name` means: 'id' (its newest archive, ids by unique prefix) or 'id/stamp'."""
    archives = list_archives(repo)
    agent_id, _, stamp = name.partition("/")
    ids = sorted({a["id"] for a in archives})
    if agent_id not in ids:
        matches = [i for i in ids if i.startswith(agent_id)]
        if len(matches) != 1:
            found = (
                f"'{agent_id}' matches {', '.join(matches)}; type more of the id"
                if matches
                else (f"no archive of '{agent_id}'; 'orchestra cleanup --list-archives' lists them")
            )
            raise OrchestraError(found)
        agent_id = matches[0]
    mine = [a for a in archives if a["id"] == agent_id and (not stamp or a["saved"] == stamp)]
    if not mine:
        raise OrchestraError(f"no archive {name}; 'orchestra cleanup --list-archives' lists them")
    return fullest_archive(repo, agent_id, mine)


def archive_files(repo, archive):
    """How many files an archive's worktree (its snapshot, else its branch tip) holds."""
    refs = archive["refs"]
    ref = refs.get("worktree") or refs.get("tip") or refs.get("head")
    if not ref:
        return 0
    out = git_bytes(["ls-tree", "-r", "-z", "--name-only", ref], repo, check=False).stdout
    return out.count(b"\0")


def fullest_archive(repo, agent_id, archives):
    """The newest archive (by sequence) when it holds at least as many files as every older
    one; otherwise a question: never an emptied archive over a full one."""
    if len(archives) == 1:
        return archives[0]
    counts = [archive_files(repo, a) for a in archives]
    if counts[-1] >= max(counts):
        return archives[-1]
    choices = "; ".join(
        f"orchestra restore {a['id']}/{a['saved']} ({plural(n, 'file')})"
        for a, n in zip(archives, counts)
    )
    raise OrchestraError(
        f"{agent_id} has {len(archives)} archives and the newest holds fewer files than an older "
        f"one; pick one: {choices}"
    )


def restore_agent(project, name):
    """Bring an archived agent back: its branch, a worktree with its files, index and record.

    Refuses when the branch or the folder exists. Returns {id, branch, worktree, restored}.
    """
    archive = find_archive(project.repo, name)
    agent_id, refs = archive["id"], archive["refs"]
    record = project.history().get(agent_id)
    branch = record["branch"] if record else project.branch_name(agent_id)
    worktree = project.worktree_path(agent_id)
    if branch_exists(project.repo, branch):
        raise OrchestraError(
            f"branch '{branch}' already exists; rename or delete it, then restore {agent_id} again"
        )
    if os.path.lexists(worktree):
        raise OrchestraError(
            f"folder {worktree} already exists; move it away, then restore {agent_id} again"
        )
    if agent_id in project.records() and project.records()[agent_id]["state"] != "removed":
        raise OrchestraError(
            f"an agent '{agent_id}' exists already; clean it up before restoring its archive"
        )
    start = refs.get("tip") or refs.get("head") or (record or {}).get("base_commit")
    if not start:
        raise OrchestraError(f"archive {archive['ref']} holds no commit to start the branch from")
    project.worktree_root.mkdir(parents=True, exist_ok=True)
    run_git(["worktree", "add", "--quiet", "-b", branch, str(worktree), start], project.repo)
    restored = ["branch", "worktree"]
    if (
        "worktree" in refs
    ):  # files before the index: an index gitlink would hide a submodule's files
        git_bytes(["restore", f"--source={refs['worktree']}", "--worktree", "--", ":/"], worktree)
        revive_nested_repositories(worktree)
        restored.append("files")
    if "index" in refs:
        git_bytes(["read-tree", f"{refs['index']}^{{tree}}"], worktree)
        restored.insert(2, "index")
    if record:
        revive_record(project, record, worktree)
    return {
        "id": agent_id,
        "branch": branch,
        "worktree": str(worktree),
        "restored": restored,
        "archive": archive,
        "other_refs": {k: v for k, v in refs.items() if k in ("lost", "stash", "head")},
    }


def revive_nested_repositories(worktree):
    """Turn a snapshot's stored nested .git folders back into `.git` (see snapshot_path)."""
    for folder, dirs, files in os.walk(worktree, topdown=False):
        for name in dirs + files:
            if name != NESTED_GIT_NAME:
                continue
            stored, real = os.path.join(folder, name), os.path.join(folder, ".git")
            private = os.path.join(folder, ".git-dir")
            if os.path.isdir(private):  # its git dir lived in the worktree's admin folder
                os.unlink(stored)
                os.rename(private, real)
                run_git(
                    ["config", "--file", os.path.join(real, "config"), "--unset", "core.worktree"],
                    worktree,
                    check=False,
                )
            else:
                os.rename(stored, real)


def revive_record(project, record, worktree):
    """Put a cleaned-up agent's record back among the live ones, as it was before cleanup."""

    def change(state):
        revived = dict(
            record,
            state=record.get("state_before_removal") or "stopped",
            worktree=str(worktree),
            pid=None,
            activity="restored from its archive",
        )
        revived.pop("removed_at", None)
        state["agents"][record["id"]] = revived

    project.store.update(change)


def cleanup_line(step, dry_run):
    """'KEEP id: why' or 'REMOVED id: why it was safe' (WOULD REMOVE in a dry run)."""
    reasons = "; ".join(step["reasons"])
    if step["action"] == "keep":
        return f"KEEP {step['id']}: {reasons}"
    verb = "WOULD REMOVE" if dry_run else "REMOVED"
    forced = "forced past: " if step["forced"] else ""
    saved = f" (saved as {step['archive'][0]})" if step.get("archive") else ""
    return f"{verb} {step['id']}: {forced}{reasons}{saved}"


# ======================================================================================
# WebSocket
# --------------------------------------------------------------------------------------
# RFC 6455 by hand: the opening handshake as a pure function of the request headers,
# frames packed with struct, and one server-side connection that reads frames on its own
# thread and sends whole frames through a bounded queue.
# ======================================================================================

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
WS_VERSION = "13"
WS_SUBPROTOCOL = "orchestra"
WS_OP_CONTINUATION, WS_OP_TEXT, WS_OP_BINARY = 0x0, 0x1, 0x2
WS_OP_CLOSE, WS_OP_PING, WS_OP_PONG = 0x8, 0x9, 0xA
WS_OPCODES = (WS_OP_CONTINUATION, WS_OP_TEXT, WS_OP_BINARY, WS_OP_CLOSE, WS_OP_PING, WS_OP_PONG)
WS_CLOSE_NORMAL, WS_CLOSE_PROTOCOL, WS_CLOSE_BAD_DATA, WS_CLOSE_TOO_BIG = 1000, 1002, 1007, 1009
WS_SENDABLE_CLOSE_CODES = frozenset((*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)))
WS_MAX_CONTROL = 125  # bytes of a control frame's payload
WS_MAX_MESSAGE = 64 * 1024  # bytes of a message from a client; the dashboard sends none
WS_MAX_FRAGMENTS = 64  # frames of one fragmented message (empty ones count too)
WS_PING_INTERVAL = 30.0  # seconds between pings
WS_PONG_TIMEOUT = 10.0  # seconds past a ping after which a silent client is dropped
WS_QUEUE_LIMIT = 32  # messages waiting for a slow reader; one more and it is closed
WS_CLOSE_LINGER = 1.0  # seconds to read what a client still sends after our close frame
WS_DRAIN_CHUNK = 64 * 1024  # bytes per read while lingering


class HTTPRefusal(Exception):
    """A request answered with an HTTP error status and `{"error": message}`."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class WebSocketClose(Exception):
    """The connection must close with this status code (RFC 6455 section 7.4)."""

    def __init__(self, code, reason=""):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def header_items(headers, name):
    """The comma-separated items of every `name` header, stripped."""
    values = headers.get_all(name) if hasattr(headers, "get_all") else [headers.get(name)]
    return [
        item.strip() for value in values or () if value for item in value.split(",") if item.strip()
    ]


def websocket_accept(headers):
    """The response headers that accept an opening handshake (RFC 6455 section 4.2.2).

    Raises HTTPRefusal: 400 for a malformed request, 426 naming version 13 for another version.
    """
    if "websocket" not in [
        t.lower() for t in header_items(headers, "Upgrade")
    ] or "upgrade" not in [t.lower() for t in header_items(headers, "Connection")]:
        raise HTTPRefusal(
            400, "a WebSocket handshake needs 'Upgrade: websocket' and 'Connection: Upgrade'"
        )
    if header_items(headers, "Sec-WebSocket-Version") != [WS_VERSION]:
        raise HTTPRefusal(
            426, "only WebSocket version 13 is spoken here", {"Sec-WebSocket-Version": WS_VERSION}
        )
    key = (headers.get("Sec-WebSocket-Key") or "").strip()
    try:
        nonce = base64.b64decode(key, validate=True)
    except ValueError:
        nonce = b""
    if len(nonce) != 16:
        raise HTTPRefusal(400, "Sec-WebSocket-Key must be 16 random bytes in base64")
    accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode("ascii")).digest()).decode(
        "ascii"
    )
    response = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Accept": accept}
    if WS_SUBPROTOCOL in header_items(headers, "Sec-WebSocket-Protocol"):
        response["Sec-WebSocket-Protocol"] = WS_SUBPROTOCOL  # never echo the token item
    return response


def apply_mask(data, key):
    """XOR data with the 4-byte masking key repeated (section 5.3), as one big-integer XOR."""
    length = len(data)
    if not length:
        return b""
    pad = (key * (length // 4 + 1))[:length]
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(length, "big")


def encode_frame(opcode, payload=b"", fin=True):
    """One unmasked server frame (section 5.2)."""
    first, length = (0x80 if fin else 0) | opcode, len(payload)
    if length < 126:
        return struct.pack("!BB", first, length) + payload
    if length < 1 << 16:
        return struct.pack("!BBH", first, 126, length) + payload
    return struct.pack("!BBQ", first, 127, length) + payload


def read_exactly(rfile, count):
    """`count` bytes from the stream; EOFError when the peer hangs up first."""
    data = rfile.read(count) if count else b""
    if len(data) < count:
        raise EOFError("the client closed the connection")
    return data


def read_frame(rfile, room):
    """(fin, opcode, payload) of one client frame; data frames may carry at most `room` bytes.

    Checks everything before the payload is read, so an over-size frame is refused unread.
    """
    first, second = read_exactly(rfile, 2)
    fin, opcode, length = first >> 7, first & 0x0F, second & 0x7F
    if first & 0x70:
        raise WebSocketClose(WS_CLOSE_PROTOCOL, "reserved bits are set")
    if opcode not in WS_OPCODES:
        raise WebSocketClose(WS_CLOSE_PROTOCOL, f"opcode {opcode} is reserved")
    if opcode >= WS_OP_CLOSE and (not fin or length > WS_MAX_CONTROL):
        raise WebSocketClose(WS_CLOSE_PROTOCOL, "control frames are short and never fragmented")
    if not second & 0x80:
        raise WebSocketClose(WS_CLOSE_PROTOCOL, "client frames must be masked")
    if length == 126:
        (length,) = struct.unpack("!H", read_exactly(rfile, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", read_exactly(rfile, 8))
        if length >> 63:
            raise WebSocketClose(WS_CLOSE_PROTOCOL, "the most significant length bit must be 0")
    if opcode < WS_OP_CLOSE and length > room:
        raise WebSocketClose(WS_CLOSE_TOO_BIG, f"messages are limited to {WS_MAX_MESSAGE} bytes")
    key = read_exactly(rfile, 4)
    return bool(fin), opcode, apply_mask(read_exactly(rfile, length), key)


def close_code(payload):
    """The status code of a client's close frame, checked (section 7.4); 1000 when it has none."""
    if not payload:
        return WS_CLOSE_NORMAL
    (code,) = struct.unpack("!H", payload[:2]) if len(payload) > 1 else (None,)
    if code not in WS_SENDABLE_CLOSE_CODES:
        raise WebSocketClose(WS_CLOSE_PROTOCOL, "invalid close frame")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketClose(WS_CLOSE_BAD_DATA, "the close reason is not UTF-8") from None
    return code


def check_utf8(data):
    """Raise close code 1007 unless data is UTF-8 (section 8.1)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketClose(WS_CLOSE_BAD_DATA, "text messages must be UTF-8") from None


def drop_socket(sock):
    """Shut a connection both ways so a thread blocked reading or writing it returns at once."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS


class WebSocket:
    """One accepted WebSocket. Frames are read on the caller's thread; messages go out from a
    bounded queue drained by a writer thread, so a client that stops reading is dropped instead
    of slowing anyone else."""

    def __init__(
        self,
        sock,
        rfile,
        wfile,
        ping_interval=WS_PING_INTERVAL,
        pong_timeout=WS_PONG_TIMEOUT,
        queue_limit=WS_QUEUE_LIMIT,
    ):
        self.sock, self.rfile, self.wfile = sock, rfile, wfile
        self.ping_interval = ping_interval
        self.outbox = queue.Queue(queue_limit)
        self.closed = threading.Event()
        self.write_lock = (
            threading.Lock()
        )  # guards wfile and close_sent: whole frames, none after close
        self.close_sent = False
        sock.settimeout(
            ping_interval + pong_timeout
        )  # a live client answers every ping within this

    def send(self, message):
        """Queue a text message (bytes of UTF-8); a client too far behind is dropped."""
        try:
            self.outbox.put_nowait(message)
        except queue.Full:
            self.abort()

    def serve(self):
        """Answer the client until it closes, breaks the protocol or goes silent."""
        writer = threading.Thread(target=self.write_loop, name="orchestra-ws-writer", daemon=True)
        writer.start()
        try:
            code, reason = self.read_loop(), ""
        except WebSocketClose as e:
            code, reason = e.code, e.reason
        except (OSError, EOFError, ValueError):
            code, reason = None, ""  # gone, silent past its pong, or shut down by the server
        self.finish(code, reason)
        writer.join()

    def read_loop(self):
        """Read frames, answer pings and check messages; the client's close code when it closes."""
        parts, kind, size = [], None, 0
        while True:
            fin, opcode, payload = read_frame(self.rfile, WS_MAX_MESSAGE - size)
            if opcode == WS_OP_CLOSE:
                return close_code(payload)
            if opcode == WS_OP_PING:
                self.write(WS_OP_PONG, payload)
            elif opcode != WS_OP_PONG:
                if (opcode == WS_OP_CONTINUATION) != (kind is not None):
                    raise WebSocketClose(WS_CLOSE_PROTOCOL, "fragments out of order")
                kind = kind or opcode
                parts.append(payload)
                size += len(payload)
                if len(parts) > WS_MAX_FRAGMENTS:
                    raise WebSocketClose(
                        WS_CLOSE_TOO_BIG, f"messages are limited to {WS_MAX_FRAGMENTS} fragments"
                    )
                if fin:
                    if kind == WS_OP_TEXT:
                        check_utf8(b"".join(parts))
                    parts, kind, size = (
                        [],
                        None,
                        0,
                    )  # clients have nothing to say yet; messages are ignored

    def write_loop(self):
        """Send queued messages, and a ping every ping_interval, until the connection ends."""
        next_ping = time.monotonic() + self.ping_interval
        while not self.closed.is_set():
            try:
                message = self.outbox.get(timeout=max(0.0, next_ping - time.monotonic()))
            except queue.Empty:
                message, next_ping = b"", next_ping + self.ping_interval
            try:
                if message is None or self.closed.is_set():
                    return
                if message:
                    self.write(WS_OP_TEXT, message)
                else:
                    self.write(WS_OP_PING, b"")
            except OSError:
                return self.abort()

    def write(self, opcode, payload, wait=-1):
        """Send one whole frame (given up after `wait` seconds for the lock); nothing after the close."""
        if not self.write_lock.acquire(timeout=wait):
            return
        try:
            if not self.close_sent:
                self.wfile.write(encode_frame(opcode, payload))
                self.close_sent = opcode == WS_OP_CLOSE
        finally:
            self.write_lock.release()

    def finish(self, code, reason):
        """Send our close frame, then read what the client still sends for a moment and hang up."""
        self.closed.set()
        with contextlib.suppress(queue.Full):
            self.outbox.put_nowait(None)  # wakes the writer
        try:
            if code:  # the lock may be held by a writer stuck on a client that stopped reading
                close = struct.pack("!H", code) + reason.encode("utf-8")[: WS_MAX_CONTROL - 2]
                self.write(WS_OP_CLOSE, close, wait=WS_CLOSE_LINGER)
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
            deadline = (
                time.monotonic() + WS_CLOSE_LINGER
            )  # unread bytes would make close() send a reset
            self.sock.settimeout(WS_CLOSE_LINGER)
            while time.monotonic() < deadline and self.sock.recv(WS_DRAIN_CHUNK):
                pass
        except OSError:
            pass
        self.abort()

    def abort(self):
        """End the connection at once: both directions of the socket shut."""
        self.closed.set()
        drop_socket(self.sock)


# ======================================================================================
# HTTP server: the gate
# --------------------------------------------------------------------------------------
# `orchestra web` refuses a request before any route sees it: a Host outside the allow-list, a
# cross-site Origin, a missing or wrong token (a Bearer header, or for the WebSocket the
# Sec-WebSocket-Protocol value; never a query string or cookie), oversized headers or bodies,
# and a connection without the token that is still talking after its deadline.
# ======================================================================================

WEB_TOKEN_BYTES = 32
WEB_TOKEN_FILE = "web.json"  # in .orchestra/, mode 0600
WEB_HOST_SYNTAX = re.compile(
    r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)  # a Host header value
WEB_MAX_HEADER_BYTES = 16384  # all header lines together; more is 431
WEB_HEADER_LINE = re.compile(
    rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r\n"
)  # RFC 9112 5
WEB_DIGITS = re.compile(r"[0-9]{1,15}")
JSON_MARKS = re.compile(rb'["\[\]{}]')  # what json_depth_ok looks at
# a subprotocol that carries the token: browsers cannot set WebSocket headers
WS_TOKEN_PREFIX = "token."
# GET ?nonce=HEX, no token: answers HMAC-SHA256(token, nonce), so the page can tell that this
# server knows its token before it sends it (a server squatting the port while `web` was
# stopped does not)
WEB_CHALLENGE_PATH = "/api/challenge"
WEB_NONCE = re.compile(r"[0-9a-f]{32,128}")


def web_token(folder, rotate=False):
    """The access token kept in web.json (mode 0600): made anew when rotating (every `web` start
    does: a token taken while the server was down never works again), else reused."""
    path = folder / WEB_TOKEN_FILE
    if not rotate:
        try:
            token = json.loads(path.read_text(encoding="utf-8"))["token"]
            if isinstance(token, str) and len(token) >= WEB_TOKEN_BYTES:
                os.chmod(str(path), 0o600)
                return token
        except (OSError, ValueError, KeyError, TypeError):
            pass  # missing or damaged: a new token replaces it
    token = secrets.token_urlsafe(WEB_TOKEN_BYTES)
    write_atomic(path, json.dumps({"token": token, "created_at": utc_iso()}, indent=2) + "\n")
    os.chmod(str(path), 0o600)
    return token


def host_name(host):
    """The lowercase name or address in a Host header value ('[::1]:80' -> '::1'); '' if malformed."""
    if not host or not WEB_HOST_SYNTAX.fullmatch(host):
        return ""
    return (urlsplit(f"//{host}").hostname or "").rstrip(".")


def allowed_hosts(bound, extra=()):
    """Host names requests may carry: loopback, the bound address, this machine's name, --allow-host."""
    names = {*WEB_LOOPBACK_HOSTS, socket.gethostname().lower(), *(host_name(h) for h in extra)}
    if bound not in WEB_WILDCARD_HOSTS:
        names.add(host_name(bound if ":" not in bound else f"[{bound}]"))
    return frozenset(n for n in names if n)


class Gate:
    """Who may reach a route: the Host allow-list, the served origin and the access token."""

    def __init__(self, token, hosts, scheme="http"):
        self.token = token.encode("ascii")
        self.hosts = frozenset(hosts)
        self.scheme = scheme

    def check(self, method, path, headers):
        """Raise HTTPRefusal (403, 401 or 415) unless the request may reach a route; True when it
        showed the token (the page itself needs none)."""
        host = self.single(headers, "Host")
        if host_name(host) not in self.hosts:
            raise HTTPRefusal(
                403, f"Host '{host}' is not served here; start orchestra web with --allow-host NAME"
            )
        origin = self.single(headers, "Origin")
        if origin is not None and origin.lower() != f"{self.scheme}://{host}".lower():
            raise HTTPRefusal(403, "cross-site requests are refused")
        if not path.startswith(("/api/", "/ws/")):
            return False
        if path == WEB_CHALLENGE_PATH and method == "GET":
            return False  # the page asks for proof before it shows its token (route_challenge)
        token = self.presented(path, headers)
        if token is None or not hmac.compare_digest(token, self.token):
            raise HTTPRefusal(
                401,
                "missing or wrong token; open the link 'orchestra web' printed",
                {"WWW-Authenticate": "Bearer"},
            )
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if method == "POST" and content_type != "application/json":
            raise HTTPRefusal(415, "POST bodies must be JSON (Content-Type: application/json)")
        return True

    @staticmethod
    def single(headers, name):
        """A header that may appear once; None when absent."""
        values = headers.get_all(name) or []
        if len(values) > 1:
            raise HTTPRefusal(400, f"more than one {name} header")
        return values[0] if values else None

    @staticmethod
    def presented(path, headers):
        """The token bytes as the request carries them, None without one.

        Only a header counts, never a cookie: cookies are shared by every port of a host, so a
        page on another local port could read a script-set one (the page keeps the token in
        localStorage, which is per origin).
        """
        kind, _, value = (headers.get("Authorization") or "").partition(" ")
        if kind.lower() == "bearer":
            return value.strip().encode("utf-8", "surrogatepass")
        if path.startswith("/ws/"):
            for item in header_items(headers, "Sec-WebSocket-Protocol"):
                if item.startswith(WS_TOKEN_PREFIX):
                    return item[len(WS_TOKEN_PREFIX) :].encode("utf-8", "surrogatepass")
        return None


class MalformedRequest(ValueError):
    """The request is not framed as RFC 9112 says; answered 400 and the connection closed."""


class HeaderBudget:
    """The request stream as header parsing sees it: past WEB_MAX_HEADER_BYTES it is a 431, and a
    line that is not `name:value` ending in CRLF is a MalformedRequest."""

    def __init__(self, rfile, budget=WEB_MAX_HEADER_BYTES):
        self.rfile, self.budget = rfile, budget

    def readline(self, limit=-1):
        """One header line, counted against the budget and checked."""
        line = self.rfile.readline(self.budget + 1 if limit < 0 else min(limit, self.budget + 1))
        self.budget -= len(line)
        if self.budget < 0:
            import http.client  # loaded already by http.server, which the web server runs on

            raise http.client.LineTooLong("header block")  # parse_request answers 431
        if line and line != b"\r\n" and not WEB_HEADER_LINE.fullmatch(line):
            # bare LF, whitespace before the colon or a folded line: parsers disagree on these,
            # which is how requests are smuggled past a proxy (RFC 9112 sections 2.2 and 5.1)
            raise MalformedRequest(
                "a header line is malformed; send 'Name: value' lines ending in CRLF"
            )
        return line


def check_framing(headers):
    """Refuse a request whose body length two parsers could read differently (RFC 9112 6.3)."""
    lengths = headers.get_all("Content-Length") or []
    if len(lengths) > 1:
        raise HTTPRefusal(400, "more than one Content-Length header")
    if lengths and not WEB_DIGITS.fullmatch(lengths[0].strip()):
        raise HTTPRefusal(400, "Content-Length must be ASCII digits")
    if lengths and headers.get("Transfer-Encoding"):
        raise HTTPRefusal(400, "a request may not carry both Content-Length and Transfer-Encoding")


def json_depth_ok(data, limit=WEB_MAX_JSON_DEPTH):
    """False when JSON text opens more than `limit` arrays or objects at once (a scan before
    json.loads, whose recursion would otherwise fail deep inside). Linear: each byte is looked
    at a bounded number of times, whatever the quotes and backslashes."""
    depth, at, end = 0, 0, len(data)
    while at < end:
        found = JSON_MARKS.search(data, at)
        if not found:
            return True
        mark, at = found.group(), found.end()
        if mark == b'"':  # skip the string: to the next quote not escaped by a backslash
            while True:
                quote = data.find(b'"', at)
                if quote < 0:
                    return True  # unterminated: json.loads refuses it
                run = quote
                while run > at and data[run - 1] == 0x5C:
                    run -= 1
                at = quote + 1
                if (quote - run) % 2 == 0:
                    break
        else:
            depth += 1 if mark in (b"[", b"{") else -1
            if depth > limit:
                return False
    return True


class GuardedWriter:
    """A connection's output that, once a write fails or times out, writes nothing more: a
    partly sent answer must never be followed by another one on the same socket."""

    def __init__(self, raw):
        self.raw, self.failed = raw, False

    @property
    def closed(self):
        """Whether the underlying stream is closed."""
        return self.raw.closed

    def write(self, data):
        """Write all of data, or raise ConnectionResetError (now and ever after)."""
        if self.failed:
            raise ConnectionResetError("an earlier write on this connection failed")
        try:
            return self.raw.write(data)
        except OSError:
            self.failed = True
            raise

    def flush(self):
        """Flush unless a write failed."""
        if not self.failed:
            self.raw.flush()

    def close(self):
        """Close the stream."""
        self.raw.close()


# ======================================================================================
# HTTP server: API routes
# --------------------------------------------------------------------------------------
# The JSON API and the dashboard page. Routes are looked up in ROUTES and call the Operations
# section, returning (status, document); the StatusHub turns changes of state.json into the
# WebSocket's messages (a full snapshot on connect, then changes within a second).
# ======================================================================================

WEB_MAX_REQUEST_LINE = 8192  # bytes; longer is 414
WEB_MAX_BODY = 256 * 1024  # bytes of a POST body; more is 413
WEB_MAX_TASKS = 32  # tasks in one POST /api/spawn
WEB_READ_TIMEOUT = 30.0  # seconds one read may block
WEB_STATUS_POLL = 0.1  # seconds between looks at state.json for changes
WEB_REFRESH_INTERVAL = 1.0  # seconds between rebuilds even when state.json is unchanged (liveness)
WEB_REVIVE_INTERVAL = 10.0  # seconds between checks that a supervisor runs while agents need one
WEB_LOG_TAIL_DEFAULT, WEB_LOG_TAIL_MAX = 200, 5000  # lines of GET /api/agents/ID/log
WEB_TAIL_BLOCK = 64 * 1024  # bytes read at a time, backwards from the end of a log
WEB_TAIL_MAX_BYTES = 4 * 1024 * 1024  # log_tail: never read more than this to find the last lines
# GET .../log reads at most this far back, and says so if cut
WEB_TAIL_READ_LIMIT = 64 * 1024 * 1024
WEB_MAX_DIFF = 512 * 1024  # characters of a patch returned by GET /api/agents/ID/diff
WEB_SESSION_HOURS, WEB_SESSION_LIMIT, WEB_SESSION_LIMIT_MAX = 24, 50, 1000
WEB_HISTORY_PAGE, WEB_HISTORY_PAGE_MAX = 50, 500  # cleaned-up agents per GET /api/history
WEB_LAND_WAIT = 10.0  # seconds POST .../land waits for its first outcome before answering 202
# Where `pip install` puts the dashboard, under sys.prefix or the user base (pyproject's data-files).
WEB_INSTALLED_DASHBOARD = ("share", "claude-orchestra", "static", "dashboard.html")
WEB_INTERNAL_ERROR = "internal error; the web server's log has the details"


def status_changes(old, new):
    """The WebSocket update that turns status document `old` into `new`; None when nothing changed."""
    before = {a["id"]: a for a in old["agents"]}
    changed = [a for a in new["agents"] if before.get(a["id"]) != a]
    removed = sorted(set(before) - {a["id"] for a in new["agents"]})
    same_hosts = old.get("hosts") == new.get("hosts")
    if not changed and not removed and old["supervisor"] == new["supervisor"] and same_hosts:
        return None
    return {
        "type": "update",
        "agents": changed,
        "removed": removed,
        "supervisor": new["supervisor"],
        **({"hosts": new["hosts"]} if "hosts" in new else {}),
    }


def current_status(project):
    """(state, status document) as `status --json` would print them now."""
    state = project.store.load()
    live = [
        r for r in select_agents(state["agents"], []) if r["state"] != "removed"
    ]  # history is apart
    return state, status_document(project, state, live)


class StatusHub:
    """Follows state.json and tells every WebSocket client: a snapshot, then each change."""

    def __init__(self, project, log, revive=True):
        self.project, self.log, self.revive = project, log, revive
        # guards clients and document, so that no change falls between a snapshot and the updates
        self.lock = threading.Lock()
        self.clients = set()
        self.document = None
        self.seen = None  # state.json's (inode, size, mtime) and the approvals folder's stamp when last read
        self.approvals = None  # the pending approval requests as last sent
        self.state = None  # what it held then: liveness is re-checked without parsing it again
        self.next_refresh = self.next_revive = 0.0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="orchestra-web-status", daemon=True)

    def subscribe(self, ws):
        """Send a client the whole status, then every change after it."""
        with self.lock:
            if self.document is None:
                self.document = current_status(self.project)[1]
            if self.approvals is None:
                self.approvals = approvals_document(self.project)["approvals"]
            snapshot = {"type": "snapshot", "status": self.document, "approvals": self.approvals}
            ws.send(json.dumps(snapshot).encode("utf-8"))
            self.clients.add(ws)

    def unsubscribe(self, ws):
        """Forget a client that has gone."""
        with self.lock:
            self.clients.discard(ws)

    def run(self):
        """Poll state.json until stopped; a failure is logged and the next poll tries again."""
        while not self.stopping.wait(WEB_STATUS_POLL):
            try:
                self.poll()
            except Exception:
                self.log(f"status update failed:\n{traceback.format_exc()}")

    def poll(self):
        """Rebuild the status when state.json changed (or its supervisor died) and send the changes.

        An unchanged file (by stat) is not parsed again: idle costs one stat per poll at any history size.
        """
        try:
            info = os.stat(str(self.project.store.path))
            seen = (info.st_ino, info.st_size, info.st_mtime_ns)
        except FileNotFoundError:
            seen = None
        seen = (seen, ApprovalBox(self.project.repo).stamp())  # a new request shows at once
        now = time.monotonic()
        if seen == self.seen and (now < self.next_refresh or not self.liveness_changed()):
            if (
                now >= self.next_refresh
            ):  # unchanged file: only the supervisor's liveness was checked
                self.next_refresh = now + WEB_REFRESH_INTERVAL
            self.maybe_revive(now)
            return
        self.seen, self.next_refresh = seen, now + WEB_REFRESH_INTERVAL
        self.state, document = current_status(self.project)
        with self.lock:
            change = status_changes(self.document, document) if self.document else None
            self.document = document
            if change:
                message = json.dumps(change).encode("utf-8")
                for ws in self.clients:
                    ws.send(message)
            self.send_approvals()
        self.maybe_revive(now)

    def liveness_changed(self):
        """True when the supervisor named in the last state read has died (or come back) since."""
        if self.state is None or self.document is None:
            return True
        return supervisor_alive(self.state) != self.document["supervisor"]["alive"]

    def maybe_revive(self, now):
        """Every few seconds: start a supervisor if agents need one and none runs."""
        if self.revive and self.state is not None and now >= self.next_revive:
            self.next_revive = now + WEB_REVIVE_INTERVAL
            pid = ensure_supervisor(self.project, self.state)
            if pid:
                self.log(f"the supervisor was not running; restarted it (pid {pid})")

    def send_approvals(self):
        """Tell every client the pending approval requests when they changed (caller holds the lock)."""
        approvals = approvals_document(self.project)["approvals"]
        if approvals != self.approvals:
            self.approvals = approvals
            message = json.dumps({"type": "approvals", "approvals": approvals}).encode("utf-8")
            for ws in self.clients:
                ws.send(message)

    def stop(self):
        """End the polling thread and every client's connection."""
        self.stopping.set()
        with self.lock:
            clients = list(self.clients)
        for ws in clients:
            ws.abort()


def dashboard_candidates():
    """Where the dashboard may be: beside orchestra.py, then where pip installed it (or --user)."""
    installed = [
        Path(prefix).joinpath(*WEB_INSTALLED_DASHBOARD)
        for prefix in (sys.prefix, site.getuserbase())
    ]
    return [Path(__file__).resolve().parent / "static" / "dashboard.html", *installed]


def inline_hashes(html, tag):
    """CSP source expressions for the page's inline <script> or <style> blocks."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", re.sub(r"<!--.*?-->", "", html, flags=re.S), re.S)
    return " ".join(
        "'sha256-"
        + base64.b64encode(hashlib.sha256(b.encode("utf-8")).digest()).decode("ascii")
        + "'"
        for b in bodies
    )


def page_policy(html, host, scheme):
    """The dashboard's Content-Security-Policy: its own inline code by hash, nothing else."""
    ws, none = ("wss" if scheme == "https" else "ws"), "'none'"
    return (
        f"default-src 'none'; script-src {inline_hashes(html, 'script') or none}; "
        f"style-src {inline_hashes(html, 'style') or none}; "
        f"connect-src 'self' {ws}://{host}; img-src 'self' data:; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    )


def log_tail(path, count, block=WEB_TAIL_BLOCK, limit=WEB_TAIL_MAX_BYTES):
    """The last `count` complete lines of a file, read backwards from its end (at most `limit` bytes)."""
    chunks, newlines = [], 0
    with open(path, "rb") as f:
        end = pos = f.seek(0, os.SEEK_END)
        while pos > 0 and newlines <= count and end - pos < limit:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            chunks.insert(0, f.read(step))
            newlines += chunks[0].count(b"\n")
    data = b"".join(chunks)
    data = data[: data.rfind(b"\n") + 1]  # an unfinished last line is not shown yet
    if pos > 0:
        data = data[data.find(b"\n") + 1 :]  # the first line read is most likely cut
    return b"".join(data.splitlines(keepends=True)[-count:]) if count else b""


def readable_tail(path, count, limit=WEB_TAIL_READ_LIMIT):
    """(the last `count` readable lines of an agent's log, None or why there are fewer).

    Some log lines render as none, some as many: lines are rendered as they are read backwards.
    """
    try:
        lines, _, cut = tail_lines(path, count, log_renderer(False), limit)
    except FileNotFoundError:
        return [], "the agent has no log yet"
    lines = [strip_control(line) for line in lines]
    if len(lines) >= count:
        return lines, None
    if cut:
        return (
            lines,
            f"only {len(lines)} line(s) in the last {limit // (1024 * 1024)} MB of the log, the most read at once",
        )
    return lines, f"the log holds only {len(lines)} line(s)"


def agent_diff(project, record):
    """Diffstat and patch of an agent's work against its base commit; the patch is size-capped."""
    worktree, base = Path(record["worktree"] or ""), record["base_commit"]
    if base and record["worktree"] and worktree.is_dir():
        cwd, target = worktree, []  # the working tree: commits and uncommitted changes alike
    elif base and branch_exists(project.repo, record["branch"]):
        cwd, target = project.repo, [record["branch"]]
    else:
        raise OrchestraError(
            f"{record['id']} has no worktree or branch left to compare", EXIT_FAILURE
        )
    diff = ["diff", "--no-color", "--no-ext-diff", base, *target]
    stat = run_git([*diff[:3], "--stat", *diff[3:], "--"], cwd).stdout
    patch = run_git([*diff, "--"], cwd).stdout
    untracked = (
        run_git(["ls-files", "--others", "--exclude-standard"], cwd).stdout.splitlines()
        if not target
        else []
    )
    return {
        "id": record["id"],
        "base_commit": base,
        "stat": stat,
        "patch": patch[:WEB_MAX_DIFF],
        "truncated": len(patch) > WEB_MAX_DIFF,
        "untracked": untracked,
    }


def query_int(query, name, default, low, high):
    """An integer query parameter within [low, high]."""
    raw = query.get(name, [str(default)])[-1]
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise HTTPRefusal(400, f"'{name}' must be a whole number from {low} to {high}")
    return value


def body_fields(body, kinds):
    """The body's fields, checked against {name: (type, required)}; unknown fields are refused."""
    unknown = sorted(set(body) - set(kinds))
    if unknown:
        raise HTTPRefusal(400, f"unknown field '{unknown[0]}'; known: {', '.join(kinds)}")
    for name, (kind, required) in kinds.items():
        value = body.get(name)
        if (value is None and required) or (value is not None and (type(value) is not kind)):
            raise HTTPRefusal(
                400, f"'{name}' must be {kind.__name__} ({'required' if required else 'optional'})"
            )
    return [body.get(name) for name in kinds]


ROUTES = [
    (method, re.compile(pattern), name)
    for method, pattern, name in (
        ("GET", r"/", "route_page"),
        ("GET", r"/api/status", "route_status"),
        ("GET", r"/api/sessions", "route_sessions"),
        ("GET", r"/api/challenge", "route_challenge"),
        ("GET", r"/api/worktrees", "route_worktrees"),
        ("POST", r"/api/spawn", "route_spawn"),
        ("POST", r"/api/cleanup", "route_cleanup"),
        ("GET", r"/api/agents/(?P<id>[^/]+)", "route_agent"),
        ("GET", r"/api/agents/(?P<id>[^/]+)/log", "route_log"),
        ("GET", r"/api/agents/(?P<id>[^/]+)/diff", "route_diff"),
        ("POST", r"/api/agents/(?P<id>[^/]+)/(?P<action>pause|resume|stop)", "route_signal"),
        ("GET", r"/api/history", "route_history"),
        ("GET", r"/api/agents/(?P<id>[^/]+)/report", "route_report"),
        ("POST", r"/api/agents/(?P<id>[^/]+)/merge", "route_merge"),
        ("POST", r"/api/agents/(?P<id>[^/]+)/land", "route_land"),
        ("POST", r"/api/agents/(?P<id>[^/]+)/pr", "route_pull_request"),
        ("POST", r"/api/agents/(?P<id>[^/]+)/send", "route_send"),
        ("GET", r"/api/sessions/(?P<id>[^/]+)", "route_session"),
        ("GET", r"/ws/status", "route_websocket"),
        ("GET", r"/api/approvals", "route_approvals"),
        ("POST", r"/api/approvals/(?P<request>[^/]+)", "route_decide"),
    )
]
AGENT_ACTIONS = {"pause": pause_agents, "resume": resume_agents, "stop": stop_agents}


def find_route(method, path):
    """(route method name, path parameters); 404 for an unknown path, 405 for another method."""
    allowed = []
    for route_method, pattern, name in ROUTES:
        match = pattern.fullmatch(path)
        if match and route_method == method:
            return name, {k: unquote(v) for k, v in match.groupdict().items()}
        if match:
            allowed.append(route_method)
    if allowed:
        raise HTTPRefusal(
            405, f"{path} answers {', '.join(allowed)} only", {"Allow": ", ".join(allowed)}
        )
    raise HTTPRefusal(404, f"nothing at {path}")


class WebHandler:
    """One connection: read a request within limits, pass the Gate, then run one route.

    Joined with http.server's BaseHTTPRequestHandler by web_class() when the server starts:
    importing http.server (and http.client, email...) at the top would slow every command.
    """

    protocol_version = "HTTP/1.1"  # keep-alive, and the WebSocket's 101 needs it
    server_version = f"orchestra/{__version__}"
    sys_version = ""
    timeout = WEB_READ_TIMEOUT  # per read; the server's deadline bounds the whole request
    # headers and body go out as separate writes: no 40 ms delayed-ACK stall
    disable_nagle_algorithm = True

    def version_string(self):
        """The Server header: orchestra and its version, not Python's."""
        return self.server_version

    def setup(self):
        """The stdlib's streams, with output that stops for good at the first failed write."""
        super().setup()
        self.wfile = GuardedWriter(self.wfile)

    def handle_one_request(self):
        """Read one request line and its headers within the limits, then answer it."""
        self.server.track(self.connection, "reading")
        self.command, self.path, self.request_version = "", "", ""  # for the log if the line is bad
        self.raw_requestline = self.read_or_nothing(
            lambda: self.rfile.readline(WEB_MAX_REQUEST_LINE + 1)
        )
        if len(self.raw_requestline) > WEB_MAX_REQUEST_LINE:
            return self.send_error(414, f"the request line is over {WEB_MAX_REQUEST_LINE} bytes")
        if self.raw_requestline and not self.raw_requestline.endswith(b"\r\n"):
            return self.send_error(400, "the request line must end in CRLF")
        if not self.raw_requestline or not self.read_or_nothing(self.parse_request):
            self.close_connection = True
            return
        if self.request_version == "HTTP/0.9":
            return self.send_error(400, "HTTP/0.9 is not spoken here")
        handler = getattr(self, f"do_{self.command}", None)
        if handler is None:
            return self.send_error(405, f"{self.command} is not supported here; use GET or POST")
        handler()

    def read_or_nothing(self, read):
        """What `read` returns; b'' when the connection broke, timed out or passed its deadline."""
        try:
            return read()
        except OSError:
            return b""

    def parse_request(self):
        """The stdlib parser, with the header block limited to WEB_MAX_HEADER_BYTES and checked."""
        real, self.rfile = self.rfile, HeaderBudget(self.rfile)
        try:
            return super().parse_request()
        except MalformedRequest as e:
            self.send_error(400, str(e))
            return False
        finally:
            self.rfile = real

    def handle_expect_100(self):
        """Invite a request body (Expect: 100-continue) only when the Gate lets the request through."""
        try:
            self.server.gate.check(self.command, self.path.partition("?")[0], self.headers)
        except HTTPRefusal as e:
            self.answer(e.status, {"error": str(e)}, e.headers)
            return False
        return super().handle_expect_100()

    def do_GET(self):
        """GET: a route of the table."""
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0") != "0":
            # a body nobody reads must not be taken for the next request
            self.close_connection = True
        self.dispatch()

    def do_POST(self):
        """POST: a route of the table."""
        self.dispatch()

    def dispatch(self):
        """Gate, route, run; every failure becomes a JSON error answer, never a traceback."""
        path, _, query = self.path.partition("?")
        try:
            check_framing(self.headers)
            if self.server.gate.check(self.command, path, self.headers):
                self.server.track(self.connection, "trusted")
            name, params = find_route(self.command, path)
            body = self.read_json() if self.command == "POST" else None
            answer = getattr(self, name)(params, parse_qs(query), body)
        except ConnectionError:
            # the client is gone or stopped reading: write nothing more
            self.close_connection = True
            return
        except HTTPRefusal as e:
            answer = (e.status, {"error": str(e)}, e.headers)
        except OrchestraError as e:
            answer = (409 if e.status == EXIT_FAILURE else 400, {"error": str(e)})
        except Exception:
            self.server.log(f"{self.command} {path} failed:\n{traceback.format_exc()}")
            answer = (500, {"error": WEB_INTERNAL_ERROR})
        if answer:
            self.answer(*answer)

    def read_json(self):
        """The request body as a JSON object, within WEB_MAX_BODY."""
        if self.headers.get("Transfer-Encoding"):
            raise HTTPRefusal(411, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None:
            raise HTTPRefusal(411, "a POST needs a Content-Length")
        if int(length) > WEB_MAX_BODY:
            raise HTTPRefusal(413, f"the body is over {WEB_MAX_BODY} bytes")
        data = self.rfile.read(int(length)) or b"{}"  # no body at all means no fields
        if not json_depth_ok(data):
            raise HTTPRefusal(400, f"the body nests deeper than {WEB_MAX_JSON_DEPTH} levels")
        try:
            body = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):
            raise HTTPRefusal(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPRefusal(400, "the body must be a JSON object")
        return body

    def answer(self, status, document, headers=None):
        """Send a JSON document; errors also close the connection (their body may be unread)."""
        data = json.dumps(document).encode(
            "ascii"
        )  # \u escapes: any string encodes, even a lone surrogate
        self.send_response(status)
        self.send_common_headers(
            "application/json", len(data), {**(headers or {}), "Cache-Control": "no-store"}
        )
        if status >= 400:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_common_headers(self, content_type, length, extra):
        """Headers every answer but the 101 carries."""
        for name, value in {
            "Content-Type": content_type,
            "Content-Length": str(length),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
            **extra,
        }.items():
            self.send_header(name, value)

    def send_error(self, code, message=None, explain=None):
        """The stdlib's errors (bad request line, 431...) as JSON like every other answer."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = self.protocol_version  # never answer without a status line
        self.answer(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def log_request(self, code="-", size="-"):
        """One access-log line, without the query string: it is the user's business."""
        path = strip_control(self.path.partition("?")[0])
        self.log_message('"%s %s" %s', self.command or "-", path or "-", code)

    def log_message(self, fmt, *args):
        """Access and error lines go to the server's log, never an escape sequence with them."""
        line = strip_control(
            f"{self.address_string()} - [{self.log_date_time_string()}] {fmt % args}"
        )
        self.server.log(" ".join(line.split("\n")))

    def agent(self, params):
        """The record a path names (live or cleaned up), by id or unique prefix; 404 when none matches."""
        records = {**self.server.project.history(), **self.server.project.records()}
        if not any(i.startswith(params["id"]) for i in records):
            records = self.server.project.all_records()  # a cleaned-up agent, from history
        if not any(i.startswith(params["id"]) for i in records):
            raise HTTPRefusal(404, f"no agent '{params['id']}'")
        return select_agents(records, [params["id"]])[0]

    def route_page(self, params, query, body):
        """The dashboard, with a CSP allowing exactly its inline code; where to put it when missing."""
        page = self.server.dashboard(self.headers["Host"])
        if page:
            return self.send_page(200, *page)
        places = " or ".join(str(p) for p in dashboard_candidates())
        text = f"The dashboard file is missing. Put dashboard.html at {places}.\nThe API (/api/status) and /ws/status work without it.\n"
        return self.send_page(404, text, "default-src 'none'", "text/plain; charset=utf-8")

    def send_page(self, status, text, policy, content_type="text/html; charset=utf-8"):
        """Send a page with its Content-Security-Policy."""
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        self.send_response(status)
        self.send_common_headers(
            content_type,
            len(data),
            {"Content-Security-Policy": policy, "Cache-Control": "no-cache"},
        )
        self.end_headers()
        self.wfile.write(data)

    def route_status(self, params, query, body):
        """GET /api/status: what `status --json` prints."""
        return 200, current_status(self.server.project)[1]

    def route_sessions(self, params, query, body):
        """GET /api/sessions?hours=N&limit=N&all=1: the user's recent Claude Code sessions in this
        repository (all=1: in every project on the machine)."""
        hours = query_int(query, "hours", WEB_SESSION_HOURS, 1, 24 * 365)
        limit = query_int(query, "limit", WEB_SESSION_LIMIT, 1, WEB_SESSION_LIMIT_MAX)
        everything = query_int(query, "all", 0, 0, 1)
        repo = None if everything else self.server.project.repo
        return 200, sessions_document(self.server.env, hours=hours, limit=limit, repo=repo)

    def route_worktrees(self, params, query, body):
        """GET /api/worktrees: what `worktrees --json` prints."""
        return 200, {"worktrees": worktree_rows(self.server.project, self.server.project.records())}

    def route_spawn(self, params, query, body):
        """POST /api/spawn {"tasks": [...], "parallel"?, "model"?, "name"?, "base"?, "after"?: [ids]}:
        the CLI's spawn; `after` (spawn --after) holds every task until those agents landed."""
        tasks, parallel, model, name, base, after = body_fields(
            body,
            {
                "tasks": (list, True),
                "parallel": (int, False),
                "model": (str, False),
                "name": (str, False),
                "base": (str, False),
                "after": (list, False),
            },
        )
        if not tasks or len(tasks) > WEB_MAX_TASKS or not all(isinstance(t, str) for t in tasks):
            raise HTTPRefusal(400, f"'tasks' must be a list of 1 to {WEB_MAX_TASKS} strings")
        if after is not None and not all(isinstance(i, str) and i.strip() for i in after):
            raise HTTPRefusal(400, "'after' must be a list of agent ids")
        records = spawn_agents(
            self.server.project_for(model),
            tasks,
            parallel=parallel,
            name=name,
            base=base,
            after=[[i.strip() for i in after]] * len(tasks) if after else None,
        )
        return 201, {"agents": [public_record(r) for r in records]}

    def route_cleanup(self, params, query, body):
        """POST /api/cleanup {"ids"?: [...], "apply"?: true}: the plan, carried out only with apply."""
        ids, apply = body_fields(body, {"ids": (list, False), "apply": (bool, False)})
        if ids is not None and not all(isinstance(i, str) for i in ids):
            raise HTTPRefusal(400, "'ids' must be a list of agent ids")
        outcome = cleanup_agents(self.server.project, ids or None, apply=bool(apply))
        lines = [cleanup_line(step, not apply) for step in outcome["plan"]] or [
            "Nothing to clean up."
        ]
        return 200, {**outcome, "message": "\n".join(lines)}

    def route_agent(self, params, query, body):
        """GET /api/agents/ID: the agent's record."""
        return 200, public_record(with_approvals(self.server.project, [self.agent(params)])[0])

    def route_log(self, params, query, body):
        """GET /api/agents/ID/log?tail=N: the last N readable lines of its activity."""
        record = self.agent(params)
        count = query_int(query, "tail", WEB_LOG_TAIL_DEFAULT, 1, WEB_LOG_TAIL_MAX)
        lines, short = readable_tail(self.server.project.log_path(record["id"]), count)
        answer = {"id": record["id"], "state": record["state"], "lines": lines}
        return 200, {**answer, "short": short} if short else answer

    def route_diff(self, params, query, body):
        """GET /api/agents/ID/diff: diffstat and patch against the agent's base."""
        return 200, agent_diff(self.server.project, self.agent(params))

    def route_signal(self, params, query, body):
        """POST /api/agents/ID/pause|resume|stop: the same operation as the CLI's."""
        body_fields(body, {})
        outcomes = AGENT_ACTIONS[params["action"]](self.server.project, [self.agent(params)["id"]])
        return 200, {
            "outcomes": [{"id": agent_id, "result": what} for agent_id, what in outcomes],
            "message": "\n".join(f"{agent_id}: {what}" for agent_id, what in outcomes),
        }

    def route_history(self, params, query, body):
        """GET /api/history?offset=N&limit=N: cleaned-up agents, newest first, a page at a time."""
        offset = query_int(query, "offset", 0, 0, 10**9)
        limit = query_int(query, "limit", WEB_HISTORY_PAGE, 1, WEB_HISTORY_PAGE_MAX)
        removed = sorted(self.server.project.history().values(), key=spawn_order, reverse=True)
        page = [
            public_record(r) | {"archive": r.get("archive")}
            for r in removed[offset : offset + limit]
        ]
        return 200, {"agents": page, "total": len(removed), "offset": offset, "limit": limit}

    def route_report(self, params, query, body):
        """GET /api/agents/ID/report: what `collect` says of one agent (result, commits, diffstat)."""
        record = self.agent(params)
        return 200, agent_report(self.server.project, record) | {
            "checks": record.get("checks"),
            "permission_denials": split_denials(record)[0],
        }

    def route_merge(self, params, query, body):
        """POST /api/agents/ID/merge: `collect ID --merge`, with its refusals and its report."""
        body_fields(body, {})
        document = collect_agents(self.server.project, [self.agent(params)["id"]], merge=True)
        message = collect_text(document)
        if document["conflict"]:
            return 409, {"error": message, **document}
        return 200, {"message": message, **document}

    def route_land(self, params, query, body):
        """POST /api/agents/ID/land {"force"?: true}: `orchestra land ID` in a thread of its own;
        answers with its first outcome, or 202 while the checks still run. Without force, an
        agent whose checks failed or that has no commits is refused (409, "guard": true)."""
        (force,) = body_fields(body, {"force": (bool, False)})
        record = self.agent(params)
        guard = land_guard(record)
        if guard and not force:
            return 409, {"error": guard, "guard": True}
        outcomes = queue.Queue()

        def run():
            try:
                land_agents(self.server.project, [record["id"]], progress=outcomes.put)
            except Exception as e:  # an OrchestraError is the answer; anything else a bug
                outcomes.put(e)

        threading.Thread(target=run, name=f"land-{record['id']}", daemon=True).start()
        try:
            first = outcomes.get(timeout=WEB_LAND_WAIT)
        except queue.Empty:
            return 202, {"message": f"{record['id']}: landing; its checks run on the merged result"}
        if isinstance(first, Exception):
            raise first
        return 200, {"message": land_line(first, first.get("into")), **first}

    def route_pull_request(self, params, query, body):
        """POST /api/agents/ID/pr: `collect ID --pr`: push and open a pull request, or say how."""
        body_fields(body, {})
        document = collect_agents(self.server.project, [self.agent(params)["id"]], pr=True)
        return 200, {
            "message": "\n".join(document["pull_requests"])
            or "no commits to open a pull request for",
            **document,
        }

    def route_send(self, params, query, body):
        """POST /api/agents/ID/send {"message": "..."}: `orchestra send ID MESSAGE`."""
        (message,) = body_fields(body, {"message": (str, True)})
        agent_id, waits = send_message(self.server.project, self.agent(params)["id"], message)
        return 200, {"id": agent_id, "waits": waits, "message": sent_text(agent_id, waits)}

    def route_session(self, params, query, body):
        """GET /api/sessions/ID: a session's prompts and the commands that resume it."""
        return 200, session_detail(self.server.env, params["id"])

    def route_challenge(self, params, query, body):
        """GET /api/challenge?nonce=HEX (no token needed): {"proof": HMAC-SHA256(token, nonce)}."""
        nonce = (query.get("nonce") or [""])[-1]
        if not WEB_NONCE.fullmatch(nonce):
            raise HTTPRefusal(400, "'nonce' must be 32 to 128 lowercase hex digits")
        proof = hmac.new(self.server.gate.token, nonce.encode("ascii"), "sha256").hexdigest()
        return 200, {"proof": proof}

    def route_approvals(self, params, query, body):
        """GET /api/approvals: the tool calls agents wait to have approved, oldest first."""
        return 200, approvals_document(self.server.project)

    def route_decide(self, params, query, body):
        """POST /api/approvals/REQ {"decision": "allow"|"deny", "message"?, "always"?, "prefix"?,
        "whole_tool"?}: the CLI's approve/deny. always is a boolean or "project"."""
        always = body.pop("always", None)
        whole = body.pop("whole_tool", False)
        decision, message, prefix = body_fields(
            body, {"decision": (str, True), "message": (str, False), "prefix": (str, False)}
        )
        if decision not in ("allow", "deny"):
            raise HTTPRefusal(400, '\'decision\' must be "allow" or "deny"')
        if not (always is None or isinstance(always, bool) or always == "project") or (
            always and decision == "deny"
        ):
            raise HTTPRefusal(
                400, '\'always\' must be true, false or "project", and only with "allow"'
            )
        if not isinstance(whole, bool) or (prefix is not None and not always):
            raise HTTPRefusal(400, "'whole_tool' must be a boolean; 'prefix' needs 'always'")
        project = self.server.project
        request, where = ApprovalBox(project.repo).request(params["request"])
        if where is None:
            raise HTTPRefusal(
                404, f"no request '{params['request']}'; GET /api/approvals lists them"
            )
        if where == "answered":
            raise OrchestraError(late_message(request["id"], request["decision"]), EXIT_FAILURE)
        always = "agent" if always is True else always or None
        answered = answer_request(
            project,
            request,
            decision == "allow",
            "web",
            message=message,
            always=always,
            prefix=prefix,
            whole=whole,
        )
        return 200, {"request": request["id"], "agent": request["agent"], **answered}

    def route_websocket(self, params, query, body):
        """GET /ws/status: upgrade, then a status snapshot and every change until the client goes."""
        response = websocket_accept(self.headers)
        if not self.server.admit_websocket():
            raise HTTPRefusal(
                503,
                f"{WEB_MAX_WEBSOCKETS} live updates are open already; close a tab",
                {"Retry-After": "5"},
            )
        try:
            self.upgrade(response)
        finally:
            self.server.release_websocket()

    def upgrade(self, response):
        """Send the 101 and serve the WebSocket until it ends."""
        self.server.track(self.connection, "websocket")
        self.send_response(101)
        for name, value in response.items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        ws = WebSocket(self.connection, self.rfile, self.wfile, **self.server.ws_options)
        try:
            self.server.hub.subscribe(ws)
            ws.serve()
        except Exception:
            self.server.log(f"WebSocket failed:\n{traceback.format_exc()}")
        finally:
            self.server.hub.unsubscribe(ws)
            ws.abort()


# ======================================================================================
# HTTP server: serving
# --------------------------------------------------------------------------------------
# The threading server: a connection cap, TLS when asked, and start_web_server(), which
# writes web.json and prints the URL with the token in its fragment (never logged).
# ======================================================================================

# open at once; at the cap the oldest one still sending a request is dropped
WEB_MAX_CONNECTIONS = 128
WEB_LISTEN_BACKLOG = 128
WEB_HEADER_DEADLINE = 10.0  # seconds a connection has to send a whole request (slowloris)
# Seconds a request that showed the token has for its route and its whole answer. A connection
# without the token has WEB_HEADER_DEADLINE from accept for everything, answers included.
WEB_ANSWER_DEADLINE = 120.0
# bytes of SO_SNDBUF (Linux doubles it) before the token is shown
WEB_UNTRUSTED_SEND_BUFFER = 16 * 1024
WEB_TRUSTED_SEND_BUFFER = 1024 * 1024  # after it (the kernel caps it at net.core.wmem_max)
WEB_PAGE_CACHE = 16  # dashboard renderings kept (one per file version and Host name)
WEB_SERVE_POLL = 0.1  # seconds between the accept loop's checks of request deadlines


class Link:
    """What the server knows of one open connection, to decide whom to drop."""

    __slots__ = ("deadline", "since", "trusted")

    def __init__(self, since, deadline):
        self.since, self.deadline, self.trusted = since, deadline, False


class WebServer:
    """`orchestra web`: one thread per connection, a connection cap and deadlines.

    Without the token a connection gets WEB_HEADER_DEADLINE from accept for everything it does:
    pipelined requests and answers it never reads do not extend it, and at the cap it is the
    first dropped. A request that shows the token gets WEB_ANSWER_DEADLINE for its answer, and
    the next request on that connection starts a new header deadline. WebSockets (token only)
    have no deadline (pings find dead ones) but their own, lower cap.

    Joined with http.server's ThreadingHTTPServer by web_class(), as WebHandler is.
    """

    daemon_threads = True
    request_queue_size = WEB_LISTEN_BACKLOG

    def __init__(
        self,
        project,
        host,
        port,
        token,
        hosts,
        tls=None,
        log=None,
        env=None,
        flags=None,
        revive=True,
        header_deadline=WEB_HEADER_DEADLINE,
        max_connections=WEB_MAX_CONNECTIONS,
        ws_options=None,
    ):
        self.project, self.env, self.flags = (
            project,
            env if env is not None else os.environ,
            flags or {},
        )
        self.log_stream = log
        self.header_deadline, self.max_connections = header_deadline, max_connections
        self.ws_options = ws_options or {}
        self.connections = {}  # socket -> Link
        self.next_sweep = 0.0  # when service_actions next looks at the deadlines
        # (file, mtime, size, Host) -> (bytes, policy); replacing a dict entry is atomic
        self.pages = {}
        self.websockets = 0
        self.connections_lock = threading.Lock()  # guards connections and websockets
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        context = (
            tls_context(*tls) if tls else None
        )  # a bad certificate is refused before listening
        try:
            super().__init__((host, port), web_class(WebHandler))
        except OSError as e:
            raise OrchestraError(
                f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port "
                "(0 picks a free one) or --host",
                EXIT_FAILURE,
            ) from None
        self.scheme = "https" if tls else "http"
        if context:  # the handshake happens on the connection's own thread, within its deadline
            self.socket = context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )
        self.gate = Gate(token, hosts, self.scheme)
        self.hub = StatusHub(project, self.log, revive)
        self.thread = threading.Thread(
            target=self.serve_forever, args=(WEB_SERVE_POLL,), name="orchestra-web", daemon=True
        )

    def server_bind(self):
        """Bind without HTTPServer's reverse DNS lookup of the address, which can hang offline."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def log(self, line):
        """One line (or a traceback) to the server's log, when it has one; requests and agents
        choose some of its text, so escape sequences and controls are dropped (newlines stay)."""
        if self.log_stream is not None:
            self.log_stream.write(strip_control(line).rstrip("\n") + "\n")
            self.log_stream.flush()

    def verify_request(self, request, client_address):
        """Admit a connection; at the cap, drop the oldest one that has not shown the token."""
        now = time.monotonic()
        with self.connections_lock:
            if len(self.connections) >= self.max_connections:
                untrusted = [s for s, link in self.connections.items() if not link.trusted]
                if not untrusted:
                    return False
                oldest = min(untrusted, key=lambda s: self.connections[s].since)
                del self.connections[oldest]
                drop_socket(oldest)
            self.connections[request] = Link(now, now + self.header_deadline)
        # Until it shows the token, a connection gets a small send buffer: a client that asks and
        # never reads blocks its thread (which then waits without work) after an answer or two.
        with contextlib.suppress(OSError):
            request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WEB_UNTRUSTED_SEND_BUFFER)
        return True

    def track(self, sock, phase):
        """Move a connection's deadline: 'reading' a request, 'trusted' (it showed the token),
        'websocket' (upgraded); a connection without the token keeps the deadline it got at accept.
        """
        now = time.monotonic()
        with self.connections_lock:
            link = self.connections.get(sock)
            if link is None:
                return
            if phase == "reading" and link.trusted:
                link.deadline, link.trusted = now + self.header_deadline, False
            elif phase == "trusted":
                if not link.trusted:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_SNDBUF, WEB_TRUSTED_SEND_BUFFER
                        )
                link.deadline, link.trusted = now + WEB_ANSWER_DEADLINE, True
            elif phase == "websocket":
                link.deadline, link.trusted = None, True

    def admit_websocket(self):
        """Count one more WebSocket; False at WEB_MAX_WEBSOCKETS."""
        with self.connections_lock:
            if self.websockets >= WEB_MAX_WEBSOCKETS:
                return False
            self.websockets += 1
            return True

    def release_websocket(self):
        """Count a WebSocket that ended."""
        with self.connections_lock:
            self.websockets -= 1

    def service_actions(self):
        """Between accepts, at most every WEB_SERVE_POLL: drop connections past their deadline."""
        now = time.monotonic()
        if now < self.next_sweep:
            return  # a flood of connections must not turn this sweep into the accept loop's main work
        self.next_sweep = now + WEB_SERVE_POLL
        with self.connections_lock:
            late = [
                s
                for s, link in self.connections.items()
                if link.deadline is not None and link.deadline < now
            ]
            for sock in late:
                del self.connections[sock]
        for sock in late:
            drop_socket(sock)

    def process_request(self, request, client_address):
        """Answer each connection on its own named daemon thread."""
        threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="orchestra-web-connection",
            daemon=True,
        ).start()

    def shutdown_request(self, request):
        """Forget a finished connection, then close it."""
        with self.connections_lock:
            self.connections.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        """A client that vanished is not news; anything else is logged with its traceback."""
        if not isinstance(sys.exc_info()[1], OSError):
            self.log(f"error while serving {client_address[0]}:\n{traceback.format_exc()}")

    def dashboard(self, host):
        """(page bytes, its Content-Security-Policy) for a Host, read and hashed once per version of
        the file; None when there is no dashboard file."""
        for path in dashboard_candidates():
            try:
                info = path.stat()
            except OSError:
                continue
            key = (str(path), info.st_mtime_ns, info.st_size, host)
            if key not in self.pages:
                if len(self.pages) >= WEB_PAGE_CACHE:
                    self.pages.clear()
                html = path.read_text(encoding="utf-8")
                self.pages[key] = (html.encode("utf-8"), page_policy(html, host, self.scheme))
            return self.pages[key]
        return None

    def project_for(self, model):
        """The project, opened again with a model flag when a spawn asks for one."""
        if model is None:
            return self.project
        return Project.open(self.project.repo, self.env, {**self.flags, "model": model})

    @property
    def url(self):
        """The dashboard's address with the token in the fragment, which browsers never send."""
        host, port = self.server_address[:2]
        shown = socket.gethostname() if host in WEB_WILDCARD_HOSTS else host
        shown = f"[{shown}]" if ":" in shown else shown
        return f"{self.scheme}://{shown}:{port}/#token={self.gate.token.decode('ascii')}"

    def start(self):
        """Serve and follow state.json on background threads."""
        self.hub.thread.start()
        self.thread.start()
        return self

    def stop(self):
        """Stop accepting, end every connection and thread, and close the socket."""
        self.shutdown()
        self.hub.stop()
        with self.connections_lock:
            remaining, self.connections = list(self.connections), {}
        for sock in remaining:
            drop_socket(sock)
        self.server_close()
        self.thread.join()
        self.hub.thread.join()


def tls_context(cert, key):
    """A server TLS context from --tls-cert and --tls-key."""
    import ssl  # here, not at the top: only --tls-cert needs it, and it costs every command 6 ms

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise OrchestraError(f"cannot load --tls-cert {cert} / --tls-key {key}: {e}") from None
    return context


WEB_CLASSES = {}  # WebHandler and WebServer joined with their http.server bases, made on first use


def web_class(mixin):
    """`mixin` (WebHandler or WebServer) joined with its http.server base class, made once."""
    if mixin not in WEB_CLASSES:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        base = {WebHandler: BaseHTTPRequestHandler, WebServer: ThreadingHTTPServer}[mixin]
        WEB_CLASSES[mixin] = type(mixin.__name__, (mixin, base), {"__doc__": mixin.__doc__})
    return WEB_CLASSES[mixin]


def start_web_server(
    project,
    host=WEB_DEFAULT_HOST,
    port=WEB_DEFAULT_PORT,
    allow_hosts=(),
    new_token=False,
    tls=None,
    log=None,
    env=None,
    flags=None,
    revive=True,
    **limits,
):
    """Listen and serve on background threads; the running WebServer (stop() ends it).

    `limits` tunes header_deadline, max_connections and ws_options (ping_interval,
    pong_timeout, queue_limit) for tests.
    """
    token = web_token(project.dir, rotate=True)  # new_token: kept for callers; every start rotates
    server = web_class(WebServer)(
        project,
        host,
        port,
        token,
        allowed_hosts(host, allow_hosts),
        tls=tls,
        log=log,
        env=env,
        flags=flags,
        revive=revive,
        **limits,
    )
    return server.start()


def beyond_loopback_warning(host, hosts):
    """The warning printed when the server is reachable from other machines; None on loopback."""
    if host_name(host if ":" not in host else f"[{host}]") in WEB_LOOPBACK_HOSTS:
        return None
    return (
        f"listening on {host or 'every address'}, reachable from other machines; anyone with the token can run "
        f"agents here. Requests must name one of: {', '.join(sorted(hosts))} (add more with --allow-host NAME)"
    )


# ======================================================================================
# QR code
# --------------------------------------------------------------------------------------
# `orchestra web --qr` draws the dashboard's address as a QR code (ISO/IEC 18004) in the
# terminal, so a phone can scan it. Byte mode, error correction level M, the smallest
# version that holds the text; Reed-Solomon codewords over GF(256) (polynomial 0x11D),
# blocks interleaved, the mask with the lowest penalty. Two module rows per text line, drawn
# with half blocks, inside a quiet zone of four modules.
# ======================================================================================

# QR codes (ISO/IEC 18004) at error correction level M: per version, the error correction
# codewords of each block and the number of blocks (index 0 unused).
QR_ECC_PER_BLOCK = (0, 10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28, 26, 26, 26, 26,
                    28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28)  # fmt: skip
QR_BLOCKS = (0, 1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16, 17, 17, 18, 20, 21, 23,
             25, 26, 28, 29, 31, 33, 35, 37, 38, 40, 43, 45, 47, 49)  # fmt: skip
QR_MAX_VERSION = 40
QR_FORMAT_LEVEL_M = 0  # the two level bits in the format information
QR_GF_POLY = 0x11D  # x^8 + x^4 + x^3 + x^2 + 1
QR_PAD_BYTES = (0xEC, 0x11)
QR_QUIET_ZONE = 4  # light modules around the symbol
QR_PENALTY_RUN, QR_PENALTY_BLOCK, QR_PENALTY_FINDER, QR_PENALTY_BALANCE = 3, 3, 40, 10
QR_MASKS = (
    lambda x, y: (x + y) % 2 == 0,
    lambda x, y: y % 2 == 0,
    lambda x, y: x % 3 == 0,
    lambda x, y: (x + y) % 3 == 0,
    lambda x, y: (x // 3 + y // 2) % 2 == 0,
    lambda x, y: x * y % 2 + x * y % 3 == 0,
    lambda x, y: (x * y % 2 + x * y % 3) % 2 == 0,
    lambda x, y: ((x + y) % 2 + x * y % 3) % 2 == 0,
)
QR_HALF_BLOCKS = {
    (False, False): " ",
    (True, False): "\u2580",
    (False, True): "\u2584",
    (True, True): "\u2588",
}


def gf_multiply(x, y):
    """The product of two elements of GF(256) modulo x^8 + x^4 + x^3 + x^2 + 1."""
    product = 0
    for bit in range(7, -1, -1):
        product = (product << 1) ^ ((product >> 7) * QR_GF_POLY)
        product ^= ((y >> bit) & 1) * x
    return product


def rs_divisor(degree):
    """The Reed-Solomon generator polynomial (x - a^0)...(x - a^(degree-1)), leading 1 dropped."""
    result, root = [0] * (degree - 1) + [1], 1
    for _ in range(degree):
        for j in range(degree):
            result[j] = gf_multiply(result[j], root) ^ (result[j + 1] if j + 1 < degree else 0)
        root = gf_multiply(root, 0x02)
    return result


def rs_remainder(data, divisor):
    """The error correction codewords of `data` for a generator from rs_divisor."""
    result = [0] * len(divisor)
    for byte in data:
        factor = byte ^ result.pop(0)
        result.append(0)
        for i, coefficient in enumerate(divisor):
            result[i] ^= gf_multiply(coefficient, factor)
    return result


def qr_raw_modules(version):
    """Modules of a version that carry data and error correction (not function patterns)."""
    result = (16 * version + 128) * version + 64
    if version >= 2:
        aligns = version // 7 + 2
        result -= (25 * aligns - 10) * aligns - 55
        if version >= 7:
            result -= 36
    return result


def qr_data_capacity(version):
    """Data codewords of a version at level M."""
    return qr_raw_modules(version) // 8 - QR_ECC_PER_BLOCK[version] * QR_BLOCKS[version]


def qr_bits(data, version):
    """Byte-mode segment, terminator and padding: the data codewords of `version`."""
    count_bits = 8 if version < 10 else 16
    bits = [
        int(b) for b in f"0100{len(data):0{count_bits}b}" + "".join(f"{byte:08b}" for byte in data)
    ]
    capacity = qr_data_capacity(version) * 8
    bits += [0] * min(4, capacity - len(bits))
    bits += [0] * (-len(bits) % 8)
    codewords = [int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8)]
    return codewords + [QR_PAD_BYTES[i % 2] for i in range(capacity // 8 - len(codewords))]


def qr_codewords(data, version):
    """Data and error correction codewords, split into blocks and interleaved."""
    blocks, ecc = QR_BLOCKS[version], QR_ECC_PER_BLOCK[version]
    raw = qr_raw_modules(version) // 8
    short, short_length = blocks - raw % blocks, raw // blocks
    divisor, codewords, parts = rs_divisor(ecc), qr_bits(data, version), []
    start = 0
    for i in range(blocks):
        size = short_length - ecc + (0 if i < short else 1)
        chunk = codewords[start : start + size]
        start += size
        parts.append((chunk, rs_remainder(chunk, divisor)))
    longest = short_length - ecc + 1
    result = [d[i] for i in range(longest) for d, _ in parts if i < len(d)]
    return result + [e[i] for i in range(ecc) for _, e in parts]


def qr_alignment_positions(version):
    """Centre coordinates of the alignment patterns along each axis."""
    if version == 1:
        return []
    count = version // 7 + 2
    step = (version * 8 + count * 3 + 5) // (count * 4 - 4) * 2
    return [6, *reversed([version * 4 + 10 - i * step for i in range(count - 1)])]


class QRCode:
    """A QR code of a text: `modules[y][x]` is True for a dark module."""

    def __init__(self, text):
        data = text.encode("utf-8")
        fits = (
            v
            for v in range(1, QR_MAX_VERSION + 1)
            if qr_segment_bits(data, v) <= qr_data_capacity(v) * 8
        )
        self.version = next(fits, None)
        if self.version is None:
            raise OrchestraError(f"the address is too long for a QR code ({len(data)} bytes)")
        self.size = self.version * 4 + 17
        self.modules = [[False] * self.size for _ in range(self.size)]
        self.function = [[False] * self.size for _ in range(self.size)]
        self.draw_function_patterns()
        self.draw_codewords(qr_codewords(data, self.version))
        self.mask = min(range(8), key=self.penalty_with)
        self.apply_mask(self.mask)
        self.draw_format(self.mask)

    def set(self, x, y, dark):
        """Set a function module."""
        self.modules[y][x], self.function[y][x] = dark, True

    def draw_function_patterns(self):
        """Timing, finder, alignment and version patterns, and room for the format bits."""
        for i in range(self.size):
            self.set(6, i, i % 2 == 0)
            self.set(i, 6, i % 2 == 0)
        for cx, cy in ((3, 3), (self.size - 4, 3), (3, self.size - 4)):
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    x, y = cx + dx, cy + dy
                    if 0 <= x < self.size and 0 <= y < self.size:
                        self.set(x, y, max(abs(dx), abs(dy)) not in (2, 4))
        positions = qr_alignment_positions(self.version)
        last = len(positions) - 1
        for i, cx in enumerate(positions):
            for j, cy in enumerate(positions):
                if (i, j) not in ((0, 0), (0, last), (last, 0)):
                    for dy in range(-2, 3):
                        for dx in range(-2, 3):
                            self.set(cx + dx, cy + dy, max(abs(dx), abs(dy)) != 1)
        self.draw_format(0)  # reserves the format areas; drawn again once the mask is chosen
        self.draw_version()

    def draw_format(self, mask):
        """The 15 format bits (level M and the mask), twice, and the dark module."""
        data = QR_FORMAT_LEVEL_M << 3 | mask
        rem = data
        for _ in range(10):
            rem = (rem << 1) ^ ((rem >> 9) * 0x537)
        bits = (data << 10 | rem) ^ 0x5412
        bit = [(bits >> i) & 1 == 1 for i in range(15)]
        for i in range(6):
            self.set(8, i, bit[i])
        self.set(8, 7, bit[6])
        self.set(8, 8, bit[7])
        self.set(7, 8, bit[8])
        for i in range(9, 15):
            self.set(14 - i, 8, bit[i])
        for i in range(8):
            self.set(self.size - 1 - i, 8, bit[i])
        for i in range(8, 15):
            self.set(8, self.size - 15 + i, bit[i])
        self.set(8, self.size - 8, True)

    def draw_version(self):
        """The 18 version bits of versions 7 and up, in two corners."""
        if self.version < 7:
            return
        rem = self.version
        for _ in range(12):
            rem = (rem << 1) ^ ((rem >> 11) * 0x1F25)
        bits = self.version << 12 | rem
        for i in range(18):
            dark, a, b = (bits >> i) & 1 == 1, self.size - 11 + i % 3, i // 3
            self.set(a, b, dark)
            self.set(b, a, dark)

    def draw_codewords(self, codewords):
        """Place the bits in the zigzag of two-module columns, right to left, skipping the timing column."""
        bits = [(byte >> (7 - i)) & 1 == 1 for byte in codewords for i in range(8)]
        index, right = 0, self.size - 1
        while right >= 1:
            if right == 6:
                right = 5
            for vert in range(self.size):
                for j in range(2):
                    x = right - j
                    upward = (right + 1) & 2 == 0
                    y = self.size - 1 - vert if upward else vert
                    if not self.function[y][x] and index < len(bits):
                        self.modules[y][x] = bits[index]
                        index += 1
            right -= 2

    def apply_mask(self, mask):
        """XOR the data modules with mask pattern `mask` (applying it twice undoes it)."""
        rule = QR_MASKS[mask]
        for y in range(self.size):
            for x in range(self.size):
                if not self.function[y][x] and rule(x, y):
                    self.modules[y][x] = not self.modules[y][x]

    def penalty_with(self, mask):
        """The penalty score of the symbol under `mask` (ISO/IEC 18004 section 7.8.3)."""
        self.apply_mask(mask)
        self.draw_format(mask)
        score = qr_penalty(self.modules)
        self.apply_mask(mask)
        return score

    def terminal_lines(self, quiet=QR_QUIET_ZONE):
        """The code as text: each character two modules high, ink for dark modules."""
        light = [False] * (self.size + 2 * quiet)
        rows = [light] * quiet + [[False] * quiet + row + [False] * quiet for row in self.modules]
        rows += [light] * (quiet + (len(rows) + quiet) % 2)
        return [
            "".join(QR_HALF_BLOCKS[top, bottom] for top, bottom in zip(rows[i], rows[i + 1]))
            for i in range(0, len(rows), 2)
        ]


def qr_segment_bits(data, version):
    """Bits of a byte-mode segment of `data` before padding: mode, count and the bytes."""
    return 4 + (8 if version < 10 else 16) + 8 * len(data)


def qr_penalty(modules):
    """Runs of five or more, 2x2 blocks, finder-like patterns and the dark/light balance."""
    size, score = len(modules), 0
    lines = ["".join("1" if m else "0" for m in row) for row in modules]
    lines += ["".join(lines[y][x] for y in range(size)) for x in range(size)]
    for line in lines:
        for run in re.finditer(r"0{5,}|1{5,}", line):
            score += QR_PENALTY_RUN + len(run.group()) - 5
        padded = "0000" + line + "0000"
        score += QR_PENALTY_FINDER * sum(
            padded.startswith(p, i)
            for p in ("00001011101", "10111010000")
            for i in range(len(padded))
        )
    for y in range(size - 1):
        for x in range(size - 1):
            if modules[y][x] == modules[y][x + 1] == modules[y + 1][x] == modules[y + 1][x + 1]:
                score += QR_PENALTY_BLOCK
    dark = sum(map(sum, modules))
    return score + QR_PENALTY_BALANCE * (abs(dark * 20 - size * size * 10) // (size * size))


def qr_text(text, colour=False):
    """The QR code of `text` for a terminal; with colour, dark on light whatever the theme."""
    lines = QRCode(text).terminal_lines()
    return "\n".join(f"\x1b[30;107m{line}\x1b[0m" for line in lines) if colour else "\n".join(lines)


# ======================================================================================
# Command line: shared parts
# --------------------------------------------------------------------------------------
# One cmd_<name> per subcommand and one small add_<name>_parser each, grouped by what the
# commands are for. Only the command line sections know every layer; main() is the only
# place errors become exit statuses.
# ======================================================================================

STATES = (
    "queued",
    "running",
    "paused",
    "waiting",
    "done",
    "failed",
    "stopped",
    "interrupted",
    "removed",
)
TABLE_DEFAULT_WIDTH = 120  # columns when stdout is not a terminal and $COLUMNS is unset
TABLE_MIN_LAST_COLUMN = 6  # a table's last column narrower than this is left out rather than cut


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one-line errors with exit status 2."""

    def error(self, message):
        raise OrchestraError(f"{message}; see '{self.prog} --help'")


def config_flags(args, **extra):
    """Config values set on the command line: -c KEY=VALUE pairs, then command flags."""
    flags = {}
    for item in args.config_overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or key not in CONFIG_TYPES:
            raise OrchestraError(
                f"-c expects KEY=VALUE with a known key, not '{item}'; {known_keys_hint(key)}"
            )
        value = config_value_from_text(key, raw)
        check_config_value(key, value, "-c")
        flags[key] = value
    flags.update({k: v for k, v in extra.items() if v is not None})
    return flags


def known_keys_hint(key):
    """'did you mean ...?' for a mistyped setting, then every known key."""
    import difflib  # here, not at the top: only a mistyped key needs it

    near = difflib.get_close_matches(key, list(CONFIG_TYPES), n=1, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
    return f"{hint}known keys: {', '.join(CONFIG_TYPES)}"


def config_value_from_text(key, text):
    """A value typed for `key`: JSON (numbers, lists, null), else the word itself; a single
    string for a list setting is a list of one."""
    try:
        value = json.loads(text)
    except ValueError:
        value = text  # a bare word is a string
    return [value] if CONFIG_TYPES.get(key) == "list" and isinstance(value, str) else value


def open_project(args, **flags):
    """The project of the current directory, with the command line's config overrides."""
    return Project.open(Path.cwd(), os.environ, config_flags(args, **flags))


def paint(text, colour, stream):
    """Wrap text in an ANSI colour when the stream is a terminal that wants colour."""
    codes = {"green": "32", "red": "31", "yellow": "33", "blue": "34", "dim": "2"}
    return f"\x1b[{codes[colour]}m{text}\x1b[0m" if colour and use_colour(stream) else text


STATE_COLOURS = {
    "running": "blue",
    "done": "green",
    "done ✗": "red",  # finished, but its checks failed
    "failed": "red",
    "interrupted": "red",
    "paused": "yellow",
    "stopped": "dim",
    "queued": None,
    "waiting": "yellow",
}


def terminal_width(width=None):
    """Columns to fit: the width asked for, else $COLUMNS or the terminal's, else 120."""
    return width or shutil.get_terminal_size((TABLE_DEFAULT_WIDTH, 24)).columns


def record_cost(record):
    """An agent's cost for display: '~$0.0123' while it is estimated from token usage."""
    return ("~" if record.get("cost_estimated") else "") + format_cost(record.get("cost_usd"))


def render_table(headers, rows, out, colour_column=None, width=None):
    """Aligned columns within the terminal width: only the last column is cut (or left out).

    The other columns (ids, states, numbers) are never cut; anything a user must copy, such as a
    command, belongs on a line of its own rather than in a table.
    """
    width = terminal_width(width)
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)][:-1]
    room = width - sum(w + 2 for w in widths)
    keep_last = room >= TABLE_MIN_LAST_COLUMN
    lines = []
    for index, row in enumerate([headers, *rows]):
        cells = [str(c).ljust(w) for c, w in zip(row, widths)]
        if index and colour_column is not None:
            words = row[colour_column].split()
            colour = STATE_COLOURS.get(" ".join(words[:2]), STATE_COLOURS.get(words[0]))
            cells[colour_column] = paint(cells[colour_column], colour, out)
        last = str(row[-1])
        if len(last) > room:
            last = last[: room - 1] + "…"
        lines.append("  ".join([*cells, last] if keep_last else cells).rstrip())
    return "\n".join(lines)


def table_with_lines(headers, rows, lines, out, width=None):
    """A table fitted to the terminal with one more line under each row, kept whole (paths, commands)."""
    header, *body = render_table(headers, rows, out, width=width).split("\n")
    return "\n".join([header, *(part for pair in zip(body, lines) for part in pair)])


def host_view(record):
    """A record as the status table shows it: a host out of reach says so, and since when."""
    lost = record.get("host_unreachable")
    if not lost:
        return record
    return {**record, "error": None, "activity": f"host unreachable since {lost['since']}"}


def status_rows(records, now):
    """The status table's cells for each record."""
    rows, by_id = [], {r["id"]: r for r in records}
    for r in records:
        state = (
            state_label(r)
            + (" stale" if r.get("stale") else "")
            + (" approval" if r.get("approval") else "")
        )
        state += (" sandboxed" if r.get("sandboxed") else "") + (
            " landed" if r.get("landed") else " merged" if r.get("merged") else ""
        )
        state += " blocked" if r.get("blocked") else ""
        state += " TAMPERED" if r.get("tampered") else (" contained" if r.get("contained") else "")
        activity = r.get("error") or r.get("activity") or ""
        if r.get("waits_for") and r["state"] == "queued":
            activity = waits_line(r, by_id)
        if r.get("tampered"):
            activity = f"tampered: {r['tampered'][-1]}"
        if r.get("approval"):
            size = (r["approval"].get("shown") or [""])[0].partition(": ")[2]
            activity = (f"waiting for approval {r['approval']['id']} ({size}, shown whole below): "
                        f"{r['approval']['summary']}")  # fmt: skip
        rows.append(
            [
                r["id"],
                state,
                format_duration(elapsed_seconds(r, now)),
                record_cost(r),
                "-" if r.get("commits") is None else str(r["commits"]),
                "-" if r.get("files_changed") is None else str(r["files_changed"]),
                one_line(activity),
            ]
        )
    return rows


def status_text(project, records, out):
    """The human status view: a table and a one-line summary."""
    if not records:
        return 'No agents yet. Start some with: orchestra spawn "first task" "second task"'
    headers = ["ID", "STATE", "ELAPSED", "COST", "COMMITS", "FILES", "ACTIVITY"]
    records = with_approvals(project, records)
    rows = status_rows([host_view(r) for r in records], time.time())
    if any(is_remote(r) for r in records):  # Hosts: which machine each agent runs on
        headers.insert(2, "HOST")
        for row, r in zip(rows, records):
            row.insert(2, public_record(r)["host"] or "-")
    table = render_table(headers, rows, out, colour_column=1)
    notes = [
        f"{r['id']}: {line}"
        for r in records
        for line in denial_lines(
            user_denials(r), (r.get("launch") or {}).get("bypass_permissions", ())
        )
    ]
    for r in records:
        if r.get("approval"):
            notes += [f"{r['id']} waits for approval {r['approval']['id']}:",
                      *(f"  {line}" for line in r["approval"].get("shown") or [])]  # fmt: skip
    return "\n".join(
        [
            table,
            "",
            *notes,
            *([""] if notes else []),
            summary_line(records),
            *resilience_notes(project.store.load(), records, time.time()),
        ]
    )


def summary_line(records):
    """How many agents are in each state, and what they cost: '2 done, 1 failed; total cost $0.31'."""
    counts = [(sum(r["state"] == state for r in records), state) for state in STATES]
    total = sum(r.get("cost_usd") or 0 for r in records)
    estimated = any(r.get("cost_estimated") for r in records)
    return ", ".join(f"{n} {state}" for n, state in counts if n) + (
        f"; total cost {'~' if estimated else ''}{format_cost(total)}"
        + (" (~: estimated from token usage until agents finish)" if estimated else "")
    )


def progress_line(record):
    """'id: state - activity', as spawn --wait prints each change."""
    detail = one_line(record.get("error") or record.get("activity") or "", 100)
    return f"{record['id']}: {record['state']}" + (f" - {detail}" if detail else "")


def revive_supervisor(project, state):
    """Restart a dead supervisor that left agents to watch, and say so on stderr."""
    pid = ensure_supervisor(project, state)
    if pid:
        print(
            f"orchestra: the supervisor was not running; restarted it (pid {pid})", file=sys.stderr
        )


def report_outcomes(outcomes):
    """Print what happened to each agent, one line each."""
    for agent_id, what in outcomes:
        print(f"{agent_id}: {what}")
    return EXIT_OK


def whole_number_at_least(low):
    """An argparse type: an integer of at least `low`."""

    def convert(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value

    return convert


positive_int, non_negative_int = whole_number_at_least(1), whole_number_at_least(0)


def number_above_zero(what):
    """An argparse type: a finite number above 0, of `what` ("US dollars", "hours")."""

    def convert(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number of {what}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
        return value

    return convert


budget_usd, positive_hours = number_above_zero("US dollars"), number_above_zero("hours")


def port_number(text):
    """argparse type: a TCP port, 0 for any free one."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number (0 to 65535)")
    return int(text)


# ======================================================================================
# Command line: setting up
# --------------------------------------------------------------------------------------
# init, config (show, set, unset) and doctor: what a newcomer runs first.
# ======================================================================================


def cmd_init(args):
    """Create .orchestra/ and print the effective configuration."""
    project = open_project(args)
    problem = claude_version_problem(project.config["agent_command"], os.environ)
    if problem:
        raise OrchestraError(problem)
    print(f"orchestra is set up in {project.dir} (worktrees go to {project.worktree_root})\n")
    print(config_text(project.config))
    print(
        f"\nSettings live in {project.dir / 'config.json'} (this project) and {user_config_path(os.environ)} (you);\n"
        "change one with: orchestra config set KEY VALUE [--user]\n"
        "Agents ask before tools outside bypass_permissions; answer with 'orchestra approvals' / 'approve' / 'deny'\n"
        "or the dashboard. Allow a tool up front: orchestra config set bypass_permissions "
        "'[..., \"Bash(pytest:*)\"]'\n"
        "Containment here (docs/containment.md):"
    )
    print("\n".join(containment_lines(project.config, os.environ)))
    return EXIT_OK


def add_init_parser(commands):
    """orchestra init"""
    p = commands.add_parser(
        "init",
        help="create .orchestra/ and show the configuration",
        description=cmd_init.__doc__,
        epilog="example: cd my-project && orchestra init",
    )
    p.set_defaults(func=cmd_init)


def config_text(config):
    """The effective settings as a table of key, value and source."""
    files = list(dict.fromkeys(v for v in config.sources.values() if v not in ("default", "flag")))
    labels = {path: f"file {n}" for n, path in enumerate(files, 1)}
    rows = [
        [key, labels.get(config.sources[key], config.sources[key]), json.dumps(config[key])]
        for key in CONFIG_DEFAULTS
    ]
    notes = [
        f"{label}: {path}" for path, label in labels.items()
    ]  # paths on their own lines, whole
    return "\n".join([render_table(["KEY", "SOURCE", "VALUE"], rows, sys.stdout), *notes])


def cmd_config(args):
    """Show every setting, its value and where that value came from; 'set' and 'unset' change one."""
    try:
        repo = find_repo(Path.cwd())
    except OrchestraError:
        repo = None  # outside a repository the user file and defaults still apply
    config = Config.load(repo, os.environ, config_flags(args))
    if args.json:
        print_json(
            {key: {"value": config[key], "source": config.sources[key]} for key in CONFIG_DEFAULTS}
        )
    else:
        print(config_text(config))
    return EXIT_OK


def config_target(args):
    """The config file `config set/unset` writes: the project's, or the user's with --user."""
    if args.user:
        return user_config_path(os.environ)
    return find_repo(Path.cwd()) / ORCHESTRA_DIR / "config.json"


def known_key(key):
    """Refuse an unknown setting, with the nearest known ones."""
    if key not in CONFIG_TYPES:
        raise OrchestraError(f"unknown key '{key}'; {known_keys_hint(key)}")
    return key


def cmd_config_set(args):
    """Write one setting to the project (or --user) config file, checked as loading checks it."""
    value = config_value_from_text(known_key(args.key), args.value)
    path = write_config_value(config_target(args), args.key, value)
    print(f"{args.key} = {json.dumps(value)} in {path}")
    return EXIT_OK


def cmd_config_unset(args):
    """Remove one setting from the project (or --user) config file."""
    target = config_target(args)
    if known_key(args.key) not in read_config_file(target):
        print(f"{args.key} was not set in {target}; nothing changed")
        return EXIT_OK
    path = write_config_value(target, args.key, None, unset=True)
    print(f"{args.key} removed from {path}")
    return EXIT_OK


def add_config_actions(p):
    """orchestra config set | unset"""
    actions = p.add_subparsers(
        dest="action", metavar="[set KEY VALUE | unset KEY]", parser_class=ArgumentParser
    )
    s = actions.add_parser(
        "set",
        help="write a setting",
        description=cmd_config_set.__doc__,
        epilog="example: orchestra config set sandbox_network '[\"pypi.org\"]'",
    )
    s.add_argument("key", metavar="KEY", help="a known setting")
    s.add_argument("value", metavar="VALUE", help="JSON (numbers, lists, null) or a plain word")
    s.add_argument(
        "--user", action="store_true", help="write the user config file instead of the project's"
    )
    s.set_defaults(func=cmd_config_set)
    u = actions.add_parser(
        "unset",
        help="remove a setting",
        description=cmd_config_unset.__doc__,
        epilog="example: orchestra config unset approval_timeout",
    )
    u.add_argument("key", metavar="KEY", help="a known setting")
    u.add_argument(
        "--user", action="store_true", help="edit the user config file instead of the project's"
    )
    u.set_defaults(func=cmd_config_unset)


def add_config_parser(commands):
    """orchestra config"""
    p = commands.add_parser(
        "config",
        help="show settings and where they came from",
        description=cmd_config.__doc__,
        epilog="example: orchestra config --json; one run with another value: orchestra -c default_parallel=5 config",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_config)
    add_config_actions(p)


def doctor_checks(env):
    """(name, ok, what was found or what to install) for each thing orchestra uses."""
    checks = []
    git_found = probe_version(["git", "--version"], env)
    checks.append(("git", bool(git_found), git_found or "not found; install git 2.25 or newer"))
    claude = probe_version([CLAUDE_EXECUTABLE, "--version"], env)
    too_old = claude and claude_version_problem([CLAUDE_EXECUTABLE], env)
    checks.append(
        (
            "claude",
            bool(claude) and not too_old,
            too_old or claude or f"not found; {CLAUDE_INSTALL_HINT}",
        )
    )
    if claude:
        checks.append(("claude login", *claude_login(env)))
    problem = sandbox_problem(env)
    checks.append(
        (
            "sandbox",
            problem is None,
            "Claude Code's sandbox can run here" if problem is None else problem,
        )
    )
    checks.append(
        (
            "containment",
            problem is None,
            (
                "guard, sandbox and integrity check"
                if problem is None
                else "guard and integrity check only: without the sandbox, Bash is checked by the guard alone"
            ),
        )
    )
    gh = probe_version(["gh", "--version"], env)
    checks.append(
        (
            "gh",
            bool(gh),
            gh or "not found (only collect --pr needs it); install from https://cli.github.com",
        )
    )
    return checks


def probe_version(argv, env):
    """The first line a program prints for its version, or None when it is missing or fails."""
    if shutil.which(argv[0], path=env.get("PATH", os.defpath)) is None:
        return None
    try:
        done = subprocess.run(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=SANDBOX_PROBE_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else None


def claude_login(env):
    """(ok, how claude is logged in, or how to log in)."""
    try:
        done = subprocess.run(
            [CLAUDE_EXECUTABLE, "auth", "status"],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=SANDBOX_PROBE_TIMEOUT,
        )
        status = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return False, "could not ask 'claude auth status'; run 'claude' once to log in"
    if status.get("loggedIn"):
        return (
            True,
            f"logged in ({status.get('authMethod')}{', ' + status['apiKeySource'] if status.get('apiKeySource') else ''})",
        )
    return False, "not logged in; run 'claude' and log in, or set ANTHROPIC_API_KEY"


def cmd_doctor(args):
    """Check what orchestra needs on this machine (or --host NAME): git, claude and its login, the sandbox, gh."""
    if args.host and args.host != "local":  # Hosts: ssh, Python, disk, then the same checks there
        checks = host_doctor(open_project(args).config, args.host)
        essential = ("ssh", "python", "disk", "orchestra", "git", "claude", "claude login")
        if args.json:
            print_json(
                {
                    "host": args.host,
                    "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks],
                }
            )
        else:
            for name, ok, detail in checks:
                print(f"{'ok' if ok else 'MISSING':8} {name:13} {detail}")
        return EXIT_OK if all(ok for name, ok, _ in checks if name in essential) else EXIT_FAILURE
    checks = doctor_checks(os.environ)
    if args.json:
        print_json({"checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks]})
    else:
        for name, ok, detail in checks:
            print(f"{'ok' if ok else 'MISSING':8} {name:13} {detail}")
    essential = [ok for name, ok, _ in checks if name in ("git", "claude")]
    return EXIT_OK if all(essential) else EXIT_FAILURE


def add_doctor_parser(commands):
    """orchestra doctor"""
    p = commands.add_parser(
        "doctor",
        help="check git, claude, its login, the sandbox and gh",
        description=cmd_doctor.__doc__,
        epilog="example: orchestra doctor",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--host", metavar="NAME", help="check a host of the config over ssh instead")
    p.set_defaults(func=cmd_doctor)


# ======================================================================================
# Command line: agents
# --------------------------------------------------------------------------------------
# spawn, status, pause/resume/stop, logs, worktrees, retry, send, diff and the approvals
# commands: one cmd_<name> and one add_<name>_parser each.
# ======================================================================================

SPAWN_WAIT_POLL = 0.5
STATUS_WATCH_INTERVAL = 1.0
LOGS_FOLLOW_POLL = 0.25
LOGS_FOLLOW_TAIL = 50  # lines `logs -f` shows before following, unless --tail says otherwise


def cmd_spawn(args):
    """Queue one agent per task, each on its own branch and worktree."""
    project = open_project(args, model=args.model, sandbox=args.sandbox)
    uncommitted = uncommitted_note(args.base)
    tasks, names, after, checks, host = args.tasks, args.name, None, None, args.host
    if args.file:
        if tasks or names:
            raise OrchestraError(
                "--file holds the tasks and their ids; give no TASK or --name with it"
            )
        tasks, names, after, checks, hosts = read_task_file(args.file)
        host = [h or args.host for h in hosts]  # a task's own host, else --host
    elif not tasks:
        raise OrchestraError(
            "the following arguments are required: TASK (or a tasks file with --file)"
        )
    elif args.after:
        after = [args.after] * len(tasks)
    records = spawn_agents(
        project,
        tasks,
        parallel=args.parallel,
        name=names,
        base=args.base,
        budget=args.budget,
        host=host,
        after=after,
        checks=checks,
    )
    if not args.json:
        for r in records:
            print(f"{r['id']}  {r['state']}  {os.path.relpath(r['worktree'])}")
            if r["error"]:
                print(f"  {r['error']}")
        print(f"Each agent works on branch {project.branch_name('<id>')} in its worktree.")
    if uncommitted:
        print(uncommitted, file=sys.stderr if args.json else sys.stdout)
    if args.wait:
        return wait_for_agents(project, [r["id"] for r in records], args.json)
    if args.json:
        print_json({"agents": [public_record(r) for r in records]})
    else:
        print("\nWatch them with: orchestra status --watch")
    return EXIT_FAILURE if any(r["state"] == "failed" for r in records) else EXIT_OK


def uncommitted_note(base):
    """One line when the checkout spawn runs in has changes its agents will not see, else None."""
    if base is not None:
        return None
    done = run_git(["status", "--porcelain", "--untracked-files=normal"], Path.cwd(), check=False)
    changed = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode or not changed:
        return None
    return (
        f"note: your checkout has {len(changed)} uncommitted change{'s' if len(changed) != 1 else ''}; "
        "they are not in the agents' worktrees, which start from the last commit (commit them first "
        "if the agents need them)"
    )


def read_task_file(path):
    """(tasks, ids, after, checks, hosts) from a tasks file: a JSON list (or {"tasks": [...]}) of
    objects with "task" and optional "id", "after" (ids), "host" and "checks" (commands)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise OrchestraError(f"cannot read the tasks file {path}: {e.strerror}") from None
    except ValueError as e:
        raise OrchestraError(f"{path} is not valid JSON ({e}); fix it and spawn again") from None
    items = document.get("tasks") if isinstance(document, dict) else document
    if not isinstance(items, list) or not items:
        raise OrchestraError(f"{path}: expected a list of tasks, each an object with a 'task'")
    tasks, ids, after, checks, hosts = [], [], [], [], []
    for number, item in enumerate(items, 1):
        where = f"{path}: task {number}"
        if not isinstance(item, dict) or not isinstance(item.get("task"), str):
            raise OrchestraError(f"{where} needs a 'task' string")
        unknown = set(item) - {"task", "id", "after", "host", "checks"}
        if unknown:
            raise OrchestraError(
                f"{where} has unknown keys {', '.join(sorted(unknown))}; use task, id, after, host, checks"
            )
        deps = item.get("after", [])
        deps = [deps] if isinstance(deps, str) else deps
        own = item.get("checks")
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            raise OrchestraError(f"{where}: 'after' must be a list of task ids")
        if own is not None and (
            not isinstance(own, list) or not all(isinstance(c, str) for c in own)
        ):
            raise OrchestraError(f"{where}: 'checks' must be a list of shell commands")
        if item.get("host") is not None and not isinstance(item["host"], str):
            raise OrchestraError(f"{where}: 'host' must be the name of a host ('orchestra hosts')")
        tasks.append(item["task"])
        hosts.append(item.get("host"))
        ids.append(item.get("id"))
        after.append(deps)
        checks.append(own)
    if any(ids) and not all(ids):
        raise OrchestraError(f"{path}: give every task an 'id', or none")
    return tasks, [i for i in ids if i], after, checks, hosts


def wait_for_agents(project, ids, as_json):
    """Print each agent's progress until all have finished; 1 if any failed.

    Ctrl-C stops the watching, never the agents: it says which keep running and how to stop them.
    """
    try:
        return watch_agents(project, ids, as_json)
    except KeyboardInterrupt:
        live = [i for i, r in project.records().items() if i in ids and r["state"] in ACTIVE_STATES]
        if live:
            print(
                f"\nstopped watching; {plural(len(live), 'agent')} keep{'s' if len(live) == 1 else ''} running "
                f"(orchestra stop {' '.join(live)})",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED


def watch_agents(project, ids, as_json):
    """wait_for_agents' loop: one line per change of each agent, then the summary."""
    shown = {}
    while True:
        state = project.store.load()
        ensure_supervisor(project, state)
        records = [state["agents"][i] for i in ids]
        for record in records:
            line = progress_line(record)
            if shown.get(record["id"]) != line and not as_json:
                print(line, flush=True)
            shown[record["id"]] = line
        if not any(r["state"] in ACTIVE_STATES for r in records):
            break
        time.sleep(SPAWN_WAIT_POLL)
    if as_json:
        print_json({"agents": [public_record(r) for r in records]})
    else:
        print(summary_line(records))
    return (
        EXIT_FAILURE if any(r["state"] in ("failed", "interrupted") for r in records) else EXIT_OK
    )


def add_spawn_parser(commands):
    """orchestra spawn"""
    p = commands.add_parser(
        "spawn",
        help="start agents, one worktree and branch per task",
        description=cmd_spawn.__doc__,
        epilog='example: orchestra spawn "add input validation" "write API docs" --parallel 2; '
        'a task that starts with "-" goes after "--": orchestra spawn -- "-v flag: document it"',
    )
    add_spawn_task_options(p)
    add_spawn_run_options(p)
    p.set_defaults(func=cmd_spawn, more_tasks=True)


def add_spawn_task_options(p):
    """spawn's options that say what to do: the tasks, their ids and what they wait for."""
    p.add_argument("tasks", nargs="*", metavar="TASK", help="what one agent should do (quote it)")
    p.add_argument(
        "--after",
        metavar="ID",
        action="append",
        help="start only once agent ID has landed, from the target with its work (repeatable)",
    )
    p.add_argument(
        "--file",
        metavar="TASKS.json",
        help="queue a plan: a JSON list of {task, id, after, host, checks}",
    )
    p.add_argument(
        "--base",
        metavar="REF",
        help="branch, tag or commit to start from (default: the current branch)",
    )
    p.add_argument(
        "--name",
        metavar="ID",
        action="append",
        help="an agent's id instead of one made from its task; once per task, the Nth names the Nth task",
    )


def add_spawn_run_options(p):
    """spawn's options that say how and where the agents run, and how the command waits."""
    p.add_argument(
        "--parallel", type=positive_int, metavar="N", help="run at most N agents at once"
    )
    p.add_argument("--model", help="the model the agents use")
    p.add_argument(
        "--host", metavar="NAME", help="run on this host ('local' or one of 'hosts' in the config)"
    )
    sandbox = p.add_mutually_exclusive_group()
    sandbox.add_argument(
        "--sandbox",
        dest="sandbox",
        action="store_const",
        const="on",
        help="run in Claude Code's sandbox (Bash without asking, writes only in the worktree); refuse where it cannot",
    )
    sandbox.add_argument(
        "--no-sandbox",
        dest="sandbox",
        action="store_const",
        const="off",
        help="run without the sandbox",
    )
    p.add_argument(
        "--budget",
        type=budget_usd,
        metavar="USD",
        help="stop this batch's agents once together they have spent USD",
    )
    p.add_argument(
        "--wait", action="store_true", help="show progress until all finish; exit 1 if any failed"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")


def cmd_status(args):
    """Show agents: state, elapsed time, cost, commits, files and activity."""
    if args.until_done and not args.watch:
        raise OrchestraError("--until-done goes with --watch; see 'orchestra status --help'")
    project = open_project(args)
    while True:
        state = project.store.load()
        revive_supervisor(project, state)
        agents = state["agents"]
        if args.ids or args.all:  # cleaned-up agents are history: read only when asked for
            agents = {**project.history(), **agents}
        records = select_agents(agents, args.ids)
        if args.json:
            print_json(status_document(project, state, records))
            return EXIT_OK
        text = status_text(project, with_merged_flags(project, records), sys.stdout)
        if not records and not args.all:
            text = cleaned_up_note(project) or text
        if not args.watch:
            print(text)
            return EXIT_OK
        clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
        if args.until_done and not any(r["state"] in ("queued", "running") for r in records):
            print(f"{clear}{text}", flush=True)
            return EXIT_OK
        print(f"{clear}{text}\n\n{utc_iso()}  (Ctrl-C to leave)", flush=True)
        time.sleep(STATUS_WATCH_INTERVAL)


def cleaned_up_note(project):
    """What `status` says when every agent was cleaned up: how many, and how to see them."""
    gone = len(project.history())
    if not gone:
        return None
    return (
        f"No live agents; {gone} cleaned up (status --all). "
        'Start more with: orchestra spawn "first task" "second task"'
    )


def add_status_parser(commands):
    """orchestra status"""
    p = commands.add_parser(
        "status",
        help="show what every agent is doing",
        description=cmd_status.__doc__,
        epilog="example: orchestra status --watch",
    )
    p.add_argument(
        "ids", nargs="*", metavar="ID", help="agents to show (default: all but cleaned-up ones)"
    )
    p.add_argument("--all", action="store_true", help="include cleaned-up (removed) agents")
    p.add_argument("--watch", action="store_true", help="redraw every second until Ctrl-C")
    p.add_argument(
        "--until-done",
        action="store_true",
        help="with --watch: stop when no agent is queued or running",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_status)


def cmd_pause(args):
    """SIGSTOP running agents."""
    project = open_project(args)
    check_not_removed(project, args.ids)
    return report_outcomes(pause_agents(project, args.ids))


def cmd_resume(args):
    """SIGCONT paused agents; relaunch with --resume those whose process is gone."""
    project = open_project(args)
    check_not_removed(project, args.ids)
    return report_outcomes(resume_agents(project, args.ids))


def cmd_stop(args):
    """End agents: SIGTERM their process group, SIGKILL after a grace period; work stays."""
    project = open_project(args)
    check_not_removed(project, args.ids)
    return report_outcomes(stop_agents(project, args.ids))


SIGNAL_COMMANDS = (
    ("pause", "suspend running agents (SIGSTOP)", cmd_pause),
    ("resume", "continue paused agents, or relaunch their sessions", cmd_resume),
    ("stop", "end agents; their worktrees and branches stay", cmd_stop),
)


def add_signal_parsers(commands):
    """orchestra pause | resume | stop"""
    for name, summary, handler in SIGNAL_COMMANDS:
        p = commands.add_parser(
            name,
            help=summary,
            description=handler.__doc__,
            epilog=f"example: orchestra {name} implement-auth",
        )
        p.add_argument("ids", nargs="+", metavar="ID", help="agent ids or unique prefixes")
        p.set_defaults(func=handler)


def cmd_logs(args):
    """Print an agent's activity; -f keeps following until it finishes."""
    project = open_project(args)
    record = select_agents(project.all_records(), [args.id])[0]
    path, clean, render = Path(record["log"]), sys.stdout.isatty(), log_renderer(args.raw)
    inside = f"{record['worktree']}/" if record.get("worktree") and not args.raw else None

    def show(lines):
        if inside:  # paths in the agent's worktree, relative to it: "Write: CHANGELOG.md"
            lines = [line.replace(inside, "") for line in lines]
        if lines:
            sys.stdout.write(
                "".join(
                    (strip_control(line) if clean else encodable(line)) + "\n" for line in lines
                )
            )
            sys.stdout.flush()

    count = LOGS_FOLLOW_TAIL if args.tail is None and args.follow else args.tail
    if count is None:
        offset = stream_log(path, 0, render, show)
    else:
        try:
            lines, offset, _ = tail_lines(path, count, render)
        except FileNotFoundError:
            lines, offset = [], 0
        show(lines)
    while args.follow:
        time.sleep(LOGS_FOLLOW_POLL)
        start, offset = offset, stream_log(path, offset, render, show)
        if (
            offset == start
            and project.records().get(record["id"], {}).get("state") not in ACTIVE_STATES
        ):
            break
    if not args.follow and record["state"] in ("failed", "interrupted"):
        stderr = read_tail(project.stderr_path(record["id"])).strip()
        if stderr:
            print("-- stderr --\n" + (strip_control(stderr) if clean else encodable(stderr)))
    return EXIT_OK


def add_logs_parser(commands):
    """orchestra logs"""
    p = commands.add_parser(
        "logs",
        help="show an agent's activity",
        description=cmd_logs.__doc__,
        epilog="example: orchestra logs implement-auth -f",
    )
    p.add_argument("id", metavar="ID", help="agent id or unique prefix")
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new activity until the agent finishes",
    )
    p.add_argument("--raw", action="store_true", help="print the stream-json lines as they are")
    p.add_argument(
        "--tail",
        type=non_negative_int,
        metavar="N",
        help=f"only the last N lines (read from the end; -f alone starts with {LOGS_FOLLOW_TAIL})",
    )
    p.set_defaults(func=cmd_logs)


def cmd_worktrees(args):
    """List git's worktrees with the agent each belongs to."""
    project = open_project(args)
    rows = worktree_rows(project, project.records())
    if args.json:
        print_json({"worktrees": rows})
        return EXIT_OK
    table = [
        [
            r["id"] or "-",
            r["state"] or "-",
            ",".join(r["notes"]) or "-",
            one_line(r["task"] or "", 60),
        ]
        for r in rows
    ]
    places = [f"    {os.path.relpath(r['path'])}  ({r['branch'] or 'detached'})" for r in rows]
    print(table_with_lines(["ID", "STATE", "NOTES", "TASK"], table, places, sys.stdout))
    return EXIT_OK


def add_worktrees_parser(commands):
    """orchestra worktrees"""
    p = commands.add_parser(
        "worktrees",
        help="list worktrees and their agents",
        description=cmd_worktrees.__doc__,
        epilog="example: orchestra worktrees --json",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_worktrees)


def cmd_retry(args):
    """Run a failed, interrupted or stopped agent's task again: fresh worktree and branch, or its session."""
    project = open_project(args)
    check_not_removed(project, [args.id])
    record = select_agents(project.records(), [args.id])[0]
    print(retry_agent(project, record, args.resume_session))
    return EXIT_OK


def add_retry_parser(commands):
    """orchestra retry"""
    p = commands.add_parser(
        "retry",
        help="run a failed or stopped agent's task again",
        description=cmd_retry.__doc__,
        epilog="example: orchestra retry implement-auth  (starts implement-auth-2 from the same base)",
    )
    p.add_argument("id", metavar="ID", help="agent id or unique prefix")
    p.add_argument(
        "--resume-session",
        action="store_true",
        help="continue the agent's own session in its worktree instead of starting afresh",
    )
    p.set_defaults(func=cmd_retry)


def cmd_send(args):
    """Send a follow-up message to an agent: its session continues in its worktree.

    A finished agent continues at once; a running one gets the message when its current turn ends.
    """
    project = open_project(args)
    check_not_removed(project, [args.id])
    print(sent_text(*send_message(project, args.id, args.message)))
    return EXIT_OK


def add_send_parser(commands):
    """orchestra send"""
    p = commands.add_parser(
        "send",
        help="send a follow-up message to an agent (a running one gets it when its turn ends)",
        description=cmd_send.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='example: orchestra send implement-auth "also add a test for expired tokens"',
    )
    p.add_argument("id", metavar="ID", help="agent id or unique prefix")
    p.add_argument("message", metavar="MESSAGE", help="what the agent should do next")
    p.set_defaults(func=cmd_send)


def diff_source(project, record):
    """(cwd, revisions) to diff an agent's work against its base: its worktree (commits and
    uncommitted changes), else its branch when the worktree is gone."""
    base = record.get("base_commit")
    if base and record.get("worktree") and Path(record["worktree"]).is_dir():
        return Path(record["worktree"]), [base]
    if base and branch_exists(project.repo, record["branch"]):
        return project.repo, [base, record["branch"]]
    raise OrchestraError(f"{record['id']} has no worktree or branch left to compare", EXIT_FAILURE)


def archived_work(project, record):
    """(base, the archived commit holding all its work, the archive) of a cleaned-up agent,
    else None: its worktree snapshot when one was saved (uncommitted files too), else its tip."""
    with contextlib.suppress(OrchestraError):
        archive = find_archive(project.repo, record["id"])
        if archive["id"] == record["id"] and record.get("base_commit"):
            refs = archive["refs"]
            work = refs.get("worktree") or refs.get("tip") or refs.get("head")
            return (record["base_commit"], work, archive) if work else None
    return None


def archive_note(record, archive):
    """Where a cleaned-up agent's work was read from, and how to bring it back."""
    return (
        f"({record['id']} was cleaned up: this is its archive {archive['ref']}; "
        f"'orchestra restore {record['id']}' brings it back)"
    )


def cmd_diff(args):
    """Show an agent's changes against its base: its commits plus uncommitted work, paged like git.

    A cleaned-up agent's changes are read from its archive."""
    project = open_project(args)
    record = select_agents(project.all_records(), [args.id])[0]
    archived = archived_work(project, record) if record["state"] == "removed" else None
    if record["state"] == "removed" and not archived:
        check_not_removed(project, [record["id"]])  # points at its archive and `orchestra restore`
    for problem in fetch_remote_branches(project, [record]):  # Hosts: its latest commits first
        print(f"orchestra: note: {problem}", file=sys.stderr)
    if archived:
        base, work, archive = archived
        status = page_git(
            ["diff", *(["--stat"] if args.stat else []), base, work, "--"], project.repo
        )
        print(archive_note(record, archive))
        return EXIT_OK if status == 0 else EXIT_FAILURE
    cwd, revisions = diff_source(project, record)
    status = page_git(["diff", *(["--stat"] if args.stat else []), *revisions, "--"], cwd)
    if len(revisions) == 1:
        untracked = run_git(["ls-files", "--others", "--exclude-standard"], cwd).stdout.split()
        if untracked:
            print(f"Untracked in its worktree (not in the diff): {', '.join(untracked)}")
    return EXIT_OK if status == 0 else EXIT_FAILURE


def add_diff_parser(commands):
    """orchestra diff"""
    p = commands.add_parser(
        "diff",
        help="show an agent's changes against its base, paged like git",
        description=cmd_diff.__doc__,
        epilog="example: orchestra diff implement-auth --stat",
    )
    p.add_argument("id", metavar="ID", help="agent id or unique prefix")
    p.add_argument("--stat", action="store_true", help="only the files changed and how much")
    p.set_defaults(func=cmd_diff)


def approvals_table(requests, now):
    """The pending requests as a table: id, agent, waiting for, tool call (newlines escaped)."""
    rows = [
        [
            r["id"],
            r["agent"],
            format_duration(now - (parse_iso(r.get("since")) or now)),
            (r.get("summary") or r.get("tool") or "")
            + (f"  (asked by containment: {r['reason']})" if r.get("reason") else ""),
        ]
        for r in requests
    ]
    return render_table(["REQUEST", "AGENT", "WAITING", "TOOL CALL"], rows, sys.stdout)


def print_request(request):
    """One request shown whole: who asks, then every line of shown_request()."""
    print(f"request {request['id']}: {request['agent']} asks to run")
    for line in shown_request(request):
        print(f"  {line}")


def warn_ignored(ignored):
    """Name approval files that were ignored for want of a valid signature (stderr)."""
    for path in ignored:
        print(f"orchestra: warning: ignored {path}: no valid orchestra signature, so orchestra "
              "did not write it (an agent or another user may have)", file=sys.stderr)  # fmt: skip


def cmd_approvals(args):
    """List the tool calls agents are waiting to have approved, oldest first, each shown whole."""
    project = open_project(args)
    document = approvals_document(project)
    warn_ignored(document["ignored"])
    if args.json:
        print_json(document)
    elif document["approvals"]:
        print(approvals_table(document["approvals"], time.time()))
        for request in document["approvals"]:
            print()
            print_request(request)
        print(
            "\nAnswer with: orchestra approve REQUEST [--always]   or   orchestra deny REQUEST [--message TEXT]"
        )
    else:
        print("No agent is waiting for an approval.")
    return EXIT_OK


def cmd_approve(args):
    """Allow a waiting tool call (by request id, or every request of an agent); --always keeps
    allowing exactly the same call, --prefix WORDS every Bash command that starts with them."""
    project = open_project(args)
    if (args.prefix is not None or args.whole_tool) and not args.always:
        raise OrchestraError("--prefix and --whole-tool make a rule: use them with --always")
    for request in find_requests(project, args.target):
        print_request(request)
        decision = answer_request(
            project, request, True, "cli", always=args.always, prefix=args.prefix,
            whole=args.whole_tool,
        )  # fmt: skip
        print(f"allowed {request['id']}: {request['agent']} runs {request['summary']}")
        if decision.get("config"):
            print(f"every agent of this project may now run {decision['rule']} without asking "
                  f"(rule saved in {decision['config']})")  # fmt: skip
        elif decision.get("rule"):
            print(
                f"{request['agent']} may run {decision['rule']} without asking for the rest of its run"
            )
    return EXIT_OK


def cmd_deny(args):
    """Deny a waiting tool call; the agent reads --message as the tool's result and carries on."""
    project = open_project(args)
    for request in find_requests(project, args.target):
        answer_request(project, request, False, "cli", message=args.message)
        print(f"denied {request['id']}: {request['agent']} may not run {request['summary']}")
    return EXIT_OK


def add_approvals_parsers(commands):
    """orchestra approvals | approve | deny"""
    p = commands.add_parser(
        "approvals",
        help="list tool calls waiting for your approval",
        description=cmd_approvals.__doc__,
        epilog="example: orchestra approvals --json",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_approvals)
    p = commands.add_parser(
        "approve",
        help="allow a waiting tool call",
        description=cmd_approve.__doc__,
        epilog="example: orchestra approve 3fa2c1 --always=project",
    )
    p.add_argument("target", metavar="REQ|AGENT", help="request id, or agent id (or unique prefix)")
    p.add_argument(
        "--always",
        nargs="?",
        const="agent",
        choices=["agent", "project"],
        help="also allow exactly the same call (the same input) from now on: for the rest of this "
        "agent's run, or (--always=project) for every agent of the project",
    )
    p.add_argument(
        "--prefix",
        metavar="WORDS",
        help="with --always: allow every Bash command that starts with these words (the start of "
        "this command), with no shell operator after them: --prefix touch saves Bash(touch *)",
    )
    p.add_argument(
        "--whole-tool",
        action="store_true",
        help="with --always: allow a rule that covers every call of a tool (a call without input)",
    )
    p.set_defaults(func=cmd_approve)
    p = commands.add_parser(
        "deny",
        help="deny a waiting tool call",
        description=cmd_deny.__doc__,
        epilog='example: orchestra deny fix-tests --message "use the test database"',
    )
    p.add_argument("target", metavar="REQ|AGENT", help="request id, or agent id (or unique prefix)")
    p.add_argument("--message", help="what the agent is told instead of the tool's output")
    p.set_defaults(func=cmd_deny)


# ======================================================================================
# Command line: results
# --------------------------------------------------------------------------------------
# collect, land, cleanup and restore: bringing work home and putting worktrees away.
# ======================================================================================

ARCHIVE_WORDS = {
    "tip": "branch",
    "head": "HEAD",
    "lost": "reflog-only commits",
    "stash": "stashes",
    "index": "staged index",
    "worktree": "files",
}


ARCHIVE_PRUNE_DAYS = 30  # cleanup --prune-archives removes archives at least this old


def cmd_collect(args):
    """Report what finished agents produced; optionally commit, merge, open PRs or write a patch."""
    project = open_project(args)
    if project.config["hosts"]:  # Hosts: remote agents' latest branches come home first
        named = [
            r
            for r in project.records().values()
            if not args.ids or r["id"].startswith(tuple(args.ids))
        ]
        for problem in fetch_remote_branches(project, named):
            print(f"orchestra: note: {problem}", file=sys.stderr)
    archived = archived_reports(project, args.ids)
    if archived and len(archived) == len(args.ids):
        if args.commit or args.merge or args.pr or args.patch:
            raise OrchestraError(
                f"{', '.join(r['id'] for r in archived)} was cleaned up; bring it back with "
                f"'orchestra restore {archived[0]['id']}' first"
            )
        if args.json:
            print_json({"agents": archived, "overlaps": {}, "committed": []})
        else:
            print("\n\n".join(archived_report_text(r) for r in archived))
        return EXIT_OK
    document = collect_agents(
        project,
        args.ids,
        commit=args.commit,
        merge=args.merge,
        patch=args.patch,
        pr=args.pr,
        into=args.into,
        cwd=Path.cwd(),
        include_failing=args.include_failing,
        force=args.force,
        dry_run=args.dry_run,
    )
    reports = document["agents"]
    if args.json:
        print_json(document)
    else:
        print(
            collect_text(document)
            if reports or document["errors"]
            else "No finished agents to collect yet; see 'orchestra status'."
        )
    failed = document.get("conflict") or document.get("pr_failed") or document["errors"]
    return EXIT_FAILURE if failed else EXIT_OK


def archived_reports(project, ids):
    """collect's report of each named agent that was cleaned up, read from its archive."""
    if not ids:
        return []
    keys = ("id", "task", "state", "result", "error", "cost_usd", "turns", "branch", "checks")
    reports = []
    for record in select_agents(project.all_records(), ids):
        archived = record["state"] == "removed" and archived_work(project, record)
        if not archived:
            continue
        base, work, archive = archived
        tip = archive["refs"].get("tip") or archive["refs"].get("head") or base
        commits = commits_between(project.repo, base, tip)
        reports.append(
            {
                **{key: record.get(key) for key in keys},
                "commits": [{"hash": h, "subject": subject} for h, subject in commits],
                "diffstat": run_git(["diff", "--stat", base, work], project.repo).stdout.rstrip(),
                "archive": archive["ref"],
                "restore": f"orchestra restore {record['id']}",
            }
        )
    return reports


def archived_report_text(report):
    """One cleaned-up agent's part of the collect report."""
    lines = [
        f"== {report['id']}: cleaned up ({report['turns'] or 0} turns, {format_cost(report['cost_usd'])})",
        f"Task: {report['task']}",
    ]
    if report["result"] or report["error"]:
        lines.append(f"Result: {strip_control(report['result'] or report['error']).strip()}")
    lines.append(f"Commits saved under {report['archive']}:" if report["commits"] else "no commits")
    lines += [f"  {c['hash']} {c['subject']}" for c in report["commits"]]
    if report["diffstat"]:
        lines.append(report["diffstat"])
    lines.append(f"Bring it back with: {report['restore']}")
    return "\n".join(lines)


def add_collect_parser(commands):
    """orchestra collect"""
    p = commands.add_parser(
        "collect",
        help="report and bring home finished agents' work",
        description=cmd_collect.__doc__,
        epilog="example: orchestra collect --commit --merge",
    )
    p.add_argument(
        "ids", nargs="*", metavar="ID", help="agents to collect (default: every finished one)"
    )
    p.add_argument(
        "--commit", action="store_true", help="commit work an agent left uncommitted, on its branch"
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="land them on your current branch (a short form of 'orchestra land'): each merged in "
        "a scratch worktree, the checks run on the result, your checkout brought along",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with --merge: print the order and what would happen to each agent; change nothing",
    )
    p.add_argument(
        "--into",
        metavar="BRANCH",
        help="with --merge from a linked worktree: the branch checked out in your main checkout",
    )
    p.add_argument(
        "--include-failing",
        action="store_true",
        help="with --merge: merge agents whose checks failed or did not run, too (without "
        "checks on the result, as named agents)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --merge and named agents: merge them even if they tampered (see docs/containment.md)",
    )
    p.add_argument(
        "--pr", action="store_true", help="push each branch and open a pull request with gh"
    )
    p.add_argument(
        "--patch", metavar="FILE", help="write all their commits to FILE as one patch series"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_collect)


def cmd_land(args):
    """Land finished agents on the target branch one by one, in queue order: each merged onto the
    target in a scratch worktree, its checks run on exactly that result, and the branch moved
    only when they pass. Conflicts and red checks go back to the agent as fix rounds."""
    project = open_project(args)
    target = landing_target(project, args.into)
    show = (
        (lambda result: None)
        if args.json
        else (lambda result: print(land_line(result, target), flush=True))
    )
    if args.wait and args.ids:
        raise OrchestraError("--wait lands every agent as it finishes; name no ID with it")
    document = land_agents(
        project, args.ids, args.into, args.dry_run, args.include_failing, show, args.wait
    )
    if args.json:
        print_json(document)
    elif not document["results"]:
        print("Nothing to land; see 'orchestra status'.")
    for skipped in [] if args.json else document["not_landed"]:
        print(f"{skipped['id']}: not landed: {skipped['reason']} (name it to land it anyway)")
    blocked = any(r["outcome"] in ("blocked", "stopped") for r in document["results"])
    return EXIT_FAILURE if blocked else EXIT_OK


def add_land_parser(commands):
    """orchestra land"""
    p = commands.add_parser(
        "land",
        help="merge queue: land agents whose checks pass on the merged result",
        description=cmd_land.__doc__,
        epilog="example: orchestra spawn --file plan.json && orchestra land --wait",
    )
    p.add_argument(
        "ids",
        nargs="*",
        metavar="ID",
        help="agents to land (default: every done one whose checks passed)",
    )
    p.add_argument(
        "--into",
        metavar="BRANCH",
        help="the branch to land on (default: base_branch, else the checked-out one)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the order and what would happen to each agent"
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="also land agents as they finish (dependents too), until none is at work",
    )
    p.add_argument(
        "--include-failing",
        action="store_true",
        help="also agents whose own checks failed or did not run",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_land)


def cmd_cleanup(args):
    """Remove agents' worktrees and branches when nothing can be lost; say why the rest stay."""
    project = open_project(args)
    if args.older_than is not None and not args.prune_archives:
        raise OrchestraError(
            "--older-than goes with --prune-archives; see 'orchestra cleanup --help'"
        )
    if args.prune_archives:
        return prune_archives(project, args.older_than, args.dry_run, args.json)
    if args.list_archives:
        return print_archives(project, args.json)
    outcome = cleanup_agents(
        project,
        args.ids,
        apply=not args.dry_run,
        everything=args.all,
        failed_only=args.failed,
        force=args.force,
    )
    if args.json:
        print_json(outcome)
        return EXIT_FAILURE if any(step.get("error") for step in outcome["plan"]) else EXIT_OK
    for step in outcome["plan"]:
        print(cleanup_line(step, args.dry_run))
    if not outcome["plan"]:
        print("Nothing to clean up.")
    return EXIT_FAILURE if any(step.get("error") for step in outcome["plan"]) else EXIT_OK


def print_archives(project, as_json):
    """List the saved branch tips and how to restore each."""
    rows = list_archives(project.repo)
    if as_json:
        print_json({"archives": rows})
    elif rows:
        table = [[r["id"], r["saved"], r["commit"], r["subject"]] for r in rows]
        restores = [f"    restore: {r['restore']}" for r in rows]
        print(table_with_lines(["ID", "SAVED", "COMMIT", "SUBJECT"], table, restores, sys.stdout))
    else:
        print("No archived work.")
    return EXIT_OK


def archive_age_days(archive, now):
    """Whole days since an archive was saved (its stamp is the UTC time of the cleanup)."""
    stamp = archive.get("stamp") or archive["saved"]  # "saved" is <seq>-<stamp>
    saved = parse_iso(
        f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}Z"
    )
    return 0 if saved is None else max(0, int((now - saved) // 86400))


def archives_disk_usage(repo, refs):
    """Bytes of git objects only these refs reach (what removing them lets `git gc` free)."""
    if not refs:
        return 0
    others = [f"--exclude={ARCHIVE_REFS}/*", "--all"]
    done = run_git(
        ["rev-list", "--objects", "--disk-usage", *refs, "--not", *others], repo, check=False
    )
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


def format_bytes(count):
    """1.2 MB, 340 KB, 12 B."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def prune_archives(project, days, dry_run, as_json):
    """cleanup --prune-archives: list the archives older than `days` days, then delete their refs."""
    days = ARCHIVE_PRUNE_DAYS if days is None else days
    now = time.time()
    old = [a for a in list_archives(project.repo) if archive_age_days(a, now) >= days]
    refs = [ref for a in old for ref in a["refs"].values()]
    size = archives_disk_usage(project.repo, refs)
    if not dry_run and refs:
        lines = "".join(f"delete {ref}\n" for ref in refs)
        git_bytes(["update-ref", "--stdin"], project.repo, input=lines.encode())
    if as_json:
        print_json({"pruned": [] if dry_run else old, "would_prune": old if dry_run else [],
                    "bytes": size, "older_than_days": days})  # fmt: skip
        return EXIT_OK
    verb = "WOULD PRUNE" if dry_run else "PRUNED"
    for a in old:
        print(
            f"{verb} {a['id']}/{a['saved']} ({archive_age_days(a, now)} days old): {a['commit']} {a['subject']}"
        )
    if not old:
        print(f"No archives older than {days} days.")
    elif dry_run:
        print(
            f"{plural(len(old), 'archive')} older than {days} days hold {format_bytes(size)} nothing else keeps; run without --dry-run to remove them"
        )
    else:
        print(
            f"{plural(len(old), 'archive')} removed: {format_bytes(size)} that 'git gc' can now free"
        )
    return EXIT_OK


def add_cleanup_parser(commands):
    """orchestra cleanup"""
    p = commands.add_parser(
        "cleanup",
        help="remove worktrees and branches that are safe to remove",
        description=cmd_cleanup.__doc__,
        epilog="example: orchestra cleanup --dry-run",
    )
    p.add_argument(
        "ids", nargs="*", metavar="ID", help="agents to clean up (default: every finished one)"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--all",
        action="store_true",
        help="also agents still running or paused (kept unless --force)",
    )
    which.add_argument("--failed", action="store_true", help="only failed and interrupted agents")
    p.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    p.add_argument(
        "--force",
        action="store_true",
        help="also remove unmerged or dirty work (archived first) and stop running agents",
    )
    p.add_argument(
        "--list-archives", action="store_true", help="list saved work and how to restore it"
    )
    p.add_argument(
        "--prune-archives",
        action="store_true",
        help=f"list, then remove, archives older than --older-than days ({ARCHIVE_PRUNE_DAYS}), and say how much they hold",
    )
    p.add_argument(
        "--older-than",
        type=whole_number_at_least(0),
        metavar="DAYS",
        help="with --prune-archives: the age in days",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_cleanup)


def cmd_restore(args):
    """Bring a cleaned-up agent back from its archive: its branch, and a worktree with the files,
    index and record it had. Refuses when the branch or the folder exists."""
    project = open_project(args)
    outcome = restore_agent(project, args.id)
    if args.json:
        print_json(outcome)
        return EXIT_OK
    print(
        f"{outcome['id']}: restored {', '.join(outcome['restored'])} as branch {outcome['branch']} in {outcome['worktree']}"
    )
    for kind, ref in outcome["other_refs"].items():
        print(f"  also saved ({ARCHIVE_WORDS[kind]}): {ref}")
    return EXIT_OK


def add_restore_parser(commands):
    """orchestra restore"""
    p = commands.add_parser(
        "restore",
        help="bring a cleaned-up agent back from its archive",
        description=cmd_restore.__doc__,
        epilog="example: orchestra restore implement-auth",
    )
    p.add_argument(
        "id",
        metavar="ID",
        help="agent id (its newest archive) or ID/STAMP from cleanup --list-archives",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_restore)


# ======================================================================================
# Command line: sessions, web and internals
# --------------------------------------------------------------------------------------
# sessions, web, and the commands orchestra runs itself: supervise and hook.
# ======================================================================================

SESSION_TABLE_WIDTH = 100  # when stdout is not a terminal
WEB_JOIN_POLL = 0.5  # seconds; how often `orchestra web` wakes to notice Ctrl-C
SESSIONS_EPILOG = """\
MSGS (messages) counts your prompts and Claude's replies, each API response once; tool
calls, tool results, compact summaries and sub-agent lines are not messages. MODEL is
the model of the session's own latest reply (not a sub-agent's).

example: orchestra sessions --project; orchestra sessions --resume 3f2a"""


def add_sessions_parser(commands):
    """orchestra sessions"""
    p = commands.add_parser(
        "sessions",
        help="list or resume your recent Claude Code sessions",
        description=cmd_sessions.__doc__,
        epilog=SESSIONS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--hours",
        type=positive_hours,
        default=SESSION_DEFAULT_HOURS,
        metavar="N",
        help=f"sessions active in the last N hours (default {SESSION_DEFAULT_HOURS:g})",
    )
    when.add_argument("--all", action="store_true", help="no time limit")
    p.add_argument(
        "--project",
        nargs="?",
        const=".",
        metavar="PATH",
        help="only this repository and all its worktrees (PATH defaults to the current one)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=SESSION_DEFAULT_LIMIT,
        metavar="N",
        help=f"show at most N sessions (default {SESSION_DEFAULT_LIMIT})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument(
        "--resume",
        metavar="ID",
        help="resume a session: id, unique prefix, or orchestra agent id or its unique prefix",
    )
    p.add_argument(
        "--print", action="store_true", help="with --resume: print the commands, run nothing"
    )
    p.set_defaults(func=cmd_sessions)


def cmd_sessions(args, env=os.environ, now=None):
    """List your recent Claude Code sessions, newest first, or resume one in its own folder."""
    if args.print and not args.resume:
        raise OrchestraError("--print goes with --resume ID; see 'orchestra sessions --help'")
    if args.resume:
        return resume_session(args.resume, args.print, env)
    now = time.time() if now is None else now
    hours = None if args.all else args.hours
    project = project_filter(args.project) if args.project is not None else None
    projects_dir = claude_projects_dir(env)
    listing = session_listing(env, now, hours, project, args.limit)
    if not projects_dir.is_dir():
        print_note(
            f"no Claude Code sessions yet: {projects_dir} does not exist ({CLAUDE_CONFIG_ENV} moves it)"
        )
    if args.json:
        print_json(listing_json(listing, projects_dir, now, hours, project))
    elif listing.sessions:
        width = shutil.get_terminal_size((SESSION_TABLE_WIDTH, 0)).columns
        print("\n".join(session_table(listing.sessions, now, env, width)))
    for note in listing_notes(listing, hours, project, args.limit):
        print_note(note)
    return EXIT_OK


def cmd_web(args):
    """Serve the dashboard, the JSON API and live status over a WebSocket until Ctrl-C.

    The first line printed is the dashboard's address with its access token; keep it private.
    """
    if bool(args.tls_cert) != bool(args.tls_key):
        raise OrchestraError("--tls-cert and --tls-key go together; pass both")
    flags = config_flags(args)
    project = Project.open(Path.cwd(), os.environ, flags)
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    server = start_web_server(
        project,
        args.host,
        args.port,
        allow_hosts=args.allow_host,
        new_token=args.new_token,
        tls=tls,
        log=sys.stderr,
        env=os.environ,
        flags=flags,
    )
    try:
        print(server.url, flush=True)
        warning = beyond_loopback_warning(args.host, server.gate.hosts)
        if warning:
            print(f"orchestra: warning: {warning}", file=sys.stderr)
        missing = missing_dashboard_note()
        if missing:
            print(f"orchestra: warning: {missing}", file=sys.stderr)
        print(f"orchestra: serving {project.repo}; Ctrl-C stops", file=sys.stderr, flush=True)
        if args.qr:
            if args.host in WEB_LOOPBACK_HOSTS:
                print(f"orchestra: warning: {loopback_qr_warning(args.host)}", file=sys.stderr)
            elif warning and not tls:
                print(f"orchestra: warning: {QR_PLAIN_HTTP_WARNING}", file=sys.stderr)
            print(qr_text(server.url, colour=use_colour(sys.stdout)), flush=True)
        if args.open:
            import webbrowser  # here, not at the top: only --open needs it

            webbrowser.open(server.url)
        while server.thread.is_alive():
            server.thread.join(WEB_JOIN_POLL)
    finally:
        server.stop()
    return EXIT_OK


def loopback_qr_warning(host):
    """Why a phone cannot open a loopback address, and the --host that it could reach."""
    address = network_address()
    return (
        f"{host} is reachable from this machine only: a phone cannot open this code; run "
        f"'orchestra web --qr --host {address}' (on a network you trust), "
        "or see the README for an SSH tunnel or Tailscale"
    )


def network_address():
    """This machine's address on its network (the one its default route leaves from): no packet is sent."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: connect() on UDP only picks a route
        return probe.getsockname()[0]
    return socket.gethostname()


def missing_dashboard_note():
    """One line saying where to put dashboard.html when no copy is found, else None."""
    places = dashboard_candidates()
    if any(path.is_file() for path in places):
        return None
    return (
        f"static/dashboard.html was not found, so / only says it is missing (the API works); "
        f"copy it to {places[0]}"
    )


QR_PLAIN_HTTP_WARNING = (
    "this address is plain HTTP beyond this machine: the token in the QR code, and every "
    "request after it, crosses the network in clear. Put TLS in front: --tls-cert FILE --tls-key "
    "FILE (e.g. from mkcert), or listen on 127.0.0.1 behind an HTTPS proxy (caddy, "
    "tailscale serve) or an ssh tunnel (ssh -L 8888:127.0.0.1:8888 HOST). The token changes on "
    "every start."
)


def add_web_parser(commands):
    """orchestra web"""
    p = commands.add_parser(
        "web",
        help="serve the dashboard, the JSON API and live status",
        description=cmd_web.__doc__,
        epilog="example: orchestra web --port 0 --open",
    )
    p.add_argument(
        "--host",
        default=WEB_DEFAULT_HOST,
        help="address to listen on (default: %(default)s, this machine only)",
    )
    p.add_argument(
        "--port",
        type=port_number,
        default=WEB_DEFAULT_PORT,
        help="port (default: %(default)s; 0 picks a free one)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests addressed to this host name (repeatable)",
    )
    p.add_argument("--open", action="store_true", help="open the dashboard in a browser")
    p.add_argument(
        "--qr", action="store_true", help="also print the address as a QR code to scan with a phone"
    )
    p.add_argument(
        "--new-token",
        action="store_true",
        help="make a new access token (every start does now; kept for old scripts)",
    )
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    p.set_defaults(func=cmd_web)


def cmd_supervise(args):
    """Run the supervisor here (--foreground) or start it in the background."""
    project = open_project(args)
    if not args.foreground:
        pid = ensure_supervisor(project)
        print(
            f"supervisor started (pid {pid})"
            if pid
            else "nothing to supervise, or a supervisor is already running"
        )
        return EXIT_OK
    supervisor = Supervisor(project, max(0.0, args.linger))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.stopping.set())
    return supervisor.run()


def add_supervise_parser(commands):
    """orchestra supervise"""
    p = commands.add_parser(
        "supervise",
        help="run the supervisor (spawn starts it for you)",
        description=cmd_supervise.__doc__,
        epilog="example: orchestra supervise --foreground",
    )
    p.add_argument(
        "--foreground", action="store_true", help="run in this terminal instead of the background"
    )
    p.add_argument(
        "--linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --foreground: wait this long for work before ending with none (a host's "
        "supervisor starts before its agents arrive)",
    )
    p.set_defaults(func=cmd_supervise)


def cmd_hook(args):
    """Claude Code's hooks (internal): permission-request answers a request, pre-tool-use judges a
    tool call against the agent's containment; each reads stdin and answers on stdout."""
    if args.event == "pre-tool-use":
        if not args.worktree or not args.branch:
            raise OrchestraError("hook pre-tool-use needs --worktree and --branch")
        return guard_hook(args, sys.stdin, sys.stdout, os.environ)
    return permission_hook(args.repo, args.agent, args.timeout, sys.stdin, sys.stdout)


def add_hook_parser(commands):
    """orchestra hook (internal; Claude Code runs it)"""
    p = commands.add_parser(
        "hook",
        description=cmd_hook.__doc__,
        epilog="example: orchestra hook permission-request --repo . --agent fix-tests < request.json",
    )
    p.add_argument("event", choices=["permission-request", "pre-tool-use"], help="the hook event")
    p.add_argument("--repo", required=True, help="the repository whose agent asks")
    p.add_argument("--agent", required=True, help="the agent's id")
    p.add_argument("--worktree", help="pre-tool-use: the agent's worktree")
    p.add_argument("--branch", help="pre-tool-use: the agent's branch")
    p.add_argument(
        "--protect", action="append", default=[], help="pre-tool-use: a protected path (repeatable)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=CONFIG_DEFAULTS["approval_timeout"],
        help="seconds to wait for a decision before denying",
    )
    p.set_defaults(func=cmd_hook)


# ======================================================================================
# Command line: hosts
# --------------------------------------------------------------------------------------
# `orchestra hosts` lists the machines agents run on. `host-agent ACTION` is what a host runs
# when home calls it over ssh: a JSON payload on stdin (never text in a shell command), one
# JSON answer on stdout. Everything it creates is 0600/0700 (umask 077).
# ======================================================================================


def cmd_hosts(args):
    """List the hosts agents run on: slots, running agents and whether ssh reaches them."""
    rows = hosts_overview(open_project(args))
    if args.json:
        print_json({"hosts": rows})
        return EXIT_OK
    table = [
        [
            r["name"],
            str(r["slots"]),
            str(len(r["running"])),
            "yes" if r["reachable"] else "NO",
            r["ssh"] or "-",
            one_line(r["error"] or ""),
        ]
        for r in rows
    ]
    print(
        render_table(["HOST", "SLOTS", "RUNNING", "REACHABLE", "SSH", "PROBLEM"], table, sys.stdout)
    )
    return EXIT_OK if all(r["reachable"] for r in rows) else EXIT_FAILURE


def add_hosts_parser(commands):
    """orchestra hosts"""
    p = commands.add_parser(
        "hosts",
        help="list the hosts agents run on",
        description=cmd_hosts.__doc__,
        epilog="example: orchestra hosts --json",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_hosts)


def host_project(payload):
    """The host's copy of the repository a payload names (relative paths: the remote home)."""
    return Project.open(Path(payload["repo"]), os.environ)


def host_action_doctor(payload):
    """This host's own doctor checks."""
    return {
        "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in doctor_checks(os.environ)]
    }


def host_action_prepare(payload):
    """Make the repository copy that home pushes base commits into, and start its supervisor
    under home's settings: it has started by the time the first agents arrive."""
    repo = Path(payload["repo"])
    repo.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        run_git(["init", "--quiet"], repo)
    (repo / ORCHESTRA_DIR).mkdir(mode=0o700, exist_ok=True)
    write_atomic(
        repo / ORCHESTRA_DIR / "config.json", json.dumps(payload["config"], sort_keys=True)
    )
    ensure_supervisor(Project.open(repo, os.environ), linger=HOST_SUPERVISOR_LINGER)
    return {"repo": str(repo.resolve())}


def spawn_or_say_why(project, asked, env, answers):
    """Spawn agents home sent, adding their answers (a lone agent's: why it cannot); True if done."""
    tasks, ids = [a["task"] for a in asked], [a["id"] for a in asked]
    slots = project.config["max_parallel"]  # the host's limit: those start now, all at once
    try:
        records = spawn_agents(
            project, tasks, name=ids, base=asked[0]["base"], env=env, ready_now=slots
        )
    except OrchestraError as e:
        if len(asked) == 1:
            answers[asked[0]["id"]] = {"error": str(e)}
        return False
    answers.update({r["id"]: {"record": public_record(r)} for r in records})
    return True


def spawn_from_home(repo, asked):
    """Spawn agents home sent that share a base, settings and environment; their answers."""
    first = asked[0]
    write_atomic(repo / ORCHESTRA_DIR / "config.json", json.dumps(first["config"], sort_keys=True))
    project = Project.open(repo, os.environ)
    known = project.store.load()["agents"]
    answers = {
        a["id"]: {"record": public_record(known[a["id"]])} for a in asked if a["id"] in known
    }
    new = [a for a in asked if a["id"] not in known]
    env = {**os.environ, **{str(k): str(v) for k, v in first["env"].items()}}
    if new and not spawn_or_say_why(project, new, env, answers) and len(new) > 1:
        known = project.store.load()["agents"]  # recorded before it failed: its record says why
        for one in new:  # one the host refuses must not keep the others from starting
            if one["id"] in known:
                answers[one["id"]] = {"record": public_record(known[one["id"]])}
            else:
                spawn_or_say_why(project, [one], env, answers)
    return answers


def spawned_alike(asked):
    """The agents home sent, in runs that share a base, settings and environment (in order)."""
    alike = [json.dumps([a["base"], a["config"], a["env"]], sort_keys=True) for a in asked]
    runs = itertools.groupby(zip(alike, asked), key=lambda pair: pair[0])
    return [[a for _, a in run] for _, run in runs]


def host_action_spawn(payload):
    """Spawn the agents home sent, with the ids home gave them (again: nothing new), under
    home's settings, in order; {"agents": {id: {"record": ...} or {"error": why}}}."""
    repo, asked = Path(payload["repo"]), payload["agents"]
    if asked and not has_commits(repo):
        run_git(["checkout", "--quiet", "--detach", asked[0]["base"]], repo)
    (repo / ORCHESTRA_DIR).mkdir(mode=0o700, exist_ok=True)
    answers = {}
    for group in spawned_alike(asked):
        try:
            answers.update(spawn_from_home(repo, group))
        except Exception as e:  # one run's trouble (a full disk) is its agents' alone
            answers.update({a["id"]: {"error": one_line(str(e) or repr(e))} for a in group})
    return {"agents": answers}


def host_action_poll(payload):
    """Every named agent's record and its log from its `offset` on (at most its `limit` bytes),
    in one call; revives the host's supervisor, which settles agents a reboot killed as
    interrupted, and keeps home's fleet-wide rate-limit hold (`hold_until`)."""
    project = host_project(payload)
    state = project.store.load()
    if state.get("hold_until") != payload.get("hold_until"):  # home's fleet-wide hold
        state = project.store.update(lambda s: s.update(hold_until=payload["hold_until"]) or s)
    ensure_supervisor(project, state)
    history = None
    pending = ApprovalBox(project.repo).pending()
    answers = {}
    for asked in payload["agents"]:
        record = state["agents"].get(asked["id"])
        if record is None:
            history = project.history() if history is None else history
            record = history.get(asked["id"])
        answers[asked["id"]] = host_poll_answer(project, record, asked, pending)
    return {"agents": answers}


def host_poll_answer(project, record, asked, pending):
    """One agent's part of a poll answer: record, log bytes, whether more wait, requests."""
    limit, data = int(asked["limit"]), b""
    with contextlib.suppress(FileNotFoundError), open(project.log_path(asked["id"]), "rb") as f:
        f.seek(int(asked["offset"]))
        data = f.read(limit + 1)
    return {
        "approvals": [r for r in pending if r.get("agent") == asked["id"]],
        "record": record and {**public_record(record), "finished_at": record.get("finished_at")},
        "data": base64.b64encode(data[:limit]).decode(),
        "more": len(data) > limit,
    }


def host_action_signal(payload):
    """Stop, pause, resume or message one agent here, as home asked."""
    project = host_project(payload)
    ids, env = [payload["id"]], {**os.environ, **payload.get("env", {})}
    outcome = {
        "stop": lambda: stop_agents(project, ids),
        "pause": lambda: pause_agents(project, ids),
        "resume": lambda: resume_agents(project, ids, env),
        "send": lambda: send_message(project, payload["id"], payload["message"], env),
    }[payload["action"]]()
    return {"outcome": json.loads(json.dumps(outcome))}


def host_action_leftovers(payload):
    """Commit what an agent's worktree holds uncommitted (tracked and untracked files) to a ref
    of its own, for home to fetch; the worktree and branch stay as they are."""
    project = host_project(payload)
    record = project.all_records().get(payload["id"])
    if not record or not Path(record["worktree"]).is_dir():
        return {"ref": None}
    worktree = record["worktree"]
    if not run_git(["status", "--porcelain", "--untracked-files=all"], worktree).stdout.strip():
        return {"ref": None}
    index = project.dir / f"leftovers-{payload['id']}.index"
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}
    try:
        run_git(["read-tree", "HEAD"], worktree, env=env)
        run_git(["add", "--all", "."], worktree, env=env)
        tree = run_git(["write-tree"], worktree, env=env).stdout.strip()
    finally:
        with contextlib.suppress(OSError):
            index.unlink()
    message = f"uncommitted work of {payload['id']} on this host"
    commit = run_git(["commit-tree", tree, "-p", "HEAD", "-m", message], worktree).stdout.strip()
    ref = f"refs/orchestra/leftovers/{payload['id']}"
    run_git(["update-ref", ref, commit], project.repo)
    return {"ref": ref}


def host_action_cleanup(payload):
    """Remove one agent's worktree and branch here: home has archived all it held."""
    project = host_project(payload)
    outcome = cleanup_agents(project, [payload["id"]], apply=True, force=True)
    return {"outcome": outcome["plan"]}


def host_action_answer(payload):
    """Decide a request here as home decided it (the first decision wins, as ever)."""
    project = host_project(payload)
    request, where = ApprovalBox(project.repo).request(payload["request"])
    if where != "pending":
        return {"answered": False}
    decision = payload["decision"]
    try:
        answer_request(
            project,
            request,
            decision.get("decision") == "allow",
            f"home ({decision.get('by')})",
            message=decision.get("message"),
            always=decision.get("always"),
        )
    except OrchestraError as e:
        return {"answered": False, "why": str(e)}
    return {"answered": True}


HOST_ACTIONS = {
    "doctor": host_action_doctor,
    "prepare": host_action_prepare,
    "spawn": host_action_spawn,
    "poll": host_action_poll,
    "signal": host_action_signal,
    "leftovers": host_action_leftovers,
    "cleanup": host_action_cleanup,
    "answer": host_action_answer,
}


def host_serve(requests, answers):
    """`host-agent serve`: answer one {"action", "payload"} line after another (see HostSession)
    until home closes the session; a refused request is answered {"error"}, the session lives on."""
    for line in requests:
        request = json.loads(line)
        try:
            answer = {"answer": HOST_ACTIONS[request["action"]](request["payload"])}
        except OrchestraError as e:
            answer = {"error": str(e)}
        answers.write(json.dumps(answer).encode() + b"\n")
        answers.flush()
    return EXIT_OK


def cmd_host_agent(args):
    """(internal) What home runs on a host over ssh: a JSON payload in, a JSON answer out."""
    os.umask(0o077)
    if args.action == "serve":  # answers go to the real stdout; stray prints to stderr
        answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # children's output too
        sys.stdout = sys.stderr
        return host_serve(sys.stdin.buffer, answers)
    try:
        payload = json.loads(sys.stdin.buffer.read() or b"{}")
    except ValueError:
        raise OrchestraError("host-agent reads a JSON payload on stdin") from None
    print_json(HOST_ACTIONS[args.action](payload))
    return EXIT_OK


def add_host_agent_parser(commands):
    """orchestra host-agent (internal)"""
    p = commands.add_parser(
        "host-agent",
        help="(internal) what a host runs when home calls it over ssh",
        description=cmd_host_agent.__doc__,
        epilog="example: orchestra host-agent doctor < /dev/null (home runs it over ssh)",
    )
    p.add_argument("action", choices=sorted([*HOST_ACTIONS, "serve"]))
    p.set_defaults(func=cmd_host_agent)


# ======================================================================================
# Command line: the parser
# --------------------------------------------------------------------------------------
# PARSER_BUILDERS lists one builder per command group, in the order `--help` shows them.
# ======================================================================================

# Commands Claude Code (hook) or home over ssh (host-agent) runs: never suggested for a typo
INTERNAL_COMMANDS = ("hook", "host-agent")
SUGGESTION_CUTOFF = 0.6  # difflib's similarity a mistyped command needs to be suggested

PARSER_BUILDERS = (
    add_init_parser,
    add_config_parser,
    add_spawn_parser,
    add_status_parser,
    add_signal_parsers,
    add_logs_parser,
    add_diff_parser,
    add_worktrees_parser,
    add_collect_parser,
    add_land_parser,
    add_send_parser,
    add_cleanup_parser,
    add_restore_parser,
    add_sessions_parser,
    add_web_parser,
    add_supervise_parser,
    add_approvals_parsers,
    add_doctor_parser,
    add_hook_parser,
    add_retry_parser,
    add_hosts_parser,
    add_host_agent_parser,
)


def command_names(parser):
    """The subcommands the parser of build_parser knows, but those orchestra runs itself."""
    return [name for name in parser.commands.choices if name not in INTERNAL_COMMANDS]


def check_command_word(parser, argv):
    """Refuse an unknown command with the nearest known ones, before argparse lists them all."""
    words = iter(argv)
    for word in words:
        if word == "-c":
            next(words, None)  # -c KEY=VALUE
        elif not word.startswith("-"):
            known = command_names(parser)
            if word not in known and word not in INTERNAL_COMMANDS:
                import difflib  # here, not at the top: only a mistyped command needs it

                near = difflib.get_close_matches(word, known, n=3, cutoff=SUGGESTION_CUTOFF)
                hint = f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
                raise OrchestraError(
                    f"'{word}' is not an orchestra command; {hint}see 'orchestra --help'"
                )
            return


def parse_arguments(parser, argv):
    """The parsed command line. spawn takes tasks between its options too, so that
    `spawn --name a T1 --name b T2` pairs each name with its task."""
    check_command_word(parser, argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not (
        getattr(args, "more_tasks", False) and not any(a.startswith("-") for a in extra)
    ):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.tasks = [*args.tasks, *extra]  # the tasks after the first option, in the order given
    return args


def build_parser():
    """The whole command line."""
    parser = ArgumentParser(
        prog="orchestra",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"orchestra {__version__}")
    parser.add_argument(
        "-c",
        dest="config_overrides",
        action="append",
        metavar="KEY=VALUE",
        help="override a setting for this run (VALUE is JSON or a word)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True
    for build in PARSER_BUILDERS:
        build(commands)
    parser.commands = commands  # check_command_word suggests from its names
    return parser


# ======================================================================================
# Main
# --------------------------------------------------------------------------------------
# main() is the one place an OrchestraError becomes a message and an exit status.
# ======================================================================================

DISK_ERRNOS = {
    errno.ENOSPC,
    errno.EROFS,
    errno.EACCES,
    errno.EDQUOT,
}  # one clear line, no traceback


def main(argv=None):
    """Run one orchestra command; the exit status (0 ok, 1 failed, 2 bad input, 130 Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return EXIT_OK
        args = parse_arguments(parser, argv)
        return args.func(args)
    except OrchestraError as e:
        if os.environ.get("ORCHESTRA_DEBUG") == "1":
            raise
        print(f"orchestra: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_FAILURE
    except OSError as e:
        if e.errno not in DISK_ERRNOS or os.environ.get("ORCHESTRA_DEBUG") == "1":
            raise
        print(
            f"orchestra: error: cannot write {e.filename or 'a file'}: {e.strerror}; "
            "free some space or fix the permissions, then run the command again",
            file=sys.stderr,
        )
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
