"""Make the real SGLang 0.5.10.post1 classes importable on a CPU-only machine (tests only).

Import this module before anything imports `sglang`. It does two things, both inert on a GPU box
that has the real packages (each stub is installed only if the real package is missing):

* torchvision: PyPI's Linux wheels are CUDA-linked and would drag in a CUDA torch. SGLang needs it
  at import time only for `from torchvision.io import decode_jpeg` (srt/utils/common.py) and
  `torchvision.transforms` (multimodal). We first let transformers cache
  `is_torchvision_available() == False` (an lru_cache), then register empty stub modules.
* sgl_kernel: the CUDA kernel package. Several SGLang modules import names from it at module level
  (memory_pool_host, spec_utils, two_batch_overlap, elastic_ep, ...). A meta-path finder answers every
  `sgl_kernel[.x.y]` import with a stub module whose attributes are placeholders that raise when
  called. Nothing on the CPU test path calls them.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

_MARK = "_sglang_tq_cpu_shim"


def _have(name: str) -> bool:
    if name in sys.modules:
        return not getattr(sys.modules[name], _MARK, False)
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class _Placeholder:
    """Stands in for any sgl_kernel symbol: importable, subscriptable, fails loudly when called."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a CPU-test stub of sgl_kernel (no CUDA kernels here)")

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Placeholder(f"{self._name}.{item}")

    def __getitem__(self, item):
        return self

    def __mro_entries__(self, bases):  # allows `class X(sgl_kernel.Something)`
        return (object,)

    def __repr__(self):
        return f"<sgl_kernel stub {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, item):
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        return _Placeholder(f"{self.__name__}.{item}")


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []  # a package, so submodules resolve through the finder too
        setattr(m, _MARK, True)
        if spec.name == "sgl_kernel":
            m.__version__ = "0.0.0+cpustub"
        return m

    def exec_module(self, module):
        pass


class _StubFinder(importlib.abc.MetaPathFinder):
    def __init__(self, roots):
        self.roots = tuple(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        return None


def _install_torchvision_stub():
    if _have("torchvision"):
        return
    try:  # cache "not available" before the stub makes find_spec succeed
        from transformers.utils import import_utils as _iu

        _iu.is_torchvision_available()
        _iu.is_torchvision_v2_available()
    except Exception:
        pass
    tv = types.ModuleType("torchvision")
    setattr(tv, _MARK, True)
    tv.__path__ = []
    tv.__version__ = "0.0.0+cpustub"
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    io = types.ModuleType("torchvision.io")
    io.decode_jpeg = _Placeholder("torchvision.io.decode_jpeg")
    tr = types.ModuleType("torchvision.transforms")
    tr.__path__ = []
    trf = types.ModuleType("torchvision.transforms.functional")

    class InterpolationMode:  # noqa: D401  (enum-like stand-in)
        NEAREST, BILINEAR, BICUBIC, BOX, HAMMING, LANCZOS = range(6)

    trf.InterpolationMode = InterpolationMode
    tr.functional = trf
    tr.InterpolationMode = InterpolationMode
    tv.io, tv.transforms = io, tr
    for name, mod in {"torchvision": tv, "torchvision.io": io, "torchvision.transforms": tr,
                      "torchvision.transforms.functional": trf}.items():
        sys.modules[name] = mod


def _install_sgl_kernel_stub():
    if _have("sgl_kernel"):
        return
    if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StubFinder(["sgl_kernel"]))


def install():
    _install_torchvision_stub()
    _install_sgl_kernel_stub()


install()
