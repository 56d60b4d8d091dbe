"""The kernel generation of one boot: chosen once, from the image header, in ``setup_arch``.

Everything that differs between the kernel generations hangs off it: the KHO core (its root
strategy, finalize and debugfs behaviour: :mod:`liveupdate.kernel.kho.core`) and the LUO
generation row (:data:`liveupdate.abi.generations.LUO`: the uAPI, the front end, the handover
writer and its limits, the rules that changed between releases, the native file-handler
formats), and the formats the image writes and claims to read. An image may pair a KHO core
and a LUO generation that no release shipped together (``luoctl image create``); the image
header's validation decides which pairs exist. The kernel never asks "which generation" again:
the KHO side keeps its core object, LUO is built from the row (:mod:`liveupdate.kernel.luo.
boot`), the reboot path takes the plan's formats from :mod:`liveupdate.kernel.negotiate`.
"""

from __future__ import annotations

from dataclasses import dataclass

from liveupdate.abi.generations import LuoGeneration
from liveupdate.abi.image import KernelImage
from liveupdate.kernel.kho.core import CORES, KhoCore


@dataclass(frozen=True)
class Generation:
    image: KernelImage
    kho: KhoCore
    luo: LuoGeneration

    @classmethod
    def of(cls, img: KernelImage) -> Generation:
        return cls(img, CORES[img.kho_core], img.luo_gen)
