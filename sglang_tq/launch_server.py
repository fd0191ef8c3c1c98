"""Launch an SGLang 0.5.10.post1 server with the TurboQuant attention backend.

    python -m sglang_tq.launch_server --model-path MODEL --attention-backend turboquant \
        [--tq-config turbo4|FILE.yaml] [any other sglang.launch_server argument]

* `--tq-config` (ours, removed before SGLang parses argv): a preset name or a YAML path; default
  $SGLANG_TQ_CONFIG, else the turbo4 preset. Exported as SGLANG_TQ_CONFIG (absolute path or preset
  name) so the spawned scheduler processes read the same config.
* `--attention-backend turboquant` is added if no attention backend is given.
* The config is validated, and resolved against the model's layer count / head_dim, here in the
  main process (before any weight loads); unsupported set-ups are refused with a clear message.

How registration reaches the scheduler processes (SGLang spawns them): this module's top level calls
`register()`, and Python's spawn re-executes it in every child as `__mp_main__`; in addition the
scheduler target is `sglang_tq.registration.run_scheduler_process_tq`, which registers before
delegating to SGLang's `run_scheduler_process`. No pip metadata or entry point is needed.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from sglang_tq.cli import has_flag, pop_flag
from sglang_tq.registration import register, run_scheduler_process_tq

register()  # main process, and again in every spawned child (re-run as __mp_main__)

TQ_CONFIG_FLAG = "--tq-config"


def pop_tq_args(argv: List[str]) -> Tuple[List[str], Optional[str]]:
    """Remove `--tq-config X` / `--tq-config=X` from argv; -> (rest, value or None)."""
    from sglang_tq.config import TQConfigError

    try:
        return pop_flag(argv, TQ_CONFIG_FLAG)
    except TQConfigError as e:
        raise SystemExit(f"error: {e} (a preset name or a YAML file)")


def _config_ref(value: str) -> str:
    """Absolute path for a file, else the preset name as given."""
    p = Path(value).expanduser()
    return str(p.resolve()) if p.is_file() else value


def prepare(argv: List[str]):
    """argv -> validated ServerArgs (TurboQuant config checked first). Raises TQConfigError /
    TQUnsupportedError with a readable message."""
    from sglang_tq.config import CONFIG_ENV, load_config

    argv, tq_cfg = pop_tq_args(argv)
    if tq_cfg is not None:
        os.environ[CONFIG_ENV] = _config_ref(tq_cfg)
    load_config(os.environ.get(CONFIG_ENV) or None)  # fail fast on a bad file, before SGLang starts
    if not has_flag(argv, "--attention-backend"):
        argv = argv + ["--attention-backend", "turboquant"]
    from sglang.srt.server_args import prepare_server_args

    # ServerArgs.__post_init__ (patched by register()) runs compat.check_server_args: refuses
    # unsupported set-ups and resolves the config against the model's HF config.
    return prepare_server_args(argv)


def describe(server_args) -> str:
    """The per-layer table for the model (main-process log)."""
    from sglang_tq.compat import resolve_model_plan, uses_turboquant

    if not uses_turboquant(server_args):
        return "TurboQuant: --attention-backend is not turboquant; the TurboQuant KV cache is off"
    mc = server_args.get_model_config()
    heads = max(1, mc.get_num_kv_heads(server_args.tp_size))
    return resolve_model_plan(mc)[1].summary(heads)


def main(argv: Optional[List[str]] = None) -> None:
    from sglang_tq.compat import TQUnsupportedError
    from sglang_tq.config import TQConfigError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        server_args = prepare(argv)
    except (TQConfigError, TQUnsupportedError) as e:
        print(f"sglang_tq: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    try:
        print(describe(server_args), file=sys.stderr, flush=True)
    except Exception as e:  # the table is informative only
        print(f"sglang_tq: (could not print the layer table: {e})", file=sys.stderr)

    from sglang.srt.entrypoints.http_server import launch_server
    from sglang.srt.utils import kill_process_tree

    try:
        launch_server(server_args, run_scheduler_process_func=run_scheduler_process_tq)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
