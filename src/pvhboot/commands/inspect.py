"""`pvhboot inspect`: placeholder until its issue lands."""


def register(sub):
    return sub.add_parser("inspect", help="(not implemented yet)")


def run(args) -> int:
    from ..errors import UsageError

    raise UsageError("'inspect' is not implemented yet")
