"""Data stage: raw text -> tokenizer -> validated, memory-mapped token shards -> batches.

Public API:

    from moe_engine.data import prepare, DataConfig, ShardDataset

    out = prepare(sources=None, out_dir="outputs/data", config=None, tokenizer=None)
        # sources: files/folders (text, jsonl, parquet; plain/.xz/.gz/.bz2), optionally
        # "DOMAIN=PATH"; None = the committed demo corpus in data/demo. Returns out_dir, which
        # holds manifest.json, {train,val,ood}_NNNNN.npy, tokenizer/, documents.parquet and
        # validation/index.html (Great Expectations Data Docs).

    ds = ShardDataset(out, split="train", rank=0, world_size=1, seed=0, batch_size=8)
    for batch in ds:          # torch.LongTensor [batch_size, seq_len]
        ...
    state = ds.state_dict()   # resume exactly: ds.load_state_dict(state)

    make_tokenizer(sources, out_dir, config) -> Path      # HF tokenizer dir (AutoTokenizer loads it)
    validate_data(path_or_sources, config, report_dir) -> dict  # re-check shards or raw sources
    DataConfig.from_dict(params["data"]) / load_params("params.yaml")  # typed sections

Every user-facing problem raises a `DataError` subclass (errors.py) with a readable message;
`moe-lab data ...` (cli.py) prints it and exits 2. Importing this package has no side effects
and does not import torch, pandas or Great Expectations; those load on first use.
"""

from moe_engine.data.config import (DataConfig, IngestConfig, ShardsConfig, TokenizerConfig,
                                    ValidationConfig, load_params)
from moe_engine.data.errors import (ConfigError, DataError, DataValidationError, IngestError,
                                    ShardIntegrityError, TokenizerError)

__all__ = [
    "prepare", "make_tokenizer", "validate_data", "ShardDataset",
    "DataConfig", "IngestConfig", "TokenizerConfig", "ShardsConfig", "ValidationConfig", "load_params",
    "DataError", "ConfigError", "IngestError", "TokenizerError", "DataValidationError", "ShardIntegrityError",
]


def __getattr__(name: str):
    # Lazy: the pipeline pulls in numpy/tokenizers and the loader torch; the CLI's --help
    # and config checks should not pay for that.
    if name in ("prepare", "make_tokenizer", "validate_data"):
        from moe_engine.data import pipeline

        return getattr(pipeline, name)
    if name == "ShardDataset":
        from moe_engine.data.loader import ShardDataset

        return ShardDataset
    raise AttributeError(f"module 'moe_engine.data' has no attribute {name!r}")
