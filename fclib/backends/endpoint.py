"""The endpoint backend: any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, `transformers serve`)."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote, urlsplit

import httpcore2 as httpcore  # the pinned openai client speaks through httpx2 (a fork of httpx), on httpcore2
import httpx2 as httpx

from fclib.backends import GenerationSettings, Message, Reply, cut_at_stop

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 8 * 2**20  # an HTTP answer larger than this is refused while it is read (a reply is a few KB)
REPLY_CHARS_PER_TOKEN = 32  # a reply's text is cut at this many characters per token of its budget (min 1000)
MAX_TOOL_CALLS = 8  # tool calls kept of one reply (the agent executes the first)
MAX_TOOL_FIELD_CHARS = 4000  # characters kept of a tool call's name, id or arguments


def url_fault(url: str, parameter: str = "the URL") -> str | None:
    """Why `url` cannot be an endpoint's base URL parameter (None when it can, or when it is empty): not http(s),
    or credentials inside it. A URL parameter goes to params.yaml and the executed notebooks: a key in it would be
    written out."""
    if not url:
        return None
    if not url.startswith(("http://", "https://")):
        return f"{parameter} must start with http:// or https://"
    parts = urlsplit(url)
    secret_query = re.search(r"(?i)(^|[&;])[^=&;]*(key|token|secret|sig|password|auth)[^=&;]*=", parts.query)
    if parts.username or parts.password or secret_query:
        return (
            f"{parameter} must not carry credentials (user:password@ or ?key=...): it is written to params.yaml; "
            "put the key in an environment variable and name it with teacher_api_key_env"
        )
    return None


class EndpointError(RuntimeError):
    """The endpoint cannot serve at all: unreachable, wrong URL, unknown model, refused key."""


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, `transformers serve`).

    Up to `concurrency` requests are in flight at once. Transport faults are the `openai`
    client's to retry: 408, 409, 429 and 5xx answers, timeouts (`timeout` seconds a request),
    dropped connections, with exponential backoff and jitter, honouring `Retry-After` (in
    seconds, milliseconds or as a date). What the client takes for a success but is not, a
    malformed or empty answer, is retried here with the same kind of backoff. Both draw on
    one budget of `max_retries` per reply, and each reply counts the retries it took. A
    request the server refuses (400, 404, 422, ...) is not retried. A reply that still fails
    comes back with `error` set, never as an exception, so one bad request ends one chain,
    not the run.

    The API key is read from the environment variable `api_key_env` only; local servers
    need none. `hf_sampling` sends sampling through `transformers serve`'s
    `generation_config` field, which that server needs to sample at all (other servers
    reject the field).

    Servers differ in what they accept. The reply length goes as `max_tokens` until the server
    refuses that name (OpenAI's reasoning models answer 400 "use 'max_completion_tokens'"), then
    as `max_completion_tokens` for the rest of the run; `token_field` fixes either name. The seed
    is sent unless `send_seed=False` or the server refuses it as an unsupported parameter. Each
    switch is logged once and is not counted as a retry.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        concurrency: int = 16,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        api_key_env: str = "OPENAI_API_KEY",
        hf_sampling: bool = False,
        token_field: str = "auto",
        send_seed: bool = True,
    ):
        from openai import OpenAI

        if concurrency < 1 or max_retries < 0 or not timeout > 0:
            raise ValueError("concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        if token_field not in ("auto", *TOKEN_FIELDS):
            raise ValueError(f"token_field must be auto, {' or '.join(TOKEN_FIELDS)}, not {token_field!r}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self._secret = os.environ.get(api_key_env) or ""
        self.client = OpenAI(
            base_url=base_url,
            api_key=self._secret or "none",
            timeout=timeout,
            max_retries=max_retries,
            http_client=_http_client(timeout),
        )
        self._clients = {max_retries: self.client}  # the same client with less of the retry budget left
        self.base_url, self.model_id = base_url, model
        self.concurrency, self.max_retries = concurrency, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.api_key_env, self.hf_sampling = api_key_env, hf_sampling
        self.token_field = TOKEN_FIELDS[0] if token_field == "auto" else token_field
        self.adapts = token_field == "auto"  # may switch to max_completion_tokens when the server asks for it
        self.send_seed = send_seed

    def check(self) -> list[str]:
        """Fail clearly now, not once per request: the endpoint answers and serves the model."""
        import openai

        try:
            served = [m.id for m in self.client.with_options(max_retries=1).models.list()]
        except openai.AuthenticationError as e:
            raise EndpointError(
                self.redact(f"{self.base_url} refused the API key: set ${self.api_key_env} ({e})")
            ) from None
        except openai.APIConnectionError as e:
            raise EndpointError(
                self.redact(f"cannot reach {self.base_url}: {e}. Is the server running, and is the URL right?")
            ) from None
        except openai.APIStatusError as e:
            raise EndpointError(
                f"{self.base_url}/models answered HTTP {e.status_code}: is this an OpenAI-compatible /v1 URL?"
            ) from None
        except (openai.APIResponseValidationError, ValueError, RecursionError) as e:
            raise EndpointError(
                self.redact(f"{self.base_url}/models gave an answer that is not a model list ({type(e).__name__})")
            ) from None
        if served and self.model_id not in served:
            shown = ", ".join(served[:10]) + (" ..." if len(served) > 10 else "")
            raise EndpointError(f"{self.base_url} does not serve model {self.model_id!r}; it serves: {shown}")
        return served

    def redact(self, text: str) -> str:
        """`text` without the API key: some servers and proxies echo the key they were sent in their errors."""
        secret = self._secret
        if len(secret) < 4:
            return text
        for form in {secret, quote(secret, safe=""), json.dumps(secret)[1:-1]}:
            text = text.replace(form, f"[${self.api_key_env} redacted]")
        return text

    def chat(
        self, conversations: Sequence[list[Message]], settings: GenerationSettings, tools: list[dict] | None = None
    ) -> list[Reply]:
        """One reply per conversation; `concurrency` requests at a time. A request that fails, whatever the reason,
        fails its own reply (`error` set), never the others."""
        jobs = [(c, settings, tools, settings.seed_of(i)) for i, c in enumerate(conversations)]
        if len(jobs) == 1 or self.concurrency == 1:
            return [self._confined(*job) for job in jobs]
        with ThreadPoolExecutor(min(self.concurrency, len(jobs))) as pool:
            return list(pool.map(lambda job: self._confined(*job), jobs))

    def _confined(
        self, conversation: list[Message], settings: GenerationSettings, tools: list[dict] | None, seed: int
    ) -> Reply:
        """`_request`, with anything it raises turned into this reply's error (the key redacted from it)."""
        t0 = time.perf_counter()
        try:
            reply = self._request(_encodable(conversation), settings, tools, seed)
        except Exception as e:  # whatever an endpoint sends: one request fails, not its batch
            log.warning("a request failed: %s", self.redact(f"{type(e).__name__}: {e}")[:300])
            reply = Reply("", 0, 0, "error", latency_s=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
        if reply.error is not None:
            reply.error = self.redact(reply.error)[:2000]
        return reply

    def _body(self, settings: GenerationSettings, tools: list[dict] | None, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {self.token_field: settings.max_tokens, "temperature": settings.temperature}
        if self.send_seed:
            body["seed"] = seed
        if settings.temperature > 0:
            body["top_p"] = settings.top_p
        if settings.stop:
            body["stop"] = list(settings.stop)
        if tools:
            body["tools"] = tools
        extra = dict(settings.extra)
        if self.hf_sampling:
            config = {"max_new_tokens": settings.max_tokens, "do_sample": settings.temperature > 0}
            if settings.temperature > 0:
                config.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
            extra["generation_config"] = json.dumps(config)
        if extra:
            body["extra_body"] = extra
        return body

    def _request(
        self, conversation: list[Message], settings: GenerationSettings, tools: list[dict] | None, seed: int
    ) -> Reply:
        import openai

        body = self._body(settings, tools, seed)
        t0 = time.perf_counter()
        retries = 0
        while True:
            left = self.max_retries - retries
            client = self._clients.get(left) or self._clients.setdefault(
                left, self.client.with_options(max_retries=left)
            )
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=self.model_id, messages=conversation, **body
                )
                retries += raw.retries_taken
                reply = _reply_from(raw.parse(), settings.stop, settings.max_tokens)
                reply.latency_s, reply.retries = time.perf_counter() - t0, retries
                return reply
            except openai.APIStatusError as e:
                error = f"HTTP {e.status_code}: {_detail(e)}"
                if self._adapt(_refused_parameter(e)):  # sent again in the form the server takes, not a retry
                    body = self._body(settings, tools, seed)
                    continue
                if not _client_retries(e):
                    return Reply("", 0, 0, "error", latency_s=time.perf_counter() - t0, retries=retries, error=error)
                retries = self.max_retries  # the client spent what was left of the budget
                break
            except openai.APIConnectionError as e:  # timeouts too: retried by the client until the budget ran out
                error = f"{type(e).__name__}: {e}"
                retries = self.max_retries
                break
            except (openai.APIResponseValidationError, ValueError, RecursionError) as e:  # malformed, empty, too deep
                error = f"{type(e).__name__}: {str(e)[:300]}"
                if retries >= self.max_retries:
                    break
                delay = min(self.max_backoff, self.backoff * 2**retries) * (0.75 + random.random() / 4)
                log.info("malformed answer (%s); retry %d in %.1fs", self.redact(error), retries + 1, delay)
                time.sleep(delay)
                retries += 1
        error = f"gave up after {retries + 1} attempts; last: {error}"
        return Reply("", 0, 0, "error", latency_s=time.perf_counter() - t0, retries=retries, error=error)

    def _adapt(self, refused: str | None) -> bool:
        """Stop sending what the server refused, where that is allowed; whether anything changed."""
        if refused == "max_tokens" and self.adapts and self.token_field == "max_tokens":
            log.warning("%s refuses max_tokens: sending max_completion_tokens from now on", self.base_url)
            self.token_field = "max_completion_tokens"
            return True
        if refused == "seed" and self.send_seed:
            log.warning("%s refuses seed: sending no seed from now on (samples are not reproducible)", self.base_url)
            self.send_seed = False
            return True
        # another request may have switched first: send again when what was refused is no longer sent
        return refused is not None and refused not in self._body(GenerationSettings(), None, 0)


TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def _refused_parameter(e: Any) -> str | None:
    """The request parameter a 400 answer refuses as unsupported (OpenAI: `param` with code unsupported_parameter)."""
    if e.status_code != 400:
        return None
    body = getattr(e, "body", None)
    error = body.get("error", body) if isinstance(body, dict) else {}
    error = error if isinstance(error, dict) else {}
    param = error.get("param") or getattr(e, "param", None)
    code = str(error.get("code") or getattr(e, "code", None) or "")
    text = str(error.get("message") or getattr(e, "message", "") or "")
    if param in ("max_tokens", "seed") and ("unsupported" in code or "not supported" in text.lower()):
        return param
    for name in ("max_tokens", "seed"):  # servers that say it in words only
        if f"'{name}'" in text and ("not supported" in text.lower() or "unsupported" in text.lower()):
            return name
    return None


def _client_retries(e: Any) -> bool:
    """Whether the openai client retries an HTTP error (it does for 408, 409, 429 and 5xx, unless told not to)."""
    headers = getattr(getattr(e, "response", None), "headers", None) or {}
    if headers.get("x-should-retry") in ("true", "false"):
        return headers.get("x-should-retry") == "true"
    return e.status_code in (408, 409, 429) or e.status_code >= 500


class MalformedReply(ValueError):
    """A response without a usable choice."""


def _reply_from(response: Any, stop: Sequence[str], max_tokens: int = 64) -> Reply:
    """A Reply from a chat completion; servers that ignore `stop` are cut here, and so is a reply far longer than
    its token budget allows (`REPLY_CHARS_PER_TOKEN`): it is stored and sent back, and an endpoint may send anything."""
    choices = getattr(response, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None:
        raise MalformedReply("the response has no choice with a message")
    choice = choices[0]
    text = choice.message.content or ""
    if not isinstance(text, str):
        raise MalformedReply(f"the message content is {type(text).__name__}, not text")
    cut = cut_at_stop(text, stop)
    limit = max(1000, REPLY_CHARS_PER_TOKEN * max_tokens)
    too_long = len(cut if cut is not None else text) > limit
    if too_long:
        cut = (cut if cut is not None else text)[:limit]
    tool_calls = None
    if choice.message.tool_calls:
        tool_calls = [
            {
                "id": str(tc.id)[:MAX_TOOL_FIELD_CHARS],
                "type": "function",
                "function": {
                    "name": str(tc.function.name)[:MAX_TOOL_FIELD_CHARS],
                    "arguments": str(tc.function.arguments)[:MAX_TOOL_FIELD_CHARS],
                },
            }
            for tc in choice.message.tool_calls[:MAX_TOOL_CALLS]
        ]
    usage = getattr(response, "usage", None)
    finish = "length" if too_long else "stop" if cut is not None else (choice.finish_reason or "stop")
    return Reply(
        text=cut if cut is not None else text,
        prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
        completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        finish_reason=finish,
        tool_calls=tool_calls,
    )


def _detail(e: Any) -> str:
    """The server's own explanation of an HTTP error, short."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        body = body.get("detail") or body.get("message") or body.get("error") or body
    return str(body or e.message)[:300]


def _encodable(conversation: list[Message]) -> list[Message]:
    """The conversation as it can be sent: a lone surrogate (an endpoint may return one, as the JSON escape
    \\udcff) cannot be encoded as UTF-8 and becomes U+FFFD. The chain's own record keeps the exact text."""
    try:
        json.dumps(conversation, ensure_ascii=False).encode("utf-8")
        return conversation
    except UnicodeEncodeError:
        return _mended(conversation)


def _mended(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_mended(v) for v in value]
    if isinstance(value, dict):
        return {_mended(k): _mended(v) for k, v in value.items()}
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


# An overall deadline per request. httpx bounds each read (`timeout`) but not their sum, so a server that
# trickles a byte at a time holds a request for ever. Each attempt sets its deadline in the thread making it;
# every read and write on the connection then waits at most the time left, and one past it is a timeout,
# which the openai client retries like any other. The bytes of one answer are counted against
# MAX_RESPONSE_BYTES the same way.
_attempt = threading.local()


def _bounded(timeout: float | None, kind: type[Exception]) -> float | None:
    """`timeout` cut to what is left of the attempt's deadline in this thread; `kind` once none is left."""
    deadline = getattr(_attempt, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise kind(f"the request took longer than {_attempt.total_s:g} s in all (request_timeout)")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    """A connection whose reads and writes keep to the attempt's deadline and count the answer's bytes."""

    def __init__(self, stream: Any):
        self.stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self.stream.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))
        _attempt.received = getattr(_attempt, "received", 0) + len(data)
        if _attempt.received > MAX_RESPONSE_BYTES:
            raise httpcore.ReadError(f"the answer is larger than {MAX_RESPONSE_BYTES} bytes")
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.stream.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
        return _Stream(self.stream.start_tls(ssl_context, server_hostname, _bounded(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self.stream.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, backend: Any):
        self.backend = backend

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, **kwargs: Any) -> Any:
        return _Stream(self.backend.connect_tcp(host, port, _bounded(timeout, httpcore.ConnectTimeout), **kwargs))

    def connect_unix_socket(self, path: str, timeout: float | None = None, **kwargs: Any) -> Any:
        return _Stream(self.backend.connect_unix_socket(path, _bounded(timeout, httpcore.ConnectTimeout), **kwargs))

    def sleep(self, seconds: float) -> None:
        self.backend.sleep(seconds)


class _Transport(httpx.HTTPTransport):
    """httpx's transport, each attempt given `total_s` seconds from its start to its last byte."""

    def __init__(self, total_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.total_s = total_s
        self._pool._network_backend = _Backend(self._pool._network_backend)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        _attempt.deadline, _attempt.total_s, _attempt.received = time.monotonic() + self.total_s, self.total_s, 0
        return super().handle_request(request)


def _http_client(total_s: float) -> Any:
    """An httpx client for the openai client whose every request attempt ends within `total_s` seconds."""
    from openai import DefaultHttpxClient
    from openai._constants import DEFAULT_CONNECTION_LIMITS

    return DefaultHttpxClient(transport=_Transport(total_s, limits=DEFAULT_CONNECTION_LIMITS))
