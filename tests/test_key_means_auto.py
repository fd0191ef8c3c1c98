"""`key_means: auto`: the rotary average of the k_proj bias (sglang_tq.key_means) against brute force,
the config key, and the pool's start-up wiring through SGLang's own _init_pools (fake runner, CPU)."""
from types import SimpleNamespace

import pytest
import torch

from sglang_tq.config import TQConfig, TQConfigError, parse_yaml
from sglang_tq.key_means import means_from_biases, rope_averaged_bias, rope_tables


def _inv_freq(d, base=10000.0):
    return 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


def _rotate_neox(x, cos, sin):  # HF apply_rotary_pos_emb on one position: x [H, d], cos/sin [d/2]
    half = x.shape[-1] // 2
    c, s = torch.cat([cos, cos]), torch.cat([sin, sin])
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * c + rot * s


def _rotate_interleaved(x, cos, sin):  # GPT-J style pairs (2i, 2i + 1)
    out = x.clone()
    a, b = x[..., 0::2], x[..., 1::2]
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


@pytest.mark.parametrize("neox,rotate", [(True, _rotate_neox), (False, _rotate_interleaved)])
def test_rope_averaged_bias_equals_brute_force_mean(neox, rotate):
    gen = torch.Generator().manual_seed(0)
    bias = torch.randn(3, 64, generator=gen, dtype=torch.float64)
    cos, sin = rope_tables(_inv_freq(64), positions=500)
    brute = torch.stack([rotate(bias, cos[p].double(), sin[p].double()) for p in range(500)]).mean(0)
    got = rope_averaged_bias(bias, cos, sin, neox=neox)
    torch.testing.assert_close(got, brute.float(), atol=1e-5, rtol=1e-5)


def test_rope_average_keeps_slow_pairs_and_cancels_fast_ones():
    bias = torch.ones(1, 128)
    cos, sin = rope_tables(_inv_freq(128, 1e6), positions=4096)  # Qwen2's rope base
    mu = rope_averaged_bias(bias, cos, sin)
    assert mu[0, 0].abs() < 0.01 and mu[0, 64].abs() < 0.01       # theta = 1 rad per position: averages out
    assert (mu[0, 63] - 1).abs() < 0.01 and (mu[0, 127] - 1).abs() < 0.01  # slowest pair (0.005 rad in all): kept


def test_partial_rotary_dims_pass_through():
    bias = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_tables(_inv_freq(32), positions=300)  # 32 rotary dims of 64: pairs (i, i + 16)
    mu = rope_averaged_bias(bias, cos, sin)
    torch.testing.assert_close(mu[:, 32:], bias[:, 32:])
    with pytest.raises(ValueError, match="head_dim"):
        rope_averaged_bias(bias[:, :16], cos, sin)


def test_means_from_biases_layers_without_bias():
    cos, sin = rope_tables(_inv_freq(64), positions=64)
    assert means_from_biases([None, None], 2, 64, cos, sin) is None
    m = means_from_biases([None, torch.ones(128)], 2, 64, cos, sin)
    assert m.shape == (2, 2, 64) and m[0].abs().max() == 0 and m[1].abs().max() > 0


def test_config_key_means_auto_and_bad_values(tmp_path):
    cfg = parse_yaml("key_means: auto\n", "t.yaml")
    assert cfg.key_means == "auto"
    plan = cfg.resolve(4, 64, num_kv_heads=2)
    assert plan.key_means_path == "auto" and plan.key_means is None  # filled by the pool from the weights
    with pytest.raises(TQConfigError, match=r"t\.yaml.*key_means.*'automatic'.*no such file.*did you mean 'auto'\?"):
        parse_yaml("key_means: automatic\n", "t.yaml")
    with pytest.raises(TQConfigError, match=r"<dict>: key_means: 3 is not allowed; allowed: 'auto' or a file path"):
        TQConfig.from_dict({"key_means": 3})


def _fake_sglang_model(num_layers, kv_heads, q_heads, d, gen):
    """What sglang_key_means reads of a SGLang Qwen2 model: fused qkv_proj bias, q/kv sizes, rotary cache."""
    cos, sin = rope_tables(_inv_freq(d, 1e6), positions=8192)
    layers = []
    for _ in range(num_layers):
        bias = torch.randn((q_heads + 2 * kv_heads) * d, generator=gen)
        attn = SimpleNamespace(qkv_proj=SimpleNamespace(bias=bias), q_size=q_heads * d, kv_size=kv_heads * d,
                               rotary_emb=SimpleNamespace(cos_sin_cache=torch.cat([cos, sin], -1), is_neox_style=True))
        layers.append(SimpleNamespace(self_attn=attn))
    return SimpleNamespace(model=SimpleNamespace(layers=layers)), (cos, sin)


def test_pool_centers_from_weights_at_startup(tmp_path):
    pytest.importorskip("sglang")
    from sglang_fakes import FakeModelConfig, FakeRunner, env, write_tq_config
    from sglang_tq.key_means import AUTO_POSITIONS

    gen = torch.Generator().manual_seed(2)
    path = write_tq_config(tmp_path, "boundary: {first: 1, last: 0}\nkey_means: auto\n")
    with env(SGLANG_TQ_CONFIG=path):
        runner = FakeRunner(FakeModelConfig(4, 6, 2, 64))
        runner.model, (cos, sin) = _fake_sglang_model(4, 2, 6, 64, gen)
        runner.build_pools(64, max_running_requests=2)
    pool = runner.token_to_kv_pool
    assert pool.key_mean(0) is None  # bf16 boundary layer: keys stored as they are
    for l in range(1, 4):
        b = runner.model.model.layers[l].self_attn.qkv_proj.bias[6 * 64: 8 * 64].reshape(2, 64)
        want = rope_averaged_bias(b, cos[:AUTO_POSITIONS], sin[:AUTO_POSITIONS])
        torch.testing.assert_close(pool.key_mean(l), want)


@pytest.mark.parametrize("preset", ["turbo4", "turbo3", "k4v2", "turbo3.5", "turbo2", "prod3", "k5v4"])
def test_presets_center_keys_from_the_weights(preset):
    from sglang_tq.config import load_config

    assert load_config(preset).resolve(28, 128, num_kv_heads=2).key_means_path == "auto"


def test_model_without_biases_or_layers_is_not_centered():
    from sglang_tq.key_means import sglang_key_means

    gen = torch.Generator().manual_seed(3)
    model, _ = _fake_sglang_model(2, 2, 4, 64, gen)
    for layer in model.model.layers:
        layer.self_attn.qkv_proj.bias = None
    assert sglang_key_means(model, 0, 2, 2, 64) == [None, None]
    assert sglang_key_means(None, 0, 3, 2, 64) == [None, None, None]
