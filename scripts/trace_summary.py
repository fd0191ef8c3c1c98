"""Summarize torch-profiler chrome traces (`*.trace.json[.gz]`): GPU kernel time by kernel name, the
span from the first kernel's start to the last one's end, how much of it the GPU was busy, and the
host-device synchronizations (the usual reason a GPU sits idle in an eager forward).

    python scripts/trace_summary.py DIR_OR_FILE [...] [--top 20]
"""
import argparse
import collections
import glob
import gzip
import json
import os

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ")


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def summarize(path, top):
    events = load(path).get("traceEvents", [])
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kernels:
        print(f"{path}: no GPU events")
        return
    by_name = collections.defaultdict(lambda: [0.0, 0])
    intervals = []
    for e in kernels:
        t, d = float(e["ts"]), float(e.get("dur", 0.0))
        by_name[e["name"]][0] += d
        by_name[e["name"]][1] += 1
        intervals.append((t, t + d))
    intervals.sort()
    busy, cur_s, cur_e = 0.0, *intervals[0]
    for s, e in intervals[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = intervals[-1][1] - intervals[0][0]
    total = sum(v[0] for v in by_name.values())
    print(f"== {os.path.basename(path)}")
    print(f"GPU span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms ({100 * busy / max(span, 1e-9):.0f} %), "
          f"kernel time {total / 1e3:.2f} ms in {len(kernels)} launches")
    syncs = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        n = e.get("name", "")
        if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and n.startswith(SYNC_CALLS):
            syncs[n][0] += float(e.get("dur", 0.0))
            syncs[n][1] += 1
    for n, (d, c) in sorted(syncs.items(), key=lambda x: -x[1][0]):
        print(f"  host sync {n}: {c} calls, {d / 1e3:.2f} ms")
    print(f"  {'ms':>9} {'%':>5} {'calls':>6}  kernel")
    for n, (d, c) in sorted(by_name.items(), key=lambda x: -x[1][0])[:top]:
        print(f"  {d / 1e3:9.3f} {100 * d / total:5.1f} {c:6d}  {n[:110]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args()
    files = []
    for p in a.paths:
        files += sorted(glob.glob(os.path.join(p, "*.trace.json*"))) if os.path.isdir(p) else [p]
    for f in files:
        summarize(f, a.top)


if __name__ == "__main__":
    main()
