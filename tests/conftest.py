"""Shared fixtures: fake backends and the tiny random model."""

from __future__ import annotations

import pytest
from hypothesis import settings

from fclib.backends import GenerationSettings, Reply

# Property tests draw the same examples on every run, and keep no database of earlier failures between runs:
# CI gives the same verdict on the same commit. A failure found once is kept as an explicit @example.
settings.register_profile("fclib", derandomize=True, database=None, print_blob=True)
settings.load_profile("fclib")


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
    from fclib.tasks.gsm8k import SHIPPED

    return SHIPPED  # shipped with the package: no test depends on anything beside the project


def pytest_collection_modifyitems(config, items):
    """The notebooks under nbval run the study: they belong to the slow tier, which the quick tier
    (`./test.sh -m "not slow"`) leaves out."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
