"""The DeepSpeed trainer in one CPU process: learning, checkpoints, resume, failures."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_engine as me
from moe_engine.training.checkpoint import CheckpointError
from moe_engine.training.trainer import Trainer, TrainingDiverged, warmup_cosine

FAST = dict(micro_batch_size=4, log_every=5, eval_batches=2, warmup_steps=2, lr=3e-3)


def _history(out: Path, name: str = "history.csv") -> list[dict]:
    from moe_engine.training.callbacks.history import read_history

    return read_history(out / name)


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [warmup_cosine(s, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_training_lowers_the_loss_and_exports_a_stock_checkpoint(demo_data, tmp_path):
    result = Trainer(arch="olmoe", data=demo_data, out_dir=tmp_path, steps=40, save_every=0, **FAST).fit()
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.5
    assert result.val_loss is not None and result.ood_loss is not None
    assert all(sum(c) > 0 for c in result.tokens_per_expert.values())
    # the export loads in stock transformers and computes what the engine model computes
    stock = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    engine = me.load(result.model_dir).eval()
    ids = torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, engine(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 40 and metrics["throughput"]["tokens_per_s"] > 0
    assert metrics["loss"]["val"] == result.val_loss and metrics["size"]["params_total"] > metrics["size"]["params_active"]
    flops = [row["train_flops"] for row in _history(tmp_path)]  # cumulative: loss against compute in `dvc plots`
    assert flops[-1] == pytest.approx(metrics["cost"]["train_flops"]) and flops[0] == pytest.approx(flops[-1] / 40)


def _train_cmd(data, out, steps):
    code = (
        "import sys; from moe_engine.training.trainer import Trainer; "
        f"Trainer(arch='mixtral', data={str(data)!r}, out_dir={str(out)!r}, steps={steps}, save_every=5, "
        "micro_batch_size=4, log_every=5, eval_batches=0, warmup_steps=2).fit()"
    )
    return [sys.executable, "-c", code]


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run_bitwise(demo_data, tmp_path):
    # a fresh process group per run: drop what an in-process run of this session put in the env
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_cmd(demo_data, straight, 15), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_train_cmd(demo_data, killed, 15), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() == "step_00000005"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-training: somewhere after the step-5 checkpoint
    proc.wait()
    assert latest.read_text().strip() in ("step_00000005", "step_00000010")
    subprocess.run(_train_cmd(demo_data, killed, 15), check=True, env=env, capture_output=True)
    expected = [row["loss"] for row in _history(straight)]
    resumed = [row["loss"] for row in _history(killed)]
    assert resumed == expected  # bitwise: same floats, every step


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_valid_one(demo_data, tmp_path, capsys):
    Trainer(arch="mixtral", data=demo_data, out_dir=tmp_path, steps=4, save_every=2, **FAST).fit()
    ckpt = tmp_path / "checkpoints" / "step_00000004" / "model_ep000.pt"
    blob = bytearray(ckpt.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(blob))
    result = Trainer(arch="mixtral", data=demo_data, out_dir=tmp_path, steps=6, save_every=2, **FAST).fit()
    err = capsys.readouterr().err
    assert "model_ep000.pt is corrupt" in err and "resuming from step_00000002" in err
    assert len(result.losses) == 4  # steps 3..6: the corrupt step-4 checkpoint was not used
    # every checkpoint corrupt: refused by name, nothing trained
    for meta in (tmp_path / "checkpoints").glob("step_*/meta.json"):
        meta.write_text("{not json")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*meta.json is not a valid checkpoint record"):
        Trainer(arch="mixtral", data=demo_data, out_dir=tmp_path, steps=8, save_every=2, **FAST).fit()


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(demo_data, tmp_path):
    model = me.build_model("mixtral", vocab_size=1024, seed=0)
    calls = {"n": 0}

    def poison(module, inputs, output):  # from the 4th forward on, the LM head emits NaN
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= 4 else output

    model.lm_head.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match="step 4.*step_00000002"):
        Trainer(model, data=demo_data, out_dir=tmp_path, steps=10, save_every=2, **FAST).fit()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"
    # the diverged step was never recorded as trained; the failed run's rows stay in the partial file
    assert len(_history(tmp_path, "history.partial.csv")) == 3 and not (tmp_path / "history.csv").exists()


def test_nan_in_an_early_micro_batch_stops_before_the_step_that_accumulated_it(demo_data, tmp_path):
    model = me.build_model("mixtral", vocab_size=1024, seed=0)
    calls = {"n": 0}

    def poison(module, inputs, output):  # only forward 5: the first of step 3's two micro-batches
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 5 else output

    model.lm_head.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match="step 3.*step_00000002"):
        Trainer(model, data=demo_data, out_dir=tmp_path, steps=6, save_every=2, grad_accum=2, **FAST).fit()
    assert calls["n"] == 6 and len(_history(tmp_path, "history.partial.csv")) == 2


@pytest.mark.parametrize("poisoned_backward", [3, 4])  # 4: the step right before a checkpoint
def test_nan_gradient_with_a_finite_loss_stops_the_run_before_its_weights_are_saved(poisoned_backward, demo_data, tmp_path):
    model = me.build_model("mixtral", vocab_size=1024, seed=0)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == poisoned_backward else grad

    model.lm_head.weight.register_hook(poison)
    with pytest.raises(TrainingDiverged, match=f"gradient norm became (nan|inf|nan/inf) at step {poisoned_backward} .*step_00000002"):
        Trainer(model, data=demo_data, out_dir=tmp_path, steps=8, save_every=2, zero_stage=1, **FAST).fit()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"
    assert len(_history(tmp_path, "history.partial.csv")) == poisoned_backward  # its loss was finite; the next step never ran


def test_profiled_steps_write_an_operator_table_and_a_trace(demo_data, tmp_path):
    import gzip

    Trainer(arch="mixtral", data=demo_data, out_dir=tmp_path, steps=3, save_every=0, profile_steps=[2, 3], **FAST).fit()
    table = (tmp_path / "profile" / "ops_rank0.txt").read_text()
    assert table.startswith("optimizer steps 2..3") and "aten::mm" in table
    trace = json.loads(gzip.decompress((tmp_path / "profile" / "trace_rank0.json.gz").read_bytes()))
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names and "Optimizer.step#AdamW.step" in names
    with pytest.raises(ValueError, match="profile_steps"):
        Trainer(arch="mixtral", data=demo_data, steps=3, profile_steps=[3, 4])


def test_dense_baselines_match_active_and_total_parameters(demo_data, tmp_path):
    from moe_engine.training.flops import count_params
    from moe_engine.training.trainer import dense_baseline

    moe = me.build_model("mixtral", vocab_size=1024)
    counts = count_params(moe)
    for match, target in (("active", counts.active), ("total", counts.total)):
        dense = dense_baseline(moe, match)
        n = sum(p.numel() for p in dense.parameters())
        router = sum(layer.gate.weight.numel() for layer in me.moe_layers(moe))
        assert abs(n - (target - router)) / target < 0.01, (match, n, target)
    result = Trainer(arch="mixtral", data=demo_data, out_dir=tmp_path, steps=3, save_every=0, dense_baseline="active", **FAST).fit()
    assert result.tokens_per_expert == {} and len(result.losses) == 3


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "switch"])
def test_every_architecture_trains_and_exports(arch, demo_data, tmp_path):
    result = Trainer(arch=arch, data=demo_data, out_dir=tmp_path, steps=3, save_every=3, **FAST).fit()
    assert all(math.isfinite(x) for x in result.losses)
    reloaded = me.load(result.model_dir)
    assert me.moe_layers(reloaded)
    if arch == "deepseek_v3":  # the aux-loss-free bias moved with the observed load
        bias = reloaded.model.layers[1].mlp.gate.e_score_correction_bias
        assert bias.abs().sum() > 0


def test_switch_pretrains_on_span_corruption_reproducibly(demo_data, tmp_path):
    from moe_engine.data.span_corruption import SpanCorruption

    calls = []
    model = me.build_model("switch", vocab_size=1024 + SpanCorruption(64).num_spans, seed=0)
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    first = Trainer(model, data=demo_data, out_dir=tmp_path / "a", steps=4, save_every=0, **FAST).fit()
    sc = SpanCorruption(64)
    train = [kw for kw in calls if kw["input_ids"].shape[0] == FAST["micro_batch_size"]][:4]
    for kw in train:  # the encoder sees the corrupted text, the decoder predicts the removed spans
        assert kw["input_ids"].shape[1] == sc.input_length and kw["labels"].shape[1] == sc.target_length
        assert (kw["labels"][:, 0] == model.config.vocab_size - 1).all()
    assert not torch.equal(train[0]["input_ids"], train[1]["input_ids"])
    again = Trainer(arch="switch", data=demo_data, out_dir=tmp_path / "b", steps=4, save_every=0, **FAST).fit()
    assert again.losses == first.losses  # same seed: same corruption noise, same built model
    assert me.load(again.model_dir).config.vocab_size == 1024 + sc.num_spans
    from moe_engine.evaluation.evaluate import evaluate_model  # the evaluate stage scores it the same way

    scores = evaluate_model(again.model_dir, demo_data, max_sequences=8)
    assert math.isfinite(scores["val_loss"]) and scores["val_loss"] < math.log(1024) + 1
    with pytest.raises(ValueError, match="sentinel"):
        Trainer(me.build_model("switch", vocab_size=1024), data=demo_data, out_dir=tmp_path / "c", steps=1).fit()


@pytest.mark.parametrize("arch", ["switch", "olmoe"])
def test_zero_stage_1_and_2_train_every_expert_layout(arch, demo_data, tmp_path):
    for stage in (1, 2):  # ZeRO >= 1 puts expert params in DeepSpeed's MoE groups (one module per expert in Switch)
        result = Trainer(arch=arch, data=demo_data, out_dir=tmp_path / str(stage), steps=2, save_every=0, zero_stage=stage, **FAST).fit()
        assert all(math.isfinite(x) for x in result.losses)


def test_bf16_at_zero_stage_0_keeps_float32_master_weights_and_resumes_bitwise(demo_data, tmp_path):
    """bf16 without ZeRO: the engine's MasterAdamW (float32 masters and moments, bf16 weights) trains,
    and a resumed run repeats the uninterrupted one bitwise."""
    from moe_engine.training import checkpoint

    import shutil

    kw = dict(arch="mixtral", data=demo_data, precision="bf16", zero_stage=0, steps=6, save_every=3, **FAST)
    straight = Trainer(out_dir=tmp_path / "straight", **kw).fit()
    assert straight.losses[-1] < straight.losses[0]
    saved = tmp_path / "straight" / "checkpoints" / "step_00000003"
    weights = checkpoint.load_file(saved / "model_ep000.pt")
    state = checkpoint.load_file(saved / "rank00000.pt")["optimizer"]["state"]
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}
    assert state and all(s[k].dtype == torch.float32 for s in state.values() for k in ("master", "exp_avg", "exp_avg_sq"))
    # a run stopped after step 3: its checkpoint, and the same settings again
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(saved, tmp_path / "resumed" / "checkpoints" / saved.name)
    (tmp_path / "resumed" / "checkpoints" / checkpoint.LATEST).write_text(saved.name)
    resumed = Trainer(out_dir=tmp_path / "resumed", **kw).fit()
    assert resumed.losses == straight.losses[3:]  # bitwise
    with pytest.raises(ValueError, match="ep_size 1 only"):
        Trainer(out_dir=tmp_path / "ep", **{**kw, "ep_size": 2}).fit()


def test_bf16_moments_are_stored_in_bf16_and_refused_where_the_optimizer_cannot_keep_them(gpu_data, tmp_path):
    """moment_dtype: bf16 (DeepSeek-V3's AdamW moments) at bf16 ZeRO-0: the checkpointed moments are bf16
    and the master weights float32; float32 training and ZeRO >= 1 refuse it with a config error."""
    from moe_engine.errors import ConfigError
    from moe_engine.training import checkpoint

    kw = dict(arch="mixtral", data=gpu_data, zero_stage=0, steps=2, save_every=2, moment_dtype="bf16", **FAST)
    result = Trainer(out_dir=tmp_path / "a", precision="bf16", **kw).fit()
    assert all(math.isfinite(x) for x in result.losses)
    state = checkpoint.load_file(tmp_path / "a" / "checkpoints" / "step_00000002" / "rank00000.pt")["optimizer"]["state"]
    assert state and {s[k].dtype for s in state.values() for k in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}
    assert {s["master"].dtype for s in state.values()} == {torch.float32}
    if not torch.cuda.is_available():  # precision auto: float32 on a CPU
        with pytest.raises(ConfigError, match="moment_dtype: bf16 needs bf16 training at zero_stage 0.*precision: bf16"):
            Trainer(out_dir=tmp_path / "b", **kw).fit()
    for bad in ({"precision": "fp32"}, {"precision": "bf16", "zero_stage": 1}):
        with pytest.raises(ConfigError, match="moment_dtype = 'bf16': must be float32 unless training in bf16 at zero_stage 0"):
            Trainer(out_dir=tmp_path / "c", **{**kw, **bad}).fit()
    with pytest.raises(ConfigError, match="moment_dtype = 'bf16': must be float32 with beta1 0.9 and beta2 0.999.*1/256"):
        Trainer(out_dir=tmp_path / "d", **{**kw, "precision": "bf16", "beta2": 0.999}).fit()


def test_cpu_training_does_not_build_deepspeeds_inference_op(demo_data, tmp_path):
    """The shared-memory all-reduce op that DeepSpeed JIT-compiles on CPU (a minute on a fresh machine)
    serves only DeepSpeed inference: the trainer's CPU runs leave it unbuilt."""
    import deepspeed.comm.comm as ds_comm

    Trainer(arch="mixtral", data=demo_data, out_dir=tmp_path, steps=1, save_every=0, **FAST).fit()
    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None


def test_one_rank_without_zero_skips_deepspeeds_self_all_reduce_and_timer_syncs(monkeypatch, demo_data, tmp_path):
    """At zero_stage 0 on one rank DeepSpeed's backward all-reduce only casts, copies and reduces every
    gradient with itself: the loop turns it off, and the run gives the same bits as one that keeps it.
    DeepSpeed's throughput timer (a device sync at every forward and step) is off too."""
    from moe_engine.training import loop as loop_mod

    kw = dict(arch="olmoe", data=demo_data, zero_stage=0, steps=3, save_every=0, grad_accum=2, **FAST)
    seen = []
    real_setup = loop_mod.TrainLoop.setup

    def setup(self):
        out = real_setup(self)
        seen.append((self.engine.enable_backward_allreduce, self.engine.tput_timer.config.enabled))
        return out

    monkeypatch.setattr(loop_mod.TrainLoop, "setup", setup)
    skipped = Trainer(out_dir=tmp_path / "skipped", **kw).fit()
    monkeypatch.setattr(loop_mod.TrainLoop, "_reduces_gradients", lambda self, cfg: True)
    reduced = Trainer(out_dir=tmp_path / "reduced", **kw).fit()
    assert seen == [(False, False), (True, False)]
    assert skipped.losses == reduced.losses  # bitwise
    a = AutoModelForCausalLM.from_pretrained(skipped.model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(reduced.model_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cuda_graphs_are_refused_where_they_cannot_run(gpu_data, tmp_path):
    from moe_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a CUDA GPU") if not torch.cuda.is_available() else \
            pytest.raises(ConfigError, match="decoder-only"):
        Trainer(arch="switch", data=gpu_data, out_dir=tmp_path, steps=1, save_every=0, cuda_graphs=True, **FAST).fit()


@pytest.fixture
def gpu_data(request) -> Path:
    """Prepared shards for the GPU trainer tests: $MOE_LAB_TEST_DATA (the lent GPU image may lack the
    data extras), else the demo corpus."""
    path = os.environ.get("MOE_LAB_TEST_DATA")
    return Path(path) if path else request.getfixturevalue("demo_data")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_cuda_graphs_train_the_same_bits_as_eager_layers(zero_stage, gpu_data, tmp_path):
    """The MoE layers replayed from CUDA graphs after step 1 (gradient accumulation, the router
    monitor on, MasterAdamW at ZeRO-0 or DeepSpeed's ZeRO-1): the same losses and weights, bitwise."""
    kw = dict(arch="olmoe", data=gpu_data, precision="bf16", zero_stage=zero_stage, steps=5, save_every=0,
              grad_accum=2, **FAST)
    eager = Trainer(out_dir=tmp_path / "eager", **kw).fit()
    graphed = Trainer(out_dir=tmp_path / "graphed", cuda_graphs=True, **kw).fit()
    assert graphed.losses == eager.losses
    assert graphed.tokens_per_expert == eager.tokens_per_expert
    a = AutoModelForCausalLM.from_pretrained(eager.model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(graphed.model_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_norms_train_like_the_models_own_norms(gpu_data, tmp_path):
    """``fused_norms`` (the default) puts the model's RMSNorms on torch's fused ``F.rms_norm``
    (``models/norms.py``) on a GPU; the losses follow those of transformers' eager norms to bf16 noise."""
    from moe_engine.models.build import build_model

    vocab = json.loads((gpu_data / "manifest.json").read_text())["vocab_size"]
    kw = dict(arch="olmoe", data=gpu_data, precision="bf16", steps=6, save_every=0, **FAST)
    runs = {}
    for fused in (True, False):
        model = build_model("olmoe", "tiny", seed=0, vocab_size=vocab)
        torch.manual_seed(1)
        for m in model.modules():  # built norms are all ones: random weights make the multiply count
            if type(m).__name__ == "OlmoeRMSNorm":
                torch.nn.init.uniform_(m.weight, 0.5, 1.5)
        runs[fused] = Trainer(model, out_dir=tmp_path / str(fused), fused_norms=fused, **kw).fit()
        norms = [m for m in model.modules() if type(m).__name__ == "OlmoeRMSNorm"]
        assert norms and all(hasattr(m, "_moe_lab_norm_eps") == fused for m in norms)
    for a, b in zip(runs[True].losses, runs[False].losses):
        assert a == pytest.approx(b, rel=2e-2)
