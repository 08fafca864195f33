"""data/tasks: reproducible from the shared sets, split cleanly, benchmark items only from the test split."""

import hashlib
import json
import lzma
from pathlib import Path

import pytest

from moe_engine.benchmark.build_data import MIN_CONTAMINATION_CHARS, SETS, build, read_xz

TASKS = Path(__file__).resolve().parents[2] / "data" / "tasks"


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in lzma.open(TASKS / name, "rt", encoding="utf-8")]


def test_committed_files_match_their_manifest():
    manifest = json.loads((TASKS / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256(lzma.decompress((TASKS / name).read_bytes())).hexdigest() == digest, name
    total = sum(p.stat().st_size for p in TASKS.rglob("*") if p.is_file())
    assert total < 1_500_000


def test_train_and_test_share_no_text():
    for spec in SETS:
        train, test = _records(f"{spec.name}/train.jsonl.xz"), _records(f"{spec.name}/test.jsonl.xz")
        assert train and test and set(train[0]) == {"prompt", "response", spec.label}
        texts = [{r["prompt"] for r in rs} | {r["response"] for r in rs} for rs in (train, test)]
        assert not texts[0] & texts[1], spec.name  # no text of a test record is a prompt or response in train


def test_benchmark_items_come_from_the_test_splits_only():
    test = {s.name: _records(f"{s.name}/test.jsonl.xz") for s in SETS}
    train = {s.name: _records(f"{s.name}/train.jsonl.xz") for s in SETS}
    answer_of = {  # task -> (set, item -> (prompt, response) of its record, the gold choice's source)
        "wordnet_gloss": ("wordnet_defs", lambda it: (f"Define the {it['pos']} '{it['lemma']}'.", it["gloss"]), "lemma"),
        "chatterbot_category": ("chatterbot_qa", lambda it: (it["question"], it["answer"]), "category"),
        "chatterbot_answer": ("chatterbot_qa", lambda it: (it["question"], it["choices"][it["gold"]]), None),
        "stdlib_function": ("stdlib_docstrings", lambda it: (it["choices"][it["gold"]], it["docstring"]), None),
    }
    for task, (name, pair, gold_field) in answer_of.items():
        items = _records(f"benchmark/{task}.jsonl.xz")
        pairs = {(r["prompt"], r["response"]) for r in test[name]}
        seen = {r["prompt"] for r in train[name]} | {r["response"] for r in train[name]}
        for it in items:
            assert len(it["choices"]) == 4 and len({c.casefold() for c in it["choices"]}) == 4
            assert pair(it) in pairs, (task, it)
            assert not set(pair(it)) & seen  # neither the question nor the answer is in fine-tuning data
            if gold_field:
                assert it["choices"][it["gold"]] == it[gold_field]


def test_no_answer_text_is_in_the_demo_pretraining_corpus():
    demo = "\n".join(read_xz(p) for p in sorted((TASKS.parent / "demo").glob("*.txt.xz")))
    for spec in SETS:
        for split in ("train", "test"):
            for r in _records(f"{spec.name}/{split}.jsonl.xz"):
                assert r["prompt"].strip() and r["response"].strip()
                first = r["response"].strip().splitlines()[0].strip()
                assert len(first) < MIN_CONTAMINATION_CHARS or first not in demo


def test_build_reproduces_the_committed_files(shared_data, tmp_path):
    manifest = build(shared_data, tmp_path)
    assert manifest == json.loads((TASKS / "manifest.json").read_text())
    for name in manifest["files"]:  # the same records, in the same order
        assert lzma.decompress((tmp_path / name).read_bytes()) == lzma.decompress((TASKS / name).read_bytes())
