"""The previous-token plant (models/induction_init.py) on small transformers Llamas."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sglang_tokendance.models.induction_init import (
    plant_previous_token_head,
    previous_token_attention,
)


def _llama(tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


def test_planted_head_attends_to_the_previous_token_whatever_the_tokens() -> None:
    model = _llama()
    ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(1))
    before = previous_token_attention(model, ids)
    plant_previous_token_head(model, head=2)
    after = previous_token_attention(model, ids)
    assert max(before) < 0.2  # random init: spread over the context
    assert after[2] > 0.5  # the planted head
    assert after[0] == pytest.approx(before[0], abs=0.05)  # other heads untouched
    emb = model.model.embed_tokens.weight
    assert torch.all(emb[:, -1] == emb[0, -1])  # the constant channel


def test_constant_channel_shifts_every_logit_equally() -> None:
    model = _llama()
    h = torch.randn(3, 64)
    before = torch.log_softmax(h @ model.lm_head.weight.T, dim=-1)
    plant_previous_token_head(model)
    after = torch.log_softmax(h @ model.lm_head.weight.T, dim=-1)
    # only the channel changed; softmax over a row is invariant to the equal shift it adds
    h_no_last = h.clone()
    h_no_last[:, -1] = 0
    ref = torch.log_softmax(h_no_last @ model.lm_head.weight.T, dim=-1)
    assert torch.allclose(after, ref, atol=1e-5)
    assert not torch.allclose(before, after, atol=1e-5)


def test_untied_embeddings_are_refused() -> None:
    with pytest.raises(ValueError, match="tied embeddings"):
        plant_previous_token_head(_llama(tied=False))
