"""`pvhboot kconfig CONFIG_OR_IMAGE [--source LINUX_SRC] [--json]`.

Says whether a kernel config can boot through PVH and the 64-bit boot
protocol, and which direct-boot options it lacks; with --source, the exact
options to switch on, computed and verified with kconfiglib.
"""

import argparse

EPILOG = """\
exit status:
  0  boots through PVH (CONFIG_PVH=y), 64-bit, every required option built in
  3  boots through PVH, but a required option is missing or only a module,
     or the kernel is 32-bit
  4  cannot boot through PVH (CONFIG_PVH is not set)
  1  error (unreadable file, not a config, no embedded config, bad --source)
  2  usage error

CONFIG_OR_IMAGE is a .config (any name: /boot/config-*, a fragment), or a
kernel image (vmlinux, bzImage) built with CONFIG_IKCONFIG=y.

--source LINUX_SRC loads that tree's Kconfig with kconfiglib (ARCH=x86, as
`make` uses on an x86 host) and prints, for PVH and for every missing required
option, the smallest set of CONFIG_ lines that makes it =y from this config,
verified by re-evaluating the tree. Append them to the .config and run
`make olddefconfig`.

--json prints one object: {"schema": "pvhboot-kconfig/1", "path", "origin",
"arch", "kernel_version", "verdict" ("ok"|"partial"|"no-pvh"), "exit_status",
"boot": {"pvh"|"linux64": {"ok", "detail", "option"}}, "options": [{"name",
"level" ("required"|"helpful"), "value" ("y"|"m"|"n"), "ok", "why", "note",
"also_needs"}], "initrd_codecs", "solver": null | {"source", "tree_version",
"pvh", "required", "per_option": {name: solution}}}; a solution is {"goals",
"already_set", "verified", "error", "set" (CONFIG_X=y lines), "side_effects",
"selected_by"}. See docs/kconfig.md.
"""


def register(sub):
    p = sub.add_parser(
        "kconfig",
        help="check that a kernel config can boot through PVH; say what to switch on",
        description="Check a kernel .config (or a kernel's embedded config) for PVH boot, "
        "the 64-bit boot protocol and the options a direct-boot VM needs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="CONFIG_OR_IMAGE", help=".config file or kernel image")
    p.add_argument(
        "--source",
        metavar="LINUX_SRC",
        help="Linux source tree: compute the exact options to switch on (kconfiglib)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    return p


def run(args) -> int:
    import json
    import sys

    from ..kconfig.check import check_config, format_report
    from ..kconfig.dotconfig import read_config

    if args.source is not None:
        # Fail on a wrong tree before reading anything else.
        from ..kconfig.solver import check_source_tree

        check_source_tree(args.source)
    cfg = read_config(args.config)
    report = check_config(cfg)
    solved = None
    if args.source is not None:
        from ..kconfig.advice import solve_report

        solved = solve_report(report, args.source)

    if args.json:
        from ..kconfig.advice import solved_json

        out = {"schema": "pvhboot-kconfig/1", **report.to_json()}
        out["solver"] = solved_json(solved, args.source) if solved is not None else None
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        text = format_report(report)
        if solved is not None:
            from ..kconfig.advice import format_solved

            text += "\n\n" + format_solved(solved, report, args.source)
        elif report.exit_status != 0:
            text += (
                "\nFor the exact options to switch on, run again with --source LINUX_SRC "
                "(a Linux tree, e.g. from scripts/fetch-linux-source)."
            )
        print(text)
    return report.exit_status
