"""More than one machine: hosts in the config, `orchestra hosts`, `doctor --host`, and agents
run on other hosts over real ssh (tests/ssh_hosts.py makes the hosts) with the real claude CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from ssh_hosts import IS_ROOT, SshRig

import orchestra
from conftest import (
    CLAUDE_TOOLS,
    FAKE_AGENT_COMMAND,
    ROOT,
    commit_file,
    git,
    load_state,
    take_time,
    wait_for,
    write_config,
)
from scripted_api import ScriptedAPI, bash, claude_env, error, requires_claude, text

needs_root = pytest.mark.skipif(not IS_ROOT, reason="making host accounts and sshd needs root")


# --- the setting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hosts, message",
    [
        ([], "'hosts' must be an object of hosts"),
        ({"local": {"ssh": "x"}}, 'host name "local" is not allowed'),
        ({"a b": {"ssh": "x"}}, 'host name "a b" is not allowed'),
        ({"h1": {}}, "host 'h1' must be an object with at least \"ssh\""),
        ({"h1": "me@box"}, "host 'h1' must be an object"),
        ({"h1": {"ssh": "x", "port": 22}}, "host 'h1' has unknown key 'port'"),
        ({"h1": {"ssh": "x", "max_parallel": "4"}}, "'max_parallel' must be an integer"),
        ({"h1": {"ssh": "x", "max_parallel": 0}}, "'max_parallel' must be at least 1"),
        ({"h1": {"ssh": "-oProxyCommand=evil"}}, "is not an ssh target"),
        ({"h1": {"ssh": "x", "ssh_options": "-v"}}, "'ssh_options' must be a list of strings"),
        ({"h1": {"ssh": "x", "env": ["OK", "NOT OK"]}}, "'env' lists \"NOT OK\""),
        (
            {"h1": {"ssh": "x", "workdir": "~other/x"}},
            "'workdir' must be absolute or start with '~/'",
        ),
    ],
)
def test_a_wrong_hosts_setting_is_one_clear_line(repo, cli, hosts, message):
    write_config(repo, hosts=hosts)
    run = cli("status")
    assert run.code == 2
    assert run.err.startswith("orchestra: error: ") and message in run.err
    assert run.err.count("\n") == 1 and "Traceback" not in run.err


def test_placement_must_be_known_and_spawn_host_must_exist(repo, cli):
    write_config(repo, placement="random")
    run = cli("status")
    assert run.code == 2 and "'placement' must be one of local-first, spread" in run.err
    write_config(repo, hosts={"h1": {"ssh": "me@box"}})
    run = cli("spawn", "--host", "h9", "a task")
    assert run.code == 2
    assert "unknown host 'h9'; known hosts: local, h1" in run.err


def test_placement_local_first_and_spread():
    config = {"hosts": {"a": {"ssh": "x", "max_parallel": 2}, "b": {"ssh": "y"}},
              "default_parallel": 3, "max_parallel": 8, "placement": "local-first"}  # fmt: skip
    place = orchestra.place_agent
    assert place(config, {"local": 1, "a": 2, "b": 3}) == "local"
    assert place(config, {"local": 0, "a": 2, "b": 3}) == "a"
    assert place(config, {"local": 0, "a": 0, "b": 0}) is None
    assert place(config, {"local": 1, "a": 2, "b": 3}, "b") == "b"
    assert place(config, {"local": 1, "a": 2, "b": 0}, "b") is None
    config["placement"] = "spread"
    assert place(config, {"local": 1, "a": 2, "b": 3}) == "b"
    assert place(config, {"local": 3, "a": 2, "b": 3}) == "local"


def queued(n, batch="b1", host=None):
    """A queued record, ready to start, the n-th spawned."""
    return {"id": f"a{n}", "seq": n, "state": "queued", "ready": True, "batch": batch, "host": host}


def running_on(n, host):
    """A record running on a host."""
    return {"id": f"r{n}", "seq": n, "state": "running", "host": host, "host_launched": True}


def test_hosts_queue_agents_ahead_their_share_of_the_queue_and_never_a_budgets():
    config = {"hosts": {"a": {"ssh": "x", "max_parallel": 2}, "b": {"ssh": "y", "max_parallel": 2}},
              "default_parallel": 1, "max_parallel": 1, "placement": "local-first"}  # fmt: skip
    place = orchestra.placements

    def hosts_of(agents, local_free=1, batches=None):
        state = {"agents": {r["id"]: r for r in agents}, "batches": batches or {}}
        return [host for _, host in place(config, state, local_free)]

    # twenty waiting, five slots: the slots fill, then each host queues as many again, evenly
    fill = ["local", "a", "a", "b", "b"]
    assert hosts_of([queued(n) for n in range(20)]) == [*fill, "a", "b", "a", "b"]
    # ten waiting: five fill the slots, and of the five left each host queues its share (2/5)
    assert hosts_of([queued(n) for n in range(10)]) == [*fill, "a", "b", "a", "b"]
    # every slot taken and three waiting for five slots: a host queues its share, 3 x 2/5 = 1;
    # the third waits at home for this machine's slot, or the first free one
    busy = [running_on(n, h) for n, h in enumerate(["local", "a", "a", "b", "b"])]
    assert hosts_of(busy + [queued(n) for n in range(10, 13)], local_free=0) == ["a", "b"]
    # two more already queued on a: it has its share of what is left, b takes one
    queued_on_a = [running_on(n, "a") for n in (5, 6)]
    assert hosts_of(busy + queued_on_a + [queued(n) for n in range(10, 12)], 0) == ["b"]
    # a long queue, but its batch has a budget: home checks it before each start
    budget = {"b1": {"budget": 5.0}}
    assert hosts_of(busy + [queued(n) for n in range(10, 20)], 0, budget) == []
    assert hosts_of(busy + [queued(n) for n in range(10, 20)], 0) == ["a", "b", "a", "b"]
    # an agent pinned to a host queues ahead there only
    assert hosts_of(busy + [queued(n, host="b") for n in range(10, 20)], 0) == ["b", "b"]


def test_a_host_starts_every_agent_home_sent_at_once_but_one_it_refuses(fake_repo):
    base = git("rev-parse", "HEAD", cwd=fake_repo).strip()
    config = {"agent_command": FAKE_AGENT_COMMAND, "max_parallel": 2, "default_parallel": 2}

    def sent(agent_id, task):
        return {"id": agent_id, "task": task, "base": base, "config": config, "env": {}}

    asked = [sent("one", "sleep:2 first"), sent("bad", "ring \a the bell"), sent("two", "second")]
    answers = orchestra.host_action_spawn({"repo": str(fake_repo), "agents": asked})["agents"]
    assert answers["one"]["record"]["task"] == "sleep:2 first"
    assert answers["two"]["record"]["task"] == "second"
    assert "control character" in answers["bad"]["error"]
    # asked again (a launch whose answer was lost): nothing new, the same agents
    again = orchestra.host_action_spawn({"repo": str(fake_repo), "agents": asked[:1]})["agents"]
    assert again["one"]["record"]["id"] == "one"
    assert sorted(load_state(fake_repo)["agents"]) == ["one", "two"]
    # the two that can run at once had their worktrees made by the call itself
    assert all(os.path.isdir(r["worktree"]) for r in load_state(fake_repo)["agents"].values())


class LaunchSession:
    """A host session that records each spawn call and starts whatever it is sent."""

    def __init__(self):
        self.spawned = []

    def call(self, action, payload):
        self.spawned.append([a["id"] for a in payload["agents"]])
        return {"agents": {a["id"]: {"record": {"id": a["id"]}} for a in payload["agents"]}}


class LaunchedAgent:
    """Just what HostLauncher asks of a RemoteAgent; `trouble` is what preparing it raises."""

    def __init__(self, n, trouble=None):
        self.record, self.remote_repo, self.trouble = {"id": f"a{n}", "seq": n}, "repo", trouble

    def prepare_host(self):
        if self.trouble:
            raise self.trouble

    def spawn_request(self, env):
        return {"id": self.record["id"]}


def test_launches_on_a_host_out_of_reach_all_fail_and_none_is_kept_for_later():
    session = LaunchSession()
    launcher = orchestra.HostLauncher(session)
    down = orchestra.HostError("host 'h1' is unreachable over ssh")
    with pytest.raises(orchestra.HostError):
        launcher.launch(LaunchedAgent(1, down), {})
    assert launcher.waiting == [] and session.spawned == []
    # the host is back: the next launch starts its agent only, nothing left from before
    assert launcher.launch(LaunchedAgent(2), {}) == {"record": {"id": "a2"}}
    # one agent the host refuses to prepare (its base commit) hears why; the others start
    refused = orchestra.OrchestraError("host 'h1' could not take that base commit")
    launcher.waiting = [(LaunchedAgent(n, refused if n == 4 else None), {}, orchestra.HostTicket())
                        for n in (3, 4, 5)]  # fmt: skip
    tickets = [ticket for *_, ticket in launcher.waiting]
    assert launcher.launch(LaunchedAgent(6), {}) == {"record": {"id": "a6"}}
    assert session.spawned == [["a2"], ["a3", "a5", "a6"]]
    assert [t.answer for t in tickets] == [{"record": {"id": "a3"}}, None, {"record": {"id": "a5"}}]
    assert tickets[1].error is refused

    # the link fails during the spawn call: the host may have started them, so the error says
    # to ask it again (the supervisor does, there only), not to start them anywhere else
    def link_drops(*_):
        raise orchestra.HostError("host 'h1' is unreachable over ssh")

    session.call = link_drops
    with pytest.raises(orchestra.HostUnheard):
        launcher.launch(LaunchedAgent(7), {})


def test_a_supervisor_started_early_waits_for_its_first_agents(fake_repo):
    started = time.monotonic()
    supervisor = subprocess.Popen(
        [sys.executable, str(ROOT / "orchestra.py"), "supervise", "--foreground", "--linger", "3"],
        cwd=fake_repo,
    )
    state = fake_repo / ".orchestra" / "state.json"
    pid = wait_for(lambda: state.exists() and load_state(fake_repo)["supervisor"].get("pid"), 10)
    assert pid == supervisor.pid
    orchestra.spawn_agents(orchestra.Project.open(fake_repo, os.environ), ["arrives later"])
    wait_for(lambda: load_state(fake_repo)["agents"]["arrives-later"]["state"] == "done", 30)
    assert supervisor.wait(30) == 0 and time.monotonic() - started >= 3
    # with nothing to do and no linger it ends at once
    assert (
        subprocess.run(
            [sys.executable, str(ROOT / "orchestra.py"), "supervise", "--foreground"],
            cwd=fake_repo,
            timeout=10,
        ).returncode
        == 0
    )


# --- real hosts -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api():
    """One scripted Messages API for every host and for this machine."""
    with ScriptedAPI() as server:
        yield server


@pytest.fixture(scope="module")
def rig(api, tmp_path_factory):
    """Two ssh hosts, h1 and h2, each its own account, sshd and Claude Code config."""
    if not IS_ROOT:
        pytest.skip("making host accounts and sshd needs root")
    hosts = SshRig(tmp_path_factory.mktemp("rig"), api.url, ["h1", "h2"])
    yield hosts
    hosts.close()


@pytest.fixture
def local_claude(api, tmp_path, monkeypatch):
    """This machine's environment points the real claude CLI at the same scripted API."""
    env = claude_env(api, config_dir=tmp_path / "claude-config")
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return api


@needs_root
def test_hosts_lists_each_host_with_slots_and_reachability(rig, repo, cli):
    hosts = rig.hosts_setting(max_parallel=2)
    hosts["gone"] = {"ssh": "gone", "ssh_options": ["-F", str(rig.ssh_config), "-p", "1"]}
    write_config(repo, hosts=hosts)
    run = cli("hosts", "--json")
    assert run.code == 0, run
    rows = {r["name"]: r for r in run.json()["hosts"]}
    assert list(rows) == ["local", "h1", "h2", "gone"]
    assert rows["h1"]["reachable"] and rows["h2"]["reachable"] and rows["h1"]["slots"] == 2
    assert rows["local"]["slots"] == 3 and rows["h1"]["running"] == []
    assert not rows["gone"]["reachable"]
    run = cli("hosts")
    assert run.code == 1
    lines = run.out.splitlines()
    assert lines[0].split()[:4] == ["HOST", "SLOTS", "RUNNING", "REACHABLE"]
    assert lines[2].split()[:4] == ["h1", "2", "0", "yes"]
    assert "gone" in lines[4] and "NO" in lines[4] and "unreachable" in lines[4]


@needs_root
@requires_claude
def test_doctor_host_checks_ssh_python_git_claude_and_its_login(rig, repo, cli):
    write_config(repo, hosts=rig.hosts_setting())
    run = cli("doctor", "--host", "h1", "--json")
    assert run.code == 0, run
    checks = {c["name"]: c for c in run.json()["checks"]}
    for name in ("ssh", "python", "disk", "git", "claude", "claude login"):
        assert checks[name]["ok"], checks
    assert checks["python"]["detail"].startswith("python3 3.")
    assert "logged in (api_key" in checks["claude login"]["detail"]
    installed = list((rig.hosts["h1"].home / ".orchestra-hosts" / "bin").glob("*/orchestra.py"))
    assert len(installed) == 1 and oct(installed[0].stat().st_mode & 0o777) == "0o600"
    assert installed[0].stat().st_uid == rig.hosts["h1"].entry.pw_uid
    run = cli("doctor", "--host", "h1")
    assert run.code == 0 and run.out.splitlines()[0].split()[:2] == ["ok", "ssh"]


@needs_root
def test_doctor_host_says_what_to_install(rig, repo, cli):
    hosts = rig.hosts_setting()
    hosts["h1"]["python"] = "python2.2"
    write_config(repo, hosts=hosts)
    run = cli("doctor", "--host", "h1")
    assert run.code == 1
    assert "has no 'python2.2'; install Python 3.9 or newer there" in run.out
    hosts["h1"]["ssh_options"] += ["-p", "1"]
    write_config(repo, hosts=hosts)
    run = cli("doctor", "--host", "h1")
    assert run.code == 1 and "MISSING  ssh" in run.out and "unreachable over ssh" in run.out
    assert cli("doctor", "--host", "nope").err.startswith("orchestra: error: unknown host 'nope'")


def remote_repo(rig, name, repo):
    """The host's copy of the test repository."""
    return rig.hosts[name].home / orchestra.Host("x", {"ssh": "x"}).repo_path(repo)


def load_agent(repo, agent_id):
    """An agent's record in state.json."""
    return load_state(repo)["agents"][agent_id]


def log_lines(repo, agent_id):
    """The local log's lines, parsed."""
    text = (repo / ".orchestra" / "logs" / f"{agent_id}.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


@needs_root
@requires_claude
def test_an_agent_pinned_to_a_host_runs_there_and_its_work_comes_home(rig, repo, cli, local_claude):
    local_claude.script("remote-hello", [commit_file("hello.txt", "from afar"), text("Done there")])
    write_config(repo, bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5,
                 hosts=rig.hosts_setting())  # fmt: skip
    run = cli("spawn", "--host", "h1", "--name", "far", "remote-hello: add hello.txt")
    assert run.code == 0, run
    wait_for(lambda: load_agent(repo, "far")["state"] == "done", timeout=120, what="done")
    record = cli("status", "--json").json()["agents"][0]
    assert record["host"] == "h1" and record["result"] == "Done there", record
    assert record["session_id"] and record["cost_usd"] is not None
    assert git("log", "-1", "--format=%s", "orchestra/far", cwd=repo).strip() == "add hello.txt"
    assert (repo / ".worktrees" / "task-far" / "hello.txt").read_text() == "from afar\n"
    header, row = cli("status").out.splitlines()[:2]
    assert header.split()[:3] == ["ID", "STATE", "HOST"] and row.startswith("far ")
    assert row[header.index("HOST") :].split()[0] == "h1", (header, row)  # under its column
    shown = cli("logs", "far").out
    assert "Done there" in shown
    events = log_lines(repo, "far")
    assert [e.get("event") for e in events if e["type"] == "orchestra"].count("spawn") == 1
    results = [e for e in events if e["type"] == "result"]
    assert len(results) == 1  # the agent's lines are there once
    diff = subprocess.run(
        [sys.executable, str(ROOT / "orchestra.py"), "diff", "far", "--stat"],
        cwd=repo, capture_output=True, text=True,
    )  # fmt: skip
    assert diff.returncode == 0 and "hello.txt | 1 +" in diff.stdout, diff
    # it ran there, as the host's own user
    there = remote_repo(rig, "h1", repo)
    assert (there / ".worktrees" / "task-far" / "hello.txt").exists()
    assert (there / ".worktrees" / "task-far").stat().st_uid == rig.hosts["h1"].entry.pw_uid


def agents_by_id(cli):
    """status --json's agents by id."""
    return {a["id"]: a for a in cli("status", "--json").json()["agents"]}


@needs_root
@requires_claude
def test_three_agents_are_placed_across_local_and_two_hosts(rig, repo, cli, local_claude):
    for n in (1, 2, 3):
        local_claude.script(f"place-{n}", [take_time(3), commit_file(f"f{n}.txt", f"n{n}"),
                                           text(f"placed {n}")])  # fmt: skip
    write_config(repo, bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5, max_parallel=1,
                 default_parallel=1, hosts=rig.hosts_setting(max_parallel=1))  # fmt: skip
    run = cli("spawn", "place-1 one", "place-2 two", "place-3 three")
    assert run.code == 0, run

    def all_done():
        agents = agents_by_id(cli)
        return all(a["state"] == "done" for a in agents.values()) and agents

    agents = wait_for(all_done, timeout=180, what="three agents done")
    assert sorted(a["host"] for a in agents.values()) == ["h1", "h2", "local"]
    for n, agent_id in enumerate(["place-1-one", "place-2-two", "place-3-three"], 1):
        branch = f"orchestra/{agent_id}"
        assert git("show", f"{branch}:f{n}.txt", cwd=repo) == f"n{n}\n"
        assert agents[agent_id]["result"] == f"placed {n}"
    # they ran at the same time: one slot each on three machines
    starts = sorted(orchestra.parse_iso(a["started_at"]) for a in agents.values())
    assert starts[-1] - starts[0] < 3


@needs_root
@requires_claude
def test_a_hostile_task_crosses_ssh_as_data(rig, repo, cli, local_claude, tmp_path):
    trap = tmp_path / "pwned"
    task = (f"hostile-one: it's \"quoted\" $(touch {trap}) `touch {trap}` ; touch {trap} & | > < \\ *"
            f"\nline two\t'; touch {trap}; echo '\n--help")  # fmt: skip
    local_claude.script("hostile-one", [text("nothing to do")])
    write_config(repo, bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5,
                 hosts=rig.hosts_setting())  # fmt: skip
    run = cli("spawn", "--host", "h2", "--name", "hostile", task)
    assert run.code == 0, run
    wait_for(lambda: load_agent(repo, "hostile")["state"] == "done", timeout=120, what="done")
    there = orchestra.Project.open(remote_repo(rig, "h2", repo), os.environ)
    assert there.store.load()["agents"]["hostile"]["task"] == task  # arrived byte for byte
    assert not trap.exists()
    assert not list(rig.hosts["h2"].home.glob("pwned*"))
    refused = cli("spawn", "--host", "h2", "a\x00b")  # refused here, as ever
    assert refused.code == 2 and "U+0000" in refused.err


def agent_lines(path):
    """The agent's own lines of a log (orchestra's events left out), in order."""
    lines = path.read_text().splitlines()
    return [line for line in lines if json.loads(line).get("type") != "orchestra"]


@needs_root
@requires_claude
def test_a_dropped_link_loses_and_doubles_no_line(rig, repo, cli, local_claude):
    local_claude.script("linked-one", [bash("echo starting"), take_time(10), commit_file("l.txt", "l"),
                                       text("finished across a dropped link")])  # fmt: skip
    write_config(repo, bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5,
                 hosts=rig.hosts_setting())  # fmt: skip
    assert cli("spawn", "--host", "h1", "--name", "linked", "linked-one: go").code == 0
    log = repo / ".orchestra" / "logs" / "linked.jsonl"
    wait_for(lambda: "starting" in log.read_text(), timeout=60, what="the first line home")
    rig.cut("h1")
    try:
        wait_for(lambda: load_agent(repo, "linked").get("host_unreachable"), timeout=30,
                 what="unreachable")  # fmt: skip
        header, row = cli("status").out.splitlines()[:2]
        assert row.split()[:2] == ["linked", "running"]
        assert row[header.index("HOST") :].split()[0] == "h1", (header, row)
        assert "host unreachable since 20" in row
        assert not cli("hosts", "--json").json()["hosts"][1]["reachable"]
        time.sleep(3)  # the agent goes on working at its host meanwhile
    finally:
        rig.hosts["h1"].start()
    wait_for(lambda: load_agent(repo, "linked")["state"] == "done", timeout=120, what="done")
    record = load_agent(repo, "linked")
    assert record["result"] == "finished across a dropped link" and not record["host_unreachable"]
    there = remote_repo(rig, "h1", repo) / ".orchestra" / "logs" / "linked.jsonl"
    home = agent_lines(log)
    assert home == agent_lines(there) and len(home) == len(set(home))
    assert git("show", "orchestra/linked:l.txt", cwd=repo) == "l\n"


@needs_root
@requires_claude
def test_a_host_whose_supervisor_and_agent_are_killed_gives_interrupted_with_work_home(
    rig, repo, cli, local_claude
):
    local_claude.script("rebooted-one", [commit_file("r.txt", "saved"), bash("echo committed"),
                                         take_time(60), text("never")])  # fmt: skip
    write_config(repo, bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5,
                 hosts=rig.hosts_setting())  # fmt: skip
    assert cli("spawn", "--host", "h2", "--name", "rebooted", "rebooted-one: go").code == 0
    log = repo / ".orchestra" / "logs" / "rebooted.jsonl"
    wait_for(lambda: "echo committed" in log.read_text(), timeout=60, what="the commit")
    diff = subprocess.run(
        [sys.executable, str(ROOT / "orchestra.py"), "diff", "rebooted", "--stat"],
        cwd=repo, capture_output=True, text=True,
    )  # fmt: skip
    assert diff.returncode == 0 and "r.txt | 1 +" in diff.stdout, diff  # fetched while it runs
    state_file = remote_repo(rig, "h2", repo) / ".orchestra" / "state.json"
    state = json.loads(state_file.read_text())
    os.kill(state["supervisor"]["pid"], signal.SIGKILL)  # the host "reboots"
    os.killpg(state["agents"]["rebooted"]["pid"], signal.SIGKILL)
    wait_for(lambda: load_agent(repo, "rebooted")["state"] == "interrupted", timeout=60,
             what="interrupted")  # fmt: skip
    record = load_agent(repo, "rebooted")
    assert record["error"] is None or "fetched" not in record["error"], record
    assert git("show", "orchestra/rebooted:r.txt", cwd=repo) == "saved\n"
    assert (repo / ".worktrees" / "task-rebooted" / "r.txt").exists()


@needs_root
@requires_claude
def test_pause_resume_stop_and_send_reach_a_remote_agent(rig, repo, cli, local_claude):
    local_claude.script("steered-one", [bash("echo working"), take_time(30), text("never")])
    local_claude.script("and now this", [commit_file("more.txt", "more"), text("did more")])
    write_config(repo, bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5,
                 hosts=rig.hosts_setting())  # fmt: skip
    assert cli("spawn", "--host", "h1", "--name", "steered", "steered-one: go").code == 0
    log = repo / ".orchestra" / "logs" / "steered.jsonl"
    wait_for(lambda: "echo working" in log.read_text(), timeout=60, what="working")
    there = orchestra.Project.open(remote_repo(rig, "h1", repo), os.environ)

    def remote_state():
        return there.store.load()["agents"]["steered"]["state"]

    run = cli("pause", "steered")
    assert run.code == 0 and "paused on host h1" in run.out, run
    assert remote_state() == "paused" and load_agent(repo, "steered")["state"] == "paused"
    assert cli("resume", "steered").code == 0
    assert remote_state() == "running" and load_agent(repo, "steered")["state"] == "running"
    run = cli("stop", "steered")
    assert run.code == 0, run
    wait_for(lambda: remote_state() == "stopped", timeout=30, what="stopped there")
    assert cli("stop", "steered").err.startswith("orchestra: error: steered is already stopped")
    run = cli("send", "steered", "and now this: one more file")
    assert run.code == 0, run
    wait_for(lambda: load_agent(repo, "steered")["state"] == "done", timeout=120, what="done")
    assert load_agent(repo, "steered")["result"] == "did more"
    assert git("show", "orchestra/steered:more.txt", cwd=repo) == "more\n"


@needs_root
@requires_claude
def test_cleanup_of_a_remote_agent_archives_at_home_before_the_host_removes_it(
    rig, repo, cli, local_claude
):
    local_claude.script("tidy-one", [commit_file("kept.txt", "kept"),
                                     bash("echo draft > unsaved.txt"), text("left a draft")])  # fmt: skip
    write_config(repo, bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5,
                 hosts=rig.hosts_setting())  # fmt: skip
    assert cli("spawn", "--host", "h2", "--name", "tidy", "tidy-one: go").code == 0
    wait_for(lambda: load_agent(repo, "tidy")["state"] == "done", timeout=120, what="done")
    there = remote_repo(rig, "h2", repo) / ".worktrees" / "task-tidy"
    assert (there / "unsaved.txt").exists()
    run = cli("cleanup", "tidy")
    assert run.code == 0 and "unsaved.txt" in run.out, run  # kept: its draft is unsaved
    assert (repo / ".worktrees" / "task-tidy" / "unsaved.txt").read_text() == "draft\n"
    assert there.is_dir()
    run = cli("cleanup", "--force", "tidy")
    assert run.code == 0, run
    archives = git("for-each-ref", "--format=%(refname)", "refs/orchestra/archive/tidy", cwd=repo)
    worktree_ref = [r for r in archives.split() if r.endswith("-worktree")]
    assert worktree_ref and git("show", f"{worktree_ref[0]}:unsaved.txt", cwd=repo) == "draft\n"
    tip = [r for r in archives.split() if r[-1].isdigit() or r.endswith("Z")]
    assert git("show", f"{tip[0]}:kept.txt", cwd=repo) == "kept\n"
    assert not there.exists()  # removed on the host only after home archived it
    assert cli("status", "--json", "tidy").json()["agents"][0]["state"] == "removed"


@needs_root
@requires_claude
def test_an_approval_raised_on_a_host_is_answered_at_home(rig, repo, cli, local_claude, tmp_path):
    notes = tmp_path / "notes.txt"
    local_claude.script("ask-first", [bash("printf 'ok\\n' > approved.txt"), bash("git add approved.txt"),
                                      bash("git commit -qm 'add approved.txt'"), text("approved and committed")])  # fmt: skip
    write_config(repo, bypass_permissions=["Bash(git *)"], heartbeat_interval=0.5, sandbox="off",
                 hosts=rig.hosts_setting(),
                 notify_command=["sh", "-c", f'echo "$ORCHESTRA_MESSAGE" >> {notes}'])  # fmt: skip
    assert cli("spawn", "--host", "h1", "--name", "asker", "ask-first: go").code == 0

    def asked():
        return [r for r in cli("approvals", "--json").json()["approvals"] if r["agent"] == "asker"]

    [request] = wait_for(asked, timeout=90, what="the host's request at home")
    assert request["summary"] == "Bash(printf 'ok\\n' > approved.txt)" and request["host"] == "h1"
    status = cli("status", "--json").json()["agents"][0]
    assert status["approval"]["id"] == request["id"]
    wait_for(
        lambda: notes.exists() and "on host h1" in notes.read_text(), timeout=30, what="notify"
    )
    run = cli("approve", request["id"])
    assert run.code == 0 and f"allowed {request['id']}" in run.out, run
    wait_for(lambda: load_agent(repo, "asker")["state"] == "done", timeout=120, what="done")
    assert git("show", "orchestra/asker:approved.txt", cwd=repo) == "ok\n"
    assert asked() == []


@needs_root
def test_a_host_that_cannot_take_an_agent_gets_none_and_the_agent_goes_elsewhere(rig, repo, cli):
    hosts = {"gone": {"ssh": "gone", "ssh_options": ["-F", str(rig.ssh_config), "-p", "1"]},
             **rig.hosts_setting()}  # fmt: skip
    write_config(repo, agent_command=["sh", "-c", "echo '{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\"result\":\"ok\"}'", "{task}"],
                 heartbeat_interval=0.5, default_parallel=1, max_parallel=1, hosts=hosts)  # fmt: skip
    assert cli("spawn", "first here", "second elsewhere", "third elsewhere").code == 0

    def settled():
        agents = agents_by_id(cli)
        return all(a["state"] == "done" for a in agents.values()) and agents

    agents = wait_for(settled, timeout=120, what="all done")
    assert {a["host"] for a in agents.values()} <= {"local", "h1", "h2"}
    assert "gone" not in {a["host"] for a in agents.values()}
    pinned = cli("spawn", "--host", "gone", "pinned to a lost host")
    assert pinned.code == 0
    wait_for(lambda: "waiting for a host: host 'gone' is unreachable" in (
        load_agent(repo, "pinned-lost-host").get("activity") or ""), timeout=60, what="why")  # fmt: skip
    assert load_agent(repo, "pinned-lost-host")["state"] == "queued"
    assert cli("stop", "pinned-lost-host").code == 0


@needs_root
@requires_claude
def test_state_rebuilt_from_logs_knows_remote_agents_and_follows_them_again(
    rig, repo, cli, local_claude
):
    local_claude.script("rebuilt-one", [bash("echo begun"), take_time(8), text("rebuilt and done")])
    write_config(repo, bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5,
                 hosts=rig.hosts_setting())  # fmt: skip
    assert cli("spawn", "--host", "h2", "--name", "rebuilt", "rebuilt-one: go").code == 0
    log = repo / ".orchestra" / "logs" / "rebuilt.jsonl"
    wait_for(lambda: "echo begun" in log.read_text(), timeout=60, what="begun")
    os.kill(load_state(repo)["supervisor"]["pid"], signal.SIGKILL)
    (repo / ".orchestra" / "state.json").write_text("{not json")
    record = cli("status", "--json").json()["agents"][0]  # rebuilt, and a supervisor revived
    assert record["host"] == "h2" and record["state"] == "running", record
    wait_for(lambda: load_agent(repo, "rebuilt")["state"] == "done", timeout=120, what="done")
    assert load_agent(repo, "rebuilt")["result"] == "rebuilt and done"
    there = remote_repo(rig, "h2", repo) / ".orchestra" / "logs" / "rebuilt.jsonl"
    assert agent_lines(log) == agent_lines(there)


RESULT_LINE = '{"type":"result","subtype":"success","is_error":false,"result":"ok"}'


@needs_root
def test_checks_run_on_the_host_and_their_result_comes_home(rig, repo, cli):
    agent = ["sh", "-c", f"echo made > made.txt; echo '{RESULT_LINE}'", "{task}"]
    user = rig.hosts["h1"].user
    write_config(repo, agent_command=agent, heartbeat_interval=0.5, hosts=rig.hosts_setting(),
                 checks=[f"sleep 3; test -f made.txt && test \"$(id -un)\" = {user}"])  # fmt: skip
    assert cli("spawn", "--host", "h1", "--name", "checked", "make a file").code == 0
    wait_for(lambda: load_agent(repo, "checked")["state"] == "done"
             and (load_agent(repo, "checked").get("checks") or {}).get("status") == "passed",
             timeout=120, what="checks passed")  # fmt: skip
    assert "done ✓" in cli("status").out


@needs_root
def test_a_tasks_file_pins_each_task_to_its_host(rig, repo, cli):
    agent = ["sh", "-c", f"echo made > made.txt; echo '{RESULT_LINE}'", "{task}"]
    write_config(repo, agent_command=agent, heartbeat_interval=0.5, hosts=rig.hosts_setting())
    plan = repo.parent / "plan.json"
    plan.write_text(json.dumps([{"id": "here", "task": "a", "host": "local"},
                                {"id": "there", "task": "b", "host": "h2"}]))  # fmt: skip
    assert cli("spawn", "--file", str(plan)).code == 0
    wait_for(lambda: all(load_agent(repo, i)["state"] == "done" for i in ("here", "there")),
             timeout=120, what="both done")  # fmt: skip
    agents = agents_by_id(cli)
    assert agents["here"]["host"] == "local" and agents["there"]["host"] == "h2"
    assert (remote_repo(rig, "h2", repo) / ".worktrees" / "task-there" / "made.txt").exists()
    assert not (remote_repo(rig, "h2", repo) / ".worktrees" / "task-here").exists()


@needs_root
@requires_claude
def test_a_remote_agent_gets_its_land_fix_round_on_its_host(rig, repo, cli, local_claude):
    write_config(repo, bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5, sandbox="off",
                 hosts=rig.hosts_setting(), fix_rounds=1)  # fmt: skip
    local_claude.script("far-notes", [bash("echo far > notes.txt && git add notes.txt && "
                                           "git commit -qm 'far notes'"), text("Wrote")])  # fmt: skip
    assert cli("spawn", "--host", "h1", "--name", "far", "far-notes: write notes").code == 0
    wait_for(lambda: load_agent(repo, "far")["state"] == "done", timeout=120, what="done")
    (repo / "notes.txt").write_text("home\n")
    git("add", "notes.txt", cwd=repo)
    git("commit", "-qm", "home notes", cwd=repo)
    target = git("rev-parse", "main", cwd=repo).strip()
    local_claude.script("conflicts in notes.txt", [  # the commit exists on the host: land pushed it
        bash(f"git merge -q {target}; printf 'home\\nfar\\n' > notes.txt && git add notes.txt && "
             "git commit -qm resolve"), text("Resolved")])  # fmt: skip
    run = cli("land", "far")
    assert run.code == 0, run
    assert "far: conflicts with main in notes.txt; sent back for fix round 1" in run.out
    assert "far: landed on main" in run.out
    assert (repo / "notes.txt").read_text() == "home\nfar\n"
    assert git("status", "--porcelain", "--untracked-files=no", cwd=repo) == ""
    there = orchestra.Project.open(remote_repo(rig, "h1", repo), os.environ)
    assert there.store.load()["agents"]["far"]["state"] == "done"  # the round ran on its host


@needs_root
def test_land_fetches_a_remote_agents_latest_commits_first(rig, repo, cli):
    agent = ["sh", "-c", "echo made > made.txt && git add made.txt && git commit -qm made; "
             f"echo '{RESULT_LINE}'", "{task}"]  # fmt: skip
    write_config(repo, agent_command=agent, heartbeat_interval=0.5, hosts=rig.hosts_setting())
    assert cli("spawn", "--host", "h1", "--name", "late", "make a file").code == 0
    wait_for(lambda: load_agent(repo, "late")["state"] == "done", timeout=120, what="done")
    there = remote_repo(rig, "h1", repo) / ".worktrees" / "task-late"
    user = rig.hosts["h1"].entry.pw_name  # a commit made there after the agent came home
    subprocess.run(["runuser", "-u", user, "--", "sh", "-c", "echo later > later.txt && "
                    "git add later.txt && git commit -qm later"], cwd=there, check=True)  # fmt: skip
    run = cli("land", "late")
    assert run.code == 0 and "late: landed on main" in run.out, run
    assert (repo / "made.txt").exists() and (repo / "later.txt").read_text() == "later\n"


@needs_root
def test_the_dashboard_says_which_host_runs_an_agent(rig, repo, cli, phone):
    from playwright.sync_api import expect
    from test_dashboard import serve

    agent = ["sh", "-c", f"echo '{RESULT_LINE}'", "{task}"]
    write_config(repo, agent_command=agent, heartbeat_interval=0.5, hosts=rig.hosts_setting())
    assert cli("spawn", "--host", "h2", "--name", "afar", "far away").code == 0
    assert cli("spawn", "--host", "local", "--name", "near", "close by").code == 0
    wait_for(lambda: {load_agent(repo, i)["state"] for i in ("afar", "near")} == {"done"},
             timeout=120, what="both done")  # fmt: skip
    server = serve(repo)
    try:
        phone.goto(server.url)
        facts = phone.locator('.card[data-id="afar"] .facts')
        expect(facts).to_contain_text("on h2 · orchestra/afar")
        expect(phone.locator('.card[data-id="near"] .facts')).not_to_contain_text("on ")
    finally:
        server.stop()


@needs_root
def test_a_full_disk_on_a_host_is_a_clear_error_not_a_hang(rig, repo, cli):
    host = rig.hosts["h1"]
    disk = host.home / "tiny-disk"
    disk.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(disk)], check=True
    )
    try:
        os.chown(disk, host.entry.pw_uid, host.entry.pw_gid)
        hosts = rig.hosts_setting()
        hosts["h1"]["workdir"] = str(disk / "work")
        agent = ["sh", "-c", f"echo '{RESULT_LINE}'", "{task}"]
        write_config(repo, agent_command=agent, heartbeat_interval=0.5, hosts=hosts)
        run = cli("doctor", "--host", "h1")
        assert run.code == 1 and "free some space on the host" in run.out, run
        run = cli("spawn", "--host", "h1", "--name", "crammed", "no room")
        assert run.code == 0, run
        wait_for(lambda: "No space left on device" in (load_agent(repo, "crammed").get("activity") or ""),
                 timeout=60, what="the reason")  # fmt: skip
        record = load_agent(repo, "crammed")
        assert record["state"] == "queued" and "is its disk full?" in record["activity"]
        assert cli("stop", "crammed").code == 0
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@needs_root
@requires_claude
def test_logs_follow_a_remote_agent_and_its_files_there_are_private(rig, repo, local_claude):
    local_claude.script("followed-one", [bash("echo first step"), take_time(4),
                                         text("the last word from afar")])  # fmt: skip
    write_config(repo, bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5,
                 hosts=rig.hosts_setting())  # fmt: skip
    orchestra_py = [sys.executable, str(ROOT / "orchestra.py")]
    spawn = [*orchestra_py, "spawn", "--host", "h1", "--name", "followed", "followed-one: go"]
    subprocess.run(spawn, cwd=repo, check=True, capture_output=True)
    follow = subprocess.run([*orchestra_py, "logs", "-f", "followed"], cwd=repo,
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert follow.returncode == 0, follow
    out = follow.stdout
    assert "echo first step" in out and "the last word from afar" in out
    assert out.index("echo first step") < out.index("the last word from afar")
    assert load_agent(repo, "followed")["state"] == "done"  # logs -f ended when the agent did
    home = rig.hosts["h1"].home
    there = remote_repo(rig, "h1", repo)
    for folder in (home / ".orchestra-hosts", home / ".orchestra-hosts" / "repos", there,
                   there / ".orchestra", there / ".orchestra" / "logs"):  # fmt: skip
        assert oct(folder.stat().st_mode & 0o777) == "0o700", folder
        assert folder.stat().st_uid == rig.hosts["h1"].entry.pw_uid
    for path in (there / ".orchestra" / "state.json", there / ".orchestra" / "config.json",
                 there / ".orchestra" / "logs" / "followed.jsonl"):  # fmt: skip
        assert oct(path.stat().st_mode & 0o777) == "0o600", path
    assert "sk-ant" not in (there / ".orchestra" / "state.json").read_text()


@needs_root
def test_only_variables_named_in_env_reach_a_host_and_no_state_file_keeps_them(
    rig, repo, cli, monkeypatch
):
    monkeypatch.setenv("ORCH_SECRET", "s3cr3t-value")
    monkeypatch.setenv("ORCH_OTHER", "not-for-hosts")
    script = ('echo "${ORCH_SECRET:-unset}/${ORCH_OTHER:-unset}" > env.txt && git add env.txt && '
              f"git commit -qm env && echo '{RESULT_LINE}'")  # fmt: skip
    write_config(repo, agent_command=["sh", "-c", script, "{task}"], heartbeat_interval=0.5,
                 hosts=rig.hosts_setting(env=["ORCH_SECRET"]))  # fmt: skip
    assert cli("spawn", "--host", "h2", "--name", "envy", "show the environment").code == 0
    wait_for(lambda: load_agent(repo, "envy")["state"] == "done", timeout=120, what="done")
    assert git("show", "orchestra/envy:env.txt", cwd=repo) == "s3cr3t-value/unset\n"
    there = remote_repo(rig, "h2", repo) / ".orchestra"
    for path in there.rglob("*"):
        if path.is_file():
            assert b"s3cr3t-value" not in path.read_bytes(), path


# --- the fleet shares one account: budgets and rate limits ------------------------------------

FAKE_AGENT = """
case "$1" in
  *spend*) echo '{"type":"result","subtype":"success","is_error":false,"result":"spent","total_cost_usd":2.5,"num_turns":1}' ;;
  *limited*)
    echo "{\\"type\\":\\"rate_limit_event\\",\\"rate_limit_info\\":{\\"status\\":\\"rejected\\",\\"resetsAt\\":$(( $(date +%s) + $RESET_IN ))}}"
    echo '{"type":"result","subtype":"success","is_error":true,"api_error_status":429,"result":"API Error: 429 rate limit exceeded","num_turns":1}'
    exit 1 ;;
  *) echo '{"type":"assistant","message":{"content":[{"type":"text","text":"working"}]}}'
     sleep "${WORK_FOR:-0}"
     echo '{"type":"result","subtype":"success","is_error":false,"result":"ok","num_turns":1}' ;;
esac
"""


def fake_agent(**env):
    """The fake agent (its behaviour chosen by words in the task), with `env` set for it."""
    assignments = " ".join(f"{k}={v}" for k, v in env.items())
    return ["sh", "-c", f"export {assignments}; {FAKE_AGENT}" if env else FAKE_AGENT, "sh",
            "{task}"]  # fmt: skip


def host_state(rig, name, repo):
    """The host's own state.json of the test repository's copy."""
    return json.loads((remote_repo(rig, name, repo) / ".orchestra" / "state.json").read_text())


@needs_root
def test_a_budget_counts_what_remote_agents_cost_and_stops_them_on_their_host(rig, repo, cli):
    write_config(repo, agent_command=fake_agent(WORK_FOR=60), heartbeat_interval=0.5,
                 hosts=rig.hosts_setting(max_parallel=2))  # fmt: skip
    run = cli("spawn", "--host", "h1", "--budget", "1", "keep working", "then spend", "never runs")
    assert run.code == 0, run
    ids = ["keep-working", "then-spend", "never-runs"]

    def stopped():
        agents = agents_by_id(cli)
        return all(agents[i]["state"] in orchestra.FINISHED_STATES for i in ids) and agents

    agents = wait_for(stopped, timeout=90, what="the budget enforced")
    assert agents["then-spend"]["state"] == "done" and agents["then-spend"]["cost_usd"] == 2.5
    for agent_id in ("keep-working", "never-runs"):
        assert agents[agent_id]["state"] == "stopped", agents[agent_id]
        assert agents[agent_id]["stop_reason"] == "budget"
    status = cli("status", "--json").json()
    [batch] = status["batches"].values()
    assert batch["spent"] == 2.5 and batch["budget"] == 1
    # on the host too: the working agent was ended there, the last one never ran there
    wait_for(lambda: host_state(rig, "h1", repo)["agents"]["keep-working"]["state"] == "stopped",
             timeout=30, what="stopped on the host")  # fmt: skip
    there = host_state(rig, "h1", repo)["agents"]
    assert "never-runs" not in there or there["never-runs"]["state"] == "stopped"
    assert not there.get("never-runs", {}).get("started_at")


@needs_root
def test_a_rate_limit_on_one_host_holds_new_starts_on_every_machine(rig, repo, cli):
    write_config(repo, agent_command=fake_agent(RESET_IN=15), heartbeat_interval=0.5,
                 api_retries=1, hosts=rig.hosts_setting())  # fmt: skip
    assert cli("spawn", "--host", "h1", "--name", "limited", "limited one").code == 0
    until = wait_for(lambda: cli("status", "--json").json()["rate_limited_until"], timeout=60,
                     what="the fleet-wide hold")  # fmt: skip
    reset = orchestra.parse_iso(until)
    assert reset > time.time() + 3, until
    record = load_agent(repo, "limited")
    assert record["waiting"]["reason"] == "rate_limit" and "on host h1" in record["activity"]
    assert cli("spawn", "--host", "local", "--name", "near", "held here").code == 0
    assert cli("spawn", "--host", "h2", "--name", "far", "held afar").code == 0
    assert "Rate-limited until" in cli("status").out
    wait_for(lambda: host_state(rig, "h1", repo).get("hold_until") == until, timeout=30,
             what="the hold sent to the host")  # fmt: skip
    time.sleep(2)
    assert {load_agent(repo, i)["state"] for i in ("near", "far")} == {"queued"}
    wait_for(lambda: {load_agent(repo, i)["state"] for i in ("near", "far")} == {"done"},
             timeout=90, what="both started after the reset")  # fmt: skip
    for agent_id in ("near", "far"):
        assert orchestra.parse_iso(load_agent(repo, agent_id)["started_at"]) >= reset - 1


@needs_root
def test_the_dashboard_lists_hosts_with_slots_agents_and_reachability(rig, repo, cli, phone):
    from playwright.sync_api import expect
    from test_dashboard import serve

    write_config(repo, agent_command=fake_agent(WORK_FOR=60), heartbeat_interval=0.5,
                 hosts=rig.hosts_setting(max_parallel=2))  # fmt: skip
    assert cli("spawn", "--host", "h1", "--name", "busy", "busy one").code == 0
    assert cli("spawn", "--host", "h2", "--name", "cut-off", "cut off one").code == 0
    wait_for(lambda: all(load_agent(repo, i).get("host_launched") for i in ("busy", "cut-off")),
             timeout=60, what="both launched")  # fmt: skip
    server = serve(repo)
    try:
        phone.goto(server.url)
        h1 = phone.locator('#host-list [data-host="h1"]')
        expect(h1).to_contain_text("1 of 2 slots used, 1 free")
        expect(h1).to_contain_text("running: busy")
        expect(h1.locator(".reach")).to_have_text("reachable")
        expect(phone.locator('#host-list [data-host="local"]')).to_contain_text("nothing running")
        expect(phone.locator("#hosts-summary")).to_have_text("Hosts: 2 of 7 slots used")
        rig.cut("h2")
        h2 = phone.locator('#host-list [data-host="h2"]')
        expect(h2.locator(".reach")).to_contain_text("unreachable since ", timeout=60_000)
        expect(h2).to_have_attribute("data-reachable", "no")
        expect(phone.locator("#hosts")).to_have_attribute("open", "")  # opened: it needs a look
        expect(phone.locator("#hosts-summary")).to_contain_text("1 unreachable")
        box = h2.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390  # fits the phone
        [row] = [h for h in cli("status", "--json").json()["hosts"] if h["name"] == "h2"]
        assert not row["reachable"] and row["unreachable_since"] and row["running"] == ["cut-off"]
    finally:
        server.stop()
        rig.hosts["h2"].start()
        cli("stop", "busy", "cut-off")


NUMBERED_AGENT = (
    "import json, sys, time\n"
    "for n in range(int(sys.argv[1])):\n"
    "    print(json.dumps({'type': 'assistant', 'message': {'content': [{'type': 'text',"
    " 'text': 'line %d' % n}]}}), flush=True)\n"
    "    time.sleep(0.25)\n"
    "print(json.dumps({'type': 'result', 'subtype': 'success', 'is_error': False,"
    " 'result': 'all lines written', 'num_turns': 1}), flush=True)\n"
)


def numbered_lines(path):
    """The numbers of the agent's 'line N' lines in a log, in order."""
    found = []
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event.get("type") == "assistant":
            found.append(int(event["message"]["content"][0]["text"].split()[1]))
    return found


@needs_root
def test_a_stalled_link_leaves_the_agent_running_and_catches_up_without_doubles(rig, repo, cli):
    proxy, h1 = rig.stalling_proxy("h1")
    count = 200  # 50 s of lines: it outlives the stall
    write_config(repo, agent_command=["python3", "-c", NUMBERED_AGENT, str(count), "{task}"],
                 heartbeat_interval=0.5, hosts={"h1": h1})  # fmt: skip
    assert cli("spawn", "--host", "h1", "--name", "stalled", "number the lines").code == 0
    log = repo / ".orchestra" / "logs" / "stalled.jsonl"
    there = remote_repo(rig, "h1", repo) / ".orchestra" / "logs" / "stalled.jsonl"
    try:
        wait_for(lambda: log.exists() and len(numbered_lines(log)) >= 3, timeout=60,
                 what="the first lines home")  # fmt: skip
        proxy.stall()  # packets stop; no connection is closed
        stalled_at = len(numbered_lines(there))
        wait_for(lambda: load_agent(repo, "stalled").get("host_unreachable"), timeout=90,
                 what="unreachable")  # fmt: skip
        row = cli("status").out.splitlines()[1]
        assert row.split()[:2] == ["stalled", "running"] and "host unreachable since 20" in row
        assert len(numbered_lines(there)) > stalled_at + 10  # the agent worked on meanwhile
        home_during = len(numbered_lines(log))
        assert home_during < len(numbered_lines(there))
    finally:
        proxy.resume()
    try:
        wait_for(lambda: load_agent(repo, "stalled")["state"] == "done", timeout=120, what="done")
        record = load_agent(repo, "stalled")
        assert record["result"] == "all lines written" and not record.get("host_unreachable")
        assert numbered_lines(log) == list(range(count))  # none lost, none doubled, in order
        assert agent_lines(log) == agent_lines(there)
    finally:
        proxy.close()


@needs_root
def test_retry_of_an_agent_pinned_to_a_host_runs_it_there_again(rig, repo, cli):
    marker = f".flaky-{time.time_ns()}"  # in the host account's home: the second run succeeds
    script = (f'if [ -e "$HOME/{marker}" ]; then printf ok > ok.txt && git add ok.txt && '
              f"git commit -qm ok && echo '{RESULT_LINE}'; else touch \"$HOME/{marker}\"; "
              """echo '{"type":"result","subtype":"success","is_error":true,"result":"flaked"}'; """
              "exit 1; fi")  # fmt: skip
    write_config(repo, agent_command=["sh", "-c", script, "sh", "{task}"], heartbeat_interval=0.5,
                 hosts=rig.hosts_setting())  # fmt: skip
    assert cli("spawn", "--host", "h2", "--name", "flaky", "flaky once").code == 0
    wait_for(lambda: load_agent(repo, "flaky")["state"] == "failed", timeout=60, what="failed")
    run = cli("retry", "flaky")
    assert run.code == 0 and "retried as flaky-2" in run.out, run
    wait_for(lambda: load_agent(repo, "flaky-2")["state"] == "done", timeout=60, what="done")
    again = cli("status", "--json", "flaky-2").json()["agents"][0]
    assert again["host"] == "h2" and again["result"] == "ok"
    assert git("show", "orchestra/flaky-2:ok.txt", cwd=repo) == "ok"
    (rig.hosts["h2"].home / marker).unlink()  # it was there: the retry ran on h2
    assert load_agent(repo, "flaky")["state"] == "failed"  # the first one is kept as it was


@needs_root
@requires_claude
def test_retry_resume_session_continues_a_remote_session_on_its_host(rig, repo, cli, local_claude):
    local_claude.script("breaks-far", [error(400, "scripted failure")])
    local_claude.script("Continue the task.", [commit_file("resumed.txt", "resumed"),
                                               text("recovered on its host")])  # fmt: skip
    write_config(repo, bypass_permissions=CLAUDE_TOOLS, heartbeat_interval=0.5,
                 hosts=rig.hosts_setting())  # fmt: skip
    assert cli("spawn", "--host", "h1", "--name", "broke", "breaks-far: go").code == 0
    wait_for(lambda: load_agent(repo, "broke")["state"] == "failed", timeout=120, what="failed")
    session = load_agent(repo, "broke")["session_id"]
    assert session
    run = cli("retry", "broke", "--resume-session")
    assert run.code == 0 and "queued to continue its session on host h1" in run.out, run
    wait_for(lambda: load_agent(repo, "broke")["state"] == "done", timeout=120, what="done")
    record = load_agent(repo, "broke")
    assert record["result"] == "recovered on its host" and record["session_id"] == session
    assert record["host"] == "h1"
    assert git("show", "orchestra/broke:resumed.txt", cwd=repo) == "resumed\n"
    there = orchestra.Project.open(remote_repo(rig, "h1", repo), os.environ)
    assert there.store.load()["agents"]["broke"]["session_id"] == session  # the same session there


def host_agent_processes(user):
    """The `orchestra host-agent ACTION` processes a host account runs now: their actions."""
    ps = subprocess.run(["ps", "-ww", "-u", user, "-o", "args="], capture_output=True, text=True)
    return [line.split("host-agent", 1)[1].split()[0] for line in ps.stdout.splitlines()
            if " host-agent " in line]  # fmt: skip


@needs_root
def test_home_follows_a_hosts_agents_through_one_serving_process_not_a_call_each(rig, repo, cli):
    write_config(repo, agent_command=["python3", "-c", NUMBERED_AGENT, "40", "{task}"],
                 heartbeat_interval=0.5, hosts=rig.hosts_setting(max_parallel=3))  # fmt: skip
    assert cli("spawn", "--host", "h1", "one", "two", "three").code == 0
    logs = [repo / ".orchestra" / "logs" / f"{i}.jsonl" for i in ("one", "two", "three")]
    wait_for(lambda: all(p.exists() and len(numbered_lines(p)) >= 2 for p in logs), timeout=60,
             what="all three followed")  # fmt: skip
    seen = set()
    for _ in range(20):  # two seconds of polls: eight rounds, three agents each
        actions = host_agent_processes(rig.hosts["h1"].user)
        assert actions.count("serve") <= 2, actions  # one for polls, one for launches
        seen.update(actions)
        time.sleep(0.1)
    assert seen == {"serve"}, seen  # no `host-agent poll` per agent
    before = [len(numbered_lines(p)) for p in logs]
    wait_for(lambda: [len(numbered_lines(p)) for p in logs] > before, timeout=5,
             what="lines still arriving")  # fmt: skip
    wait_for(lambda: all(load_agent(repo, i)["state"] == "done" for i in ("one", "two", "three")),
             timeout=60, what="all done")  # fmt: skip
    for path in logs:
        assert numbered_lines(path) == list(range(40))
