import json
from pathlib import Path

import numpy as np
import pytest

from moe_engine.data.errors import ShardIntegrityError
from moe_engine.data.shards import (chunk_text, file_sha256, read_manifest, sequence_domains, split_of,
                                    verify_shards)
from moe_engine.data.tokenizer import load_tokenizer, tokenizer_hash


def test_chunks_cut_at_paragraphs_and_rejoin_exactly(tiny_docs):
    text = "\n\n".join(tiny_docs["shakespeare"])
    chunks = chunk_text(text, 512)
    assert "".join(chunks) == text
    assert all(len(c) <= 512 for c in chunks) and all(len(c) >= 256 for c in chunks[:-1])
    assert sum(c.endswith("\n") for c in chunks[:-1]) == len(chunks) - 1  # no word was cut
    assert chunk_text("x" * 1000, 400) == ["x" * 400, "x" * 400, "x" * 200]  # no break: hard cut


def test_split_depends_only_on_text_and_seed():
    chunks = [f"chunk number {i}" for i in range(4000)]
    val = [c for c in chunks if split_of(c, 0.1, seed=0) == "val"]
    assert 300 < len(val) < 500  # ~10%
    assert val == [c for c in chunks if split_of(c, 0.1, seed=0) == "val"]  # stable
    assert val != [c for c in chunks if split_of(c, 0.1, seed=1) == "val"]  # the seed salts it
    assert all(split_of(c, 0.0, 0) == "train" for c in chunks[:100])


def test_manifest_records_counts_hashes_and_tokenizer(prepared: Path):
    m = read_manifest(prepared)
    assert m["seq_len"] == 32 and m["dtype"] == "uint16" and m["vocab_size"] == 400
    assert m["tokenizer"]["sha256"] == tokenizer_hash(prepared / "tokenizer")
    assert set(m["splits"]) == {"train", "val", "ood"}
    assert set(m["splits"]["ood"]["domains"]) == {"milton"}  # out-of-domain only, never trained on
    assert "milton" not in m["splits"]["train"]["domains"] and m["domains"]["milton"]["ood"]
    total = 0
    for split in m["splits"].values():
        assert len(split["shards"]) >= 1
        for shard in split["shards"]:
            ids = np.load(prepared / shard["file"], mmap_mode="r")
            assert ids.shape == (shard["sequences"], 32) and ids.dtype == np.uint16
            assert file_sha256(prepared / shard["file"]) == shard["sha256"]
            total += ids.size
        assert split["tokens"] == split["sequences"] * 32
    assert m["tokens"] == total
    assert len(m["splits"]["train"]["shards"]) > 1  # tokens_per_shard=2048 forces several


def test_rows_have_one_domain_and_decode_to_corpus_text(prepared: Path, tiny_docs):
    m = read_manifest(prepared)
    names, domain_N = sequence_domains(m, "train")
    assert len(domain_N) == m["splits"]["train"]["sequences"]
    tok = load_tokenizer(prepared / "tokenizer")
    rows = np.concatenate([np.load(prepared / s["file"]) for s in m["splits"]["train"]["shards"]])
    code = rows[domain_N == names.index("python_stdlib_code")]
    text = tok.decode(code[:4].reshape(-1).tolist())
    corpus = "\n".join(tiny_docs["python_stdlib_code"])
    # Val chunks are cut out, so compare a stretch inside the first row.
    assert text[5:60] in corpus


def test_prepare_is_reproducible(prepared: Path, tiny_corpus, tmp_path: Path, make_config):
    from moe_engine.data import prepare

    again = prepare(tiny_corpus, tmp_path / "again", make_config())
    a, b = read_manifest(prepared), read_manifest(again)
    assert a["splits"] == b["splits"] and a["tokenizer"] == b["tokenizer"]


def _corrupt(path: Path, edit) -> None:
    m = read_manifest(path)
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_truncated_shard_is_reported(prepared_copy: Path):
    shard = prepared_copy / "train_00001.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ShardIntegrityError) as err:
        verify_shards(prepared_copy)
    assert "truncated_shard" in str(err.value) and "train_00001.npy truncated" in str(err.value)


def test_manifest_hash_mismatch_is_reported(prepared_copy: Path):
    _corrupt(prepared_copy, lambda m: m["splits"]["val"]["shards"][0].update(sha256="0" * 64))
    with pytest.raises(ShardIntegrityError) as err:
        verify_shards(prepared_copy)
    assert [f.rule for f in err.value.failures] == ["sha256_mismatch"]
    assert "val_00000.npy: sha256" in str(err.value)


def test_token_ids_at_or_above_vocab_are_reported(prepared_copy: Path):
    shard = prepared_copy / "train_00000.npy"
    ids = np.load(shard)
    ids[3, 7] = 400  # == vocab_size: out of range
    ids[5, 0] = 65000
    np.save(shard, ids)
    _corrupt(prepared_copy, lambda m: m["splits"]["train"]["shards"][0].update(sha256=file_sha256(shard)))
    with pytest.raises(ShardIntegrityError) as err:
        verify_shards(prepared_copy)
    (failure,) = err.value.failures
    assert failure.rule == "token_id_out_of_range"
    assert "2 ids >= 400, first 400 at row 3, col 7" in failure.examples[0]


def test_missing_manifest_and_tokenizer_change(prepared_copy: Path):
    (prepared_copy / "tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ShardIntegrityError, match="tokenizer_hash_mismatch"):
        verify_shards(prepared_copy)
    (prepared_copy / "manifest.json").unlink()
    with pytest.raises(ShardIntegrityError, match="missing_manifest"):
        verify_shards(prepared_copy)
