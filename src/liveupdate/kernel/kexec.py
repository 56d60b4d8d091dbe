"""kexec: loading the next kernel into scratch, and the reboot path.

``kexec_file_load`` places every segment inside KHO scratch (``kho_locate_mem_hole``;
EADDRNOTAVAIL when none fits): the image (its declared load size, 2 MiB aligned), a setup
segment holding the next boot parameters, their ``SETUP_KEXEC_KHO`` node and the command line,
and a copy of the scratch array (64 KiB aligned, top-down). The root FDT is passed by address,
never copied.

The reboot path (``reboot(LINUX_REBOOT_CMD_KEXEC)``): finalize KHO (serialize the memory map),
let test components act, end every userspace process, run the sanitizer, and ask the machine
to jump. The sanitizer punches out of RAM every page that is not preserved, not KHO metadata
and not a kexec segment, so a next kernel that leans on memory it did not preserve reads zeros
instead of working by luck (``kho_sanitize=off`` disables it).
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from liveupdate.abi import bootparams, image, kho_memmap
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.syscalls import KEXEC_CMDLINE_MAX
from liveupdate.errors import AbiError, LiveUpdateError

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

IMAGE_ALIGN = 2 << 20
SCRATCH_ARRAY_ALIGN = 64 << 10
SETUP_SEGMENT = 2 * PAGE_SIZE
SETUP_DATA_OFF = PAGE_SIZE
CMDLINE_OFF = PAGE_SIZE + 64


@dataclass
class Loaded:
    entry: int
    boot_params: int
    segments: list[tuple[int, int]]  # (phys, memsz)
    release: str


def unload(k: Kernel) -> None:
    loaded = k.kexec_image
    if loaded is not None:
        for phys, size in loaded.segments:
            k.scratch_pool.release(phys, size)
        k.kexec_image = None


def file_load(k: Kernel, raw: bytes, cmdline: str) -> Loaded:
    try:
        img = image.decode(raw)
    except AbiError as e:
        raise LiveUpdateError(errno.ENOEXEC, f"kexec_file_load: {e.message}") from e
    line = cmdline.encode() + b"\0"
    if len(line) > KEXEC_CMDLINE_MAX:
        raise LiveUpdateError(errno.EINVAL, "kexec_file_load: command line too long")
    kout = k.kho_out
    if kout is None:
        raise LiveUpdateError(errno.EADDRNOTAVAIL,
                              "kexec_file_load: no KHO scratch to load into (boot with kho=on)")
    # The new image may reuse the old one's room, but a failed load leaves the old one loaded
    # (kexec_file_load swaps images only on success): nothing is written until all fits.
    before, previous = list(k.scratch_pool.free), k.kexec_image
    unload(k)
    placed: list[tuple[int, int]] = []
    try:
        for size, align in ((img.load_size, IMAGE_ALIGN), (SETUP_SEGMENT, PAGE_SIZE),
                            (16 * len(kout.scratch), SCRATCH_ARRAY_ALIGN)):
            placed.append((k.scratch_pool.alloc(size, align), size))
    except LiveUpdateError:
        k.scratch_pool.free, k.kexec_image = before, previous
        raise
    (img_phys, _), (setup_phys, _), (array_phys, array_len) = placed
    k.zero(img_phys, -(-len(raw) // PAGE_SIZE) * PAGE_SIZE)
    k.write(img_phys, raw)
    k.write(array_phys, kout.scratch.tobytes())
    kd = bootparams.KhoData(kout.root_phys, PAGE_SIZE, array_phys, array_len)
    bp = k.boot_params
    nxt = bootparams.BootParams(bp.e820, setup_phys + CMDLINE_OFF, KEXEC_CMDLINE_MAX,
                                setup_phys + SETUP_DATA_OFF, img_phys)
    k.zero(setup_phys, SETUP_SEGMENT)
    k.write(setup_phys, nxt.encode())
    k.write(setup_phys + SETUP_DATA_OFF, bootparams.kho_setup_data(kd))
    k.write(setup_phys + CMDLINE_OFF, line)
    loaded = Loaded(img_phys, setup_phys, placed, img.release)
    k.kexec_image = loaded
    k.printk(f"kexec: loaded {img.release} at {img_phys:#x}, boot params at {setup_phys:#x}")
    return loaded


def keep_ranges(k: Kernel) -> np.ndarray:
    """What must survive the jump: preserved blocks, KHO metadata, kexec segments."""
    kout = k.require_kho()
    phys, order = kout.preserved()
    meta = np.array(kout.meta_pages, np.uint64)
    segs = k.kexec_image.segments if k.kexec_image else []
    seg_start = np.array([p for p, _ in segs], np.uint64)
    seg_end = np.array([p + -(-n // PAGE_SIZE) * PAGE_SIZE for p, n in segs], np.uint64)
    return kho_memmap.merge_intervals(
        np.concatenate([phys, meta, seg_start]),
        np.concatenate([phys + (np.uint64(PAGE_SIZE) << order.astype(np.uint64)),
                        meta + np.uint64(PAGE_SIZE), seg_end]))


def sanitize(k: Kernel) -> int:
    """Punch every RAM page outside :func:`keep_ranges`; returns bytes punched."""
    keep = keep_ranges(k).tolist()
    punched = 0
    for start, size in k.mem.ranges:
        cur, end = start, start + size
        for ks, ke in keep:
            if ke <= cur or ks >= end:
                continue
            if ks > cur:
                k.ram.madvise(mmap.MADV_REMOVE, cur, ks - cur)
                punched += ks - cur
            cur = max(cur, ke)
        if cur < end:
            k.ram.madvise(mmap.MADV_REMOVE, cur, end - cur)
            punched += end - cur
    return punched


def kernel_kexec(k: Kernel) -> NoReturn:
    loaded = k.kexec_image
    if loaded is None:
        raise LiveUpdateError(errno.EINVAL, "reboot(KEXEC): no kexec image loaded")
    kout = k.require_kho()
    kout.finalize()
    for hook in k.pre_jump_hooks:
        hook(k)
    killed = k.require_userspace().kill_all()
    k.printk(f"kexec: ended {killed} userspace processes")
    if k.cmdline.flag("kho_sanitize", True):
        punched = sanitize(k)
        k.printk(f"kexec: sanitizer punched {punched >> 20} MiB of unpreserved RAM")
    k.printk(f"kexec: jumping to {loaded.release} at {loaded.entry:#x}")
    try:
        k.link.send({"op": "jump", "entry": loaded.entry, "boot_params": loaded.boot_params})
    finally:
        os._exit(0)
