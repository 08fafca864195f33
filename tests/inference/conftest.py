"""A tiny saved model with a tokenizer beside it, as a stage would leave it."""

import pytest
import torch

import moe_engine as me

TEXT = ["the quick brown fox jumps over the lazy dog", "a mixture of experts routes each token to a few experts",
        "once upon a time there was a small model that generated text"] * 20


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def save_tiny(path, arch="mixtral", layout="engine", **overrides):
    """``layout``: engine (models.io.save_model, fused expert tensors) or hf (save_pretrained, per-expert)."""
    from moe_engine.models.io import save_model

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    model = me.build_model(arch, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, **overrides).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if layout == "engine":
        save_model(model, path, tokenizer=tokenizer)
    else:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", name="save_tiny")
def save_tiny_fixture():
    return save_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("gen") / "mixtral")
