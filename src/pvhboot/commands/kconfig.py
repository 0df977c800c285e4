"""`pvhboot kconfig`: placeholder until its issue lands."""


def register(sub):
    return sub.add_parser("kconfig", help="(not implemented yet)")


def run(args) -> int:
    from ..errors import UsageError

    raise UsageError("'kconfig' is not implemented yet")
