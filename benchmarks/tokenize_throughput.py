"""Tokenisation throughput (MB/s of UTF-8 text) of the data stage, with baselines in the same run.

Measures, on the same chunked corpus the shard writer sees (documents cut by chunk_text):
  - our byte-level BPE (trained here on the corpus, vocab --vocab-size):
      batch: Encoder.encode (Rust encode_batch, all cores) - what prepare() uses
      single: one backend.encode call per chunk (one thread) - the baseline
  - GPT-2's HF tokenizer (50,257 tokens), batch and single, when --gpt2 is found
and the end-to-end wall time of prepare() on the demo corpus (raw text -> validated shards).

    python benchmarks/tokenize_throughput.py                       # demo corpus
    python benchmarks/tokenize_throughput.py --corpus ../shared/data/corpus --no-prepare

Writes benchmarks/results/tokenize_throughput.json (machine, versions, date, numbers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import lzma
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe_engine.data.config import DataConfig, IngestConfig, TokenizerConfig  # noqa: E402
from moe_engine.data.ingest import read_documents  # noqa: E402
from moe_engine.data.shards import chunk_text  # noqa: E402
from moe_engine.data.tokenizer import Encoder, build_tokenizer, load_tokenizer  # noqa: E402


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(name: str, tok, chunks: list[str], n_bytes: int, repeat: int) -> dict:
    encoder = Encoder(tok)
    backend = tok.backend_tokenizer
    n_tokens = sum(len(ids) for ids in encoder.encode(chunks))  # also warms up
    result = {"tokenizer": name, "vocab_size": encoder.vocab_size, "tokens": n_tokens,
              "bytes_per_token": round(n_bytes / n_tokens, 3)}
    for mode, fn in (("batch", lambda: encoder.encode(chunks)),
                     ("single_thread", lambda: [backend.encode(c, add_special_tokens=False) for c in chunks])):
        times = timed(fn, repeat)
        result[mode] = {"median_s": round(statistics.median(times), 4), "times_s": [round(t, 4) for t in times],
                        "MB_per_s": round(n_bytes / 1e6 / statistics.median(times), 2)}
    result["batch_speedup"] = round(result["single_thread"]["median_s"] / result["batch"]["median_s"], 2)
    return result


def gpt2_dir(path: Path, tmp: Path) -> Path | None:
    """The GPT-2 tokenizer dir, decompressing tokenizer.json.xz into `tmp` if needed."""
    if (path / "tokenizer.json").is_file():
        return path
    if not (path / "tokenizer.json.xz").is_file():
        return None
    (tmp / "tokenizer.json").write_bytes(lzma.decompress((path / "tokenizer.json.xz").read_bytes()))
    (tmp / "tokenizer_config.json").write_bytes((path / "tokenizer_config.json").read_bytes())
    return tmp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO / "data" / "demo")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--gpt2", type=Path, default=REPO.parent / "shared" / "data" / "tokenizers" / "gpt2")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-prepare", action="store_true", help="skip the end-to-end demo prepare() timing")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tokenize_throughput.json")
    args = parser.parse_args()

    import numpy
    import tokenizers
    import transformers

    docs = read_documents([args.corpus], IngestConfig(domain_by="file"))
    chunks = [c for d in docs for c in chunk_text(d.text, 4096)]
    n_bytes = sum(len(c.encode("utf-8")) for c in chunks)
    results = {
        "benchmark": "tokenize_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "default"),
                    # Other processes on a shared machine slow every number down: record it.
                    "load_avg_1min_before": round(os.getloadavg()[0], 2)},
        "versions": {"python": platform.python_version(), "tokenizers": tokenizers.__version__,
                     "transformers": transformers.__version__, "numpy": numpy.__version__},
        "corpus": {"path": os.path.relpath(args.corpus, REPO), "documents": len(docs), "chunks": len(chunks),
                   "MB": round(n_bytes / 1e6, 3)},
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        build_tokenizer((d.text for d in docs), TokenizerConfig(vocab_size=args.vocab_size), tmp / "bpe")
        results["bpe_train_s"] = round(time.perf_counter() - start, 2)
        results["results"].append(measure(f"moe-lab byte-level BPE {args.vocab_size}",
                                          load_tokenizer(tmp / "bpe"), chunks, n_bytes, args.repeat))
        (tmp / "gpt2").mkdir()
        found = gpt2_dir(args.gpt2, tmp / "gpt2")
        if found:
            results["results"].append(measure("GPT-2 (HF tokenizer.json)", load_tokenizer(found), chunks,
                                              n_bytes, args.repeat))
        if not args.no_prepare:
            from moe_engine.data.pipeline import prepare

            start = time.perf_counter()
            prepare(None, tmp / "demo", DataConfig())  # default config incl. Great Expectations Data Docs
            results["prepare_demo_wall_s"] = round(time.perf_counter() - start, 2)
    results["machine"]["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
