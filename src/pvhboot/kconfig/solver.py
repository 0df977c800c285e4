"""Which options to switch on, computed from the real Kconfig tree.

`kconfiglib` (imported lazily: it is slow to import and only this command
needs it) loads the tree the way `make` on an x86 host does (ARCH=x86,
SRCARCH=x86: the config's own CONFIG_64BIT decides 32 or 64 bit), loads the
user's config, and then:

1. *plans*: for each goal (say PVH=y) it walks the symbol's visibility (its
   prompt condition, which already holds every `depends on` and the
   enclosing `if`/`menu` conditions), its defaults for prompt-less symbols,
   and its reverse dependencies (`select`) when there is no prompt, down to
   symbols the user can set; ORs take the cheapest branch, NOTs ask for a
   symbol to be switched off;
2. *applies* the plan with ``set_value`` and re-evaluates, repeating until
   every goal holds (a plan made on the old values can need a second round);
3. *minimises*: drops each assignment in turn, reloading the config, and
   keeps the drop when the goals still hold, so every line printed is
   needed;
4. *verifies* the final list from a fresh load of the config.

A symbol with a prompt is preferred over its selectors: for PVH that means
``HYPERVISOR_GUEST=y PVH=y``, not Xen's ``XEN_PVH``, which only selects PVH.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import ConfigError

# kconfiglib 14.1 predates the bare `modules` attribute that replaced
# `option modules` in Linux 5.13 (kernel/module/Kconfig in 6.1 uses it); we
# rewrite that one line while reading Kconfig files.
_BARE_MODULES = re.compile(r"^(\s*)modules\s*$", re.M)

# Bounds on the search; real goals take a few dozen plan steps. They stop a
# pathological tree (or a bug) from running forever.
_MAX_PLAN_STEPS = 200_000
_MAX_ROUNDS = 25

TRI = {"n": 0, "m": 1, "y": 2}
TRI_STR = ("n", "m", "y")


@dataclass
class Solution:
    goals: list[tuple[str, str]]  # (NAME, "y"|"m")
    assignments: list[tuple[str, str]] = field(default_factory=list)  # (NAME, value), in order
    verified: bool = False
    already: bool = False  # every goal held before any change
    error: str | None = None  # why no solution was found
    side_effects: list[tuple[str, str, str]] = field(default_factory=list)  # name, old, new
    selectors: dict[str, list[str]] = field(default_factory=dict)  # goal -> symbols selecting it
    # True when solved together with the required set and `assignments`
    # holds only the lines beyond it (see advice.py).
    on_top_of_required: bool = False

    def config_lines(self) -> list[str]:
        return [f"CONFIG_{name}={value}" for name, value in self.assignments]

    def scripts_config(self, config_path: str = ".config", script: str = "scripts/config") -> str:
        """The same changes as a scripts/config command line."""
        flags = {"y": "--enable", "m": "--module", "n": "--disable"}
        parts = [f"{flags[v]} {name}" for name, v in self.assignments]
        return f"{script} --file {config_path} " + " ".join(parts)

    def to_json(self) -> dict:
        return {
            "goals": [f"CONFIG_{n}={v}" for n, v in self.goals],
            "already_set": self.already,
            "verified": self.verified,
            "error": self.error,
            "set": self.config_lines(),
            "side_effects": [
                {"name": f"CONFIG_{n}", "from": old, "to": new} for n, old, new in self.side_effects
            ],
            "selected_by": {f"CONFIG_{k}": [f"CONFIG_{s}" for s in v] for k, v in self.selectors.items()},
            "on_top_of_required": self.on_top_of_required,
        }


def kernel_version(srctree: str) -> str:
    """VERSION.PATCHLEVEL.SUBLEVEL[EXTRAVERSION] from the tree's Makefile."""
    fields = {}
    try:
        with open(os.path.join(srctree, "Makefile"), encoding="utf-8", errors="replace") as f:
            for _, line in zip(range(20), f, strict=False):
                m = re.match(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=\s*(\S*)", line)
                if m:
                    fields[m.group(1)] = m.group(2)
    except OSError:
        pass
    if "VERSION" not in fields or "PATCHLEVEL" not in fields:
        return ""
    v = f"{fields['VERSION']}.{fields['PATCHLEVEL']}.{fields.get('SUBLEVEL') or 0}"
    return v + fields.get("EXTRAVERSION", "")


def check_source_tree(srctree: str) -> None:
    """ConfigError unless ``srctree`` is the top of a Linux tree with x86 Kconfig."""
    for rel in ("Kconfig", "arch/x86/Kconfig", "Makefile"):
        if not os.path.isfile(os.path.join(srctree, rel)):
            raise ConfigError(
                f"{srctree} is not a Linux source tree (no {rel}): pass the top directory "
                "of a kernel tree to --source, e.g. the output of scripts/fetch-linux-source"
            )


@contextlib.contextmanager
def _kconfig_env(srctree: str) -> Iterator[None]:
    """The variables the top Makefile exports to Kconfig, set for the load only."""
    cc = os.environ.get("CC") or "gcc"
    env = {
        "srctree": srctree,
        "ARCH": "x86",
        "SRCARCH": "x86",
        "KERNELVERSION": kernel_version(srctree),
        "CC": cc,
        "LD": os.environ.get("LD") or "ld",
        "HOSTCC": os.environ.get("HOSTCC") or "gcc",
        "HOSTCXX": os.environ.get("HOSTCXX") or "g++",
        "CC_VERSION_TEXT": _cc_version_text(cc),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cc_version_text(cc: str) -> str:
    # init/Kconfig's CC_VERSION_TEXT is the first line of `$CC --version`.
    if not shutil.which(cc):
        return ""
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.split("\n", 1)[0]


def load_kconfig(srctree: str):
    """Parse ``srctree``'s Kconfig tree with kconfiglib; ConfigError on failure."""
    check_source_tree(srctree)
    try:
        import kconfiglib
    except ImportError:
        raise ConfigError(
            "--source needs kconfiglib, which is not installed: pip install kconfiglib"
        ) from None

    class _Kconfig(kconfiglib.Kconfig):
        def _open(self, filename, mode):
            f = super()._open(filename, mode)
            if mode == "r" and os.path.basename(filename).startswith("Kconfig"):
                with f:
                    return io.StringIO(_BARE_MODULES.sub(r"\1option modules", f.read()))
            return f

    srctree = os.path.abspath(srctree)
    with _kconfig_env(srctree):
        try:
            kconf = _Kconfig(
                os.path.join(srctree, "Kconfig"), warn=False, warn_to_stderr=False
            )
        except kconfiglib.KconfigError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "parse error"
            raise ConfigError(
                f"kconfiglib cannot read the Kconfig tree in {srctree}: {first}"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the Kconfig tree in {srctree}: {exc}") from None
    kconf.warn = False
    return kconf


class Solver:
    """Plans, applies, minimises and verifies option changes on one config."""

    def __init__(self, kconf, config_text: str):
        import kconfiglib

        self.k = kconf
        self.kl = kconfiglib
        self._tmp = tempfile.NamedTemporaryFile(
            "w", prefix="pvhboot-kconfig-", suffix=".config", delete=False
        )
        with self._tmp:
            self._tmp.write(config_text)
        self.reset()
        self.original = self._snapshot()
        self._steps = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._tmp.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- state ---------------------------------------------------------------
    def reset(self) -> None:
        """Back to the user's config, with no change applied."""
        self.k.load_config(self._tmp.name, replace=True)

    def _snapshot(self) -> dict[str, str]:
        return {s.name: s.str_value for s in self.k.unique_defined_syms}

    def _apply(self, assignments) -> None:
        for name, value in assignments:
            sym = self.k.syms[name]
            if sym.choice is not None and TRI[value] == 2:
                sym.choice.set_value(2)
            sym.set_value(value)

    def value(self, name: str) -> int:
        sym = self.k.syms.get(name)
        return sym.tri_value if sym is not None else 0

    def _met(self, goals) -> bool:
        return all(self.value(n) >= TRI[v] for n, v in goals)

    def has_symbol(self, name: str) -> bool:
        sym = self.k.syms.get(name)
        return sym is not None and bool(sym.nodes)

    def selectors(self, name: str) -> list[str]:
        target = self.k.syms.get(name)
        if target is None:
            return []
        return sorted(
            s.name
            for s in self.k.unique_defined_syms
            if any(sel is target for sel, _ in s.selects)
        )

    # -- solving -------------------------------------------------------------
    def solve(self, goals: list[tuple[str, str]]) -> Solution:
        sol = Solution(goals=list(goals))
        for name, _ in goals:
            if not self.has_symbol(name):
                sol.error = f"CONFIG_{name} does not exist in this Kconfig tree"
                return sol
            sel = self.selectors(name)
            if sel:
                sol.selectors[name] = sel
        self.reset()
        if self._met(goals):
            sol.already = sol.verified = True
            return sol
        assignments: dict[str, str] = {}
        for _ in range(_MAX_ROUNDS):
            if self._met(goals):
                break
            self._steps = 0
            self._memo: dict = {}
            plan: list[tuple[object, int]] = []
            for name, want in goals:
                step = self._plan_sym(self.k.syms[name], TRI[want], frozenset())
                if step is None:
                    sol.error = self._why_not(name, want)
                    return sol
                plan = _merge(plan, step)
                if plan is None:
                    sol.error = f"CONFIG_{name}={want} conflicts with another goal"
                    return sol
            if not plan:
                sol.error = f"no change found that makes {_goal_str(goals)} hold"
                return sol
            changed = False
            for sym, val in plan:
                text = TRI_STR[val]
                if assignments.get(sym.name) != text:
                    assignments.pop(sym.name, None)
                    assignments[sym.name] = text
                    changed = True
                self._apply([(sym.name, text)])
            if not changed and not self._met(goals):
                sol.error = f"the changes found do not make {_goal_str(goals)} hold"
                return sol
        else:
            sol.error = f"gave up after {_MAX_ROUNDS} rounds looking for {_goal_str(goals)}"
            return sol
        if not self._met(goals):
            sol.error = f"the changes found do not make {_goal_str(goals)} hold"
            return sol
        sol.assignments = self._minimise(list(assignments.items()), goals)
        self.reset()
        self._apply(sol.assignments)
        sol.verified = self._met(goals)
        after = self._snapshot()
        touched = {n for n, _ in sol.assignments}
        sol.side_effects = [
            (n, self.original.get(n, ""), v)
            for n, v in after.items()
            if v != self.original.get(n, "") and n not in touched and v in ("y", "m")
        ]
        self.reset()
        return sol

    def _minimise(self, assignments, goals):
        # Drop assignments that do not change the user's value first, then try
        # removing each remaining one: keep it only if the goals need it.
        kept = [(n, v) for n, v in assignments if self.original.get(n) != v or n in dict(goals)]
        for item in list(reversed(kept)):
            trial = [a for a in kept if a != item]
            self.reset()
            self._apply(trial)
            if self._met(goals):
                kept = trial
        return kept

    def _why_not(self, name: str, want: str) -> str:
        sym = self.k.syms[name]
        dep = self.kl.expr_str(sym.direct_dep)
        return (
            f"found no set of options that makes CONFIG_{name}={want} from this config "
            f"(it depends on: {dep})"
        )

    # -- planning ------------------------------------------------------------
    # A plan is a list of (Symbol, tristate value) to set, dependencies first,
    # or None when no way was found. Plans are made on the current values.
    def _tick(self) -> bool:
        self._steps += 1
        return self._steps <= _MAX_PLAN_STEPS

    def _plan_sym(self, sym, want: int, stack: frozenset):
        if sym.tri_value >= want:
            return []
        if sym.is_constant or sym in stack or not self._tick():
            return None
        key = ("on", sym, want)
        if key in self._memo:
            return self._memo[key]
        stack = stack | {sym}
        kl = self.kl
        # `type`, not `orig_type`: with MODULES off a tristate is a bool.
        bool_like = sym.type == kl.BOOL or sym.choice is not None
        if sym.orig_type not in (kl.BOOL, kl.TRISTATE):
            self._memo[key] = None
            return None
        # Visibility of a bool is promoted from m to y, so m suffices there.
        vis_need = 1 if bool_like else want
        # ...and a bool cannot hold m: asking it for "at least m" means y.
        set_to = 2 if bool_like else want
        best = None

        prompts = [node.prompt[1] for node in sym.nodes if node.prompt]
        if sym.choice is not None:
            # A choice member: make the choice (and the member's prompt)
            # visible, then pick the member.
            ch_conds = [node.prompt[1] for node in sym.choice.nodes if node.prompt]
            ch_plan = self._plan_any(ch_conds, 1)
            own = self._plan_any(prompts, 1) if prompts else []
            if ch_plan is not None and own is not None:
                best = _merge(_merge(ch_plan, own) or [], [(sym, 2)])
        elif prompts:
            vis = self._plan_any(prompts, vis_need)
            if vis is not None:
                best = _merge(vis, [(sym, set_to)])
        if best is None and sym.choice is None:
            # No usable prompt: a default that the dependencies switch on, or
            # a symbol that selects this one.
            for value_expr, cond in sym.defaults:
                cand = self._plan_all(
                    [cond, sym.direct_dep, value_expr], [vis_need, vis_need, set_to]
                )
                best = _shorter(best, cand)
            for term in _or_terms(sym.rev_dep, kl):
                best = _shorter(best, self._plan_expr(term, want, stack))
        self._memo[key] = best
        return best

    def _plan_any(self, exprs, want: int):
        best = None
        for e in exprs:
            best = _shorter(best, self._plan_expr(e, want, frozenset()))
        return best

    def _plan_all(self, exprs, wants):
        plan: list | None = []
        for e, w in zip(exprs, wants, strict=True):
            step = self._plan_expr(e, w, frozenset())
            if step is None:
                return None
            plan = _merge(plan, step)
            if plan is None:
                return None
        return plan

    def _plan_expr(self, expr, want: int, stack: frozenset):
        kl = self.kl
        if kl.expr_value(expr) >= want:
            return []
        if not self._tick():
            return None
        if isinstance(expr, kl.Symbol):
            return self._plan_sym(expr, want, stack)
        if isinstance(expr, kl.Choice):
            conds = [node.prompt[1] for node in expr.nodes if node.prompt]
            return self._plan_any(conds, want)
        op = expr[0]
        if op is kl.AND:
            a = self._plan_expr(expr[1], want, stack)
            b = self._plan_expr(expr[2], want, stack) if a is not None else None
            return _merge(a, b) if a is not None and b is not None else None
        if op is kl.OR:
            return _shorter(
                self._plan_expr(expr[1], want, stack), self._plan_expr(expr[2], want, stack)
            )
        if op is kl.NOT:
            return self._plan_off(expr[1], 2 - want, stack)
        if op in (kl.EQUAL, kl.UNEQUAL):
            return self._plan_compare(op, expr[1], expr[2], stack)
        return None

    def _plan_compare(self, op, a, b, stack):
        kl = self.kl
        if a.is_constant and not b.is_constant:
            a, b = b, a
        if not b.is_constant or b.name not in TRI or a.orig_type not in (kl.BOOL, kl.TRISTATE):
            return None
        target = TRI[b.name]
        if op is kl.EQUAL:
            if target == 0:
                return self._plan_off(a, 0, stack)
            plan = self._plan_sym(a, target, stack)
            if plan is not None and target == 1 and a.tri_value == 2:
                return None
            return plan
        # UNEQUAL: "X != n" means X on; "X != y" means at most m.
        if target == 0:
            return self._plan_sym(a, 1, stack)
        if target == 2:
            return self._plan_off(a, 1, stack)
        return None

    def _plan_off(self, expr, maxval: int, stack: frozenset):
        """Make ``expr`` evaluate to at most ``maxval``."""
        kl = self.kl
        if kl.expr_value(expr) <= maxval:
            return []
        if not self._tick():
            return None
        if isinstance(expr, kl.Symbol):
            sym = expr
            if sym.is_constant or sym.choice is not None:
                return None
            if kl.expr_value(sym.rev_dep) > maxval:
                return None  # something selects it: switching that off is out of scope
            if sym.visibility and maxval in sym.assignable:
                return [(sym, maxval)]
            return None
        if isinstance(expr, kl.Choice):
            return None
        op = expr[0]
        if op is kl.NOT:
            return self._plan_expr(expr[1], 2 - maxval, stack)
        if op is kl.AND:
            return _shorter(
                self._plan_off(expr[1], maxval, stack), self._plan_off(expr[2], maxval, stack)
            )
        if op is kl.OR:
            a = self._plan_off(expr[1], maxval, stack)
            b = self._plan_off(expr[2], maxval, stack) if a is not None else None
            return _merge(a, b) if a is not None and b is not None else None
        return None


def _goal_str(goals) -> str:
    return " ".join(f"CONFIG_{n}={v}" for n, v in goals)


def _or_terms(expr, kl) -> list:
    if isinstance(expr, tuple) and expr[0] is kl.OR:
        return _or_terms(expr[1], kl) + _or_terms(expr[2], kl)
    return [expr]


def _shorter(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return b if len(b) < len(a) else a


def _merge(a, b):
    """Concatenate two plans. One symbol asked for m and for y gets y; asked
    to be off and on, the plans conflict (None)."""
    if a is None or b is None:
        return None
    out = list(a)
    index = {sym: i for i, (sym, _) in enumerate(out)}
    for sym, val in b:
        if sym not in index:
            index[sym] = len(out)
            out.append((sym, val))
            continue
        old = out[index[sym]][1]
        if (old == 0) != (val == 0):
            return None
        out[index[sym]] = (sym, max(old, val))
    return out
