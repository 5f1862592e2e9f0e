"""A small OpenAI-compatible server on loopback that misbehaves on purpose.

It answers `/v1/chat/completions` from a `ScriptedBackend` (deterministic replies), and
`fault(n, body)` decides for request number n what goes wrong instead: "500", "429",
"hang" (no answer until after the client's timeout), "close" (drop the connection),
"malformed" (invalid JSON), "empty" (no choices), "deep" (JSON nested far deeper than a parser's
recursion limit), "trickle" (a normal answer sent a byte every `hang_s / 10` seconds), "surrogate"
(the reply's text with a lone surrogate, the JSON escape \\udcff, after it), ("huge", n) (n characters
of text), a dict {"status": 429, "headers": {...}} (that answer, e.g. with a `Retry-After`), or None
for a normal answer. With `echo_key`, every request is refused with HTTP 401 whose message repeats
the key it was sent, as some proxies do. `times` holds when each
request arrived, `bodies` what each sent. `refuse` names request parameters the server does not
take, answered as OpenAI's reasoning models answer `max_tokens`: HTTP 400 with
`param` and code `unsupported_parameter`. A request with `tools` is answered as the API answers
it: the call as `tool_calls`, no text.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fclib.backends import GenerationSettings
from fclib.backends.scripted import ScriptedBackend
from fclib.protocol import parse_call

Fault = Callable[[int, dict], "str | None"]


class FakeOpenAI:
    def __init__(
        self,
        backend: ScriptedBackend,
        fault: Fault | None = None,
        model: str = "fake-teacher",
        hang_s: float = 3.0,
        delay_s: float = 0.0,
        refuse: tuple[str, ...] = (),
        echo_key: bool = False,
    ):
        self.backend, self.fault, self.model = backend, fault or (lambda n, body: None), model
        self.echo_key = echo_key
        self.hang_s, self.delay_s, self.refuse = hang_s, delay_s, refuse
        self.requests = 0
        self.times: list[float] = []
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, payload: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def _echo_key(self) -> bool:
                if server.echo_key:
                    key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    message = f"Incorrect API key provided: {key}. You can find your API key at the dashboard."
                    self._send(401, json.dumps({"error": {"message": message, "code": "invalid_api_key"}}).encode())
                return server.echo_key

            def do_GET(self):
                if self._echo_key():
                    return None
                if self.path.rstrip("/").endswith("/models"):
                    self._send(
                        200, json.dumps({"object": "list", "data": [{"id": server.model, "object": "model"}]}).encode()
                    )
                else:
                    self._send(404, b'{"detail": "not found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self._echo_key():
                    return None
                with server.lock:
                    server.requests += 1
                    server.times.append(time.monotonic())
                    server.bodies.append(body)
                    n = server.requests
                refused = [name for name in server.refuse if name in body]
                if refused:
                    error = {
                        "message": f"Unsupported parameter: '{refused[0]}' is not supported with this model.",
                        "type": "invalid_request_error",
                        "param": refused[0],
                        "code": "unsupported_parameter",
                    }
                    return self._send(400, json.dumps({"error": error}).encode())
                if body.get("model") != server.model:
                    return self._send(
                        404, json.dumps({"error": {"message": f"model {body.get('model')} not found"}}).encode()
                    )
                fault = server.fault(n, body)
                if isinstance(fault, dict):
                    return self._send(fault["status"], b'{"error": {"message": "not now"}}', fault.get("headers"))
                if fault == "500":
                    return self._send(500, b'{"error": {"message": "internal error"}}')
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0"})
                if fault == "hang":
                    time.sleep(server.hang_s)
                    return self._send(500, b'{"error": {"message": "too late"}}')
                if fault == "close":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                if fault == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [{"message": {"content": "ans')
                if fault == "deep":
                    return self._send(200, b'{"id": "x", "choices": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
                if server.delay_s:
                    time.sleep(server.delay_s)
                settings = GenerationSettings(max_tokens=body.get("max_tokens", body.get("max_completion_tokens", 64)))
                text = server.backend.chat([body["messages"]], settings)[0].text
                if fault == "surrogate":
                    text += " \udcff"
                if isinstance(fault, tuple) and fault[0] == "huge":
                    text = "x" * fault[1]
                message = {"role": "assistant", "content": text}
                if body.get("tools"):  # as the API answers when given tools: the call as tool_calls, no text
                    call = parse_call(text, {t["function"]["name"] for t in body["tools"]})
                    arguments = json.dumps(call.kwargs)
                    function = {"name": call.name, "arguments": arguments}
                    message = {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": f"call{n}", "type": "function", "function": function}],
                    }
                choices = [] if fault == "empty" else [{"index": 0, "message": message, "finish_reason": "stop"}]
                payload = {
                    "id": f"r{n}",
                    "object": "chat.completion",
                    "created": 0,
                    "model": server.model,
                    "choices": choices,
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }
                if fault == "trickle":
                    return self._trickle(json.dumps(payload).encode())
                self._send(200, json.dumps(payload).encode())

            def _trickle(self, payload: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    for i in range(len(payload)):
                        self.wfile.write(payload[i : i + 1])
                        self.wfile.flush()
                        time.sleep(server.hang_s / 10)
                except OSError:  # the client gave up
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
