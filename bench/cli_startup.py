"""How fast `orchestra status --json` answers with 8 agent records, against `python3 -c pass`.

Goal: at most 2x the bare interpreter, as installed: the module compiled in a site folder (what
pip does) and run through a console-script stub. PYTHONDONTWRITEBYTECODE is taken out of the
environment of every run, so a user's setting cannot make the figure (bytecode is written at
install time anyway). Prints medians over many runs; not a test.
Run: python3 bench/cli_startup.py [--runs N]
"""

import argparse
import compileall
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ORCHESTRA, init_repo, median_seconds

RECORD_COUNT = 8


def make_repo(root):
    """A repository with .orchestra/state.json holding finished agent records."""
    repo = init_repo(root / "repo")
    import orchestra

    project = orchestra.Project.open(repo, {"ORCHESTRA_CONFIG": str(root / "none.json")})
    agents = {}
    for n in range(RECORD_COUNT):
        record = orchestra.new_record(project, f"agent-{n}", f"task number {n}", "main", "0" * 40)
        record.update(state="done", cost_usd=0.1 * n, turns=n, result="finished " * 20, ready=True)
        agents[record["id"]] = record
    project.store.update(lambda state: state["agents"].update(agents))
    return repo


ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def install(root, source):
    """orchestra.py copied into a site folder and byte-compiled, as `pip install` leaves it."""
    site = root / "site-packages"
    site.mkdir()
    shutil.copy2(source, site / "orchestra.py")
    compileall.compile_file(str(site / "orchestra.py"), quiet=1)
    return site


def median_run_seconds(argv, cwd, runs):
    """Median wall time of running argv `runs` times."""
    return median_seconds(
        lambda: subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL, env=ENV), runs
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument(
        "--orchestra", type=Path, default=ORCHESTRA, help="another orchestra.py to measure"
    )
    args = parser.parse_args()
    # The installed `orchestra` command imports the compiled module (what pip's console script
    # does); `python3 orchestra.py` compiles the whole file at every start.
    with tempfile.TemporaryDirectory() as tmp:
        site = install(Path(tmp), args.orchestra)
        installed = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(site)!r}); from orchestra import main; "
                     "sys.argv[1:] = ['status', '--json']; sys.exit(main())"]  # fmt: skip
        copied = [sys.executable, str(args.orchestra), "status", "--json"]
        repo = make_repo(Path(tmp))
        for argv in (installed, copied):
            output = json.loads(
                subprocess.run(argv, cwd=repo, check=True, capture_output=True).stdout
            )
            assert len(output["agents"]) == RECORD_COUNT
        bare = median_run_seconds([sys.executable, "-c", "pass"], repo, args.runs)
        as_installed = median_run_seconds(installed, repo, args.runs)
        as_file = median_run_seconds(copied, repo, args.runs)
    print(
        f"python3 -c pass:                               {bare * 1000:7.1f} ms (median of {args.runs})"
    )
    print(
        f"orchestra status --json, installed command:    {as_installed * 1000:7.1f} ms  {as_installed / bare:.2f}x"
    )
    print(
        f"python3 orchestra.py status --json (no cache): {as_file * 1000:7.1f} ms  {as_file / bare:.2f}x"
    )
    print(f"goal: installed command <= 2x python3 -c pass ({RECORD_COUNT} agent records)")


if __name__ == "__main__":
    main()
