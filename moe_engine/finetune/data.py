"""Task data for fine-tuning: (prompt, response) records -> validated, tokenised training sequences.

Input: a JSON list, JSONL or parquet file (plain, .xz, .gz) of records with ``prompt`` and
``response`` (other fields are kept as labels), or a folder holding ``train.*`` and ``test.*`` such
files (the project's ``data/tasks/<set>/``). A single file is split by a hash of each record, so the
split is stable across runs and machines.

Template: the tokenizer's chat template when it has one (the prompt as the user turn, generation
prompt added), else the plain template ``"### Prompt:\\n{prompt}\\n### Response:\\n"``; the response
and an end-of-text token follow. Labels are -100 on the prompt (and padding), so the loss is on
response tokens only.

Validation (pandera for the readable summary, Great Expectations for the Data Docs report): no empty
prompt or response, no prompt longer than the context, a bounded share of duplicate pairs, enough
records. A broken rule stops the stage with exit code 2, naming the file, the rule and examples.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from moe_engine.data.errors import DataValidationError, IngestError, RuleFailure
from moe_engine.errors import InputError
from moe_engine.finetune.config import TaskConfig

PLAIN_TEMPLATE = "### Prompt:\n{prompt}\n### Response:\n"
IGNORE = -100
SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")


def _open_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(raw)
    if path.suffix == ".gz":
        return gzip.decompress(raw)
    return raw


def _kind(path: Path) -> str:
    name = path.name.removesuffix(".xz").removesuffix(".gz")
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise InputError(f"{path}: not a task data file (expected {', '.join(SUFFIXES)}, optionally .xz/.gz)")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of one file; a malformed file or record is named with its line or row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"task data file {path} does not exist")
    kind = _kind(path)
    try:
        raw = _open_bytes(path)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise IngestError(f"{path}: cannot decompress ({exc})") from None
    if kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(pa.BufferReader(raw)).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise IngestError(f"{path}: not a readable parquet file ({exc})") from None
        where = "row"
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IngestError(f"{path}: not UTF-8 text ({exc})") from None
        if kind == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise IngestError(f"{path}: not valid JSON ({exc})") from None
            if not isinstance(rows, list):
                raise IngestError(f"{path}: a JSON task file holds a list of records, got {type(rows).__name__}")
            where = "record"
        else:
            rows, where = [], "line"
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise IngestError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
    bad = [i for i, r in enumerate(rows, 1) if not isinstance(r, dict) or "prompt" not in r or "response" not in r]
    if bad:
        raise IngestError(f"{path}: {len(bad)} {where}(s) lack a 'prompt' or 'response' field ({where} "
                          f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})")
    for i, r in enumerate(rows, 1):
        for key in ("prompt", "response"):
            if not isinstance(r[key], str):
                raise IngestError(f"{path}: {where} {i}: '{key}' must be text, got {type(r[key]).__name__}")
    return rows


def _files(folder: Path, split: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith(f"{split}.") and not p.name.startswith("."))


def is_test(record: dict, fraction: float) -> bool:
    digest = hashlib.sha256(f"{record['prompt']}\0{record['response']}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


def load_task(path: str | Path, cfg: TaskConfig) -> tuple[list[dict], list[dict], dict]:
    """(train records, test records, a description of the source)."""
    path = Path(path)
    if path.is_dir():
        train_files, test_files = _files(path, "train"), _files(path, "test")
        if not train_files:
            raise InputError(f"{path} holds no train.* file (train.jsonl, train.jsonl.xz, train.parquet, ...); "
                             "pass a folder with train/test files or one task file")
        train = [r for f in train_files for r in read_records(f)]
        test = [r for f in test_files for r in read_records(f)]
        if not test:  # a folder with training records only: hold out by hash
            records, train = train, [r for r in train if not is_test(r, cfg.test_fraction)]
            test = [r for r in records if is_test(r, cfg.test_fraction)]
        source = {"train": [str(f) for f in train_files], "test": [str(f) for f in test_files]}
    elif path.is_file():
        records = read_records(path)
        train = [r for r in records if not is_test(r, cfg.test_fraction)]
        test = [r for r in records if is_test(r, cfg.test_fraction)]
        source = {"file": str(path), "test_fraction": cfg.test_fraction}
    else:
        raise InputError(f"task data {path} does not exist")
    if cfg.max_records:
        train = train[: cfg.max_records]
    return train, test, source


# ----------------------------------------------------------------------------- encoding
@dataclass
class TaskEncoder:
    tokenizer: Any
    max_length: int
    template: str = "auto"

    def __post_init__(self):
        self.chat = self.template == "auto" and bool(getattr(self.tokenizer, "chat_template", None))
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise InputError("the tokenizer has no end-of-text token (eos_token); set one in its tokenizer_config.json")
        self.eos_id = int(eos)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos)

    def prompt_text(self, prompt: str) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return PLAIN_TEMPLATE.format(prompt=prompt)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(self.prompt_text(prompt), add_special_tokens=not self.chat)["input_ids"]

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """(input_ids, labels): the prompt then the response and eos, cut to max_length; labels -100 on the prompt."""
        prompt = self.prompt_ids(record["prompt"])
        response = self.tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [self.eos_id]
        ids = (prompt + response)[: self.max_length]
        labels = ([IGNORE] * len(prompt) + response)[: self.max_length]
        return ids, labels


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- validation
def record_table(records: list[dict], encoder: TaskEncoder, source: str):
    import pandas as pd

    prompts = [encoder.prompt_ids(r["prompt"]) for r in records]
    df = pd.DataFrame({
        "source": source, "index": np.arange(len(records), dtype=np.int64),
        "prompt_chars": np.array([len(r["prompt"].strip()) for r in records], dtype=np.int64),
        "response_chars": np.array([len(r["response"].strip()) for r in records], dtype=np.int64),
        "prompt_tokens": np.array([len(p) for p in prompts], dtype=np.int64),
    })
    df["is_duplicate"] = pd.Series([(r["prompt"], r["response"]) for r in records]).duplicated().to_numpy()
    df["fits"] = df["prompt_tokens"] < encoder.max_length
    return df


def validate_records(records: list[dict], encoder: TaskEncoder, cfg: TaskConfig, source: str,
                     report_dir: Path | None = None) -> dict[str, Any]:
    """Check the training records (pandera; Great Expectations Data Docs when ``report_dir``)."""
    import pandera.errors
    import pandera.pandas as pa

    df = record_table(records, encoder, source)
    rules = {
        "empty_prompt": ("prompt_chars", "every prompt has text", lambda s: s > 0),
        "empty_response": ("response_chars", "every response has text", lambda s: s > 0),
        "prompt_fits_context": ("fits", f"share of prompts with no room for a response in max_length {cfg.max_length} "
                                        f"tokens <= {cfg.max_overlong_share} (those are left out)",
                                lambda s: s | ((~s).mean() <= cfg.max_overlong_share)),
        "duplicate_share": ("is_duplicate", f"share of duplicate (prompt, response) pairs <= {cfg.max_duplicate_share}",
                            lambda s: ~s | (s.mean() <= cfg.max_duplicate_share)),
    }
    schema = pa.DataFrameSchema(
        {col: pa.Column(checks=[pa.Check(fn, error=name) for name, (c, _, fn) in rules.items() if c == col])
         for col in ("prompt_chars", "response_chars", "fits", "is_duplicate")},
        checks=[pa.Check(lambda d: len(d) >= cfg.min_records, error="min_records")], name="task records")
    failures = []
    try:
        schema.validate(df, lazy=True)
    except pandera.errors.SchemaErrors as exc:
        for check, group in exc.failure_cases.groupby("check", sort=False):
            rows = [int(i) for i in group["index"] if i is not None and not np.isnan(i)]
            if check == "min_records":
                failures.append(RuleFailure(check, f"at least {cfg.min_records} training records; found {len(df)}", 1, (source,)))
                continue
            column = rules[check][0]
            examples = tuple(f"{source} record {i + 1}: {column} = {df.loc[i, column]}; prompt {records[i]['prompt'][:60]!r}"
                             for i in rows[:3])
            failures.append(RuleFailure(check, rules[check][1], len(rows), (source,), examples))
    report = _summary_page(df, cfg, rules, failures, source, Path(report_dir)) if report_dir is not None else None
    if failures:
        raise DataValidationError(failures, str(report) if report else None)
    return {"records": int(len(df)), "duplicate_share": float(df["is_duplicate"].mean()),
            "overlong_prompts": int((~df["fits"]).sum()), "prompt_tokens_max": int(df["prompt_tokens"].max()),
            "report": str(report) if report else None}


def fitting(records: list[dict], encoder: TaskEncoder) -> list[dict]:
    """The records whose prompt leaves room for a response in ``max_length`` tokens."""
    return [r for r in records if len(encoder.prompt_ids(r["prompt"])) < encoder.max_length]


def _summary_page(df, cfg: TaskConfig, rules: dict, failures: list[RuleFailure], source: str, report_dir: Path) -> Path:
    """``report_dir/index.html``: each rule with its limit, observed value and result, the record sizes; a
    self-contained page that reads offline. Great Expectations' Data Docs go to ``report_dir/data_docs``."""
    import pandas as pd

    from moe_engine.data.validate import write_rules_page

    docs = _data_docs(df, cfg, rules, report_dir / "data_docs")
    observed = {"empty_prompt": f"min {df['prompt_chars'].min():,} characters",
                "empty_response": f"min {df['response_chars'].min():,} characters",
                "prompt_fits_context": f"{(~df['fits']).sum():,} of {len(df):,} prompts too long (max {df['prompt_tokens'].max():,} tokens)",
                "duplicate_share": f"{df['is_duplicate'].mean():.4f}"}
    limits = {"min_records": (f"at least {cfg.min_records} training records", f"{len(df):,} records"),
              **{name: (description, observed[name]) for name, (_, description, _) in rules.items()}}
    sizes = pd.DataFrame([{"source": source, "records": len(df), "prompt characters": int(df["prompt_chars"].sum()),
                           "response characters": int(df["response_chars"].sum()),
                           "prompt tokens, mean": float(df["prompt_tokens"].mean()), "prompt tokens, max": int(df["prompt_tokens"].max()),
                           "duplicates": int(df["is_duplicate"].sum())}])
    return write_rules_page(report_dir / "index.html", "Task data validation", limits, failures, [("Records", sizes)],
                            note="Limits are params.yaml finetune.task.", meta={"records": f"{len(df):,} from {source}"},
                            data_docs=docs)


def _data_docs(df, cfg: TaskConfig, rules: dict, report_dir: Path) -> Path:
    """The same rules as a Great Expectations suite, with its Data Docs written to ``report_dir``."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig

    site = {"class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(report_dir).resolve())}}
    ctx = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(), analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False), data_docs_sites={"report": site}))
    batch = ctx.data_sources.add_pandas("tasks").add_dataframe_asset("records").add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name="task_records"))
    for expectation in (
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_records, meta={"rule": "min_records"}),
        gxe.ExpectColumnValuesToBeBetween(column="prompt_chars", min_value=1, meta={"rule": "empty_prompt"}),
        gxe.ExpectColumnValuesToBeBetween(column="response_chars", min_value=1, meta={"rule": "empty_response"}),
        gxe.ExpectColumnMeanToBeBetween(column="fits", min_value=1.0 - cfg.max_overlong_share, meta={"rule": "prompt_fits_context"}),
        gxe.ExpectColumnMeanToBeBetween(column="is_duplicate", max_value=cfg.max_duplicate_share, meta={"rule": "duplicate_share"}),
    ):
        suite.add_expectation(expectation)
    definition = ctx.validation_definitions.add(gx.ValidationDefinition(name="task_records", data=batch, suite=suite))
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(name="task_records", validation_definitions=[definition],
                                                   actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")]))
    checkpoint.run(batch_parameters={"dataframe": df})
    return Path(report_dir) / "index.html"


# ----------------------------------------------------------------------------- the loader
class TaskDataset:
    """Training batches (dicts) of encoded records: disjoint per rank, shuffled per epoch with
    ``default_rng([seed, epoch])``, exactly resumable (``state_dict``), like ``data.loader.ShardDataset``."""

    def __init__(self, encoded: list[tuple[list[int], list[int]]], pad_id: int, max_length: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, batch_size: int = 8, shuffle: bool = True, epochs: int | None = None):
        self.encoded, self.pad_id, self.seq_len = encoded, pad_id, max_length
        self.rank, self.world_size, self.seed, self.batch_size = rank, world_size, seed, batch_size
        self.shuffle, self.epochs = shuffle, epochs
        self.per_rank = len(encoded) // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise InputError(f"{len(encoded)} training records are too few for world_size={world_size} x "
                             f"micro_batch_size={batch_size}; lower micro_batch_size or add records")
        self.epoch, self.batch = 0, 0

    def __iter__(self) -> Iterator[dict]:
        while self.epochs is None or self.epoch < self.epochs:
            n = len(self.encoded)
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            mine = order[self.rank * self.per_rank: (self.rank + 1) * self.per_rank]
            while self.batch < self.batches_per_epoch:
                index = mine[self.batch * self.batch_size: (self.batch + 1) * self.batch_size]
                self.batch += 1
                yield collate([self.encoded[i] for i in index], self.pad_id)
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "records": len(self.encoded),
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        mine = {"seed": self.seed, "records": len(self.encoded), "world_size": self.world_size, "batch_size": self.batch_size}
        for key, value in mine.items():
            if state.get(key) != value:
                raise InputError(f"loader state has {key}={state.get(key)!r} but this run has {value!r}; positions would not match")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
