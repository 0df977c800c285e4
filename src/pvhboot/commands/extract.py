"""`pvhboot extract IMAGE -o OUT [--force]`: write the vmlinux ELF a kernel image holds.

- bzImage: the protected-mode payload, decompressed with its codec;
- compressed ELF (vmlinux.gz, xen.gz): the whole file, decompressed;
- plain ELF: copied unchanged (as Linux's scripts/extract-vmlinux does), with
  a note on stderr, so scripts can run extract on any kernel they are given.

The output equals what the codec's own CLI prints for the payload. It is
written to a temporary file next to OUT and renamed into place, so OUT is
either absent, the old file, or complete; the temporary file is removed on
every error path, Ctrl-C included. Memory stays bounded: the input is an
mmap and the decoder writes into the file (pvhboot.image.compression's
decompress_to_fd: two threads, no copies through Python where the codec
allows).

What is written is checked with :func:`pvhboot.image.elf.parse_elf` (a plain
ELF before it is copied, a decompressed payload on the temporary file before
the rename): a truncated or corrupt ELF is an error, never a successful
extraction.

OUT must be absent or a regular file. A device node, FIFO, socket, directory
or symlink is refused with and without --force: --force replaces a file's
contents, it is no licence to swap a /dev node or a symlink's target for a
regular file (and a symlink is not followed, so --force never writes through
it to a place the user did not name).
"""

from __future__ import annotations

import os
import sys

# Same cap as an in-memory payload (image.kernel.MAX_PAYLOAD): a corrupt stream
# or a bomb ends with an error instead of filling the disk.
MAX_OUTPUT = 512 << 20
ELF_MAGIC = b"\x7fELF"


def register(sub):
    p = sub.add_parser(
        "extract",
        help="write the vmlinux ELF inside a bzImage or compressed kernel",
        description="Decompress the payload ELF of a bzImage (or a vmlinux.gz / xen.gz) to OUT, "
        "byte-identical to the codec's own tool. Atomic; refuses to overwrite without --force.",
    )
    p.add_argument("image", metavar="IMAGE", help="bzImage, compressed ELF, or ELF")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="where to write the ELF")
    p.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    return p


class Args:
    """What :func:`fast_parse` returns: the attributes argparse's namespace has."""

    def __init__(self, image: str, output: str, force: bool):
        self.command = "extract"
        self.image = image
        self.output = output
        self.force = force


def fast_parse(argv: list[str]) -> Args | None:
    """Parse ``IMAGE -o OUT [--force]`` without argparse, or return None.

    argparse and the parser for every command cost ~9 ms of imports and set-up
    (re, enum, gettext, locale, shutil), a third of extracting a 53 MB lz4
    kernel. Only the plain forms are handled: ``-o OUT``, ``--output OUT``,
    ``--output=OUT``, ``-f``/``--force``, one IMAGE not starting with '-'.
    Anything else (help, ``--``, abbreviations, a value starting with '-', a
    repeated or missing argument) returns None and argparse handles it, with
    its messages. A test checks both parsers agree.
    """
    image = output = None
    force = False
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in ("-f", "--force"):
            force = True
            i += 1
            continue
        if token in ("-o", "--output") or token.startswith("--output="):
            if output is not None:
                return None
            if token.startswith("--output="):
                value = token[len("--output="):]
                i += 1
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 2
            else:
                return None
            if not value or value.startswith("-"):
                return None
            output = value
            continue
        if token.startswith("-") or image is not None or not token:
            return None
        image = token
        i += 1
    if image is None or output is None:
        return None
    return Args(image, output, force)


def run(args) -> int:
    extract(args.image, args.output, force=args.force)
    return 0


def extract(image: str, out: str, *, force: bool = False) -> dict:
    """Write the ELF held by ``image`` to ``out``; returns {format, codec, size}."""
    from ..errors import PvhbootError
    from ..image.kernel import map_image, release_quietly

    if _check_output(out) and not force:
        raise PvhbootError(f"{out} already exists; pass --force to overwrite it")
    # map_image refuses an empty file, a directory, a FIFO (whose open would block)...
    with map_image(image) as mm:
        fmt, codec, start, length = _locate(mm, image)
        view = memoryview(mm)[start : start + length]
        try:
            size = _write_atomically(out, force, lambda fd: _emit(codec, view, fd), image, codec)
        finally:
            release_quietly(view)  # the decoder's traceback may still hold a slice of it
    if fmt == "elf":
        print(f"pvhboot: {image} is already an uncompressed ELF; copied it unchanged to {out}",
              file=sys.stderr)
    return {"format": fmt, "codec": codec, "size": size}


def _check_output(out: str) -> bool:
    """True when OUT exists (as a regular file); raise when it exists as anything else."""
    import stat

    from ..errors import PvhbootError

    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise PvhbootError(f"cannot check the output {out}: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        return True
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
    raise PvhbootError(f"{out} is {kind}, not a regular file; refusing to replace it "
                       "(even with --force): give the path of a file to write")


_KINDS = {
    0o040000: "a directory",
    0o020000: "a character device",
    0o060000: "a block device",
    0o010000: "a FIFO",
    0o140000: "a socket",
    0o120000: "a symbolic link",
}


def _locate(mm, image: str):
    """(format, codec or None, start, length) of the bytes to decompress or copy."""
    # Only the readers this file needs: a plain ELF is copied without any.
    from ..errors import ImageError

    if mm[:4] == ELF_MAGIC:
        from ..image.elf import elf_problem

        problem = elf_problem(mm)
        if problem:
            raise ImageError(f"{image}: starts like an ELF but is not a valid one: {problem}; "
                             "nothing was written")
        return "elf", None, 0, len(mm)
    from ..image.bzimage import is_bzimage, is_pe, parse_bzimage

    if is_bzimage(mm):
        from ..image.kernel import payload_view

        bz = parse_bzimage(mm, what=image)
        payload_view(mm, bz, image).release()  # refuses a missing payload or unknown codec
        return "bzimage", bz.codec, bz.payload_offset, bz.payload_length
    if is_pe(mm):
        raise ImageError(f"{image} is a PE image without a Linux setup header; "
                         "it holds no vmlinux payload to extract")
    from ..image.compression import detect_codec

    codec = detect_codec(mm[:16])
    if codec is None:
        raise ImageError(f"{image}: not a kernel image: no ELF magic, no bzImage 'HdrS' header "
                         "and no known compression magic; nothing to extract")
    return "compressed-elf", codec, 0, len(mm)


def _emit(codec, view, fd: int) -> int:
    if codec is None:
        from ..image.compression_fd import pwrite_all

        pwrite_all(fd, view, 0)  # one write(2) may take less than asked
        return len(view)
    from ..image.compression import decompress_to_fd

    # Straight into the file: both CPUs and no intermediate copies for lz4,
    # lzo and zstd (see compression.decompress_to_fd).
    return decompress_to_fd(codec, view, fd, max_output=MAX_OUTPUT)


def _temporary(directory: str, out: str) -> tuple[int, str]:
    """A new file next to OUT, 0600, opened read-write (zstd maps it).

    What tempfile.mkstemp does, without the ~3 ms of imports it brings
    (random, hashlib, shutil) into a command that takes ~30 ms in all.
    """
    base = os.path.join(directory, "." + os.path.basename(out) + ".")
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        name = f"{base}{os.getpid()}-{os.urandom(6).hex()}.part"
        try:
            return os.open(name, flags, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(17, "no unused temporary name", f"{base}*.part")  # EEXIST


def _write_atomically(out: str, force: bool, produce, image: str, codec) -> int:
    from ..errors import ImageError, PvhbootError

    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise PvhbootError(f"cannot write {out}: the directory {directory} {what}; "
                           "create it or give another output path")
    try:
        fd, tmp = _temporary(directory, out)
    except OSError as exc:
        raise PvhbootError(f"cannot write {out}: creating a file in {directory} failed: "
                           f"{exc.strerror}") from None
    try:
        try:
            try:
                size = produce(fd)
            except OSError as exc:  # the output's fault: a full disk, a file size limit
                raise PvhbootError(
                    f"cannot write {out}: {exc.strerror or exc}; nothing was written: free "
                    "space on that filesystem or give another output path"
                ) from None
            if codec is not None:
                from ..image.elf import elf_file_problem

                problem = elf_file_problem(fd)
                if problem:
                    raise ImageError(f"{image}: the decompressed payload is not a valid ELF: "
                                     f"{problem}; nothing was written")
            # Made 0600 while partial; give it the mode a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        finally:
            os.close(fd)
        if force:
            _check_output(out)  # OUT may have changed since the first look
            os.replace(tmp, out)
        else:
            # link() fails if OUT appeared meanwhile: never clobber without --force.
            try:
                os.link(tmp, out)
            except FileExistsError:
                raise PvhbootError(f"{out} already exists; pass --force to overwrite it") \
                    from None
            except OSError:
                if os.path.lexists(out):
                    raise PvhbootError(f"{out} already exists; pass --force to overwrite it") \
                        from None
                os.replace(tmp, out)
            else:
                os.unlink(tmp)
        return size
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
