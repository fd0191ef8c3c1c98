"""Registration with SGLang: CLI choice, backend registry, idempotence, main-process checks through the
real ServerArgs (HF config folder without weights), the launcher's argument handling, and the .pth
autoload hook (in a subprocess)."""
import argparse
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("sglang")

import sglang_fakes  # noqa: E402,F401  (registers, patches the TP size)
import sglang_tq  # noqa: E402
from sglang_fakes import env, write_hf_config, write_tq_config  # noqa: E402
from sglang.srt.layers.attention import attention_registry  # noqa: E402
from sglang.srt.model_executor import model_runner_kv_cache_mixin as mix  # noqa: E402
from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, ServerArgs  # noqa: E402
from sglang_tq import registration  # noqa: E402
from sglang_tq.compat import TQUnsupportedError  # noqa: E402
from sglang_tq.config import TQConfigError  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def test_cli_accepts_turboquant_and_registry_entry():
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(["--model-path", "m", "--attention-backend", "turboquant"])
    assert ns.attention_backend == "turboquant"
    ns = parser.parse_args(["--model-path", "m", "--prefill-attention-backend", "turboquant",
                            "--decode-attention-backend", "turboquant"])
    assert ns.decode_attention_backend == "turboquant"
    assert attention_registry.ATTENTION_BACKENDS["turboquant"] is registration.create_turboquant_backend


def test_register_is_idempotent():
    cell, init = mix.ModelRunnerKVCacheMixin.get_cell_size_per_token, mix.ModelRunnerKVCacheMixin._init_pools
    post = ServerArgs.__post_init__
    for _ in range(3):
        sglang_tq.register()
    assert ATTENTION_BACKEND_CHOICES.count("turboquant") == 1
    assert mix.ModelRunnerKVCacheMixin.get_cell_size_per_token is cell
    assert mix.ModelRunnerKVCacheMixin._init_pools is init
    assert ServerArgs.__post_init__ is post


def _server_args(model_dir, **kw):
    return ServerArgs(model_path=model_dir, device="cpu", attention_backend=kw.pop("attention_backend", "turboquant"),
                      **kw)


def test_server_args_main_process(tmp_path):
    model = write_hf_config(tmp_path)
    with env(SGLANG_TQ_CONFIG=None):
        sa = _server_args(model)
    assert sa.attention_backend == "turboquant"
    with env(SGLANG_TQ_CONFIG=None):  # piecewise CUDA graphs for prefill: as SGLang decides for BF16 KV
        for kw in ({}, dict(enforce_piecewise_cuda_graph=True), dict(disable_piecewise_cuda_graph=True)):
            bf16 = _server_args(model, attention_backend="triton", **kw).disable_piecewise_cuda_graph
            assert _server_args(model, **kw).disable_piecewise_cuda_graph is bf16
        assert _server_args(model, enforce_piecewise_cuda_graph=True).disable_piecewise_cuda_graph is False
    with env(SGLANG_TQ_CONFIG=None):  # other backends untouched
        assert _server_args(model, attention_backend="triton").attention_backend == "triton"


def test_deterministic_inference_accepts_turboquant(tmp_path):
    """--enable-deterministic-inference with turboquant: SGLang checks the attention backend against its
    deterministic list, which registration extends; the radix cache goes off as for other backends
    without deterministic radix support."""
    from sglang.srt.server_args import DETERMINISTIC_ATTENTION_BACKEND_CHOICES

    assert DETERMINISTIC_ATTENTION_BACKEND_CHOICES.count("turboquant") == 1
    model = write_hf_config(tmp_path)
    with env(SGLANG_TQ_CONFIG=None, SGLANG_ENABLE_DETERMINISTIC_INFERENCE=None):
        sa = _server_args(model, enable_deterministic_inference=True)
    assert sa.attention_backend == "turboquant" and sa.enable_deterministic_inference
    assert sa.disable_radix_cache


@pytest.mark.parametrize("kw, message", [
    (dict(kv_cache_dtype="fp8_e4m3"), "--kv-cache-dtype fp8_e4m3"),
    (dict(decode_attention_backend="triton"), "mixing attention backends"),
    (dict(speculative_algorithm="EAGLE3"), "--speculative-algorithm EAGLE3: the draft model"),
    (dict(enable_hierarchical_cache=True), "hierarchical cache"),
])
def test_server_args_refusals(tmp_path, kw, message):
    model = write_hf_config(tmp_path)
    with pytest.raises((TQUnsupportedError, ValueError)) as ei:
        _server_args(model, **kw)
    if isinstance(ei.value, TQUnsupportedError):
        assert message in str(ei.value)


def test_server_args_model_refusals(tmp_path):
    with pytest.raises(TQUnsupportedError, match="head_dim 112"):
        _server_args(write_hf_config(tmp_path, hidden_size=112 * 32))


def test_bad_tq_config_fails_before_launch(tmp_path):
    model = write_hf_config(tmp_path)
    bad = write_tq_config(tmp_path, "defaults: {k: {bitz: 4}}\n")
    with env(SGLANG_TQ_CONFIG=bad), pytest.raises(TQConfigError, match="bitz"):
        _server_args(model)
    past = write_tq_config(tmp_path, "overrides: [{layers: 40, format: bf16}]\n", "past.yaml")
    with env(SGLANG_TQ_CONFIG=past), pytest.raises(TQConfigError, match="32 layers"):
        _server_args(model)


def test_launcher_args(tmp_path, monkeypatch):
    from sglang_tq import launch_server as ls

    assert ls.pop_tq_args(["--a", "1", "--tq-config", "turbo3", "--b"]) == (["--a", "1", "--b"], "turbo3")
    assert ls.pop_tq_args(["--tq-config=x.yaml"]) == ([], "x.yaml")
    with pytest.raises(SystemExit):
        ls.pop_tq_args(["--tq-config"])
    model = write_hf_config(tmp_path)
    cfg = write_tq_config(tmp_path, "name: mine\nseed: 3\n")
    monkeypatch.delenv("SGLANG_TQ_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    sa = ls.prepare(["--model-path", model, "--device", "cpu", "--tq-config", os.path.basename(cfg)])
    assert os.environ["SGLANG_TQ_CONFIG"] == cfg  # absolute path for the spawned schedulers
    assert sa.attention_backend == "turboquant"  # added when not given
    assert "mine" in ls.describe(sa)
    sa = ls.prepare(["--model-path", model, "--device", "cpu", "--tq-config", "turbo3",
                     "--attention-backend", "turboquant"])
    assert os.environ["SGLANG_TQ_CONFIG"] == "turbo3"
    with pytest.raises(TQConfigError, match="no such config"):
        ls.prepare(["--model-path", model, "--device", "cpu", "--tq-config", "nope"])


def test_launcher_main_exits_cleanly_on_errors(tmp_path, monkeypatch, capsys):
    from sglang_tq import launch_server as ls

    monkeypatch.delenv("SGLANG_TQ_CONFIG", raising=False)
    model = write_hf_config(tmp_path)
    with pytest.raises(SystemExit) as ei:
        ls.main(["--model-path", model, "--device", "cpu", "--kv-cache-dtype", "fp8_e5m2"])
    assert ei.value.code == 2
    assert "does not support --kv-cache-dtype fp8_e5m2" in capsys.readouterr().err


def test_scheduler_target_is_importable_by_name():
    """Spawned schedulers unpickle the target by module + name: it must live in an importable module."""
    f = registration.run_scheduler_process_tq
    assert f.__module__ == "sglang_tq.registration" and f.__qualname__ == "run_scheduler_process_tq"


def test_autoload_pth_hook(tmp_path):
    """The .pth line patches SGLang in a fresh interpreter (as in a spawned scheduler); opt-out works."""
    from sglang_tq import _autoload

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / _autoload.PTH_NAME).write_text(_autoload.pth_line(os.path.abspath(_autoload.__file__)))
    code = textwrap.dedent(f"""
        import site, sys
        site.addsitedir({str(site_dir)!r})
        hooked = any(getattr(f, "_sglang_tq", False) for f in sys.meta_path)
        print("HOOK", hooked, "sglang_tq" in sys.modules, "torch" in sys.modules)
        if hooked:
            sys.path.insert(0, {TESTS!r})
            import sglang_cpu_shim
            from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES
            from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
            from sglang.srt.model_executor.model_runner_kv_cache_mixin import ModelRunnerKVCacheMixin as M
            print("PATCHED", "turboquant" in ATTENTION_BACKEND_CHOICES, "turboquant" in ATTENTION_BACKENDS,
                  set(["_init_pools", "get_cell_size_per_token"]) <= M.__dict__.get("_sglang_tq_wrapped", set()))
    """)
    envv = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    envv.pop("SGLANG_TQ_AUTOLOAD", None)
    out = subprocess.run([sys.executable, "-c", code], env=envv, capture_output=True, text=True, timeout=120)
    assert "HOOK True False False" in out.stdout, out.stdout + out.stderr
    assert "PATCHED True True True" in out.stdout, out.stdout + out.stderr
    envv["SGLANG_TQ_AUTOLOAD"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=envv, capture_output=True, text=True, timeout=60)
    assert "HOOK False" in out.stdout, out.stdout + out.stderr


def test_autoload_install_commands(tmp_path, monkeypatch):
    from sglang_tq import _autoload

    monkeypatch.setattr(_autoload, "_site_dir", lambda: str(tmp_path))
    assert _autoload.status().startswith("not installed")
    path = _autoload.install()
    assert os.path.dirname(path) == str(tmp_path) and _autoload.status().startswith("installed")
    assert _autoload.uninstall() and not os.path.exists(path)


@pytest.mark.parametrize("over, message", [
    # DeepSeek-V2-Lite shape: latent (MLA) attention
    (dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_size=2048,
          num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
          qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=1408,
          n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
          num_hidden_layers=27), "MLA"),
    # Llama shape with head_dim 72 (hidden 2304 / 32 heads)
    (dict(hidden_size=2304), "head_dim 72"),
])
def test_unsupported_models_refused_before_weights(tmp_path, over, message):
    """Refusal happens while the server arguments are built in the main process, from config.json
    alone: no weights exist in the folder, so nothing could have been loaded."""
    with env(SGLANG_TQ_CONFIG=None), pytest.raises(TQUnsupportedError, match=message):
        _server_args(write_hf_config(tmp_path, **over))


def test_sliding_window_model_accepted_before_weights(tmp_path):
    """Gemma-2-2B shape: every other layer attends to a 4096-token window, and SGLang serves it from
    one pool for all layers, so the main-process checks let it through."""
    gemma2 = dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_size=2304, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, sliding_window=4096, num_hidden_layers=26,
                  query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    with env(SGLANG_TQ_CONFIG=None):
        assert _server_args(write_hf_config(tmp_path, **gemma2)).attention_backend == "turboquant"
