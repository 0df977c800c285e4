"""Turning a :class:`ConfigReport` into solver goals, and solutions into text.

Three answers come out of one load of the Kconfig tree:

* ``pvh``: the options to switch on for ``CONFIG_PVH=y`` (the project's
  reason to exist);
* ``per_option``: the same for each missing option, required or helpful;
* ``required``: one combined set for PVH, 64-bit and every required option,
  ready to append to the .config.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from .check import REQUIRED, ConfigReport
from .solver import Solution


@dataclass
class Solved:
    source: str
    tree_version: str
    pvh: Solution
    required: Solution
    per_option: dict[str, Solution]


def _goal_names(report: ConfigReport) -> tuple[list[str], list[str]]:
    required = ["PVH", "X86_64"] + [
        o.name for o in report.options if o.level == REQUIRED and o.name != "RD_*"
    ]
    missing = [p.option.name for p in (report.pvh, report.linux64) if not p.ok]
    missing += [o.name for o in report.options if not o.ok and o.name != "RD_*"]
    return required, missing


def solve_report(report: ConfigReport, source: str) -> Solved:
    from .solver import solve_for_config

    required, missing = _goal_names(report)
    goal_sets = {"pvh": [("PVH", "y")], "required": [(n, "y") for n in required]}
    for name in missing:
        goal_sets[f"option:{name}"] = [(name, "y")]
    solutions, version = solve_for_config(source, report.config.text, goal_sets)
    per_option = {k.split(":", 1)[1]: v for k, v in solutions.items() if k.startswith("option:")}
    return Solved(source, version, solutions["pvh"], solutions["required"], per_option)


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
    others = {k: v for k, v in solved.per_option.items() if k != "PVH"}
    if others:
        out.append("")
        out.append("Per missing option (each on its own):")
        for name, sol in others.items():
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
