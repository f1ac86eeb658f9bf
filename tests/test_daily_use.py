"""Daily use: every Claude Code a user may have, output you can read, commands that do what they say."""

import os
import subprocess
from pathlib import Path

import pytest

import orchestra
from conftest import agent_states

OLD_CLAUDE = "2.1.301"  # the newest release whose PermissionRequest hook never fires in -p mode
OLD_CLAUDE_PREFIX = Path(
    os.environ.get("ORCHESTRA_OLD_CLAUDE_PREFIX")
    or Path.home() / ".cache" / "claude-orchestra-tests" / f"claude-code-{OLD_CLAUDE}"
)


@pytest.fixture(scope="session")
def old_claude():
    """The real Claude Code 2.1.301 from the npm registry, in a prefix of its own (.ci/run installs it)."""
    binary = OLD_CLAUDE_PREFIX / "node_modules" / ".bin" / "claude"
    if not binary.exists():
        subprocess.run(["npm", "install", "--silent", "--no-fund", "--no-audit", "--prefix",
                        str(OLD_CLAUDE_PREFIX), f"@anthropic-ai/claude-code@{OLD_CLAUDE}"],
                       check=True, timeout=600)  # fmt: skip
    return binary


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    """Put a program on PATH as `claude`, in front of the pinned one."""

    def put(binary):
        folder = tmp_path / "claude-bin"
        folder.mkdir(exist_ok=True)
        (folder / "claude").unlink(missing_ok=True)
        (folder / "claude").symlink_to(binary)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")

    return put


NEEDED = (
    f"Claude Code {OLD_CLAUDE} is too old: orchestra needs 2.1.302 or newer (older ones never ask "
    "for approvals in -p mode); update it with "
    "'npm install -g @anthropic-ai/claude-code@2.1.331'"
)


def test_an_older_claude_is_refused_by_doctor_init_and_spawn(repo, cli, old_claude, on_path):
    on_path(old_claude)
    doctor = cli("doctor")
    assert doctor.code == 1
    assert f"MISSING  claude        {NEEDED}" in doctor.out.splitlines()
    init = cli("init")
    assert (init.code, init.out, init.err) == (2, "", f"orchestra: error: {NEEDED}\n")
    spawn = cli("spawn", "add a changelog")
    assert (spawn.code, spawn.out, spawn.err) == (2, "", f"orchestra: error: {NEEDED}\n")
    assert agent_states(repo) == {}


def test_the_pinned_claude_passes_the_gate(repo, cli):
    pinned = subprocess.run(["claude", "--version"], capture_output=True, text=True).stdout
    assert pinned.startswith(orchestra.CLAUDE_PINNED_VERSION + " ")
    doctor = cli("doctor", "--json")
    claude = next(c for c in doctor.json()["checks"] if c["name"] == "claude")
    assert claude == {"name": "claude", "ok": True, "detail": pinned.strip()}
    assert cli("init").code == 0


def test_another_agent_cli_is_not_asked_its_claude_version(repo, cli, old_claude, on_path):
    on_path(old_claude)
    cli("config", "set", "agent_command", '["claude", "-p", "{task}"]')
    assert cli("init").code == 0  # a {task} placeholder: not launched as Claude Code
