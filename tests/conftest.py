"""Shared fixtures: throwaway repositories, in-process CLI runs, fake and real agents."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path[:0] = [str(ROOT), str(TESTS)]

import orchestra  # noqa: E402
from scripted_api import ScriptedAPI, bash, claude_env  # noqa: E402

FAKE_AGENT = TESTS / "fake_agent.py"
FAKE_AGENT_COMMAND = [sys.executable, str(FAKE_AGENT), "{task}"]
CLAUDE_TOOLS = ["Bash", "Edit", "Write"]  # root may not bypass permissions: allow tools instead
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}
# Debian's Chromium for the dashboard tests, headless, on a phone-sized viewport.
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]  # fmt: skip
PHONE = {"width": 390, "height": 844}


class Run:
    """What a user sees from one command: exit code, stdout and stderr."""

    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def json(self):
        """stdout as JSON; a failure names what the command printed instead."""
        try:
            return json.loads(self.out)
        except ValueError:
            raise AssertionError(f"the command printed no JSON: {self!r}") from None

    def __repr__(self):
        return f"Run(code={self.code}, out={self.out!r}, err={self.err!r})"


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No user config, no colour, a git identity, and no debug tracebacks."""
    monkeypatch.setenv("ORCHESTRA_CONFIG", str(tmp_path / "user-config.json"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("ORCHESTRA_DEBUG", raising=False)
    for key, value in GIT_IDENTITY.items():
        monkeypatch.setenv(key, value)


def git(*args, cwd):
    """Run git in a test and return its stdout."""
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def make_repo(path):
    """A git repository with one commit on main."""
    path.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "-b", "main", cwd=path)
    (path / "README.md").write_text("# demo\n")
    git("add", "README.md", cwd=path)
    git("commit", "-qm", "initial commit", cwd=path)
    return path


def write_config(repo, **values):
    """Write the project's .orchestra/config.json."""
    folder = repo / ".orchestra"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(values))


def load_state(repo):
    """state.json as the tool wrote it."""
    return json.loads((repo / ".orchestra" / "state.json").read_text())


def wait_for(predicate, timeout=60, interval=0.1, what="condition"):
    """Poll until predicate() is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def process_state(pid):
    """The one-letter state of a process (R, S, T...), None once it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    return None if state == "Z" else state


def agent_states(repo):
    """{id: state} from state.json."""
    path = repo / ".orchestra" / "state.json"
    if not path.exists():
        return {}
    return {i: r["state"] for i, r in load_state(repo)["agents"].items()}


def wait_settled(repo, timeout=60):
    """Wait until no agent is queued, running or paused and the supervisor has gone."""

    def settled():
        state = load_state(repo)
        active = any(r["state"] in orchestra.ACTIVE_STATES for r in state["agents"].values())
        return not active and not orchestra.supervisor_alive(state) and state["agents"]

    return wait_for(settled, timeout, what="agents to finish")


def load_state_with_history(repo):
    """state.json with the cleaned-up agents of history.jsonl back among the agents."""
    state = load_state(repo)
    state["agents"] = {
        **orchestra.read_history(repo / ".orchestra" / "history.jsonl"),
        **state["agents"],
    }
    return state


def spawn_and_finish(cli, repo, *tasks):
    """Spawn fake agents and wait until they have all finished."""
    assert cli("spawn", *tasks).code == 0
    wait_settled(repo)


def add_record(project, agent_id, **facts):
    """An agent record written straight into state.json, as another process could leave it."""

    def change(state):
        record = state["agents"].get(agent_id) or dict.fromkeys(orchestra.RECORD_FIELDS)
        record.update(id=agent_id, task=f"task {agent_id}", created_at=orchestra.utc_iso())
        record.update(facts)
        state["agents"][agent_id] = record

    project.store.update(change)


def commit_file(name, content):
    """A Bash step that writes a file and commits it on the agent's branch."""
    return bash(f"printf '{content}\\n' > {name} && git add {name} && git commit -qm 'add {name}'")


def take_time(seconds, python="python3"):
    """A Bash step that keeps the agent busy (Claude Code blocks a long standalone `sleep`)."""
    return bash(f"{python} -c 'import time; time.sleep({seconds})'")


def kill_everything(repo):
    """Kill the supervisor and agents a test left behind."""
    path = repo / ".orchestra" / "state.json"
    if not path.exists():
        return
    with contextlib.suppress(ValueError):
        state = json.loads(path.read_text())
        processes = [state.get("supervisor") or {}, *state["agents"].values()]
        for info in processes:
            pid = info.get("pid")
            if orchestra.process_alive(pid, info.get("pid_start")):
                with contextlib.suppress(OSError):
                    (
                        os.killpg(pid, signal.SIGKILL)
                        if info is not processes[0]
                        else os.kill(pid, signal.SIGKILL)
                    )


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A fresh repository, made the current directory."""
    path = make_repo(tmp_path / "repo")
    monkeypatch.chdir(path)
    yield path
    kill_everything(path)


@pytest.fixture
def fake_repo(repo):
    """A repository whose agents are the fast fake agent."""
    write_config(repo, agent_command=FAKE_AGENT_COMMAND, heartbeat_interval=0.5)
    return repo


@pytest.fixture
def cli(capsys):
    """Run `orchestra ARGS...` in-process; returns what the user would see."""

    def run(*argv):
        code = orchestra.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return Run(code, out, err)

    return run


@pytest.fixture
def claude_api(tmp_path, monkeypatch):
    """A scripted Messages API, with the environment pointing the real claude CLI at it."""
    with ScriptedAPI() as api:
        env = claude_env(api, config_dir=tmp_path / "claude-config")
        for key in set(os.environ) - set(env):
            monkeypatch.delenv(key)
        for key, value in env.items():
            if os.environ.get(key) != value:
                monkeypatch.setenv(key, value)
        yield api


@pytest.fixture
def claude_repo(repo, claude_api):
    """A repository whose agents are the real claude CLI with tools allowed."""
    write_config(repo, bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5, sandbox="off")
    return repo


@pytest.fixture
def project(fake_repo):
    """The fake repository as an orchestra Project."""
    return orchestra.Project.open(fake_repo, os.environ)


@pytest.fixture
def server(project):
    """A web server on a free loopback port (1 s header deadline); its log is server.test_log."""
    log = io.StringIO()
    srv = orchestra.start_web_server(
        project, "127.0.0.1", 0, log=log, revive=False, header_deadline=1.0
    )
    srv.test_log = log
    yield srv
    srv.stop()


@pytest.fixture
def browser():
    """Headless Chromium, driven by Playwright (the dashboard test files skip without them)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def phone(browser):
    """A phone-sized page that collects script errors and dialogs (an alert would be XSS)."""
    page = browser.new_page(viewport=PHONE, device_scale_factor=1, is_mobile=True, has_touch=True)
    page.problems = []
    page.on("pageerror", lambda error: page.problems.append(f"page error: {error}"))
    page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
    page.on("dialog", lambda d: (page.problems.append(f"dialog: {d.message}"), d.dismiss()))
    yield page
    page.close()


def start_permission_hook(repo, agent_id, tool_name, tool_input, timeout=30, **request):
    """orchestra's PermissionRequest hook as Claude Code runs it, given one tool call on stdin."""
    hook = subprocess.Popen(
        [sys.executable, str(ROOT / "orchestra.py"), "hook", "permission-request", "--repo", str(repo),
         "--agent", agent_id, "--timeout", str(timeout)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    hook.stdin.write(json.dumps({"tool_name": tool_name, "tool_input": tool_input, **request}))
    hook.stdin.close()
    return hook


def hook_decision(hook):
    """The decision a permission hook printed (it must exit 0)."""
    output = hook.stdout.read()
    assert hook.wait(timeout=30) == 0
    return json.loads(output)["hookSpecificOutput"]["decision"]
