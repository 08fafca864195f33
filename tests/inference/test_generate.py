"""Generation with patched models: the same greedy tokens as stock transformers for every decoder-only
architecture (dynamic cache, static cache, torch.compile), the engine's static-cache decode loop
against transformers' generate, sampling, and me.generate on a saved model directory."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.configuration_utils import CompileConfig

import moe_engine as me
from moe_engine.errors import ConfigError, InputError
from moe_engine.inference.generate import StaticDecoder, choose_tokens

DECODERS = ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3"]


def _pair(arch):
    stock = AutoModelForCausalLM.from_config(me.model_config(arch)).eval()
    for name, buf in stock.named_buffers():  # a non-zero DeepSeek correction bias changes routing
        if name.endswith("e_score_correction_bias"):
            buf.normal_(0, 0.05)
    return stock, me.patch(copy.deepcopy(stock))


def _prompt(vocab, batch=2, length=6, seed=3):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


GREEDY = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("cache", [None, "static"])
def test_greedy_generation_equals_stock_transformers(arch, cache):
    stock, patched = _pair(arch)
    ids = _prompt(stock.config.vocab_size)
    ref = stock.generate(ids, cache_implementation=cache, **GREEDY)
    for mode in ("auto", "grouped"):
        for layer in me.moe_layers(patched):
            layer.experts_mode = mode
        assert torch.equal(patched.generate(ids, cache_implementation=cache, **GREEDY), ref), mode


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_static_cache_with_torch_compile_traces_the_whole_step(arch):
    """transformers' own compiled decode (fullgraph: a graph break in the engine layer would fail)."""
    stock, patched = _pair(arch)
    ids = _prompt(stock.config.vocab_size)
    compile_config = CompileConfig(backend="aot_eager", fullgraph=True, mode=None)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    out = patched.generate(ids, cache_implementation="static", compile_config=compile_config, **GREEDY)
    assert hasattr(patched, "_compiled_call")
    assert torch.equal(out, stock.generate(ids, cache_implementation="static", **GREEDY))


@pytest.mark.parametrize("arch", DECODERS)
def test_static_decoder_matches_transformers_generate_with_left_padding(arch):
    stock, patched = _pair(arch)
    ids = _prompt(stock.config.vocab_size, batch=3, length=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a shorter, left-padded prompt
    mask[2, :1] = 0
    ref = stock.generate(ids, attention_mask=mask, **GREEDY)[:, ids.shape[1]:]
    decoder = StaticDecoder(patched, 3, ids.shape[1] + 12, capture=False)
    for _ in range(2):  # a reused decoder resets its cache
        assert torch.equal(decoder.generate(ids, mask, 12), ref)


def test_static_decoder_stops_at_eos_and_pads_like_transformers():
    stock, patched = _pair("mixtral")
    ids = _prompt(stock.config.vocab_size)
    free = stock.generate(ids, **GREEDY)[:, ids.shape[1]:]
    eos = int(free[0, 3])  # make the 4th token of the first sequence its end
    ref = stock.generate(ids, **dict(GREEDY, eos_token_id=eos, pad_token_id=1))[:, ids.shape[1]:]
    out = StaticDecoder(patched, 2, ids.shape[1] + 12, capture=False).generate(ids, None, 12, eos_ids=[eos], pad_id=1)
    assert torch.equal(out[:, : ref.shape[1]], ref)
    assert (out[0, 4:] == 1).all()


def test_choose_tokens_sampling_filters():
    logits = torch.randn(4, 50)
    assert torch.equal(choose_tokens(logits, False, 1.0, 0, 1.0), logits.argmax(-1))
    assert torch.equal(choose_tokens(logits, True, 1.0, 1, 1.0), logits.argmax(-1))  # top-1 sampling is greedy
    assert torch.equal(choose_tokens(logits, True, 1.0, 0, 1e-6), logits.argmax(-1))  # so is a tiny nucleus
    top5 = logits.topk(5).indices
    for seed in range(20):
        torch.manual_seed(seed)
        picks = choose_tokens(logits, True, 2.0, 5, 1.0)
        assert all(p in row for p, row in zip(picks.tolist(), top5.tolist()))
    torch.manual_seed(0)
    a = choose_tokens(logits, True, 1.0, 0, 0.9)
    torch.manual_seed(0)
    assert torch.equal(a, choose_tokens(logits, True, 1.0, 0, 0.9))


def test_me_generate_from_a_model_directory(tiny_dir):
    from moe_engine.inference.generate import load_tokenizer

    result = me.generate(tiny_dir, ["the quick brown", "a mixture"], max_new_tokens=6)
    assert len(result.texts) == 2 and all(len(t) == 6 for t in result.token_ids)
    assert result.new_tokens == 12 and result.tokens_per_s > 0 and result.offload is None
    # the same tokens as stock transformers' generate on the same left-padded batch
    tok = load_tokenizer(tiny_dir)
    tok.padding_side = "left"
    enc = tok(["the quick brown", "a mixture"], return_tensors="pt", padding=True)
    stock = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ref = stock.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert result.token_ids == ref[:, enc["input_ids"].shape[1]:].tolist()
    # a model object and token ids work too; settings come as a config or keywords
    model = me.load(tiny_dir)
    again = me.generate(model, enc["input_ids"][1:].tolist(), max_new_tokens=6, stop_at_eos=False)
    assert again.texts is None and again.token_ids[0] == result.token_ids[1]


def test_stop_at_eos_off_decodes_past_the_eos_token():
    """``stop_at_eos=False`` keeps decoding after an EOS, as stock transformers does for a model whose EOS
    never comes; on (the default) the row ends at its EOS. transformers 5 fills a generation config's None
    from the model's own, so the off setting has to be passed as an explicit "no EOS"."""
    stock, patched = _pair("olmoe")
    ids = _prompt(stock.config.vocab_size)
    for unused in range(stock.config.vocab_size - 1, 0, -1):  # an EOS the greedy decode never meets
        stock.generation_config.eos_token_id = unused
        ref = stock.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0).tolist()
        if unused not in sum(ref, []):
            break
    ref = [row[ids.shape[1]:] for row in ref]
    eos = ref[0][3]
    patched.generation_config.eos_token_id = eos
    off = me.generate(patched, ids, max_new_tokens=12, stop_at_eos=False, device="cpu")
    assert off.token_ids == ref
    on = me.generate(patched, ids, max_new_tokens=12, device="cpu")
    assert on.token_ids[0] == ref[0][: ref[0].index(eos) + 1]


def test_generate_refuses_bad_settings_and_inputs(tiny_dir):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        me.generate(tiny_dir, "x", max_new_tokens=0)
    with pytest.raises(ConfigError, match="beams.*is not a setting"):
        me.generate(tiny_dir, "x", beams=2)
    with pytest.raises(ConfigError, match="CUDA"):
        me.generate(tiny_dir, "x", cuda_graphs=True, device="cpu")
    with pytest.raises(ConfigError, match="offload"):
        me.generate(tiny_dir, "x", compile=True, offload={"enabled": True})
    with pytest.raises(InputError, match="tokenizer"):
        me.generate(me.load(tiny_dir), "text needs a tokenizer")
    with pytest.raises(InputError, match="not a model directory"):
        me.generate(tiny_dir.parent / "missing", "x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoder_matches_the_eager_loop_and_stock_transformers():
    stock, patched = _pair("mixtral")
    stock, patched = stock.cuda(), patched.cuda()
    ids = _prompt(stock.config.vocab_size).cuda()
    eager = StaticDecoder(patched, 2, ids.shape[1] + 12, capture=False).generate(ids, None, 12)
    graphed = StaticDecoder(patched, 2, ids.shape[1] + 12, capture=True)
    assert torch.equal(graphed.generate(ids, None, 12), eager) and graphed.graph is not None
    assert torch.equal(graphed.generate(ids, None, 12), eager)  # a captured decoder replays from the first step
    assert torch.equal(eager, stock.generate(ids, **GREEDY)[:, ids.shape[1]:])
    result = me.generate(patched, ids, max_new_tokens=12, cuda_graphs=True, stop_at_eos=False)
    assert result.token_ids == eager.tolist()


def test_fused_norms_leave_the_cpu_path_alone():
    """``fused_norms`` switches RMSNorms to torch's fused kernel on a GPU only: on the CPU the model keeps
    transformers' own modules and decodes the same tokens."""
    _, patched = _pair("olmoe")
    ids = _prompt(patched.config.vocab_size)
    plain = me.generate(patched, ids, max_new_tokens=6, stop_at_eos=False, device="cpu")
    fused = me.generate(patched, ids, max_new_tokens=6, stop_at_eos=False, device="cpu", fused_norms=True)
    assert fused.token_ids == plain.token_ids and fused.settings["fused_norms"] is True
    assert not any(hasattr(m, "_moe_lab_norm_eps") for m in patched.modules())


def _same_tokens_up_to_a_near_tie(model, prompt_BP, tokens_a, tokens_b, rel=1e-4):
    """Greedy tokens of two float32 decodes that differ only in rounding: equal, or equal up to a step where
    the two chosen tokens' logits were within ``rel`` of the largest logit (a tie that rounding may break
    either way; a real difference would show a clear margin). Seen on the H200: one such tie in 24 tokens."""
    for b, (row_a, row_b) in enumerate(zip(tokens_a, tokens_b)):
        first = next((i for i, (x, y) in enumerate(zip(row_a, row_b)) if x != y), None)
        if first is None:
            assert len(row_a) == len(row_b)
            continue
        seq = torch.cat([prompt_BP[b], torch.tensor(row_a[:first], device=prompt_BP.device)])[None]
        with torch.no_grad():
            logits_V = model(input_ids=seq).logits[0, -1].float()
        margin = (logits_V[row_a[first]] - logits_V[row_b[first]]).abs().item()
        assert margin <= rel * logits_V.abs().max().item(), (b, first, margin, row_a, row_b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_norms_decode_the_eager_tokens_in_float32():
    _, patched = _pair("olmoe")
    patched = patched.cuda()
    ids = _prompt(patched.config.vocab_size).cuda()
    eager = me.generate(patched, ids, max_new_tokens=12, stop_at_eos=False)
    for graphs in (False, True):
        fused = me.generate(patched, ids, max_new_tokens=12, stop_at_eos=False, fused_norms=True, cuda_graphs=graphs)
        _same_tokens_up_to_a_near_tie(patched, ids, eager.token_ids, fused.token_ids)
    assert any(hasattr(m, "_moe_lab_norm_eps") for m in patched.modules())
