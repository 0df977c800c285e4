"""`pvhboot run`: placeholder until its issue lands."""


def register(sub):
    return sub.add_parser("run", help="(not implemented yet)")


def run(args) -> int:
    from ..errors import UsageError

    raise UsageError("'run' is not implemented yet")
