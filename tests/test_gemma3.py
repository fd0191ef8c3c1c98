"""Gemma 3: scripts/gguf_gemma3_to_hf.py (GGUF -> Hugging Face, on small synthetic inputs) and the record of
scripts/gpu_gemma3.py.

The tokenizer is checked against llama.cpp's SentencePiece-BPE procedure (merge the adjacent pair whose
joined piece scores best, bytes for what is not in the vocabulary); the weights and config by a round
trip: a tiny random Gemma3ForCausalLM is written the way llama.cpp writes it (norm weights + 1, no q/k
permutation), converted back, and must give the same logits."""
import json
import os
import random
import re
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import gguf_gemma3_to_hf as conv  # noqa: E402

SP = "\u2581"
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
USER = ["\n", "\n\n", "  "]
# (piece, score): "bc" outranks "ab", so "abc" (not a piece) becomes a + bc, not ab + c
PIECES = [("a", -1), ("b", -2), ("c", -3), (SP, -4), ("ab", -20), ("bc", -10),
          (SP + "a", -12), (SP + "ab", -25), ("ca", -40), ("cab", -50), (SP + SP, -45)]


def vocab():
    tokens = SPECIAL + USER + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in PIECES]
    scores = [-1000.0] * (len(SPECIAL) + len(USER)) + [0.0] * 256 + [float(s) for _, s in PIECES]
    types = [conv.CONTROL] * len(SPECIAL) + [conv.USER_DEFINED] * len(USER) + [conv.BYTE] * 256 \
        + [conv.NORMAL] * len(PIECES)
    return tokens, scores, types


def spm_reference(text, tokens, scores, types):
    """llama.cpp's SPM tokenizer: control / user-defined tokens split off first (longest first), then
    greedy best-score merging of adjacent symbols, byte tokens for symbols outside the vocabulary."""
    ids = {t: i for i, t in enumerate(tokens)}
    whole = sorted((t for i, t in enumerate(tokens) if types[i] in (conv.CONTROL, conv.USER_DEFINED)),
                   key=len, reverse=True)

    def bpe(part):
        syms = list(part.replace(" ", SP))
        while True:
            best = None
            for j in range(len(syms) - 1):
                i = ids.get(syms[j] + syms[j + 1])
                if i is not None and types[i] == conv.NORMAL and (best is None or scores[i] > best[0]):
                    best = (scores[i], j)
            if best is None:
                break
            j = best[1]
            syms[j:j + 2] = [syms[j] + syms[j + 1]]
        out = []
        for s in syms:
            out += [ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()]
        return out

    out, pos = [], 0
    for m in re.finditer("|".join(re.escape(t) for t in whole), text):
        out += bpe(text[pos:m.start()]) + [ids[m.group()]]
        pos = m.end()
    return out + bpe(text[pos:])


def test_merges_follow_the_joined_piece_score():
    tokens, scores, types = vocab()
    merges = conv.spm_merges(tokens, scores, types)
    assert merges.index(("b", "c")) < merges.index(("a", "b"))
    assert set(merges) >= {("c", "ab"), ("ca", "b"), (SP, "a"), (SP, "ab"), (SP + "a", "b"), (SP, SP)}
    assert ("<0x61>", "b") not in merges and ("\n", "\n") not in merges  # only normal pieces merge


def test_tokenizer_matches_llama_cpp_spm():
    tokens, scores, types = vocab()
    tk = conv.build_tokenizer(tokens, scores, types, bos_id=2, unk_id=3, add_bos=True)
    assert tk.encode("abc", add_special_tokens=False).ids == [tokens.index("a"), tokens.index("bc")]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(["a", "b", "c", " ", "\n", "\u00e9", "<end_of_turn>"]) for _ in range(rng.randint(1, 14)))
        want = spm_reference(text, tokens, scores, types)
        assert tk.encode(text, add_special_tokens=False).ids == want, repr(text)
        assert tk.encode(text).ids == [2] + want
        assert tk.decode(want, skip_special_tokens=False) == text


def test_tokenizer_refuses_duplicate_tokens():
    tokens, scores, types = vocab()
    tokens[-1] = "a"
    with pytest.raises(ValueError, match="'a' appears twice"):
        conv.build_tokenizer(tokens, scores, types, bos_id=2, unk_id=3, add_bos=True)


def test_tensor_names_and_norm_shift():
    assert conv.hf_tensor_name("blk.7.ffn_norm.weight") == "model.layers.7.pre_feedforward_layernorm.weight"
    assert conv.hf_tensor_name("blk.0.post_ffw_norm.weight") == "model.layers.0.post_feedforward_layernorm.weight"
    assert conv.hf_tensor_name("blk.3.attn_k_norm.weight") == "model.layers.3.self_attn.k_norm.weight"
    assert conv.hf_tensor_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(ValueError, match="blk.0.attn_q.bias"):
        conv.hf_tensor_name("blk.0.attn_q.bias")
    w = np.array([1.0, 0.5, 2.0], np.float32)
    np.testing.assert_array_equal(conv.hf_weight("blk.0.attn_q_norm.weight", w), w - 1)
    np.testing.assert_array_equal(conv.hf_weight("blk.0.attn_q.weight", w), w)


META = {"gemma3.block_count": 18, "gemma3.embedding_length": 640, "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 256,
        "gemma3.attention.value_length": 256, "gemma3.feed_forward_length": 2048, "gemma3.context_length": 32768,
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.rope.freq_base": 1e6,
        "gemma3.attention.sliding_window": 512, "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.padding_token_id": 0}


def test_config_of_gemma3_270m():
    cfg = conv.hf_config(META, n_vocab=262144, tied=True)
    full = [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"]
    assert full == [5, 11, 17] and len(cfg["layer_types"]) == 18
    assert cfg["query_pre_attn_scalar"] == 256 and cfg["sliding_window"] == 512
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert (cfg["head_dim"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (256, 1, True)


def test_config_27b_scale_linear_rope_and_explicit_pattern():
    meta = {**META, "gemma3.block_count": 62, "gemma3.embedding_length": 5376, "gemma3.attention.head_count": 32,
            "gemma3.attention.key_length": 128, "gemma3.attention.value_length": 128,
            "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
    cfg = conv.hf_config(meta, n_vocab=262208, tied=True)
    assert cfg["query_pre_attn_scalar"] == 168
    assert cfg["rope_parameters"]["full_attention"] == {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}
    assert cfg["rope_parameters"]["sliding_attention"]["rope_type"] == "default"
    pattern = [True, False] * 9
    cfg = conv.hf_config({**META, "gemma3.attention.sliding_window_pattern": pattern}, 262144, True)
    assert cfg["layer_types"][:3] == ["sliding_attention", "full_attention", "sliding_attention"]


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="gemma3.attention.sliding_window missing"):
        conv.hf_config({k: v for k, v in META.items() if k != "gemma3.attention.sliding_window"}, 10, True)
    with pytest.raises(ValueError, match="'yarn'"):
        conv.hf_config({**META, "gemma3.rope.scaling.type": "yarn"}, 10, True)
    with pytest.raises(ValueError, match="3 entries for 18 layers"):
        conv.hf_config({**META, "gemma3.attention.sliding_window_pattern": [True] * 3}, 10, True)


def _gguf_name(hf):
    inverse = {v: k for k, v in conv.TOP_TENSORS.items()}
    if hf in inverse:
        return inverse[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}." + {v: k for k, v in conv.LAYER_TENSORS.items()}[rest]


def test_round_trip_through_llama_cpp_layout(tmp_path):
    """Random tiny Gemma 3 -> GGUF as llama.cpp writes it -> converter -> the same logits."""
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    tokens, scores, types = vocab()
    hidden, heads, head_dim, layers, window = 32, 2, 16, 6, 4
    ref_cfg = tr.Gemma3TextConfig(
        vocab_size=len(tokens), hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=1, head_dim=head_dim, max_position_embeddings=128,
        query_pre_attn_scalar=head_dim, sliding_window=window, layer_types=conv.layer_types(layers),
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        attn_implementation="eager")
    torch.manual_seed(0)
    ref = tr.Gemma3ForCausalLM(ref_cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():  # norms too (they start at 0); bf16-exact, as the converter stores
            p.copy_((torch.randn_like(p) * (0.3 if "norm" in n else 0.2)).bfloat16().float())

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma3")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(64)
    w.add_head_count(heads)
    w.add_head_count_kv(1)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(window)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    for n, p in ref.state_dict().items():
        if n == "lm_head.weight":  # tied: llama.cpp writes no output.weight
            continue
        x = p.float().numpy()
        w.add_tensor(_gguf_name(n), x + 1.0 if n.endswith("norm.weight") else x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    cfg = conv.convert(str(tmp_path / "m.gguf"), str(tmp_path / "hf"))
    assert cfg["tie_word_embeddings"] and cfg["layer_types"].count("full_attention") == 1
    got, info = tr.Gemma3ForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                     attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[2] + list(range(len(SPECIAL) + len(USER) + 256, len(tokens))) * 2])  # 25 > window
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    tok = tr.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok("abc").input_ids == [2, tokens.index("a"), tokens.index("bc")]
    chat = tok.apply_chat_template([{"role": "user", "content": "ab"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<bos><start_of_turn>user\nab<end_of_turn>\n<start_of_turn>model\n"
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, tokens.index("<end_of_turn>")]


def test_gpu_record_from_server_results():
    """scripts/gpu_gemma3.py's results/models.json record: capacity, greedy agreement, CUDA graphs on/off and
    the perplexity change per span, from stand-in server results."""
    import gpu_gemma3 as g

    prompts = [[2, 5, 6], [2, 7, 8]]
    got = {"bf16": {"served": True, "max_total_num_tokens": 1000, "prompts": prompts, "greedy": [[1, 2, 3], [4, 5, 6]],
                    "ppl": {"ppl": 20.0, "per_span": [10.0, 30.0]}},
           "turbo4-eval": {"served": True, "ppl": {"ppl": 20.6, "per_span": [10.2, 31.0]}},
           "turbo4": {"served": True, "max_total_num_tokens": 3500, "prompts": prompts, "greedy": [[1, 2, 9], [4, 5, 6]]},
           "turbo4-nograph": {"served": True, "prompts": prompts, "greedy": [[1, 2, 9], [4, 5, 6]]}}
    meta = {"card": "H100", "date": "2026-12-08", "commit": "abc1234", "command": "bash scripts/gpu_gemma3.sh"}
    rec = g.summarize("turbo4", got, (3.6, 10, 36, 0), meta)
    assert rec["layout"] == "swa" and rec["served"] and rec["graphs_identical"] is True
    assert rec["capacity_ratio"] == 3.5 and rec["byte_ratio"] == 3.6 and rec["expected_ratio"] == 3.6
    assert rec["quality_delta"] == pytest.approx(((10.2 / 10 + 31 / 30) / 2 - 1) * 100, abs=1e-3)
    assert rec["greedy_agreement"] == {"mean_prefix": 2.5, "std": 0.71, "identical": "1/2", "tokens": g.GEN}
    got["turbo4-nograph"]["greedy"] = [[1, 2, 3], [4, 5, 6]]
    got[g.CENTERED + "-eval"] = got.pop("turbo4-eval")
    rec = g.summarize("turbo4", got, (3.6, 10, 36, 0), meta)
    assert rec["graphs_identical"] is False and rec["quality_delta"] is None
    centered = g.summarize(g.CENTERED, got, (3.6, 10, 36, 0), meta)  # perplexity server only
    assert centered["served"] and centered["quality_delta"] is not None and centered["capacity_ratio"] is None
    assert centered["graphs_identical"] is None
    for key in ("model", "layout", "config", "served", "graphs_identical", "capacity_ratio", "byte_ratio",
                "quality_metric", "quality_delta", "card", "date", "commit"):
        assert key in rec


def test_centered_example_config_resolves_for_gemma3_270m():
    """configs/examples/turbo4_gemma3_270m.yaml: turbo4's bytes, with key means for 18 layers x 1 KV head x 256."""
    from sglang_tq.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    plan = load_config(os.path.join(root, "configs", "examples", "turbo4_gemma3_270m.yaml")).resolve(18, 256, num_kv_heads=1)
    ref = load_config("turbo4").resolve(18, 256, num_kv_heads=1)
    assert tuple(plan.key_means.shape) == (18, 1, 256) and plan.key_means.abs().sum() > 0
    assert plan.bytes_per_token(1) == ref.bytes_per_token(1) and plan.window_tokens == ref.window_tokens
