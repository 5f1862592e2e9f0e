"""A run folder's files: read as written, written whole, held by one run at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from fclib import runs
from fclib.agent import AgentConfig
from fclib.backends.scripted import ScriptedBackend
from fclib.chains import generate, read_chains
from fclib.tasks import fol, gsm8k, reference_script

SEPARATORS = ["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e", "\r", "\x0b", "\x0c"]  # str.splitlines splits


def test_a_reply_holding_any_line_separator_is_one_record_everywhere(tmp_path):
    """Each of these in a model's reply once made notebook 02 fail on every rerun: the reader split the line."""
    problem = fol.generate(1, seed=3, nmax=4, split="train")[0]
    script = ["look" + "".join(SEPARATORS) + "()", *reference_script(problem)]
    backend = ScriptedBackend({problem.question: script}, "t")
    path = tmp_path / "chains.jsonl"
    records = generate(backend, [problem], path, k=1, config=AgentConfig(max_steps=12), progress=False)
    assert records[0]["messages"][records[0]["n_prompt"]]["content"] == script[0]
    assert read_chains(path) == (records, 0)
    assert [r["problem_id"] for r in runs.read_jsonl(path)] == [problem.id]
    again = generate(backend, [problem], path, k=1, config=AgentConfig(max_steps=12), progress=False)
    assert again == records  # resumed: nothing redone, nothing damaged

    folder = tmp_path / "gsm8k"
    folder.mkdir()
    question = "Tom has 3\u2028apples and\u2029buys 2 more.\u0085How many?"
    for split in ("train", "test"):
        record = {"question": question, "answer": "3 + 2 = 5\n#### 5"}
        (folder / f"{split}.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n")  # raw, not escaped
    (loaded,) = gsm8k.load("test", str(folder))
    assert loaded.question == question


def test_the_scripts_and_the_sweep_read_results_as_written(tmp_path):
    """scripts/faithful.py and the sweep's copy of the untrained student's results read the same lines."""
    sys.path.insert(0, str(runs.PROJECT_ROOT / "scripts"))
    from faithful import counts

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    record = {
        "source": "dpo",
        "problem_id": "fol-test-n6-d1-00000",
        "task": "fol",
        "sample": 0,
        "outcome": "wrong_answer",
        "calls": [],
        "text": "a\u2028b",
    }
    (run / "eval" / "results.jsonl").write_text(runs.jsonl_line(record) * 2)
    assert counts(run)[("dpo", "all")] == [0, 0, 2]


def test_side_files_are_written_whole_and_an_unreadable_one_is_named_and_set_aside(tmp_path, caplog):
    path = tmp_path / "timings.json"
    runs.write_json(path, {"01_define_tools": 3.0})
    real = os.replace

    def killed(*args):
        raise KeyboardInterrupt  # a kill between the temporary file and the rename

    os.replace = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            runs.write_json(path, {"01_define_tools": 3.0, "02_generate_teacher_chains": 9.0})
    finally:
        os.replace = real
    assert json.loads(path.read_text()) == {"01_define_tools": 3.0}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["timings.json"]  # and no temporary file left

    for content in ("", '{"01_define_tools": 3', "[1, 2]", "\xff"):
        path.write_text(content, encoding="latin-1")
        assert runs.read_record_file(path) == {}  # an empty or cut timings.json stops nothing
        assert "timings.json is unreadable" in caplog.text and (tmp_path / "timings.json.unreadable").is_file()
        assert not path.exists()
    (tmp_path / "params.yaml").write_text("seed: [1,\n")
    with pytest.raises(runs.UnreadableFile, match=r"params.yaml is unreadable \(\w+Error"):
        runs.read_mapping(tmp_path / "params.yaml")


def _holder(folder, shared: bool = False) -> subprocess.Popen:
    """Another process holding `folder` until killed (a pipeline, or with `shared` a notebook kernel)."""
    take = (
        f"runs.hold({str(folder)!r})"
        if shared
        else f"held = runs.lock_run({str(folder)!r}, 'pipeline x'); held.__enter__()"
    )
    code = f"import time; from fclib import runs; {take}; print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_run_folder_one_holder(tmp_path):
    folder = tmp_path / "run"
    with runs.lock_run(folder, "pipeline run"):
        with runs.lock_run(folder, "sweep"):  # this process again (a sweep holds the run it runs): fine
            assert runs.held_by_parent(folder)
    pipeline = _holder(folder)
    try:
        with pytest.raises(runs.RunInUse, match=rf"is in use by process {pipeline.pid} \(pipeline x, since "):
            with runs.lock_run(folder):
                pass
        with pytest.raises(runs.RunInUse, match="in use by process"):
            runs.hold(folder)  # a notebook kernel on a run a pipeline runs
    finally:
        pipeline.kill()
        pipeline.wait()
    with runs.lock_run(folder):  # a killed holder leaves nothing behind
        pass

    kernels = [_holder(folder, shared=True), _holder(folder, shared=True)]  # two notebooks of one run, open at once
    try:
        with pytest.raises(runs.RunInUse, match="a notebook kernel"):
            with runs.lock_run(folder):
                pass
    finally:
        for kernel in kernels:
            kernel.kill()
            kernel.wait()
    time.sleep(0.1)
    with runs.lock_run(folder):
        pass


def test_differences_name_every_changed_value():
    old = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1]}
    new = {"a": 1, "b": {"c": 2, "d": 4}, "f": True}
    assert runs.differences(old, new) == ["b.d: 3 -> 4", "e: [1] -> None", "f: None -> True"]
