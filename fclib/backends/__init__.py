"""Chat backends behind one interface: many conversations in, one reply each out.

- `fclib.backends.local.LocalBackend`: a transformers model in this process, many
  conversations in one batch (left padding, stop strings, seeded sampling, a token limit).
- `fclib.backends.endpoint.OpenAIBackend`: any OpenAI-compatible endpoint, many requests in
  flight, the `openai` client's retries and timeout.
- `fclib.backends.scripted.ScriptedBackend`: replies from a script (reference chains, tests).
- `fclib.backends.server.LocalServer`: `transformers serve` on 127.0.0.1, for a local model
  behind a real endpoint.

The agent only ever calls `backend.chat(conversations, settings)`, so the same loop drives a
local student and a remote teacher. `open_teacher` opens whichever the parameters name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Message = dict[str, Any]


@dataclass
class Reply:
    """One generated assistant turn."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"  # stop | length | error
    tool_calls: list[dict[str, Any]] | None = None
    latency_s: float = 0.0
    retries: int = 0
    error: str | None = None


@dataclass
class GenerationSettings:
    """How to sample one reply; temperature 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    # One seed per conversation: a chain's samples then do not depend on which other chains
    # share its batch (the local backend draws each row from its own random stream; servers
    # that honour per-request seeds do the same). Without them the local backend seeds a batch.
    seeds: tuple[int, ...] = ()
    # One grammar per conversation (Lark, `Toolset.grammar`), or none: constrained decoding, for
    # backends whose `constrained_decoding` is True (the local one).
    grammars: tuple[str | None, ...] = ()
    # Whether a backend that keeps each conversation's keys and values for its next turn (the local one)
    # keeps these: False for conversations sent once (the replies at the steps of reference chains).
    remember: bool = True

    def seed_of(self, i: int) -> int:
        """The seed of conversation i."""
        return self.seeds[i] if self.seeds else self.seed


class ChatBackend(Protocol):
    """Anything that turns conversations into assistant replies."""

    model_id: str

    def chat(
        self, conversations: Sequence[list[Message]], settings: GenerationSettings, tools: list[dict] | None = None
    ) -> list[Reply]:
        """One reply per conversation, in order."""
        ...


def cut_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """Text before the first stop string (OpenAI semantics: the stop string is not included)."""
    hits = [text.index(s) for s in stop if s and s in text]
    return text[: min(hits)] if hits else None


@contextmanager
def open_teacher(
    model: str,
    url: str = "",
    backend: str = "inprocess",
    concurrency: int = 16,
    api_key_env: str = "OPENAI_API_KEY",
    log_dir: str | Path | None = None,
    request_timeout: float = 60.0,
    kv_cache: bool = True,
) -> Iterator[ChatBackend]:
    """The teacher as a chat backend, for the life of a `with` block.

    - `url` given: the OpenAI-compatible endpoint at `url`, serving `model`; the key comes from
      $`api_key_env`; checked at once (reachable, model served); a request that takes longer
      than `request_timeout` seconds is retried by the openai client.
    - else `backend="server"`: `transformers serve` with the local `model` on 127.0.0.1,
      stopped when the block ends.
    - else `backend="inprocess"`: the local `model` in this process, `concurrency`
      conversations per batch, reusing keys and values across turns unless `kv_cache=False`.
    """
    # here, not at the top: these modules import this one (Reply, GenerationSettings)
    from fclib.backends.endpoint import OpenAIBackend
    from fclib.backends.local import LocalBackend
    from fclib.backends.server import LocalServer

    if url:
        client = OpenAIBackend(url, model, concurrency=concurrency, api_key_env=api_key_env, timeout=request_timeout)
        client.check()
        yield client
    elif backend == "server":
        with LocalServer(model, log_path=Path(log_dir) / "server.log" if log_dir else None) as server:
            client = server.backend(concurrency=concurrency, timeout=request_timeout)
            client.check()
            yield client
    elif backend == "inprocess":
        yield LocalBackend.load(model, batch_size=concurrency, prefix_cache=kv_cache)
    else:
        raise ValueError(f"teacher backend must be 'inprocess' or 'server' (or give a URL), not {backend!r}")
