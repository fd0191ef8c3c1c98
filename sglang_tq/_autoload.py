"""Optional autoload: make plain `python -m sglang.launch_server --attention-backend turboquant` work.

    python -m sglang_tq._autoload install     # writes sglang_tq_autoload.pth into site-packages
    python -m sglang_tq._autoload status
    python -m sglang_tq._autoload uninstall
    SGLANG_TQ_AUTOLOAD=0 python ...           # opt out for one run

The `.pth` line runs at every interpreter start (including SGLang's spawned scheduler processes). It
executes this file by absolute path (without importing the `sglang_tq` package, torch or SGLang:
~1 ms) and installs a `sys.meta_path` finder that watches seven SGLang modules. Right after one of
them has executed, the matching part of `sglang_tq.registration` is applied to it:

    sglang.srt.server_args                               -> install_server_args (CLI choice, checks)
    sglang.srt.layers.attention.attention_registry       -> install_registry (backend factory)
    sglang.srt.model_executor.model_runner_kv_cache_mixin -> install_mixin (pool + capacity)
    sglang.srt.disaggregation.{common.conn, prefill, decode, decode_schedule_batch_mixin}
                                                          -> install_disagg_* (sglang_tq.disaggregation)

A failure inside the hook is reported on stderr and never breaks the SGLang import. The config comes
from $SGLANG_TQ_CONFIG (preset name or YAML path; default turbo4).

An editable install (`pip install -e .`) places no .pth of ours, hence the explicit `install`
command. Moving the repo after `install` leaves a .pth whose path is gone: it then does nothing
(rerun `install`).
"""
import os
import sys

ENV = "SGLANG_TQ_AUTOLOAD"
PTH_NAME = "sglang_tq_autoload.pth"
HOOK_NAME = "_sglang_tq_autoload"

_WATCH = {
    "sglang.srt.server_args": "install_server_args",
    "sglang.srt.layers.attention.attention_registry": "install_registry",
    "sglang.srt.model_executor.model_runner_kv_cache_mixin": "install_mixin",
    "sglang.srt.disaggregation.common.conn": "install_disagg_conn",
    "sglang.srt.disaggregation.prefill": "install_disagg_prefill",
    "sglang.srt.disaggregation.decode": "install_disagg_decode",
    "sglang.srt.disaggregation.decode_schedule_batch_mixin": "install_disagg_prebuilt",
}


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _apply(fullname, module):
    try:
        from sglang_tq import registration

        getattr(registration, _WATCH[fullname])(module)
    except Exception as e:  # never break SGLang's import
        sys.stderr.write(f"[sglang_tq autoload] could not patch {fullname}: {type(e).__name__}: {e}\n")


class _HookLoader:
    """Wraps the real loader; applies the patch after the module body ran."""

    def __init__(self, loader, fullname):
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _apply(self._fullname, module)

    def __getattr__(self, name):  # get_code, get_source, is_package, get_filename, ...
        return getattr(self._loader, name)


class _Finder:
    _sglang_tq = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCH:
            return None
        for finder in sys.meta_path:
            if finder is self or getattr(finder, "_sglang_tq", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookLoader(spec.loader, fullname)
                return spec
        return None

    def invalidate_caches(self):
        pass


def activate() -> bool:
    """Install the finder (idempotent). Modules already imported are patched at once."""
    if not enabled():
        return False
    if not any(getattr(f, "_sglang_tq", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name in _WATCH:
        if name in sys.modules:
            _apply(name, sys.modules[name])
    return True


# --------------------------------------------------------------------------------------------
# install / uninstall / status
# --------------------------------------------------------------------------------------------
def _site_dir() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def pth_path() -> str:
    return os.path.join(_site_dir(), PTH_NAME)


def pth_line(hook_file: str) -> str:
    # One physical line ("import ..." lines of a .pth are exec'd); silent if the file is gone.
    return (
        "import os, sys; p = " + repr(hook_file) + "; "
        "os.path.isfile(p) and os.environ.get('" + ENV + "', '1').strip().lower() not in ('0', 'false', 'no', 'off') "
        "and exec(\"g = {'__name__': '" + HOOK_NAME + "', '__file__': p}\\n"
        "exec(compile(open(p).read(), p, 'exec'), g)\\n"
        "sys.modules.setdefault('" + HOOK_NAME + "', type(sys)('" + HOOK_NAME + "')).__dict__.update(g)\\n"
        "g['activate']()\")\n"
    )


def install() -> str:
    path = pth_path()
    with open(path, "w") as f:
        f.write(pth_line(os.path.abspath(__file__)))
    return path


def uninstall() -> bool:
    path = pth_path()
    if os.path.exists(path):
        os.remove(path)
        return True
    return False


def status() -> str:
    path = pth_path()
    if not os.path.exists(path):
        return f"not installed ({path} absent)"
    line = open(path).read()
    ok = os.path.abspath(__file__) in line
    return (f"installed: {path}" + ("" if ok else " (points to another checkout)")
            + ("" if enabled() else f"; disabled by {ENV}=0 in this environment"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "status"
    if cmd == "install":
        print(f"wrote {install()}")
    elif cmd == "uninstall":
        print("removed" if uninstall() else "nothing to remove")
    elif cmd == "status":
        print(status())
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
