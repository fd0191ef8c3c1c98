"""TurboQuant KV-cache compression for SGLang.

Importing this package must not import SGLang (configs are validated before the engine starts), so
everything engine-facing is imported lazily.
"""
__version__ = "0.1.0"


def register():
    """Register the TurboQuant attention backend with SGLang (imports SGLang)."""
    from .registration import register as _register

    return _register()
