"""pvhboot: boot and inspect x86-64 Linux kernels through the PVH entry point.

The public API is imported lazily so that ``import pvhboot`` stays cheap on
the boot path (every millisecond from exec to the first guest instruction is
measured).
"""

__version__ = "0.1.0"

__all__ = ["Machine", "RunResult", "open_image", "PvhbootError"]


def __getattr__(name):
    if name in ("Machine", "RunResult"):
        from . import api

        return getattr(api, name)
    if name == "open_image":
        from .image.kernel import open_image

        return open_image
    if name == "PvhbootError":
        from .errors import PvhbootError

        return PvhbootError
    raise AttributeError(f"module 'pvhboot' has no attribute {name!r}")
