"""scripts/make_tables.py: the committed tables match results/*.json; rendering and input errors."""
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_tables as mt  # noqa: E402

BEFORE_AFTER = {
    "change": "stage 1 rewritten", "point": "K4V4 B=32 32K", "bench": "decode", "codec": "K4V4", "h_q": 32, "h_kv": 8, "head_dim": 128,
    "batch": 32, "context": 32768, "new_tokens": None, "before_us": 605.1, "after_us": 598.0,
    "change_pct": -1.17, "card": "NVIDIA H100 80GB HBM3", "date": "2026-12-07", "commit_before": "aaaaaaa",
    "commit_after": "bbbbbbb", "command": "python scripts/bench_kernels.py --batch 32 --ctx 32768",
}


def test_committed_tables_are_current():
    assert mt.main(["--check"]) == 0, "run: python scripts/make_tables.py"


def test_results_are_json_only_and_small():
    files = [p for p in (ROOT / "results").rglob("*") if p.is_file()]
    assert files and all(p.suffix == ".json" for p in files), [str(p) for p in files if p.suffix != ".json"]
    assert sum(p.stat().st_size for p in files) <= 2 * 1024 * 1024


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "docs").mkdir()
    shutil.copytree(ROOT / "results", tmp_path / "results")
    for name in ("README.md", "docs/RESULTS.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_before_after_table(repo):
    (repo / "results" / "before_after.json").write_text("[]")
    assert "before/after" not in mt.results_md(mt.load(repo / "results"))  # empty list: no section
    (repo / "results" / "before_after.json").write_text(json.dumps([BEFORE_AFTER]))
    assert mt.main(["--check", "--root", str(repo)]) == 1  # the JSON changed, the file did not
    assert mt.main(["--root", str(repo)]) == 0
    text = (repo / "docs" / "RESULTS.md").read_text()
    section = text[text.index("## Kernel changes, before/after"):]
    assert "**stage 1 rewritten** — " in section and "commits `aaaaaaa` → `bbbbbbb`" in section and "NVIDIA H100 80GB HBM3, 2026-12-07" in section
    assert "| K4V4 B=32 32K | decode | K4V4 | (32, 8, 128) | 32 | 32K | — | 605.1 | 598.0 | -1.2 % |" in section
    assert mt.main(["--check", "--root", str(repo)]) == 0
    assert text.count(mt.BEGIN) == 1 and text.endswith((ROOT / "docs" / "RESULTS.md").read_text().split(mt.END)[1])


def test_check_detects_hand_edits(repo, capsys):
    readme = repo / "README.md"
    readme.write_text(readme.read_text().replace("| decode, K4V4", "| decode (edited), K4V4", 1))
    assert mt.main(["--check", "--root", str(repo)]) == 1
    assert "README.md" in capsys.readouterr().err


def test_serving_ratios_only_on_one_card():
    """Ratios against BF16 fa3 and the fastest FP8 only within one run on one card (card, GPU, date,
    commit); never across cards; a config that did not start shows its reason."""
    rec = dict(workload="b", config="turbo4", backend="turboquant", kv_dtype="turbo4", clients=8, isl=1024, osl=256,
               output_tok_s=110.0, spread=None, reps=1, ttft_p50_ms=1.0, tpot_p99_ms=None, max_total_num_tokens=10,
               card="H (GPU 0 of 2)", gpu_uuid="GPU-a", date="d", commit="c", command="x")
    base = dict(rec, config="bf16_fa3", backend="fa3", kv_dtype="bf16", output_tok_s=100.0)
    fp8 = [dict(rec, config="fp8_fa3", backend="fa3", kv_dtype="fp8_e4m3", output_tok_s=50.0),
           dict(rec, config="fp8_flashinfer", backend="flashinfer", kv_dtype="fp8_e4m3", output_tok_s=55.0)]
    same = "\n".join(mt.serving_section([rec, base] + fp8))
    assert "| 1.100× | 2.000× |" in same   # vs BF16 fa3, vs the faster FP8 (flashinfer)
    triton = dict(base, config="bf16_triton", backend="triton")
    assert "1.100×" not in "\n".join(mt.serving_section([rec, triton]))  # only fa3 is the BF16 reference
    for other in (dict(base, card="H (GPU 1 of 2)"), dict(base, gpu_uuid="GPU-b"), dict(base, date="e"),
                  dict(base, commit="c2")):
        text = "\n".join(mt.serving_section([rec, other]))
        assert "1.100×" not in text and "×" not in text.split("| ---")[-1]
    failed = dict(base, output_tok_s=None, reps=0, skipped="server bf16_fa3_r1 did not start: FA3")
    text = "\n".join(mt.serving_section([rec, failed]))
    assert "did not start" in text and "×" not in text.split("| ---")[-1]


@pytest.mark.parametrize("edit, message", [
    (lambda recs: recs[0].pop("card"), "record 0: missing key(s) card"),
    (lambda recs: recs[1].update(bench="prefill"), "record 1: bench: 'prefill' is not allowed"),
])
def test_bad_records_are_named(repo, capsys, edit, message):
    path = repo / "results" / "kernels.json"
    recs = json.loads(path.read_text())
    edit(recs)
    path.write_text(json.dumps(recs))
    assert mt.main(["--check", "--root", str(repo)]) == 2
    err = capsys.readouterr().err
    assert "kernels.json" in err and message in err


def test_markers_required(repo, capsys):
    (repo / "README.md").write_text("no markers\n")
    assert mt.main(["--check", "--root", str(repo)]) == 2
    assert "README.md: needs exactly one" in capsys.readouterr().err


MODEL = dict(model="gpt-oss-20b shape, 4 layers (dummy weights)", layout="swa+sinks", memory="hybrid SWA pools",
             config="turbo4", served=True, graphs_identical=True, graphs_detail="6/6 prompts", capacity_ratio=2.31,
             byte_ratio=2.33, expected_ratio=2.32, quality_metric="mean |Δ log p| vs BF16", quality_delta=0.0012,
             card="NVIDIA H100 80GB HBM3", date="2026-12-08", commit="ccccccc", command="bash scripts/gpu_models.sh")


def test_models_table_and_readme_families(repo):
    """results/models.json renders as a table in RESULTS.md and into the README's family list (the family
    of the record's layout); families without records say so."""
    data = mt.load(repo / "results")
    assert "Not yet measured on a GPU." in mt.results_md(data)
    (repo / "results" / "models.json").write_text(json.dumps([MODEL]))
    assert mt.main(["--root", str(repo)]) == 0
    results = (repo / "docs" / "RESULTS.md").read_text()
    assert ("| gpt-oss-20b shape, 4 layers (dummy weights) | swa+sinks | hybrid SWA pools | `turbo4` | yes | "
            "identical (6/6 prompts) | 2.310× (bytes 2.330×, -0.43 %) | 0.0012 | NVIDIA H100 80GB HBM3 |") in results
    readme = (repo / "README.md").read_text()
    models = readme[readme.index(mt.MODELS_BEGIN):readme.index(mt.MODELS_END)]
    row = next(line for line in models.splitlines() if line.startswith("| Sliding-window layers with attention sinks"))
    assert "gpt-oss-20b shape, 4 layers (dummy weights) (hybrid SWA pools): served, CUDA graphs on/off identical" in row
    linear = next(line for line in models.splitlines() if line.startswith("| Linear-attention hybrids"))
    assert "not yet measured on a GPU" in linear


def test_models_layout_checked(repo, capsys):
    (repo / "results" / "models.json").write_text(json.dumps([dict(MODEL, layout="sliding")]))
    assert mt.main(["--check", "--root", str(repo)]) == 2
    assert "models.json: record 0: layout: 'sliding' is not allowed; allowed: full, swa, swa+sinks, hybrid-linear" \
        in capsys.readouterr().err
