"""`moe-lab benchmark` end to end on the demo data, checked against log-likelihoods computed here."""

import json
import lzma
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_engine.benchmark.config import BenchmarkConfig
from moe_engine.benchmark.passage import passage_items
from moe_engine.benchmark.run import run

REPO = Path(__file__).resolve().parents[2]
LIMIT = 8
ALL_TASKS = ["wordnet_gloss", "chatterbot_category", "chatterbot_answer", "stdlib_function", "passage_val", "passage_ood"]

# the prompts of tasks/*.yaml, written out again here so a wrong template or field shows up as a mismatch
PROMPTS = {
    "wordnet_gloss": lambda d: f"Definition: {d['gloss']}\nWord:",
    "chatterbot_category": lambda d: f"Question: {d['question']}\nAnswer: {d['answer']}\nTopic:",
    "chatterbot_answer": lambda d: f"Question: {d['question']}\nAnswer:",
    "stdlib_function": lambda d: f"Docstring: {d['docstring']}\nFunction:",
}

# Runs the command with every socket connection refused and recorded; exit 3 when one was attempted.
GUARD = """
import socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network access is disabled in this test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
from moe_engine.cli import main
code = main(sys.argv[1:])
if attempts:
    print("network attempts:", attempts, file=sys.stderr)
    code = 3
sys.exit(code)
"""


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def bench_run(bench_models, demo_data, tmp_path_factory) -> dict:
    """The command in a fresh process: no network, an empty HOME, working directory and TMPDIR."""
    base = tmp_path_factory.mktemp("bench_run")
    home, cwd, tmpdir = base / "home", base / "cwd", base / "tmp"
    for d in (home, cwd, tmpdir):
        d.mkdir()
    (base / "guard.py").write_text(GUARD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_", "MLFLOW_TRACKING", "TRANSFORMERS_"))}
    env.update(HOME=str(home), TMPDIR=str(tmpdir), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{base / 'mlflow' / 'mlflow.db'}")
    out = base / "out"
    cmd = [sys.executable, str(base / "guard.py"), "benchmark", "--model", f"moe={bench_models['moe']}",
           "--model", f"dense={bench_models['dense']}", "--data", str(demo_data), "--out", str(out),
           "--limit", str(LIMIT), "--set", "log_samples=true", "--set", "batch_size=8"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "stdout": proc.stdout, "home": home, "cwd": cwd, "tmpdir": tmpdir,
            "mlflow": env["MLFLOW_TRACKING_URI"]}


def test_command_writes_its_outputs_offline_and_nowhere_else(bench_run):
    out = bench_run["out"]
    assert _files_under(out) == [".moe-lab-output", "compare.md", "metrics.json", "results/dense.json", "results/dense.samples.jsonl",
                                 "results/moe.json", "results/moe.samples.jsonl"]
    for where in ("home", "cwd", "tmpdir"):  # the datasets cache and task files lived in the output's work folder
        assert _files_under(bench_run[where]) == [], where
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"moe", "dense", "moe_minus_dense"}
    for model in ("moe", "dense"):
        assert set(metrics[model]) == set(ALL_TASKS)
        for task, scores in metrics[model].items():
            assert scores["n"] == LIMIT
            assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(scores)
            p = scores["acc"]  # lm-eval's closed form for a mean of 0/1 scores: sqrt(p(1-p)/(n-1))
            assert math.isclose(scores["acc_stderr"], math.sqrt(p * (1 - p) / (LIMIT - 1)), abs_tol=1e-12)
    compare = (out / "compare.md").read_text()
    assert compare in bench_run["stdout"]
    for text in ("| moe | dense | moe − dense (paired) |", "params active / token", "passage_ood acc_norm"):
        assert text in compare
    raw = json.loads((out / "results" / "moe.json").read_text())
    assert raw["results"]["wordnet_gloss"]["acc,none"] == metrics["moe"]["wordnet_gloss"]["acc"]


def test_the_stage_run_in_mlflow_holds_the_metrics_and_the_table(bench_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(bench_run["mlflow"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`moe_lab.stage` = 'benchmark'")
    assert len(runs) == 1
    metrics = json.loads((bench_run["out"] / "metrics.json").read_text())
    logged = runs[0].data.metrics
    for key in ("moe.wordnet_gloss.acc", "dense.passage_ood.acc_norm_stderr", "moe_minus_dense.stdlib_function.acc"):
        model, task, metric = key.split(".")
        assert logged[f"benchmark/{key}"] == pytest.approx(metrics[model][task][metric], abs=1e-12)
    assert runs[0].data.params["limit"] == str(LIMIT)
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"compare.md", "metrics.json", "results"}


def _samples(out: Path, model: str) -> dict[tuple[str, int], dict]:
    lines = (out / "results" / f"{model}.samples.jsonl").read_text().splitlines()
    return {(s["task"], s["doc_id"]): s for s in map(json.loads, lines)}


def _items(task: str, demo_data: Path) -> list[dict]:
    if task.startswith("passage_"):
        return passage_items(demo_data, task.removeprefix("passage_"), BenchmarkConfig().passage_items, seed=0)
    with lzma.open(REPO / "data" / "tasks" / "benchmark" / f"{task}.jsonl.xz", "rt") as f:
        return [json.loads(line) for line in f]


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) in float64 with lm-eval's tokenization convention:
    trailing whitespace of the context moves to the continuation, the pair is encoded whole and the
    continuation is what follows the context's own tokens."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n_context = len(tokenizer(context, add_special_tokens=False).input_ids)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.double(), -1)[0]
    targets = ids[0, n_context:]
    return float(logp[n_context - 1:].gather(1, targets[:, None]).sum())


@pytest.mark.parametrize("model_name", ["moe", "dense"])
def test_accuracy_equals_a_recomputation_with_stock_transformers(bench_run, bench_models, demo_data, model_name):
    """Every choice scored again by stock transformers (no engine layers, no lm-eval) in float64: the
    log-likelihoods, acc and acc_norm per item, and the task accuracies in metrics.json must agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = bench_models[model_name]
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, experts_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = _samples(bench_run["out"], model_name)
    metrics = json.loads((bench_run["out"] / "metrics.json").read_text())[model_name]
    for task in ALL_TASKS:
        items = _items(task, demo_data)[:LIMIT]
        accs, norms = [], []
        for doc_id, item in enumerate(items):
            if task.startswith("passage_"):
                context, choices = item["context"], item["choices"]
            else:
                context, choices = PROMPTS[task](item), [" " + c for c in item["choices"]]
            sample = samples[(task, doc_id)]
            assert [tuple(a) for a in sample["arguments"]] == [(context, c) for c in choices]
            lls = np.array([_loglikelihood(ref, tokenizer, context, c) for c in choices])
            np.testing.assert_allclose([r[0][0] for r in sample["resps"]], lls, rtol=1e-4, atol=1e-3)
            lengths = np.array([len(c) for c in item["choices"]], dtype=float)
            accs.append(float(np.argmax(lls) == item["gold"]))
            norms.append(float(np.argmax(lls / lengths) == item["gold"]))
            assert (sample["acc"], sample["acc_norm"]) == (accs[-1], norms[-1]), (task, doc_id)
        assert metrics[task]["acc"] == pytest.approx(np.mean(accs), abs=1e-12)
        assert metrics[task]["acc_norm"] == pytest.approx(np.mean(norms), abs=1e-12)


def test_differences_are_paired_over_the_same_items(bench_run):
    metrics = json.loads((bench_run["out"] / "metrics.json").read_text())
    moe, dense = _samples(bench_run["out"], "moe"), _samples(bench_run["out"], "dense")
    for task in ALL_TASKS:
        d = np.array([moe[(task, i)]["acc"] - dense[(task, i)]["acc"] for i in range(LIMIT)])
        diff = metrics["moe_minus_dense"][task]
        assert diff["acc"] == pytest.approx(metrics["moe"][task]["acc"] - metrics["dense"][task]["acc"], abs=1e-12)
        assert diff["acc_stderr"] == pytest.approx(d.std(ddof=1) / math.sqrt(LIMIT), abs=1e-12)


def test_encoder_decoder_models_run_through_the_seq2seq_backend(demo_data, tmp_path):
    """Switch goes through lm-eval's seq2seq wrapper: the encoder reads the context and the decoder scores
    the choice; checked against stock transformers' Switch doing exactly that, item by item."""
    import moe_engine as me
    from moe_engine.models.io import save_model
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = me.build_model("switch", "tiny", vocab_size=1024, seed=0)
    save_model(model, tmp_path / "switch", tokenizer=demo_data / "tokenizer")
    config = BenchmarkConfig(tasks=["wordnet_gloss"], limit=4, log_samples=True)
    metrics = run(config, {"switch": tmp_path / "switch"}, None, tmp_path / "out")
    assert metrics["switch"]["wordnet_gloss"]["n"] == 4
    ref = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "switch", dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "switch")
    samples = _samples(tmp_path / "out", "switch")
    for doc_id, item in enumerate(_items("wordnet_gloss", demo_data)[:4]):
        context = tokenizer(PROMPTS["wordnet_gloss"](item)).input_ids
        lls = []
        for choice in item["choices"]:
            labels = torch.tensor([tokenizer(" " + choice, add_special_tokens=False).input_ids])
            with torch.no_grad():
                logits = ref(input_ids=torch.tensor([context]), labels=labels).logits.double()
            lls.append(float(torch.log_softmax(logits, -1)[0].gather(1, labels[0][:, None]).sum()))
        np.testing.assert_allclose([r[0][0] for r in samples[("wordnet_gloss", doc_id)]["resps"]], lls, rtol=1e-4, atol=1e-3)
