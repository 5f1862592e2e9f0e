"""Shared fixtures: fake backends and the tiny random model."""

from __future__ import annotations

from pathlib import Path

import pytest

from fclib.llm import GenerationSettings, Reply

ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = ROOT.parent / "shared" / "data" / "gsm8k"


class QueueBackend:
    """Replies from a fixed list, one per call and conversation, recording what it was sent."""

    model_id = "queue"

    def __init__(self, replies):
        self.replies = list(replies)
        self.sent = []

    def chat(self, conversations, settings: GenerationSettings, tools=None):
        out = []
        for conv in conversations:
            self.sent.append([dict(m) for m in conv])
            item = self.replies.pop(0) if self.replies else ""
            if isinstance(item, Exception):
                raise item
            out.append(item if isinstance(item, Reply) else Reply(text=item, prompt_tokens=10, completion_tokens=5))
        return out


@pytest.fixture
def queue_backend():
    return QueueBackend


@pytest.fixture(scope="session")
def tiny():
    from fclib.models import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def gsm8k_dir():
    if not (GSM8K_DIR / "train.jsonl").is_file():
        pytest.skip(f"GSM8K files not found at {GSM8K_DIR}")
    return GSM8K_DIR
