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


def test_simulator_first_token(tiny_model):
    """first_token: exact keeps every layer's position-0 K/V exact: the first position's logits are the exact
    model's (it sees only itself), later ones move less than with the first token from the codes."""
    import calibrate

    sim = calibrate.Simulator(tiny_model, "cpu", torch.float32)
    ids = sim.tok("It is a truth universally acknowledged. " * 4, add_special_tokens=False)["input_ids"][:64]
    x = torch.tensor(ids)[None]
    sim.set_config(None)
    with torch.no_grad():
        want = sim.model(x).logits
    got = {}
    for first in ("exact", "codes"):
        sim.set_config(calibrate.uniform_config(2, (0, 0), 0, 0, first))
        assert sim.first_exact == (first == "exact")
        with torch.no_grad():
            got[first] = sim.model(x).logits
    torch.testing.assert_close(got["exact"][0, 0], want[0, 0], rtol=1e-5, atol=1e-5)
    assert (got["codes"][0, 0] - want[0, 0]).abs().max() > 1e-3
    assert calibrate.variant_dict("turbo4:first=codes")["first_token"] == "codes"
    with pytest.raises(SystemExit, match="first=exact|codes"):
        calibrate.variant_dict("turbo4:first=bf16")


class _Exact:
    """A codec that gives back what it got: the simulator then must equal the model itself."""

    def encode(self, x):
        return (x,)

    def decode(self, x):
        return x


def test_simulator_keeps_sliding_windows(tmp_path):
    """Gemma 3's sliding-window layers (window 4 here, 30 tokens) attend only inside their band in the
    simulator, with and without the recent window: lossless codecs give the eager model's logits."""
    from tokenizers import Tokenizer, models
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast
    import calibrate

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
                            ).save_pretrained(tmp_path)
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
    Gemma3ForCausalLM(cfg).save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 30))
    eager = Gemma3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        want = eager(ids).logits
        full = Gemma3ForCausalLM.from_pretrained(  # the same weights with no band: must differ
            tmp_path, attn_implementation="eager", sliding_window=64).eval()(ids).logits
        assert (full - want).abs().max() > 1e-3
        sim = calibrate.Simulator(str(tmp_path), "cpu", torch.float32)
        for recent in (0, 6):
            sim.set_config(None)
            sim.layer_codecs, sim.recent = {l: (_Exact(), _Exact()) for l in range(2)}, recent
            torch.testing.assert_close(sim.model(ids).logits, want, rtol=1e-5, atol=1e-5)


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


def test_variants_score_spans_and_write_server_configs(tiny_model, tmp_path):
    """--variants: each variant's perplexity over the spans eval_quality would send to a server, its bytes
    per token, protected layers, and a YAML the server loads."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("a", "b"):
        (texts / f"{name}.txt").write_text(f"It is a truth universally acknowledged ({name}), that a single man. " * 30)
    report, cfgs = tmp_path / "v.json", tmp_path / "cfgs"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "calibrate.py"), "--model", tiny_model,
           "--text", str(texts / "a.txt"), "--chars", "600", "--tokens", "64", "--window", "64", "--device", "cpu",
           "--means-text", str(texts / "b.txt"), "--key-means-out", str(tmp_path / "m.safetensors"), "--no-calibrate",
           "--eval-texts", str(texts), "--spans", "3", "--span-tokens", "48", "--write-configs", str(cfgs),
           "--json", str(report), "--record", str(tmp_path / "simulation.json"), "--name", "tiny",
           "--variants", "turbo4:w=0:center=none,turbo4:w=0:center=calibrated,turbo4:w=0:center=none:protect=1"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    v = json.loads(report.read_text())["variants"]
    rows = v["rows"]
    assert v["spans"] == 3 and v["spread"] == "std over spans"
    assert all(len(r["per_span"]) == 3 for r in rows.values())
    plain, protected = rows["turbo4:w=0:center=none"], rows["turbo4:w=0:center=none:protect=1"]
    (layer,) = protected["protected"]
    assert layer in (1, 2, 3)  # turbo4 keeps layer 0 bf16 already: the worst of the quantized layers
    assert protected["bytes_per_token"] > plain["bytes_per_token"]
    assert plain["mean"] != rows["bf16"]["mean"]  # every scored token reads 4-bit codes of its past
    from sglang_tq.config import load_config

    cal = load_config(str(cfgs / "turbo4_w0_centercalibrated.yaml"))
    assert cal.key_means == str(tmp_path / "m.safetensors") and cal.window_tokens == 0
    # --record: the records make_tables publishes; change = mean of the per-span ratios - 1
    import make_tables

    recs = json.loads((tmp_path / "simulation.json").read_text())
    assert len(recs) == 3 and all(set(make_tables.REQUIRED["simulation"]) <= set(r) for r in recs)
    by = {r["centering"]: r for r in recs if not r["protected_layers"]}
    assert set(by) == {"none", "calibrated (64 tokens of b.txt)"}
    ratios = [x / y - 1 for x, y in zip(plain["per_span"], rows["bf16"]["per_span"])]
    assert by["none"]["delta_pct"] == pytest.approx(100 * sum(ratios) / 3, abs=0.006)
    assert by["none"]["window"] == 0 and by["none"]["first_token"] == "exact" and by["none"]["model"] == "tiny"
    assert by["none"]["text"] == "48-token spans of a.txt, b.txt" and by["none"]["n"] == 3
    assert [r["protected_layers"] for r in recs if r["protected_layers"]] == [[layer]]
