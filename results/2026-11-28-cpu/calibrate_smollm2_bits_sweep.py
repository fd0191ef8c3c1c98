"""Re-allocate from the 4-bit run's sensitivities at higher targets (candidates 3,4,5) and measure PPL."""
import json, math, sys, torch
sys.path.insert(0, "/work/main/scripts"); sys.path.insert(0, "/work/main")
import calibrate as C
from sglang_tq.config import TQConfig
torch.set_num_threads(2)
r = json.load(open("/tmp/cal4/report.json"))
sens = {}
for key, v in r["sensitivity"].items():
    l, rb = key.split("."); sens[(int(l), rb[0], int(rb[1:]))] = v
layers = sorted({l for l, _, _ in sens}); cands = [3, 4, 5]
def alloc(target):
    bits = {(l, ro): 3 for l in layers for ro in "kv"}; budget = target * len(bits)
    while True:
        best, bg = None, -1e30
        for key, b in bits.items():
            if b == 5 or sum(bits.values()) + 1 > budget + 1e-9: continue
            g = sens[(key[0], key[1], b)] - sens[(key[0], key[1], b + 1)]
            if g > bg: best, bg = key, g
        if best is None: break
        bits[best] += 1
    return {l: (bits[(l, "k")], bits[(l, "v")]) for l in layers}
sim = C.Simulator("/tmp/models/SmolLM2-135M-Instruct", "cpu", torch.float32)
full = open("/work/main/.gpu_data/prideprejudice.txt", encoding="utf-8").read()
ids = sim.tok(full[:60000], add_special_tokens=False)["input_ids"][:2048]
emma = open("/work/main/.gpu_data/emma.txt", encoding="utf-8").read()
hids = sim.tok(emma[:60000], add_special_tokens=False)["input_ids"][:2048]
from safetensors.torch import load_file
means = load_file("/tmp/cal4/calibrated4_smollm2_key_means.safetensors")["key_means"]
res = {}
for target in (4.0, 4.5, 5.0):
    pl = alloc(target)
    cfg = TQConfig.from_dict(C.config_dict(pl, (1, 0), 0, f"cal{target}"))
    out = {}
    for name, tids in (("in", ids), ("heldout", hids)):
        sim.set_config(cfg, means); out[name] = math.exp(sim.nll(tids, 1024))
    out["avg_bits"] = sum(k + v for k, v in pl.values()) / (2 * len(pl))
    res[target] = out
    print(target, out, flush=True)
for name, tids in (("in", ids), ("heldout", hids)):
    sim.set_config(None); print("bf16", name, math.exp(sim.nll(tids, 1024)), flush=True)
json.dump(res, open("/tmp/cal45/res.json", "w"), indent=1)
