"""Fine-tuning against references: LoRA through the engine against peft's own forward and gradients on
a stock model; the saved adapter in stock peft on stock transformers against the merged model; ESFT
changes exactly the experts it lists, chosen as a float64 recomputation from stock router logits
chooses them; the router is bitwise unchanged when frozen; the SFT loss ignores prompt tokens."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import moe_engine as me
from moe_engine.finetune.data import IGNORE, TaskEncoder, collate
from moe_engine.finetune.esft import expert_scores, select_experts
from moe_engine.models.build import model_config

TASK = Path(__file__).resolve().parents[2] / "data" / "tasks" / "chatterbot_qa"
QUICK = dict(steps=4, micro_batch_size=4, log_every=2, warmup_steps=1,
             eval={"test_records": 16, "generate_records": 2, "max_new_tokens": 4, "retention_sequences": 8})


@pytest.fixture(scope="module")
def base(demo_data, tmp_path_factory) -> Path:
    """A small pretrained OLMoE-style model with the demo tokenizer."""
    out = tmp_path_factory.mktemp("base")
    me.Trainer(arch="olmoe", data=demo_data, out_dir=out, steps=6, micro_batch_size=4, save_every=0, eval_batches=1,
               warmup_steps=1).fit()
    return out / "model"


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "switch"])
def test_lora_through_the_engine_matches_peft_on_a_stock_model(arch):
    from peft import LoraConfig, get_peft_model

    from moe_engine.finetune.config import FinetuneConfig
    from moe_engine.finetune.methods import lora_targets

    cfg = model_config(arch, "tiny")
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    stock = cls.from_config(cfg).float()
    engine = me.patch(copy.deepcopy(stock), aux_loss_coef=0.0, z_loss_coef=0.0)  # the stock forward adds no router loss
    modules, parameters = lora_targets(engine, FinetuneConfig())
    lora = dict(r=4, lora_alpha=8, target_modules=modules, target_parameters=parameters or None)
    torch.manual_seed(1)
    ps = get_peft_model(stock, LoraConfig(**lora))
    torch.manual_seed(1)
    pe = get_peft_model(engine, LoraConfig(**lora))
    named_s, named_e = dict(ps.named_parameters()), dict(pe.named_parameters())
    assert named_s.keys() == named_e.keys()
    with torch.no_grad():  # B starts at zero in peft: make the update non-trivial, the same in both
        for name, p in named_s.items():
            if "lora_B" in name:
                p.normal_(0, 0.1)
                named_e[name].copy_(p)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    kw = {"input_ids": ids, "labels": ids} if not cfg.is_encoder_decoder else {"input_ids": ids, "labels": ids[:, :5].contiguous()}
    a, b = ps(**kw), pe(**kw)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    trained = [n for n, p in named_s.items() if p.requires_grad]
    assert any("experts" in n for n in trained)
    grad = lambda p: p.grad if p.grad is not None else torch.zeros_like(p)  # noqa: E731 - an expert no token reached
    for name in trained:
        torch.testing.assert_close(grad(named_e[name]), grad(named_s[name]), rtol=1e-5, atol=1e-7)


def test_lora_adapter_loads_in_stock_peft_with_the_merged_models_logits(base, demo_data, tmp_path):
    from peft import PeftModel

    result = me.finetune(base, TASK, tmp_path, method="lora", retention=demo_data, **QUICK)
    assert result.metrics["router_unchanged"] and result.metrics["after"]["task_loss"] < result.metrics["before"]["task_loss"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()  # stock transformers
    stock_base = AutoModelForCausalLM.from_pretrained(base)
    adapted = PeftModel.from_pretrained(stock_base, tmp_path / "adapter").eval()  # stock peft
    ids = torch.randint(0, merged.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    before, after = _state(base), _state(tmp_path / "model")
    routers = [k for k in before if k.endswith("mlp.gate.weight")]
    assert routers and all(torch.equal(before[k], after[k]) for k in routers)  # frozen: bitwise
    assert any(not torch.equal(before[k], after[k]) for k in before if "experts" in k)  # the experts' LoRA was merged
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert tokenizer.eos_token_id is not None


def test_a_fine_tune_that_fails_at_the_end_leaves_every_output_of_the_last_one(base, demo_data, tmp_path, monkeypatch):
    import moe_engine.training.trainer as trainer

    me.finetune(base, TASK, tmp_path, method="lora", **QUICK)
    files = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert any(p.parent.name == "adapter" for p in files) and any(p.parent.name == "validation" for p in files)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer, "export_model", disk_full)  # trained, adapter saved, merged model not
    with pytest.raises(OSError, match="No space left"):
        me.finetune(base, TASK, tmp_path, method="lora", **{**QUICK, "lr": 1e-2})
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file() and p.name != "history.partial.csv"} == files


def test_esft_changes_only_the_experts_it_lists_chosen_as_float64_math_chooses(base, demo_data, tmp_path):
    from moe_engine.finetune.data import load_task

    result = me.finetune(base, TASK, tmp_path, method="esft", retention=demo_data,
                         esft={"score": "gate", "threshold": 0.5, "score_records": 12}, **QUICK)
    listed = json.loads((tmp_path / "experts.json").read_text())
    before, after = _state(base), _state(tmp_path / "model")
    for key in before:
        if "mlp.experts." in key:  # fused [E, ...]: only the listed rows moved
            layer = key.split(".experts.")[0]
            ids = listed["selected"][layer]
            changed = [e for e in range(before[key].shape[0]) if not torch.equal(before[key][e], after[key][e])]
            assert changed == ids, key
        else:
            assert torch.equal(before[key], after[key]), key
    # the selection, recomputed in float64 from stock transformers' router logits on the same records
    stock = AutoModelForCausalLM.from_pretrained(base).eval()
    tok = AutoTokenizer.from_pretrained(base)
    enc = TaskEncoder(tok, 256)
    train, _, _ = load_task(TASK, me.FinetuneConfig().task)
    batch = collate([enc.encode(r) for r in train[:12]], enc.pad_id)
    with torch.no_grad():
        logits = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True).router_logits
    mask = batch["attention_mask"].double()
    k = stock.config.num_experts_per_tok
    for layer_idx, logits_TE in enumerate(logits):
        probs = logits_TE.double().softmax(-1).view(*mask.shape, -1)
        top = torch.zeros_like(probs).scatter_(-1, probs.topk(k, dim=-1).indices, 1.0)
        gate = ((probs * top * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).mean(0).numpy()
        token = ((top / k * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).mean(0).numpy()
        name = f"model.layers.{layer_idx}.mlp"
        np.testing.assert_allclose(listed["scores"][name]["gate"], gate, rtol=1e-6)  # the router's own float32 probabilities
        np.testing.assert_allclose(listed["scores"][name]["token"], token, rtol=1e-12)
        order = np.argsort(-gate, kind="stable")
        share = np.cumsum(gate[order]) / gate.sum()
        assert listed["selected"][name] == sorted(order[: int(np.argmax(share >= 0.5)) + 1].tolist())
    assert result.metrics["trainable_params"] < result.metrics["total_params"] / 2


def test_select_experts_is_the_fewest_best_covering_the_threshold():
    assert select_experts([0.1, 0.4, 0.2, 0.3], 0.5) == [1, 3]
    assert select_experts([0.1, 0.4, 0.2, 0.3], 0.4) == [1]
    assert select_experts([0.25] * 4, 1.0) == [0, 1, 2, 3]


def test_full_finetune_keeps_a_frozen_router_and_compares_methods(base, demo_data, tmp_path):
    results = me.finetune(base, TASK, tmp_path, method=["full", "lora"], **QUICK)
    assert set(results) == {"full", "lora"} and (tmp_path / "full" / "model").is_dir()
    before, after = _state(base), _state(tmp_path / "full" / "model")
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("mlp.gate.weight"))
    assert any(not torch.equal(before[k], after[k]) for k in before if "self_attn" in k)
    table = (tmp_path / "compare.md").read_text()
    assert "| full: before -> after | lora: before -> after |" in table and "router drift" in table
    layers = {f"model.layers.{i}.mlp" for i in range(AutoConfig.from_pretrained(base).num_hidden_layers)}
    for method in ("full", "lora"):  # a drift per MoE layer, the LoRA (peft-wrapped) model's included
        drift = results[method].metrics["router_drift"]
        assert set(drift) - {"mean"} == layers and all(0.0 <= v <= 1.0 for v in drift.values()), (method, drift)


def test_sft_loss_is_the_cross_entropy_of_response_tokens_only(base):
    tok = AutoTokenizer.from_pretrained(base)
    enc = TaskEncoder(tok, 64)
    records = [{"prompt": "What is a cat?", "response": "an animal"}, {"prompt": "Say hi", "response": "hi there friend"}]
    batch = collate([enc.encode(r) for r in records], enc.pad_id)
    prompt_len = len(enc.prompt_ids(records[0]["prompt"]))
    assert (batch["labels"][0, :prompt_len] == IGNORE).all() and (batch["labels"][0, prompt_len:][batch["attention_mask"][0, prompt_len:] == 1] != IGNORE).all()
    model = me.load(base, router={"aux_loss_coef": 0.0}).eval()
    with torch.no_grad():
        out = model(**batch)
        logits = out.logits[:, :-1].double()
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        ce = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
        torch.testing.assert_close(out.loss.double(), ce, rtol=1e-5, atol=1e-6)
        other = dict(batch, input_ids=batch["input_ids"].clone())
        other["input_ids"][0, 1] = (other["input_ids"][0, 1] + 1) % tok.vocab_size  # a prompt token changes
        assert not torch.equal(model(**other).logits, out.logits)  # ... the model reads it, the loss does not score it
        scored = dict(batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE))
        assert model(**scored).loss != out.loss  # scoring the prompt too would give another loss


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "", "response": "x"}] * 1 + [{"prompt": f"q{i}", "response": "a"} for i in range(20)], "empty_prompt"),
    ([{"prompt": f"q{i}", "response": "   "} for i in range(20)], "empty_response"),
    ([{"prompt": "word " * 400, "response": "a"}] * 3 + [{"prompt": f"q{i}", "response": "a"} for i in range(20)], "prompt_fits_context"),
    ([{"prompt": "same", "response": "same"}] * 20, "duplicate_share"),
    ([{"prompt": "q", "answer": "a"}] * 20, "lack a 'prompt' or 'response' field"),
    ([{"prompt": "q", "response": 3}] * 20, "'response' must be text, got int"),
])
def test_bad_task_data_exits_2_with_a_readable_report(rows, message, base, tmp_path, capsys):
    from moe_engine.cli import main

    data = tmp_path / "task.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["finetune", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--set", "task.test_fraction=0.3", "--set", "steps=1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "o" / "model").exists()
