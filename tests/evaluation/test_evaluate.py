import json
import math

import torch

from moe_engine.evaluation.evaluate import run, sequence_losses
from moe_engine.training.trainer import Trainer

FAST = dict(steps=3, micro_batch_size=4, save_every=0, eval_batches=1, warmup_steps=1)


def test_sequence_losses_match_transformers_loss(demo_data):
    import moe_engine as me
    from moe_engine.data.loader import ShardDataset

    model = me.build_model("mixtral", vocab_size=1024, seed=0).eval()
    losses = sequence_losses(model, demo_data, "val", batch_size=4, max_sequences=4)
    batch = next(iter(ShardDataset(demo_data, split="val", batch_size=4, shuffle=False, epochs=1)))
    with torch.no_grad():
        ref = model(input_ids=batch, labels=batch).loss  # transformers' own shifted CE, mean over tokens
    assert math.isclose(float(losses.mean()), ref.item(), rel_tol=1e-5)


def test_evaluate_stage_writes_metrics_plots_and_table(demo_data, tmp_path):
    Trainer(arch="mixtral", data=demo_data, out_dir=tmp_path / "moe", **FAST).fit()
    Trainer(arch="mixtral", data=demo_data, out_dir=tmp_path / "dense", dense_baseline="active", **FAST).fit()
    metrics = run(demo_data, tmp_path / "moe", tmp_path / "eval", tmp_path / "dense", batch_size=8, max_sequences=16)

    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == metrics
    assert math.isclose(saved["moe"]["val_perplexity"], math.exp(saved["moe"]["val_loss"]), rel_tol=1e-9)
    assert saved["moe_minus_dense"]["val"] == saved["moe"]["val_loss"] - saved["dense"]["val_loss"]
    csv = (tmp_path / "eval" / "domain_loss.csv").read_text().splitlines()
    assert csv[0] == "model,domain,split,loss" and any(line.startswith("moe,milton,ood") for line in csv)
    assert "training FLOPs" in (tmp_path / "eval" / "compare.md").read_text()


def test_a_cap_on_sequences_keeps_every_domain():
    import numpy as np

    from moe_engine.evaluation.evaluate import stratified_indices

    ids = np.repeat(np.arange(5), [50, 3, 40, 1, 30])  # stored by domain, as the val split is
    picked = stratified_indices(ids, 16)
    assert len(picked) == 16 and set(ids[picked]) == {0, 1, 2, 3, 4} and list(picked) == sorted(picked)
    assert list(stratified_indices(ids, 0)) == list(range(len(ids)))


def test_evaluate_cli_keeps_domains_refuses_a_dense_model_as_moe_and_lets_flags_win(demo_data, tmp_path, capsys):
    from moe_engine.cli import main
    from moe_engine.data.shards import read_manifest

    Trainer(arch="mixtral", data=demo_data, out_dir=tmp_path / "moe", **FAST).fit()
    Trainer(arch="mixtral", data=demo_data, out_dir=tmp_path / "dense", dense_baseline="active", **FAST).fit()
    params = tmp_path / "params.yaml"
    params.write_text("evaluate: {batch_size: 4, max_sequences: 1000000}\n")
    args = ["evaluate", "--data", str(demo_data), "--params", str(params), "--out", str(tmp_path / "e")]
    assert main(args + ["--moe", str(tmp_path / "dense")]) == 2
    assert "holds a dense model (llama, no MoE layers)" in capsys.readouterr().err
    assert main(args + ["--moe", str(tmp_path / "moe"), "--dense", str(tmp_path / "moe")]) == 2
    assert "holds an MoE" in capsys.readouterr().err
    assert main(args + ["--moe", str(tmp_path / "moe"), "--max-sequences", "18"]) == 0  # the flag wins over params
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["moe"]["val_sequences"] == 18
    rows = (tmp_path / "e" / "domain_loss.csv").read_text().splitlines()[1:]
    val_domains = {line.split(",")[1] for line in rows if line.split(",")[2] == "val"}
    assert val_domains == set(read_manifest(demo_data)["splits"]["val"]["domains"])
