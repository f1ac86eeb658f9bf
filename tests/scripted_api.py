"""A scripted Anthropic Messages API on loopback, to drive the real ``claude`` CLI.

Standard library only. Typical use::

    with ScriptedAPI() as api:
        api.script("write-hello", [bash("echo hi > hello.txt"), text("Added it")])
        env = claude_env(api, config_dir=tmp_path / "claude-config")
        subprocess.run([CLAUDE, "-p", "write-hello", ...], env=env, ...)

A main-loop request (a body with a "tools" field, even an empty one) is answered
from the script whose key occurs in the text of the most recent user message that
contains any key (the longest key wins); the step is the number of assistant
messages after that user message. The choice depends on the conversation alone,
so retries, resumed sessions and parallel agents all get the right step. Every
other request (title generation, quota checks, token counting, probes...) gets a
harmless valid answer and never uses up a script step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

try:
    import pytest
except ImportError:  # run on its own (`python3 tests/scripted_api.py --port N`): no pytest needed
    pytest = None

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are not evaluated
    from typing import Self

CLAUDE: str | None = shutil.which("claude")

requires_claude = (
    pytest.mark.skipif(
        CLAUDE is None,
        reason="the real claude CLI is not installed: " "npm install -g @anthropic-ai/claude-code",
    )
    if pytest
    else (lambda test: test)
)

DEFAULT_MODEL = "claude-sonnet-4-5-20250929"
FINISHED = "(script finished)"


class Step:
    """One scripted answer: content blocks and a stop reason, or an HTTP error."""

    def __init__(
        self,
        blocks: Sequence[dict[str, Any]] = (),
        stop_reason: str = "end_turn",
        status: int = 200,
        error_message: str = "",
        headers: dict[str, str] | None = None,
        times: int | None = None,
        then: Step | None = None,
        delay: float = 0.0,
    ) -> None:
        self.blocks = list(blocks)
        self.stop_reason = stop_reason
        self.status = status
        self.error_message = error_message
        self.headers = dict(headers or {})  # extra response headers (rate-limit headers)
        self.times = times  # answer this error this many times, then answer `then`
        self.then = then
        self.delay = delay  # seconds between streamed events (a slow stream)

    def __repr__(self) -> str:
        if self.times is not None:
            return f"repeat({self.status}, {self.times}, then={self.then!r})"
        if self.status != 200:
            return f"error({self.status}, {self.error_message!r})"
        return f"Step({self.blocks!r}, {self.stop_reason!r})"


def text(s: str) -> Step:
    """A final text answer (stop_reason end_turn)."""
    return Step([{"type": "text", "text": s}], "end_turn")


def bash(cmd: str, description: str = "Run a scripted shell command") -> Step:
    """A Bash tool call (stop_reason tool_use); the CLI runs ``cmd`` in its cwd."""
    block = {
        "type": "tool_use",
        "name": "Bash",
        "input": {"command": cmd, "description": description},
    }
    return Step([block], "tool_use")


def call(name: str, **tool_input: Any) -> Step:
    """Any tool call with exactly this input: ``call("Write", file_path=..., content=...)``."""
    return Step([{"type": "tool_use", "name": name, "input": tool_input}], "tool_use")


DIRECTIVE = re.compile(r"\[(bash|write|text|error|slow)(?:\s+([^\]]*))?\]\s*")


def directive_steps(said: str) -> list[Step]:
    """The steps a task's own directives ask for (see CONTRIBUTING.md), [] when it has none.

    ``[bash] CMD`` runs a command, ``[write PATH] TEXT`` writes a file with the Write tool,
    ``[text] REPLY`` answers and ends the turn, ``[error STATUS] MESSAGE`` answers an HTTP
    error, ``[slow SECONDS] REPLY`` answers slowly. Each runs to the next directive; a task
    that does not end with ``[text]`` ends with "Done.".
    """
    found = list(DIRECTIVE.finditer(said))
    steps = []
    for n, match in enumerate(found):
        end = found[n + 1].start() if n + 1 < len(found) else len(said)
        kind, arg, body = (
            match.group(1),
            (match.group(2) or "").strip(),
            said[match.end() : end].strip(),
        )
        if kind == "bash":
            steps.append(bash(body))
        elif kind == "write":
            block = {"type": "tool_use", "name": "Write",
                     "input": {"file_path": arg, "content": body + "\n"}}  # fmt: skip
            steps.append(Step([block], "tool_use"))
        elif kind == "error":
            steps.append(error(int(arg or 500), body or "scripted failure"))
        elif kind == "slow":
            steps.append(slow(text(body or "Done."), float(arg or 1)))
        else:
            steps.append(text(body or "Done."))
    if steps and steps[-1].status == 200 and steps[-1].stop_reason != "end_turn":
        steps.append(text("Done."))
    return steps


def error(status: int, message: str = "scripted failure") -> Step:
    """An HTTP error answer in the API's error format."""
    return Step(status=status, error_message=message)


def rate_limited(
    times: int,
    then: Step,
    retry_after: float = 3600,
    reset: float | None = None,
    message: str = "Number of request tokens has exceeded your per-minute rate limit",
) -> Step:
    """HTTP 429 with rate-limit headers ``times`` times (per conversation step), then ``then``.

    ``reset`` is a Unix time sent as ``anthropic-ratelimit-unified-reset`` (and the
    ISO ``anthropic-ratelimit-requests-reset``); a long ``retry-after`` makes the CLI
    give up at once instead of retrying itself.
    """
    headers = {
        "retry-after": str(int(retry_after)),
        "anthropic-ratelimit-unified-status": "rejected",
    }
    if reset is not None:
        iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(reset))
        headers.update({"anthropic-ratelimit-unified-reset": str(int(reset)),
                        "anthropic-ratelimit-requests-reset": iso})  # fmt: skip
    return Step(status=429, error_message=message, headers=headers, times=times, then=then)


def overloaded(times: int, then: Step, message: str = "Overloaded") -> Step:
    """HTTP 529 overloaded_error ``times`` times (per conversation step), then ``then``."""
    return Step(status=529, error_message=message, times=times, then=then)


def slow(step: Step, delay: float) -> Step:
    """``step`` streamed with ``delay`` seconds between its server-sent events."""
    return Step(step.blocks, step.stop_reason, delay=delay)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def _user_texts(message: dict[str, Any]) -> str:
    """The text of a user message: string content or text blocks only."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "\n".join(parts)


def _estimate_tokens(body: dict[str, Any]) -> int:
    """A rough, nonzero input-token count (about four characters a token)."""
    return max(1, len(json.dumps(body, separators=(",", ":"))) // 4)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A CLI killed mid-answer (a test stopping an agent) is not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ScriptedAPI:
    """A Messages API server on 127.0.0.1 answering from registered scripts."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._scripts: dict[str, list[Step]] = {}
        self._lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []  # every parsed JSON body
        self._repeats: dict[tuple[str, int], int] = {}  # (key, step) -> errors answered so far
        self.log: list[dict[str, Any]] = []  # every request: method, path, kind...
        self._server = _Server((host, port), self._handler_class())
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ScriptedAPI:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},
                name="scripted-api",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripts ----------------------------------------------------------
    def script(self, key: str, steps: Sequence[Step]) -> None:
        """Answer main-loop requests whose latest keyed user text contains ``key``."""
        with self._lock:
            self._scripts[key] = list(steps)

    @property
    def main_requests(self) -> list[dict[str, Any]]:
        """Bodies of the main-loop requests (those answered from a script)."""
        with self._lock:
            return [e["body"] for e in self.log if e["kind"] == "main"]

    def choose(self, body: dict[str, Any]) -> tuple[str | None, int, Step]:
        """The (key, step index, step) that answers a main-loop request."""
        messages = body.get("messages") or []
        with self._lock:
            scripts = dict(self._scripts)
        for i in range(len(messages) - 1, -1, -1):
            message = messages[i]
            if not isinstance(message, dict) or message.get("role") != "user":
                continue
            said = _user_texts(message)
            keys = [k for k in scripts if k in said]
            directed = [] if keys else directive_steps(said)
            if not keys and not directed:
                continue
            key = max(keys, key=len) if keys else said
            index = sum(
                1 for m in messages[i + 1 :] if isinstance(m, dict) and m.get("role") == "assistant"
            )
            steps = scripts[key] if keys else directed
            step = steps[index] if index < len(steps) else text(FINISHED)
            return key, index, self._repeat(key, index, step)
        return None, 0, text(FINISHED)

    def _repeat(self, key: str, index: int, step: Step) -> Step:
        """A repeated error answers itself until used up, then its follow-up step."""
        if step.times is None:
            return step
        with self._lock:
            used = self._repeats.get((key, index), 0)
            if used < step.times:
                self._repeats[(key, index)] = used + 1
        if used >= step.times:
            return self._repeat(key, index + 1000, step.then) if step.then else text(FINISHED)
        return Step(status=step.status, error_message=step.error_message, headers=step.headers)

    def errors_answered(self, key: str) -> int:
        """How many repeated-error answers the script ``key`` has given."""
        with self._lock:
            return sum(n for (k, _), n in self._repeats.items() if k == key)

    # -- HTTP -------------------------------------------------------------
    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.log.append(entry)
            if isinstance(entry.get("body"), dict):
                self.requests.append(entry["body"])

    def _handler_class(self) -> type:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def _send_json(
                self, status: int, obj: Any, headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("request-id", "req_" + uuid.uuid4().hex[:24])
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _read_body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if not raw:
                    return None
                try:
                    return json.loads(raw)
                except ValueError:
                    return raw.decode("utf-8", "replace")

            def do_HEAD(self) -> None:
                api._record({"method": "HEAD", "path": self.path, "kind": "probe"})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                api._record({"method": "GET", "path": self.path, "kind": "probe"})
                if path.rstrip("/") == "/v1/models":
                    self._send_json(200, _models_page())
                elif path.startswith("/v1/models/"):
                    self._send_json(200, _model_info(path.rsplit("/", 1)[1]))
                else:
                    self._send_json(200, {})

            def do_POST(self) -> None:
                path = urlsplit(self.path).path.rstrip("/")
                body = self._read_body()
                entry: dict[str, Any] = {
                    "method": "POST",
                    "path": self.path,
                    "body": body,
                    "headers": dict(self.headers.items()),
                }
                if not isinstance(body, dict):
                    entry["kind"] = "other"
                    api._record(entry)
                    self._send_json(200, {})
                    return
                if path.endswith("/count_tokens"):
                    entry["kind"] = "count_tokens"
                    api._record(entry)
                    self._send_json(200, {"input_tokens": _estimate_tokens(body)})
                    return
                if not path.endswith("/messages"):
                    entry["kind"] = "other"
                    api._record(entry)
                    self._send_json(200, {})
                    return
                if "tools" in body:
                    # The agent loop always sends "tools" (empty with --tools "");
                    # Claude Code's side requests (titles, quota) send none.
                    key, index, step = api.choose(body)
                    entry.update(kind="main", key=key, step=index, answer=repr(step))
                else:
                    step = _side_answer(body)
                    entry.update(kind="side", answer=repr(step))
                api._record(entry)
                self._answer(body, step)

            def _answer(self, body: dict[str, Any], step: Step) -> None:
                if step.status != 200:
                    err_type = _ERROR_TYPES.get(step.status, "api_error")
                    self._send_json(
                        step.status,
                        {
                            "type": "error",
                            "error": {"type": err_type, "message": step.error_message},
                        },
                        step.headers,
                    )
                    return
                message = _message(body, step)
                if body.get("stream"):
                    self._stream(message, step.delay)
                else:
                    self._send_json(200, message)

            def _stream(self, message: dict[str, Any], delay: float = 0.0) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.send_header("request-id", "req_" + uuid.uuid4().hex[:24])
                self.end_headers()
                self.close_connection = True
                for event in _events(message):
                    chunk = "event: {}\ndata: {}\n\n".format(
                        event["type"],
                        json.dumps(event),
                    )
                    self.wfile.write(chunk.encode())
                    if delay:
                        self.wfile.flush()
                        time.sleep(delay)
                self.wfile.flush()

        return Handler


def _side_answer(body: dict[str, Any]) -> Step:
    """A harmless answer to a request that is not the main agent loop."""
    fmt = (body.get("output_config") or {}).get("format") or body.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return text(json.dumps(_sample(fmt.get("schema") or {})))
    return text("Scripted session")


def _sample(schema: dict[str, Any]) -> Any:
    """A small value that satisfies a simple JSON schema."""
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {name: _sample(sub) for name, sub in props.items()}
    if kind == "array":
        return []
    if kind == "boolean":
        return False
    if kind in ("integer", "number"):
        return 0
    if kind == "null":
        return None
    return "Scripted session"


def _message(body: dict[str, Any], step: Step) -> dict[str, Any]:
    blocks = []
    out_tokens = 0
    for block in step.blocks:
        block = dict(block)
        if block.get("type") == "tool_use":
            block["id"] = "toolu_" + uuid.uuid4().hex[:24]  # unique per answer
        blocks.append(block)
        out_tokens += max(1, len(json.dumps(block)) // 4)
    return {
        "id": "msg_" + uuid.uuid4().hex[:24],
        "type": "message",
        "role": "assistant",
        "model": body.get("model") or DEFAULT_MODEL,
        "content": blocks,
        "stop_reason": step.stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": _estimate_tokens(body),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": out_tokens,
        },
    }


def _events(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The server-sent events the real API streams for ``message``."""
    usage = message["usage"]
    start = dict(message, content=[], stop_reason=None)
    start["usage"] = dict(usage, output_tokens=1)
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(message["content"]):
        if block["type"] == "tool_use":
            empty = dict(block, input={})
            delta = {
                "type": "input_json_delta",
                "partial_json": json.dumps(block["input"]),
            }
        else:
            empty = dict(block, text="")
            delta = {"type": "text_delta", "text": block["text"]}
        events.append({"type": "content_block_start", "index": index, "content_block": empty})
        events.append({"type": "content_block_delta", "index": index, "delta": delta})
        events.append({"type": "content_block_stop", "index": index})
    events.append(
        {
            "type": "message_delta",
            "delta": {
                "stop_reason": message["stop_reason"],
                "stop_sequence": None,
            },
            "usage": {"output_tokens": usage["output_tokens"]},
        }
    )
    events.append({"type": "message_stop"})
    return events


def _models_page() -> dict[str, Any]:
    data = [_model_info(DEFAULT_MODEL)]
    return {"data": data, "has_more": False, "first_id": None, "last_id": None}


def _model_info(model_id: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": model_id,
        "created_at": "2025-09-29T00:00:00Z",
    }


def claude_env(api: ScriptedAPI, config_dir: os.PathLike[str] | str) -> dict[str, str]:
    """An environment that runs the real CLI offline against ``api``."""
    env = dict(os.environ)
    for name in list(env):
        # Nothing from the calling session may leak in (auth, a parent Claude
        # Code's own settings, a proxy that would catch loopback traffic).
        if name.startswith(("CLAUDE_CODE_", "ANTHROPIC_", "CLAUDECODE")):
            del env[name]
    os.makedirs(os.fspath(config_dir), exist_ok=True)
    # A private HOME: the Bash tool runs `bash -l`, and a login shell must not run the
    # machine user's profile (pyenv's rehash lock there hangs every shell once a killed
    # agent leaves it behind).
    home = os.path.join(os.fspath(config_dir), "home")
    os.makedirs(home, exist_ok=True)
    env.update(
        {
            "HOME": home,
            "ANTHROPIC_BASE_URL": api.url,
            "ANTHROPIC_API_KEY": "sk-ant-scripted-test-key",
            "CLAUDE_CONFIG_DIR": os.fspath(config_dir),
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_AUTOUPDATER": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the scripted API on its own until Ctrl-C: tasks script themselves with directives."""
    parser = argparse.ArgumentParser(
        prog="scripted_api.py",
        description="A scripted Anthropic Messages API on loopback that drives the real claude CLI; "
        "a task's directives ([bash] CMD, [write PATH] TEXT, [text] REPLY, [error STATUS] MESSAGE, "
        "[slow SECONDS] REPLY) say what the agent does. See CONTRIBUTING.md.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8765, help="port to listen on (8765; 0: any free one)"
    )
    args = parser.parse_args(argv)
    api = ScriptedAPI(args.host, args.port).start()
    print(f"scripted API on {api.url}", flush=True)
    print(f"point claude at it: export ANTHROPIC_BASE_URL={api.url} ANTHROPIC_API_KEY=scripted "
          "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1", flush=True)  # fmt: skip
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
