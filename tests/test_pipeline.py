"""The pipeline: profiles, parameter checks, and the smoke profile end to end through papermill."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from fclib import pipeline, profiles, sweep
from fclib.problems import read_problems
from fclib.runs import PROJECT_ROOT
from fclib.teacher import REJECTED_VERDICTS, STEP_VERDICTS


def test_profiles_parse_and_share_their_parameters():
    cpu, smoke, workshop = (
        profiles.load_profile("cpu"),
        profiles.load_profile("smoke"),
        profiles.load_profile("workshop"),
    )
    paper = profiles.load_profile("paper", {"teacher_url": "https://api.example.org/v1", "teacher": "big"})
    assert set(cpu) == set(smoke) == set(paper) == set(workshop)
    assert cpu["student"] == workshop["student"] == "embedded" and smoke["student"] == "tiny"
    assert workshop["fol_test"] <= cpu["fol_test"] and workshop["train_max_steps"] <= cpu["train_max_steps"]
    assert paper["nmax"] == [10, 20] and paper["gsm8k_test"] == 1319


def test_impossible_values_fail_before_anything_runs():
    with pytest.raises(SystemExit, match="paper profile needs a teacher endpoint"):
        profiles.load_profile("paper")
    with pytest.raises(SystemExit, match=r"empty test set(.|\n)*k=1: preference pairs need at least 2"):
        profiles.load_profile("cpu", {"k": 1, "fol_test": 0, "gsm8k_test": 0})
    with pytest.raises(SystemExit, match="pair_strategy must be one of"):
        profiles.load_profile("cpu", {"pair_strategy": "best"})
    with pytest.raises(SystemExit, match="eval_models"):
        profiles.load_profile("cpu", {"eval_models": ["base", "gpt"]})
    assert profiles.load_profile("cpu", {"nmax": [10, 20]})["nmax"] == [10, 20]


def test_bad_parameters_fail_at_once():
    with pytest.raises(SystemExit, match="unknown parameter 'nmx'"):
        profiles.load_profile("smoke", {"nmx": 3})
    with pytest.raises(SystemExit, match="must be int"):
        profiles.load_profile("smoke", {"seed": "zero"})
    with pytest.raises(SystemExit, match="no profile 'gpu9'"):
        profiles.load_profile("gpu9")


def test_null_values_bad_run_names_and_pasted_keys_get_one_line_messages(capsys):
    for key in ("k", "concurrency", "seed"):
        with pytest.raises(SystemExit, match=rf"parameter {key} must be int, got null"):
            profiles.load_profile("cpu", {key: None})
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(SystemExit, match=r"run_name .* must be letters, digits"):
            profiles.load_profile("cpu", {"run_name": bad})
    with pytest.raises(SystemExit, match=r"run_name '\.\./x' must be"):
        pipeline.main(["--profile", "smoke", "--run-name", "../x"])
    with pytest.raises(SystemExit, match=r"parameter k must be int, got '\[1,'"):
        pipeline.main(["--profile", "smoke", "-p", "k=[1,"])  # not YAML: the text, refused as any bad value
    with pytest.raises(SystemExit, match=r"parameter request_timeout must be a number, got 'soon'"):
        pipeline.main(["--profile", "smoke", "-p", "request_timeout=soon"])
    with pytest.raises(SystemExit, match=r"request_timeout must be > 0 seconds"):
        pipeline.main(["--profile", "smoke", "-p", "request_timeout=0"])
    secret = "sk-proj-" + "A1b2C3d4" * 6
    shaped = ("d41d8cd98f00b204e9800998ecf8427e", "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q", "AKIAIOSFODNN7EXAMPLE")
    for value in (secret, "sk_live_" + "x9" * 12, "hf_" + "Ab3" * 10, "my key", "1ABC", "A" * 80, *shaped):
        with pytest.raises(SystemExit, match="NAME of an environment variable") as refused:
            profiles.load_profile("cpu", {"teacher_api_key_env": value})
        assert value not in str(refused.value)
    assert profiles.load_profile("cpu", {"teacher_api_key_env": "MY_KEY"})["teacher_api_key_env"] == "MY_KEY"
    assert secret not in capsys.readouterr().out


def test_notebook_parameters_match_the_profiles():
    import papermill as pm

    params = profiles.load_profile("cpu")
    import nbformat

    for nb in profiles.notebooks():
        declared = pm.inspect_notebook(str(nb))
        assert "run_name" in declared and "seed" in declared
        cell = next(c for c in nbformat.read(nb, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        assigned = [line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line.split("#")[0]]
        assert set(assigned) == set(declared), f"{nb.name}: papermill cannot read {set(assigned) - set(declared)}"
        assert set(declared) <= set(params), f"{nb.name} declares parameters no profile sets"


def test_notebook_profile_applies_only_when_asked(monkeypatch):
    namespace = {"run_name": "cpu", "k": 4, "local": 1}
    monkeypatch.delenv(profiles.NOTEBOOK_PROFILE_ENV, raising=False)
    assert profiles.notebook_profile(namespace) is None and namespace["k"] == 4
    monkeypatch.setenv(profiles.NOTEBOOK_PROFILE_ENV, "smoke")
    assert profiles.notebook_profile(namespace) == "smoke"
    assert namespace == {"run_name": "smoke", "k": 2, "local": 1}


def test_a_recipe_sets_its_values_and_recipe_paper_holds_every_one():
    endpoint = {"teacher_url": "https://api.example.org/v1", "teacher": "big"}
    paper = profiles.load_profile("paper", endpoint)
    assert paper["recipe"] == "paper" and all(paper[k] == v for k, v in profiles.RECIPES["paper"].items())
    paper_on_cpu = profiles.load_profile("cpu", {"recipe": "paper", "k": 4})
    assert all(paper_on_cpu[k] == v for k, v in profiles.RECIPES["paper"].items()) and paper_on_cpu["k"] == 4
    fclib_at_paper_scale = profiles.load_profile("paper", {**endpoint, "recipe": "fclib"})
    assert all(fclib_at_paper_scale[k] == v for k, v in profiles.RECIPES["fclib"].items())
    assert fclib_at_paper_scale["nmax"] == [10, 20]  # the scale stays the profile's
    cpu = profiles.load_profile("cpu")
    assert cpu["recipe"] == "fclib" and all(cpu[k] == v for k, v in profiles.RECIPES["fclib"].items())
    assert profiles.load_profile("cpu", {"loss_type": ["sigmoid"], "loss_weights": [1.0]})  # fclib ablations
    with pytest.raises(SystemExit, match=r"recipe paper sets loss_type: \['sigmoid'\], not \['sigmoid', 'sft'\]"):
        profiles.load_profile("cpu", {"recipe": "paper", "loss_type": ["sigmoid", "sft"], "loss_weights": [1, 1]})
    with pytest.raises(SystemExit, match="recipe must be one of fclib, paper"):
        profiles.load_profile("cpu", {"recipe": "mine"})


def test_a_local_run_goes_offline_and_a_run_naming_hub_ids_stays_online(monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    cpu = profiles.load_profile("cpu")
    assert pipeline.hub_sources(cpu) == []
    pipeline.go_offline_unless_needed(cpu)
    assert os.environ["HF_HUB_OFFLINE"] == "1" == os.environ["HF_DATASETS_OFFLINE"]

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable)
    hub = {**cpu, "student": "Qwen/Qwen2.5-1.5B-Instruct", "teacher": "Qwen/Qwen2.5-7B-Instruct"}
    hub["gsm8k_source"] = "openai/gsm8k"
    wanted = [
        ("student", "Qwen/Qwen2.5-1.5B-Instruct", "model"),
        ("teacher", "Qwen/Qwen2.5-7B-Instruct", "model"),
        ("gsm8k_source", "openai/gsm8k", "dataset"),
    ]
    assert pipeline.hub_sources(hub) == wanted
    asked = []
    monkeypatch.setattr(pipeline, "in_hub_cache", lambda repo, kind: False)
    monkeypatch.setattr(pipeline, "hub_fault", lambda repo, kind: asked.append((repo, kind)))  # the hub answers
    pipeline.go_offline_unless_needed(hub)
    assert asked == [(repo, kind) for _, repo, kind in wanted]
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    endpoint_teacher = {**hub, "teacher_url": "https://api.example.org/v1", "teacher": "gpt-4o-mini"}
    assert [key for key, _, _ in pipeline.hub_sources(endpoint_teacher)] == ["student", "gsm8k_source"]
    # in the hub cache: offline again
    monkeypatch.setattr(pipeline, "in_hub_cache", lambda repo, kind: True)
    pipeline.go_offline_unless_needed(hub)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_run_naming_hub_ids_stops_at_once_when_the_hub_cannot_be_reached(tmp_path):
    # the real check, against a closed port of this machine as the hub, with an empty hub cache
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"FCLIB_OUTPUTS": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    student, data = "Qwen/Qwen2.5-1.5B-Instruct", "openai/gsm8k"
    command = [sys.executable, "-m", "fclib.pipeline", "-p", f"student={student}", "-p", f"gsm8k_source={data}"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith(f"cannot fetch student {student!r} from the Hugging Face hub (")
    assert f"-p student=/path/to/folder (made online by: hf download {student} --local-dir" in lines[0]
    assert lines[1].startswith(f"cannot fetch gsm8k_source {data!r}") and "-p gsm8k_source=/path/to/folder" in lines[1]
    assert not (tmp_path / "cpu" / "notebooks").exists(), "nothing may run before the check"


CHAIN_FIELDS = {
    "problem_id",
    "task",
    "sample",
    "model",
    "source",
    "messages",
    "calls",
    "final_answer",
    "correct",
    "outcome",
    "usage",
    "latency_s",
}


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(tmp_path):
    # no HF_* variable: a run of local models and data goes offline by itself
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"FCLIB_OUTPUTS": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "fclib.pipeline", "--profile", "smoke", "--run-name", "t1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "t1"
    assert f"are in {run}" in proc.stdout
    assert yaml.safe_load((run / "params.yaml").read_text())["run_name"] == "t1"
    env_record = json.loads((run / "env.json").read_text())
    assert {"torch", "trl", "papermill", "fclib"} <= set(env_record["packages"]) and len(env_record["packages"]) > 100
    assert env_record["python"] == sys.version.split()[0] and env_record["cpu"]["cores"] >= 1
    assert isinstance(env_record["gpus"], list) and re.fullmatch(r"[0-9a-f]{40}", env_record["git"]["commit"])
    timings = json.loads((run / "timings.json").read_text())
    assert set(timings) == {nb.stem for nb in profiles.notebooks()} and all(t > 0 for t in timings.values())
    memory = json.loads((run / "memory.json").read_text())
    assert set(memory) == set(timings) and all(0.1 < gib < 64 for gib in memory.values())
    # progress reaches the terminal: each notebook's start and end, and the notebooks' own output as it runs
    n = len(timings)
    for i, nb in enumerate(profiles.notebooks(), 1):
        assert f"[{i}/{n}] {nb.stem}: running" in proc.stderr and f"[{i}/{n}] {nb.stem}: done in" in proc.stderr
    assert "chains (teacher)" in proc.stderr and "[fol] fol-train" in proc.stdout  # a tqdm bar, a transcript
    assert re.search(r"done in \d+ min \d+ s \(peak memory \d+\.\d+ GiB\)", proc.stdout)
    for nb in profiles.notebooks():
        assert (run / "notebooks" / nb.name).is_file()
    assert sweep.unclaimed(run) == []  # every file is some stage's output, so a sweep can copy a stage whole
    train, test = read_problems(run / "problems" / "train.jsonl"), read_problems(run / "problems" / "test.jsonl")
    assert len(train) == 12 and len(test) == 8
    assert (run / "figures" / "gsm8k_reference_coverage.png").stat().st_size > 1000

    chains = [json.loads(line) for line in (run / "chains" / "chains.jsonl").read_text().splitlines()]
    assert all(CHAIN_FIELDS <= set(c) for c in chains)
    teacher = [c for c in chains if c["source"] == "teacher"]
    assert sorted((c["problem_id"], c["sample"]) for c in teacher) == sorted((p.id, s) for p in train for s in range(2))
    assert {c["source"] for c in chains} == {"teacher", "reference"}
    assert json.loads((run / "chains" / "summary.json").read_text())["k"] == 2
    for name in ("teacher_outcomes", "teacher_yield", "teacher_steps"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 1000
    steps = [json.loads(line) for line in (run / "chains" / "steps.jsonl").read_text().splitlines()]
    references = {c["problem_id"]: c for c in chains if c["source"] == "reference"}
    # one teacher reply (step_samples: 1) at every call of every reference chain
    assert sorted((s["problem_id"], s["step"]) for s in steps) == sorted(
        (pid, i)
        for pid, c in references.items()
        for i in range(sum(m["role"] == "assistant" for m in c["messages"][c["n_prompt"] :]))
    )
    assert all(s["verdict"] in STEP_VERDICTS for s in steps)

    stats = json.loads((run / "pairs" / "stats.json").read_text())
    assert stats["train_pairs"] > 0 and (run / "pairs" / "dataset" / "dataset_dict.json").is_file()
    rejected_steps = sum(s["verdict"] in REJECTED_VERDICTS for s in steps)
    assert 0 < stats["step_pairs"] <= rejected_steps  # the tiny random teacher fails at every step
    assert (run / "model" / "adapter" / "adapter_model.safetensors").is_file()
    log = json.loads((run / "train" / "log_history.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [1, 2]

    results = [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert {r["source"] for r in results} == {"base", "dpo"} and all(CHAIN_FIELDS <= set(r) for r in results)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for label in ("base", "dpo"):
        for task in ("fol", "gsm8k"):
            m = metrics["models"][label][task]
            assert m["n"] == 2 and 0 <= m["ci95"][0] <= m["accuracy"] <= m["ci95"][1] <= 1
    assert set(metrics["paired"]) == {"fol", "gsm8k"} and "p_value" in metrics["paired"]["fol"]
    # the executed notebooks publish as docs/notebooks/ does: all five, outputs kept, under the size limit
    sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
    from publish_notebooks import LIMIT_BYTES, publish

    published = publish(run, tmp_path / "published")
    assert [p.name for p in published] == [nb.with_suffix(".html").name for nb in profiles.notebooks()]
    assert sum(p.stat().st_size for p in published) < LIMIT_BYTES
    assert all('class="output_area"' in p.read_text() for p in published)
    report = (run / "report.md").read_text()
    assert "| dpo | fol |" in report and "McNemar" in report
    for name in (
        "training_curves",
        "margins_before_after",
        "pair_lengths",
        "pair_calls",
        "eval_accuracy",
        "eval_outcomes",
    ):
        assert (run / "figures" / f"{name}.png").stat().st_size > 1000, name


def test_published_notebooks_are_the_executed_ones():
    """docs/notebooks/ (linked from the README) holds every notebook as an executed page, within the size limit:
    01-05 from a cpu run, 06 from a sweep."""
    docs = PROJECT_ROOT / "docs" / "notebooks"
    published = sorted(docs.glob("*.html"))
    every = sorted(profiles.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert len(every) == len(profiles.notebooks()) + 1  # the study's five, and notebook 06
    assert [p.name for p in published] == [nb.with_suffix(".html").name for nb in every]
    assert not list(docs.glob("*.ipynb")), "notebooks are committed without outputs; executed copies are pages"
    assert sum(p.stat().st_size for p in published) < 3_000_000
    for path in published:
        page = path.read_text()
        assert 'class="output_area"' in page, f"{path.name} shows no output"
        assert "Traceback" not in page and "output_error" not in page, f"{path.name} shows an error"


def test_the_gpu_check_is_local_and_says_at_once_when_there_is_no_gpu(tmp_path):
    params = profiles.load_profile("gpu-check")
    assert pipeline.hub_sources(params) == []  # local weights only: the GPU machine may reach no network
    assert (params["quantization"], params["eval_precision"], params["teacher_backend"]) == ("4bit", "bf16", "server")
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "FCLIB_OUTPUTS": str(tmp_path)}
    proc = subprocess.run(
        [str(PROJECT_ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("gpu_check: no CUDA GPU visible")
    assert not list(tmp_path.iterdir()), "nothing may run without a GPU"


def test_peak_gpu_memory_is_sampled_where_nvidia_smi_is(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"  # two GPUs, 1024 and 512 MiB in use
    fake.write_text("#!/bin/sh\nprintf '1024\\n512\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pipeline.PeakMemory(interval=0.05, gpu_interval=0.05) as peak:
        time.sleep(0.5)
    assert peak.peak_gpu_gib == 1.5 and peak.peak_gib > 0
    monkeypatch.setenv("PATH", "/nonexistent")
    with pipeline.PeakMemory(interval=0.05) as peak:
        time.sleep(0.1)
    assert peak.peak_gpu_gib is None


def test_every_command_line_value_is_checked_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FCLIB_OUTPUTS", str(tmp_path))
    for flag, value in (("--from", "../../x"), ("--to", "7"), ("--from", "3a"), ("--from", "06")):
        with pytest.raises(SystemExit, match=f"{flag} takes the number of a study notebook"):
            pipeline.main(["--profile", "smoke", flag, value])
    with pytest.raises(SystemExit, match="--to 02 comes before --from 04"):
        pipeline.main(["--profile", "smoke", "--from", "04", "--to", "02"])
    for name in ("../profiles/cpu", "/etc/passwd", "cpu.yaml", ""):
        with pytest.raises(SystemExit, match="no profile"):
            pipeline.main(["--profile", name])
    for key in ("temperature", "learning_rate", "beta", "request_timeout", "eval_temperature"):
        for value in (".nan", ".inf", "-.inf"):
            with pytest.raises(SystemExit, match=f"{key} must be a finite number"):
                pipeline.main(["--profile", "smoke", "-p", f"{key}={value}"])
    with pytest.raises(SystemExit, match=r"lora_dropout is a probability in \[0, 1\)"):
        pipeline.main(["--profile", "smoke", "-p", "lora_dropout=2"])
    for key, value in (("student", "x y"), ("teacher", "a/b/c")):
        with pytest.raises(SystemExit, match=f"{key}: .* is"):
            pipeline.main(["--profile", "smoke", "-p", f"{key}={value}"])
    url = "https://user:sk-secret@example.org/v1"
    with pytest.raises(SystemExit, match="teacher_url must not carry credentials") as refused:
        pipeline.main(["--profile", "smoke", "-p", f"teacher_url={url}", "-p", "teacher=gpt"])
    assert "sk-secret" not in str(refused.value)
    assert not list(tmp_path.iterdir()), "nothing may be written before the values are checked"


def test_an_outputs_folder_that_cannot_be_written_is_one_message(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("FCLIB_OUTPUTS", str(tmp_path / "a-file" / "outputs"))
    with pytest.raises(SystemExit, match="cannot write to .*a-file"):
        pipeline.main(["--profile", "smoke", "--to", "01"])


def _a_run(tmp_path, monkeypatch, **overrides):
    """A run folder as the pipeline leaves it after notebooks 01-03 (their results, without running them)."""
    monkeypatch.setenv("FCLIB_OUTPUTS", str(tmp_path))
    monkeypatch.delenv(profiles.NOTEBOOK_PROFILE_ENV, raising=False)
    params = profiles.load_profile("smoke", overrides)
    run = tmp_path / "smoke"
    for folder in ("problems", "chains", "pairs"):
        (run / folder).mkdir(parents=True)
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    return run, params


def test_a_notebook_follows_its_runs_parameters_and_refuses_to_contradict_its_results(tmp_path, monkeypatch, capsys):
    from fclib.profiles import RunParametersError, run_parameters

    run, params = _a_run(tmp_path, monkeypatch)
    defaults = profiles.notebook_parameters()  # a notebook's cell as it opens in JupyterLab: the cpu profile's
    cell = {k: defaults[k] for k in ("seed", "student", "pair_strategy", "use_reference", "max_length")}
    namespace = {"run_name": "smoke", **cell, "other": 1}
    run_parameters(namespace)
    assert namespace == {"run_name": "smoke", **{k: params[k] for k in cell}, "other": 1}  # the run's, not the cell's
    assert "parameters of run 'smoke'" in capsys.readouterr().out

    for key, value in (("pair_strategy", "all"), ("student", "embedded"), ("seed", 3)):
        namespace = {"run_name": "smoke", **cell, key: value}
        if value == defaults[key]:  # the cell's default: the run's value is taken, whatever the cell says
            continue
        with pytest.raises(RunParametersError, match=f"{key}: {params[key]!r} in the run, {value!r} here"):
            run_parameters(namespace)
    assert yaml.safe_load((run / "params.yaml").read_text()) == params  # and nothing changed

    namespace = {"run_name": "smoke", "beta": 0.3, "seed": params["seed"]}  # notebook 04, no adapter yet
    run_parameters(namespace)
    assert yaml.safe_load((run / "params.yaml").read_text())["beta"] == 0.3  # the run's value from now on
    (run / "model").mkdir()
    with pytest.raises(RunParametersError, match=r"beta: 0.3 in the run, 0.5 here \(model/ made with the first\)"):
        run_parameters({"run_name": "smoke", "beta": 0.5})

    run_parameters({"run_name": "fresh", "k": 4, "seed": 2})  # a new run opened in a notebook gets a params.yaml
    fresh = yaml.safe_load((tmp_path / "fresh" / "params.yaml").read_text())
    assert (fresh["k"], fresh["seed"], fresh["run_name"]) == (4, 2, "fresh") and set(fresh) == set(params)


def test_starting_past_a_notebook_whose_parameters_changed_is_refused(tmp_path, monkeypatch):
    run, params = _a_run(tmp_path, monkeypatch)
    with pytest.raises(SystemExit, match=r"--from 03 skips notebooks .*\n- k: 2 in the run, 3 here \(chains/"):
        pipeline.run({**params, "k": 3}, start="03")
    with pytest.raises(SystemExit, match=r"- fol_train: 6 in the run, 2 here \(problems/"):
        pipeline.run({**params, "fol_train": 2}, start="02")
    assert yaml.safe_load((run / "params.yaml").read_text()) == params  # refused before anything was written


def test_papermill_is_imported_without_the_iri_format_checker_and_still_validates():
    """The pipeline's papermill import leaves out jsonschema's rfc3987_syntax checker (1.6 s of import, a parser
    built at import time); notebooks still validate, and the module stays importable afterwards."""
    code = (
        "import sys\n"
        "from fclib.pipeline import import_papermill\n"
        "pm = import_papermill()\n"
        "assert 'rfc3987_syntax' not in sys.modules and 'jsonschema' in sys.modules\n"
        "import nbformat\n"
        "nbformat.validate(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('x = 1')]))\n"
        "try:\n"
        "    nbformat.validate({'nbformat': 4})\n"
        "except nbformat.ValidationError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('an invalid notebook passed')\n"
        "import rfc3987_syntax\n"
        "print('ok', pm.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok papermill", proc.stderr[-2000:]


def test_ctrl_c_ends_with_one_line_even_when_the_notebook_clients_tasks_fail_at_exit(tmp_path):
    """Ctrl-C stops the notebook client mid-cell; as its kernel goes, a task the client left pending can fail with
    "Kernel died" and asyncio logs it when it is collected at exit. Here the run fails such a task and keeps it
    referenced from the interrupted frame, as the client's does: the last line is still the pipeline's own."""
    code = """
import asyncio, sys
from fclib import pipeline

def run(params, start=None, stop=None):
    async def dies():
        raise RuntimeError("Kernel died")
    loop = asyncio.new_event_loop()
    task = loop.create_task(dies())
    loop.run_until_complete(asyncio.sleep(0.01))  # the task fails; nobody retrieves its exception
    raise KeyboardInterrupt

pipeline.run = run
pipeline.main(["--profile", "smoke", "-p", "run_name=interrupted"])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("interrupted: run 'interrupted' keeps what"), done.stderr
    assert "Traceback" not in done.stderr and "never retrieved" not in done.stderr
