"""Shared fixtures: tiny random models of every supported family, saved as real Hugging Face folders."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from pflat_lightning.bundled import resolve_model
from pflat_lightning.families import family_for

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 30522  # the bundled MiniLM WordPiece tokenizer serves every tiny model
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=128, pad_token_id=0)
NO_DROPOUT_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GQA = dict(num_key_value_heads=2)  # grouped-query attention: 4 query heads share 2 key/value heads
#: A sliding window shorter than the test sequences, and the last layer sliding (the prefix must reach it).
SLIDING = dict(sliding_window=4)
HYBRID = dict(SLIDING, layer_types=["full_attention", "sliding_attention"])
#: One tiny random config per supported model type: the only line a new family needs in the tests.
TINY = {
    "bert": NO_DROPOUT_BERT,
    "electra": dict(NO_DROPOUT_BERT, embedding_size=32),
    "roberta": NO_DROPOUT_BERT,
    "xlm-roberta": NO_DROPOUT_BERT,
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": GQA,
    "mistral": dict(GQA, **SLIDING),
    "mixtral": dict(GQA, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),  # grouped mm: 16-byte rows
    "qwen2": dict(GQA, use_sliding_window=True, max_window_layers=1, **SLIDING),
    "qwen3": dict(GQA, head_dim=16),
    "qwen3_moe": dict(GQA, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "olmo2": GQA,
    "gemma": dict(GQA, head_dim=16),
    "gemma2": dict(GQA, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                   final_logit_softcapping=5.0, **HYBRID),
    "gemma3_text": dict(GQA, head_dim=16, query_pre_attn_scalar=16, **HYBRID),
    "phi3": dict(GQA, resid_pdrop=0.0, embd_pdrop=0.0, **SLIDING),
    "opt": dict(ffn_dim=37, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0),
    "gpt_neox": dict(hidden_dropout=0.0, attention_dropout=0.0),
    "falcon": dict(multi_query=True, hidden_dropout=0.0, attention_dropout=0.0),
}


def tiny_config(model_type: str):
    """``(LM class, config)``: a tiny random masked or causal LM of ``model_type`` (a key of ``TINY``)."""
    config = AutoConfig.for_model(model_type, **{**BASE, **TINY[model_type]})
    return family_for(config).lm_class._model_mapping[type(config)], config


FAMILIES = ("bert", "roberta", "gpt2", "llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(model_type)``: a folder with a tiny random LM of ``model_type`` and a tokenizer."""
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
