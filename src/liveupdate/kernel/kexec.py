"""kexec: loading the next kernel into scratch, and the sanitizer.

``kexec_file_load`` places every segment inside KHO scratch (``kho_locate_mem_hole``;
EADDRNOTAVAIL when none fits): the image (its declared load size, 2 MiB aligned), a setup
segment holding the next boot parameters, their ``SETUP_KEXEC_KHO`` node and the command line,
and a copy of the scratch array (64 KiB aligned, top-down). The root FDT is passed by address,
never copied. Each segment is zero-filled beyond its data (``memsz > bufsz``), as
``kimage_load_segment`` does.

The sanitizer (a step of :mod:`liveupdate.kernel.reboot`) punches every byte of RAM -- usable
or not, the e820 hole below 1 MiB included -- outside the kept set: preserved blocks, KHO
metadata and each segment's *data* (``[phys, phys + bufsz)``). A segment's tail is zeroed
again at the jump, since userspace could have written into it after the load. A next kernel
that leans on memory it did not preserve then reads zeros instead of working by luck
(``kho_sanitize=off`` disables it). Linux has no sanitizer; it is our test harness for
"only what was preserved crosses".
"""

from __future__ import annotations

import errno
import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from liveupdate.abi import bootparams, image, kho_memmap
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.syscalls import KEXEC_CMDLINE_MAX
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.luo import compat

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

IMAGE_ALIGN = 2 << 20
SCRATCH_ARRAY_ALIGN = 64 << 10
SETUP_SEGMENT = 2 * PAGE_SIZE
SETUP_DATA_OFF = PAGE_SIZE
CMDLINE_OFF = PAGE_SIZE + 64


@dataclass(frozen=True)
class Segment:
    """``struct kexec_segment``: ``bufsz`` bytes of data at ``phys``, zero up to ``memsz``."""

    phys: int
    bufsz: int
    memsz: int

    @property
    def data_end(self) -> int:
        """End of the pages holding data: what the sanitizer keeps."""
        return self.phys + -(-self.bufsz // PAGE_SIZE) * PAGE_SIZE


@dataclass(frozen=True)
class Loaded:
    entry: int
    boot_params: int
    segments: tuple[Segment, ...]
    release: str
    luo: str  # the next kernel's LUO generation, from its image header


def unload(k: Kernel) -> None:
    loaded = k.kexec_image
    if loaded is not None:
        for seg in loaded.segments:
            k.scratch_pool.release(seg.phys, seg.memsz)
        k.kexec_image = None


def file_load(k: Kernel, raw: bytes, cmdline: str) -> Loaded:
    try:
        img = image.decode(raw)
    except AbiError as e:
        raise LiveUpdateError(err=errno.ENOEXEC, msg=f"kexec_file_load: {e.message}") from e
    line = cmdline.encode() + b"\0"
    if len(line) > KEXEC_CMDLINE_MAX:
        raise LiveUpdateError(err=errno.EINVAL, msg="kexec_file_load: command line too long")
    compat.check_load(k, img.luo)
    kout = k.kho_out
    if kout is None:
        raise LiveUpdateError(err=errno.EADDRNOTAVAIL,
                              msg="kexec_file_load: no KHO scratch to load into (boot with kho=on)")
    # The new image may reuse the old one's room, but a failed load leaves the old one loaded
    # (kexec_file_load swaps images only on success): nothing is written until all fits.
    before, previous = list(k.scratch_pool.free), k.kexec_image
    unload(k)
    placed: list[int] = []
    sizes = ((img.load_size, IMAGE_ALIGN), (SETUP_SEGMENT, PAGE_SIZE),
             (16 * len(kout.scratch), SCRATCH_ARRAY_ALIGN))
    try:
        for size, align in sizes:
            placed.append(k.scratch_pool.alloc(size, align))
    except LiveUpdateError:
        k.scratch_pool.free, k.kexec_image = before, previous
        raise
    img_phys, setup_phys, array_phys = placed
    array = kout.scratch.tobytes()
    kd = bootparams.KhoData(kout.root_phys, PAGE_SIZE, array_phys, len(array))
    bp = k.boot_params
    nxt = bootparams.BootParams(bp.e820, setup_phys + CMDLINE_OFF, KEXEC_CMDLINE_MAX,
                                setup_phys + SETUP_DATA_OFF, img_phys)
    setup = bytearray(CMDLINE_OFF + len(line))
    setup[: PAGE_SIZE] = nxt.encode().ljust(PAGE_SIZE, b"\0")
    kho_node = bootparams.kho_setup_data(kd)
    setup[SETUP_DATA_OFF : SETUP_DATA_OFF + len(kho_node)] = kho_node
    setup[CMDLINE_OFF:] = line
    segments = []
    for phys, data, (memsz, _) in zip(placed, (raw, bytes(setup), array), sizes, strict=True):
        k.zero(phys, memsz)  # punched: zero-filled beyond the data at no cost
        k.write(phys, data)
        segments.append(Segment(phys, len(data), memsz))
    loaded = Loaded(img_phys, setup_phys, tuple(segments), img.release, img.luo)
    k.kexec_image = loaded
    k.printk(f"kexec: loaded {img.release} at {img_phys:#x}, boot params at {setup_phys:#x}")
    return loaded


def keep_ranges(k: Kernel) -> np.ndarray:
    """What must survive the jump: preserved blocks, KHO metadata, each segment's data."""
    kout = k.require_kho()
    phys, order = kout.preserved()
    meta = np.array(kout.meta_pages, np.uint64)
    segs = k.kexec_image.segments if k.kexec_image else ()
    seg_start = np.array([s.phys for s in segs], np.uint64)
    seg_end = np.array([s.data_end for s in segs], np.uint64)
    return kho_memmap.merge_intervals(
        np.concatenate([phys, meta, seg_start]),
        np.concatenate([phys + (np.uint64(PAGE_SIZE) << order.astype(np.uint64)),
                        meta + np.uint64(PAGE_SIZE), seg_end]))


def sanitize(k: Kernel) -> int:
    """Punch every byte of RAM outside :func:`keep_ranges`; returns bytes punched."""
    for seg in k.kexec_image.segments if k.kexec_image else ():
        tail = seg.data_end - (seg.phys + seg.bufsz)  # the data page's bytes after the data
        if tail:
            k.write(seg.phys + seg.bufsz, bytes(tail))
    punched, cur = 0, 0
    for ks, ke in [*keep_ranges(k).tolist(), (k.ram_size, k.ram_size)]:
        if ks > cur:
            k.ram.madvise(mmap.MADV_REMOVE, cur, ks - cur)
            punched += ks - cur
        cur = max(cur, ke)
    return punched
