import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_engine.cli import main
from moe_engine.data.shards import read_manifest

REPO = Path(__file__).resolve().parents[2]
FAST = ["-q", "--set", "tokenizer.vocab_size=400", "--set", "shards.seq_len=32", "--set", "shards.chunk_chars=512",
        "--set", "validation.data_docs=false"]


@pytest.mark.parametrize("command", [[], ["tokenizer"], ["shards"], ["prepare"], ["validate"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", *command, "--help"])
    assert exit_.value.code == 0
    assert "usage: moe-lab data" in capsys.readouterr().out


def test_tokenizer_then_shards_then_validate(tmp_path: Path, tiny_corpus, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  shards: {seq_len: 32, chunk_chars: 512, tokens_per_shard: 4096}\n"
                      "  validation: {data_docs: false}\n")
    src = [str(p) for p in tiny_corpus]
    assert main(["data", "tokenizer", *src, "--out", str(tmp_path / "tok"), "--vocab-size", "400", "-q"]) == 0
    assert main(["data", "shards", *src, "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "shards"),
                 "--params", str(params), "-q"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer:" in out and "(vocab 400," in out and "shards:" in out
    manifest = read_manifest(tmp_path / "shards")
    assert manifest["seq_len"] == 32 and manifest["vocab_size"] == 400
    report, metrics = tmp_path / "report", tmp_path / "metrics" / "data.json"
    assert main(["data", "validate", str(tmp_path / "shards"), "--report", str(report), "--metrics", str(metrics)]) == 0
    assert (report / "index.html").is_file()
    assert json.loads(metrics.read_text())["tokens"] == manifest["tokens"]


BAD_INPUTS = {
    "empty.txt": (b"", "empty_documents"),
    "garbage.bin": (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "binary_content"),
    "latin1.txt": ("Grüße aus Köln".encode("latin-1"), "non_utf8_share"),
    "dups.txt": (b"\n<|endoftext|>\n".join([b"the very same document"] * 8), "duplicate_share"),
    "rows.jsonl": (b'{"text": "fine"}\n{"content": "wrong field"}\n', "have no text field 'text' (line 2)"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_exits_2_with_a_readable_message(name, tmp_path: Path, tiny_corpus, capsys):
    content, problem = BAD_INPUTS[name]
    bad = tmp_path / name
    bad.write_bytes(content)
    out = tmp_path / "shards"
    assert main(["data", "prepare", *map(str, tiny_corpus), str(bad), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and problem in err and name in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".shards.*"))  # nothing that looks complete


@pytest.mark.parametrize("damage, rule", [
    ("ids", "token_id_out_of_range"), ("truncate", "truncated_shard"), ("hash", "sha256_mismatch"),
])
def test_damaged_shards_fail_validate(damage, rule, prepared_copy: Path, capsys):
    shard = prepared_copy / "train_00000.npy"
    manifest = read_manifest(prepared_copy)
    if damage == "ids":
        ids = np.load(shard)
        ids[0, 0] = manifest["vocab_size"] + 5
        np.save(shard, ids)
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-64])
    else:
        manifest["splits"]["train"]["shards"][0]["sha256"] = "f" * 64
        (prepared_copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["data", "validate", str(prepared_copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shard integrity check failed") and rule in err and "train_00000.npy" in err
    assert "Traceback" not in err


def test_config_error_exits_2(tmp_path: Path, capsys):
    assert main(["data", "prepare", "--out", str(tmp_path / "o"), "--set", "shards.seqlen=3"]) == 2
    assert "'data.shards.seqlen' is not a setting (valid in 'data.shards': seq_len," in capsys.readouterr().err


def test_module_entry_point_exits_2_without_traceback(tmp_path: Path):
    bad = tmp_path / "empty.txt"
    bad.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "moe_engine.cli", "data", "validate", str(bad)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: data validation failed") and "Traceback" not in proc.stderr


def test_import_is_light_and_side_effect_free(tmp_path: Path):
    # Measured against `import moe_engine` alone: the data package must add no heavy import.
    code = ("import sys, moe_engine; before = set(sys.modules); import moe_engine.data, moe_engine.data.cli; "
            "heavy = ('torch', 'pandas', 'great_expectations', 'pandera', 'transformers', 'tokenizers'); "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in heavy))")
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"  # --help and config checks stay fast
    assert list(tmp_path.iterdir()) == []  # nothing created at import
