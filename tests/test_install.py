"""Install paths: the wheel in a fresh virtual environment, and the single file copied alone."""

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile

import pytest

import orchestra
from conftest import ROOT, make_repo


def run(argv, cwd, **env):
    """Run a command as a user would; returns the finished process."""
    return subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, ROOT]
    assert run(build, ROOT).returncode == 0
    return next(out.glob("*.whl"))


@pytest.fixture(scope="module")
def venv_bin(wheel, tmp_path_factory):
    """A fresh virtual environment with only the wheel installed, offline."""
    env_dir = tmp_path_factory.mktemp("venv")
    assert run([sys.executable, "-m", "venv", env_dir], env_dir).returncode == 0
    install = run(
        [env_dir / "bin" / "python", "-m", "pip", "install", "-q", "--no-index", "--no-deps", wheel], env_dir
    )
    assert install.returncode == 0, install.stderr
    return env_dir / "bin"


def test_wheel_declares_no_runtime_dependency(wheel):
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(
            next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        ).decode()
    requirements = [
        line for line in metadata.split("\n\n", 1)[0].splitlines() if line.startswith("Requires-Dist:")
    ]
    assert requirements and all('extra == "dev"' in line for line in requirements)  # nothing at run time
    assert "Requires-Python: >=3.9" in metadata
    assert f"Version: {orchestra.__version__}" in metadata


def test_installed_command_works(venv_bin, tmp_path):
    version = run([venv_bin / "orchestra", "--version"], tmp_path)
    assert version.stdout == f"orchestra {orchestra.__version__}\n"
    repo = make_repo(tmp_path / "repo")
    assert run([venv_bin / "orchestra", "init"], repo).returncode == 0
    status = run([venv_bin / "orchestra", "status"], repo)
    assert status.returncode == 0 and status.stdout.startswith("No agents yet.")


COMMANDS_WITHOUT_AGENTS = [
    ["--help"],
    ["init"],
    ["config", "--json"],
    ["status", "--json"],
    ["worktrees"],
    ["collect"],
    ["cleanup", "--dry-run"],
    ["cleanup", "--list-archives"],
    ["sessions", "--all"],
]


@pytest.mark.parametrize("argv", COMMANDS_WITHOUT_AGENTS, ids=lambda a: " ".join(a))
def test_single_file_copied_alone(tmp_path, argv):
    alone = tmp_path / "bin"
    alone.mkdir()
    shutil.copy(ROOT / "orchestra.py", alone / "orchestra.py")
    repo = make_repo(tmp_path / "repo")
    done = run(
        [sys.executable, alone / "orchestra.py", *argv], repo, CLAUDE_CONFIG_DIR=str(tmp_path / "claude")
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def serve_dashboard(argv, repo):
    """Start `orchestra web --port 0`, fetch / and stop it: (status, body)."""
    server = subprocess.Popen([*map(str, argv), "web", "--port", "0"], cwd=repo, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        url = server.stdout.readline().strip()
        assert "/#token=" in url
        try:
            with urllib.request.urlopen(url.split("#", 1)[0], timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.read().decode()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_installed_web_serves_the_dashboard(venv_bin, tmp_path):
    status, page = serve_dashboard([venv_bin / "orchestra"], make_repo(tmp_path / "repo"))
    assert status == 200 and "<title>" in page
    assert page == (ROOT / "static" / "dashboard.html").read_text()


def test_single_file_web_says_where_the_dashboard_goes_then_serves_it(tmp_path):
    alone = tmp_path / "bin"
    alone.mkdir()
    shutil.copy(ROOT / "orchestra.py", alone / "orchestra.py")
    repo = make_repo(tmp_path / "repo")
    status, text = serve_dashboard([sys.executable, alone / "orchestra.py"], repo)
    assert status == 404
    assert text.startswith(
        f"The dashboard file is missing. Put dashboard.html at {alone / 'static' / 'dashboard.html'}"
    )
    (alone / "static").mkdir()
    shutil.copy(ROOT / "static" / "dashboard.html", alone / "static" / "dashboard.html")
    status, page = serve_dashboard([sys.executable, alone / "orchestra.py"], repo)
    assert status == 200 and "<title>" in page
