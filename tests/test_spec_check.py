"""scripts/spec_check.py (the GPU driver of speculative decoding) against stand-in servers on the CPU: prompts
from text files, servers one at a time, resumable stages, records that make_tables renders."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_serving as bs  # noqa: E402
import make_tables as mt  # noqa: E402
import spec_check as sc  # noqa: E402
from test_bench_serving import FAKE, free_port  # noqa: E402


class FakeTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [100 + len(w) for w in text.split()][:64]


@pytest.fixture
def run(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTokenizer())
    monkeypatch.setattr(bs, "LAUNCH", {"turboquant": FAKE, None: FAKE})
    monkeypatch.setattr(bs, "card_info", lambda: ("Fake GPU (GPU 0 of 1)", "GPU-fake"))
    monkeypatch.setattr(bs.Server, "alive", [])
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(" ".join(f"w{i}_{j}" * (1 + j % 3) for j in range(40)) for i in range(30)))
    work = tmp_path / "work"

    def go(stages):
        return sc.main(["--model", "m", "--text", str(text), "--stages", stages, "--work", str(work), "--prompts", "4",
                        "--max-new", "6", "--passage-words", "50", "--port", str(free_port()), "--commit", "abc1234"])
    return go, work


def test_passages_are_seeded_and_sized(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(" ".join(["word"] * 40) + f" end{i}" for i in range(10)))
    p1 = sc.passages([str(tmp_path)], 5, 60)
    assert p1 == sc.passages([str(tmp_path)], 5, 60) and all(len(p.split()) == 60 for p in p1)
    with pytest.raises(SystemExit, match="no .txt files"):
        sc.passages([str(tmp_path / "none")], 1, 10)


def test_stages_then_records(run, tmp_path):
    go, work = run
    assert go("bf16") == 0
    assert not (work / "speculative_records.json").exists()  # two of four servers: no records yet
    assert go("turbo4") == 0
    recs = json.loads((work / "speculative_records.json").read_text())
    assert [r["batch"] for r in recs] == [1, 8]
    r1 = recs[0]
    # the stand-in's tokens depend on the prompt only: NGRAM on and off agree on every prompt
    assert r1["greedy_identical"] == 4 and r1["bf16_greedy_identical"] == 4 and r1["prompts"] == 4
    assert r1["accept_len"] == 3.0 and r1["bf16_accept_len"] == 3.2
    assert r1["tpot_ms"] and r1["bf16_tpot_ms"] and r1["tpot_off_ms"] and recs[1]["tok_s"]
    assert recs[1]["greedy_identical"] is None and r1["load"] is None
    assert r1["card"] == "Fake GPU (GPU 0 of 1)" and r1["commit"] == "abc1234"
    servers = json.loads((work / "spec_tq_ngram.json").read_text())
    assert servers["name"] == "tq_ngram" and len(servers["tokens"]) == 4
    # the records fit results/speculative.json and render
    res = tmp_path / "results"
    import shutil

    shutil.copytree(ROOT / "results", res)
    (res / "speculative.json").write_text(json.dumps(recs))
    text = mt.results_md(mt.load(res))
    section = text[text.index("## Speculative decoding (NGRAM)"):]
    assert "| 1 | `turbo4` | 4 / 4 (4 / 4) | 3.00 / 3.20 | 0.938 |" in section
    assert "not measured yet" not in section and "Fake GPU (GPU 0 of 1)" in section


def test_unknown_stage_named(run):
    go, _ = run
    with pytest.raises(SystemExit, match="unknown stage"):
        go("turbo5")


def test_empty_results_render_not_measured(tmp_path):
    import shutil

    shutil.copytree(ROOT / "results", tmp_path / "results")
    (tmp_path / "results" / "speculative.json").write_text("[]")
    text = mt.results_md(mt.load(tmp_path / "results"))
    assert "| not measured yet |" in text[text.index("## Speculative decoding (NGRAM)"):]
    (tmp_path / "results" / "speculative.json").write_text(json.dumps([{"algorithm": "NGRAM"}]))
    with pytest.raises(mt.ResultsError, match="speculative.json: record 0: missing key"):
        mt.load(tmp_path / "results")
