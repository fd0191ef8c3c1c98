"""SGLang's `bench_one_batch` with the TurboQuant backend registered: one static batch through the
model runner, no server and no scheduler, so its prefill and decode latencies are the model's alone
(the serving benchmark's TTFT also holds queueing and how requests happened to arrive).

    python scripts/bench_one_batch_tq.py --model-path M --load-format dummy --batch-size 8 \\
        --input-len 1024 --output-len 32 --attention-backend turboquant --tq-config turbo4
    python scripts/bench_one_batch_tq.py ... --attention-backend triton        # the BF16 baseline

Every argument is `sglang.bench_one_batch`'s, plus `--tq-config` as in `sglang_tq.launch_server`.
"""
import os
import runpy
import sys

from sglang_tq.launch_server import _config_ref, pop_tq_args


def main() -> None:
    from sglang_tq.config import CONFIG_ENV
    from sglang_tq.registration import register

    argv, tq_cfg = pop_tq_args(sys.argv[1:])
    if tq_cfg is not None:
        os.environ[CONFIG_ENV] = _config_ref(tq_cfg)
    register()  # tensor parallel 1 runs in this process; larger TP spawns workers that re-import us
    sys.argv = ["sglang.bench_one_batch"] + argv
    runpy.run_module("sglang.bench_one_batch", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
