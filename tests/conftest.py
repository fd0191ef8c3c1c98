"""pytest setup. If SGLang is installed, install the CPU shim (torchvision / sgl_kernel stubs) before
any test imports it; without SGLang nothing happens here and the SGLang tests skip themselves."""
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

if importlib.util.find_spec("sglang") is not None:
    import sglang_cpu_shim  # noqa: F401,E402
