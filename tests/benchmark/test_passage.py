import json

import numpy as np
import pytest

from moe_engine.benchmark.passage import passage_items
from moe_engine.data.shards import read_manifest, sequence_domains
from moe_engine.data.tokenizer import load_tokenizer
from moe_engine.errors import InputError


def _rows(data_dir, split):
    manifest = read_manifest(data_dir)
    shards = [np.load(data_dir / s["file"]) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(shards), sequence_domains(manifest, split)


@pytest.mark.parametrize("split", ["val", "ood"])
def test_the_gold_choice_continues_the_context_and_distractors_share_its_domain(demo_data, split):
    tokenizer = load_tokenizer(demo_data / "tokenizer")
    rows_NL, (names, domain_N) = _rows(demo_data, split)
    half = rows_NL.shape[1] // 2
    items = passage_items(demo_data, split, 30, seed=0)
    assert len(items) == 30
    counts = np.bincount(domain_N, minlength=len(names))
    for item in items:
        seq = item["sequences"]
        gold_row = seq[item["gold"]]
        assert len(seq) == len(set(seq)) == 4
        assert item["context"] == tokenizer.decode(rows_NL[gold_row, :half].tolist())
        assert item["choices"] == [tokenizer.decode(rows_NL[j, half:].tolist()) for j in seq]
        assert names[domain_N[gold_row]] == item["domain"]
        if counts[domain_N[gold_row]] >= 4:  # harder than telling domains apart
            assert {names[domain_N[j]] for j in seq} == {item["domain"]}
    if split == "ood":
        assert {it["domain"] for it in items} == {"milton"}
    golds = np.bincount([it["gold"] for it in items], minlength=4)
    assert (golds > 0).all()  # the answer is not always in the same place


def test_items_are_seeded(demo_data):
    a, b = passage_items(demo_data, "val", 10, seed=0), passage_items(demo_data, "val", 10, seed=0)
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(passage_items(demo_data, "val", 10, seed=1))


def test_a_split_without_sequences_is_refused(demo_data):
    with pytest.raises(InputError, match="'train2'"):
        passage_items(demo_data, "train2", 10)
