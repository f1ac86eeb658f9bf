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
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        out,
        ROOT,
    ]
    built = run(build, ROOT)
    assert (
        built.returncode == 0
    ), built.stderr  # setuptools>=70.1 (or wheel) comes with the dev extra
    return next(out.glob("*.whl"))


@pytest.fixture(scope="module")
def venv_bin(wheel, tmp_path_factory):
    """A fresh virtual environment with only the wheel installed, offline."""
    env_dir = tmp_path_factory.mktemp("venv")
    assert run([sys.executable, "-m", "venv", env_dir], env_dir).returncode == 0
    install = run(
        [
            env_dir / "bin" / "python",
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            wheel,
        ],
        env_dir,
    )
    assert install.returncode == 0, install.stderr
    return env_dir / "bin"


def test_wheel_declares_no_runtime_dependency(wheel):
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(
            next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        ).decode()
    requirements = [
        line
        for line in metadata.split("\n\n", 1)[0].splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert requirements and all(
        'extra == "dev"' in line for line in requirements
    )  # nothing at run time
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
        [sys.executable, alone / "orchestra.py", *argv],
        repo,
        CLAUDE_CONFIG_DIR=str(tmp_path / "claude"),
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def serve_dashboard(argv, repo, stderr_lines=None):
    """Start `orchestra web --port 0`, fetch / and stop it: (status, body).

    With a list as stderr_lines, the server's stderr lines up to 'serving' are appended to it.
    """
    server = subprocess.Popen([*map(str, argv), "web", "--port", "0"], cwd=repo, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = server.stdout.readline().strip()
        assert "/#token=" in url
        for line in server.stderr:
            if stderr_lines is not None:
                stderr_lines.append(line)
            if "serving" in line:
                break
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
    said = []
    status, text = serve_dashboard([sys.executable, alone / "orchestra.py"], repo, said)
    warnings = [line for line in said if "dashboard.html" in line]
    assert len(warnings) == 1 and str(alone / "static" / "dashboard.html") in warnings[0]
    assert status == 404
    assert text.startswith(
        f"The dashboard file is missing. Put dashboard.html at {alone / 'static' / 'dashboard.html'}"
    )
    (alone / "static").mkdir()
    shutil.copy(ROOT / "static" / "dashboard.html", alone / "static" / "dashboard.html")
    said = []
    status, page = serve_dashboard([sys.executable, alone / "orchestra.py"], repo, said)
    assert status == 200 and "<title>" in page
    assert not [line for line in said if "dashboard.html" in line]


@pytest.fixture(scope="module")
def clean_checkout(tmp_path_factory):
    """This checkout's committed and working files, copied without build leftovers or caches."""
    copy = tmp_path_factory.mktemp("checkout") / "claude-orchestra"
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".coverage*", ".orchestra", ".worktrees")  # fmt: skip
    shutil.copytree(ROOT, copy, ignore=ignore)
    return copy


def test_readme_pipx_install_from_a_checkout(clean_checkout, tmp_path):
    """The README's first command: `pipx install .` in a checkout (pipx builds with setuptools from PyPI)."""
    homes = {"PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin"),
             "PIPX_MAN_DIR": str(tmp_path / "man"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # fmt: skip
    done = run([sys.executable, "-m", "pipx", "install", "."], clean_checkout, **homes)
    assert done.returncode == 0, done.stderr + done.stdout
    command = tmp_path / "bin" / "orchestra"
    assert run([command, "--version"], tmp_path).stdout == f"orchestra {orchestra.__version__}\n"
    status, page = serve_dashboard([command], make_repo(tmp_path / "repo"))
    assert status == 200 and page == (ROOT / "static" / "dashboard.html").read_text()


def test_readme_virtual_environment_install(clean_checkout, tmp_path):
    """The README's other path: `python3 -m venv`, then that environment's pip installs the checkout."""
    env_dir = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", env_dir], tmp_path).returncode == 0
    install = run(
        [env_dir / "bin" / "pip", "install", "-q", "--disable-pip-version-check", "."],
        clean_checkout,
    )
    assert install.returncode == 0, install.stderr
    assert run([env_dir / "bin" / "orchestra", "--version"], tmp_path).returncode == 0
