"""Firmware: what a cold boot finds in RAM.

The e820 map is ``[0, 0x9f000)`` usable, ``[0x9f000, 1 MiB)`` reserved, ``[1 MiB, end)``
usable. The boot loader puts the kernel image at 16 MiB, the command line at 0x20000 and the
boot parameters (zero page) at 0x7000, as an x86 boot loader would.
"""

from __future__ import annotations

import errno

import numpy as np

from liveupdate.abi import bootparams, image
from liveupdate.errors import LiveUpdateError
from liveupdate.machine.ram import Ram

BOOT_PARAMS = 0x7000
CMDLINE = 0x20000
IMAGE_BASE = 16 << 20


def e820(size: int) -> np.ndarray:
    return np.array([(0, 0x9F000, bootparams.E820_RAM),
                     (0x9F000, 0x100000 - 0x9F000, bootparams.E820_RESERVED),
                     (0x100000, size - 0x100000, bootparams.E820_RAM)], bootparams.E820_DTYPE)


def cold_boot(ram: Ram, image_bytes: bytes, cmdline: str) -> int:
    """Lay out a cold boot; returns the boot parameters' physical address."""
    img = image.decode(image_bytes)
    if IMAGE_BASE + img.load_size > ram.size:
        raise LiveUpdateError(err=errno.ENOMEM, msg="the kernel image does not fit in RAM")
    line = cmdline.encode() + b"\0"
    if len(line) > bootparams.CMDLINE_MAX:
        raise LiveUpdateError(err=errno.EINVAL, msg="command line longer than 2048 bytes")
    ram.write(IMAGE_BASE, image_bytes)
    ram.write(CMDLINE, line)
    bp = bootparams.BootParams(e820(ram.size), CMDLINE, bootparams.CMDLINE_MAX, 0, IMAGE_BASE)
    ram.write(BOOT_PARAMS, bp.encode())
    return BOOT_PARAMS
