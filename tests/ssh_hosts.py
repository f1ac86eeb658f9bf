"""A test rig of real ssh hosts on this machine: one local user, one sshd and one Claude Code
config per host, so nothing is shared between "machines" but the loopback network.

Each host is a local account `orch<key>-<name>` (key: of this checkout's path) (made once with `useradd -m`, left for the next run)
with its own HOME, work folder, git identity and `~/.claude/settings.json` pointing the real
`claude` CLI at the tests' scripted API. Each gets its own `sshd -D` on a free loopback port with
its own host key, public-key login only, no PAM; the test's client key sits in the account's
`~/.ssh/authorized_keys`. An ssh config file names every host by alias (`ssh_options: ["-F",
FILE]`), as a user's `~/.ssh/config` would. Needs root (useradd, sshd); tests skip otherwise.
"""

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# one set of accounts per checkout: runs from two checkouts at once (two engineers, two CI jobs
# on one machine) would otherwise wipe each other's hosts mid-run
CHECKOUT_KEY = hashlib.sha256(str(Path(__file__).resolve().parent.parent).encode()).hexdigest()[:4]
USER_PREFIX = f"orch{CHECKOUT_KEY}-"


def free_port():
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_user(user):
    """The local account (made if missing, unlocked for key login) and its home."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", user], check=True)
        entry = pwd.getpwnam(user)
    # '*' = no password but not locked: without PAM, sshd refuses a locked ('!') account
    subprocess.run(["usermod", "-p", "*", user], check=True)
    return entry


def write_owned(path, text, entry, mode=0o600):
    """Write a file in the host account's home, owned by that account."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chown(path.parent, entry.pw_uid, entry.pw_gid)
    path.write_text(text)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, mode)


def kill_host_processes(home):
    """Kill the supervisors and agents orchestra left in a host's repositories (by their pids)."""
    for state_file in (home / ".orchestra-hosts" / "repos").glob("*/.orchestra/state.json"):
        with contextlib.suppress(ValueError, OSError):
            state = json.loads(state_file.read_text())
            supervisor = (state.get("supervisor") or {}).get("pid")
            if supervisor:
                with contextlib.suppress(OSError):
                    os.kill(supervisor, signal.SIGKILL)
            for record in state["agents"].values():
                if record.get("pid"):
                    with contextlib.suppress(OSError):
                        os.killpg(record["pid"], signal.SIGKILL)


class SshHost:
    """One host: an account, its sshd and its alias in the test's ssh config."""

    def __init__(self, name, folder, api_url, client_key):
        self.name, self.alias, self.user = name, name, f"{USER_PREFIX}{name}"
        self.entry = ensure_user(self.user)
        self.home = Path(self.entry.pw_dir)
        kill_host_processes(self.home)
        shutil.rmtree(self.home / ".orchestra-hosts", ignore_errors=True)
        shutil.rmtree(self.home / ".claude", ignore_errors=True)
        self.folder = folder / f"sshd-{name}"
        self.folder.mkdir(parents=True)
        self.port = free_port()
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.folder / "host_key")],
            check=True,
        )
        write_owned(self.home / ".ssh" / "authorized_keys", client_key.read_text(), self.entry)
        os.chmod(self.home / ".ssh", 0o700)
        write_owned(
            self.home / ".gitconfig",
            f"[user]\n\tname = {self.user}\n\temail = {self.user}@example.com\n",
            self.entry,
        )
        settings = {
            "env": {
                "ANTHROPIC_BASE_URL": api_url,
                "ANTHROPIC_API_KEY": "sk-ant-scripted-test-key",
                "DISABLE_TELEMETRY": "1",
                "DISABLE_ERROR_REPORTING": "1",
                "DISABLE_AUTOUPDATER": "1",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            }
        }
        write_owned(self.home / ".claude" / "settings.json", json.dumps(settings), self.entry)
        self.config = self.folder / "sshd_config"
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.folder / 'host_key'}",
                    "AuthorizedKeysFile .ssh/authorized_keys",
                    "UsePAM no",
                    "StrictModes no",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    f"AllowUsers {self.user}",
                    f"PidFile {self.folder / 'sshd.pid'}",
                    "MaxStartups 200",
                    "MaxSessions 200",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        self.proc = None
        self.start()

    def start(self):
        """Run this host's sshd (again) and wait until it answers."""
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        with open(self.folder / "sshd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            if self.proc.poll() is not None:
                raise RuntimeError((self.folder / "sshd.log").read_text())
            time.sleep(0.05)
        raise RuntimeError(f"sshd for {self.name} did not start")

    def stop(self):
        """End this host's sshd (its listener; live sessions are ended too)."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self):
        """Stop sshd and whatever orchestra runs in the account."""
        self.stop()
        kill_host_processes(self.home)

    def settings(self, ssh_config, **extra):
        """This host's entry for the `hosts` setting."""
        return {"ssh": self.alias, "ssh_options": ["-F", str(ssh_config)], **extra}


class StallingProxy:
    """A TCP relay in front of a host's sshd that can stall: stop forwarding without closing
    anything (a blocked port, a dead Wi-Fi), then resume. ssh reaches the host through it
    with `-p PORT` after the host's own settings (the command line beats the config file)."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.flowing = threading.Event()
        self.flowing.set()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self.accept, name="stalling-proxy", daemon=True).start()

    def accept(self):
        """Relay each connection both ways, each direction in a thread of its own."""
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), 5)
            except OSError:
                client.close()
                continue
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    def pump(self, source, sink):
        """Copy bytes from source to sink, holding them while the proxy is stalled."""
        try:
            while True:
                self.flowing.wait()
                data = source.recv(65536)
                if not data:
                    break
                self.flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stall(self):
        """Stop forwarding; every connection stays open."""
        self.flowing.clear()

    def resume(self):
        """Forward again."""
        self.flowing.set()

    def close(self):
        """Stop accepting (relayed connections end with their ends)."""
        self.closed = True
        self.flowing.set()
        self.listener.close()


class SshRig:
    """Several hosts, one client key and the ssh config that names them."""

    def __init__(self, folder, api_url, names):
        folder.mkdir(parents=True, exist_ok=True)
        self.key = folder / "client_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True
        )
        os.chmod(self.key, 0o600)
        self.hosts = {
            name: SshHost(name, folder, api_url, Path(f"{self.key}.pub")) for name in names
        }
        self.ssh_config = folder / "ssh_config"
        self.ssh_config.write_text(
            "".join(
                f"Host {h.alias}\n  HostName 127.0.0.1\n  Port {h.port}\n  User {h.user}\n"
                f"  IdentityFile {self.key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
                "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
                for h in self.hosts.values()
            )
        )

    def cut(self, name):
        """Drop a host's link: its sshd stops and orchestra's shared connection to it ends."""
        import orchestra

        host = self.hosts[name]
        host.stop()
        ssh = orchestra.Host(name, host.settings(self.ssh_config)).ssh_command()
        subprocess.run([*ssh, "-O", "exit", host.alias], capture_output=True, timeout=30)

    def stalling_proxy(self, name):
        """A StallingProxy in front of a host's sshd, and the host's settings that go through it."""
        proxy = StallingProxy(self.hosts[name].port)
        settings = self.hosts[name].settings(self.ssh_config)
        settings["ssh_options"] = [*settings["ssh_options"], "-p", str(proxy.port)]
        return proxy, settings

    def hosts_setting(self, **extra):
        """The `hosts` setting naming every host of the rig."""
        return {name: h.settings(self.ssh_config, **extra) for name, h in self.hosts.items()}

    def close(self):
        """End orchestra's shared connections, every sshd and what orchestra left on the hosts."""
        import orchestra

        for name, host in self.hosts.items():
            ssh = orchestra.Host(name, host.settings(self.ssh_config)).ssh_command()
            subprocess.run([*ssh, "-O", "exit", host.alias], capture_output=True, timeout=30)
            host.close()
