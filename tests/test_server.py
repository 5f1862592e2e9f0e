"""The integration test: generation through a real `transformers serve` on loopback."""

from __future__ import annotations

import os

import pytest

from fclib.agent import OUTCOMES, AgentConfig
from fclib.backends.endpoint import EndpointError
from fclib.backends.server import LocalServer
from fclib.chains import generate, read_chains
from fclib.tasks import fol


@pytest.mark.slow
def test_generation_through_transformers_serve(tmp_path):
    problems = fol.generate(2, seed=3, nmax=4, split="train")
    path = tmp_path / "chains.jsonl"
    with LocalServer("tiny", log_path=tmp_path / "server.log") as server:
        pid = server.process.pid
        assert server.base_url.startswith("http://127.0.0.1:")
        backend = server.backend(concurrency=2, timeout=60)
        assert backend.check() == [server.model_dir]
        with pytest.raises(EndpointError, match="does not serve model"):
            type(backend)(server.base_url, "other-model").check()
        config = AgentConfig(max_steps=2, max_tokens_per_turn=8, temperature=0.8)
        records = generate(backend, problems, path, k=2, config=config, progress=False)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped by its PID when the block ended
    assert [(r["problem_id"], r["sample"]) for r in records] == [(p.id, s) for p in problems for s in range(2)]
    assert all(r["model"] == server.model_dir and r["source"] == "teacher" for r in records)
    assert all(r["outcome"] in OUTCOMES and r["outcome"] != "error" for r in records), [r["reason"] for r in records]
    assert all(r["usage"]["prompt_tokens"] > 100 and r["usage"]["completion_tokens"] > 0 for r in records)
    assert all(r["messages"][-1]["role"] in ("user", "assistant") for r in records)
    assert len(read_chains(path)[0]) == 4


def test_a_missing_model_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LocalServer(str(tmp_path / "nothing"))
