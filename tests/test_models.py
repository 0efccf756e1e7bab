"""models.py: which checkpoints the chunked LM head can train (it computes logits = h · Wᵀ only)."""

import pytest
import torch

from posttrain.config import TinyModelConfig
from posttrain.errors import UserError
from posttrain.models import build_tiny_model, check_head_supported


def test_a_head_that_rescales_its_logits_is_refused():
    """Granite divides its logits by logits_scaling: trained through h · Wᵀ alone every log-prob
    would be another distribution's (0.09 nats per token off on a tiny one), silently."""
    from transformers import GraniteConfig, GraniteForCausalLM

    check_head_supported(build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                                          intermediate_size=64), 320, seed=0), "qwen2")
    torch.manual_seed(0)
    granite = GraniteForCausalLM(GraniteConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64, logits_scaling=8.0))
    with pytest.raises(UserError, match="logits_scaling are not supported by the chunked LM head"):
        check_head_supported(granite, "granite")
    granite.config.logits_scaling = 1.0  # a scaling of one changes nothing
    check_head_supported(granite, "granite")
