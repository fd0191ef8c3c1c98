"""scripts/make_model_configs.py and the CPU side of scripts/gpu_models.py: the config-only folders read by
SGLang's own ModelConfig (the hybrid layouts it sees, the TurboQuant plan resolved for them), the byte ratio
of each layout and the records the GPU run writes."""
import json
import os
import sys

import pytest

pytest.importorskip("sglang")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))

import make_model_configs  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    vocab = {f"t{i}": i for i in range(500)}
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []},
                                                  "added_tokens": [{"id": 500, "content": "<x>"}]}))
    (d / "tokenizer_config.json").write_text("{}")
    (d / "config.json").write_text("{}")
    return str(d)


def test_gpt_oss_shape(tok, tmp_path):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang_tq.compat import layer_kinds

    d = make_model_configs.build("gpt-oss", str(tmp_path), tok)
    assert sorted(os.listdir(d)) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["vocab_size"] == 501 and "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    mc = ModelConfig(d)
    assert mc.is_hybrid_swa and mc.swa_attention_layer_ids == [0, 2] and mc.full_attention_layer_ids == [1, 3]
    assert (mc.head_dim, mc.get_total_num_kv_heads(), mc.num_attention_heads) == (64, 8, 64)
    assert mc.hf_config.sliding_window == 128
    assert layer_kinds(ModelConfig(d, disable_hybrid_swa_memory=True)) == (None, (0, 2))


def test_qwen3_next_shape(tok, tmp_path):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.configs.qwen3_next import Qwen3NextConfig
    from sglang_tq.compat import layer_kinds, resolve_model_plan

    d = make_model_configs.build("qwen3-next", str(tmp_path), tok)
    mc = ModelConfig(d)
    assert isinstance(mc.hf_config, Qwen3NextConfig)  # SGLang's class: the runner then sees a GDN hybrid
    assert layer_kinds(mc) == ((3, 7), ())
    assert (mc.head_dim, mc.get_total_num_kv_heads()) == (256, 2)
    _, plan = resolve_model_plan(mc, "turbo4")
    assert plan.attention_layers == (3, 7) and plan.quantized_layers == (7,)


def test_unknown_shape(tok, tmp_path):
    with pytest.raises(SystemExit, match="unknown shape 'llama4'; allowed: gpt-oss, qwen3-next"):
        make_model_configs.build("llama4", str(tmp_path), tok)


def test_byte_ratios_and_record(tok, tmp_path):
    """The layout's byte ratio (hybrid SWA memory weighs the sliding-window layers by the token ratio), and
    the record: capacity against it, graphs identical, logprob deltas."""
    import gpu_models as g
    from sglang_tq.config import load_config

    d = make_model_configs.build("gpt-oss", str(tmp_path), tok)
    plan = load_config("turbo4").resolve(4, 64, sliding_layers=(0, 2))
    ratio, tq, bf, ring = g.byte_ratios(d, "turbo4", True, 8, 16)
    F, S = plan.layers_bytes_per_token(8, [1, 3]), plan.layers_bytes_per_token(8, [0, 2])
    assert tq == pytest.approx(F + 0.8 * S) and bf == pytest.approx(8 * 256 * (2 + 0.8 * 2))
    assert ratio == pytest.approx(bf / tq) and ring == plan.window_bytes(8, 16, [1, 3])
    one_pool, tq1, bf1, ring1 = g.byte_ratios(d, "turbo4", False, 8, 16)
    assert one_pool == pytest.approx(plan.compression_ratio()) and ring1 == plan.window_bytes(8, 16, [1, 2, 3])
    got = {"bf16": dict(served=True, max_total_num_tokens=100000, greedy=[[1, 2], [3, 4]], logprobs=[[-1.0, -2.0]]),
           "turbo4": dict(served=True, max_total_num_tokens=int(100000 * ratio), greedy=[[1, 2], [3, 5]],
                          logprobs=[[-1.1, -1.8]]),
           "turbo4-nograph": dict(served=True, greedy=[[1, 2], [3, 5]])}
    meta = dict(card="c", date="2026-12-08", commit="abc", command="x")
    rec = g.summarize("gpt-oss", d, "swa+sinks", "hybrid SWA pools", True, 8, got, meta)
    assert rec["served"] and rec["graphs_identical"] is True and rec["bf16_greedy_agreement"] == "1/2"
    assert rec["capacity_ratio"] == pytest.approx(ratio, abs=1e-4)
    assert rec["expected_ratio"] < rec["byte_ratio"]  # the ring's bytes come out of the pool
    assert rec["capacity_within_1pct"] is True
    assert rec["quality_delta"] == pytest.approx(0.15) and rec["quality_delta_max"] == pytest.approx(0.2)
    got["turbo4-nograph"]["greedy"] = [[1, 2], [3, 6]]
    assert g.summarize("gpt-oss", d, "swa+sinks", "hybrid SWA pools", True, 8, got, meta)["graphs_identical"] is False


@pytest.mark.parametrize("shape", ["gpt-oss", "qwen3-next"])
def test_sglang_model_specific_checks_accept_turboquant(tok, tmp_path, shape):
    """ServerArgs' per-architecture adjustments list the attention backends gpt-oss allows; they run with the
    name of the Triton backend (which serves TurboQuant's unquantized layers) and turboquant is put back."""
    from sglang.srt.server_args import ServerArgs
    from sglang_fakes import server_args

    d = make_model_configs.build(shape, str(tmp_path), tok)
    sa = server_args(model_path=d, tokenizer_path=d, attention_backend="turboquant")
    ServerArgs._handle_model_specific_adjustments(sa)
    assert sa.attention_backend == "turboquant"
    if shape == "gpt-oss":
        orig = getattr(ServerArgs._handle_model_specific_adjustments, "__wrapped__", None)
        assert orig is not None  # sglang_tq's wrap (sglang_internals.wrap_method)
        with pytest.raises(AssertionError, match="GptOssForCausalLM requires one of"):
            orig(server_args(model_path=d, tokenizer_path=d, attention_backend="turboquant"))
