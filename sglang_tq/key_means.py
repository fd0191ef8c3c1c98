"""Key centering without a calibration file (`key_means: auto`): the mean post-RoPE key of every (layer,
KV head), measured when the server starts, on one prefill of a short built-in text (probe.txt).

Why: some key heads carry a large near-constant component -- the k_proj biases of Qwen2/2.5, and heads of
models without biases, in any layer -- so the codec spends its range on a constant and the per-key error
grows with it. Centering by any constant mu per (layer, KV head) is exact under softmax (q.mu is the same
for every key of a query); only the codec error of k - mu changes. The constant belongs to the model, not
to the text: a few hundred tokens of ordinary text find it (docs/RESULTS.md, CPU simulation).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

PROBE_TOKENS = 512  # tokens of probe.txt the probe prefill runs (the whole text for common tokenizers)


def probe_text() -> str:
    return Path(__file__).with_name("probe.txt").read_text(encoding="utf-8")


def probe_token_ids(tokenizer) -> List[int]:
    """The probe as a request would send it: the tokenizer's leading special tokens (BOS, where the model
    has one), then the first PROBE_TOKENS tokens of the text."""
    prefix = tokenizer.encode("", add_special_tokens=True)
    return list(prefix) + list(tokenizer.encode(probe_text(), add_special_tokens=False))[:PROBE_TOKENS]
