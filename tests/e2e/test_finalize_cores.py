"""The finalize rule of each KHO core across a real kexec (process replacement), with
test_kho's 8 MiB of folios as the preserved payload and the kexec tool as userspace.

6.16: without finalize the root page is no FDT -> cold boot ("-22"); 6.18: finalize after the
load -> the image carries no handover; 6.19 without LUO: "-2"; 7.1: nothing to finalize.
Then the selftest's flow (finalize, load, reboot) restores on every core.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from liveupdate.abi.image import KernelImage

from .conftest import Factory

CORES = {
    "6.16": (KernelImage(release="6.16.0-lu", kho_core="6.16", luo="none",
                         kho_bitmap_bytes=512), "KHO: disabling KHO revival: -22"),
    "6.18": (KernelImage(release="6.18.0-lu", kho_core="6.18", luo="none"),
             "kexec: KHO is not finalized: the loaded image gets no handover (finalize before "
             "kexec_file_load on this kernel)"),
    "6.19": (KernelImage(), "KHO: disabling KHO revival: -2"),
    "7.1": (KernelImage(release="7.1.0-lu", luo="7.1", memfd="memfd-v2"), None),
}
FINALIZE = [sys.executable, "-c", "from liveupdate.client.syscall import Kernel; "
            "Kernel().debugfs_write('out/finalize', b'1')"]


@pytest.mark.parametrize("core", list(CORES))
def test_each_core_finalizes_as_linux(machine: Factory, tmp_path: Path, core: str) -> None:
    img, without = CORES[core]
    images = tmp_path / "m0" / "disk" / "images"
    images.mkdir(parents=True)
    (images / "k.img").write_bytes(img.encode())
    m = machine("kho=on test_kho=1", image="images/k.img")  # no liveupdate=on
    off = m.status()["console_bytes"]
    m.kexec_load("images/k.img")
    if core == "6.18":
        assert m.run(FINALIZE)["status"] == 0  # after the load: too late
    st = m.kexec_exec()
    assert st["kernel"]["release"] == img.release
    if without is None:
        assert st["kernel"]["kho_boot"]
        m.wait("KHO restore succeeded", offset=off)
    else:
        assert not st["kernel"]["kho_boot"]
        m.wait("test_kho: .*csum", offset=off)  # the cold path's fresh save
        _, text = m.console(off)
        assert without.encode() + b"\n" in text
        assert b"KHO restore succeeded" not in text
    off = m.status()["console_bytes"]
    st = m.kexec("images/k.img")  # the selftest's init: finalize, load, reboot
    assert st["kernel"]["kho_boot"] and st["kernel"]["release"] == img.release
    m.wait("KHO restore succeeded", offset=off)
