#!/usr/bin/env python3
"""Before/after records of the headline kernel points, from bench_kernels.py result files of two code
versions timed on one card in one run (scripts/gpu_check.sh bench):

  python scripts/before_after.py --change "what changed" --before before_1.json before_2.json \
      --after after_1.json after_2.json [--commit-before REV] [--commit-after REV] \
      [--json results/before_after.json] [--print]

--json adds the records to that list (records of the same change, card and commits are replaced).
Each point's before_us / after_us is the median over the repetitions (each repetition's value is kept in
before_reps_us / after_reps_us); change_pct = after / before - 1. The files must all come from one card.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from make_tables import replace_records

# (point, bench, shape name, codec, batch, context, new tokens): bench_kernels.py's --headline points
POINTS = [("decode hd128 B=32 32K", "decode", "hd128", "K4V4", 32, 32768, None),
          ("decode hd128 B=1 1K", "decode", "hd128", "K4V4", 1, 1024, None),
          ("decode hd64 B=32 32K", "decode", "hd64", "K4V4", 32, 32768, None),
          ("extend 512 over 16K", "extend", "hd128", "K4V4", 1, 16384, 512)]
SHAPES = {"hd128": (32, 8, 128), "hd64": (9, 3, 64)}
COMMAND = "bash scripts/gpu_check.sh bench"


def point_us(res: dict, bench: str, shape: str, codec: str, batch: int, context: int, new) -> float:
    """One point's time in µs from a bench_kernels.py result file."""
    if bench == "decode":
        rows = [p for p in res["points"] if (p["shape"], p["codec"], p["B"], p["ctx"]) == (shape, codec, batch, context)]
        key = "ms"
    else:
        rows = [e for e in res["extend"] if (e["codec"], e["prefix"], e["new"], e.get("seqs", 1)) ==
                (codec, context, new, batch)]
        key = "ours"
    if not rows or not rows[0].get(key):
        raise SystemExit(f"{res.get('_path')}: no {bench} point {shape} {codec} B={batch} ctx={context} new={new}")
    return rows[0][key] * 1e3


def load(paths):
    out = []
    for p in paths:
        with open(p) as f:
            res = json.load(f)
        res["_path"] = p
        out.append(res)
    return out


def records(before, after, change, commit_before, commit_after=None):
    cards = {r["gpu"] for r in before + after}
    if len(cards) != 1:
        raise SystemExit(f"the result files come from different cards: {sorted(cards)}")
    card = cards.pop()
    recs = []
    for point, bench, shape, codec, batch, context, new in POINTS:
        b = [point_us(r, bench, shape, codec, batch, context, new) for r in before]
        a = [point_us(r, bench, shape, codec, batch, context, new) for r in after]
        hq, hkv, d = SHAPES[shape]
        mb, ma = statistics.median(b), statistics.median(a)
        fi = None
        if bench == "decode":
            fi_ms = [p.get("fi_bf16") for r in after for p in r["points"]
                     if (p["shape"], p["codec"], p["B"], p["ctx"]) == (shape, codec, batch, context) and p.get("fi_bf16")]
            fi = round(statistics.median(fi_ms) * 1e3, 1) if fi_ms else None
        recs.append(dict(change=change, point=point, bench=bench, codec=codec, h_q=hq, h_kv=hkv, head_dim=d, batch=batch,
                         context=context, new_tokens=new, before_us=round(mb, 1), after_us=round(ma, 1),
                         change_pct=round((ma / mb - 1) * 100, 2), before_reps_us=[round(x, 1) for x in b],
                         after_reps_us=[round(x, 1) for x in a], flashinfer_bf16_us=fi, card=card,
                         date=after[0]["date"][:10], commit_before=commit_before,
                         commit_after=commit_after or (after[0].get("commit") or "")[:7] or None, command=COMMAND))
    return recs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--change", required=True, help="what the after code changed (one line, for the table)")
    ap.add_argument("--before", nargs="+", required=True)
    ap.add_argument("--after", nargs="+", required=True)
    ap.add_argument("--commit-before", required=True)
    ap.add_argument("--commit-after", default=None, help="default: the commit the after files name")
    ap.add_argument("--json", default=None, help="add the records to this list (e.g. results/before_after.json)")
    ap.add_argument("--print", action="store_true", help="print a table")
    a = ap.parse_args(argv)
    recs = records(load(a.before), load(a.after), a.change, a.commit_before, a.commit_after)
    if a.json:
        replace_records(a.json, recs, lambda r: (r.get("change"), r["card"], r["commit_before"], r["commit_after"]))
    if a.print or not a.json:
        print(f"{recs[0]['card']}: before {a.commit_before}, after {recs[0]['commit_after']}")
        for r in recs:
            print(f"  {r['point']:<24} before {r['before_us']:9.1f} us {r['before_reps_us']}  after {r['after_us']:9.1f} us "
                  f"{r['after_reps_us']}  change {r['change_pct']:+6.2f} %  FlashInfer BF16 {r['flashinfer_bf16_us']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
