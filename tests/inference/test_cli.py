"""``moe-lab generate`` through the real entry point: streamed text, tokens/s, JSON, clear errors."""

import json

import pytest

from moe_engine.cli import main


def test_generate_streams_text_and_prints_tokens_per_s(tiny_dir, tmp_path, capsys):
    import moe_engine as me

    expected = me.generate(tiny_dir, "the quick brown", max_new_tokens=8).texts[0]
    out_json = tmp_path / "result.json"
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "the quick brown", "--max-new-tokens", "8",
                 "--json", str(out_json)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the quick brown") and expected.strip() in captured.out
    assert "tokens/s" in captured.err
    result = json.loads(out_json.read_text())
    assert result["texts"] == [expected] and result["new_tokens"] == 8 and result["settings"]["max_new_tokens"] == 8


def test_generate_batch_sampling_and_offload(tiny_dir, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("generate:\n  max_new_tokens: 5\n  do_sample: true\n  top_k: 20\n")
    args = ["generate", "--model", str(tiny_dir), "--prompt", "the quick", "--prompt", "a mixture of experts",
            "--params", str(params), "--set", "temperature=0.7", "--seed", "3", "--offload", "0.5",
            "--offload-store", "disk", "--prefetch", "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n\n") == 2 and "hit rate" in captured.err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["settings"]["temperature"] == 0.7 and result["settings"]["offload"]["store"] == "disk"
    assert all(len(ids) == 5 for ids in result["token_ids"])
    assert main(args) == 0  # the same seed samples the same tokens
    assert json.loads((tmp_path / "r.json").read_text())["token_ids"] == result["token_ids"]


def test_the_projects_params_yaml_drives_generate(tiny_dir, tmp_path, capsys):
    from pathlib import Path

    from moe_engine.config import read_params

    params = Path(__file__).resolve().parents[2] / "params.yaml"
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "the quick", "--params", str(params),
                 "--set", "max_new_tokens=3", "--json", str(tmp_path / "r.json")]) == 0, capsys.readouterr().err
    settings = json.loads((tmp_path / "r.json").read_text())["settings"]
    assert settings == {**settings, **read_params(params)["generate"], "max_new_tokens": 3, "offload": settings["offload"]}
    typo = tmp_path / "params.yaml"
    typo.write_text("generat: {max_new_tokens: 3}\ngenerate: {}\n")
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--params", str(typo)]) == 2
    assert "unknown section(s) generat" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--top-p", "0"], "top_p"),
    (["--offload-policy", "stats"], "needs --offload"),
    (["--offload", "0.5", "--compile"], "offload"),
    (["--set", "beams=4"], "beams"),
])
def test_bad_settings_exit_2_with_a_message(tiny_dir, capsys, extra, message):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_missing_model_or_prompt_exit_2(tmp_path, tiny_dir, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir)]) == 2
    assert "give a prompt" in capsys.readouterr().err
    latin1 = tmp_path / "prompt.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    assert main(["generate", "--model", str(tiny_dir), "--prompt-file", str(latin1)]) == 2
    err = capsys.readouterr().err
    assert f"--prompt-file {latin1} cannot be read as UTF-8 text" in err and "Traceback" not in err
