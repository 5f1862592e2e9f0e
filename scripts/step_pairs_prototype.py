"""Prototype (issue 8), not part of the pipeline: step-level pairs along each reference chain.

For every assistant turn of every reference chain of a run, the embedded teacher samples two
replies from the reference's history up to that turn. A reply that cannot be parsed, fails to
execute, or calls another function than the reference is kept as a rejected one-step chain;
first-divergence pairing then pairs it against the reference step. The result is written as a
new run folder (problems, chains, pairs) for `./study.sh --run-name NAME --from 04`.

    .venv/bin/python scripts/step_pairs_prototype.py outputs/cpu outputs/cpu-sp 8

The issue-8 run of this used Python's salted `hash` for the seeds; this version uses crc32.
"""
import collections
import json
import shutil
import sys
import time
import zlib
from pathlib import Path
from fclib.llm import LocalBackend, GenerationSettings
from fclib.pairs import build_pairs, save_pairs
from fclib.problems import read_problems
from fclib.protocol import parse_call, CallSyntaxError
from fclib.tasks import TASKS
from fclib.models import load_tokenizer, resolve_model

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
records = [json.loads(l) for l in open(src / "chains" / "chains.jsonl")]
problems = {p.id: p for p in read_problems(src / "problems" / "train.jsonl")}
refs = [r for r in records if r["source"] == "reference"]
backend = LocalBackend.load("embedded", batch_size=32)
jobs = []
for r in refs:
    for i in range(r["n_prompt"], len(r["messages"])):
        if r["messages"][i]["role"] == "assistant":
            for s in range(2):
                jobs.append((r, i, s))
t0 = time.time()
convs = [[dict(m) for m in r["messages"][:i]] for r, i, s in jobs]
settings = GenerationSettings(max_tokens=48, temperature=0.8, stop=("\n\n",), seeds=tuple(zlib.crc32(f"{r['problem_id']}/{i}/{s}".encode()) for r, i, s in jobs))
replies = backend.chat(convs, settings)
print(f"{len(jobs)} replies in {time.time() - t0:.0f} s")
synthetic, kinds = [], {}
for (r, i, s), conv, reply in zip(jobs, convs, replies):
    ref_text = r["messages"][i]["content"]
    text = reply.text.strip()
    if text == ref_text.strip():
        kinds["same"] = kinds.get("same", 0) + 1
        continue
    toolset = TASKS[r["task"]].toolset(problems[r["problem_id"]])
    ref_call = parse_call(ref_text, known=set(toolset.functions))
    try:
        call = parse_call(text, known=set(toolset.functions))
        ex = toolset.execute(call)
        bad = not ex.ok or call.name != ref_call.name
        kind = "invalid" if not ex.ok else ("other function" if call.name != ref_call.name else "same function, valid")
    except CallSyntaxError:
        bad, kind = True, "parse"
    kinds[kind] = kinds.get(kind, 0) + 1
    if not bad:
        continue
    synthetic.append({**{k: r[k] for k in ("problem_id", "task", "n_prompt")}, "tools": r.get("tools"), "source": "teacher-step",
                      "sample": 100 + 10 * i + s, "model": "embedded", "messages": conv + [{"role": "assistant", "content": reply.text}],
                      "outcome": "invalid_call", "calls": [], "final_answer": None, "correct": False})
print(kinds, len(synthetic), "synthetic")
tok = load_tokenizer(resolve_model("embedded"))
pairs = build_pairs(records + synthetic, "first_divergence", max_pairs_per_problem=int(sys.argv[3]), use_reference=True,
                    validation_share=0.1, seed=0, tokenizer=tok, max_length=1024)
dst.mkdir(parents=True, exist_ok=True)
for sub in ("problems", "chains"):
    shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
save_pairs(pairs, dst / "pairs")
print(collections.Counter((p["task"], p["step"], p["chosen"][0]["content"].split("(")[0]) for p in pairs.train).most_common(30))
print(len(pairs.train), len(pairs.validation))
