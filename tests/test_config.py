"""Per-layer config: parsing, validation messages, resolution, sizes, presets and the CLI."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sglang_tq import cli
from sglang_tq.config import (
    CONFIG_ENV, TQConfigError, bytes_per_token, list_presets, load_config, parse_yaml, presets_dir,
)
from tq_kernels.codec import ROLE_K, ROLE_V, VecFormat

PRESETS = ["turbo4", "turbo3", "k4v2", "turbo2", "turbo3.5", "prod3", "k5v4", "example_per_layer"]
LLAMA3_8B = dict(num_layers=32, num_kv_heads=8, head_dim=128)


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --- bad inputs: each names file, key and value -------------------------------------------------
BAD = [
    ("unknown top key", "defualts: {}\n", ["defualts", "did you mean 'defaults'"]),
    ("unknown k key", "defaults:\n  k: {bist: 3}\n", ["defaults.k.bist", "did you mean 'bits'"]),
    ("wrong type bits", "defaults:\n  k: {bits: four}\n", ["defaults.k.bits", "expected an integer", "'four'"]),
    ("bool is not an int", "defaults:\n  v: {bits: true}\n", ["defaults.v.bits", "expected an integer"]),
    ("bits too high", "defaults:\n  k: {bits: 7}\n", ["defaults.k.bits", "7 is out of range", "allowed 2..6"]),
    ("bits too low", "defaults:\n  v: {bits: 1}\n", ["defaults.v.bits", "1 is out of range", "allowed 2..6"]),
    ("prod bits too high", "defaults:\n  k: {bits: 6, qjl: true}\n", ["defaults.k.bits", "6", "allowed 2..5"]),
    ("qjl on V", "defaults:\n  v: {bits: 3, qjl: true}\n", ["defaults.v.qjl", "V may not use qjl"]),
    ("qjl not a bool", "defaults:\n  k: {qjl: 1}\n", ["defaults.k.qjl", "expected true or false"]),
    ("outliers both count and fraction", "defaults:\n  k: {bits: 3, outliers: {channels: 32, fraction: 0.25, bits: 4}}\n",
     ["defaults.k.outliers", "exactly one of 'channels'"]),
    ("outlier channels not power of two", "defaults:\n  k: {bits: 3, outliers: {channels: 24, bits: 4}}\n",
     ["defaults.k.outliers.channels", "24", "power of two"]),
    ("outlier bits not above bits", "defaults:\n  v: {bits: 3, outliers: {channels: 32, bits: 3}}\n",
     ["defaults.v.outliers.bits", "3 is out of range", "allowed 4..6"]),
    ("outlier list duplicates", "defaults:\n  k: {bits: 3, outliers: {channels: 8, bits: 4, channel_list: [1,1,2,3,4,5,6,7]}}\n",
     ["defaults.k.outliers.channel_list", "[1] repeated"]),
    ("overlapping overrides", "overrides:\n  - {layers: \"4-8\", k: {bits: 3}}\n  - {layers: [8, 9], v: {bits: 2}}\n",
     ["overrides[1].layers", "overlaps overrides[0]"]),
    ("bad selector", "overrides:\n  - {layers: [1, 2, 3], k: {bits: 3}}\n", ["overrides[0].layers", "[1, 2, 3]", "[first, last]"]),
    ("backwards range", "overrides:\n  - {layers: \"9-4\", k: {bits: 3}}\n", ["overrides[0].layers", "first 9 > last 4"]),
    ("bf16 with k", "overrides:\n  - {layers: 5, format: bf16, k: {bits: 3}}\n", ["overrides[0]", "remove its k/v"]),
    ("bad layer format", "overrides:\n  - {layers: 5, format: int8}\n", ["overrides[0].format", "'int8'", "tq, bf16, fp8"]),
    ("bad boundary format", "boundary: {first: 1, format: int8}\n", ["boundary.format", "'int8'", "bf16, fp8"]),
    ("tq boundary format", "boundary: {first: 1, format: tq}\n", ["boundary.format", "'tq'", "bf16, fp8"]),
    ("fp8 with v", "overrides:\n  - {layers: 5, format: fp8, v: {bits: 3}}\n", ["overrides[0]", "format: fp8", "remove its k/v"]),
    ("negative boundary", "boundary: {last: -1}\n", ["boundary.last", "-1 is negative"]),
    ("not a mapping", "- 1\n- 2\n", ["expected a mapping", "list"]),
    ("duplicate key", "seed: 1\nseed: 2\n", ["malformed YAML at line 2", "duplicate key 'seed'"]),
    ("malformed yaml", "defaults:\n  k: {bits: 3\nseed: 1\n", ["malformed YAML at line"]),
    ("window too long", "window: {tokens: 300}\n", ["window.tokens", "300 is out of range", "0 (off) .. 256"]),
    ("window negative", "window: {tokens: -4}\n", ["window.tokens", "-4 is out of range"]),
    ("window requests zero", "window: {tokens: 32, requests: 0}\n", ["window.requests", "0 is out of range"]),
    ("window unknown key", "window: {token: 32}\n", ["window.token", "did you mean 'tokens'"]),
    ("window not a mapping", "window: 32\n", ["window", "expected a mapping"]),
    ("evaluation unknown key", "evaluation: {prefill_from_cash: true}\n",
     ["evaluation.prefill_from_cash", "did you mean 'prefill_from_cache'"]),
    ("evaluation not a bool", "evaluation: {prefill_from_cache: 1}\n",
     ["evaluation.prefill_from_cache", "expected true or false", "int 1"]),
    ("evaluation not a mapping", "evaluation: true\n", ["evaluation", "expected a mapping"]),
    ("bad first_token", "first_token: bf16\n", ["first_token", "'bf16'", "allowed: exact, codes"]),
    ("first_token typo", "first_token: exactly\n", ["first_token", "did you mean 'exact'"]),
    ("first_token not a string", "first_token: true\n", ["first_token", "True is not allowed", "exact, codes"]),
    ("first_token unknown top key", "first_tokens: exact\n", ["first_tokens", "did you mean 'first_token'"]),
    ("bad sliding format", "sliding: {format: int4}\n", ["sliding.format", "'int4'", "tq, bf16, fp8"]),
    ("sliding unknown key", "sliding: {fromat: bf16}\n", ["sliding.fromat", "did you mean 'format'"]),
    ("sliding not a mapping", "sliding: bf16\n", ["sliding", "expected a mapping", "'bf16'"]),
    ("misspelled format suggests", "boundary: {format: FP8}\n", ["boundary.format", "'FP8'", "did you mean 'fp8'"]),
    ("null format", "sliding: {format: null}\n", ["sliding.format", "null is not allowed", "tq, bf16, fp8"]),
    ("null bits", "defaults:\n  k: {bits: null}\n", ["defaults.k.bits", "expected an integer, got null"]),
    ("float seed", "seed: 1.5\n", ["seed", "expected an integer", "float 1.5"]),
    ("negative seed", "seed: -1\n", ["seed", "-1 is negative", ">= 0"]),
    ("name not a string", "name: 3\n", ["name", "non-empty string", "3"]),
    ("defaults not a mapping", "defaults: 3\n", ["defaults", "expected a mapping", "int 3"]),
    ("unknown defaults key", "defaults: {kk: {}}\n", ["defaults.kk", "did you mean 'k'", "allowed: k, v"]),
    ("boundary misspelled", "boundary: {firts: 1}\n", ["boundary.firts", "did you mean 'first'"]),
    ("boundary float", "boundary: {first: 1.0}\n", ["boundary.first", "expected an integer", "float 1.0"]),
    ("outliers missing bits", "defaults:\n  k: {bits: 3, outliers: {channels: 16}}\n", ["defaults.k.outliers", "missing 'bits'"]),
    ("outlier fraction out of range", "defaults:\n  v: {bits: 3, outliers: {fraction: 1.5, bits: 4}}\n",
     ["defaults.v.outliers.fraction", "1.5", "(0, 1)"]),
    ("outlier negative channel", "defaults:\n  k: {bits: 3, outliers: {channels: 8, bits: 4, channel_list: [0,1,2,3,4,5,6,-1]}}\n",
     ["defaults.k.outliers.channel_list", "[-1] are negative", "0..head_dim - 1"]),
    ("outlier list length", "defaults:\n  k: {bits: 3, outliers: {channels: 16, bits: 4, channel_list: [1, 2]}}\n",
     ["defaults.k.outliers.channel_list", "2 entries", "channels: 16"]),
    ("inherited outliers", "defaults:\n  k: {bits: 3, outliers: {channels: 16, bits: 4}}\noverrides:\n  - {layers: 5, k: {bits: 4}}\n",
     ["overrides[0].k.bits", "inherited outliers.bits 4"]),
    ("overrides not a list", "overrides: {layers: 5, format: bf16}\n", ["overrides", "expected a list", "dict"]),
    ("override not a mapping", "overrides: [5]\n", ["overrides[0]", "expected a mapping", "int 5"]),
    ("override without layers", "overrides:\n  - {k: {bits: 3}}\n", ["overrides[0]", "missing 'layers'"]),
    ("override misspelled", "overrides:\n  - {layer: 5, k: {bits: 3}}\n", ["overrides[0].layer", "did you mean 'layers'"]),
    ("override changes nothing", "overrides:\n  - {layers: 5}\n", ["overrides[0]", "changes nothing"]),
    ("override with empty k", "overrides:\n  - {layers: 5, k: {}}\n", ["overrides[0]", "changes nothing"]),
    ("override k not a mapping", "overrides:\n  - {layers: 5, k: 3}\n", ["overrides[0].k", "expected a mapping"]),
    ("override bits", "overrides:\n  - {layers: 5, k: {bits: 9}}\n", ["overrides[0].k.bits", "9 is out of range", "2..6"]),
    ("override qjl on V", "overrides:\n  - {layers: 5, v: {qjl: true}}\n", ["overrides[0].v.qjl", "V may not use qjl"]),
    ("string selector negative", "overrides:\n  - {layers: \"-1\", k: {bits: 3}}\n",
     ["overrides[0].layers", "'-1' is not a layer selector", "-1 = last layer"]),
    ("float selector", "overrides:\n  - {layers: 3.5, k: {bits: 3}}\n", ["overrides[0].layers", "3.5 is not a layer selector"]),
    ("bool selector", "overrides:\n  - {layers: true, k: {bits: 3}}\n", ["overrides[0].layers", "True is not a layer selector"]),
    ("key_means empty", "key_means: ''\n", ["key_means", "'' is not allowed", "'auto' or a file path"]),
    ("key_means not a path", "key_means: [a]\n", ["key_means", "['a'] is not allowed", "'auto' or a file path"]),
    ("key_means AUTO", "key_means: AUTO\n", ["key_means", "'AUTO': no such file", "did you mean 'auto'"]),
    ("key_means folder", "key_means: .\n", ["key_means", "'.': is a folder", "'auto' or a file path"]),
    ("window float", "window: {tokens: 32.0}\n", ["window.tokens", "expected an integer", "float 32.0"]),
    ("window bool", "window: {tokens: true}\n", ["window.tokens", "expected an integer", "bool True"]),
    ("top level scalar", "3\n", ["expected a mapping", "int 3"]),
    ("non-string key", "? [a, b]\n: 3\n", ["malformed YAML at line 1", "a list as a key"]),
    ("unknown tag", "!!python/object:os.system {}\n", ["malformed YAML at line 1", "python/object"]),
    ("tab indent", "defaults:\n\tk: {bits: 3}\n", ["malformed YAML at line 2"]),
]


@pytest.mark.parametrize("text,fragments", [(t, f) for _, t, f in BAD], ids=[n for n, _, _ in BAD])
def test_bad_config_message(tmp_path, text, fragments):
    path = write(tmp_path, text, "bad_config.yaml")
    with pytest.raises(TQConfigError) as err:
        load_config(str(path))
    msg = str(err.value)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "name: x\ndefaults:\n  k: [bits: 3\n  v: {}\n")
    with pytest.raises(TQConfigError, match=r"cfg\.yaml: malformed YAML at line [34]"):
        load_config(str(path))


def test_empty_file(tmp_path):
    path = write(tmp_path, "  \n", "empty.yaml")
    with pytest.raises(TQConfigError, match=r"empty\.yaml: empty file"):
        load_config(str(path))
    with pytest.raises(TQConfigError, match=r"empty config"):
        parse_yaml("# only a comment\n", "comment.yaml")


@pytest.mark.parametrize("ref, fragments", [
    ("turbo9", ["turbo9: no such config file or preset", "(presets: ", "turbo4"]),
    ("trubo4", ["trubo4: no such config file or preset", "did you mean 'turbo4'"]),
    ("k4v3.yaml", ["k4v3.yaml: no such file", "did you mean 'k4v2'"]),
    ("/nowhere/turbo4x.yaml", ["/nowhere/turbo4x.yaml: no such file (/nowhere/turbo4x.yaml)", "a YAML file or a preset"]),
])
def test_unknown_preset_or_file(ref, fragments):
    with pytest.raises(TQConfigError) as err:
        load_config(ref)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_config_ref_that_is_a_folder(tmp_path):
    with pytest.raises(TQConfigError, match=r"is a folder; expected a YAML file or a preset name"):
        load_config(str(tmp_path))


def test_config_path_with_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, "name: home\n", "h.yaml")
    assert load_config("~/h.yaml").name == "home"


# --- errors that need the model's shape ------------------------------------------------------------
def test_layer_past_model_end():
    cfg = parse_yaml("boundary: {last: 0}\noverrides:\n  - {layers: \"20-40\", k: {bits: 3}}\n", "m.yaml")
    cfg.resolve(41, 128)
    with pytest.raises(TQConfigError, match=r"m\.yaml: overrides\[0\]\.layers: layer 40 is past the model's 32 layers"):
        cfg.resolve(32, 128)
    with pytest.raises(TQConfigError, match=r"layer -40 is past the model's 32 layers; allowed -32\.\.31"):
        parse_yaml("overrides:\n  - {layers: -40, format: bf16}\n", "m.yaml").resolve(32, 128)


def test_unsupported_head_dim():
    cfg = load_config("turbo4")
    with pytest.raises(TQConfigError, match=r"turbo4\.yaml: model head_dim 112 is not supported .*64, 80, 96, 128, 256"):
        cfg.resolve(32, 112)
    with pytest.raises(TQConfigError, match=r"model v_head_dim 48 is not supported"):
        cfg.resolve(32, 128, v_head_dim=48)


@pytest.mark.parametrize("d", [80, 96])
def test_padded_head_dims_resolve(d, capsys):
    """head_dim 80 / 96: quantized layers use the 128-dim codec (66 B per 4-bit vector, vs 2 d B in bf16);
    boundary layers keep the model's d; outlier counts are of the 128 codec channels; the summary says so."""
    plan = parse_yaml("boundary: {first: 1, last: 0, format: fp8}\noverrides:\n"
                      "  - {layers: 3, k: {bits: 3, outliers: {fraction: 0.25, bits: 4}}}\n", "p.yaml").resolve(4, d)
    assert plan[0].bytes_per_token_head(d, d) == 2 * d  # fp8 at the model's d
    assert plan[1].k == VecFormat(128, 4, model_head_dim=d) and plan[1].k.in_dim == d
    assert plan[1].bytes_per_token_head(d, d) == 2 * 66
    assert plan[3].k.outlier_channels == 32  # 0.25 x the 128 codec channels
    kc, vc = plan.codecs(1)
    assert kc.rotation.dim == 128 and kc.decode(*kc.encode(torch.randn(3, d))).shape == (3, d)
    assert f"head_dim {d}: quantized layers code 128 coordinates" in plan.summary(8)
    assert cli.main(["validate", "turbo4", "--layers", "32", "--head-dim", str(d)]) == 0
    assert "OK: turbo4" in capsys.readouterr().out


def test_overlap_through_negative_index():
    cfg = parse_yaml("overrides:\n  - {layers: \"28-29\", k: {bits: 3}}\n  - {layers: -4, v: {bits: 2}}\n", "n.yaml")
    with pytest.raises(TQConfigError, match=r"overrides\[1\]\.layers: -4 overlaps overrides\[0\] at layer 28"):
        cfg.resolve(32, 128)
    cfg.resolve(40, 128)  # -4 is layer 36 there: no overlap


def test_override_on_boundary_needs_format_tq():
    cfg = parse_yaml("overrides:\n  - {layers: [0, 3], k: {bits: 3}}\n", "b.yaml")
    with pytest.raises(TQConfigError, match=r"overrides\[0\]: changes k/v of layer 0, which is a bf16 boundary layer"):
        cfg.resolve(32, 128)
    plan = parse_yaml("overrides:\n  - {layers: [0, 3], format: tq, k: {bits: 3}}\n", "b.yaml").resolve(32, 128)
    assert all(plan[i].quantized and plan[i].k.bits == 3 and plan[i].v.bits == 4 for i in range(4))


def test_outlier_fraction_resolves_against_head_dim():
    cfg = parse_yaml("defaults:\n  k: {bits: 3, outliers: {fraction: 0.0625, bits: 4}}\n", "f.yaml")
    assert cfg.resolve(6, 128)[2].k.outlier_channels == 8
    with pytest.raises(TQConfigError, match=r"f\.yaml: defaults\.k\.outliers: fraction 0\.0625 gives 4 channels at head_dim 64"):
        cfg.resolve(6, 64)
    frac = parse_yaml("defaults:\n  v: {bits: 2, outliers: {fraction: 0.3, bits: 4}}\n", "g.yaml")
    with pytest.raises(TQConfigError, match=r"0\.3 x head_dim 128 = 38\.4 is not a whole number of channels; "
                                            r"allowed at head_dim 128: 0\.0625, 0\.125, 0\.25, 0\.5"):
        frac.resolve(6, 128)


def test_channel_list_checked_against_head_dim():
    cfg = parse_yaml("defaults:\n  k: {bits: 3, outliers: {channels: 8, bits: 4, "
                     "channel_list: [0, 8, 16, 24, 32, 40, 48, 100]}}\n", "c.yaml")
    assert cfg.resolve(5, 128)[2].k_outlier_channel_list == (0, 8, 16, 24, 32, 40, 48, 100)
    with pytest.raises(TQConfigError, match=r"defaults\.k\.outliers\.channel_list: \[100\] out of range; allowed 0\.\.63"):
        cfg.resolve(5, 64)


# --- resolution -----------------------------------------------------------------------------------
def test_defaults_without_a_file_keep_two_boundary_layers_each_side():
    plan = parse_yaml("name: bare\n", "bare.yaml").resolve(32, 128)
    assert [lp.quantized for lp in plan.layers] == [False] * 2 + [True] * 28 + [False] * 2
    assert plan[5].k == VecFormat(128, 4) and plan[5].v == VecFormat(128, 4)


def test_overrides_by_index_range_and_negative():
    cfg = parse_yaml(textwrap.dedent("""
        boundary: {first: 1, last: 0}
        overrides:
          - layers: 3
            k: {bits: 3}
          - layers: "5-7"
            v: {bits: 2}
          - layers: [8, 9]
            k: {bits: 3, qjl: true}
          - layers: [-3, -2]
            k: {outliers: {channels: 16, bits: 4}, bits: 2}
          - layers: -1
            format: bf16
    """), "o.yaml")
    plan = cfg.resolve(16, 64)
    assert not plan[0].quantized and plan[1].quantized
    assert plan[3].k.bits == 3 and plan[3].v.bits == 4
    assert [plan[i].v.bits for i in (4, 5, 6, 7, 8)] == [4, 2, 2, 2, 4]
    assert plan[8].k == VecFormat(64, 3, qjl=True) and plan[9].k.mse_bits == 2
    assert plan[13].k == VecFormat(64, 2, outlier_channels=16, outlier_bits=4) and plan[14].k.outlier_channels == 16
    assert not plan[15].quantized and plan[12].k == VecFormat(64, 4)


def test_boundary_is_capped_by_layer_count():
    plan = parse_yaml("boundary: {first: 3, last: 3}\n", "cap.yaml").resolve(4, 128)
    assert not any(lp.quantized for lp in plan.layers)
    assert parse_yaml("boundary: {first: 0, last: 0}\n", "z.yaml").resolve(3, 128).quantized_layers == (0, 1, 2)


def test_layer_plan_builds_codecs_with_per_layer_seeds():
    plan = load_config("example_per_layer").resolve(32, 128)
    k4, v4 = plan.codecs(4)
    assert k4.fmt == plan[4].k and k4.rotation.perm is not None
    assert k4.rotation.perm[:: k4.fmt.outlier_stride].tolist() == list(plan[4].k_outlier_channel_list)
    k5, v5 = plan[5].codecs(plan.seed)
    assert not (k5.rotation.signs == v5.rotation.signs).all()
    from tq_kernels.codec import TQCodec
    ref = TQCodec.build(plan[5].v, plan.seed, 5, ROLE_V)
    assert (ref.rotation.signs == v5.rotation.signs).all()
    assert not (TQCodec.build(plan[5].k, plan.seed, 6, ROLE_K).rotation.signs == k5.rotation.signs).all()
    assert plan.codecs(0) == (None, None)


# --- presets and sizes --------------------------------------------------------------------------
def test_presets_ship_and_resolve():
    assert sorted(list_presets()) == sorted(PRESETS)
    assert (presets_dir() / "turbo4.yaml").is_file()
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.name == name
        for layers, hd in ((32, 128), (30, 64)):
            plan = cfg.resolve(layers, hd)
            assert len(plan.layers) == layers and plan.compression_ratio() > 2.5


def test_default_preset_and_env_name():
    assert load_config(None).name == "turbo4" and load_config("").name == "turbo4"
    assert load_config("turbo3.yaml").name == "turbo3"
    assert CONFIG_ENV == "SGLANG_TQ_CONFIG"


@pytest.mark.parametrize("name,per_head", [("turbo4", 132), ("turbo3", 100), ("k4v2", 100), ("turbo2", 68),
                                            ("turbo3.5", 108), ("prod3", 102), ("k5v4", 148)])
def test_preset_bytes_match_their_comment(name, per_head):
    plan = load_config(name).resolve(32, 128)
    assert plan[10].bytes_per_token_head(128, 128) == per_head
    header = (presets_dir() / f"{name}.yaml").read_text().splitlines()[0]
    assert f"{per_head} B/token-head at d=128" in header and f"{512 / per_head:.2f}x" in header


def test_llama3_8b_all_layers_k4v4():
    cfg = parse_yaml("boundary: {first: 0, last: 0}\n", "all.yaml")
    total = bytes_per_token(cfg, **LLAMA3_8B)
    assert total == 32 * 8 * 132
    assert f"{32 * 8 * 512 / total:.2f}" == "3.88"


def test_llama3_8b_turbo4_with_boundary():
    plan = load_config("turbo4").resolve(32, 128)
    per_head = 31 * 132 + 512  # the first layer bf16
    assert bytes_per_token(plan, **LLAMA3_8B) == 8 * per_head == 36832
    assert plan.compression_ratio() == pytest.approx(32 * 512 / per_head)
    assert f"{plan.compression_ratio():.2f}" == "3.56"
    two = load_config(str(presets_dir() / "examples" / "turbo4_boundary2.yaml")).resolve(32, 128)
    assert bytes_per_token(two, **LLAMA3_8B) == 8 * (28 * 132 + 4 * 512) == 45952
    with pytest.raises(TQConfigError, match="was resolved for"):
        bytes_per_token(plan, 30, 8, 128)


def test_fp8_boundary_and_override_layers():
    """format: fp8 (boundary or override): head_dim bytes per K or V vector, no codecs, shown as fp8."""
    plan = load_config(str(presets_dir() / "examples" / "turbo4_fp8_boundary.yaml")).resolve(32, 128)
    assert plan[0].format == "fp8" and not plan[0].quantized and plan[0].codecs(0) == (None, None)
    assert plan[0].bytes_per_token_head(128, 128) == 256 and plan[0].describe() == ("fp8", "fp8")
    assert all(plan[i].quantized and plan[i].format == "tq" for i in range(1, 32))
    per_head = 31 * 132 + 256
    assert bytes_per_token(plan, **LLAMA3_8B) == 8 * per_head == 34784
    assert f"{plan.compression_ratio():.3f}" == "3.768"  # bf16 first layer: 3.56x (above)
    rows = [line.split() for line in plan.summary(8).splitlines()]
    assert ["0", "fp8", "fp8", "2048", "2.00x"] in rows
    cfg = parse_yaml("boundary: {first: 1, last: 1, format: fp8}\noverrides:\n  - {layers: 2, format: fp8}\n"
                     "  - {layers: 3, format: bf16}\n  - {layers: -1, format: tq, k: {bits: 3}}\n", "f.yaml")
    plan = cfg.resolve(6, 64, v_head_dim=128)
    assert [lp.format for lp in plan.layers] == ["fp8", "tq", "fp8", "bf16", "tq", "tq"]
    assert plan[2].bytes_per_token_head(64, 128) == 64 + 128 and plan[3].bytes_per_token_head(64, 128) == 384
    assert plan[5].k.bits == 3
    with pytest.raises(TQConfigError, match=r"overrides\[0\]: changes k/v of layer 0, which is a fp8 boundary layer"):
        parse_yaml("boundary: {format: fp8}\noverrides:\n  - {layers: [0, 3], k: {bits: 3}}\n", "b.yaml").resolve(32, 128)


def test_v_head_dim_counts_separately():
    plan = load_config("turbo4").resolve(4, 128, v_head_dim=64)
    assert plan.bytes_per_token(1) == (256 + 128) + 3 * (66 + 34)  # layer 0 bf16, then K4 d128 + V4 d64
    plan = parse_yaml("boundary: {first: 0, last: 0}\n", "v.yaml").resolve(2, 128, v_head_dim=64)
    assert plan.bytes_per_token(2) == 2 * 2 * (66 + 34)


# --- CLI ----------------------------------------------------------------------------------------
def test_cli_summary_groups_layers(capsys):
    assert cli.main(["summary", "turbo4", "--layers", "32", "--kv-heads", "8", "--head-dim", "128"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    assert ["0", "bf16", "bf16", "4096", "1.00x"] in rows
    assert ["1-31", "MSE4/nc", "MSE4/nc", "1056", "3.88x"] in rows
    assert "total: 36832 B/token (bf16 131072 B/token), compression 3.56x, 31/32 layers quantized" in out


def test_cli_validate(tmp_path, capsys):
    assert cli.main(["validate", "example_per_layer", "--layers", "32", "--head-dim", "128"]) == 0
    assert "OK: example_per_layer" in capsys.readouterr().out
    bad = write(tmp_path, "defaults:\n  k: {bits: 9}\n", "bad.yaml")
    assert cli.main(["validate", str(bad)]) == 2
    assert "bad.yaml: defaults.k.bits: 9 is out of range" in capsys.readouterr().err
    assert cli.main(["validate", "turbo4", "--layers", "32", "--head-dim", "72"]) == 2
    assert "head_dim 72 is not supported" in capsys.readouterr().err


def test_cli_distortion_small(capsys):
    assert cli.main(["distortion", "--samples", "4000", "--dims", "64", "--bits", "2", "3", "--queries", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    mse = [line.split() for line in lines if line.split()[:2] in (["64", "2"], ["64", "3"])]
    assert len(mse) == 4  # two MSE rows, two PROD rows
    for d, b, measured, optimum, ratio, bound in mse[:2]:
        assert abs(float(ratio) - 1) < 0.05 and float(measured) < float(bound)


def test_cli_as_module_and_console_entry():
    out = subprocess.run([sys.executable, "-m", "sglang_tq", "validate", "prod3"], capture_output=True, text=True)
    assert out.returncode == 0 and "OK: prod3" in out.stdout



def test_cli_unknown_config(capsys):
    assert cli.main(["summary", "nope", "--layers", "2", "--kv-heads", "1", "--head-dim", "64"]) == 2
    assert "nope: no such config file or preset" in capsys.readouterr().err


def test_package_imports_without_sglang():
    code = "import sys, sglang_tq, sglang_tq.config, sglang_tq.cli; assert 'sglang' not in sys.modules; print(sglang_tq.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.1.0"


# --- key centering (key_means) -------------------------------------------------------------------
def _save_means(path, t):
    import torch

    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({"key_means": t.contiguous()}, str(path))
    else:
        torch.save({"key_means": t}, str(path))
    return path


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_key_means_relative_to_yaml_and_resolved(tmp_path, ext):
    import torch

    sub = tmp_path / "cfgs"
    sub.mkdir()
    means = torch.randn(6, 4, 64)
    _save_means(sub / f"m{ext}", means)
    path = write(sub, f"boundary: {{first: 1, last: 1}}\nkey_means: m{ext}\n")
    cfg = load_config(str(path))
    assert cfg.key_means == str((sub / f"m{ext}").resolve())
    plan = cfg.resolve(6, 64, num_kv_heads=4)
    assert plan.key_means_path == cfg.key_means
    assert torch.equal(plan.key_means, means)
    assert plan.layer_key_mean(0) is None  # bf16 boundary layer: never centered
    assert torch.equal(plan.layer_key_mean(2), means[2])
    assert torch.equal(plan.layer_key_mean(3, slice(2, 4)), means[3, 2:4])
    assert "key centering" in plan.summary(4)
    # without num_kv_heads only layers and head_dim are checked
    assert cfg.resolve(6, 64).key_means is not None


def test_key_means_absolute_path_and_no_means(tmp_path):
    import torch

    p = _save_means(tmp_path / "abs.pt", torch.zeros(4, 2, 128))
    cfg = parse_yaml(f"boundary: {{first: 1, last: 1}}\nkey_means: {p}\n", str(tmp_path / "elsewhere" / "x.yaml"))
    assert cfg.resolve(4, 128, num_kv_heads=2).key_means.shape == (4, 2, 128)
    plain = parse_yaml("seed: 1\n", "x.yaml").resolve(4, 128)
    assert plain.key_means is None and plain.layer_key_mean(2) is None


def test_key_means_missing_file(tmp_path):
    path = write(tmp_path, "key_means: nowhere.safetensors\n")
    with pytest.raises(TQConfigError) as err:
        load_config(str(path))
    msg = str(err.value)
    assert "key_means" in msg and "nowhere.safetensors" in msg and "no such file" in msg


@pytest.mark.parametrize("shape,resolve_args,fragment", [
    ((5, 4, 64), (6, 64, None, 4), "[5, 4, 64]"),     # wrong layer count
    ((6, 4, 128), (6, 64, None, 4), "[6, 4, 128]"),   # wrong head_dim
    ((6, 2, 64), (6, 64, None, 4), "[6, 2, 64]"),     # wrong KV head count
    ((6, 64), (6, 64, None, 4), "[6, 64]"),           # not 3-D
])
def test_key_means_wrong_shape(tmp_path, shape, resolve_args, fragment):
    import torch

    _save_means(tmp_path / "m.safetensors", torch.zeros(shape))
    cfg = load_config(str(write(tmp_path, "key_means: m.safetensors\n")))
    with pytest.raises(TQConfigError) as err:
        cfg.resolve(*resolve_args)
    msg = str(err.value)
    assert "key_means" in msg and fragment in msg and "expected" in msg


def test_key_means_bad_contents(tmp_path):
    import torch

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    cfg = load_config(str(write(tmp_path, "key_means: junk.safetensors\n")))
    with pytest.raises(TQConfigError, match="cannot load"):
        cfg.resolve(4, 64)
    torch.save({"other": torch.zeros(4, 2, 64)}, str(tmp_path / "other.pt"))
    cfg = load_config(str(write(tmp_path, "key_means: other.pt\n", "c2.yaml")))
    with pytest.raises(TQConfigError, match="expected a tensor 'key_means'"):
        cfg.resolve(4, 64)
    with pytest.raises(TQConfigError, match="key_means"):
        parse_yaml("key_means: 3\n", "x.yaml")


@pytest.mark.parametrize("name, n_quantized, avg_bits", [("calibrated_smollm2", 26, 3.0),
                                                         ("calibrated4_smollm2", 29, 4.0)])
def test_calibrated_example_config_loads_with_its_key_means(name, n_quantized, avg_bits):
    """configs/examples/calibrated*_smollm2.yaml (outputs of scripts/calibrate.py) resolve for the model
    they were made for, find their key-means files next to them, and average their target code bits
    over quantized layers (the 4-bit plan: exactly turbo4's bytes)."""
    pytest.importorskip("safetensors")
    path = Path(__file__).resolve().parent.parent / "configs" / "examples" / f"{name}.yaml"
    plan = load_config(str(path)).resolve(30, 64, num_kv_heads=3)
    q = [plan[i] for i in plan.quantized_layers]
    assert len(q) == n_quantized and plan.key_means is not None and tuple(plan.key_means.shape) == (30, 3, 64)
    assert sum(lp.k.bits + lp.v.bits for lp in q) / (2 * len(q)) == avg_bits
    if avg_bits == 4.0:
        assert plan.bytes_per_token(3) == load_config("turbo4").resolve(30, 64).bytes_per_token(3)


def test_calibrated_window_example_config():
    """configs/examples/calibrated3_window_smollm2.yaml (scripts/calibrate.py --recent 32)
    resolves for SmolLM2's shape with its 32-token window, 26 quantized layers averaging 3.00 code bits:
    the bytes of uniform 3-bit codes on the same layers."""
    path = Path(__file__).resolve().parent.parent / "configs" / "examples" / "calibrated3_window_smollm2.yaml"
    plan = load_config(str(path)).resolve(30, 64, num_kv_heads=3)
    q = [plan[i] for i in plan.quantized_layers]
    assert len(q) == 26 and plan.key_means is None and plan.window_tokens == 32
    assert sum(lp.k.bits + lp.v.bits for lp in q) / (2 * len(q)) == 3.0
    uniform = parse_yaml("defaults: {k: {bits: 3}, v: {bits: 3}}\nboundary: {first: 2, last: 2}\n", "u.yaml")
    assert plan.bytes_per_token(3) == uniform.resolve(30, 64).bytes_per_token(3)


def test_window_in_presets_plan_and_summary():
    """Every preset keeps a 32-token window; the plan carries it and the summary prints its ring."""
    from sglang_tq.config import summary_table

    for name in list_presets():
        plan = load_config(name).resolve(32, 128)
        assert (plan.window_tokens, plan.window_requests) == (32, 256), name
        n_q = len(plan.quantized_layers)
        assert plan.window_bytes(8) == 256 * 32 * n_q * 8 * 2 * (128 + 128)
    plan = load_config("turbo4").resolve(32, 128)
    assert "recent window: the last 32 tokens" in summary_table(plan, 8)
    assert "key centering: auto (mean keys measured at start-up by a probe prefill)" in summary_table(plan, 8)
    assert parse_yaml("window: {tokens: 0}\n", "w.yaml").window_tokens == 0


def test_evaluation_prefill_from_cache(tmp_path):
    """evaluation.prefill_from_cache reaches the resolved plan and its summary; off unless set."""
    off = load_config(str(write(tmp_path, "defaults:\n  k: {bits: 4}\n", "off.yaml"))).resolve(8, 128)
    assert off.prefill_from_cache is False and "prefill_from_cache" not in off.summary(8)
    on = load_config(str(write(tmp_path, "evaluation: {prefill_from_cache: true}\n", "on.yaml"))).resolve(8, 128)
    assert on.prefill_from_cache is True and "prefill_from_cache" in on.summary(8)


def test_first_token_default_exact_in_every_preset(tmp_path):
    """first_token is exact unless the config says codes, in every shipped preset (the quality default needs no
    calibration file); it reaches the resolved plan and its summary."""
    from sglang_tq.config import list_presets

    for name in list_presets():
        assert load_config(name).first_token == "exact", name
    plan = load_config(str(write(tmp_path, "defaults:\n  k: {bits: 4}\n", "d.yaml"))).resolve(8, 128)
    assert plan.first_token == "exact" and "first token: exact" in plan.summary(8)
    codes = load_config(str(write(tmp_path, "first_token: codes\n", "c.yaml"))).resolve(8, 128)
    assert codes.first_token == "codes" and "first token" not in codes.summary(8)


@pytest.mark.parametrize("ref", ["turbo4", "examples/calibrated_smollm2.yaml"])
def test_gpu_server_check_evaluation_copy(tmp_path, ref):
    """scripts/gpu_server_check.py serves perplexity runs from a copy of the config with
    evaluation.prefill_from_cache on; the copy loads from its own folder (key_means made absolute) and
    keeps every other key."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    gpu_server_check = pytest.importorskip("gpu_server_check")

    configs = Path(__file__).resolve().parent.parent / "configs"
    src = ref if not ref.endswith(".yaml") else str(configs / ref)
    args = ["--attention-backend", "turboquant", "--tq-config", src, "--disable-cuda-graph"]
    new = gpu_server_check.with_evaluation(args, str(tmp_path))
    assert new[:3] + new[4:] == args[:3] + args[4:] and os.path.dirname(new[3]) == str(tmp_path)
    plan = load_config(new[3]).resolve(30, 64, num_kv_heads=3)
    base = load_config(src).resolve(30, 64, num_kv_heads=3)
    assert plan.prefill_from_cache and not base.prefill_from_cache
    assert plan.layers == base.layers and plan.window_tokens == base.window_tokens
    assert plan.key_means_path == base.key_means_path
    assert gpu_server_check.with_evaluation(["--attention-backend", "triton"], str(tmp_path)) == ["--attention-backend", "triton"]


# --- hybrid models: sliding-window layers and linear-attention hybrids ---------------------------
GPT_OSS_SLIDING = tuple(range(0, 24, 2))  # gpt-oss-20b: sliding-window layers 0, 2, ..., full layers 1, 3, ...


def test_sliding_layers_default_to_tq_and_can_be_bf16_or_fp8(tmp_path):
    """Sliding-window layers are packed like every other layer unless `sliding.format` says otherwise;
    the boundary and overrides take precedence over it."""
    plan = load_config("turbo4").resolve(24, 64, sliding_layers=GPT_OSS_SLIDING)
    assert plan.layers[0].format == "bf16" and all(plan.layers[i].quantized for i in range(1, 24))
    assert plan.sliding_layers == GPT_OSS_SLIDING
    path = write(tmp_path, """
        boundary: {first: 0, last: 1}
        sliding: {format: bf16}
        overrides:
          - {layers: 4, format: tq, k: {bits: 3}}
          - {layers: 6, format: fp8}
        """)
    plan = load_config(str(path)).resolve(24, 64, sliding_layers=GPT_OSS_SLIDING)
    fmts = [lp.format for lp in plan.layers]
    assert fmts[0] == fmts[2] == "bf16" and fmts[6] == "fp8" and fmts[4] == "tq" and plan.layers[4].k.bits == 3
    assert all(fmts[i] == "tq" for i in range(1, 23, 2)) and fmts[23] == "bf16"  # the last layer: boundary
    assert "sliding-window layers: 0, 2, 4" in plan.summary(8)


def test_override_of_a_bf16_sliding_layer_needs_format_tq(tmp_path):
    path = write(tmp_path, "boundary: {first: 0, last: 0}\nsliding: {format: bf16}\noverrides:\n  - {layers: 2, k: {bits: 3}}\n")
    with pytest.raises(TQConfigError, match=r"overrides\[0\]: changes k/v of layer 2, which is a bf16 sliding-window layer"):
        load_config(str(path)).resolve(24, 64, sliding_layers=GPT_OSS_SLIDING)


QWEN3_NEXT_ATTN = (3, 7, 11, 15)  # 16 layers, every 4th one full attention


def test_linear_hybrid_plan_counts_attention_layers_only():
    """Recurrent layers hold no KV: no bytes, format `none`; the boundary is the first attention layer;
    bf16 bytes and the compression ratio are over the attention layers."""
    plan = load_config("turbo4").resolve(16, 256, attention_layers=QWEN3_NEXT_ATTN)
    assert plan.attention_layers == QWEN3_NEXT_ATTN
    assert [lp.format for lp in plan.layers if lp.layer_id not in QWEN3_NEXT_ATTN] == ["none"] * 12
    assert plan.layers[3].format == "bf16" and plan.quantized_layers == (7, 11, 15)
    assert plan.bytes_per_token(2) == plan.layers_bytes_per_token(2, QWEN3_NEXT_ATTN)
    assert plan.bf16_bytes_per_token(2) == 2 * 4 * 2 * 256 * 2
    out = plan.summary(2)
    assert "no KV (recurrent)" in out and "3/4 layers quantized (the attention layers)" in out


def test_linear_hybrid_override_on_a_recurrent_layer_names_it(tmp_path):
    path = write(tmp_path, "overrides:\n  - {layers: 5, format: bf16}\n")
    with pytest.raises(TQConfigError) as err:
        load_config(str(path)).resolve(16, 256, attention_layers=QWEN3_NEXT_ATTN)
    msg = str(err.value)
    for fragment in (str(path), "overrides[0].layers", "layer 5 is a recurrent", "3, 7, 11, 15"):
        assert fragment in msg, msg
    path = write(tmp_path, "overrides:\n  - {layers: \"4-6\", format: bf16}\n", "range.yaml")
    with pytest.raises(TQConfigError, match=r"layers 4-6 are recurrent"):
        load_config(str(path)).resolve(16, 256, attention_layers=QWEN3_NEXT_ATTN)


def test_linear_hybrid_range_applies_to_its_attention_layers(tmp_path):
    path = write(tmp_path, "boundary: {first: 0, last: 0}\noverrides:\n  - {layers: \"0-8\", k: {bits: 3}}\n")
    plan = load_config(str(path)).resolve(16, 256, attention_layers=QWEN3_NEXT_ATTN)
    assert [plan.layers[i].k.bits for i in QWEN3_NEXT_ATTN] == [3, 3, 4, 4]


def test_attention_layers_out_of_range():
    with pytest.raises(TQConfigError, match=r"attention layers \[16\] are past its 16 layers"):
        load_config("turbo4").resolve(16, 256, attention_layers=(3, 16))


def test_cli_summary_of_a_linear_hybrid(capsys):
    assert cli.main(["summary", "turbo4", "--layers", "16", "--kv-heads", "2", "--head-dim", "256",
                     "--attention-layers", "3,7,11,15"]) == 0
    out = capsys.readouterr().out
    assert "no KV (recurrent)" in out and "3/4 layers quantized (the attention layers)" in out
    assert cli.main(["validate", "turbo4", "--layers", "24", "--head-dim", "64", "--sliding-layers", "0-22"]) == 0


# --- CLI: exit codes and messages for bad input --------------------------------------------------
@pytest.mark.parametrize("argv, fragments", [
    (["validate", "trubo4"], ["trubo4: no such config file or preset", "did you mean 'turbo4'"]),
    (["validate", "turbo4", "--layers", "4"], ["give both --layers and --head-dim"]),
    (["validate", "turbo4", "--sliding-layers", "0-3"], ["--sliding-layers describe a model", "give --layers"]),
    (["validate", "turbo4", "--layers", "32", "--head-dim", "72"], ["head_dim 72 is not supported"]),
    (["validate", "turbo4", "--layers", "0", "--head-dim", "128"], ["num_layers=0", "expected an integer >= 1"]),
    (["summary", "turbo4", "--layers", "32", "--kv-heads", "2", "--head-dim", "128", "--attention-layers", "3,40"],
     ["attention layers [40] are past its 32 layers"]),
    (["summary", "boundary_past.yaml", "--layers", "8", "--kv-heads", "2", "--head-dim", "64"],
     ["overrides[0].layers: layer 9 is past the model's 8 layers", "allowed -8..7"]),
])
def test_cli_bad_input_exits_2(tmp_path, monkeypatch, capsys, argv, fragments):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "overrides:\n  - {layers: 9, format: bf16}\n", "boundary_past.yaml")
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    for fragment in fragments:
        assert fragment in captured.err, (fragment, captured.err)


@pytest.mark.parametrize("argv, fragment", [
    (["summary", "turbo4", "--layers", "32", "--kv-heads", "0", "--head-dim", "128"], "'0': expected an integer >= 1"),
    (["summary", "turbo4", "--layers", "32", "--kv-heads", "x", "--head-dim", "128"], "'x': expected an integer >= 1"),
    (["summary", "turbo4", "--layers", "8", "--kv-heads", "2", "--head-dim", "64", "--attention-layers", "5-3"],
     "range '5-3' runs backwards"),
    (["summary", "turbo4", "--layers", "8", "--kv-heads", "2", "--head-dim", "64", "--sliding-layers", "-1"],
     "'-1' is not a layer id or range"),
    (["validate", "turbo4", "--kv-heads", "-2"], "'-2': expected an integer >= 1"),
])
def test_cli_bad_arguments_exit_2(capsys, argv, fragment):
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    assert ei.value.code == 2
    assert fragment in capsys.readouterr().err


def test_cli_key_means_checked_without_and_with_a_model_shape(tmp_path, capsys):
    _save_means(tmp_path / "m.safetensors", torch.zeros(8, 2, 64))
    cfg = str(write(tmp_path, "key_means: m.safetensors\n"))
    assert cli.main(["validate", cfg]) == 0
    assert "key_means [8, 2, 64]" in capsys.readouterr().out
    assert cli.main(["validate", cfg, "--kv-heads", "4"]) == 2
    assert "key_means" in capsys.readouterr().err
    # the head count reaches the shape check of summary and validate with a model shape
    assert cli.main(["summary", cfg, "--layers", "8", "--kv-heads", "4", "--head-dim", "64"]) == 2
    err = capsys.readouterr().err
    assert "cfg.yaml: key_means" in err and "[8, 2, 64] does not fit the model; expected [8, 4, 64]" in err
    assert cli.main(["validate", cfg, "--layers", "6", "--head-dim", "64"]) == 2
    assert "expected [6, num_kv_heads, 64]" in capsys.readouterr().err
    (tmp_path / "m.safetensors").write_bytes(b"junk")  # a broken file fails validate without a model shape too
    assert cli.main(["validate", cfg]) == 2
    assert "m.safetensors: cannot load" in capsys.readouterr().err


def test_cli_summary_of_a_plan_without_quantized_layers(capsys):
    assert cli.main(["summary", "turbo4", "--layers", "1", "--kv-heads", "2", "--head-dim", "64"]) == 0
    out = capsys.readouterr().out
    assert "0/1 layers quantized" in out and "recent window" not in out  # no ring without a quantized layer


# --- main process: config keys that contradict the server arguments or the model ----------------
def _main_process_check(tmp_path, yaml_text, mc=None, **server_kw):
    """compat.check_server_args as ServerArgs.__post_init__ runs it, with the config as SGLANG_TQ_CONFIG."""
    pytest.importorskip("sglang")
    from sglang_fakes import FakeModelConfig, env, server_args
    from sglang_tq.compat import check_server_args

    sa = server_args(**server_kw)
    sa.model_path = "some/model"
    mc = mc or FakeModelConfig(8, 4, 2, 64)
    sa.get_model_config = lambda: mc
    with env(SGLANG_TQ_CONFIG=str(write(tmp_path, yaml_text, "main.yaml"))):
        return check_server_args(sa)


NGRAM = dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=12)


@pytest.mark.parametrize("yaml_text, server_kw, fragments", [
    ("window: {tokens: 8}\n", NGRAM, ["main.yaml: window.tokens: 8 is narrower than --speculative-num-draft-tokens 12",
                                     "0 (off) or >= 12"]),
    ("evaluation: {prefill_from_cache: true}\n", NGRAM,
     ["main.yaml: evaluation.prefill_from_cache: true does not combine with --speculative-algorithm NGRAM",
      "allowed there: false"]),
    ("window: {tokens: 8}\nevaluation: {prefill_from_cache: true}\n", NGRAM,
     ["main.yaml:\n  - window.tokens: 8", "\n  - evaluation.prefill_from_cache"]),
    ("overrides:\n  - {layers: \"6-9\", k: {bits: 3}}\n", {}, ["main.yaml: overrides[0].layers: layer 9 is past the "
                                                             "model's 8 layers"]),
    ("key_means: m.safetensors\n", {}, ["main.yaml: key_means", "[8, 3, 64] does not fit the model; expected [8, 2, 64]"]),
    ("key_means: l.safetensors\n", {}, ["main.yaml: key_means", "[6, 2, 64] does not fit the model; expected [8, 2, 64]"]),
])
def test_main_process_refuses_contradictions(tmp_path, yaml_text, server_kw, fragments):
    _save_means(tmp_path / "m.safetensors", torch.zeros(8, 3, 64))
    _save_means(tmp_path / "l.safetensors", torch.zeros(6, 2, 64))
    with pytest.raises(TQConfigError) as err:
        _main_process_check(tmp_path, yaml_text, **server_kw)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_main_process_accepts_what_fits(tmp_path):
    _save_means(tmp_path / "m.safetensors", torch.zeros(8, 2, 64))
    assert _main_process_check(tmp_path, "window: {tokens: 12}\nkey_means: m.safetensors\n", **NGRAM).window_tokens == 12
    # no quantized layer: the window is never built, so the draft tokens do not matter
    assert _main_process_check(tmp_path, "boundary: {first: 8}\nwindow: {tokens: 8}\n", **NGRAM) is not None
    assert _main_process_check(tmp_path, "window: {tokens: 8}\n").window_tokens == 8  # no speculative decoding


def test_main_process_key_means_with_logit_softcapping(tmp_path):
    pytest.importorskip("sglang")
    from sglang_fakes import FakeModelConfig

    _save_means(tmp_path / "m.safetensors", torch.zeros(8, 2, 64))
    mc = FakeModelConfig(8, 4, 2, 64)
    mc.hf_text_config.attn_logit_softcapping = 50.0
    with pytest.raises(TQConfigError) as err:
        _main_process_check(tmp_path, "key_means: m.safetensors\n", mc)
    msg = str(err.value)
    assert "main.yaml: key_means: " in msg and "m.safetensors" in msg and "softcapping at 50" in msg
    assert "allowed for this model: no key_means" in msg
    # auto (every preset) serves such a model: the start-up probe leaves its keys uncentered
    assert _main_process_check(tmp_path, "key_means: auto\n", mc).key_means_path == "auto"
    mc.hf_text_config.attn_logit_softcapping = None
    assert _main_process_check(tmp_path, "key_means: m.safetensors\n", mc).key_means is not None


def test_binary_file_is_not_a_config(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xad\x00\xff" * 20)
    with pytest.raises(TQConfigError, match=r"bin\.yaml: not a text file \(byte 0 is not UTF-8\)"):
        load_config(str(tmp_path / "bin.yaml"))


def test_key_means_file_without_a_quantized_layer(tmp_path):
    """A key-means file on a plan that quantizes no layer would center nothing: refused, not ignored."""
    _save_means(tmp_path / "m.safetensors", torch.zeros(4, 2, 64))
    cfg = load_config(str(write(tmp_path, "boundary: {first: 2, last: 2, format: fp8}\nkey_means: m.safetensors\n")))
    with pytest.raises(TQConfigError) as err:
        cfg.resolve(4, 64, num_kv_heads=2)
    msg = str(err.value)
    assert "cfg.yaml: key_means: " in msg and "no layer of this 4-layer model is quantized" in msg
    assert "every attention layer fp8" in msg and "or no key_means" in msg
    one_tq = load_config(str(write(tmp_path, "boundary: {first: 2, last: 1}\nkey_means: m.safetensors\n", "c2.yaml")))
    assert one_tq.resolve(4, 64, num_kv_heads=2).quantized_layers == (2,)
    assert load_config("turbo4").resolve(1, 64).key_means_path == "auto"  # auto: nothing to read, nothing refused


@pytest.mark.parametrize("argv", [["--tq-config="], ["--tq-config", ""], ["--tq-config", "--port", "1"], ["--tq-config"]])
def test_config_flag_needs_a_value(argv):
    with pytest.raises(TQConfigError, match="--tq-config=? needs a value"):
        cli.pop_flag(argv, "--tq-config")


def test_env_config_errors_name_the_variable(tmp_path, monkeypatch):
    from sglang_tq.config import load_env_config

    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "gone.yaml"))
    with pytest.raises(TQConfigError) as err:
        load_env_config()
    assert "gone.yaml: no such file" in str(err.value) and f"[from {CONFIG_ENV}={tmp_path / 'gone.yaml'}]" in str(err.value)
    monkeypatch.setenv(CONFIG_ENV, "turbo3")
    assert load_env_config().name == "turbo3"
    monkeypatch.delenv(CONFIG_ENV)
    assert load_env_config().name == "turbo4"


@pytest.mark.parametrize("yaml_text, fragment", [
    ("defaults:\n  k: {bitz: 3}\n", "launch.yaml: defaults.k.bitz: unknown key 'bitz'; did you mean 'bits'?"),
    ("overrides:\n  - {layers: 40, format: bf16}\n", "launch.yaml: overrides[0].layers: layer 40 is past the model's 32"),
])
def test_launcher_exits_2_before_weights(tmp_path, monkeypatch, capsys, yaml_text, fragment):
    """The launcher stops on a bad config with one line on stderr and exit code 2 (the model folder holds
    config.json only: nothing could have been loaded)."""
    pytest.importorskip("sglang")
    from sglang_fakes import write_hf_config
    from sglang_tq import launch_server as ls

    monkeypatch.setenv(CONFIG_ENV, "turbo4")  # restored after the test: the launcher exports --tq-config there
    cfg = write(tmp_path, yaml_text, "launch.yaml")
    with pytest.raises(SystemExit) as ei:
        ls.main(["--model-path", write_hf_config(tmp_path), "--device", "cpu", "--tq-config", str(cfg)])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sglang_tq: error: ") and fragment in err
