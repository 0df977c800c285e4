"""One build, two ways in (issue 4): the project's small kernel as a bzImage,
built with each codec CI uses, boots to /init

- through the Linux 64-bit boot protocol, where the guest's own decompressor
  runs (CONFIG_X86_VERBOSE_BOOTUP makes it say so on the console), and
- through PVH, after pvhboot extracted the payload ELF on the host (the
  default `auto` path, which must say so in its one stderr line).

Each boot stops at "Run /init" (30-70 s each on the PVM host), so this is
four boots; the kernel's own report of command line, e820 map and RAMDISK is
checked in both paths (conftest.Boot.check_reached_init).
"""

from __future__ import annotations

import re

import pytest

from pvhtest import requires_kvm

pytestmark = [pytest.mark.kernel, requires_kvm]

# The codecs scripts/test builds the test kernel with (CI runs both).
CI_CODECS = ("gzip", "zstd")

# arch/x86/boot/compressed/misc.c, printed with CONFIG_X86_VERBOSE_BOOTUP.
# 6.1 prints "Decompressing Linux... Parsing ELF... done." then
# "Booting the kernel (entry_offset: 0x...)."
DECOMPRESSING = "Decompressing Linux..."
PARSED = "Parsing ELF... done."
BOOTING = "Booting the kernel"
# The decompressor finds its UART only through earlyprintk= (or
# console=uart8250,io,...): arch/x86/boot/early_serial_console.c does not
# read console=ttyS0.
DECOMPRESSOR_CONSOLE = "earlyprintk=ttyS0"

# On the PVM host the guest's zstd decompressor runs BMI2 `shlx`/`shrx`
# (picked by CPUID, which that KVM cannot filter) that its emulator lacks;
# pvhboot's host quirks emulate them, so the zstd row must pass there too.


def _bzimage(small_kernel, codec: str):
    from pvhboot.image.kernel import open_image

    files = small_kernel(codec)
    img = open_image(str(files.vmlinuz), load_payload=False)
    # The build really used this codec (else the two parametrizations would
    # test the same decompressor twice).
    assert img.format == "bzimage" and img.compression == codec, (img.format, img.compression)
    return files.vmlinuz


@pytest.mark.parametrize("codec", CI_CODECS)
def test_bzimage_linux_protocol_guest_decompressor(codec, small_kernel, initramfs, boot_kernel):
    b = boot_kernel(_bzimage(small_kernel, codec), initrd=initramfs, boot="linux",
                    extra_cmdline=DECOMPRESSOR_CONSOLE)
    assert b.plan.protocol == "linux64"
    assert "Linux 64-bit boot protocol" in b.path_message, b.path_message
    console = b.console
    assert DECOMPRESSING in console, b.context()
    assert PARSED in console, b.context()
    assert BOOTING in console, b.context()
    # The decompressor runs before the kernel proper prints anything.
    order = [console.index(s) for s in (DECOMPRESSING, PARSED, BOOTING, "Linux version")]
    assert order == sorted(order), b.context()
    b.check_reached_init(initramfs)


@pytest.mark.parametrize("codec", CI_CODECS)
def test_bzimage_auto_boots_extracted_vmlinux_through_pvh(codec, small_kernel, initramfs,
                                                          boot_kernel):
    b = boot_kernel(_bzimage(small_kernel, codec), initrd=initramfs, boot="auto")
    assert b.plan.protocol == "pvh"
    assert re.search(
        rf"^bzImage 6\.1\.\S+ \({codec}\) has a PVH entry: booting the extracted vmlinux "
        r"through PVH",
        b.path_message,
    ), b.path_message
    # The guest's decompressor never ran: PVH enters the extracted ELF.
    assert DECOMPRESSING not in b.console, b.context()
    b.check_reached_init(initramfs)
