"""kexec: loading the next kernel, placing its segments as Linux does, and the jump.

Placement matches ``kexec_file_load`` (6.16-6.19): ``kho_fill_kimage`` adds the scratch-array
segment first (4 KiB after ``kexec_add_buffer``'s page rounding, 64 KiB aligned, top-down),
then the image loader adds its own: the boot parameters page with the ``SETUP_KEXEC_KHO``
node and the command line (``bzImage64_load``: 16-byte alignment raised to a page, at least
``MIN_BOOTPARAM_ADDR``), then the kernel (its load size, its 2 MiB ``kernel_alignment``, at
least its 16 MiB preferred address). Each goes through ``kexec_locate_mem_hole``: with KHO
enabled ``kho_locate_mem_hole`` walks the scratch areas *in array order* (lowmem, global, per
node; zero-size ones never fit) and ``locate_mem_hole_top_down`` takes the first that fits --
aligned down from the top, stepping a page below any earlier segment of the image; with KHO
disabled the walk is over System RAM, highest range first (``walk_system_ram_res_rev``).
EADDRNOTAVAIL when nothing fits. There is no purgatory segment: the emulated jump needs none.
On the 6.18 core ``kho_fill_kimage`` returns early unless KHO was finalized: no scratch-array
segment and no ``SETUP_KEXEC_KHO`` node, so the next kernel boots cold (6.16 and 6.19 pass
the root page whatever its state; :mod:`liveupdate.kernel.kho.core`).

Like Linux, the segments' bytes are staged in the running kernel's memory at load time and
copied to their destinations at the jump (``machine_kexec``'s relocation), so a destination
may be memory this kernel is still using -- on a KHO boot every inherited scratch area is
usable, though early boot allocated from it. The copy is of kexec segments only (tens of KiB
of data; the rest of ``memsz`` is punched to zero), never of preserved memory
(``bench/bench_machine.py`` measures it).

The sanitizer (a step of :mod:`liveupdate.kernel.reboot`) punches every byte of RAM -- usable
or not, the e820 hole below 1 MiB included -- outside the kept set: preserved blocks and KHO
metadata; the segments are written after it. A next kernel that leans on memory it did not
preserve then reads zeros instead of working by luck (``kho_sanitize=off`` disables it).
Linux has no sanitizer; it is our test harness for "only what was preserved crosses".
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
from liveupdate.kernel import negotiate
from liveupdate.kernel.luo import compat

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

SCRATCH_ARRAY_ALIGN = 64 << 10
SETUP_DATA_OFF = PAGE_SIZE
CMDLINE_OFF = PAGE_SIZE + 64
MIN_BOOTPARAM_ADDR = 0x3000
MIN_KERNEL_LOAD_ADDR = 16 << 20  # x86 LOAD_PHYSICAL_ADDR, the bzImage pref_address
KERNEL_ALIGNMENT = 2 << 20
U64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class Segment:
    """``struct kexec_segment``: ``bufsz`` bytes of data at ``phys``, zero up to ``memsz``."""

    phys: int
    bufsz: int
    memsz: int

    @property
    def last(self) -> int:
        return self.phys + self.memsz - 1


@dataclass(frozen=True)
class Loaded:
    entry: int
    boot_params: int
    segments: tuple[Segment, ...]
    staged: tuple[bytearray, ...]  # each segment's data, until the jump copies it
    release: str
    image: image.KernelImage  # the next kernel's header: its generation and manifest
    cmdline: str
    plan: negotiate.Plan | None = None  # liveupdate_negotiate=on: the agreed formats

    def patch(self, phys: int, data: bytes) -> None:
        """Change staged segment bytes by destination address (test components)."""
        for seg, buf in zip(self.segments, self.staged, strict=True):
            if seg.phys <= phys and phys + len(data) <= seg.phys + seg.bufsz:
                buf[phys - seg.phys : phys - seg.phys + len(data)] = data
                return
        raise LiveUpdateError(err=errno.EINVAL, msg=f"no segment data at {phys:#x}")


def locate_mem_hole(areas: list[tuple[int, int]], placed: list[Segment], memsz: int,
                    align: int, buf_min: int = 0, buf_max: int = U64_MAX) -> int | None:
    """The first of ``areas`` (in order) where ``locate_mem_hole_top_down`` finds room.

    ``locate_mem_hole_callback`` skips an area smaller than ``memsz`` or outside
    ``[buf_min, buf_max]``; inside one, the start is aligned down from the top and moved a page
    lower (then aligned again) while it overlaps an earlier segment
    (``kimage_is_destination_range``).
    """
    for start, size in areas:
        end = start + size - 1
        if size < memsz or end < buf_min or start > buf_max:
            continue
        temp_start = min(end, buf_max) - memsz + 1
        while True:
            temp_start = temp_start // align * align
            if temp_start < start or temp_start < buf_min:
                break
            temp_end = temp_start + memsz - 1
            if any(s.phys <= temp_end and temp_start <= s.last for s in placed):
                temp_start -= PAGE_SIZE
                continue
            return temp_start
    return None


class Placer:
    """``kexec_add_buffer`` over one image: each buffer's memsz rounded up to a page, its
    alignment at least a page, placed by :func:`locate_mem_hole` in KHO scratch
    (``kho_locate_mem_hole``) or, with KHO disabled, System RAM highest first."""

    def __init__(self, k: Kernel) -> None:
        if k.kho_out is not None:
            self.areas, self.where = bootparams.scratch_areas(k.kho_out.scratch), "KHO scratch"
        else:
            self.areas, self.where = sorted(k.mem.ranges, reverse=True), "System RAM"
        self.placed: list[Segment] = []

    def add(self, bufsz: int, memsz: int, align: int, buf_min: int = 0) -> Segment:
        memsz = -(-memsz // PAGE_SIZE) * PAGE_SIZE
        phys = locate_mem_hole(self.areas, self.placed, memsz, max(align, PAGE_SIZE), buf_min)
        if phys is None:
            raise LiveUpdateError(err=errno.EADDRNOTAVAIL,
                                  msg=f"kexec_file_load: no {memsz:#x}-byte hole in {self.where}")
        seg = Segment(phys, bufsz, memsz)
        self.placed.append(seg)
        return seg


def unload(k: Kernel) -> None:
    k.kexec_image = None


def file_load(k: Kernel, raw: bytes, cmdline: str) -> Loaded:
    """``kexec_file_load``: nothing changes unless every segment finds a place (the loaded
    image is swapped only on success)."""
    try:
        img = image.decode(raw)
    except AbiError as e:
        raise LiveUpdateError(err=errno.ENOEXEC, msg=f"kexec_file_load: {e.message}") from e
    line = cmdline.encode() + b"\0"
    if len(line) > KEXEC_CMDLINE_MAX:
        raise LiveUpdateError(err=errno.EINVAL, msg="kexec_file_load: command line too long")
    plan = None
    if negotiate.enabled(k.cmdline):
        plan = negotiate.plan(k, img, cmdline)
        negotiate.check_files(k, plan, "kexec_file_load")
    else:
        compat.check_load(k, img, cmdline)
    kout = k.kho_out
    placer = Placer(k)
    staged: list[bytes] = []
    kho_node = b""
    if kout is not None and not kout.core.fill_kimage_passes(kout):
        # 6.18 kho_fill_kimage returns early: this image will carry no handover at all
        k.printk("kexec: KHO is not finalized: the loaded image gets no handover (finalize "
                 "before kexec_file_load on this kernel)")
    elif kout is not None:  # kho_fill_kimage, before the image loader
        array = kout.scratch.tobytes()
        arr_seg = placer.add(len(array), len(array), SCRATCH_ARRAY_ALIGN)
        staged.append(array)
        kd = bootparams.KhoData(kout.root_phys, PAGE_SIZE, arr_seg.phys, len(array))
        kho_node = bootparams.kho_setup_data(kd)
    setup_len = CMDLINE_OFF + len(line)
    setup_seg = placer.add(setup_len, -(-setup_len // 16) * 16, 16, MIN_BOOTPARAM_ADDR)
    img_seg = placer.add(len(raw), img.load_size, KERNEL_ALIGNMENT, MIN_KERNEL_LOAD_ADDR)
    bp = k.boot_params
    nxt = bootparams.BootParams(bp.e820, setup_seg.phys + CMDLINE_OFF, KEXEC_CMDLINE_MAX,
                                setup_seg.phys + SETUP_DATA_OFF if kho_node else 0,
                                img_seg.phys)
    setup = bytearray(setup_len)
    setup[:PAGE_SIZE] = nxt.encode().ljust(PAGE_SIZE, b"\0")
    setup[SETUP_DATA_OFF : SETUP_DATA_OFF + len(kho_node)] = kho_node
    setup[CMDLINE_OFF:] = line
    staged += [bytes(setup), raw]
    loaded = Loaded(img_seg.phys, setup_seg.phys, tuple(placer.placed),
                    tuple(bytearray(b) for b in staged), img.release, img, cmdline,
                    plan)
    k.kexec_image = loaded
    k.printk(f"kexec: loaded {img.release} at {img_seg.phys:#x}, boot params at "
             f"{setup_seg.phys:#x}" + (f"; handover {plan.describe()}" if plan else ""))
    return loaded


def copy_segments(k: Kernel) -> int:
    """The jump's relocation: each segment's staged data to its destination, the rest of
    ``memsz`` zeroed (punched). Returns the bytes copied."""
    loaded = k.kexec_image
    if loaded is None:
        return 0
    for seg, data in zip(loaded.segments, loaded.staged, strict=True):
        k.zero(seg.phys, seg.memsz)
        k.write(seg.phys, bytes(data))
    return sum(len(d) for d in loaded.staged)


def keep_ranges(k: Kernel) -> np.ndarray:
    """What must survive the jump besides the segments: preserved blocks, KHO metadata."""
    kout = k.kho_out
    if kout is None:
        return np.zeros((0, 2), np.uint64)
    phys, order = kout.preserved()
    meta = np.array(kout.kept_pages(), np.uint64)
    return kho_memmap.merge_intervals(
        np.concatenate([phys, meta]),
        np.concatenate([phys + (np.uint64(PAGE_SIZE) << order.astype(np.uint64)),
                        meta + np.uint64(PAGE_SIZE)]))


def sanitize(k: Kernel) -> int:
    """Punch every byte of RAM outside :func:`keep_ranges`; returns bytes punched."""
    punched, cur = 0, 0
    for ks, ke in [*keep_ranges(k).tolist(), (k.ram_size, k.ram_size)]:
        if ks > cur:
            k.ram.madvise(mmap.MADV_REMOVE, cur, ks - cur)
            punched += ks - cur
        cur = max(cur, ke)
    return punched
