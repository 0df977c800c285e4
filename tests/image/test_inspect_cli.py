"""`pvhboot inspect` as a user runs it: table, --json, --config, and one-line errors."""

from __future__ import annotations

import gzip
import json

import pytest

CONFIG = b"CONFIG_PVH=y\nCONFIG_SERIAL_8250_CONSOLE=y\n"


def assert_one_line_error(proc, *words):
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    lines = err.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("pvhboot: error: "), err
    for w in words:
        assert w in lines[0], err


@pytest.fixture
def bzimage_file(tmp_path, codec_bzimage):
    data, _ = codec_bzimage("gzip", pe=True, config=CONFIG)
    path = tmp_path / "vmlinuz"
    path.write_bytes(data)
    return path


def test_json(cli, bzimage_file):
    proc = cli("inspect", "--json", bzimage_file)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["path"] == str(bzimage_file)
    assert doc["format"] == "bzimage" and doc["compression"] == "gzip"
    assert doc["entry_points"]["pvh"] == 0x1000850 and doc["entry_points"]["efi_pe"] is True
    assert doc["config_embedded"] is True


def test_table_when_not_a_terminal(cli, bzimage_file):
    proc = cli("inspect", bzimage_file)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "\x1b[" not in out  # plain text in a pipe: no colour codes, no rich
    for text in ("bzimage", "gzip", "2.15", "0x1000850", "XEN_ELFNOTE_PHYS32_ENTRY",
                 "XLF_KERNEL_64", "PT_LOAD"):
        assert text in out, text


def test_config(cli, bzimage_file):
    proc = cli("inspect", "--config", bzimage_file)
    assert proc.returncode == 0
    assert proc.stdout == CONFIG


def test_config_missing(cli, tmp_path, make_pvh_elf):
    path = tmp_path / "vmlinux"
    path.write_bytes(make_pvh_elf())
    assert_one_line_error(cli("inspect", "--config", path), "no embedded config")


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", ["empty"]),
        (b"just some text\n" * 100, ["not a kernel image"]),
        (b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\xff" * 48, ["program header"]),
        (gzip.compress(b"not an elf" * 50), ["ELF"]),
    ],
)
def test_bad_input_is_one_line(cli, tmp_path, content, words):
    path = tmp_path / "bad"
    path.write_bytes(content)
    assert_one_line_error(cli("inspect", path), *words)
    assert_one_line_error(cli("inspect", "--json", path), *words)


def test_payload_outside_the_file(cli, tmp_path, make_bzimage):
    path = tmp_path / "bz"
    path.write_bytes(make_bzimage(b"\x1f\x8b\x08" + bytes(60), payload_offset=1 << 28))
    assert_one_line_error(cli("inspect", path), "outside")


def test_truncated_bzimage(cli, tmp_path, codec_bzimage):
    data, _ = codec_bzimage("zstd")
    path = tmp_path / "bz"
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli("inspect", path))


def test_missing_file(cli, tmp_path):
    assert_one_line_error(cli("inspect", tmp_path / "nope"), "nope")


def test_usage_error_exit_status(cli):
    proc = cli("inspect")
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr


@pytest.mark.kernel
def test_debian_cloud_kernel_json(cli, debian_cloud_kernel):
    proc = cli("inspect", "--json", debian_cloud_kernel.vmlinuz)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["compression"] == "lz4" and doc["boot_protocol"] == "2.15"
    assert doc["pvh_capable"] is True and doc["entry_points"]["pvh"]


def test_schema_doc_lists_every_key(make_pvh_elf, codec_bzimage):
    """docs/inspect-json.md documents each key to_json() emits (top level and nested)."""
    from pathlib import Path

    from pvhboot.image.kernel import image_from_buffer

    doc = (Path(__file__).resolve().parents[2] / "docs" / "inspect-json.md").read_text()
    data, _ = codec_bzimage("gzip")
    out = image_from_buffer(data).to_json()
    keys = set(out) | set(out["entry_points"]) | set(out["bzimage"]) | set(out["elf"])
    keys |= set(out["load_segments"][0]) | set(out["notes"][0])
    missing = sorted(k for k in keys if f"`{k}`" not in doc and f'"{k}"' not in doc)
    assert not missing, f"undocumented JSON keys: {missing}"


# --- files that are not regular files: refused by name and kind, never read ---


def test_fifo_is_refused_without_blocking(cli, tmp_path):
    import os

    fifo = tmp_path / "kernel.fifo"
    os.mkfifo(fifo)
    # Before the fix, open() waited for a writer forever; the timeout turns that into a failure.
    proc = cli("inspect", fifo, timeout=30)
    assert_one_line_error(proc, str(fifo), "is a FIFO", "not a kernel image file")


def test_character_device_is_named(cli):
    assert_one_line_error(cli("inspect", "/dev/zero", timeout=30),
                          "/dev/zero", "is a character device", "not a kernel image file")


def test_directory_is_named(cli, tmp_path):
    assert_one_line_error(cli("inspect", tmp_path), str(tmp_path), "is a directory")


def test_symlink_to_a_device_is_followed(cli, tmp_path):
    link = tmp_path / "vmlinuz"
    link.symlink_to("/dev/null")
    assert_one_line_error(cli("inspect", "--json", link, timeout=30),
                          str(link), "/dev/null", "is a character device")


def test_symlink_to_a_kernel_is_fine(cli, tmp_path, bzimage_file):
    link = tmp_path / "vmlinuz-link"
    link.symlink_to(bzimage_file)
    proc = cli("inspect", "--json", link)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "bzimage"


# --- --json --config: one JSON document with the config in it ---


def test_json_with_config_is_json(cli, bzimage_file):
    proc = cli("inspect", "--json", "--config", bzimage_file)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # before the fix: the raw .config, not JSON
    assert doc["config"] == CONFIG.decode()
    assert doc["format"] == "bzimage" and doc["config_embedded"] is True


def test_json_with_config_missing_is_null(cli, tmp_path, make_pvh_elf):
    path = tmp_path / "vmlinux"
    path.write_bytes(make_pvh_elf())
    proc = cli("inspect", "--config", "--json", path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["config"] is None and doc["config_embedded"] is False


def test_help_documents_json_with_config(cli):
    proc = cli("inspect", "--help")
    text = " ".join(proc.stdout.decode().split())
    assert "with --json" in text and '"config"' in text


def test_plain_json_has_no_config_key(cli, bzimage_file):
    proc = cli("inspect", "--json", bzimage_file)
    assert "config" not in json.loads(proc.stdout)


# --- odd header values: described, with warnings ---


def test_zero_payload_length_is_described_with_a_warning(cli, tmp_path, make_bzimage):
    path = tmp_path / "bz_paylen0"
    path.write_bytes(make_bzimage(b"\x1f\x8b\x08" + bytes(60), payload_length=0))
    proc = cli("inspect", "--json", path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["pvh_capable"] is False
    (warning,) = doc["warnings"]
    assert "payload_length is 0" in warning and "2.08 or later" not in warning
    table = cli("inspect", path).stdout.decode()
    assert "Warnings" in table and "payload_length is 0" in table


def test_odd_kernel_alignment_is_a_warning(cli, tmp_path, codec_bzimage):
    import struct

    data = bytearray(codec_bzimage("gzip")[0])
    struct.pack_into("<I", data, 0x230, 3)  # kernel_alignment (boot.rst, 2.05+)
    path = tmp_path / "bz_align3"
    path.write_bytes(bytes(data))
    proc = cli("inspect", "--json", path)
    assert proc.returncode == 0, proc.stderr  # still described
    doc = json.loads(proc.stdout)
    assert doc["bzimage"]["kernel_alignment"] == 3 and doc["pvh_capable"] is True
    assert doc["warnings"] == ["kernel_alignment 0x3 is not a power of two; "
                               "no boot loader can align the kernel to it"]


def test_well_formed_image_has_no_warnings(cli, bzimage_file):
    proc = cli("inspect", "--json", bzimage_file)
    assert "warnings" not in json.loads(proc.stdout)
    assert "Warnings" not in cli("inspect", bzimage_file).stdout.decode()
