"""Child entry for decompressing an untrusted payload in a fresh interpreter.

``python -m pvhboot.image._extract_worker IMAGE CODEC START LENGTH OUT EXTRA_AS CPU``

Used by :mod:`pvhboot.image.vmlinux_cache` when the parent has threads (where
``fork`` is unsafe). It sets its own limits first (an address space of its own baseline plus
EXTRA_AS bytes, the same rule as a forked child), streams
IMAGE[START:START+LENGTH] through CODEC into OUT (an existing file, which it
truncates), and exits 0; on failure it prints ``codec|image<TAB>message`` on
stderr and exits 3.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    from .vmlinux_cache import (
        _CHILD_REPORTED,
        _address_space_now,
        _child_message,
        apply_limits,
        run_child,
    )

    try:
        image, codec, start, length, out, extra_address_space, cpu = argv
        # Measured here, not in the parent: the parent's size (a test runner,
        # a threaded application) says nothing about what this interpreter needs.
        apply_limits(_address_space_now() + int(extra_address_space), int(cpu))
        import mmap

        with open(image, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        start_i, length_i = int(start), int(length)
        if start_i < 0 or length_i < 0 or start_i + length_i > len(mm):
            raise ValueError(f"payload range {start_i}+{length_i} is outside {image}")
        fd = os.open(out, os.O_RDWR | os.O_TRUNC)  # read too: the zstd path maps it
        try:
            with memoryview(mm) as view:
                run_child(codec, view[start_i : start_i + length_i], fd)
        finally:
            os.close(fd)
    except BaseException as exc:
        sys.stderr.write(_child_message(exc) + "\n")
        return _CHILD_REPORTED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
