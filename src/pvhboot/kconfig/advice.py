"""Turning a :class:`ConfigReport` into solver goals, and solutions into text.

Three answers come out of one load of the Kconfig tree:

* ``pvh``: the options to switch on for ``CONFIG_PVH=y`` (the project's
  reason to exist);
* ``per_option``: the same for each missing required option on its own, and
  for each missing helpful option on top of the required set (so that, say,
  VIRTIO_BLK reaches VIRTIO through VIRTIO_MMIO rather than through whichever
  unrelated driver also selects it); only the lines beyond the required set
  are shown for those;
* ``required``: one combined set for PVH, 64-bit and every required option,
  ready to append to the .config.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from .check import HELPFUL, REQUIRED, ConfigReport
from .solver import Solution


@dataclass
class Solved:
    source: str
    tree_version: str
    pvh: Solution
    required: Solution
    per_option: dict[str, Solution]


def _goal_names(report: ConfigReport) -> tuple[list[str], list[str], list[str]]:
    required = ["PVH", "X86_64"] + [
        o.name for o in report.options if o.level == REQUIRED and o.name != "RD_*"
    ]
    missing = [p.option.name for p in (report.pvh, report.linux64) if not p.ok]
    missing += [o.name for o in report.options if o.level == REQUIRED and not o.ok]
    helpful = [
        o.name for o in report.options if o.level == HELPFUL and not o.ok and o.name != "RD_*"
    ]
    return required, missing, helpful


def solve_report(report: ConfigReport, source: str) -> Solved:
    from .solver import Solver, kernel_version, load_kconfig

    required, missing, helpful = _goal_names(report)
    kconf = load_kconfig(source)
    text = report.config.text
    with Solver(kconf, text) as solver:
        pvh = solver.solve([("PVH", "y")])
        req = solver.solve([(n, "y") for n in required])
        per_option = {name: solver.solve([(name, "y")]) for name in missing}
    if helpful:
        # Helpful options are solved on the config with the required lines
        # appended, so their answers are exactly the lines to add after those.
        base = text if req.error else text + "\n" + "\n".join(req.config_lines()) + "\n"
        with Solver(kconf, base) as solver:
            for name in helpful:
                sol = solver.solve([(name, "y")])
                sol.on_top_of_required = not req.error
                per_option[name] = sol
    return Solved(source, kernel_version(source), pvh, req, per_option)


def solved_json(solved: Solved, source: str) -> dict:
    return {
        "source": source,
        "tree_version": solved.tree_version,
        "pvh": solved.pvh.to_json(),
        "required": solved.required.to_json(),
        "per_option": {f"CONFIG_{k}": v.to_json() for k, v in solved.per_option.items()},
    }


def _config_arg(report: ConfigReport) -> str:
    cfg = report.config
    return ".config" if cfg.origin == "image" else shlex.quote(cfg.path)


def _block(sol: Solution, report: ConfigReport, source: str, indent: str = "  ") -> list[str]:
    if sol.error:
        return [f"{indent}no answer: {sol.error}"]
    lines = [f"{indent}{line}" for line in sol.config_lines()]
    script = shlex.quote(os.path.join(source, "scripts", "config"))
    lines.append(f"{indent}or run: {sol.scripts_config(_config_arg(report), script)}")
    lines.append(f"{indent}then `make olddefconfig` with it as the build's .config")
    if sol.side_effects:
        names = ", ".join(n for n, _, _ in sol.side_effects[:6])
        more = f" and {len(sol.side_effects) - 6} more" if len(sol.side_effects) > 6 else ""
        lines.append(
            f"{indent}(their defaults and selects also switch on {names}{more})"
        )
    if not sol.verified:
        lines.append(f"{indent}WARNING: kconfiglib did not confirm this set")
    return lines


def format_solved(solved: Solved, report: ConfigReport, source: str) -> str:
    version = f" (Linux {solved.tree_version})" if solved.tree_version else ""
    out = [f"Kconfig tree {source}{version}, evaluated with kconfiglib:"]
    cfg_version = report.config.kernel_version
    if cfg_version and solved.tree_version and not _same_series(cfg_version, solved.tree_version):
        out.append(
            f"  note: the config is for {cfg_version}, the tree is {solved.tree_version}; "
            "options that differ between them are ignored"
        )
    out.append("")
    pvh = solved.pvh
    if pvh.already:
        out.append("CONFIG_PVH is already y: nothing to switch on for the PVH entry.")
    else:
        out.append("To boot through PVH, append to the config:")
        out.extend(_block(pvh, report, source))
    selectors = [s for s in pvh.selectors.get("PVH", [])]
    if selectors:
        sel = ", ".join(f"CONFIG_{s}" for s in selectors)
        out.append(
            f"CONFIG_PVH is also selected by {sel}, but PVH alone is enough: "
            "no Xen support is needed."
        )
    for title, extra in (
        ("Per missing required option (each on its own):", False),
        ("Per missing helpful option (lines beyond the required set below):", True),
    ):
        group = {
            k: v
            for k, v in solved.per_option.items()
            if k != "PVH" and v.on_top_of_required == extra
        }
        if not group:
            continue
        out.append("")
        out.append(title)
        for name, sol in group.items():
            if sol.error:
                out.append(f"  CONFIG_{name}: no answer: {sol.error}")
            else:
                out.append(f"  CONFIG_{name}: " + " ".join(sol.config_lines()))
    req = solved.required
    out.append("")
    if req.already:
        out.append("Every required option is already y.")
    else:
        out.append("Everything required (PVH, 64-bit, console, initrd, devtmpfs, virtio-mmio):")
        out.extend(_block(req, report, source))
    return "\n".join(out)


def _same_series(a: str, b: str) -> bool:
    return a.split(".")[:2] == b.split(".")[:2]
