"""Build the embedded task data (``data/tasks``) from the shared offline sets, reproducibly.

    python -m moe_engine.benchmark.build_data --shared ../shared/data --out data/tasks

Inputs (../shared/DATA.md): ``finetune/{chatterbot_qa,wordnet_defs,stdlib_docstrings}.json.xz``
(JSON lists of {prompt, response, label}) and ``corpus/wordnet_glosses.txt.xz`` (the synonyms of
each synset, so that a distractor is never a synonym of the answer).

For each set:
1. Exact duplicates are dropped, and records sharing any text (a prompt or response of one being a
   prompt or response of another) form one group (union-find): a question with two answers, one
   docstring on two functions or a chained conversation never straddles the split.
2. Empty texts and length caps are dropped, and decontamination against the committed demo corpus (data/demo): a record whose
   response's first line (24+ characters) occurs in it is dropped, so a model pretrained on the demo
   has not read the answer. (The full shared corpus holds every WordNet gloss and the whole stdlib:
   a model pretrained on it has seen these texts.) Groups are taken in the order of
   sha256("moe-lab/tasks/<set>/select", group key) until ``records`` records are kept.
3. Split: a group is ``test`` when sha256("moe-lab/tasks/<set>/split", group key) falls below
   ``TEST_FRACTION``, else ``train``. ``<set>/train.jsonl.xz`` is the fine-tuning data;
   ``<set>/test.jsonl.xz`` is held out, and the benchmark's multiple-choice items
   (``benchmark/<task>.jsonl.xz``) are made from it alone, so fine-tuning never sees a benchmark item.

Multiple-choice items have 4 distinct choices drawn from other test groups by ``random.Random`` seeded
with the item's text (stable under any re-slicing), the gold one at a seeded position; items are
stored in hash order, so lm-eval's ``limit`` (the first N) is a random sample. ``manifest.json``
records counts and the sha256 of every file's decompressed JSONL (what the reproduction test compares).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import random
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORMAT = "moe-lab-tasks/1"
TEST_FRACTION = 0.25
MIN_CONTAMINATION_CHARS = 24  # shorter first lines ("Yes.", "Sort of.") occur in any large text by chance
NUM_CHOICES = 4


@dataclass(frozen=True)
class SetSpec:
    name: str
    label: str  # the label field kept beside prompt and response
    records: int  # at most this many records in the slice (train + test)
    max_prompt: int  # characters
    max_response: int


SETS = (
    SetSpec("chatterbot_qa", "category", 2000, 200, 400),
    SetSpec("wordnet_defs", "pos", 2000, 100, 200),
    SetSpec("stdlib_docstrings", "module", 2000, 120, 400),
)


def _unit(*parts: str) -> float:
    """A stable number in [0, 1) from the parts' text."""
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def read_xz(path: Path) -> str:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def _groups(records: list[dict]) -> list[list[dict]]:
    """Records linked by a shared text (one record's prompt or response being another's prompt or response:
    conversations chain "A -> B", "B -> C"), as lists in input order."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r in records:
        a, b = find(r["prompt"]), find(r["response"])
        if a != b:
            parent[max(a, b)] = min(a, b)
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(find(r["prompt"]), []).append(r)
    return list(out.values())


def slice_set(spec: SetSpec, rows: list[dict], demo_text: str) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]} records ({prompt, response, label}) of one set."""
    seen, records = set(), []
    for row in rows:
        r = {"prompt": row["prompt"], "response": row["response"], spec.label: row[spec.label]}
        key = (r["prompt"], r["response"], r[spec.label])
        if key not in seen:
            seen.add(key)
            records.append(r)

    def usable(r: dict) -> bool:
        if not (r["prompt"].strip() and r["response"].strip()):
            return False
        first = r["response"].strip().splitlines()[0].strip()
        contaminated = len(first) >= MIN_CONTAMINATION_CHARS and first in demo_text
        return len(r["prompt"]) <= spec.max_prompt and len(r["response"]) <= spec.max_response and not contaminated

    groups = [(min(r["prompt"] for r in g), g) for g in _groups(records)]
    groups.sort(key=lambda kg: (_unit(f"moe-lab/tasks/{spec.name}/select", kg[0]), kg[0]))
    out: dict[str, list[dict]] = {"train": [], "test": []}
    kept = 0
    for key, group in groups:  # grouped before filtering: a dropped record cannot hide a link between two others
        if kept >= spec.records:
            break
        group = [r for r in group if usable(r)]
        if not group:
            continue
        split = "test" if _unit(f"moe-lab/tasks/{spec.name}/split", key) < TEST_FRACTION else "train"
        out[split] += [dict(r, _group=key) for r in group]
        kept += len(group)
    for split in out:  # a stable order independent of the hash order above
        out[split].sort(key=lambda r: (r["_group"], r["prompt"], r["response"]))
    return out


# ----------------------------------------------------------------------------- multiple-choice items
def _choices(rng: random.Random, gold: str, pool: list[str], excluded: set[str]) -> tuple[list[str], int]:
    """``gold`` and NUM_CHOICES - 1 distractors from ``pool`` (none in ``excluded``), gold at a random place."""
    taken = {gold.casefold()} | {e.casefold() for e in excluded}
    candidates = [p for p in pool if p.casefold() not in taken]
    distractors: list[str] = []
    for p in rng.sample(candidates, min(len(candidates), 4 * NUM_CHOICES)):
        if p.casefold() not in taken:
            distractors.append(p)
            taken.add(p.casefold())
        if len(distractors) == NUM_CHOICES - 1:
            break
    if len(distractors) < NUM_CHOICES - 1:
        raise ValueError(f"not enough distinct distractors for {gold!r}")
    gold_index = rng.randrange(NUM_CHOICES)
    return distractors[:gold_index] + [gold] + distractors[gold_index:], gold_index


def _hash_order(items: list[dict], task: str) -> list[dict]:
    return sorted(items, key=lambda it: _unit(f"moe-lab/tasks/{task}/order", json.dumps(it, sort_keys=True)))


_DEFINE = re.compile(r"^Define the (noun|verb|adj|adv) '(.+)'\.$")
_GLOSS_LINE = re.compile(r"^(.+?) \((noun|verb|adj|adv)\): (.*)$")


def wordnet_synonyms(glosses_text: str) -> dict[tuple[str, str], set[str]]:
    """(first lemma, pos) -> every lemma of the synsets that lemma heads, from ``lemma, ... (pos): gloss`` lines."""
    out: dict[tuple[str, str], set[str]] = {}
    for line in glosses_text.splitlines():
        m = _GLOSS_LINE.match(line)
        if m:
            lemmas = [x.strip() for x in m.group(1).split(",")]
            out.setdefault((lemmas[0], m.group(2)), set()).update(lemmas)
    return out


def wordnet_gloss_items(test: list[dict], synonyms: dict[tuple[str, str], set[str]]) -> list[dict]:
    """gloss -> lemma among 4 lemmas of the same part of speech."""
    parsed = [(r, *_DEFINE.match(r["prompt"]).groups()) for r in test]
    pools: dict[str, list[str]] = {}
    for _, pos, lemma in parsed:
        pools.setdefault(pos, []).append(lemma)
    pools = {pos: sorted(set(v)) for pos, v in pools.items()}
    items = []
    for r, pos, lemma in parsed:
        rng = random.Random(f"wordnet_gloss\0{r['prompt']}\0{r['response']}")
        choices, gold = _choices(rng, lemma, pools[pos], synonyms.get((lemma, pos), set()))
        items.append({"gloss": r["response"], "pos": pos, "lemma": lemma, "choices": choices, "gold": gold})
    return _hash_order(items, "wordnet_gloss")


def chatterbot_items(test: list[dict], categories: list[str]) -> tuple[list[dict], list[dict]]:
    """(category items: question and answer -> topic among 4; answer items: question -> answer among 4)."""
    group_categories: dict[str, set[str]] = {}
    group_responses: dict[str, set[str]] = {}
    for r in test:
        group_categories.setdefault(r["_group"], set()).add(r["category"])
        group_responses.setdefault(r["_group"], set()).add(r["response"])
    category_items, answer_items, asked = [], [], set()
    responses = sorted({r["response"] for r in test})
    for r in test:
        rng = random.Random(f"chatterbot_category\0{r['prompt']}\0{r['response']}")
        choices, gold = _choices(rng, r["category"], categories, group_categories[r["_group"]])
        category_items.append({"question": r["prompt"], "answer": r["response"], "category": r["category"],
                               "choices": choices, "gold": gold})
        if r["prompt"] in asked:  # one answer item per question (the first answer in the stored order)
            continue
        asked.add(r["prompt"])
        rng = random.Random(f"chatterbot_answer\0{r['prompt']}")
        choices, gold = _choices(rng, r["response"], responses, group_responses[r["_group"]])
        answer_items.append({"question": r["prompt"], "category": r["category"], "choices": choices, "gold": gold})
    return _hash_order(category_items, "chatterbot_category"), _hash_order(answer_items, "chatterbot_answer")


def stdlib_function_items(test: list[dict]) -> list[dict]:
    """docstring -> function signature among 4; docstrings shared by several functions are left out."""
    signatures: dict[str, set[str]] = {}
    for r in test:
        signatures.setdefault(r["response"], set()).add(r["prompt"])
    group_signatures: dict[str, set[str]] = {}
    for r in test:
        group_signatures.setdefault(r["_group"], set()).add(r["prompt"])
    pool = sorted({r["prompt"] for r in test})
    items = []
    for r in test:
        if len(signatures[r["response"]]) > 1:
            continue
        rng = random.Random(f"stdlib_function\0{r['prompt']}\0{r['response']}")
        choices, gold = _choices(rng, r["prompt"], pool, group_signatures[r["_group"]])
        items.append({"docstring": r["response"], "module": r["module"], "choices": choices, "gold": gold})
    return _hash_order(items, "stdlib_function")


# ----------------------------------------------------------------------------- files
def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n"
                   for r in records).encode("utf-8")


def build(shared: str | Path, out: str | Path, demo: str | Path = REPO / "data" / "demo") -> dict:
    """Write every file under ``out`` and return the manifest (also written as ``out/manifest.json``)."""
    shared, out = Path(shared), Path(out)
    demo_text = "\n".join(read_xz(p) for p in sorted(Path(demo).glob("*.txt.xz")))
    if not demo_text:
        raise FileNotFoundError(f"no demo corpus (*.txt.xz) in {demo}: decontamination needs it")
    files: dict[str, bytes] = {}
    sets: dict[str, dict] = {}
    splits: dict[str, dict[str, list[dict]]] = {}
    for spec in SETS:
        rows = json.loads(read_xz(shared / "finetune" / f"{spec.name}.json.xz"))
        splits[spec.name] = slice_set(spec, rows, demo_text)
        for split, records in splits[spec.name].items():
            files[f"{spec.name}/{split}.jsonl.xz"] = _jsonl(records)
        sets[spec.name] = {"label": spec.label, "source": f"finetune/{spec.name}.json.xz", "source_rows": len(rows),
                           **{split: len(records) for split, records in splits[spec.name].items()}}
    synonyms = wordnet_synonyms(read_xz(shared / "corpus" / "wordnet_glosses.txt.xz"))
    chatterbot_rows = json.loads(read_xz(shared / "finetune" / "chatterbot_qa.json.xz"))
    categories = sorted({r["category"] for r in chatterbot_rows})
    category, answer = chatterbot_items(splits["chatterbot_qa"]["test"], categories)
    bench = {
        "wordnet_gloss": wordnet_gloss_items(splits["wordnet_defs"]["test"], synonyms),
        "chatterbot_category": category,
        "chatterbot_answer": answer,
        "stdlib_function": stdlib_function_items(splits["stdlib_docstrings"]["test"]),
    }
    for task, items in bench.items():
        files[f"benchmark/{task}.jsonl.xz"] = _jsonl(items)
    manifest = {
        "format": FORMAT,
        "test_fraction": TEST_FRACTION,
        "sets": sets,
        "benchmark": {task: len(items) for task, items in bench.items()},
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    for name, data in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(data, preset=9))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Re-derive data/tasks from the shared offline sets (../shared/data).")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    p.add_argument("--out", type=Path, default=REPO / "data" / "tasks", help="where to write the task files")
    p.add_argument("--demo", type=Path, default=REPO / "data" / "demo", help="demo corpus to decontaminate against")
    args = p.parse_args(argv)
    manifest = build(args.shared, args.out, args.demo)
    for name, info in manifest["sets"].items():
        print(f"{name}: train {info['train']}, test {info['test']}")
    for task, n in manifest["benchmark"].items():
        print(f"benchmark/{task}: {n} items")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
