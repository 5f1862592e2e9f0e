"""Teacher generation over a real HTTP endpoint on loopback: faults, retries, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai._base_client
import pytest

from fclib.agent import AgentConfig
from fclib.backends import GenerationSettings
from fclib.backends.endpoint import EndpointError, OpenAIBackend
from fclib.backends.scripted import ScriptedBackend
from fclib.chains import generate, read_chains
from fclib.problems import write_problems
from fclib.tasks import TASKS, fol, gsm8k, reference_script
from fclib.teacher import summarize
from tests.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]
CONFIG = AgentConfig(max_steps=16)


@pytest.fixture(scope="module")
def problems(gsm8k_dir):
    gsm = [p for p in gsm8k.load("train", gsm8k_dir)[:12] if _has_reference(p)][:3]
    return fol.generate(3, seed=1, nmax=4, split="train") + gsm


def _has_reference(p):
    try:
        reference_script(p)
        return True
    except ValueError:
        return False


def teacher(problems, **kwargs):
    return FakeOpenAI(ScriptedBackend({p.question: reference_script(p) for p in problems}), **kwargs)


def backend(server, **kwargs):
    kwargs = {"concurrency": 4, "timeout": 1.0, "max_retries": 3, "backoff": 0.01, **kwargs}
    return OpenAIBackend(server.base_url, "fake-teacher", **kwargs)


def strip(records):
    """Records without what differs between two identical runs (timing, retries)."""
    return sorted(
        json.dumps({k: v for k, v in r.items() if k not in ("latency_s", "retries")}, sort_keys=True) for r in records
    )


def test_backend_replies_with_usage_and_checks_the_model(problems):
    with teacher(problems) as server:
        b = backend(server)
        assert b.check() == ["fake-teacher"]
        messages = [{"role": "user", "content": problems[0].question}]
        reply = b.chat([messages], GenerationSettings())[0]
        assert reply.error is None and reply.text == reference_script(problems[0])[0]
        assert (reply.prompt_tokens, reply.completion_tokens, reply.retries) == (10, 5, 0)
        with pytest.raises(EndpointError, match="does not serve model 'gpt-x'.*fake-teacher"):
            OpenAIBackend(server.base_url, "gpt-x").check()
        refused = OpenAIBackend(server.base_url, "gpt-x", max_retries=3).chat([messages], GenerationSettings())[0]
        assert refused.error.startswith("HTTP 404") and "not found" in refused.error and refused.retries == 0
    with pytest.raises(EndpointError, match="cannot reach"):
        OpenAIBackend(server.base_url, "fake-teacher").check()


@pytest.mark.parametrize("refused", [("max_tokens",), ("seed",), ("max_tokens", "seed")])
def test_an_endpoint_refusing_max_tokens_or_seed_gets_what_it_takes(problems, tmp_path, refused):
    with teacher(problems) as server:
        expected = generate(backend(server), problems, tmp_path / "plain.jsonl", k=2, config=CONFIG, source="t")
    with teacher(problems, refuse=refused) as server:
        b = backend(server)
        records = generate(b, problems, tmp_path / "chains.jsonl", k=2, config=CONFIG, source="t")
        bodies = server.bodies
    assert strip(records) == strip(expected) and all(r["retries"] == 0 for r in records)
    refused_at = [i for i, body in enumerate(bodies) if set(refused) & set(body)]
    # the switch is remembered: only requests already in flight when it happened are refused
    assert 1 <= len(refused_at) <= b.concurrency * len(refused) < len(bodies) // 2, (len(refused_at), len(bodies))
    later = bodies[max(refused_at) + 1 :]
    if "max_tokens" in refused:
        assert all(body["max_completion_tokens"] == CONFIG.max_tokens_per_turn for body in later)
    # told to send max_tokens, the backend does not switch: each request fails, recorded, not retried
    with teacher(problems, refuse=("max_tokens",)) as server:
        fixed = backend(server, token_field="max_tokens")
        reply = fixed.chat([[{"role": "user", "content": problems[0].question}]], GenerationSettings())[0]
        assert reply.error.startswith("HTTP 400") and "max_tokens" in reply.error and reply.retries == 0
    with teacher(problems) as server:  # send_seed=False sends none from the start
        backend(server, send_seed=False).chat([[{"role": "user", "content": "x"}]], GenerationSettings())
        assert "seed" not in server.bodies[0]


def test_the_native_protocol_sends_tools_and_reads_tool_calls(problems, tmp_path):
    native = AgentConfig(max_steps=16, protocol="native")
    with teacher(problems) as server:
        records = generate(backend(server), problems, tmp_path / "chains.jsonl", k=2, config=native, source="t")
        bodies = server.bodies
    assert all(r["outcome"] == "correct" for r in records), [r["outcome"] for r in records]
    assert all(body["tools"] and "stop" not in body for body in bodies)
    by_id = {p.id: p for p in problems}
    for r in records:
        turns = [m for m in r["messages"][r["n_prompt"] :] if m["role"] == "assistant"]
        assert turns and all(m["tool_calls"] and not m["content"] for m in turns)
        schemas = TASKS[r["task"]].toolset(by_id[r["problem_id"]]).openai_tools()
        assert r["tools"] == schemas  # stored with the chain, for the pairs


def test_api_key_only_from_the_environment(monkeypatch):
    monkeypatch.setenv("FCLIB_TEST_KEY", "sk-secret")
    b = OpenAIBackend("http://127.0.0.1:9/v1", "m", api_key_env="FCLIB_TEST_KEY")
    assert b.client.api_key == "sk-secret"
    with pytest.raises(ValueError, match="http"):
        OpenAIBackend("127.0.0.1:9/v1", "m")


@pytest.mark.parametrize("kind", ["500", "429", "hang", "close", "malformed", "empty"])
def test_transient_faults_are_retried_and_persistent_ones_recorded(problems, tmp_path, kind, monkeypatch):
    doomed = problems[0].question  # this problem's requests always fail; every other first attempt fails too
    # the openai client's own backoff (0.5 s doubling) shortened, as backend() shortens fclib's: what is retried
    # and how often is under test here, not how long the client waits (the Retry-After tests below time that)
    monkeypatch.setattr(openai._base_client, "INITIAL_RETRY_DELAY", 0.01)
    monkeypatch.setattr(openai._base_client, "MAX_RETRY_DELAY", 0.05)
    seen = set()

    def fault(n, body):
        question = next(
            m["content"] for m in reversed(body["messages"]) if m["role"] == "user" and m["content"] in scripts
        )
        if question == doomed:
            return kind
        sig = json.dumps([body["messages"], body["seed"]])  # samples differ by seed
        if sig not in seen:
            seen.add(sig)
            return kind
        return None

    scripts = {p.question: reference_script(p) for p in problems}
    path = tmp_path / "chains.jsonl"
    with teacher(problems, fault=fault, hang_s=1.5) as server:
        records = generate(backend(server), problems, path, k=2, config=CONFIG, progress=False)
    assert len(records) == 2 * len(problems)
    failed = [r for r in records if r["outcome"] == "error"]
    assert {r["problem_id"] for r in failed} == {problems[0].id}
    assert all("gave up after 4 attempts" in r["reason"] for r in failed)
    others = [r for r in records if r["problem_id"] != problems[0].id]
    assert all(r["outcome"] == "correct" for r in others)
    assert all(r["retries"] >= 1 for r in others)  # every first attempt failed

    # The rerun against a healthy server redoes the failed chains only.
    with teacher(problems) as server:
        records = generate(backend(server), problems, path, k=2, config=CONFIG, progress=False)
        redone = server.requests
    assert all(r["outcome"] == "correct" for r in records)
    assert redone == 2 * len(reference_script(problems[0]))
    on_disk, bad = read_chains(path)
    assert bad == 0 and len(on_disk) == len(path.read_text().splitlines()) == 2 * len(problems)


@pytest.mark.parametrize(
    "header, value, at_least",
    [
        ("Retry-After", "1", 0.95),  # seconds
        ("retry-after-ms", "1200", 1.15),  # milliseconds
        ("Retry-After", "date", 1.0),  # an HTTP date, whole seconds: 2 to 3 s ahead
    ],
)
def test_retry_after_is_honoured_in_seconds_milliseconds_or_a_date(problems, header, value, at_least):
    """Without the header the client waits 0.5 s at most before its first retry; with it, what the server asked."""
    from email.utils import formatdate

    def fault(n, body):
        if n > 1:
            return None
        said = formatdate(time.time() + 3, usegmt=True) if value == "date" else value
        return {"status": 429, "headers": {header: said}}

    with teacher(problems, fault=fault) as server:
        reply = backend(server, concurrency=1).chat(
            [[{"role": "user", "content": problems[0].question}]], GenerationSettings()
        )[0]
        assert reply.error is None and reply.retries == 1 and server.requests == 2
        waited = server.times[1] - server.times[0]
    assert waited >= at_least, f"retried after {waited:.2f} s"
    assert waited < at_least + 3


def test_request_timeout_reaches_the_client(problems):
    """The timeout was a fixed 60 s that no parameter reached; now `request_timeout` is the client's timeout."""
    from fclib.backends import open_teacher

    with teacher(problems, fault=lambda n, body: "hang" if n == 1 else None, hang_s=1.0) as server:
        with open_teacher("fake-teacher", server.base_url, request_timeout=0.3) as b:
            assert b.client.timeout == 0.3
            t0 = time.monotonic()
            reply = b.chat([[{"role": "user", "content": problems[0].question}]], GenerationSettings())[0]
        assert reply.error is None and reply.retries == 1 and time.monotonic() - t0 < 1.0 + 0.6


def test_truncated_last_line_and_changed_settings(problems, tmp_path):
    path = tmp_path / "chains.jsonl"
    with teacher(problems) as server:
        first = generate(backend(server), problems, path, k=1, config=CONFIG, progress=False)
        with open(path, "a") as f:
            f.write(json.dumps(first[0])[:40])  # a writer killed mid-line
        again = generate(backend(server), problems, path, k=1, config=CONFIG, progress=False)
        assert server.requests == sum(len(reference_script(p)) for p in problems)  # nothing was redone
        assert strip(again) == strip(first)
        assert len(path.read_text().splitlines()) == len(problems)

        hotter = AgentConfig(max_steps=16, temperature=0.7)
        with pytest.raises(ValueError, match=r"other settings \(agent.temperature: 0.0 -> 0.7\).*overwrite=True"):
            generate(backend(server), problems, path, k=1, config=hotter, progress=False)
        generate(backend(server), problems, path, k=1, config=hotter, overwrite=True, progress=False)
    backups = list(tmp_path.glob("chains.teacher.replaced-*.jsonl"))
    assert len(backups) == 1 and len(backups[0].read_text().splitlines()) == len(problems)
    assert json.loads((tmp_path / "chains.meta.json").read_text())["sources"]["teacher"]["agent"]["temperature"] == 0.7


RUN = """
import sys
from fclib.agent import AgentConfig
from fclib.chains import generate
from fclib.backends.endpoint import OpenAIBackend
from fclib.problems import read_problems
generate(OpenAIBackend(sys.argv[2], "fake-teacher", concurrency=2), read_problems(sys.argv[1]), sys.argv[3],
         k=3, config=AgentConfig(max_steps=16), chunk_size=2, progress=False)
"""


def test_a_killed_run_resumes_to_the_same_chains(problems, tmp_path):
    write_problems(tmp_path / "problems.jsonl", problems)
    total = 3 * len(problems)
    with teacher(problems, delay_s=0.03) as server:
        cmd = [sys.executable, "-c", RUN, str(tmp_path / "problems.jsonl"), server.base_url]
        subprocess.run(cmd + [str(tmp_path / "whole.jsonl")], check=True, cwd=ROOT, timeout=120)

        killed = tmp_path / "killed.jsonl"
        proc = subprocess.Popen(cmd + [str(killed)], cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            not killed.exists() or len(killed.read_text().splitlines()) < total // 2
        ):
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        partial, _ = read_chains(killed)
        assert 0 < len(partial) < total, "the run was not interrupted halfway"

        subprocess.run(cmd + [str(killed)], check=True, cwd=ROOT, timeout=120)
    whole, _ = read_chains(tmp_path / "whole.jsonl")
    resumed, bad = read_chains(killed)
    assert bad == 0 and len(killed.read_text().splitlines()) == total
    assert strip(resumed) == strip(whole)


def test_summary_counts_yield_and_cost():
    def rec(pid, outcome, source="teacher", task="fol"):
        return {
            "source": source,
            "model": "m",
            "task": task,
            "problem_id": pid,
            "outcome": outcome,
            "usage": {"prompt_tokens": 100, "completion_tokens": 10},
            "retries": 1,
            "latency_s": 0.5,
        }

    records = [
        rec("a", "correct"),
        rec("a", "wrong_answer"),
        rec("b", "correct"),
        rec("b", "error"),
        rec("c", "max_steps"),
        rec("c", "invalid_call"),
        rec("d", "correct", task="gsm8k"),
    ]
    s = summarize(records, prices={"prompt": 1.0, "completion": 2.0})
    assert s["outcomes"]["teacher"]["fol"]["correct"] == 2 and s["outcomes"]["teacher"]["fol"]["error"] == 1
    y = s["yield"]["teacher"]["fol"]
    assert (y["problems"], y["with_correct"], y["with_incorrect"], y["with_both"]) == (3, 2, 2, 1)
    assert y["share_with_both"] == pytest.approx(1 / 3)
    t = s["tokens"]["teacher"]
    assert (t["chains"], t["prompt_tokens"], t["completion_tokens"], t["retries"]) == (7, 700, 70, 7)
    assert t["cost"] == pytest.approx((700 * 1.0 + 70 * 2.0) / 1e6)


def test_step_replies_are_labelled_against_the_reference_and_resume(queue_backend, tmp_path):
    from fclib.teacher import sample_steps
    from tests.helpers import scripted_chain

    p = fol.generate(1, seed=0, nmax=4)[
        0
    ]  # reference: truth_values('shiny'), exists([True, False, False]), answer(True)
    ref = scripted_chain(p, reference_script(p), 0, source="reference")
    replies = [
        "answer(value=True)",  # turn 1: answers before looking anything up
        "I am not sure.",  # turn 1, second sample: no call
        "exists(values=[True, False, False])",  # turn 2: the reference's own call
        "exists(values=[True, 'x'])",  # turn 2: an invalid call
        "answer(value=False)",  # turn 3: the final function with another answer
        "truth_values(predicate='round')",  # turn 3: one more lookup where the reference answers
    ]
    backend = queue_backend(replies)
    path = tmp_path / "steps.jsonl"
    steps = sample_steps(
        backend, [p], path, [ref], samples=2, config=AgentConfig(temperature=0.8), chunk_size=4, progress=False
    )
    assert [(s["step"], s["verdict"]) for s in steps] == [
        (0, "other_function"),
        (0, "parse_error"),
        (1, "same"),
        (1, "invalid_call"),
        (2, "wrong_answer"),
        (2, "other_function"),
    ]
    # each reply was asked for with the reference's history up to its turn, nothing after it
    assert [len(m) for m in backend.sent] == [s["turn"] for s in steps]
    assert all(m == ref["messages"][: len(m)] for m in backend.sent)
    assert [s["sample"] for s in steps] == list(range(6)) and steps[0]["reference_sample"] == 0

    again = sample_steps(
        queue_backend([]), [p], path, [ref], samples=2, config=AgentConfig(temperature=0.8), progress=False
    )
    assert again == steps and len(path.read_text().splitlines()) == 6  # nothing asked twice
    with pytest.raises(ValueError, match=r"other settings .*samples: 2 -> 3"):
        sample_steps(
            queue_backend([]), [p], path, [ref], samples=3, config=AgentConfig(temperature=0.8), progress=False
        )
    with pytest.raises(ValueError, match="at least 1"):
        sample_steps(queue_backend([]), [p], path, [ref], samples=0)


def test_a_failed_step_request_is_asked_again(queue_backend, tmp_path):
    from fclib.backends import Reply
    from fclib.teacher import sample_steps
    from tests.helpers import scripted_chain

    p = fol.generate(1, seed=0, nmax=4)[0]
    ref = scripted_chain(p, reference_script(p), 0, source="reference")
    failed = Reply("", 0, 0, "error", error="HTTP 503")
    path = tmp_path / "steps.jsonl"
    first = sample_steps(queue_backend(["look()", failed, "look()"]), [p], path, [ref], progress=False)
    assert [(s["step"], s["verdict"]) for s in first] == [(0, "invalid_call"), (1, "error"), (2, "invalid_call")]
    assert first[1]["error"] == "HTTP 503"
    second = sample_steps(queue_backend(["exists(values=[True])"]), [p], path, [ref], progress=False)
    assert [(s["step"], s["verdict"]) for s in second] == [
        (0, "invalid_call"),
        (1, "same_function"),
        (2, "invalid_call"),
    ]
    assert len(path.read_text().splitlines()) == 3  # the failed record was replaced, not kept beside the new one


def test_an_endpoint_that_fails_every_request_leaves_counted_failures(problems, tmp_path, caplog):
    """Against an endpoint failing every request, step sampling once returned 0 of 8 replies without a word."""
    from fclib.teacher import sample_steps
    from tests.helpers import scripted_chain

    refs = [scripted_chain(p, reference_script(p), 0, source="reference") for p in problems[:2]]
    asked = sum(sum(m["role"] == "assistant" for m in r["messages"][r["n_prompt"] :]) for r in refs)
    path = tmp_path / "steps.jsonl"
    with teacher(problems, fault=lambda n, body: "500") as server, caplog.at_level("WARNING"):
        steps = sample_steps(backend(server, max_retries=1), problems, path, refs, progress=False)
    assert len(steps) == asked and {s["verdict"] for s in steps} == {"error"}
    assert all("HTTP 500" in s["error"] for s in steps)
    assert f"{asked} of {asked} requests failed" in caplog.text
    with teacher(problems) as server:
        steps = sample_steps(backend(server), problems, path, refs, progress=False)
        assert server.requests == asked  # every failed request was asked again, nothing else
    assert "error" not in {s["verdict"] for s in steps} and len(path.read_text().splitlines()) == asked


def test_a_backend_that_raises_fails_the_chunk_counted(queue_backend, tmp_path):
    from fclib.teacher import sample_steps
    from tests.helpers import scripted_chain

    class Broken:
        model_id = "broken"

        def chat(self, conversations, settings, tools=None):
            raise ConnectionError("the backend fell over")

    p = fol.generate(1, seed=0, nmax=4)[0]
    ref = scripted_chain(p, reference_script(p), 0, source="reference")
    steps = sample_steps(Broken(), [p], tmp_path / "steps.jsonl", [ref], progress=False)
    assert [s["verdict"] for s in steps] == ["error"] * 3 and "fell over" in steps[0]["error"]


def test_model_text_utf8_cannot_encode_is_stored_and_read_back_losslessly(tmp_path):
    """An endpoint can return any str, an unpaired surrogate too (the JSON escape \\udcff): every writer stores it."""
    from fclib.pairs import build_pairs, save_pairs
    from fclib.problems import Problem, read_problems, write_problems
    from fclib.runs import jsonl_line

    odd = "caf\u00e9 \u2200x \udcff \ud800"
    assert json.loads(jsonl_line({"t": odd})) == {"t": odd} and "\u2200" in jsonl_line({"t": "\u2200"})
    (problem,) = fol.generate(1, seed=3, nmax=4, split="train")
    script = reference_script(problem)
    scripts = {problem.question: [f"{script[0]} {odd}", *script[1:]]}
    chains = generate(
        ScriptedBackend(scripts, model_id="odd"),
        [problem],
        tmp_path / "chains.jsonl",
        k=2,
        config=CONFIG,
        progress=False,
    )
    stored, bad = read_chains(tmp_path / "chains.jsonl")
    assert bad == 0 and strip(stored) == strip(chains) and odd in json.dumps(stored, ensure_ascii=False)
    weird = Problem("p-odd", "fol", f"Is it true? {odd}", True, problem.meta)
    assert read_problems(write_problems(tmp_path / "problems.jsonl", [weird])) == [weird]
    # and the pair writer: the shared history and the rejected turn both hold the odd text
    from tests.helpers import scripted_chain

    chosen = scripted_chain(problem, [f"{script[0]} {odd}", *script[1:]], 0)
    rejected = scripted_chain(problem, [f"{script[0]} {odd}", f"look() {odd}", "look()"], 1)
    pairs = build_pairs([chosen, rejected], validation_share=0)
    assert len(pairs.train) == 1
    save_pairs(pairs, tmp_path / "pairs")
    (row,) = [json.loads(line) for line in (tmp_path / "pairs" / "train.jsonl").read_text().splitlines()]
    assert row == json.loads(json.dumps(pairs.train[0], sort_keys=True)) and odd in json.dumps(row, ensure_ascii=False)
    from fclib.pairs import load_pairs

    trained_on = json.dumps(load_pairs(tmp_path / "pairs")["train"][0], ensure_ascii=False)
    assert "caf\u00e9 \u2200x \ufffd \ufffd" in trained_on  # the dataset's documented escape for what UTF-8 cannot hold


def test_a_ledger_killed_at_any_byte_resumes_to_the_same_chains(tmp_path):
    """Cut the file inside every multi-byte character of its last record (FOL records hold ∀, →, ¬ raw), at its
    end, and at random bytes elsewhere: each resume gives the whole run's chains, and the cut line is kept beside
    the file."""
    import random

    problems = fol.generate(3, seed=5, nmax=4, split="train")
    scripted = ScriptedBackend({p.question: reference_script(p) for p in problems})
    whole_path = tmp_path / "whole.jsonl"
    whole = generate(scripted, problems, whole_path, k=2, config=CONFIG, progress=False)
    data = whole_path.read_bytes()
    assert len(data) != len(data.decode("utf-8"))  # multi-byte characters are there to be cut inside
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    inside_characters = {i for i in range(last_start, len(data)) if data[i] >= 0x80}  # every byte of a multi-byte one
    assert len(inside_characters) >= 6
    ends = set(range(len(data) - 3, len(data)))  # the record's end, its newline, the whole file
    cuts = sorted(inside_characters | ends | set(random.Random(0).sample(range(1, len(data)), 60)))
    for cut in cuts:
        path = tmp_path / f"cut{cut}" / "chains.jsonl"
        path.parent.mkdir()
        path.write_bytes(data[:cut])
        (tmp_path / f"cut{cut}" / "chains.meta.json").write_bytes((tmp_path / "whole.meta.json").read_bytes())
        resumed = generate(scripted, problems, path, k=2, config=CONFIG, progress=False)
        assert strip(resumed) == strip(whole), cut
        assert strip(read_chains(path)[0]) == strip(whole) and path.read_bytes().count(b"\n") == len(whole)
        partial = data[:cut][data[:cut].rfind(b"\n") + 1 :]
        side = path.with_name("chains.jsonl.cut")
        whole_record = partial.strip() and partial.decode("utf-8", "replace") in {
            json.dumps(r, ensure_ascii=False) for r in whole
        }
        if (
            partial.strip() and not whole_record
        ):  # a cut line is kept for inspection; a record cut of its newline is kept as is
            assert side.read_bytes() == partial + b"\n", cut
        else:
            assert not side.exists(), cut


def test_a_damaged_line_inside_a_ledger_is_never_dropped_silently(tmp_path):
    problems = fol.generate(2, seed=6, nmax=4, split="train")
    scripted = ScriptedBackend({p.question: reference_script(p) for p in problems})
    path = tmp_path / "chains.jsonl"
    generate(scripted, problems, path, k=2, config=CONFIG, progress=False)
    lines = path.read_bytes().split(b"\n")
    for damage in (lines[1][:50], b"\xff\xfe not utf-8", b'{"no": "key fields"}'):
        path.write_bytes(b"\n".join([lines[0], damage, *lines[2:]]))
        with pytest.raises(ValueError, match=r"chains.jsonl, line 2: unreadable record"):
            read_chains(path)
        with pytest.raises(ValueError, match=r"chains.jsonl, line 2"):
            generate(scripted, problems, path, k=2, config=CONFIG, progress=False)


def test_an_endpoint_that_echoes_the_key_never_gets_it_written(problems, tmp_path, monkeypatch, caplog):
    """Some proxies repeat the key they were sent in their 401: not in an error raised, logged or stored."""
    key = "sk-proj-" + "Zq7" * 16
    monkeypatch.setenv("FCLIB_TEST_KEY", key)
    path = tmp_path / "chains.jsonl"
    with teacher(problems, echo_key=True) as server, caplog.at_level("DEBUG"):
        b = backend(server, api_key_env="FCLIB_TEST_KEY")
        with pytest.raises(EndpointError, match="refused the API key") as refused:
            b.check()
        records = generate(b, problems, path, k=2, config=CONFIG, progress=False)  # the 401 mid-run
    assert key not in str(refused.value) and "[$FCLIB_TEST_KEY redacted]" in str(refused.value)
    assert all(r["outcome"] == "error" and "HTTP 401" in r["reason"] for r in records)
    assert all("redacted" in r["reason"] for r in records)
    assert key not in path.read_text() and key not in caplog.text


def test_a_trickling_answer_ends_at_the_request_deadline(problems):
    """A server that sends a byte at a time never trips the per-read timeout; the whole request has a deadline."""
    with teacher(problems, fault=lambda n, body: "trickle" if n == 1 else None, hang_s=3.0) as server:
        t0 = time.monotonic()
        reply = backend(server, timeout=1.0).chat(
            [[{"role": "user", "content": problems[0].question}]], GenerationSettings()
        )[0]
        took = time.monotonic() - t0
    # the first attempt would take about 100 s (300-odd bytes, 0.3 s each); it is cut at 1 s and retried
    assert reply.error is None and reply.retries == 1 and took < 5, (took, reply)


def test_one_answer_nested_too_deep_fails_its_request_only(problems, tmp_path):
    doomed = problems[0].question

    def fault(n, body):
        return "deep" if any(m["content"] == doomed for m in body["messages"]) else None

    with teacher(problems, fault=fault) as server:
        records = generate(backend(server, concurrency=8), problems, tmp_path / "c.jsonl", k=2, config=CONFIG)
    failed = {r["problem_id"] for r in records if r["outcome"] == "error"}
    assert failed == {problems[0].id}, failed  # not every chain of its batch
    assert all(r["outcome"] == "correct" for r in records if r["problem_id"] != problems[0].id)
    assert all("RecursionError" in r["reason"] for r in records if r["outcome"] == "error")


def test_a_lone_surrogate_is_kept_in_the_ledger_and_sent_back_encodable(problems, tmp_path):
    path = tmp_path / "c.jsonl"
    with teacher(problems, fault=lambda n, body: "surrogate") as server:
        records = generate(backend(server), problems, path, k=1, config=CONFIG, progress=False)
        sent = [m["content"] for body in server.bodies for m in body["messages"] if m["role"] == "assistant"]
    assert all(r["outcome"] == "correct" for r in records), [r["reason"] for r in records]
    replies = [m["content"] for r in records for m in r["messages"][r["n_prompt"] :] if m["role"] == "assistant"]
    assert replies and all(text.endswith(" \udcff") for text in replies)  # the ledger keeps the exact text
    assert not any("\udcff" in text for text in sent)  # the endpoint gets text it can read
    sent_back = {text.replace("\ufffd", "\udcff") for text in sent if text.endswith(" \ufffd")}
    assert sent_back == {
        m["content"] for r in records for m in r["messages"][r["n_prompt"] : -1] if m["role"] == "assistant"
    }
    assert strip(read_chains(path)[0]) == strip(records)  # and reads it back as it was


def test_an_endpoint_reply_is_capped(problems):
    """A reply far past its token budget is cut before it is stored and sent back; an answer of megabytes is
    refused while it is read, and asked again."""
    from fclib.backends.endpoint import MAX_RESPONSE_BYTES, REPLY_CHARS_PER_TOKEN

    messages = [[{"role": "user", "content": problems[0].question}]]
    with teacher(problems, fault=lambda n, body: ("huge", 100_000)) as server:
        reply = backend(server).chat(messages, GenerationSettings(max_tokens=40))[0]
    assert len(reply.text) == max(1000, 40 * REPLY_CHARS_PER_TOKEN) and reply.finish_reason == "length"
    with teacher(problems, fault=lambda n, body: ("huge", MAX_RESPONSE_BYTES + 1) if n == 1 else None) as server:
        reply = backend(server).chat(messages, GenerationSettings(max_tokens=40))[0]
    assert reply.error is None and reply.retries == 1 and reply.text == reference_script(problems[0])[0]
