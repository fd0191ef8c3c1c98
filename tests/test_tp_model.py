"""scripts/make_tp_model.py: the head-duplicated checkpoint computes the same function (so TP = 2
and TP = 1 servers of it can be compared against the original model's perplexity)."""
import importlib.util
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location(
    "make_tp_model", os.path.join(os.path.dirname(__file__), "..", "scripts", "make_tp_model.py"))
make_tp_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tp_model)


@pytest.mark.parametrize("heads, kv_heads, factor", [(9, 3, 2), (4, 4, 2), (6, 2, 3)])
def test_duplicated_heads_same_logits(heads, kv_heads, factor):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                      max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    state, new = make_tp_model.duplicate_heads(model.state_dict(), cfg.to_dict(), factor)
    assert new["num_attention_heads"] == factor * heads and new["num_key_value_heads"] == factor * kv_heads
    dup = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in new.items() if k in cfg.to_dict()})).eval()
    missing, unexpected = dup.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        a, b = model(ids).logits, dup(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # and a wrong duplication (o_proj not halved) is caught
    bad = dict(state)
    for k in bad:
        if k.endswith("o_proj.weight"):
            bad[k] = bad[k] * factor
    dup.load_state_dict(bad, strict=False)
    with torch.no_grad():
        assert not torch.allclose(dup(ids).logits, a, rtol=1e-3, atol=1e-3)
