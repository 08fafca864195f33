"""Next-passage choice over held-out token shards, built at run time as an lm-eval task.

An item takes one sequence of a split (``val``: held-out chunks of the training domains; ``ood``:
the out-of-domain documents), decodes its first half as the context and asks which of 4 second
halves continues it: its own, or those of 3 other sequences of the same split and, where the domain
has enough sequences, the same domain (so matching the domain is not enough). All candidates are
seq_len / 2 tokens long, so ``acc`` and the length-normalised ``acc_norm`` mostly agree. Sequences
are drawn by ``default_rng([seed, split])``; the text is re-tokenized by each model's own tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moe_engine.errors import InputError

SPLIT_CODES = {"val": 1, "ood": 2}


class _Rows:
    """The sequences of one split, row by row from memory-mapped shards (only the rows used are read)."""

    def __init__(self, data_dir: Path, manifest: dict, split: str):
        from moe_engine.data.shards import shard_problem

        self.shards = []
        for shard in manifest["splits"][split]["shards"]:
            problem = shard_problem(data_dir, shard, manifest)
            if problem is not None:
                raise InputError(f"{data_dir}: {problem[2]} ({problem[1]}); re-run `moe-lab data prepare`")
            self.shards.append(np.load(data_dir / shard["file"], mmap_mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return np.asarray(self.shards[k][i - self.starts[k]])


def passage_items(data_dir: str | Path, split: str, count: int, seed: int = 0) -> list[dict]:
    """Up to ``count`` items {context, choices, gold, domain, sequences} from ``split`` of a shards directory."""
    from moe_engine.data.shards import read_manifest, sequence_domains
    from moe_engine.data.tokenizer import load_tokenizer
    from moe_engine.errors import UserError

    data_dir = Path(data_dir)
    if not (data_dir / "manifest.json").is_file():
        raise InputError(f"--data {data_dir} is not a prepared shards directory (no manifest.json); pass the "
                         "--out folder of `moe-lab data prepare`")
    try:
        manifest = read_manifest(data_dir)
        tokenizer = load_tokenizer(data_dir / "tokenizer")
    except UserError as exc:
        raise InputError(f"--data {data_dir} is not a prepared shards directory: {exc}") from None
    if manifest["splits"].get(split, {}).get("sequences", 0) < 4:
        have = {s: v.get("sequences", 0) for s, v in manifest["splits"].items()}
        raise InputError(f"{data_dir} has fewer than 4 '{split}' sequences ({have}): passage_{split} needs 4 per item; "
                         f"drop it from benchmark.tasks or prepare data with that split")
    rows = _Rows(data_dir, manifest, split)
    names, domain_N = sequence_domains(manifest, split)
    half = manifest["seq_len"] // 2
    rng = np.random.default_rng([seed, SPLIT_CODES.get(split, 0)])
    by_domain = {d: np.flatnonzero(domain_N == d) for d in range(len(names))}
    everyone = np.arange(len(rows))
    items = []
    for i in rng.permutation(len(rows))[:count]:
        same = by_domain[domain_N[i]]
        pool = same if len(same) >= 4 else everyone
        others = rng.choice(pool[pool != i], size=3, replace=False)
        gold = int(rng.integers(4))
        picks = [*others[:gold], i, *others[gold:]]
        items.append({
            "context": tokenizer.decode(rows[i][:half].tolist()),
            "choices": [tokenizer.decode(rows[j][half:].tolist()) for j in picks],
            "gold": gold,
            "domain": names[domain_N[i]],
            "sequences": [int(j) for j in picks],  # the row each choice's half comes from (provenance)
        })
    return items


def write_passage_task(data_dir: str | Path, split: str, count: int, seed: int, out_dir: Path, cache_dir: Path) -> str:
    """Write ``passage_<split>.jsonl`` and its lm-eval task YAML into ``out_dir``; returns the task name."""
    import yaml

    name = f"passage_{split}"
    items = passage_items(data_dir, split, count, seed)
    data = out_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    task = {
        "task": name,
        "tag": ["moe_lab"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",  # the halves join exactly where the sequence was cut
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0, "data": str(Path(data_dir)), "split": split, "seed": seed},
    }
    (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return name
