"""`key_means: auto`: the start-up probe (one prefill of sglang_tq/probe.txt through a real SGLang model on the
CPU) against the simulator's means for the same weights, the config key, and the pool's start-up wiring
through SGLang's own _init_pools (fake runner)."""
import os
import sys

import pytest
import torch

from sglang_tq.config import TQConfig, TQConfigError, parse_yaml
from sglang_tq.key_means import PROBE_TOKENS, probe_text, probe_token_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_key_means_auto_and_bad_values(tmp_path):
    cfg = parse_yaml("key_means: auto\n", "t.yaml")
    assert cfg.key_means == "auto"
    plan = cfg.resolve(4, 64, num_kv_heads=2)
    assert plan.key_means_path == "auto" and plan.key_means is None  # filled by the pool at start-up
    with pytest.raises(TQConfigError, match=r"t\.yaml.*key_means.*'automatic'.*no such file.*did you mean 'auto'\?"):
        parse_yaml("key_means: automatic\n", "t.yaml")
    with pytest.raises(TQConfigError, match=r"<dict>: key_means: 3 is not allowed; allowed: 'auto' or a file path"):
        TQConfig.from_dict({"key_means": 3})


@pytest.mark.parametrize("preset", ["turbo4", "turbo3", "k4v2", "turbo3.5", "turbo2", "prod3", "k5v4"])
def test_presets_center_keys_at_startup(preset):
    from sglang_tq.config import load_config

    assert load_config(preset).resolve(28, 128, num_kv_heads=2).key_means_path == "auto"


class _CharTokenizer:
    """One token per character; `bos` in front when special tokens are asked for."""

    def __init__(self, bos=None):
        self.bos = bos

    def encode(self, text, add_special_tokens=True):
        return ([self.bos] if add_special_tokens and self.bos is not None else []) + [ord(c) % 97 for c in text]


def test_probe_token_ids_bos_then_capped_text():
    text = probe_text()
    assert len(text) > PROBE_TOKENS  # the cap bites for a one-token-per-character tokenizer
    ids = probe_token_ids(_CharTokenizer(bos=1))
    assert ids[0] == 1 and ids[1:] == [ord(c) % 97 for c in text[:PROBE_TOKENS]]
    assert probe_token_ids(_CharTokenizer())[0] == ord(text[0]) % 97  # no BOS: the text alone


# ------------------------------------------------------------------------------------------------
# A real SGLang model on the CPU
# ------------------------------------------------------------------------------------------------
def _sglang_parallel_state(rank: int, world: int, init: str) -> None:
    """SGLang's parallel state for CPU processes over gloo (tensor parallelism = world; no DP attention) and the
    scheduler's global server args; a process that has it already keeps it."""
    from types import SimpleNamespace

    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel, parallel_state
    from sglang.srt.layers.dp_attention import initialize_dp_attention
    from sglang.srt.server_args import set_global_server_args_for_scheduler
    from sglang_fakes import server_args

    set_global_server_args_for_scheduler(server_args(device="cpu"))
    if parallel_state._WORLD is None:
        init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"file://{init}")
        initialize_model_parallel(world)
        # no DP attention: its gathered buffers (sized by the hidden size) stay unused
        initialize_dp_attention(server_args(device="cpu"), SimpleNamespace(hidden_size=0, dtype=torch.float32))


def _sglang_model(cls, hf):
    """SGLang's model class `cls` with the weights of the transformers model `hf` (this rank's shard)."""
    model = cls(hf.config).eval()
    model.load_weights(list(hf.named_parameters()))
    return model


def _assert_simulator_means(got: dict, path: str, heads=slice(None)) -> torch.Tensor:
    """The probe's means `got` equal the simulator's `key_means: auto` for the model at `path` (its KV `heads`);
    returns the simulator's [layers, KV heads, head_dim]."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import calibrate

    want = calibrate.Simulator(path, "cpu", torch.float32).auto_key_means()
    assert sorted(got) == list(range(want.shape[0]))
    for layer in range(want.shape[0]):
        torch.testing.assert_close(got[layer], want[layer, heads], atol=2e-4, rtol=1e-4)
    return want


@pytest.fixture(scope="module")
def sglang_cpu(tmp_path_factory):
    """SGLang's parallel state for this process, and its rotary embedding's CPU path."""
    pytest.importorskip("sglang")
    import sglang.srt.layers.rotary_embedding.base as rope_base

    _sglang_parallel_state(0, 1, str(tmp_path_factory.mktemp("dist") / "init"))
    cpu, rope_base._is_cpu = rope_base._is_cpu, True  # the native rotary path (the CUDA one needs a kernel)
    yield
    rope_base._is_cpu = cpu


def _byte_tokenizer(d):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(d)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, sglang_cpu):
    """A 3-layer Qwen2 (k_proj biases) with random weights: its HF folder and the SGLang model with the same
    weights."""
    from sglang.srt.models.qwen2 import Qwen2ForCausalLM as SGLangQwen2
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("tiny_qwen2")
    _byte_tokenizer(d)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    hf = Qwen2ForCausalLM(cfg).eval()
    for layer in hf.model.layers:
        torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=2.0)
    hf.save_pretrained(d)
    return str(d), _sglang_model(SGLangQwen2, hf)


def test_probe_means_equal_the_simulators(qwen2):
    """The server's probe (sglang_internals.probe_key_means through SGLang's Qwen2 layers: fused qkv with biases,
    SGLang's RoPE) gives the simulator's `key_means: auto` (transformers' model, the same weights and tokens)."""
    from transformers import AutoTokenizer

    from sglang_tq.sglang_internals import probe_key_means

    path, model = qwen2
    ids = probe_token_ids(AutoTokenizer.from_pretrained(path))
    assert len(ids) == PROBE_TOKENS  # byte tokens: the cap
    want = _assert_simulator_means(probe_key_means(model, ids), path)
    assert want.shape == (3, 2, 64)
    assert float(want.norm(dim=-1).mean()) > 1.0  # the biases leave a mean worth centering


def test_pool_centers_from_the_probe_at_startup(qwen2, tmp_path, monkeypatch, caplog):
    """_init_pools runs the probe before any key is stored: every quantized layer's mean is the probe's, the
    bf16 layer stays uncentered; a model with logit softcapping or pipeline parallelism stays uncentered, with
    a warning."""
    from transformers import AutoTokenizer

    from sglang_fakes import FakeModelConfig, FakeRunner, env, write_tq_config
    from sglang_tq import registration
    from sglang_tq.sglang_internals import probe_key_means

    path, model = qwen2
    tok = AutoTokenizer.from_pretrained(path)
    monkeypatch.setattr(registration, "load_tokenizer", lambda server_args: tok)
    want = probe_key_means(model, probe_token_ids(tok))
    cfg = write_tq_config(tmp_path, "boundary: {first: 1, last: 0}\nkey_means: auto\n")

    def build(**runner_attrs):
        with env(SGLANG_TQ_CONFIG=cfg):
            runner = FakeRunner(FakeModelConfig(3, 4, 2, 64))
            runner.model = model
            for k, v in runner_attrs.items():
                setattr(runner, k, v)
            runner.build_pools(64, max_running_requests=2)
        return runner.token_to_kv_pool

    pool = build()
    assert pool.key_mean(0) is None  # bf16 boundary layer: keys stored as they are
    for layer in (1, 2):
        torch.testing.assert_close(pool.key_mean(layer), want[layer])
    assert build(pp_size=2).key_mean(1) is None
    assert "with pipeline parallelism the keys stay uncentered" in caplog.text
    stack, model.model = model.model, torch.nn.Identity()  # a stack that takes no forward batch
    try:
        assert build().key_mean(1) is None
    finally:
        model.model = stack
    assert "the probe prefill failed on Qwen2ForCausalLM (TypeError" in caplog.text
    monkeypatch.setattr(registration, "probe_key_means", lambda m, ids: {l: torch.full((2, 64), float("nan"))
                                                                         for l in range(3)})
    assert build().key_mean(1) is None
    assert "the probe prefill gave non-finite keys" in caplog.text
    monkeypatch.setattr(registration, "probe_key_means", probe_key_means)
    monkeypatch.setattr(registration, "load_tokenizer", lambda server_args: open(str(tmp_path / "no-tokenizer")))
    assert build().key_mean(1) is None  # a model folder without a tokenizer (e.g. config-only, dummy weights)
    assert "(FileNotFoundError" in caplog.text
    monkeypatch.setattr(registration, "load_tokenizer", lambda server_args: tok)
    for m in model.modules():
        if hasattr(m, "logit_cap"):
            monkeypatch.setattr(m, "logit_cap", 30.0)
    assert build().key_mean(1) is None
    assert "logit softcapping" in caplog.text


def test_probe_keeps_sliding_windows(tmp_path, sglang_cpu):
    """Gemma 3 (sliding-window layers, k_norm, BOS): the probe's attention honours each layer's window as
    transformers does, so the means of the layers after a sliding one match the simulator's."""
    from sglang.srt.models.gemma3_causal import Gemma3ForCausalLM as SGLangGemma3
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from sglang_tq.sglang_internals import probe_key_means

    _byte_tokenizer(tmp_path)
    torch.manual_seed(1)
    cfg = Gemma3TextConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=32,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=1024, bos_token_id=0, attn_implementation="eager")
    hf = Gemma3ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    got = probe_key_means(_sglang_model(SGLangGemma3, hf), probe_token_ids(AutoTokenizer.from_pretrained(tmp_path)))
    assert _assert_simulator_means(got, str(tmp_path)).shape == (3, 1, 64)


def _tp_probe_worker(rank, world, init, path, out):
    """One tensor-parallel rank: SGLang's parallel state over gloo, the model's shard, the probe."""
    import sglang_cpu_shim  # noqa: F401
    import sglang.srt.layers.rotary_embedding.base as rope_base
    from sglang.srt.models.qwen2 import Qwen2ForCausalLM as SGLangQwen2
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from sglang_tq.sglang_internals import probe_key_means

    _sglang_parallel_state(rank, world, init)
    rope_base._is_cpu = True
    model = _sglang_model(SGLangQwen2, Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32))
    torch.save(probe_key_means(model, probe_token_ids(AutoTokenizer.from_pretrained(path))), f"{out}/rank{rank}.pt")


def test_probe_under_tensor_parallelism(qwen2, tmp_path):
    """TP=2 (two processes, gloo): both ranks run the probe together (the model's all-reduces) and each gets
    the means of its own KV head, equal to those heads of the whole model's."""
    import torch.multiprocessing as mp

    path, _ = qwen2
    mp.spawn(_tp_probe_worker, args=(2, str(tmp_path / "init"), path, str(tmp_path)), nprocs=2)
    for rank in (0, 1):  # the simulator's whole model: [3 layers, 2 KV heads, 64]
        _assert_simulator_means(torch.load(tmp_path / f"rank{rank}.pt"), path, slice(rank, rank + 1))
