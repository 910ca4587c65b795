"""A fake OpenAI-compatible chat-completions server for hitl-mail's tests.

Its single job is to stand in for an LLM provider: it answers
``POST /v1/chat/completions`` (and ``/chat/completions``) the way an OpenAI
model answers an enum-constrained classification, records every request body,
and can be told to misbehave (fail, answer outside the options, be slow).

In-process::

    with FakeLLMServer(rules={"detail": "needs_revision"}) as llm:
        settings = LLMSettings(model="fake-model", api_base=llm.url, api_key="k")
        ...
        assert len(llm.requests) == 1
        llm.mode = "fail"

As a separate process (for tests that run the daemon in a subprocess)::

    python tests/llm_server.py --port 0 --record requests.jsonl [--mode M] [--rules JSON]

prints its port as the first line on stdout, then serves until SIGTERM/SIGINT
(``FakeLLMProcess`` below does all that for a test). Another process steers it
over HTTP:

- ``POST /_control`` with a JSON object holding any of ``mode``, ``rules``,
  ``delay``, ``fail_next``, ``invalid_outcome``, ``fail_status``; answers with
  the resulting settings.
- ``GET /_requests`` returns the recorded request bodies as a JSON array;
  ``DELETE /_requests`` forgets them (the ``--record`` file keeps every line).

Modes:

- ``classify`` (default): a tool call (or JSON content when the request used
  ``response_format``) choosing the outcome of the first rule whose key occurs
  in the feedback (case-insensitive), else the first enum option.
- ``text``: the same choice, as plain message content with no tool call (a
  provider that ignores ``tool_choice``).
- ``invalid``: answers ``invalid_outcome`` (``"maybe"``), outside the enum.
- ``fail``: HTTP ``fail_status`` (500) with an OpenAI-style error body.
- ``slow``: sleeps ``delay`` seconds, then classifies.

``fail_next = N`` makes the next N completions fail whatever the mode.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

MODES = ("classify", "text", "invalid", "fail", "slow")
COMPLETION_PATHS = ("/v1/chat/completions", "/chat/completions")
CONTROL_FIELDS = ("mode", "rules", "delay", "fail_next", "invalid_outcome", "fail_status")
_FEEDBACK_TAG = re.compile(r"<feedback>(.*?)</feedback>", re.DOTALL)


class FakeLLMServer:
    """An OpenAI-compatible chat-completions endpoint on 127.0.0.1 with scriptable answers."""

    def __init__(
        self,
        *,
        mode: str = "classify",
        rules: Mapping[str, str] | None = None,
        delay: float = 2.0,
        record: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.mode = mode
        self.rules: dict[str, str] = dict(rules or {})
        self.delay = delay
        self.fail_next = 0
        self.fail_status = 500
        self.invalid_outcome = "maybe"
        self.record = Path(record) if record is not None else None
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd = _HTTPServer((host, port), self)
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL to give litellm as ``api_base`` (ends in ``/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeLLMServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self.serve_forever, name="fake-llm", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def serve_forever(self) -> None:
        """Serve on the calling thread (the command-line entry point)."""
        # A short poll keeps stop() (and so every test's teardown) quick.
        self._httpd.serve_forever(poll_interval=0.05)

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- control ---------------------------------------------------------------

    def configure(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Apply a ``/_control`` body; unknown keys or modes raise ``ValueError``."""
        unknown = set(changes) - set(CONTROL_FIELDS)
        if unknown:
            raise ValueError(f"unknown control fields: {sorted(unknown)}")
        if "mode" in changes and changes["mode"] not in MODES:
            raise ValueError(f"unknown mode {changes['mode']!r}; expected one of {MODES}")
        with self._lock:
            for key, value in changes.items():
                setattr(self, key, dict(value) if key == "rules" else value)
        return self.settings()

    def settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in CONTROL_FIELDS}

    def recorded(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.requests)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- completions -----------------------------------------------------------

    def record_request(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(body)
            if self.record is not None:
                with self.record.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(body) + "\n")

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The (status, JSON body) to send for one completion request."""
        with self._lock:
            mode = self.mode
            failing = self.fail_next > 0 or mode == "fail"
            if self.fail_next > 0:
                self.fail_next -= 1
            self._counter += 1
            serial = self._counter
        if failing:
            return self.fail_status, _error_body(self.fail_status)
        if mode == "slow":
            time.sleep(self.delay)
        if mode == "invalid":
            outcome = self.invalid_outcome
        else:
            outcome = self.choose(_feedback_of(body), _options_of(body))
        return 200, _completion(body, outcome, serial, as_text=mode == "text")

    def choose(self, feedback: str, options: list[str]) -> str:
        lowered = feedback.lower()
        for needle, outcome in list(self.rules.items()):
            if needle.lower() in lowered:
                return outcome
        return options[0] if options else ""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow-mode sleeper must not hold up stop()

    def __init__(self, address: tuple[str, int], fake: FakeLLMServer) -> None:
        super().__init__(address, _Handler)
        self.fake = fake


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    @property
    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def do_POST(self) -> None:
        fake = self.server.fake
        try:
            body = self._read_json()
        except ValueError as exc:
            self._send(400, {"error": {"message": str(exc), "type": "invalid_request_error"}})
            return
        if self._path == "/_control":
            self._control(body)
        elif self._path in COMPLETION_PATHS and isinstance(body, dict):
            fake.record_request(body)
            self._send(*fake.answer(body))
        else:
            self._send(404, _error_body(404))

    def do_GET(self) -> None:
        fake = self.server.fake
        if self._path == "/_requests":
            self._send(200, fake.recorded())
        elif self._path == "/_control":
            self._send(200, fake.settings())
        else:
            self._send(404, _error_body(404))

    def do_DELETE(self) -> None:
        if self._path == "/_requests":
            self.server.fake.clear()
            self._send(200, [])
        else:
            self._send(404, _error_body(404))

    def _control(self, body: Any) -> None:
        try:
            if not isinstance(body, dict):
                raise ValueError("control body must be a JSON object")
            self._send(200, self.server.fake.configure(body))
        except ValueError as exc:
            self._send(400, {"error": {"message": str(exc)}})

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"body is not JSON: {exc}") from exc

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test); nothing to tell it

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


# -- request parsing -------------------------------------------------------------


def _last_user_text(body: Mapping[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts
                return " ".join(str(part.get("text", "")) for part in content)
            return str(content or "")
    return ""


def _feedback_of(body: Mapping[str, Any]) -> str:
    """The feedback inside ``<feedback>…</feedback>`` (JSON-decoded when it is a
    JSON string), else the whole last user message."""
    text = _last_user_text(body)
    match = _FEEDBACK_TAG.search(text)
    if match is None:
        return text
    inner = match.group(1).strip()
    try:
        decoded = json.loads(inner)
    except json.JSONDecodeError:
        return inner
    return decoded if isinstance(decoded, str) else inner


def _enum_in(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    outcome = (schema.get("properties") or {}).get("outcome") or {}
    return [str(option) for option in outcome.get("enum") or []]


def _options_of(body: Mapping[str, Any]) -> list[str]:
    """The enum offered in the first tool's ``outcome`` parameter or in the
    ``response_format`` JSON schema."""
    for tool in body.get("tools") or []:
        options = _enum_in((tool.get("function") or {}).get("parameters"))
        if options:
            return options
    response_format = body.get("response_format") or {}
    return _enum_in((response_format.get("json_schema") or {}).get("schema"))


def _tool_name(body: Mapping[str, Any]) -> str | None:
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        return str((choice.get("function") or {}).get("name"))
    tools = body.get("tools") or []
    return str(tools[0]["function"]["name"]) if tools else None


# -- answers -----------------------------------------------------------------------


def _error_body(status: int) -> dict[str, Any]:
    kinds = {404: "not_found_error", 429: "rate_limit_error"}
    return {
        "error": {
            "message": f"fake LLM server error (HTTP {status})",
            "type": kinds.get(status, "server_error"),
            "param": None,
            "code": None,
        }
    }


def _completion(
    body: Mapping[str, Any], outcome: str, serial: int, *, as_text: bool
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None}
    finish_reason = "stop"
    tool = _tool_name(body)
    arguments = json.dumps({"outcome": outcome})
    if as_text:
        message["content"] = outcome
    elif tool is not None:
        message["tool_calls"] = [
            {
                "id": f"call_fake_{serial}",
                "type": "function",
                "function": {"name": tool, "arguments": arguments},
            }
        ]
        finish_reason = "tool_calls"
    else:  # response_format / plain prompt: JSON content
        message["content"] = arguments
    return {
        "id": f"chatcmpl-fake-{serial}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model") or "fake-model"),
        "system_fingerprint": "fp_fake",
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49},
    }


# -- as a child process -------------------------------------------------------------


class FakeLLMProcess:
    """This module run as a child process (``python tests/llm_server.py``),
    steered over HTTP, for tests whose daemon runs in another process."""

    def __init__(
        self,
        record: str | Path,
        *,
        mode: str = "classify",
        rules: Mapping[str, str] | None = None,
        delay: float = 2.0,
    ) -> None:
        self.record = Path(record)
        self._args = ["--mode", mode, "--rules", json.dumps(dict(rules or {}))]
        self._args += ["--delay", str(delay), "--record", str(self.record)]
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Base URL to give litellm as ``api_base`` (ends in ``/v1``)."""
        return self.root + "/v1"

    def start(self) -> FakeLLMProcess:
        command = [sys.executable, str(Path(__file__).resolve()), "--port", "0", *self._args]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"fake LLM server did not start (said {line!r})")
        self.port = int(line)
        return self

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None

    def __enter__(self) -> FakeLLMProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def control(self, **changes: Any) -> dict[str, Any]:
        """``POST /_control``: change mode, rules, delay, fail_next…"""
        settings: dict[str, Any] = self._call("POST", "/_control", changes)
        return settings

    def requests(self) -> list[dict[str, Any]]:
        """``GET /_requests``: the bodies received since start (or the last clear)."""
        bodies: list[dict[str, Any]] = self._call("GET", "/_requests")
        return bodies

    def recorded(self) -> list[dict[str, Any]]:
        """Every body ever received, from the ``--record`` file (readable after stop)."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.root + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)


# -- command line ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--record", help="append every request body to this JSON-lines file")
    parser.add_argument("--mode", default="classify", choices=MODES)
    parser.add_argument("--rules", default="{}", help='JSON object {"substring": "outcome"}')
    parser.add_argument("--delay", type=float, default=2.0, help="seconds to sleep in slow mode")
    args = parser.parse_args(argv)

    server = FakeLLMServer(
        mode=args.mode,
        rules=json.loads(args.rules),
        delay=args.delay,
        record=args.record,
        host=args.host,
        port=args.port,
    )

    def _stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() blocks until serve_forever returns, so it runs off the serving thread.
        threading.Thread(target=server._httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(server.port, flush=True)
    try:
        server.serve_forever()
    finally:
        server._httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
