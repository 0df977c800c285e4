"""`python -m pvhboot.initramfs OUT --init FILE [--add SRC:DST]...`

Builds a (gzip-compressed by default) initramfs for scripts and tests:
FILE becomes /init (mode 0755), each --add copies a host file, and
/dev/console is always present.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import PvhbootError, UsageError
from .builder import COMPRESSIONS, FileSpec, build_initramfs


def _parse_add(value: str) -> FileSpec:
    src, sep, dst = value.rpartition(":")
    if not sep or not src or not dst:
        raise UsageError(f"--add {value!r}: expected SRC:DST, e.g. --add ./busybox:/bin/busybox")
    return FileSpec(dst, src)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pvhboot.initramfs",
        description="Build an initramfs (cpio newc) with /init and /dev/console.",
    )
    parser.add_argument("out", help="the initramfs file to write")
    parser.add_argument("--init", required=True, help="host file to install as /init (0755)")
    parser.add_argument("--add", action="append", default=[], metavar="SRC:DST",
                        help="copy host file SRC to DST in the archive (repeatable)")
    parser.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                        help="archive compression (default: gzip, which CONFIG_RD_GZIP reads)")
    args = parser.parse_args(argv)
    try:
        files = [FileSpec("/init", args.init, 0o755)] + [_parse_add(a) for a in args.add]
        out = build_initramfs(args.out, files, compression=args.compression)
    except PvhbootError as e:
        print(f"pvhboot: error: {e}", file=sys.stderr)
        return e.exit_status
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
