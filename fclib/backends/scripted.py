"""The scripted backend: replies from a script instead of a model (the reference chains, tests)."""

from __future__ import annotations

from collections.abc import Sequence

from fclib.backends import GenerationSettings, Message, Reply


class ScriptedBackend:
    """Replies from a script instead of a model: the reference chains, and tests.

    `scripts` maps a problem's question to the assistant turns to send, in order. The
    conversation's question is found as the last user message that is a key of `scripts`;
    the number of assistant turns after it says which scripted turn comes next. A chain that
    runs past its script gets empty replies.
    """

    def __init__(self, scripts: dict[str, list[str]], model_id: str = "scripted"):
        self.scripts = scripts
        self.model_id = model_id

    def chat(
        self, conversations: Sequence[list[Message]], settings: GenerationSettings, tools: list[dict] | None = None
    ) -> list[Reply]:
        """The next scripted turn of each conversation."""
        replies = []
        for conversation in conversations:
            at = max(
                (i for i, m in enumerate(conversation) if m["role"] == "user" and m["content"] in self.scripts),
                default=None,
            )
            if at is None:
                raise KeyError("conversation matches no script")
            turn = sum(1 for m in conversation[at:] if m["role"] == "assistant")
            script = self.scripts[conversation[at]["content"]]
            text = script[turn] if turn < len(script) else ""
            replies.append(Reply(text=text, prompt_tokens=0, completion_tokens=0))
        return replies
