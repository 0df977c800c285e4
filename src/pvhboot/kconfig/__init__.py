"""Kernel config checks (`pvhboot kconfig`): what a .config needs to boot
through PVH in a pvhboot VM, and, with a Linux tree, the exact options to
switch on (computed with kconfiglib, imported lazily)."""

from .check import (
    EXIT_NO_PVH,
    EXIT_OK,
    EXIT_PARTIAL,
    OPTIONS,
    ConfigReport,
    check_config,
    format_report,
)
from .dotconfig import DotConfig, parse_config_text, read_config

__all__ = [
    "EXIT_NO_PVH",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "OPTIONS",
    "ConfigReport",
    "DotConfig",
    "check_config",
    "format_report",
    "parse_config_text",
    "read_config",
]
