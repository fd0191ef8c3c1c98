"""scripts/calibrate.py end to end on a tiny random Llama (CPU): the simulator really quantizes (KL > 0
and growing as bits shrink), the written YAML meets the bit target and loads with its key means."""
import json
import os
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """4-layer Llama, 2 query / 1 KV head of head_dim 64, byte-level tokenizer, random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny_llama")
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # 256 byte symbols
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(d)
    assert len(vocab) == 256
    return str(d)


def test_simulator_kl_grows_as_bits_shrink(tiny_model):
    import calibrate

    sim = calibrate.Simulator(tiny_model, "cpu", torch.float32)
    ids = sim.tok("It is a truth universally acknowledged. " * 4, add_special_tokens=False)["input_ids"][:96]
    sim.set_config(None)
    ref = sim.reference_logprobs(ids, 48)
    floor = sim.kl_to(ids, 48, ref)  # nothing quantized: only the bf16 storage of the reference
    assert 0 <= floor < 1e-3
    kls = []
    for bits in (4, 2):
        sim.set_probe(1, "k", bits, seed=0)
        kls.append(sim.kl_to(ids, 48, ref))
    assert floor < kls[0] < kls[1]


def test_simulator_recent_window(tiny_model):
    """The server's recent window in the simulator: a window as long as the text is exact attention, a
    short one sits between that and every position from the codes."""
    import calibrate

    sim = calibrate.Simulator(tiny_model, "cpu", torch.float32)
    ids = sim.tok("It is a truth universally acknowledged. " * 4, add_special_tokens=False)["input_ids"][:96]
    sim.set_config(None)
    ref = sim.reference_logprobs(ids, 96)
    floor = sim.kl_to(ids, 96, ref)  # only the bf16 storage of the reference
    kl = {}
    for recent in (0, 8, 96):
        sim.set_config(calibrate.uniform_config(2, (0, 0), 0, recent))
        assert sim.recent == recent
        kl[recent] = sim.kl_to(ids, 96, ref) - floor
    assert abs(kl[96]) < 1e-7 < kl[0]
    assert kl[96] < kl[8] < kl[0]


def test_calibrate_writes_a_config_meeting_the_target(tiny_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good "
                    "fortune, must be in want of a wife. " * 40)
    out, report = tmp_path / "cal.yaml", tmp_path / "cal.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "calibrate.py"), "--model", tiny_model, "--text", str(text),
           "--chars", "2000", "--tokens", "96", "--window", "48", "--candidates", "2,4", "--target-bits", "3",
           "--boundary", "1,1", "--center", "--out", str(out), "--json", str(report), "--device", "cpu",
           "--heldout-text", str(text)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["metric"] == "kl" and r["calibrated"]["avg_bits"] == 3.0
    assert all(v >= 0 for v in r["sensitivity"].values())  # KL divergences
    assert {"bf16", "calibrated", "uniform"} <= set(r["heldout"])
    from sglang_tq.config import load_config

    plan = load_config(str(out)).resolve(4, 64, num_kv_heads=1)
    assert plan.quantized_layers == (1, 2) and plan.key_means is not None
    assert sum(plan[l].k.bits + plan[l].v.bits for l in (1, 2)) == 12  # 3 bits average over 4 roles
