"""Shared fixtures: tiny random models of every supported family, saved as real Hugging Face folders."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

from pflat_lightning.bundled import resolve_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 30522  # the bundled MiniLM WordPiece tokenizer serves every tiny model
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=128)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_config(family: str):
    if family == "bert":
        return BertForMaskedLM, BertConfig(**TINY, **NO_DROPOUT)
    if family == "roberta":
        return RobertaForMaskedLM, RobertaConfig(**TINY, **NO_DROPOUT, pad_token_id=0)
    if family == "gpt2":
        return GPT2LMHeadModel, GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    if family == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return LlamaForCausalLM, LlamaConfig(**TINY, num_key_value_heads=2, pad_token_id=0)
    raise ValueError(family)


FAMILIES = ("bert", "roberta", "gpt2", "llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family)``: a folder with a tiny random LM of ``family`` and a tokenizer."""
    cache = {}

    def make(family: str) -> str:
        if family not in cache:
            torch.manual_seed(0)
            cls, config = tiny_config(family)
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            cls(config).save_pretrained(folder)
            AutoTokenizer.from_pretrained(resolve_model("bundled-minilm")).save_pretrained(folder)
            cache[family] = str(folder)
        return cache[family]

    return make
