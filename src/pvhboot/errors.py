"""Exceptions that carry a message a user can act on.

The CLI prints ``pvhboot: error: <message>`` for any :class:`PvhbootError`
and exits 1 (2 for :class:`UsageError`). Nothing else should reach the user
as a traceback.
"""


class PvhbootError(Exception):
    """Base of every error pvhboot reports to a user."""

    exit_status = 1


class UsageError(PvhbootError):
    """The command line asks for something impossible or contradictory."""

    exit_status = 2


class ImageError(PvhbootError):
    """A kernel image is truncated, malformed, or not what it claims to be."""


class CodecError(ImageError):
    """A compressed stream is corrupt, unknown, or too large."""


class ConfigError(PvhbootError):
    """A kernel .config cannot be read or evaluated."""


class BootError(PvhbootError):
    """The boot cannot be planned: overlaps, no room, missing entry point."""


class KvmError(PvhbootError):
    """An ioctl on /dev/kvm failed; the message names the ioctl and errno."""


class GuestError(PvhbootError):
    """The guest stopped in a way the VMM cannot continue from."""
