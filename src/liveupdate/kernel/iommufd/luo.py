"""The iommufd LUO file handler ``iommufd-v1``, as the IOMMU live update series v5 posts it
(``<20260921004834.2601285-1-skhawaja@google.com>``; docs/posted-series.md 3.7), on
``7.3+posted`` only; the IOMMU FLB (:mod:`liveupdate.kernel.drivers.iommu_flb`) hangs on it.

``preserve``: the HWPTs marked with ``IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE``, in ID order
(EINVAL when none is: nothing to keep); each one's IOAS becomes immutable after every area is
checked -- a file mapping of a memfd sealed ``F_SEAL_SEAL | F_SEAL_GROW | F_SEAL_SHRINK`` at
map time (EINVAL), itself preserved (ENOENT, ``liveupdate_get_token_outgoing``'s answer;
deviation: in any session, where the series asks for the same one) -- then the domain is
preserved in the FLB and ``struct iommufd_ser`` written (:mod:`liveupdate.abi.iommufd`).

``retrieve`` is **our extension** (the stored postings answer EOPNOTSUPP and never let such a
session finish; open question 5): a new iommufd whose objects 1..n are the preserved HWPTs in
``hwpt_array`` order, each around the domain the IOMMU driver took over, with its token, and
object n+1 their IOAS -- empty and immutable: the mapping *is* the preserved page table, and
the memory the memfd retrieved beside it. A device retrieved by vfio-pci attaches to one.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from liveupdate.abi import iommu_flb as flb_abi
from liveupdate.abi import iommufd as ser
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.drivers import iommu_flb
from liveupdate.kernel.fs.file import File
from liveupdate.kernel.iommufd.fops import IommufdOps
from liveupdate.kernel.iommufd.objects import Hwpt, Ictx, Ioas
from liveupdate.kernel.luo.handler import Args

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

SEALS_NEEDED = 0x1 | 0x2 | 0x4  # F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW


class IommufdHandler:
    compatible = ser.COMPATIBLE
    format = ser.COMPATIBLE
    component = "iommufd"

    def __init__(self, k: Kernel, fmt: str) -> None:
        self.k = k

    def can_preserve(self, f: File) -> bool:
        return isinstance(f.ops, IommufdOps)

    def _flb(self) -> iommu_flb.IommuFlb:
        flb = iommu_flb.outgoing(self.k)
        if flb is None or not flb.head:
            raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="iommufd: no IOMMU FLB")
        return flb

    @staticmethod
    def _marked(ctx: Ictx) -> list[Hwpt]:
        return sorted((o for o in ctx.objects.values() if isinstance(o, Hwpt)
                       and o.token is not None), key=lambda h: h.id)

    def preserve(self, a: Args) -> int:
        assert a.file is not None
        ctx: Ictx = a.file.private
        hwpts = self._marked(ctx)
        if not hwpts:
            raise LiveUpdateError(err=errno.EINVAL, msg="iommufd: no HWPT is marked for "
                                  "preservation")
        for h in hwpts:
            for area in h.ioas.areas:
                if area.seals & SEALS_NEEDED != SEALS_NEEDED:
                    raise LiveUpdateError(err=errno.EINVAL, msg=f"iommufd: IOAS {h.ioas.id}: "
                                          f"a memfd mapped without F_SEAL_SEAL|GROW|SHRINK")
                if not area.memfd.frozen:
                    raise LiveUpdateError(err=errno.ENOENT, msg=f"iommufd: IOAS {h.ioas.id}:"
                                          " a mapped memfd is not preserved")
        flb, done = self._flb(), []
        try:
            for h in hwpts:
                done.append((h, flb.add_domain(h.domain)))
        except LiveUpdateError:
            for h, _ in done:
                flb.remove_domain(h.domain)
            raise
        for h in hwpts:
            h.ioas.immutable = True
        raw = ser.encode([ser.Hwpt(phys, h.token or 0) for h, phys in done])
        return self.k.require_kho().store(raw)

    def unpreserve(self, a: Args) -> None:
        assert a.file is not None
        flb = iommu_flb.outgoing(self.k)
        for h in self._marked(a.file.private):
            if flb is not None:
                flb.remove_domain(h.domain)
            h.ioas.immutable = False
        self.k.require_kho().unpreserve_free(a.data, ser.size(len(self._marked(a.file.private))))

    def freeze(self, a: Args) -> int:
        return a.data

    def unfreeze(self, a: Args) -> None:
        pass

    def _read(self, data: int) -> list[ser.Hwpt]:
        try:
            (n,) = ser.HEAD.unpack(self.k.mem.read(data, ser.HEAD.size, "iommufd-v1"))
            n = min(n, ser.MAX_HWPTS + 1)  # one more than fits: decode says why
            return ser.decode(self.k.mem.read(data, ser.HEAD.size + n * ser.HWPT.size,
                                              "iommufd-v1"))
        except AbiError as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=e.message) from e

    def retrieve(self, a: Args) -> File:
        hwpts = self._read(a.data)
        t = self.k.iommu
        if t is None:
            raise LiveUpdateError(err=errno.ENODEV, msg="iommufd: no IOMMU took the tables "
                                  "over (intel_iommu=on)")
        ctx = Ictx(t)
        ioas = Ioas(len(hwpts) + 1, immutable=True)
        for i, h in enumerate(hwpts):
            top = flb_abi.DOMAIN.unpack(self.k.mem.read(h.domain_data, flb_abi.DOMAIN.size,
                                                        "IOMMU FLB domain"))[2]
            dom = next((d for d in t.domains.values() if d.top == top), None)
            if dom is None:
                raise LiveUpdateError(err=errno.ENOENT, msg=f"iommufd: HWPT {i}: its domain "
                                      "was not taken over")
            hw = Hwpt(i + 1, ioas, dom, token=h.token)
            ctx.objects[hw.id] = hw
            ioas.hwpts.append(hw)
        ctx.objects[ioas.id] = ioas
        ctx.skip_ids(ioas.id + 1)
        kin = self.k.kho_in
        if kin is not None:
            kin.restore_folio(a.data)
        return File(IommufdOps(posted=True), ctx)

    def finish(self, a: Args) -> None:
        """The struct's folio is the kernel's again (retrieved or not, the tables stay: the
        IOMMU driver owns them)."""
        if a.file is None:
            kin = self.k.kho_in
            if kin is not None and kin.restore_folio(a.data) == 0:
                self.k.free_pages(a.data, 0)
