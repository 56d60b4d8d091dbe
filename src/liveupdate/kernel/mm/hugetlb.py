"""hugetlb pools (``mm/hugetlb.c``, Linux 7.3.4): hstates, their command line and the boot
allocation of their huge pages.

**Command line** (``hugetlb_parse_params``: the three options in command-line order):
``hugepagesz=SIZE`` adds an hstate (a size x86 supports: 2M, or 1G with GBPAGES -- the
emulated CPU has them; anything else "unsupported"; the same size twice is ignored unless it
is the default hstate whose count was not given yet); ``hugepages=N`` (or ``0:N`` per node:
one node here) sets the count of the hstate parsed last, or of the default hstate when no
size came before it; one not after a valid size is ignored, and so is a second one without a
size in between; ``default_hugepagesz=SIZE`` (once) names the default hstate and takes a
count given before it. Then ``gigantic_pages_init`` (arch_initcall) adds 1 GiB and
``hugetlb_init`` 2 MiB (``HPAGE_SIZE``), so both hstates always exist, as on x86 Linux; a
leading ``hugepages=`` with no ``default_hugepagesz`` goes to 2 MiB ("Ignoring hugepages=...
associated with ..." when that size had its own).

**Boot allocation** (``hugetlb_hstate_alloc_pages``): gigantic pages (order above
MAX_PAGE_ORDER) from memblock before the buddy allocator exists, the others from the buddy
allocator at ``hugetlb_init``; a shortfall is logged and the pool is what could be had. The
pages are never in KHO scratch (the RFC's 02/10 and 07/10: scratch is for kexec segments, and
KHO refuses to preserve a block in it). After a live update the count of each hstate is
reduced by the huge pages the previous kernel's preserved files hold (the RFC's
``hstate_liveupdate_pages``, from the ``hugetlb-v1`` FLB read early: those pages are reserved
as preserved memory and come back into the hstate when their files are retrieved or
finished); an FLB that cannot be read counts 0.

Deviations: no surplus pages, overcommit, NUMA, CMA, vmemmap optimization or sysfs resizing;
the pool's free pages are a list of physical addresses, handed out lowest first after boot.
The pages are contiguous because the buddy hands boot memory out upwards, as Linux's does
(:mod:`..buddy`); Linux's LIFO enqueue would then hand them out highest first, contiguous
but descending -- lowest first keeps a guest's folios in file order, so it maps as few
extents.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from liveupdate.abi import bootparams
from liveupdate.abi.cmdline import memparse
from liveupdate.abi.consts import MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.mm.memblock import MEMBLOCK_KHO_SCRATCH

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

PMD_ORDER, PUD_ORDER = 9, 18  # 2 MiB (HUGETLB_PAGE_ORDER), 1 GiB
HUGE_MAX_HSTATE = 2  # x86
OPTIONS = ("hugepagesz", "hugepages", "default_hugepagesz")


def size_name(order: int) -> str:
    kib = 1 << (order + PAGE_SHIFT - 10)
    return f"{kib >> 20} GiB" if kib >= 1 << 20 else f"{kib >> 10} MiB"


@dataclass(eq=False)
class Hstate:
    order: int
    max_huge_pages: int = 0  # what the command line asked for
    nr_huge_pages: int = 0  # pages of this size the kernel holds (free and in files)
    free: list[int] = field(default_factory=list)  # physical addresses of free huge pages

    @property
    def size(self) -> int:
        return PAGE_SIZE << self.order

    @property
    def name(self) -> str:
        return f"hugepages-{self.size >> 10}kB"

    def dequeue(self) -> int:
        """``hugetlb_alloc_folio`` from the free pool: ENOSPC when it is empty (no surplus
        pages: overcommit is 0)."""
        if not self.free:
            what = size_name(self.order)
            raise LiveUpdateError(err=errno.ENOSPC, msg=f"hugetlb: no free {what} page "
                                  f"({self.nr_huge_pages} in the pool)")
        return self.free.pop()

    def enqueue(self, phys: int) -> None:
        """``free_huge_folio``: back to the free pool (never to the buddy allocator)."""
        self.free.append(phys)

    def adopt(self, n: int) -> None:
        """Huge pages that joined the hstate from a previous kernel (retrieved files)."""
        self.nr_huge_pages += n


@dataclass
class Hugetlb:
    hstates: list[Hstate] = field(default_factory=list)
    default: int = -1  # default_hstate_idx

    def size_to_hstate(self, size: int) -> Hstate | None:
        return next((h for h in self.hstates if h.size == size), None)

    def sizelog(self, log: int) -> Hstate | None:
        """``hstate_sizelog``: 0 is the default hstate."""
        if not log:
            return self.hstates[self.default]
        return self.size_to_hstate(1 << log) if log < 64 else None

    def add(self, order: int) -> Hstate:
        """``hugetlb_add_hstate``: an existing size is returned as it is."""
        h = self.size_to_hstate(PAGE_SIZE << order)
        if h is None:
            h = Hstate(order)
            self.hstates.append(h)
        return h


def valid_size(size: int) -> bool:
    """``arch_hugetlb_valid_size`` (x86-64, GBPAGES)."""
    return size in (PAGE_SIZE << PMD_ORDER, PAGE_SIZE << PUD_ORDER)


def parse(words: list[tuple[str, str]], warn: Callable[[str], None]) -> Hugetlb:
    """``hugetlb_parse_params`` then ``gigantic_pages_init`` and ``hugetlb_init``'s default."""
    hs = Hugetlb()
    parsed: Hstate | None = None
    valid, parsed_default = True, False
    default_pages: int | None = None  # default_hstate_max_huge_pages
    last: object = None  # last_mhp: which count the previous hugepages= set

    def setsize(s: str, what: str) -> Hstate | None:
        size, _ = memparse(s)
        if not valid_size(size):
            warn(f"HugeTLB: unsupported {what}={s}")
            return None
        return hs.add((size.bit_length() - 1) - PAGE_SHIFT)

    for key, s in words:
        if key == "hugepages":
            if not valid:
                warn(f"HugeTLB: hugepages={s} does not follow a valid hugepagesz, ignoring")
                valid = True
                continue
            target = "default" if not hs.hstates else parsed
            if target is last:
                warn("HugeTLB: hugepages= specified twice without interleaving hugepagesz=, "
                     f"ignoring hugepages={s}")
                continue
            node, colon, count = s.rpartition(":")
            if not count.isdigit() or (colon and node != "0"):
                warn(f"HugeTLB: Invalid hugepages parameter {s}")
                if target == "default":
                    default_pages = None
                elif parsed is not None:
                    parsed.max_huge_pages = 0
                continue
            if target == "default":
                default_pages = int(count)
            elif parsed is not None:
                parsed.max_huge_pages = int(count)
            last = target
        elif key == "hugepagesz":
            valid = False
            size, _ = memparse(s)
            h = hs.size_to_hstate(size) if valid_size(size) else None
            if h is not None:
                if (not parsed_default or h is not hs.hstates[hs.default]
                        or h.max_huge_pages):
                    warn(f"HugeTLB: hugepagesz={s} specified twice, ignoring")
                    continue
                parsed, valid = h, True
                continue
            h = setsize(s, "hugepagesz")
            valid = h is not None
            parsed = h or parsed
        elif key == "default_hugepagesz":
            valid = False
            if parsed_default:
                warn(f"HugeTLB: default_hugepagesz previously specified, ignoring {s}")
                continue
            h = setsize(s, "default_hugepagesz")
            if h is None:
                continue
            parsed, valid, parsed_default = h, True, True
            hs.default = hs.hstates.index(h)
            if default_pages:
                h.max_huge_pages, default_pages = default_pages, None
    hs.add(PUD_ORDER)  # gigantic_pages_init (arch_initcall)
    two_m = hs.add(PMD_ORDER)  # hugetlb_init: HPAGE_SIZE always exists
    if not parsed_default:
        hs.default = hs.hstates.index(two_m)
        if default_pages:
            if two_m.max_huge_pages:
                warn(f"HugeTLB: Ignoring hugepages={two_m.max_huge_pages} associated with "
                     "2.00 MiB page size")
                warn(f"HugeTLB: Using hugepages={default_pages} for number of default huge "
                     "pages")
            two_m.max_huge_pages = default_pages
    return hs


def words_of(raw: str) -> list[tuple[str, str]]:
    """The hugetlb options of a command line, in order (``hugetlb_add_param``)."""
    out = []
    for w in raw.split():
        key, eq, value = w.partition("=")
        if eq and key in OPTIONS:
            out.append((key, value))
    return out[: 2 * HUGE_MAX_HSTATE + 1]  # HUGE_MAX_CMDLINE_ARGS


def _alloc_gigantic(k: Kernel, size: int) -> int:
    """A memblock allocation outside KHO scratch, top-down, naturally aligned.

    On a KHO boot of a core that extends scratch (7.3: ``kho_extend_scratch``), as 7.3.4's
    ``memblock_alloc_hugetlb``: memblock is scratch-only, so the search is among the regions
    flagged ``MEMBLOCK_KHO_SCRATCH`` -- the extended 1 GiB blocks among them -- and a
    candidate overlapping the inherited scratch areas (``kho_scratch_overlap``) is skipped.
    Elsewhere the flagged regions are the scratch itself and are left out whole."""
    kin = k.kho_in
    if kin is not None and k.gen.kho.extends_scratch and k.memblock.scratch_only:
        regions = [r for r in k.memblock.memory if r.flags & MEMBLOCK_KHO_SCRATCH]
        avoid = [(a, a + n) for a, n in bootparams.scratch_areas(kin.scratch) if n]
    else:
        regions = [r for r in k.memblock.memory if not r.flags & MEMBLOCK_KHO_SCRATCH]
        avoid = []
    for start, end in reversed(k.memblock.free_ranges(regions)):
        addr = (end - size) // size * size
        while addr >= start and end >= size:
            hit = next((a for a, b in avoid if a < addr + size and addr < b), None)
            if hit is None:
                k.memblock.reserve(addr, size)
                return addr
            addr = (hit - size) // size * size  # below the scratch it overlapped, retried
    raise LiveUpdateError(err=errno.ENOMEM, msg="memblock: no room for a gigantic page")


def _fill(k: Kernel, h: Hstate, alloc: Callable[[], int], preserved: int) -> None:
    want = max(0, h.max_huge_pages - preserved)
    while len(h.free) < want:
        try:
            h.free.append(alloc())
        except LiveUpdateError:
            k.printk(f"HugeTLB: allocating {want} of page size {size_name(h.order)} failed.  "
                     f"Only allocated {len(h.free)} hugepages.")
            break
    h.free.sort(reverse=True)  # popped lowest first: a file's folios lie in physical order
    h.nr_huge_pages = len(h.free)


def bootmem_alloc(k: Kernel, preserved: dict[int, int]) -> None:
    """``hugetlb_bootmem_alloc``: parse, then the gigantic pools from memblock, each less
    the pages preserved files hold (``preserved``: order -> pages, from the FLB)."""
    hs = parse(words_of(k.cmdline.raw), k.printk)
    k.hugetlb = hs
    for h in hs.hstates:
        if h.order > MAX_PAGE_ORDER:
            _fill(k, h, partial(_alloc_gigantic, k, h.size), preserved.get(h.order, 0))


def init(k: Kernel, preserved: dict[int, int]) -> None:
    """``hugetlb_init``: the other pools from the buddy allocator; ``report_hugepages``."""
    hs = k.hugetlb
    if hs is None:
        return
    for h in hs.hstates:
        if h.order <= MAX_PAGE_ORDER:
            _fill(k, h, partial(k.alloc_pages, h.order), preserved.get(h.order, 0))
    for h in hs.hstates:
        k.printk(f"HugeTLB: registered {size_name(h.order)} page size, pre-allocated "
                 f"{h.nr_huge_pages} pages")
