"""Shared fixtures: a tiny byte-level BPE tokenizer with a ChatML template and tiny random
Llama models built from a config (seconds, no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "I am still waiting on my card, when will it arrive?",
    "What is the exchange rate for euros today?",
    "My top up failed, please help me with it.",
    "card_arrival exchange_rate top_up_failed lost_or_stolen_card",
    "You classify banking queries into intents.",
    '{"people": 2, "time": "7pm", "date": "tomorrow"}',
]


def build_tiny_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out: Path, tokenizer, num_layers: int = 4, seed: int = 0, **config):
    """A random Llama from a config (``config`` overrides the defaults: hidden size, ...), saved with the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    defaults = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    cfg = LlamaConfig(**{**defaults, **config})
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_tok")
    build_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 4-layer random Llama (hidden 32) with the tiny tokenizer, saved as an HF checkpoint."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama(d, AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    return d


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A second tiny Llama (4 layers, other random weights, the same tokenizer): a KD teacher."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny_teacher")
    build_tiny_llama(d, AutoTokenizer.from_pretrained(tiny_model_dir), num_layers=4, seed=1)
    return d
