"""The endpoint backend: any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, `transformers serve`)."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fclib.backends import GenerationSettings, Message, Reply, cut_at_stop

log = logging.getLogger(__name__)


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
        self.client = OpenAI(
            base_url=base_url, api_key=os.environ.get(api_key_env) or "none", timeout=timeout, max_retries=max_retries
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
            raise EndpointError(f"{self.base_url} refused the API key: set ${self.api_key_env} ({e})") from None
        except openai.APIConnectionError as e:
            raise EndpointError(
                f"cannot reach {self.base_url}: {e}. Is the server running, and is the URL right?"
            ) from None
        except openai.APIStatusError as e:
            raise EndpointError(
                f"{self.base_url}/models answered HTTP {e.status_code}: is this an OpenAI-compatible /v1 URL?"
            ) from None
        if served and self.model_id not in served:
            shown = ", ".join(served[:10]) + (" ..." if len(served) > 10 else "")
            raise EndpointError(f"{self.base_url} does not serve model {self.model_id!r}; it serves: {shown}")
        return served

    def chat(
        self, conversations: Sequence[list[Message]], settings: GenerationSettings, tools: list[dict] | None = None
    ) -> list[Reply]:
        """One reply per conversation; `concurrency` requests at a time."""
        jobs = [(c, settings, tools, settings.seed_of(i)) for i, c in enumerate(conversations)]
        if len(jobs) == 1 or self.concurrency == 1:
            return [self._request(*job) for job in jobs]
        with ThreadPoolExecutor(min(self.concurrency, len(jobs))) as pool:
            return list(pool.map(lambda job: self._request(*job), jobs))

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
                reply = _reply_from(raw.parse(), settings.stop)
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
            except (openai.APIResponseValidationError, ValueError) as e:  # malformed or empty: ours to retry
                error = f"{type(e).__name__}: {e}"
                if retries >= self.max_retries:
                    break
                delay = min(self.max_backoff, self.backoff * 2**retries) * (0.75 + random.random() / 4)
                log.info("malformed answer (%s); retry %d in %.1fs", error, retries + 1, delay)
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


def _reply_from(response: Any, stop: Sequence[str]) -> Reply:
    """A Reply from a chat completion; servers that ignore `stop` are cut here."""
    choices = getattr(response, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None:
        raise MalformedReply("the response has no choice with a message")
    choice = choices[0]
    text = choice.message.content or ""
    cut = cut_at_stop(text, stop)
    tool_calls = None
    if choice.message.tool_calls:
        tool_calls = [
            {
                "id": tc.id,
                "type": "function",
                "function": {"name": tc.function.name, "arguments": tc.function.arguments},
            }
            for tc in choice.message.tool_calls
        ]
    usage = getattr(response, "usage", None)
    finish = "stop" if cut is not None else (choice.finish_reason or "stop")
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
