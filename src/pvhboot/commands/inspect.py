"""`pvhboot inspect IMAGE [--json] [--config]`: say what a kernel image is.

Without --json it prints a table for a person: rich's tables on a terminal,
plain aligned text when stdout is a pipe or file (and rich is only imported
in the first case). --json prints the schema in docs/inspect-json.md. --config
alone prints the embedded .config as it is; --json --config adds it to the
JSON object as the string "config" (null when the kernel has none), so the
output stays one JSON document.
"""

from __future__ import annotations

import sys


def register(sub):
    p = sub.add_parser(
        "inspect",
        help="show a kernel image's format, entry points, compression, notes and config",
        description="Identify an ELF vmlinux, a bzImage (also PE/EFI) or a compressed ELF and "
        "report every entry point it offers (PVH, 64-bit Linux, Xen PV, EFI).",
    )
    p.add_argument("image", metavar="IMAGE", help="kernel image (vmlinux, bzImage, vmlinux.gz, ...)")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output (schema v1, docs/inspect-json.md)")
    p.add_argument("--config", action="store_true",
                   help="print the embedded .config (CONFIG_IKCONFIG) instead; with --json, "
                   'add it to the JSON object as "config" (null when there is none)')
    return p


def run(args) -> int:
    from ..errors import ImageError
    from ..image.kernel import open_image

    img = open_image(args.image)
    if args.json:
        import json

        doc = img.to_json()
        if args.config:
            # A new key, allowed by schema v1; the table's output is unchanged.
            doc["config"] = img.config_text()
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if args.config:
        text = img.config_text()
        if text is None:
            raise ImageError(f"{args.image} has no embedded config (the kernel was built without "
                             "CONFIG_IKCONFIG); look for a config-* file next to it")
        sys.stdout.write(text)
        return 0
    sections = report_sections(img)
    if sys.stdout.isatty():
        _print_rich(sections)
    else:
        sys.stdout.write(format_plain(sections))
    return 0


def _hex(v) -> str:
    return "-" if v is None else f"{v:#x}"


def _yes(v) -> str:
    return {True: "yes", False: "no", None: "unknown"}[v]


def report_sections(img) -> list[tuple[str, list[str], list[list[str]]]]:
    """[(title, column headers, rows)] shared by the plain and rich renderings."""
    ep = img.entry_points
    summary = [
        ["path", img.path],
        ["format", img.format],
        ["compression", img.compression or "-"],
        ["kernel version", img.kernel_version or "-"],
        ["PVH capable", _yes(img.pvh_capable)],
        ["embedded config", _yes(img.config_embedded)],
    ]
    if img.bzimage:
        summary.insert(3, ["boot protocol", img.bzimage.protocol_str])
    sections = [("Image", ["field", "value"], summary)]
    entries = [
        ["pvh", _hex(ep.pvh), "32-bit PVH entry (Xen note 18), physical"],
        ["linux64", _hex(ep.linux64), "64-bit Linux boot protocol entry, physical"],
        ["xen_pv", _hex(ep.xen_pv), "Xen PV entry (XEN_ELFNOTE_ENTRY), virtual"],
        ["efi_handover", _hex(ep.efi_handover), "EFI handover offset"],
        ["efi_pe", "yes" if ep.efi_pe else "no", "a PE image EFI firmware can start"],
    ]
    sections.append(("Entry points", ["entry", "address", "meaning"], entries))
    bz = img.bzimage
    if bz:
        rows = [
            ["setup_sects", str(bz.setup_sects)],
            ["loadflags", f"{bz.loadflags:#04x} " + " ".join(bz.loadflag_names)],
            ["xloadflags", f"{bz.xloadflags:#06x} " + " ".join(bz.xloadflag_names)],
            ["pref_address", _hex(bz.pref_address)],
            ["load address", _hex(bz.load_address)],
            ["init_size", f"{bz.init_size:#x} ({bz.init_size >> 10} KiB)"],
            ["kernel_alignment", _hex(bz.kernel_alignment)],
            ["relocatable", _yes(bz.relocatable)],
            ["handover_offset", _hex(bz.handover_offset)],
            ["cmdline_size", str(bz.cmdline_size)],
            ["initrd_addr_max", _hex(bz.initrd_addr_max)],
            ["protected-mode code", f"{bz.pm_offset:#x} (+{bz.pm_size} bytes)"],
            ["payload", f"{bz.payload_offset:#x} (+{bz.payload_length} bytes), "
                        f"{bz.codec or 'unknown codec'}"],
        ]
        sections.append(("bzImage setup header", ["field", "value"], rows))
    elf = img.elf
    if elf:
        title = "ELF" if img.format == "elf" else "Payload ELF"
        rows = [["class", f"ELF{elf.elf_class}"], ["machine", str(elf.machine)],
                ["e_entry", _hex(elf.entry)], ["entry (physical)", _hex(elf.entry_paddr)]]
        sections.append((title, ["field", "value"], rows))
        segs = [[_hex(s.paddr), _hex(s.vaddr), _hex(s.offset), _hex(s.filesz), _hex(s.memsz),
                 s.flags_str]
                for s in elf.load_segments]
        sections.append(("PT_LOAD segments",
                         ["paddr", "vaddr", "offset", "filesz", "memsz", "flags"], segs))
        notes = [[n.owner, str(n.type), n.type_name or "-", _desc(n.desc)] for n in elf.notes]
        sections.append(("Notes", ["owner", "type", "name", "descriptor"], notes))
    if img.warnings:
        sections.append(("Warnings", ["warning"], [[w] for w in img.warnings]))
    return sections


def _desc(desc: bytes, limit: int = 24) -> str:
    text = desc[:limit].hex()
    return text + ("..." if len(desc) > limit else "")


def format_plain(sections) -> str:
    out = []
    for title, headers, rows in sections:
        out.append(title)
        if not rows:
            out.append("  (none)")
            out.append("")
            continue
        table = [headers, *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
        for r in table:
            out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                       .rstrip())
        out.append("")
    return "\n".join(out)


def _print_rich(sections) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        sys.stdout.write(format_plain(sections))
        return
    console = Console(markup=False, highlight=False)
    for title, headers, rows in sections:
        table = Table(title=title, title_justify="left")
        for h in headers:
            table.add_column(h)
        for r in rows:
            table.add_row(*r)
        console.print(table)
