import time
from pathlib import Path

import numpy as np
import pytest

from moe_engine.data import DataConfig, ShardDataset, make_tokenizer, prepare, validate_data
from moe_engine.data import pipeline
from moe_engine.data.errors import ConfigError, DataValidationError
from moe_engine.data.shards import read_manifest
from moe_engine.data.tokenizer import Encoder, load_tokenizer


def test_raw_failure_stops_before_tokenizer_and_shards(tmp_path: Path, tiny_corpus, make_config, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a downstream step ran after a validation failure")

    monkeypatch.setattr(pipeline, "build_tokenizer", must_not_run)
    monkeypatch.setattr(pipeline, "write_shards", must_not_run)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataValidationError, match="empty_documents"):
        prepare([*tiny_corpus, tmp_path / "empty.txt"], tmp_path / "out", make_config())
    assert not (tmp_path / "out").exists()


def test_token_failure_leaves_only_the_failed_report(tmp_path: Path, tiny_corpus, make_config, monkeypatch):
    class BrokenEncoder(Encoder):  # a tokenizer/vocab mismatch: ids beyond the vocabulary
        def encode(self, texts):
            return [np.where(ids == ids.max(), self.vocab_size + 1, ids) for ids in super().encode(texts)]

    monkeypatch.setattr(pipeline, "Encoder", BrokenEncoder)
    out = tmp_path / "out"
    with pytest.raises(DataValidationError) as err:
        prepare(tiny_corpus, out, make_config(validation={"data_docs": True}))
    assert [f.rule for f in err.value.failures] == ["token_id_below_vocab"]
    assert err.value.report == str(tmp_path / "out.validation-failed" / "index.html")
    assert Path(err.value.report).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out.validation-failed"]


def test_existing_outputs(tmp_path: Path, tiny_corpus, make_config):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a moe-lab data output"):
        prepare(tiny_corpus, foreign, make_config())
    assert (foreign / "notes.txt").exists()
    out = prepare(tiny_corpus, tmp_path / "out", make_config())
    (out / "stale.txt").write_text("from an older run")
    prepare(tiny_corpus, out, make_config())  # ours: replaced as a whole
    assert not (out / "stale.txt").exists() and (out / "manifest.json").exists()


def test_make_tokenizer_excludes_ood_text(tmp_path: Path, tiny_corpus, make_config):
    out = make_tokenizer(tiny_corpus, tmp_path / "tok", make_config())
    assert len(load_tokenizer(out)) == 400
    docs = pipeline.ingest(tiny_corpus, make_config())
    texts = list(pipeline._training_texts(docs, make_config()))
    assert len(texts) == sum(d.domain != "milton" for d in docs)


def test_validate_raw_sources(tmp_path: Path, tiny_corpus):
    summary = validate_data(tiny_corpus)
    assert summary["documents"] >= 4 and "milton" in summary["domains"]


def test_demo_corpus_to_validated_shards_under_two_minutes(tmp_path: Path):
    start = time.perf_counter()
    out = prepare(None, tmp_path / "demo")  # the committed corpus, default config, Data Docs on
    elapsed = time.perf_counter() - start
    assert elapsed < 120, f"demo prepare took {elapsed:.0f} s"
    manifest = read_manifest(out)
    assert len(manifest["domains"]) >= 8 and manifest["domains"]["milton"]["ood"]
    assert manifest["vocab_size"] == 8192 and manifest["dtype"] == "uint16"
    assert (out / "validation" / "index.html").is_file()
    batch = next(iter(ShardDataset(out, batch_size=4)))
    assert tuple(batch.shape) == (4, 256)


def test_gpt2_and_a_vocab_beyond_uint16(tmp_path: Path, tiny_corpus, gpt2_dir: Path, make_config):
    out = prepare(tiny_corpus, tmp_path / "gpt2", make_config(), tokenizer=gpt2_dir)
    manifest = read_manifest(out)
    assert (manifest["vocab_size"], manifest["dtype"], manifest["eos_id"]) == (50257, "uint16", 50256)
    big = load_tokenizer(gpt2_dir)
    big.add_tokens([f"<extra_{i}>" for i in range(65536 - len(big) + 10)])
    big.save_pretrained(str(tmp_path / "big"))
    config = make_config(tokenizer={"pretrained": str(tmp_path / "big")})
    manifest = read_manifest(prepare(tiny_corpus, tmp_path / "wide", config))
    assert manifest["vocab_size"] > 65535 and manifest["dtype"] == "uint32"
    assert next(iter(ShardDataset(tmp_path / "wide", batch_size=2))).shape == (2, 32)


@pytest.mark.slow
def test_full_shared_corpus(tmp_path: Path, shared_data: Path):
    config = DataConfig.from_dict({"ingest": {"domain_by": "file"}})
    manifest = read_manifest(prepare([shared_data / "corpus"], tmp_path / "full", config))
    assert manifest["documents"] > 4000 and len(manifest["domains"]) == 9
    assert manifest["splits"]["train"]["tokens"] > 10_000_000
