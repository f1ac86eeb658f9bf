"""Configuration: layers, sources, and clear errors for unknown keys and wrong types."""

import json

import pytest

from conftest import write_config


def test_defaults_and_their_source(repo, cli):
    doc = cli("config", "--json").json()
    assert doc["default_parallel"] == {"value": 3, "source": "default"}
    assert doc["max_parallel"] == {"value": 8, "source": "default"}
    assert doc["worktree_dir"] == {"value": ".worktrees", "source": "default"}
    assert doc["agent_command"] == {"value": ["claude"], "source": "default"}


def test_layers_user_project_flag(repo, cli, tmp_path, monkeypatch):
    user = tmp_path / "user.json"
    user.write_text(json.dumps({"default_parallel": 5, "model": "sonnet", "setup": ["make deps"]}))
    monkeypatch.setenv("ORCHESTRA_CONFIG", str(user))
    write_config(repo, default_parallel=2)
    doc = cli("-c", "model=opus", "config", "--json").json()
    assert doc["default_parallel"] == {
        "value": 2,
        "source": str(repo / ".orchestra" / "config.json"),
    }
    assert doc["setup"] == {"value": ["make deps"], "source": str(user)}
    assert doc["model"] == {"value": "opus", "source": "flag"}


def test_xdg_config_home_is_honoured(repo, cli, tmp_path, monkeypatch):
    monkeypatch.delenv("ORCHESTRA_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = tmp_path / "xdg" / "claude-orchestra" / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"branch_prefix": "agents"}')
    assert cli("config", "--json").json()["branch_prefix"] == {
        "value": "agents",
        "source": str(path),
    }


def test_table_output(repo, cli):
    lines = cli("config").out.splitlines()
    assert lines[0].split() == ["KEY", "SOURCE", "VALUE"]
    assert lines[1].split() == ["default_parallel", "default", "3"]


def test_config_works_outside_a_repository(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    assert cli("config", "--json").json()["max_parallel"]["value"] == 8


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            {"colour": "blue"},
            "config.json: unknown key 'colour'; known keys: default_parallel, max_parallel",
        ),
        (
            {"default_parallel": "3"},
            "config.json: 'default_parallel' must be an integer, not \"3\"",
        ),
        ({"default_parallel": True}, "'default_parallel' must be an integer, not true"),
        ({"stale_threshold": "soon"}, "'stale_threshold' must be a number, not \"soon\""),
        ({"setup": "npm ci"}, "'setup' must be a list of strings, not \"npm ci\""),
        ({"bypass_permissions": [1]}, "'bypass_permissions' must be a list of strings, not [1]"),
        ({"model": 4}, "'model' must be a string or null, not 4"),
        ({"worktree_dir": ""}, "'worktree_dir' must be a string, not \"\""),
        ({"default_parallel": 0}, "'default_parallel' must be at least 1"),
        ({"agent_command": []}, "'agent_command' must not be empty"),
        ([1, 2], "config.json: must hold a JSON object of settings"),
    ],
)
def test_bad_project_config(repo, cli, content, expected):
    write_config(repo)
    (repo / ".orchestra" / "config.json").write_text(json.dumps(content))
    run = cli("config")
    assert run.code == 2
    assert run.err.startswith(f"orchestra: error: {repo}/.orchestra/")
    assert expected in run.err and run.err.count("\n") == 1


def test_bad_user_config_names_the_user_file(repo, cli, tmp_path, monkeypatch):
    user = tmp_path / "mine.json"
    user.write_text("{not json")
    monkeypatch.setenv("ORCHESTRA_CONFIG", str(user))
    run = cli("status")
    assert run.code == 2
    assert run.err.startswith(f"orchestra: error: {user}: not valid JSON (")


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("branch_prefix", "bad..prefix", "cannot start a git branch name"),
        ("branch_prefix", "a b", "cannot start a git branch name"),
        ("branch_prefix", "x/", "cannot start a git branch name"),
        ("branch_prefix", "-x", "cannot start a git branch name"),
        ("branch_prefix", "refs/heads/x", "cannot start a git branch name"),
        ("branch_prefix", "x.lock", "cannot start a git branch name"),
        ("heartbeat_interval", -1, "'heartbeat_interval' must be more than 0 seconds"),
        ("stale_threshold", 0, "'stale_threshold' must be more than 0 seconds"),
        ("worktree_dir", ".git/wt", "would put worktrees inside .git"),
        ("worktree_dir", "/", "would put worktrees inside .git, the root folder"),
    ],
)
def test_values_git_or_the_supervisor_cannot_use_are_refused_up_front(repo, cli, key, value, says):
    write_config(repo, **{key: value})
    run = cli("spawn", "a task")
    assert run.code == 2 and run.out == ""
    assert (
        run.err.startswith(f"orchestra: error: {repo / '.orchestra' / 'config.json'}: '{key}'")
        and says in run.err
    )
    assert not (repo / ".worktrees").exists()


def test_config_set_refuses_an_infinite_number(repo, cli):
    run = cli("config", "set", "heartbeat_interval", "1e400")
    assert run.code == 2 and "'heartbeat_interval' must be a number, not Infinity" in run.err
    config = repo / ".orchestra" / "config.json"
    assert not config.exists() or "Infinity" not in config.read_text()


def test_an_absolute_worktree_dir_is_fine(repo, cli, tmp_path):
    write_config(repo, worktree_dir=str(tmp_path / "trees"))
    assert cli("config", "--json").json()["worktree_dir"]["value"] == str(tmp_path / "trees")
