"""A stand-in agent for fast tests: speaks Claude Code's stream-json, driven by words in its task.

Words it understands (anywhere in the task):
  sleep:N     wait N seconds (in small steps, printing activity) before finishing
  commit:F    write file F and commit it on the current branch
  write:F     write file F without committing
  fail        finish with an error result (exit 1)
  crash:N     exit N without a result line
  ansi        put terminal escape sequences in its text
  quiet       print nothing at all (an agent CLI without stream-json)
"""

import json
import os
import subprocess
import sys
import time
import uuid


def emit(event):
    print(json.dumps(event), flush=True)


def words(task, prefix):
    return [w[len(prefix) :] for w in task.split() if w.startswith(prefix)]


def main():
    task = sys.argv[1]
    quiet = "quiet" in task.split()
    session = str(uuid.uuid4())
    if not quiet:
        emit({"type": "system", "subtype": "init", "session_id": session, "model": "fake-model"})
    for name in words(task, "write:") + words(task, "commit:"):
        with open(name, "w") as f:
            f.write(f"written by {os.environ.get('ORCHESTRA_AGENT_ID')}\n")
    for name in words(task, "commit:"):
        subprocess.run(["git", "add", name], check=True)
        subprocess.run(["git", "commit", "-qm", f"add {name}"], check=True)
    for seconds in words(task, "sleep:"):
        deadline = time.time() + float(seconds)
        while time.time() < deadline:
            if not quiet:
                message = {"id": str(uuid.uuid4()), "content": [{"type": "text", "text": "still working"}],
                           "usage": {"input_tokens": 10, "output_tokens": 5}}  # fmt: skip
                emit({"type": "assistant", "message": message})
            time.sleep(0.2)
    if "ansi" in task.split():
        emit(
            {
                "type": "assistant",
                "message": {
                    "content": [{"type": "text", "text": "red \x1b[31malert\x1b[0m\x07 bell"}]
                },
            }
        )
    for code in words(task, "crash:"):
        sys.exit(int(code))
    failed = "fail" in task.split()
    if not quiet:
        emit({"type": "assistant", "message": {"id": "final", "content": [{"type": "text", "text": "finished the task"}],
                                               "usage": {"input_tokens": 100, "output_tokens": 20}}})  # fmt: skip
        emit({"type": "result", "subtype": "success", "is_error": failed, "session_id": session,
              "result": "it broke" if failed else "all done", "total_cost_usd": 0.25, "num_turns": 3,
              "duration_ms": 1200, "usage": {"input_tokens": 120, "output_tokens": 30}})  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
