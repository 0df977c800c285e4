"""`pvhboot extract`: placeholder until its issue lands."""


def register(sub):
    return sub.add_parser("extract", help="(not implemented yet)")


def run(args) -> int:
    from ..errors import UsageError

    raise UsageError("'extract' is not implemented yet")
