"""Static config checks on small synthetic configs (no kernel tree)."""

from __future__ import annotations

import gzip
import os

import pytest

from pvhboot.errors import ConfigError
from pvhboot.kconfig import (
    EXIT_NO_PVH,
    EXIT_OK,
    EXIT_PARTIAL,
    OPTIONS,
    check_config,
    format_report,
    parse_config_text,
    read_config,
)
from pvhboot.kconfig.check import REQUIRED

HEADER = "#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86 6.1.192 Kernel Configuration\n#\n"

GOOD = {
    "64BIT": "y",
    "X86_64": "y",
    "HYPERVISOR_GUEST": "y",
    "PVH": "y",
    "TTY": "y",
    "SERIAL_8250": "y",
    "SERIAL_8250_CONSOLE": "y",
    "BLK_DEV_INITRD": "y",
    "RD_GZIP": "y",
    "DEVTMPFS": "y",
    "VIRTIO_MENU": "y",
    "VIRTIO_MMIO": "y",
    "VIRTIO_MMIO_CMDLINE_DEVICES": "y",
}


def make_config(values: dict[str, str], header: str = HEADER) -> str:
    lines = [header]
    for name, value in values.items():
        lines.append(f"# CONFIG_{name} is not set" if value == "n" else f"CONFIG_{name}={value}")
    return "\n".join(lines) + "\n"


def report_for(values: dict[str, str]):
    return check_config(parse_config_text(make_config(values), "test.config"))


def test_parse_values_kinds_and_header():
    text = make_config({"A": "y", "B": "m", "C": "n"}) + 'CONFIG_S="a b"\nCONFIG_N=0x10\n'
    cfg = parse_config_text(text, "x")
    assert cfg.values == {"A": "y", "B": "m", "C": "n", "S": '"a b"', "N": "0x10"}
    assert cfg.tristate("S") == "n" and cfg.tristate("B") == "m" and cfg.tristate("ZZ") == "n"
    assert (cfg.arch, cfg.kernel_version) == ("x86", "6.1.192")


def test_last_assignment_wins_like_kconfig():
    cfg = parse_config_text("# CONFIG_PVH is not set\nCONFIG_PVH=y\n")
    assert cfg.is_on("PVH")
    assert cfg.duplicates == ["PVH"]


def test_good_config_exit_ok():
    report = report_for(GOOD)
    assert report.pvh.ok and report.linux64.ok
    assert report.required_missing == []
    assert report.exit_status == EXIT_OK
    assert report.initrd_codecs == ["GZIP"]
    assert "exit status 0" in format_report(report)


def test_no_pvh_is_exit_4_and_says_no_xen_needed():
    values = dict(GOOD, PVH="n", HYPERVISOR_GUEST="n")
    report = report_for(values)
    assert not report.pvh.ok
    assert report.exit_status == EXIT_NO_PVH
    assert "no Xen needed" in report.pvh.detail
    assert report.pvh.option.missing_needs == ["HYPERVISOR_GUEST"]


def test_xen_pvh_noted_when_it_selects_pvh():
    report = report_for(dict(GOOD, XEN_PVH="y"))
    assert report.pvh.ok and "XEN_PVH" in report.pvh.detail


@pytest.mark.parametrize("name", [o.name for o in OPTIONS if o.level == REQUIRED])
def test_each_missing_required_option_is_partial_with_a_reason(name):
    report = report_for(dict(GOOD, **{name: "n"}))
    assert report.pvh.ok
    assert report.exit_status == EXIT_PARTIAL
    missing = [o.name for o in report.required_missing]
    assert name in missing
    text = format_report(report)
    status = next(o for o in report.options if o.name == name)
    assert status.why and status.why in text
    assert status.why.endswith(".") and status.why.count(". ") == 0  # one sentence


def test_module_counts_as_missing_with_a_note():
    report = report_for(dict(GOOD, VIRTIO_MMIO="m"))
    status = next(o for o in report.options if o.name == "VIRTIO_MMIO")
    assert status.value == "m" and not status.ok
    assert "module" in status.note
    assert report.exit_status == EXIT_PARTIAL
    assert "[mod ] CONFIG_VIRTIO_MMIO=m" in format_report(report)


def test_a_dependency_built_as_a_module_is_not_called_off():
    # Debian's cloud config: VIRTIO_MMIO=m, VIRTIO_BLK=m, CMDLINE_DEVICES unset.
    report = report_for(dict(GOOD, VIRTIO_MMIO="m", VIRTIO_MMIO_CMDLINE_DEVICES="n"))
    text = format_report(report)
    assert "CONFIG_VIRTIO_MMIO (a module here)" in text
    assert "CONFIG_VIRTIO_MMIO (off here)" not in text
    report = report_for(dict(GOOD, VIRTIO_MMIO="n", VIRTIO_MMIO_CMDLINE_DEVICES="n"))
    assert "CONFIG_VIRTIO_MMIO (off here)" in format_report(report)


def test_32bit_is_partial():
    report = report_for(dict(GOOD, **{"64BIT": "n", "X86_64": "n"}))
    assert report.pvh.ok and not report.linux64.ok
    assert report.exit_status == EXIT_PARTIAL


def test_no_initrd_codec_flagged_helpful():
    report = report_for(dict(GOOD, RD_GZIP="n"))
    rd = next(o for o in report.options if o.name == "RD_*")
    assert not rd.ok and rd.level == "helpful"
    assert report.exit_status == EXIT_OK  # helpful options never change the verdict


def test_json_shape():
    out = report_for(dict(GOOD, DEVTMPFS="n")).to_json()
    assert out["verdict"] == "partial" and out["exit_status"] == EXIT_PARTIAL
    assert set(out["boot"]) == {"pvh", "linux64"}
    dev = next(o for o in out["options"] if o["name"] == "CONFIG_DEVTMPFS")
    assert dev["ok"] is False and dev["value"] == "n" and dev["why"]
    assert out["initrd_codecs"] == ["gzip"]


# -- reading files -----------------------------------------------------------


def test_read_config_by_content_not_name(tmp_path):
    p = tmp_path / "config-6.1.0-foo"
    p.write_text(make_config(GOOD))
    cfg = read_config(str(p))
    assert cfg.origin == "config" and cfg.is_on("PVH")


def test_no_config_lines_is_one_clear_error(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello\nworld\n")
    with pytest.raises(ConfigError, match="no CONFIG_ lines.*CONFIG_IKCONFIG=y"):
        read_config(str(p))


def test_empty_file(tmp_path):
    p = tmp_path / "empty"
    p.write_bytes(b"")
    with pytest.raises(ConfigError, match="empty"):
        read_config(str(p))


def test_binary_garbage_is_neither(tmp_path):
    p = tmp_path / "garbage"
    p.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ConfigError, match="neither a kernel .config nor"):
        read_config(str(p))


def test_embedded_config_found_in_raw_blob(tmp_path):
    # An unknown wrapper holding the kernel/configs.c markers around a gzip.
    text = make_config(GOOD)
    blob = b"\0" * 100 + b"IKCFG_ST" + gzip.compress(text.encode()) + b"IKCFG_ED" + b"\0" * 50
    p = tmp_path / "blob"
    p.write_bytes(blob)
    cfg = read_config(str(p))
    assert cfg.origin == "image" and cfg.is_on("PVH")


def test_garbled_marker_copy_is_skipped(tmp_path):
    text = make_config(GOOD)
    good = b"IKCFG_ST" + gzip.compress(text.encode()) + b"IKCFG_ED"
    blob = b"\0IKCFG_ST\x1f\x8bnot gzip at allIKCFG_ED\0" + good
    p = tmp_path / "blob"
    p.write_bytes(blob)
    assert read_config(str(p)).is_on("SERIAL_8250")


def test_directory_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="directory"):
        read_config(str(tmp_path))



def test_fifo_and_device_are_refused_without_reading(tmp_path):
    # open() of a FIFO blocks until a writer comes: refused from its stat.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        with pytest.raises(ConfigError, match="not a regular file"):
            read_config(path)

def test_non_x86_config_says_so():
    text = make_config({"PVH": "n"}, header="# Linux/arm64 6.1.0 Kernel Configuration\n")
    report = check_config(parse_config_text(text))
    assert report.exit_status == EXIT_NO_PVH
    assert "Linux/arm64" in report.pvh.detail and "x86 kernels only" in report.pvh.detail


def test_latin1_config_is_still_a_config(tmp_path):
    p = tmp_path / ".config"
    p.write_bytes(make_config(GOOD).encode() + b'CONFIG_LOCALVERSION="-caf\xe9"\n')
    cfg = read_config(str(p))
    assert cfg.is_on("PVH") and cfg.get("LOCALVERSION").startswith('"-caf')


def test_fuzz_read_config_only_raises_pvhboot_errors():
    # Any bytes: a parsed config, or one of our one-line errors; never a raw
    # ValueError/IndexError/zlib.error from the sniffing or the IKCONFIG scan.
    hypothesis = pytest.importorskip("hypothesis")
    import tempfile

    from hypothesis import strategies as st

    from pvhboot.errors import PvhbootError

    prefixes = st.sampled_from([b"", b"CONFIG_PVH=y\n", b"\x7fELF", b"IKCFG_ST\x1f\x8b", b"MZ"])

    # Other test runs share this 2-core machine: slowness is not a failure.
    @hypothesis.settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )
    @hypothesis.given(prefix=prefixes, body=st.binary(max_size=2048))
    def check(prefix, body):
        with tempfile.NamedTemporaryFile() as f:
            f.write(prefix + body)
            f.flush()
            try:
                cfg = read_config(f.name)
            except PvhbootError as exc:
                assert "\n" not in str(exc)
            else:
                assert cfg.values

    check()
